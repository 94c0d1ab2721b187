//! Where a client command connects, and with which credentials.
//!
//! Endpoint: `--endpoint`, else `listen` from the local agent's config
//! (`--config FILE`, else /etc/blixard/agent.toml if it exists), else
//! 127.0.0.1:7000. Credentials: `--ca`/`--cert`/`--key`, each defaulting
//! to what the agent's config gives:
//!
//! - `[tls]`: its files (the agent's member certificate; members are
//!   admins);
//! - `cluster_secret_file`: the cluster CA derived from the secret, and a
//!   client certificate (admin, named after the agent's `node_name`) that
//!   the CLI issues itself from it for this one call: whoever can read the
//!   secret holds the cluster anyway;
//! - neither: the certificate the cluster issued to the agent when it
//!   joined with a token (`DATA_DIR/tls/`), if there is one;
//! - `insecure = true`: none.
//!
//! TLS is used when the endpoint says `https://`, or when it gives no
//! scheme and a CA is known; `http://` means plain text. Every problem
//! here is a usage error (exit 2) found before any traffic.

use std::path::Path;

use crate::api::client::{ConnectOptions, TlsOptions};
use crate::config::{FileConfig, TlsSection};

use super::args::{ClientArgs, Scheme, default_endpoint, parse_endpoint};
use super::error::CliError;

/// Largest PEM file read (a CA bundle is a few hundred KiB at most).
const PEM_LEN_MAX: u64 = 1024 * 1024;

/// Resolves `args` into connect options; `default_config` is where the
/// local agent's config lives when `--config` is not given.
pub fn resolve(args: &ClientArgs, default_config: &Path) -> Result<ConnectOptions, CliError> {
    let needs_config = args.endpoint.is_none() || args.ca.is_none() || args.cert.is_none() || args.key.is_none();
    let config = if needs_config { load_config(args.config.as_deref(), default_config)? } else { None };

    let endpoint = match (&args.endpoint, config.as_ref().and_then(|c| c.listen.as_deref())) {
        (Some(endpoint), _) => endpoint.clone(),
        (None, Some(listen)) => parse_endpoint(listen).map_err(|e| {
            CliError::usage(format!(
                "`listen` in the agent's config cannot be used as the endpoint: {e}; pass --endpoint"
            ))
        })?,
        (None, None) => default_endpoint(),
    };

    let flags_given = args.ca.is_some() || args.cert.is_some() || args.key.is_some();
    if endpoint.scheme == Some(Scheme::Http) {
        if flags_given {
            return Err(CliError::usage(
                "--ca, --cert and --key need TLS but the endpoint says http://; use https:// or HOST:PORT",
            ));
        }
        return Ok(ConnectOptions { authority: endpoint.authority(), tls: None, timeout: args.timeout() });
    }
    let from_config = match &config {
        Some(config) => config_credentials(config)?,
        None => Defaults::default(),
    };
    let ca = match &args.ca {
        Some(path) => Some(read_pem("--ca", path)?),
        None => from_config.ca,
    };
    let identity = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => Some((read_pem("--cert", cert)?, read_pem("--key", key)?)),
        (Some(_), None) => return Err(CliError::usage("--cert needs --key (the client's private key)")),
        (None, Some(_)) => return Err(CliError::usage("--key needs --cert (the client's certificate)")),
        (None, None) => from_config.identity,
    };
    let tls = match ca {
        Some(ca_pem) => Some(TlsOptions { ca_pem, identity, server_name: endpoint.tls_name().to_string() }),
        None if endpoint.scheme == Some(Scheme::Https) => {
            return Err(CliError::usage(
                "an https:// endpoint needs --ca (the CA that signed the agents' certificates)",
            ));
        }
        None if identity.is_some() => {
            return Err(CliError::usage("--cert and --key need --ca (the CA that signed the agents' certificates)"));
        }
        None => None,
    };
    Ok(ConnectOptions { authority: endpoint.authority(), tls, timeout: args.timeout() })
}

/// Connect options for an agent's own use of the client API (probing its
/// peers before `recover --force-new-cluster`): `address` (HOST:PORT, as
/// the member list holds it) with the credentials the agent configured in
/// `config` would run with (its `[tls]` files, a member certificate from
/// `cluster_secret_file`, or the one it got when it joined), none when it
/// runs `insecure`.
pub fn for_member(
    address: &str,
    config: &crate::config::Config,
    timeout: std::time::Duration,
) -> Result<ConnectOptions, CliError> {
    use crate::api::tls::AgentAuth;
    let endpoint =
        parse_endpoint(address).map_err(|e| CliError::usage(format!("a member's address cannot be dialled: {e}")))?;
    let auth = AgentAuth::load(config).map_err(|e| CliError::usage(format!("`{}`: {}", e.key, e.message)))?;
    let tls = match auth {
        AgentAuth::Insecure => None,
        AgentAuth::Tls(credentials) => Some(TlsOptions {
            ca_pem: credentials.ca_pem.clone(),
            identity: Some(credentials.identity_pems()),
            server_name: endpoint.tls_name().to_string(),
        }),
        AgentAuth::TokenJoin { .. } => {
            return Err(CliError::usage(
                "this agent has not been admitted to a cluster yet (it holds no member certificate)",
            ));
        }
    };
    Ok(ConnectOptions { authority: endpoint.authority(), tls, timeout })
}

/// What the agent's config gives a client to connect with.
#[derive(Default)]
struct Defaults {
    ca: Option<Vec<u8>>,
    /// (certificate PEM, key PEM)
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// The credentials of the agent configured in `config` (see the module doc).
fn config_credentials(config: &FileConfig) -> Result<Defaults, CliError> {
    let tls = config.tls.clone().unwrap_or_default();
    if tls.ca_file.is_some() || tls.cert_file.is_some() || tls.key_file.is_some() {
        return config_tls_files(&tls);
    }
    if let Some(path) = &config.cluster_secret_file {
        return secret_credentials(config, path);
    }
    if config.insecure == Some(true) {
        return Ok(Defaults::default());
    }
    let data_dir = config.data_dir.clone().unwrap_or_else(|| crate::config::DEFAULT_DATA_DIR.into());
    let files = crate::pki::JoinedFiles::in_data_dir(&data_dir);
    // Only when this user may read them: otherwise the agent's refusal
    // (it needs a certificate) says more than a permission error here.
    let readable = |p: &Path| std::fs::File::open(p).is_ok();
    if files.admitted() && readable(&files.key()) {
        return Ok(Defaults {
            ca: Some(read_pem("the cluster's CA certificates", &files.ca())?),
            identity: Some((read_pem("the member certificate", &files.cert())?, read_pem("the key", &files.key())?)),
        });
    }
    Ok(Defaults::default())
}

fn config_tls_files(tls: &TlsSection) -> Result<Defaults, CliError> {
    let identity = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => Some((read_pem("--cert", cert)?, read_pem("--key", key)?)),
        _ => None,
    };
    let ca = tls.ca_file.as_ref().map(|ca| read_pem("--ca", ca)).transpose()?;
    Ok(Defaults { ca, identity })
}

/// The cluster CA and a client certificate issued here, for this one call.
fn secret_credentials(config: &FileConfig, path: &Path) -> Result<Defaults, CliError> {
    use crate::pki::{CLI_CERT_VALID_DAYS, ClusterCa, ClusterSecret};
    let read = |path: &Path| {
        ClusterSecret::read(path).map_err(|e| {
            CliError::usage(format!(
                "{e}; run this as the agent's user, or pass --ca, --cert and --key (`cluster issue-client`)"
            ))
        })
    };
    let ca = ClusterCa::from_secret(&read(path)?);
    let mut ca_pem = ca.cert_pem().as_bytes().to_vec();
    if let Some(accepted) = &config.cluster_secret_accepted_file {
        ca_pem.extend_from_slice(ClusterCa::from_secret(&read(accepted)?).cert_pem().as_bytes());
    }
    let name =
        config.node_name.clone().filter(|n| crate::names::validate(n).is_ok()).unwrap_or_else(|| "local".to_string());
    let identity = crate::api::tls::CertIdentity::client(&name, crate::api::tls::Role::Admin);
    let issued = ca
        .issue_with_new_key(&identity, &[], CLI_CERT_VALID_DAYS)
        .map_err(|e| CliError::failed(format!("cannot make a client certificate: {e}")))?;
    Ok(Defaults { ca: Some(ca_pem), identity: Some((issued.cert.into_bytes(), issued.key.into_bytes())) })
}

/// The local agent's config file, if any. `--config` must be readable; the
/// default path is skipped when absent but must parse when present (using
/// it silently without its TLS files would be worse than an error).
fn load_config(explicit: Option<&Path>, default: &Path) -> Result<Option<FileConfig>, CliError> {
    let path = match explicit {
        Some(path) => path,
        None if default.exists() => default,
        None => return Ok(None),
    };
    FileConfig::load(path).map(Some).map_err(|e| {
        CliError::usage(format!("cannot use the agent's config {}: {}: {}", path.display(), e.key, e.message))
    })
}

fn read_pem(flag: &str, path: &Path) -> Result<Vec<u8>, CliError> {
    let cannot = |why: String| CliError::usage(format!("cannot read {flag} {}: {why}", path.display()));
    let len = std::fs::metadata(path).map_err(|e| cannot(io_reason(&e)))?.len();
    if len > PEM_LEN_MAX {
        return Err(cannot(format!("{len} bytes is too large for a PEM file")));
    }
    let pem = std::fs::read(path).map_err(|e| cannot(io_reason(&e)))?;
    if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(cannot("it is not a PEM file".to_string()));
    }
    Ok(pem)
}

pub use crate::pki::io_reason;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command, ParseExit, parse, plan};
    use std::path::PathBuf;

    fn client_args(args: &[&str]) -> ClientArgs {
        let all = ["blixard-agent", "vm", "list"].into_iter().chain(args.iter().copied());
        let cli: Cli = match parse(all) {
            Ok(cli) => cli,
            Err(ParseExit::Error(e)) => panic!("{e}"),
            Err(ParseExit::Print(_)) => panic!("help"),
        };
        let Command::Vm(_) = &cli.command else { panic!() };
        plan(cli.command).unwrap().1
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    #[test]
    fn endpoint_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.toml");
        let o = resolve(&client_args(&[]), &missing).unwrap();
        assert_eq!(o.authority, "127.0.0.1:7000");
        assert!(o.tls.is_none());

        let config = write(dir.path(), "agent.toml", "listen = \"10.1.2.3:7100\"\n");
        let o = resolve(&client_args(&[]), &config).unwrap();
        assert_eq!(o.authority, "10.1.2.3:7100");
        let o = resolve(&client_args(&["--config", config.to_str().unwrap()]), &missing).unwrap();
        assert_eq!(o.authority, "10.1.2.3:7100");
        let o = resolve(&client_args(&["--endpoint", "http://[::1]:7001"]), &config).unwrap();
        assert_eq!(o.authority, "[::1]:7001");
        assert_eq!(o.timeout, std::time::Duration::from_secs(10));
    }

    #[test]
    fn config_problems_are_usage_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.toml");
        let e = resolve(&client_args(&["--config", missing.to_str().unwrap()]), &missing).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.message.starts_with("cannot use the agent's config"), "{e}");
        let broken = write(dir.path(), "broken.toml", "listen = [\n");
        let e = resolve(&client_args(&[]), &broken).unwrap_err();
        assert!(e.message.contains("broken.toml"), "{e}");
        let bad_listen = write(dir.path(), "bad.toml", "listen = \"nope\"\n");
        let e = resolve(&client_args(&[]), &bad_listen).unwrap_err();
        assert!(e.message.contains("`listen`"), "{e}");
    }

    #[test]
    fn tls_from_flags_and_config() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.toml");
        let ca = write(dir.path(), "ca.pem", PEM);
        let cert = write(dir.path(), "cert.pem", PEM);
        let key = write(dir.path(), "key.pem", "-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n");
        let (ca_s, cert_s, key_s) = (ca.to_str().unwrap(), cert.to_str().unwrap(), key.to_str().unwrap());

        let o = resolve(&client_args(&["--endpoint", "h1:7000", "--ca", ca_s]), &missing).unwrap();
        let tls = o.tls.unwrap();
        assert_eq!(tls.server_name, "h1");
        assert!(tls.identity.is_none());

        let o = resolve(&client_args(&["--ca", ca_s, "--cert", cert_s, "--key", key_s]), &missing).unwrap();
        assert!(o.tls.unwrap().identity.is_some());

        let config = write(
            dir.path(),
            "agent.toml",
            &format!(
                "listen = \"127.0.0.9:7000\"\n[tls]\nca_file = {ca_s:?}\ncert_file = {cert_s:?}\nkey_file = {key_s:?}\n"
            ),
        );
        let o = resolve(&client_args(&[]), &config).unwrap();
        assert_eq!(o.authority, "127.0.0.9:7000");
        assert_eq!(o.tls.unwrap().server_name, "127.0.0.9");
        // http:// says plain text, whatever the config holds.
        let o = resolve(&client_args(&["--endpoint", "http://127.0.0.9:7000"]), &config).unwrap();
        assert!(o.tls.is_none());
    }

    #[test]
    fn tls_mistakes_are_usage_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.toml");
        let ca = write(dir.path(), "ca.pem", PEM);
        let not_pem = write(dir.path(), "ca.txt", "hello");
        let ca_s = ca.to_str().unwrap();
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (vec!["--endpoint", "https://h1:7000"], "an https:// endpoint needs --ca"),
            (vec!["--endpoint", "http://h1:7000", "--ca", ca_s], "--ca, --cert and --key need TLS"),
            (vec!["--ca", ca_s, "--cert", ca_s], "--cert needs --key"),
            (vec!["--ca", ca_s, "--key", ca_s], "--key needs --cert"),
            (vec!["--cert", ca_s, "--key", ca_s], "--cert and --key need --ca"),
            (vec!["--ca", "/nonexistent/ca.pem"], "cannot read --ca /nonexistent/ca.pem: No such file or directory"),
            (vec!["--ca", not_pem.to_str().unwrap()], "it is not a PEM file"),
        ];
        for (args, expected) in cases {
            let e = resolve(&client_args(&args), &missing).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(e.message.contains(expected), "{args:?}: {e}");
        }
    }
}
