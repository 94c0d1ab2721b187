//! Any bytes as a `Peer.Raft` batch: judged by the trust table, and what it
//! accepts holds to the table's rows and steps into a real core without a
//! panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| blixard::properties::raft_batch(data));
