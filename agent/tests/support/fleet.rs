//! The state of a large fleet, built through `State::apply` as the leader
//! would see it: shared by the scheduler benchmark (`benches/scheduler.rs`)
//! and the 1,000-host simulation (`tests/fleet_sim.rs`), each including
//! this file with `#[path]`.

use blixard::state::{Capacity, Command, CommandKind, Labels, MembershipChange, NodeId, State, VmSpec};

/// Every host's capacity: 32 vCPUs (150% overcommit) and 128 GiB.
const HOST_CAPACITY: Capacity =
    Capacity { vcpu: 32, memory_mib: 128 * 1024, vcpu_overcommit_pct: 150, memory_overcommit_pct: 100 };

pub fn cmd(kind: CommandKind) -> Command {
    Command { at_unix_ms: 1, kind }
}

pub fn vm_name(v: usize) -> String {
    format!("vm-{v:05}")
}

/// VM `v`'s size: 1 to 4 vCPUs, 512 MiB to 4 GiB, in turn.
pub fn vm_spec(v: usize) -> VmSpec {
    VmSpec { vcpu: 1 + (v % 4) as u32, memory_mib: 512 * (1 + (v % 8) as u64), ..VmSpec::default() }
}

/// Voters `h0001..` (ids 1..=`hosts`) with [`HOST_CAPACITY`], the runners
/// of the VMs `v` for which `has_runner(id, v)` and the label `rack =
/// r<id % racks>`; then `vms` VMs `vm-00000..` created with `spec_of(v)`.
/// Nothing is placed.
pub fn build(
    hosts: u64,
    vms: usize,
    racks: u64,
    has_runner: impl Fn(NodeId, usize) -> bool,
    spec_of: impl Fn(usize) -> VmSpec,
) -> State {
    let mut state = State::default();
    let names: Vec<String> = (0..vms).map(vm_name).collect();
    for id in 1..=hosts {
        let add = MembershipChange::AddLearner {
            id,
            name: format!("h{id:04}"),
            address: format!("10.0.{}.{}:7000", id / 256, id % 256),
        };
        state.apply_membership(&add, 0).expect("add");
        state.apply_membership(&MembershipChange::Promote { id }, 0).expect("promote");
        state.apply(&cmd(CommandKind::SetCapacity { node: id, capacity: HOST_CAPACITY })).expect("capacity");
        let runners = names.iter().enumerate().filter(|(v, _)| has_runner(id, *v)).map(|(_, n)| n.clone()).collect();
        state.apply(&cmd(CommandKind::SetRunners { node: id, runners })).expect("runners");
        let labels: Labels = [("rack".to_string(), format!("r{}", id % racks))].into();
        state.apply(&cmd(CommandKind::SetLabels { node: id, labels })).expect("labels");
    }
    for (v, name) in names.iter().enumerate() {
        state.apply(&cmd(CommandKind::CreateVm { name: name.clone(), spec: spec_of(v) })).expect("create");
    }
    state
}
