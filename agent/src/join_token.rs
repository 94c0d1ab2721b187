//! One-time join tokens: how a host without a member certificate (a
//! cluster without TLS) is admitted.
//!
//! `cluster join-token` makes a token on the member that receives it: 32
//! random bytes from the operating system's generator, written as
//! `blxjt_` and 64 hex digits. Only its SHA-256 is proposed
//! (`CommandKind::AddJoinToken`), so the secret is never in the Raft log,
//! the state, a snapshot or a log line; the operator who asked is the only
//! one who sees it. A joining host presents it in its admission request; the
//! leader proposes `UseJoinToken` with its hash before adding the host as a
//! learner, and the state machine accepts that only for an unexpired token
//! that no other host used.

use sha2::{Digest, Sha256};

/// What every token starts with, so that a leaked one is recognisable.
pub const PREFIX: &str = "blxjt_";
/// How long a token lives when the operator does not say: one hour.
pub const DEFAULT_TTL_SECS: u64 = 3600;

/// A new token from the operating system's random generator.
pub fn generate() -> Result<String, std::io::Error> {
    let mut bytes = [0u8; 32];
    getrandom(&mut bytes)?;
    let mut token = String::with_capacity(PREFIX.len() + 64);
    token.push_str(PREFIX);
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
        let (a, b) = (generate().unwrap(), generate().unwrap());
        assert_ne!(a, b);
        assert!(a.starts_with(PREFIX) && a.len() == PREFIX.len() + 64, "{a}");
        assert!(a[PREFIX.len()..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(hash(&a), hash(&format!("{a}\n")));
        assert_ne!(hash(&a), hash(&b));
    }
}
