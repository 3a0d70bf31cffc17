#!/usr/bin/env bash
# The emu accelerator's execution tiers against QEMU TCG, in the same run:
#   1. Boot of the Debian test guest (bzImage) to its init marker, RUNS (3) alternated runs
#      of each of: rustvisor emu with RUSTVISOR_EMU_TIER=interp, with =base (the baseline
#      tier alone), with =auto (the default: baseline code for warm blocks, Cranelift's
#      for hot ones), and qemu-system-x86_64 -accel tcg -M microvm (the reference,
#      scripts/qemu-reference.sh); medians, and each one's ratio to QEMU's.
#   2. Host instructions per guest instruction of crates/x86emu/examples/emu_loop.rs under
#      callgrind (noise-free), tier interp and tier jit (every block compiled in place).
#   3. Nanoseconds per guest instruction of crates/x86emu/examples/mpi_loop.rs (the RSA
#      multiply-subtract loop that is half of the boot's guest instructions) and of
#      examples/nbody_loop.rs (the n-body step in scalar SSE2 double), interp, base and auto.
# Needs the guest from scripts/setup-guest.sh; QEMU and valgrind are optional (skipped with
# a note when missing). Prints one "name: value" line per figure, then a table.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
bash scripts/setup-guest.sh >/dev/null 2>&1
cargo build --release -q
cargo build --release -q -p x86emu --example emu_loop --example mpi_loop --example nbody_loop
bin=${CARGO_TARGET_DIR:-target}/release
MARK=RUSTVISOR-INIT-OK
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Seconds from start until $MARK appears in $log while "$@" runs.
time_to_marker() {
    local start end pid
    : >"$log"
    start=$(date +%s.%N)
    "$@" >/dev/null 2>&1 &
    pid=$!
    while ! grep -q "$MARK" "$log" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then echo failed; return 0; fi
        sleep 0.02
    done
    end=$(date +%s.%N)
    wait "$pid" || true
    awk -v a="$start" -v b="$end" 'BEGIN {printf "%.2f", b - a}'
}

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{v[NR]=$1} END {if (NR==0) print "-"; else print v[int((NR+1)/2)]}'; }

emu() {
    RUSTVISOR_EMU_TIER=$1 "$bin/rustvisor" run --kernel guest/vmlinuz --initrd guest/initrd.img \
        --cmdline "console=ttyS0 panic=-1 rv.test=1" --memory 512M --accel emu --serial "file=$log"
}

declare -A t=([interp]="" [base]="" [auto]="" [qemu]="")
have_qemu=1
command -v qemu-system-x86_64 >/dev/null || have_qemu=0
for ((i = 1; i <= RUNS; i++)); do
    for tier in interp base auto; do
        t[$tier]+=" $(time_to_marker emu "$tier")"
    done
    if ((have_qemu)); then
        t[qemu]+=" $(bash scripts/qemu-reference.sh 2>/dev/null | awk '/qemu-tcg-init-marker-seconds/ {print $2}')"
    fi
done
declare -A m
for k in interp base auto qemu; do
    m[$k]=$(echo "${t[$k]}" | median)
    printf 'boot-%s-seconds: %s (runs:%s)\n' "$k" "${m[$k]}" "${t[$k]}"
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b + 0 > 0 && a + 0 > 0) printf "%.2f", a / b; else print "-"}'; }

# callgrind: host instructions per guest instruction (200,000 iterations, 18 guest
# instructions each: the example prints the guest count).
declare -A hpg
if command -v valgrind >/dev/null; then
    for tier in interp jit; do
        out=$(mktemp)
        guest=$(RUSTVISOR_EMU_TIER=$tier valgrind --tool=callgrind --callgrind-out-file="$out" \
            "$bin/examples/emu_loop" 200000 2>/dev/null | awk '/guest instructions:/ {gsub(",", "", $3); print $3}')
        host=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
        rm -f "$out"
        hpg[$tier]=$(awk -v h="$host" -v g="$guest" 'BEGIN {if (g > 0) printf "%.1f", h / g; else print "-"}')
        printf 'emu-loop-%s-host-per-guest-instruction: %s (host %s, guest %s)\n' "$tier" "${hpg[$tier]}" "$host" "$guest"
    done
else
    echo "emu-loop: skipped: valgrind is not installed"
fi

declare -A mpi nbody
for tier in interp base auto; do
    mpi[$tier]=$(RUSTVISOR_EMU_TIER=$tier "$bin/examples/mpi_loop" | awk '/ns per guest instruction/ {print $(NF-4)}')
    printf 'mpi-loop-%s-ns-per-guest-instruction: %s\n' "$tier" "${mpi[$tier]}"
    nbody[$tier]=$(RUSTVISOR_EMU_TIER=$tier "$bin/examples/nbody_loop" | awk '/ns per guest instruction/ {print $(NF-4)}')
    printf 'nbody-loop-%s-ns-per-guest-instruction: %s\n' "$tier" "${nbody[$tier]}"
done

echo
printf '| %-38s | %9s | %11s |\n' "boot to init marker (median of $RUNS)" seconds "vs QEMU TCG"
printf '|%s|%s|%s|\n' "----------------------------------------" "-----------" "-------------"
printf '| %-38s | %9s | %11s |\n' "QEMU TCG (-M microvm)" "${m[qemu]}" "1.00"
printf '| %-38s | %9s | %11s |\n' "rustvisor emu, interp" "${m[interp]}" "$(ratio "${m[interp]}" "${m[qemu]}")"
printf '| %-38s | %9s | %11s |\n' "rustvisor emu, base (baseline tier)" "${m[base]}" "$(ratio "${m[base]}" "${m[qemu]}")"
printf '| %-38s | %9s | %11s |\n' "rustvisor emu, auto (translation tier)" "${m[auto]}" "$(ratio "${m[auto]}" "${m[qemu]}")"
if [[ -n ${hpg[interp]:-} ]]; then
    printf '\nemu_loop host instructions per guest instruction: interp %s, jit %s\n' "${hpg[interp]}" "${hpg[jit]}"
fi
printf 'mpi_loop ns per guest instruction: interp %s, base %s, auto %s\n' "${mpi[interp]}" "${mpi[base]}" "${mpi[auto]}"
printf 'nbody_loop ns per guest instruction: interp %s, base %s, auto %s\n' "${nbody[interp]}" "${nbody[base]}" "${nbody[auto]}"
