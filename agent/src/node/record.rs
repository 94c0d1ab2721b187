//! A lost store is a loud stop, never a new member.
//!
//! A member's Raft log, vote and state live in its redb file. Should that
//! file be deleted or emptied, the agent would open a fresh store and, with
//! `initial_members`, bootstrap again: a voter with a forgotten vote and a
//! forgotten log, which can elect a second leader in a term it already
//! voted in and lose acknowledged writes. So the data dir carries, beside
//! the store, a small record that this host is a member ([`MEMBER_FILE`]),
//! written once the store holds its identity; an agent whose data dir has
//! that record (or a `fence-contact`, which only a member writes) but whose
//! store is missing or empty refuses to start ([`check`]).
//!
//! Replacing a host's disk is the documented way out: remove the old
//! member from the cluster, empty the data dir, join as a new member.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::storage::NodeIdentity;

/// The record's file name inside the data dir.
pub const MEMBER_FILE: &str = "member";
/// The quorum-contact file the reconciler of a member keeps.
const CONTACT_FILE: &str = "fence-contact";
/// Longest record read: anything longer is not ours.
const RECORD_BYTES_MAX: u64 = 4096;

fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(MEMBER_FILE)
}

/// Writes (durably) the record that this data dir belongs to member
/// `identity`; does nothing when it already says so.
pub fn write(data_dir: &Path, identity: &NodeIdentity) -> std::io::Result<()> {
    let text = format!(
        "# This data dir's store belongs to a blixard cluster member; see record.rs.\n\
         name = {:?}\nid = {}\ncluster_id = \"{:016x}\"\n",
        identity.name, identity.id, identity.cluster_id
    );
    if std::fs::read_to_string(path(data_dir)).is_ok_and(|old| old == text) {
        return Ok(());
    }
    let tmp = data_dir.join(format!("{MEMBER_FILE}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path(data_dir))?;
    std::fs::File::open(data_dir)?.sync_all()
}

/// Removes the record (a removed member whose store was set aside on
/// purpose, to join again as a new member).
pub fn forget(data_dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path(data_dir)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => std::fs::File::open(data_dir)?.sync_all(),
    }
}

/// What the record says, for the refusal: `(name, id, cluster id)` as
/// written (its text is not trusted beyond being shown).
fn describe(data_dir: &Path) -> Option<String> {
    let file = path(data_dir);
    let len = std::fs::metadata(&file).ok()?.len();
    if len > RECORD_BYTES_MAX {
        return Some("a member".to_string());
    }
    let text = std::fs::read_to_string(&file).ok()?;
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.trim_start().strip_prefix('='))
            .map(|v| v.trim().trim_matches('"').chars().filter(|c| c.is_ascii_graphic()).take(64).collect::<String>())
    };
    Some(match (field("name"), field("id"), field("cluster_id")) {
        (Some(name), Some(id), Some(cluster)) => format!("member {name} (id {id}) of cluster {cluster}"),
        _ => "a member".to_string(),
    })
}

/// Refuses to start an agent whose data dir shows it was a member while
/// its store has no identity (`store_has_identity` false): the store is
/// lost. One sentence saying what to do.
pub fn check(data_dir: &Path, store_has_identity: bool) -> Result<(), String> {
    if store_has_identity {
        return Ok(());
    }
    let was = describe(data_dir)
        .or_else(|| data_dir.join(CONTACT_FILE).exists().then(|| "a member (it has a fence-contact)".to_string()));
    match was {
        None => Ok(()),
        Some(was) => Err(format!(
            "the data dir {dir} shows this host was {was}, but its store {store} is missing or empty; it must not \
             come back as a new member with a forgotten vote and log: remove the old member from the cluster \
             (`blixard-agent cluster leave NAME` on another member), empty {dir}, and join this host as a new \
             member (docs/replacing-a-disk.md)",
            dir = data_dir.display(),
            store = super::STORE_FILE,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_dir_that_was_a_member_refuses_an_empty_store() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(check(dir.path(), false), Ok(()), "a fresh data dir");
        let identity = NodeIdentity { id: 7, name: "h1".into(), cluster_id: 0xabc };
        write(dir.path(), &identity).unwrap();
        write(dir.path(), &identity).unwrap();
        assert_eq!(check(dir.path(), true), Ok(()));
        let refusal = check(dir.path(), false).unwrap_err();
        assert!(refusal.contains("member h1 (id 7) of cluster 0000000000000abc"), "{refusal}");
        assert!(refusal.contains("cluster leave"), "{refusal}");
        forget(dir.path()).unwrap();
        forget(dir.path()).unwrap();
        assert_eq!(check(dir.path(), false), Ok(()), "forgotten");

        // An older data dir without the record: its fence-contact tells.
        let old = tempfile::tempdir().unwrap();
        std::fs::write(old.path().join(CONTACT_FILE), "boot 1\n").unwrap();
        assert!(check(old.path(), false).unwrap_err().contains("fence-contact"));
    }
}
