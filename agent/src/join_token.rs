//! One-time join tokens: how a host without a member certificate is
//! admitted (and, in a cluster of the shared secret, obtains one).
//!
//! `cluster join-token` makes a token on the member that receives it: 32
//! random bytes from the operating system's generator, written as
//! `blxjt_`, the fingerprint of the cluster's CA (64 hex digits, the
//! SHA-256 of its public key, as kubeadm's discovery hash) and `_`, then 64
//! hex digits. A joiner checks the CA the cluster presents against the
//! fingerprint before it sends anything (`api::join`). A cluster running
//! with `insecure` has no CA: its tokens are `blxjt_` and the 64 digits
//! only. The whole token is the secret; only its SHA-256 is proposed
//! (`CommandKind::AddJoinToken`), so the secret is never in the Raft log,
//! the state, a snapshot or a log line; the operator who asked is the only
//! one who sees it. A joining host presents it in its admission request; the
//! leader proposes `UseJoinToken` with its hash before adding the host as a
//! learner, and the state machine accepts that only for an unexpired token
//! that no other host used.

use sha2::{Digest, Sha256};

use crate::pki::Fingerprint;

/// What every token starts with, so that a leaked one is recognisable.
pub const PREFIX: &str = "blxjt_";
/// How long a token lives when the operator does not say: one hour.
pub const DEFAULT_TTL_SECS: u64 = 3600;

/// A new token from the operating system's random generator, naming the
/// cluster CA `pin` when there is one.
pub fn generate(pin: Option<Fingerprint>) -> Result<String, std::io::Error> {
    let mut bytes = [0u8; 32];
    getrandom(&mut bytes)?;
    let mut token = String::with_capacity(PREFIX.len() + 129);
    token.push_str(PREFIX);
    if let Some(pin) = pin {
        token.push_str(&pin.hex());
        token.push('_');
    }
    for byte in bytes {
        token.push_str(&format!("{byte:02x}"));
    }
    Ok(token)
}

/// The hash the cluster keeps of `token` (surrounding whitespace, such as
/// a token file's newline, is not part of it).
pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.trim().as_bytes()).into()
}

/// The CA fingerprint a token names, if any.
pub fn pin_of(token: &str) -> Option<Fingerprint> {
    let (pin, secret) = token.trim().strip_prefix(PREFIX)?.split_once('_')?;
    (secret.len() == 64).then_some(())?;
    Fingerprint::from_hex(pin)
}

/// Longest token file read: a token is a short secret.
pub const TOKEN_FILE_BYTES_MAX: u64 = 4096;

/// Reads a token file (`what` names it in errors: a flag or a key): one
/// line, surrounding whitespace ignored. The error is one sentence naming
/// the file, never the token.
pub fn read_file(what: &str, path: &std::path::Path) -> Result<String, String> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > TOKEN_FILE_BYTES_MAX) {
        return Err(format!("{what} {} is longer than a join token can be", path.display()));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {what} {}: {}", path.display(), crate::pki::io_reason(&e)))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("{what} {} is empty", path.display()));
    }
    Ok(token.to_string())
}

/// Fills `bytes` from the kernel's generator, /dev/urandom.
fn getrandom(bytes: &mut [u8]) -> Result<(), std::io::Error> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_prefixed_and_hash_without_surrounding_whitespace() {
        let (a, b) = (generate(None).unwrap(), generate(None).unwrap());
        assert_ne!(a, b);
        assert!(a.starts_with(PREFIX) && a.len() == PREFIX.len() + 64, "{a}");
        assert!(a[PREFIX.len()..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(hash(&a), hash(&format!("{a}\n")));
        assert_ne!(hash(&a), hash(&b));
        assert_eq!(pin_of(&a), None);
        let pin = Fingerprint([7; 32]);
        let pinned = generate(Some(pin)).unwrap();
        assert_eq!(pinned.len(), PREFIX.len() + 129, "{pinned}");
        assert_eq!(pin_of(&format!("{pinned}\n")), Some(pin));
        assert_eq!(pin_of("blxjt_zz_00"), None);
    }
}
