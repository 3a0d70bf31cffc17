#!/usr/bin/env bash
# The project's test command (README command 2; .ci/run calls exactly this).
# Builds the Debian guest if it is missing (cached under guest/), then runs every test:
# unit tests, differential CPU tests, kvm tiny-guest tests and the guest boot tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-guest.sh
cargo test --workspace
