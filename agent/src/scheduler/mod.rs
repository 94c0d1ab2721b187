//! The scheduler: which VM goes on which host.
//!
//! [`plan`] is a pure function of the replicated [`State`], the [`Policy`]
//! and the set of hosts the failure detector vouches have fenced themselves
//! (`failure::Detector::fenced`). It reads no clock: time enters only
//! through that set, so the same inputs always give the same decisions. The
//! leader proposes each [`Decision`]'s command through Raft; every command
//! carries the VM's generation as `expected_generation`, so a decision made
//! on state that has since changed is rejected at apply and the next plan
//! decides again.
//!
//! # Rules
//!
//! A host is a candidate for a VM when it accepts placements (up, not
//! draining) and satisfies every constraint `State::apply` checks for a
//! `Place`: the VM's runner installed, the pinned node, the VM's labels, its
//! anti-affinity group, and capacity (vcpu and memory, overcommit included,
//! counting copies reserved by pending handoffs). The scheduler checks the
//! very same rules on its own incremental copy of the usage, so a `Place` it
//! emits is never rejected on the state it was planned from (a property
//! test holds it to that).
//!
//! Among candidates, [`Strategy::Spread`] picks the least loaded host,
//! [`Strategy::Binpack`] the most loaded; load is the sum of the vcpu and the
//! memory fractions in use *after* the placement. Ties go to the host whose
//! name sorts first.
//!
//! Placement is stable: a placed VM moves only for a reason.
//!
//! 1. Its host is fenced (down for longer than `reschedule_after`): it moves
//!    at once, and its handoff from that host is cleared in the same plan
//!    (`Place` then `ClearHandoff`), because a fenced host has stopped its
//!    copy. Handoffs from a fenced host on VMs placed elsewhere are cleared
//!    too. A VM that fits nowhere stays on the fenced host and restarts there
//!    if the host comes back; every plan tries it again.
//! 2. Its host is draining: VMs leave one at a time per draining host. The
//!    next moves only once the previous one has settled on its new host:
//!    its handoff ended and it is observed past `starting` (running, or
//!    failed, or no longer desired running). A VM that fits nowhere is
//!    skipped and stays; the next one is tried in the same plan.
//! 3. An explicit migrate is a `Place` proposed by the API, and a constraint
//!    change unplaces at apply; the scheduler then places the VM like any
//!    other unplaced one.
//!
//! A VM with a pending handoff is never moved (its host has not even started
//! it yet; moving it would only delay it). Desired-stopped VMs keep their
//! placement and are moved by a drain (so a drained host ends up empty) but
//! not off a fenced host (there is nothing to restart; they move when started
//! again). Unplaced desired-stopped VMs are not placed.
//!
//! One plan places many VMs: each against the usage as updated by the
//! decisions before it, so one plan never over-commits a host. Work is
//! ordered: handoffs from fenced hosts, then VMs of fenced hosts (they were
//! running), then unplaced VMs, largest first (first-fit decreasing packs
//! better and big VMs are not starved by small ones), then drains.
//!
//! # Cost
//!
//! A plan reads each host's usage from the state's host index (kept up to
//! date at apply, on every member) and looks only at the VMs its rules
//! concern: handoffs from and VMs on fenced hosts (from the same index),
//! failed VMs and waiting (unplaced desired-running) VMs (the state's
//! queues, `State::failed_vms` and `State::waiting_vms`, kept at apply
//! too), and every VM only while some host drains. So a plan from scratch,
//! a new leader's first, costs the VMs that need something, not every VM.
//! A VM whose runner no host has fits nowhere without a look at any host
//! (the state counts each runner's hosts at apply). Placing one VM ranks
//! the hosts that pass the cheap checks (status, capacity: two integer
//! comparisons per host) by load and checks the costlier constraints
//! (labels, anti-affinity, the runner set) in rank order, stopping at the
//! first host that passes them: the same host a scan in name order would
//! pick (a property test holds it to that).
//!
//! The leader plans with [`plan_with`] and a [`Memo`]: waiting VMs that fit
//! on no host are skipped by later plans until they change or some host
//! could take more than it could, so a plan after a few creates costs those
//! creates, not the thousands of VMs waiting for a runner. Its decisions
//! are exactly [`plan`]'s (a property test holds it to that, and another
//! holds a first plan to the full scan over every VM it replaced).

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::fmt;

use crate::state::{
    CommandKind, Desired, Failover, Handoff, Member, MemberStatus, NodeId, Resources, State, Vm, VmState, tally_count,
};

/// How the leader places VMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub strategy: Strategy,
    /// The most decisions one plan returns; the rest wait for the next plan.
    /// Bounds the proposals in flight after one leader tick.
    pub decisions_max: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { strategy: Strategy::Spread, decisions_max: 1024 }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Least loaded host first: spreads load and failure impact.
    #[default]
    Spread,
    /// Most loaded host that fits: keeps whole hosts free.
    Binpack,
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::Spread => "spread",
            Strategy::Binpack => "binpack",
        })
    }
}

/// A command for the leader to propose, and why, for logs and events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub command: CommandKind,
    pub reason: String,
}

/// The decisions that bring `state` closer to every desired-running VM
/// running somewhere, by the rules in the module documentation.
///
/// `fenced` holds the hosts the failure detector vouches have stopped their
/// guests (down, and silent for longer than `reschedule_after`); see
/// `failure::Detector::fenced`. A host in `fenced` that is an up member is
/// ignored, as `State::apply` would refuse to clear its handoffs.
pub fn plan(state: &State, policy: &Policy, fenced: &BTreeSet<NodeId>) -> Vec<Decision> {
    plan_with(state, policy, fenced, None, &mut Memo::default())
}

/// [`plan`], reusing what the last plan learned (`memo`): `changed` names
/// every VM changed since that plan, `None` if they are not known (then it
/// plans as [`plan`] does). The decisions are the same as [`plan`]'s.
pub fn plan_with(
    state: &State,
    policy: &Policy,
    fenced: &BTreeSet<NodeId>,
    changed: Option<&BTreeSet<String>>,
    memo: &mut Memo,
) -> Vec<Decision> {
    let queues = Queues { waiting: state.waiting_vms(), failed: state.failed_vms() };
    plan_queued(state, policy, fenced, changed, memo, queues)
}

/// The VMs a plan visits besides those of fenced and draining hosts.
#[derive(Clone, Copy)]
struct Queues<'q> {
    /// Unplaced desired-running VMs ([`Vm::is_waiting`]).
    waiting: &'q BTreeSet<String>,
    /// Placed VMs observed failed ([`Vm::is_failed`]).
    failed: &'q BTreeSet<String>,
}

fn plan_queued(
    state: &State,
    policy: &Policy,
    fenced: &BTreeSet<NodeId>,
    changed: Option<&BTreeSet<String>>,
    memo: &mut Memo,
    queues: Queues<'_>,
) -> Vec<Decision> {
    let changed = changed.filter(|changed| memo.follow(changed));
    if changed.is_none() {
        *memo = Memo { planned: true, ..Memo::default() };
    }
    let mut planner = Planner { state, model: Model::new(state), policy, fenced, out: Vec::new() };
    planner.clear_fenced_handoffs();
    planner.reschedule_fenced();
    planner.reschedule_failed(queues.failed);
    planner.place_unplaced(memo, changed, queues.waiting);
    planner.drain();
    planner.out
}

/// Why VM `vm` is not running, in one line, for `vm status`: for an unplaced
/// VM, what each host lacks ("no host fits: h1 lacks its runner, h2 has 1 of
/// 2 vcpu free, h3 is draining").
pub fn why_pending(state: &State, policy: &Policy, vm: &str) -> String {
    Explainer::new(state, policy).explain(vm)
}

/// [`why_pending`] for many VMs of one state (the dashboard's reasons
/// column): the hosts' model is built once, so each VM costs one pass over
/// the hosts.
pub struct Explainer<'s> {
    state: &'s State,
    policy: &'s Policy,
    model: Model<'s>,
}

impl<'s> Explainer<'s> {
    pub fn new(state: &'s State, policy: &'s Policy) -> Self {
        Explainer { state, policy, model: Model::new(state) }
    }

    /// Why `vm` is not running (see [`why_pending`]).
    pub fn explain(&mut self, vm: &str) -> String {
        let (state, policy) = (self.state, self.policy);
        let model = &mut self.model;
        let Some(vm) = state.vm(vm) else {
            return format!("no VM named {vm:?}");
        };
        let v = model.slot(vm);
        let view = model.views[v];
        let vm = model.vms[v];
        if let Some(handoff) = view.handoff {
            return format!("waiting for {} to stop its copy (handoff)", model.node_name(handoff.from));
        }
        if let Some(node) = view.placement {
            let name = model.node_name(node);
            return match state.member(node) {
                Some(m) if m.status == MemberStatus::Down && vm.spec.desired == Desired::Running => {
                    if vm.spec.failover == Failover::Manual {
                        format!(
                            "{name} is down and failover is manual: once {name} is known to be dead, move it with \
                             `blixard-agent vm recover {} --to NODE`",
                            vm.name
                        )
                    } else if let Some((i, _)) = model.best_host(v, policy.strategy) {
                        format!(
                            "{name} is down; it moves to {} once {name} has certainly fenced itself (reschedule_after)",
                            model.hosts[i].member.name
                        )
                    } else {
                        format!("{name} is down; cannot fail over: {}", no_host(model, v, vm, Some(node)))
                    }
                }
                Some(m) if m.status == MemberStatus::Down => format!("placed on {name}, which is down"),
                _ if vm.spec.desired == Desired::Stopped => {
                    format!("placed on {name}, desired stopped")
                }
                _ => format!("placed on {name}"),
            };
        }
        if vm.spec.desired == Desired::Stopped {
            return "not placed: desired stopped".into();
        }
        if let Some((i, _)) = model.best_host(v, policy.strategy) {
            return format!("{} fits ({}); waiting for the scheduler", model.hosts[i].member.name, policy.strategy);
        }
        format!("no host fits: {}", no_host(model, v, vm, None))
    }
}

/// Why no host fits VM `v` (after "no host fits: "), leaving out `except`
/// (the down host it is on).
fn no_host(model: &Model<'_>, v: usize, vm: &Vm, except: Option<NodeId>) -> String {
    if model.hosts.is_empty() {
        return "the cluster has no members".into();
    }
    if let Some(pinned) = &vm.spec.node {
        return match model.host_index.get(pinned.as_str()) {
            None => format!("pinned to {pinned}, which is not a member"),
            Some(&i) => {
                format!("pinned to {pinned}, which {}", model.misfit(v, i).map_or("fits".into(), |m| m.describe(vm)))
            }
        };
    }
    let misfits: Vec<(String, Misfit)> = (0..model.hosts.len())
        .filter(|&i| Some(model.hosts[i].member.id) != except)
        .filter_map(|i| model.misfit(v, i).map(|m| (model.hosts[i].member.name.clone(), m)))
        .collect();
    if misfits.is_empty() {
        return "no other host is a member".into();
    }
    summarise(vm, &misfits)
}

/// Hosts listed by name in a `why_pending` line; beyond this, hosts are
/// counted per reason with a few examples.
const WHY_HOSTS_LISTED_MAX: usize = 8;
const WHY_EXAMPLES_MAX: usize = 3;

fn summarise(vm: &Vm, misfits: &[(String, Misfit)]) -> String {
    if misfits.len() <= WHY_HOSTS_LISTED_MAX {
        let parts: Vec<String> = misfits.iter().map(|(name, m)| format!("{name} {}", m.describe(vm))).collect();
        return parts.join(", ");
    }
    let mut by_kind: BTreeMap<&'static str, Vec<&(String, Misfit)>> = BTreeMap::new();
    for misfit in misfits {
        by_kind.entry(misfit.1.kind()).or_default().push(misfit);
    }
    let mut groups: Vec<_> = by_kind.into_iter().collect();
    groups.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(b.0)));
    let parts: Vec<String> = groups
        .iter()
        .map(|(kind, hosts)| {
            let examples: Vec<String> =
                hosts.iter().take(WHY_EXAMPLES_MAX).map(|(name, m)| format!("{name} {}", m.describe(vm))).collect();
            let more = if hosts.len() > WHY_EXAMPLES_MAX { ", ..." } else { "" };
            format!("{} hosts {kind} ({}{more})", hosts.len(), examples.join(", "))
        })
        .collect();
    parts.join("; ")
}

/// Why one host cannot take one VM, in the order `State::apply` checks.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Misfit {
    Down,
    Draining,
    Runner,
    Pinned(String),
    Label {
        key: String,
        value: String,
    },
    AntiAffinity {
        group: String,
    },
    Capacity {
        resource: &'static str,
        needed: u64,
        free: u64,
    },
    /// The VM kept failing there.
    FailedThere,
}

impl Misfit {
    /// A phrase following the host's name.
    fn describe(&self, vm: &Vm) -> String {
        match self {
            Misfit::Down => "is down".into(),
            Misfit::Draining => "is draining".into(),
            Misfit::Runner => format!("lacks the runner for {}", vm.name),
            Misfit::Pinned(node) => format!("is not {node}"),
            Misfit::Label { key, value } => format!("lacks label {key}={value}"),
            Misfit::AntiAffinity { group } => format!("already has a VM of group {group}"),
            Misfit::Capacity { resource, needed, free } => format!("has {free} of {needed} {resource} free"),
            Misfit::FailedThere => "is where it kept failing".into(),
        }
    }

    /// A reason category, for counting hosts.
    fn kind(&self) -> &'static str {
        match self {
            Misfit::Down => "are down",
            Misfit::Draining => "are draining",
            Misfit::Runner => "lack the runner",
            Misfit::Pinned(_) => "are not the pinned host",
            Misfit::Label { .. } => "lack a label",
            Misfit::AntiAffinity { .. } => "already have a VM of its anti-affinity group",
            Misfit::Capacity { resource: "vcpu", .. } => "have too few vcpu free",
            Misfit::Capacity { .. } => "have too little memory free",
            Misfit::FailedThere => "are where it kept failing",
        }
    }
}

/// A VM's placement as the plan has changed it so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct View {
    placement: Option<NodeId>,
    generation: u64,
    handoff: Option<Handoff>,
}

impl View {
    fn of(vm: &Vm) -> View {
        View { placement: vm.placement.map(|p| p.node), generation: vm.generation, handoff: vm.handoff }
    }
}

#[derive(Debug)]
struct Host<'s> {
    member: &'s Member,
    accepts: bool,
    limit: Resources,
    /// Placed VMs plus reservations of pending handoffs, as `State::used_on`.
    used: Resources,
    /// Anti-affinity groups of the VMs placed here, with their count.
    groups: BTreeMap<&'s str, u32>,
}

/// The scheduler's incremental copy of what `State::apply` checks. The
/// hosts' usage starts from the state's host index; VMs enter the model
/// only when the plan looks at them (a slot each), so a plan costs the VMs
/// it considers, not every VM.
struct Model<'s> {
    state: &'s State,
    hosts: Vec<Host<'s>>,
    /// Host index by node id and by name; hosts are in name order.
    host_by_id: BTreeMap<NodeId, usize>,
    host_index: BTreeMap<&'s str, usize>,
    /// The VMs the plan has looked at, by slot, with their current view.
    vms: Vec<&'s Vm>,
    views: Vec<View>,
    slot_of: HashMap<&'s str, usize>,
    /// `best_host`'s scratch space, kept to spare an allocation per VM.
    ranked: RefCell<Vec<Reverse<(u64, usize)>>>,
}

/// Fixed-point scale of a load fraction.
const LOAD_SCALE: u64 = 1_000_000;

impl<'s> Model<'s> {
    fn new(state: &'s State) -> Self {
        let mut members: Vec<&Member> = state.members().values().collect();
        members.sort_by(|a, b| a.name.cmp(&b.name));
        let hosts: Vec<Host> = members
            .into_iter()
            .map(|member| {
                let usage = state.usage_on(member.id);
                Host {
                    member,
                    accepts: member.accepts_placements(),
                    limit: member.capacity.limit(),
                    used: usage.map(|u| u.used).unwrap_or_default(),
                    groups: usage
                        .into_iter()
                        .flat_map(|u| u.groups.iter().map(|(group, count)| (group.as_str(), *count)))
                        .collect(),
                }
            })
            .collect();
        let host_by_id = hosts.iter().enumerate().map(|(i, h)| (h.member.id, i)).collect();
        let host_index = hosts.iter().enumerate().map(|(i, h)| (h.member.name.as_str(), i)).collect();
        Model {
            state,
            hosts,
            host_by_id,
            host_index,
            vms: Vec::new(),
            views: Vec::new(),
            slot_of: HashMap::new(),
            ranked: RefCell::default(),
        }
    }

    /// VM `vm`'s slot, entering it into the model as the state has it (the
    /// hosts' usage already counts it).
    fn slot(&mut self, vm: &'s Vm) -> usize {
        *self.slot_of.entry(vm.name.as_str()).or_insert_with(|| {
            self.vms.push(vm);
            self.views.push(View::of(vm));
            self.vms.len() - 1
        })
    }

    /// VM `vm`'s view, without entering it.
    fn view_of(&self, vm: &Vm) -> View {
        self.slot_of.get(vm.name.as_str()).map_or_else(|| View::of(vm), |&v| self.views[v])
    }

    fn node_name(&self, node: NodeId) -> String {
        self.host_by_id.get(&node).map_or_else(|| format!("node {node}"), |&i| self.hosts[i].member.name.clone())
    }

    fn member(&self, node: NodeId) -> Option<&'s Member> {
        self.host_by_id.get(&node).map(|&i| self.hosts[i].member)
    }

    /// Adds (or removes) VM `v`'s current view to (from) the hosts' usage.
    fn count(&mut self, v: usize, add: bool) {
        let vm = self.vms[v];
        let view = self.views[v];
        let mut change = |host: Option<&usize>, r: Resources, group: Option<&'s str>| {
            let Some(&i) = host else { return };
            let h = &mut self.hosts[i];
            h.used.tally(r, add);
            if let Some(group) = group {
                tally_count(&mut h.groups, group, add);
            }
        };
        if let Some(node) = view.placement {
            change(self.host_by_id.get(&node), vm.size(), vm.spec.anti_affinity.as_deref());
        }
        if let Some(handoff) = view.handoff {
            change(self.host_by_id.get(&handoff.from), handoff.reserved, None);
        }
    }

    fn set_view(&mut self, v: usize, view: View) {
        self.count(v, false);
        self.views[v] = view;
        self.count(v, true);
    }

    /// What VM `v` itself uses on host `i` (its placement and reservation),
    /// which does not count against itself.
    fn own_use(&self, v: usize, i: usize) -> Resources {
        let id = self.hosts[i].member.id;
        let view = &self.views[v];
        let mut own = Resources::default();
        if view.placement == Some(id) {
            own = self.vms[v].size();
        }
        if let Some(h) = view.handoff.filter(|h| h.from == id) {
            own.vcpu += h.reserved.vcpu;
            own.memory_mib += h.reserved.memory_mib;
        }
        own
    }

    /// Host `i`'s usage after placing VM `v` there, if it fits.
    fn used_after(&self, v: usize, i: usize) -> Result<Resources, Misfit> {
        let h = &self.hosts[i];
        let own = self.own_use(v, i);
        let size = self.vms[v].size();
        let used = Resources { vcpu: h.used.vcpu - own.vcpu, memory_mib: h.used.memory_mib - own.memory_mib };
        let checks = [
            ("vcpu", size.vcpu, used.vcpu, h.limit.vcpu),
            ("MiB of memory", size.memory_mib, used.memory_mib, h.limit.memory_mib),
        ];
        for (resource, needed, used, limit) in checks {
            if used + needed > limit {
                return Err(Misfit::Capacity { resource, needed, free: limit.saturating_sub(used) });
            }
        }
        Ok(Resources { vcpu: used.vcpu + size.vcpu, memory_mib: used.memory_mib + size.memory_mib })
    }

    /// The constraints other than status and capacity, in apply's order.
    fn constraint_misfit(&self, v: usize, i: usize) -> Option<Misfit> {
        let vm = self.vms[v];
        let h = &self.hosts[i];
        if !h.member.runners.contains(&vm.name) {
            return Some(Misfit::Runner);
        }
        if let Some(pinned) = &vm.spec.node
            && *pinned != h.member.name
        {
            return Some(Misfit::Pinned(pinned.clone()));
        }
        for (key, value) in &vm.spec.labels {
            if h.member.labels.get(key) != Some(value) {
                return Some(Misfit::Label { key: key.clone(), value: value.clone() });
            }
        }
        if let Some(group) = &vm.spec.anti_affinity {
            let own = u32::from(self.views[v].placement == Some(h.member.id));
            if h.groups.get(group.as_str()).copied().unwrap_or(0) > own {
                return Some(Misfit::AntiAffinity { group: group.clone() });
            }
        }
        None
    }

    /// The first reason host `i` refuses VM `v`, as `State::apply` would,
    /// plus the scheduler's own rule: not where the VM kept failing.
    fn misfit(&self, v: usize, i: usize) -> Option<Misfit> {
        let member = self.hosts[i].member;
        if member.status == MemberStatus::Down {
            return Some(Misfit::Down);
        }
        if member.drain {
            return Some(Misfit::Draining);
        }
        if self.vms[v].failed_on.contains(&member.id) {
            return Some(Misfit::FailedThere);
        }
        self.constraint_misfit(v, i).or_else(|| self.used_after(v, i).err())
    }

    fn load(&self, i: usize, used: Resources) -> u64 {
        let limit = self.hosts[i].limit;
        // A host with no capacity of a kind counts as full of it.
        let fraction = |used: u64, limit: u64| (used * LOAD_SCALE).checked_div(limit).unwrap_or(LOAD_SCALE);
        fraction(used.vcpu, limit.vcpu) + fraction(used.memory_mib, limit.memory_mib)
    }

    /// Whether host `i` satisfies VM `v`'s constraints other than status
    /// and capacity: [`Model::constraint_misfit`] is `None`, checked with
    /// the runner (a lookup among maybe thousands of names) last.
    fn fits_constraints(&self, v: usize, i: usize) -> bool {
        let vm = self.vms[v];
        let h = &self.hosts[i];
        vm.spec.node.as_ref().is_none_or(|pinned| *pinned == h.member.name)
            && vm.spec.labels.iter().all(|(key, value)| h.member.labels.get(key) == Some(value))
            && vm.spec.anti_affinity.as_ref().is_none_or(|group| {
                let own = u32::from(self.views[v].placement == Some(h.member.id));
                h.groups.get(group.as_str()).copied().unwrap_or(0) <= own
            })
            && h.member.runners.contains(&vm.name)
    }

    /// The host the strategy picks for VM `v`, with its usage after placing.
    fn best_host(&self, v: usize, strategy: Strategy) -> Option<(usize, Resources)> {
        if self.state.runner_hosts(&self.vms[v].name) == 0 {
            // No host has its runner (the state counts them at apply).
            return None;
        }
        if let Some(pinned) = &self.vms[v].spec.node {
            let i = *self.host_index.get(pinned.as_str())?;
            if self.misfit(v, i).is_some() {
                return None;
            }
            return self.used_after(v, i).ok().map(|used| (i, used));
        }
        // The winner is the passing host with the best (load, name order):
        // rank every host that passes the cheap checks, then check the
        // costlier constraints in rank order, stopping at the first host
        // that passes them, usually one of the first few.
        let mut ranked = std::mem::take(&mut *self.ranked.borrow_mut());
        ranked.clear();
        for i in 0..self.hosts.len() {
            if !self.hosts[i].accepts || self.vms[v].failed_on.contains(&self.hosts[i].member.id) {
                continue;
            }
            let Ok(used) = self.used_after(v, i) else {
                continue;
            };
            let load = self.load(i, used);
            let rank = match strategy {
                Strategy::Spread => load,
                Strategy::Binpack => u64::MAX - load,
            };
            ranked.push(Reverse((rank, i)));
        }
        let mut heap = BinaryHeap::from(ranked);
        let mut best = None;
        while let Some(Reverse((_, i))) = heap.pop() {
            if self.fits_constraints(v, i) {
                best = self.used_after(v, i).ok().map(|used| (i, used));
                break;
            }
        }
        *self.ranked.borrow_mut() = heap.into_vec();
        best
    }
}

struct Planner<'s, 'p> {
    state: &'s State,
    model: Model<'s>,
    policy: &'p Policy,
    fenced: &'p BTreeSet<NodeId>,
    out: Vec<Decision>,
}

impl<'s> Planner<'s, '_> {
    fn room(&self, decisions: usize) -> bool {
        self.out.len() + decisions <= self.policy.decisions_max
    }

    /// Whether `node` has fenced itself: in the detector's set, and down or
    /// no longer a member (as `ClearHandoff` requires).
    fn is_fenced(&self, node: NodeId) -> bool {
        self.fenced.contains(&node) && self.model.member(node).is_none_or(|m| m.status == MemberStatus::Down)
    }

    /// The hosts in the detector's set that have fenced themselves.
    fn fenced_hosts(&self) -> Vec<NodeId> {
        self.fenced.iter().copied().filter(|&node| self.is_fenced(node)).collect()
    }

    /// Slots of `vms`, in name order.
    fn slots_by_name(&mut self, vms: impl IntoIterator<Item = &'s Vm>) -> Vec<usize> {
        let mut vms: Vec<&'s Vm> = vms.into_iter().collect();
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        vms.dedup_by(|a, b| a.name == b.name);
        vms.into_iter().map(|vm| self.model.slot(vm)).collect()
    }

    fn clear_handoff(&mut self, v: usize, reason: String) {
        let mut view = self.model.views[v];
        let from = view.handoff.expect("caller checked").from;
        view.handoff = None;
        self.model.set_view(v, view);
        self.out.push(Decision {
            command: CommandKind::ClearHandoff {
                vm: self.model.vms[v].name.clone(),
                from,
                expected_generation: view.generation,
            },
            reason,
        });
    }

    fn clear_fenced_handoffs(&mut self) {
        let state = self.state;
        let fenced = self.fenced_hosts();
        let vms = self.slots_by_name(fenced.iter().flat_map(|&node| state.handoffs_from(node).map(|(vm, _)| vm)));
        for v in vms {
            let Some(handoff) = self.model.views[v].handoff else {
                continue;
            };
            // A manual VM's copy there is not fenced: only `vm recover` ends it.
            if !self.is_fenced(handoff.from) || self.model.vms[v].spec.failover == Failover::Manual || !self.room(1) {
                continue;
            }
            let from = self.model.node_name(handoff.from);
            let reason = format!(
                "cleared the handoff of {} from {from}: {from} is down and has fenced itself",
                self.model.vms[v].name
            );
            self.clear_handoff(v, reason);
        }
    }

    /// Places VM `v` on host `i` (usage after: `used`), updating the model
    /// as `State::apply` would.
    fn place(&mut self, v: usize, i: usize, used: Resources, why: Option<String>) {
        let vm = self.model.vms[v];
        let old = self.model.views[v];
        let node = self.model.hosts[i].member.id;
        // As `apply::handoff_after_leaving`: a pending handoff keeps its
        // host; else the host left becomes it; arriving there ends it.
        let handoff = old
            .handoff
            .or_else(|| old.placement.map(|from| Handoff { from, generation: old.generation, reserved: vm.size() }))
            .filter(|h| h.from != node);
        let view = View { placement: Some(node), generation: old.generation + 1, handoff };
        self.model.set_view(v, view);
        let host = &self.model.hosts[i];
        let what = match (&why, old.placement) {
            (Some(why), Some(from)) => {
                format!("moved {} from {} to {} ({why}", vm.name, self.model.node_name(from), host.member.name)
            }
            _ => format!("placed {} on {} (", vm.name, host.member.name),
        };
        let reason = format!(
            "{what}{}{}): {} of {} vcpu and {} of {} MiB used after placement",
            if why.is_some() { "; " } else { "" },
            self.policy.strategy,
            used.vcpu,
            host.limit.vcpu,
            used.memory_mib,
            host.limit.memory_mib,
        );
        self.out.push(Decision {
            command: CommandKind::Place { vm: vm.name.clone(), node, expected_generation: old.generation },
            reason,
        });
    }

    /// Moves the desired-running VMs off fenced hosts.
    fn reschedule_fenced(&mut self) {
        let state = self.state;
        let fenced = self.fenced_hosts();
        let vms = self.slots_by_name(fenced.iter().flat_map(|&node| state.vms_on(node)));
        for v in vms {
            let view = self.model.views[v];
            let Some(from) = view.placement else { continue };
            let spec = &self.model.vms[v].spec;
            // A manual VM waits for `vm recover`: its host never fences it.
            if view.handoff.is_some()
                || spec.desired != Desired::Running
                || spec.failover == Failover::Manual
                || !self.is_fenced(from)
            {
                continue;
            }
            if !self.room(2) {
                return;
            }
            let Some((i, used)) = self.model.best_host(v, self.policy.strategy) else {
                continue;
            };
            let from_name = self.model.node_name(from);
            self.place(v, i, used, Some(format!("{from_name} is down and fenced")));
            let reason = format!(
                "cleared the handoff of {} from {from_name}: {from_name} is down and has fenced itself",
                self.model.vms[v].name
            );
            self.clear_handoff(v, reason);
        }
    }

    /// Moves VMs whose host gave up on them (observed `failed` there) to a
    /// host where they have not failed. One that fits nowhere else stays
    /// failed where it is.
    fn reschedule_failed(&mut self, failed: &BTreeSet<String>) {
        let state = self.state;
        let vms = self.slots_by_name(failed.iter().filter_map(|name| state.vm(name)));
        for v in vms {
            let view = self.model.views[v];
            let vm = self.model.vms[v];
            let Some(from) = view.placement else { continue };
            if view.handoff.is_some()
                || vm.spec.desired != Desired::Running
                || vm.observed.state != VmState::Failed
                || !vm.failed_on.contains(&from)
                || vm.placement.map(|p| p.node) != Some(from)
            {
                continue;
            }
            if !self.room(1) {
                return;
            }
            let Some((i, used)) = self.model.best_host(v, self.policy.strategy) else {
                continue;
            };
            let from_name = self.model.node_name(from);
            self.place(v, i, used, Some(format!("it kept failing on {from_name}")));
        }
    }

    /// Places unplaced desired-running VMs, largest first, skipping those
    /// `memo` knows fit nowhere (see [`Memo`]).
    fn place_unplaced(&mut self, memo: &mut Memo, changed: Option<&BTreeSet<String>>, waiting: &BTreeSet<String>) {
        let state = self.state;
        let mut skipping = changed.is_some() && memo.holds_for(state, &self.model.hosts);
        let mut vms: Vec<&'s Vm> = match changed.filter(|_| skipping) {
            Some(changed) => memo_queue(state, memo.open.iter().chain(changed).filter(|name| waiting.contains(*name))),
            None => {
                memo.blocked.clear();
                memo_queue(state, waiting.iter())
            }
        };
        memo.open.clear();
        // The most each host used while a VM was found to fit nowhere.
        let mut peak = Peak::default();
        let mut next = 0;
        while let Some(&vm) = vms.get(next) {
            next += 1;
            if !self.room(1) {
                memo.open.extend(vms[next - 1..].iter().map(|vm| vm.name.clone()));
                break;
            }
            let v = self.model.slot(vm);
            let Some((i, used)) = self.model.best_host(v, self.policy.strategy) else {
                memo.blocked.insert(vm.name.clone());
                continue;
            };
            // Back on the host it is handing off from, the VM ends its
            // handoff: that host's usage may drop, and VMs found blocked
            // above it in the order may fit now.
            let frees = self.model.views[v].handoff.is_some_and(|h| h.from == self.model.hosts[i].member.id);
            if frees {
                peak.fold(&self.model.hosts);
            }
            self.place(v, i, used, None);
            memo.open.insert(vm.name.clone());
            if frees && skipping {
                // The rest of the queue is considered in full.
                vms = memo_queue(state, waiting.iter());
                vms.retain(|w| wait_order(w) > wait_order(vm));
                for w in &vms {
                    memo.blocked.remove(&w.name);
                }
                next = 0;
                skipping = false;
            }
        }
        peak.fold(&self.model.hosts);
        memo.mark(state, &self.model.hosts, peak);
    }

    /// Moves one VM off each draining host whose previous move has settled.
    fn drain(&mut self) {
        let draining = self.draining_hosts();
        if draining.is_empty() {
            return;
        }
        // Only the VMs with a handoff, the settling ones, those on draining
        // hosts and those this plan changed can count (the state indexes
        // the first three at apply): not every VM.
        let state = self.state;
        let mut looked: BTreeSet<&'s str> = self.model.vms.iter().map(|vm| vm.name.as_str()).collect();
        looked.extend(state.handoff_hosts().flat_map(|node| state.handoffs_from(node)).map(|(vm, _)| vm.name.as_str()));
        looked.extend(state.settling_vms().iter().map(String::as_str));
        looked.extend(draining.iter().flat_map(|&node| state.vms_on(node)).map(|vm| vm.name.as_str()));
        let mut busy = BTreeSet::new();
        let mut candidates: BTreeMap<NodeId, Vec<&'s Vm>> = BTreeMap::new();
        for vm in looked.into_iter().filter_map(|name| state.vm(name)) {
            self.file_for_drain(vm, &draining, &mut busy, &mut candidates);
        }
        self.move_off_draining(&busy, candidates);
    }

    /// The up hosts that drain.
    fn draining_hosts(&self) -> BTreeSet<NodeId> {
        let hosts = self.model.hosts.iter();
        hosts.filter(|h| h.member.drain && h.member.status == MemberStatus::Up).map(|h| h.member.id).collect()
    }

    /// Files VM `vm` for the drain: the hosts its handoff or its settling
    /// move keep `busy`, and the drain's `candidates` if it is on a
    /// draining host.
    fn file_for_drain(
        &self,
        vm: &'s Vm,
        draining: &BTreeSet<NodeId>,
        busy: &mut BTreeSet<NodeId>,
        candidates: &mut BTreeMap<NodeId, Vec<&'s Vm>>,
    ) {
        let view = self.model.view_of(vm);
        if let Some(h) = view.handoff {
            busy.insert(h.from);
        }
        if let Some(from) = vm.moved_from
            && view.placement.is_some_and(|node| Some(node) == vm.placement.map(|p| p.node))
            && vm.spec.desired == Desired::Running
            && matches!(vm.observed.state, VmState::Pending | VmState::Starting)
        {
            busy.insert(from);
        }
        if let Some(node) = view.placement
            && view.handoff.is_none()
            && draining.contains(&node)
        {
            candidates.entry(node).or_default().push(vm);
        }
    }

    /// Moves one VM (the first in `candidates`' order that fits elsewhere)
    /// off each draining host not `busy` with an earlier move.
    fn move_off_draining(&mut self, busy: &BTreeSet<NodeId>, candidates: BTreeMap<NodeId, Vec<&'s Vm>>) {
        for (node, vms) in candidates {
            if busy.contains(&node) {
                continue;
            }
            let why = format!("{} is draining", self.model.node_name(node));
            for vm in vms {
                if !self.room(1) {
                    return;
                }
                let v = self.model.slot(vm);
                if let Some((i, used)) = self.model.best_host(v, self.policy.strategy) {
                    self.place(v, i, used, Some(why));
                    break;
                }
            }
        }
    }
}

/// Where a waiting VM goes in the queue: larger first (vcpu, then memory),
/// equal sizes by name.
fn wait_order(vm: &Vm) -> (std::cmp::Reverse<(u32, u64)>, &str) {
    (std::cmp::Reverse((vm.spec.vcpu, vm.spec.memory_mib)), vm.name.as_str())
}

/// The VMs named, in queue order, each once.
fn memo_queue<'s, 'n>(state: &'s State, names: impl Iterator<Item = &'n String>) -> Vec<&'s Vm> {
    let mut vms: Vec<&'s Vm> = names.filter_map(|name| state.vm(name)).collect();
    vms.sort_by(|a, b| wait_order(a).cmp(&wait_order(b)));
    vms.dedup_by(|a, b| a.name == b.name);
    vms
}

/// What one plan learned that the next can reuse: which waiting VMs fit on
/// no host. Such a VM still fits nowhere as long as it is unchanged and no
/// host has become any more able to take it: the same members with the same
/// status, drain, runners, labels and capacity, each using at least what it
/// used, and holding at least the anti-affinity groups it held, when the VM
/// was found to fit nowhere. [`plan_with`] then leaves those VMs out, so
/// thousands of VMs waiting for a runner cost a plan nothing after the
/// first. Any other change (a VM deleted or stopped on some host, a handoff
/// released, a member changed, a decision lost) makes the next plan
/// consider every waiting VM again.
///
/// The plan's queues (the waiting VMs and the failed ones) are not the
/// memo's: the state keeps them at apply on every member
/// (`State::waiting_vms`, `State::failed_vms`), so a new leader's first
/// plan, with a fresh memo, visits those VMs and not every VM.
#[derive(Debug, Default)]
pub struct Memo {
    /// Whether a plan ran with this memo (else `changed` means nothing).
    planned: bool,
    /// Waiting VMs that fit on no host at the last plan.
    blocked: HashSet<String>,
    /// Waiting VMs the last plan placed or did not reach: considered again.
    open: BTreeSet<String>,
    /// The hosts as they were when the last plan found VMs blocked; `None`:
    /// no plan yet.
    hosts: Option<Vec<HostMark>>,
    /// The state's `member_epoch` then: the members are the same, in every
    /// field, while it is.
    member_epoch: u64,
}

#[derive(Debug, PartialEq, Eq)]
struct HostMark {
    id: NodeId,
    used: Resources,
    groups: BTreeMap<String, u32>,
}

/// Each host's highest usage and group counts over some points of a plan.
#[derive(Debug, Default)]
struct Peak(Vec<(Resources, BTreeMap<String, u32>)>);

impl Peak {
    fn fold(&mut self, hosts: &[Host]) {
        self.0.resize_with(hosts.len(), Default::default);
        for ((used, groups), host) in self.0.iter_mut().zip(hosts) {
            used.vcpu = used.vcpu.max(host.used.vcpu);
            used.memory_mib = used.memory_mib.max(host.used.memory_mib);
            for (group, &count) in &host.groups {
                let held = groups.entry(group.to_string()).or_default();
                *held = (*held).max(count);
            }
        }
    }
}

impl Memo {
    /// Forgets what it learned about the VMs `changed` since the last
    /// plan; false when no plan ran with this memo (then it knows nothing).
    fn follow(&mut self, changed: &BTreeSet<String>) -> bool {
        if !self.planned {
            return false;
        }
        for name in changed {
            self.blocked.remove(name);
        }
        true
    }

    /// Whether the VMs found blocked still fit nowhere on `hosts` (unless
    /// they changed).
    fn holds_for(&self, state: &State, hosts: &[Host]) -> bool {
        let Some(marks) = &self.hosts else { return false };
        self.member_epoch == state.member_epoch()
            && marks.len() == hosts.len()
            && marks.iter().zip(hosts).all(|(mark, host)| {
                mark.id == host.member.id
                    && host.used.vcpu >= mark.used.vcpu
                    && host.used.memory_mib >= mark.used.memory_mib
                    && mark
                        .groups
                        .iter()
                        .all(|(group, &count)| host.groups.get(group.as_str()).is_some_and(|&c| c >= count))
            })
    }

    fn mark(&mut self, state: &State, hosts: &[Host], peak: Peak) {
        let marks =
            hosts.iter().zip(peak.0).map(|(h, (used, groups))| HostMark { id: h.member.id, used, groups }).collect();
        self.hosts = Some(marks);
        self.member_epoch = state.member_epoch();
    }

    /// How many waiting VMs the last plan found fit nowhere.
    pub fn blocked(&self) -> usize {
        self.blocked.len()
    }
}

#[cfg(test)]
mod tests;
