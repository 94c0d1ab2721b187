//! Any bytes as a `Peer.Propose` request: an accepted command is never the
//! leader's, and a report is about its sender.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| blixard::properties::propose_request(data));
