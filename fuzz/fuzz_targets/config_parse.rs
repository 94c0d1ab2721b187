//! Any config text is accepted or refused; never a panic, never an invalid name.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        blixard::properties::config_text(text);
    }
});
