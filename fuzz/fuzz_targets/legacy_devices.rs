#![no_main]
//! Fuzz target `legacy_devices`: its body and input layout are `fuzzing::legacy::run` (crates/fuzzing),
//! which `fuzzing::TARGETS` lists under the same name for the corpus replay on stable.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::legacy::run(data));
