//! Regression tests for bugs found in `storage::Store`, each written out
//! by hand so that it fails without its fix whatever proptest generates.

use blixard::storage::{CrashDisk, Store, WriteBatch};
use raft::eraftpb::{Entry, HardState};

fn entry(index: u64, term: u64) -> Entry {
    Entry { index, term, ..Default::default() }
}

/// A batch may append entries, commit and apply them and compact past them
/// at once; the compaction point's term is the one this batch leaves in the
/// log, on disk as in memory.
#[test]
fn compaction_uses_the_term_the_same_batch_wrote() {
    let disk = CrashDisk::new();
    let mut store = Store::open_backend(disk.backend()).unwrap();
    let mut hs = HardState { term: 1, commit: 1, ..Default::default() };
    let entries = (1..=3).map(|i| entry(i, 1)).collect();
    store.commit(WriteBatch { entries, hard_state: Some(hs.clone()), sync: true, ..Default::default() }).unwrap();

    // A new leader replaces the uncommitted 2..=3 with its own (term 2),
    // which commit at once; this node applies and compacts through 2.
    hs.term = 2;
    hs.commit = 3;
    let entries = (2..=3).map(|i| entry(i, 2)).collect();
    let batch = WriteBatch {
        entries,
        hard_state: Some(hs.clone()),
        applied: Some(2),
        compact_to: Some(2),
        sync: true,
        ..Default::default()
    };
    store.commit(batch).unwrap();
    assert_eq!(store.snapshot_point(), (2, 2));
    drop(store);
    let store = Store::open_backend(disk.backend()).unwrap();
    assert_eq!(store.snapshot_point(), (2, 2), "the compaction point's term on disk");

    // Compacting through an entry that only this batch appends.
    let mut store = Store::open_backend(CrashDisk::new().backend()).unwrap();
    hs.commit = 2;
    let entries = (1..=2).map(|i| entry(i, 2)).collect();
    let batch = WriteBatch {
        entries,
        hard_state: Some(hs),
        applied: Some(2),
        compact_to: Some(2),
        sync: true,
        ..Default::default()
    };
    store.commit(batch).unwrap();
    assert_eq!(store.snapshot_point(), (2, 2));
}

/// A deferred applied state stays in memory until a batch that writes it
/// (or `write_state`): a store reopened before then finds the older applied
/// index and commit (the node re-applies from the log), and compaction
/// always writes the state it needs.
#[test]
fn deferred_state_is_written_together_and_never_ahead_of_the_log() {
    let disk = CrashDisk::new();
    let mut store = Store::open_backend(disk.backend()).unwrap();
    let hs = HardState { term: 1, commit: 2, ..Default::default() };
    let entries = (1..=5).map(|i| entry(i, 1)).collect();
    store
        .commit(WriteBatch { entries, hard_state: Some(hs), applied: Some(2), sync: true, ..Default::default() })
        .unwrap();

    // A light ready's commit and applied index, deferred: nothing written.
    let light = || WriteBatch { commit: Some(4), applied: Some(4), defer_state: true, ..Default::default() };
    store.commit(light()).unwrap();
    assert_eq!((store.applied(), store.commit_index()), (4, 4));
    assert!(store.state_unwritten());
    drop(store);
    let mut store = Store::open_backend(disk.backend()).unwrap();
    assert_eq!((store.applied(), store.hard_state().commit), (2, 2), "the disk holds the older state");

    // Deferred again, through a Ready with entries (the state stays in
    // memory), then written.
    store.commit(light()).unwrap();
    let ready = |index| WriteBatch {
        entries: vec![entry(index, 1)],
        hard_state: Some(HardState { term: 1, commit: 4, ..Default::default() }),
        sync: true,
        defer_state: true,
        ..Default::default()
    };
    store.commit(ready(6)).unwrap();
    assert!(store.state_unwritten());
    store.write_state().unwrap();
    assert!(!store.state_unwritten());
    // Killed: whatever was not synced is gone.
    disk.kill();
    drop(store);
    disk.crash(|_| false);
    let mut store = Store::open_backend(disk.backend()).unwrap();
    assert_eq!((store.applied(), store.hard_state().commit), (4, 4));

    // Compaction writes the deferred state in its own transaction.
    store.commit(WriteBatch { commit: Some(5), applied: Some(5), defer_state: true, ..Default::default() }).unwrap();
    store.commit(WriteBatch { compact_to: Some(3), sync: true, defer_state: true, ..Default::default() }).unwrap();
    assert!(!store.state_unwritten());
    drop(store);
    let store = Store::open_backend(disk.backend()).unwrap();
    assert_eq!((store.applied(), store.hard_state().commit, store.snapshot_point().0), (5, 5, 3));
}
