//! The agent's configuration: a TOML file (written by the NixOS module),
//! every key overridable by a `run` flag, validated once at start.
//!
//! Parsing is two-step: [`FileConfig`] mirrors the file exactly (unknown
//! keys are refused, so a typo never silently falls back to a default),
//! [`Overrides`] carries the flags, and [`Config::resolve`] merges and
//! validates them into the typed [`Config`] the agent runs with. Every
//! error names the key and says what is wrong.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::names;
use crate::state::{Capacity, Desired, Labels, VmSpec, limits};

/// Default gRPC port.
pub const DEFAULT_PORT: u16 = 7000;
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7000";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/blixard";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/microvms";
/// Bounds of `runtime.start_timeout_ms`: a second, and a day.
const START_TIMEOUT_MIN_MS: u64 = 1_000;
const START_TIMEOUT_MAX_MS: u64 = 86_400_000;
/// Where client commands look for the local agent's config.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/blixard/agent.toml";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid configuration: `{key}`: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

fn err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError { key: key.into(), message: message.into() }
}

/// The file, as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub node_name: Option<String>,
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub initial_members: Vec<String>,
    #[serde(default)]
    pub join: Vec<String>,
    pub log_level: Option<String>,
    pub metrics_listen: Option<String>,
    pub join_token_file: Option<PathBuf>,
    pub cluster_secret_file: Option<PathBuf>,
    pub cluster_secret_accepted_file: Option<PathBuf>,
    pub insecure: Option<bool>,
    #[serde(default)]
    pub runtime: RuntimeSection,
    pub capacity: Option<CapacitySection>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub tls: Option<TlsSection>,
    #[serde(default)]
    pub timing: TimingSection,
    #[serde(default)]
    pub scheduler: SchedulerSection,
    #[serde(default)]
    pub raft: RaftSection,
    #[serde(default)]
    pub vm: Vec<VmSection>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSection {
    pub kind: Option<String>,
    pub state_dir: Option<PathBuf>,
    /// How long a guest's start may take (the systemd runtime's start job).
    pub start_timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacitySection {
    pub vcpu: Option<i64>,
    pub memory_mib: Option<i64>,
    pub vcpu_overcommit: Option<f64>,
    pub memory_overcommit: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimingSection {
    pub node_down_after_ms: Option<u64>,
    pub reschedule_after_ms: Option<u64>,
    pub fence_after_ms: Option<u64>,
    pub stop_max_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSection {
    pub strategy: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaftSection {
    pub tick_ms: Option<u64>,
    pub election_ticks: Option<u64>,
    pub heartbeat_ticks: Option<u64>,
    pub log_compact_entries_max: Option<u64>,
    /// How many members vote (3, 5 or 7); every other member is a learner.
    pub voters: Option<u64>,
    /// How long a voter may be silent before a learner takes its vote.
    pub replace_voter_after_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSection {
    pub name: String,
    pub vcpu: i64,
    pub memory_mib: i64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub node: Option<String>,
    pub anti_affinity: Option<String>,
    pub desired: Option<String>,
    /// "auto" (default) or "manual".
    pub failover: Option<String>,
}

/// Values given as `run` flags; each replaces the file's value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub node_name: Option<String>,
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub initial_members: Option<Vec<String>>,
    pub join: Option<Vec<String>>,
    pub log_level: Option<String>,
    pub metrics_listen: Option<String>,
    pub join_token_file: Option<PathBuf>,
    pub cluster_secret_file: Option<PathBuf>,
    pub cluster_secret_accepted_file: Option<PathBuf>,
    /// `--insecure` (a flag can only turn it on).
    pub insecure: bool,
    pub runtime: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub vcpu: Option<i64>,
    pub memory_mib: Option<i64>,
    pub labels: Option<Vec<String>>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub strategy: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeKind {
    Systemd,
    Process,
}

pub use crate::scheduler::Strategy;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// How the agent authenticates its peers and clients (`api::tls` turns
/// this into certificates at start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// `cluster_secret_file`: certificates derived from one shared secret;
    /// `accepted`'s CA is trusted as well (a rotation in progress:
    /// docs/security.md).
    Secret { file: PathBuf, accepted: Option<PathBuf> },
    /// `[tls]`: an operator CA's files.
    Tls(Tls),
    /// `insecure = true` on a loopback `listen`: plain text.
    Insecure,
    /// Nothing configured: the certificate the cluster issued to this host
    /// when it joined (in the data dir), or one to obtain with a join token.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitialMember {
    pub name: String,
    pub address: String,
}

pub use crate::failure::Timing;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftTiming {
    pub tick_ms: u64,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub log_compact_entries_max: u64,
}

impl Default for RaftTiming {
    fn default() -> Self {
        // 25 ms ticks: elections within 0.3..0.6 s, which the failure timing
        // (`failure::Timing::election_timeout_max_ms`) counts on; heartbeats
        // every 100 ms (3 to the shortest election timeout), which also
        // confirm every read index and carry every host's quorum contact:
        // at rest, most of what members send. The raft thread sleeps until a
        // tick is due to do something, so short ticks cost no wake-ups.
        RaftTiming { tick_ms: 25, election_ticks: 12, heartbeat_ticks: 4, log_compact_entries_max: 10_000 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredVm {
    pub name: String,
    pub spec: VmSpec,
}

/// The validated configuration the agent runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub node_name: String,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub initial_members: Vec<InitialMember>,
    pub join: Vec<String>,
    pub log_level: String,
    pub metrics_listen: Option<SocketAddr>,
    pub join_token_file: Option<PathBuf>,
    pub runtime: RuntimeKind,
    pub state_dir: PathBuf,
    /// How long the systemd runtime waits for a guest's start job. The NixOS module
    /// sets it 10 s above microvm.nix's `startupTimeout` (the unit's own
    /// `TimeoutSec`), so that systemd's verdict is what is reported.
    pub start_timeout: Duration,
    /// `None`: detect from the host at start.
    pub capacity: Option<Capacity>,
    pub labels: Labels,
    pub auth: Auth,
    pub timing: Timing,
    pub strategy: Strategy,
    pub raft: RaftTiming,
    /// How many voters the leader keeps, and when it replaces a silent one.
    pub voters: crate::node::autopilot::Voters,
    pub vms: Vec<DeclaredVm>,
}

impl FileConfig {
    /// Parses the file's text; `origin` names it in errors.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            // toml's message names the key and the position; keep it on one line.
            let message = e.message().replace('\n', " ");
            let key = e
                .span()
                .and_then(|span| text.get(span))
                .map(|s| s.lines().next().unwrap_or("").trim().to_string())
                .unwrap_or_else(|| "file".to_string());
            err(key, message)
        })
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err("--config", format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text)
    }
}

fn check_address(key: &str, value: &str) -> Result<String, ConfigError> {
    let bad = || err(key, format!("{value:?} is not HOST:PORT (for example 10.0.0.1:{DEFAULT_PORT})"));
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) || value.len() > limits::ADDRESS_LEN_MAX {
        return Err(bad());
    }
    if !value.chars().all(|c| c.is_ascii_graphic()) {
        return Err(bad());
    }
    Ok(value.to_string())
}

fn check_labels(key: &str, labels: &BTreeMap<String, String>) -> Result<Labels, ConfigError> {
    if labels.len() > limits::LABELS_MAX {
        return Err(err(key, format!("{} labels; the limit is {}", labels.len(), limits::LABELS_MAX)));
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= limits::LABEL_KEY_LEN_MAX
            && k.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.' | b'/'));
        if !key_ok {
            return Err(err(format!("{key}.{k}"), "label keys are 1 to 63 characters of a-z, 0-9, '-', '_', '.', '/'"));
        }
        if v.len() > limits::LABEL_VALUE_LEN_MAX || !v.chars().all(|c| c.is_ascii_graphic()) {
            return Err(err(
                format!("{key}.{k}"),
                "label values are at most 255 printable ASCII characters without spaces",
            ));
        }
    }
    Ok(labels.clone())
}

fn overcommit_pct(key: &str, ratio: Option<f64>) -> Result<u32, ConfigError> {
    let Some(ratio) = ratio else { return Ok(100) };
    let min = f64::from(limits::OVERCOMMIT_PCT_MIN) / 100.0;
    let max = f64::from(limits::OVERCOMMIT_PCT_MAX) / 100.0;
    if !ratio.is_finite() || ratio < min || ratio > max {
        return Err(err(key, format!("{ratio} is not a ratio between {min} and {max}")));
    }
    Ok((ratio * 100.0).round() as u32)
}

fn positive(key: &str, value: i64, max: u64) -> Result<u64, ConfigError> {
    if value <= 0 {
        return Err(err(key, format!("must be positive, not {value}")));
    }
    let value = value as u64;
    if value > max {
        return Err(err(key, format!("{value} is more than the limit of {max}")));
    }
    Ok(value)
}

/// Parses `name=host:port`.
pub fn parse_member(key: &str, value: &str) -> Result<InitialMember, ConfigError> {
    let (name, address) = value
        .split_once('=')
        .ok_or_else(|| err(key, format!("{value:?} is not NAME=HOST:PORT (for example h1=10.0.0.1:7000)")))?;
    names::validate(name).map_err(|e| err(key, e.to_string()))?;
    Ok(InitialMember { name: name.to_string(), address: check_address(key, address)? })
}

fn parse_label_flag(value: &str) -> Result<(String, String), ConfigError> {
    value
        .split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| err("--label", format!("{value:?} is not KEY=VALUE")))
}

impl Config {
    /// Merges `overrides` over `file` and validates the result.
    pub fn resolve(file: FileConfig, overrides: Overrides) -> Result<Config, ConfigError> {
        let node_name = match overrides.node_name.or(file.node_name) {
            Some(name) => name,
            None => nix::unistd::gethostname()
                .map_err(|e| err("node_name", format!("not set and the host name cannot be read: {e}")))?
                .to_string_lossy()
                .into_owned(),
        };
        names::validate(&node_name).map_err(|e| err("node_name", e.to_string()))?;

        let listen_text = overrides.listen.or(file.listen).unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            err("listen", format!("{listen_text:?} is not IP:PORT (for example 10.0.0.1:{DEFAULT_PORT})"))
        })?;
        if listen.port() == 0 {
            return Err(err("listen", "the port must not be 0: peers need a fixed port"));
        }
        if listen.ip().is_unspecified() {
            return Err(err(
                "listen",
                format!("{listen} is not an address peers can reach; give this host's own address"),
            ));
        }

        let data_dir = overrides.data_dir.or(file.data_dir).unwrap_or_else(|| DEFAULT_DATA_DIR.into());
        if !data_dir.is_absolute() {
            return Err(err("data_dir", format!("{} is not an absolute path", data_dir.display())));
        }

        let initial_members = overrides
            .initial_members
            .unwrap_or(file.initial_members)
            .iter()
            .map(|m| parse_member("initial_members", m))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, a) in initial_members.iter().enumerate() {
            for b in &initial_members[..i] {
                if a.name == b.name {
                    return Err(err("initial_members", format!("{} is listed twice", a.name)));
                }
                if a.address == b.address {
                    return Err(err(
                        "initial_members",
                        format!("{} and {} share the address {}", b.name, a.name, a.address),
                    ));
                }
            }
        }
        let join = overrides
            .join
            .unwrap_or(file.join)
            .iter()
            .map(|seed| check_address("join", seed.trim_start_matches("http://").trim_start_matches("https://")))
            .collect::<Result<Vec<_>, _>>()?;
        if !initial_members.is_empty() {
            let me = initial_members.iter().find(|m| m.name == node_name).ok_or_else(|| {
                err(
                    "initial_members",
                    format!(
                        "does not list this host ({node_name}); a host not in the initial set joins with `join` instead"
                    ),
                )
            })?;
            if me.address != listen.to_string() {
                return Err(err(
                    "initial_members",
                    format!(
                        "lists {node_name} at {} but `listen` is {listen}; peers must reach this host where it listens",
                        me.address
                    ),
                ));
            }
            if !join.is_empty() {
                return Err(err(
                    "join",
                    "a host in initial_members forms the cluster itself; give either initial_members or join",
                ));
            }
        }

        let log_level = overrides.log_level.or(file.log_level).unwrap_or_else(|| "info".to_string());
        tracing_subscriber::EnvFilter::try_new(&log_level).map_err(|e| err("log_level", e.to_string()))?;

        let metrics_listen = overrides
            .metrics_listen
            .or(file.metrics_listen)
            .map(|text| {
                text.parse::<SocketAddr>()
                    .map_err(|_| err("metrics_listen", format!("{text:?} is not IP:PORT (for example 127.0.0.1:9464)")))
            })
            .transpose()?;
        if metrics_listen.is_some_and(|m| m == listen) {
            return Err(err("metrics_listen", "must differ from `listen`"));
        }

        let runtime = match overrides.runtime.or(file.runtime.kind).as_deref() {
            None | Some("systemd") => RuntimeKind::Systemd,
            Some("process") => RuntimeKind::Process,
            Some(other) => return Err(err("runtime.kind", format!("{other:?} is not \"systemd\" or \"process\""))),
        };
        let state_dir = overrides.state_dir.or(file.runtime.state_dir).unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        if !state_dir.is_absolute() {
            return Err(err("runtime.state_dir", format!("{} is not an absolute path", state_dir.display())));
        }
        let start_timeout = match file.runtime.start_timeout_ms {
            None => crate::runtime::systemd::START_TIMEOUT_DEFAULT,
            Some(ms) if (START_TIMEOUT_MIN_MS..=START_TIMEOUT_MAX_MS).contains(&ms) => Duration::from_millis(ms),
            Some(ms) => {
                return Err(err(
                    "runtime.start_timeout_ms",
                    format!("{ms} is outside {START_TIMEOUT_MIN_MS}..={START_TIMEOUT_MAX_MS}"),
                ));
            }
        };

        let section = file.capacity.unwrap_or_default();
        let vcpu = overrides.vcpu.or(section.vcpu);
        let memory = overrides.memory_mib.or(section.memory_mib);
        let capacity = match (vcpu, memory) {
            (None, None) if section.vcpu_overcommit.is_none() && section.memory_overcommit.is_none() => None,
            _ => Some(Capacity {
                vcpu: match vcpu {
                    Some(v) => positive("capacity.vcpu", v, u64::from(limits::HOST_VCPU_MAX))? as u32,
                    None => detect_vcpu(),
                },
                memory_mib: match memory {
                    Some(m) => positive("capacity.memory_mib", m, limits::HOST_MEMORY_MIB_MAX)?,
                    None => detect_memory_mib(),
                },
                vcpu_overcommit_pct: overcommit_pct("capacity.vcpu_overcommit", section.vcpu_overcommit)?,
                memory_overcommit_pct: overcommit_pct("capacity.memory_overcommit", section.memory_overcommit)?,
            }),
        };

        let mut labels = file.labels;
        if let Some(flags) = overrides.labels {
            labels = flags.iter().map(|l| parse_label_flag(l)).collect::<Result<_, _>>()?;
        }
        let labels = check_labels("labels", &labels)?;

        let tls_section = file.tls.unwrap_or_default();
        let tls = match (
            overrides.tls_ca.or(tls_section.ca_file),
            overrides.tls_cert.or(tls_section.cert_file),
            overrides.tls_key.or(tls_section.key_file),
        ) {
            (None, None, None) => None,
            (Some(ca_file), Some(cert_file), Some(key_file)) => Some(Tls { ca_file, cert_file, key_file }),
            _ => return Err(err("tls", "give all of ca_file, cert_file and key_file, or none")),
        };
        let secret = overrides.cluster_secret_file.or(file.cluster_secret_file);
        let accepted = overrides.cluster_secret_accepted_file.or(file.cluster_secret_accepted_file);
        let insecure = overrides.insecure || file.insecure.unwrap_or(false);
        let auth = match (secret, tls, insecure) {
            (Some(_), Some(_), _) => {
                return Err(err("cluster_secret_file", "give either cluster_secret_file or [tls], not both"));
            }
            (Some(_), _, true) | (_, Some(_), true) => {
                return Err(err("insecure", "cannot be combined with cluster_secret_file or [tls]"));
            }
            (Some(file), None, false) => Auth::Secret { file, accepted: accepted.clone() },
            (None, Some(tls), false) => Auth::Tls(tls),
            (None, None, true) if !listen.ip().is_loopback() => {
                return Err(err(
                    "insecure",
                    format!(
                        "is accepted only on a loopback `listen`, and {listen} is not one: anyone on the network \
                         could join and command the cluster; give `cluster_secret_file` (one secret every member \
                         shares) or a `[tls]` section (an operator CA)"
                    ),
                ));
            }
            (None, None, true) => Auth::Insecure,
            (None, None, false) => Auth::None,
        };
        if accepted.is_some() && !matches!(auth, Auth::Secret { .. }) {
            return Err(err(
                "cluster_secret_accepted_file",
                "is another secret accepted during a rotation, and needs this host's own in cluster_secret_file",
            ));
        }

        let strategy = match overrides.strategy.or(file.scheduler.strategy).as_deref() {
            None | Some("spread") => Strategy::Spread,
            Some("binpack") => Strategy::Binpack,
            Some(other) => {
                return Err(err("scheduler.strategy", format!("{other:?} is not \"spread\" or \"binpack\"")));
            }
        };

        let raft_defaults = RaftTiming::default();
        let raft = RaftTiming {
            tick_ms: file.raft.tick_ms.unwrap_or(raft_defaults.tick_ms),
            election_ticks: file.raft.election_ticks.map_or(raft_defaults.election_ticks, |t| t as usize),
            heartbeat_ticks: file.raft.heartbeat_ticks.map_or(raft_defaults.heartbeat_ticks, |t| t as usize),
            log_compact_entries_max: file.raft.log_compact_entries_max.unwrap_or(raft_defaults.log_compact_entries_max),
        };
        if !(10..=10_000).contains(&raft.tick_ms) {
            return Err(err("raft.tick_ms", format!("{} is outside 10..=10000", raft.tick_ms)));
        }
        if raft.heartbeat_ticks == 0 || raft.election_ticks <= raft.heartbeat_ticks {
            return Err(err("raft.election_ticks", "must be more than raft.heartbeat_ticks, which must be at least 1"));
        }
        if raft.log_compact_entries_max < 10 {
            return Err(err("raft.log_compact_entries_max", "must be at least 10"));
        }
        let voters = voters_of(&file.raft)?;
        let defaults = Timing::default();
        let timing = Timing {
            node_down_after_ms: file.timing.node_down_after_ms.unwrap_or(defaults.node_down_after_ms),
            reschedule_after_ms: file.timing.reschedule_after_ms.unwrap_or(defaults.reschedule_after_ms),
            fence_after_ms: file.timing.fence_after_ms.unwrap_or(defaults.fence_after_ms),
            stop_max_ms: file.timing.stop_max_ms.unwrap_or(defaults.stop_max_ms),
            check_interval_ms: defaults.check_interval_ms,
            // raft-rs draws the election timeout from [election, 2 * election) ticks.
            election_timeout_max_ms: 2 * raft.election_ticks as u64 * raft.tick_ms,
            heartbeat_interval_ms: raft.heartbeat_ticks as u64 * raft.tick_ms,
        };
        timing.validate().map_err(|message| err("timing", message))?;

        let mut vms = Vec::new();
        for (i, vm) in file.vm.iter().enumerate() {
            let key = format!("vm[{i}]");
            names::validate(&vm.name).map_err(|e| err(format!("{key}.name"), e.to_string()))?;
            if vms.iter().any(|d: &DeclaredVm| d.name == vm.name) {
                return Err(err(format!("{key}.name"), format!("{} is declared twice", vm.name)));
            }
            let vcpu = positive(&format!("{key}.vcpu"), vm.vcpu, u64::from(limits::VM_VCPU_MAX))? as u32;
            let memory_mib = positive(&format!("{key}.memory_mib"), vm.memory_mib, limits::VM_MEMORY_MIB_MAX)?;
            if memory_mib < limits::VM_MEMORY_MIB_MIN {
                return Err(err(
                    format!("{key}.memory_mib"),
                    format!("must be at least {} MiB", limits::VM_MEMORY_MIB_MIN),
                ));
            }
            if let Some(node) = &vm.node {
                names::validate(node).map_err(|e| err(format!("{key}.node"), e.to_string()))?;
            }
            if let Some(group) = &vm.anti_affinity {
                names::validate(group).map_err(|e| err(format!("{key}.anti_affinity"), e.to_string()))?;
            }
            let desired = match vm.desired.as_deref() {
                None | Some("running") => Desired::Running,
                Some("stopped") => Desired::Stopped,
                Some(other) => {
                    return Err(err(format!("{key}.desired"), format!("{other:?} is not \"running\" or \"stopped\"")));
                }
            };
            let failover = match vm.failover.as_deref() {
                None => crate::state::Failover::Auto,
                Some(text) => crate::state::Failover::parse(text)
                    .ok_or_else(|| err(format!("{key}.failover"), format!("{text:?} is not \"auto\" or \"manual\"")))?,
            };
            vms.push(DeclaredVm {
                name: vm.name.clone(),
                spec: VmSpec {
                    vcpu,
                    memory_mib,
                    labels: check_labels(&format!("{key}.labels"), &vm.labels)?,
                    node: vm.node.clone(),
                    anti_affinity: vm.anti_affinity.clone(),
                    desired,
                    failover,
                },
            });
        }

        Ok(Config {
            node_name,
            listen,
            data_dir,
            initial_members,
            join,
            log_level,
            metrics_listen,
            join_token_file: overrides.join_token_file.or(file.join_token_file),
            runtime,
            state_dir,
            start_timeout,
            capacity,
            labels,
            auth,
            timing,
            strategy,
            raft,
            voters,
            vms,
        })
    }

    /// The capacity to report: configured, or detected from the host.
    pub fn capacity_or_detected(&self) -> Capacity {
        self.capacity.unwrap_or(Capacity {
            vcpu: detect_vcpu(),
            memory_mib: detect_memory_mib(),
            vcpu_overcommit_pct: 100,
            memory_overcommit_pct: 100,
        })
    }
}

/// `raft.voters` and `raft.replace_voter_after_ms`, checked.
fn voters_of(raft: &RaftSection) -> Result<crate::node::autopilot::Voters, ConfigError> {
    use crate::node::autopilot::{REPLACE_AFTER_MS_MIN, VOTERS_ACCEPTED, Voters};
    let defaults = Voters::default();
    let target = match raft.voters {
        None => defaults.target,
        Some(n) if VOTERS_ACCEPTED.iter().any(|&v| v as u64 == n) => n as usize,
        Some(n) => return Err(err("raft.voters", format!("{n} is not 3, 5 or 7"))),
    };
    let replace_after_ms = raft.replace_voter_after_ms.unwrap_or(defaults.replace_after_ms);
    if !(REPLACE_AFTER_MS_MIN..=crate::failure::TIMING_MS_MAX).contains(&replace_after_ms) {
        return Err(err(
            "raft.replace_voter_after_ms",
            format!("{replace_after_ms} is outside {REPLACE_AFTER_MS_MIN}..={}", crate::failure::TIMING_MS_MAX),
        ));
    }
    Ok(Voters { target, replace_after_ms })
}

/// One config key as the reference (docs/config.md) lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyDoc {
    /// `section.key` (`vm[].key` for the `[[vm]]` tables).
    pub key: &'static str,
    /// The `run` flag that overrides it, if any.
    pub flag: &'static str,
    pub default: String,
    /// What values are accepted.
    pub range: String,
    pub meaning: &'static str,
}

/// Every key of the config file with its default and range, from the
/// constants the checks above use: docs/config.md is generated from this
/// (a test keeps them equal, and another that it names every key the
/// parser accepts).
pub fn reference() -> Vec<KeyDoc> {
    let timing = Timing::default();
    let raft = RaftTiming::default();
    let voters = crate::node::autopilot::Voters::default();
    let ms = |v: u64| format!("{v}");
    let k = |key, flag, default: String, range: String, meaning| KeyDoc { key, flag, default, range, meaning };
    let name_rule = "a name: `^[a-z0-9][a-z0-9-]{0,62}$`".to_string();
    let timing_range = format!("1..={} ms", crate::failure::TIMING_MS_MAX);
    let overcommit = format!(
        "{:.1}..={:.1}",
        f64::from(limits::OVERCOMMIT_PCT_MIN) / 100.0,
        f64::from(limits::OVERCOMMIT_PCT_MAX) / 100.0
    );
    let labels = format!(
        "at most {} labels; keys 1..={} of `a-z 0-9 - _ . /`, values at most {} printable ASCII characters",
        limits::LABELS_MAX,
        limits::LABEL_KEY_LEN_MAX,
        limits::LABEL_VALUE_LEN_MAX
    );
    vec![
        k("node_name", "--node-name", "the host name".into(), name_rule.clone(), "This host's name in the cluster."),
        k(
            "listen",
            "--listen",
            DEFAULT_LISTEN.into(),
            "IP:PORT, not 0.0.0.0, port not 0".into(),
            "The gRPC port (peers and clients), at an address the other members reach. With TLS, peers also send \
             heartbeats and quorum contact as QUIC datagrams to the same port number over UDP (open both; without UDP \
             they go over TCP alone).",
        ),
        k("data_dir", "--data-dir", DEFAULT_DATA_DIR.into(), "an absolute path".into(), "Where the store lives."),
        k(
            "initial_members",
            "--initial-member",
            "[]".into(),
            "`NAME=HOST:PORT` each, names and addresses unique, this host among them at `listen`".into(),
            "The members that form a new cluster together (same list on each).",
        ),
        k(
            "join",
            "--join",
            "[]".into(),
            "HOST:PORT each; not with initial_members".into(),
            "Members to ask for admission, for a host not in initial_members.",
        ),
        k(
            "log_level",
            "--log-level",
            "info".into(),
            "a tracing filter (`info`, `blixard=debug,raft=info`)".into(),
            "What is logged; RUST_LOG overrides it.",
        ),
        k(
            "metrics_listen",
            "--metrics-listen",
            "none".into(),
            "IP:PORT, not `listen`".into(),
            "The HTTP port: /metrics, /healthz, /readyz and the dashboard.",
        ),
        k(
            "join_token_file",
            "--join-token-file",
            "none".into(),
            "a readable file".into(),
            "A one-time join token (`cluster join-token`), presented with `join`; without other credentials, it pins the cluster's CA and obtains this host's certificate.",
        ),
        k(
            "cluster_secret_file",
            "--cluster-secret-file",
            "none".into(),
            "a file from `cluster new-secret`, readable by the agent only; not with [tls] or insecure".into(),
            "The secret every member shares: each derives the cluster CA from it and issues its own certificate (docs/security.md).",
        ),
        k(
            "cluster_secret_accepted_file",
            "--cluster-secret-accepted-file",
            "none".into(),
            "a file from `cluster new-secret`; needs cluster_secret_file".into(),
            "Another secret whose certificates are accepted too, during a rotation.",
        ),
        k(
            "insecure",
            "--insecure",
            "false".into(),
            "`true` only with a loopback `listen`; not with cluster_secret_file or [tls]".into(),
            "Plain text, nobody authenticated: for local tests and demos.",
        ),
        k("labels", "--label", "{}".into(), labels.clone(), "This host's labels, which VMs' labels must match."),
        k(
            "runtime.kind",
            "--runtime",
            "systemd".into(),
            "`systemd` or `process`".into(),
            "How guests run: microvm@NAME.service over D-Bus, or child processes (tests).",
        ),
        k(
            "runtime.state_dir",
            "--state-dir",
            DEFAULT_STATE_DIR.into(),
            "an absolute path".into(),
            "Where microvm.nix lays out guests (NAME/current/bin/microvm-run).",
        ),
        k(
            "runtime.start_timeout_ms",
            "",
            ms(crate::runtime::systemd::START_TIMEOUT_DEFAULT.as_millis() as u64),
            format!("{START_TIMEOUT_MIN_MS}..={START_TIMEOUT_MAX_MS} ms"),
            "How long the systemd runtime waits for a guest's start job (the NixOS module sets it from microvm.nix's startupTimeout).",
        ),
        k(
            "capacity.vcpu",
            "--vcpu",
            "detected (CPUs)".into(),
            format!("1..={}", limits::HOST_VCPU_MAX),
            "vcpus offered to guests. Without a [capacity] section the whole host is detected.",
        ),
        k(
            "capacity.memory_mib",
            "--memory-mib",
            "detected (RAM less 10%, at most 2 GiB less)".into(),
            format!("1..={}", limits::HOST_MEMORY_MIB_MAX),
            "MiB offered to guests.",
        ),
        k("capacity.vcpu_overcommit", "", "1.0".into(), overcommit.clone(), "Guest vcpus placed per host vcpu."),
        k("capacity.memory_overcommit", "", "1.0".into(), overcommit, "Guest MiB placed per host MiB."),
        k(
            "tls.ca_file",
            "--tls-ca",
            "none".into(),
            "a PEM file".into(),
            "An operator CA (with [tls]: certificates from `blixard-agent certs`, not from a cluster secret).",
        ),
        k(
            "tls.cert_file",
            "--tls-cert",
            "none".into(),
            "a PEM file: a member certificate for node_name".into(),
            "This agent's certificate.",
        ),
        k("tls.key_file", "--tls-key", "none".into(), "a PEM file".into(), "This agent's private key."),
        k(
            "timing.node_down_after_ms",
            "",
            ms(timing.node_down_after_ms),
            format!("{timing_range}; at most reschedule_after_ms"),
            "The leader marks a silent member down (no new placements there).",
        ),
        k(
            "timing.reschedule_after_ms",
            "",
            ms(timing.reschedule_after_ms),
            format!("{timing_range}; at least (fence_after_ms + check interval + stop_max_ms) * 1.0202"),
            "The leader moves a silent host's VMs (it has fenced itself by then).",
        ),
        k(
            "timing.fence_after_ms",
            "",
            ms(timing.fence_after_ms),
            format!(
                "{timing_range}; at least the longest election (2 * raft.election_ticks * raft.tick_ms) + 5 heartbeats"
            ),
            "A host without quorum contact this long stops its guests.",
        ),
        k(
            "timing.stop_max_ms",
            "",
            ms(timing.stop_max_ms),
            timing_range.clone(),
            "The longest a fence takes to end every guest: it kills them at once (SIGKILL), with no graceful stop.",
        ),
        k(
            "scheduler.strategy",
            "--strategy",
            Strategy::default().to_string(),
            "`spread` or `binpack`".into(),
            "spread: least loaded host first; binpack: most loaded host that fits.",
        ),
        k("raft.tick_ms", "", ms(raft.tick_ms), "10..=10000".into(), "The Raft tick."),
        k(
            "raft.election_ticks",
            "",
            raft.election_ticks.to_string(),
            "more than raft.heartbeat_ticks".into(),
            "Ticks without a leader before a follower campaigns (randomised up to twice that).",
        ),
        k(
            "raft.heartbeat_ticks",
            "",
            raft.heartbeat_ticks.to_string(),
            "at least 1".into(),
            "Ticks between heartbeats.",
        ),
        k(
            "raft.log_compact_entries_max",
            "",
            raft.log_compact_entries_max.to_string(),
            "at least 10".into(),
            "Applied entries kept in the log before it is compacted into a snapshot.",
        ),
        k(
            "raft.voters",
            "",
            voters.target.to_string(),
            "3, 5 or 7".into(),
            "How many members vote in Raft; the leader promotes and demotes the others (learners, which run VMs all the same) to keep this many, spread over `zone` and `rack` labels.",
        ),
        k(
            "raft.replace_voter_after_ms",
            "",
            ms(voters.replace_after_ms),
            format!("{}..={} ms", crate::node::autopilot::REPLACE_AFTER_MS_MIN, crate::failure::TIMING_MS_MAX),
            "A voter silent this long is replaced by a caught-up learner (then demoted; it stays a member).",
        ),
        k("vm[].name", "", "required".into(), name_rule.clone(), "A guest declared by this host, kept in the cluster."),
        k("vm[].vcpu", "", "required".into(), format!("1..={}", limits::VM_VCPU_MAX), "Its vcpus."),
        k(
            "vm[].memory_mib",
            "",
            "required".into(),
            format!("{}..={}", limits::VM_MEMORY_MIB_MIN, limits::VM_MEMORY_MIB_MAX),
            "Its memory in MiB.",
        ),
        k("vm[].labels", "", "{}".into(), labels, "Host labels it must be placed on."),
        k("vm[].node", "", "none".into(), name_rule.clone(), "Pin it to this host."),
        k("vm[].anti_affinity", "", "none".into(), name_rule, "Never on a host with another VM of this group."),
        k(
            "vm[].failover",
            "",
            "auto".into(),
            "`auto` or `manual`".into(),
            "When its host is lost: auto, fenced there and restarted elsewhere; manual, moved only by `vm recover`.",
        ),
        k(
            "vm[].desired",
            "",
            "running".into(),
            "`running` or `stopped`".into(),
            "Its desired state when first created (later `vm start|stop` are kept).",
        ),
    ]
}

/// The reference as the Markdown table docs/config.md holds.
pub fn reference_markdown() -> String {
    let cell = |t: &str| if t.is_empty() { "-".to_string() } else { t.replace('|', "\\|") };
    let mut out = String::from("| key | `run` flag | default | accepted | meaning |\n|---|---|---|---|---|\n");
    for k in reference() {
        let flag = if k.flag.is_empty() { "-".to_string() } else { format!("`{}`", k.flag) };
        out.push_str(&format!(
            "| `{}` | {flag} | {} | {} | {} |\n",
            k.key,
            cell(&k.default),
            cell(&k.range),
            cell(k.meaning)
        ));
    }
    out
}

fn detect_vcpu() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

/// Host memory minus a reserve for the host itself (10%, at most 2 GiB).
fn detect_memory_mib() -> u64 {
    let total_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    let total_mib = total_kib / 1024;
    total_mib - (total_mib / 10).min(2048)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(text: &str) -> Result<Config, ConfigError> {
        Config::resolve(FileConfig::parse(text)?, Overrides::default())
    }

    const BASE: &str = r#"
node_name = "h1"
listen = "10.0.0.1:7000"
data_dir = "/var/lib/blixard"
initial_members = ["h1=10.0.0.1:7000", "h2=10.0.0.2:7000", "h3=10.0.0.3:7000"]
"#;

    #[test]
    fn the_design_example_parses() {
        let text = format!(
            "{BASE}join = []\n[runtime]\nkind = \"systemd\"\nstate_dir = \"/var/lib/microvms\"\n[capacity]\nvcpu = 16\nmemory_mib = 65536\n[[vm]]\nname = \"web\"\nvcpu = 2\nmemory_mib = 1024\n"
        );
        let config = resolve(&text).unwrap();
        assert_eq!(config.node_name, "h1");
        assert_eq!(config.initial_members.len(), 3);
        assert_eq!(config.capacity.unwrap().vcpu, 16);
        assert_eq!(config.vms[0].spec.memory_mib, 1024);
        assert_eq!(config.runtime, RuntimeKind::Systemd);
        assert_eq!(config.start_timeout, crate::runtime::systemd::START_TIMEOUT_DEFAULT);
    }

    #[test]
    fn start_timeout_follows_the_module() {
        // What the NixOS module writes for microvm.nix's startupTimeout = 300.
        let config = resolve(&format!("{BASE}[runtime]\nstart_timeout_ms = 310000\n")).unwrap();
        assert_eq!(config.start_timeout, Duration::from_secs(310));
    }

    #[test]
    fn module_output_with_floats_and_tables_parses() {
        let text = format!(
            "{BASE}log_level = \"debug\"\nmetrics_listen = \"127.0.0.1:9464\"\n[capacity]\nvcpu_overcommit = 1.5\n[labels]\nrack = \"r1\"\n[tls]\nca_file = \"/a\"\ncert_file = \"/b\"\nkey_file = \"/c\"\n[[vm]]\nname = \"db\"\nvcpu = 1\nmemory_mib = 512\nlabels = {{ tier = \"db\" }}\nnode = \"h2\"\nanti_affinity = \"g\"\ndesired = \"stopped\"\n"
        );
        let config = resolve(&text).unwrap();
        assert_eq!(config.capacity.unwrap().vcpu_overcommit_pct, 150);
        assert_eq!(config.labels["rack"], "r1");
        assert!(matches!(config.auth, Auth::Tls(_)));
        assert_eq!(config.vms[0].spec.desired, Desired::Stopped);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (format!("{BASE}bogus = 1\n"), "bogus"),
            ("node_name = \"H1\"\n".to_string(), "node_name"),
            ("node_name = \"h1\"\nlisten = \"nope\"\n".to_string(), "listen"),
            ("node_name = \"h1\"\nlisten = \"0.0.0.0:7000\"\n".to_string(), "listen"),
            (format!("{BASE}[capacity]\nvcpu = -2\n"), "capacity.vcpu"),
            (format!("{BASE}[capacity]\nvcpu = 0\n"), "capacity.vcpu"),
            (format!("{BASE}[capacity]\nmemory_mib = 999999999999\n"), "capacity.memory_mib"),
            (format!("{BASE}[[vm]]\nname = \"../x\"\nvcpu = 1\nmemory_mib = 64\n"), "vm[0].name"),
            (format!("{BASE}[[vm]]\nname = \"a\"\nvcpu = 0\nmemory_mib = 64\n"), "vm[0].vcpu"),
            (format!("{BASE}[tls]\nca_file = \"/a\"\n"), "tls"),
            (format!("{BASE}insecure = true\n"), "insecure"),
            (format!("{BASE}cluster_secret_file = \"/s\"\n[tls]\nca_file = \"/a\"\ncert_file = \"/b\"\nkey_file = \"/c\"\n"), "cluster_secret_file"),
            (format!("{BASE}cluster_secret_accepted_file = \"/p\"\n"), "cluster_secret_accepted_file"),
            (format!("{BASE}cluster_secret_file = \"/s\"\ninsecure = true\n"), "insecure"),
            (format!("{BASE}join = [\"10.0.0.9:7000\"]\n"), "join"),
            (format!("{BASE}[timing]\nreschedule_after_ms = 1600\n"), "timing"),
            (format!("{BASE}[raft]\ntick_ms = 500\n"), "timing"),
            (format!("{BASE}[runtime]\nkind = \"docker\"\n"), "runtime.kind"),
            (format!("{BASE}[raft]\nvoters = 4\n"), "raft.voters"),
            (format!("{BASE}[raft]\nvoters = 1\n"), "raft.voters"),
            (format!("{BASE}[raft]\nreplace_voter_after_ms = 10\n"), "raft.replace_voter_after_ms"),
            (format!("{BASE}[runtime]\nstart_timeout_ms = 0\n"), "runtime.start_timeout_ms"),
            ("node_name = \"h9\"\nlisten = \"10.0.0.9:7000\"\ninitial_members = [\"h1=10.0.0.1:7000\"]\n".to_string(), "initial_members"),
            ("node_name = \"h1\"\nlisten = \"10.0.0.2:7000\"\ninitial_members = [\"h1=10.0.0.1:7000\"]\n".to_string(), "initial_members"),
            ("node_name = \"h1\"\nlisten = \"10.0.0.1:7000\"\ninitial_members = [\"h1=10.0.0.1:7000\", \"h1=10.0.0.2:7000\"]\n".to_string(), "initial_members"),
        ];
        for (text, key) in cases {
            let e = resolve(&text).expect_err(&text);
            assert!(e.key.starts_with(key), "{text}: expected key {key}, got {e}");
            assert!(!e.to_string().contains('\n'), "one line: {e}");
        }
    }

    /// The keys the parser accepts in a table, read from serde's refusal of
    /// an unknown one ("expected one of `a`, `b`, ...").
    fn accepted_keys(prefix: &str, before: &str) -> Vec<String> {
        let e = FileConfig::parse(&format!("{before}no_such_key_anywhere = 1\n")).unwrap_err();
        // "expected `a`", "expected `a` or `b`", "expected one of `a`, ..."
        let listed = e.message.split("expected").nth(1).unwrap_or_else(|| panic!("{e}"));
        listed
            .split('`')
            .skip(1)
            .step_by(2)
            .map(|k| if prefix.is_empty() { k.to_string() } else { format!("{prefix}{k}") })
            .collect()
    }

    #[test]
    fn the_reference_names_every_key_the_parser_accepts() {
        let documented: Vec<&str> = reference().iter().map(|k| k.key).collect();
        let mut accepted = accepted_keys("", "");
        // Tables: their keys instead of their names.
        accepted.retain(|k| !["runtime", "capacity", "tls", "timing", "scheduler", "raft", "vm"].contains(&k.as_str()));
        for (section, before) in [
            ("runtime.", "[runtime]\n"),
            ("capacity.", "[capacity]\n"),
            ("tls.", "[tls]\n"),
            ("timing.", "[timing]\n"),
            ("scheduler.", "[scheduler]\n"),
            ("raft.", "[raft]\n"),
            ("vm[].", "[[vm]]\nname = \"a\"\nvcpu = 1\nmemory_mib = 64\n"),
        ] {
            accepted.extend(accepted_keys(section, before));
        }
        accepted.sort();
        let mut sorted = documented.clone();
        sorted.sort();
        assert_eq!(sorted, accepted, "docs: config::reference() and the parser disagree");
    }

    #[test]
    fn docs_config_md_is_generated_from_the_reference() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/config.md");
        let text = std::fs::read_to_string(&path).unwrap();
        let (begin, end) = (
            "<!-- BEGIN config reference: generated by config::reference_markdown -->\n",
            "<!-- END config reference -->",
        );
        let generated = reference_markdown();
        let start = text.find(begin).map(|i| i + begin.len());
        let stop = text.find(end);
        let current = match (start, stop) {
            (Some(a), Some(b)) if a <= b => &text[a..b],
            _ => "",
        };
        if current != generated {
            if let (Some(a), Some(b), Some(_)) = (start, stop, std::env::var_os("BLIXARD_UPDATE_DOCS")) {
                std::fs::write(&path, format!("{}{generated}{}", &text[..a], &text[b..])).unwrap();
                return;
            }
            panic!(
                "docs/config.md's reference table differs from config::reference(); rerun with \
                 BLIXARD_UPDATE_DOCS=1 to regenerate it. Expected:\n{generated}"
            );
        }
    }

    #[test]
    fn authentication_modes() {
        let config =
            resolve(&format!("{BASE}cluster_secret_file = \"/s\"\ncluster_secret_accepted_file = \"/p\"\n")).unwrap();
        assert_eq!(config.auth, Auth::Secret { file: "/s".into(), accepted: Some("/p".into()) });
        assert_eq!(resolve(BASE).unwrap().auth, Auth::None);
        let local = "node_name = \"h1\"\nlisten = \"127.0.0.1:7000\"\ninsecure = true\n";
        assert_eq!(resolve(local).unwrap().auth, Auth::Insecure);
        let v6 = "node_name = \"h1\"\nlisten = \"[::1]:7000\"\n";
        let overrides = Overrides { insecure: true, ..Overrides::default() };
        assert_eq!(Config::resolve(FileConfig::parse(v6).unwrap(), overrides).unwrap().auth, Auth::Insecure);
        let e = resolve(&format!("{BASE}insecure = true\n")).unwrap_err();
        assert!(e.message.contains("10.0.0.1:7000 is not one"), "{e}");
    }

    #[test]
    fn flags_override_the_file() {
        let overrides = Overrides {
            listen: Some("10.0.0.1:7000".into()),
            vcpu: Some(4),
            labels: Some(vec!["zone=a".into()]),
            runtime: Some("process".into()),
            ..Overrides::default()
        };
        let config = Config::resolve(FileConfig::parse(BASE).unwrap(), overrides).unwrap();
        assert_eq!(config.capacity.unwrap().vcpu, 4);
        assert_eq!(config.labels["zone"], "a");
        assert_eq!(config.runtime, RuntimeKind::Process);
    }
}
