//! Fake microvm.nix guests: a runner that stands in for a hypervisor, laid out where
//! microvm.nix's `install-microvm-<name>.service` would put a real one, so that the
//! host's `microvm@<name>.service` starts it and the agent finds it.
//!
//! Layout, as on a NixOS host: `/var/lib/microvms/<name>/current` is a symlink to the
//! runner's store path, which holds `bin/microvm-run` and `bin/microvm-shutdown`; the
//! guest's directory and the link belong to `microvm:kvm`. The runner appends one line
//! per start and per shutdown to `/var/lib/microvms/<name>/fake-guest.log` and then
//! sleeps until stopped.

use std::fs;
use std::os::unix::fs::{lchown, symlink};

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

impl Host {
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
            format!("#!/bin/sh\necho \"shutdown $(date +%s.%N)\" >> {log}\n"),
            0o755,
        )?;
        let (uid, gid) = (self.lookup_id("/etc/passwd", "microvm")?, self.lookup_id("/etc/group", "kvm")?);
        let dir = self.path(&format!("{STATE_DIR}/{name}"));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let current = dir.join("current");
        let _ = fs::remove_file(&current);
        symlink(&store_path, &current).with_context(|| format!("linking {}", current.display()))?;
        for path in [&dir, &current] {
            lchown(path, Some(uid), Some(gid)).with_context(|| format!("chown {}", path.display()))?;
        }
        Ok(())
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
    #[should_panic(expected = "not a valid VM name")]
    fn rejects_names_systemd_or_a_path_would_misread() {
        assert_valid_name("../etc");
    }
}
