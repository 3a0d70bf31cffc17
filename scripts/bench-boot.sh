#!/usr/bin/env bash
# Boot benchmark: the Debian guest to its init marker on rustvisor's emu accelerator, and in
# the same run the same kernel + initramfs under QEMU TCG (-M microvm, Debian's
# qemu-system-x86, a reference only). Prints both wall times and their ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-guest.sh >/dev/null 2>&1
cargo build --release -q
MARK=RUSTVISOR-INIT-OK
log=$(mktemp)

# Seconds from start until $MARK appears in $log, while the command runs in the background.
time_to_marker() {
    local start end
    start=$(date +%s.%N)
    "$@" &
    local pid=$!
    while ! grep -q "$MARK" "$log" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then echo "failed"; return 1; fi
        sleep 0.05
    done
    end=$(date +%s.%N)
    wait "$pid" || true
    awk -v a="$start" -v b="$end" 'BEGIN {print b - a}'
}

for kernel in vmlinuz vmlinux; do
    : > "$log"
    t=$(time_to_marker "${CARGO_TARGET_DIR:-target}/release/rustvisor" run --kernel "guest/$kernel" --initrd guest/initrd.img \
        --cmdline "console=ttyS0 panic=-1 rv.test=1" --memory 512M --accel emu --serial "file=$log")
    printf 'rustvisor-emu-%s-init-marker-seconds: %.2f\n' "$kernel" "$t"
    eval "emu_$kernel=$t"
done
q=$(bash scripts/qemu-reference.sh 2>/dev/null | awk '/qemu-tcg-init-marker-seconds/ {print $2}')
printf 'qemu-tcg-init-marker-seconds: %.2f\n' "$q"
printf 'ratio-emu-bzimage-vs-qemu: %.1f\n' "$(awk -v a="$emu_vmlinuz" -v b="$q" 'BEGIN {print a / b}')"
printf 'ratio-emu-pvh-vs-qemu: %.1f\n' "$(awk -v a="$emu_vmlinux" -v b="$q" 'BEGIN {print a / b}')"
rm -f "$log"
