//! Properties of hostile input, as functions over arbitrary bytes that
//! panic when a property fails. The cargo-fuzz targets (`fuzz/`) and the
//! proptest tests (below, run by `cargo test`) check the same functions,
//! so a fuzzer's crash input replays as an ordinary test.
//!
//! - [`config_text`]: any config text is accepted or refused with an
//!   error; an accepted config holds only valid names.
//! - [`vm_create_request`]: any bytes on the client API's `VmCreate` decode
//!   or not; a request the edge accepts is one apply accepts too, and the
//!   edge refuses every name apply would.
//! - [`commands`]: any sequence of encoded state commands decodes or not;
//!   applying them keeps the state's invariants, and a rejected command
//!   changes nothing.
//! - [`raft_batch`]: any bytes on `Peer.Raft` decode or not; what the
//!   trust table accepts holds to its rows, and stepping it into a real
//!   core never panics raft-rs.
//! - [`snapshot_chunks`]: any chunks on `Peer.Snapshot` are assembled or
//!   refused; the bytes held never exceed the announced total (itself
//!   bounded), and a completed snapshot is exactly what was announced.
//! - [`propose_request`]: any bytes on `Peer.Propose` decode or not; an
//!   accepted command is never the leader's, and a report is about its
//!   sender.

use prost::Message as _;
use raft::eraftpb::{ConfState, EntryType, MessageType};

use crate::api::pb;
use crate::config::{Config, FileConfig, Overrides};
use crate::consensus::{BOOTSTRAP_INDEX, BOOTSTRAP_TERM, Core, CoreConfig, Transport};
use crate::state::{Command, CommandKind, Member, State, codec};
use crate::storage::{CrashDisk, Store};
use crate::trust::{self, Author};

/// Parsing and resolving `text` as a config file never panics; what is
/// accepted has valid names.
pub fn config_text(text: &str) {
    let Ok(file) = FileConfig::parse(text) else { return };
    let Ok(config) = Config::resolve(file, Overrides::default()) else { return };
    assert!(crate::names::validate(&config.node_name).is_ok(), "accepted node_name {:?}", config.node_name);
    for vm in &config.vms {
        assert!(crate::names::validate(&vm.name).is_ok(), "accepted VM name {:?}", vm.name);
    }
    for member in &config.initial_members {
        assert!(crate::names::validate(&member.name).is_ok(), "accepted member name {:?}", member.name);
    }
}

/// The edge check of `VmCreate` agrees with apply.
pub fn vm_create_request(bytes: &[u8]) {
    let Ok(request) = pb::VmCreateRequest::decode(bytes) else { return };
    match crate::api::service::spec_of(&request) {
        Ok(spec) => {
            assert!(crate::names::validate(&request.name).is_ok(), "the edge accepted {:?}", request.name);
            let mut state = State::default();
            let command = Command { at_unix_ms: 1, kind: CommandKind::CreateVm { name: request.name.clone(), spec } };
            if let Err(rejection) = state.apply(&command) {
                panic!("the edge accepted a create that apply rejects: {rejection}");
            }
            assert_eq!(state.validate(), Ok(()));
        }
        Err(status) => assert!(status.message().len() <= 1024, "an error echoes too much: {}", status.message().len()),
    }
}

/// Commands framed as `[len: u8][len bytes]...`, decoded and applied to a
/// three-member state.
pub fn commands(bytes: &[u8]) {
    let mut state = State::with_members([
        Member::new(1, "h1", "127.0.0.1:7001"),
        Member::new(2, "h2", "127.0.0.1:7002"),
        Member::new(3, "h3", "127.0.0.1:7003"),
    ]);
    let mut rest = bytes;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (frame, tail) = tail.split_at(len);
        rest = tail;
        let Ok(command) = codec::decode_command(frame) else { continue };
        // What decodes re-encodes to something that decodes the same.
        let again = codec::decode_command(&codec::encode_command(&command)).expect("a re-encoded command decodes");
        assert_eq!(again, command);
        let before = state.clone();
        match state.apply(&command) {
            Ok(_) => {
                if let Err(e) = state.validate() {
                    panic!("{command:?} broke an invariant: {e}");
                }
            }
            Err(_) => assert!(state == before, "a rejected command changed the state: {command:?}"),
        }
    }
}

/// Member 1 of voters 1, 2, 3 and learner 4, over an in-memory disk:
/// following member 2 as the leader of term 7, or (`leading`) elected
/// leader with member 2's vote.
fn core(leading: bool) -> Core {
    let members = (1..=4).map(|id| Member::new(id, format!("h{id}"), format!("127.0.0.{id}:7000")));
    let mut store = Store::open_backend(CrashDisk::new().backend()).expect("an in-memory store opens");
    let conf = ConfState::from((vec![1, 2, 3], vec![4]));
    store.bootstrap(conf, State::with_members(members), BOOTSTRAP_INDEX, BOOTSTRAP_TERM).expect("bootstrap");
    let mut core = Core::new(CoreConfig { incarnation: 1, ..CoreConfig::new(1) }, store).expect("a core starts");
    let message = |kind, term| {
        let mut m = raft::eraftpb::Message::default();
        m.set_msg_type(kind);
        (m.from, m.to, m.term) = (2, 1, term);
        m
    };
    if leading {
        core.campaign().expect("a campaign starts");
        core.handle_ready(&mut Discard).expect("in memory");
        let term = core.term();
        core.step(message(MessageType::MsgRequestPreVoteResponse, term + 1)).expect("a pre-vote steps");
        core.handle_ready(&mut Discard).expect("in memory");
        core.step(message(MessageType::MsgRequestVoteResponse, core.term())).expect("a vote steps");
        core.handle_ready(&mut Discard).expect("in memory");
        assert!(core.is_leader());
    } else {
        core.step(message(MessageType::MsgHeartbeat, 7)).expect("the leader's heartbeat steps");
        assert_eq!((core.term(), core.leader()), (7, Some(2)));
    }
    core
}

struct Discard;

impl Transport for Discard {
    fn send(&mut self, _: Vec<raft::eraftpb::Message>) {}
}

/// A `RaftBatch` judged by the trust table with the gRPC layer's view and
/// then, message by message, with the raft thread's exact view of a real
/// follower, which steps what is accepted.
pub fn raft_batch(bytes: &[u8]) {
    let Ok(batch) = pb::RaftBatch::decode(bytes) else { return };
    raft_batch_to(&batch, core(false));
    raft_batch_to(&batch, core(true));
}

fn raft_batch_to(batch: &pb::RaftBatch, mut core: Core) {
    let published = trust::View { exact: None, ..core.trust_view() };
    let Ok(messages) = crate::api::peer::judge_batch(&published, batch) else { return };
    for message in messages {
        let view = core.trust_view();
        if trust::raft_message(&view, batch.from, &message) != trust::Verdict::Step {
            continue;
        }
        // What the rows promise of an accepted message.
        assert_eq!(message.to, 1);
        assert_eq!(message.from, batch.from);
        assert!(view.configuration.contains(&message.from) && message.from != 1);
        assert!(message.term < trust::TERM_MAX && message.term <= view.term + trust::TERM_JUMP_MAX);
        let kind = message.get_msg_type();
        assert!(!matches!(kind, MessageType::MsgHup | MessageType::MsgBeat | MessageType::MsgTransferLeader));
        let leaders = [MessageType::MsgAppend, MessageType::MsgHeartbeat, MessageType::MsgSnapshot];
        if leaders.contains(&kind) && message.term == view.term {
            assert!(view.leader.is_none_or(|l| l == message.from), "{kind:?} from a member not leading its term");
        }
        if kind == MessageType::MsgPropose {
            for entry in message.get_entries() {
                assert_eq!(entry.get_entry_type(), EntryType::EntryNormal);
                let command = codec::decode_command(entry.get_data()).expect("an accepted proposal decodes");
                assert!(trust::may_propose(Some(message.from), &command.kind).is_ok());
            }
        }
        // raft-rs must not panic on anything the table lets through.
        let from = message.from;
        let _ = core.step(message);
        let _ = core.handle_ready(&mut Discard);
        // Nobody but the live leader (or the member it hands over to)
        // ends the term it leads.
        let exact = view.exact.expect("the raft thread's view is exact");
        if exact.leader_in_lease && view.leader.is_some_and(|l| l != from) && exact.handover != Some(from) {
            assert_eq!(core.term(), view.term, "{kind:?} from {from} ended a live leader's term");
        }
    }
}

/// `SnapshotChunk`s framed as `[len: u16 little-endian][len bytes]...`,
/// pushed into one assembler until it completes or refuses.
pub fn snapshot_chunks(bytes: &[u8]) {
    use sha2::Digest as _;
    let mut assembler = crate::api::peer::SnapshotAssembler::default();
    let mut announced = None;
    let mut data = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let (frame, tail) = rest[2..].split_at(len);
        rest = tail;
        let Ok(chunk) = pb::SnapshotChunk::decode(frame) else { return };
        announced.get_or_insert(chunk.total_size);
        data.extend_from_slice(&chunk.data);
        let sha256 = chunk.sha256.clone();
        match assembler.push(chunk) {
            Err(_) => return,
            Ok(None) => {
                let total = announced.expect("set above");
                assert!(total <= crate::api::peer::SNAPSHOT_BYTES_MAX);
                assert!(assembler.buffered() as u64 <= total, "held more than announced");
                assert!(assembler.header().is_some_and(|h| h.get_msg_type() == MessageType::MsgSnapshot));
            }
            Ok(Some(message)) => {
                assert_eq!(message.get_msg_type(), MessageType::MsgSnapshot);
                assert_eq!(message.get_snapshot().get_data(), data.as_slice());
                assert_eq!(Some(data.len() as u64), announced);
                assert_eq!(sha2::Sha256::digest(&data).as_slice(), sha256.as_slice());
                return;
            }
        }
    }
}

/// A `ProposeRequest` from member 3 (and from an unknown sender): what is
/// accepted is never the leader's command, and a report is about member 3.
pub fn propose_request(bytes: &[u8]) {
    let Ok(request) = pb::ProposeRequest::decode(bytes) else { return };
    for proposer in [Some(3), None] {
        let Ok(kind) = crate::api::peer::judge_proposal(proposer, &request.command) else { continue };
        match trust::author(&kind) {
            Author::Leader => panic!("a peer's proposal of the leader's {kind:?} was accepted"),
            Author::Itself(node) => assert_eq!(Some(node), proposer, "accepted a report about another member"),
            Author::AnyMember => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::state::{Desired, VmSpec};

    /// Bytes that are often a valid command: real commands, encoded, with
    /// some bytes flipped.
    fn command_frames() -> impl Strategy<Value = Vec<u8>> {
        let name = prop_oneof!["[a-z0-9][a-z0-9-]{0,8}", ".{0,70}", Just("../x".to_string())];
        let kind = (name, 0u32..2000, 0u64..(1 << 25), any::<bool>(), 0u64..5).prop_map(
            |(name, vcpu, memory_mib, stopped, node)| match node {
                0 => CommandKind::CreateVm {
                    name,
                    spec: VmSpec {
                        vcpu,
                        memory_mib,
                        desired: if stopped { Desired::Stopped } else { Desired::Running },
                        ..VmSpec::default()
                    },
                },
                1 => CommandKind::DeleteVm { name },
                _ => CommandKind::SetDesired { name, desired: Desired::Stopped },
            },
        );
        let frame = (kind, proptest::collection::vec(any::<(u8, u8)>(), 0..3)).prop_map(|(kind, flips)| {
            let mut bytes = codec::encode_command(&Command { at_unix_ms: 5, kind });
            for (at, bit) in flips {
                if !bytes.is_empty() {
                    let i = usize::from(at) % bytes.len();
                    bytes[i] ^= 1 << (bit % 8);
                }
            }
            bytes.truncate(255);
            let mut framed = vec![bytes.len() as u8];
            framed.extend(bytes);
            framed
        });
        proptest::collection::vec(frame, 0..12).prop_map(|frames| frames.concat())
    }

    /// Found by `cargo fuzz run request_validation`: a long label key of
    /// control characters was echoed whole (escaped, six bytes each) in the
    /// refusal.
    #[test]
    fn a_long_hostile_label_key_is_not_echoed_whole() {
        let labels = [("\u{7f}".repeat(300), "v".to_string())].into_iter().collect();
        let request = pb::VmCreateRequest { name: "web".into(), vcpu: 1, memory_mib: 64, labels, ..Default::default() };
        vm_create_request(&request.encode_to_vec());
    }

    /// Raft batches that are often nearly right: messages of every type
    /// from members and strangers, about the follower's term, with
    /// proposals of every kind of command, in anyone's name.
    fn raft_batches() -> impl Strategy<Value = Vec<u8>> {
        use protobuf::{Message as _, ProtobufEnum as _};
        let term = prop_oneof![
            1 => Just(0u64),
            12 => 5u64..10,
            1 => Just(7 + trust::TERM_JUMP_MAX),
            1 => Just(u64::MAX)
        ]
        .boxed();
        let index = prop_oneof![12 => 0u64..12, 1 => Just(u64::MAX)].boxed();
        let kind = (0u64..5, 0usize..18);
        let entry = (kind, 0u64..5, any::<bool>())
            .prop_map(|((node, which), proposer, conf)| {
                let kinds = crate::trust::tests_support::every_command(node);
                let mut entry = raft::eraftpb::Entry::default();
                entry.set_data(codec::encode_command(&Command { at_unix_ms: 1, kind: kinds[which].clone() }).into());
                let context = codec::pb::ProposalContext { proposer, seq: 1, term: 7 };
                entry.set_context(context.encode_to_vec().into());
                if conf {
                    entry.set_entry_type(EntryType::EntryConfChange);
                }
                entry
            })
            .boxed();
        let message = move |batch_from: u64| {
            (
                0i32..19,
                (prop_oneof![9 => Just(batch_from), 1 => 0u64..6], prop_oneof![9 => Just(1u64), 1 => 0u64..6]),
                term.clone(),
                (index.clone(), index.clone()),
                any::<bool>(),
                proptest::collection::vec(entry.clone(), 0..3),
            )
                .prop_map(|(kind, (from, to), term, (index, commit), reject, entries)| {
                    let mut m = raft::eraftpb::Message::default();
                    m.set_msg_type(MessageType::from_i32(kind).unwrap_or(MessageType::MsgHeartbeat));
                    (m.from, m.to, m.term, m.index, m.commit, m.reject) = (from, to, term, index, commit, reject);
                    m.log_term = term.min(7);
                    m.set_entries(entries.into());
                    if m.get_msg_type() == MessageType::MsgSnapshot {
                        m.mut_snapshot().mut_metadata().index = index;
                        m.mut_snapshot().mut_metadata().term = term.min(7);
                        m.mut_snapshot().mut_metadata().set_conf_state(ConfState::from((vec![1, 2, 3], vec![4])));
                    }
                    m.write_to_bytes().expect("a message encodes")
                })
        };
        prop_oneof![1 => 0u64..6, 3 => 2u64..5]
            .prop_flat_map(move |from| (Just(from), proptest::collection::vec(message(from), 1..4)))
            .prop_map(|(from, messages)| {
                pb::RaftBatch { cluster_id: 7, from, messages, ..Default::default() }.encode_to_vec()
            })
    }

    /// Chunk sequences that are often a real snapshot, some damaged.
    fn snapshot_streams() -> impl Strategy<Value = Vec<u8>> {
        (0usize..3000, proptest::collection::vec(any::<(u16, u8)>(), 0..3), any::<bool>()).prop_map(
            |(len, flips, lie)| {
                let mut message = raft::eraftpb::Message::default();
                message.set_msg_type(MessageType::MsgSnapshot);
                message.mut_snapshot().set_data((0..len).map(|i| i as u8).collect::<Vec<_>>().into());
                let me = crate::api::peer::Sender { id: 2, cluster_id: 7, address: "127.0.0.2:7000".into() };
                let mut chunks = crate::api::peer::snapshot_chunks_sized(&me, message, 1000).expect("chunks");
                if lie {
                    chunks[0].total_size = u64::MAX;
                }
                let mut out = Vec::new();
                for chunk in chunks {
                    let bytes = chunk.encode_to_vec();
                    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
                    out.extend(bytes);
                }
                for (at, bit) in flips {
                    if !out.is_empty() {
                        let i = usize::from(at) % out.len();
                        out[i] ^= 1 << (bit % 8);
                    }
                }
                out
            },
        )
    }

    #[test]
    fn a_real_snapshot_completes() {
        use protobuf::Message as _;
        let mut message = raft::eraftpb::Message::default();
        message.set_msg_type(MessageType::MsgSnapshot);
        message.mut_snapshot().set_data(vec![7; 2500].into());
        let me = crate::api::peer::Sender { id: 2, cluster_id: 7, address: String::new() };
        let chunks = crate::api::peer::snapshot_chunks_sized(&me, message.clone(), 1000).unwrap();
        assert_eq!(chunks.len(), 3);
        let mut assembler = crate::api::peer::SnapshotAssembler::default();
        let done: Vec<_> = chunks.into_iter().map(|c| assembler.push(c).unwrap()).collect();
        assert_eq!(done.last().unwrap().as_ref().unwrap().write_to_bytes().unwrap(), message.write_to_bytes().unwrap());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn any_raft_batch_is_judged_and_what_passes_steps_safely(bytes in raft_batches()) {
            raft_batch(&bytes);
        }

        #[test]
        fn any_raft_batch_bytes_are_judged(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            raft_batch(&bytes);
        }

        #[test]
        fn any_snapshot_stream_is_assembled_or_refused(bytes in snapshot_streams()) {
            snapshot_chunks(&bytes);
        }

        #[test]
        fn any_snapshot_chunk_bytes_are_assembled_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            snapshot_chunks(&bytes);
        }

        #[test]
        fn any_proposal_is_judged(
            node in 0u64..5,
            which in 0usize..18,
            flips in proptest::collection::vec(any::<(u8, u8)>(), 0..2),
        ) {
            let kind = crate::trust::tests_support::every_command(node)[which].clone();
            let mut command = codec::encode_command(&Command { at_unix_ms: 1, kind });
            for (at, bit) in flips {
                if !command.is_empty() {
                    let i = usize::from(at) % command.len();
                    command[i] ^= 1 << (bit % 8);
                }
            }
            propose_request(&pb::ProposeRequest { cluster_id: 7, command }.encode_to_vec());
        }

        #[test]
        fn any_proposal_bytes_are_judged(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            propose_request(&bytes);
        }

        #[test]
        fn any_config_text_is_accepted_or_refused(text in ".{0,200}") {
            config_text(&text);
            config_text(&format!("node_name = {text:?}\nlisten = \"127.0.0.1:7000\"\n"));
        }

        #[test]
        fn any_vm_create_bytes_agree_with_apply(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            vm_create_request(&bytes);
        }

        #[test]
        fn edge_and_apply_agree_on_create_requests(
            name in prop_oneof!["[a-z0-9][a-z0-9-]{0,70}", ".{0,80}"],
            vcpu in 0u32..2000,
            memory_mib in prop_oneof![0u64..100, Just(u64::MAX), 0u64..(1 << 26)],
            labels in proptest::collection::btree_map(".{0,70}", ".{0,300}", 0..40),
        ) {
            let request = pb::VmCreateRequest { name, vcpu, memory_mib, labels: labels.into_iter().collect(), ..Default::default() };
            vm_create_request(&request.encode_to_vec());
        }

        #[test]
        fn applying_decoded_commands_keeps_the_invariants(bytes in command_frames()) {
            commands(&bytes);
        }

        #[test]
        fn applying_random_bytes_keeps_the_invariants(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            commands(&bytes);
        }
    }
}
