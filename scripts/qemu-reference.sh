#!/usr/bin/env bash
# Reference boot of the rustvisor test guest under QEMU TCG (microvm, PVH entry
# via the ELF vmlinux). Only a yardstick for comparison: rustvisor never
# depends on QEMU.
#
# Usage: scripts/qemu-reference.sh [extra kernel args...]
#   default kernel args: console=ttyS0 panic=-1 rv.test=1
#   env QEMU_TIMEOUT (default 120 s per attempt), QEMU_ATTEMPTS (default 3)
# Prints the guest console, then:
#   qemu-tcg-init-marker-seconds: X   (wall time until RUSTVISOR-INIT-OK)
#   qemu-tcg-total-seconds: Y         (wall time until QEMU exited)
#   qemu-tcg-attempts: N, qemu-tcg-cmdline: <kernel args of the last attempt>
# Exit status: QEMU's (0 after a guest poweroff), 124 on timeout.
#
# Known TCG flake: the kernel's PIT-based TSC calibration sometimes fails
# under TCG timing jitter ("tsc: Marking TSC unstable due to could not
# calculate TSC khz"); microvm has no HPET/PM timer to fall back on and the
# guest then hangs in delay-loop calibration. Such an attempt is killed at
# once and retried with tsc_early_khz=<host kHz> added (TCG's guest TSC runs
# at the host TSC rate), which skips that calibration. Frequent on a busy host.
set -euo pipefail

GUEST="$(cd "$(dirname "$0")/.." && pwd)/guest"
TIMEOUT=${QEMU_TIMEOUT:-120}
ATTEMPTS=${QEMU_ATTEMPTS:-3}

for f in vmlinux initrd.img; do
    [ -f "$GUEST/$f" ] || { echo "missing $GUEST/$f: run scripts/setup-guest.sh" >&2; exit 1; }
done

if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    echo "[qemu-reference] installing qemu-system-x86" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-system-x86 >/dev/null
fi

APPEND="console=ttyS0 panic=-1 rv.test=1${*:+ $*}"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# microvm: the ISA serial port (ttyS0) and ACPI are on by default, so the
# guest's poweroff works via ACPI S5; -no-reboot makes reboot/panic exit QEMU.
QEMU=(qemu-system-x86_64 -accel tcg -M microvm -cpu qemu64 -m 512
      -nographic -no-reboot -pidfile "$TMP/qemu.pid"
      -kernel "$GUEST/vmlinux" -initrd "$GUEST/initrd.img")
# Host TSC rate in kHz (for the flake workaround), from /proc/cpuinfo.
HOST_KHZ=$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)

secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

attempt=0
while :; do
    attempt=$((attempt + 1))
    rm -f "$TMP/qemu.pid"
    start=$EPOCHREALTIME marker="" rc="" flake=""
    # Stream the console line by line and timestamp the init marker.
    while IFS= read -r line; do
        case "$line" in __QEMU_RC=*) rc=${line#__QEMU_RC=}; continue ;; esac
        printf '%s\n' "$line"
        if [ -z "$marker" ] && [[ "$line" == *RUSTVISOR-INIT-OK* ]]; then
            marker=$EPOCHREALTIME
        fi
        if [ -z "$flake" ] && [[ "$line" == *"Marking TSC unstable due to could not calculate TSC khz"* ]]; then
            flake=1
            [ -s "$TMP/qemu.pid" ] && kill "$(cat "$TMP/qemu.pid")" 2>/dev/null || true
        fi
    done < <(timeout "$TIMEOUT" "${QEMU[@]}" -append "$APPEND" </dev/null 2>&1; r=$?; echo; echo "__QEMU_RC=$r")
    end=$EPOCHREALTIME
    if [ -n "$flake" ] && [ "$attempt" -lt "$ATTEMPTS" ]; then
        echo "[qemu-reference] TSC calibration flake, retrying (attempt $((attempt + 1))/$ATTEMPTS) with tsc_early_khz=$HOST_KHZ" >&2
        [[ "$APPEND" == *tsc_early_khz=* ]] || APPEND="$APPEND tsc_early_khz=$HOST_KHZ"
        continue
    fi
    break
done

if [ -n "$marker" ]; then
    echo "qemu-tcg-init-marker-seconds: $(secs "$start" "$marker")"
else
    echo "qemu-tcg-init-marker-seconds: none (marker not seen)"
fi
echo "qemu-tcg-total-seconds: $(secs "$start" "$end")"
echo "qemu-tcg-attempts: $attempt"
echo "qemu-tcg-cmdline: $APPEND"
[ -n "$flake" ] && rc=1   # killed by us: report failure, not QEMU's status
[ "$rc" = 124 ] && echo "[qemu-reference] QEMU did not exit within ${TIMEOUT}s (killed)" >&2
exit "${rc:-1}"
