#![no_main]
//! Fuzz target `api_vmm`: see crates/fuzzing (its body and input layout).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(body) = fuzzing::target("api_vmm") {
        body(data);
    }
});
