//! Any bytes as `Peer.Snapshot` chunks: assembled or refused, never holding
//! more than the announced (bounded) total; a completed snapshot is exactly
//! what was announced.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| blixard::properties::snapshot_chunks(data));
