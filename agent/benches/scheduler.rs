//! The pure scheduler placing 10,000 VMs on 1,000 hosts, in one plan.
//!
//! Run with `cargo bench -p blixard-agent --bench scheduler`. Prints
//! placements per second for each scenario (goal: at least 10,000/s; Nomad's
//! C1M run did about 3,750/s), then checks outside the timing that every
//! decision applies cleanly.

use std::collections::BTreeSet;
use std::time::Instant;

use blixard::scheduler::{self, Policy, Strategy};
use blixard::state::{Capacity, Command, CommandKind, Labels, MembershipChange, State, VmSpec};

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

fn cmd(kind: CommandKind) -> Command {
    Command { at_unix_ms: 1, kind }
}

fn vm_name(v: usize) -> String {
    format!("vm-{v:05}")
}

fn build(scenario: &Scenario) -> State {
    let mut state = State::default();
    let names: Vec<String> = (0..VMS).map(vm_name).collect();
    for id in 1..=HOSTS {
        let add = MembershipChange::AddLearner {
            id,
            name: format!("h{id:04}"),
            address: format!("10.0.{}.{}:7000", id / 256, id % 256),
        };
        state.apply_membership(&add, 0).expect("add");
        state.apply_membership(&MembershipChange::Promote { id }, 0).expect("promote");
        let capacity =
            Capacity { vcpu: 32, memory_mib: 128 * 1024, vcpu_overcommit_pct: 150, memory_overcommit_pct: 100 };
        state.apply(&cmd(CommandKind::SetCapacity { node: id, capacity })).expect("capacity");
        let runners =
            names.iter().enumerate().filter(|(v, _)| (scenario.runner)(id, *v)).map(|(_, n)| n.clone()).collect();
        state.apply(&cmd(CommandKind::SetRunners { node: id, runners })).expect("runners");
        let rack = format!("r{}", id % 20);
        let labels: Labels = [("rack".to_string(), rack)].into();
        state.apply(&cmd(CommandKind::SetLabels { node: id, labels })).expect("labels");
    }
    for (v, name) in names.iter().enumerate() {
        let mut spec = VmSpec { vcpu: 1 + (v % 4) as u32, memory_mib: 512 * (1 + (v % 8) as u64), ..VmSpec::default() };
        if scenario.constrained {
            if v % 4 == 0 {
                spec.labels.insert("rack".into(), format!("r{}", v % 20));
            }
            if v % 10 == 1 {
                spec.anti_affinity = Some(format!("g{}", v % 100));
            }
        }
        state.apply(&cmd(CommandKind::CreateVm { name: name.clone(), spec })).expect("create");
    }
    state.take_dirty();
    state
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
}
