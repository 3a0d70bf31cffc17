#![no_main]
//! Fuzz target `x86emu`: its body and input layout are `fuzzing::emu::run` (crates/fuzzing),
//! which `fuzzing::TARGETS` lists under the same name for the corpus replay on stable.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::emu::run(data));
