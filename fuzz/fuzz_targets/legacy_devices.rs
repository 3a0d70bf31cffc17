#![no_main]
//! Fuzz target `legacy_devices`: see crates/fuzzing (its body and input layout).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(body) = fuzzing::target("legacy_devices") {
        body(data);
    }
});
