//! The last quorum contact, kept across agent restarts.
//!
//! Guests of the systemd runtime outlive the agent. A restarted agent must
//! know whether its host kept quorum contact while it was gone: if it did
//! not for `fence_after`, the leader may already have moved its VMs, and
//! they must stop at once. The file holds the contact time on the boot-wide
//! monotonic clock together with the boot id: after a reboot the clock
//! starts again and the record means nothing (and nothing runs anyway).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Where the contact time lives (normally `<data_dir>/fence-contact`).
///
/// Written several times a second, so it is opened once and rewritten in
/// place with one `pwrite` of a fixed-width record: a killed agent leaves
/// either the old record or the new one (a torn record needs a kernel
/// crash, after which the boot id no longer matches anyway).
#[derive(Debug, Clone)]
pub struct ContactFile {
    path: PathBuf,
    boot: Option<String>,
    open: Arc<Mutex<Option<File>>>,
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_string())
}

impl ContactFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ContactFile { path: path.into(), boot: boot_id(), open: Arc::new(Mutex::new(None)) }
    }

    /// The recorded contact time, if it is from this boot.
    pub fn load(&self) -> Option<u64> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        let (boot, ms) = text.trim().split_once(' ')?;
        (Some(boot) == self.boot.as_deref()).then(|| ms.parse().ok()).flatten()
    }

    /// Records a contact time. Failing to record only means a restarted
    /// agent fences at once, which is safe; so it is logged, not fatal.
    pub fn store(&self, monotonic_ms: u64) {
        let Some(boot) = &self.boot else { return };
        // Fixed width (u64::MAX has 20 digits): each record covers the last.
        let record = format!("{boot} {monotonic_ms:020}\n");
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let result = match open.as_ref() {
            Some(file) => file.write_all_at(record.as_bytes(), 0),
            None => OpenOptions::new().write(true).create(true).truncate(true).open(&self.path).and_then(|file| {
                file.write_all_at(record.as_bytes(), 0)?;
                *open = Some(file);
                Ok(())
            }),
        };
        if let Err(e) = result {
            *open = None;
            tracing::warn!(path = %self.path.display(), error = %e, "cannot record the quorum contact time");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_within_a_boot_and_ignores_other_boots() {
        let dir = tempfile::tempdir().unwrap();
        let file = ContactFile::new(dir.path().join("fence-contact"));
        assert_eq!(file.load(), None);
        file.store(1234);
        assert_eq!(file.load(), Some(1234));
        // Rewritten in place, a shorter number included.
        file.store(u64::MAX);
        file.store(99);
        assert_eq!(file.load(), Some(99));
        assert_eq!(ContactFile::new(dir.path().join("fence-contact")).load(), Some(99));
        std::fs::write(dir.path().join("fence-contact"), "another-boot 99\n").unwrap();
        assert_eq!(file.load(), None);
    }
}
