//! Names of VMs and nodes.
//!
//! A name ends up in a systemd unit name (`microvm@NAME.service`), in a path
//! under the microvm state dir and in DNS, so it is restricted to
//! `^[a-z0-9][a-z0-9-]{0,62}$`. Names are checked at the edge (CLI, gRPC,
//! config) and again when a command is applied, so that no name that could
//! escape a unit name or a directory ever reaches the state.

use std::fmt;

/// The longest accepted name, in bytes (DNS label limit).
pub const NAME_LEN_MAX: usize = 63;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("a name cannot be empty")]
    Empty,
    #[error("name {name:?} is {len} characters long; the limit is {NAME_LEN_MAX}")]
    TooLong { name: String, len: usize },
    #[error(
        "name {name:?} must start with a lower-case letter or digit and contain only lower-case letters, digits and '-'"
    )]
    Invalid { name: String },
}

/// Checks `name` against `^[a-z0-9][a-z0-9-]{0,62}$`.
pub fn validate(name: &str) -> Result<(), NameError> {
    let bytes = name.as_bytes();
    let Some(&first) = bytes.first() else {
        return Err(NameError::Empty);
    };
    let chars = name.chars().count();
    if chars > NAME_LEN_MAX {
        return Err(NameError::TooLong { name: truncate_for_display(name), len: chars });
    }
    let ok_first = first.is_ascii_lowercase() || first.is_ascii_digit();
    let ok_rest = bytes[1..].iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    if ok_first && ok_rest { Ok(()) } else { Err(NameError::Invalid { name: truncate_for_display(name) }) }
}

/// Keeps error messages one readable line even for hostile input: at most
/// 80 characters of `name`, then `…`.
pub fn truncate_for_display(name: &str) -> String {
    const SHOWN_MAX: usize = 80;
    if name.chars().count() <= SHOWN_MAX {
        name.to_owned()
    } else {
        let mut shown: String = name.chars().take(SHOWN_MAX).collect();
        shown.push('…');
        shown
    }
}

/// A validated name; the only way to build one is [`Name::new`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        validate(&name)?;
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Name {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Name::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_valid_names() {
        for name in ["a", "0", "web-1", "h1", &"a".repeat(63)] {
            assert_eq!(validate(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn refuses_names_that_could_escape_a_unit_or_path() {
        let bad = ["", "../x", "a b", "x.service", "A", "Web", "-a", "a_b", "a/b", "é", "a\n", "ａ", "a@b", "a.", "."];
        for name in bad {
            assert!(validate(name).is_err(), "{name:?} should be refused");
        }
        assert!(matches!(validate(&"a".repeat(64)), Err(NameError::TooLong { len: 64, .. })));
    }

    proptest! {
        #[test]
        fn validation_matches_the_documented_pattern(name in "\\PC{0,70}") {
            let expected = {
                let b = name.as_bytes();
                !b.is_empty()
                    && b.len() <= 63
                    && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
                    && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            };
            prop_assert_eq!(validate(&name).is_ok(), expected);
        }

        #[test]
        fn accepted_names_are_safe_in_units_and_paths(name in "[a-z0-9][a-z0-9-]{0,62}") {
            prop_assert!(validate(&name).is_ok());
            prop_assert!(!name.contains('/') && !name.contains('.') && !name.contains('@'));
        }
    }
}
