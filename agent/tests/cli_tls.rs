//! The CLI's client TLS against a fake agent that requires mTLS: the CA
//! and the client identity from flags or from the config's `[tls]`, and
//! every way of getting it wrong failing with one sentence.

mod cli_support;

use std::path::{Path, PathBuf};

use cli_support::{Fake, run};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().expect("key");
    let pem = params.self_signed(&key).expect("self-signed").pem();
    Ca { pem, issuer: Issuer::new(params, key) }
}

/// (certificate PEM, key PEM) signed by `ca`.
fn leaf(ca: &Ca, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
    let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("params");
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().expect("key");
    let pem = params.signed_by(&key, &ca.issuer).expect("signed").pem();
    (pem, key.serialize_pem())
}

struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    other_ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    fake: Fake,
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

/// A fake agent requiring client certificates signed by the test CA.
fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = ca("blixard test CA");
    let (server_cert, server_key) = leaf(&ca, &["127.0.0.1", "localhost"], ExtendedKeyUsagePurpose::ServerAuth);
    let (client_cert, client_key) = leaf(&ca, &["operator"], ExtendedKeyUsagePurpose::ClientAuth);
    let ca_pem = ca.pem.clone();
    let fake = Fake::start_with(move |builder| {
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(server_cert, server_key))
            .client_ca_root(Certificate::from_pem(ca_pem));
        builder.tls_config(tls).expect("server TLS")
    });
    Pki {
        ca: write(dir.path(), "ca.pem", &ca.pem),
        other_ca: write(dir.path(), "other-ca.pem", &self::ca("another CA").pem),
        cert: write(dir.path(), "client.pem", &client_cert),
        key: write(dir.path(), "client.key", &client_key),
        _dir: dir,
        fake,
    }
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[test]
fn mtls_with_flags() {
    let p = pki();
    let endpoint = p.fake.endpoint();
    let flags = ["--ca", s(&p.ca), "--cert", s(&p.cert), "--key", s(&p.key), "--config", "/dev/null"];
    for endpoint in [endpoint.clone(), format!("https://{endpoint}")] {
        let mut args = vec!["vm", "list", "--json", "--endpoint", &endpoint];
        args.extend(flags);
        let out = run(&args);
        out.assert_ok();
        assert_eq!(out.json(), serde_json::json!([]));
    }
    // "localhost" is in the server's certificate too.
    let port = p.fake.addr.port().to_string();
    let by_name = format!("localhost:{port}");
    let mut args = vec!["cluster", "status", "--endpoint", &by_name];
    args.extend(flags);
    run(&args).assert_ok();
}

#[test]
fn mtls_from_the_config_file() {
    let p = pki();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write(
        dir.path(),
        "agent.toml",
        &format!(
            "listen = \"{}\"\n[tls]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
            p.fake.endpoint(),
            s(&p.ca),
            s(&p.cert),
            s(&p.key)
        ),
    );
    run(&["vm", "list", "--config", s(&config)]).assert_ok();
    assert_eq!(p.fake.calls(), ["VmList(token=,size=1000,node=,state=,labels=0,prefix=)"]);
}

#[test]
fn tls_failures_are_one_sentence_and_exit_1() {
    let p = pki();
    let endpoint = p.fake.endpoint();
    let plain = format!("http://{endpoint}");
    let base = ["vm", "list", "--config", "/dev/null", "--timeout", "5", "--endpoint"];
    // No client certificate: the agent refuses the handshake, with an alert
    // or by closing the connection (then the error gives the likely reason).
    let out = run(&[&base[..], &[&endpoint, "--ca", s(&p.ca)]].concat());
    out.assert_error(1, "cannot reach the agent at");
    assert!(
        out.stderr.contains("CertificateRequired") || out.stderr.contains("the agent may require a client certificate"),
        "{out:?}"
    );
    let cases: Vec<(Vec<&str>, &str)> = vec![
        // The agent's certificate is not signed by the given CA.
        (vec![&endpoint, "--ca", s(&p.other_ca), "--cert", s(&p.cert), "--key", s(&p.key)], "invalid peer certificate"),
        // Plain text to a TLS port.
        (vec![&plain], "the agent may require TLS"),
    ];
    for (extra, needle) in cases {
        let mut args = base.to_vec();
        args.extend(extra);
        run(&args).assert_error(1, needle);
    }
    assert!(p.fake.calls().is_empty(), "{:?}", p.fake.calls());
}
