#![no_main]
//! Fuzz target `kernel_loader`: see crates/fuzzing (its body and input layout).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(body) = fuzzing::target("kernel_loader") {
        body(data);
    }
});
