//! The fence's records on disk: the inputs the agent writes and the guard
//! (and a restarted agent) reads.
//!
//! - `<data_dir>/fence-contact` ([`ContactFile`]): this host's last quorum
//!   contact confirmed by the current leader, on the boot-wide monotonic
//!   clock, with the boot id. Written several times a second by the agent,
//!   in place, with one `pwrite` of a fixed-width record: a killed agent
//!   leaves either the old record or the new one (a torn record needs a
//!   kernel crash, after which the boot id no longer matches anyway).
//! - `<data_dir>/fence-exempt` ([`ExemptFile`]): the guests with
//!   `failover = "manual"`, which no fence stops. Rewritten whole (a new
//!   file renamed over the old) when the set changes, before the agent
//!   starts a guest it names.
//!
//! Reading is strict in the safe direction: anything missing, unreadable,
//! from another boot, revoked, or later than the reader's own clock is *no
//! contact* (a contact in the future can only be forged or corrupt, and
//! trusting it would keep a cut-off host from ever fencing).

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::clock::boot_id;
use crate::names;

/// The contact record's file name under the data dir.
pub const CONTACT_FILE: &str = "fence-contact";
/// The exempt list's file name under the data dir.
pub const EXEMPT_FILE: &str = "fence-exempt";
/// The exempt list's first line; another first line is not ours.
const EXEMPT_HEADER: &str = "blixard fence-exempt v1";
/// Exempt names read at most (the state bounds VMs per host far lower).
const EXEMPT_NAMES_MAX: usize = 100_000;

/// Why a host has no quorum contact that counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoContact {
    /// No record, or one that cannot be read or parsed.
    Missing(String),
    /// A record of an earlier boot (the monotonic clock started again).
    OtherBoot,
    /// The agent revoked its contact: it was removed from the cluster.
    Revoked,
    /// A contact later than this host's clock: forged or corrupt.
    InTheFuture { contact_ms: u64, now_ms: u64 },
}

impl fmt::Display for NoContact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoContact::Missing(why) => write!(f, "no contact recorded ({why})"),
            NoContact::OtherBoot => f.write_str("the recorded contact is from an earlier boot"),
            NoContact::Revoked => f.write_str("the agent revoked its contact (this host left the cluster)"),
            NoContact::InTheFuture { contact_ms, now_ms } => write!(
                f,
                "the recorded contact ({contact_ms} ms) is later than this host's clock ({now_ms} ms): ignored"
            ),
        }
    }
}

/// `<data_dir>/fence-contact`: the agent writes it, the guard and a
/// restarted agent read it. See the module documentation.
#[derive(Debug, Clone)]
pub struct ContactFile {
    path: PathBuf,
    boot: Option<String>,
    open: Arc<Mutex<Option<File>>>,
}

impl ContactFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ContactFile { path: path.into(), boot: boot_id(), open: Arc::new(Mutex::new(None)) }
    }

    /// The record under `data_dir`.
    pub fn in_dir(data_dir: &Path) -> Self {
        Self::new(data_dir.join(CONTACT_FILE))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The recorded contact time, if it counts at `now_ms` on this host's
    /// monotonic clock: from this boot, not revoked, not in the future.
    pub fn read(&self, now_ms: u64) -> Result<u64, NoContact> {
        let text = std::fs::read_to_string(&self.path).map_err(|e| NoContact::Missing(e.to_string()))?;
        parse_contact(&text, self.boot.as_deref(), now_ms)
    }

    /// [`ContactFile::read`], as an option.
    pub fn load(&self, now_ms: u64) -> Option<u64> {
        self.read(now_ms).ok()
    }

    /// Records a contact time. Failing to record only means the guard
    /// fences when the last recorded contact expires, and a restarted agent
    /// fences at once, which is safe; so it is logged, not fatal. Returns
    /// whether the record was written.
    pub fn store(&self, monotonic_ms: u64) -> bool {
        // 0 is the revoked marker; a real contact is never at 0 ms of a boot.
        self.write_record(monotonic_ms.max(1))
    }

    /// Revokes the contact: every reader fences from now on (a removed
    /// member must stop its guests, and must not leave the guard trusting a
    /// contact it no longer has).
    pub fn revoke(&self) -> bool {
        self.write_record(0)
    }

    fn write_record(&self, monotonic_ms: u64) -> bool {
        let Some(boot) = &self.boot else { return true };
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
            return false;
        }
        true
    }
}

/// Parses a contact record `"<boot id> <ms>\n"` for a reader on boot `boot`
/// at `now_ms`.
pub fn parse_contact(text: &str, boot: Option<&str>, now_ms: u64) -> Result<u64, NoContact> {
    let (recorded_boot, ms) =
        text.trim().split_once(' ').ok_or_else(|| NoContact::Missing("the record is malformed".into()))?;
    if Some(recorded_boot) != boot {
        return Err(NoContact::OtherBoot);
    }
    let contact_ms: u64 = ms.parse().map_err(|_| NoContact::Missing("the record is malformed".into()))?;
    match contact_ms {
        0 => Err(NoContact::Revoked),
        c if c > now_ms => Err(NoContact::InTheFuture { contact_ms: c, now_ms }),
        c => Ok(c),
    }
}

/// `<data_dir>/fence-exempt`: the guests no fence stops (`failover =
/// "manual"`). See the module documentation.
#[derive(Debug, Clone)]
pub struct ExemptFile {
    path: PathBuf,
}

impl ExemptFile {
    pub fn in_dir(data_dir: &Path) -> Self {
        ExemptFile { path: data_dir.join(EXEMPT_FILE) }
    }

    /// The exempt guests. A missing, unreadable or foreign file exempts
    /// nothing (every guest is fenced: the safe direction); names that are
    /// not valid VM names are skipped.
    pub fn load(&self) -> BTreeSet<String> {
        let Ok(text) = std::fs::read_to_string(&self.path) else { return BTreeSet::new() };
        let mut lines = text.lines();
        if lines.next() != Some(EXEMPT_HEADER) {
            return BTreeSet::new();
        }
        lines.filter(|name| names::validate(name).is_ok()).take(EXEMPT_NAMES_MAX).map(str::to_string).collect()
    }

    /// Replaces the list: a new file, synced, renamed over the old, so a
    /// reader sees the old list or the new one whole.
    pub fn store(&self, exempt: &BTreeSet<String>) -> std::io::Result<()> {
        let tmp = self.path.with_extension("new");
        let mut text = String::from(EXEMPT_HEADER);
        text.push('\n');
        for name in exempt {
            text.push_str(name);
            text.push('\n');
        }
        let mut file = File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_within_a_boot_and_ignores_other_boots() {
        let dir = tempfile::tempdir().unwrap();
        let file = ContactFile::in_dir(dir.path());
        assert!(matches!(file.read(10_000), Err(NoContact::Missing(_))));
        file.store(1234);
        assert_eq!(file.load(10_000), Some(1234));
        // Rewritten in place, a shorter number included.
        file.store(9_999);
        file.store(99);
        assert_eq!(file.load(10_000), Some(99));
        assert_eq!(ContactFile::in_dir(dir.path()).load(10_000), Some(99));
        std::fs::write(file.path(), "another-boot 99\n").unwrap();
        assert_eq!(file.read(10_000), Err(NoContact::OtherBoot));
    }

    #[test]
    fn a_contact_in_the_future_or_revoked_is_no_contact() {
        let dir = tempfile::tempdir().unwrap();
        let file = ContactFile::in_dir(dir.path());
        file.store(5_000);
        assert_eq!(file.read(4_999), Err(NoContact::InTheFuture { contact_ms: 5_000, now_ms: 4_999 }));
        assert_eq!(file.read(5_000), Ok(5_000));
        // What issue 17's forged confirmation left behind: u64::MAX.
        file.store(u64::MAX);
        assert!(matches!(file.read(10_000), Err(NoContact::InTheFuture { .. })));
        file.revoke();
        assert_eq!(file.read(10_000), Err(NoContact::Revoked));
        // Storing 0 is never read as the revoked marker... nor as contact at 0.
        file.store(0);
        assert_eq!(file.read(10_000), Ok(1));
    }

    #[test]
    fn malformed_records_are_no_contact() {
        let boot = Some("b");
        for text in ["", "b", "b x", "b -5", "b 1 2", "x 5"] {
            assert!(parse_contact(text, boot, 100).is_err(), "{text:?}");
        }
        assert_eq!(parse_contact("b 00000000000000000042\n", boot, 100), Ok(42));
        assert_eq!(parse_contact("b 42", None, 100), Err(NoContact::OtherBoot));
    }

    #[test]
    fn the_exempt_list_is_all_or_nothing_and_safe_when_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let file = ExemptFile::in_dir(dir.path());
        assert!(file.load().is_empty());
        let set: BTreeSet<String> = ["db".to_string(), "web-1".to_string()].into();
        file.store(&set).unwrap();
        assert_eq!(file.load(), set);
        std::fs::write(dir.path().join(EXEMPT_FILE), "something else\ndb\n").unwrap();
        assert!(file.load().is_empty(), "a foreign file exempts nothing");
        std::fs::write(dir.path().join(EXEMPT_FILE), format!("{EXEMPT_HEADER}\ndb\n../etc\nWeb\n")).unwrap();
        assert_eq!(file.load(), ["db".to_string()].into());
    }
}
