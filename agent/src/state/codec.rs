//! The persisted encoding of the state: domain types <-> protobuf
//! (`proto/blixard/state/v1/state.proto`).
//!
//! Decoding is total: any byte string either decodes into a valid-shaped
//! domain value or returns a [`DecodeError`]; semantic validation (names,
//! ranges) happens when a command is applied, so every replica rejects the
//! same commands.

use prost::Message;

use super::*;

/// Generated protobuf types of the persisted state.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/blixard.state.v1.rs"));
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("protobuf: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("{0}")]
    Shape(String),
}

fn enum_value<T>(value: i32, what: &str) -> Result<T, DecodeError>
where
    T: TryFrom<i32>,
{
    T::try_from(value).map_err(|_| DecodeError::Shape(format!("unknown {what} {value}")))
}

// ---- members ----

impl From<&Capacity> for pb::Capacity {
    fn from(c: &Capacity) -> Self {
        pb::Capacity {
            vcpu: c.vcpu,
            memory_mib: c.memory_mib,
            vcpu_overcommit_pct: c.vcpu_overcommit_pct,
            memory_overcommit_pct: c.memory_overcommit_pct,
        }
    }
}

impl From<&pb::Capacity> for Capacity {
    fn from(c: &pb::Capacity) -> Self {
        Capacity {
            vcpu: c.vcpu,
            memory_mib: c.memory_mib,
            vcpu_overcommit_pct: c.vcpu_overcommit_pct,
            memory_overcommit_pct: c.memory_overcommit_pct,
        }
    }
}

fn status_to_pb(s: MemberStatus) -> pb::MemberStatus {
    match s {
        MemberStatus::Up => pb::MemberStatus::Up,
        MemberStatus::Down => pb::MemberStatus::Down,
    }
}

fn status_from_pb(s: i32) -> Result<MemberStatus, DecodeError> {
    Ok(match enum_value::<pb::MemberStatus>(s, "member status")? {
        pb::MemberStatus::Up => MemberStatus::Up,
        pb::MemberStatus::Down => MemberStatus::Down,
    })
}

pub fn member_to_pb(m: &Member) -> pb::Member {
    pb::Member {
        id: m.id,
        name: m.name.clone(),
        address: m.address.clone(),
        capacity: Some((&m.capacity).into()),
        labels: m.labels.clone().into_iter().collect(),
        drain: m.drain,
        runners: m.runners.iter().cloned().collect(),
        status: status_to_pb(m.status) as i32,
        learner: m.learner,
        protocol: m.protocol,
    }
}

pub fn member_from_pb(m: pb::Member) -> Result<Member, DecodeError> {
    Ok(Member {
        id: m.id,
        name: m.name,
        address: m.address,
        capacity: m.capacity.as_ref().map(Capacity::from).unwrap_or_default(),
        labels: m.labels.into_iter().collect(),
        drain: m.drain,
        runners: m.runners.into_iter().collect(),
        status: status_from_pb(m.status)?,
        learner: m.learner,
        protocol: m.protocol,
    })
}

// ---- VMs ----

fn desired_to_pb(d: Desired) -> pb::Desired {
    match d {
        Desired::Running => pb::Desired::Running,
        Desired::Stopped => pb::Desired::Stopped,
    }
}

fn desired_from_pb(d: i32) -> Result<Desired, DecodeError> {
    Ok(match enum_value::<pb::Desired>(d, "desired state")? {
        pb::Desired::Running => Desired::Running,
        pb::Desired::Stopped => Desired::Stopped,
    })
}

fn vm_state_to_pb(s: VmState) -> pb::VmState {
    match s {
        VmState::Pending => pb::VmState::Pending,
        VmState::Starting => pb::VmState::Starting,
        VmState::Running => pb::VmState::Running,
        VmState::Stopping => pb::VmState::Stopping,
        VmState::Stopped => pb::VmState::Stopped,
        VmState::Failed => pb::VmState::Failed,
        VmState::Lost => pb::VmState::Lost,
    }
}

fn vm_state_from_pb(s: i32) -> Result<VmState, DecodeError> {
    Ok(match enum_value::<pb::VmState>(s, "VM state")? {
        pb::VmState::Pending => VmState::Pending,
        pb::VmState::Starting => VmState::Starting,
        pb::VmState::Running => VmState::Running,
        pb::VmState::Stopping => VmState::Stopping,
        pb::VmState::Stopped => VmState::Stopped,
        pb::VmState::Failed => VmState::Failed,
        pb::VmState::Lost => VmState::Lost,
    })
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

pub fn spec_to_pb(s: &VmSpec) -> pb::VmSpec {
    pb::VmSpec {
        vcpu: s.vcpu,
        memory_mib: s.memory_mib,
        labels: s.labels.clone().into_iter().collect(),
        node: s.node.clone().unwrap_or_default(),
        anti_affinity: s.anti_affinity.clone().unwrap_or_default(),
        desired: desired_to_pb(s.desired) as i32,
        failover: match s.failover {
            Failover::Auto => pb::Failover::Auto,
            Failover::Manual => pb::Failover::Manual,
        } as i32,
    }
}

pub fn spec_from_pb(s: pb::VmSpec) -> Result<VmSpec, DecodeError> {
    Ok(VmSpec {
        vcpu: s.vcpu,
        memory_mib: s.memory_mib,
        labels: s.labels.into_iter().collect(),
        node: non_empty(s.node),
        anti_affinity: non_empty(s.anti_affinity),
        desired: desired_from_pb(s.desired)?,
        failover: match enum_value::<pb::Failover>(s.failover, "failover policy")? {
            pb::Failover::Auto => Failover::Auto,
            pb::Failover::Manual => Failover::Manual,
        },
    })
}

pub fn vm_to_pb(v: &Vm) -> pb::Vm {
    pb::Vm {
        name: v.name.clone(),
        spec: Some(spec_to_pb(&v.spec)),
        placement: v.placement.map(|p| pb::Placement { node: p.node, generation: p.generation }),
        observed: Some(pb::Observed {
            state: vm_state_to_pb(v.observed.state) as i32,
            since_unix_ms: v.observed.since_unix_ms,
            last_error: v.observed.last_error.clone().unwrap_or_default(),
            generation: v.placement.map_or(0, |p| p.generation),
        }),
        generation: v.generation,
        handoff: v.handoff.map(|h| pb::Handoff {
            from: h.from,
            generation: h.generation,
            reserved_vcpu: h.reserved.vcpu,
            reserved_memory_mib: h.reserved.memory_mib,
        }),
        moved_from: v.moved_from.unwrap_or(0),
        failed_on: v.failed_on.iter().copied().collect(),
    }
}

pub fn vm_from_pb(v: pb::Vm) -> Result<Vm, DecodeError> {
    let observed = v.observed.unwrap_or_default();
    Ok(Vm {
        name: v.name,
        spec: spec_from_pb(v.spec.ok_or_else(|| DecodeError::Shape("VM without a spec".into()))?)?,
        placement: v.placement.map(|p| Placement { node: p.node, generation: p.generation }),
        observed: Observed {
            state: vm_state_from_pb(observed.state)?,
            since_unix_ms: observed.since_unix_ms,
            last_error: non_empty(observed.last_error),
        },
        generation: v.generation,
        handoff: match v.handoff {
            None => None,
            Some(h) if h.from == 0 => return Err(DecodeError::Shape("handoff from node 0".into())),
            Some(h) => Some(Handoff {
                from: h.from,
                generation: h.generation,
                reserved: Resources { vcpu: h.reserved_vcpu, memory_mib: h.reserved_memory_mib },
            }),
        },
        moved_from: (v.moved_from != 0).then_some(v.moved_from),
        failed_on: v.failed_on.into_iter().collect(),
    })
}

// ---- commands ----

pub fn encode_command(c: &Command) -> Vec<u8> {
    use pb::command::Kind;
    let kind = match &c.kind {
        CommandKind::CreateVm { name, spec } => {
            Kind::CreateVm(pb::CreateVm { name: name.clone(), spec: Some(spec_to_pb(spec)) })
        }
        CommandKind::UpdateVm { name, spec } => {
            Kind::UpdateVm(pb::UpdateVm { name: name.clone(), spec: Some(spec_to_pb(spec)) })
        }
        CommandKind::DeleteVm { name } => Kind::DeleteVm(pb::DeleteVm { name: name.clone() }),
        CommandKind::SetDesired { name, desired } => {
            Kind::SetDesired(pb::SetDesired { name: name.clone(), desired: desired_to_pb(*desired) as i32 })
        }
        CommandKind::Place { vm, node, expected_generation } => {
            Kind::Place(pb::Place { vm: vm.clone(), node: *node, expected_generation: *expected_generation })
        }
        CommandKind::Unplace { vm, expected_generation } => {
            Kind::Unplace(pb::Unplace { vm: vm.clone(), expected_generation: *expected_generation })
        }
        CommandKind::SetCapacity { node, capacity } => {
            Kind::SetCapacity(pb::SetCapacity { node: *node, capacity: Some(capacity.into()) })
        }
        CommandKind::SetLabels { node, labels } => {
            Kind::SetLabels(pb::SetLabels { node: *node, labels: labels.clone().into_iter().collect() })
        }
        CommandKind::SetRunners { node, runners } => {
            Kind::SetRunners(pb::SetRunners { node: *node, runners: runners.clone() })
        }
        CommandKind::SetDrain { node, drain } => Kind::SetDrain(pb::SetDrain { node: *node, drain: *drain }),
        CommandKind::SetStatus { node, status } => {
            Kind::SetStatus(pb::SetStatus { node: *node, status: status_to_pb(*status) as i32 })
        }
        CommandKind::SetAddress { node, address, protocol } => {
            Kind::SetAddress(pb::SetAddress { node: *node, address: address.clone(), protocol: *protocol })
        }
        CommandKind::Report { node, vm, generation, state, last_error } => Kind::Report(pb::Report {
            node: *node,
            vm: vm.clone(),
            generation: *generation,
            state: vm_state_to_pb(*state) as i32,
            since_unix_ms: c.at_unix_ms,
            last_error: last_error.clone().unwrap_or_default(),
        }),
        CommandKind::Released { node, vm, generation } => {
            Kind::Released(pb::Released { node: *node, vm: vm.clone(), generation: *generation })
        }
        CommandKind::ClearHandoff { vm, from, expected_generation } => Kind::ClearHandoff(pb::ClearHandoff {
            vm: vm.clone(),
            from: *from,
            expected_generation: *expected_generation,
        }),
        CommandKind::AddJoinToken { hash, ttl_ms } => {
            Kind::AddJoinToken(pb::AddJoinToken { hash: hash.to_vec(), ttl_ms: *ttl_ms })
        }
        CommandKind::UseJoinToken { hash, node } => {
            Kind::UseJoinToken(pb::UseJoinToken { hash: hash.to_vec(), node: *node })
        }
        CommandKind::Recover { vm, node, expected_generation } => {
            Kind::Recover(pb::Recover { vm: vm.clone(), node: *node, expected_generation: *expected_generation })
        }
        CommandKind::LeaderElected { node, term } => {
            Kind::LeaderElected(pb::LeaderElected { node: *node, term: *term })
        }
    };
    pb::Command { kind: Some(kind), at_unix_ms: c.at_unix_ms }.encode_to_vec()
}

pub fn decode_command(bytes: &[u8]) -> Result<Command, DecodeError> {
    use pb::command::Kind;
    let c = pb::Command::decode(bytes)?;
    let spec = |s: Option<pb::VmSpec>| -> Result<VmSpec, DecodeError> {
        spec_from_pb(s.ok_or_else(|| DecodeError::Shape("VM command without a spec".into()))?)
    };
    let kind = match c.kind.ok_or_else(|| DecodeError::Shape("command without a kind".into()))? {
        Kind::CreateVm(m) => CommandKind::CreateVm { name: m.name, spec: spec(m.spec)? },
        Kind::UpdateVm(m) => CommandKind::UpdateVm { name: m.name, spec: spec(m.spec)? },
        Kind::DeleteVm(m) => CommandKind::DeleteVm { name: m.name },
        Kind::SetDesired(m) => CommandKind::SetDesired { name: m.name, desired: desired_from_pb(m.desired)? },
        Kind::Place(m) => CommandKind::Place { vm: m.vm, node: m.node, expected_generation: m.expected_generation },
        Kind::Unplace(m) => CommandKind::Unplace { vm: m.vm, expected_generation: m.expected_generation },
        Kind::SetCapacity(m) => CommandKind::SetCapacity {
            node: m.node,
            capacity: m
                .capacity
                .as_ref()
                .map(Capacity::from)
                .ok_or_else(|| DecodeError::Shape("capacity command without a capacity".into()))?,
        },
        Kind::SetLabels(m) => CommandKind::SetLabels { node: m.node, labels: m.labels.into_iter().collect() },
        Kind::SetRunners(m) => CommandKind::SetRunners { node: m.node, runners: m.runners },
        Kind::SetDrain(m) => CommandKind::SetDrain { node: m.node, drain: m.drain },
        Kind::SetStatus(m) => CommandKind::SetStatus { node: m.node, status: status_from_pb(m.status)? },
        Kind::SetAddress(m) => CommandKind::SetAddress { node: m.node, address: m.address, protocol: m.protocol },
        Kind::Report(m) => CommandKind::Report {
            node: m.node,
            vm: m.vm,
            generation: m.generation,
            state: vm_state_from_pb(m.state)?,
            last_error: non_empty(m.last_error),
        },
        Kind::Released(m) => CommandKind::Released { node: m.node, vm: m.vm, generation: m.generation },
        Kind::ClearHandoff(m) => {
            CommandKind::ClearHandoff { vm: m.vm, from: m.from, expected_generation: m.expected_generation }
        }
        Kind::AddJoinToken(m) => CommandKind::AddJoinToken { hash: token_hash(&m.hash)?, ttl_ms: m.ttl_ms },
        Kind::UseJoinToken(m) => CommandKind::UseJoinToken { hash: token_hash(&m.hash)?, node: m.node },
        Kind::Recover(m) => CommandKind::Recover { vm: m.vm, node: m.node, expected_generation: m.expected_generation },
        Kind::LeaderElected(m) => CommandKind::LeaderElected { node: m.node, term: m.term },
    };
    Ok(Command { at_unix_ms: c.at_unix_ms, kind })
}

fn token_hash(bytes: &[u8]) -> Result<[u8; 32], DecodeError> {
    bytes.try_into().map_err(|_| DecodeError::Shape(format!("a join token hash of {} bytes, not 32", bytes.len())))
}

// ---- join tokens ----

pub fn join_token_to_pb(t: &JoinToken) -> pb::JoinToken {
    pb::JoinToken { hash: t.hash.to_vec(), expires_unix_ms: t.expires_unix_ms, used_by: t.used_by.unwrap_or(0) }
}

pub fn join_token_from_pb(t: pb::JoinToken) -> Result<JoinToken, DecodeError> {
    Ok(JoinToken {
        hash: token_hash(&t.hash)?,
        expires_unix_ms: t.expires_unix_ms,
        used_by: (t.used_by != 0).then_some(t.used_by),
    })
}

/// The join tokens as their one storage record.
pub fn encode_join_tokens(state: &State) -> Vec<u8> {
    pb::JoinTokens { tokens: state.join_tokens().values().map(join_token_to_pb).collect() }.encode_to_vec()
}

pub fn decode_join_tokens(bytes: &[u8]) -> Result<Vec<JoinToken>, DecodeError> {
    pb::JoinTokens::decode(bytes)?.tokens.into_iter().map(join_token_from_pb).collect()
}

/// Member metadata as carried in a Raft conf change's context.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberInfo {
    pub name: String,
    pub address: String,
    pub at_unix_ms: u64,
    /// An `AddLearnerNode` that demotes a voter (no name, no address).
    pub demote: bool,
}

pub fn encode_member_info(info: &MemberInfo) -> Vec<u8> {
    pb::MemberInfo {
        name: info.name.clone(),
        address: info.address.clone(),
        at_unix_ms: info.at_unix_ms,
        demote: info.demote,
    }
    .encode_to_vec()
}

pub fn decode_member_info(bytes: &[u8]) -> Result<MemberInfo, DecodeError> {
    let info = pb::MemberInfo::decode(bytes)?;
    Ok(MemberInfo { name: info.name, address: info.address, at_unix_ms: info.at_unix_ms, demote: info.demote })
}

// ---- snapshots ----

/// Encodes the whole state, in key order, so equal states encode equally.
pub fn encode_snapshot(state: &State) -> Vec<u8> {
    pb::StateSnapshot {
        members: state.members().values().map(member_to_pb).collect(),
        vms: state.vms().values().map(vm_to_pb).collect(),
        join_tokens: state.join_tokens().values().map(join_token_to_pb).collect(),
    }
    .encode_to_vec()
}

pub fn decode_snapshot(bytes: &[u8]) -> Result<State, DecodeError> {
    let s = pb::StateSnapshot::decode(bytes)?;
    let members = s.members.into_iter().map(member_from_pb).collect::<Result<Vec<_>, _>>()?;
    let vms = s.vms.into_iter().map(vm_from_pb).collect::<Result<Vec<_>, _>>()?;
    let join_tokens = s.join_tokens.into_iter().map(join_token_from_pb).collect::<Result<Vec<_>, _>>()?;
    Ok(State::load(members, vms, join_tokens))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip() {
        let spec = VmSpec {
            vcpu: 2,
            memory_mib: 512,
            labels: [("a".to_string(), "b".to_string())].into(),
            node: Some("h1".into()),
            anti_affinity: Some("g".into()),
            desired: Desired::Stopped,
            failover: Failover::Manual,
        };
        let kinds = vec![
            CommandKind::CreateVm { name: "web".into(), spec: spec.clone() },
            CommandKind::UpdateVm { name: "web".into(), spec },
            CommandKind::DeleteVm { name: "web".into() },
            CommandKind::SetDesired { name: "web".into(), desired: Desired::Running },
            CommandKind::Place { vm: "web".into(), node: 7, expected_generation: 3 },
            CommandKind::Unplace { vm: "web".into(), expected_generation: 4 },
            CommandKind::SetCapacity {
                node: 1,
                capacity: Capacity { vcpu: 3, memory_mib: 4, vcpu_overcommit_pct: 150, memory_overcommit_pct: 100 },
            },
            CommandKind::SetLabels { node: 1, labels: [("k".to_string(), "v".to_string())].into() },
            CommandKind::SetRunners { node: 1, runners: vec!["a".into(), "b".into()] },
            CommandKind::SetDrain { node: 1, drain: true },
            CommandKind::SetStatus { node: 1, status: MemberStatus::Down },
            CommandKind::SetAddress { node: 1, address: "h:1".into(), protocol: 1 },
            CommandKind::Report {
                node: 1,
                vm: "web".into(),
                generation: 2,
                state: VmState::Failed,
                last_error: Some("boom".into()),
            },
            CommandKind::Released { node: 3, vm: "web".into(), generation: 5 },
            CommandKind::ClearHandoff { vm: "web".into(), from: 3, expected_generation: 6 },
            CommandKind::Recover { vm: "web".into(), node: 2, expected_generation: 7 },
            CommandKind::AddJoinToken { hash: [7; 32], ttl_ms: 3_600_000 },
            CommandKind::UseJoinToken { hash: [7; 32], node: 4 },
            CommandKind::LeaderElected { node: 2, term: 9 },
        ];
        for kind in kinds {
            let command = Command { at_unix_ms: 42, kind };
            assert_eq!(decode_command(&encode_command(&command)).unwrap(), command);
        }
    }

    #[test]
    fn vms_round_trip_with_and_without_a_handoff() {
        let mut vm = Vm {
            name: "web".into(),
            spec: VmSpec { vcpu: 2, memory_mib: 512, ..VmSpec::default() },
            placement: Some(Placement { node: 2, generation: 7 }),
            observed: Observed { state: VmState::Starting, since_unix_ms: 9, last_error: Some("x".into()) },
            generation: 7,
            handoff: Some(Handoff { from: 1, generation: 6, reserved: Resources { vcpu: 2, memory_mib: 512 } }),
            moved_from: Some(1),
            failed_on: [3, 4].into(),
        };
        assert_eq!(vm_from_pb(vm_to_pb(&vm)).unwrap(), vm);
        vm.handoff = None;
        vm.moved_from = None;
        assert_eq!(vm_from_pb(vm_to_pb(&vm)).unwrap(), vm);
        // A record written before handoffs existed decodes without one.
        let mut old = vm_to_pb(&vm);
        old.handoff = None;
        old.moved_from = 0;
        assert_eq!(vm_from_pb(old).unwrap(), vm);
    }

    #[test]
    fn join_tokens_round_trip_and_a_short_hash_does_not_decode() {
        let tokens = vec![
            JoinToken { hash: [1; 32], expires_unix_ms: 5, used_by: None },
            JoinToken { hash: [2; 32], expires_unix_ms: 6, used_by: Some(9) },
        ];
        let state = State::load(Vec::new(), Vec::new(), tokens.clone());
        assert_eq!(decode_join_tokens(&encode_join_tokens(&state)).unwrap(), tokens);
        assert_eq!(decode_snapshot(&encode_snapshot(&state)).unwrap(), state);
        let short = pb::Command {
            at_unix_ms: 1,
            kind: Some(pb::command::Kind::UseJoinToken(pb::UseJoinToken { hash: vec![1; 31], node: 2 })),
        };
        assert!(decode_command(&short.encode_to_vec()).is_err());
    }

    #[test]
    fn garbage_does_not_decode_into_a_command() {
        assert!(decode_command(&[]).is_err(), "an empty entry is not a command");
        assert!(decode_command(&[0xff, 0xff, 0xff]).is_err());
    }
}
