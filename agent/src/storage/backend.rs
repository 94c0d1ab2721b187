//! A redb storage backend that models a disk with a volatile write cache,
//! for the simulator and the storage tests.
//!
//! Writes land in the cache; `sync_data` makes everything written so far
//! durable. A crash ([`CrashDisk::crash`]) keeps the durable image plus an
//! arbitrary subset of the writes made since the last sync, which is all a
//! real disk promises. A sync can be made to fail ([`CrashDisk::fail_sync_in`]),
//! which is how the simulator crashes a node in the middle of a Raft
//! `Ready`: the node has already sent the messages that may go out before
//! persisting, and must not have sent the ones that may not.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

/// The shared disk; clones refer to the same disk.
#[derive(Debug, Clone, Default)]
pub struct CrashDisk(Arc<Mutex<Disk>>);

#[derive(Debug, Default)]
struct Disk {
    /// What reads see.
    current: Vec<u8>,
    /// Writes and length changes since the last sync, in order, each with
    /// what it overwrote, so a crash can undo them (copying the whole image
    /// at every sync would make the simulator crawl).
    unsynced: Vec<Op>,
    /// Fail the sync after this many more successful ones.
    fail_sync_in: Option<u64>,
    /// Set after a failed sync or a crash: every operation fails until
    /// [`CrashDisk::crash`] recovers the disk for a new process.
    dead: bool,
    syncs: u64,
}

#[derive(Debug, Clone)]
struct Op {
    /// The length before the operation.
    old_len: usize,
    kind: OpKind,
}

#[derive(Debug, Clone)]
enum OpKind {
    /// Wrote `data` at `offset`; `old` is what was there (within `old_len`).
    Write { offset: usize, data: Vec<u8>, old: Vec<u8> },
    /// Set the length; `cut` is what a shrink removed.
    SetLen { len: usize, cut: Vec<u8> },
}

fn dead() -> io::Error {
    io::Error::other("simulated crash: the disk is gone for this process")
}

impl CrashDisk {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A backend for a (new) database over this disk.
    pub fn backend(&self) -> CrashBackend {
        CrashBackend(self.clone())
    }

    /// Makes the sync after `n` more successful ones fail, killing the
    /// process's view of the disk.
    pub fn fail_sync_in(&self, n: u64) {
        self.lock().fail_sync_in = Some(n);
    }

    /// Cancels a pending [`CrashDisk::fail_sync_in`].
    pub fn clear_faults(&self) {
        self.lock().fail_sync_in = None;
    }

    /// Whether the disk failed (a sync failed or the process crashed).
    pub fn is_dead(&self) -> bool {
        self.lock().dead
    }

    /// How many syncs succeeded so far.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// The process using the disk dies. `keep(i)` decides whether the i-th
    /// unsynced write reached the platter anyway. Afterwards the disk holds
    /// the durable image plus the kept writes, and is usable again.
    pub fn crash(&self, mut keep: impl FnMut(usize) -> bool) {
        let mut disk = self.lock();
        let ops = std::mem::take(&mut disk.unsynced);
        // Back to the durable image: undo every unsynced operation, newest
        // first...
        for op in ops.iter().rev() {
            match &op.kind {
                OpKind::Write { offset, old, .. } => {
                    if !old.is_empty() {
                        disk.current[*offset..offset + old.len()].copy_from_slice(old);
                    }
                }
                OpKind::SetLen { cut, .. } => {
                    let len = disk.current.len();
                    disk.current.extend_from_slice(cut);
                    debug_assert_eq!(len + cut.len(), op.old_len.max(len));
                }
            }
            disk.current.resize(op.old_len, 0);
        }
        // ...then redo the ones that happened to reach the platter.
        for (i, op) in ops.into_iter().enumerate() {
            if keep(i) {
                apply(&mut disk.current, &op.kind);
            }
        }
        disk.dead = false;
        disk.fail_sync_in = None;
    }

    /// Kills the disk for the current process without recovering it; the
    /// process's later writes fail. Call [`CrashDisk::crash`] to recover.
    pub fn kill(&self) {
        self.lock().dead = true;
    }
}

/// The redb backend over a [`CrashDisk`].
#[derive(Debug)]
pub struct CrashBackend(CrashDisk);

impl redb::StorageBackend for CrashBackend {
    fn len(&self) -> Result<u64, io::Error> {
        let disk = self.0.lock();
        if disk.dead {
            return Err(dead());
        }
        Ok(disk.current.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let disk = self.0.lock();
        if disk.dead {
            return Err(dead());
        }
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let end = start + out.len();
        if end > disk.current.len() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"));
        }
        out.copy_from_slice(&disk.current[start..end]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut disk = self.0.lock();
        if disk.dead {
            return Err(dead());
        }
        let len = usize::try_from(len).map_err(io::Error::other)?;
        let old_len = disk.current.len();
        let cut = disk.current.get(len..).map(<[u8]>::to_vec).unwrap_or_default();
        let kind = OpKind::SetLen { len, cut };
        apply(&mut disk.current, &kind);
        disk.unsynced.push(Op { old_len, kind });
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let mut disk = self.0.lock();
        if disk.dead {
            return Err(dead());
        }
        if let Some(n) = disk.fail_sync_in {
            if n == 0 {
                disk.dead = true;
                return Err(dead());
            }
            disk.fail_sync_in = Some(n - 1);
        }
        disk.unsynced.clear();
        disk.syncs += 1;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut disk = self.0.lock();
        if disk.dead {
            return Err(dead());
        }
        let offset = usize::try_from(offset).map_err(io::Error::other)?;
        let old_len = disk.current.len();
        let old = disk.current[offset.min(old_len)..(offset + data.len()).min(old_len)].to_vec();
        let kind = OpKind::Write { offset, data: data.to_vec(), old };
        apply(&mut disk.current, &kind);
        disk.unsynced.push(Op { old_len, kind });
        Ok(())
    }
}

fn apply(image: &mut Vec<u8>, op: &OpKind) {
    match op {
        OpKind::Write { offset, data, .. } => {
            if image.len() < offset + data.len() {
                image.resize(offset + data.len(), 0);
            }
            image[*offset..offset + data.len()].copy_from_slice(data);
        }
        OpKind::SetLen { len, .. } => image.resize(*len, 0),
    }
}
