//! The pure scheduler placing 10,000 VMs on 1,000 hosts, in one plan.
//!
//! Run with `cargo bench -p blixard-agent --bench scheduler`. Prints
//! placements per second for each scenario (goal: at least 10,000/s; Nomad's
//! C1M run did about 3,750/s), then checks outside the timing that every
//! decision applies cleanly.
//!
//! Then a new leader's first plan: a fleet of 10,000 VMs already placed on
//! 1,000 hosts (the constrained scenario's runners, labels and
//! anti-affinity), some waiting for a runner no host has, some too big for
//! any host, some failed, a few hosts down or draining, some handoffs in
//! flight. A new leader plans with a fresh `Memo` and no changed names
//! (goal: at most 20 ms); the leader's next plan, with its memo and nothing
//! changed, is timed beside it.

use std::collections::BTreeSet;
use std::time::Instant;

use blixard::scheduler::{self, Memo, Policy, Strategy};
use blixard::state::{CommandKind, Desired, MemberStatus, State, VmSpec, VmState};

const HOSTS: u64 = 1_000;
const VMS: usize = 10_000;
/// Timed runs per scenario; the best is reported.
const RUNS: usize = 5;

struct Scenario {
    name: &'static str,
    /// Host `h` has VM `v`'s runner.
    runner: fn(u64, usize) -> bool,
    /// Labels, pin and anti-affinity for VM `v`.
    constrained: bool,
}

#[path = "../tests/support/fleet.rs"]
mod fleet;
use fleet::{cmd, vm_name};

fn build(scenario: &Scenario) -> State {
    build_with(scenario, VMS, |v| v)
}

/// `vms` VMs; VM `v` has the runner (and size, labels) of VM `runner_of(v)`.
fn build_with(scenario: &Scenario, vms: usize, runner_of: fn(usize) -> usize) -> State {
    let has_runner = |id, v| runner_of(v) < vms && (scenario.runner)(id, runner_of(v));
    let spec_of = |v: usize| {
        let mut spec = fleet::vm_spec(v);
        if scenario.constrained {
            if v.is_multiple_of(4) {
                spec.labels.insert("rack".into(), format!("r{}", v % 20));
            }
            if v % 10 == 1 {
                spec.anti_affinity = Some(format!("g{}", v % 100));
            }
        }
        spec
    };
    let mut state = fleet::build(HOSTS, vms, 20, has_runner, spec_of);
    state.take_dirty();
    state
}

/// VMs of the fleet waiting for a runner that no host has.
const FLEET_NO_RUNNER: usize = 300;
/// VMs of the fleet too big for any host.
const FLEET_TOO_BIG: usize = 200;
/// Placed VMs of the fleet observed failed on their host.
const FLEET_FAILED: usize = 50;

/// The state a new leader finds: see the module documentation.
fn fleet(scenario: &Scenario) -> State {
    let waiting = FLEET_NO_RUNNER + FLEET_TOO_BIG;
    // The last FLEET_NO_RUNNER VMs get no runner anywhere (`usize::MAX`).
    let mut state = build_with(scenario, VMS, |v| if v >= VMS - FLEET_NO_RUNNER { usize::MAX } else { v });
    // The FLEET_TOO_BIG before them are larger than any host.
    for v in VMS - waiting..VMS - FLEET_NO_RUNNER {
        let spec = VmSpec { vcpu: 64, memory_mib: 256 * 1024, ..VmSpec::default() };
        state.apply(&cmd(CommandKind::UpdateVm { name: vm_name(v), spec })).expect("update");
    }
    let policy = Policy { strategy: Strategy::Spread, decisions_max: usize::MAX };
    let decisions = scheduler::plan(&state, &policy, &BTreeSet::new());
    for decision in &decisions {
        state.apply(&cmd(decision.command.clone())).expect("place");
    }
    // Every placed VM runs, but a few failed.
    let placed: Vec<(String, u64, u64)> =
        state.vms().values().filter_map(|vm| vm.placement.map(|p| (vm.name.clone(), p.node, p.generation))).collect();
    assert_eq!(placed.len(), VMS - waiting, "the fleet's placeable VMs are placed");
    for (i, (vm, node, generation)) in placed.iter().enumerate() {
        let state_now = if i % (placed.len() / FLEET_FAILED) == 7 { VmState::Failed } else { VmState::Running };
        let report = CommandKind::Report {
            node: *node,
            vm: vm.clone(),
            generation: *generation,
            state: state_now,
            last_error: None,
        };
        state.apply(&cmd(report)).expect("report");
    }
    // Some handoffs in flight: VMs moved between up hosts, not yet released.
    let mut moved = 0;
    for (vm, node, generation) in placed.iter().step_by(97) {
        // The same rack (hosts 20 apart), so the runner and labels still fit.
        let to = (node - 1 + 20) % HOSTS + 1;
        let place = CommandKind::Place { vm: vm.clone(), node: to, expected_generation: *generation };
        if state.apply(&cmd(place)).is_ok() {
            moved += 1;
        }
    }
    // A few hosts down (a new leader has fenced none yet), one draining, a
    // few VMs stopped.
    for node in [17, 333, 678] {
        state.apply(&cmd(CommandKind::SetStatus { node, status: MemberStatus::Down })).expect("down");
    }
    state.apply(&cmd(CommandKind::SetDrain { node: 500, drain: true })).expect("drain");
    for v in (3..VMS).step_by(211) {
        state.apply(&cmd(CommandKind::SetDesired { name: vm_name(v), desired: Desired::Stopped })).expect("stop");
    }
    state.validate().expect("invariants");
    println!(
        "  the fleet: {} VMs, {} placed, {waiting} waiting ({FLEET_NO_RUNNER} for a runner, {FLEET_TOO_BIG} too big), \
         {FLEET_FAILED} failed, {moved} handoffs, 3 hosts down, 1 draining",
        state.vms().len(),
        state.vms().values().filter(|vm| vm.placement.is_some()).count(),
    );
    state.take_dirty();
    state
}

/// A new leader's first plan (fresh memo, changed VMs unknown), and the
/// leader's next one (its memo, nothing changed).
fn new_leader(scenario: &Scenario) {
    let state = fleet(scenario);
    let policy = Policy::default();
    let fenced = BTreeSet::new();
    let (mut first, mut next) = (f64::MAX, f64::MAX);
    let mut decisions = Vec::new();
    for _ in 0..RUNS {
        let mut memo = Memo::default();
        let start = Instant::now();
        decisions = scheduler::plan_with(&state, &policy, &fenced, None, &mut memo);
        first = first.min(start.elapsed().as_secs_f64());
        let start = Instant::now();
        let again = scheduler::plan_with(&state, &policy, &fenced, Some(&BTreeSet::new()), &mut memo);
        next = next.min(start.elapsed().as_secs_f64());
        assert_eq!(again, decisions, "the memo's plan decides as the first");
    }
    assert_eq!(decisions, scheduler::plan(&state, &policy, &fenced), "plan_with decides as plan");
    let mut applied = state.clone();
    for decision in &decisions {
        if let Err(r) = applied.apply(&cmd(decision.command.clone())) {
            panic!("{decision:?} was rejected: {r}");
        }
    }
    println!(
        "  a new leader's first plan: {} decisions in {:.2} ms; the leader's next plan, nothing changed: {:.2} ms",
        decisions.len(),
        first * 1e3,
        next * 1e3
    );
}

fn main() {
    let scenarios = [
        Scenario { name: "every host has every runner", runner: |_, _| true, constrained: false },
        Scenario {
            name: "runners on 10% of hosts, rack labels, anti-affinity",
            runner: |h, v| h % 10 == (v % 10) as u64,
            constrained: true,
        },
    ];
    if std::env::args().any(|a| a == "--new-leader") {
        println!("{}, a new leader:", scenarios[1].name);
        new_leader(&scenarios[1]);
        return;
    }
    for scenario in &scenarios {
        let state = build(scenario);
        for strategy in [Strategy::Spread, Strategy::Binpack] {
            let policy = Policy { strategy, decisions_max: usize::MAX };
            let mut best = f64::MAX;
            let mut decisions = Vec::new();
            for _ in 0..RUNS {
                let start = Instant::now();
                decisions = scheduler::plan(&state, &policy, &BTreeSet::new());
                best = best.min(start.elapsed().as_secs_f64());
            }
            let placed = decisions.len();
            println!(
                "{}, {strategy}: {placed} of {VMS} VMs placed on {HOSTS} hosts in {:.1} ms: {:.0} placements/s",
                scenario.name,
                best * 1e3,
                placed as f64 / best
            );
            // Outside the timing: every decision applies, and a second plan
            // on the result is empty and cheap (the leader runs it every tick).
            let mut applied = state.clone();
            for decision in &decisions {
                if let Err(r) = applied.apply(&cmd(decision.command.clone())) {
                    panic!("{decision:?} was rejected: {r}");
                }
            }
            applied.validate().expect("invariants");
            let start = Instant::now();
            let again = scheduler::plan(&applied, &policy, &BTreeSet::new());
            println!("  a plan with nothing to do: {:.1} ms", start.elapsed().as_secs_f64() * 1e3);
            assert!(again.is_empty(), "a second plan decided {} more", again.len());
        }
    }
    println!("{}, a new leader:", scenarios[1].name);
    new_leader(&scenarios[1]);
}
