//! Random client commands: mostly valid, some stale or invalid, so that
//! both the accepted and the rejected paths of every command run.

use blixard::state::{
    Capacity, Command, CommandKind, Desired, Failover, Labels, MemberStatus, NodeId, State, VmSpec, VmState,
};
use rand::Rng;
use rand::seq::IndexedRandom;

const VM_NAMES: [&str; 12] = ["a", "b", "c", "d", "e", "f", "g", "h", "web", "db", "x-1", "../x"];

fn pick_vm(rng: &mut impl Rng) -> String {
    (*VM_NAMES.choose(rng).expect("non-empty")).to_string()
}

fn labels(rng: &mut impl Rng) -> Labels {
    let mut labels = Labels::new();
    if rng.random_bool(0.3) {
        labels.insert("rack".into(), ["r1", "r2"].choose(rng).expect("non-empty").to_string());
    }
    labels
}

fn spec(rng: &mut impl Rng, members: &[(NodeId, String)]) -> VmSpec {
    VmSpec {
        vcpu: if rng.random_bool(0.02) { 0 } else { rng.random_range(1..=4) },
        memory_mib: rng.random_range(1..=8) * 128,
        labels: labels(rng),
        node: if rng.random_bool(0.1) { members.choose(rng).map(|(_, n)| n.clone()) } else { None },
        anti_affinity: if rng.random_bool(0.2) { Some("grp".into()) } else { None },
        desired: if rng.random_bool(0.8) { Desired::Running } else { Desired::Stopped },
        failover: if rng.random_bool(0.1) { Failover::Manual } else { Failover::Auto },
    }
}

/// A random command against the leader's current `state`.
pub fn command(rng: &mut impl Rng, state: &State, now_ms: u64) -> Command {
    let members: Vec<(NodeId, String)> = state.members().values().map(|m| (m.id, m.name.clone())).collect();
    let node = |rng: &mut dyn rand::RngCore| -> NodeId {
        if rng.random_bool(0.03) || members.is_empty() { 999 } else { members.choose(rng).expect("non-empty").0 }
    };
    let vm = pick_vm(rng);
    let generation = |rng: &mut dyn rand::RngCore, vm: &str| -> u64 {
        let current = state.vm(vm).map_or(0, |v| v.generation);
        if rng.random_bool(0.1) { current.saturating_sub(1) } else { current }
    };
    let kind = match rng.random_range(0..100) {
        0..=19 => CommandKind::CreateVm { name: vm, spec: spec(rng, &members) },
        20..=24 => CommandKind::UpdateVm { name: vm, spec: spec(rng, &members) },
        25..=28 => CommandKind::DeleteVm { name: vm },
        29..=33 => CommandKind::SetDesired {
            name: vm,
            desired: if rng.random_bool(0.5) { Desired::Running } else { Desired::Stopped },
        },
        34..=53 => {
            let expected_generation = generation(rng, &vm);
            CommandKind::Place { vm, node: node(rng), expected_generation }
        }
        54..=57 => {
            let expected_generation = generation(rng, &vm);
            CommandKind::Unplace { vm, expected_generation }
        }
        58..=65 => CommandKind::SetCapacity {
            node: node(rng),
            capacity: Capacity {
                vcpu: rng.random_range(0..=16),
                memory_mib: rng.random_range(0..=16) * 512,
                vcpu_overcommit_pct: *[100, 150, 200, 5].choose(rng).expect("non-empty"),
                memory_overcommit_pct: 100,
            },
        },
        66..=72 => CommandKind::SetRunners {
            node: node(rng),
            runners: VM_NAMES.iter().filter(|_| rng.random_bool(0.7)).map(|s| s.to_string()).collect(),
        },
        73..=76 => CommandKind::SetLabels { node: node(rng), labels: labels(rng) },
        77..=80 => CommandKind::SetDrain { node: node(rng), drain: rng.random_bool(0.3) },
        81..=84 => CommandKind::SetStatus {
            node: node(rng),
            status: if rng.random_bool(0.2) { MemberStatus::Down } else { MemberStatus::Up },
        },
        // A few token hashes, so that tokens are reused, expire and run out;
        // a TTL of 0 or over the 7-day limit is refused.
        85..=86 => CommandKind::AddJoinToken {
            hash: [rng.random_range(0..4); 32],
            ttl_ms: *[0, 500, 60_000, 8 * 86_400_000].choose(rng).expect("non-empty"),
        },
        87..=88 => CommandKind::UseJoinToken { hash: [rng.random_range(0..4); 32], node: node(rng) },
        89 => {
            let expected_generation = generation(rng, &vm);
            CommandKind::Recover { vm, node: node(rng), expected_generation }
        }
        _ => {
            let (node, generation) = match state.vm(&vm).and_then(|v| v.placement) {
                Some(p) if rng.random_bool(0.9) => (p.node, p.generation),
                _ => (node(rng), rng.random_range(0..5)),
            };
            CommandKind::Report {
                node,
                vm,
                generation,
                state: *VmState::ALL.choose(rng).expect("non-empty"),
                last_error: rng.random_bool(0.2).then(|| "exit status 1".to_string()),
            }
        }
    };
    Command { at_unix_ms: now_ms, kind }
}
