//! The client API (`service Blixard`): what the CLI talks to.
//!
//! Any member accepts any request. VM create, start, stop and delete are
//! proposed by the member that took them ([`Context::write_anywhere`]);
//! other writes run on the leader (forwarded there once by
//! [`Context::write`]); reads are linearizable, served by the
//! receiving member after a read-index round. Requests are validated here,
//! at the edge, with the same rules the state machine applies again, so a
//! malformed request is refused before it costs a Raft round and nothing
//! is ever half-done: a refused request changes nothing.

use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::broadcast;
use tonic::{Request, Response, Status};

use super::context::{ApiError, Context, FORWARDED_HEADER, Membership, is_forwarded, wants_stale};
use super::pb;
use super::pb::blixard_server::Blixard;
use super::status::from_rejection;
use super::tls::{self, CertIdentity};
use crate::consensus::{CoreStatus, Role};
use crate::names;
use crate::node::events::{EVENTS_MAX, Event};
use crate::node::{NodeStatus, ProposalCheck, autopilot};
use crate::state::{
    CommandKind, Desired, Effect, Failover, Labels, Member, MemberStatus, MembershipChange, NodeId, Rejection, State,
    Vm, VmSpec, VmState, limits,
};

/// A VM as the API shows it. `explain` adds why a VM that is not running
/// is not (`scheduler::why_pending`); it is left out of lists because it
/// costs a pass over the whole cluster per VM.
pub fn vm_info(state: &State, vm: &Vm, explain: bool) -> pb::VmInfo {
    let node = vm.placement.and_then(|p| state.member(p.node)).map(|m| m.name.clone()).unwrap_or_default();
    let shown = shown_state(state, vm);
    pb::VmInfo {
        name: vm.name.clone(),
        node,
        desired: vm.spec.desired.to_string(),
        state: shown.to_string(),
        vcpu: vm.spec.vcpu,
        memory_mib: vm.spec.memory_mib,
        since_unix_ms: vm.observed.since_unix_ms,
        last_error: vm.observed.last_error.clone().unwrap_or_default(),
        labels: vm.spec.labels.clone().into_iter().collect(),
        pinned_node: vm.spec.node.clone().unwrap_or_default(),
        anti_affinity: vm.spec.anti_affinity.clone().unwrap_or_default(),
        pending_reason: if explain && matches!(shown, VmState::Pending | VmState::Failed | VmState::Lost) {
            crate::scheduler::why_pending(state, &crate::scheduler::Policy::default(), &vm.name)
        } else {
            String::new()
        },
        generation: vm.generation,
        failover: vm.spec.failover.to_string(),
    }
}

/// Marks the answer of a `--stale` read with how old this member's last
/// quorum contact is ([`super::context::STALE_FOR_HEADER`]).
fn stale_marked<T>(mut response: Response<T>, stale: Option<Option<u64>>) -> Response<T> {
    if let Some(age) = stale {
        let value = age.map_or_else(|| "never".to_string(), |ms| ms.to_string());
        if let Ok(value) = value.parse() {
            response.metadata_mut().insert(super::context::STALE_FOR_HEADER, value);
        }
    }
    response
}

/// The state a VM is shown in: [`State::vm_state`], except that a
/// desired-stopped VM on no host is `stopped`, not `pending` (nothing runs
/// it, and nothing will until `vm start`; the state machine keeps it
/// pending, as it was before this view existed).
pub fn shown_state(state: &State, vm: &Vm) -> VmState {
    let shown = state.vm_state(vm);
    if vm.placement.is_none() && vm.spec.desired == Desired::Stopped && shown == VmState::Pending {
        VmState::Stopped
    } else {
        shown
    }
}

/// What `VmList` asks for, checked.
#[derive(Debug, Clone, Default)]
pub struct VmQuery {
    /// Start after this name (the previous page's token).
    pub after: Option<String>,
    /// At most this many VMs; 0: as many as fit in [`VM_LIST_PAGE_BYTES`].
    pub size: usize,
    pub node: Option<NodeId>,
    pub state: Option<VmState>,
    pub labels: Labels,
    pub prefix: String,
}

/// The most VMs one `VmList` page holds.
pub const VM_LIST_PAGE_MAX: u32 = 10_000;
/// Encoded bytes of VMs one page holds at most (a page holds at least one
/// VM): half of a gRPC client's default 4 MiB receive limit.
pub const VM_LIST_PAGE_BYTES: usize = 2 * 1024 * 1024;
/// VMs one page examines at most: a read runs on the raft thread, and a
/// filter that matches little must not make it walk a million VMs at once.
pub const VM_LIST_SCAN_MAX: usize = 100_000;

/// One page of `VmList`: the VMs after `query.after` in name order that
/// match the filters, bounded by [`VmQuery::size`], [`VM_LIST_PAGE_BYTES`]
/// and [`VM_LIST_SCAN_MAX`]; the token is the last name examined, empty
/// when nothing is left.
pub fn vm_page(state: &State, query: &VmQuery) -> pb::VmListResponse {
    use prost::Message as _;
    use std::ops::Bound;
    let after = query.after.as_deref();
    let prefix = query.prefix.as_str();
    // Start at the prefix when the token is before it.
    let start = match after {
        Some(after) if after >= prefix => Bound::Excluded(after),
        _ if prefix.is_empty() => Bound::Unbounded,
        _ => Bound::Included(prefix),
    };
    let all: Box<dyn Iterator<Item = &Vm>> = match query.node {
        Some(node) => Box::new(state.vms_on_after(node, None).skip_while(move |vm| match start {
            Bound::Excluded(s) => vm.name.as_str() <= s,
            Bound::Included(s) => vm.name.as_str() < s,
            Bound::Unbounded => false,
        })),
        None => Box::new(state.vms().range::<str, _>((start, Bound::Unbounded)).map(|(_, vm)| vm)),
    };
    let size = if query.size == 0 { usize::MAX } else { query.size };
    let (mut vms, mut bytes, mut scanned, mut last, mut more) = (Vec::new(), 0, 0, None, false);
    for vm in all {
        if !vm.name.starts_with(prefix) {
            break; // names are in order: past the prefix, nothing matches
        }
        if vms.len() >= size || scanned >= VM_LIST_SCAN_MAX {
            more = true;
            break;
        }
        let matches = query.state.is_none_or(|s| shown_state(state, vm) == s)
            && query.labels.iter().all(|(k, v)| vm.spec.labels.get(k) == Some(v));
        if matches {
            let info = vm_info(state, vm, false);
            let len = info.encoded_len();
            if !vms.is_empty() && bytes + len > VM_LIST_PAGE_BYTES {
                more = true;
                break;
            }
            bytes += len;
            vms.push(info);
        }
        scanned += 1;
        last = Some(vm.name.as_str());
    }
    let next_page_token = if more { last.unwrap_or_default().to_string() } else { String::new() };
    pb::VmListResponse { vms, next_page_token }
}

/// Checks a `VmList` request; the node filter is resolved by the read.
pub fn query_of(request: &pb::VmListRequest) -> Result<VmQuery, Status> {
    if !request.page_token.is_empty() {
        names::validate(&request.page_token)
            .map_err(|_| Status::invalid_argument(format!("{} is not a page token", quoted(&request.page_token))))?;
    }
    if request.page_size > VM_LIST_PAGE_MAX {
        return Err(Status::invalid_argument(format!(
            "page_size is at most {VM_LIST_PAGE_MAX}, not {}",
            request.page_size
        )));
    }
    if !request.node.is_empty() {
        check_name("node", &request.node)?;
    }
    let state = match request.state.as_str() {
        "" => None,
        text => Some(VmState::ALL.into_iter().find(|s| s.as_str() == text).ok_or_else(|| {
            Status::invalid_argument(format!(
                "{} is not a VM state: pending, starting, running, stopping, stopped, failed or lost",
                quoted(text)
            ))
        })?),
    };
    if request.name_prefix.len() > names::NAME_LEN_MAX
        || !request.name_prefix.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(Status::invalid_argument(format!("{} cannot start a VM name", quoted(&request.name_prefix))));
    }
    let labels: Labels = request.labels.clone().into_iter().collect();
    // The label rules of the state machine, asked with a dry run.
    let probe = pb::VmCreateRequest {
        name: "probe".into(),
        vcpu: 1,
        memory_mib: 64,
        labels: request.labels.clone(),
        ..Default::default()
    };
    spec_of(&probe)?;
    Ok(VmQuery {
        after: (!request.page_token.is_empty()).then(|| request.page_token.clone()),
        size: request.page_size as usize,
        node: None,
        state,
        labels,
        prefix: request.name_prefix.clone(),
    })
}

/// The spec `request` asks `current` to become, and the fields it changes.
pub fn updated_spec(current: &VmSpec, request: &pb::VmUpdateRequest) -> Result<(VmSpec, Vec<&'static str>), Status> {
    let mut spec = current.clone();
    if let Some(vcpu) = request.vcpu {
        spec.vcpu = vcpu;
    }
    if let Some(memory_mib) = request.memory_mib {
        spec.memory_mib = memory_mib;
    }
    for key in &request.remove_labels {
        spec.labels.remove(key);
    }
    for (key, value) in &request.set_labels {
        spec.labels.insert(key.clone(), value.clone());
    }
    /// Sets `field` to `value`, or clears it, or leaves it.
    fn set_or_clear(field: &mut Option<String>, value: &Option<String>, clear: bool, what: &str) -> Result<(), Status> {
        match (value, clear) {
            (Some(_), true) => {
                return Err(Status::invalid_argument(format!("give either {what} or clear it, not both")));
            }
            (Some(value), false) => *field = Some(value.clone()),
            (None, true) => *field = None,
            (None, false) => {}
        }
        Ok(())
    }
    set_or_clear(&mut spec.node, &request.node, request.unpin, "a node to pin the VM to")?;
    set_or_clear(
        &mut spec.anti_affinity,
        &request.anti_affinity,
        request.clear_anti_affinity,
        "an anti-affinity group",
    )?;
    // The checks of a create, on the whole new spec.
    let as_create = pb::VmCreateRequest {
        name: request.name.clone(),
        vcpu: spec.vcpu,
        memory_mib: spec.memory_mib,
        node: spec.node.clone().unwrap_or_default(),
        labels: spec.labels.clone().into_iter().collect(),
        anti_affinity: spec.anti_affinity.clone().unwrap_or_default(),
        stopped: spec.desired == Desired::Stopped,
        failover: request.failover.clone().unwrap_or_else(|| spec.failover.to_string()),
    };
    spec.failover = spec_of(&as_create)?.failover;
    let mut changed = Vec::new();
    for (field, differs) in [
        ("vcpu", spec.vcpu != current.vcpu),
        ("memory_mib", spec.memory_mib != current.memory_mib),
        ("labels", spec.labels != current.labels),
        ("node", spec.node != current.node),
        ("anti_affinity", spec.anti_affinity != current.anti_affinity),
        ("failover", spec.failover != current.failover),
    ] {
        if differs {
            changed.push(field);
        }
    }
    Ok((spec, changed))
}

/// Why VM `name` may not take `spec` now (`None`: it may). Pinned: it must
/// fit on that node, as a create must. Placed and no longer fitting its
/// host: some other host must take it, else the change is refused with
/// the reason it does not fit where it is. Unplaced and unpinned: it waits
/// for a host like a new VM.
pub fn update_violation(state: &State, name: &str, spec: &VmSpec) -> Option<Rejection> {
    let vm = state.vm(name)?;
    if let Some(pinned) = spec.node.as_deref() {
        let Some(node) = state.member_by_name(pinned) else {
            return Some(Rejection::UnknownNodeName(pinned.to_string()));
        };
        return pinned_violation(state, name, spec, node);
    }
    let host = vm.placement.and_then(|p| state.member(p.node))?;
    let here = state.placement_violation(name, spec, host.id)?;
    let elsewhere = state
        .members()
        .values()
        .any(|m| m.id != host.id && m.accepts_placements() && state.placement_violation(name, spec, m.id).is_none());
    (!elsewhere).then_some(here)
}

/// Why a VM with `spec` pinned to `node` cannot be placed there now.
fn pinned_violation(state: &State, name: &str, spec: &VmSpec, node: &Member) -> Option<Rejection> {
    if node.status == MemberStatus::Down {
        return Some(Rejection::NodeUnavailable { node: node.name.clone(), why: "down" });
    }
    if node.drain {
        return Some(Rejection::NodeUnavailable { node: node.name.clone(), why: "draining" });
    }
    if node.capacity.vcpu == 0 {
        return Some(Rejection::NotReported { node: node.name.clone() });
    }
    state.fit_violation(name, spec, node.id)
}

fn role_of(member: &Member, leader: Option<NodeId>) -> &'static str {
    if member.learner {
        "learner"
    } else if leader == Some(member.id) {
        "leader"
    } else {
        "follower"
    }
}

pub fn node_info(state: &State, member: &Member, leader: Option<NodeId>) -> pb::NodeInfo {
    let limit = member.capacity.limit();
    let used = state.used_on(member.id, None);
    pb::NodeInfo {
        name: member.name.clone(),
        id: member.id,
        address: member.address.clone(),
        status: member.status_word().to_string(),
        role: role_of(member, leader).to_string(),
        vcpu_total: limit.vcpu,
        vcpu_used: used.vcpu,
        memory_mib_total: limit.memory_mib,
        memory_mib_used: used.memory_mib,
        labels: member.labels.clone().into_iter().collect(),
        vms: state.vms_on(member.id).count() as u32,
        stopping: state.handoffs_from(member.id).count() as u32,
    }
}

/// The cluster as this member sees it. Only the leader knows which peers
/// are active; a follower reports members as healthy by their replicated
/// status alone.
fn cluster_status(state: &State, core: &CoreStatus, node: &NodeStatus, me: &Membership) -> pb::ClusterStatusResponse {
    let leader = core.leader;
    let mut members: Vec<pb::MemberStatus> = state
        .members()
        .values()
        .map(|m| {
            let active =
                if core.role == Role::Leader { m.id == me.id || node.active_peers.contains(&m.id) } else { true };
            pb::MemberStatus {
                id: m.id,
                name: m.name.clone(),
                address: m.address.clone(),
                role: role_of(m, leader).to_string(),
                healthy: m.status == MemberStatus::Up && active,
                voter: !m.learner,
                zone: m.labels.get(autopilot::ZONE_LABEL).cloned().unwrap_or_default(),
                rack: m.labels.get(autopilot::RACK_LABEL).cloned().unwrap_or_default(),
            }
        })
        .collect();
    let voters = members.iter().filter(|m| m.voter).count() as u32;
    // Operators deal in names: list members by name, not by generated id.
    members.sort_by(|a, b| a.name.cmp(&b.name));
    pb::ClusterStatusResponse {
        leader: leader.and_then(|id| state.member(id)).map(|m| m.name.clone()).unwrap_or_default(),
        term: core.term,
        members,
        commit_index: core.commit,
        applied_index: core.applied,
        member: true,
        name: node.name.clone(),
        id: me.id,
        cluster_id: me.cluster_id,
        contact_age_ms: me.node.contact_age_ms(),
        quorum: me.node.has_quorum_contact(),
        voters,
        voters_wanted: me.node.voters_wanted() as u32,
    }
}

/// A client's text as an error message quotes it: at most
/// [`QUOTED_CHARS_MAX`] characters, so a hostile request cannot make the
/// answer (or a log line) as large as itself.
pub fn quoted(text: &str) -> String {
    if text.chars().count() <= QUOTED_CHARS_MAX {
        format!("{text:?}")
    } else {
        let head: String = text.chars().take(QUOTED_CHARS_MAX).collect();
        format!("{head:?}... ({} bytes)", text.len())
    }
}

const QUOTED_CHARS_MAX: usize = 80;
/// Longest join token accepted (a token is a short secret).
pub const JOIN_TOKEN_LEN_MAX: usize = 256;

fn check_name(what: &str, name: &str) -> Result<(), Status> {
    names::validate(name).map_err(|e| Status::invalid_argument(format!("invalid {what} name {}: {e}", quoted(name))))
}

/// Validates a create request and turns it into a spec: the edge check of
/// every field (the state machine checks the same again at apply).
pub fn spec_of(request: &pb::VmCreateRequest) -> Result<VmSpec, Status> {
    check_name("VM", &request.name)?;
    if request.vcpu == 0 || request.vcpu > limits::VM_VCPU_MAX {
        return Err(Status::invalid_argument(format!(
            "vcpu must be between 1 and {}, not {}",
            limits::VM_VCPU_MAX,
            request.vcpu
        )));
    }
    if !(limits::VM_MEMORY_MIB_MIN..=limits::VM_MEMORY_MIB_MAX).contains(&request.memory_mib) {
        return Err(Status::invalid_argument(format!(
            "memory must be between {} and {} MiB, not {}",
            limits::VM_MEMORY_MIB_MIN,
            limits::VM_MEMORY_MIB_MAX,
            request.memory_mib
        )));
    }
    let node = (!request.node.is_empty()).then(|| request.node.clone());
    if let Some(node) = &node {
        check_name("node", node)?;
    }
    let anti_affinity = (!request.anti_affinity.is_empty()).then(|| request.anti_affinity.clone());
    if let Some(group) = &anti_affinity {
        check_name("anti-affinity group", group)?;
    }
    let failover = match request.failover.as_str() {
        "" => Failover::Auto,
        text => Failover::parse(text).ok_or_else(|| {
            Status::invalid_argument(format!("failover must be \"auto\" or \"manual\", not {text:?}"))
        })?,
    };
    let labels: Labels = request.labels.clone().into_iter().collect();
    let spec = VmSpec {
        vcpu: request.vcpu,
        memory_mib: request.memory_mib,
        labels,
        node,
        anti_affinity,
        desired: if request.stopped { Desired::Stopped } else { Desired::Running },
        failover,
    };
    // The label rules live in the state machine; ask it with a dry run so
    // the edge and apply can never disagree.
    let mut probe = State::default();
    let command = crate::state::Command {
        at_unix_ms: 0,
        kind: CommandKind::CreateVm { name: request.name.clone(), spec: spec.clone() },
    };
    if let Err(rejection) = probe.apply(&command) {
        return Err(from_rejection(&rejection));
    }
    Ok(spec)
}

/// Proposes `kind` (unless `check` refuses it) and answers with the VM's
/// info once this member applied it, in one trip to the raft thread.
async fn propose_for_vm(
    member: &Membership,
    kind: CommandKind,
    check: Option<ProposalCheck>,
    name: String,
) -> Result<pb::VmInfo, ApiError> {
    let info = member
        .node
        .propose_then(kind, check, move |_, state| {
            state.vm(&name).map(|vm| vm_info(state, vm, false)).ok_or(Rejection::UnknownVm(name))
        })
        .await?;
    info.map_err(|r| ApiError::Status(from_rejection(&r)))
}

/// Reads a VM's info after a write on the leader (its state already
/// reflects the write).
async fn vm_after_write(member: &Membership, name: String) -> Result<pb::VmInfo, ApiError> {
    let info = member
        .node
        .read_local(move |state, _| {
            state.vm(&name).map(|vm| vm_info(state, vm, false)).ok_or(Rejection::UnknownVm(name))
        })
        .await?;
    info.map_err(|r| ApiError::Status(from_rejection(&r)))
}

async fn node_after_write(member: &Membership, id: NodeId) -> Result<pb::NodeInfo, ApiError> {
    let info = member
        .node
        .read_local(move |state, core| {
            state.member(id).map(|m| node_info(state, m, core.leader)).ok_or(Rejection::UnknownNode(id))
        })
        .await?;
    info.map_err(|r| ApiError::Status(from_rejection(&r)))
}

/// Looks a member up by name in the local (leader's) state.
async fn member_id(member: &Membership, name: String) -> Result<NodeId, ApiError> {
    let id = member
        .node
        .read_local(move |state, _| state.member_by_name(&name).map(|m| m.id).ok_or(Rejection::UnknownNodeName(name)))
        .await?;
    id.map_err(|r| ApiError::Status(from_rejection(&r)))
}

fn client(channel: tonic::transport::Channel) -> pb::blixard_client::BlixardClient<tonic::transport::Channel> {
    Context::blixard_client(channel)
}

pub struct BlixardService {
    context: Arc<Context>,
}

impl BlixardService {
    pub fn new(context: Arc<Context>) -> Self {
        BlixardService { context }
    }

    async fn set_desired(
        &self,
        request: Request<pb::VmRequest>,
        desired: Desired,
    ) -> Result<Response<pb::VmInfo>, Status> {
        check_name("VM", &request.get_ref().name)?;
        self.context
            .write_anywhere(request, move |member, request| {
                Box::pin(async move {
                    let kind = CommandKind::SetDesired { name: request.name.clone(), desired };
                    propose_for_vm(&member, kind, None, request.name).await
                })
            })
            .await
    }

    async fn set_drain(
        &self,
        request: Request<pb::NodeRequest>,
        drain: bool,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        check_name("node", &request.get_ref().name)?;
        self.context
            .write(
                request,
                move |member, request| {
                    Box::pin(async move {
                        let id = member_id(&member, request.name).await?;
                        member.node.propose(CommandKind::SetDrain { node: id, drain }).await?;
                        node_after_write(&member, id).await
                    })
                },
                move |channel, request| {
                    Box::pin(async move {
                        if drain {
                            client(channel).node_drain(request).await
                        } else {
                            client(channel).node_undrain(request).await
                        }
                    })
                },
            )
            .await
    }
}

#[tonic::async_trait]
impl Blixard for BlixardService {
    async fn cluster_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let Some(member) = self.context.membership() else {
            return Ok(Response::new(pb::ClusterStatusResponse {
                member: false,
                name: self.context.name.clone(),
                ..Default::default()
            }));
        };
        let node = member.node.status();
        if node.removed {
            return Ok(Response::new(pb::ClusterStatusResponse {
                member: false,
                name: node.name,
                id: member.id,
                cluster_id: member.cluster_id,
                ..Default::default()
            }));
        }
        // Only the leader knows which members are active: ask it, and fall
        // back to this member's own view when it cannot be reached (which
        // is when an operator needs the status most).
        if !is_forwarded(&request)
            && node.role != Role::Leader
            && let Some(leader) = node.leader.as_ref().filter(|l| l.id != member.id && !l.address.is_empty())
            && let Ok(channel) = self.context.channel(&leader.address)
        {
            let mut forward = Request::new(pb::ClusterStatusRequest {});
            forward.metadata_mut().insert(super::context::FORWARDED_HEADER, "1".parse().expect("ASCII"));
            forward.set_timeout(std::time::Duration::from_secs(2));
            match client(channel).cluster_status(forward).await {
                Ok(mut response) => {
                    // Answer as this agent, with the leader's view of the rest.
                    let body = response.get_mut();
                    body.name = node.name.clone();
                    body.id = member.id;
                    body.contact_age_ms = member.node.contact_age_ms();
                    body.quorum = member.node.has_quorum_contact();
                    return Ok(response);
                }
                Err(e) => {
                    tracing::debug!(leader = %leader.name, error = %e.message(), "cluster status from the leader failed")
                }
            }
        }
        let me = member.clone();
        let response = member.node.read_local(move |state, core| cluster_status(state, core, &node, &me)).await?;
        Ok(Response::new(response))
    }

    async fn cluster_join(
        &self,
        request: Request<pb::ClusterJoinRequest>,
    ) -> Result<Response<pb::ClusterJoinResponse>, Status> {
        if let Some(member) = self.context.membership()
            && !member.node.status().removed
        {
            return Err(Status::failed_precondition(format!(
                "{} is already a member of a cluster (id {}); a member never joins another",
                self.context.name, member.id
            )));
        }
        let request = request.into_inner();
        let seed = request.seed.trim_start_matches("http://").trim_start_matches("https://").to_string();
        if seed.is_empty() || !seed.contains(':') || seed.len() > limits::ADDRESS_LEN_MAX {
            return Err(Status::invalid_argument(format!("{} is not a HOST:PORT address", quoted(&seed))));
        }
        if request.token.len() > JOIN_TOKEN_LEN_MAX {
            return Err(Status::invalid_argument(format!("a join token is at most {JOIN_TOKEN_LEN_MAX} bytes")));
        }
        self.context.request_join(seed, request.token).await.map(Response::new)
    }

    async fn cluster_join_token(
        &self,
        request: Request<pb::ClusterJoinTokenRequest>,
    ) -> Result<Response<pb::ClusterJoinTokenResponse>, Status> {
        let ttl_seconds = match request.get_ref().ttl_seconds {
            0 => crate::join_token::DEFAULT_TTL_SECS,
            seconds => seconds,
        };
        let ttl_max_seconds = limits::JOIN_TOKEN_TTL_MS_MAX / 1000;
        if ttl_seconds > ttl_max_seconds {
            return Err(Status::invalid_argument(format!(
                "a join token lives at most 7 days ({ttl_max_seconds} s), not {ttl_seconds} s"
            )));
        }
        self.context.member()?;
        // The CA a joiner is to pin: the one whose certificates the leader,
        // which records the token, presents.
        let pin = self.context.dialer.credentials().map(|c| c.pin);
        let ttl_ms = ttl_seconds * 1000;
        // Made and recorded by the leader, so that a token's life is
        // judged on one clock: the leader's, at issue and at use (a
        // member's fast clock cannot shorten or end anyone's token).
        self.context
            .write(
                request,
                move |member, _| {
                    Box::pin(async move {
                        let token = crate::join_token::generate(pin)
                            .map_err(|e| Status::internal(format!("cannot read random bytes for a join token: {e}")))?;
                        let hash = crate::join_token::hash(&token);
                        let effect = member.node.propose(CommandKind::AddJoinToken { hash, ttl_ms }).await?;
                        let Effect::JoinTokenAdded { expires_unix_ms } = effect else {
                            return Err(ApiError::Status(Status::internal("the join token was not recorded")));
                        };
                        // The token itself is never logged: only the operator sees it.
                        tracing::info!(ttl_seconds, "issued a join token");
                        Ok(pb::ClusterJoinTokenResponse { token, expires_unix_ms })
                    })
                },
                |channel, request| Box::pin(async move { client(channel).cluster_join_token(request).await }),
            )
            .await
    }

    async fn cluster_issue_client(
        &self,
        request: Request<pb::ClusterIssueClientRequest>,
    ) -> Result<Response<pb::ClusterIssueClientResponse>, Status> {
        let speaker = super::gate::speaker(&request);
        let request = request.into_inner();
        check_name("client", &request.name)?;
        let role = tls::Role::parse(&request.role).ok_or_else(|| {
            Status::invalid_argument(format!("{} is not a role: use read-only or admin", quoted(&request.role)))
        })?;
        let days = match i64::from(request.days) {
            0 => crate::pki::LEAF_VALID_DAYS_DEFAULT,
            days if days > crate::pki::LEAF_VALID_DAYS_MAX => {
                return Err(Status::invalid_argument(format!(
                    "a client certificate is valid for at most {} days, not {days}",
                    crate::pki::LEAF_VALID_DAYS_MAX
                )));
            }
            days => days,
        };
        let credentials = self.context.dialer.credentials().ok_or_else(|| {
            Status::failed_precondition(format!(
                "{} runs with `insecure`: there is no cluster CA to issue certificates from",
                self.context.name
            ))
        })?;
        let ca = credentials.issuer.as_ref().ok_or_else(|| {
            Status::failed_precondition(format!(
                "{} holds no cluster secret, so it cannot issue certificates; ask a member with \
                 `cluster_secret_file`, or with an operator CA use `blixard-agent certs client`",
                self.context.name
            ))
        })?;
        let identity = CertIdentity::client(&request.name, role);
        let certificate_pem =
            ca.sign_request(&identity, &request.csr, &[], days).map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(client = %request.name, role = role.as_str(), days, by = %speaker, "issued a client certificate");
        Ok(Response::new(pb::ClusterIssueClientResponse {
            certificate_pem,
            ca_pem: String::from_utf8_lossy(&credentials.ca_pem).into_owned(),
        }))
    }

    async fn cluster_leave(
        &self,
        request: Request<pb::ClusterLeaveRequest>,
    ) -> Result<Response<pb::ClusterLeaveResponse>, Status> {
        let mut request = request;
        if request.get_ref().node.is_empty() {
            // Empty: the agent receiving the call (resolved before any
            // forwarding, which would change who "this agent" is).
            request.get_mut().node = self.context.name.clone();
        }
        check_name("node", &request.get_ref().node)?;
        self.context.member()?;
        self.context
            .write(
                request,
                |member, request| {
                    Box::pin(async move {
                        let id = member_id(&member, request.node.clone()).await?;
                        if !request.force {
                            let busy = member
                                .node
                                .read_local(move |state, _| {
                                    let mut vms: Vec<String> = state
                                        .vms_on(id)
                                        .filter(|vm| vm.spec.desired == Desired::Running)
                                        .chain(state.handoffs_from(id).map(|(vm, _)| vm))
                                        .map(|vm| vm.name.clone())
                                        .collect();
                                    vms.sort();
                                    vms.dedup();
                                    vms
                                })
                                .await?;
                            if !busy.is_empty() {
                                let shown: Vec<&str> = busy.iter().take(5).map(String::as_str).collect();
                                let more = if busy.len() > shown.len() { ", ..." } else { "" };
                                return Err(ApiError::Status(Status::failed_precondition(format!(
                                    "{} still runs {} VM(s) ({}{more}): drain it first (`blixard-agent node drain {} \
                                     --wait`), or leave with --force to remove it now (its VMs move once it has \
                                     certainly stopped them)",
                                    request.node,
                                    busy.len(),
                                    shown.join(", "),
                                    request.node
                                ))));
                            }
                        }
                        // Removing the leader itself: the node hands
                        // leadership over first and answers NotLeader,
                        // and the retry lands on the new leader.
                        member.node.propose_membership(MembershipChange::Remove { id }).await?;
                        Ok(pb::ClusterLeaveResponse { name: request.node })
                    })
                },
                |channel, request| Box::pin(async move { client(channel).cluster_leave(request).await }),
            )
            .await
    }

    async fn node_list(&self, request: Request<pb::NodeListRequest>) -> Result<Response<pb::NodeListResponse>, Status> {
        let (mut nodes, stale): (Vec<pb::NodeInfo>, _) = self
            .context
            .read_maybe_stale(wants_stale(&request), |state, core| {
                state.members().values().map(|m| node_info(state, m, core.leader)).collect()
            })
            .await?;
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(stale_marked(Response::new(pb::NodeListResponse { nodes }), stale))
    }

    async fn node_drain(&self, request: Request<pb::NodeRequest>) -> Result<Response<pb::NodeInfo>, Status> {
        self.set_drain(request, true).await
    }

    async fn node_undrain(&self, request: Request<pb::NodeRequest>) -> Result<Response<pb::NodeInfo>, Status> {
        self.set_drain(request, false).await
    }

    async fn vm_create(&self, request: Request<pb::VmCreateRequest>) -> Result<Response<pb::VmInfo>, Status> {
        spec_of(request.get_ref())?;
        self.context.member()?;
        self.context
            .write_anywhere(request, |member, request| {
                Box::pin(async move {
                    let spec = spec_of(&request)?;
                    let name = request.name.clone();
                    let check_spec = spec.clone();
                    // Refuse what cannot succeed before proposing, so
                    // that nothing is created: a duplicate, an unknown
                    // pinned node, a pinned VM that cannot fit there.
                    // From the state of whichever member took the
                    // request: the proposal itself is linearized and
                    // apply refuses a duplicate again; a read-index
                    // round would cost every create a heartbeat round.
                    let check: ProposalCheck = Box::new(move |state| {
                        if state.vm(&name).is_some() {
                            return Some(Rejection::DuplicateVm(name));
                        }
                        let pinned = check_spec.node.as_deref()?;
                        let Some(node) = state.member_by_name(pinned) else {
                            return Some(Rejection::UnknownNodeName(pinned.to_string()));
                        };
                        pinned_violation(state, &name, &check_spec, node)
                    });
                    let kind = CommandKind::CreateVm { name: request.name.clone(), spec };
                    propose_for_vm(&member, kind, Some(check), request.name).await
                })
            })
            .await
    }

    async fn vm_start(&self, request: Request<pb::VmRequest>) -> Result<Response<pb::VmInfo>, Status> {
        self.set_desired(request, Desired::Running).await
    }

    async fn vm_stop(&self, request: Request<pb::VmRequest>) -> Result<Response<pb::VmInfo>, Status> {
        self.set_desired(request, Desired::Stopped).await
    }

    async fn vm_delete(&self, request: Request<pb::VmRequest>) -> Result<Response<pb::VmDeleteResponse>, Status> {
        check_name("VM", &request.get_ref().name)?;
        self.context
            .write_anywhere(request, |member, request| {
                Box::pin(async move {
                    member.node.propose(CommandKind::DeleteVm { name: request.name.clone() }).await?;
                    Ok(pb::VmDeleteResponse { name: request.name })
                })
            })
            .await
    }

    async fn vm_migrate(&self, request: Request<pb::VmMigrateRequest>) -> Result<Response<pb::VmInfo>, Status> {
        check_name("VM", &request.get_ref().name)?;
        check_name("node", &request.get_ref().to)?;
        self.context
            .write(
                request,
                |member, request| {
                    Box::pin(async move {
                        let (vm, to) = (request.name.clone(), request.to.clone());
                        let target = member
                            .node
                            .read_local(move |state, _| {
                                let vm = state.vm(&vm).ok_or(Rejection::UnknownVm(vm.clone()))?;
                                let node = state.member_by_name(&to).ok_or(Rejection::UnknownNodeName(to))?;
                                let already = vm.placement.is_some_and(|p| p.node == node.id);
                                if !already && node.capacity.vcpu == 0 {
                                    return Err(Rejection::NotReported { node: node.name.clone() });
                                }
                                Ok::<_, Rejection>((node.id, vm.generation, already))
                            })
                            .await?;
                        let (node, expected_generation, already) =
                            target.map_err(|r| ApiError::Status(from_rejection(&r)))?;
                        // Already there: moving it "again" would restart it
                        // for nothing.
                        if !already {
                            member
                                .node
                                .propose(CommandKind::Place { vm: request.name.clone(), node, expected_generation })
                                .await?;
                        }
                        vm_after_write(&member, request.name).await
                    })
                },
                |channel, request| Box::pin(async move { client(channel).vm_migrate(request).await }),
            )
            .await
    }

    async fn vm_recover(&self, request: Request<pb::VmRecoverRequest>) -> Result<Response<pb::VmInfo>, Status> {
        check_name("VM", &request.get_ref().name)?;
        check_name("node", &request.get_ref().to)?;
        self.context
            .write(
                request,
                |member, request| {
                    Box::pin(async move {
                        let (vm, to) = (request.name.clone(), request.to.clone());
                        let target = member
                            .node
                            .read_local(move |state, _| {
                                let vm = state.vm(&vm).ok_or(Rejection::UnknownVm(vm.clone()))?;
                                let node = state.member_by_name(&to).ok_or(Rejection::UnknownNodeName(to))?;
                                Ok::<_, Rejection>((node.id, vm.generation))
                            })
                            .await?;
                        let (node, expected_generation) = target.map_err(|r| ApiError::Status(from_rejection(&r)))?;
                        member
                            .node
                            .propose(CommandKind::Recover { vm: request.name.clone(), node, expected_generation })
                            .await?;
                        tracing::warn!(
                            target: "blixard::decision",
                            kind = "recover",
                            vm = request.name,
                            "recovered {} onto {} at an operator's request (its old host is down and was vouched dead)",
                            request.name,
                            request.to
                        );
                        vm_after_write(&member, request.name).await
                    })
                },
                |channel, request| Box::pin(async move { client(channel).vm_recover(request).await }),
            )
            .await
    }

    async fn vm_list(&self, request: Request<pb::VmListRequest>) -> Result<Response<pb::VmListResponse>, Status> {
        let stale = wants_stale(&request);
        let request = request.into_inner();
        let query = query_of(&request)?;
        let node = request.node;
        let (page, stale) = self
            .context
            .read_maybe_stale(stale, move |state, _| {
                let mut query = query.clone();
                if !node.is_empty() {
                    let id =
                        state.member_by_name(&node).map(|m| m.id).ok_or(Rejection::UnknownNodeName(node.clone()))?;
                    query.node = Some(id);
                }
                Ok(vm_page(state, &query))
            })
            .await?;
        let page = page.map_err(|r: Rejection| from_rejection(&r))?;
        Ok(stale_marked(Response::new(page), stale))
    }

    async fn vm_update(&self, request: Request<pb::VmUpdateRequest>) -> Result<Response<pb::VmUpdateResponse>, Status> {
        check_name("VM", &request.get_ref().name)?;
        self.context.member()?;
        self.context
            .write(
                request,
                |member, request| {
                    Box::pin(async move {
                        let name = request.name.clone();
                        let current = member
                            .node
                            .read_local(move |state, _| state.vm(&name).map(|vm| vm.spec.clone()))
                            .await?
                            .ok_or_else(|| {
                                ApiError::Status(from_rejection(&Rejection::UnknownVm(request.name.clone())))
                            })?;
                        let (spec, changed) = updated_spec(&current, &request)?;
                        let changed: Vec<String> = changed.into_iter().map(str::to_string).collect();
                        if changed.is_empty() {
                            let vm = vm_after_write(&member, request.name).await?;
                            return Ok(pb::VmUpdateResponse { vm: Some(vm), changed, moved: false });
                        }
                        let (name, check_spec) = (request.name.clone(), spec.clone());
                        let check: ProposalCheck = Box::new(move |state| update_violation(state, &name, &check_spec));
                        let kind = CommandKind::UpdateVm { name: request.name.clone(), spec };
                        let name = request.name.clone();
                        let answer = member
                            .node
                            .propose_then(kind, Some(check), move |effect, state| {
                                let moved = matches!(effect, crate::state::Effect::Unplaced { .. });
                                state.vm(&name).map(|vm| (vm_info(state, vm, false), moved))
                            })
                            .await?;
                        let (vm, moved) = answer
                            .ok_or_else(|| ApiError::Status(from_rejection(&Rejection::UnknownVm(request.name))))?;
                        Ok(pb::VmUpdateResponse { vm: Some(vm), changed, moved })
                    })
                },
                |channel, request| Box::pin(async move { client(channel).vm_update(request).await }),
            )
            .await
    }

    type ClusterBackupStream = BackupStream;

    /// The state is encoded on the raft thread once a read-index round has
    /// confirmed it (as a Raft snapshot for a follower is), then streamed.
    async fn cluster_backup(
        &self,
        _request: Request<pb::ClusterBackupRequest>,
    ) -> Result<Response<BackupStream>, Status> {
        let member = self.context.member()?;
        let (cluster_id, taken_by) = (member.cluster_id, self.context.name.clone());
        let (header, bytes) = self
            .context
            .read(move |state, core| {
                let bytes = crate::state::codec::encode_snapshot(state);
                let header = crate::backup::Header::of(state, &bytes, cluster_id, core.applied, core.term, &taken_by);
                (header, bytes)
            })
            .await?;
        tracing::info!(index = header.index, vms = header.vms, bytes = header.state_bytes, "serving a backup");
        let first = pb::BackupChunk { header: header.encode(), data: Vec::new() };
        let chunks: Vec<Result<pb::BackupChunk, Status>> = std::iter::once(Ok(first))
            .chain(
                bytes.chunks(BACKUP_CHUNK_BYTES).map(|c| Ok(pb::BackupChunk { header: Vec::new(), data: c.to_vec() })),
            )
            .collect();
        Ok(Response::new(Box::pin(futures_util::stream::iter(chunks))))
    }

    async fn vm_status(&self, request: Request<pb::VmRequest>) -> Result<Response<pb::VmInfo>, Status> {
        let stale = wants_stale(&request);
        let name = request.into_inner().name;
        check_name("VM", &name)?;
        let (info, stale) = self
            .context
            .read_maybe_stale(stale, move |state, _| {
                state.vm(&name).map(|vm| vm_info(state, vm, true)).ok_or(Rejection::UnknownVm(name.clone()))
            })
            .await?;
        info.map(|info| stale_marked(Response::new(info), stale)).map_err(|r| from_rejection(&r))
    }

    type EventsStream = EventStream;
    type VmLogsStream = LogStream;

    /// Served by the host the VM is placed on; any other member forwards
    /// the call there once (the reply streams back through it).
    async fn vm_logs(&self, request: Request<pb::VmLogsRequest>) -> Result<Response<LogStream>, Status> {
        let forwarded = is_forwarded(&request);
        let mut request = request.into_inner();
        check_name("VM", &request.name)?;
        if request.lines == 0 {
            request.lines = LOG_LINES_DEFAULT;
        }
        let member = self.context.member()?;
        let name = request.name.clone();
        let host = self
            .context
            .read(move |state, _| {
                let vm = state.vm(&name).ok_or(Rejection::UnknownVm(name.clone()))?;
                Ok(vm.placement.and_then(|p| state.member(p.node)).map(|m| (m.id, m.name.clone(), m.address.clone())))
            })
            .await?
            .map_err(|r: Rejection| from_rejection(&r))?;
        let Some((host_id, host_name, address)) = host else {
            return Err(Status::failed_precondition(format!(
                "VM {:?} is not placed on any host, so it has no log yet",
                request.name
            )));
        };
        if host_id != member.id {
            if forwarded {
                return Err(Status::unavailable(format!("VM {:?} moved to {host_name}; ask again", request.name)));
            }
            let mut client = Context::blixard_client(self.context.channel(&address)?);
            let mut forward = Request::new(request);
            forward.metadata_mut().insert(FORWARDED_HEADER, tonic::metadata::MetadataValue::from_static("1"));
            let stream = client.vm_logs(forward).await?.into_inner();
            return Ok(Response::new(Box::pin(stream)));
        }
        let runtime = self.context.runtime().ok_or_else(|| Status::unavailable("this agent has no runtime"))?;
        let source = runtime.log_source(&request.name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let lines = crate::runtime::logs::read(source, request.lines, request.follow);
        let node = host_name;
        let stream = futures_util::stream::unfold(lines, move |mut lines| {
            let node = node.clone();
            async move {
                let line = lines.recv().await?;
                let item = line.map(|line| pb::LogLine { line, node }).map_err(Status::internal);
                Some((item, lines))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    /// Served from this member's own event log (no leader needed). A
    /// follower that falls more than a thousand events behind gets
    /// `ResourceExhausted`; the stream ends when this agent stops.
    async fn events(&self, request: Request<pb::EventsRequest>) -> Result<Response<EventStream>, Status> {
        let member = self.context.member()?;
        let request = request.into_inner();
        let limit = match request.limit {
            0 => EVENTS_MAX,
            n => (n as usize).min(EVENTS_MAX),
        };
        let log = member.node.events();
        if !request.follow {
            let events: Vec<_> = log.recent(limit).iter().map(|e| Ok(event_pb(e))).collect();
            return Ok(Response::new(Box::pin(futures_util::stream::iter(events))));
        }
        let (events, rx) = log.follow(limit);
        let kept = futures_util::stream::iter(events.iter().map(|e| Ok(event_pb(e))).collect::<Vec<_>>());
        let live = futures_util::stream::unfold((rx, member.node, false), |(mut rx, node, done)| async move {
            if done {
                return None;
            }
            tokio::select! {
                event = rx.recv() => match event {
                    Ok(event) => Some((Ok(event_pb(&event)), (rx, node, false))),
                    Err(broadcast::error::RecvError::Lagged(n)) => Some((
                        Err(Status::resource_exhausted(format!(
                            "this follower fell {n} events behind and missed them; follow again"
                        ))),
                        (rx, node, true),
                    )),
                    Err(broadcast::error::RecvError::Closed) => None,
                },
                // The node stopped (the agent is shutting down).
                () = node.stopped() => None,
            }
        });
        Ok(Response::new(Box::pin(kept.chain(live))))
    }
}

/// The stream of `ClusterBackup`.
pub type BackupStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<pb::BackupChunk, Status>> + Send + 'static>>;

/// State bytes per `BackupChunk`.
const BACKUP_CHUNK_BYTES: usize = 1024 * 1024;

/// The stream of `VmLogs`.
pub type LogStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<pb::LogLine, Status>> + Send + 'static>>;

/// Lines `vm logs` shows without `-n`.
const LOG_LINES_DEFAULT: u32 = 50;

/// The stream of `Events`.
pub type EventStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<pb::Event, Status>> + Send + 'static>>;

pub fn event_pb(e: &Event) -> pb::Event {
    pb::Event {
        seq: e.seq,
        index: e.index,
        at_unix_ms: e.at_unix_ms,
        kind: e.kind.as_str().to_string(),
        vm: e.vm.clone().unwrap_or_default(),
        node: e.node.clone().unwrap_or_default(),
        from: e.from.clone().unwrap_or_default(),
        message: e.message.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(name: &str, vcpu: u32, memory_mib: u64) -> pb::VmCreateRequest {
        pb::VmCreateRequest { name: name.into(), vcpu, memory_mib, ..Default::default() }
    }

    #[test]
    fn create_requests_are_validated_at_the_edge() {
        assert!(spec_of(&create("web", 2, 1024)).is_ok());
        let long = "a".repeat(64);
        for bad in ["../x", "a b", "x.service", "A", long.as_str(), "é", ""] {
            assert_eq!(spec_of(&create(bad, 1, 128)).unwrap_err().code(), tonic::Code::InvalidArgument, "{bad}");
        }
        for (vcpu, memory) in [(0, 128), (1, 0), (5000, 128), (1, u64::MAX)] {
            assert_eq!(spec_of(&create("a", vcpu, memory)).unwrap_err().code(), tonic::Code::InvalidArgument);
        }
        let mut labelled = create("a", 1, 128);
        labelled.labels.insert("Bad Key".into(), "v".into());
        assert_eq!(spec_of(&labelled).unwrap_err().code(), tonic::Code::InvalidArgument);
        let mut pinned = create("a", 1, 128);
        pinned.node = "../h1".into();
        assert_eq!(spec_of(&pinned).unwrap_err().code(), tonic::Code::InvalidArgument);
    }

    /// Two hosts (h1, h2; h1 rack r1) with runners for the first 100 VMs, 4 vcpus
    /// each; `vms` VMs named vm-000000.. unplaced, every 3rd labelled
    /// tier=db, every 5th desired stopped; vm-000001 placed on h1.
    fn cluster(vms: usize) -> State {
        use crate::state::{Capacity, Command, CommandKind as K, MembershipChange};
        let mut state = State::with_members([Member::new(1, "h1", "127.0.0.1:7001")]);
        state
            .apply_membership(
                &MembershipChange::AddLearner { id: 2, name: "h2".into(), address: "127.0.0.1:7002".into() },
                0,
            )
            .unwrap();
        let names: Vec<String> = (0..vms).map(|i| format!("vm-{i:06}")).collect();
        let apply = |state: &mut State, kind| state.apply(&Command { at_unix_ms: 1, kind }).unwrap();
        for node in [1, 2] {
            let capacity = Capacity { vcpu: 4, memory_mib: 4096, ..Capacity::default() };
            apply(&mut state, K::SetCapacity { node, capacity });
            apply(&mut state, K::SetRunners { node, runners: names.iter().take(100).cloned().collect() });
        }
        apply(&mut state, K::SetLabels { node: 1, labels: [("rack".to_string(), "r1".to_string())].into() });
        for (i, name) in names.iter().enumerate() {
            let mut spec = VmSpec { vcpu: 1, memory_mib: 64, ..VmSpec::default() };
            if i % 3 == 0 {
                spec.labels.insert("tier".into(), "db".into());
            }
            if i % 5 == 0 {
                spec.desired = Desired::Stopped;
            }
            apply(&mut state, K::CreateVm { name: name.clone(), spec });
        }
        apply(&mut state, K::Place { vm: "vm-000001".into(), node: 1, expected_generation: 0 });
        let _ = state.take_dirty();
        state
    }

    /// Every VM `query` selects, page after page.
    fn all_pages(state: &State, mut query: VmQuery) -> (Vec<String>, usize) {
        let (mut names, mut pages) = (Vec::new(), 0);
        loop {
            let page = vm_page(state, &query);
            pages += 1;
            names.extend(page.vms.into_iter().map(|v| v.name));
            if page.next_page_token.is_empty() {
                return (names, pages);
            }
            assert!(query.after.as_deref().is_none_or(|a| a < page.next_page_token.as_str()), "the token moves on");
            query.after = Some(page.next_page_token);
        }
    }

    #[test]
    fn vm_list_pages_are_bounded_ordered_and_filtered() {
        let state = cluster(2500);
        let (names, pages) = all_pages(&state, VmQuery { size: 1000, ..VmQuery::default() });
        assert_eq!((names.len(), pages), (2500, 3));
        assert!(names.windows(2).all(|w| w[0] < w[1]));
        // Without a size, a page holds what fits in VM_LIST_PAGE_BYTES.
        let page = vm_page(&state, &VmQuery::default());
        assert_eq!((page.vms.len(), page.next_page_token.as_str()), (2500, ""));
        let labelled = VmQuery { labels: [("tier".to_string(), "db".to_string())].into(), ..VmQuery::default() };
        assert_eq!(all_pages(&state, VmQuery { size: 100, ..labelled }).0.len(), 834);
        // A desired-stopped VM on no host shows, and filters, as stopped.
        let stopped = all_pages(&state, VmQuery { state: Some(VmState::Stopped), ..VmQuery::default() }).0;
        assert_eq!(stopped.len(), 500);
        assert_eq!(vm_info(&state, state.vm("vm-000000").unwrap(), false).state, "stopped");
        assert_eq!(vm_info(&state, state.vm("vm-000002").unwrap(), false).state, "pending");
        let on_h1 = all_pages(&state, VmQuery { node: Some(1), ..VmQuery::default() }).0;
        assert_eq!(on_h1, ["vm-000001"]);
        let on_h1_after = VmQuery { node: Some(1), after: Some("vm-000001".into()), ..VmQuery::default() };
        assert!(all_pages(&state, on_h1_after).0.is_empty());
        let prefixed = all_pages(&state, VmQuery { prefix: "vm-00001".into(), size: 3, ..VmQuery::default() }).0;
        assert_eq!(prefixed.len(), 10);
        assert_eq!(prefixed[0], "vm-000010");
        // A token before the prefix starts at the prefix.
        let query = VmQuery { prefix: "vm-002".into(), after: Some("vm-000005".into()), ..VmQuery::default() };
        assert_eq!(all_pages(&state, query).0.first().map(String::as_str), Some("vm-002000"));
    }

    #[test]
    fn a_filter_that_matches_little_examines_a_bounded_number_of_vms_per_page() {
        let state = cluster(VM_LIST_SCAN_MAX + 10);
        let query = VmQuery { labels: [("none".to_string(), "x".to_string())].into(), ..VmQuery::default() };
        let first = vm_page(&state, &query);
        assert!(first.vms.is_empty());
        assert_eq!(first.next_page_token, format!("vm-{:06}", VM_LIST_SCAN_MAX - 1));
        let second = vm_page(&state, &VmQuery { after: Some(first.next_page_token), ..query });
        assert_eq!((second.vms.len(), second.next_page_token.as_str()), (0, ""));
    }

    #[test]
    fn list_requests_are_checked() {
        let ok = pb::VmListRequest { state: "running".into(), node: "h1".into(), ..Default::default() };
        assert_eq!(query_of(&ok).unwrap().state, Some(VmState::Running));
        for bad in [
            pb::VmListRequest { page_token: "../x".into(), ..Default::default() },
            pb::VmListRequest { page_size: VM_LIST_PAGE_MAX + 1, ..Default::default() },
            pb::VmListRequest { state: "happy".into(), ..Default::default() },
            pb::VmListRequest { node: "H1".into(), ..Default::default() },
            pb::VmListRequest { name_prefix: "A".into(), ..Default::default() },
            pb::VmListRequest { labels: [("Bad Key".to_string(), "v".to_string())].into(), ..Default::default() },
        ] {
            assert_eq!(query_of(&bad).unwrap_err().code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }

    #[test]
    fn an_update_is_checked_like_a_create_and_refused_when_it_fits_nowhere() {
        let state = cluster(10);
        let current = state.vm("vm-000001").unwrap().spec.clone();
        let update = |f: fn(&mut pb::VmUpdateRequest)| {
            let mut request = pb::VmUpdateRequest { name: "vm-000001".into(), ..Default::default() };
            f(&mut request);
            updated_spec(&current, &request)
        };
        let (spec, changed) = update(|r| {
            r.vcpu = Some(2);
            r.set_labels.insert("rack".into(), "r1".into());
            r.failover = Some("manual".into());
        })
        .unwrap();
        assert_eq!(changed, ["vcpu", "labels", "failover"]);
        assert_eq!(update_violation(&state, "vm-000001", &spec), None, "it still fits on h1");
        assert!(update(|r| r.vcpu = Some(0)).is_err());
        assert!(update(|r| r.failover = Some("sometimes".into())).is_err());
        assert!(
            update(|r| {
                r.unpin = true;
                r.node = Some("h1".into());
            })
            .is_err()
        );
        assert_eq!(update(|r| r.vcpu = Some(1)).unwrap().1, Vec::<&str>::new(), "nothing changed");
        // 8 vcpus fit on no host (4 each): refused with h1's reason.
        let (big, _) = update(|r| r.vcpu = Some(8)).unwrap();
        assert!(matches!(update_violation(&state, "vm-000001", &big), Some(Rejection::OverCapacity { .. })));
        // A label h1 lacks but nobody has: refused; one h2 could take: fine (it moves).
        let (r9, _) = update(|r| {
            r.set_labels.insert("rack".into(), "r9".into());
        })
        .unwrap();
        assert!(matches!(update_violation(&state, "vm-000001", &r9), Some(Rejection::LabelMismatch { .. })));
        let (pinned, _) = update(|r| r.node = Some("h2".into())).unwrap();
        assert_eq!(update_violation(&state, "vm-000001", &pinned), None);
        let (unknown, _) = update(|r| r.node = Some("h9".into())).unwrap();
        assert!(matches!(update_violation(&state, "vm-000001", &unknown), Some(Rejection::UnknownNodeName(_))));
    }

    #[test]
    fn a_pin_to_a_host_that_has_not_reported_its_capacity_is_not_yet_known() {
        let mut state = cluster(2);
        state
            .apply_membership(
                &crate::state::MembershipChange::AddLearner {
                    id: 3,
                    name: "h3".into(),
                    address: "127.0.0.1:7003".into(),
                },
                0,
            )
            .unwrap();
        let spec = VmSpec { vcpu: 1, memory_mib: 64, node: Some("h3".into()), ..VmSpec::default() };
        let h3 = state.member_by_name("h3").unwrap();
        let rejection = pinned_violation(&state, "new", &spec, h3).unwrap();
        assert!(matches!(rejection, Rejection::NotReported { .. }), "{rejection}");
        assert_eq!(from_rejection(&rejection).code(), tonic::Code::Unavailable, "exit 1, not 2");
        assert!(rejection.to_string().contains("not yet known"));
    }

    #[test]
    fn node_status_words() {
        let mut state = State::default();
        let mut member = Member::new(1, "h1", "127.0.0.1:7000");
        assert_eq!(node_info(&state, &member, Some(1)).status, "up");
        assert_eq!(node_info(&state, &member, Some(1)).role, "leader");
        member.drain = true;
        assert_eq!(node_info(&state, &member, None).status, "draining");
        member.status = MemberStatus::Down;
        assert_eq!(node_info(&state, &member, None).status, "down");
        member.learner = true;
        assert_eq!(node_info(&state, &member, Some(1)).role, "learner");
        let _ = state.take_dirty();
    }
}
