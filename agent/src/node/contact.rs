//! Quorum contact confirmed by the leader, riding the heartbeats.
//!
//! Every host needs quorum contact every few hundred milliseconds for its
//! fence (see `failure`): the send time `s` of a request that the leader
//! received after `s` and answered from a read index, that is after a
//! quorum acknowledged one of its heartbeat rounds sent after receiving it.
//!
//! A follower could ask with a read-index request of its own, as any read
//! does. At rest that costs each follower a frame to the leader and one
//! back every check interval, on top of the heartbeats. Instead every peer
//! frame carries its send time on the sender's boot-wide monotonic clock,
//! and the leader asks for one read index at each heartbeat round, on
//! behalf of every member:
//!
//! 1. it notes the newest send time heard from each peer
//!    ([`ContactRounds::heard`]);
//! 2. at each heartbeat tick it asks for a read index, recording those send
//!    times as of that moment ([`ContactRounds::ask`]); its heartbeat round
//!    carries the read's context;
//! 3. once that read index completes (a quorum answered a round sent after
//!    the ask), each recorded send time is quorum contact for its sender,
//!    exactly as if the sender had asked itself: the leader received the
//!    frame after it was sent, and the quorum's answer came after that
//!    ([`ContactRounds::resolved`]). The leader's own contact is the time it
//!    asked.
//! 4. The confirmation rides the leader's next frame to that peer, normally
//!    the next heartbeat.
//!
//! So a confirmation reaches a follower about two heartbeat intervals after
//! the send time it confirms, with no frame of its own. `failure::Timing`
//! counts that lag; a host whose contact grows older than that anyway (no
//! leader, or one that does not confirm, during an upgrade) falls back to a
//! read index of its own.

use std::collections::BTreeMap;

use crate::state::NodeId;

/// Quorum contact: `sent_at_ms` on this host's boot-wide monotonic clock,
/// and the leader's commit index at the read that confirmed it (the host
/// may start guests again only once it has applied that far).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Contact {
    pub sent_at_ms: u64,
    pub commit: u64,
}

impl Contact {
    /// The newer of two contacts (each field the greater: both only grow).
    pub fn max(self, other: Contact) -> Contact {
        Contact { sent_at_ms: self.sent_at_ms.max(other.sent_at_ms), commit: self.commit.max(other.commit) }
    }
}

/// The context of a leader's rounds read: a marker byte and the round
/// number. Reads of the node use 8-byte contexts, so the two never meet.
const ROUND_MARKER: u8 = b'v';

pub fn round_context(round: u64) -> Vec<u8> {
    let mut ctx = Vec::with_capacity(9);
    ctx.push(ROUND_MARKER);
    ctx.extend_from_slice(&round.to_le_bytes());
    ctx
}

/// The round number of a rounds read's context, `None` for other reads.
pub fn round_of(ctx: &[u8]) -> Option<u64> {
    match ctx {
        [ROUND_MARKER, rest @ ..] => <[u8; 8]>::try_from(rest).ok().map(u64::from_le_bytes),
        _ => None,
    }
}

/// Rounds asked but not answered are forgotten beyond this many (a leader
/// without a quorum asks every heartbeat and hears nothing back).
const ROUNDS_MAX: usize = 64;

struct Round {
    asked_at_ms: u64,
    heard: Vec<(NodeId, u64)>,
}

/// The leader's side of rounds.
#[derive(Default)]
pub struct ContactRounds {
    /// The newest send time heard from each peer (its clock).
    heard: BTreeMap<NodeId, u64>,
    rounds: BTreeMap<u64, Round>,
    next_round: u64,
    /// The newest send time confirmed to each peer.
    confirmed: BTreeMap<NodeId, u64>,
}

impl ContactRounds {
    /// A frame from `peer`, sent at `sent_at_ms` on its clock.
    pub fn heard(&mut self, peer: NodeId, sent_at_ms: u64) {
        let newest = self.heard.entry(peer).or_default();
        *newest = (*newest).max(sent_at_ms);
    }

    /// Starts a round at `now_ms` (this host's clock): returns the context
    /// to ask a read index with.
    pub fn ask(&mut self, now_ms: u64) -> Vec<u8> {
        self.next_round += 1;
        let heard = self.heard.iter().map(|(peer, at)| (*peer, *at)).collect();
        self.rounds.insert(self.next_round, Round { asked_at_ms: now_ms, heard });
        while self.rounds.len() > ROUNDS_MAX {
            self.rounds.pop_first();
        }
        round_context(self.next_round)
    }

    /// The read index of `round` completed at `commit`: this host's own
    /// contact, and the confirmations to send (each peer's newest not yet sent).
    /// `None` for a round that was forgotten.
    pub fn resolved(&mut self, round: u64, commit: u64) -> Option<(Contact, Vec<(NodeId, Contact)>)> {
        let done = self.rounds.remove(&round)?;
        // raft-rs answers reads in order: the older rounds were answered too.
        let older: Vec<u64> = self.rounds.range(..round).map(|(r, _)| *r).collect();
        for r in older {
            self.rounds.remove(&r);
        }
        let mut confirmations = Vec::new();
        for (peer, sent_at_ms) in done.heard {
            let last = self.confirmed.entry(peer).or_default();
            if sent_at_ms > *last {
                *last = sent_at_ms;
                confirmations.push((peer, Contact { sent_at_ms, commit }));
            }
        }
        Some((Contact { sent_at_ms: done.asked_at_ms, commit }, confirmations))
    }

    /// Leadership ended: raft-rs dropped the pending reads.
    pub fn lost_leadership(&mut self) {
        self.rounds.clear();
    }

    /// A peer left the cluster.
    pub fn forget(&mut self, peer: NodeId) {
        self.heard.remove(&peer);
        self.confirmed.remove(&peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_confirms_what_was_heard_before_it_was_asked_and_only_that() {
        let mut v = ContactRounds::default();
        v.heard(2, 100);
        v.heard(3, 90);
        let ctx = v.ask(1_000);
        let round = round_of(&ctx).unwrap();
        // Heard after the ask: the round proves nothing about it.
        v.heard(2, 150);
        let (own, confirmed) = v.resolved(round, 7).unwrap();
        assert_eq!(own, Contact { sent_at_ms: 1_000, commit: 7 });
        assert_eq!(
            confirmed,
            vec![(2, Contact { sent_at_ms: 100, commit: 7 }), (3, Contact { sent_at_ms: 90, commit: 7 })]
        );
        // The next round carries 150 for peer 2, and nothing new for 3.
        let round = round_of(&v.ask(1_150)).unwrap();
        let (_, confirmed) = v.resolved(round, 8).unwrap();
        assert_eq!(confirmed, vec![(2, Contact { sent_at_ms: 150, commit: 8 })]);
    }

    #[test]
    fn send_times_only_grow_and_a_later_answer_settles_earlier_rounds() {
        let mut v = ContactRounds::default();
        v.heard(2, 100);
        v.heard(2, 80); // reordered frames: the newest counts
        let first = round_of(&v.ask(1_000)).unwrap();
        let second = round_of(&v.ask(1_150)).unwrap();
        let (own, confirmed) = v.resolved(second, 9).unwrap();
        assert_eq!(own.sent_at_ms, 1_150);
        assert_eq!(confirmed, vec![(2, Contact { sent_at_ms: 100, commit: 9 })]);
        assert!(v.resolved(first, 9).is_none(), "settled with the later round");
    }

    #[test]
    fn a_deposed_leader_forgets_its_rounds_and_unanswered_rounds_are_bounded() {
        let mut v = ContactRounds::default();
        v.heard(2, 100);
        let round = round_of(&v.ask(1_000)).unwrap();
        v.lost_leadership();
        assert!(v.resolved(round, 5).is_none());
        for i in 0..(ROUNDS_MAX as u64 + 10) {
            v.ask(2_000 + i);
        }
        assert_eq!(v.rounds.len(), ROUNDS_MAX);
    }

    #[test]
    fn round_contexts_are_told_apart_from_plain_reads() {
        assert_eq!(round_of(&round_context(42)), Some(42));
        assert_eq!(round_of(&42u64.to_le_bytes()), None);
        assert_eq!(round_of(b"v"), None);
    }
}
