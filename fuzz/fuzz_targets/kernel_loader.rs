#![no_main]
//! Fuzz target `kernel_loader`: its body and input layout are `fuzzing::loader::run` (crates/fuzzing),
//! which `fuzzing::TARGETS` lists under the same name for the corpus replay on stable.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::loader::run(data));
