use super::*;
use crate::state::{Capacity, Command, Labels, MembershipChange, Placement, Rejection, VmSpec};
use proptest::prelude::{ProptestConfig, any, prop, prop_assert, prop_assert_eq, proptest};
use proptest::strategy::Strategy as _;

fn cmd(kind: CommandKind) -> Command {
    Command { at_unix_ms: 1, kind }
}

fn apply(state: &mut State, kind: CommandKind) -> Result<crate::state::Effect, Rejection> {
    state.apply(&cmd(kind))
}

/// Adds member `id` named `name` with `vcpu` / `memory_mib` and `runners`.
fn add_host(state: &mut State, id: NodeId, name: &str, vcpu: u32, memory_mib: u64, runners: &[&str]) {
    let add = MembershipChange::AddLearner { id, name: name.into(), address: format!("10.0.0.{id}:7000") };
    state.apply_membership(&add, 0).unwrap();
    state.apply_membership(&MembershipChange::Promote { id }, 0).unwrap();
    let capacity = Capacity { vcpu, memory_mib, ..Capacity::default() };
    apply(state, CommandKind::SetCapacity { node: id, capacity }).unwrap();
    let runners = runners.iter().map(|r| r.to_string()).collect();
    apply(state, CommandKind::SetRunners { node: id, runners }).unwrap();
}

const NAMES: [&str; 8] = ["a", "b", "c", "d", "e", "f", "g", "h"];

/// `n` hosts h1..hn with 8 vcpu and 8192 MiB each and every runner in NAMES.
fn hosts(n: u64) -> State {
    let mut state = State::default();
    for id in 1..=n {
        add_host(&mut state, id, &format!("h{id}"), 8, 8192, &NAMES);
    }
    state
}

fn spec(vcpu: u32, memory_mib: u64) -> VmSpec {
    VmSpec { vcpu, memory_mib, ..VmSpec::default() }
}

fn create(state: &mut State, name: &str, spec: VmSpec) {
    apply(state, CommandKind::CreateVm { name: name.into(), spec }).unwrap();
}

fn place(state: &mut State, vm: &str, node: NodeId) {
    let expected_generation = state.vm(vm).unwrap().generation;
    apply(state, CommandKind::Place { vm: vm.into(), node, expected_generation }).unwrap();
}

fn node_of(state: &State, vm: &str) -> Option<NodeId> {
    state.vm(vm).unwrap().placement.map(|p| p.node)
}

fn policy(strategy: Strategy) -> Policy {
    Policy { strategy, decisions_max: usize::MAX }
}

fn none() -> BTreeSet<NodeId> {
    BTreeSet::new()
}

/// Plans and applies every decision, asserting each applies cleanly and
/// keeps the invariants.
fn plan_and_apply(state: &mut State, policy: &Policy, fenced: &BTreeSet<NodeId>) -> Vec<Decision> {
    let decisions = plan(state, policy, fenced);
    for decision in &decisions {
        if let Err(r) = apply(state, decision.command.clone()) {
            panic!("{decision:?} was rejected: {r}\nstate: {state:#?}");
        }
        state.validate().unwrap();
    }
    decisions
}

/// What each host's reconciler would do: release handoffs from up hosts,
/// report VMs it may start as running.
fn reconcile(state: &mut State) {
    let vms: Vec<Vm> = state.vms().values().cloned().collect();
    for vm in &vms {
        if let Some(h) = vm.handoff
            && state.member(h.from).is_some_and(|m| m.status == MemberStatus::Up)
        {
            apply(state, CommandKind::Released { node: h.from, vm: vm.name.clone(), generation: h.generation })
                .unwrap();
        }
    }
    report_running(state);
}

/// Reports every VM that its up host may start as running.
fn report_running(state: &mut State) {
    let vms: Vec<Vm> = state.vms().values().cloned().collect();
    for vm in &vms {
        let Some(p) = vm.placement else { continue };
        let up = state.member(p.node).is_some_and(|m| m.status == MemberStatus::Up);
        if up && vm.may_start_on(p.node) && vm.observed.state != VmState::Running {
            let report = CommandKind::Report {
                node: p.node,
                vm: vm.name.clone(),
                generation: p.generation,
                state: VmState::Running,
                last_error: None,
            };
            apply(state, report).unwrap();
        }
    }
}

fn set_status(state: &mut State, node: NodeId, status: MemberStatus) {
    apply(state, CommandKind::SetStatus { node, status }).unwrap();
}

fn set_drain(state: &mut State, node: NodeId, drain: bool) {
    apply(state, CommandKind::SetDrain { node, drain }).unwrap();
}

#[test]
fn places_desired_running_vms_and_leaves_stopped_ones_unplaced() {
    let mut state = hosts(2);
    create(&mut state, "a", spec(2, 1024));
    create(&mut state, "b", VmSpec { desired: Desired::Stopped, ..spec(2, 1024) });
    let decisions = plan_and_apply(&mut state, &Policy::default(), &none());
    assert_eq!(decisions.len(), 1);
    assert!(node_of(&state, "a").is_some());
    assert_eq!(node_of(&state, "b"), None);
    assert_eq!(why_pending(&state, &Policy::default(), "b"), "not placed: desired stopped");
}

#[test]
fn spread_takes_the_least_loaded_host_and_binpack_the_most_loaded() {
    let mut state = hosts(3);
    create(&mut state, "a", spec(4, 1024));
    place(&mut state, "a", 2);
    create(&mut state, "b", spec(1, 1024));
    let decisions = plan(&state, &policy(Strategy::Spread), &none());
    assert_eq!(decisions[0].command, CommandKind::Place { vm: "b".into(), node: 1, expected_generation: 0 });
    assert_eq!(decisions[0].reason, "placed b on h1 (spread): 1 of 8 vcpu and 1024 of 8192 MiB used after placement");
    let decisions = plan(&state, &policy(Strategy::Binpack), &none());
    assert_eq!(decisions[0].command, CommandKind::Place { vm: "b".into(), node: 2, expected_generation: 0 });
    assert_eq!(decisions[0].reason, "placed b on h2 (binpack): 5 of 8 vcpu and 2048 of 8192 MiB used after placement");
}

#[test]
fn the_score_normalises_vcpu_and_memory() {
    // h1 is light on vcpu but nearly full on memory; spread prefers h2.
    let mut state = State::default();
    add_host(&mut state, 1, "h1", 8, 8192, &NAMES);
    add_host(&mut state, 2, "h2", 8, 8192, &NAMES);
    create(&mut state, "a", spec(1, 7000));
    create(&mut state, "b", spec(3, 1024));
    place(&mut state, "a", 1);
    place(&mut state, "b", 2);
    create(&mut state, "c", spec(1, 128));
    plan_and_apply(&mut state, &Policy::default(), &none());
    assert_eq!(node_of(&state, "c"), Some(2));
}

#[test]
fn ties_go_to_the_host_whose_name_sorts_first() {
    let mut state = State::default();
    add_host(&mut state, 7, "b-host", 8, 8192, &NAMES);
    add_host(&mut state, 3, "c-host", 8, 8192, &NAMES);
    add_host(&mut state, 9, "a-host", 8, 8192, &NAMES);
    create(&mut state, "a", spec(1, 128));
    for strategy in [Strategy::Spread, Strategy::Binpack] {
        let decisions = plan(&state, &policy(strategy), &none());
        assert_eq!(decisions[0].command, CommandKind::Place { vm: "a".into(), node: 9, expected_generation: 0 });
    }
}

#[test]
fn constraints_decide_where_a_vm_may_go() {
    let mut state = State::default();
    add_host(&mut state, 1, "h1", 8, 8192, &["b", "c", "d", "e"]); // lacks a's runner
    add_host(&mut state, 2, "h2", 8, 8192, &NAMES);
    add_host(&mut state, 3, "h3", 8, 8192, &NAMES);
    add_host(&mut state, 4, "h4", 8, 8192, &NAMES);
    let rack: Labels = [("rack".to_string(), "r1".to_string())].into();
    apply(&mut state, CommandKind::SetLabels { node: 3, labels: rack.clone() }).unwrap();
    create(&mut state, "a", spec(1, 128)); // runner: not h1
    create(&mut state, "b", VmSpec { labels: rack, ..spec(1, 128) }); // h3 only
    create(&mut state, "c", VmSpec { node: Some("h4".into()), ..spec(1, 128) }); // h4 only
    let group = |g: &str| VmSpec { anti_affinity: Some(g.into()), ..spec(1, 128) };
    create(&mut state, "d", group("g"));
    create(&mut state, "e", group("g"));
    create(&mut state, "f", spec(16, 128)); // fits nowhere
    plan_and_apply(&mut state, &policy(Strategy::Binpack), &none());
    assert_ne!(node_of(&state, "a"), Some(1));
    assert_eq!(node_of(&state, "b"), Some(3));
    assert_eq!(node_of(&state, "c"), Some(4));
    assert_ne!(node_of(&state, "d"), node_of(&state, "e"), "anti-affinity, even when binpacking");
    assert_eq!(node_of(&state, "f"), None);
    let why = why_pending(&state, &Policy::default(), "f");
    assert!(why.starts_with("no host fits: h1 lacks the runner for f, h2 has "), "{why}");
    assert!(why.ends_with(" of 16 vcpu free"), "{why}");
}

#[test]
fn overcommit_raises_the_limit() {
    let mut state = State::default();
    add_host(&mut state, 1, "h1", 4, 8192, &NAMES);
    let capacity = Capacity { vcpu: 4, memory_mib: 8192, vcpu_overcommit_pct: 200, memory_overcommit_pct: 100 };
    apply(&mut state, CommandKind::SetCapacity { node: 1, capacity }).unwrap();
    for name in ["a", "b", "c"] {
        create(&mut state, name, spec(3, 128));
    }
    plan_and_apply(&mut state, &Policy::default(), &none());
    assert_eq!(state.used_on(1, None).vcpu, 6, "two of three fit in 4 vcpu at 200%");
    assert!(why_pending(&state, &Policy::default(), "c").contains("has 2 of 3 vcpu free"));
}

#[test]
fn one_plan_never_overcommits_a_host() {
    let mut state = hosts(2);
    for name in ["a", "b", "c", "d", "e"] {
        create(&mut state, name, spec(3, 1024));
    }
    let decisions = plan_and_apply(&mut state, &Policy::default(), &none());
    assert_eq!(decisions.len(), 4, "two per host");
    assert_eq!(state.used_on(1, None).vcpu, 6);
    assert_eq!(state.used_on(2, None).vcpu, 6);
    assert_eq!(
        why_pending(&state, &Policy::default(), "e"),
        "no host fits: h1 has 2 of 3 vcpu free, h2 has 2 of 3 vcpu free"
    );
}

#[test]
fn larger_vms_are_placed_first() {
    let mut state = State::default();
    add_host(&mut state, 1, "h1", 4, 8192, &NAMES);
    create(&mut state, "a", spec(1, 128));
    create(&mut state, "b", spec(4, 128));
    plan_and_apply(&mut state, &Policy::default(), &none());
    assert_eq!(node_of(&state, "b"), Some(1));
    assert_eq!(node_of(&state, "a"), None);
}

#[test]
fn placement_is_stable() {
    let mut state = hosts(2);
    for name in ["a", "b", "c"] {
        create(&mut state, name, spec(2, 1024));
    }
    plan_and_apply(&mut state, &Policy::default(), &none());
    let before = state.clone();
    // A new, empty host is no reason to move anything; nor is a host that
    // is down but not yet fenced, nor a stopped VM.
    add_host(&mut state, 3, "h3", 64, 65536, &NAMES);
    set_status(&mut state, 1, MemberStatus::Down);
    apply(&mut state, CommandKind::SetDesired { name: "b".into(), desired: Desired::Stopped }).unwrap();
    assert_eq!(plan(&state, &Policy::default(), &none()), []);
    for name in ["a", "b", "c"] {
        assert_eq!(node_of(&state, name), node_of(&before, name));
    }
}

#[test]
fn vms_of_a_fenced_host_move_at_once_without_waiting_for_it() {
    let mut state = hosts(3);
    for name in ["a", "b", "c"] {
        create(&mut state, name, spec(2, 1024));
        place(&mut state, name, 1);
    }
    apply(&mut state, CommandKind::SetDesired { name: "c".into(), desired: Desired::Stopped }).unwrap();
    set_status(&mut state, 1, MemberStatus::Down);
    let fenced = BTreeSet::from([1]);
    let decisions = plan_and_apply(&mut state, &Policy::default(), &fenced);
    let kinds: Vec<&str> = decisions
        .iter()
        .map(|d| match d.command {
            CommandKind::Place { .. } => "place",
            CommandKind::ClearHandoff { .. } => "clear",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["place", "clear", "place", "clear"]);
    assert!(
        decisions[0].reason.starts_with("moved a from h1 to h2 (h1 is down and fenced; spread)"),
        "{}",
        decisions[0].reason
    );
    assert_eq!(decisions[1].reason, "cleared the handoff of a from h1: h1 is down and has fenced itself");
    for name in ["a", "b"] {
        let node = node_of(&state, name).unwrap();
        assert_ne!(node, 1);
        assert!(state.may_start(name, node), "{name} starts on {node} without h1's release");
    }
    assert_eq!(node_of(&state, "c"), Some(1), "a stopped VM stays on its host");
    // Started again, it moves.
    apply(&mut state, CommandKind::SetDesired { name: "c".into(), desired: Desired::Running }).unwrap();
    plan_and_apply(&mut state, &Policy::default(), &fenced);
    assert_ne!(node_of(&state, "c"), Some(1));
    assert_eq!(plan(&state, &Policy::default(), &fenced), []);
}

#[test]
fn a_vm_that_fits_nowhere_stays_on_its_fenced_host() {
    let mut state = hosts(2);
    create(&mut state, "a", spec(8, 1024));
    create(&mut state, "b", spec(8, 1024));
    place(&mut state, "a", 1);
    place(&mut state, "b", 2);
    set_status(&mut state, 1, MemberStatus::Down);
    assert_eq!(plan(&state, &Policy::default(), &BTreeSet::from([1])), []);
    assert_eq!(why_pending(&state, &Policy::default(), "a"), "h1 is down; cannot fail over: h2 has 0 of 8 vcpu free");
    assert_eq!(state.vm_state(state.vm("a").unwrap()), crate::state::VmState::Lost);
}

#[test]
fn a_manual_vm_is_never_moved_off_a_fenced_host_nor_its_handoff_cleared() {
    let mut state = hosts(3);
    let manual = VmSpec { failover: crate::state::Failover::Manual, ..spec(1, 128) };
    create(&mut state, "a", manual.clone());
    create(&mut state, "b", manual);
    create(&mut state, "c", spec(1, 128));
    place(&mut state, "a", 1);
    place(&mut state, "c", 1);
    place(&mut state, "b", 1);
    // "b" is moved to h2 while h1 runs it: a handoff from h1.
    place(&mut state, "b", 2);
    set_status(&mut state, 1, MemberStatus::Down);
    let decisions = plan(&state, &Policy::default(), &BTreeSet::from([1]));
    let about = |vm: &str| {
        decisions.iter().any(|d| match &d.command {
            CommandKind::Place { vm: v, .. } | CommandKind::ClearHandoff { vm: v, .. } => v == vm,
            _ => false,
        })
    };
    assert!(about("c"), "the auto VM fails over: {decisions:?}");
    assert!(!about("a") && !about("b"), "manual VMs wait for `vm recover`: {decisions:?}");
    let why = why_pending(&state, &Policy::default(), "a");
    assert!(why.contains("failover is manual") && why.contains("vm recover a --to NODE"), "{why}");
    assert_eq!(state.vm_state(state.vm("a").unwrap()), crate::state::VmState::Lost);
}

#[test]
fn a_fenced_set_naming_an_up_host_is_ignored() {
    let mut state = hosts(2);
    create(&mut state, "a", spec(1, 128));
    place(&mut state, "a", 1);
    place(&mut state, "a", 2); // handoff from h1, which is up
    assert_eq!(plan(&state, &Policy::default(), &BTreeSet::from([1])), []);
}

#[test]
fn handoffs_from_a_fenced_host_are_cleared() {
    let mut state = hosts(3);
    create(&mut state, "a", spec(1, 128));
    create(&mut state, "b", spec(1, 128));
    place(&mut state, "a", 1);
    place(&mut state, "a", 2); // migrated while h1 was up
    place(&mut state, "b", 1);
    apply(&mut state, CommandKind::Unplace { vm: "b".into(), expected_generation: 1 }).unwrap();
    set_status(&mut state, 1, MemberStatus::Down);
    assert_eq!(why_pending(&state, &Policy::default(), "a"), "waiting for h1 to stop its copy (handoff)");
    // Not fenced yet: a waits, b is placed but waits too.
    let decisions = plan_and_apply(&mut state, &Policy::default(), &none());
    assert_eq!(decisions.len(), 1);
    assert!(!state.may_start("a", 2) && !state.may_start("b", node_of(&state, "b").unwrap()));
    // Fenced: both handoffs end.
    let decisions = plan_and_apply(&mut state, &Policy::default(), &BTreeSet::from([1]));
    assert_eq!(decisions.len(), 2);
    assert!(state.may_start("a", 2) && state.may_start("b", node_of(&state, "b").unwrap()));
}

#[test]
fn a_removed_host_is_fenced_like_a_down_one() {
    let mut state = hosts(3);
    create(&mut state, "a", spec(1, 128));
    place(&mut state, "a", 3);
    state.apply_membership(&MembershipChange::Remove { id: 3 }, 0).unwrap();
    assert_eq!(state.vm("a").unwrap().handoff.map(|h| h.from), Some(3));
    plan_and_apply(&mut state, &Policy::default(), &none());
    let node = node_of(&state, "a").unwrap();
    assert!(!state.may_start("a", node));
    assert_eq!(why_pending(&state, &Policy::default(), "a"), "waiting for node 3 to stop its copy (handoff)");
    plan_and_apply(&mut state, &Policy::default(), &BTreeSet::from([3]));
    assert!(state.may_start("a", node));
}

#[test]
fn a_vm_in_handoff_is_not_moved_again() {
    let mut state = hosts(3);
    create(&mut state, "a", spec(1, 128));
    place(&mut state, "a", 1);
    place(&mut state, "a", 2); // handoff from h1 (up)
    set_drain(&mut state, 2, true);
    set_status(&mut state, 2, MemberStatus::Down);
    assert_eq!(plan(&state, &Policy::default(), &BTreeSet::from([2])), []);
}

#[test]
fn an_unplaced_vm_goes_back_to_the_host_it_is_handing_off_from() {
    // Binpack prefers h1, which still holds a's reservation: placing a back
    // there ends the handoff.
    let mut state = hosts(2);
    create(&mut state, "a", spec(2, 1024));
    create(&mut state, "b", spec(1, 128));
    place(&mut state, "a", 1);
    place(&mut state, "b", 1);
    apply(&mut state, CommandKind::Unplace { vm: "a".into(), expected_generation: 1 }).unwrap();
    plan_and_apply(&mut state, &policy(Strategy::Binpack), &none());
    assert_eq!(node_of(&state, "a"), Some(1));
    assert!(state.may_start("a", 1));
}

#[test]
fn drain_moves_one_vm_at_a_time() {
    let mut state = hosts(3);
    for name in ["a", "b", "c"] {
        create(&mut state, name, spec(2, 1024));
        place(&mut state, name, 1);
    }
    reconcile(&mut state);
    set_drain(&mut state, 1, true);
    let decisions = plan_and_apply(&mut state, &Policy::default(), &none());
    assert_eq!(decisions.len(), 1);
    assert!(
        decisions[0].reason.starts_with("moved a from h1 to h2 (h1 is draining; spread)"),
        "{}",
        decisions[0].reason
    );
    // Waits for h1 to release a.
    assert_eq!(plan(&state, &Policy::default(), &none()), []);
    apply(&mut state, CommandKind::Released { node: 1, vm: "a".into(), generation: 1 }).unwrap();
    // Waits for a to run on h2.
    assert_eq!(plan(&state, &Policy::default(), &none()), []);
    let report = |state| CommandKind::Report { node: 2, vm: "a".into(), generation: 2, state, last_error: None };
    apply(&mut state, report(VmState::Starting)).unwrap();
    assert_eq!(plan(&state, &Policy::default(), &none()), []);
    apply(&mut state, report(VmState::Running)).unwrap();
    let decisions = plan_and_apply(&mut state, &Policy::default(), &none());
    assert_eq!(decisions.len(), 1);
    assert_eq!(node_of(&state, "b"), Some(3));
    reconcile(&mut state);
    plan_and_apply(&mut state, &Policy::default(), &none());
    reconcile(&mut state);
    assert_eq!(state.vms_on(1).count(), 0);
    assert_eq!(plan(&state, &Policy::default(), &none()), []);
}

#[test]
fn drain_skips_a_vm_that_fits_nowhere_and_moves_the_next() {
    let mut state = hosts(2);
    create(&mut state, "a", spec(6, 1024));
    create(&mut state, "b", spec(1, 1024));
    create(&mut state, "c", spec(1, 128));
    place(&mut state, "a", 1);
    place(&mut state, "b", 1);
    place(&mut state, "c", 2);
    apply(
        &mut state,
        CommandKind::SetCapacity { node: 2, capacity: Capacity { vcpu: 4, memory_mib: 8192, ..Capacity::default() } },
    )
    .unwrap();
    set_drain(&mut state, 1, true);
    let decisions = plan_and_apply(&mut state, &Policy::default(), &none());
    assert_eq!(decisions.len(), 1);
    assert_eq!(node_of(&state, "a"), Some(1));
    assert_eq!(node_of(&state, "b"), Some(2));
}

#[test]
fn a_failed_move_does_not_block_the_drain() {
    let mut state = hosts(3);
    for name in ["a", "b"] {
        create(&mut state, name, spec(2, 1024));
        place(&mut state, name, 1);
    }
    set_drain(&mut state, 1, true);
    plan_and_apply(&mut state, &Policy::default(), &none());
    let a = state.vm("a").unwrap().clone();
    apply(&mut state, CommandKind::Released { node: 1, vm: "a".into(), generation: 1 }).unwrap();
    let p = a.placement.unwrap();
    let failed = CommandKind::Report {
        node: p.node,
        vm: "a".into(),
        generation: p.generation,
        state: VmState::Failed,
        last_error: Some("boom".into()),
    };
    apply(&mut state, failed).unwrap();
    // The drain goes on with b (and a, failed on its new host, moves on).
    let decisions = plan_and_apply(&mut state, &Policy::default(), &none());
    assert!(
        decisions.iter().any(|d| matches!(&d.command, CommandKind::Place { vm, .. } if vm == "b")),
        "{decisions:?}"
    );
    assert_ne!(node_of(&state, "b"), Some(1));
}

#[test]
fn why_pending_names_each_hosts_reason() {
    let mut state = State::default();
    add_host(&mut state, 1, "h1", 8, 8192, &["b"]);
    add_host(&mut state, 2, "h2", 1, 8192, &NAMES);
    add_host(&mut state, 3, "h3", 8, 8192, &NAMES);
    add_host(&mut state, 4, "h4", 8, 8192, &NAMES);
    add_host(&mut state, 5, "h5", 8, 1024, &NAMES);
    set_drain(&mut state, 3, true);
    set_status(&mut state, 4, MemberStatus::Down);
    create(&mut state, "a", spec(2, 2048));
    assert_eq!(
        why_pending(&state, &Policy::default(), "a"),
        "no host fits: h1 lacks the runner for a, h2 has 1 of 2 vcpu free, h3 is draining, h4 is down, \
         h5 has 1024 of 2048 MiB of memory free"
    );
    set_drain(&mut state, 3, false);
    assert_eq!(why_pending(&state, &Policy::default(), "a"), "h3 fits (spread); waiting for the scheduler");
    let pinned = VmSpec { node: Some("h2".into()), ..spec(2, 128) };
    create(&mut state, "b", pinned);
    assert_eq!(why_pending(&state, &Policy::default(), "b"), "no host fits: pinned to h2, which has 1 of 2 vcpu free");
    let pinned = VmSpec { node: Some("h9".into()), ..spec(2, 128) };
    create(&mut state, "c", pinned);
    assert_eq!(why_pending(&state, &Policy::default(), "c"), "no host fits: pinned to h9, which is not a member");
    assert_eq!(why_pending(&state, &Policy::default(), "zz"), "no VM named \"zz\"");
    place(&mut state, "a", 3);
    assert_eq!(why_pending(&state, &Policy::default(), "a"), "placed on h3");
}

#[test]
fn why_pending_summarises_many_hosts() {
    let mut state = State::default();
    for id in 1..=20 {
        add_host(&mut state, id, &format!("h{id:02}"), 1, 8192, if id <= 15 { &NAMES[..] } else { &[] });
    }
    create(&mut state, "a", spec(2, 128));
    assert_eq!(
        why_pending(&state, &Policy::default(), "a"),
        "no host fits: 15 hosts have too few vcpu free (h01 has 1 of 2 vcpu free, h02 has 1 of 2 vcpu free, \
         h03 has 1 of 2 vcpu free, ...); 5 hosts lack the runner (h16 lacks the runner for a, h17 lacks the \
         runner for a, h18 lacks the runner for a, ...)"
    );
}

#[test]
fn a_plan_is_bounded_and_the_next_plan_continues() {
    let mut state = hosts(2);
    for name in NAMES {
        create(&mut state, name, spec(1, 128));
    }
    let bounded = Policy { decisions_max: 3, ..Policy::default() };
    assert_eq!(plan_and_apply(&mut state, &bounded, &none()).len(), 3);
    assert_eq!(plan_and_apply(&mut state, &bounded, &none()).len(), 3);
    assert_eq!(plan_and_apply(&mut state, &bounded, &none()).len(), 2);
    assert_eq!(plan(&state, &bounded, &none()), []);
}

#[test]
fn a_stale_decision_loses_at_apply() {
    let mut state = hosts(2);
    create(&mut state, "a", spec(1, 128));
    let decisions = plan(&state, &Policy::default(), &none());
    place(&mut state, "a", 2); // an operator got there first
    let r = apply(&mut state, decisions[0].command.clone()).unwrap_err();
    assert!(matches!(r, Rejection::StaleGeneration { .. }), "{r}");
    assert_eq!(state.vm("a").unwrap().placement, Some(Placement { node: 2, generation: 1 }));
}

// ---- properties ----

/// One host of a random cluster.
#[derive(Debug, Clone)]
struct HostGen {
    vcpu: u32,
    memory_mib: u64,
    vcpu_overcommit_pct: u32,
    labels: u8,
    runners: u16,
    drain: bool,
    down: bool,
    fenced: bool,
}

#[derive(Debug, Clone)]
struct VmGen {
    vcpu: u32,
    memory_mib: u64,
    labels: u8,
    pin: Option<usize>,
    group: Option<u8>,
    stopped: bool,
}

/// Random operations before the plan: (kind, vm, host).
type Op = (u8, usize, usize);

fn host_gen() -> impl proptest::strategy::Strategy<Value = HostGen> {
    (0u32..12, 0u64..8192, 100u32..300, 0u8..4, any::<u16>(), any::<u8>(), any::<u8>(), any::<bool>()).prop_map(
        |(vcpu, memory_mib, vcpu_overcommit_pct, labels, runners, drain, down, fenced)| {
            HostGen {
                vcpu,
                memory_mib,
                vcpu_overcommit_pct,
                labels,
                // Most hosts have most runners.
                runners: runners | 0b1010_1010_1011_0111,
                drain: drain < 40,
                down: down < 50,
                fenced,
            }
        },
    )
}

fn vm_gen() -> impl proptest::strategy::Strategy<Value = VmGen> {
    (
        1u32..6,
        16u64..3000,
        0u8..4,
        prop::option::weighted(0.15, 0usize..8),
        prop::option::weighted(0.3, 0u8..2),
        any::<u8>(),
    )
        .prop_map(|(vcpu, memory_mib, labels, pin, group, stopped)| VmGen {
            vcpu,
            memory_mib,
            labels: labels & 0b01,
            pin,
            group,
            stopped: stopped < 40,
        })
}

fn label_set(mask: u8) -> Labels {
    let mut labels = Labels::new();
    if mask & 1 != 0 {
        labels.insert("ssd".into(), "yes".into());
    }
    if mask & 2 != 0 {
        labels.insert("rack".into(), "r1".into());
    }
    labels
}

fn vm_name(i: usize) -> String {
    format!("vm-{i}")
}

/// Builds a random state; returns it with the fenced set.
fn build(hosts: &[HostGen], vms: &[VmGen], ops: &[Op]) -> (State, BTreeSet<NodeId>) {
    let mut state = State::default();
    let names: Vec<String> = (0..vms.len()).map(vm_name).collect();
    for (i, h) in hosts.iter().enumerate() {
        let id = i as NodeId + 1;
        let runners: Vec<&str> = names
            .iter()
            .enumerate()
            .filter(|(v, _)| h.runners & (1 << (v % 16)) != 0)
            .map(|(_, n)| n.as_str())
            .collect();
        add_host(&mut state, id, &format!("h{id}"), h.vcpu, h.memory_mib, &runners);
        let capacity = Capacity {
            vcpu: h.vcpu,
            memory_mib: h.memory_mib,
            vcpu_overcommit_pct: h.vcpu_overcommit_pct,
            memory_overcommit_pct: 100,
        };
        apply(&mut state, CommandKind::SetCapacity { node: id, capacity }).unwrap();
        apply(&mut state, CommandKind::SetLabels { node: id, labels: label_set(h.labels) }).unwrap();
    }
    for (i, v) in vms.iter().enumerate() {
        let spec = VmSpec {
            vcpu: v.vcpu,
            memory_mib: v.memory_mib,
            labels: label_set(v.labels),
            node: v.pin.map(|h| format!("h{}", h + 1)),
            anti_affinity: v.group.map(|g| format!("g{g}")),
            desired: if v.stopped { Desired::Stopped } else { Desired::Running },
            failover: crate::state::Failover::Auto,
        };
        create(&mut state, &names[i], spec);
    }
    for &(kind, v, h) in ops {
        let Some(name) = names.get(v % names.len().max(1)) else {
            break;
        };
        let vm = state.vm(name).unwrap().clone();
        let node = (h % hosts.len()) as NodeId + 1;
        let kind = match kind % 4 {
            0 | 1 => CommandKind::Place { vm: name.clone(), node, expected_generation: vm.generation },
            2 => CommandKind::Unplace { vm: name.clone(), expected_generation: vm.generation },
            _ => match vm.handoff {
                Some(h) => CommandKind::Released { node: h.from, vm: name.clone(), generation: h.generation },
                None => continue,
            },
        };
        let _ = apply(&mut state, kind); // rejections are part of the game
    }
    report_running(&mut state);
    let mut fenced = BTreeSet::new();
    for (i, h) in hosts.iter().enumerate() {
        let id = i as NodeId + 1;
        set_drain(&mut state, id, h.drain);
        if h.down {
            set_status(&mut state, id, MemberStatus::Down);
            if h.fenced {
                fenced.insert(id);
            }
        }
    }
    state.validate().unwrap();
    (state, fenced)
}

fn cluster() -> impl proptest::strategy::Strategy<Value = (Vec<HostGen>, Vec<VmGen>, Vec<Op>)> {
    (
        prop::collection::vec(host_gen(), 1..7),
        prop::collection::vec(vm_gen(), 0..16),
        prop::collection::vec((any::<u8>(), any::<usize>(), any::<usize>()), 0..40),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// The scheduler's model agrees with `State::apply` on every VM and
    /// host, both ways.
    #[test]
    fn the_model_agrees_with_apply((hosts, vms, ops) in cluster()) {
        let (state, _) = build(&hosts, &vms, &ops);
        let mut model = Model::new(&state);
        for vm in state.vms().values() {
            let v = model.slot(vm);
            for (i, host) in model.hosts.iter().enumerate() {
                let place = CommandKind::Place { vm: vm.name.clone(), node: host.member.id, expected_generation: vm.generation };
                let applied = state.clone().apply(&cmd(place));
                let misfit = model.misfit(v, i);
                prop_assert_eq!(misfit.is_none(), applied.is_ok(), "{} on {}: model {:?}, apply {:?}", vm.name, host.member.name, misfit, applied);
            }
        }
        for host in &model.hosts {
            prop_assert_eq!(host.used, state.used_on(host.member.id, None));
        }
    }

    /// Every decision applies cleanly on the state it was planned from (so no
    /// host is over-committed and no constraint broken), and no unplaced VM
    /// is left that some host would have accepted.
    #[test]
    fn every_decision_applies_and_nothing_that_fits_is_left((hosts, vms, ops) in cluster(), binpack in any::<bool>()) {
        let (mut state, fenced) = build(&hosts, &vms, &ops);
        let policy = policy(if binpack { Strategy::Binpack } else { Strategy::Spread });
        let decisions = plan(&state, &policy, &fenced);
        for decision in &decisions {
            let applied = state.apply(&cmd(decision.command.clone()));
            prop_assert!(applied.is_ok(), "{:?} rejected: {:?}", decision, applied);
            prop_assert_eq!(state.validate(), Ok(()));
        }
        for vm in state.vms().values() {
            if vm.placement.is_some() || vm.spec.desired == Desired::Stopped {
                continue;
            }
            for member in state.members().values() {
                let place = CommandKind::Place { vm: vm.name.clone(), node: member.id, expected_generation: vm.generation };
                prop_assert!(state.clone().apply(&cmd(place)).is_err(), "{} left pending but fits on {}", vm.name, member.name);
            }
        }
    }

    /// Planning again after applying a plan, with nothing else changed,
    /// decides nothing.
    #[test]
    fn a_plan_is_idempotent((hosts, vms, ops) in cluster(), binpack in any::<bool>()) {
        let (mut state, fenced) = build(&hosts, &vms, &ops);
        let policy = policy(if binpack { Strategy::Binpack } else { Strategy::Spread });
        plan_and_apply(&mut state, &policy, &fenced);
        prop_assert_eq!(plan(&state, &policy, &fenced), []);
    }

    /// Whatever the cluster, a draining host never has more than one VM in
    /// flight, and the drain ends with only VMs that fit nowhere else.
    #[test]
    fn drain_moves_one_at_a_time((hosts, vms, ops) in cluster()) {
        let (mut state, _) = build(&hosts, &vms, &ops);
        // Bring every host up, undrained; then drain h1.
        for id in 1..=hosts.len() as NodeId {
            set_status(&mut state, id, MemberStatus::Up);
            set_drain(&mut state, id, false);
        }
        plan_and_apply(&mut state, &Policy::default(), &none());
        reconcile(&mut state);
        set_drain(&mut state, 1, true);
        for _ in 0..2 * vms.len() + 2 {
            let decisions = plan_and_apply(&mut state, &Policy::default(), &none());
            let off_h1 = decisions.iter().filter(|d| d.reason.contains("h1 is draining")).count();
            prop_assert!(off_h1 <= 1);
            let in_flight = state.vms().values().filter(|vm| vm.handoff.is_some_and(|h| h.from == 1) || (vm.moved_from == Some(1) && vm.observed.state != VmState::Running && vm.spec.desired == Desired::Running)).count();
            prop_assert!(in_flight <= 1, "{} VMs in flight off h1", in_flight);
            if decisions.is_empty() {
                break;
            }
            reconcile(&mut state);
        }
        reconcile(&mut state);
        prop_assert_eq!(plan(&state, &Policy::default(), &none()), []);
        for vm in state.vms_on(1) {
            for member in state.members().values().filter(|m| m.id != 1) {
                let place = CommandKind::Place { vm: vm.name.clone(), node: member.id, expected_generation: vm.generation };
                prop_assert!(state.clone().apply(&cmd(place)).is_err(), "{} stayed on h1 but fits on {}", vm.name, member.name);
            }
        }
    }
}

#[test]
fn a_vm_that_keeps_failing_moves_to_a_host_where_it_has_not_failed() {
    let mut state = hosts(3);
    create(&mut state, "a", spec(1, 128));
    place(&mut state, "a", 1);
    let generation = state.vm("a").unwrap().generation;
    let report = CommandKind::Report { node: 1, vm: "a".into(), generation, state: VmState::Failed, last_error: None };
    apply(&mut state, report).unwrap();
    assert_eq!(state.vm("a").unwrap().failed_on, [1].into());

    let decisions = plan_and_apply(&mut state, &policy(Strategy::Spread), &none());
    assert_eq!(decisions.len(), 1, "{decisions:?}");
    assert!(decisions[0].reason.contains("kept failing on h1"), "{}", decisions[0].reason);
    let new_host = node_of(&state, "a").unwrap();
    assert_ne!(new_host, 1);
    // It fails there too: the next host is neither of them.
    reconcile(&mut state);
    let generation = state.vm("a").unwrap().generation;
    let report =
        CommandKind::Report { node: new_host, vm: "a".into(), generation, state: VmState::Failed, last_error: None };
    apply(&mut state, report).unwrap();
    plan_and_apply(&mut state, &policy(Strategy::Spread), &none());
    let third = node_of(&state, "a").unwrap();
    assert!(third != 1 && third != new_host);
    // Failing everywhere, it stays where it is, and why_pending says why.
    reconcile(&mut state);
    let generation = state.vm("a").unwrap().generation;
    let report =
        CommandKind::Report { node: third, vm: "a".into(), generation, state: VmState::Failed, last_error: None };
    apply(&mut state, report).unwrap();
    assert!(plan_and_apply(&mut state, &policy(Strategy::Spread), &none()).is_empty());
    assert_eq!(node_of(&state, "a"), Some(third));
    // `vm start` gives every host a new chance.
    apply(&mut state, CommandKind::SetDesired { name: "a".into(), desired: Desired::Running }).unwrap();
    let vm = state.vm("a").unwrap();
    assert!(vm.failed_on.is_empty());
    assert_eq!(vm.observed.state, VmState::Pending);
}

/// One random change between two plans, from `(kind, vm, host, size)`.
fn random_change(state: &State, hosts: usize, (kind, v, h, size): (u8, usize, usize, u8)) -> Option<CommandKind> {
    let name = vm_name(v % 20);
    let node = (h % hosts) as NodeId + 1;
    let vm = state.vm(&name);
    let sized =
        VmSpec { vcpu: u32::from(size % 4) + 1, memory_mib: 256 * (u64::from(size / 4 % 4) + 1), ..VmSpec::default() };
    Some(match kind % 12 {
        0 | 1 => CommandKind::CreateVm { name, spec: sized },
        2 => CommandKind::DeleteVm { name },
        3 => CommandKind::UpdateVm { name, spec: sized },
        4 => CommandKind::SetDesired { name, desired: if size % 2 == 0 { Desired::Running } else { Desired::Stopped } },
        5 => CommandKind::Place { vm: name, node, expected_generation: vm?.generation },
        6 => CommandKind::Unplace { vm: name, expected_generation: vm?.generation },
        7 => {
            let handoff = vm?.handoff?;
            CommandKind::Released { node: handoff.from, vm: name, generation: handoff.generation }
        }
        8 => {
            let runners = (0..20).filter(|i| !(i + size as usize).is_multiple_of(3)).map(vm_name).collect();
            CommandKind::SetRunners { node, runners }
        }
        9 => CommandKind::SetCapacity {
            node,
            capacity: Capacity { vcpu: u32::from(size % 16) + 1, memory_mib: 4096, ..Capacity::default() },
        },
        10 => {
            CommandKind::SetStatus { node, status: if size % 2 == 0 { MemberStatus::Up } else { MemberStatus::Down } }
        }
        _ => {
            let placement = vm?.placement?;
            let state = if size % 2 == 0 { VmState::Failed } else { VmState::Running };
            CommandKind::Report {
                node: placement.node,
                vm: name,
                generation: placement.generation,
                state,
                last_error: None,
            }
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// A plan that reuses the last plan's memo decides exactly what a plan
    /// from scratch decides, whatever changed in between: decisions applied
    /// or lost, VMs created, resized, stopped, deleted, hosts changed.
    #[test]
    fn a_memo_never_changes_a_plan(
        (hosts, vms, ops) in cluster(),
        steps in prop::collection::vec((any::<u8>(), any::<u8>(), (any::<u8>(), any::<usize>(), any::<usize>(), any::<u8>())), 1..16),
        binpack in any::<bool>(),
        decisions_max in 1usize..8,
    ) {
        let (mut state, fenced) = build(&hosts, &vms, &ops);
        let strategy = if binpack { Strategy::Binpack } else { Strategy::Spread };
        let policy = Policy { strategy, decisions_max };
        let mut memo = Memo::default();
        prop_assert_eq!(state.take_vm_changes(), None);
        let mut changed = None;
        for (applied, changes, change) in steps {
            let fresh = plan(&state, &policy, &fenced);
            let reused = plan_with(&state, &policy, &fenced, changed.as_ref(), &mut memo);
            prop_assert_eq!(&reused, &fresh);
            // Some decisions apply, some are lost (as when a leader's
            // proposal is dropped).
            for (k, decision) in fresh.iter().enumerate() {
                if applied & (1 << (k % 8)) != 0 {
                    let _ = state.apply(&cmd(decision.command.clone()));
                }
            }
            for _ in 0..changes % 3 {
                if let Some(kind) = random_change(&state, hosts.len(), change) {
                    let _ = state.apply(&cmd(kind)); // rejections are part of the game
                }
            }
            state.validate().map_err(proptest::test_runner::TestCaseError::fail)?;
            changed = state.take_vm_changes();
            prop_assert!(changed.is_some());
        }
    }
}

/// VMs that fit nowhere are skipped by the next plan until something that
/// could make them fit changes.
#[test]
fn a_memo_skips_vms_that_fit_nowhere_until_a_host_frees_up() {
    let mut state = hosts(1);
    create(&mut state, "a", spec(6, 1024));
    create(&mut state, "b", spec(4, 1024));
    state.take_vm_changes();
    let policy = policy(Strategy::Spread);
    let mut memo = Memo::default();
    let decisions = plan_with(&state, &policy, &none(), None, &mut memo);
    assert_eq!(decisions.len(), 1, "{decisions:?}");
    apply(&mut state, decisions[0].command.clone()).unwrap();
    assert_eq!(memo.blocked(), 1, "b does not fit next to a");

    // Nothing freed: b is not even looked at.
    let changed = state.take_vm_changes();
    assert_eq!(plan_with(&state, &policy, &none(), changed.as_ref(), &mut memo), []);
    assert_eq!(memo.blocked(), 1);

    // a is deleted: the host has room again and b is placed.
    apply(&mut state, CommandKind::DeleteVm { name: "a".into() }).unwrap();
    let changed = state.take_vm_changes();
    let decisions = plan_with(&state, &policy, &none(), changed.as_ref(), &mut memo);
    assert_eq!(decisions.len(), 1, "{decisions:?}");
    assert!(decisions[0].reason.starts_with("placed b on h1"), "{}", decisions[0].reason);
    assert_eq!(memo.blocked(), 0);
}

/// The plan before the state kept the queues: both found by a pass over
/// every VM, as a new leader's first plan used to.
fn plan_by_full_scan(state: &State, policy: &Policy, fenced: &BTreeSet<NodeId>) -> Vec<Decision> {
    let waiting: BTreeSet<String> = state
        .vms()
        .values()
        .filter(|vm| vm.placement.is_none() && vm.spec.desired == Desired::Running)
        .map(|vm| vm.name.clone())
        .collect();
    let failed: BTreeSet<String> = state
        .vms()
        .values()
        .filter(|vm| vm.placement.is_some() && vm.observed.state == VmState::Failed)
        .map(|vm| vm.name.clone())
        .collect();
    let mut memo = Memo { planned: true, ..Memo::default() };
    let mut planner = Planner { state, model: Model::new(state), policy, fenced, out: Vec::new() };
    planner.clear_fenced_handoffs();
    planner.reschedule_fenced();
    planner.reschedule_failed(&failed);
    planner.place_unplaced(&mut memo, None, &waiting);
    planner.drain_by_full_scan();
    planner.out
}

impl<'s> Planner<'s, '_> {
    /// `Planner::drain` as it was: a look at every VM while a host drains.
    fn drain_by_full_scan(&mut self) {
        let draining = self.draining_hosts();
        if draining.is_empty() {
            return;
        }
        let mut busy = BTreeSet::new();
        let mut candidates: BTreeMap<NodeId, Vec<&'s Vm>> = BTreeMap::new();
        for vm in self.state.vms().values() {
            self.file_for_drain(vm, &draining, &mut busy, &mut candidates);
        }
        self.move_off_draining(&busy, candidates);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// A new leader's first plan (fresh memo, changed VMs unknown), which
    /// visits only the VMs the state queues at apply, decides exactly what
    /// the full scan over every VM decided, whatever was applied before;
    /// and so does the same plan on the state decoded from a snapshot
    /// (whose queues are rebuilt, not applied).
    #[test]
    fn a_first_plan_decides_as_the_full_scan(
        (hosts, vms, ops) in cluster(),
        steps in prop::collection::vec((any::<u8>(), any::<u8>(), (any::<u8>(), any::<usize>(), any::<usize>(), any::<u8>())), 1..12),
        binpack in any::<bool>(),
        decisions_max in 1usize..8,
    ) {
        let (mut state, fenced) = build(&hosts, &vms, &ops);
        let strategy = if binpack { Strategy::Binpack } else { Strategy::Spread };
        let policy = Policy { strategy, decisions_max };
        for (applied, changes, change) in steps {
            let first = plan_with(&state, &policy, &fenced, None, &mut Memo::default());
            prop_assert_eq!(&first, &plan_by_full_scan(&state, &policy, &fenced));
            let restored = crate::state::codec::decode_snapshot(&crate::state::codec::encode_snapshot(&state)).unwrap();
            // Equal, derived indexes included (rows changed are not state).
            let mut applied_state = state.clone();
            applied_state.take_dirty();
            prop_assert_eq!(&restored, &applied_state);
            prop_assert_eq!(&plan_with(&restored, &policy, &fenced, None, &mut Memo::default()), &first);
            for (k, decision) in first.iter().enumerate() {
                if applied & (1 << (k % 8)) != 0 {
                    let _ = state.apply(&cmd(decision.command.clone()));
                }
            }
            for _ in 0..changes % 4 {
                if let Some(kind) = random_change(&state, hosts.len(), change) {
                    let _ = state.apply(&cmd(kind)); // rejections are part of the game
                }
            }
            state.validate().map_err(proptest::test_runner::TestCaseError::fail)?;
        }
    }
}

/// `Model::best_host` as it was: one scan in name order, the costlier
/// constraints checked on each host that beats the best so far.
fn best_host_by_scan(model: &Model<'_>, v: usize, strategy: Strategy) -> Option<(usize, Resources)> {
    if let Some(pinned) = &model.vms[v].spec.node {
        let i = *model.host_index.get(pinned.as_str())?;
        if model.misfit(v, i).is_some() {
            return None;
        }
        return model.used_after(v, i).ok().map(|used| (i, used));
    }
    let mut best: Option<(u64, usize, Resources)> = None;
    for i in 0..model.hosts.len() {
        if !model.hosts[i].accepts || model.vms[v].failed_on.contains(&model.hosts[i].member.id) {
            continue;
        }
        let Ok(used) = model.used_after(v, i) else {
            continue;
        };
        let load = model.load(i, used);
        let better = match (best, strategy) {
            (None, _) => true,
            (Some((b, ..)), Strategy::Spread) => load < b,
            (Some((b, ..)), Strategy::Binpack) => load > b,
        };
        if better && model.constraint_misfit(v, i).is_none() {
            best = Some((load, i, used));
        }
    }
    best.map(|(_, i, used)| (i, used))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// The ranked search picks the very host the scan in name order picked,
    /// for every VM, either strategy.
    #[test]
    fn the_ranked_search_picks_what_the_scan_picked((hosts, vms, ops) in cluster()) {
        let (state, _) = build(&hosts, &vms, &ops);
        let mut model = Model::new(&state);
        for vm in state.vms().values() {
            let v = model.slot(vm);
            for strategy in [Strategy::Spread, Strategy::Binpack] {
                prop_assert_eq!(model.best_host(v, strategy), best_host_by_scan(&model, v, strategy), "{}", vm.name);
            }
        }
    }
}
