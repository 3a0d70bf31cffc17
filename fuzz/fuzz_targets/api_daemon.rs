#![no_main]
//! Fuzz target `api_daemon`: see crates/fuzzing (its body and input layout).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(body) = fuzzing::target("api_daemon") {
        body(data);
    }
});
