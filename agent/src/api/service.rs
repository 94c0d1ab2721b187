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
use crate::consensus::{CoreStatus, Role};
use crate::names;
use crate::node::events::{EVENTS_MAX, Event};
use crate::node::{NodeStatus, ProposalCheck};
use crate::state::{
    CommandKind, Desired, Effect, Failover, Labels, Member, MemberStatus, MembershipChange, NodeId, Rejection, State,
    Vm, VmSpec, VmState, limits,
};

/// A VM as the API shows it. `explain` adds why a VM that is not running
/// is not (`scheduler::why_pending`); it is left out of lists because it
/// costs a pass over the whole cluster per VM.
pub fn vm_info(state: &State, vm: &Vm, explain: bool) -> pb::VmInfo {
    let node = vm.placement.and_then(|p| state.member(p.node)).map(|m| m.name.clone()).unwrap_or_default();
    pb::VmInfo {
        name: vm.name.clone(),
        node,
        desired: vm.spec.desired.to_string(),
        state: state.vm_state(vm).to_string(),
        vcpu: vm.spec.vcpu,
        memory_mib: vm.spec.memory_mib,
        since_unix_ms: vm.observed.since_unix_ms,
        last_error: vm.observed.last_error.clone().unwrap_or_default(),
        labels: vm.spec.labels.clone().into_iter().collect(),
        pinned_node: vm.spec.node.clone().unwrap_or_default(),
        anti_affinity: vm.spec.anti_affinity.clone().unwrap_or_default(),
        pending_reason: if explain && matches!(state.vm_state(vm), VmState::Pending | VmState::Failed | VmState::Lost) {
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
    let status = if member.status == MemberStatus::Down {
        "down"
    } else if member.drain {
        "draining"
    } else {
        "up"
    };
    pb::NodeInfo {
        name: member.name.clone(),
        id: member.id,
        address: member.address.clone(),
        status: status.to_string(),
        role: role_of(member, leader).to_string(),
        vcpu_total: limit.vcpu,
        vcpu_used: used.vcpu,
        memory_mib_total: limit.memory_mib,
        memory_mib_used: used.memory_mib,
        labels: member.labels.clone().into_iter().collect(),
        vms: state.vms_on(member.id).count() as u32,
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
            }
        })
        .collect();
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
        let ttl_ms = ttl_seconds * 1000;
        // Made and recorded by the leader, so that a token's life is
        // judged on one clock: the leader's, at issue and at use (a
        // member's fast clock cannot shorten or end anyone's token).
        self.context
            .write(
                request,
                move |member, _| {
                    Box::pin(async move {
                        let token = crate::join_token::generate()
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
                        if node.status == MemberStatus::Down {
                            return Some(Rejection::NodeUnavailable { node: node.name.clone(), why: "down" });
                        }
                        if node.drain {
                            return Some(Rejection::NodeUnavailable { node: node.name.clone(), why: "draining" });
                        }
                        state.fit_violation(&name, &check_spec, node.id)
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
        let (vms, stale) = self
            .context
            .read_maybe_stale(wants_stale(&request), |state, _| {
                state.vms().values().map(|vm| vm_info(state, vm, false)).collect()
            })
            .await?;
        Ok(stale_marked(Response::new(pb::VmListResponse { vms }), stale))
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
        let stopped = member.node.watch_status();
        let live = futures_util::stream::unfold((rx, stopped, false), |(mut rx, mut stopped, done)| async move {
            if done {
                return None;
            }
            tokio::select! {
                event = rx.recv() => match event {
                    Ok(event) => Some((Ok(event_pb(&event)), (rx, stopped, false))),
                    Err(broadcast::error::RecvError::Lagged(n)) => Some((
                        Err(Status::resource_exhausted(format!(
                            "this follower fell {n} events behind and missed them; follow again"
                        ))),
                        (rx, stopped, true),
                    )),
                    Err(broadcast::error::RecvError::Closed) => None,
                },
                // The node stopped (the agent is shutting down).
                _ = async { while stopped.changed().await.is_ok() {} } => None,
            }
        });
        Ok(Response::new(Box::pin(kept.chain(live))))
    }
}

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
