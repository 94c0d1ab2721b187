//! The test bed by hand, for debugging and for the sweeper's own test.
//!
//!     blixard-testbed check      # can this machine run a test bed? if not, why
//!     blixard-testbed up [N]     # boot N hosts (default 3), print them, keep them
//!                                # until stdin closes, SIGINT or SIGTERM; then clean up
//!     blixard-testbed sweep      # remove what crashed runs left behind
//!
//! `up` prints one `host ...` line per host, with the command that opens a shell in it,
//! then `ready`.

use std::io::{Read, Write};
use std::process::ExitCode;

use blixard_systests::Testbed;

const USAGE: &str = "usage: blixard-testbed check | up [N] | sweep";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["check"] => Testbed::available().map_err(anyhow::Error::msg).map(|()| println!("ok")),
        ["up"] => up(3),
        ["up", n] => match n.parse() {
            Ok(n) => up(n),
            Err(_) => return usage(),
        },
        ["sweep"] => Testbed::sweep().map(|swept| println!("removed: {}", swept.join(" "))),
        _ => return usage(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blixard-testbed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> ExitCode {
    eprintln!("{USAGE}");
    ExitCode::from(2)
}

fn up(n_hosts: usize) -> anyhow::Result<()> {
    // Blocked here, in the only thread so far, so every thread inherits the mask and
    // sigwait below is the one place these signals arrive (children get a clean mask
    // from std::process).
    let signals = termination_signals();
    // SAFETY: a valid, initialised signal set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) };

    let bed = Testbed::start(n_hosts)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "bed {} bridge-addr={} dir={}", bed.bridge(), bed.bridge_addr(), bed.dir().display())?;
    for host in bed.hosts() {
        writeln!(
            out,
            "host {} addr={} machine={} root={} shell='nsenter --target={} --all --root --wd bash'",
            host.name(),
            host.addr(),
            host.machine_name(),
            host.root().display(),
            host.leader_pid().unwrap_or(0),
        )?;
    }
    writeln!(out, "ready (booted in {:.2} s)", bed.boot_time().as_secs_f64())?;
    out.flush()?;
    drop(out);

    // Stdin closing ends the bed too: a parent that dies takes its bed along.
    std::thread::spawn(|| {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        // SAFETY: kill(2) on our own process.
        unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    });
    let mut received = 0;
    // SAFETY: a valid signal set and an out-pointer to an int.
    unsafe { libc::sigwait(&signals, &mut received) };
    eprintln!("blixard-testbed: signal {received}, removing bed {}", bed.bridge());
    drop(bed);
    Ok(())
}

fn termination_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set before sigaddset reads it.
    unsafe {
        let mut set = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}
