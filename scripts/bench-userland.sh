#!/usr/bin/env bash
# A real Debian userland on rustvisor's emu accelerator against QEMU TCG (issue 13).
#
# 1. Builds (once; cached under guest/userland/, git-ignored) a Debian bookworm root file
#    system with mmdebstrap from the host's configured apt sources: systemd, udev,
#    linux-image-cloud-amd64, initramfs-tools (virtio_pci, virtio_blk, virtio_mmio and ext4
#    listed in /etc/initramfs-tools/modules), python3, openssl, xz-utils, sqlite3, gcc and
#    libc6-dev. Then the benchmark (scripts/guest/userland/: run.sh, bench.py, nbody.c compiled
#    in the image with its own gcc -O2, queries.sql, inputs made by gen.py) goes in, with
#    rv-bench.service, which starts after multi-user.target, prints one line per step and
#    powers off; the tree becomes a raw ext4 image (mkfs.ext4 -d). The benchmark layer is
#    rebuilt when those files change, the mmdebstrap tree only when it is missing.
# 2. Boots the image's own /boot/vmlinuz and initramfs-tools initrd, root=/dev/vda on a fresh
#    copy of the image per boot, 1 vCPU, MEMORY (1G) of RAM, in turn (never two at once):
#      emu   $BIN run --accel emu --disk path=COPY (virtio-blk on PCI)
#      qemu  qemu-system-x86_64 -accel tcg -M microvm,pcie=on -cpu $QEMU_CPU with
#            virtio-blk-pci (the Debian cloud kernel finds virtio-mmio devices only
#            through ACPI, so both VMMs give the guest a virtio-blk PCI device)
#    RUNS (1) times each, alternated; a boot is killed after BOOT_TIMEOUT (1800) seconds.
#    Kernel command line: console=ttyS0 root=/dev/vda rw panic=-1 quiet
#    systemd.show_status=1 $EXTRA_CMDLINE; QEMU's also gets tsc_early_khz=<host TSC kHz>:
#    microvm has no HPET or PM timer, and on a busy host the kernel's PIT calibration of the
#    TSC fails under TCG and the guest hangs (see scripts/qemu-reference.sh); TCG's TSC runs
#    at the host's rate, and emu's guest reads its TSC rate from CPUID leaf 0x15 instead.
# 3. Prints, per run: the boot's phases by the guest's clock (kernel to "Run /init",
#    initramfs-tools' /init to systemd in the real root, systemd to the benchmark); the host's
#    wall time from the VMM's start to systemd's "Reached target Multi-User System", to the
#    benchmark's start and to the VMM's exit (after power-off); the host's load average
#    before the boot (other work on the host slows both VMMs); each step's seconds by the
#    guest's clock (from its RV-STEP serial line) and its check value. Then a table of
#    medians: emu, QEMU, emu/QEMU. A check that differs between emu and QEMU is reported as a
#    MISMATCH. Serial logs, each line prefixed by the host's seconds since the VMM started,
#    are kept in guest/userland/logs/.
#
# Needs: root (mmdebstrap, chroot, mkfs.ext4 -d), the host's apt sources (network access to
# the Debian mirror for the first build; mmdebstrap is apt-get installed if missing), QEMU
# (qemu-system-x86; installed if missing; ONLY=emu skips it) and ~3 GiB of disk.
# Env: BIN (default: ${CARGO_TARGET_DIR:-target}/release/rustvisor after cargo build
# --release), RUNS, MEMORY, QEMU_CPU (default Westmere,+movbe,+rdrand: the feature set emu
# advertises, x86-64-v2 + AES-NI/PCLMULQDQ/MOVBE/RDRAND, less RDSEED, which TCG lacks, so
# the guest's libraries take the same code paths under both), ONLY (emu or qemu: boot only
# that one; image: build the image and stop), BOOT_TIMEOUT, EXTRA_CMDLINE.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUNS=${RUNS:-1}
MEMORY=${MEMORY:-1G}
QEMU_CPU=${QEMU_CPU:-Westmere,+movbe,+rdrand}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-1800}
ONLY=${ONLY:-}
CMDLINE="console=ttyS0 root=/dev/vda rw panic=-1 quiet systemd.show_status=1${EXTRA_CMDLINE:+ $EXTRA_CMDLINE}"
UL=$ROOT/guest/userland
SRC=$ROOT/scripts/guest/userland
STEPS=(python sha256 aes xz gcc nbody sqlite)

log() { echo "[bench-userland] $*" >&2; }
die() { echo "[bench-userland] ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap, chroot, mkfs.ext4 -d)"
if [ -z "${BIN:-}" ]; then
    cargo build --release -q
    BIN=${CARGO_TARGET_DIR:-target}/release/rustvisor
fi
[ -x "$BIN" ] || die "no rustvisor binary at $BIN"

need_tool() { # <command> <package>
    command -v "$1" >/dev/null 2>&1 && return 0
    log "installing $2 (for $1)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$2" >/dev/null \
        || { apt-get update -q >/dev/null \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$2" >/dev/null; }
}

# --- 1. the image ----------------------------------------------------------------------------
# Stage 1: the Debian tree (slow: downloads ~150 MB of packages). Kept as a directory.
build_rootfs() {
    need_tool mmdebstrap mmdebstrap
    local mirror=() tmp=$UL/rootfs.tmp
    # The host's configured apt sources (deb822 or one-line), else mmdebstrap's default mirror.
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        mirror=(/etc/apt/sources.list.d/debian.sources)
    elif [ -s /etc/apt/sources.list ]; then
        mirror=(/etc/apt/sources.list)
    fi
    rm -rf "$tmp"
    log "mmdebstrap bookworm into $tmp (a few minutes)"
    mmdebstrap --mode=root --variant=minbase --format=directory \
        --aptopt='Acquire::Check-Valid-Until "false"' \
        --include=systemd-sysv,udev,dbus,kmod,linux-image-cloud-amd64,initramfs-tools,python3,openssl,xz-utils,sqlite3,gcc,libc6-dev \
        --customize-hook='printf "virtio_pci\nvirtio_blk\nvirtio_mmio\next4\n" >> "$1/etc/initramfs-tools/modules"' \
        --customize-hook='chroot "$1" update-initramfs -u -k all' \
        --customize-hook='printf "/dev/vda / ext4 rw,errors=remount-ro 0 0\n" > "$1/etc/fstab"' \
        --customize-hook='echo rv-userland > "$1/etc/hostname"' \
        --customize-hook='echo 5c6b0e5a1f0d4c2b9a7e3d1c0b9a8f7e > "$1/etc/machine-id"' \
        --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*_Packages' \
        bookworm "$tmp" "${mirror[@]}" >&2
    mv "$tmp" "$UL/rootfs"
}

# Stage 2: the benchmark layer and the raw ext4 image (fast). Rebuilt when its inputs change.
build_image() {
    local r=$UL/rootfs kver
    rm -rf "$r/opt/rv-bench"
    mkdir -p "$r/opt/rv-bench/data"
    install -m 0755 "$SRC/run.sh" "$r/opt/rv-bench/run.sh"
    install -m 0644 "$SRC/bench.py" "$SRC/nbody.c" "$SRC/queries.sql" "$SRC/gen.py" "$r/opt/rv-bench/"
    chroot "$r" python3 /opt/rv-bench/gen.py /opt/rv-bench/data
    chroot "$r" gcc -O2 -o /opt/rv-bench/nbody /opt/rv-bench/nbody.c -lm
    cat > "$r/etc/systemd/system/rv-bench.service" <<'EOF'
[Unit]
Description=rustvisor userland benchmark (scripts/bench-userland.sh)
# Without default dependencies multi-user.target is not ordered after this unit, so it can be
# ordered after the target: the benchmark starts once the system is up.
DefaultDependencies=no
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/opt/rv-bench/run.sh
StandardOutput=journal+console
StandardError=journal

[Install]
WantedBy=multi-user.target
EOF
    chroot "$r" systemctl enable rv-bench.service >/dev/null 2>&1
    # A clean console and no background jobs during the steps: no gettys, no timers.
    chroot "$r" systemctl mask serial-getty@ttyS0.service getty@tty1.service apt-daily.timer \
        apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer >/dev/null 2>&1
    kver=$(ls "$r/lib/modules" | sort -V | tail -n1)
    [ -f "$r/boot/vmlinuz-$kver" ] && [ -f "$r/boot/initrd.img-$kver" ] \
        || die "the image has no /boot/vmlinuz-$kver and initrd.img-$kver"
    cp "$r/boot/vmlinuz-$kver" "$UL/vmlinuz"
    cp "$r/boot/initrd.img-$kver" "$UL/initrd.img"
    echo "$kver" > "$UL/kernel-version"
    local mb
    mb=$(( $(du -sm "$r" | cut -f1) + 512 ))
    rm -f "$UL/rootfs.ext4.tmp"
    mkfs.ext4 -q -F -L rv-userland -d "$r" "$UL/rootfs.ext4.tmp" "${mb}M"
    mv "$UL/rootfs.ext4.tmp" "$UL/rootfs.ext4"
}

mkdir -p "$UL/logs"
need_tool mkfs.ext4 e2fsprogs
[ -d "$UL/rootfs" ] || build_rootfs
inputs=$(cat "$0" "$SRC"/* | sha256sum | cut -c1-16)
if [ ! -f "$UL/rootfs.ext4" ] || [ "$(cat "$UL/inputs" 2>/dev/null)" != "$inputs" ]; then
    log "building the benchmark layer and guest/userland/rootfs.ext4"
    build_image
    echo "$inputs" > "$UL/inputs"
fi
log "image: $UL/rootfs.ext4 ($(du -m --apparent-size "$UL/rootfs.ext4" | cut -f1) MiB), kernel $(cat "$UL/kernel-version")"
[ "$ONLY" != image ] || exit 0

# --- 2. boots --------------------------------------------------------------------------------
DISK=$UL/run-disk.raw
trap 'rm -f "$DISK"' EXIT

EMU=("$BIN" run --accel emu --cpus 1 --memory "$MEMORY" --kernel "$UL/vmlinuz"
     --initrd "$UL/initrd.img" --cmdline "$CMDLINE" --disk "path=$DISK,format=raw"
     --serial stdio)
HOST_KHZ=$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)
QEMU=(qemu-system-x86_64 -accel tcg -M microvm,pcie=on -cpu "$QEMU_CPU" -smp 1
      -m "$MEMORY" -nographic -no-reboot -nodefaults -serial stdio
      -kernel "$UL/vmlinuz" -initrd "$UL/initrd.img" -append "$CMDLINE tsc_early_khz=$HOST_KHZ"
      -drive "file=$DISK,format=raw,if=none,id=vda,cache=writeback"
      -device virtio-blk-pci,drive=vda)

# boot NAME RUN: one boot on a fresh copy of the image; its serial console, each line
# prefixed by the host's seconds since the VMM started, goes to logs/NAME-RUN.log, and its
# figures to the associative array R[NAME,RUN,field].
declare -A R
boot() {
    local name=$1 run=$2 out=$UL/logs/$1-$2.log start line now rc="" argv
    if [ "$name" = emu ]; then argv=("${EMU[@]}"); else argv=("${QEMU[@]}"); fi
    cp --sparse=always "$UL/rootfs.ext4" "$DISK"
    R[$name,$run,load]=$(cut -d' ' -f1-3 /proc/loadavg)
    start=$EPOCHREALTIME
    : > "$out"
    while IFS= read -r line; do
        case "$line" in __VMM_RC=*) rc=${line#__VMM_RC=}; continue ;; esac
        now=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.2f", b - a}')
        line=${line//$'\r'/}
        printf '%s %s\n' "$now" "$line" >> "$out"
        # The benchmark's lines may come through the kernel log ("[ 22.46] run.sh[280]: RV-...").
        [[ "$line" != *RV-* ]] || line=RV-${line#*RV-}
        case "$line" in
            *"Reached target"*"Multi-User System"*) R[$name,$run,multiuser]=$now ;;
            RV-BENCH-START*) R[$name,$run,start]=$now ;;
            RV-BENCH-DONE*) R[$name,$run,done]=$now ;;
            RV-BOOT\ *)
                read -r _ R[$name,$run,kernel] R[$name,$run,initramfs] R[$name,$run,systemd] <<<"$line" ;;
            RV-STEP\ *)
                read -r _ s secs src check <<<"$line"
                R[$name,$run,$s]=$secs
                R[$name,$run,$s,check]="${check:-}"
                [ "$src" = 0 ] || R[$name,$run,$s]="failed(rc=$src)" ;;
        esac
    done < <(timeout "$BOOT_TIMEOUT" nice "${argv[@]}" </dev/null 2>&1; r=$?; echo; echo "__VMM_RC=$r")
    R[$name,$run,total]=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.2f", b - a}')
    R[$name,$run,rc]=${rc:-?}
    rm -f "$DISK"
}

VMMS=(emu qemu)
case "$ONLY" in emu) VMMS=(emu) ;; qemu) VMMS=(qemu) ;; "") need_tool qemu-system-x86_64 qemu-system-x86 ;; *) die "ONLY=emu|qemu|image" ;; esac
[ "$ONLY" != qemu ] || need_tool qemu-system-x86_64 qemu-system-x86
FIELDS=(kernel initramfs systemd multiuser start "${STEPS[@]}" done total)
for ((i = 1; i <= RUNS; i++)); do
    for v in "${VMMS[@]}"; do
        log "run $i/$RUNS: $v"
        boot "$v" "$i"
        line="$v run $i: exit ${R[$v,$i,rc]}, host load before ${R[$v,$i,load]}"
        for f in "${FIELDS[@]}"; do line+=", $f ${R[$v,$i,$f]:--}"; done
        echo "$line"
        for s in "${STEPS[@]}"; do
            echo "  $v run $i check $s: ${R[$v,$i,$s,check]:--}"
        done
    done
done

# --- 3. the table ----------------------------------------------------------------------------
median() { tr ' ' '\n' | { grep -E '^[0-9.]+$' || true; } | sort -n | awk '{v[NR]=$1} END {if (NR==0) print "-"; else print v[int((NR+1)/2)]}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && b > 0) printf "%.2f", a / b; else print "-"}'; }
med() { # <vmm> <field>
    local i vals=""
    for ((i = 1; i <= RUNS; i++)); do vals+=" ${R[$1,$i,$2]:-}"; done
    echo "$vals" | median
}
label() {
    case "$1" in
        kernel) echo "boot: kernel, to Run /init (guest clock)" ;;
        initramfs) echo "boot: initramfs, to systemd (guest clock)" ;;
        systemd) echo "boot: systemd, to benchmark (guest clock)" ;;
        multiuser) echo "boot to multi-user.target (host wall)" ;;
        start) echo "boot to benchmark start (host wall)" ;;
        done) echo "boot + all steps (host wall)" ;;
        total) echo "total, to VMM exit (host wall)" ;;
        *) echo "step $1 (guest clock)" ;;
    esac
}
echo
echo "Debian bookworm userland, kernel $(cat "$UL/kernel-version"), $MEMORY, 1 vCPU, median of $RUNS run(s);"
echo "QEMU: -accel tcg -M microvm,pcie=on -cpu $QEMU_CPU, virtio-blk-pci; emu: $BIN"
printf '| %-42s | %9s | %9s | %9s |\n' "seconds" "emu" "QEMU TCG" "emu/QEMU"
printf '|%s|%s|%s|%s|\n' "--------------------------------------------" "-----------" "-----------" "-----------"
for f in "${FIELDS[@]}"; do
    e=$(med emu "$f") q=$(med qemu "$f")
    printf '| %-42s | %9s | %9s | %9s |\n' "$(label "$f")" "$e" "$q" "$(ratio "$e" "$q")"
done
# The steps' results must not depend on the CPU.
if [ -z "$ONLY" ]; then
    for ((i = 1; i <= RUNS; i++)); do
        for s in "${STEPS[@]}"; do
            if [ "${R[emu,$i,$s,check]:-}" != "${R[qemu,$i,$s,check]:-}" ]; then
                echo "MISMATCH run $i step $s: emu '${R[emu,$i,$s,check]:-}' qemu '${R[qemu,$i,$s,check]:-}'"
            fi
        done
    done
fi
