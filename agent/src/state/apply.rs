//! Commands and how they are applied.

use std::collections::{BTreeMap, BTreeSet};

use super::State;
use super::types::{limits, *};
use crate::names::{self, NameError};

/// A state-machine command as carried in one Raft log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The proposer's wall clock when it proposed; used as the `since` of
    /// state changes so that every replica records the same time.
    pub at_unix_ms: u64,
    pub kind: CommandKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandKind {
    CreateVm {
        name: String,
        spec: VmSpec,
    },
    UpdateVm {
        name: String,
        spec: VmSpec,
    },
    DeleteVm {
        name: String,
    },
    SetDesired {
        name: String,
        desired: Desired,
    },
    /// Place (or move) `vm` on `node`; refused unless the VM's generation is
    /// still `expected_generation`, so decisions made on stale state lose.
    /// Moving a placed VM starts a handoff from its old host (see
    /// `state`'s module documentation).
    Place {
        vm: String,
        node: NodeId,
        expected_generation: u64,
    },
    /// Takes `vm` off its host; starts a handoff from that host.
    Unplace {
        vm: String,
        expected_generation: u64,
    },
    SetCapacity {
        node: NodeId,
        capacity: Capacity,
    },
    SetLabels {
        node: NodeId,
        labels: Labels,
    },
    SetRunners {
        node: NodeId,
        runners: Vec<String>,
    },
    SetDrain {
        node: NodeId,
        drain: bool,
    },
    SetStatus {
        node: NodeId,
        status: MemberStatus,
    },
    /// A member's own address, and the state-machine protocol its agent
    /// applies ([`crate::state::PROTOCOL`]; 0 from an agent before it). The
    /// protocol rides an existing command so that an older leader accepts
    /// the report: it would refuse a new kind of command from a member.
    SetAddress {
        node: NodeId,
        address: String,
        protocol: u32,
    },
    /// A host's report of what it observes of a VM placed on it.
    Report {
        node: NodeId,
        vm: String,
        generation: u64,
        state: VmState,
        last_error: Option<String>,
    },
    /// `node`'s reconciler stopped its copy of `vm` held under placement
    /// `generation`: ends the matching pending handoff.
    Released {
        node: NodeId,
        vm: String,
        generation: u64,
    },
    /// The leader vouches that `from` has fenced itself (it has been down
    /// for longer than `reschedule_after`): ends the handoff without its
    /// `Released`. Refused while `from` is an up member.
    ClearHandoff {
        vm: String,
        from: NodeId,
        expected_generation: u64,
    },
    /// An operator moves `vm` to `node` because the host that may run it
    /// (its handoff's, else its placement's) is down or gone and known to
    /// be dead: a placement on `node` with no handoff, so `node` starts it
    /// at once. Refused while that host is an up member. For VMs with
    /// `failover = "manual"`, which the cluster never moves off a lost
    /// host by itself (`vm recover`).
    Recover {
        vm: String,
        node: NodeId,
        expected_generation: u64,
    },
    /// Records a new join token by the SHA-256 `hash` of its secret,
    /// valid for `ttl_ms` from the command's time.
    AddJoinToken {
        hash: [u8; 32],
        ttl_ms: u64,
    },
    /// Host `node` presents the token with `hash` to join: accepted if the
    /// token is unexpired and unused or already used by `node` (a retried
    /// join), and then marked used by `node`. Proposed by the leader before
    /// it adds the host as a learner.
    UseJoinToken {
        hash: [u8; 32],
        node: NodeId,
    },
    /// `node` became the leader of `term`: proposed once by that leader at
    /// the start of its term. It changes nothing; applied, it gives every
    /// member the same event with the same time. Refused for a node that
    /// is not a member.
    LeaderElected {
        node: NodeId,
        term: u64,
    },
}

/// Short, human forms for logs: what the command does, without dumping
/// every field (a runner list can hold thousands of names).
impl std::fmt::Display for CommandKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn spec(s: &VmSpec) -> String {
            let mut text = format!("{} vcpu, {} MiB", s.vcpu, s.memory_mib);
            if let Some(node) = &s.node {
                text.push_str(&format!(", pinned to {node}"));
            }
            if !s.labels.is_empty() {
                text.push_str(&format!(", {} labels", s.labels.len()));
            }
            if let Some(group) = &s.anti_affinity {
                text.push_str(&format!(", anti-affinity {group}"));
            }
            text.push_str(&format!(", desired {}, failover {}", s.desired, s.failover));
            text
        }
        match self {
            CommandKind::CreateVm { name, spec: s } => write!(f, "create VM {name} ({})", spec(s)),
            CommandKind::UpdateVm { name, spec: s } => write!(f, "update VM {name} to {}", spec(s)),
            CommandKind::DeleteVm { name } => write!(f, "delete VM {name}"),
            CommandKind::SetDesired { name, desired } => write!(f, "set VM {name} desired {desired}"),
            CommandKind::Place { vm, node, .. } => write!(f, "place VM {vm} on member {node}"),
            CommandKind::Unplace { vm, .. } => write!(f, "unplace VM {vm}"),
            CommandKind::SetCapacity { node, capacity: c } => write!(
                f,
                "set member {node}'s capacity to {} vcpu, {} MiB (overcommit {}%, {}%)",
                c.vcpu, c.memory_mib, c.vcpu_overcommit_pct, c.memory_overcommit_pct
            ),
            CommandKind::SetLabels { node, labels } => {
                let shown: Vec<String> = labels.iter().take(8).map(|(k, v)| format!("{k}={v}")).collect();
                let more = if labels.len() > 8 { format!(" and {} more", labels.len() - 8) } else { String::new() };
                write!(f, "set member {node}'s labels to [{}]{more}", shown.join(", "))
            }
            CommandKind::SetRunners { node, runners } => {
                let shown: Vec<&str> = runners.iter().take(8).map(String::as_str).collect();
                let more = if runners.len() > 8 { format!(" and {} more", runners.len() - 8) } else { String::new() };
                write!(f, "set member {node}'s runners to [{}]{more}", shown.join(", "))
            }
            CommandKind::SetDrain { node, drain } => {
                write!(f, "{} member {node}", if *drain { "drain" } else { "undrain" })
            }
            CommandKind::SetStatus { node, status } => write!(f, "mark member {node} {status}"),
            CommandKind::SetAddress { node, address, protocol } => {
                write!(f, "set member {node}'s address to {address} (protocol {protocol})")
            }
            CommandKind::Report { node, vm, state, .. } => write!(f, "member {node} reports VM {vm} {state}"),
            CommandKind::Released { node, vm, .. } => write!(f, "member {node} released VM {vm}"),
            CommandKind::ClearHandoff { vm, from, .. } => write!(f, "end VM {vm}'s handoff from member {from}"),
            CommandKind::Recover { vm, node, .. } => write!(f, "recover VM {vm} onto member {node}"),
            CommandKind::AddJoinToken { ttl_ms, .. } => write!(f, "add a join token for {} s", ttl_ms / 1000),
            CommandKind::UseJoinToken { node, .. } => write!(f, "admit member {node} with a join token"),
            CommandKind::LeaderElected { node, term } => write!(f, "member {node} leads term {term}"),
        }
    }
}

impl std::fmt::Display for MembershipChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MembershipChange::AddLearner { id, name, address } => {
                write!(f, "add {name} (member {id}, {address}) as a learner")
            }
            MembershipChange::Promote { id } => write!(f, "promote member {id} to voter"),
            MembershipChange::Demote { id } => write!(f, "demote member {id} to learner"),
            MembershipChange::Remove { id } => write!(f, "remove member {id}"),
        }
    }
}

/// A membership change, carried in a Raft conf-change entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipChange {
    /// A new member joins as a learner.
    AddLearner {
        id: NodeId,
        name: String,
        address: String,
    },
    /// A caught-up learner becomes a voter.
    Promote {
        id: NodeId,
    },
    /// A voter becomes a learner (the voter autopilot, `node::autopilot`):
    /// it stays a member, keeps its VMs and its fence, and no longer votes.
    /// (raft-rs's `AddLearnerNode` on a voter.)
    Demote {
        id: NodeId,
    },
    Remove {
        id: NodeId,
    },
}

impl MembershipChange {
    pub fn node(&self) -> NodeId {
        match self {
            MembershipChange::AddLearner { id, .. }
            | MembershipChange::Promote { id }
            | MembershipChange::Demote { id }
            | MembershipChange::Remove { id } => *id,
        }
    }
}

/// What an accepted command changed; the node turns these into events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    None,
    VmCreated {
        vm: String,
    },
    VmUpdated {
        vm: String,
    },
    VmDeleted {
        vm: String,
        was_on: Option<NodeId>,
    },
    DesiredSet {
        vm: String,
        desired: Desired,
    },
    Placed {
        vm: String,
        node: NodeId,
        from: Option<NodeId>,
        generation: u64,
    },
    Unplaced {
        vm: String,
        from: Option<NodeId>,
        generation: u64,
    },
    MemberChanged {
        node: NodeId,
    },
    /// The member changed and these VMs lost their placement because the
    /// host no longer satisfies them (runner removed, labels changed).
    MemberChangedUnplaced {
        node: NodeId,
        vms: Vec<String>,
    },
    StatusSet {
        node: NodeId,
        status: MemberStatus,
    },
    DrainSet {
        node: NodeId,
        drain: bool,
    },
    Reported {
        vm: String,
        state: VmState,
        /// The observed state before this report.
        previous: VmState,
    },
    MemberAdded {
        node: NodeId,
    },
    MemberPromoted {
        node: NodeId,
    },
    MemberDemoted {
        node: NodeId,
    },
    MemberRemoved {
        node: NodeId,
        unplaced: Vec<String>,
    },
    JoinTokenAdded {
        expires_unix_ms: u64,
    },
    JoinTokenUsed {
        node: NodeId,
    },
    LeaderElected {
        node: NodeId,
        term: u64,
    },
    /// A handoff ended: `from` confirmed its copy stopped, or (`fenced`)
    /// the leader vouched that it fenced itself.
    HandoffEnded {
        vm: String,
        from: NodeId,
        fenced: bool,
    },
}

/// Why a command was refused. Each message is one sentence that tells an
/// operator what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("invalid {what} name: {source}")]
    InvalidName { what: &'static str, source: NameError },
    #[error("invalid value: {0}")]
    InvalidValue(String),
    #[error("no VM named {0:?}")]
    UnknownVm(String),
    #[error("a VM named {0:?} already exists")]
    DuplicateVm(String),
    #[error("no member with id {0}")]
    UnknownNode(NodeId),
    #[error("no member named {0:?}")]
    UnknownNodeName(String),
    #[error(
        "a member named {name:?} already exists (id {id}); to replace that host, remove it first with `blixard-agent cluster leave {name}`"
    )]
    DuplicateMemberName { name: String, id: NodeId },
    #[error("member {0} is already in the cluster")]
    DuplicateMember(NodeId),
    #[error("member {0} is not a learner")]
    NotLearner(NodeId),
    #[error("member {0} is the last voter and cannot be removed")]
    LastVoter(NodeId),
    #[error("member {0} is not a voter")]
    NotVoter(NodeId),
    #[error("VM {vm:?} does not fit on {node}: it needs {needed} {resource}, {available} of {limit} are free")]
    OverCapacity { vm: String, node: String, resource: &'static str, needed: u64, available: u64, limit: u64 },
    #[error("member {node} would have {used} {resource} placed but offers only {limit}; drain it first")]
    CapacityBelowUse { node: String, resource: &'static str, used: u64, limit: u64 },
    #[error("{node} does not have the runner for VM {vm:?} installed")]
    MissingRunner { vm: String, node: String },
    #[error("{node} does not accept new VMs: it is {why}")]
    NodeUnavailable { node: String, why: &'static str },
    #[error("VM {vm:?} is pinned to {pinned}, not {node}")]
    PinnedElsewhere { vm: String, pinned: String, node: String },
    #[error("VM {vm:?} needs label {key}={value} which {node} does not have")]
    LabelMismatch { vm: String, node: String, key: String, value: String },
    #[error("VM {vm:?} cannot share {node} with {other:?}: both are in anti-affinity group {group:?}")]
    AntiAffinity { vm: String, node: String, group: String, other: String },
    #[error("VM {vm:?} changed since the decision (generation {actual}, expected {expected})")]
    StaleGeneration { vm: String, expected: u64, actual: u64 },
    #[error("VM {vm:?} is not placed on member {node} under generation {generation}")]
    NotPlacedThere { vm: String, node: NodeId, generation: u64 },
    #[error("VM {vm:?} has no pending handoff from member {node} under generation {generation}")]
    NoSuchHandoff { vm: String, node: NodeId, generation: u64 },
    #[error("member {node} is up, so only its own release ends the handoff of VM {vm:?}")]
    HandoffFromLiveHost { vm: String, node: String },
    #[error("VM {vm:?} runs on {node}, which is up: move it with `vm migrate`, not `vm recover`")]
    RecoverFromLiveHost { vm: String, node: String },
    /// Deliberately vague: whoever presents a token learns nothing about
    /// which tokens exist.
    #[error("the join token is not valid: it is unknown, expired, or was used by another host")]
    InvalidJoinToken,
    #[error("{0} join tokens are outstanding, the most kept at once; let some expire first")]
    TooManyJoinTokens(usize),
    #[error("malformed command: {0}")]
    Malformed(String),
    /// Not a rule of apply: the API refuses a request that needs what a
    /// member has not reported yet (it joined or started moments ago).
    /// Transient, so the client sees `Unavailable` (exit 1), not a refusal.
    #[error("{node} has not reported its capacity yet (it started moments ago): not yet known, try again shortly")]
    NotReported { node: String },
}

impl State {
    /// Applies one command. On `Err` nothing changed.
    pub fn apply(&mut self, command: &Command) -> Result<Effect, Rejection> {
        let result = self.apply_command(command);
        self.reindex();
        result
    }

    fn apply_command(&mut self, command: &Command) -> Result<Effect, Rejection> {
        let at = command.at_unix_ms;
        match &command.kind {
            CommandKind::CreateVm { name, spec } => {
                check_name("VM", name)?;
                self.check_spec(spec)?;
                if self.vms.contains_key(name) {
                    return Err(Rejection::DuplicateVm(name.clone()));
                }
                let vm = Vm {
                    name: name.clone(),
                    spec: spec.clone(),
                    placement: None,
                    observed: Observed { state: VmState::Pending, since_unix_ms: at, last_error: None },
                    generation: 0,
                    handoff: None,
                    moved_from: None,
                    failed_on: BTreeSet::new(),
                };
                self.dirty.vm(name.clone());
                self.vms.insert(name.clone(), vm);
                Ok(Effect::VmCreated { vm: name.clone() })
            }
            CommandKind::UpdateVm { name, spec } => {
                check_name("VM", name)?;
                self.check_spec(spec)?;
                let vm = self.vm(name).ok_or_else(|| Rejection::UnknownVm(name.clone()))?;
                // The VM keeps its host if the host still satisfies the new
                // spec; otherwise it is unplaced and the scheduler finds it a
                // new one ("constraint change" is a reason to move).
                let keep = vm.placement.is_some_and(|p| {
                    self.members.get(&p.node).is_some_and(|m| constraint_violation(self, vm, spec, m).is_none())
                });
                let vm = self.vms.get_mut(name).expect("checked above");
                self.dirty.vm(name.clone());
                // A new spec may fix what made it fail.
                vm.failed_on.clear();
                if !keep && vm.placement.is_some() {
                    let from = vm.placement.map(|p| p.node);
                    // Unplaced before the spec changes: the handoff reserves
                    // the size of the copy that runs, the old one.
                    unplace(vm, at);
                    vm.spec = spec.clone();
                    return Ok(Effect::Unplaced { vm: name.clone(), from, generation: vm.generation });
                }
                vm.spec = spec.clone();
                Ok(Effect::VmUpdated { vm: name.clone() })
            }
            CommandKind::DeleteVm { name } => {
                check_name("VM", name)?;
                let vm = self.vms.remove(name).ok_or_else(|| Rejection::UnknownVm(name.clone()))?;
                self.dirty.vm(name.clone());
                Ok(Effect::VmDeleted { vm: name.clone(), was_on: vm.placement.map(|p| p.node) })
            }
            CommandKind::SetDesired { name, desired } => {
                check_name("VM", name)?;
                let vm = self.vms.get_mut(name).ok_or_else(|| Rejection::UnknownVm(name.clone()))?;
                vm.spec.desired = *desired;
                if *desired == Desired::Running && !vm.failed_on.is_empty() {
                    // An operator starts a failed VM: every host gets a new chance.
                    vm.failed_on.clear();
                    if vm.observed.state == VmState::Failed {
                        vm.observed = Observed { state: VmState::Pending, since_unix_ms: at, last_error: None };
                    }
                }
                self.dirty.vm(name.clone());
                Ok(Effect::DesiredSet { vm: name.clone(), desired: *desired })
            }
            CommandKind::Place { vm: name, node, expected_generation } => {
                check_name("VM", name)?;
                let vm = self.vm(name).ok_or_else(|| Rejection::UnknownVm(name.clone()))?;
                check_generation(vm, *expected_generation)?;
                let member = self.members.get(node).ok_or(Rejection::UnknownNode(*node))?;
                if member.status == MemberStatus::Down {
                    return Err(Rejection::NodeUnavailable { node: member.name.clone(), why: "down" });
                }
                if member.drain {
                    return Err(Rejection::NodeUnavailable { node: member.name.clone(), why: "draining" });
                }
                if let Some(rejection) = constraint_violation(self, vm, &vm.spec, member) {
                    return Err(rejection);
                }
                let vm = self.vms.get_mut(name).expect("checked above");
                let from = vm.placement.map(|p| p.node);
                vm.handoff = handoff_after_leaving(vm, Some(*node));
                vm.moved_from = from.filter(|from| from != node);
                vm.generation += 1;
                vm.placement = Some(Placement { node: *node, generation: vm.generation });
                vm.observed = Observed { state: VmState::Pending, since_unix_ms: at, last_error: None };
                self.dirty.vm(name.clone());
                Ok(Effect::Placed { vm: name.clone(), node: *node, from, generation: vm.generation })
            }
            CommandKind::Recover { vm: name, node, expected_generation } => {
                check_name("VM", name)?;
                let vm = self.vm(name).ok_or_else(|| Rejection::UnknownVm(name.clone()))?;
                check_generation(vm, *expected_generation)?;
                let holder = vm.handoff.map(|h| h.from).or(vm.placement.map(|p| p.node));
                if let Some(holder) = holder
                    && let Some(m) = self.members.get(&holder)
                    && m.status == MemberStatus::Up
                {
                    return Err(Rejection::RecoverFromLiveHost { vm: name.clone(), node: m.name.clone() });
                }
                let member = self.members.get(node).ok_or(Rejection::UnknownNode(*node))?;
                if member.status == MemberStatus::Down {
                    return Err(Rejection::NodeUnavailable { node: member.name.clone(), why: "down" });
                }
                if let Some(rejection) = constraint_violation(self, vm, &vm.spec, member) {
                    return Err(rejection);
                }
                let vm = self.vms.get_mut(name).expect("checked above");
                let from = holder;
                // The operator vouches the old host is dead: no handoff.
                vm.handoff = None;
                vm.moved_from = from.filter(|from| from != node);
                vm.generation += 1;
                vm.placement = Some(Placement { node: *node, generation: vm.generation });
                vm.observed = Observed { state: VmState::Pending, since_unix_ms: at, last_error: None };
                self.dirty.vm(name.clone());
                Ok(Effect::Placed { vm: name.clone(), node: *node, from, generation: vm.generation })
            }
            CommandKind::Unplace { vm: name, expected_generation } => {
                check_name("VM", name)?;
                let vm = self.vms.get_mut(name).ok_or_else(|| Rejection::UnknownVm(name.clone()))?;
                check_generation(vm, *expected_generation)?;
                let from = vm.placement.map(|p| p.node);
                unplace(vm, at);
                self.dirty.vm(name.clone());
                Ok(Effect::Unplaced { vm: name.clone(), from, generation: vm.generation })
            }
            CommandKind::SetCapacity { node, capacity } => {
                check_capacity(capacity)?;
                let member = self.members.get(node).ok_or(Rejection::UnknownNode(*node))?;
                let used = self.used_on(*node, None);
                let limit = capacity.limit();
                if used.vcpu > limit.vcpu {
                    return Err(Rejection::CapacityBelowUse {
                        node: member.name.clone(),
                        resource: "vcpu",
                        used: used.vcpu,
                        limit: limit.vcpu,
                    });
                }
                if used.memory_mib > limit.memory_mib {
                    return Err(Rejection::CapacityBelowUse {
                        node: member.name.clone(),
                        resource: "MiB of memory",
                        used: used.memory_mib,
                        limit: limit.memory_mib,
                    });
                }
                self.member_mut(*node).capacity = *capacity;
                Ok(Effect::MemberChanged { node: *node })
            }
            CommandKind::SetLabels { node, labels } => {
                check_labels(labels)?;
                self.members.get(node).ok_or(Rejection::UnknownNode(*node))?;
                self.member_mut(*node).labels = labels.clone();
                let vms = self.unplace_violations(*node, at);
                Ok(Effect::MemberChangedUnplaced { node: *node, vms })
            }
            CommandKind::SetRunners { node, runners } => {
                if runners.len() > limits::RUNNERS_MAX {
                    return Err(Rejection::InvalidValue(format!(
                        "{} runners reported; the limit is {}",
                        runners.len(),
                        limits::RUNNERS_MAX
                    )));
                }
                for runner in runners {
                    check_name("runner", runner)?;
                }
                self.members.get(node).ok_or(Rejection::UnknownNode(*node))?;
                let runners: BTreeSet<String> = runners.iter().cloned().collect();
                self.index.count_runners(&runners, true);
                let old = std::mem::replace(&mut self.member_mut(*node).runners, runners);
                self.index.count_runners(&old, false);
                let vms = self.unplace_violations(*node, at);
                Ok(Effect::MemberChangedUnplaced { node: *node, vms })
            }
            CommandKind::SetDrain { node, drain } => {
                self.members.get(node).ok_or(Rejection::UnknownNode(*node))?;
                self.member_mut(*node).drain = *drain;
                Ok(Effect::DrainSet { node: *node, drain: *drain })
            }
            CommandKind::SetStatus { node, status } => {
                self.members.get(node).ok_or(Rejection::UnknownNode(*node))?;
                self.member_mut(*node).status = *status;
                Ok(Effect::StatusSet { node: *node, status: *status })
            }
            CommandKind::SetAddress { node, address, protocol } => {
                check_address(address)?;
                self.members.get(node).ok_or(Rejection::UnknownNode(*node))?;
                let member = self.member_mut(*node);
                member.address = address.clone();
                member.protocol = *protocol;
                Ok(Effect::MemberChanged { node: *node })
            }
            CommandKind::Report { node, vm: name, generation, state, last_error } => {
                check_name("VM", name)?;
                if let Some(error) = last_error
                    && error.len() > limits::ERROR_LEN_MAX
                {
                    return Err(Rejection::InvalidValue(format!(
                        "error text of {} bytes; the limit is {}",
                        error.len(),
                        limits::ERROR_LEN_MAX
                    )));
                }
                if *state == VmState::Lost {
                    return Err(Rejection::InvalidValue("a host cannot report its own VM lost".into()));
                }
                let vm = self.vms.get_mut(name).ok_or_else(|| Rejection::UnknownVm(name.clone()))?;
                if vm.placement != Some(Placement { node: *node, generation: *generation }) {
                    return Err(Rejection::NotPlacedThere { vm: name.clone(), node: *node, generation: *generation });
                }
                let previous = vm.observed.state;
                if previous != *state {
                    vm.observed.since_unix_ms = at;
                }
                vm.observed.state = *state;
                if *state == VmState::Failed {
                    // Bounded by the members: only the placed host reports.
                    vm.failed_on.insert(*node);
                }
                // An error stays visible until a later report replaces it.
                if last_error.is_some() || *state == VmState::Running {
                    vm.observed.last_error = last_error.clone();
                }
                self.dirty.vm(name.clone());
                Ok(Effect::Reported { vm: name.clone(), state: *state, previous })
            }
            CommandKind::Released { node, vm: name, generation } => {
                check_name("VM", name)?;
                let vm = self.vms.get_mut(name).ok_or_else(|| Rejection::UnknownVm(name.clone()))?;
                if !vm.handoff.is_some_and(|h| h.from == *node && h.generation == *generation) {
                    return Err(Rejection::NoSuchHandoff { vm: name.clone(), node: *node, generation: *generation });
                }
                vm.handoff = None;
                self.dirty.vm(name.clone());
                Ok(Effect::HandoffEnded { vm: name.clone(), from: *node, fenced: false })
            }
            CommandKind::ClearHandoff { vm: name, from, expected_generation } => {
                check_name("VM", name)?;
                let vm = self.vms.get(name).ok_or_else(|| Rejection::UnknownVm(name.clone()))?;
                check_generation(vm, *expected_generation)?;
                let Some(handoff) = vm.handoff.filter(|h| h.from == *from) else {
                    return Err(Rejection::NoSuchHandoff {
                        vm: name.clone(),
                        node: *from,
                        generation: *expected_generation,
                    });
                };
                // A removed member is treated like a down one: it can no
                // longer release, and the leader fences it the same way.
                if let Some(member) = self.members.get(&handoff.from)
                    && member.status == MemberStatus::Up
                {
                    return Err(Rejection::HandoffFromLiveHost { vm: name.clone(), node: member.name.clone() });
                }
                let vm = self.vms.get_mut(name).expect("checked above");
                vm.handoff = None;
                self.dirty.vm(name.clone());
                Ok(Effect::HandoffEnded { vm: name.clone(), from: *from, fenced: true })
            }
            CommandKind::AddJoinToken { hash, ttl_ms } => {
                if *ttl_ms == 0 || *ttl_ms > limits::JOIN_TOKEN_TTL_MS_MAX {
                    return Err(Rejection::InvalidValue(format!(
                        "a join token lives between 1 ms and {} days, not {ttl_ms} ms",
                        limits::JOIN_TOKEN_TTL_MS_MAX / 86_400_000
                    )));
                }
                if self.join_tokens.get(hash).is_some_and(|token| token.expires_unix_ms > at) {
                    return Err(Rejection::Malformed("a join token with this hash already exists".into()));
                }
                let live = self.join_tokens.values().filter(|token| token.expires_unix_ms > at).count();
                if live >= limits::JOIN_TOKENS_MAX {
                    return Err(Rejection::TooManyJoinTokens(live));
                }
                self.drop_expired_join_tokens(at);
                let expires_unix_ms = at.saturating_add(*ttl_ms);
                self.join_tokens.insert(*hash, JoinToken { hash: *hash, expires_unix_ms, used_by: None });
                Ok(Effect::JoinTokenAdded { expires_unix_ms })
            }
            CommandKind::UseJoinToken { hash, node } => {
                if *node == 0 {
                    return Err(Rejection::InvalidValue("member id 0 is reserved".into()));
                }
                let valid = self.join_tokens.get(hash).is_some_and(|token| {
                    token.expires_unix_ms > at && token.used_by.is_none_or(|used_by| used_by == *node)
                });
                if !valid {
                    return Err(Rejection::InvalidJoinToken);
                }
                self.drop_expired_join_tokens(at);
                let token = self.join_tokens.get_mut(hash).expect("checked above, and unexpired");
                token.used_by = Some(*node);
                Ok(Effect::JoinTokenUsed { node: *node })
            }
            CommandKind::LeaderElected { node, term } => {
                self.members.get(node).ok_or(Rejection::UnknownNode(*node))?;
                Ok(Effect::LeaderElected { node: *node, term: *term })
            }
        }
    }

    /// Drops the join tokens expired at `at` and marks the tokens changed.
    /// Only an accepted token command calls it, so every replica drops the
    /// same tokens at the same entry.
    fn drop_expired_join_tokens(&mut self, at: u64) {
        self.join_tokens.retain(|_, token| token.expires_unix_ms > at);
        self.dirty.join_tokens = true;
    }

    /// Applies a membership change. The caller applies the matching Raft
    /// conf change only when this returns `Ok`, so the state's members and
    /// Raft's configuration never disagree.
    pub fn apply_membership(&mut self, change: &MembershipChange, at_unix_ms: u64) -> Result<Effect, Rejection> {
        let result = self.apply_membership_change(change, at_unix_ms);
        self.reindex();
        result
    }

    fn apply_membership_change(&mut self, change: &MembershipChange, at_unix_ms: u64) -> Result<Effect, Rejection> {
        match change {
            MembershipChange::AddLearner { id, name, address } => {
                if *id == 0 {
                    return Err(Rejection::InvalidValue("member id 0 is reserved".into()));
                }
                check_name("node", name)?;
                check_address(address)?;
                if let Some(rejection) = self.admission_conflict(*id, name, address) {
                    return Err(rejection);
                }
                if self.members.contains_key(id) {
                    // A retried join whose first attempt already landed.
                    return Ok(Effect::MemberChanged { node: *id });
                }
                let mut member = Member::new(*id, name.clone(), address.clone());
                member.learner = true;
                self.member_changed(*id);
                self.members.insert(*id, member);
                Ok(Effect::MemberAdded { node: *id })
            }
            MembershipChange::Promote { id } => {
                let member = self.members.get(id).ok_or(Rejection::UnknownNode(*id))?;
                if !member.learner {
                    return Err(Rejection::NotLearner(*id));
                }
                self.member_mut(*id).learner = false;
                Ok(Effect::MemberPromoted { node: *id })
            }
            MembershipChange::Demote { id } => {
                let member = self.members.get(id).ok_or(Rejection::UnknownNode(*id))?;
                if member.learner {
                    return Err(Rejection::NotVoter(*id));
                }
                let voters = self.members.values().filter(|m| !m.learner).count();
                if voters <= 1 {
                    return Err(Rejection::LastVoter(*id));
                }
                self.member_mut(*id).learner = true;
                Ok(Effect::MemberDemoted { node: *id })
            }
            MembershipChange::Remove { id } => {
                let member = self.members.get(id).ok_or(Rejection::UnknownNode(*id))?;
                let voters = self.members.values().filter(|m| !m.learner).count();
                if !member.learner && voters <= 1 {
                    return Err(Rejection::LastVoter(*id));
                }
                // Its VMs are unplaced with a handoff from it, and handoffs
                // already from it stay: a removed host that is still alive
                // runs its copies until it notices, or fences itself for
                // want of quorum contact. The leader ends these handoffs
                // with `ClearHandoff` once that is certain (`failure`).
                let names: Vec<String> = self.vms_on(*id).map(|vm| vm.name.clone()).collect();
                for name in &names {
                    let vm = self.vms.get_mut(name).expect("listed above");
                    unplace(vm, at_unix_ms);
                    self.dirty.vm(name.clone());
                }
                if let Some(member) = self.members.remove(id) {
                    self.index.count_runners(&member.runners, false);
                }
                self.member_changed(*id);
                Ok(Effect::MemberRemoved { node: *id, unplaced: names })
            }
        }
    }

    /// Why host `id` named `name` at `address` cannot be admitted, if it
    /// cannot: a member is never admitted again, so neither a join token
    /// nor a certificate can rewrite its address or take its name. Only a
    /// retried join whose first attempt landed passes: the same learner,
    /// name and address (and is then a no-op).
    pub fn admission_conflict(&self, id: NodeId, name: &str, address: &str) -> Option<Rejection> {
        if let Some(existing) = self.members.get(&id) {
            let retry = existing.learner && existing.name == name && existing.address == address;
            return (!retry).then_some(Rejection::DuplicateMember(id));
        }
        self.member_by_name(name).map(|other| Rejection::DuplicateMemberName { name: name.to_string(), id: other.id })
    }

    fn member_mut(&mut self, id: NodeId) -> &mut Member {
        self.member_changed(id);
        self.members.get_mut(&id).expect("caller checked the member exists")
    }

    /// Unplaces the VMs on `node` that the node no longer satisfies.
    fn unplace_violations(&mut self, node: NodeId, at: u64) -> Vec<String> {
        let Some(member) = self.members.get(&node) else { return Vec::new() };
        let broken: Vec<String> = self
            .vms_on(node)
            .filter(|vm| constraint_violation(self, vm, &vm.spec, member).is_some())
            .map(|vm| vm.name.clone())
            .collect();
        for name in &broken {
            let vm = self.vms.get_mut(name).expect("listed above");
            unplace(vm, at);
            self.dirty.vm(name.clone());
        }
        broken
    }

    fn check_spec(&self, spec: &VmSpec) -> Result<(), Rejection> {
        if spec.vcpu == 0 || spec.vcpu > limits::VM_VCPU_MAX {
            return Err(Rejection::InvalidValue(format!(
                "vcpu must be between 1 and {}, not {}",
                limits::VM_VCPU_MAX,
                spec.vcpu
            )));
        }
        if !(limits::VM_MEMORY_MIB_MIN..=limits::VM_MEMORY_MIB_MAX).contains(&spec.memory_mib) {
            return Err(Rejection::InvalidValue(format!(
                "memory must be between {} and {} MiB, not {}",
                limits::VM_MEMORY_MIB_MIN,
                limits::VM_MEMORY_MIB_MAX,
                spec.memory_mib
            )));
        }
        check_labels(&spec.labels)?;
        if let Some(node) = &spec.node {
            check_name("node", node)?;
        }
        if let Some(group) = &spec.anti_affinity {
            check_name("anti-affinity group", group)?;
        }
        Ok(())
    }
}

impl State {
    /// This state as the first state of a new cluster whose members are
    /// `members` (restoring a backup): a member whose name was a member
    /// here keeps what it reported (capacity, labels, runners, drain) under
    /// its new id and address, and its VMs keep their placement; the VMs
    /// of every other host are unplaced, with a handoff from that host's
    /// old id (which the new cluster's leader ends once that host must
    /// have fenced itself, as for a removed member). Join tokens are not
    /// carried over. `at_unix_ms` is the time of the unplacements: every
    /// member restoring the same backup must pass the same one, so that
    /// they all start from the same state.
    pub fn for_new_cluster(&self, members: &[Member], at_unix_ms: u64) -> State {
        let new_id: BTreeMap<NodeId, NodeId> = self
            .members
            .values()
            .filter_map(|old| members.iter().find(|m| m.name == old.name).map(|m| (old.id, m.id)))
            .collect();
        let new_members: Vec<Member> = members
            .iter()
            .map(|m| {
                let mut member = Member::new(m.id, m.name.clone(), m.address.clone());
                if let Some(old) = self.member_by_name(&m.name) {
                    member.capacity = old.capacity;
                    member.labels = old.labels.clone();
                    member.runners = old.runners.clone();
                    member.drain = old.drain;
                }
                member
            })
            .collect();
        let vms: Vec<Vm> = self
            .vms
            .values()
            .map(|vm| {
                let mut vm = vm.clone();
                if vm.placement.is_some_and(|p| !new_id.contains_key(&p.node)) {
                    unplace(&mut vm, at_unix_ms);
                }
                if let Some(p) = &mut vm.placement {
                    p.node = new_id[&p.node];
                }
                if let Some(h) = &mut vm.handoff
                    && let Some(id) = new_id.get(&h.from)
                {
                    h.from = *id;
                }
                vm.moved_from = vm.moved_from.and_then(|from| new_id.get(&from).copied());
                vm.failed_on = vm.failed_on.iter().filter_map(|old| new_id.get(old).copied()).collect();
                vm
            })
            .collect();
        State::load(new_members, vms, Vec::new())
    }
}

/// Takes `vm` off its host, starting a handoff from it (the host may still
/// run its copy).
fn unplace(vm: &mut Vm, at: u64) {
    vm.handoff = handoff_after_leaving(vm, None);
    vm.moved_from = None;
    if vm.placement.take().is_some() {
        vm.generation += 1;
    }
    vm.observed = Observed { state: VmState::Pending, since_unix_ms: at, last_error: None };
}

/// The handoff `vm` has once it leaves its current placement for `to`
/// (`None`: unplaced). A pending handoff keeps its `from`: the hosts placed
/// since were never allowed to start the VM, so the earliest unconfirmed copy
/// is the only one that may run. Otherwise the current host becomes `from`.
/// Arriving at `from` itself ends the handoff: that host's copy is the one
/// that should run.
fn handoff_after_leaving(vm: &Vm, to: Option<NodeId>) -> Option<Handoff> {
    let pending = vm
        .handoff
        .or_else(|| vm.placement.map(|p| Handoff { from: p.node, generation: p.generation, reserved: vm.size() }));
    pending.filter(|h| Some(h.from) != to)
}

fn check_generation(vm: &Vm, expected: u64) -> Result<(), Rejection> {
    if vm.generation == expected {
        Ok(())
    } else {
        Err(Rejection::StaleGeneration { vm: vm.name.clone(), expected, actual: vm.generation })
    }
}

fn check_name(what: &'static str, name: &str) -> Result<(), Rejection> {
    names::validate(name).map_err(|source| Rejection::InvalidName { what, source })
}

fn check_address(address: &str) -> Result<(), Rejection> {
    let valid = address.len() <= limits::ADDRESS_LEN_MAX
        && address
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0))
        && address.chars().all(|c| c.is_ascii_graphic());
    if valid { Ok(()) } else { Err(Rejection::InvalidValue(format!("address {address:?} is not HOST:PORT"))) }
}

fn check_capacity(capacity: &Capacity) -> Result<(), Rejection> {
    if capacity.vcpu > limits::HOST_VCPU_MAX {
        return Err(Rejection::InvalidValue(format!(
            "host vcpu must be at most {}, not {}",
            limits::HOST_VCPU_MAX,
            capacity.vcpu
        )));
    }
    if capacity.memory_mib > limits::HOST_MEMORY_MIB_MAX {
        return Err(Rejection::InvalidValue(format!(
            "host memory must be at most {} MiB, not {}",
            limits::HOST_MEMORY_MIB_MAX,
            capacity.memory_mib
        )));
    }
    let range = limits::OVERCOMMIT_PCT_MIN..=limits::OVERCOMMIT_PCT_MAX;
    for (what, pct) in [("vcpu", capacity.vcpu_overcommit_pct), ("memory", capacity.memory_overcommit_pct)] {
        if !range.contains(&pct) {
            return Err(Rejection::InvalidValue(format!(
                "{what} overcommit must be between {}% and {}%, not {pct}%",
                limits::OVERCOMMIT_PCT_MIN,
                limits::OVERCOMMIT_PCT_MAX
            )));
        }
    }
    Ok(())
}

fn check_labels(labels: &Labels) -> Result<(), Rejection> {
    if labels.len() > limits::LABELS_MAX {
        return Err(Rejection::InvalidValue(format!(
            "{} labels given; the limit is {}",
            labels.len(),
            limits::LABELS_MAX
        )));
    }
    for (key, value) in labels {
        let key_ok = !key.is_empty()
            && key.len() <= limits::LABEL_KEY_LEN_MAX
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.' | b'/'));
        if !key_ok {
            return Err(Rejection::InvalidValue(format!(
                "label key {:?} must be 1 to {} characters of a-z, 0-9, '-', '_', '.', '/'",
                names::truncate_for_display(key),
                limits::LABEL_KEY_LEN_MAX
            )));
        }
        if value.len() > limits::LABEL_VALUE_LEN_MAX || !value.chars().all(|c| c.is_ascii_graphic()) {
            return Err(Rejection::InvalidValue(format!(
                "label value for {key:?} must be at most {} printable ASCII characters without spaces",
                limits::LABEL_VALUE_LEN_MAX
            )));
        }
    }
    Ok(())
}

/// The first hard constraint that `member` breaks for `vm` with `spec`, if
/// any: runner, pin, labels, anti-affinity, capacity. Drain and down status
/// are not constraints here: they stop new placements but do not by
/// themselves move what already runs.
pub(crate) fn constraint_violation(state: &State, vm: &Vm, spec: &VmSpec, member: &Member) -> Option<Rejection> {
    if !member.runners.contains(&vm.name) {
        return Some(Rejection::MissingRunner { vm: vm.name.clone(), node: member.name.clone() });
    }
    fit_violation(state, &vm.name, spec, member)
}

/// [`constraint_violation`] without the runner check: whether a VM named
/// `vm` with `spec` fits on `member` as the state stands.
pub(crate) fn fit_violation(state: &State, vm: &str, spec: &VmSpec, member: &Member) -> Option<Rejection> {
    if let Some(pinned) = &spec.node
        && *pinned != member.name
    {
        return Some(Rejection::PinnedElsewhere {
            vm: vm.to_string(),
            pinned: pinned.clone(),
            node: member.name.clone(),
        });
    }
    for (key, value) in &spec.labels {
        if member.labels.get(key) != Some(value) {
            return Some(Rejection::LabelMismatch {
                vm: vm.to_string(),
                node: member.name.clone(),
                key: key.clone(),
                value: value.clone(),
            });
        }
    }
    if let Some(group) = &spec.anti_affinity
        && let Some(other) =
            state.vms_on(member.id).find(|other| other.name != vm && other.spec.anti_affinity.as_ref() == Some(group))
    {
        return Some(Rejection::AntiAffinity {
            vm: vm.to_string(),
            node: member.name.clone(),
            group: group.clone(),
            other: other.name.clone(),
        });
    }
    let used = state.used_on(member.id, Some(vm));
    let limit = member.capacity.limit();
    let checks = [
        ("vcpu", u64::from(spec.vcpu), used.vcpu, limit.vcpu),
        ("MiB of memory", spec.memory_mib, used.memory_mib, limit.memory_mib),
    ];
    for (resource, needed, used, limit) in checks {
        if used + needed > limit {
            return Some(Rejection::OverCapacity {
                vm: vm.to_string(),
                node: member.name.clone(),
                resource,
                needed,
                available: limit.saturating_sub(used),
                limit,
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn cmd(kind: CommandKind) -> Command {
        Command { at_unix_ms: 1000, kind }
    }

    fn spec(vcpu: u32, memory_mib: u64) -> VmSpec {
        VmSpec { vcpu, memory_mib, ..VmSpec::default() }
    }

    /// Two members with 4 vcpu / 4096 MiB each and runners for a, b, c.
    fn cluster() -> State {
        let mut state = State::default();
        for (id, name) in [(1, "h1"), (2, "h2")] {
            state
                .apply_membership(
                    &MembershipChange::AddLearner { id, name: name.into(), address: format!("127.0.0.{id}:7000") },
                    0,
                )
                .unwrap();
            state.apply_membership(&MembershipChange::Promote { id }, 0).unwrap();
            let capacity = Capacity { vcpu: 4, memory_mib: 4096, ..Capacity::default() };
            state.apply(&cmd(CommandKind::SetCapacity { node: id, capacity })).unwrap();
            let runners = vec!["a".into(), "b".into(), "c".into()];
            state.apply(&cmd(CommandKind::SetRunners { node: id, runners })).unwrap();
        }
        state.take_dirty();
        state
    }

    fn create(state: &mut State, name: &str, spec: VmSpec) -> Result<Effect, Rejection> {
        state.apply(&cmd(CommandKind::CreateVm { name: name.into(), spec }))
    }

    fn place(state: &mut State, vm: &str, node: NodeId) -> Result<Effect, Rejection> {
        let expected_generation = state.vm(vm).map_or(0, |v| v.generation);
        state.apply(&cmd(CommandKind::Place { vm: vm.into(), node, expected_generation }))
    }

    /// Applies `command` expecting a rejection, and checks nothing changed.
    fn rejected(state: &mut State, command: CommandKind) -> Rejection {
        let before = state.clone();
        let rejection = state.apply(&cmd(command)).expect_err("should be rejected");
        assert_eq!(*state, before, "a rejected command changed the state");
        rejection
    }

    #[test]
    fn recover_moves_a_vm_off_a_down_host_without_a_handoff_and_only_then() {
        let mut state = cluster();
        let manual = VmSpec { failover: Failover::Manual, ..spec(1, 128) };
        create(&mut state, "a", manual).unwrap();
        place(&mut state, "a", 1).unwrap();
        let recover = |state: &State| CommandKind::Recover {
            vm: "a".into(),
            node: 2,
            expected_generation: state.vm("a").unwrap().generation,
        };
        let command = recover(&state);
        let r = rejected(&mut state, command);
        assert!(matches!(r, Rejection::RecoverFromLiveHost { .. }), "{r}");
        state.apply(&cmd(CommandKind::SetStatus { node: 1, status: MemberStatus::Down })).unwrap();
        assert_eq!(state.vm_state(state.vm("a").unwrap()), VmState::Lost);
        let r = rejected(&mut state, CommandKind::Recover { vm: "a".into(), node: 2, expected_generation: 0 });
        assert!(matches!(r, Rejection::StaleGeneration { .. }), "{r}");
        state.apply(&cmd(recover(&state))).unwrap();
        let vm = state.vm("a").unwrap();
        assert_eq!(vm.placement.map(|p| p.node), Some(2));
        assert_eq!(vm.handoff, None, "the operator vouched h1 is dead");
        assert!(vm.may_start_on(2));
        assert_eq!(state.vm_state(vm), VmState::Pending);
        // A host never reports a VM lost.
        let generation = vm.placement.unwrap().generation;
        let report =
            CommandKind::Report { node: 2, vm: "a".into(), generation, state: VmState::Lost, last_error: None };
        assert!(matches!(rejected(&mut state, report), Rejection::InvalidValue(_)));
    }

    #[test]
    fn create_validates_name_and_resources() {
        let mut state = cluster();
        for bad in ["../x", "a b", "x.service", "A", &"a".repeat(64)] {
            let r = rejected(&mut state, CommandKind::CreateVm { name: bad.into(), spec: spec(1, 128) });
            assert!(matches!(r, Rejection::InvalidName { .. }), "{bad}: {r}");
        }
        for bad in [spec(0, 128), spec(1, 0), spec(1, 8), spec(5000, 128), spec(1, u64::MAX)] {
            let r = rejected(&mut state, CommandKind::CreateVm { name: "a".into(), spec: bad });
            assert!(matches!(r, Rejection::InvalidValue(_)), "{r}");
        }
        create(&mut state, "a", spec(1, 128)).unwrap();
        let r = rejected(&mut state, CommandKind::CreateVm { name: "a".into(), spec: spec(1, 128) });
        assert_eq!(r, Rejection::DuplicateVm("a".into()));
    }

    #[test]
    fn unknown_vm_and_node_are_rejected() {
        let mut state = cluster();
        assert_eq!(
            rejected(&mut state, CommandKind::DeleteVm { name: "nope".into() }),
            Rejection::UnknownVm("nope".into())
        );
        create(&mut state, "a", spec(1, 128)).unwrap();
        assert_eq!(
            rejected(&mut state, CommandKind::Place { vm: "a".into(), node: 9, expected_generation: 0 }),
            Rejection::UnknownNode(9)
        );
        assert_eq!(rejected(&mut state, CommandKind::SetDrain { node: 9, drain: true }), Rejection::UnknownNode(9));
    }

    #[test]
    fn placement_respects_capacity_and_overcommit() {
        let mut state = cluster();
        create(&mut state, "a", spec(3, 1024)).unwrap();
        create(&mut state, "b", spec(2, 1024)).unwrap();
        place(&mut state, "a", 1).unwrap();
        let r = place(&mut state, "b", 1).unwrap_err();
        assert!(matches!(r, Rejection::OverCapacity { resource: "vcpu", needed: 2, available: 1, .. }), "{r}");
        let capacity = Capacity { vcpu: 4, memory_mib: 4096, vcpu_overcommit_pct: 200, memory_overcommit_pct: 100 };
        state.apply(&cmd(CommandKind::SetCapacity { node: 1, capacity })).unwrap();
        place(&mut state, "b", 1).unwrap();
        state.validate().unwrap();
        // Capacity cannot drop below what is placed.
        let r = rejected(&mut state, CommandKind::SetCapacity { node: 1, capacity: Capacity::default() });
        assert!(matches!(r, Rejection::CapacityBelowUse { .. }), "{r}");
    }

    #[test]
    fn placement_needs_the_runner_and_an_available_host() {
        let mut state = cluster();
        create(&mut state, "zz", spec(1, 128)).unwrap();
        let r = place(&mut state, "zz", 1).unwrap_err();
        assert!(matches!(r, Rejection::MissingRunner { .. }), "{r}");
        create(&mut state, "a", spec(1, 128)).unwrap();
        state.apply(&cmd(CommandKind::SetDrain { node: 1, drain: true })).unwrap();
        assert!(matches!(place(&mut state, "a", 1), Err(Rejection::NodeUnavailable { why: "draining", .. })));
        state.apply(&cmd(CommandKind::SetStatus { node: 2, status: MemberStatus::Down })).unwrap();
        assert!(matches!(place(&mut state, "a", 2), Err(Rejection::NodeUnavailable { why: "down", .. })));
    }

    #[test]
    fn placement_respects_pin_labels_and_anti_affinity() {
        let mut state = cluster();
        let pinned = VmSpec { node: Some("h2".into()), ..spec(1, 128) };
        create(&mut state, "a", pinned).unwrap();
        assert!(matches!(place(&mut state, "a", 1), Err(Rejection::PinnedElsewhere { .. })));
        place(&mut state, "a", 2).unwrap();

        let labelled = VmSpec { labels: [("rack".to_string(), "r1".to_string())].into(), ..spec(1, 128) };
        create(&mut state, "b", labelled).unwrap();
        assert!(matches!(place(&mut state, "b", 1), Err(Rejection::LabelMismatch { .. })));
        let labels: Labels = [("rack".to_string(), "r1".to_string())].into();
        state.apply(&cmd(CommandKind::SetLabels { node: 1, labels })).unwrap();
        place(&mut state, "b", 1).unwrap();
        // Removing the label unplaces the VM that needed it.
        let effect = state.apply(&cmd(CommandKind::SetLabels { node: 1, labels: Labels::new() })).unwrap();
        assert_eq!(effect, Effect::MemberChangedUnplaced { node: 1, vms: vec!["b".into()] });
        assert_eq!(state.vm("b").unwrap().placement, None);

        let group = |name: &str| VmSpec { anti_affinity: Some(name.into()), ..spec(1, 128) };
        state.apply(&cmd(CommandKind::DeleteVm { name: "a".into() })).unwrap();
        create(&mut state, "a", group("g")).unwrap();
        create(&mut state, "c", group("g")).unwrap();
        place(&mut state, "a", 1).unwrap();
        assert!(matches!(place(&mut state, "c", 1), Err(Rejection::AntiAffinity { .. })));
        place(&mut state, "c", 2).unwrap();
        state.validate().unwrap();
    }

    #[test]
    fn stale_generation_loses() {
        let mut state = cluster();
        create(&mut state, "a", spec(1, 128)).unwrap();
        place(&mut state, "a", 1).unwrap();
        let r = rejected(&mut state, CommandKind::Place { vm: "a".into(), node: 2, expected_generation: 0 });
        assert!(matches!(r, Rejection::StaleGeneration { expected: 0, actual: 1, .. }), "{r}");
        place(&mut state, "a", 2).unwrap();
        assert_eq!(state.vm("a").unwrap().placement, Some(Placement { node: 2, generation: 2 }));
    }

    #[test]
    fn reports_only_count_from_the_current_placement() {
        let mut state = cluster();
        create(&mut state, "a", spec(1, 128)).unwrap();
        place(&mut state, "a", 1).unwrap();
        let report =
            |node, generation, state| CommandKind::Report { node, vm: "a".into(), generation, state, last_error: None };
        state.apply(&cmd(report(1, 1, VmState::Running))).unwrap();
        assert_eq!(state.vm("a").unwrap().observed.state, VmState::Running);
        let r = rejected(&mut state, report(2, 1, VmState::Stopped));
        assert!(matches!(r, Rejection::NotPlacedThere { .. }));
        place(&mut state, "a", 2).unwrap();
        let r = rejected(&mut state, report(1, 1, VmState::Running));
        assert!(matches!(r, Rejection::NotPlacedThere { .. }));
    }

    #[test]
    fn removing_runner_or_member_unplaces_its_vms() {
        let mut state = cluster();
        create(&mut state, "a", spec(1, 128)).unwrap();
        create(&mut state, "b", spec(1, 128)).unwrap();
        place(&mut state, "a", 1).unwrap();
        place(&mut state, "b", 2).unwrap();
        let effect = state.apply(&cmd(CommandKind::SetRunners { node: 1, runners: vec!["b".into()] })).unwrap();
        assert_eq!(effect, Effect::MemberChangedUnplaced { node: 1, vms: vec!["a".into()] });
        assert_eq!(state.member(1).unwrap().runners, set(&["b"]));
        let effect = state.apply_membership(&MembershipChange::Remove { id: 2 }, 5).unwrap();
        assert_eq!(effect, Effect::MemberRemoved { node: 2, unplaced: vec!["b".into()] });
        assert!(state.vm("b").unwrap().placement.is_none());
        let before = state.clone();
        assert_eq!(state.apply_membership(&MembershipChange::Remove { id: 1 }, 5), Err(Rejection::LastVoter(1)));
        assert_eq!(state, before);
        state.validate().unwrap();
    }

    #[test]
    fn membership_names_are_unique_and_joins_are_idempotent() {
        let mut state = cluster();
        let add =
            |id, name: &str| MembershipChange::AddLearner { id, name: name.into(), address: "10.0.0.9:7000".into() };
        assert!(matches!(state.apply_membership(&add(3, "h1"), 0), Err(Rejection::DuplicateMemberName { .. })));
        assert!(matches!(state.apply_membership(&add(3, "../x"), 0), Err(Rejection::InvalidName { .. })));
        state.apply_membership(&add(3, "h3"), 0).unwrap();
        assert_eq!(state.apply_membership(&add(3, "h3"), 0), Ok(Effect::MemberChanged { node: 3 }));
        assert!(state.member(3).unwrap().learner);
        // A join cannot rewrite a member's address, nor re-admit a voter.
        let moved = MembershipChange::AddLearner { id: 3, name: "h3".into(), address: "10.6.6.6:7000".into() };
        assert_eq!(state.apply_membership(&moved, 0), Err(Rejection::DuplicateMember(3)));
        assert_eq!(state.member(3).unwrap().address, "10.0.0.9:7000");
        let h1 = state.member(1).unwrap().clone();
        let rejoin = MembershipChange::AddLearner { id: 1, name: h1.name.clone(), address: h1.address.clone() };
        assert_eq!(state.apply_membership(&rejoin, 0), Err(Rejection::DuplicateMember(1)));
        state.apply_membership(&MembershipChange::Promote { id: 3 }, 0).unwrap();
        assert_eq!(state.apply_membership(&add(3, "h3"), 0), Err(Rejection::DuplicateMember(3)));
        assert_eq!(state.apply_membership(&MembershipChange::Promote { id: 3 }, 0), Err(Rejection::NotLearner(3)));
        let bad_address = MembershipChange::AddLearner { id: 4, name: "h4".into(), address: "nope".into() };
        assert!(matches!(state.apply_membership(&bad_address, 0), Err(Rejection::InvalidValue(_))));
    }

    #[test]
    fn update_keeps_placement_when_it_still_fits() {
        let mut state = cluster();
        create(&mut state, "a", spec(1, 128)).unwrap();
        place(&mut state, "a", 1).unwrap();
        let update = |spec| CommandKind::UpdateVm { name: "a".into(), spec };
        assert_eq!(state.apply(&cmd(update(spec(2, 256)))), Ok(Effect::VmUpdated { vm: "a".into() }));
        assert_eq!(state.vm("a").unwrap().placement.map(|p| p.node), Some(1));
        let effect = state.apply(&cmd(update(spec(8, 256)))).unwrap();
        assert!(matches!(effect, Effect::Unplaced { from: Some(1), .. }));
        state.validate().unwrap();
    }

    fn released(node: NodeId, generation: u64) -> CommandKind {
        CommandKind::Released { node, vm: "a".into(), generation }
    }

    fn handoff(state: &State) -> Option<(NodeId, u64)> {
        state.vm("a").unwrap().handoff.map(|h| (h.from, h.generation))
    }

    /// Three members; "a" placed on h1 at generation 1.
    fn three_with_a_on_h1() -> State {
        let mut state = cluster();
        state
            .apply_membership(
                &MembershipChange::AddLearner { id: 3, name: "h3".into(), address: "127.0.0.3:7000".into() },
                0,
            )
            .unwrap();
        let capacity = Capacity { vcpu: 4, memory_mib: 4096, ..Capacity::default() };
        state.apply(&cmd(CommandKind::SetCapacity { node: 3, capacity })).unwrap();
        state.apply(&cmd(CommandKind::SetRunners { node: 3, runners: vec!["a".into(), "b".into()] })).unwrap();
        create(&mut state, "a", spec(2, 1024)).unwrap();
        place(&mut state, "a", 1).unwrap();
        state
    }

    #[test]
    fn moving_between_up_hosts_waits_for_the_old_host_to_release() {
        let mut state = three_with_a_on_h1();
        assert!(state.may_start("a", 1));
        assert_eq!(handoff(&state), None, "a first placement has nothing to hand off");
        place(&mut state, "a", 2).unwrap();
        assert_eq!(handoff(&state), Some((1, 1)));
        assert_eq!(state.vm("a").unwrap().moved_from, Some(1));
        assert!(!state.may_start("a", 2), "h2 must wait for h1 to stop its copy");
        assert!(!state.may_start("a", 1), "h1 is no longer the placed host");
        assert_eq!(
            state.handoffs_from(1).map(|(vm, h)| (vm.name.clone(), h.generation)).collect::<Vec<_>>(),
            [("a".to_string(), 1)]
        );
        state.validate().unwrap();
        // Only the matching host and generation release it.
        assert!(matches!(rejected(&mut state, released(2, 1)), Rejection::NoSuchHandoff { .. }));
        assert!(matches!(rejected(&mut state, released(1, 2)), Rejection::NoSuchHandoff { .. }));
        assert_eq!(
            state.apply(&cmd(released(1, 1))),
            Ok(Effect::HandoffEnded { vm: "a".into(), from: 1, fenced: false })
        );
        assert!(state.may_start("a", 2));
        assert!(matches!(rejected(&mut state, released(1, 1)), Rejection::NoSuchHandoff { .. }), "released twice");
        // A desired-stopped VM is never started.
        state.apply(&cmd(CommandKind::SetDesired { name: "a".into(), desired: Desired::Stopped })).unwrap();
        assert!(!state.may_start("a", 2));
        state.validate().unwrap();
    }

    #[test]
    fn a_pending_handoff_keeps_the_earliest_host() {
        let mut state = three_with_a_on_h1();
        place(&mut state, "a", 2).unwrap();
        place(&mut state, "a", 3).unwrap();
        assert_eq!(handoff(&state), Some((1, 1)), "h2 never started it; h1's copy is the one to wait for");
        assert_eq!(state.vm("a").unwrap().moved_from, Some(2));
        let unplace = CommandKind::Unplace { vm: "a".into(), expected_generation: 3 };
        state.apply(&cmd(unplace)).unwrap();
        assert_eq!(handoff(&state), Some((1, 1)));
        assert_eq!(state.vm("a").unwrap().moved_from, None);
        state.validate().unwrap();
        // Back on h1: h1's copy is the one that should run.
        place(&mut state, "a", 1).unwrap();
        assert_eq!(handoff(&state), None);
        assert!(state.may_start("a", 1));
        state.validate().unwrap();
    }

    #[test]
    fn unplacing_starts_a_handoff_that_a_later_placement_keeps() {
        let mut state = three_with_a_on_h1();
        state.apply(&cmd(CommandKind::Unplace { vm: "a".into(), expected_generation: 1 })).unwrap();
        assert_eq!(handoff(&state), Some((1, 1)));
        place(&mut state, "a", 2).unwrap();
        assert_eq!(handoff(&state), Some((1, 1)));
        assert!(!state.may_start("a", 2));
        // Implicit unplacements too: a constraint change on the host.
        let mut state = three_with_a_on_h1();
        state.apply(&cmd(CommandKind::SetRunners { node: 1, runners: vec![] })).unwrap();
        assert_eq!(handoff(&state), Some((1, 1)));
        state.validate().unwrap();
    }

    #[test]
    fn a_handoff_reserves_the_old_copy_until_released() {
        let mut state = three_with_a_on_h1();
        create(&mut state, "b", spec(3, 1024)).unwrap();
        place(&mut state, "a", 2).unwrap();
        // h1 still holds a's 2 vcpu: b (3 vcpu) does not fit next to it.
        assert_eq!(state.used_on(1, None), Resources { vcpu: 2, memory_mib: 1024 });
        assert!(matches!(place(&mut state, "b", 1), Err(Rejection::OverCapacity { resource: "vcpu", .. })));
        state.apply(&cmd(released(1, 1))).unwrap();
        assert_eq!(state.used_on(1, None), Resources::default());
        place(&mut state, "b", 1).unwrap();
        state.validate().unwrap();
    }

    #[test]
    fn a_spec_change_that_unplaces_reserves_the_old_size() {
        let mut state = three_with_a_on_h1();
        let update = CommandKind::UpdateVm { name: "a".into(), spec: spec(8, 1024) };
        assert!(matches!(state.apply(&cmd(update)), Ok(Effect::Unplaced { .. })));
        let h = state.vm("a").unwrap().handoff.unwrap();
        assert_eq!((h.from, h.reserved), (1, Resources { vcpu: 2, memory_mib: 1024 }));
        state.validate().unwrap();
    }

    #[test]
    fn clear_handoff_needs_the_old_host_down() {
        let mut state = three_with_a_on_h1();
        place(&mut state, "a", 2).unwrap();
        let clear = |from, expected_generation| CommandKind::ClearHandoff { vm: "a".into(), from, expected_generation };
        let r = rejected(&mut state, clear(1, 2));
        assert!(matches!(r, Rejection::HandoffFromLiveHost { .. }), "{r}");
        state.apply(&cmd(CommandKind::SetStatus { node: 1, status: MemberStatus::Down })).unwrap();
        assert!(matches!(rejected(&mut state, clear(1, 1)), Rejection::StaleGeneration { .. }));
        assert!(matches!(rejected(&mut state, clear(3, 2)), Rejection::NoSuchHandoff { .. }));
        assert_eq!(state.apply(&cmd(clear(1, 2))), Ok(Effect::HandoffEnded { vm: "a".into(), from: 1, fenced: true }));
        assert!(state.may_start("a", 2));
        state.validate().unwrap();
    }

    #[test]
    fn moving_off_a_down_host_also_waits_for_its_fencing() {
        let mut state = three_with_a_on_h1();
        state.apply(&cmd(CommandKind::SetStatus { node: 1, status: MemberStatus::Down })).unwrap();
        place(&mut state, "a", 2).unwrap();
        assert_eq!(handoff(&state), Some((1, 1)), "down is not yet fenced");
        let clear = CommandKind::ClearHandoff { vm: "a".into(), from: 1, expected_generation: 2 };
        state.apply(&cmd(clear)).unwrap();
        assert!(state.may_start("a", 2));
    }

    #[test]
    fn deleting_the_vm_drops_its_handoff_and_removal_keeps_handoffs_from_the_member() {
        let mut state = three_with_a_on_h1();
        create(&mut state, "b", spec(1, 128)).unwrap();
        state.apply(&cmd(CommandKind::Place { vm: "b".into(), node: 3, expected_generation: 0 })).unwrap();
        place(&mut state, "a", 2).unwrap();
        state.apply(&cmd(CommandKind::DeleteVm { name: "a".into() })).unwrap();
        assert_eq!(state.handoffs_from(1).count(), 0);

        create(&mut state, "a", spec(1, 128)).unwrap();
        place(&mut state, "a", 1).unwrap();
        place(&mut state, "a", 2).unwrap();
        state.apply_membership(&MembershipChange::Remove { id: 1 }, 5).unwrap();
        assert_eq!(handoff(&state), Some((1, 1)), "a removed host may still run its copy");
        state.apply_membership(&MembershipChange::Remove { id: 3 }, 5).unwrap();
        let b = state.vm("b").unwrap();
        assert_eq!((b.placement, b.handoff.map(|h| h.from)), (None, Some(3)));
        state.validate().unwrap();
        // The leader ends it once the removed host must have fenced itself.
        state.apply(&cmd(CommandKind::ClearHandoff { vm: "a".into(), from: 1, expected_generation: 2 })).unwrap();
        assert!(state.may_start("a", 2));
        state.validate().unwrap();
    }

    #[test]
    fn a_state_for_a_new_cluster_keeps_what_its_hosts_still_hold() {
        let mut state = three_with_a_on_h1();
        create(&mut state, "b", spec(1, 128)).unwrap();
        state.apply(&cmd(CommandKind::Place { vm: "b".into(), node: 3, expected_generation: 0 })).unwrap();
        place(&mut state, "b", 1).unwrap(); // a handoff from h3
        create(&mut state, "c", spec(1, 128)).unwrap();
        state.apply(&cmd(CommandKind::Place { vm: "c".into(), node: 2, expected_generation: 0 })).unwrap();
        state.apply(&cmd(CommandKind::AddJoinToken { hash: [9; 32], ttl_ms: 1000 })).unwrap();
        // The new cluster: h1 (new id 11) and h9; h2 and h3 are gone.
        let members = [Member::new(11, "h1", "10.0.0.1:7000"), Member::new(19, "h9", "10.0.0.9:7000")];
        let new = state.for_new_cluster(&members, 77);
        new.validate().unwrap();
        let h1 = new.member(11).unwrap();
        assert_eq!((h1.capacity, h1.address.as_str()), (state.member(1).unwrap().capacity, "10.0.0.1:7000"));
        assert_eq!(h1.runners, state.member(1).unwrap().runners, "what h1 reported is kept");
        assert_eq!(new.member(19).unwrap().capacity, Capacity::default(), "h9 reports its own");
        assert!(new.member(2).is_none() && new.member(3).is_none());
        // a stays on h1 (its new id); c was on h2: placed again, with a
        // handoff from h2's old id; b's handoff from h3 stays, on h1.
        assert_eq!(new.vm("a").unwrap().placement.map(|p| p.node), Some(11));
        let c = new.vm("c").unwrap();
        assert_eq!((c.placement, c.handoff.map(|h| h.from)), (None, Some(2)));
        assert_eq!(c.observed, Observed { state: VmState::Pending, since_unix_ms: 77, last_error: None });
        let b = new.vm("b").unwrap();
        assert_eq!((b.placement.map(|p| p.node), b.handoff.map(|h| h.from)), (Some(11), Some(3)));
        assert!(new.join_tokens().is_empty());
        // Deterministic: every member restoring the same state computes it.
        assert_eq!(state.for_new_cluster(&members, 77), new);
    }

    #[test]
    fn labels_are_bounded() {
        let mut state = cluster();
        let many: Labels = (0..33).map(|i| (format!("k{i}"), "v".to_string())).collect();
        assert!(matches!(
            rejected(&mut state, CommandKind::SetLabels { node: 1, labels: many }),
            Rejection::InvalidValue(_)
        ));
        let spaced: Labels = [("k".to_string(), "a b".to_string())].into();
        assert!(matches!(
            rejected(&mut state, CommandKind::SetLabels { node: 1, labels: spaced }),
            Rejection::InvalidValue(_)
        ));
    }

    #[test]
    fn a_join_token_admits_one_host_until_it_expires() {
        let mut state = cluster();
        let at = |at_unix_ms, kind| Command { at_unix_ms, kind };
        let (a, b) = ([1; 32], [2; 32]);
        for ttl_ms in [0, limits::JOIN_TOKEN_TTL_MS_MAX + 1] {
            assert!(matches!(
                rejected(&mut state, CommandKind::AddJoinToken { hash: a, ttl_ms }),
                Rejection::InvalidValue(_)
            ));
        }
        state.apply(&at(1000, CommandKind::AddJoinToken { hash: a, ttl_ms: 500 })).unwrap();
        state.apply(&at(1000, CommandKind::AddJoinToken { hash: b, ttl_ms: 500 })).unwrap();
        assert!(state.take_dirty().join_tokens);

        // An unknown token, then a and its reuse: by the same host (a retried
        // join) yes, by another no.
        assert_eq!(
            rejected(&mut state, CommandKind::UseJoinToken { hash: [3; 32], node: 5 }),
            Rejection::InvalidJoinToken
        );
        state.apply(&at(1200, CommandKind::UseJoinToken { hash: a, node: 5 })).unwrap();
        state.apply(&at(1300, CommandKind::UseJoinToken { hash: a, node: 5 })).unwrap();
        let before = state.clone();
        assert_eq!(
            state.apply(&at(1300, CommandKind::UseJoinToken { hash: a, node: 6 })),
            Err(Rejection::InvalidJoinToken)
        );
        assert_eq!(state, before);
        assert_eq!(state.join_tokens()[&a].used_by, Some(5));

        // b expires at 1500: refused then, and dropped by the next accepted
        // token command.
        let before = state.clone();
        assert_eq!(
            state.apply(&at(1500, CommandKind::UseJoinToken { hash: b, node: 6 })),
            Err(Rejection::InvalidJoinToken)
        );
        assert_eq!(state, before, "a refused token command drops nothing");
        state.apply(&at(1500, CommandKind::AddJoinToken { hash: [4; 32], ttl_ms: 500 })).unwrap();
        assert_eq!(state.join_tokens().keys().collect::<Vec<_>>(), vec![&[4; 32]]);
        state.validate().unwrap();
    }

    #[test]
    fn join_tokens_are_bounded_and_expired_ones_make_room() {
        let mut state = State::default();
        for i in 0..limits::JOIN_TOKENS_MAX {
            let hash = [u8::try_from(i).unwrap(); 32];
            state.apply(&Command { at_unix_ms: 0, kind: CommandKind::AddJoinToken { hash, ttl_ms: 10 } }).unwrap();
        }
        let one_more =
            |at_unix_ms| Command { at_unix_ms, kind: CommandKind::AddJoinToken { hash: [255; 32], ttl_ms: 10 } };
        assert_eq!(state.apply(&one_more(9)), Err(Rejection::TooManyJoinTokens(limits::JOIN_TOKENS_MAX)));
        state.apply(&one_more(10)).unwrap();
        assert_eq!(state.join_tokens().len(), 1);
    }
}
