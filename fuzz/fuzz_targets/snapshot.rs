#![no_main]
//! Fuzz target `snapshot`: its body and input layout are `fuzzing::snapshot::run` (crates/fuzzing),
//! which `fuzzing::TARGETS` lists under the same name for the corpus replay on stable.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::snapshot::run(data));
