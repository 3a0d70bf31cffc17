#!/usr/bin/env bash
# Idle benchmark: host CPU of an idle guest on rustvisor's emu accelerator and, in the same
# run and over the same window, of the same kernel + initramfs under QEMU TCG (-M microvm,
# Debian's qemu-system-x86, a reference only). Both guests boot to the busybox shell of the
# test initramfs (no rv.test=1, so they stay up) and sit idle; after every guest has printed
# the init marker and SETTLE seconds have passed, the script samples each process's
# utime+stime (/proc/PID/stat, all threads) over IDLE seconds and prints
#   rustvisor-emu-idle-cpu-percent: X   (% of one host core)
#   qemu-tcg-idle-cpu-percent: Y
#   ratio-emu-vs-qemu-idle: X/Y
# plus, per host thread, its CPU share and voluntary context switches per second (each is
# one wake-up from a blocking wait), as a first hint of where idle time goes.
#
# Environment: IDLE (default 30 s), SETTLE (default 10 s), KERNEL (emu's kernel, default
# guest/vmlinuz; QEMU microvm boots guest/vmlinux, the same kernel as an ELF with PVH),
# CPUS (vCPUs of both guests, default 1), EMU_ARGS / QEMU_ARGS (more arguments for either,
# split on spaces), RUSTVISOR_EMU_TIER (passed through: interp, jit or auto), RUSTVISOR (the
# binary to measure; default: build this tree's release binary), BEFORE (optional: another
# rustvisor binary, e.g. one built from an older commit, booted the same way and measured
# over the same window: rustvisor-before-idle-cpu-percent and ratio-emu-vs-before-idle),
# QEMU_MACHINE (default microvm, as scripts/qemu-reference.sh; `pc` gives the guest an HPET
# and ACPI PM timer, so it refines its TSC calibration and runs tickless like the emu guest,
# where on microvm with tsc_early_khz it keeps the TSC-early clocksource and a 250 Hz tick).
set -euo pipefail
cd "$(dirname "$0")/.."
IDLE=${IDLE:-30}
SETTLE=${SETTLE:-10}
KERNEL=${KERNEL:-guest/vmlinuz}
CPUS=${CPUS:-1}
read -r -a emu_args <<<"${EMU_ARGS:-}"
read -r -a qemu_args <<<"${QEMU_ARGS:-}"
MARK=RUSTVISOR-INIT-OK
bash scripts/setup-guest.sh >/dev/null 2>&1
if [ -z "${RUSTVISOR:-}" ]; then
    cargo build --release -q
    RUSTVISOR="${CARGO_TARGET_DIR:-target}/release/rustvisor"
fi
command -v qemu-system-x86_64 >/dev/null || {
    echo "qemu-system-x86_64 missing (apt-get install qemu-system-x86)" >&2
    exit 1
}

TMP=$(mktemp -d)
declare -A pid
cleanup() {
    for p in "${pid[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

HZ=$(getconf CLK_TCK)
# utime+stime of process $1 in clock ticks (fields 14 and 15 of /proc/PID/stat; the comm
# field may hold spaces, so count from the closing parenthesis).
ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
# One line per thread of $1: "tid name ticks voluntary_switches".
threads() {
    local t
    for t in /proc/"$1"/task/*; do
        printf '%s %s %s %s\n' "${t##*/}" "$(tr ' ' '_' <"$t/comm")" \
            "$(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "$t/stat")" \
            "$(awk '/^voluntary_ctxt_switches/ { print $2 }' "$t/status")"
    done 2>/dev/null
}

# rustvisor NAME BINARY: boots the guest with its serial console in $TMP/NAME.log.
rustvisor() {
    # Each VM gets its own API socket when one is asked for.
    local args=("${emu_args[@]}") i
    for i in "${!args[@]}"; do
        [ "${args[$i]}" = --api-socket ] && args[i+1]="$TMP/$1.sock"
    done
    "$2" run --kernel "$KERNEL" --initrd guest/initrd.img --cmdline "console=ttyS0" \
        --memory 512M --cpus "$CPUS" --accel emu --serial "file=$TMP/$1.log" "${args[@]}" \
        </dev/null >"$TMP/$1.out" 2>&1 &
    pid[$1]=$!
}
names=(emu)
rustvisor emu "$RUSTVISOR"
if [ -n "${BEFORE:-}" ]; then
    names+=(before)
    rustvisor before "$BEFORE"
fi
# QEMU TCG, as scripts/qemu-reference.sh runs it. On microvm, tsc_early_khz avoids its known
# PIT calibration flake under TCG (see there); `pc` has an HPET and PM timer to fall back on.
HOST_KHZ=$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)
QEMU_MACHINE=${QEMU_MACHINE:-microvm}
qemu_append="console=ttyS0 tsc_early_khz=$HOST_KHZ"
if [ "$QEMU_MACHINE" != microvm ]; then
    qemu_args+=(-nic none)
    qemu_append="console=ttyS0"
fi
qemu-system-x86_64 -accel tcg -M "$QEMU_MACHINE" -cpu qemu64 -m 512 -smp "$CPUS" -display none -no-reboot \
    -serial "file:$TMP/qemu.log" -monitor none -kernel guest/vmlinux -initrd guest/initrd.img \
    -append "$qemu_append" "${qemu_args[@]}" </dev/null >"$TMP/qemu.out" 2>&1 &
pid[qemu]=$!
names+=(qemu)

deadline=$((SECONDS + 300))
for n in "${names[@]}"; do
    while ! grep -q "$MARK" "$TMP/$n.log" 2>/dev/null; do
        if ! kill -0 "${pid[$n]}" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
            echo "$n guest did not reach $MARK" >&2
            cat "$TMP/$n.out" "$TMP/$n.log" >&2 2>/dev/null || true
            exit 1
        fi
        sleep 0.2
    done
done
sleep "$SETTLE"

declare -A c0 c1
for n in "${names[@]}"; do threads "${pid[$n]}" >"$TMP/$n.t0"; c0[$n]=$(ticks "${pid[$n]}"); done
t0=$EPOCHREALTIME
sleep "$IDLE"
t1=$EPOCHREALTIME
for n in "${names[@]}"; do c1[$n]=$(ticks "${pid[$n]}"); threads "${pid[$n]}" >"$TMP/$n.t1"; done
secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')

declare -A pct
for n in "${names[@]}"; do
    pct[$n]=$(awk -v a="${c0[$n]}" -v b="${c1[$n]}" -v hz="$HZ" -v s="$secs" 'BEGIN { printf "%.2f", (b - a) / hz / s * 100 }')
    echo "# $n threads over the window: tid name cpu-percent wakeups-per-second"
    awk -v hz="$HZ" -v s="$secs" '
        NR == FNR { cpu[$1] = $3; sw[$1] = $4; next }
        { printf "#   %s %s %.2f %.1f\n", $1, $2, ($3 - cpu[$1]) / hz / s * 100, ($4 - sw[$1]) / s }' \
        "$TMP/$n.t0" "$TMP/$n.t1"
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "inf" }'; }
echo "setup: emu ${RUSTVISOR_EMU_TIER:-default tier} $KERNEL --cpus $CPUS ${EMU_ARGS:-}; qemu -M $QEMU_MACHINE -smp $CPUS ${QEMU_ARGS:-}"
echo "host-load-average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "idle-window-seconds: $(printf '%.1f' "$secs")"
echo "rustvisor-emu-idle-cpu-percent: ${pct[emu]}"
[ -n "${BEFORE:-}" ] && echo "rustvisor-before-idle-cpu-percent: ${pct[before]}"
echo "qemu-tcg-idle-cpu-percent: ${pct[qemu]}"
echo "ratio-emu-vs-qemu-idle: $(ratio "${pct[emu]}" "${pct[qemu]}")"
[ -n "${BEFORE:-}" ] && echo "ratio-emu-vs-before-idle: $(ratio "${pct[emu]}" "${pct[before]}")"
exit 0
