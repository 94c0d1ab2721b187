//! Any bytes as a `VmCreate` request: the edge check agrees with apply.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| blixard::properties::vm_create_request(data));
