//! The replicated state machine: members, VMs and their placements.
//!
//! This is deterministic, pure code. Every agent applies the same committed
//! commands in the same order and must end in the same state, so nothing here
//! reads a clock, a random number generator, the environment or the disk.
//! Timestamps arrive inside commands (`Command::at_unix_ms`, set by the
//! proposer).
//!
//! Every command is validated when it is applied: a rejected command returns a
//! typed [`Rejection`] and changes nothing. The invariants that `validate`
//! checks after every step in the simulator:
//!
//! - every placement points at an existing member;
//! - on every member, the sum of the placed VMs' vcpu and memory, plus the
//!   copies reserved there by pending handoffs, stays within the member's
//!   capacity times its overcommit ratio;
//! - every placed VM's pinned node, labels, runner and anti-affinity group are
//!   satisfied by its host (a change that would break one unplaces the VM);
//! - a pending handoff is from a host other than the VM's current one, under
//!   an older generation; `moved_from` is set only on a placed VM and names
//!   another host;
//! - every name is valid.
//!
//! # Handoff: one VM never runs on two hosts
//!
//! A host runs a VM only if [`State::may_start`] says so: the VM is placed
//! there, desired running, and has no pending [`Handoff`]. Every command that
//! takes a VM off a host (a `Place` elsewhere, an `Unplace`, an unplacement
//! by a constraint change or a member's removal) records the old host as
//! `handoff.from`, unless a handoff is already pending: then the earlier
//! `from` is kept, because the hosts in between were never allowed to start
//! the VM and the earliest unconfirmed copy is the only one that can run.
//! Placing the VM back on `from` itself ends the handoff (that host's copy
//! is the one that should run). The handoff ends when `from` reports
//! `Released` (its reconciler stopped its copy of that generation) or when
//! the leader proposes `ClearHandoff` because `from` has been down long
//! enough to have fenced itself (`failure`); `ClearHandoff` is refused while
//! `from` is an up member. This holds for a move off a *down* host too: a
//! down host is not yet known to be fenced, so it gets a handoff like any
//! other and the leader clears it once `reschedule_after` has passed.
//! Deleting the VM drops its handoff (the old host's reconciler stops every
//! guest the state does not place on it).

mod apply;
pub mod codec;
mod types;

pub use apply::{Command, CommandKind, Effect, MembershipChange, Rejection};
pub use types::*;

use std::collections::{BTreeMap, BTreeSet};

/// The whole replicated state, as of some applied index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    members: BTreeMap<NodeId, Member>,
    vms: BTreeMap<String, Vm>,
    /// Join tokens by hash; expired ones are dropped whenever a token
    /// command is applied.
    join_tokens: BTreeMap<[u8; 32], JoinToken>,
    /// Derived from `vms`, never stored: per-host questions (what runs
    /// here, what is used here) cost that host's VMs, not every VM.
    index: HostIndex,
    /// Rows changed since the last [`State::take_dirty`]; the storage writes
    /// exactly these in the transaction that records the applied index.
    dirty: Dirty,
    /// VMs changed since the last [`State::take_vm_changes`], for the
    /// leader's scheduler.
    vm_changes: ChangeFeed,
    /// Counts member changes (see [`State::member_epoch`]).
    member_epoch: Epoch,
}

/// How many member changes a state has applied since it was made (loaded,
/// decoded or built): bookkeeping for the scheduler's memo, not part of the
/// state's value (two states compare equal whatever their counts).
#[derive(Debug, Clone, Copy, Default)]
struct Epoch(u64);

impl PartialEq for Epoch {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Epoch {}

/// Names of the VMs changed by applied commands, collected only while
/// someone reads them (the leader's scheduler), so followers keep nothing.
/// Bookkeeping for that reader, not part of the state's value: two states
/// compare equal whatever their feeds hold.
#[derive(Debug, Clone, Default)]
struct ChangeFeed(Option<BTreeSet<String>>);

impl PartialEq for ChangeFeed {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for ChangeFeed {}

/// Derived from `vms`, never stored: per-host questions (what runs here,
/// what is used here) cost that host's VMs, not every VM. Kept up to date
/// with every VM a command changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct HostIndex {
    /// For each host, the VMs placed on it.
    placed: BTreeMap<NodeId, BTreeSet<String>>,
    /// For each host, the VMs with a pending handoff from it.
    handoffs: BTreeMap<NodeId, BTreeSet<String>>,
    /// For each host with anything placed or reserved: what that uses.
    usage: BTreeMap<NodeId, HostUsage>,
    /// What the maps above hold for each placed or reserved VM, to undo it
    /// when the VM changes.
    of_vm: BTreeMap<String, Filed>,
    /// The scheduler's queues, so that a plan from scratch (a new leader's
    /// first) visits the VMs waiting to be placed and the failed ones, not
    /// every VM: unplaced desired-running VMs ([`Vm::is_waiting`]) ...
    waiting: BTreeSet<String>,
    /// ... and placed VMs observed failed ([`Vm::is_failed`]), and VMs
    /// moved and not yet started ([`Vm::is_settling`]), which a drain
    /// waits for.
    failed: BTreeSet<String>,
    settling: BTreeSet<String>,
    /// For each runner some member has, how many members have it: a VM
    /// whose runner no host has fits nowhere, found without a look at any
    /// host.
    runner_hosts: BTreeMap<String, u32>,
}

/// What the VMs placed on a host, and the copies reserved there by pending
/// handoffs, use of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostUsage {
    pub used: Resources,
    /// Anti-affinity groups of the VMs placed there, with their count.
    pub groups: BTreeMap<String, u32>,
}

/// One VM's contributions to the host index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Filed {
    placed: Option<(NodeId, Resources, Option<String>)>,
    handoff: Option<(NodeId, Resources)>,
}

impl Filed {
    fn of(vm: &Vm) -> Filed {
        Filed {
            placed: vm.placement.map(|p| (p.node, vm.size(), vm.spec.anti_affinity.clone())),
            handoff: vm.handoff.map(|h| (h.from, h.reserved)),
        }
    }
}

impl HostIndex {
    fn build(members: &BTreeMap<NodeId, Member>, vms: &BTreeMap<String, Vm>) -> HostIndex {
        let mut index = HostIndex::default();
        for vm in vms.values() {
            index.update(&vm.name, Some(vm));
        }
        for member in members.values() {
            index.count_runners(&member.runners, true);
        }
        index
    }

    /// Counts (or uncounts) one member's runners.
    fn count_runners(&mut self, runners: &BTreeSet<String>, add: bool) {
        for runner in runners {
            match self.runner_hosts.get_mut(runner) {
                Some(count) if add => *count += 1,
                Some(count) if *count > 1 => *count -= 1,
                Some(_) => {
                    self.runner_hosts.remove(runner);
                }
                None if add => {
                    self.runner_hosts.insert(runner.clone(), 1);
                }
                None => {}
            }
        }
    }

    /// Re-files VM `name` as it now is (`None`: deleted).
    fn update(&mut self, name: &str, vm: Option<&Vm>) {
        if let Some(old) = self.of_vm.remove(name) {
            self.file(name, &old, false);
        }
        let queues = [
            (&mut self.waiting, vm.is_some_and(Vm::is_waiting)),
            (&mut self.failed, vm.is_some_and(Vm::is_failed)),
            (&mut self.settling, vm.is_some_and(Vm::is_settling)),
        ];
        for (queue, member) in queues {
            if member {
                if !queue.contains(name) {
                    queue.insert(name.to_string());
                }
            } else {
                queue.remove(name);
            }
        }
        let Some(vm) = vm else { return };
        let new = Filed::of(vm);
        if new != Filed::default() {
            self.file(name, &new, true);
            self.of_vm.insert(name.to_string(), new);
        }
    }

    /// Adds (or removes) one VM's contributions.
    fn file(&mut self, name: &str, filed: &Filed, add: bool) {
        fn set(map: &mut BTreeMap<NodeId, BTreeSet<String>>, node: NodeId, name: &str, add: bool) {
            if add {
                map.entry(node).or_default().insert(name.to_string());
            } else if let Some(names) = map.get_mut(&node) {
                names.remove(name);
                if names.is_empty() {
                    map.remove(&node);
                }
            }
        }
        let mut use_on = |node: NodeId, r: Resources, group: Option<&String>| {
            let usage = self.usage.entry(node).or_default();
            usage.used.tally(r, add);
            if let Some(group) = group {
                tally_count(&mut usage.groups, group.clone(), add);
            }
            if *usage == HostUsage::default() {
                self.usage.remove(&node);
            }
        };
        if let Some((node, size, group)) = &filed.placed {
            use_on(*node, *size, group.as_ref());
        }
        if let Some((node, reserved)) = filed.handoff {
            use_on(node, reserved, None);
        }
        if let Some((node, ..)) = filed.placed {
            set(&mut self.placed, node, name, add);
        }
        if let Some((node, _)) = filed.handoff {
            set(&mut self.handoffs, node, name, add);
        }
    }
}

/// Keys of rows changed by applied commands (including deletions).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dirty {
    pub members: BTreeSet<NodeId>,
    pub vms: BTreeSet<String>,
    /// VMs changed by the command being applied, to re-file in the host
    /// index when it is done.
    reindex: BTreeSet<String>,
    /// The join tokens changed (they are stored as one small record).
    pub join_tokens: bool,
}

impl Dirty {
    /// Records that VM `name` changed (or was deleted).
    fn vm(&mut self, name: String) {
        self.reindex.insert(name.clone());
        self.vms.insert(name);
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty() && self.vms.is_empty() && !self.join_tokens
    }
}

impl State {
    /// A state holding only `members`: the bootstrap state every initial
    /// member derives from the same `initial_members` list.
    pub fn with_members(members: impl IntoIterator<Item = Member>) -> Self {
        let mut state = State::default();
        for member in members {
            state.dirty.members.insert(member.id);
            state.index.count_runners(&member.runners, true);
            state.members.insert(member.id, member);
        }
        state
    }

    /// Records that member `id` changed (or was added or removed).
    fn member_changed(&mut self, id: NodeId) {
        self.dirty.members.insert(id);
        self.member_epoch.0 += 1;
    }

    /// A number that grows with every member change applied to this state
    /// (a member added, removed, or any of its fields changed) and only
    /// then: equal numbers of one state mean the same members. Not
    /// replicated: it counts from wherever this state was made.
    pub fn member_epoch(&self) -> u64 {
        self.member_epoch.0
    }

    /// How many members report the runner of VM `vm` installed.
    pub fn runner_hosts(&self, vm: &str) -> u32 {
        self.index.runner_hosts.get(vm).copied().unwrap_or(0)
    }

    pub fn members(&self) -> &BTreeMap<NodeId, Member> {
        &self.members
    }

    /// The state to show for `vm`: its host's last report, except that a
    /// VM desired running on a host that is down is `Lost` (nobody knows
    /// whether it runs) until it moves or its host is back.
    pub fn vm_state(&self, vm: &Vm) -> VmState {
        let on_down_host =
            vm.placement.and_then(|p| self.member(p.node)).is_some_and(|m| m.status == MemberStatus::Down);
        if on_down_host && vm.spec.desired == Desired::Running { VmState::Lost } else { vm.observed.state }
    }

    pub fn member(&self, id: NodeId) -> Option<&Member> {
        self.members.get(&id)
    }

    pub fn member_by_name(&self, name: &str) -> Option<&Member> {
        self.members.values().find(|m| m.name == name)
    }

    pub fn vms(&self) -> &BTreeMap<String, Vm> {
        &self.vms
    }

    pub fn vm(&self, name: &str) -> Option<&Vm> {
        self.vms.get(name)
    }

    /// The join tokens not yet dropped (see [`JoinToken`]).
    pub fn join_tokens(&self) -> &BTreeMap<[u8; 32], JoinToken> {
        &self.join_tokens
    }

    /// VMs placed on `node`, by name.
    pub fn vms_on(&self, node: NodeId) -> impl Iterator<Item = &Vm> {
        self.index.placed.get(&node).into_iter().flatten().filter_map(|name| self.vms.get(name))
    }

    /// Re-files in the host index the VMs the last command changed.
    fn reindex(&mut self) {
        for name in std::mem::take(&mut self.dirty.reindex) {
            self.index.update(&name, self.vms.get(&name));
            if let Some(changes) = &mut self.vm_changes.0 {
                changes.insert(name);
            }
        }
    }

    /// The names of the VMs changed (created, updated, deleted) by commands
    /// applied since the last call; `None` when they were not collected
    /// since (this is the first call, or [`State::stop_vm_changes`] was
    /// called, or this state was replaced by a snapshot's). Collecting goes
    /// on from this call until `stop_vm_changes`.
    pub fn take_vm_changes(&mut self) -> Option<BTreeSet<String>> {
        self.vm_changes.0.replace(BTreeSet::new())
    }

    /// Stops collecting VM changes (see [`State::take_vm_changes`]).
    pub fn stop_vm_changes(&mut self) {
        self.vm_changes.0 = None;
    }

    /// Resources used on `node` by the VMs placed there and by the copies
    /// reserved there by pending handoffs, excluding VM `except` (both its
    /// placement and its reservation).
    pub fn used_on(&self, node: NodeId, except: Option<&str>) -> Resources {
        let mut used = self.index.usage.get(&node).map(|u| u.used).unwrap_or_default();
        if let Some(filed) = except.and_then(|name| self.index.of_vm.get(name)) {
            let own = [filed.placed.as_ref().map(|(n, size, _)| (*n, *size)), filed.handoff];
            for (n, r) in own.into_iter().flatten() {
                if n == node {
                    used.tally(r, false);
                }
            }
        }
        used
    }

    /// Unplaced desired-running VMs, by name: the scheduler's queue of VMs
    /// to place, from the index kept at apply.
    pub fn waiting_vms(&self) -> &BTreeSet<String> {
        &self.index.waiting
    }

    /// Placed VMs observed failed, by name: the scheduler's queue of VMs to
    /// look at moving, from the index kept at apply.
    pub fn failed_vms(&self) -> &BTreeSet<String> {
        &self.index.failed
    }

    /// VMs moved from another host that have not started yet
    /// ([`Vm::is_settling`]), by name, from the index kept at apply.
    pub fn settling_vms(&self) -> &BTreeSet<String> {
        &self.index.settling
    }

    /// What the VMs placed on `node` and the copies reserved there use.
    pub fn usage_on(&self, node: NodeId) -> Option<&HostUsage> {
        self.index.usage.get(&node)
    }

    /// Whether the reconciler on `node` may start VM `vm`: it is placed on
    /// `node`, desired running, and no other host may still run a copy
    /// (no pending handoff). See the module documentation.
    pub fn may_start(&self, vm: &str, node: NodeId) -> bool {
        self.vms.get(vm).is_some_and(|vm| vm.may_start_on(node))
    }

    /// The hosts that some pending handoff waits for, from the host index
    /// (the leader's failure detector asks every check interval).
    pub fn handoff_hosts(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.index.handoffs.keys().copied()
    }

    /// The VMs whose pending handoff waits for `node`: its reconciler stops
    /// its copy of each and then proposes `Released` with the handoff's
    /// generation.
    pub fn handoffs_from(&self, node: NodeId) -> impl Iterator<Item = (&Vm, Handoff)> {
        self.index
            .handoffs
            .get(&node)
            .into_iter()
            .flatten()
            .filter_map(|name| self.vms.get(name))
            .filter_map(move |vm| vm.handoff.filter(|h| h.from == node).map(|h| (vm, h)))
    }

    /// Why a VM named `vm` with `spec` could not be placed on `node` right
    /// now, by the rules `Place` applies, leaving out the runner (a host
    /// reports its runners once the guest is installed there, which may be
    /// after the VM is created) and drain/down. `None`: it fits. The API
    /// uses this to refuse a pinned VM that cannot fit before creating it.
    pub fn fit_violation(&self, vm: &str, spec: &VmSpec, node: NodeId) -> Option<Rejection> {
        match self.members.get(&node) {
            Some(member) => apply::fit_violation(self, vm, spec, member),
            None => Some(Rejection::UnknownNode(node)),
        }
    }

    /// Why VM `vm` with `spec` could not be placed on `node` now, by every
    /// rule `Place` applies but drain and down: [`State::fit_violation`]
    /// and the runner. `None`: it may be placed there.
    pub fn placement_violation(&self, vm: &str, spec: &VmSpec, node: NodeId) -> Option<Rejection> {
        let Some(member) = self.members.get(&node) else { return Some(Rejection::UnknownNode(node)) };
        if !member.runners.contains(vm) {
            return Some(Rejection::MissingRunner { vm: vm.to_string(), node: member.name.clone() });
        }
        apply::fit_violation(self, vm, spec, member)
    }

    /// VMs placed on `node` whose names come after `after` (all of them
    /// for `None`), in name order.
    pub fn vms_on_after<'a>(&'a self, node: NodeId, after: Option<&'a str>) -> impl Iterator<Item = &'a Vm> + 'a {
        use std::ops::Bound;
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.index
            .placed
            .get(&node)
            .into_iter()
            .flat_map(move |names| names.range::<str, _>((start, Bound::Unbounded)))
            .filter_map(|name| self.vms.get(name))
    }

    /// Takes the set of rows changed since the last call.
    pub fn take_dirty(&mut self) -> Dirty {
        std::mem::take(&mut self.dirty)
    }

    /// Inserts or replaces rows as read back from storage. Used only when a
    /// node opens its store; applied commands go through [`State::apply`].
    pub fn load(members: Vec<Member>, vms: Vec<Vm>, join_tokens: Vec<JoinToken>) -> Self {
        let vms: BTreeMap<String, Vm> = vms.into_iter().map(|v| (v.name.clone(), v)).collect();
        let members = members.into_iter().map(|m| (m.id, m)).collect();
        State {
            index: HostIndex::build(&members, &vms),
            members,
            vms,
            join_tokens: join_tokens.into_iter().map(|t| (t.hash, t)).collect(),
            dirty: Dirty::default(),
            vm_changes: ChangeFeed::default(),
            member_epoch: Epoch::default(),
        }
    }

    /// Checks the invariants listed in the module documentation.
    pub fn validate(&self) -> Result<(), String> {
        if self.index != HostIndex::build(&self.members, &self.vms) {
            return Err("the host index does not match the members' runners and the VMs' placements, handoffs and \
                        states"
                .into());
        }
        if self.join_tokens.len() > types::limits::JOIN_TOKENS_MAX {
            return Err(format!("{} join tokens kept, over the limit", self.join_tokens.len()));
        }
        for member in self.members.values() {
            crate::names::validate(&member.name).map_err(|e| format!("member {}: {e}", member.id))?;
            let used = self.used_on(member.id, None);
            let limit = member.capacity.limit();
            if used.vcpu > limit.vcpu || used.memory_mib > limit.memory_mib {
                return Err(format!("member {} is over capacity: used {used:?}, limit {limit:?}", member.name));
            }
        }
        for vm in self.vms.values() {
            crate::names::validate(&vm.name).map_err(|e| format!("vm: {e}"))?;
            if let Some(placement) = vm.placement {
                let member = self
                    .members
                    .get(&placement.node)
                    .ok_or_else(|| format!("vm {} is placed on unknown node {}", vm.name, placement.node))?;
                if placement.generation != vm.generation {
                    return Err(format!("vm {} placement generation differs from its generation", vm.name));
                }
                apply::constraint_violation(self, vm, &vm.spec, member)
                    .map_or(Ok(()), |r| Err(format!("vm {} breaks a constraint: {r}", vm.name)))?;
            }
            if let Some(handoff) = vm.handoff {
                if handoff.generation >= vm.generation {
                    return Err(format!(
                        "vm {} has a handoff from generation {} >= its own",
                        vm.name, handoff.generation
                    ));
                }
                if vm.placement.is_some_and(|p| p.node == handoff.from) {
                    return Err(format!("vm {} has a handoff from its own host {}", vm.name, handoff.from));
                }
            }
            if let Some(from) = vm.moved_from
                && vm.placement.is_none_or(|p| p.node == from)
            {
                return Err(format!("vm {} moved from {from} but is not placed on another host", vm.name));
            }
        }
        Ok(())
    }
}
