//! The cluster at a glance, as the dashboard shows it: a pure function of
//! the replicated state and this member's view of the consensus.
//!
//! These are the wire types of `GET /api/overview` and of the page's live
//! stream (serde derives live here, at the boundary, not on the domain
//! types). Fields may be added, none removed or renamed: scripts read them.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::consensus::{CoreStatus, Role};
use crate::node::NodeStatus;
use crate::scheduler::{Explainer, Policy};
use crate::state::{Failover, Member, MemberStatus, State, Vm, VmState};

/// VMs explained (why pending, failed or lost) per overview; beyond this
/// the page says to ask `vm status` (each costs a pass over the hosts).
pub const REASONS_MAX: usize = 2000;

/// VM states in the order problems come first (the page's default sort
/// and its summary).
pub const STATES_BY_URGENCY: [&str; 7] = ["failed", "lost", "pending", "starting", "stopping", "running", "stopped"];

/// Everything on the page but the VMs, the events and the time it was taken (both
/// change without the cluster changing, so they are kept apart to tell
/// whether anything worth sending happened). Small: the live stream sends
/// it whole with every change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Head {
    /// The agent serving the page.
    pub agent: String,
    /// Whether that agent is a member of a cluster yet.
    pub member: bool,
    pub cluster_id: u64,
    /// The leader's name, when one is known.
    pub leader: Option<String>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    /// Whether `healthy` below reflects the leader's own contact with each
    /// member (this agent is the leader) or only the replicated status.
    pub health_from_leader: bool,
    /// This agent's Raft role: `leader`, `follower`, `candidate`,
    /// `learner` (or `none` before it is a member).
    pub role: &'static str,
    /// Whether this agent has quorum contact: without it, everything here
    /// is its last known state.
    pub quorum: bool,
    /// When this agent's view froze (its last quorum contact, Unix ms);
    /// `None` while it has quorum contact, or if it never had any.
    pub frozen_unix_ms: Option<u64>,
    /// This host has fenced itself (its guests are stopped).
    pub fenced: bool,
    /// VMs by state (`lost` included), every state present.
    pub counts: BTreeMap<&'static str, u64>,
    /// Hosts by status (`up`, `down`, `draining`).
    pub host_counts: BTreeMap<&'static str, u64>,
    /// How many members vote in Raft (the rest are learners).
    pub voters: u64,
    pub members: Vec<MemberView>,
}

/// The overview: the head and every VM, by name. Its JSON is one object
/// (the head's fields and `vms`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Overview {
    #[serde(flatten)]
    pub head: Head,
    pub vms: Vec<VmView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemberView {
    pub id: u64,
    pub name: String,
    pub address: String,
    /// `leader`, `follower` or `learner`.
    pub role: &'static str,
    /// Whether it votes in Raft (a learner does not).
    pub voter: bool,
    /// `up`, `down` or `draining`.
    pub status: &'static str,
    pub healthy: bool,
    pub vcpu_total: u64,
    pub vcpu_used: u64,
    pub memory_mib_total: u64,
    pub memory_mib_used: u64,
    pub vms: u32,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmView {
    pub name: String,
    /// The host it is placed on.
    pub node: Option<String>,
    /// `running` or `stopped`.
    pub desired: String,
    /// `pending`, `starting`, `running`, `stopping`, `stopped`, `failed` or
    /// `lost`.
    pub state: &'static str,
    pub vcpu: u32,
    pub memory_mib: u64,
    /// When the VM entered `state` (0: never observed).
    pub since_unix_ms: u64,
    pub last_error: Option<String>,
    /// Why it is not running, for a pending, failed or lost VM (as `vm
    /// status` says it).
    pub reason: Option<String>,
    /// `auto` or `manual`.
    pub failover: &'static str,
}

impl VmView {
    /// What the page says of it in one line: a failed or lost VM's last
    /// error first (its placement explains less), else why it is pending.
    pub fn why(&self) -> &str {
        let (first, second) = match self.state {
            "failed" | "lost" => (&self.last_error, &self.reason),
            _ => (&self.reason, &self.last_error),
        };
        first.as_deref().or(second.as_deref()).unwrap_or("")
    }

    /// Whether it needs an operator: failed, lost, or pending although it
    /// should run (a VM created stopped is pending by design).
    pub fn is_problem(&self) -> bool {
        match self.state {
            "failed" | "lost" => true,
            "pending" => self.desired != "stopped",
            _ => false,
        }
    }
}

/// The overview of an agent that is not a member of a cluster (yet).
pub fn not_member(agent: &str) -> Overview {
    let head = Head { agent: agent.to_string(), role: "none", counts: zero_counts(), ..Head::default() };
    Overview { head, vms: Vec::new() }
}

fn zero_counts() -> BTreeMap<&'static str, u64> {
    STATES_BY_URGENCY.iter().map(|s| (*s, 0)).collect()
}

fn role_of(member: &Member, leader: Option<u64>) -> &'static str {
    if member.learner {
        "learner"
    } else if leader == Some(member.id) {
        "leader"
    } else {
        "follower"
    }
}

fn own_role(state: &State, core: &CoreStatus) -> &'static str {
    match core.role {
        Role::Leader => "leader",
        Role::Candidate | Role::PreCandidate => "candidate",
        Role::Follower if state.member(core.id).is_some_and(|m| m.learner) => "learner",
        Role::Follower => "follower",
    }
}

fn failover_word(failover: Failover) -> &'static str {
    match failover {
        Failover::Auto => "auto",
        Failover::Manual => "manual",
    }
}

/// One VM's view; `explained` counts the reasons given so far (at most
/// [`REASONS_MAX`]).
pub fn vm_view(state: &State, vm: &Vm, explainer: &mut Explainer<'_>, explained: &mut usize) -> VmView {
    let shown = state.vm_state(vm);
    let reason = if matches!(shown, VmState::Pending | VmState::Failed | VmState::Lost) && *explained < REASONS_MAX {
        *explained += 1;
        Some(explainer.explain(&vm.name))
    } else {
        None
    };
    VmView {
        name: vm.name.clone(),
        node: vm.placement.and_then(|p| state.member(p.node)).map(|m| m.name.clone()),
        desired: vm.spec.desired.to_string(),
        state: shown.as_str(),
        vcpu: vm.spec.vcpu,
        memory_mib: vm.spec.memory_mib,
        since_unix_ms: vm.observed.since_unix_ms,
        last_error: vm.observed.last_error.clone(),
        reason,
        failover: failover_word(vm.spec.failover),
    }
}

/// The overview from `state` as applied on this member. Members and VMs
/// come sorted by name (the state's maps are ordered), so successive
/// overviews compare and render stably. `quorum`, `frozen_unix_ms` and
/// `fenced` are the caller's (they are not in the state).
pub fn build(state: &State, core: &CoreStatus, node: &NodeStatus, policy: &Policy) -> Overview {
    let leader = core.leader;
    // Only the leader hears from every peer; elsewhere the replicated
    // up/down status (set by the leader's failure detector) is all there is.
    let health_from_leader = core.role == Role::Leader;
    let mut vms_per_member = BTreeMap::<u64, u32>::new();
    for vm in state.vms().values() {
        if let Some(placement) = vm.placement {
            *vms_per_member.entry(placement.node).or_default() += 1;
        }
    }
    let mut host_counts: BTreeMap<&'static str, u64> = crate::metrics::HOST_STATUSES.iter().map(|s| (*s, 0)).collect();
    let mut members: Vec<MemberView> = state
        .members()
        .values()
        .map(|m| {
            let limit = m.capacity.limit();
            let used = state.used_on(m.id, None);
            let active = !health_from_leader || m.id == core.id || node.active_peers.contains(&m.id);
            *host_counts.entry(m.status_word()).or_default() += 1;
            MemberView {
                id: m.id,
                name: m.name.clone(),
                address: m.address.clone(),
                role: role_of(m, leader),
                voter: !m.learner,
                status: m.status_word(),
                healthy: m.status == MemberStatus::Up && active,
                vcpu_total: limit.vcpu,
                vcpu_used: used.vcpu,
                memory_mib_total: limit.memory_mib,
                memory_mib_used: used.memory_mib,
                vms: vms_per_member.get(&m.id).copied().unwrap_or(0),
                labels: m.labels.clone().into_iter().collect(),
            }
        })
        .collect();
    members.sort_by(|a, b| a.name.cmp(&b.name));
    let mut explainer = Explainer::new(state, policy);
    let mut explained = 0;
    let vms: Vec<VmView> = state.vms().values().map(|vm| vm_view(state, vm, &mut explainer, &mut explained)).collect();
    let mut counts = zero_counts();
    for vm in &vms {
        *counts.entry(vm.state).or_default() += 1;
    }
    let head = Head {
        agent: node.name.clone(),
        member: !node.removed,
        cluster_id: node.cluster_id,
        leader: leader.and_then(|id| state.member(id)).map(|m| m.name.clone()),
        term: core.term,
        commit_index: core.commit,
        applied_index: core.applied,
        health_from_leader,
        role: own_role(state, core),
        quorum: false,
        frozen_unix_ms: None,
        fenced: false,
        counts,
        host_counts,
        voters: members.iter().filter(|m| m.voter).count() as u64,
        members,
    };
    Overview { head, vms }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Capacity, Command, CommandKind, Desired, MembershipChange, VmSpec};

    fn core(role: Role, leader: Option<u64>) -> CoreStatus {
        CoreStatus {
            id: 1,
            role,
            leader,
            term: 4,
            commit: 9,
            applied: 9,
            last_index: 9,
            voters: vec![1, 2],
            learners: vec![],
            progress: vec![],
        }
    }

    fn node(active_peers: Vec<u64>) -> NodeStatus {
        NodeStatus {
            id: 1,
            name: "h1".into(),
            cluster_id: 7,
            role: Role::Leader,
            leader: None,
            term: 4,
            commit: 9,
            applied: 9,
            voters: vec![1, 2],
            learners: vec![],
            active_peers,
            removed: false,
        }
    }

    fn state() -> State {
        let mut state = State::default();
        for (id, vcpu) in [(1, 8), (2, 4)] {
            let add = MembershipChange::AddLearner { id, name: format!("h{id}"), address: format!("10.0.0.{id}:7000") };
            state.apply_membership(&add, 0).unwrap();
            state.apply_membership(&MembershipChange::Promote { id }, 0).unwrap();
            let capacity = Capacity { vcpu, memory_mib: u64::from(vcpu) * 1024, ..Capacity::default() };
            state.apply(&Command { at_unix_ms: 1, kind: CommandKind::SetCapacity { node: id, capacity } }).unwrap();
        }
        let spec = VmSpec { vcpu: 2, memory_mib: 512, desired: Desired::Running, ..VmSpec::default() };
        state.apply(&Command { at_unix_ms: 1, kind: CommandKind::CreateVm { name: "web".into(), spec } }).unwrap();
        state
    }

    fn overview(role: Role, leader: Option<u64>, active: Vec<u64>) -> Overview {
        build(&state(), &core(role, leader), &node(active), &Policy::default())
    }

    #[test]
    fn the_leader_reports_members_it_does_not_hear_from_as_unhealthy() {
        let overview = overview(Role::Leader, Some(1), vec![]);
        assert_eq!(overview.head.leader.as_deref(), Some("h1"));
        assert!(overview.head.health_from_leader);
        assert_eq!(overview.head.role, "leader");
        let roles: Vec<_> = overview.head.members.iter().map(|m| (m.name.as_str(), m.role, m.healthy)).collect();
        assert_eq!(roles, [("h1", "leader", true), ("h2", "follower", false)]);
        assert!(overview.head.members.iter().all(|m| m.voter) && overview.head.voters == 2);
        // A demoted member is a learner, and does not vote.
        let mut demoted = state();
        demoted.apply_membership(&MembershipChange::Demote { id: 2 }, 0).unwrap();
        let o = build(&demoted, &core(Role::Leader, Some(1)), &node(vec![2]), &Policy::default());
        let h2 = &o.head.members[1];
        assert_eq!((h2.role, h2.voter, o.head.voters), ("learner", false, 1));
        let healthy = self::overview(Role::Leader, Some(1), vec![2]);
        assert!(healthy.head.members.iter().all(|m| m.healthy));
        // A follower trusts the replicated status.
        let follower = self::overview(Role::Follower, Some(1), vec![]);
        assert!(follower.head.members.iter().all(|m| m.healthy) && !follower.head.health_from_leader);
        assert_eq!(follower.head.role, "follower");
    }

    #[test]
    fn vms_capacity_counts_and_reasons_come_from_the_state() {
        let overview = overview(Role::Follower, Some(2), vec![]);
        assert_eq!(overview.vms.len(), 1);
        let web = &overview.vms[0];
        assert_eq!((web.name.as_str(), web.state, web.node.as_deref(), web.vcpu), ("web", "pending", None, 2));
        // Neither host has web's runner: the reason says so, as `vm status` does.
        let why = web.reason.as_deref().unwrap();
        assert!(why.starts_with("no host fits:") && why.contains("runner"), "{why}");
        assert_eq!(overview.head.counts["pending"], 1);
        assert_eq!(overview.head.counts["running"], 0);
        assert_eq!(overview.head.host_counts["up"], 2);
        let h1 = &overview.head.members[0];
        assert_eq!((h1.vcpu_total, h1.vcpu_used, h1.memory_mib_total, h1.vms), (8, 0, 8192, 0));
        let json = serde_json::to_value(&overview).unwrap();
        assert_eq!(json["members"][1]["role"], "leader");
        assert_eq!(json["vms"][0]["node"], serde_json::Value::Null);
        assert_eq!(json["vms"][0]["failover"], "auto");
    }

    #[test]
    fn a_failed_vm_tells_its_error_and_a_vm_created_stopped_is_no_problem() {
        let vm = |state: &'static str, desired: &str| VmView {
            name: "web".into(),
            node: None,
            desired: desired.into(),
            state,
            vcpu: 1,
            memory_mib: 64,
            since_unix_ms: 0,
            last_error: Some("exited with status 3".into()),
            reason: Some("placed on h2".into()),
            failover: "auto",
        };
        assert_eq!(vm("failed", "running").why(), "exited with status 3");
        assert_eq!(vm("lost", "running").why(), "exited with status 3");
        assert_eq!(vm("pending", "running").why(), "placed on h2");
        assert!(vm("failed", "running").is_problem() && vm("pending", "running").is_problem());
        assert!(!vm("pending", "stopped").is_problem() && !vm("running", "running").is_problem());
    }
}
