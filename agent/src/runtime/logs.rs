//! A guest's log, as `vm logs` shows it: the last lines, then (when
//! following) every new line as it is written.
//!
//! - `systemd` runtime: the unit's journal, read with `journalctl`
//!   (`--unit microvm@NAME.service --output cat`). The journal has no D-Bus
//!   API; reading it is not controlling the unit, so this is the one place
//!   the agent runs a systemd tool.
//! - `process` runtime: the guest's captured stdout and stderr,
//!   `<state_dir>/<name>/microvm-run.log`, polled for growth while following.

use std::io::SeekFrom;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncSeekExt, BufReader};
use tokio::sync::mpsc;

/// Where a guest's log is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogSource {
    /// A systemd unit's journal.
    Journal { unit: String },
    /// A file the guest's output is appended to.
    File(PathBuf),
}

/// At most this many lines are shown from the past.
pub const LINES_MAX: u32 = 10_000;
/// Longer lines are cut here (a guest may write anything).
const LINE_BYTES_MAX: usize = 16 * 1024;
/// From a file, only its last bytes are read for the past lines.
const TAIL_BYTES_MAX: u64 = 4 * 1024 * 1024;
/// How often a followed file is checked for new output.
const FILE_POLL: Duration = Duration::from_millis(200);
/// Lines buffered towards a slow reader before the reader is waited for.
const CHANNEL_LINES_MAX: usize = 256;

/// The receiving end of a log: lines, or one error sentence that ends it.
pub type LogLines = mpsc::Receiver<Result<String, String>>;

fn cut(mut line: String) -> String {
    if line.len() > LINE_BYTES_MAX {
        let mut end = LINE_BYTES_MAX;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
        line.push('…');
    }
    line
}

/// Starts reading `source`: the last `lines` lines, then, with `follow`,
/// new ones until the receiver is dropped.
pub fn read(source: LogSource, lines: u32, follow: bool) -> LogLines {
    let (tx, rx) = mpsc::channel(CHANNEL_LINES_MAX);
    let lines = lines.min(LINES_MAX);
    tokio::spawn(async move {
        let result = match source {
            LogSource::Journal { unit } => journal(&unit, lines, follow, &tx).await,
            LogSource::File(path) => file(&path, lines, follow, &tx).await,
        };
        if let Err(e) = result {
            let _ = tx.send(Err(e)).await;
        }
    });
    rx
}

async fn journal(
    unit: &str,
    lines: u32,
    follow: bool,
    tx: &mpsc::Sender<Result<String, String>>,
) -> Result<(), String> {
    let mut command = tokio::process::Command::new("journalctl");
    command.args(["--unit", unit, "--output", "cat", "--no-pager", "--lines"]).arg(lines.to_string());
    if follow {
        command.arg("--follow");
    }
    let mut child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        // The reader went away: so does journalctl.
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run journalctl: {e}"))?;
    let stdout = child.stdout.take().ok_or("journalctl has no output")?;
    let mut reader = BufReader::new(stdout).lines();
    while let Some(line) = reader.next_line().await.map_err(|e| format!("reading the journal failed: {e}"))? {
        if tx.send(Ok(cut(line))).await.is_err() {
            return Ok(());
        }
    }
    let output = child.wait_with_output().await.map_err(|e| format!("journalctl failed: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!("journalctl failed: {}", stderr.lines().next().unwrap_or("no reason given")));
    }
    Ok(())
}

async fn file(
    path: &std::path::Path,
    lines: u32,
    follow: bool,
    tx: &mpsc::Sender<Result<String, String>>,
) -> Result<(), String> {
    let mut file = match tokio::fs::File::open(path).await {
        Ok(file) => file,
        // The guest never ran here yet: an empty log, which may grow.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && follow => loop {
            tokio::time::sleep(FILE_POLL).await;
            if tx.is_closed() {
                return Ok(());
            }
            if let Ok(file) = tokio::fs::File::open(path).await {
                break file;
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
    };
    let read_error = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    let len = file.metadata().await.map_err(read_error)?.len();
    let start = len.saturating_sub(TAIL_BYTES_MAX);
    file.seek(SeekFrom::Start(start)).await.map_err(read_error)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).await.map_err(read_error)?;
    let mut position = start + bytes.len() as u64;
    let text = String::from_utf8_lossy(&bytes);
    let mut past: Vec<&str> = text.lines().collect();
    // A tail that starts mid-file starts mid-line: drop that partial line.
    if start > 0 && !past.is_empty() {
        past.remove(0);
    }
    let keep = past.len().saturating_sub(lines as usize);
    for line in &past[keep..] {
        if tx.send(Ok(cut(line.to_string()))).await.is_err() {
            return Ok(());
        }
    }
    if !follow {
        return Ok(());
    }
    let mut partial = Vec::new();
    loop {
        tokio::time::sleep(FILE_POLL).await;
        if tx.is_closed() {
            return Ok(());
        }
        let len = tokio::fs::metadata(path).await.map_err(read_error)?.len();
        if len < position {
            // Truncated (or replaced): start over from its beginning.
            file = tokio::fs::File::open(path).await.map_err(read_error)?;
            position = 0;
            partial.clear();
        }
        let mut new = Vec::new();
        file.seek(SeekFrom::Start(position)).await.map_err(read_error)?;
        (&mut file).take(TAIL_BYTES_MAX).read_to_end(&mut new).await.map_err(read_error)?;
        position += new.len() as u64;
        partial.extend_from_slice(&new);
        while let Some(end) = partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = partial.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            if tx.send(Ok(cut(line))).await.is_err() {
                return Ok(());
            }
        }
        if partial.len() > LINE_BYTES_MAX {
            let line = String::from_utf8_lossy(&partial).into_owned();
            partial.clear();
            if tx.send(Ok(cut(line))).await.is_err() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_log_shows_its_last_lines_then_follows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("microvm-run.log");
        std::fs::write(&path, "one\ntwo\nthree\n").unwrap();
        let mut rx = read(LogSource::File(path.clone()), 2, true);
        assert_eq!(rx.recv().await, Some(Ok("two".into())));
        assert_eq!(rx.recv().await, Some(Ok("three".into())));
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"fo").unwrap();
        f.write_all(b"ur\n").unwrap();
        let next = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap();
        assert_eq!(next, Some(Ok("four".into())));

        let mut rx = read(LogSource::File(path), 10, false);
        let mut all = Vec::new();
        while let Some(line) = rx.recv().await {
            all.push(line.unwrap());
        }
        assert_eq!(all, ["one", "two", "three", "four"]);
    }
}
