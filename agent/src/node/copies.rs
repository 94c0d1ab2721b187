//! The second copy of a heartbeat or of its answer, dropped before the raft
//! thread sees it.
//!
//! With the datagram path, a heartbeat goes twice (on the gRPC stream and
//! as a QUIC datagram) and both copies arrive. Raft answers each copy, and
//! each answer goes twice again: at rest the leader stepped four answers
//! per heartbeat per follower, and every copy woke the raft thread and
//! cost a frame on each path. A copy says nothing the first did not: the
//! same sender, kind, term, commit and context within
//! [`Copies::window`] of it, which is half a heartbeat interval, less than
//! the next genuine heartbeat is apart. Dropping it is a lost message,
//! which Raft tolerates; the first copy (whichever path brought it first)
//! has been stepped already.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use raft::eraftpb::{Message, MessageType};

use crate::state::NodeId;

/// What makes two heartbeats (or two answers) the same message.
struct Seen {
    term: u64,
    commit: u64,
    context: Vec<u8>,
    at: Instant,
}

/// The last heartbeat and heartbeat answer stepped from each peer.
pub(super) struct Copies {
    window: Duration,
    seen: Mutex<HashMap<(NodeId, bool), Seen>>,
}

impl Copies {
    /// Copies arriving within `window` of the first are dropped.
    pub(super) fn new(window: Duration) -> Copies {
        Copies { window, seen: Mutex::new(HashMap::new()) }
    }

    /// Drops from `messages` (a frame from `from`) each heartbeat or
    /// heartbeat answer that repeats the last one stepped from `from`
    /// within the window; true if any was dropped.
    pub(super) fn drop_copies(&self, from: NodeId, messages: &mut Vec<Message>, now: Instant) -> bool {
        let before = messages.len();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        messages.retain(|m| {
            let answer = match m.get_msg_type() {
                MessageType::MsgHeartbeat => false,
                MessageType::MsgHeartbeatResponse => true,
                _ => return true,
            };
            let this = Seen { term: m.get_term(), commit: m.get_commit(), context: m.get_context().to_vec(), at: now };
            match seen.get(&(from, answer)) {
                Some(last)
                    if last.term == this.term
                        && last.commit == this.commit
                        && last.context == this.context
                        && now.saturating_duration_since(last.at) < self.window =>
                {
                    false
                }
                _ => {
                    seen.insert((from, answer), this);
                    true
                }
            }
        });
        messages.len() < before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heartbeat(kind: MessageType, term: u64, commit: u64, context: &[u8]) -> Message {
        let mut m = Message::default();
        m.set_msg_type(kind);
        m.set_term(term);
        m.set_commit(commit);
        m.set_context(context.to_vec().into());
        m
    }

    #[test]
    fn the_second_copy_within_the_window_is_dropped_and_the_next_heartbeat_is_not() {
        let copies = Copies::new(Duration::from_millis(50));
        let t0 = Instant::now();
        let hb = heartbeat(MessageType::MsgHeartbeat, 3, 9, b"r1");
        let mut first = vec![hb.clone()];
        assert!(!copies.drop_copies(2, &mut first, t0));
        assert_eq!(first.len(), 1);

        // The other path's copy, 10 ms later, beside an append answer.
        let mut append = Message::default();
        append.set_msg_type(MessageType::MsgAppendResponse);
        let mut second = vec![hb.clone(), append];
        assert!(copies.drop_copies(2, &mut second, t0 + Duration::from_millis(10)));
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].get_msg_type(), MessageType::MsgAppendResponse);

        // The same heartbeat from another sender, or an answer: not a copy.
        let mut other = vec![hb.clone(), heartbeat(MessageType::MsgHeartbeatResponse, 3, 9, b"r1")];
        assert!(!copies.drop_copies(3, &mut other, t0 + Duration::from_millis(10)));
        assert_eq!(other.len(), 2);

        // The next round, identical, a heartbeat interval later: stepped.
        let mut next = vec![hb.clone()];
        assert!(!copies.drop_copies(2, &mut next, t0 + Duration::from_millis(100)));
        assert_eq!(next.len(), 1);

        // Anything newer (term, commit, context) is never a copy.
        for changed in [
            heartbeat(MessageType::MsgHeartbeat, 4, 9, b"r1"),
            heartbeat(MessageType::MsgHeartbeat, 4, 10, b"r1"),
            heartbeat(MessageType::MsgHeartbeat, 4, 10, b"r2"),
        ] {
            let mut frame = vec![changed];
            assert!(!copies.drop_copies(2, &mut frame, t0 + Duration::from_millis(101)));
            assert_eq!(frame.len(), 1);
        }
    }
}
