#![no_main]
//! Fuzz target `virtio_vsock`: its body and input layout are `fuzzing::virtio_dev::vsock` (crates/fuzzing),
//! which `fuzzing::TARGETS` lists under the same name for the corpus replay on stable.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::virtio_dev::vsock(data));
