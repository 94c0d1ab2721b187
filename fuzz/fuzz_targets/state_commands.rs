//! Any framed bytes as state commands: decoded, applied, invariants kept,
//! a rejected command changes nothing.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| blixard::properties::commands(data));
