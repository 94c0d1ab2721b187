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
