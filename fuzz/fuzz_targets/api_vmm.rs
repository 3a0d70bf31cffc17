#![no_main]
//! Fuzz target `api_vmm`: its body and input layout are `fuzzing::api::vmm` (crates/fuzzing),
//! which `fuzzing::TARGETS` lists under the same name for the corpus replay on stable.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::api::vmm(data));
