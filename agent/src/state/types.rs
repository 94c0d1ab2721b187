//! Domain types of the replicated state. Wire and disk encodings live in
//! `state::codec`; nothing here knows protobuf.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// A member's Raft id. Never 0 (raft-rs reserves it).
pub type NodeId = u64;

/// Host and VM labels: `key -> value`.
pub type Labels = BTreeMap<String, String>;

/// Bounds on what a command may carry, so a hostile or buggy client cannot
/// make the state (and every snapshot) arbitrarily large.
pub mod limits {
    /// A VM may ask for 1..=VM_VCPU_MAX vcpus.
    pub const VM_VCPU_MAX: u32 = 1024;
    /// A VM may ask for VM_MEMORY_MIB_MIN..=VM_MEMORY_MIB_MAX MiB.
    pub const VM_MEMORY_MIB_MIN: u64 = 16;
    pub const VM_MEMORY_MIB_MAX: u64 = 16 * 1024 * 1024;
    /// A host may offer at most this many vcpus and MiB.
    pub const HOST_VCPU_MAX: u32 = 65_536;
    pub const HOST_MEMORY_MIB_MAX: u64 = 64 * 1024 * 1024;
    /// Overcommit ratios, in percent.
    pub const OVERCOMMIT_PCT_MIN: u32 = 100;
    pub const OVERCOMMIT_PCT_MAX: u32 = 1000;
    pub const LABELS_MAX: usize = 32;
    pub const LABEL_KEY_LEN_MAX: usize = 63;
    pub const LABEL_VALUE_LEN_MAX: usize = 255;
    pub const RUNNERS_MAX: usize = 100_000;
    pub const ADDRESS_LEN_MAX: usize = 255;
    pub const ERROR_LEN_MAX: usize = 1024;
    /// Join tokens outstanding at once (unexpired, used or not).
    pub const JOIN_TOKENS_MAX: usize = 64;
    /// The longest a join token may live: 7 days, in milliseconds.
    pub const JOIN_TOKEN_TTL_MS_MAX: u64 = 7 * 24 * 3600 * 1000;
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    pub vcpu: u64,
    pub memory_mib: u64,
}

impl Resources {
    /// Adds `r` to this usage, or takes it away (`add` false).
    pub fn tally(&mut self, r: Resources, add: bool) {
        if add {
            self.vcpu += r.vcpu;
            self.memory_mib += r.memory_mib;
        } else {
            self.vcpu -= r.vcpu;
            self.memory_mib -= r.memory_mib;
        }
    }
}

/// Counts `key` once more in `counts`, or once less (`add` false; a count
/// that reaches zero is removed).
pub fn tally_count<K: Ord>(counts: &mut std::collections::BTreeMap<K, u32>, key: K, add: bool) {
    if add {
        *counts.entry(key).or_default() += 1;
    } else if let Some(count) = counts.get_mut(&key) {
        *count -= 1;
        if *count == 0 {
            counts.remove(&key);
        }
    }
}

/// What a member offers to guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub vcpu: u32,
    pub memory_mib: u64,
    /// 100 = no overcommit, 150 = 1.5 guest vcpus per host vcpu.
    pub vcpu_overcommit_pct: u32,
    pub memory_overcommit_pct: u32,
}

impl Default for Capacity {
    /// A member offers nothing until it reports its capacity.
    fn default() -> Self {
        Capacity { vcpu: 0, memory_mib: 0, vcpu_overcommit_pct: 100, memory_overcommit_pct: 100 }
    }
}

impl Capacity {
    /// The most that may be placed on the member, overcommit included.
    pub fn limit(&self) -> Resources {
        Resources {
            vcpu: u64::from(self.vcpu) * u64::from(self.vcpu_overcommit_pct) / 100,
            memory_mib: self.memory_mib * u64::from(self.memory_overcommit_pct) / 100,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MemberStatus {
    #[default]
    Up,
    Down,
}

impl fmt::Display for MemberStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MemberStatus::Up => "up",
            MemberStatus::Down => "down",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: NodeId,
    pub name: String,
    /// `host:port` of the member's gRPC port.
    pub address: String,
    pub capacity: Capacity,
    pub labels: Labels,
    pub drain: bool,
    /// Guests whose runner the member reports installed under its state dir.
    pub runners: BTreeSet<String>,
    pub status: MemberStatus,
    pub learner: bool,
    /// The state-machine protocol its agent reported ([`PROTOCOL`]); 0:
    /// not reported (an agent from before the report).
    pub protocol: u32,
}

/// The state-machine protocol of this agent: which entries it applies,
/// reported by every member about itself (with `SetAddress`) so that the leader
/// uses an entry older members cannot apply only once every member can.
///
/// - 0: an agent that predates the report.
/// - 1 ([`PROTOCOL_DEMOTE`]): `MembershipChange::Demote` (a conf change
///   `AddLearnerNode` on a voter, `MemberInfo.demote`). An agent of 0 reads
///   such an entry as a join without a name, refuses it, and so never
///   applies the change to its Raft configuration: its voters would differ
///   from everyone else's from then on.
pub const PROTOCOL: u32 = 1;
/// The first protocol that applies `MembershipChange::Demote`.
pub const PROTOCOL_DEMOTE: u32 = 1;

impl Member {
    pub fn new(id: NodeId, name: impl Into<String>, address: impl Into<String>) -> Self {
        Member {
            id,
            name: name.into(),
            address: address.into(),
            capacity: Capacity::default(),
            labels: Labels::new(),
            drain: false,
            runners: BTreeSet::new(),
            status: MemberStatus::Up,
            learner: false,
            protocol: 0,
        }
    }

    /// Whether new placements may land here.
    pub fn accepts_placements(&self) -> bool {
        self.status == MemberStatus::Up && !self.drain
    }

    /// `down`, `draining` or `up`: the status operators see (`node list`,
    /// the dashboard, the `host_status` metric).
    pub fn status_word(&self) -> &'static str {
        if self.status == MemberStatus::Down {
            "down"
        } else if self.drain {
            "draining"
        } else {
            "up"
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Desired {
    #[default]
    Running,
    Stopped,
}

impl fmt::Display for Desired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Desired::Running => "running",
            Desired::Stopped => "stopped",
        })
    }
}

/// What happens to a VM when its host is lost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Failover {
    /// Its host fences it without quorum contact and the leader restarts it
    /// elsewhere once that host has certainly fenced itself.
    #[default]
    Auto,
    /// Never fenced for want of quorum contact, never moved off a lost host
    /// by the cluster: an operator moves it (`vm recover`) once its host is
    /// known to be dead. For guests with local disks, and clusters where a
    /// network blip must not stop every VM.
    Manual,
}

impl Failover {
    pub fn as_str(self) -> &'static str {
        match self {
            Failover::Auto => "auto",
            Failover::Manual => "manual",
        }
    }

    /// `"auto"` or `"manual"`.
    pub fn parse(text: &str) -> Option<Failover> {
        match text {
            "auto" => Some(Failover::Auto),
            "manual" => Some(Failover::Manual),
            _ => None,
        }
    }
}

impl fmt::Display for Failover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmSpec {
    pub vcpu: u32,
    pub memory_mib: u64,
    /// Placement constraint: every label must be present on the host with
    /// the same value.
    pub labels: Labels,
    /// Pinned host, by name.
    pub node: Option<String>,
    /// VMs sharing a group are never placed on the same host.
    pub anti_affinity: Option<String>,
    pub desired: Desired,
    pub failover: Failover,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum VmState {
    #[default]
    Pending,
    Starting,
    Running,
    Stopping,
    Stopped,
    Failed,
    /// Placed on a host that is down: nobody knows whether it runs. Never
    /// reported by a host nor stored; shown in place of the last report
    /// (`State::vm_state`) until the VM moves or its host is back.
    Lost,
}

impl VmState {
    pub const ALL: [VmState; 7] = [
        VmState::Pending,
        VmState::Starting,
        VmState::Running,
        VmState::Stopping,
        VmState::Stopped,
        VmState::Failed,
        VmState::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Pending => "pending",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Failed => "failed",
            VmState::Lost => "lost",
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a VM is placed. `generation` changes on every placement change, so a
/// host's report about an older placement is recognised and ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub node: NodeId,
    pub generation: u64,
}

/// What the host running a VM last reported about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub state: VmState,
    pub since_unix_ms: u64,
    pub last_error: Option<String>,
}

/// A copy of a VM that may still run on a host the VM was moved off.
///
/// When a VM leaves a host (a move, an unplacement), the old host may still
/// be running it. Until that host confirms it stopped its copy
/// (`CommandKind::Released`), or the leader vouches that it has fenced itself
/// (`CommandKind::ClearHandoff`), the VM may not start anywhere else, so no
/// VM ever runs on two hosts. While the handoff is pending, the copy's size
/// stays reserved on `from`, so a host is never physically over-committed by
/// a guest that is still stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handoff {
    /// The host whose copy is unconfirmed. It may no longer be a member (a
    /// removed host may still run its copy until it fences itself).
    pub from: NodeId,
    /// The placement generation under which `from` held the VM.
    pub generation: u64,
    /// The copy's size as it was placed on `from`, still counted there.
    pub reserved: Resources,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vm {
    pub name: String,
    pub spec: VmSpec,
    pub placement: Option<Placement>,
    pub observed: Observed,
    /// Bumped on every placement change and kept when unplaced, so a
    /// generation is never reused for a VM.
    pub generation: u64,
    /// The earliest copy not yet confirmed stopped; see [`Handoff`]. At most
    /// one host may run the VM: `handoff.from` while a handoff is pending,
    /// else the placed host.
    pub handoff: Option<Handoff>,
    /// The host this placement moved the VM from, when the current placement
    /// is a move (a `Place` of a VM placed elsewhere). The scheduler uses it
    /// to move VMs off a draining host one at a time.
    pub moved_from: Option<NodeId>,
    /// Hosts where the guest kept failing until the host gave up on it (a
    /// `failed` report). The scheduler moves the VM to a host not in this
    /// set; `vm start` (desired running again) or a spec update clears it.
    pub failed_on: BTreeSet<NodeId>,
}

impl Vm {
    /// Whether the host `node` may start this VM now: it is placed there,
    /// desired running, and no other host may still run a copy.
    pub fn may_start_on(&self, node: NodeId) -> bool {
        self.placement.is_some_and(|p| p.node == node)
            && self.spec.desired == Desired::Running
            && self.handoff.is_none()
    }

    /// Unplaced and desired running: for the scheduler to place.
    pub fn is_waiting(&self) -> bool {
        self.placement.is_none() && self.spec.desired == Desired::Running
    }

    /// Placed and observed failed: for the scheduler to look at moving.
    pub fn is_failed(&self) -> bool {
        self.placement.is_some() && self.observed.state == VmState::Failed
    }

    /// Moved here from another host and not yet past `starting` there: a
    /// drain waits for it before it moves the next VM off that host.
    pub fn is_settling(&self) -> bool {
        self.moved_from.is_some()
            && self.placement.is_some()
            && self.spec.desired == Desired::Running
            && matches!(self.observed.state, VmState::Pending | VmState::Starting)
    }

    /// The resources this VM takes on a host it is placed on.
    pub fn size(&self) -> Resources {
        Resources { vcpu: u64::from(self.spec.vcpu), memory_mib: self.spec.memory_mib }
    }
}

/// A one-time join token as the cluster keeps it: only the SHA-256 of the
/// secret (which only the operator who issued it ever sees), when it
/// expires, and the host it admitted. A token admits one host: that host
/// may present it again (a retried join) until it expires; any other is
/// refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinToken {
    pub hash: [u8; 32],
    pub expires_unix_ms: u64,
    pub used_by: Option<NodeId>,
}
