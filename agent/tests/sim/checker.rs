//! The invariants the simulator checks after every step.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use blixard::consensus::{Core, Role};
use blixard::state::{NodeId, codec};
use protobuf::Message as _;

#[derive(Default)]
pub struct Checker {
    /// term -> the one leader of that term.
    leaders: BTreeMap<u64, NodeId>,
    /// index -> (term, hash of the entry) of every entry any node reported
    /// committed.
    committed: BTreeMap<u64, (u64, u64)>,
    /// applied index -> hash of the state machine at that index.
    states: BTreeMap<u64, u64>,
    /// Per node: the highest committed index already compared, and the
    /// highest applied index whose state was hashed.
    checked_commit: BTreeMap<NodeId, u64>,
    checked_applied: BTreeMap<NodeId, u64>,
    /// Per node: the term in which it was last seen leading (to check a new
    /// leader's log once per term).
    led_in: BTreeMap<NodeId, u64>,
}

fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

impl Checker {
    /// The highest index any node has reported committed.
    pub fn max_committed(&self) -> u64 {
        self.committed.keys().next_back().copied().unwrap_or(0)
    }

    /// Forgets per-node progress, e.g. after the node restarted.
    pub fn node_restarted(&mut self, id: NodeId) {
        self.checked_commit.remove(&id);
        self.checked_applied.remove(&id);
        self.led_in.remove(&id);
    }

    /// Runs every check against one live node.
    pub fn check(&mut self, core: &Core) -> Result<(), String> {
        let id = core.id();
        let store = core.store();
        store.validate().map_err(|e| format!("node {id}: storage: {e}"))?;
        core.state().validate().map_err(|e| format!("node {id}: state: {e}"))?;
        let status = core.status();

        // At most one leader per term.
        if status.role == Role::Leader {
            let leader = *self.leaders.entry(status.term).or_insert(id);
            if leader != id {
                return Err(format!("two leaders in term {}: {leader} and {id}", status.term));
            }
        }

        // A committed entry is never lost or changed: every node's
        // committed entries agree with what anyone ever saw committed.
        let commit = store.commit_index();
        let (snapshot_index, _) = store.snapshot_point();
        let from = self.checked_commit.get(&id).copied().unwrap_or(0).max(snapshot_index) + 1;
        for index in from..=commit {
            let Some(entry) = store.entry(index) else {
                return Err(format!("node {id}: committed entry {index} is missing from its log"));
            };
            let seen = (entry.term, hash_bytes(&entry.write_to_bytes().expect("encodes")));
            match self.committed.get(&index) {
                Some(known) if *known != seen => {
                    return Err(format!(
                        "node {id}: committed entry {index} differs: term {} here, term {} committed before",
                        seen.0, known.0
                    ));
                }
                Some(_) => {}
                None => {
                    self.committed.insert(index, seen);
                }
            }
        }
        self.checked_commit.insert(id, commit.max(self.checked_commit.get(&id).copied().unwrap_or(0)));

        // Leader completeness: a leader's log holds every committed entry
        // after its snapshot point (checked once per term it leads in).
        if status.role == Role::Leader && self.led_in.get(&id) != Some(&status.term) {
            self.led_in.insert(id, status.term);
            for (&index, known) in self.committed.range(snapshot_index + 1..) {
                let Some(entry) = store.entry(index) else {
                    return Err(format!("node {id} leads term {} without committed entry {index}", status.term));
                };
                let seen = (entry.term, hash_bytes(&entry.write_to_bytes().expect("encodes")));
                if seen != *known {
                    return Err(format!("node {id} leads term {} with a different entry {index}", status.term));
                }
            }
        }

        // State machines are identical at equal applied index.
        let applied = store.applied();
        if self.checked_applied.get(&id) != Some(&applied) {
            self.checked_applied.insert(id, applied);
            let hash = hash_bytes(&codec::encode_snapshot(core.state()));
            match self.states.get(&applied) {
                Some(known) if *known != hash => {
                    return Err(format!("node {id}: state at applied index {applied} differs from another node's"));
                }
                Some(_) => {}
                None => {
                    self.states.insert(applied, hash);
                }
            }
        }
        // Raft's configuration and the state's members agree: a conf
        // change reaches both at apply, or neither (voters and learners,
        // which a demotion or promotion moves between).
        if store.is_initialized() {
            let state_voters: Vec<NodeId> =
                core.state().members().values().filter(|m| !m.learner).map(|m| m.id).collect();
            let state_learners: Vec<NodeId> =
                core.state().members().values().filter(|m| m.learner).map(|m| m.id).collect();
            if status.voters != state_voters || status.learners != state_learners {
                return Err(format!(
                    "node {id}: Raft's voters {:?} and learners {:?} differ from the state's {state_voters:?} and {state_learners:?}",
                    status.voters, status.learners
                ));
            }
        }
        if applied > commit {
            return Err(format!("node {id}: applied {applied} is ahead of commit {commit}"));
        }
        Ok(())
    }
}
