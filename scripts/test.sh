#!/usr/bin/env bash
# The project's test command (README command 2; .ci/run calls exactly this).
# Builds the Debian guest if it is missing (cached under guest/), then runs every test:
# formatting, clippy (warnings are errors) and rustdoc first, then every test: unit tests,
# differential CPU tests, kvm tiny-guest tests and the guest boot tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-guest.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
cargo test --workspace
# The emulator's differential tests again with every 64-bit block compiled (the translation
# tier must match the hardware exactly as the interpreter does).
RUSTVISOR_EMU_TIER=jit cargo test -p x86emu --test differential --test differential_v2 --test smp --test jit
# And with every 64-bit block given baseline code only (the template tier that runs warm
# blocks before Cranelift compiles them).
RUSTVISOR_EMU_TIER=base cargo test -p x86emu --test differential --test differential_v2 --test smp --test jit
