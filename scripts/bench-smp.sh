#!/usr/bin/env bash
# SMP benchmark (issue 12): a CPU-bound guest workload in 2 processes (two shell busy
# loops of $WORK iterations, timed by the guest's own clock) with 1 and 2 vCPUs, on
# rustvisor's emu and, in the same run, on QEMU TCG (-M microvm, multi-threaded TCG: one
# host thread per vCPU, Debian's qemu-system-x86, a reference only); plus the boot time
# to the init marker. Prints each time and the 2-vCPU speed-ups.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-guest.sh >/dev/null 2>&1
cargo build --release -q
WORK=${WORK:-200000}
script='t0=$(cut -d" " -f1 /proc/uptime); for i in 1 2; do (n=0; while [ $n -lt '"$WORK"' ]; do n=$((n+1)); done) & done; wait; t1=$(cut -d" " -f1 /proc/uptime); echo "RV-SMP-WORK $t0 $t1"; poweroff -f'
b64=$(printf '%s' "$script" | base64 -w0)
APPEND="console=ttyS0 panic=-1 rv.cmd=$b64"
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Runs "$@" (its console in $log); prints "<seconds to the init marker> <workload seconds>".
measure() {
    : > "$log"
    local start marker=""
    start=$EPOCHREALTIME
    "$@" &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        if [ -z "$marker" ] && grep -q RUSTVISOR-INIT-OK "$log" 2>/dev/null; then marker=$EPOCHREALTIME; fi
        sleep 0.05
    done
    wait "$pid" || true
    local work
    work=$(awk '/RV-SMP-WORK/ {printf "%.2f", $3 - $2; exit}' "$log")
    awk -v a="$start" -v b="${marker:-0}" -v w="${work:-nan}" 'BEGIN {printf "%.2f %s\n", b - a, w}'
}

declare -A boot work
for n in 1 2; do
    read -r b w < <(measure "${CARGO_TARGET_DIR:-target}/release/rustvisor" run --kernel guest/vmlinuz --initrd guest/initrd.img \
        --cmdline "$APPEND" --memory 512M --cpus "$n" --accel emu --serial "file=$log")
    boot[emu$n]=$b work[emu$n]=$w
    printf 'rustvisor-emu-cpus%d: boot-to-init %ss, 2-process workload %ss\n' "$n" "$b" "$w"
    read -r b w < <(measure bash -c 'timeout 300 qemu-system-x86_64 -accel tcg,thread=multi -M microvm \
        -cpu qemu64 -smp '"$n"' -m 512 -nographic -no-reboot -kernel guest/vmlinux -initrd guest/initrd.img \
        -append "$0" </dev/null > '"$log"' 2>&1' "$APPEND")
    boot[qemu$n]=$b work[qemu$n]=$w
    printf 'qemu-tcg-smp%d: boot-to-init %ss, 2-process workload %ss\n' "$n" "$b" "$w"
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
printf 'speedup-emu-2-vcpus: %s\n' "$(ratio "${work[emu1]}" "${work[emu2]}")"
printf 'speedup-qemu-tcg-2-vcpus: %s\n' "$(ratio "${work[qemu1]}" "${work[qemu2]}")"
printf 'boot-emu-2-vs-1-vcpus: %s\n' "$(ratio "${boot[emu2]}" "${boot[emu1]}")"
printf 'workload-emu-vs-qemu-2-vcpus: %s\n' "$(ratio "${work[emu2]}" "${work[qemu2]}")"
