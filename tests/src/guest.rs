//! microvm.nix guests for the test bed's hosts, laid out where microvm.nix's
//! `install-microvm-<name>.service` would put them, so that the host's
//! `microvm@<name>.service` starts them and the agent finds them.
//!
//! Layout, as on a NixOS host: `/var/lib/microvms/<name>/current` is a symlink to the
//! runner's store path, which holds `bin/microvm-run` and `bin/microvm-shutdown`; the
//! guest's directory and the link belong to `microvm:kvm`. Both kinds of runner append
//! one line per start to `/var/lib/microvms/<name>/fake-guest.log` (and per shutdown
//! through microvm-shutdown), which the timeline checks its starts against.
//!
//! - [`Host::install_fake_guest`]: a runner that stands in for a hypervisor and sleeps
//!   until stopped.
//! - [`Host::install_real_guest`]: a real VM. A qemu runner with the command line of
//!   microvm.nix's `lib/runners/qemu.nix`, booting Debian's kernel and a tiny
//!   initramfs (from `tests/testbed/prepare-guest.sh`, whose layer the hosts mount), and
//!   microvm.nix's `microvm-shutdown` for qemu: ctrl-alt-del over QMP, then wait for
//!   qemu to exit. The guest counts on its serial console (`blixard-guest NAME tick N
//!   boot=ID`), which qemu's stdout carries into the unit's journal.

use std::fs;
use std::os::unix::fs::{lchown, symlink};
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::testbed::Host;

/// microvm.nix's state directory (its `microvm.stateDir` default).
pub const STATE_DIR: &str = "/var/lib/microvms";

/// What the runner writes its marker lines to, inside the host.
pub fn log_path(name: &str) -> String {
    format!("{STATE_DIR}/{name}/fake-guest.log")
}

/// `microvm@<name>.service`.
pub fn unit(name: &str) -> String {
    format!("microvm@{name}.service")
}

/// The cgroup of [`unit`] in its host's cgroup tree: systemd puts a template's instances
/// in a slice named after the template, below `system.slice`.
pub fn cgroup(name: &str) -> String {
    format!("system.slice/system-microvm.slice/{}", unit(name))
}

const PREPARE_GUEST_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testbed/prepare-guest.sh");

/// What `tests/testbed/prepare-guest.sh` built: the layer the hosts mount over their
/// rootfs (qemu, socat, the kernel, the initramfs) and where those are inside a host.
#[derive(Debug, Clone)]
pub struct RealGuestImage {
    /// The overlay layer, for [`crate::Testbed::start_with_layers`].
    pub layer: PathBuf,
    kernel: String,
    initrd: String,
    qemu: String,
    socat: String,
}

impl RealGuestImage {
    /// The prepared image, or an error that says how to prepare it.
    pub fn prepared() -> Result<RealGuestImage> {
        let out = Command::new("bash").args([PREPARE_GUEST_SCRIPT, "--print-path"]).output()?;
        if !out.status.success() {
            bail!("{PREPARE_GUEST_SCRIPT} --print-path failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let manifest = fs::read_to_string(dir.join("manifest")).with_context(|| {
            format!(
                "the real guest is not prepared ({} has no manifest): run `{PREPARE_GUEST_SCRIPT}` as root",
                dir.display()
            )
        })?;
        let field = |key: &str| -> Result<String> {
            manifest
                .lines()
                .find_map(|l| l.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
                .map(str::to_owned)
                .with_context(|| format!("{}/manifest has no {key}", dir.display()))
        };
        Ok(RealGuestImage {
            layer: dir.join("layer"),
            kernel: field("KERNEL")?,
            initrd: field("INITRD")?,
            qemu: field("QEMU")?,
            socat: field("SOCAT")?,
        })
    }
}

/// The size of a real guest: small, so that TCG boots it quickly.
pub const REAL_GUEST_MEMORY_MIB: u64 = 128;

impl Host {
    /// Installs real guest `name` on this host with runner generation `runner` (a new
    /// generation is a new store path, as a switch that changed the guest makes):
    /// writes the runner and points `current` at it, as `install-microvm-<name>` does.
    /// Returns the runner's store path.
    pub fn install_real_guest(&self, name: &str, image: &RealGuestImage, runner: u32) -> Result<String> {
        assert_valid_name(name);
        let store_path = format!("/nix/store/{}-microvm-qemu-{name}", store_hash(&format!("{name}-{runner}")));
        let log = log_path(name);
        let socket = format!("{name}.sock");
        // microvm.nix's qemu runner for `hypervisor = "qemu"`, x86_64, no devices, with
        // `microvm.cpu = "max"` (no -enable-kvm: there is no /dev/kvm in the bed, so
        // accel=kvm:tcg runs TCG). One deviation: microvm.nix turns the microvm
        // machine's PIT and PIC off and ACPI on, which a KVM guest (kvmclock) does
        // not miss; under TCG the kernel cannot calibrate its clock without the PIT
        // and hangs, so they are on and ACPI (which would hide them) is off.
        // `quiet`: the kernel's boot messages over an emulated UART cost seconds.
        let machine = "microvm,accel=kvm:tcg,acpi=off,mem-merge=on,pcie=off,pic=on,pit=on,rtc=on,usb=off";
        let append = format!(
            "earlyprintk=ttyS0 console=ttyS0 reboot=t panic=-1 quiet blixard.vm={name} blixard.runner={runner}"
        );
        let run = format!(
            "#!/bin/bash\n\
             # microvm.nix qemu runner (blixard-systests): lib/runners/qemu.nix's command line.\n\
             set -eou pipefail\n\
             echo \"start $(date +%s.%N) pid=$$\" >> {log}\n\
             exec -a \"microvm@{name}\" {qemu} -name {name} -M {machine} -m {mem}M -smp 1 \
             -nodefaults -no-user-config -no-reboot -kernel {kernel} -initrd {initrd} \
             -chardev stdio,id=stdio,signal=off -device virtio-rng-device -serial chardev:stdio \
             -cpu max -device i8042 -append '{append}' -nographic -qmp unix:{socket},server,nowait\n",
            qemu = image.qemu,
            mem = REAL_GUEST_MEMORY_MIB,
            kernel = image.kernel,
            initrd = image.initrd,
        );
        // microvm.nix's shutdownCommand for qemu, run in the guest's directory.
        let key = |k: &str| format!(r#"{{"type":"key","data":{{"down":true,"key":{{"type":"qcode","data":"{k}"}}}}}}"#);
        let events = [key("ctrl"), key("alt"), key("delete")].join(",");
        let shutdown = format!(
            "#!/bin/bash\n\
             # microvm.nix qemu shutdown (blixard-systests): ctrl-alt-del over QMP, then wait for qemu to exit.\n\
             echo \"shutdown $(date +%s.%N)\" >> {log}\n\
             # Exit gracefully if QEMU is already gone\n\
             if [ ! -S {socket} ]; then\n  exit 0\nfi\n\
             (\n  \
             echo '{{\"execute\":\"qmp_capabilities\"}}'\n  \
             echo '{{\"execute\":\"input-send-event\",\"arguments\":{{\"events\":[{events}]}}}}'\n  \
             # wait for exit\n  \
             cat\n\
             ) | {socat} STDIO UNIX:{socket},shut-none\n",
            socat = image.socat,
        );
        self.write_file(&format!("{store_path}/bin/microvm-run"), run, 0o755)?;
        self.write_file(&format!("{store_path}/bin/microvm-shutdown"), shutdown, 0o755)?;
        self.write_file(&format!("{store_path}/share/microvm/hypervisor"), "qemu\n", 0o644)?;
        self.write_file(&format!("{store_path}/share/microvm/tap-flags"), "vnet_hdr\n", 0o644)?;
        self.link_current(name, &store_path)?;
        Ok(store_path)
    }

    /// What `booted` of guest `name` points at (the runner it was started from), if
    /// it is running.
    pub fn booted_runner(&self, name: &str) -> Option<String> {
        fs::read_link(self.path(&format!("{STATE_DIR}/{name}/booted"))).ok().map(|p| p.display().to_string())
    }

    /// Points `<state dir>/<name>/current` at `store_path`, owned by microvm:kvm, as
    /// microvm.nix's install unit does.
    fn link_current(&self, name: &str, store_path: &str) -> Result<()> {
        let (uid, gid) = (self.lookup_id("/etc/passwd", "microvm")?, self.lookup_id("/etc/group", "kvm")?);
        let dir = self.path(&format!("{STATE_DIR}/{name}"));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Replaced atomically, as `ln -sTf` does.
        let current = dir.join("current");
        let next = dir.join(".current.new");
        let _ = fs::remove_file(&next);
        symlink(store_path, &next).with_context(|| format!("linking {}", next.display()))?;
        lchown(&next, Some(uid), Some(gid)).with_context(|| format!("chown {}", next.display()))?;
        fs::rename(&next, &current).with_context(|| format!("renaming to {}", current.display()))?;
        lchown(&dir, Some(uid), Some(gid)).with_context(|| format!("chown {}", dir.display()))?;
        Ok(())
    }

    /// Installs fake guest `name` on this host (running or not).
    pub fn install_fake_guest(&self, name: &str) -> Result<()> {
        assert_valid_name(name);
        let store_path = format!("/nix/store/{}-microvm-runner-{name}", store_hash(name));
        let log = log_path(name);
        self.write_file(
            &format!("{store_path}/bin/microvm-run"),
            format!(
                "#!/bin/sh\n# Fake microvm.nix runner (blixard-systests): stands in for a hypervisor.\n\
                 echo \"start $(date +%s.%N) pid=$$\" >> {log}\nexec sleep infinity\n"
            ),
            0o755,
        )?;
        self.write_file(
            &format!("{store_path}/bin/microvm-shutdown"),
            // Like a hypervisor asked to power off, the runner then exits (systemd runs
            // this as ExecStop, with the runner's PID in $MAINPID; the stop waits for it).
            format!(
                "#!/bin/sh\necho \"shutdown $(date +%s.%N)\" >> {log}\n\
                 if [ -n \"$MAINPID\" ]; then kill -TERM \"$MAINPID\"; fi\n"
            ),
            0o755,
        )?;
        self.link_current(name, &store_path)
    }

    /// The lines the fake guest `name` has logged: one `start ...` per start of its
    /// runner, one `shutdown ...` per stop through microvm-shutdown.
    pub fn fake_guest_log(&self, name: &str) -> Result<Vec<String>> {
        let path = self.path(&log_path(name));
        match fs::read_to_string(&path) {
            Ok(text) => Ok(text.lines().map(str::to_owned).collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// The numeric id of `name` in the host's passwd or group file.
    fn lookup_id(&self, file: &str, name: &str) -> Result<u32> {
        let text = self.read_file(file)?;
        for line in text.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.first() == Some(&name) && fields.len() > 2 {
                return fields[2].parse().with_context(|| format!("bad id for {name} in {file}"));
            }
        }
        bail!("{name} is not in the host's {file}")
    }
}

/// One boot of a real guest, as its serial console showed it on one host: the
/// `blixard-guest NAME ...` lines of `microvm@NAME.service`'s journal with one boot id,
/// stamped by the host's journald on the kernel's monotonic clock (one clock for every
/// host of a bed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleRun {
    pub host: usize,
    pub boot: String,
    /// The runner generation it booted from (`booted runner=N`), if that line was seen.
    pub runner: Option<u32>,
    pub first_us: u64,
    pub last_us: u64,
    /// `tick` lines: the guest's own counter, every half second while it runs.
    pub ticks: usize,
    /// It said `shutting down` (ctrl-alt-del reached it: a clean stop).
    pub shut_down: bool,
}

/// Every boot of real guest `vm` on every host of `bed`, from the hosts' journals
/// (a powered-off host's persistent journal included), ordered by first line.
pub fn console_runs(bed: &crate::Testbed, vm: &str) -> Result<Vec<ConsoleRun>> {
    let mut runs: Vec<ConsoleRun> = Vec::new();
    for host in bed.hosts() {
        let journal = host.journal_args(&["--unit", &unit(vm)])?;
        runs.extend(parse_console(host.index(), vm, &journal));
    }
    runs.sort_by_key(|r| r.first_us);
    Ok(runs)
}

/// The console lines of `vm` in `journal` (journalctl's `short-monotonic` output).
fn parse_console(host: usize, vm: &str, journal: &str) -> Vec<ConsoleRun> {
    let marker = format!("blixard-guest {vm} ");
    let mut runs: Vec<ConsoleRun> = Vec::new();
    for line in journal.lines() {
        let Some(at) = line.find(&marker) else { continue };
        let said = &line[at + marker.len()..];
        let Some(stamp_us) = monotonic_stamp_us(line) else { continue };
        let Some(boot) = said.split_whitespace().find_map(|w| w.strip_prefix("boot=")) else { continue };
        let index = match runs.iter().position(|r| r.boot == boot) {
            Some(i) => i,
            None => {
                runs.push(ConsoleRun {
                    host,
                    boot: boot.to_owned(),
                    runner: None,
                    first_us: stamp_us,
                    last_us: stamp_us,
                    ticks: 0,
                    shut_down: false,
                });
                runs.len() - 1
            }
        };
        let run = &mut runs[index];
        run.first_us = run.first_us.min(stamp_us);
        run.last_us = run.last_us.max(stamp_us);
        if said.starts_with("tick ") {
            run.ticks += 1;
        } else if said.starts_with("booted ") {
            run.runner = said.split_whitespace().find_map(|w| w.strip_prefix("runner=")).and_then(|r| r.parse().ok());
        } else if said.starts_with("shutting down") {
            run.shut_down = true;
        }
    }
    runs
}

/// `[  123.456789] ...` -> 123456789.
fn monotonic_stamp_us(line: &str) -> Option<u64> {
    let inner = line.strip_prefix('[')?.split(']').next()?.trim();
    let (secs, micros) = inner.split_once('.')?;
    Some(secs.parse::<u64>().ok()? * 1_000_000 + micros.parse::<u64>().ok()?)
}

/// Pairs of console runs on two different hosts whose lines overlap in time: the
/// guest's own evidence of two copies at once.
pub fn overlapping_runs(runs: &[ConsoleRun]) -> Vec<(ConsoleRun, ConsoleRun)> {
    let mut out = Vec::new();
    for (i, a) in runs.iter().enumerate() {
        for b in &runs[i + 1..] {
            if a.host != b.host && a.first_us <= b.last_us && b.first_us <= a.last_us {
                out.push((a.clone(), b.clone()));
            }
        }
    }
    out
}

/// The rule the agent enforces for VM names (design decision 10).
fn assert_valid_name(name: &str) {
    let bytes = name.as_bytes();
    let valid = (1..=63).contains(&bytes.len())
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    assert!(valid, "{name:?} is not a valid VM name");
}

/// A stable, store-hash-shaped string (32 chars of Nix's base32 alphabet) for `name`.
fn store_hash(name: &str) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    // FNV-1a, stretched: this only has to look like a hash and stay the same.
    let mut state: u64 = 0xcbf2_9ce4_8422_2325;
    (0..32)
        .map(|i| {
            for b in name.bytes().chain([i as u8]) {
                state = (state ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            ALPHABET[(state >> 59) as usize] as char
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_hashes_are_stable_and_shaped_like_nix() {
        let hash = store_hash("demo");
        assert_eq!(hash, store_hash("demo"));
        assert_ne!(hash, store_hash("demo2"));
        assert_eq!(hash.len(), 32);
    }

    #[test]
    fn console_lines_group_into_runs_per_boot() {
        let journal = "\
[  10.000001] h0 microvm@rg[7]: blixard-guest rg booted runner=2 boot=aa
[  10.500000] h0 microvm@rg[7]: blixard-guest rg tick 1 boot=aa
[  11.000000] h0 microvm@rg[7]: blixard-guest other tick 9 boot=cc
[  11.000000] h0 microvm@rg[7]: blixard-guest rg tick 2 boot=aa
[  11.200000] h0 microvm@rg[7]: blixard-guest rg shutting down boot=aa
[  20.000000] h0 microvm@rg[9]: blixard-guest rg tick 1 boot=bb
";
        let runs = parse_console(0, "rg", journal);
        assert_eq!(runs.len(), 2, "{runs:?}");
        assert_eq!((runs[0].runner, runs[0].ticks, runs[0].shut_down), (Some(2), 2, true));
        assert_eq!((runs[0].first_us, runs[0].last_us), (10_000_001, 11_200_000));
        let mut elsewhere = runs[1].clone();
        elsewhere.host = 1;
        elsewhere.first_us = 11_100_000;
        assert_eq!(overlapping_runs(&[runs[0].clone(), elsewhere]).len(), 1);
        assert!(overlapping_runs(&runs).is_empty(), "one host's runs never overlap each other");
    }

    #[test]
    #[should_panic(expected = "not a valid VM name")]
    fn rejects_names_systemd_or_a_path_would_misread() {
        assert_valid_name("../etc");
    }
}
