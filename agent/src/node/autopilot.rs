//! The voter autopilot: which one membership change, if any, the leader
//! makes next so that the cluster keeps `raft.voters` voters (3, 5 or 7),
//! healthy and spread over failure domains, with every other member a
//! learner (it receives the state, runs VMs and fences like a voter, but
//! does not vote). As Consul's autopilot, and a pure function
//! ([`next_change`]) of what the leader knows, so it is tested on its own.
//!
//! The rules, in order (one change at a time: raft-rs refuses a second
//! conf change while one is unapplied):
//!
//! 1. **Fewer voters than the target** (a young cluster, a voter left):
//!    promote the best caught-up learner.
//! 2. **More voters than the target** (initial members beyond the target,
//!    or the first half of a replacement): demote one voter, never the
//!    leader: a failed one first, else the one whose loss keeps the spread
//!    widest.
//! 3. **As many as the target, one failed** (silent for
//!    `raft.replace_voter_after_ms`): promote the best caught-up learner;
//!    rule 2 then demotes the failed voter. **Promote, then demote**: the
//!    new voter holds every committed entry before the failed one stops
//!    counting, so the set of voters that holds the log never shrinks below
//!    the target, and should the promotion not happen (no learner caught
//!    up, the learner dies) the cluster is left as it was rather than one
//!    voter short. The margin is the same either way: with `n` voters (odd)
//!    and one failed, promote-first has `n + 1` voters of which `n` are
//!    live and needs `(n + 1) / 2 + 1`; demote-first has `n - 1`, all live,
//!    and needs `(n - 1) / 2 + 1`; both tolerate `(n - 3) / 2` more
//!    failures until the second step (for 3 voters: none; for 5: one).
//! 4. **As many as the target, all live**: a rebalance, when promoting a
//!    learner and then demoting a voter would spread the voters over more
//!    zones (or racks): promote it, and rule 2 demotes from a zone that has
//!    two. It only runs when the spread strictly grows, so it never cycles.
//!
//! Every change must leave the voters able to make quorum with the live
//! ones: after it, more than half of the voters have been heard from
//! within `live_within_ms` (the leader always counts). A learner is
//! eligible for promotion only when it is live and holds everything
//! committed. A demoted member stays a member: it keeps its VMs and its
//! fence, and is promoted again when a voter is needed.
//!
//! **Demotions wait for every member** to report that its agent applies
//! them ([`PROTOCOL_DEMOTE`], reported with `SetAddress`): an agent of the
//! release before reads a demotion as a join it refuses and never applies
//! it to its Raft configuration, so its voters would differ from the
//! others' from then on. Until then only rule 1 runs (a promotion any
//! agent applies); rules 2 to 4 end in a demotion and wait.
//!
//! Failure domains are the host labels `zone` and `rack` (a rack is named
//! within its zone). A set of voters spreads wider than another when it
//! covers more zones, then more racks.

use std::collections::{BTreeMap, BTreeSet};

use crate::consensus::PeerProgress;
use crate::state::{Member, MembershipChange, NodeId, PROTOCOL_DEMOTE};

/// The accepted values of `raft.voters`: odd (an even count tolerates no
/// more failures than the odd one below it) and at most 7 (each voter
/// acknowledges every commit).
pub const VOTERS_ACCEPTED: [usize; 3] = [3, 5, 7];
/// The shortest `raft.replace_voter_after_ms`: below it, a voter's restart
/// or a short partition would cost it its vote.
pub const REPLACE_AFTER_MS_MIN: u64 = 1_000;
/// The label keys that name failure domains.
pub const ZONE_LABEL: &str = "zone";
pub const RACK_LABEL: &str = "rack";

/// What the autopilot aims at (`raft.voters`, `raft.replace_voter_after_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Voters {
    /// How many voters the cluster keeps once it has that many members.
    pub target: usize,
    /// A voter silent this long is replaced by a learner.
    pub replace_after_ms: u64,
}

impl Default for Voters {
    /// Five voters tolerate two failures; 10 s of silence is well beyond a
    /// restart of the agent or an election, and far below a host's repair.
    fn default() -> Self {
        Voters { target: 5, replace_after_ms: 10_000 }
    }
}

/// What the leader knows, for [`next_change`].
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub leader: NodeId,
    /// The leader's commit index: a learner holding it is caught up.
    pub commit: u64,
    /// raft-rs's progress of every member, the leader included (which are
    /// voters and learners is Raft's configuration).
    pub progress: &'a [PeerProgress],
    /// The replicated members (labels, drain).
    pub members: &'a BTreeMap<NodeId, Member>,
    /// How long each member has been silent as the leader can vouch for
    /// (`failure::Detector::silent_ms`); a member missing here counts as
    /// silent for ever.
    pub silent_ms: &'a BTreeMap<NodeId, u64>,
    /// Heard from within this long: live.
    pub live_within_ms: u64,
}

/// The next change and why, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub change: MembershipChange,
    pub reason: String,
}

/// Whether every member's agent applies `MembershipChange::Demote`.
pub fn demotions_applied_by_all(members: &BTreeMap<NodeId, Member>) -> bool {
    members.values().all(|m| m.protocol >= PROTOCOL_DEMOTE)
}

/// The one membership change the leader makes next, if any (see the
/// module documentation for the rules).
pub fn next_change(voters: &Voters, view: &View<'_>) -> Option<Choice> {
    let c = Cluster::new(view, voters.replace_after_ms);
    let n = c.voters.len();
    let target = voters.target;
    if n < target {
        let l = c.best_learner(&c.voters)?;
        return c.promote(l, format!("{n} voters, fewer than raft.voters = {target}"));
    }
    // Everything below ends in a demotion (see the module documentation).
    if !demotions_applied_by_all(view.members) {
        return None;
    }
    if n > target {
        let v = c.demotion()?;
        let why = if c.failed(v) {
            format!("silent for {} ms, and {n} voters are more than raft.voters = {target}", c.silent(v))
        } else {
            format!("{n} voters are more than raft.voters = {target}")
        };
        return c.demote(v, why);
    }
    // As many voters as the target: replace a failed one (promote first).
    let failed: BTreeSet<NodeId> = c.voters.iter().copied().filter(|&v| c.failed(v)).collect();
    if let Some(&worst) = failed.iter().max_by_key(|&&v| c.silent(v)) {
        let survivors: BTreeSet<NodeId> = c.voters.difference(&failed).copied().collect();
        let l = c.best_learner(&survivors)?;
        let why = format!(
            "{} has been silent for {} ms (raft.replace_voter_after_ms = {}); it is demoted next",
            c.name(worst),
            c.silent(worst),
            voters.replace_after_ms
        );
        return c.promote(l, why);
    }
    // All voters there: a swap that spreads them over more domains.
    if c.voters.iter().all(|&v| c.live(v)) {
        let now = c.spread(&c.voters);
        let l = c.best_learner(&c.voters)?;
        let mut with = c.voters.clone();
        with.insert(l);
        let best_after = with
            .iter()
            .filter(|&&v| v != view.leader && v != l)
            .map(|&v| {
                let mut after = with.clone();
                after.remove(&v);
                c.spread(&after)
            })
            .max()?;
        if best_after > now {
            let why = format!(
                "the voters cover {} zones and {} racks, and a swap covers {} and {}; a voter is demoted next",
                now.0, now.1, best_after.0, best_after.1
            );
            return c.promote(l, why);
        }
    }
    None
}

/// The view, digested.
struct Cluster<'a> {
    view: &'a View<'a>,
    replace_after_ms: u64,
    voters: BTreeSet<NodeId>,
    /// Learners (in Raft and in the state) that are live and caught up.
    eligible: BTreeSet<NodeId>,
}

impl<'a> Cluster<'a> {
    fn new(view: &'a View<'a>, replace_after_ms: u64) -> Self {
        let voters: BTreeSet<NodeId> = view.progress.iter().filter(|p| !p.learner).map(|p| p.id).collect();
        let eligible = view
            .progress
            .iter()
            .filter(|p| p.learner && p.matched >= view.commit)
            .filter(|p| view.members.get(&p.id).is_some_and(|m| m.learner))
            .map(|p| p.id)
            .filter(|&id| view.silent_ms.get(&id).is_some_and(|&s| s <= view.live_within_ms))
            .collect();
        Cluster { view, replace_after_ms, voters, eligible }
    }

    fn silent(&self, id: NodeId) -> u64 {
        if id == self.view.leader { 0 } else { self.view.silent_ms.get(&id).copied().unwrap_or(u64::MAX) }
    }

    fn live(&self, id: NodeId) -> bool {
        self.silent(id) <= self.view.live_within_ms
    }

    /// Silent past `raft.replace_voter_after_ms`: to be replaced.
    fn failed(&self, id: NodeId) -> bool {
        self.silent(id) > self.replace_after_ms
    }

    fn name(&self, id: NodeId) -> String {
        self.view.members.get(&id).map_or_else(|| format!("member {id}"), |m| m.name.clone())
    }

    /// Whether `voters` can make quorum with their live members.
    fn has_quorum(&self, voters: &BTreeSet<NodeId>) -> bool {
        voters.iter().filter(|&&v| self.live(v)).count() > voters.len() / 2
    }

    /// How widely `set` is spread: (zones, racks) covered.
    fn spread(&self, set: &BTreeSet<NodeId>) -> (usize, usize) {
        let mut zones = BTreeSet::new();
        let mut racks = BTreeSet::new();
        for id in set {
            let Some(m) = self.view.members.get(id) else { continue };
            let zone = m.labels.get(ZONE_LABEL);
            if let Some(zone) = zone {
                zones.insert(zone);
            }
            if let Some(rack) = m.labels.get(RACK_LABEL) {
                racks.insert((zone, rack));
            }
        }
        (zones.len(), racks.len())
    }

    /// The eligible learner whose vote, added to `base`, spreads the voters
    /// widest; then one not draining, then the lowest id.
    fn best_learner(&self, base: &BTreeSet<NodeId>) -> Option<NodeId> {
        self.eligible.iter().copied().max_by_key(|&l| {
            let mut with = base.clone();
            with.insert(l);
            let draining = self.view.members.get(&l).is_some_and(|m| m.drain);
            (self.spread(&with), !draining, std::cmp::Reverse(l))
        })
    }

    /// The voter to demote, never the leader, among those whose demotion
    /// leaves a live quorum: a failed one (the longest silent) first, then
    /// one not live, then the one whose loss leaves the voters spread
    /// widest, then one draining, then the highest id.
    fn demotion(&self) -> Option<NodeId> {
        let after = |v: NodeId| {
            let mut after = self.voters.clone();
            after.remove(&v);
            after
        };
        self.voters.iter().copied().filter(|&v| v != self.view.leader && self.has_quorum(&after(v))).max_by_key(|&v| {
            let failed = self.failed(v).then(|| self.silent(v));
            let draining = self.view.members.get(&v).is_some_and(|m| m.drain);
            (failed, !self.live(v), self.spread(&after(v)), draining, v)
        })
    }

    fn demote(&self, v: NodeId, why: String) -> Option<Choice> {
        Some(Choice {
            change: MembershipChange::Demote { id: v },
            reason: format!("demoting {} to learner: {why}", self.name(v)),
        })
    }

    fn promote(&self, l: NodeId, why: String) -> Option<Choice> {
        let mut after = self.voters.clone();
        after.insert(l);
        self.has_quorum(&after).then(|| Choice {
            change: MembershipChange::Promote { id: l },
            reason: format!("promoting {} to voter: {why}", self.name(l)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cluster of `voters` and `learners` (ids), leader 1, all caught up
    /// and live unless changed.
    struct Fixture {
        progress: Vec<PeerProgress>,
        members: BTreeMap<NodeId, Member>,
        silent_ms: BTreeMap<NodeId, u64>,
        commit: u64,
    }

    impl Fixture {
        fn new(voters: &[NodeId], learners: &[NodeId]) -> Self {
            let mut f = Fixture { progress: vec![], members: BTreeMap::new(), silent_ms: BTreeMap::new(), commit: 100 };
            for (&id, learner) in voters.iter().map(|v| (v, false)).chain(learners.iter().map(|l| (l, true))) {
                f.progress.push(PeerProgress { id, matched: 100, learner, recent_active: true });
                let mut m = Member::new(id, format!("h{id}"), format!("10.0.0.{id}:7000"));
                m.learner = learner;
                m.protocol = crate::state::PROTOCOL;
                f.members.insert(id, m);
                f.silent_ms.insert(id, 0);
            }
            f
        }

        fn label(mut self, id: NodeId, zone: &str, rack: Option<&str>) -> Self {
            let m = self.members.get_mut(&id).unwrap();
            m.labels.insert(ZONE_LABEL.into(), zone.into());
            if let Some(rack) = rack {
                m.labels.insert(RACK_LABEL.into(), rack.into());
            }
            self
        }

        fn silent(mut self, id: NodeId, ms: u64) -> Self {
            self.silent_ms.insert(id, ms);
            self
        }

        fn behind(mut self, id: NodeId) -> Self {
            self.progress.iter_mut().find(|p| p.id == id).unwrap().matched = self.commit - 1;
            self
        }

        fn next(&self, target: usize) -> Option<MembershipChange> {
            let view = View {
                leader: 1,
                commit: self.commit,
                progress: &self.progress,
                members: &self.members,
                silent_ms: &self.silent_ms,
                live_within_ms: 1000,
            };
            next_change(&Voters { target, replace_after_ms: 10_000 }, &view).map(|c| c.change)
        }
    }

    use MembershipChange::{Demote, Promote};

    /// Applies `change` to the fixture (Raft's view and the state's).
    fn apply(f: &mut Fixture, change: &MembershipChange) {
        let (id, learner) = match *change {
            Promote { id } => (id, false),
            Demote { id } => (id, true),
            _ => unreachable!(),
        };
        f.progress.iter_mut().find(|p| p.id == id).unwrap().learner = learner;
        f.members.get_mut(&id).unwrap().learner = learner;
    }

    fn voters_of(f: &Fixture) -> Vec<NodeId> {
        f.progress.iter().filter(|p| !p.learner).map(|p| p.id).collect()
    }

    /// Runs the autopilot to a fixed point (at most `steps` changes).
    fn settle(f: &mut Fixture, target: usize, steps: usize) -> Vec<MembershipChange> {
        let mut changes = Vec::new();
        while let Some(change) = f.next(target) {
            assert!(changes.len() < steps, "no fixed point after {changes:?}");
            apply(f, &change);
            changes.push(change);
        }
        changes
    }

    #[test]
    fn promotes_only_while_below_the_target() {
        assert_eq!(Fixture::new(&[1], &[2, 3]).next(3), Some(Promote { id: 2 }));
        assert_eq!(Fixture::new(&[1, 2], &[3, 4]).next(3), Some(Promote { id: 3 }));
        assert_eq!(Fixture::new(&[1, 2, 3], &[4, 5]).next(3), None);
        assert_eq!(Fixture::new(&[1, 2, 3], &[4, 5]).next(5), Some(Promote { id: 4 }));
        assert_eq!(Fixture::new(&[1, 2, 3, 4, 5], &[6, 7, 8]).next(5), None);
    }

    #[test]
    fn promotes_only_caught_up_live_learners() {
        assert_eq!(Fixture::new(&[1], &[2, 3]).behind(2).next(3), Some(Promote { id: 3 }));
        assert_eq!(Fixture::new(&[1], &[2, 3]).silent(2, 5000).next(3), Some(Promote { id: 3 }));
        assert_eq!(Fixture::new(&[1], &[2]).behind(2).next(3), None);
        // Known to Raft as a learner but not (yet) to the state: not a candidate.
        let mut f = Fixture::new(&[1], &[2]);
        f.members.remove(&2);
        assert_eq!(f.next(3), None);
    }

    #[test]
    fn promotion_spreads_over_zones_then_racks() {
        let f = Fixture::new(&[1], &[2, 3, 4])
            .label(1, "a", Some("r1"))
            .label(2, "a", Some("r2"))
            .label(3, "a", Some("r1"))
            .label(4, "b", Some("r1"));
        assert_eq!(f.next(3), Some(Promote { id: 4 }));
        let f = Fixture::new(&[1, 4], &[2, 3])
            .label(1, "a", Some("r1"))
            .label(2, "a", Some("r2"))
            .label(3, "a", Some("r1"))
            .label(4, "b", Some("r1"));
        assert_eq!(f.next(3), Some(Promote { id: 2 }));
    }

    #[test]
    fn demotes_extra_voters_never_the_leader() {
        let mut f = Fixture::new(&[1, 2, 3, 4, 5, 6, 7], &[]);
        assert_eq!(settle(&mut f, 3, 10), vec![Demote { id: 7 }, Demote { id: 6 }, Demote { id: 5 }, Demote { id: 4 }]);
        assert_eq!(voters_of(&f), vec![1, 2, 3]);
        // The leader is never the one demoted, even when it is the worst placed.
        let mut f = Fixture::new(&[1, 2, 3, 4], &[])
            .label(1, "a", None)
            .label(2, "a", None)
            .label(3, "b", None)
            .label(4, "c", None);
        assert_eq!(f.next(3), Some(Demote { id: 2 }));
        apply(&mut f, &Demote { id: 2 });
        assert_eq!(f.next(3), None);
    }

    #[test]
    fn a_failed_voter_is_replaced_promote_first() {
        let mut f = Fixture::new(&[1, 2, 3], &[4, 5]).silent(3, 20_000);
        assert_eq!(f.next(3), Some(Promote { id: 4 }));
        apply(&mut f, &Promote { id: 4 });
        assert_eq!(f.next(3), Some(Demote { id: 3 }));
        apply(&mut f, &Demote { id: 3 });
        assert_eq!(f.next(3), None);
        assert_eq!(voters_of(&f), vec![1, 2, 4]);
        // The demoted member comes back: it stays a learner while the
        // voters are complete, and is promoted again when one is needed.
        f.silent_ms.insert(3, 0);
        assert_eq!(f.next(3), None);
        f.silent_ms.insert(2, 20_000);
        assert_eq!(settle(&mut f, 3, 2), vec![Promote { id: 3 }, Demote { id: 2 }]);
    }

    #[test]
    fn a_voter_silent_for_less_than_the_threshold_keeps_its_vote() {
        let f = Fixture::new(&[1, 2, 3], &[4]).silent(3, 9_000);
        assert_eq!(f.next(3), None);
        // No caught-up learner: the failed voter stays (demoting it alone
        // would leave the cluster one voter short, no safer).
        let f = Fixture::new(&[1, 2, 3], &[4]).silent(3, 20_000).behind(4);
        assert_eq!(f.next(3), None);
    }

    #[test]
    fn no_change_leaves_the_voters_without_a_live_quorum() {
        // 3 voters, 1 failed, and the only learner not live: nothing.
        let f = Fixture::new(&[1, 2, 3], &[4]).silent(3, 20_000).silent(4, 5_000);
        assert_eq!(f.next(3), None);
        // 5 voters, 2 failed: promote (6 voters, 4 live: a quorum of 4),
        // demote a failed one (5, 4 live), and again.
        let mut f = Fixture::new(&[1, 2, 3, 4, 5], &[6, 7]).silent(4, 20_000).silent(5, 30_000);
        assert_eq!(
            settle(&mut f, 5, 4),
            vec![Promote { id: 6 }, Demote { id: 5 }, Promote { id: 7 }, Demote { id: 4 }]
        );
        // Too many voters, two of them not live: a silent one goes first,
        // although demoting a live one (2) would spread the rest wider,
        // because that would leave 2 live of 4.
        let f = Fixture::new(&[1, 2, 3, 4, 5], &[])
            .label(1, "a", None)
            .label(2, "a", None)
            .label(3, "b", None)
            .label(4, "c", None)
            .label(5, "d", None)
            .silent(4, 5_000)
            .silent(5, 5_000);
        assert_eq!(f.next(3), Some(Demote { id: 5 }));
        // A promotion that cannot restore a live quorum is not made either.
        let f = Fixture::new(&[1, 2, 3, 4], &[5]).silent(2, 5_000).silent(3, 5_000).silent(4, 5_000);
        assert_eq!(f.next(5), None);
    }

    #[test]
    fn replacement_keeps_the_voters_in_distinct_zones() {
        // Voters in a, b, c; the one in c fails; learners in a and c: the
        // one in c takes its place.
        let mut f = Fixture::new(&[1, 2, 3], &[4, 5])
            .label(1, "a", None)
            .label(2, "b", None)
            .label(3, "c", None)
            .label(4, "a", None)
            .label(5, "c", None)
            .silent(3, 20_000);
        assert_eq!(settle(&mut f, 3, 2), vec![Promote { id: 5 }, Demote { id: 3 }]);
    }

    #[test]
    fn rebalance_swaps_a_voter_into_an_unrepresented_zone() {
        // Voters 1, 2 in zone a and 3 in b; a healthy learner in c.
        let mut f = Fixture::new(&[1, 2, 3], &[4, 5])
            .label(1, "a", None)
            .label(2, "a", None)
            .label(3, "b", None)
            .label(4, "b", None)
            .label(5, "c", None);
        assert_eq!(settle(&mut f, 3, 2), vec![Promote { id: 5 }, Demote { id: 2 }]);
        // Racks within one zone count the same way.
        let mut f = Fixture::new(&[1, 2, 3], &[4])
            .label(1, "a", Some("r1"))
            .label(2, "a", Some("r1"))
            .label(3, "a", Some("r2"))
            .label(4, "a", Some("r3"));
        assert_eq!(settle(&mut f, 3, 2), vec![Promote { id: 4 }, Demote { id: 2 }]);
        // Nothing to gain: no swap.
        let mut f = Fixture::new(&[1, 2, 3], &[4])
            .label(1, "a", None)
            .label(2, "b", None)
            .label(3, "c", None)
            .label(4, "a", None);
        assert_eq!(settle(&mut f, 3, 0), vec![]);
        // No swap while a voter is not live.
        let f =
            Fixture::new(&[1, 2, 3], &[4]).label(1, "a", None).label(2, "a", None).label(4, "b", None).silent(3, 2_000);
        assert_eq!(f.next(3), None);
    }

    #[test]
    fn a_join_and_a_leave_keep_the_count() {
        // Five hosts join a one-host cluster one by one (each as a
        // learner, promoted while the voters are short).
        let mut f = Fixture::new(&[1], &[]);
        for id in 2..=7 {
            let mut m = Member::new(id, format!("h{id}"), format!("10.0.0.{id}:7000"));
            m.learner = true;
            m.protocol = crate::state::PROTOCOL;
            f.members.insert(id, m);
            f.progress.push(PeerProgress { id, matched: 100, learner: true, recent_active: true });
            f.silent_ms.insert(id, 0);
            settle(&mut f, 5, 1);
        }
        assert_eq!(voters_of(&f), vec![1, 2, 3, 4, 5]);
        // A voter leaves (removed): a learner takes its vote.
        f.progress.retain(|p| p.id != 3);
        f.members.remove(&3);
        assert_eq!(settle(&mut f, 5, 1), vec![Promote { id: 6 }]);
    }

    #[test]
    fn demotions_wait_until_every_member_applies_them() {
        // Five initial voters with raft.voters = 3, one of them an agent of
        // the release before (protocol 0): no demotion, though one is due.
        let mut f = Fixture::new(&[1, 2, 3, 4, 5], &[]);
        f.members.get_mut(&4).unwrap().protocol = 0;
        assert_eq!(f.next(3), None);
        // Nor a replacement (it would end in a demotion), nor a swap; a
        // promotion while short still happens (every agent applies it).
        let mut f = Fixture::new(&[1, 2, 3], &[4]).silent(3, 60_000);
        f.members.get_mut(&4).unwrap().protocol = 0;
        assert_eq!(f.next(3), None);
        let mut short = Fixture::new(&[1, 2], &[4]);
        short.members.get_mut(&4).unwrap().protocol = 0;
        assert_eq!(short.next(3), Some(Promote { id: 4 }));
        // Once it reports the protocol (upgraded), the replacement goes on.
        f.members.get_mut(&4).unwrap().protocol = PROTOCOL_DEMOTE;
        assert_eq!(f.next(3), Some(Promote { id: 4 }));
    }
}
