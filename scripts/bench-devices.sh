#!/usr/bin/env bash
# Device benchmark (run as root): virtio-blk and virtio-net throughput seen from inside the
# Debian guest on rustvisor's emu accelerator, next to the same operation on the host in the
# same run, and their ratios.
#   disk: sequential dd with O_DIRECT, 1 MiB blocks, on the same raw image file
#         (guest: /dev/vda; host: the file itself);
#   net:  HTTP GET of a large file from a server on the host side of a TAP in a network
#         namespace (guest: busybox wget over virtio-net; host: curl over the same address,
#         i.e. host loopback).
# Guest times come from /proc/uptime (10 ms resolution), so sizes are large.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-guest.sh >/dev/null 2>&1
cargo build --release -q
MIB=${BENCH_MIB:-256}
work=$(mktemp -d)
ns=rvbench$$
cleanup() { ip netns del "$ns" 2>/dev/null || true; [ -n "${srv:-}" ] && kill "$srv" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

mibs() { awk -v m="$1" -v s="$2" 'BEGIN { if (s <= 0) s = 0.01; printf "%.1f", m / s }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }
secs() { local t0=$(date +%s.%N); "$@" >/dev/null 2>&1; awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {print b - a}'; }

# --- host side ---------------------------------------------------------------------------
img="$work/disk.raw"
dd if=/dev/urandom of="$img" bs=1M count="$MIB" status=none
sync
host_w=$(secs dd if=/dev/zero of="$img" bs=1M count="$MIB" oflag=direct conv=notrunc,fsync)
host_r=$(secs dd if="$img" of=/dev/null bs=1M count="$MIB" iflag=direct)

ip netns add "$ns"
ip -n "$ns" tuntap add rvtap0 mode tap
ip -n "$ns" addr add 10.0.2.1/24 dev rvtap0
ip -n "$ns" link set rvtap0 up
ip -n "$ns" link set lo up
mkdir -p "$work/www"
head -c $((MIB << 20)) /dev/urandom > "$work/www/big"
(cd "$work/www" && exec ip netns exec "$ns" python3 -m http.server --bind 10.0.2.1 8080 >/dev/null 2>&1) &
srv=$!
sleep 1
host_net=$(secs ip netns exec "$ns" curl -s -o /dev/null http://10.0.2.1:8080/big)

# --- guest side ----------------------------------------------------------------------------
script=$(cat <<GUEST
t() { cut -d' ' -f1 /proc/uptime; }
a=\$(t); dd if=/dev/zero of=/dev/vda bs=1M count=$MIB oflag=direct conv=fsync 2>/dev/null; b=\$(t)
echo "RV-BENCH-WRITE \$a \$b"
a=\$(t); dd if=/dev/vda of=/dev/null bs=1M count=$MIB iflag=direct 2>/dev/null; b=\$(t)
echo "RV-BENCH-READ \$a \$b"
ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0
ping -c 1 -W 5 10.0.2.1 >/dev/null
a=\$(t); wget -q -O /dev/null http://10.0.2.1:8080/big; b=\$(t)
echo "RV-BENCH-NET \$a \$b"
GUEST
)
log="$work/console.log"
ip netns exec "$ns" "${CARGO_TARGET_DIR:-target}/release/rustvisor" run --kernel guest/vmlinuz --initrd guest/initrd.img \
    --memory 512M --accel emu --serial "file=$log" --disk "path=$img,format=raw" --net tap=rvtap0 \
    --cmdline "console=ttyS0 panic=-1 rv.cmd=$(printf '%s\n' "$script" | base64 -w0)" >/dev/null 2>&1
span() { awk -v k="$1" '$1 == k { print $3 - $2 }' "$log"; }
g_w=$(span RV-BENCH-WRITE); g_r=$(span RV-BENCH-READ); g_n=$(span RV-BENCH-NET)
[ -n "$g_w" ] && [ -n "$g_r" ] && [ -n "$g_n" ] || { echo "guest workload failed:"; tail -20 "$log"; exit 1; }

hw=$(mibs "$MIB" "$host_w"); hr=$(mibs "$MIB" "$host_r"); hn=$(mibs "$MIB" "$host_net")
gw=$(mibs "$MIB" "$g_w"); gr=$(mibs "$MIB" "$g_r"); gn=$(mibs "$MIB" "$g_n")
echo "blk-seq-write-MiB/s: guest $gw host $hw ratio $(ratio "$gw" "$hw")"
echo "blk-seq-read-MiB/s:  guest $gr host $hr ratio $(ratio "$gr" "$hr")"
echo "net-tcp-MiB/s (guest wget vs host loopback curl): guest $gn host $hn ratio $(ratio "$gn" "$hn")"
