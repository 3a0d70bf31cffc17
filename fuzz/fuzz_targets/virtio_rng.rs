#![no_main]
//! Fuzz target `virtio_rng`: see crates/fuzzing (its body and input layout).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(body) = fuzzing::target("virtio_rng") {
        body(data);
    }
});
