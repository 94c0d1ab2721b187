//! The last quorum contact, kept across agent restarts.
//!
//! Guests of the systemd runtime outlive the agent. A restarted agent must
//! know whether its host kept quorum contact while it was gone: if it did
//! not for `fence_after`, the leader may already have moved its VMs, and
//! they must stop at once. The file holds the contact time on the boot-wide
//! monotonic clock together with the boot id: after a reboot the clock
//! starts again and the record means nothing (and nothing runs anyway).

use std::path::PathBuf;

/// Where the contact time lives (normally `<data_dir>/fence-contact`).
#[derive(Debug, Clone)]
pub struct ContactFile {
    path: PathBuf,
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_string())
}

impl ContactFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ContactFile { path: path.into() }
    }

    /// The recorded contact time, if it is from this boot.
    pub fn load(&self) -> Option<u64> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        let (boot, ms) = text.trim().split_once(' ')?;
        (Some(boot) == boot_id().as_deref()).then(|| ms.parse().ok()).flatten()
    }

    /// Records a contact time. Failing to record only means a restarted
    /// agent fences at once, which is safe; so it is logged, not fatal.
    pub fn store(&self, monotonic_ms: u64) {
        let Some(boot) = boot_id() else { return };
        let tmp = self.path.with_extension("tmp");
        let result =
            std::fs::write(&tmp, format!("{boot} {monotonic_ms}\n")).and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = result {
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
        std::fs::write(dir.path().join("fence-contact"), "another-boot 99\n").unwrap();
        assert_eq!(file.load(), None);
    }
}
