//! Running host-side tools: finding them, bounding them in time, and joining a cgroup
//! between fork and exec.

use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// Where root's tools live on Debian even when the caller's PATH lacks the sbin dirs.
const FALLBACK_PATH: &[&str] = &["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"];

/// How often a bounded wait on a child process looks at it again.
const CHILD_POLL_INTERVAL: Duration = Duration::from_millis(5);

/// The absolute path of host tool `name`, from PATH or Debian's standard directories.
pub fn tool(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(FALLBACK_PATH.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| anyhow!("`{name}` is not installed (run tests/testbed/prepare.sh as root)"))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Makes `command` move itself into the cgroups whose `cgroup.procs` files are given,
/// after fork and before exec, so that the process and everything it forks belong to
/// them from the first instruction on. Only raw syscalls run in the child: it was forked
/// from a multi-threaded test process, where allocating could deadlock.
pub fn join_cgroups(command: &mut Command, procs_files: &[PathBuf]) {
    let procs_files: Vec<CString> =
        procs_files.iter().map(|p| CString::new(p.as_os_str().as_bytes()).expect("cgroup paths have no NUL")).collect();
    // SAFETY: the closure only calls open/write/close, which are async-signal-safe, and
    // builds io::Error from an errno, which does not allocate.
    unsafe {
        command.pre_exec(move || {
            for file in &procs_files {
                let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" means the writing process itself.
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let error = std::io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(error);
                }
            }
            Ok(())
        });
    }
}

/// Runs `command` to completion with its output captured, killing it after `timeout`.
pub fn output_within(command: &mut Command, timeout: Duration) -> Result<Output> {
    output_within_then(command, timeout, || ())
}

/// [`output_within`], calling `after_exit` once the command has exited or been killed
/// and before its output is collected: the place to kill what it left behind, which may
/// hold its pipes open.
pub fn output_within_then(command: &mut Command, timeout: Duration, after_exit: impl FnOnce()) -> Result<Output> {
    let described = describe(command);
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {described}"))?;
    wait_output(child, timeout, after_exit).with_context(|| format!("running {described}"))
}

/// Like [`output_within`], but a non-zero exit is an error carrying stderr; returns stdout.
pub fn stdout_within(command: &mut Command, timeout: Duration) -> Result<String> {
    let output = output_within(command, timeout)?;
    check_success(&describe(command), &output)?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

pub fn check_success(described: &str, output: &Output) -> Result<()> {
    if output.status.success() {
        return Ok(());
    }
    bail!(
        "{described} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim(),
        if output.stdout.is_empty() {
            String::new()
        } else {
            format!(" [stdout: {}]", String::from_utf8_lossy(&output.stdout).trim())
        }
    )
}

pub fn describe(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(command.get_args().map(|a| a.to_string_lossy().into_owned()));
    format!("`{}`", words.join(" "))
}

fn wait_output(mut child: Child, timeout: Duration, after_exit: impl FnOnce()) -> Result<Output> {
    // Drain both pipes on their own threads so a chatty child never blocks on a full pipe
    // while we wait for it to exit.
    let stdout = drain(child.stdout.take().expect("stdout is piped"));
    let stderr = drain(child.stderr.take().expect("stderr is piped"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            after_exit();
            bail!("timed out after {timeout:?}");
        }
        thread::sleep(CHILD_POLL_INTERVAL);
    };
    after_exit();
    // A background grandchild can hold the pipes open after the child exits: bound this
    // wait too, rather than hang the test.
    let collect = |rx: mpsc::Receiver<Vec<u8>>, which: &str| {
        rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|_| anyhow!("exited ({status}) but its {which} stayed open (a background process holds it)"))
    };
    Ok(Output { status, stdout: collect(stdout, "stdout")?, stderr: collect(stderr, "stderr")? })
}

fn drain(mut pipe: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}
