//! The commands that work on a stopped agent's data dir instead of talking
//! to a running agent: `restore --from FILE` (a new cluster from a backup)
//! and `recover --force-new-cluster` (a new one-member cluster from what
//! this member holds, after the majority is lost for good).
//!
//! Both are offline on purpose. The store's lock (redb allows one process)
//! proves the agent is stopped, so nothing else changes the store while it
//! is rewritten; and a one-shot command cannot be left behind by mistake
//! the way a `run` flag can (a `--force-new-cluster` left in a unit file
//! would split the cluster again at every restart). Each rewrites the store
//! in one transaction and then the agent is started as usual (`run`, or
//! `systemctl start blixard`): a store with an identity restarts as that
//! member whatever `initial_members` says.

use std::time::Duration;

use crate::api::client::{Client, ErrorClass};
use crate::backup;
use crate::config::{Config, InitialMember};
use crate::node;
use crate::storage::{StorageError, Store};

use super::args::{RecoverArgs, RestoreArgs};
use super::error::CliError;
use super::output::write_stdout;

/// How long `recover` waits for each other member to answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

fn config_of(run: &super::args::RunArgs) -> Result<Config, CliError> {
    super::run_config(run).map_err(|e| CliError::usage(e.to_string()))
}

/// Opens the store of a stopped agent.
fn open(config: &Config) -> Result<Store, CliError> {
    node::open_store(&config.data_dir).map_err(|e| match e {
        StorageError::Open { source: redb::DatabaseError::DatabaseAlreadyOpen, .. } => CliError::failed(format!(
            "the agent is running on {} (its store is locked): stop it first (systemctl stop blixard)",
            config.data_dir.display()
        )),
        e => CliError::failed(format!("cannot open the store in {}: {e}", config.data_dir.display())),
    })
}

fn hex(id: u64) -> String {
    format!("{id:016x}")
}

/// `restore --from FILE`.
pub fn restore(args: RestoreArgs) -> Result<(), CliError> {
    let config = config_of(&args.run)?;
    let backup = backup::read(&args.from).map_err(|e| CliError::usage(format!("cannot restore --from: {e}")))?;
    let members = if config.initial_members.is_empty() {
        vec![InitialMember { name: config.node_name.clone(), address: config.listen.to_string() }]
    } else {
        config.initial_members.clone()
    };
    let mut store = open(&config)?;
    if let Some(identity) = store.identity() {
        return Err(CliError::usage(format!(
            "the data dir {} already holds member {} of cluster {}; restore starts a new cluster in an empty data dir: \
             move it away first",
            config.data_dir.display(),
            identity.name,
            hex(identity.cluster_id)
        )));
    }
    if store.is_initialized() {
        return Err(CliError::usage(format!(
            "the data dir {} already holds a Raft log; restore needs an empty data dir: move it away first",
            config.data_dir.display()
        )));
    }
    let restored = node::restore_store(&mut store, &config.node_name, &members, &backup)
        .map_err(|e| CliError::failed(format!("cannot write the restored state: {e}")))?;
    drop(store);
    let h = &backup.header;
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    let mut text = format!(
        "restored the backup of cluster {} (index {}, taken by {} at {}, state sha256 {})\n\
         into {} as {} of a NEW cluster {} with members {}: {} VMs, {} kept on their host, {} to be placed again\n",
        hex(h.cluster_id),
        h.index,
        h.taken_by,
        super::output::human_utc(h.taken_unix_ms),
        h.digest_hex(),
        config.data_dir.display(),
        config.node_name,
        hex(restored.cluster_id),
        names.join(", "),
        restored.vms,
        restored.kept,
        restored.unplaced,
    );
    text.push_str("next: start the agent (blixard-agent run, or systemctl start blixard)");
    if members.len() > 1 {
        text.push_str("; run the same restore, with the same backup and initial_members, on every other member first");
    }
    text.push('\n');
    write_stdout(&text);
    Ok(())
}

/// What one other member said when `recover` asked.
enum Probe {
    /// Nothing answers there.
    Gone,
    /// It answers, but not as a member of this cluster.
    Stranger,
    /// It is still a member of this cluster.
    Member,
    /// It answers with an error that does not say which.
    Unknown(String),
}

async fn probe(address: &str, cluster_id: u64, config: &Config) -> Probe {
    let options = match super::target::for_member(address, config, PROBE_TIMEOUT) {
        Ok(options) => options,
        Err(e) => return Probe::Unknown(e.message),
    };
    let client = match Client::connect(options).await {
        Ok(client) => client,
        Err(e) if e.class == ErrorClass::Failed && is_unreachable(&e.message) => return Probe::Gone,
        Err(e) => return Probe::Unknown(e.message),
    };
    match client.cluster_status().await {
        Ok(status) if status.member && status.cluster_id == cluster_id => Probe::Member,
        Ok(_) => Probe::Stranger,
        Err(e) if is_unreachable(&e.message) => Probe::Gone,
        Err(e) => Probe::Unknown(e.message),
    }
}

fn is_unreachable(message: &str) -> bool {
    message.starts_with("cannot reach") || message.starts_with("timed out")
}

/// `recover --force-new-cluster`.
pub fn recover(args: RecoverArgs) -> Result<(), CliError> {
    assert!(args.force_new_cluster, "clap requires the flag");
    let config = config_of(&args.run)?;
    let store = open(&config)?;
    let Some(identity) = store.identity().cloned() else {
        return Err(CliError::usage(format!(
            "the data dir {} holds no member: there is nothing to recover",
            config.data_dir.display()
        )));
    };
    let state = store.state();
    if state.member(identity.id).is_none() {
        return Err(CliError::usage(format!(
            "{} was removed from its cluster: its state is not the cluster's to recover",
            identity.name
        )));
    }
    let others: Vec<(String, String)> =
        state.members().values().filter(|m| m.id != identity.id).map(|m| (m.name.clone(), m.address.clone())).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::failed(format!("cannot start the async runtime: {e}")))?;
    let answers = runtime.block_on(async {
        let probes = others.iter().map(|(_, address)| probe(address, identity.cluster_id, &config));
        futures_util::future::join_all(probes).await
    });
    for ((name, address), answer) in others.iter().zip(&answers) {
        match answer {
            Probe::Member => {
                return Err(CliError::failed(format!(
                    "{name} at {address} still answers as a member of cluster {}: the cluster is not lost; \
                     recover only when a majority is gone for good (remove one dead member with \
                     `blixard-agent cluster leave NODE` instead)",
                    hex(identity.cluster_id)
                )));
            }
            Probe::Unknown(why) => {
                return Err(CliError::failed(format!(
                    "cannot tell whether {name} at {address} is still a member ({why}); stop its agent or make it \
                     unreachable, then run this again"
                )));
            }
            Probe::Gone | Probe::Stranger => {}
        }
    }
    let (applied, commit, last) = (store.applied(), store.commit_index(), store.last_index());
    let names: Vec<&str> = others.iter().map(|(n, _)| n.as_str()).collect();
    let warning = format!(
        "recover --force-new-cluster: {me} becomes the only member of a NEW cluster.\n\
         What can be lost:\n\
         - whatever the old cluster committed after index {commit} ({me} knows of nothing later): VMs created,\n  \
           changed, deleted, moved, started or stopped in its last moments are lost or come back;\n\
         - the {pending} entries {me} received but never saw committed (indexes {from}..={last}) are discarded;\n\
         - the other members are removed ({others}); their VMs are placed again once hosts take them.\n\
         None of {others} answered as a member of cluster {old}.\n",
        me = identity.name,
        pending = last - commit,
        from = commit + 1,
        others = if names.is_empty() { "none".to_string() } else { names.join(", ") },
        old = hex(identity.cluster_id),
    );
    let _ = applied;
    eprint_quietly(&warning);
    let cluster_id = node::random_member_id();
    let forced = node::force_new_cluster(store, cluster_id)
        .map_err(|e| CliError::failed(format!("cannot rewrite the store in {}: {e}", config.data_dir.display())))?;
    let removed: Vec<String> = forced.removed.iter().map(|(n, vms)| format!("{n} ({vms} VMs)")).collect();
    let text = format!(
        "{} is now the only member of cluster {} (was {}), from index {}; discarded {} uncommitted entries; \
         removed {}\n\
         next: start the agent (blixard-agent run, or systemctl start blixard); then on each new or returning host, \
         with an empty data dir: blixard-agent cluster join {} (with a token from `blixard-agent cluster join-token`)\n",
        identity.name,
        hex(forced.cluster_id),
        hex(identity.cluster_id),
        forced.index,
        forced.discarded,
        if removed.is_empty() { "nothing".to_string() } else { removed.join(", ") },
        config.listen,
    );
    write_stdout(&text);
    Ok(())
}

fn eprint_quietly(text: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(text.as_bytes());
}
