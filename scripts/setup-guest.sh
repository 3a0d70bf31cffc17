#!/usr/bin/env bash
# Build the rustvisor test guest from Debian packages only.
#
# Produces, under <repo>/guest/ (git-ignored):
#   vmlinuz               Debian cloud kernel bzImage (as shipped in /boot)
#   vmlinux               uncompressed ELF kernel cut out of the bzImage (PVH entry)
#   kernel-version        kernel release string (what `uname -r` prints in the guest)
#   initrd.img            gzip'd newc cpio: static busybox + /init
#   rv-test-data.sha256   hex sha256 of /etc/rv-test-data inside the initrd
#   debs/                 cached .deb downloads
#
# Idempotent: cached .debs are reused, everything else is rebuilt.
# Must run as root (mknod for /dev nodes, apt-get install of helper tools).
set -euo pipefail

GUEST="$(cd "$(dirname "$0")/.." && pwd)/guest"
DEBS="$GUEST/debs"
mkdir -p "$DEBS"

log() { echo "[setup-guest] $*" >&2; }
die() { echo "[setup-guest] ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (needs mknod)"

# Install a Debian package if the given command is missing.
need_tool() { # <command> <package>
    command -v "$1" >/dev/null 2>&1 && return 0
    log "installing $2 (for $1)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >/dev/null; }
}
need_tool lz4 lz4
need_tool cpio cpio
need_tool readelf binutils
need_tool dpkg-deb dpkg
need_tool gcc gcc                  # builds the guest's static rv-vsock helper
need_tool qemu-img qemu-utils      # the tests make qcow2 images with it
need_tool mkfs.ext4 e2fsprogs      # ... and ext4 images, read back with debugfs
need_tool nft nftables             # hostnet: NAT, isolation and VM firewall rules
need_tool dnsmasq dnsmasq-base     # hostnet: DHCP on virtual networks
need_tool ip iproute2              # hostnet's tests read links back with ip and bridge

# Download a package into debs/ unless a .deb for it is already cached.
# Prints the path of the .deb.
fetch_deb() { # <package>
    local pkg="$1" f
    f=$(ls "$DEBS/${pkg}_"*.deb 2>/dev/null | sort -V | tail -n1 || true)
    if [ -z "$f" ]; then
        log "downloading $pkg"
        ( cd "$DEBS" && { apt-get download -q "$pkg" >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get download -q "$pkg" >/dev/null; }; } )
        f=$(ls "$DEBS/${pkg}_"*.deb 2>/dev/null | sort -V | tail -n1 || true)
        [ -n "$f" ] || die "download of $pkg failed"
    fi
    echo "$f"
}

# --- 1. resolve + fetch packages -------------------------------------------
# linux-image-cloud-amd64 is a metapackage; pick its linux-image-* dependency.
# If an image .deb is already cached, reuse it (keeps reruns offline-safe).
KPKG_DEB=$(ls "$DEBS"/linux-image-6.*-cloud-amd64_*.deb 2>/dev/null | sort -V | tail -n1 || true)
if [ -z "$KPKG_DEB" ]; then
    KPKG=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n1)
    if [ -z "$KPKG" ]; then
        apt-get update -q >/dev/null
        KPKG=$(apt-cache depends linux-image-cloud-amd64 \
            | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n1)
    fi
    [ -n "$KPKG" ] || die "cannot resolve linux-image-cloud-amd64"
    KPKG_DEB=$(fetch_deb "$KPKG")
fi
BB_DEB=$(fetch_deb busybox-static)
log "kernel package:  $(basename "$KPKG_DEB")"
log "busybox package: $(basename "$BB_DEB")"

# Extract fresh each run (cheap, and avoids stale files from older versions).
rm -rf "$GUEST/rootfs-kernel" "$GUEST/rootfs-busybox"
mkdir -p "$GUEST/rootfs-kernel" "$GUEST/rootfs-busybox"
dpkg-deb -x "$KPKG_DEB" "$GUEST/rootfs-kernel"
dpkg-deb -x "$BB_DEB" "$GUEST/rootfs-busybox"

# --- 2. vmlinuz + kernel-version -------------------------------------------
KVER=$(ls "$GUEST/rootfs-kernel/lib/modules" | head -n1)
[ -n "$KVER" ] || die "no /lib/modules/<ver> in kernel package"
[ -f "$GUEST/rootfs-kernel/boot/vmlinuz-$KVER" ] || die "missing /boot/vmlinuz-$KVER"
cp "$GUEST/rootfs-kernel/boot/vmlinuz-$KVER" "$GUEST/vmlinuz"
printf '%s\n' "$KVER" > "$GUEST/kernel-version"

# --- 3. vmlinux: cut the compressed payload out of the bzImage ---------------
# Little-endian unsigned int of <len> bytes at <offset> of <file>.
le() { # <file> <offset> <len>
    od -An -tu"$3" -j "$2" -N "$3" --endian=little "$1" | tr -d ' '
}
BZ="$GUEST/vmlinuz"
[ "$(dd if="$BZ" bs=1 skip=$((0x202)) count=4 status=none)" = "HdrS" ] || die "vmlinuz is not a bzImage"
SETUP_SECTS=$(le "$BZ" $((0x1f1)) 1)
[ "$SETUP_SECTS" -ne 0 ] || SETUP_SECTS=4
PM_START=$(( (SETUP_SECTS + 1) * 512 ))            # start of protected-mode code
PAYLOAD_OFF=$(le "$BZ" $((0x248)) 4)                # relative to PM_START
PAYLOAD_LEN=$(le "$BZ" $((0x24c)) 4)
log "bzImage: setup_sects=$SETUP_SECTS payload_offset=$PAYLOAD_OFF payload_length=$PAYLOAD_LEN"
PAYLOAD="$GUEST/payload.bin"
dd if="$BZ" of="$PAYLOAD" iflag=skip_bytes,count_bytes bs=64K \
    skip=$(( PM_START + PAYLOAD_OFF )) count="$PAYLOAD_LEN" status=none
MAGIC=$(od -An -tx1 -N4 "$PAYLOAD" | tr -d ' ')
[ "$MAGIC" = "02214c18" ] || die "payload is not legacy lz4 (magic $MAGIC)"
# The kernel build appends the 4-byte decompressed size after the lz4 stream;
# lz4 may complain about it. Accept the error if the output is a valid ELF.
rm -f "$GUEST/vmlinux"
lz4_rc=0
lz4 -d -q -c "$PAYLOAD" > "$GUEST/vmlinux" 2> "$GUEST/lz4.log" || lz4_rc=$?
[ "$lz4_rc" = 0 ] || log "lz4 exit status $lz4_rc ignored (trailing size field) $(tr '\n' ' ' < "$GUEST/lz4.log")"
EXPECT_SIZE=$(le "$PAYLOAD" $(( PAYLOAD_LEN - 4 )) 4)
[ "$(head -c4 "$GUEST/vmlinux" | od -An -tx1 | tr -d ' ')" = "7f454c46" ] || die "vmlinux is not ELF"
readelf -h "$GUEST/vmlinux" >/dev/null || die "vmlinux: readelf rejects it"
[ "$(stat -c %s "$GUEST/vmlinux")" = "$EXPECT_SIZE" ] \
    || die "vmlinux size $(stat -c %s "$GUEST/vmlinux") != trailer size $EXPECT_SIZE"
rm -f "$PAYLOAD" "$GUEST/lz4.log"
# PVH entry: Xen ELF note type 18 (XEN_ELFNOTE_PHYS32_ENTRY).
PVH_LINE=$(readelf -n "$GUEST/vmlinux" | grep -A1 -E '^ *Xen .*(note type: \(0x00000012\)|PHYS32_ENTRY)' || true)
[ -n "$PVH_LINE" ] || die "vmlinux has no XEN_ELFNOTE_PHYS32_ENTRY note (no PVH boot)"
PVH_ENTRY=$(printf '%s\n' "$PVH_LINE" | grep -oE '0x[0-9a-f]+' | tail -n1)
# readelf may print the raw descriptor bytes instead of a value: decode those.
if printf '%s\n' "$PVH_LINE" | grep -q 'description data'; then
    PVH_ENTRY=0x$(printf '%s\n' "$PVH_LINE" | sed -n 's/.*description data: //p' \
        | awk '{for(i=NF;i>=1;i--) printf "%s",$i}')
fi
log "PVH entry (XEN_ELFNOTE_PHYS32_ENTRY): $PVH_ENTRY"

# --- 4. initrd ------------------------------------------------------------
STAGE="$GUEST/initrd-root"
rm -rf "$STAGE"
mkdir -p "$STAGE"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,etc,root}
chmod 1777 "$STAGE/tmp"
BB_SRC="$GUEST/rootfs-busybox/bin/busybox"
[ -x "$BB_SRC" ] || die "busybox binary missing in busybox-static"
install -m 0755 "$BB_SRC" "$STAGE/bin/busybox"

# One symlink per applet, at the path busybox itself reports (bin/sh, sbin/mdev, ...).
"$STAGE/bin/busybox" --list-full | sort | while read -r p; do
    [ "$p" = "bin/busybox" ] && continue
    [ -e "$STAGE/$p" ] || [ -L "$STAGE/$p" ] && continue
    mkdir -p "$STAGE/$(dirname "$p")"
    ln -s /bin/busybox "$STAGE/$p"
done
# (Listed once into a variable: `busybox --list | grep -q` can die of SIGPIPE under pipefail.)
applets=$("$STAGE/bin/busybox" --list)
for a in sh mount uname sha256sum cat echo poweroff reboot sync ls mkdir sleep dd \
         head nproc date insmod modprobe ip ping wget nc mdev dmesg true false seq \
         grep sed awk tr wc cut stty setsid cttyhack base64; do
    grep -qx "$a" <<<"$applets" || die "busybox-static lacks applet $a"
done

# virtio drivers (modules in Debian's cloud kernel), copied from the same kernel package;
# /init loads those for the virtio PCI devices it finds.
KMOD="$GUEST/rootfs-kernel/lib/modules/$KVER/kernel"
mkdir -p "$STAGE/lib/modules"
for m in drivers/virtio/virtio drivers/virtio/virtio_ring drivers/virtio/virtio_pci_modern_dev \
         drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci drivers/block/virtio_blk \
         net/core/failover drivers/net/net_failover drivers/net/virtio_net \
         net/vmw_vsock/vsock net/vmw_vsock/vmw_vsock_virtio_transport_common \
         net/vmw_vsock/vmw_vsock_virtio_transport drivers/char/hw_random/virtio-rng \
         drivers/char/virtio_console drivers/virtio/virtio_balloon; do
    f="$KMOD/$m.ko"
    [ -f "$f" ] || die "kernel package lacks $m.ko"
    install -m 0644 "$f" "$STAGE/lib/modules/"
done

# AF_VSOCK test helper (busybox has no vsock support), static so it needs no libc.
gcc -static -O2 -o "$STAGE/bin/rv-vsock" "$(dirname "$0")/guest/rv-vsock.c" || die "building rv-vsock failed"
# SMP atomic-counter stress test (LOCK read-modify-writes across vCPUs), static as well.
gcc -static -O2 -pthread -o "$STAGE/bin/rv-atomic" "$(dirname "$0")/guest/rv-atomic.c" \
    || die "building rv-atomic failed"
# SMP cross-modifying-code test (one thread patches a function another keeps calling).
gcc -static -O2 -pthread -o "$STAGE/bin/rv-xmodify" "$(dirname "$0")/guest/rv-xmodify.c" \
    || die "building rv-xmodify failed"
# The kill -9 data-safety loop's writer: numbered, synced records on a raw block device.
gcc -static -O2 -mrdrnd -o "$STAGE/bin/rv-records" "$(dirname "$0")/guest/rv-records.c" \
    || die "building rv-records failed"

mknod -m 600 "$STAGE/dev/console" c 5 1
mknod -m 666 "$STAGE/dev/null" c 1 3

# Deterministic test payload; its digest is what the guest must report.
seq 1 20000 > "$STAGE/etc/rv-test-data"
sha256sum "$STAGE/etc/rv-test-data" | cut -d' ' -f1 > "$GUEST/rv-test-data.sha256"

cat > "$STAGE/init" <<'EOF'
#!/bin/sh
# rustvisor test guest init (busybox).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || true
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1
echo RUSTVISOR-INIT-OK

# virtio drivers for the virtio PCI devices present (vendor 0x1af4; device 0x1040 + type).
load() { for m in "$@"; do insmod "/lib/modules/$m.ko" 2>/dev/null; done; }
ids=$(cat /sys/bus/pci/devices/*/device 2>/dev/null)
case "$ids" in *0x104[0-9a-f]*|*0x105[0-9a-f]*)
    load virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
    case "$ids" in *0x1042*) load virtio_blk ;; esac
    case "$ids" in *0x1041*) load failover net_failover virtio_net ;; esac
    case "$ids" in *0x1044*) load virtio-rng ;; esac
    case "$ids" in *0x1043*) load virtio_console ;; esac
    case "$ids" in *0x1045*) load virtio_balloon ;; esac
    case "$ids" in *0x1053*) load vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport ;; esac
    echo RV-VIRTIO-LOADED ;;
esac

cmd= test=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        rv.cmd=*) cmd="${arg#rv.cmd=}" ;;
        rv.test=1) test=1 ;;
    esac
done

if [ -n "$cmd" ]; then
    # rv.cmd=<base64 shell script>
    echo "$cmd" | base64 -d > /tmp/rv-cmd.sh
    sh /tmp/rv-cmd.sh
    sync
    poweroff -f
elif [ -n "$test" ]; then
    echo "RV-UNAME $(uname -r)"
    echo "RV-SHA256 $(sha256sum /etc/rv-test-data | cut -d' ' -f1)"
    echo RV-DONE
    sync
    poweroff -f
fi

# Interactive shell on the console (job control via cttyhack).
exec setsid cttyhack sh 2>/dev/null || exec sh
EOF
chmod 0755 "$STAGE/init"

# Reproducible archive: fixed mtimes, sorted order, root ownership, no gzip name/time.
find "$STAGE" -exec touch -h -d @0 {} +
( cd "$STAGE" && find . -mindepth 1 | LC_ALL=C sort \
    | cpio -o -H newc -R 0:0 --reproducible --quiet | gzip -9 -n ) > "$GUEST/initrd.img.tmp"
mv "$GUEST/initrd.img.tmp" "$GUEST/initrd.img"

# --- 6. summary -------------------------------------------------------------
sz() { stat -c %s "$1"; }
cat <<EOF
=== rustvisor guest ready ===
kernel package:   $(basename "$KPKG_DEB")
kernel version:   $KVER   ($GUEST/kernel-version)
vmlinuz:          $GUEST/vmlinuz ($(sz "$GUEST/vmlinuz") bytes)
vmlinux:          $GUEST/vmlinux ($(sz "$GUEST/vmlinux") bytes, ELF, PVH entry $PVH_ENTRY)
initrd:           $GUEST/initrd.img ($(sz "$GUEST/initrd.img") bytes)
busybox package:  $(basename "$BB_DEB")
rv-test-data:     sha256 $(cat "$GUEST/rv-test-data.sha256")   ($GUEST/rv-test-data.sha256)
EOF
