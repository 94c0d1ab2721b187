//! Backup files of the replicated state (`blixard-agent cluster backup
//! FILE`) and reading them back (`blixard-agent restore --from FILE`).
//!
//! A backup is the whole state machine (members, VMs, placements, join
//! token hashes) as one member had applied it at an index that a
//! read-index round confirmed committed, so it holds every write
//! acknowledged before the backup was asked for. The file is
//!
//! ```text
//! "BLXBAK01" | header length (u32 LE) | BackupHeader | StateSnapshot | SHA-256
//! ```
//!
//! where the header (`state.v1.BackupHeader`) names the cluster, the index,
//! the state's length and its SHA-256, and the trailing SHA-256 covers every
//! byte before it. A backup is written to `FILE.partial`, synced and renamed,
//! so `FILE` is either absent or whole; reading checks the trailer, the
//! header, the state's digest and then the state's own invariants
//! (`State::validate`) before anything uses it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use prost::Message as _;
use sha2::{Digest, Sha256};

use crate::state::{State, codec};

/// The first bytes of every backup file (the last two are the format).
pub const MAGIC: &[u8; 8] = b"BLXBAK01";
/// The largest header accepted (it holds a few numbers and names).
const HEADER_BYTES_MAX: u32 = 64 * 1024;
/// The largest state a backup may hold: what a member accepts as a Raft
/// snapshot (`api::peer::SNAPSHOT_BYTES_MAX`).
pub const STATE_BYTES_MAX: u64 = 4 * 1024 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("cannot {what} {path}: {reason}")]
    Io { what: &'static str, path: String, reason: String },
    #[error("{0} is not a blixard backup file")]
    NotABackup(String),
    #[error("{path} is damaged: {reason}")]
    Damaged { path: String, reason: String },
    #[error("the backup stream is wrong: {0}")]
    Stream(String),
}

fn io(what: &'static str, path: &Path, e: &std::io::Error) -> BackupError {
    let reason = e.to_string();
    let reason = match reason.rfind(" (os error ") {
        Some(at) => reason[..at].to_string(),
        None => reason,
    };
    BackupError::Io { what, path: path.display().to_string(), reason }
}

/// What a backup says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub cluster_id: u64,
    pub index: u64,
    pub term: u64,
    pub taken_by: String,
    pub taken_unix_ms: u64,
    pub agent_version: String,
    pub state_bytes: u64,
    pub state_sha256: [u8; 32],
    pub members: u32,
    pub vms: u64,
}

impl Header {
    /// The header for `state`, encoded as `state_bytes`.
    pub fn of(state: &State, state_bytes: &[u8], cluster_id: u64, index: u64, term: u64, taken_by: &str) -> Header {
        Header {
            cluster_id,
            index,
            term,
            taken_by: taken_by.to_string(),
            taken_unix_ms: crate::node::now_unix_ms(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            state_bytes: state_bytes.len() as u64,
            state_sha256: Sha256::digest(state_bytes).into(),
            members: state.members().len() as u32,
            vms: state.vms().len() as u64,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        codec::pb::BackupHeader {
            cluster_id: self.cluster_id,
            index: self.index,
            term: self.term,
            taken_by: self.taken_by.clone(),
            taken_unix_ms: self.taken_unix_ms,
            agent_version: self.agent_version.clone(),
            state_bytes: self.state_bytes,
            state_sha256: self.state_sha256.to_vec(),
            members: self.members,
            vms: self.vms,
        }
        .encode_to_vec()
    }

    pub fn decode(bytes: &[u8]) -> Result<Header, String> {
        let h = codec::pb::BackupHeader::decode(bytes).map_err(|e| format!("its header does not decode: {e}"))?;
        let state_sha256 = h
            .state_sha256
            .as_slice()
            .try_into()
            .map_err(|_| format!("its header has a state digest of {} bytes, not 32", h.state_sha256.len()))?;
        if h.state_bytes > STATE_BYTES_MAX {
            return Err(format!("its header claims a state of {} bytes, over the limit", h.state_bytes));
        }
        Ok(Header {
            cluster_id: h.cluster_id,
            index: h.index,
            term: h.term,
            taken_by: h.taken_by,
            taken_unix_ms: h.taken_unix_ms,
            agent_version: h.agent_version,
            state_bytes: h.state_bytes,
            state_sha256,
            members: h.members,
            vms: h.vms,
        })
    }

    /// The state digest in hex, as printed.
    pub fn digest_hex(&self) -> String {
        self.state_sha256.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Writes a backup file as its chunks arrive: into `FILE.partial`, which
/// [`Writer::finish`] checks, syncs and renames to `FILE`. Dropped
/// unfinished, it removes the partial file.
pub struct Writer {
    path: PathBuf,
    partial: PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
    header: Header,
    whole: Sha256,
    state: Sha256,
    state_written: u64,
}

impl Writer {
    /// Creates `FILE.partial` and writes the header. `FILE` must not exist.
    pub fn create(path: &Path, header: Header) -> Result<Writer, BackupError> {
        if path.exists() {
            return Err(BackupError::Io {
                what: "write",
                path: path.display().to_string(),
                reason: "it already exists (remove it or choose another name)".into(),
            });
        }
        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)
            .map_err(|e| io("create", &partial, &e))?;
        let mut writer = Writer {
            path: path.to_path_buf(),
            partial,
            file: Some(std::io::BufWriter::new(file)),
            header,
            whole: Sha256::new(),
            state: Sha256::new(),
            state_written: 0,
        };
        let encoded = writer.header.encode();
        let len = u32::try_from(encoded.len()).expect("a header is small");
        writer.put(MAGIC)?;
        writer.put(&len.to_le_bytes())?;
        writer.put(&encoded)?;
        Ok(writer)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), BackupError> {
        self.whole.update(bytes);
        let file = self.file.as_mut().expect("open until finished");
        file.write_all(bytes).map_err(|e| io("write", &self.partial, &e))
    }

    /// The next bytes of the state.
    pub fn write_state(&mut self, bytes: &[u8]) -> Result<(), BackupError> {
        self.state_written += bytes.len() as u64;
        if self.state_written > self.header.state_bytes {
            return Err(BackupError::Stream(format!(
                "more state than the {} bytes the header announced",
                self.header.state_bytes
            )));
        }
        self.state.update(bytes);
        self.put(bytes)
    }

    /// Checks that the whole state arrived intact, then writes the
    /// trailer, syncs the file and renames it into place.
    pub fn finish(mut self) -> Result<Header, BackupError> {
        if self.state_written != self.header.state_bytes {
            return Err(BackupError::Stream(format!(
                "the stream ended after {} of {} state bytes",
                self.state_written, self.header.state_bytes
            )));
        }
        let digest: [u8; 32] = std::mem::take(&mut self.state).finalize().into();
        if digest != self.header.state_sha256 {
            return Err(BackupError::Stream("the state's SHA-256 differs from the header's".into()));
        }
        let trailer: [u8; 32] = std::mem::take(&mut self.whole).finalize().into();
        let mut file = self.file.take().expect("open until finished");
        file.write_all(&trailer).map_err(|e| io("write", &self.partial, &e))?;
        let file = file.into_inner().map_err(|e| io("write", &self.partial, e.error()))?;
        file.sync_all().map_err(|e| io("sync", &self.partial, &e))?;
        drop(file);
        std::fs::rename(&self.partial, &self.path).map_err(|e| io("rename into", &self.path, &e))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty())
            && let Ok(dir) = std::fs::File::open(dir)
        {
            let _ = dir.sync_all();
        }
        Ok(self.header.clone())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// A backup read back and checked.
#[derive(Debug, Clone)]
pub struct Backup {
    pub header: Header,
    pub state: State,
}

/// Reads and checks the backup file at `path`.
pub fn read(path: &Path) -> Result<Backup, BackupError> {
    let shown = path.display().to_string();
    let damaged = |reason: String| BackupError::Damaged { path: shown.clone(), reason };
    let mut file = std::fs::File::open(path).map_err(|e| io("open", path, &e))?;
    let len = file.metadata().map_err(|e| io("read", path, &e))?.len();
    if len > STATE_BYTES_MAX + u64::from(HEADER_BYTES_MAX) + 64 {
        return Err(damaged(format!("{len} bytes is larger than any backup")));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.read_to_end(&mut bytes).map_err(|e| io("read", path, &e))?;
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(BackupError::NotABackup(shown));
    }
    if bytes.len() < MAGIC.len() + 4 + 32 {
        return Err(damaged("it is truncated".into()));
    }
    let (body, trailer) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(body).as_slice() != trailer {
        return Err(damaged("its SHA-256 does not match (truncated or changed)".into()));
    }
    let header_len = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes"));
    if header_len > HEADER_BYTES_MAX || 12 + header_len as usize > body.len() {
        return Err(damaged(format!("its header length {header_len} is impossible")));
    }
    let header = Header::decode(&body[12..12 + header_len as usize]).map_err(damaged)?;
    let state_bytes = &body[12 + header_len as usize..];
    if state_bytes.len() as u64 != header.state_bytes {
        return Err(damaged(format!(
            "it holds {} state bytes, its header says {}",
            state_bytes.len(),
            header.state_bytes
        )));
    }
    if Sha256::digest(state_bytes).as_slice() != header.state_sha256 {
        return Err(damaged("its state's SHA-256 differs from its header's".into()));
    }
    let state = codec::decode_snapshot(state_bytes).map_err(|e| damaged(format!("its state does not decode: {e}")))?;
    state.validate().map_err(|e| damaged(format!("its state is inconsistent: {e}")))?;
    Ok(Backup { header, state })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, CommandKind, Member, VmSpec};

    fn state() -> State {
        let mut state = State::with_members([Member::new(1, "h1", "127.0.0.1:7000")]);
        for i in 0..50 {
            let spec = VmSpec { vcpu: 1, memory_mib: 64, ..VmSpec::default() };
            let create = CommandKind::CreateVm { name: format!("vm{i}"), spec };
            state.apply(&Command { at_unix_ms: 1, kind: create }).unwrap();
        }
        let _ = state.take_dirty();
        state
    }

    fn write(path: &Path, state: &State, chunk: usize) -> Header {
        let bytes = codec::encode_snapshot(state);
        let header = Header::of(state, &bytes, 7, 42, 3, "h1");
        let mut writer = Writer::create(path, header).unwrap();
        for piece in bytes.chunks(chunk) {
            writer.write_state(piece).unwrap();
        }
        writer.finish().unwrap()
    }

    #[test]
    fn a_backup_round_trips_and_damage_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.bak");
        let state = state();
        let header = write(&path, &state, 100);
        let back = read(&path).unwrap();
        assert_eq!(back.header, header);
        assert_eq!(back.state, state);
        assert_eq!((back.header.cluster_id, back.header.index, back.header.vms), (7, 42, 50));
        assert!(!dir.path().join("b.bak.partial").exists());

        // Never overwritten.
        let bytes = codec::encode_snapshot(&state);
        assert!(Writer::create(&path, Header::of(&state, &bytes, 7, 42, 3, "h1")).is_err());

        // Any flipped byte is found, and so is truncation.
        let good = std::fs::read(&path).unwrap();
        for at in [0, 9, 20, good.len() / 2, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            std::fs::write(&path, &bad).unwrap();
            assert!(read(&path).is_err(), "byte {at}");
        }
        std::fs::write(&path, &good[..good.len() - 10]).unwrap();
        assert!(matches!(read(&path), Err(BackupError::Damaged { .. })));
        std::fs::write(&path, b"hello world, not a backup at all").unwrap();
        assert!(matches!(read(&path), Err(BackupError::NotABackup(_))));
    }

    #[test]
    fn a_short_or_wrong_stream_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.bak");
        let state = state();
        let bytes = codec::encode_snapshot(&state);
        let header = Header::of(&state, &bytes, 7, 42, 3, "h1");
        let mut writer = Writer::create(&path, header.clone()).unwrap();
        writer.write_state(&bytes[..bytes.len() - 1]).unwrap();
        assert!(matches!(writer.finish(), Err(BackupError::Stream(_))));
        let mut writer = Writer::create(&path, header).unwrap();
        let mut changed = bytes.clone();
        changed[3] ^= 1;
        writer.write_state(&changed).unwrap();
        assert!(matches!(writer.finish(), Err(BackupError::Stream(_))));
        assert!(!path.exists());
        assert!(!dir.path().join("b.bak.partial").exists());
    }
}
