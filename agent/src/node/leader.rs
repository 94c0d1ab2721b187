//! Work only the leader does on its own initiative. (Placement and failure
//! handling live in `scheduler` and `failure`; this is the membership part.)

use crate::consensus::Core;
use crate::state::MembershipChange;

#[derive(Debug, Default)]
pub struct Duties {
    /// Ticks since this node became leader; promotions wait a little so
    /// that progress reflects real replication, not the optimistic start.
    ticks_as_leader: u64,
}

/// Ticks a new leader waits before promoting anyone.
const PROMOTION_GRACE_TICKS: u64 = 5;

impl Duties {
    pub fn became_leader(&mut self) {
        self.ticks_as_leader = 0;
    }

    /// A learner that has caught up (it holds everything committed and was
    /// heard from recently) becomes a voter. One change at a time: raft-rs
    /// refuses a second while one is unapplied.
    pub fn next_membership_change(&mut self, core: &Core) -> Option<MembershipChange> {
        self.ticks_as_leader += 1;
        if self.ticks_as_leader < PROMOTION_GRACE_TICKS {
            return None;
        }
        let status = core.status();
        status
            .progress
            .iter()
            .filter(|p| p.learner && p.recent_active && p.matched >= status.commit)
            .find(|p| core.state().member(p.id).is_some_and(|m| m.learner))
            .map(|p| MembershipChange::Promote { id: p.id })
    }
}
