#![no_main]
//! Fuzz target `x86emu`: see crates/fuzzing (its body and input layout).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(body) = fuzzing::target("x86emu") {
        body(data);
    }
});
