#![no_main]
//! Fuzz target `qcow2`: its body and input layout are `fuzzing::qcow2::run` (crates/fuzzing),
//! which `fuzzing::TARGETS` lists under the same name for the corpus replay on stable.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::qcow2::run(data));
