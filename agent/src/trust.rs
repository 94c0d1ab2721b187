//! Who may say what: the one table every call to the gRPC port asks
//! before anything is stepped, proposed or admitted (design decision 9,
//! style.md "Trust boundaries").
//!
//! Certificates say who speaks ([`Speaker`], from `api::tls::Caller`); this
//! module says what that speaker may say, and nothing else does. The gRPC
//! layer (`api::gate`) asks [`may_call`] for every request before any
//! handler runs; the handlers ask the finer rows below about what the
//! request carries; the raft thread asks [`raft_message`] again, with its
//! exact view, for every message just before raft-rs sees it.
//!
//! # The table
//!
//! Calls ([`may_call`], by [`Rpc::kind`]):
//!
//! | speaker            | peer (`Raft`, `RaftStream`, `Snapshot`, `Propose`, `Renew`) | `Admit`            | client reads | client writes, `ClusterBackup` | `x-blixard-forwarded` |
//! |--------------------|-------------------------------------------------------------|--------------------|--------------|--------------------------------|-----------------------|
//! | outsider           | no                                                          | no                 | no           | no                             | no                    |
//! | no certificate     | no                                                          | with a join token  | no           | no                             | no                    |
//! | client, read-only  | no                                                          | no                 | yes          | no                             | no                    |
//! | client, admin      | no                                                          | no                 | yes          | yes                            | no                    |
//! | member X           | yes, as X                                                   | as X only          | yes          | yes                            | yes                   |
//! | unauthenticated    | yes, as whoever it claims                                   | with a join token  | yes          | yes                            | yes                   |
//!
//! "No certificate" is a TLS connection without a client certificate,
//! which only an agent that can issue certificates (the cluster secret's)
//! accepts: a host with a join token asking to be admitted and to get its
//! certificate (`api::join`). "Unauthenticated" is the `insecure` mode
//! (TLS off, loopback only): nobody can be told apart, so a peer is taken
//! to be the member its messages name, and every other row below still
//! holds. `ClusterBackup` only reads, but it exports the whole state (join
//! tokens' hashes included): an admin's.
//!
//! State commands, by their [`author`] ([`may_propose`]; a member proposes
//! through a `MsgPropose` to the leader, or the legacy `Peer.Propose`):
//!
//! | command                                                                             | who may propose it                        |
//! |-------------------------------------------------------------------------------------|-------------------------------------------|
//! | `Report`, `Released`, `SetCapacity`, `SetLabels`, `SetRunners`, `SetAddress` about N | member N only (a host speaks for itself)  |
//! | `CreateVm`, `UpdateVm`, `DeleteVm`, `SetDesired`                                     | any member (for an admin client, or its declared VMs) |
//! | `Place`, `Unplace`, `Recover`, `ClearHandoff`, `SetStatus`, `SetDrain`, `AddJoinToken`, `UseJoinToken`, `LeaderElected` | the leader only, on itself: no peer may propose them |
//! | membership changes (conf-change entries)                                             | the leader only, on itself                |
//!
//! Raft messages from member `from` ([`raft_message`]), as far as the
//! receiver can tell from its [`View`]:
//!
//! | message                                              | accepted when                                                                  |
//! |------------------------------------------------------|--------------------------------------------------------------------------------|
//! | any                                                  | `to` is the receiver, `from` is the speaker and in the receiver's configuration (voters and learners; a joiner before its first snapshot: the members its admission named), never itself |
//! | any                                                  | its term is at most [`TERM_JUMP_MAX`] beyond the receiver's and below [`TERM_MAX`]; its indexes below [`INDEX_MAX`] |
//! | local types (`MsgHup`, `MsgBeat`, `MsgUnreachable`, `MsgSnapStatus`, `MsgCheckQuorum`), `MsgTransferLeader` | never from a peer                                       |
//! | any but a pre-vote request and a granted pre-vote answer | a later term than the receiver's (which raft-rs takes as the end of its term) only from the leader it follows, or once that leader is out of its lease, or from the member this leader hands over to at the next term (raft thread: nobody can have won an election while the leader is live) |
//! | `MsgAppend`, `MsgHeartbeat`, `MsgSnapshot`, `MsgTimeoutNow`, `MsgReadIndexResp` | term set; not the receiver's term unless `from` leads it |
//! | `MsgHeartbeat`                                       | its commit at most the receiver's last index (raft thread)                     |
//! | `MsgAppendResponse` (accepting)                      | its index at most the receiver's last index (raft thread)                     |
//! | `MsgSnapshot`                                        | a configuration with a voter and no id both voter and learner                  |
//! | `MsgPropose`                                         | term 0, entries; each a normal entry (no membership change), proposed by `from` (its context), carrying a command `from` may propose |
//! | `MsgPropose`, `MsgReadIndex`                         | the receiver leads (raft thread; otherwise dropped, never relayed: a relayed message would speak for its proposer) |
//!
//! Snapshot streams (`Peer.Snapshot`, [`may_stream_snapshot`]): only from
//! the leader the receiver knows, one at a time, within a deadline, with
//! the bytes buffered bounded (`api::peer`).
//!
//! Admission ([`may_admit`]): a member certificate admits only its own
//! name, forwarded or not (a member never forwards an admission: the
//! joiner is sent to the leader); without TLS a join token is required;
//! a name or id that is already a member is never re-admitted
//! (`State::admission_conflict`, again at apply), so a valid token cannot
//! rewrite a member's address.
//!
//! Quorum-contact confirmations (`RaftBatch.confirmation`, the fence's
//! input) are judged on the raft thread once the frame's messages are
//! stepped, next to the fence's safety argument
//! (`node::RaftThread::on_confirmation`):
//!
//! | confirmation                                   | counts when                                          |
//! |------------------------------------------------|------------------------------------------------------|
//! | from `from`, for this host's send time `t`     | `from` leads the receiver's current term, is not the receiver, and the receiver is not removed |
//! | any                                            | `t` is not later than the receiver's own clock (it is the receiver's send time echoed back) |
//!
//! Adding an RPC: add it to [`Rpc`] (and `api::gate`'s path table); the
//! compiler then asks for its kind. Adding a command: [`author`] matches
//! every `CommandKind`, so the compiler asks who may propose it.

use std::collections::BTreeSet;

use prost::Message as _;
use raft::eraftpb::{EntryType, Message, MessageType};

use crate::state::{CommandKind, NodeId, codec};

/// A Raft message's term may run at most this far ahead of the
/// receiver's own. Terms grow by one per election (pre-vote keeps a
/// partitioned member from inflating them), so a million is far beyond
/// anything a real cluster reaches while one member is away, and it keeps
/// a hostile term from ever nearing [`TERM_MAX`].
pub const TERM_JUMP_MAX: u64 = 1_000_000;
/// No term at or beyond this reaches raft-rs (whose `term + 1` must never
/// overflow: a vote request at `u64::MAX` panicked every agent, on every
/// restart).
pub const TERM_MAX: u64 = 1 << 62;
/// No log index at or beyond this reaches raft-rs (whose index arithmetic
/// must never overflow).
pub const INDEX_MAX: u64 = 1 << 62;

/// Who is speaking, as the connection authenticated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Speaker {
    /// TLS is on, and the certificate names no blixard identity.
    Outsider,
    /// TLS is on, and the connection presented no client certificate: a
    /// host joining with a token (`Peer.Admit` alone).
    Joiner,
    /// TLS is off (`insecure`, loopback only): nobody is authenticated.
    Unauthenticated,
    /// An operator or tool (`urn:blixard:client:NAME`).
    Client { name: String, role: ClientRole },
    /// The agent whose `node_name` is this (`urn:blixard:member:NAME`).
    Member(String),
}

/// What a client certificate allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientRole {
    /// Client API reads only.
    ReadOnly,
    /// The whole client API.
    Admin,
}

impl std::fmt::Display for Speaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Speaker::Outsider => f.write_str("a certificate with no blixard identity"),
            Speaker::Joiner => f.write_str("a connection without a client certificate"),
            Speaker::Unauthenticated => f.write_str("an unauthenticated caller"),
            Speaker::Client { name, role: ClientRole::ReadOnly } => write!(f, "read-only client {name:?}"),
            Speaker::Client { name, role: ClientRole::Admin } => write!(f, "client {name:?}"),
            Speaker::Member(name) => write!(f, "member {name:?}"),
        }
    }
}

/// Why something was refused: one sentence (`PermissionDenied` on the
/// wire).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

fn refuse<T>(why: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal(why.into()))
}

/// Every call the gRPC port serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rpc {
    Raft,
    RaftStream,
    Snapshot,
    Propose,
    Admit,
    Renew,
    ClusterStatus,
    ClusterJoin,
    ClusterLeave,
    ClusterJoinToken,
    ClusterIssueClient,
    ClusterBackup,
    NodeList,
    NodeDrain,
    NodeUndrain,
    VmCreate,
    VmStart,
    VmStop,
    VmDelete,
    VmMigrate,
    VmRecover,
    VmList,
    VmStatus,
    VmUpdate,
    Events,
    VmLogs,
    /// gRPC health checking (`grpc.health.v1`).
    Health,
    /// gRPC server reflection.
    Reflection,
}

/// What a call does, for [`may_call`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// Member to member: Raft traffic, snapshots, proposals.
    Peer,
    /// A host asking to be admitted.
    Join,
    /// Reads the cluster; changes nothing.
    Read,
    /// Changes the cluster (or makes the receiving agent join one).
    Write,
    /// Reads the whole state at once, secrets' hashes included: an admin's.
    Export,
}

impl Rpc {
    pub const ALL: [Rpc; 28] = [
        Rpc::Raft,
        Rpc::RaftStream,
        Rpc::Snapshot,
        Rpc::Propose,
        Rpc::Admit,
        Rpc::Renew,
        Rpc::ClusterStatus,
        Rpc::ClusterJoin,
        Rpc::ClusterLeave,
        Rpc::ClusterJoinToken,
        Rpc::ClusterIssueClient,
        Rpc::ClusterBackup,
        Rpc::NodeList,
        Rpc::NodeDrain,
        Rpc::NodeUndrain,
        Rpc::VmCreate,
        Rpc::VmStart,
        Rpc::VmStop,
        Rpc::VmDelete,
        Rpc::VmMigrate,
        Rpc::VmRecover,
        Rpc::VmList,
        Rpc::VmStatus,
        Rpc::VmUpdate,
        Rpc::Events,
        Rpc::VmLogs,
        Rpc::Health,
        Rpc::Reflection,
    ];

    pub fn kind(self) -> CallKind {
        match self {
            Rpc::Raft | Rpc::RaftStream | Rpc::Snapshot | Rpc::Propose | Rpc::Renew => CallKind::Peer,
            Rpc::Admit => CallKind::Join,
            Rpc::ClusterStatus
            | Rpc::NodeList
            | Rpc::VmList
            | Rpc::VmStatus
            | Rpc::Events
            | Rpc::VmLogs
            | Rpc::Health
            | Rpc::Reflection => CallKind::Read,
            Rpc::ClusterJoin
            | Rpc::ClusterLeave
            | Rpc::ClusterJoinToken
            | Rpc::ClusterIssueClient
            | Rpc::NodeDrain
            | Rpc::NodeUndrain
            | Rpc::VmCreate
            | Rpc::VmStart
            | Rpc::VmStop
            | Rpc::VmDelete
            | Rpc::VmMigrate
            | Rpc::VmRecover
            | Rpc::VmUpdate => CallKind::Write,
            Rpc::ClusterBackup => CallKind::Export,
        }
    }
}

/// Whether `speaker` may make call `rpc` at all (`forwarded`: the request
/// says another agent forwarded it, which only a member may say).
pub fn may_call(speaker: &Speaker, rpc: Rpc, forwarded: bool) -> Result<(), Refusal> {
    let kind = rpc.kind();
    match speaker {
        Speaker::Outsider => refuse(format!("{speaker} may make no call; it needs a member or client certificate")),
        Speaker::Member(_) | Speaker::Unauthenticated => Ok(()),
        Speaker::Joiner if kind == CallKind::Join && !forwarded => Ok(()),
        Speaker::Joiner => refuse(format!(
            "this agent requires a client certificate ({speaker} may only ask to join, with a token, and never \
             as forwarded)"
        )),
        Speaker::Client { .. } if forwarded => {
            refuse(format!("{speaker} marked its request as forwarded, which only a member may do"))
        }
        Speaker::Client { .. } if matches!(kind, CallKind::Peer | CallKind::Join) => {
            refuse(format!("{speaker} may use the client API only; {rpc:?} needs a member certificate"))
        }
        Speaker::Client { role: ClientRole::ReadOnly, .. } if kind == CallKind::Write => {
            refuse(format!("{speaker} may only read; {rpc:?} changes the cluster and needs an admin certificate"))
        }
        Speaker::Client { role: ClientRole::ReadOnly, .. } if kind == CallKind::Export => {
            refuse(format!("{speaker} may not export the cluster's whole state; {rpc:?} needs an admin certificate"))
        }
        Speaker::Client { .. } => Ok(()),
    }
}

/// Who may propose a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Author {
    /// Only the leader, on itself: no peer may propose it.
    Leader,
    /// Only this member: a host's report about itself.
    Itself(NodeId),
    /// Any member (for an admin client, or a VM its config declares).
    AnyMember,
}

/// Who may propose `kind` (the command table above).
pub fn author(kind: &CommandKind) -> Author {
    match kind {
        CommandKind::CreateVm { .. }
        | CommandKind::UpdateVm { .. }
        | CommandKind::DeleteVm { .. }
        | CommandKind::SetDesired { .. } => Author::AnyMember,
        CommandKind::Report { node, .. }
        | CommandKind::Released { node, .. }
        | CommandKind::SetCapacity { node, .. }
        | CommandKind::SetLabels { node, .. }
        | CommandKind::SetRunners { node, .. }
        | CommandKind::SetAddress { node, .. } => Author::Itself(*node),
        CommandKind::Place { .. }
        | CommandKind::Unplace { .. }
        | CommandKind::Recover { .. }
        | CommandKind::ClearHandoff { .. }
        | CommandKind::SetStatus { .. }
        | CommandKind::SetDrain { .. }
        | CommandKind::AddJoinToken { .. }
        | CommandKind::UseJoinToken { .. }
        | CommandKind::LeaderElected { .. } => Author::Leader,
    }
}

/// Whether only the leader may propose `kind`.
pub fn leader_only(kind: &CommandKind) -> bool {
    author(kind) == Author::Leader
}

/// A short name of a command, for refusals (never its content).
fn command_name(kind: &CommandKind) -> &'static str {
    match kind {
        CommandKind::CreateVm { .. } => "CreateVm",
        CommandKind::UpdateVm { .. } => "UpdateVm",
        CommandKind::DeleteVm { .. } => "DeleteVm",
        CommandKind::SetDesired { .. } => "SetDesired",
        CommandKind::Place { .. } => "Place",
        CommandKind::Unplace { .. } => "Unplace",
        CommandKind::Recover { .. } => "Recover",
        CommandKind::SetCapacity { .. } => "SetCapacity",
        CommandKind::SetLabels { .. } => "SetLabels",
        CommandKind::SetRunners { .. } => "SetRunners",
        CommandKind::SetDrain { .. } => "SetDrain",
        CommandKind::SetStatus { .. } => "SetStatus",
        CommandKind::SetAddress { .. } => "SetAddress",
        CommandKind::Report { .. } => "Report",
        CommandKind::Released { .. } => "Released",
        CommandKind::ClearHandoff { .. } => "ClearHandoff",
        CommandKind::AddJoinToken { .. } => "AddJoinToken",
        CommandKind::UseJoinToken { .. } => "UseJoinToken",
        CommandKind::LeaderElected { .. } => "LeaderElected",
    }
}

/// Whether a peer may propose `kind`: `proposer` is the member it is
/// (`None`: unknown, an unauthenticated `Peer.Propose`, which names no
/// sender). The leader's own proposals never come through here.
pub fn may_propose(proposer: Option<NodeId>, kind: &CommandKind) -> Result<(), Refusal> {
    let name = command_name(kind);
    match (author(kind), proposer) {
        (Author::AnyMember, _) => Ok(()),
        (Author::Leader, _) => refuse(format!("{name} is proposed by the leader itself; no peer may propose it")),
        (Author::Itself(node), Some(proposer)) if node == proposer => Ok(()),
        (Author::Itself(node), Some(proposer)) => {
            refuse(format!("member {proposer} may report only about itself, not {name} about member {node}"))
        }
        (Author::Itself(node), None) => {
            refuse(format!("{name} about member {node} needs the sender's member certificate"))
        }
    }
}

/// Whether `speaker` may ask to be admitted as `name` (`token`: it
/// presents a join token, which the leader checks).
pub fn may_admit(speaker: &Speaker, name: &str, token: bool) -> Result<(), Refusal> {
    match speaker {
        Speaker::Member(cert_name) if cert_name == name => Ok(()),
        Speaker::Member(cert_name) => {
            refuse(format!("the certificate of member {cert_name:?} cannot join as {name:?}"))
        }
        Speaker::Unauthenticated | Speaker::Joiner if token => Ok(()),
        Speaker::Unauthenticated | Speaker::Joiner => refuse(
            "joining this cluster needs a join token: issue one with `blixard-agent cluster join-token` \
             on a member and pass it with `cluster join --token-file` (or `join_token_file`)",
        ),
        Speaker::Client { .. } | Speaker::Outsider => refuse(format!("{speaker} cannot join the cluster")),
    }
}

/// What a member knows when it judges a Raft message: "as far as the
/// receiver can tell".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub me: NodeId,
    /// The receiver's current term.
    pub term: u64,
    /// The leader of `term`, if the receiver knows one (itself when it leads).
    pub leader: Option<NodeId>,
    /// The ids it takes messages from: its configuration's voters and
    /// learners, or, before its first snapshot, the members its admission
    /// named.
    pub configuration: BTreeSet<NodeId>,
    /// What only the raft thread knows exactly; `None` for the view the
    /// gRPC layer has (published once per loop turn), where the rows that
    /// need it are left to the raft thread.
    pub exact: Option<Exact>,
}

/// The raft thread's exact knowledge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exact {
    pub last_index: u64,
    /// The leader of `term` is live as far as raft-rs's lease goes: it was
    /// heard from within the election timeout (or this member leads).
    pub leader_in_lease: bool,
    /// The member this one, leading `term`, last asked to take over
    /// leadership in it (`consensus::Core::transfer_leader`), whether or
    /// not raft-rs still pursues the hand-over.
    pub handover: Option<NodeId>,
}

impl View {
    fn leading(&self) -> bool {
        self.exact.is_some() && self.leader == Some(self.me)
    }
}

/// The judgement on one Raft message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it to raft-rs.
    Step,
    /// Harmless but of no use here (a proposal reaching a member that no
    /// longer leads): dropped quietly; the sender's retries cover it.
    Drop(&'static str),
    /// A message its sender may not send: refused, and the stream it came
    /// on ends.
    Refuse(Refusal),
}

impl From<Result<(), Refusal>> for Verdict {
    fn from(result: Result<(), Refusal>) -> Self {
        match result {
            Ok(()) => Verdict::Step,
            Err(refusal) => Verdict::Refuse(refusal),
        }
    }
}

/// Whether the receiver whose knowledge is `view` steps `message` from
/// member `from` (the batch's sender, already bound to its certificate).
pub fn raft_message(view: &View, from: NodeId, message: &Message) -> Verdict {
    match message_rows(view, from, message) {
        Err(refusal) => Verdict::Refuse(refusal),
        Ok(()) => {
            let for_the_leader = matches!(message.get_msg_type(), MessageType::MsgPropose | MessageType::MsgReadIndex);
            if for_the_leader && view.exact.is_some() && !view.leading() {
                Verdict::Drop("a request for the leader reached a member that does not lead")
            } else {
                Verdict::Step
            }
        }
    }
}

fn message_rows(view: &View, from: NodeId, m: &Message) -> Result<(), Refusal> {
    let kind = m.get_msg_type();
    if m.to != view.me {
        return refuse(format!("a raft message for member {} reached member {}", m.to, view.me));
    }
    if m.from != from {
        return refuse(format!("member {from} sent a raft message that claims to be from member {}", m.from));
    }
    if from == 0 || from == view.me {
        return refuse(format!("member {} does not take raft messages from id {from}", view.me));
    }
    if !view.configuration.contains(&from) {
        return refuse(format!("member {from} is not in this member's configuration"));
    }
    if m.term >= TERM_MAX || m.term > view.term.saturating_add(TERM_JUMP_MAX) {
        return refuse(format!(
            "a raft message of term {} is far beyond this member's term {} (at most {TERM_JUMP_MAX} ahead)",
            m.term, view.term
        ));
    }
    later_term(view, from, m)?;
    let snapshot_index = m.get_snapshot().get_metadata().index;
    let entry_index = m.get_entries().iter().map(|e| e.index.max(e.term)).max().unwrap_or(0);
    if [m.index, m.log_term, m.commit, m.reject_hint, snapshot_index, entry_index].iter().any(|&i| i >= INDEX_MAX) {
        return refuse("a raft message carries an index or term beyond any log");
    }
    match kind {
        MessageType::MsgHup
        | MessageType::MsgBeat
        | MessageType::MsgUnreachable
        | MessageType::MsgSnapStatus
        | MessageType::MsgCheckQuorum => refuse(format!("{kind:?} is a local message; no peer may send it")),
        // Only this member's own code asks its raft-rs to hand leadership
        // over (on the leader); a peer asking is someone else's decision.
        MessageType::MsgTransferLeader => refuse("no peer may ask this member to transfer leadership"),
        MessageType::MsgAppend
        | MessageType::MsgHeartbeat
        | MessageType::MsgSnapshot
        | MessageType::MsgTimeoutNow
        | MessageType::MsgReadIndexResp => {
            from_the_leader(view, from, m)?;
            if kind == MessageType::MsgHeartbeat
                && let Some(exact) = view.exact
                && m.commit > exact.last_index
            {
                return refuse(format!(
                    "a heartbeat commits index {} beyond this member's last index {}",
                    m.commit, exact.last_index
                ));
            }
            if kind == MessageType::MsgSnapshot {
                let conf = m.get_snapshot().get_metadata().get_conf_state();
                let voters: BTreeSet<_> = conf.voters.iter().collect();
                if voters.is_empty() || conf.learners.iter().any(|l| voters.contains(l)) {
                    return refuse("a snapshot's configuration has no voter, or an id both voter and learner");
                }
            }
            Ok(())
        }
        MessageType::MsgAppendResponse => {
            if !m.reject
                && m.term == view.term
                && let Some(exact) = view.exact
                && m.index > exact.last_index
            {
                return refuse(format!(
                    "member {from} acknowledges index {} beyond this member's last index {}",
                    m.index, exact.last_index
                ));
            }
            Ok(())
        }
        MessageType::MsgRequestVote
        | MessageType::MsgRequestVoteResponse
        | MessageType::MsgRequestPreVote
        | MessageType::MsgRequestPreVoteResponse
        | MessageType::MsgHeartbeatResponse => {
            if m.term == 0 {
                return refuse(format!("{kind:?} without a term"));
            }
            Ok(())
        }
        MessageType::MsgReadIndex => {
            // raft-rs steps a term-0 message as a local one; a term would
            // move the receiver's.
            if m.term != 0 {
                return refuse("a read-index request carries a term");
            }
            Ok(())
        }
        MessageType::MsgPropose => proposal(from, m),
    }
}

/// A leader's message: the term is set, and the receiver's own term is
/// led by `from` (or by nobody the receiver knows of).
fn from_the_leader(view: &View, from: NodeId, m: &Message) -> Result<(), Refusal> {
    let kind = m.get_msg_type();
    if m.term == 0 {
        // raft-rs would take it as a local message and follow its sender
        // without any term check.
        return refuse(format!("{kind:?} without a term"));
    }
    if m.term == view.term
        && let Some(leader) = view.leader
        && leader != from
    {
        return refuse(format!("member {from} sent {kind:?} for term {}, which member {leader} leads", m.term));
    }
    Ok(())
}

/// A later term than the receiver's, which raft-rs takes as the end of
/// the receiver's term (every message but a pre-vote request and a
/// granted pre-vote answer: the receiver follows the new term, a leader
/// stepping down at once). While the leader the receiver follows (or the
/// receiver itself, leading) is live, nobody can have won a later term:
/// voters in its lease grant no vote (raft-rs ignores their requests), so
/// a later term is refused then, whatever its kind (one member's rising
/// terms kept a cluster leaderless). Two exceptions: the leader itself
/// moving on, and the member a leader hands over to (a vote request with
/// the transfer context at the next term, which raft-rs grants past its
/// lease; or that member's answers at that term, should its campaign have
/// failed: it can come back no other way). A follower cannot tell a
/// hand-over, so it refuses the candidate's vote request and its appends
/// until its lease runs out; the leader's own vote is enough in a cluster
/// of up to three voters, and a larger one finishes the hand-over with an
/// ordinary election once the leases run out.
fn later_term(view: &View, from: NodeId, m: &Message) -> Result<(), Refusal> {
    let kind = m.get_msg_type();
    let keeps_the_term =
        kind == MessageType::MsgRequestPreVote || (kind == MessageType::MsgRequestPreVoteResponse && !m.reject);
    let (Some(leader), Some(exact)) = (view.leader, view.exact) else { return Ok(()) };
    if m.term <= view.term || keeps_the_term || !exact.leader_in_lease || from == leader {
        return Ok(());
    }
    if view.leading() && exact.handover == Some(from) && m.term == view.term + 1 {
        return Ok(());
    }
    refuse(format!(
        "member {from} sent {kind:?} of term {} while member {leader}, which leads term {}, is live",
        m.term, view.term
    ))
}

/// A follower's proposal to the leader: each entry a command `from` may
/// propose, in its own name.
fn proposal(from: NodeId, m: &Message) -> Result<(), Refusal> {
    if m.term != 0 {
        return refuse("a proposal carries a term");
    }
    if m.get_entries().is_empty() {
        // raft-rs panics on an empty proposal.
        return refuse("a proposal without entries");
    }
    for entry in m.get_entries() {
        if entry.get_entry_type() != EntryType::EntryNormal {
            return refuse("membership changes are proposed by the leader itself; no peer may propose one");
        }
        let context = codec::pb::ProposalContext::decode(entry.get_context())
            .map_err(|_| Refusal("a proposal's context does not decode".into()))?;
        if context.proposer != from {
            return refuse(format!("member {from} proposed in the name of member {}", context.proposer));
        }
        let command = codec::decode_command(entry.get_data())
            .map_err(|e| Refusal(format!("a proposed command does not decode: {e}")))?;
        may_propose(Some(from), &command.kind)?;
    }
    Ok(())
}

/// Whether the receiver takes a snapshot stream from member `from` at all
/// (before reading any of it): only from the leader it knows.
pub fn may_stream_snapshot(view: &View, from: NodeId) -> Result<(), Refusal> {
    match view.leader {
        Some(leader) if leader != from => {
            refuse(format!("member {from} sent a snapshot, but member {leader} leads term {}", view.term))
        }
        _ => Ok(()),
    }
}

/// Commands for the table's tests and the properties' strategies.
#[cfg(test)]
pub(crate) mod tests_support {
    use crate::state::{Capacity, CommandKind, Desired, MemberStatus, NodeId, VmSpec, VmState};

    /// One command of every kind, about member `node`.
    pub fn every_command(node: NodeId) -> Vec<CommandKind> {
        let vm = "web".to_string();
        vec![
            CommandKind::CreateVm { name: vm.clone(), spec: VmSpec::default() },
            CommandKind::UpdateVm { name: vm.clone(), spec: VmSpec::default() },
            CommandKind::DeleteVm { name: vm.clone() },
            CommandKind::SetDesired { name: vm.clone(), desired: Desired::Stopped },
            CommandKind::Place { vm: vm.clone(), node, expected_generation: 0 },
            CommandKind::Unplace { vm: vm.clone(), expected_generation: 0 },
            CommandKind::Recover { vm: vm.clone(), node, expected_generation: 0 },
            CommandKind::SetCapacity { node, capacity: Capacity::default() },
            CommandKind::SetLabels { node, labels: Default::default() },
            CommandKind::SetRunners { node, runners: vec![] },
            CommandKind::SetDrain { node, drain: true },
            CommandKind::SetStatus { node, status: MemberStatus::Down },
            CommandKind::SetAddress { node, address: "127.0.0.1:1".into(), protocol: 1 },
            CommandKind::Report { node, vm: vm.clone(), generation: 1, state: VmState::Running, last_error: None },
            CommandKind::Released { node, vm: vm.clone(), generation: 1 },
            CommandKind::ClearHandoff { vm, from: node, expected_generation: 0 },
            CommandKind::AddJoinToken { hash: [0; 32], ttl_ms: 1000 },
            CommandKind::UseJoinToken { hash: [0; 32], node },
        ]
    }
}

#[cfg(test)]
mod tests {
    use raft::eraftpb::{ConfState, Entry};

    use super::tests_support::every_command;
    use super::*;
    use crate::state::Command;

    const ME: NodeId = 1;
    const LEADER: NodeId = 2;
    const PEER: NodeId = 3;
    const LEARNER: NodeId = 4;
    const STRANGER: NodeId = 9;

    fn view(exact: bool) -> View {
        View {
            me: ME,
            term: 7,
            leader: Some(LEADER),
            configuration: [ME, LEADER, PEER, LEARNER].into(),
            exact: exact.then_some(Exact { last_index: 100, leader_in_lease: false, handover: None }),
        }
    }

    fn message(kind: MessageType, from: NodeId, term: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(kind);
        m.from = from;
        m.to = ME;
        m.term = term;
        if kind == MessageType::MsgSnapshot {
            m.mut_snapshot().mut_metadata().set_conf_state(ConfState::from((vec![1, 2, 3], vec![4])));
            m.mut_snapshot().mut_metadata().index = 50;
        }
        m
    }

    fn entry(proposer: NodeId, kind: CommandKind) -> Entry {
        let mut entry = Entry::default();
        entry.set_data(codec::encode_command(&Command { at_unix_ms: 1, kind }).into());
        entry.set_context(codec::pb::ProposalContext { proposer, seq: 1, term: 7 }.encode_to_vec().into());
        entry
    }

    fn propose(from: NodeId, entries: Vec<Entry>) -> Message {
        let mut m = message(MessageType::MsgPropose, from, 0);
        m.set_entries(entries.into());
        m
    }

    fn refused(verdict: Verdict) -> bool {
        matches!(verdict, Verdict::Refuse(_))
    }

    #[test]
    fn the_call_table_is_walked_whole() {
        let speakers = [
            Speaker::Outsider,
            Speaker::Client { name: "ro".into(), role: ClientRole::ReadOnly },
            Speaker::Client { name: "ops".into(), role: ClientRole::Admin },
            Speaker::Member("h1".into()),
            Speaker::Unauthenticated,
            Speaker::Joiner,
        ];
        for speaker in &speakers {
            for rpc in Rpc::ALL {
                for forwarded in [false, true] {
                    let allowed = may_call(speaker, rpc, forwarded).is_ok();
                    let expected = match speaker {
                        Speaker::Outsider => false,
                        Speaker::Member(_) | Speaker::Unauthenticated => true,
                        Speaker::Joiner => !forwarded && rpc == Rpc::Admit,
                        Speaker::Client { role, .. } => {
                            !forwarded
                                && match rpc.kind() {
                                    CallKind::Peer | CallKind::Join => false,
                                    CallKind::Read => true,
                                    CallKind::Write | CallKind::Export => *role == ClientRole::Admin,
                                }
                        }
                    };
                    assert_eq!(allowed, expected, "{speaker} {rpc:?} forwarded={forwarded}");
                }
            }
        }
        // Every kind of call exists, and every write is refused to a
        // read-only client.
        let read_only = Speaker::Client { name: "ro".into(), role: ClientRole::ReadOnly };
        let writes: Vec<Rpc> = Rpc::ALL.into_iter().filter(|r| r.kind() == CallKind::Write).collect();
        assert_eq!(writes.len(), 13);
        assert_eq!(Rpc::ClusterBackup.kind(), CallKind::Export);
        assert!(may_call(&read_only, Rpc::ClusterBackup, false).is_err());
        assert!(may_call(&read_only, Rpc::VmList, false).is_ok());
        assert!(writes.iter().all(|rpc| may_call(&read_only, *rpc, false).is_err()));
        let mut sorted = Rpc::ALL.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), Rpc::ALL.len(), "Rpc::ALL lists each call once");
    }

    #[test]
    fn the_command_table_is_walked_whole() {
        let by_leader =
            ["Place", "Unplace", "Recover", "ClearHandoff", "SetStatus", "SetDrain", "AddJoinToken", "UseJoinToken"];
        let about_itself = ["Report", "Released", "SetCapacity", "SetLabels", "SetRunners", "SetAddress"];
        for kind in every_command(PEER) {
            let name = command_name(&kind);
            let own = may_propose(Some(PEER), &kind).is_ok();
            let others = may_propose(Some(LEADER), &kind).is_ok();
            let unknown = may_propose(None, &kind).is_ok();
            if by_leader.contains(&name) {
                assert!(leader_only(&kind) && !own && !others && !unknown, "{name}");
            } else if about_itself.contains(&name) {
                assert!(own && !others && !unknown, "{name}");
            } else {
                assert!(own && others && unknown, "{name}");
            }
            // The same through a raft proposal.
            assert_eq!(!refused(raft_message(&view(true), PEER, &propose(PEER, vec![entry(PEER, kind.clone())]))), own);
            assert_eq!(
                !refused(raft_message(&view(true), LEADER, &propose(LEADER, vec![entry(LEADER, kind.clone())]))),
                others
            );
        }
        assert_eq!(every_command(PEER).len(), by_leader.len() + about_itself.len() + 4);
    }

    #[test]
    fn proposals_speak_only_for_their_sender() {
        let v = view(true);
        let own = || entry(PEER, CommandKind::SetRunners { node: PEER, runners: vec![] });
        // A normal entry of the sender's own: stepped on the leader,
        // dropped (never relayed) elsewhere.
        let mut leading = view(true);
        leading.leader = Some(ME);
        assert_eq!(raft_message(&leading, PEER, &propose(PEER, vec![own()])), Verdict::Step);
        assert!(matches!(raft_message(&v, PEER, &propose(PEER, vec![own()])), Verdict::Drop(_)));
        // Another proposer's context, a membership change, no entries, a
        // term, undecodable bytes: refused.
        let mut theirs = own();
        theirs.set_context(codec::pb::ProposalContext { proposer: LEADER, seq: 1, term: 7 }.encode_to_vec().into());
        assert!(refused(raft_message(&v, PEER, &propose(PEER, vec![theirs]))));
        let mut conf = own();
        conf.set_entry_type(EntryType::EntryConfChange);
        assert!(refused(raft_message(&v, PEER, &propose(PEER, vec![conf]))));
        assert!(refused(raft_message(&v, PEER, &propose(PEER, vec![]))));
        let mut termed = propose(PEER, vec![own()]);
        termed.term = 8;
        assert!(refused(raft_message(&v, PEER, &termed)));
        let mut garbage = own();
        garbage.set_data(vec![0xff; 8].into());
        assert!(refused(raft_message(&v, PEER, &propose(PEER, vec![garbage]))));
        // One bad entry among good ones refuses the message.
        let bad = entry(PEER, CommandKind::SetRunners { node: LEADER, runners: vec![] });
        assert!(refused(raft_message(&v, PEER, &propose(PEER, vec![own(), bad]))));
    }

    #[test]
    fn the_message_table_is_walked_whole() {
        use MessageType::*;
        let every = [
            MsgHup,
            MsgBeat,
            MsgPropose,
            MsgAppend,
            MsgAppendResponse,
            MsgRequestVote,
            MsgRequestVoteResponse,
            MsgSnapshot,
            MsgHeartbeat,
            MsgHeartbeatResponse,
            MsgUnreachable,
            MsgSnapStatus,
            MsgCheckQuorum,
            MsgTransferLeader,
            MsgTimeoutNow,
            MsgReadIndex,
            MsgReadIndexResp,
            MsgRequestPreVote,
            MsgRequestPreVoteResponse,
        ];
        let leader_kinds = [MsgAppend, MsgHeartbeat, MsgSnapshot, MsgTimeoutNow, MsgReadIndexResp];
        let never = [MsgHup, MsgBeat, MsgUnreachable, MsgSnapStatus, MsgCheckQuorum, MsgTransferLeader];
        for exact in [false, true] {
            let v = view(exact);
            for kind in every {
                // The term a well-formed message of this kind carries.
                let term = if matches!(kind, MsgPropose | MsgReadIndex) { 0 } else { 7 };
                let well_formed = |from| {
                    if kind == MsgPropose {
                        propose(from, vec![entry(from, CommandKind::DeleteVm { name: "web".into() })])
                    } else {
                        message(kind, from, term)
                    }
                };
                let from_leader = raft_message(&v, LEADER, &well_formed(LEADER));
                let from_peer = raft_message(&v, PEER, &well_formed(PEER));
                if never.contains(&kind) {
                    assert!(refused(from_leader) && refused(from_peer), "{kind:?}");
                    continue;
                }
                assert!(!refused(from_leader.clone()), "{kind:?} from the leader: {from_leader:?}");
                if leader_kinds.contains(&kind) {
                    // Posing as the leader of the receiver's term: refused;
                    // of a later term: stepped (the receiver cannot tell
                    // who won it); of an earlier one: raft-rs answers it.
                    assert!(refused(from_peer), "{kind:?}");
                    let mut later = well_formed(PEER);
                    later.term = 8;
                    assert_eq!(raft_message(&v, PEER, &later), Verdict::Step, "{kind:?}");
                    let mut earlier = well_formed(PEER);
                    earlier.term = 6;
                    assert_eq!(raft_message(&v, PEER, &earlier), Verdict::Step, "{kind:?}");
                    // Without a term raft-rs would follow it blindly.
                    assert!(refused(raft_message(&v, PEER, &message(kind, PEER, 0))), "{kind:?}");
                } else if matches!(kind, MsgPropose | MsgReadIndex) && exact {
                    assert!(matches!(from_peer, Verdict::Drop(_)), "{kind:?}");
                } else {
                    assert_eq!(from_peer, Verdict::Step, "{kind:?}");
                }
                // Rows for every kind: sender binding, recipient,
                // configuration (a learner is in it), term bounds.
                for (from, claimed, to) in
                    [(PEER, LEADER, ME), (LEADER, LEADER, 5), (STRANGER, STRANGER, ME), (ME, ME, ME)]
                {
                    let mut m = well_formed(claimed);
                    m.to = to;
                    assert!(refused(raft_message(&v, from, &m)), "{kind:?} from {from} as {claimed} to {to}");
                }
                assert!(!refused(raft_message(&v, LEARNER, &well_formed(LEARNER))) || leader_kinds.contains(&kind));
                for far in [7 + TERM_JUMP_MAX + 1, TERM_MAX, u64::MAX] {
                    let mut m = well_formed(LEADER);
                    m.term = far;
                    assert!(refused(raft_message(&v, LEADER, &m)), "{kind:?} at term {far}");
                }
                let mut near = well_formed(LEADER);
                near.term = 7 + TERM_JUMP_MAX;
                assert!(!refused(raft_message(&v, LEADER, &near)) || kind == MsgPropose || kind == MsgReadIndex);
                let mut huge = well_formed(LEADER);
                huge.index = u64::MAX;
                assert!(refused(raft_message(&v, LEADER, &huge)), "{kind:?} with index u64::MAX");
            }
        }
    }

    #[test]
    fn values_raft_rs_would_panic_on_are_refused_on_the_raft_thread() {
        let exact = view(true);
        let mut heartbeat = message(MessageType::MsgHeartbeat, LEADER, 7);
        heartbeat.commit = 100;
        assert_eq!(raft_message(&exact, LEADER, &heartbeat), Verdict::Step);
        heartbeat.commit = 101;
        assert!(refused(raft_message(&exact, LEADER, &heartbeat)));
        // The gRPC layer does not know the last index: left to the raft thread.
        assert_eq!(raft_message(&view(false), LEADER, &heartbeat), Verdict::Step);

        let mut leading = view(true);
        leading.leader = Some(ME);
        let mut ack = message(MessageType::MsgAppendResponse, PEER, 7);
        ack.index = 101;
        assert!(refused(raft_message(&leading, PEER, &ack)));
        ack.reject = true;
        assert_eq!(raft_message(&leading, PEER, &ack), Verdict::Step, "a rejection hints at the follower's log");

        let mut snapshot = message(MessageType::MsgSnapshot, LEADER, 7);
        snapshot.mut_snapshot().mut_metadata().set_conf_state(ConfState::from((vec![], vec![4])));
        assert!(refused(raft_message(&exact, LEADER, &snapshot)));
        snapshot.mut_snapshot().mut_metadata().set_conf_state(ConfState::from((vec![1, 4], vec![4])));
        assert!(refused(raft_message(&exact, LEADER, &snapshot)));
    }

    #[test]
    fn a_later_term_is_not_followed_while_the_leader_is_live() {
        use MessageType::*;
        let exact = |handover| Some(Exact { last_index: 100, leader_in_lease: true, handover });
        let live = View { exact: exact(None), ..view(true) };
        let forced = |from, term| {
            let mut vote = message(MsgRequestVote, from, term);
            vote.set_context(raft::CAMPAIGN_TRANSFER.to_vec().into());
            vote
        };
        // Every kind raft-rs takes as the end of the receiver's term: a
        // vote request (forced past raft-rs's lease or not), answers of a
        // later term (a leader steps down at once), a leader's messages.
        let ending = [
            MsgAppend,
            MsgHeartbeat,
            MsgSnapshot,
            MsgTimeoutNow,
            MsgReadIndexResp,
            MsgAppendResponse,
            MsgHeartbeatResponse,
            MsgRequestVote,
            MsgRequestVoteResponse,
        ];
        for kind in ending {
            assert!(refused(raft_message(&live, PEER, &message(kind, PEER, 8))), "{kind:?}");
            // The leader itself moving on, and anyone once the lease ran out.
            assert_eq!(raft_message(&live, LEADER, &message(kind, LEADER, 8)), Verdict::Step, "{kind:?}");
            assert_eq!(raft_message(&view(true), PEER, &message(kind, PEER, 8)), Verdict::Step, "{kind:?}");
            // Its own term and earlier ones are the other rows' to judge.
            let mut earlier = message(kind, PEER, 6);
            earlier.index = 1;
            assert_eq!(raft_message(&live, PEER, &earlier), Verdict::Step, "{kind:?}");
        }
        assert!(refused(raft_message(&live, PEER, &forced(PEER, 8))));
        let mut rejected = message(MsgRequestPreVoteResponse, PEER, 8);
        rejected.reject = true;
        assert!(refused(raft_message(&live, PEER, &rejected)));
        // Pre-votes never move a term (raft-rs's lease judges them).
        assert_eq!(raft_message(&live, PEER, &message(MsgRequestPreVote, PEER, 8)), Verdict::Step);
        assert_eq!(raft_message(&live, PEER, &message(MsgRequestPreVoteResponse, PEER, 8)), Verdict::Step);

        // A leader handing over to PEER takes its forced vote request and
        // its answers of the next term, and nothing else of a later term.
        let handing = View { leader: Some(ME), exact: exact(Some(PEER)), ..view(true) };
        assert_eq!(raft_message(&handing, PEER, &forced(PEER, 8)), Verdict::Step);
        assert_eq!(raft_message(&handing, PEER, &message(MsgAppendResponse, PEER, 8)), Verdict::Step);
        assert!(refused(raft_message(&handing, PEER, &forced(PEER, 9))));
        assert!(refused(raft_message(&handing, LEADER, &forced(LEADER, 8))));
        let leading = View { leader: Some(ME), exact: exact(None), ..view(true) };
        assert!(refused(raft_message(&leading, PEER, &forced(PEER, 8))));
        assert!(refused(raft_message(&leading, PEER, &message(MsgHeartbeatResponse, PEER, 8))));
        // A follower cannot tell a hand-over.
        let following = View { exact: exact(Some(PEER)), ..view(true) };
        assert!(refused(raft_message(&following, PEER, &forced(PEER, 8))));
    }

    #[test]
    fn a_joiner_and_a_candidate_know_no_leader() {
        // Before its first snapshot a joiner knows no term and no leader:
        // whoever of the admitted members leads is taken.
        let joiner = View { me: ME, term: 0, leader: None, configuration: [LEADER, PEER].into(), exact: None };
        assert_eq!(raft_message(&joiner, LEADER, &message(MessageType::MsgSnapshot, LEADER, 7)), Verdict::Step);
        assert!(refused(raft_message(&joiner, STRANGER, &message(MessageType::MsgSnapshot, STRANGER, 7))));
        assert!(may_stream_snapshot(&joiner, PEER).is_ok());
        assert!(may_stream_snapshot(&view(false), PEER).is_err());
        assert!(may_stream_snapshot(&view(false), LEADER).is_ok());
    }

    #[test]
    fn admission_binds_the_name() {
        assert!(may_admit(&Speaker::Member("h4".into()), "h4", false).is_ok());
        assert!(may_admit(&Speaker::Member("h2".into()), "evil", false).is_err());
        assert!(may_admit(&Speaker::Member("h2".into()), "evil", true).is_err());
        assert!(may_admit(&Speaker::Unauthenticated, "h4", true).is_ok());
        assert!(may_admit(&Speaker::Unauthenticated, "h4", false).is_err());
        assert!(may_admit(&Speaker::Joiner, "h4", true).is_ok());
        assert!(may_admit(&Speaker::Joiner, "h4", false).is_err());
        let admin = Speaker::Client { name: "ops".into(), role: ClientRole::Admin };
        assert!(may_admit(&admin, "h4", true).is_err());
        assert!(may_admit(&Speaker::Outsider, "h4", true).is_err());
    }
}
