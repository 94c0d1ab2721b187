//! The command line as clap derive types, and the value parsers that check
//! every argument before anything is sent.
//!
//! Each parser returns one sentence that names the value; `cli::error`
//! puts it on one line with the command it belongs to. Numbers are parsed
//! as wide integers and range-checked here (instead of by clap's typed
//! parsers) so that `--vcpu -1` and `--vcpu 99999999999999999999` get the
//! same clear message as `--vcpu 0`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{DEFAULT_CONFIG_PATH, DEFAULT_LISTEN, Overrides};
use crate::names::Name;
use crate::state::limits;

use super::{complete, examples};

/// The program's name, as users type it.
pub const BIN: &str = "blixard-agent";

/// The environment variable that sets `--endpoint` (the flag wins).
pub const ENDPOINT_ENV: &str = "BLIXARD_ENDPOINT";

/// Default `--timeout`, in seconds.
pub const TIMEOUT_SECS_DEFAULT: u64 = 10;
/// Longest accepted `--timeout`: a day; anything longer is a typo.
pub const TIMEOUT_SECS_MAX: u64 = 24 * 60 * 60;

#[derive(Debug, Parser)]
#[command(
    name = BIN,
    version,
    about = "Blixard: microVMs across a cluster of NixOS hosts",
    long_about = "Blixard runs microvm.nix guests across a cluster of NixOS hosts. `blixard-agent run` is the \
                  daemon on every host; the other commands talk to any agent of the cluster over gRPC.",
    after_help = examples::ROOT,
    subcommand_required = true,
    propagate_version = true,
    // `--json --json` or `--timeout 5 ... --timeout 30` (e.g. from a shell
    // alias): the last one wins, as in most tools.
    args_override_self = true,
    max_term_width = 100
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent daemon on this host (flags override the config file).
    #[command(after_help = examples::RUN)]
    Run(Box<RunArgs>),
    /// Show the cluster and change its membership.
    #[command(subcommand, subcommand_required = true, after_help = examples::CLUSTER)]
    Cluster(ClusterCommand),
    /// List hosts and drain them for maintenance.
    #[command(subcommand, subcommand_required = true, after_help = examples::NODE)]
    Node(NodeCommand),
    /// Create, start, stop, move and inspect microVMs.
    #[command(subcommand, subcommand_required = true, after_help = examples::VM)]
    Vm(VmCommand),
    /// Show the cluster's events: leader changes, hosts up, down or draining, VMs placed, moved, started, stopped, failed or fenced.
    #[command(after_help = examples::EVENTS)]
    Events(EventsArgs),
    /// Run the fence guard: stop this host's guests when its quorum contact is too old, even when the agent cannot (started by the agent or the NixOS module).
    #[command(after_help = examples::GUARD)]
    Guard(GuardArgs),
    /// Start a NEW cluster on this host from a backup (the disaster path; the agent must be stopped).
    #[command(after_help = examples::RESTORE)]
    Restore(Box<RestoreArgs>),
    /// Recover from losing a majority for good: make this stopped member a one-member cluster.
    #[command(after_help = examples::RECOVER)]
    Recover(Box<RecoverArgs>),
    /// Make a cluster CA and certificates for hosts and clients (mutual TLS).
    #[command(subcommand, subcommand_required = true, after_help = examples::CERTS)]
    Certs(CertsCommand),
    /// Print a shell completion script to stdout.
    #[command(after_help = examples::COMPLETIONS)]
    Completions {
        /// The shell to complete for
        #[arg(value_enum, value_name = "SHELL")]
        shell: CompletionShell,
    },
    /// Write man pages for every command into OUTDIR (used by the package build).
    #[command(hide = true)]
    Man {
        /// Directory for the pages (created if missing)
        #[arg(value_name = "OUTDIR")]
        outdir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create the cluster CA: DIR/ca.pem and DIR/ca.key (keep the key off the hosts).
    Ca {
        /// Directory for the CA's files (created if missing)
        #[arg(long, value_name = "DIR", default_value = ".")]
        dir: PathBuf,
        /// The CA's common name
        #[arg(long, value_name = "TEXT", default_value = "blixard cluster CA")]
        common_name: String,
    },
    /// Create a member certificate for host NAME: DIR/NAME.pem and DIR/NAME.key.
    Host {
        /// The host's `node_name`
        #[arg(value_name = "NAME")]
        name: Name,
        /// An address its peers dial it at (IP or DNS name, a port is ignored); repeatable
        #[arg(long = "address", value_name = "HOST", required = true)]
        addresses: Vec<String>,
        /// Directory holding ca.pem and ca.key, and for the new files
        #[arg(long, value_name = "DIR", default_value = ".")]
        dir: PathBuf,
        /// Days the certificate is valid
        #[arg(long, value_name = "DAYS", default_value_t = 825, value_parser = clap::value_parser!(i64).range(1..=3650))]
        days: i64,
    },
    /// Create a client certificate for operator NAME: DIR/NAME.pem and DIR/NAME.key.
    Client {
        /// The client's name (for the agents' records)
        #[arg(value_name = "NAME")]
        name: Name,
        /// What the certificate may do: read-only (status, lists, events, logs) or admin (everything)
        #[arg(long, value_enum, value_name = "ROLE", default_value = "admin")]
        role: RoleArg,
        /// Directory holding ca.pem and ca.key, and for the new files
        #[arg(long, value_name = "DIR", default_value = ".")]
        dir: PathBuf,
        /// Days the certificate is valid
        #[arg(long, value_name = "DAYS", default_value_t = 825, value_parser = clap::value_parser!(i64).range(1..=3650))]
        days: i64,
    },
}

/// `restore --from FILE`: the backup, and the agent's own settings (as `run`
/// takes them) for the data dir, name, address and initial members.
#[derive(Debug, Clone, Args)]
pub struct RestoreArgs {
    /// The backup file (`blixard-agent cluster backup FILE`)
    #[arg(long = "from", value_name = "FILE")]
    pub from: PathBuf,
    #[command(flatten)]
    pub run: RunArgs,
}

/// `recover --force-new-cluster`: the stopped agent's settings, as `run`
/// takes them.
#[derive(Debug, Clone, Args)]
pub struct RecoverArgs {
    /// Required: form a new one-member cluster from this member's own state, removing every other member
    #[arg(long, required = true)]
    pub force_new_cluster: bool,
    #[command(flatten)]
    pub run: RunArgs,
}

/// `--role` of a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    ReadOnly,
    Admin,
}

impl From<RoleArg> for crate::api::tls::Role {
    fn from(role: RoleArg) -> Self {
        match role {
            RoleArg::ReadOnly => crate::api::tls::Role::ReadOnly,
            RoleArg::Admin => crate::api::tls::Role::Admin,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// `run`: every config key as a flag. Values are checked by
/// `Config::resolve`, which names the key that is wrong.
#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    /// The config file [default: /etc/blixard/agent.toml if it exists, else flags only]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This host's name in the cluster (`node_name`) [default: the host name]
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// Address of the gRPC port (`listen`), reachable by the other members [default: 127.0.0.1:7000]
    #[arg(long, value_name = "IP:PORT")]
    pub listen: Option<String>,
    /// Where the agent keeps its state (`data_dir`) [default: /var/lib/blixard]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// A member of the initial cluster (`initial_members`); repeat for each, this host included
    #[arg(long = "initial-member", value_name = "NAME=HOST:PORT")]
    pub initial_members: Vec<String>,
    /// A member to join through (`join`), for a host not in the initial set; repeatable
    #[arg(long = "join", value_name = "HOST:PORT")]
    pub join: Vec<String>,
    /// Log filter (`log_level`), e.g. info or blixard=debug [default: info]
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Address for Prometheus metrics (`metrics_listen`)
    #[arg(long, value_name = "IP:PORT")]
    pub metrics_listen: Option<String>,
    /// File holding the token for joining (`join_token_file`)
    #[arg(long, value_name = "FILE")]
    pub join_token_file: Option<PathBuf>,
    /// How guests are run (`runtime.kind`) [default: systemd]
    #[arg(long, value_name = "KIND", value_parser = ["systemd", "process"])]
    pub runtime: Option<String>,
    /// Where microvm.nix lays out guests (`runtime.state_dir`) [default: /var/lib/microvms]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// vcpus offered to guests (`capacity.vcpu`) [default: detected]
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub vcpu: Option<i64>,
    /// MiB of memory offered to guests (`capacity.memory_mib`) [default: detected]
    #[arg(long, value_name = "MIB", allow_negative_numbers = true)]
    pub memory_mib: Option<i64>,
    /// A label of this host (`labels`), matched by VMs' --label; repeatable, replaces the file's labels
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// The secret every member shares, from `cluster new-secret` (`cluster_secret_file`)
    #[arg(long, value_name = "FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// Another secret whose certificates are accepted too, during a rotation (`cluster_secret_accepted_file`)
    #[arg(long, value_name = "FILE")]
    pub cluster_secret_accepted_file: Option<PathBuf>,
    /// Plain text without authentication, only on a loopback --listen (`insecure`)
    #[arg(long)]
    pub insecure: bool,
    /// CA certificate for mTLS (`tls.ca_file`)
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This agent's certificate (`tls.cert_file`)
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// This agent's private key (`tls.key_file`)
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Placement strategy (`scheduler.strategy`) [default: spread]
    #[arg(long, value_name = "STRATEGY", value_parser = ["spread", "binpack"])]
    pub strategy: Option<String>,
}

impl RunArgs {
    /// The config file to read: `--config`, else the default path if it exists.
    pub fn config_path(&self) -> Option<PathBuf> {
        self.config.clone().or_else(|| {
            let default = PathBuf::from(DEFAULT_CONFIG_PATH);
            default.exists().then_some(default)
        })
    }

    pub fn overrides(&self) -> Overrides {
        let list = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
        Overrides {
            node_name: self.node_name.clone(),
            listen: self.listen.clone(),
            data_dir: self.data_dir.clone(),
            initial_members: list(&self.initial_members),
            join: list(&self.join),
            log_level: self.log_level.clone(),
            metrics_listen: self.metrics_listen.clone(),
            join_token_file: self.join_token_file.clone(),
            cluster_secret_file: self.cluster_secret_file.clone(),
            cluster_secret_accepted_file: self.cluster_secret_accepted_file.clone(),
            insecure: self.insecure,
            runtime: self.runtime.clone(),
            state_dir: self.state_dir.clone(),
            vcpu: self.vcpu,
            memory_mib: self.memory_mib,
            labels: list(&self.labels),
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            strategy: self.strategy.clone(),
        }
    }
}

/// `guard`: flags only (never the agent's config file: a config the agent
/// refuses must not stop the guard).
#[derive(Debug, Clone, Args)]
pub struct GuardArgs {
    /// The agent's data dir, holding `fence-contact` and `fence-exempt`
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Where microvm.nix lays out guests (`runtime.state_dir`)
    #[arg(long, value_name = "DIR", default_value = "/var/lib/microvms")]
    pub state_dir: PathBuf,
    /// How the agent runs guests (`runtime.kind`)
    #[arg(long, value_name = "KIND", value_parser = ["systemd", "process"], default_value = "systemd")]
    pub runtime: String,
    /// Stop the guests once the last quorum contact is this old (`timing.fence_after_ms`)
    #[arg(long, value_name = "MS", value_parser = timing_ms, default_value_t = crate::failure::Timing::default().fence_after_ms)]
    pub fence_after_ms: u64,
    /// The bound on the fence's kill of every guest (`timing.stop_max_ms`)
    #[arg(long, value_name = "MS", value_parser = timing_ms, default_value_t = crate::failure::Timing::default().stop_max_ms)]
    pub stop_max_ms: u64,
    /// The agent's check interval (`timing.check_interval_ms`): how late past the deadline a frozen guard may be killed
    #[arg(long, value_name = "MS", value_parser = timing_ms, default_value_t = crate::failure::Timing::default().check_interval_ms)]
    pub check_interval_ms: u64,
    /// Check once: if the contact is stale, stop the guests, then exit (the guard unit's ExecStopPost)
    #[arg(long)]
    pub fence_if_stale: bool,
}

impl GuardArgs {
    pub fn config(&self) -> crate::guard::GuardConfig {
        crate::guard::GuardConfig {
            data_dir: self.data_dir.clone(),
            state_dir: self.state_dir.clone(),
            runtime: if self.runtime == "process" {
                crate::config::RuntimeKind::Process
            } else {
                crate::config::RuntimeKind::Systemd
            },
            fence_after_ms: self.fence_after_ms,
            stop_max_ms: self.stop_max_ms,
            check_interval_ms: self.check_interval_ms,
        }
    }
}

fn timing_ms(text: &str) -> Result<u64, String> {
    let max = crate::failure::TIMING_MS_MAX;
    match text.parse::<u128>() {
        Ok(ms) if (1..=u128::from(max)).contains(&ms) => Ok(ms as u64),
        _ => Err(format!("{text:?} is not a whole number of milliseconds between 1 and {max}")),
    }
}

/// Options every client command takes.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Connection options")]
pub struct ClientArgs {
    /// The agent to talk to: HOST:PORT, http://HOST:PORT or https://HOST:PORT
    /// [default: $BLIXARD_ENDPOINT, else `listen` from the local agent's config, else 127.0.0.1:7000]
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_endpoint, env = ENDPOINT_ENV, hide_env = true)]
    pub endpoint: Option<EndpointArg>,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
    /// The local agent's config file, read for the default endpoint and TLS files
    /// [default: /etc/blixard/agent.toml if it exists]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// CA certificate to verify the agent with (PEM) [default: `tls.ca_file` from the config]
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) [default: `tls.cert_file` from the config]
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM) [default: `tls.key_file` from the config]
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Give up on the agent after this many seconds
    #[arg(long, value_name = "SECS", default_value_t = TIMEOUT_SECS_DEFAULT, value_parser = parse_timeout_secs)]
    pub timeout: u64,
}

impl ClientArgs {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout)
    }
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Show the leader, the term and every member.
    #[command(after_help = examples::CLUSTER_STATUS)]
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Make the agent at --endpoint join the cluster that ADDRESS belongs to.
    #[command(after_help = examples::CLUSTER_JOIN)]
    Join {
        /// Any member of the cluster to join
        #[arg(value_name = "ADDRESS", value_parser = parse_address)]
        address: String,
        /// File holding a join token, if the cluster requires one
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Write a consistent, checksummed backup of the cluster state to FILE (from any member).
    #[command(after_help = examples::CLUSTER_BACKUP)]
    Backup {
        /// The file to write (it must not exist; written whole or not at all)
        #[arg(value_name = "FILE")]
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Issue a one-time join token and print it (only once: the cluster
    /// keeps just its hash).
    #[command(name = "join-token", after_help = examples::CLUSTER_JOIN_TOKEN)]
    JoinToken {
        /// How long the token admits a host: SECONDS, or a number with s, m, h or d (at most 7d)
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_ttl_secs)]
        ttl: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Write a new cluster secret to FILE (mode 0600): what every member's `cluster_secret_file` names.
    #[command(name = "new-secret", after_help = examples::CLUSTER_NEW_SECRET)]
    NewSecret {
        /// The file to create (never overwritten)
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Issue a client certificate for NAME from the cluster's CA: DIR/NAME.pem, DIR/NAME.key, DIR/ca.pem.
    #[command(name = "issue-client", after_help = examples::CLUSTER_ISSUE_CLIENT)]
    IssueClient {
        /// The client's name (for the agents' records)
        #[arg(value_name = "NAME")]
        name: Name,
        /// What the certificate may do: read-only (status, lists, events, logs) or admin (everything)
        #[arg(long, value_enum, value_name = "ROLE")]
        role: RoleArg,
        /// Directory for the new files (created if missing; existing files are never overwritten)
        #[arg(long, value_name = "DIR", default_value = ".")]
        dir: PathBuf,
        /// Days the certificate is valid
        #[arg(long, value_name = "DAYS", default_value_t = 825, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove NODE from the cluster (default: the agent at --endpoint): drains it first, so every VM runs elsewhere before it goes; NODE may be down.
    #[command(after_help = examples::CLUSTER_LEAVE)]
    Leave {
        /// The member to remove [default: the agent at --endpoint]
        #[arg(value_name = "NODE", add = complete::nodes())]
        node: Option<Name>,
        /// Remove it now without draining: its VMs move once it has certainly stopped them (use for a dead host)
        #[arg(long)]
        force: bool,
        /// How long to wait for the drain before giving up (exit 1; the member stays, draining)
        #[arg(long, value_name = "SECS", default_value_t = WAIT_SECS_DEFAULT, value_parser = parse_timeout_secs)]
        wait_timeout: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List hosts with their status, capacity in use and VMs.
    #[command(after_help = examples::NODE_LIST)]
    List {
        #[command(flatten)]
        stale: StaleArg,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Move every VM off NODE and place nothing new on it.
    #[command(after_help = examples::NODE_DRAIN)]
    Drain {
        /// The host's name in the cluster
        #[arg(value_name = "NODE", add = complete::nodes())]
        node: Name,
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Let NODE take new placements again.
    #[command(after_help = examples::NODE_UNDRAIN)]
    Undrain {
        /// The host's name in the cluster
        #[arg(value_name = "NODE", add = complete::nodes())]
        node: Name,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create a VM; the cluster places it on a host that has its runner installed.
    #[command(after_help = examples::VM_CREATE)]
    Create(Box<VmCreateArgs>),
    /// Set a VM's desired state to running (its host then starts it).
    #[command(after_help = examples::VM_START)]
    Start(VmNameWait),
    /// Set a VM's desired state to stopped (its host then stops it).
    #[command(after_help = examples::VM_STOP)]
    Stop(VmNameWait),
    /// Remove a VM from the cluster; its host stops the guest.
    #[command(after_help = examples::VM_DELETE)]
    Delete(VmNameWait),
    /// Change a VM in place: size, labels, pin, anti-affinity, failover policy.
    #[command(after_help = examples::VM_UPDATE)]
    Update(Box<VmUpdateArgs>),
    /// Move a VM to another host.
    #[command(after_help = examples::VM_MIGRATE)]
    Migrate {
        /// The VM's name
        #[arg(value_name = "NAME", add = complete::vms())]
        name: Name,
        /// The host to move it to
        #[arg(long, value_name = "NODE", add = complete::nodes())]
        to: Name,
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Move a VM off a host that is down and known to be dead (for failover = "manual" VMs, which the cluster never moves by itself).
    #[command(after_help = examples::VM_RECOVER)]
    Recover {
        /// The VM's name
        #[arg(value_name = "NAME", add = complete::vms())]
        name: Name,
        /// The host to run it on now
        #[arg(long, value_name = "NODE", add = complete::nodes())]
        to: Name,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List VMs with their host, desired and observed state (all of them, or those that match).
    #[command(after_help = examples::VM_LIST)]
    List(VmListArgs),
    /// Show one VM in detail: state since when, last error, why it is pending or lost.
    #[command(after_help = examples::VM_STATUS)]
    Status {
        /// The VM's name
        #[arg(value_name = "NAME", add = complete::vms())]
        name: Name,
        #[command(flatten)]
        stale: StaleArg,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show a VM's log (its unit's journal) from the host that runs it.
    #[command(after_help = examples::VM_LOGS)]
    Logs(VmLogsArgs),
}

#[derive(Debug, Args)]
pub struct VmLogsArgs {
    /// The VM's name
    #[arg(value_name = "NAME", add = complete::vms())]
    pub name: Name,
    /// Keep printing new lines as the guest writes them (until interrupted)
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Show the last N lines first
    #[arg(short = 'n', long = "lines", value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub lines: u32,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `--wait` for the commands that start a long operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Args)]
pub struct WaitArgs {
    /// Block until the operation is done (the VM settled), showing progress on stderr
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up (exit 1) after this many seconds
    #[arg(long, value_name = "SECS", default_value_t = WAIT_SECS_DEFAULT, value_parser = parse_timeout_secs, requires = "wait")]
    pub wait_timeout: u64,
}

/// `--stale` of the read commands.
#[derive(Debug, Clone, Copy, Args)]
pub struct StaleArg {
    /// Answer from the agent's own state even if it cannot reach a quorum (its last known state, which may be stale; stderr says how old)
    #[arg(long)]
    pub stale: bool,
}

/// Default `--wait-timeout`, in seconds.
pub const WAIT_SECS_DEFAULT: u64 = 600;

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Keep printing events as they happen (until interrupted)
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Show only the last N events kept by the agent (it keeps 1000)
    #[arg(short = 'n', long = "lines", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub lines: Option<u32>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct VmName {
    /// The VM's name
    #[arg(value_name = "NAME", add = complete::vms())]
    pub name: Name,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct VmNameWait {
    /// The VM's name
    #[arg(value_name = "NAME", add = complete::vms())]
    pub name: Name,
    #[command(flatten)]
    pub wait: WaitArgs,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct VmListArgs {
    /// Only VMs placed on this host
    #[arg(long, value_name = "NODE", add = complete::nodes())]
    pub node: Option<Name>,
    /// Only VMs in this state
    #[arg(long, value_name = "STATE", value_parser = clap::builder::PossibleValuesParser::new(crate::state::VmState::ALL.map(|s| s.as_str())))]
    pub state: Option<String>,
    /// Only VMs with this label; repeatable (all must match)
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Only VMs whose name starts with PREFIX
    #[arg(long, value_name = "PREFIX", value_parser = parse_prefix)]
    pub prefix: Option<String>,
    #[command(flatten)]
    pub stale: StaleArg,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct VmUpdateArgs {
    /// The VM's name
    #[arg(value_name = "NAME", add = complete::vms())]
    pub name: Name,
    /// Virtual CPUs (1 to 1024)
    #[arg(long, value_name = "N", value_parser = parse_vcpu, allow_negative_numbers = true)]
    pub vcpu: Option<u32>,
    /// Memory in MiB (16 to 16777216)
    #[arg(long, value_name = "MIB", value_parser = parse_memory_mib, allow_negative_numbers = true)]
    pub memory: Option<u64>,
    /// Add or change a placement label; repeatable
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Remove a placement label; repeatable
    #[arg(long = "remove-label", value_name = "KEY", value_parser = parse_label_key)]
    pub remove_labels: Vec<String>,
    /// Pin the VM to this host
    #[arg(long, value_name = "NODE", conflicts_with = "unpin", add = complete::nodes())]
    pub node: Option<Name>,
    /// Let the VM run on any host
    #[arg(long)]
    pub unpin: bool,
    /// Put the VM in this anti-affinity group
    #[arg(long, value_name = "GROUP", conflicts_with = "no_anti_affinity")]
    pub anti_affinity: Option<Name>,
    /// Take the VM out of its anti-affinity group
    #[arg(long)]
    pub no_anti_affinity: bool,
    /// What happens when its host is lost: auto (fenced there, restarted elsewhere) or manual (moved only by `vm recover`)
    #[arg(long, value_name = "POLICY", value_parser = ["auto", "manual"])]
    pub failover: Option<String>,
    /// Restart the VM after the change (stop, then start), so that it takes effect now
    #[arg(long)]
    pub restart: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct VmCreateArgs {
    /// The VM's name: a-z, 0-9 and '-', starting with a letter or digit, at most 63 characters
    #[arg(value_name = "NAME")]
    pub name: Name,
    /// Virtual CPUs (1 to 1024)
    #[arg(long, value_name = "N", value_parser = parse_vcpu, allow_negative_numbers = true)]
    pub vcpu: u32,
    /// Memory in MiB (16 to 16777216)
    #[arg(long, value_name = "MIB", value_parser = parse_memory_mib, allow_negative_numbers = true)]
    pub memory: u64,
    /// Pin the VM to this host
    #[arg(long, value_name = "NODE", add = complete::nodes())]
    pub node: Option<Name>,
    /// Place only on hosts with this label; repeatable
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Never place this VM on a host with another VM of the same group
    #[arg(long, value_name = "GROUP")]
    pub anti_affinity: Option<Name>,
    /// Create it with desired state stopped
    #[arg(long)]
    pub stopped: bool,
    /// What happens when its host is lost: auto (fenced there, restarted elsewhere) or manual (never fenced for want of quorum, moved only by `vm recover`)
    #[arg(long, value_name = "POLICY", value_parser = ["auto", "manual"], default_value = "auto")]
    pub failover: String,
    #[command(flatten)]
    pub wait: WaitArgs,
    #[command(flatten)]
    pub client: ClientArgs,
}

impl VmCreateArgs {
    /// The labels as a map; refuses a key given twice and more than the limit.
    pub fn label_map(&self) -> Result<BTreeMap<String, String>, String> {
        label_map(&self.labels)
    }
}

/// `--label` values as a map; refuses a key given twice and more than the limit.
pub fn label_map(labels: &[(String, String)]) -> Result<BTreeMap<String, String>, String> {
    if labels.len() > limits::LABELS_MAX {
        return Err(format!("{} labels given; the limit is {}", labels.len(), limits::LABELS_MAX));
    }
    let mut map = BTreeMap::new();
    for (key, value) in labels {
        if map.insert(key.clone(), value.clone()).is_some() {
            return Err(format!("label {key:?} is given twice"));
        }
    }
    Ok(map)
}

/// `--endpoint`, checked: where to connect and whether TLS was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointArg {
    pub scheme: Option<Scheme>,
    /// `host` or `[v6]`, as given.
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl EndpointArg {
    /// `host:port`, IPv6 hosts in brackets.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The host without IPv6 brackets: the name a TLS certificate must carry.
    pub fn tls_name(&self) -> &str {
        self.host.trim_start_matches('[').trim_end_matches(']')
    }
}

/// Parses `HOST:PORT` or `http(s)://HOST:PORT[/]`.
pub fn parse_endpoint(text: &str) -> Result<EndpointArg, String> {
    let bad = || format!("{:?} is not HOST:PORT or an http(s):// URL (for example 10.0.0.1:7000)", shown(text));
    let (scheme, rest) = if let Some(rest) = text.strip_prefix("http://") {
        (Some(Scheme::Http), rest)
    } else if let Some(rest) = text.strip_prefix("https://") {
        (Some(Scheme::Https), rest)
    } else {
        (None, text)
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = split_host_port(rest).ok_or_else(bad)?;
    Ok(EndpointArg { scheme, host: host.to_string(), port })
}

/// Parses `cluster join`'s ADDRESS: `HOST:PORT`, an `http(s)://` prefix allowed.
pub fn parse_address(text: &str) -> Result<String, String> {
    let rest = text.strip_prefix("http://").or_else(|| text.strip_prefix("https://")).unwrap_or(text);
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    match split_host_port(rest) {
        Some((host, port)) => Ok(format!("{host}:{port}")),
        None => Err(format!("{:?} is not HOST:PORT (for example 10.0.0.1:7000)", shown(text))),
    }
}

/// Splits `host:port` where host is a DNS name, an IPv4 address or a
/// bracketed IPv6 address, and port is 1..=65535.
fn split_host_port(text: &str) -> Option<(&str, u16)> {
    if text.is_empty() || text.len() > limits::ADDRESS_LEN_MAX {
        return None;
    }
    let (host, port) = text.rsplit_once(':')?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let host_ok = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        inner.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            })
    };
    host_ok.then_some((host, port))
}

/// Parses `--vcpu`: 1..=VM_VCPU_MAX.
pub fn parse_vcpu(text: &str) -> Result<u32, String> {
    let n = whole_number(text)?;
    if n < 1 || n > i128::from(limits::VM_VCPU_MAX) {
        return Err(format!("{n} is not between 1 and {} vcpus", limits::VM_VCPU_MAX));
    }
    Ok(n as u32)
}

/// Parses `--memory`: VM_MEMORY_MIB_MIN..=VM_MEMORY_MIB_MAX MiB.
pub fn parse_memory_mib(text: &str) -> Result<u64, String> {
    let n = whole_number(text)?;
    if n < i128::from(limits::VM_MEMORY_MIB_MIN) || n > i128::from(limits::VM_MEMORY_MIB_MAX) {
        return Err(format!("{n} is not between {} and {} MiB", limits::VM_MEMORY_MIB_MIN, limits::VM_MEMORY_MIB_MAX));
    }
    Ok(n as u64)
}

/// A join token's lifetime: `90`, `90s`, `15m`, `1h` or `7d`, 1 s to 7 days.
pub fn parse_ttl_secs(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, "s"),
    };
    let per_unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?} is not a duration such as 90s, 15m, 1h or 7d")),
    };
    let seconds = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(per_unit))
        .ok_or_else(|| format!("{text:?} is not a duration such as 90s, 15m, 1h or 7d"))?;
    if seconds == 0 || seconds > 7 * 86_400 {
        return Err(format!("{text:?} is out of range: a join token lives from 1 s to 7 days"));
    }
    Ok(seconds)
}

fn parse_timeout_secs(text: &str) -> Result<u64, String> {
    let n = whole_number(text)?;
    if n < 1 || n > i128::from(TIMEOUT_SECS_MAX) {
        return Err(format!("{n} is not between 1 and {TIMEOUT_SECS_MAX} seconds"));
    }
    Ok(n as u64)
}

/// A decimal integer; values beyond i128 are refused as absurd, not wrapped.
fn whole_number(text: &str) -> Result<i128, String> {
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{:?} is not a whole number", shown(text)));
    }
    text.parse::<i128>().map_err(|_| format!("{} is far too large", shown(text)))
}

/// Parses `--label KEY=VALUE` with the rules the cluster applies.
pub fn parse_label(text: &str) -> Result<(String, String), String> {
    let Some((key, value)) = text.split_once('=') else {
        return Err(format!("{:?} is not KEY=VALUE", shown(text)));
    };
    let key_ok = !key.is_empty()
        && key.len() <= limits::LABEL_KEY_LEN_MAX
        && key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.' | b'/'));
    if !key_ok {
        return Err(format!(
            "label key {:?} must be 1 to {} characters of a-z, 0-9, '-', '_', '.', '/'",
            shown(key),
            limits::LABEL_KEY_LEN_MAX
        ));
    }
    if value.len() > limits::LABEL_VALUE_LEN_MAX || !value.chars().all(|c| c.is_ascii_graphic()) {
        return Err(format!(
            "label value for {key:?} must be at most {} printable ASCII characters without spaces",
            limits::LABEL_VALUE_LEN_MAX
        ));
    }
    Ok((key.to_string(), value.to_string()))
}

/// Parses `--remove-label KEY`: a label key by the cluster's rules.
pub fn parse_label_key(text: &str) -> Result<String, String> {
    if text.contains('=') {
        return Err(format!("{:?} is a label KEY, without =VALUE", shown(text)));
    }
    parse_label(&format!("{text}=")).map(|(key, _)| key)
}

/// Parses `--prefix`: the start of a VM name.
pub fn parse_prefix(text: &str) -> Result<String, String> {
    let ok = text.len() <= crate::names::NAME_LEN_MAX
        && text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok { Ok(text.to_string()) } else { Err(format!("{:?} cannot start a VM name (a-z, 0-9, '-')", shown(text))) }
}

/// Keeps hostile input from making an error message long: at most 80 characters.
fn shown(text: &str) -> String {
    const SHOWN_MAX: usize = 80;
    if text.chars().count() <= SHOWN_MAX {
        text.to_string()
    } else {
        let mut s: String = text.chars().take(SHOWN_MAX).collect();
        s.push('…');
        s
    }
}

/// The default endpoint when neither `--endpoint` nor a config gives one.
pub fn default_endpoint() -> EndpointArg {
    parse_endpoint(DEFAULT_LISTEN).expect("DEFAULT_LISTEN is HOST:PORT")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let ok = [
            ("127.0.0.1:7000", None, "127.0.0.1", 7000),
            ("http://10.0.0.1:7000", Some(Scheme::Http), "10.0.0.1", 7000),
            ("https://h1.example:7443/", Some(Scheme::Https), "h1.example", 7443),
            ("[::1]:7000", None, "[::1]", 7000),
            ("localhost:1", None, "localhost", 1),
        ];
        for (text, scheme, host, port) in ok {
            let e = parse_endpoint(text).unwrap();
            assert_eq!((e.scheme, e.host.as_str(), e.port), (scheme, host, port), "{text}");
        }
        assert_eq!(parse_endpoint("[::1]:7000").unwrap().tls_name(), "::1");
        let bad = [
            "",
            "h1",
            ":7000",
            "h1:",
            "h1:0",
            "h1:70000",
            "h1:+7",
            "ftp://h1:7000",
            "http://h1:7000/path",
            "user@h1:7000",
            "a b:7000",
            "::1:7000",
            "[nope]:7000",
            "h1:7000?x",
            "-h:1",
        ];
        for text in bad {
            let e = parse_endpoint(text).expect_err(text);
            assert!(e.contains("is not HOST:PORT"), "{text}: {e}");
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(parse_address("10.0.0.1:7000").unwrap(), "10.0.0.1:7000");
        assert_eq!(parse_address("http://10.0.0.1:7000").unwrap(), "10.0.0.1:7000");
        assert!(parse_address("10.0.0.1").is_err());
        assert_eq!(parse_ttl_secs("90").unwrap(), 90);
        assert_eq!(parse_ttl_secs("15m").unwrap(), 900);
        assert_eq!(parse_ttl_secs("7d").unwrap(), 604_800);
        for bad in ["", "0", "8d", "1w", "h", "-1h", "1.5h", "99999999999999999999"] {
            assert!(parse_ttl_secs(bad).is_err(), "{bad}");
        }
        assert!(parse_address("10.0.0.1:0").is_err());
    }

    #[test]
    fn resources() {
        assert_eq!(parse_vcpu("1"), Ok(1));
        assert_eq!(parse_vcpu("1024"), Ok(1024));
        for bad in
            ["0", "-1", "1025", "99999999999999999999", "999999999999999999999999999999999999999999", "two", "", "1.5"]
        {
            assert!(parse_vcpu(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_memory_mib("16"), Ok(16));
        assert_eq!(parse_memory_mib("16777216"), Ok(16_777_216));
        for bad in ["0", "15", "-1024", "16777217", "1G", "1e9"] {
            assert!(parse_memory_mib(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_vcpu("-1").unwrap_err(), "-1 is not between 1 and 1024 vcpus");
        assert_eq!(parse_vcpu("x").unwrap_err(), "\"x\" is not a whole number");
    }

    #[test]
    fn labels() {
        assert_eq!(parse_label("rack=r1"), Ok(("rack".into(), "r1".into())));
        assert_eq!(parse_label("k="), Ok(("k".into(), String::new())));
        for bad in ["rack", "=v", "Rack=1", "a b=1", "k=a b", "k=é", &format!("{}=1", "k".repeat(64))] {
            assert!(parse_label(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn run_flags_fill_overrides() {
        let cli = Cli::try_parse_from([
            BIN,
            "run",
            "--node-name",
            "h1",
            "--initial-member",
            "h1=127.0.0.1:7000",
            "--initial-member",
            "h2=127.0.0.2:7000",
            "--label",
            "rack=r1",
            "--vcpu",
            "-3",
            "--runtime",
            "process",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else { panic!("not run") };
        let o = args.overrides();
        assert_eq!(o.node_name.as_deref(), Some("h1"));
        assert_eq!(o.initial_members.unwrap().len(), 2);
        assert_eq!(o.labels, Some(vec!["rack=r1".to_string()]));
        assert_eq!(o.vcpu, Some(-3));
        assert_eq!(o.join, None);
        assert_eq!(o.runtime.as_deref(), Some("process"));
    }

    /// docs/config.md names the `run` flag of each key: they are the real
    /// ones, and every flag of `run` (but --config) has its key there.
    #[test]
    fn the_config_reference_names_the_run_flags() {
        use clap::CommandFactory;
        let cli = Cli::command();
        let run = cli.find_subcommand("run").unwrap();
        let flags: Vec<String> = run.get_arguments().filter_map(|a| a.get_long()).map(|l| format!("--{l}")).collect();
        let documented: Vec<&str> =
            crate::config::reference().iter().map(|k| k.flag).filter(|f| !f.is_empty()).collect();
        for flag in &documented {
            assert!(flags.iter().any(|f| f == flag), "{flag} is not a flag of run");
        }
        for flag in flags.iter().filter(|f| !["--config", "--help", "--version"].contains(&f.as_str())) {
            assert!(documented.contains(&flag.as_str()), "run's {flag} is missing from config::reference()");
        }
    }

    #[test]
    fn the_command_tree_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
