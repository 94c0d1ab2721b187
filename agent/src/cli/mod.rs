//! The `blixard-agent` command line: parsing, checking every argument
//! before any traffic, calling the agent, and printing the answer.
//!
//! - `args`: the clap derive types and value parsers (the command tree).
//! - `error`: one-sentence errors and exit codes 0/1/2; clap's errors re-worded.
//! - `target`: where to connect (`--endpoint`, the local agent's config,
//!   127.0.0.1:7000) and with which TLS files.
//! - `output`: tables and the `--json` shapes.
//! - `docs`: shell completions and man pages; `complete`: what TAB offers.
//! - `wait`: `--wait`, following the cluster until an operation is done.
//! - `offline`: `restore` and `recover`, on a stopped agent's data dir.
//!
//! `run` (the daemon) is dispatched by `main`; everything else by [`execute`].

pub mod args;
pub mod complete;
pub mod docs;
pub mod error;
pub mod examples;
pub mod offline;
pub mod output;
pub mod target;
pub mod wait;

use std::time::Duration;

use wait::Progress;

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{CommandFactory, FromArgMatches};

use crate::api::client::{Client, ClientError, ErrorClass};
use crate::api::pb;
use crate::config::{Config, ConfigError, FileConfig};

pub use args::{Cli, Command};
pub use error::{CliError, ParseExit};

use args::{CertsCommand, ClientArgs, ClusterCommand, NodeCommand, RunArgs, VmCommand};

/// Parses the command line. Errors are already one sentence with an exit code.
pub fn parse<I, T>(args: I) -> Result<Cli, ParseExit>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let root = Cli::command();
    let matches = root.clone().try_get_matches_from(&args).map_err(|e| error::from_clap(e, &root, &args))?;
    Cli::from_arg_matches(&matches).map_err(|e| error::from_clap(e, &root, &args))
}

/// The daemon's configuration: the file (`--config`, else the default path
/// if it exists, else none) with the flags over it.
pub fn run_config(args: &RunArgs) -> Result<Config, ConfigError> {
    let file = match args.config_path() {
        Some(path) => FileConfig::load(&path)?,
        None => FileConfig::default(),
    };
    Config::resolve(file, args.overrides())
}

/// Runs every command but `run`, printing its output; returns the exit code.
pub fn execute(command: Command) -> ExitCode {
    let result = match command {
        Command::Run(_) | Command::Guard(_) => Err(CliError::usage("`run` and `guard` are dispatched by main")),
        Command::Completions { shell } => docs::completions(shell, &mut std::io::stdout().lock()),
        Command::Restore(args) => offline::restore(*args),
        Command::Recover(args) => offline::recover(*args),
        Command::Certs(certs) => make_certs(certs),
        Command::Cluster(ClusterCommand::NewSecret { file }) => new_secret(&file),
        Command::Man { outdir } => docs::man_pages(&outdir),
        client => match plan(client) {
            Ok((request, client_args)) => run_client(request, &client_args),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => e.report(),
    }
}

/// `certs ca|host|client`: writes the files and prints their paths.
fn make_certs(command: CertsCommand) -> Result<(), CliError> {
    use crate::api::tls::CertIdentity;
    use crate::certs::{self, CertsError};
    let error = |e: CertsError| match e {
        CertsError::Usage(m) => CliError::usage(m),
        e => CliError::failed(e.to_string()),
    };
    let written = match command {
        CertsCommand::Ca { dir, common_name } => {
            let ca = certs::make_ca(&common_name).map_err(error)?;
            certs::write_pair(&dir, certs::CA_CERT_FILE, certs::CA_KEY_FILE, &ca).map_err(error)?
        }
        CertsCommand::Host { name, addresses, dir, days } => {
            if addresses.len() > certs::ADDRESSES_MAX {
                return Err(CliError::usage(format!("at most {} --address values", certs::ADDRESSES_MAX)));
            }
            let sans = addresses
                .iter()
                .map(|a| certs::parse_address(a))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| CliError::usage(format!("invalid --address for `certs host`: {e}")))?;
            let ca = certs::read_ca(&dir).map_err(error)?;
            let identity = CertIdentity::member(name.as_str());
            let pem = certs::make_leaf(&ca, &identity, &sans, days).map_err(error)?;
            certs::write_pair(&dir, &format!("{name}.pem"), &format!("{name}.key"), &pem).map_err(error)?
        }
        CertsCommand::Client { name, role, dir, days } => {
            let ca = certs::read_ca(&dir).map_err(error)?;
            let identity = CertIdentity::client(name.as_str(), role.into());
            let pem = certs::make_leaf(&ca, &identity, &[], days).map_err(error)?;
            certs::write_pair(&dir, &format!("{name}.pem"), &format!("{name}.key"), &pem).map_err(error)?
        }
    };
    let text: String = written.iter().map(|path| format!("{}\n", path.display())).collect();
    output::write_stdout(&text);
    Ok(())
}

/// `cluster new-secret FILE`: a new secret, mode 0600, never over a file.
fn new_secret(path: &std::path::Path) -> Result<(), CliError> {
    let secret = crate::pki::ClusterSecret::generate().map_err(|e| CliError::failed(e.to_string()))?;
    if path.exists() {
        return Err(CliError::usage(format!(
            "{} already exists; a cluster secret is never overwritten (rotating one is a procedure: \
             docs/security.md)",
            path.display()
        )));
    }
    secret.write_new(path).map_err(|e| CliError::failed(e.to_string()))?;
    println!("{}", path.display());
    Ok(())
}

/// One request to the agent, fully checked. `wait`: `--wait`, with its
/// timeout in seconds.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    ClusterStatus,
    ClusterJoin(pb::ClusterJoinRequest),
    ClusterJoinToken(pb::ClusterJoinTokenRequest),
    ClusterLeave(pb::ClusterLeaveRequest),
    /// `cluster leave NODE` without --force: drain NODE, wait until no VM
    /// is left on it, then remove it.
    ClusterLeaveDrained {
        node: String,
        wait_secs: u64,
    },
    ClusterBackup(std::path::PathBuf),
    /// `cluster issue-client`: the key and request are made just before
    /// the call, the files written after it.
    ClusterIssueClient {
        name: String,
        role: crate::api::tls::Role,
        days: u32,
        dir: std::path::PathBuf,
    },
    NodeList {
        stale: bool,
    },
    NodeDrain(String),
    NodeUndrain(String),
    VmCreate {
        request: pb::VmCreateRequest,
        wait: Option<u64>,
    },
    VmStart {
        name: String,
        wait: Option<u64>,
    },
    VmStop {
        name: String,
        wait: Option<u64>,
    },
    VmDelete {
        name: String,
        wait: Option<u64>,
    },
    VmUpdate {
        request: pb::VmUpdateRequest,
        restart: bool,
        wait: Option<u64>,
    },
    VmMigrate(pb::VmMigrateRequest),
    VmRecover(pb::VmRecoverRequest),
    VmList {
        request: pb::VmListRequest,
        stale: bool,
    },
    VmStatus {
        name: String,
        stale: bool,
    },
    Events(pb::EventsRequest),
    VmLogs(pb::VmLogsRequest),
    /// `node drain NODE --wait`: drain, then wait until no VM is left on NODE.
    NodeDrainWait {
        node: String,
        wait_secs: u64,
    },
    /// `vm migrate NAME --to NODE --wait`: migrate, then wait until it runs there.
    VmMigrateWait {
        request: pb::VmMigrateRequest,
        wait_secs: u64,
    },
}

fn wait_secs(wait: args::WaitArgs) -> Option<u64> {
    wait.wait.then_some(wait.wait_timeout)
}

/// Turns a parsed client command into the request to send, reading any
/// file it names. Nothing touches the network here.
// Requests are built with `..Default::default()` so that fields added to
// the proto later start out unset instead of breaking the build.
#[allow(clippy::needless_update)]
pub fn plan(command: Command) -> Result<(Request, ClientArgs), CliError> {
    Ok(match command {
        Command::Cluster(ClusterCommand::Status { client }) => (Request::ClusterStatus, client),
        Command::Cluster(ClusterCommand::Join { address, token_file, client }) => {
            let token = match token_file {
                Some(path) => read_token(&path)?,
                None => String::new(),
            };
            (Request::ClusterJoin(pb::ClusterJoinRequest { seed: address, token, ..Default::default() }), client)
        }
        Command::Cluster(ClusterCommand::JoinToken { ttl, client }) => {
            (Request::ClusterJoinToken(pb::ClusterJoinTokenRequest { ttl_seconds: ttl }), client)
        }
        Command::Cluster(ClusterCommand::Backup { file, client }) => (Request::ClusterBackup(file), client),
        Command::Cluster(ClusterCommand::Leave { node, force, wait_timeout, client }) => {
            let node = node.map(|n| n.to_string()).unwrap_or_default();
            if force {
                (Request::ClusterLeave(pb::ClusterLeaveRequest { node, force, ..Default::default() }), client)
            } else {
                (Request::ClusterLeaveDrained { node, wait_secs: wait_timeout }, client)
            }
        }
        Command::Cluster(ClusterCommand::IssueClient { name, role, dir, days, client }) => {
            for file in [format!("{name}.pem"), format!("{name}.key")] {
                if dir.join(&file).exists() {
                    return Err(CliError::usage(format!(
                        "{} already exists; remove it or choose another --dir",
                        dir.join(file).display()
                    )));
                }
            }
            (Request::ClusterIssueClient { name: name.to_string(), role: role.into(), days, dir }, client)
        }
        Command::Cluster(ClusterCommand::NewSecret { .. }) => return Err(CliError::usage("not a client command")),
        Command::Node(NodeCommand::List { stale, client }) => (Request::NodeList { stale: stale.stale }, client),
        Command::Node(NodeCommand::Drain { node, wait, client }) => match wait.wait {
            true => (Request::NodeDrainWait { node: node.to_string(), wait_secs: wait.wait_timeout }, client),
            false => (Request::NodeDrain(node.to_string()), client),
        },
        Command::Node(NodeCommand::Undrain { node, client }) => (Request::NodeUndrain(node.to_string()), client),
        Command::Vm(VmCommand::Create(args)) => {
            let labels =
                args.label_map().map_err(|e| CliError::usage(format!("invalid --label for `vm create`: {e}")))?;
            let request = pb::VmCreateRequest {
                name: args.name.to_string(),
                vcpu: args.vcpu,
                memory_mib: args.memory,
                node: args.node.as_ref().map(|n| n.to_string()).unwrap_or_default(),
                labels: labels.into_iter().collect(),
                anti_affinity: args.anti_affinity.as_ref().map(|n| n.to_string()).unwrap_or_default(),
                stopped: args.stopped,
                failover: if args.failover == "manual" { "manual".into() } else { String::new() },
                ..Default::default()
            };
            (Request::VmCreate { request, wait: wait_secs(args.wait) }, args.client)
        }
        Command::Vm(VmCommand::Start(vm)) => {
            (Request::VmStart { name: vm.name.to_string(), wait: wait_secs(vm.wait) }, vm.client)
        }
        Command::Vm(VmCommand::Stop(vm)) => {
            (Request::VmStop { name: vm.name.to_string(), wait: wait_secs(vm.wait) }, vm.client)
        }
        Command::Vm(VmCommand::Delete(vm)) => {
            (Request::VmDelete { name: vm.name.to_string(), wait: wait_secs(vm.wait) }, vm.client)
        }
        Command::Vm(VmCommand::Update(args)) => {
            let set_labels = args::label_map(&args.labels)
                .map_err(|e| CliError::usage(format!("invalid --label for `vm update`: {e}")))?;
            if let Some(key) = args.remove_labels.iter().find(|k| set_labels.contains_key(*k)) {
                return Err(CliError::usage(format!(
                    "label {key:?} is both set and removed in `vm update`; give one of --label and --remove-label"
                )));
            }
            let request = pb::VmUpdateRequest {
                name: args.name.to_string(),
                vcpu: args.vcpu,
                memory_mib: args.memory,
                set_labels: set_labels.into_iter().collect(),
                remove_labels: args.remove_labels.clone(),
                node: args.node.as_ref().map(|n| n.to_string()),
                unpin: args.unpin,
                anti_affinity: args.anti_affinity.as_ref().map(|g| g.to_string()),
                clear_anti_affinity: args.no_anti_affinity,
                failover: args.failover.clone(),
                ..Default::default()
            };
            let nothing = request.vcpu.is_none()
                && request.memory_mib.is_none()
                && request.set_labels.is_empty()
                && request.remove_labels.is_empty()
                && request.node.is_none()
                && !request.unpin
                && request.anti_affinity.is_none()
                && !request.clear_anti_affinity
                && request.failover.is_none();
            if nothing && !args.restart {
                return Err(CliError::usage(
                    "`vm update` needs something to change: --vcpu, --memory, --label, --remove-label, --node, \
                     --unpin, --anti-affinity, --no-anti-affinity, --failover or --restart",
                ));
            }
            (Request::VmUpdate { request, restart: args.restart, wait: wait_secs(args.wait) }, args.client)
        }
        Command::Vm(VmCommand::Migrate { name, to, wait, client }) => {
            let request = pb::VmMigrateRequest { name: name.to_string(), to: to.to_string() };
            match wait.wait {
                true => (Request::VmMigrateWait { request, wait_secs: wait.wait_timeout }, client),
                false => (Request::VmMigrate(request), client),
            }
        }
        Command::Vm(VmCommand::Recover { name, to, client }) => {
            (Request::VmRecover(pb::VmRecoverRequest { name: name.to_string(), to: to.to_string() }), client)
        }
        Command::Vm(VmCommand::List(args)) => {
            let labels = args::label_map(&args.labels)
                .map_err(|e| CliError::usage(format!("invalid --label for `vm list`: {e}")))?;
            let request = pb::VmListRequest {
                node: args.node.as_ref().map(|n| n.to_string()).unwrap_or_default(),
                state: args.state.clone().unwrap_or_default(),
                labels: labels.into_iter().collect(),
                name_prefix: args.prefix.clone().unwrap_or_default(),
                page_size: VM_LIST_PAGE_SIZE,
                ..Default::default()
            };
            (Request::VmList { request, stale: args.stale.stale }, args.client)
        }
        Command::Vm(VmCommand::Status { name, stale, client }) => {
            (Request::VmStatus { name: name.to_string(), stale: stale.stale }, client)
        }
        Command::Vm(VmCommand::Logs(args)) => (
            Request::VmLogs(pb::VmLogsRequest { name: args.name.to_string(), follow: args.follow, lines: args.lines }),
            args.client,
        ),
        Command::Events(args) => {
            (Request::Events(pb::EventsRequest { follow: args.follow, limit: args.lines.unwrap_or(0) }), args.client)
        }
        Command::Run(_)
        | Command::Guard(_)
        | Command::Completions { .. }
        | Command::Man { .. }
        | Command::Certs(_)
        | Command::Restore(_)
        | Command::Recover(_) => {
            return Err(CliError::usage("not a client command"));
        }
    })
}

/// A join token file: one line, surrounding whitespace ignored.
fn read_token(path: &std::path::Path) -> Result<String, CliError> {
    crate::join_token::read_file("--token-file", path).map_err(CliError::usage)
}

/// VMs per `VmList` page the CLI asks for.
pub const VM_LIST_PAGE_SIZE: u32 = 1000;

fn run_client(request: Request, client_args: &ClientArgs) -> Result<(), CliError> {
    let options = target::resolve(client_args, std::path::Path::new(crate::config::DEFAULT_CONFIG_PATH))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::failed(format!("cannot start the async runtime: {e}")))?;
    let json = client_args.json;
    if let Request::Events(request) = request {
        return runtime.block_on(async move {
            let client = Client::connect(options).await.map_err(client_error)?;
            events(&client, request, json).await
        });
    }
    if let Request::VmLogs(request) = request {
        return runtime.block_on(async move {
            let client = Client::connect(options).await.map_err(client_error)?;
            vm_logs(&client, request, json).await
        });
    }
    if let Request::VmList { request, stale } = request {
        return runtime.block_on(async move {
            let client = Client::connect(options).await.map_err(client_error)?;
            vm_list(&client, request, stale, json).await
        });
    }
    if let Request::ClusterBackup(file) = request {
        return runtime.block_on(async move {
            let client = Client::connect(options).await.map_err(client_error)?;
            cluster_backup(&client, &file, json).await
        });
    }
    let text = runtime.block_on(async move {
        let client = Client::connect(options).await.map_err(client_error)?;
        send(&client, request, json).await.map_err(client_error)
    })?;
    output::write_stdout(&text);
    Ok(())
}

/// `vm list`: pages through every VM that matches. With `--json` the array
/// is written as the pages arrive, one VM object per line; the table needs
/// every row for its widths. A reader that goes away stops the paging.
/// `--stale` pages through the agent's own state, and warns (once) how old
/// its view may be.
async fn vm_list(client: &Client, request: pb::VmListRequest, stale: bool, json: bool) -> Result<(), CliError> {
    use std::ops::ControlFlow;
    let mut first = true;
    let mut open = true;
    let mut rows = Vec::new();
    if json {
        open = output::write_stdout("[");
    }
    let each = |page: Vec<pb::VmInfo>| {
        if !json {
            rows.extend(page);
            return ControlFlow::Continue(());
        }
        let mut text = String::new();
        for vm in &page {
            text.push_str(if first { "\n  " } else { ",\n  " });
            text.push_str(&serde_json::to_string(&output::vm_json(vm)).expect("our JSON shapes always serialize"));
            first = false;
        }
        open = open && output::write_stdout(&text);
        if open { ControlFlow::Continue(()) } else { ControlFlow::Break(()) }
    };
    let staleness = client.vm_list_each(request, stale, each).await.map_err(client_error)?;
    if let Some(staleness) = staleness {
        warn_stale(staleness);
    }
    if json {
        output::write_stdout(if first { "]\n" } else { "\n]\n" });
    } else {
        output::write_stdout(&output::vm_list_table(&rows));
    }
    Ok(())
}

/// The next chunk of a backup, waiting at most `wait` for it.
async fn next_chunk(
    stream: &mut (impl futures_util::Stream<Item = Result<pb::BackupChunk, ClientError>> + Unpin),
    wait: Duration,
) -> Result<Option<pb::BackupChunk>, CliError> {
    use futures_util::StreamExt;
    match tokio::time::timeout(wait, stream.next()).await {
        Err(_) => {
            Err(CliError::failed(format!("the backup was not written: no data for {} s (--timeout)", wait.as_secs())))
        }
        Ok(None) => Ok(None),
        Ok(Some(chunk)) => chunk.map(Some).map_err(client_error),
    }
}

/// `cluster backup FILE`: writes the stream to FILE (whole or not at all)
/// and says what it holds.
async fn cluster_backup(client: &Client, file: &std::path::Path, json: bool) -> Result<(), CliError> {
    let backup_error = |e: crate::backup::BackupError| match e {
        crate::backup::BackupError::Stream(m) => CliError::failed(format!("the backup was not written: {m}")),
        e => CliError::usage(e.to_string()),
    };
    if file.exists() {
        return Err(CliError::usage(format!(
            "{} already exists; a backup never overwrites a file (remove it or choose another name)",
            file.display()
        )));
    }
    let mut stream = std::pin::pin!(client.cluster_backup().await.map_err(client_error)?);
    let wait = client.timeout();
    let Some(first) = next_chunk(&mut stream, wait).await? else {
        return Err(CliError::failed("the backup was not written: the agent sent nothing"));
    };
    let header = crate::backup::Header::decode(&first.header)
        .map_err(|e| CliError::failed(format!("the backup was not written: the agent's header is wrong: {e}")))?;
    let mut writer = crate::backup::Writer::create(file, header).map_err(backup_error)?;
    writer.write_state(&first.data).map_err(backup_error)?;
    while let Some(chunk) = next_chunk(&mut stream, wait).await? {
        writer.write_state(&chunk.data).map_err(backup_error)?;
    }
    let header = writer.finish().map_err(backup_error)?;
    let text =
        if json { output::to_json(&output::backup_json(file, &header)) } else { output::backup_text(file, &header) };
    output::write_stdout(&text);
    Ok(())
}

/// `vm logs`: prints each line as it arrives (with `--json`, one
/// `{"node": ..., "line": ...}` object per line).
async fn vm_logs(client: &Client, request: pb::VmLogsRequest, json: bool) -> Result<(), CliError> {
    use futures_util::StreamExt;
    use std::io::Write;
    let mut stream = std::pin::pin!(client.vm_logs(request).await.map_err(client_error)?);
    let mut stdout = std::io::stdout();
    while let Some(item) = stream.next().await {
        let line = item.map_err(client_error)?;
        let text = if json {
            output::to_json_line(&serde_json::json!({"node": line.node, "line": line.line}))
        } else {
            // The guest's own bytes, minus control characters that could
            // drive the terminal.
            let mut clean: String = line.line.chars().filter(|c| !c.is_control() || *c == '\t').collect();
            clean.push('\n');
            clean
        };
        if stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// `events`: prints each event as it arrives (a line of text, or with
/// `--json` an array, or one object per line when following).
async fn events(client: &Client, request: pb::EventsRequest, json: bool) -> Result<(), CliError> {
    use futures_util::StreamExt;
    use std::io::Write;
    let follow = request.follow;
    let mut stream = std::pin::pin!(client.events(request).await.map_err(client_error)?);
    let mut kept = Vec::new();
    let mut stdout = std::io::stdout();
    while let Some(item) = stream.next().await {
        let event = item.map_err(client_error)?;
        if json && !follow {
            kept.push(output::event_json(&event));
            continue;
        }
        let line = if json { output::to_json_line(&output::event_json(&event)) } else { output::event_line(&event) };
        // A closed pipe (`| head`) ends the command quietly.
        if stdout.write_all(line.as_bytes()).and_then(|()| stdout.flush()).is_err() {
            return Ok(());
        }
    }
    if json && !follow {
        output::write_stdout(&output::to_json(&kept));
    }
    Ok(())
}

/// `cluster issue-client`: a new key made here, a request for it signed by
/// the agent; writes DIR/NAME.key (0600), DIR/NAME.pem and DIR/ca.pem
/// (kept if it already holds the same CAs). Returns the paths written.
async fn issue_client(
    client: &Client,
    name: &str,
    role: crate::api::tls::Role,
    days: u32,
    dir: &std::path::Path,
) -> Result<Vec<std::path::PathBuf>, ClientError> {
    let usage = |message: String| ClientError { class: ErrorClass::Rejected, message };
    let failed = |message: String| ClientError { class: ErrorClass::Failed, message };
    let (key, csr) = crate::pki::new_key_and_request(name).map_err(|e| failed(e.to_string()))?;
    let request = pb::ClusterIssueClientRequest { name: name.to_string(), role: role.as_str().to_string(), csr, days };
    let issued = client.cluster_issue_client(request).await?;
    let identity = crate::api::tls::CertIdentity::client(name, role);
    crate::pki::check_issued(issued.certificate_pem.as_bytes(), &key, &identity, issued.ca_pem.as_bytes())
        .map_err(|e| failed(format!("the agent issued a certificate that cannot be used: {e}")))?;
    std::fs::create_dir_all(dir)
        .map_err(|e| usage(format!("cannot create {}: {}", dir.display(), target::io_reason(&e))))?;
    let ca_path = dir.join("ca.pem");
    let write_ca = match std::fs::read(&ca_path) {
        Ok(existing) if existing == issued.ca_pem.as_bytes() => false,
        Ok(_) => {
            return Err(usage(format!(
                "{} already exists and holds other CA certificates; choose another --dir",
                ca_path.display()
            )));
        }
        Err(_) => true,
    };
    let mut written = Vec::new();
    let key_path = dir.join(format!("{name}.key"));
    crate::pki::write_new(&key_path, key.serialize_pem().as_bytes(), 0o600).map_err(|e| usage(e.to_string()))?;
    let cert_path = dir.join(format!("{name}.pem"));
    crate::pki::write_new(&cert_path, issued.certificate_pem.as_bytes(), 0o644).map_err(|e| usage(e.to_string()))?;
    written.extend([cert_path, key_path]);
    if write_ca {
        crate::pki::write_new(&ca_path, issued.ca_pem.as_bytes(), 0o644).map_err(|e| usage(e.to_string()))?;
        written.push(ca_path);
    }
    Ok(written)
}

fn client_error(e: ClientError) -> CliError {
    match e.class {
        ErrorClass::Rejected => CliError::usage(e.message),
        ErrorClass::Failed => CliError::failed(e.message),
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Tells stderr how stale a `--stale` answer may be, when the agent had no
/// quorum contact (a member with contact answers with what it applied,
/// a moment behind the cluster at most).
fn warn_stale(staleness: crate::api::client::Staleness) {
    use crate::api::client::Staleness;
    let fence_after_ms = crate::failure::Timing::default().fence_after_ms;
    match staleness {
        Staleness::ContactAgeMs(age) if age <= fence_after_ms => {}
        Staleness::ContactAgeMs(age) => eprintln!(
            "warning: this agent has had no quorum contact for {:.1} s: this is its last known state, which may be \
             stale",
            age as f64 / 1000.0
        ),
        Staleness::NeverHadContact => eprintln!(
            "warning: this agent has had no quorum contact since it started: this is its last known state, which may \
             be stale"
        ),
        Staleness::Unknown => eprintln!("warning: the agent did not say how old its view is; it may be stale"),
    }
}

/// Sends `request` and renders the answer.
async fn send(client: &Client, request: Request, json: bool) -> Result<String, ClientError> {
    use output::*;
    let vm_out = |verb: &str, v: pb::VmInfo| if json { to_json(&vm_status_json(&v)) } else { vm_written(verb, &v) };
    let node_out = |verb: &str, n: pb::NodeInfo| if json { to_json(&node_json(&n)) } else { node_written(verb, &n) };
    Ok(match request {
        Request::ClusterStatus => {
            let s = client.cluster_status().await?;
            if json { to_json(&cluster_status_json(&s)) } else { cluster_status_table(&s) }
        }
        Request::ClusterJoin(req) => {
            let seed = req.seed.clone();
            let r = client.cluster_join(req).await?;
            if json {
                to_json(&JoinJson { name: &r.name, id: r.id.to_string() })
            } else {
                format!("{} joined the cluster at {seed} as member {}\n", error::one_line(&r.name), r.id)
            }
        }
        Request::ClusterJoinToken(req) => {
            let r = client.cluster_join_token(req).await?;
            // Only the token on stdout, so that `$(...)` or `> FILE` keeps it.
            if json {
                to_json(&JoinTokenJson { token: &r.token, expires_unix_ms: r.expires_unix_ms })
            } else {
                format!("{}\n", error::one_line(&r.token))
            }
        }
        Request::ClusterIssueClient { name, role, days, dir } => {
            let written = issue_client(client, &name, role, days, &dir).await?;
            if json {
                to_json(&written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>())
            } else {
                written.iter().map(|p| format!("{}\n", p.display())).collect()
            }
        }
        Request::ClusterLeave(req) => {
            let r = client.cluster_leave(req).await?;
            if json {
                to_json(&NameJson { name: &r.name })
            } else {
                format!("{} left the cluster\n", error::one_line(&r.name))
            }
        }
        Request::ClusterLeaveDrained { node, wait_secs } => {
            // The member at --endpoint when no NODE is named.
            let node = if node.is_empty() { client.cluster_status().await?.name } else { node };
            // (A VM moved off it whose copy there is not yet known stopped
            // keeps it busy too.)
            let has_vms =
                client.node_list().await?.nodes.iter().any(|n| n.name == node && (n.vms > 0 || n.stopping > 0));
            if has_vms {
                let on_node = wait::vms_on(client, &node).await?;
                client.node_drain(node.clone()).await?;
                let progress = Progress::new(!json);
                progress.say(&format!("draining {} before it leaves", error::one_line(&node)));
                wait::drain(client, &node, on_node, Duration::from_secs(wait_secs), &progress).await?;
            }
            let r = client.cluster_leave(pb::ClusterLeaveRequest { node, ..Default::default() }).await?;
            if json {
                to_json(&NameJson { name: &r.name })
            } else {
                format!("{} left the cluster\n", error::one_line(&r.name))
            }
        }
        Request::NodeList { stale } => {
            let r = if stale {
                let (r, staleness) = client.node_list_stale().await?;
                warn_stale(staleness);
                r
            } else {
                client.node_list().await?
            };
            if json { to_json(&r.nodes.iter().map(node_json).collect::<Vec<_>>()) } else { node_list_table(&r.nodes) }
        }
        Request::NodeDrain(name) => node_out("draining", client.node_drain(name).await?),
        Request::NodeUndrain(name) => node_out("undrained", client.node_undrain(name).await?),
        Request::VmCreate { request, wait } => {
            let name = request.name.clone();
            let created = client.vm_create(request).await?;
            match wait {
                None => vm_out("created", created),
                Some(secs) => {
                    let progress = Progress::new(!json);
                    let info = wait::settle(client, &name, Duration::from_secs(secs), &progress).await?;
                    if json { to_json(&vm_status_json(&info)) } else { vm_settled(&info) }
                }
            }
        }
        Request::VmStart { name, wait } => set_desired(client, &name, true, wait, json).await?,
        Request::VmStop { name, wait } => set_desired(client, &name, false, wait, json).await?,
        Request::VmDelete { name, wait } => {
            let progress = Progress::new(!json);
            if let Some(secs) = wait {
                // Stopped first, so that the command returns once the
                // guest is down: a deleted VM has nobody to report that.
                let limit = Duration::from_secs(secs);
                let vm = client.vm_stop(name.clone()).await?;
                if !wait::settled(&vm) {
                    wait::settle(client, &name, limit, &progress).await?;
                }
            }
            let r = client.vm_delete(name).await?;
            if json {
                to_json(&NameJson { name: &r.name })
            } else if wait.is_some() {
                format!("vm {} stopped and deleted\n", error::one_line(&r.name))
            } else {
                format!(
                    "vm {} deleted; its host stops the guest shortly (--wait stops it first and waits)\n",
                    error::one_line(&r.name)
                )
            }
        }
        Request::VmUpdate { request, restart, wait } => update(client, request, restart, wait, json).await?,
        Request::VmMigrate(req) => {
            // Already there: say so instead of "migrating".
            let before = client.vm_status(req.name.clone()).await?;
            if before.node == req.to {
                if json {
                    to_json(&vm_status_json(&before))
                } else {
                    format!(
                        "vm {} is already on {}; nothing to move\n",
                        error::one_line(&req.name),
                        error::one_line(&req.to)
                    )
                }
            } else {
                let to = req.to.clone();
                let v = client.vm_migrate(req).await?;
                if json {
                    to_json(&vm_status_json(&v))
                } else {
                    format!(
                        "vm {}: moving to {} (now {}); --wait waits until it has settled there\n",
                        error::one_line(&v.name),
                        error::one_line(&to),
                        where_is(&v)
                    )
                }
            }
        }
        Request::VmRecover(req) => vm_out("recovered", client.vm_recover(req).await?),
        Request::VmList { .. } | Request::ClusterBackup(_) => unreachable!("handled by run_client"),
        Request::VmStatus { name, stale } => {
            let v = if stale {
                let (v, staleness) = client.vm_status_stale(name).await?;
                warn_stale(staleness);
                v
            } else {
                client.vm_status(name).await?
            };
            if json { to_json(&vm_status_json(&v)) } else { vm_status_text(&v, now_unix_ms()) }
        }
        Request::Events(_) | Request::VmLogs(_) => unreachable!("streams are handled by run_client"),
        Request::NodeDrainWait { node, wait_secs } => {
            let on_node = wait::vms_on(client, &node).await?;
            let info = client.node_drain(node.clone()).await?;
            let progress = Progress::new(!json);
            progress.say(&format!("draining {}", error::one_line(&node)));
            wait::drain(client, &node, on_node, Duration::from_secs(wait_secs), &progress).await?;
            let info = client.node_list().await?.nodes.into_iter().find(|n| n.name == node).unwrap_or(info);
            node_out("drained", info)
        }
        Request::VmMigrateWait { request, wait_secs } => {
            let (name, to) = (request.name.clone(), request.to.clone());
            client.vm_migrate(request).await?;
            let progress = Progress::new(!json);
            let info = wait::migrate(client, &name, &to, Duration::from_secs(wait_secs), &progress).await?;
            vm_out("migrated", info)
        }
    })
}

/// `vm start|stop [--wait]`.
async fn set_desired(
    client: &Client,
    name: &str,
    running: bool,
    wait: Option<u64>,
    json: bool,
) -> Result<String, ClientError> {
    use output::*;
    let vm = if running { client.vm_start(name.to_string()).await? } else { client.vm_stop(name.to_string()).await? };
    let vm = match wait {
        None => {
            return Ok(if json { to_json(&vm_status_json(&vm)) } else { vm_desired(&vm) });
        }
        Some(secs) => {
            let progress = wait::Progress::new(!json);
            wait::settle(client, name, Duration::from_secs(secs), &progress).await?
        }
    };
    Ok(if json { to_json(&vm_status_json(&vm)) } else { vm_settled(&vm) })
}

/// `vm update [--restart] [--wait]`.
async fn update(
    client: &Client,
    request: pb::VmUpdateRequest,
    restart: bool,
    wait: Option<u64>,
    json: bool,
) -> Result<String, ClientError> {
    use output::*;
    let name = request.name.clone();
    let progress = wait::Progress::new(!json);
    let limit = Duration::from_secs(wait.unwrap_or(args::WAIT_SECS_DEFAULT));
    let r = client.vm_update(request).await?;
    let mut vm = r.vm.unwrap_or_default();
    let mut effect = TakesEffect::of(&vm, !r.changed.is_empty(), r.moved);
    if restart && vm.desired == "running" && !r.moved {
        // A restart the operator asked for: stop, wait, start.
        progress.say(&format!("restarting {}", error::one_line(&name)));
        client.vm_stop(name.clone()).await?;
        wait::settle(client, &name, limit, &progress).await?;
        vm = client.vm_start(name.clone()).await?;
        effect = TakesEffect::Restarted;
    }
    if wait.is_some() || effect == TakesEffect::Restarted {
        vm = wait::settle(client, &name, limit, &progress).await?;
    }
    if json {
        return Ok(to_json(&VmUpdateJson {
            vm: vm_status_json(&vm),
            changed: &r.changed,
            takes_effect: effect.as_str(),
        }));
    }
    let changed = if r.changed.is_empty() { "nothing".to_string() } else { r.changed.join(", ") };
    Ok(format!("vm {} updated ({changed}): {}; now {}\n", error::one_line(&vm.name), effect.sentence(), where_is(&vm)))
}

#[cfg(test)]
#[allow(clippy::needless_update)] // as in `plan`
mod tests {
    use super::*;

    fn parse_ok(args: &[&str]) -> Cli {
        match parse(std::iter::once("blixard-agent").chain(args.iter().copied())) {
            Ok(cli) => cli,
            Err(ParseExit::Error(e)) => panic!("{args:?}: {e}"),
            Err(ParseExit::Print(_)) => panic!("{args:?}: printed help"),
        }
    }

    fn parse_err(args: &[&str]) -> CliError {
        match parse(std::iter::once("blixard-agent").chain(args.iter().copied())) {
            Ok(cli) => match plan(cli.command) {
                Ok(planned) => panic!("{args:?} parsed: {planned:?}"),
                Err(e) => e,
            },
            Err(ParseExit::Error(e)) => e,
            Err(ParseExit::Print(_)) => panic!("{args:?}: printed help"),
        }
    }

    #[test]
    fn every_command_parses_into_its_request() {
        let cases: Vec<(&[&str], Request)> = vec![
            (&["cluster", "status"], Request::ClusterStatus),
            (
                &["cluster", "join", "10.0.0.1:7000"],
                Request::ClusterJoin(pb::ClusterJoinRequest { seed: "10.0.0.1:7000".into(), ..Default::default() }),
            ),
            (&["cluster", "join-token"], Request::ClusterJoinToken(pb::ClusterJoinTokenRequest { ttl_seconds: 3600 })),
            (
                &["cluster", "join-token", "--ttl", "15m"],
                Request::ClusterJoinToken(pb::ClusterJoinTokenRequest { ttl_seconds: 900 }),
            ),
            (&["cluster", "leave"], Request::ClusterLeaveDrained { node: String::new(), wait_secs: 600 }),
            (&["cluster", "leave", "h3"], Request::ClusterLeaveDrained { node: "h3".into(), wait_secs: 600 }),
            (
                &["cluster", "leave", "h3", "--force"],
                Request::ClusterLeave(pb::ClusterLeaveRequest { node: "h3".into(), force: true }),
            ),
            (&["node", "list"], Request::NodeList { stale: false }),
            (&["node", "list", "--stale"], Request::NodeList { stale: true }),
            (&["node", "drain", "h2"], Request::NodeDrain("h2".into())),
            (&["node", "undrain", "h2"], Request::NodeUndrain("h2".into())),
            (
                &["vm", "create", "web", "--vcpu", "2", "--memory", "1024"],
                Request::VmCreate {
                    request: pb::VmCreateRequest {
                        name: "web".into(),
                        vcpu: 2,
                        memory_mib: 1024,
                        ..Default::default()
                    },
                    wait: None,
                },
            ),
            (
                &[
                    "vm",
                    "create",
                    "db",
                    "--vcpu=4",
                    "--memory",
                    "8192",
                    "--node",
                    "h2",
                    "--label",
                    "rack=r1",
                    "--label",
                    "ssd=yes",
                    "--anti-affinity",
                    "dbs",
                    "--stopped",
                ],
                Request::VmCreate {
                    request: pb::VmCreateRequest {
                        name: "db".into(),
                        vcpu: 4,
                        memory_mib: 8192,
                        node: "h2".into(),
                        labels: [("rack".into(), "r1".into()), ("ssd".into(), "yes".into())].into(),
                        anti_affinity: "dbs".into(),
                        stopped: true,
                        ..Default::default()
                    },
                    wait: None,
                },
            ),
            (&["vm", "start", "web"], Request::VmStart { name: "web".into(), wait: None }),
            (
                &["vm", "stop", "web", "--wait"],
                Request::VmStop { name: "web".into(), wait: Some(args::WAIT_SECS_DEFAULT) },
            ),
            (
                &["vm", "delete", "web", "--wait", "--wait-timeout", "9"],
                Request::VmDelete { name: "web".into(), wait: Some(9) },
            ),
            (
                &["vm", "create", "web", "--vcpu", "1", "--memory", "64", "--wait"],
                Request::VmCreate {
                    request: pb::VmCreateRequest { name: "web".into(), vcpu: 1, memory_mib: 64, ..Default::default() },
                    wait: Some(args::WAIT_SECS_DEFAULT),
                },
            ),
            (
                &[
                    "vm",
                    "update",
                    "web",
                    "--vcpu",
                    "4",
                    "--memory",
                    "2048",
                    "--label",
                    "rack=r2",
                    "--remove-label",
                    "ssd",
                    "--unpin",
                    "--no-anti-affinity",
                    "--restart",
                ],
                Request::VmUpdate {
                    request: pb::VmUpdateRequest {
                        name: "web".into(),
                        vcpu: Some(4),
                        memory_mib: Some(2048),
                        set_labels: [("rack".into(), "r2".into())].into(),
                        remove_labels: vec!["ssd".into()],
                        unpin: true,
                        clear_anti_affinity: true,
                        ..Default::default()
                    },
                    restart: true,
                    wait: None,
                },
            ),
            (
                &["vm", "update", "web", "--node", "h2", "--anti-affinity", "g"],
                Request::VmUpdate {
                    request: pb::VmUpdateRequest {
                        name: "web".into(),
                        node: Some("h2".into()),
                        anti_affinity: Some("g".into()),
                        ..Default::default()
                    },
                    restart: false,
                    wait: None,
                },
            ),
            (
                &["vm", "list", "--node", "h1", "--state", "running", "--label", "tier=web", "--prefix", "web-"],
                Request::VmList {
                    request: pb::VmListRequest {
                        node: "h1".into(),
                        state: "running".into(),
                        labels: [("tier".into(), "web".into())].into(),
                        name_prefix: "web-".into(),
                        page_size: VM_LIST_PAGE_SIZE,
                        ..Default::default()
                    },
                    stale: false,
                },
            ),
            (&["cluster", "backup", "/tmp/b.bak"], Request::ClusterBackup("/tmp/b.bak".into())),
            (
                &["vm", "migrate", "web", "--to", "h2"],
                Request::VmMigrate(pb::VmMigrateRequest { name: "web".into(), to: "h2".into() }),
            ),
            (
                &["vm", "list"],
                Request::VmList {
                    request: pb::VmListRequest { page_size: VM_LIST_PAGE_SIZE, ..Default::default() },
                    stale: false,
                },
            ),
            (
                &["vm", "list", "--stale"],
                Request::VmList {
                    request: pb::VmListRequest { page_size: VM_LIST_PAGE_SIZE, ..Default::default() },
                    stale: true,
                },
            ),
            (&["vm", "status", "web"], Request::VmStatus { name: "web".into(), stale: false }),
            (
                &["vm", "recover", "web", "--to", "h2"],
                Request::VmRecover(pb::VmRecoverRequest { name: "web".into(), to: "h2".into() }),
            ),
            (&["events"], Request::Events(pb::EventsRequest { follow: false, limit: 0 })),
            (
                &["vm", "logs", "web", "-f", "-n", "7"],
                Request::VmLogs(pb::VmLogsRequest { name: "web".into(), follow: true, lines: 7 }),
            ),
            (&["events", "-f", "-n", "5"], Request::Events(pb::EventsRequest { follow: true, limit: 5 })),
            (
                &["node", "drain", "h2", "--wait", "--wait-timeout", "30"],
                Request::NodeDrainWait { node: "h2".into(), wait_secs: 30 },
            ),
            (
                &["vm", "migrate", "web", "--to", "h2", "--wait"],
                Request::VmMigrateWait {
                    request: pb::VmMigrateRequest { name: "web".into(), to: "h2".into() },
                    wait_secs: args::WAIT_SECS_DEFAULT,
                },
            ),
        ];
        for (args, expected) in cases {
            let (request, client) = plan(parse_ok(args).command).unwrap();
            assert_eq!(request, expected, "{args:?}");
            assert!(!client.json);
            assert_eq!(client.timeout, args::TIMEOUT_SECS_DEFAULT);
        }
    }

    #[test]
    fn client_options_are_everywhere() {
        let (_, client) =
            plan(parse_ok(&["vm", "list", "--json", "--endpoint", "https://h1:7443", "--timeout", "3"]).command)
                .unwrap();
        assert!(client.json);
        assert_eq!(client.timeout, 3);
        assert_eq!(client.endpoint.unwrap().scheme, Some(args::Scheme::Https));
    }

    /// (arguments, the start of the one-sentence error)
    #[rustfmt::skip]
    const BAD: &[(&[&str], &str)] = &[
        (&["vm", "create", "web", "--vcpu", "1", "--memory", "64", "--frobnicate"],
         "unknown flag --frobnicate for `vm create`; see `blixard-agent vm create --help`"),
        (&["vm", "frob"], "unknown subcommand \"frob\" for `vm`"),
        (&["frob"], "unknown subcommand \"frob\" for blixard-agent"),
        (&["vm"], "`vm` needs a subcommand (create, start, stop, delete, update, migrate, recover, list, status, logs)"),
        (&["vm", "update", "web"], "`vm update` needs something to change"),
        (&["vm", "update", "web", "--node", "h1", "--unpin"], "--node NODE cannot be used with --unpin"),
        (&["vm", "update", "web", "--vcpu", "0"], "invalid --vcpu N for `vm update`: 0 is not between 1 and 1024 vcpus"),
        (&["vm", "update", "web", "--label", "a=1", "--remove-label", "a"], "label \"a\" is both set and removed"),
        (&["vm", "update", "web", "--remove-label", "a=1"], "invalid --remove-label KEY for `vm update`"),
        (&["vm", "list", "--state", "happy"], "\"happy\" is not a valid --state STATE: use pending, starting, running, stopping, stopped, failed or lost"),
        (&["vm", "list", "--prefix", "Web"], "invalid --prefix PREFIX for `vm list`"),
        (&["vm", "start", "web", "--wait-timeout", "5"], ""),
        (&["recover"], "`recover` needs --force-new-cluster"),
        (&["restore"], "`restore` needs --from FILE"),
        (&["cluster", "backup"], "`cluster backup` needs FILE"),
        (&[], "blixard-agent needs a subcommand"),
        (&["vm", "create", "web"], "`vm create` needs --vcpu N and --memory MIB"),
        (&["vm", "create", "--vcpu", "1", "--memory", "64"], "`vm create` needs NAME"),
        (&["vm", "status"], "`vm status` needs NAME"),
        (&["vm", "migrate", "web"], "`vm migrate` needs --to NODE"),
        (&["vm", "list", "extra"], "unexpected argument \"extra\" for `vm list`"),
        (&["vm", "status", "../x"], "invalid NAME for `vm status`: name \"../x\" must start"),
        (&["vm", "status", "a b"], "invalid NAME for `vm status`: name \"a b\""),
        (&["vm", "status", "x.service"], "invalid NAME for `vm status`: name \"x.service\""),
        (&["vm", "status", "Web"], "invalid NAME for `vm status`: name \"Web\""),
        (&["vm", "status", "wéb"], "invalid NAME for `vm status`: name \"wéb\""),
        (&["vm", "status", ""], "invalid NAME for `vm status`: a name cannot be empty"),
        (&["vm", "create", "web", "--vcpu", "0", "--memory", "64"], "invalid --vcpu N for `vm create`: 0 is not between 1 and 1024 vcpus"),
        (&["vm", "create", "web", "--vcpu", "-2", "--memory", "64"], "invalid --vcpu N for `vm create`: -2 is not"),
        (&["vm", "create", "web", "--vcpu", "99999999999999999999999", "--memory", "64"], "invalid --vcpu N for `vm create`: 99999999999999999999999 is not"),
        (&["vm", "create", "web", "--vcpu", "1", "--memory", "0"], "invalid --memory MIB for `vm create`: 0 is not between 16 and"),
        (&["vm", "create", "web", "--vcpu", "1", "--memory", "-64"], "invalid --memory MIB for `vm create`: -64 is not"),
        (&["vm", "create", "web", "--vcpu", "1", "--memory", "1T"], "invalid --memory MIB for `vm create`: \"1T\" is not a whole number"),
        (&["vm", "create", "web", "--vcpu", "1", "--memory", "64", "--label", "rack"], "invalid --label KEY=VALUE for `vm create`: \"rack\" is not KEY=VALUE"),
        (&["vm", "create", "web", "--vcpu", "1", "--memory", "64", "--label", "Rack=1"], "invalid --label KEY=VALUE for `vm create`: label key \"Rack\""),
        (&["vm", "create", "web", "--vcpu", "1", "--memory", "64", "--label", "a=1", "--label", "a=2"], "invalid --label for `vm create`: label \"a\" is given twice"),
        (&["vm", "create", "web", "--vcpu", "1", "--memory", "64", "--node", "H1"], "invalid --node NODE for `vm create`"),
        (&["vm", "list", "--endpoint", "nope"], "invalid --endpoint HOST:PORT for `vm list`: \"nope\" is not HOST:PORT"),
        (&["vm", "list", "--endpoint"], "--endpoint HOST:PORT needs a value"),
        (&["vm", "list", "--timeout", "0"], "invalid --timeout SECS for `vm list`: 0 is not between 1 and 86400 seconds"),
        (&["cluster", "join", "10.0.0.1"], "invalid ADDRESS for `cluster join`: \"10.0.0.1\" is not HOST:PORT"),
        (&["cluster", "leave", "../x"], "invalid NODE for `cluster leave`"),
        (&["node", "drain"], "`node drain` needs NODE"),
        (&["completions", "powershell"], "\"powershell\" is not a valid SHELL: use bash, zsh or fish"),
        (&["--frobnicate"], "unknown flag --frobnicate for blixard-agent; see `blixard-agent --help`"),
    ];

    #[test]
    fn bad_input_is_one_sentence_and_exit_2() {
        for (args, expected) in BAD {
            let e = parse_err(args);
            assert_eq!(e.exit_code(), 2, "{args:?}: {e}");
            let text = e.to_string();
            assert!(
                text.starts_with(&format!("error: {expected}")),
                "{args:?}:\n  got      {text}\n  expected error: {expected}"
            );
            assert!(!text.contains('\n'), "{args:?}: {text}");
        }
    }

    #[test]
    fn a_repeated_option_takes_the_last_value() {
        let cli =
            parse_ok(&["vm", "create", "web", "--vcpu", "1", "--vcpu", "2", "--memory", "64", "--json", "--json"]);
        let (Request::VmCreate { request: req, .. }, client) = plan(cli.command).unwrap() else {
            panic!("not a create")
        };
        assert_eq!(req.vcpu, 2);
        assert!(client.json);
    }

    #[test]
    fn long_names_are_refused() {
        let long = "a".repeat(64);
        let e = parse_err(&["vm", "status", &long]);
        assert!(e.to_string().contains("is 64 characters long; the limit is 63"), "{e}");
        parse_ok(&["vm", "status", &"a".repeat(63)]);
    }

    #[test]
    fn suggestions_are_kept_on_the_line() {
        let e = parse_err(&["vm", "create", "web", "--vcpus", "1", "--memory", "64"]);
        assert!(e.to_string().contains("unknown flag --vcpus for `vm create` (did you mean --vcpu?)"), "{e}");
        let e = parse_err(&["vm", "creat"]);
        assert!(e.to_string().contains("unknown subcommand \"creat\" for `vm` (did you mean create?)"), "{e}");
    }

    #[test]
    fn help_and_version_print() {
        for args in [&["--help"][..], &["vm", "create", "--help"], &["--version"], &["help", "vm"]] {
            let all = std::iter::once("blixard-agent").chain(args.iter().copied());
            assert!(matches!(parse(all), Err(ParseExit::Print(_))), "{args:?}");
        }
    }
}
