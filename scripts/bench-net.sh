#!/usr/bin/env bash
# VM-to-VM TCP throughput benchmark (run as root; not part of the test suite): two guests on
# a bridge, one serving a file over HTTP, the other fetching it, first on rustvisor (emu) under
# `rustvisor daemon` with a `rustvisor net` network, then the same guests and scripts on QEMU
# TCG with TAPs on a bridge made with `ip`, in the same run.
#   rustvisor: a daemon in a network namespace of its own (`unshare -n`: its bridge, TAPs,
#              dnsmasq and nftables rules live there), `net create lan0 --subnet 10.77.0.1/24
#              --dhcp`, two VMs with `--nic net=lan0`;
#   QEMU:      `-accel tcg -M microvm,pcie=on`, virtio-net-pci on a TAP, bridge br0 and TAPs
#              in another namespace (`ip netns`).
# Guests (test initrd, 256 MiB, 1 vCPU, static 10.77.0.11/12): the server makes a sparse
# BENCH_MIB file in its tmpfs (zeros, no RAM) and runs busybox httpd; the client waits for
# it, then fetches the file BENCH_REPS times with busybox wget between `BENCH-GO i` and
# `BENCH-END i` lines on its serial console. The host stamps the console lines as they are
# written (tail -F) and times each fetch by them; the guest's /proc/uptime (10 ms) is shown
# beside as a check.
# Output: each fetch, then a table of the best fetch of each and their ratio.
# Env: BENCH_MIB (256), BENCH_REPS (3), BENCH_TIMEOUT (900 s per hypervisor),
#      BENCH_ONLY (rv|qemu: run one side only), BENCH_KEEP (keep the temp dir and its logs),
#      RV (the rustvisor binary; default $CARGO_TARGET_DIR or target, release).
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${BENCH_MIB:-256}
REPS=${BENCH_REPS:-3}
TIMEOUT=${BENCH_TIMEOUT:-900}
ONLY=${BENCH_ONLY:-}
RV=${RV:-${CARGO_TARGET_DIR:-target}/release/rustvisor}
for f in guest/vmlinuz guest/vmlinux guest/initrd.img; do
    [ -f "$f" ] || { echo "missing $f: run scripts/setup-guest.sh" >&2; exit 1; }
done
[ "$ONLY" = qemu ] || [ -x "$RV" ] || { echo "missing $RV: cargo build --release" >&2; exit 1; }
if [ "$ONLY" != rv ] && ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    echo "[bench-net] installing qemu-system-x86" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-system-x86 >/dev/null
fi

work=$(mktemp -d /tmp/rv-bench-net.XXXXXX)
export RUSTVISOR_SOCKET=$work/rv.sock
ns=rvbenchnet$$
daemon="" daemon_ns="" qemus=() stampers=()
log() { echo "[bench-net $(date -u +%T)] $*" >&2; }

cleanup() {
    set +e
    if [ -n "$daemon" ]; then
        for vm in srv cli; do "$RV" vm delete "$vm" --force >/dev/null 2>&1; done
        # Whatever still runs in the daemon's namespace (VMMs, dnsmasq, the daemon) was
        # started by this script; the namespace goes away with its last process.
        [ -n "$daemon_ns" ] && for p in /proc/[0-9]*; do
            [ "$(readlink "$p/ns/net" 2>/dev/null)" = "$daemon_ns" ] && kill -9 "${p#/proc/}" 2>/dev/null
        done
        kill -9 "$daemon" 2>/dev/null
        for _ in $(seq 50); do [ -d "/proc/$daemon" ] || break; sleep 0.1; done
    fi
    for p in "${qemus[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${qemus[@]}"; do wait "$p" 2>/dev/null; done
    for p in "${stampers[@]}"; do kill "$p" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
    if [ -n "${BENCH_KEEP:-}" ]; then log "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the guests' scripts ---------------------------------------------------------------------
net_up() { echo "ip link set lo up; ip link set eth0 up; ip addr add 10.77.0.$1/24 dev eth0"; }
SRV="$(net_up 11)
mkdir -p /tmp/www; truncate -s ${MIB}M /tmp/www/f; echo ok > /tmp/www/ready
httpd -p 80 -h /tmp/www && echo BENCH-SRV-READY
while true; do sleep 3600; done"
CLI="$(net_up 12)
t() { cut -d' ' -f1 /proc/uptime; }
n=0
until wget -q -O /dev/null http://10.77.0.11/ready; do
    n=\$((n + 1)); [ \$n -ge 300 ] && { echo BENCH-FAIL no server; exit 1; }; sleep 1
done
echo BENCH-CLI-READY
for i in \$(seq $REPS); do
    a=\$(t); echo BENCH-GO \$i
    wget -q -O /dev/null http://10.77.0.11/f || { echo BENCH-FAIL wget; exit 1; }
    echo BENCH-END \$i; b=\$(t)
    echo GUEST-CLOCK \$i \$a \$b
done
echo BENCH-DONE"
cmdline() { echo "console=ttyS0 panic=-1${2:+ $2} rv.cmd=$(printf '%s\n' "$1" | base64 -w0)"; }

# Host timestamps on the lines of console log $1 as they are written, into $2 (tail -F is
# woken by inotify; it exits with this script).
stamp() {
    touch "$1" 2>/dev/null || true
    tail -n +1 -F --pid=$$ "$1" 2>/dev/null | while IFS= read -r l; do
        printf '%s %s\n' "$EPOCHREALTIME" "${l%$'\r'}"
    done >"$2" &
    stampers+=($!)
}

# Waits for BENCH-DONE or BENCH-FAIL in the stamped client log $1; prints each fetch (by the
# host's clock, from BENCH-GO to BENCH-END, and by the guest's /proc/uptime) on stderr and the
# best MiB/s by the host's clock on stdout.
collect() {
    local stamped=$1 what=$2 t0=$SECONDS
    until grep -aq 'BENCH-DONE\|BENCH-FAIL' "$stamped" 2>/dev/null; do
        if [ $((SECONDS - t0)) -ge "$TIMEOUT" ]; then
            log "$what: timed out after ${TIMEOUT}s; client console:"; tail -20 "$stamped" >&2; return 1
        fi
        sleep 0.5
    done
    if grep -aq BENCH-FAIL "$stamped"; then
        log "$what: the client failed:"; tail -20 "$stamped" >&2; return 1
    fi
    awk -v w="$what" -v m="$MIB" '
        $2 == "BENCH-GO" { go[$3] = $1 }
        $2 == "BENCH-END" { end[$3] = $1 }
        $2 == "GUEST-CLOCK" { g[$3] = $5 - $4 }
        END {
            for (i = 1; i in end; i++) {
                s = end[i] - go[i]; r = m / s; if (r > best) best = r
                printf "  %-14s fetch %d: %7.2f MiB/s (%.2f s; guest clock %.2f s)\n", w, i, r, s, g[i] > "/dev/stderr"
            }
            printf "%.2f\n", best
        }' "$stamped"
}

# --- rustvisor (emu) under the daemon ----------------------------------------------------------
rv_mibs=""
if [ "$ONLY" != qemu ]; then
    log "rustvisor: daemon in its own network namespace; guests booting (emu)"
    unshare -n "$RV" daemon --state-dir "$work/state" --run-dir "$work/run" --socket "$work/rv.sock" \
        </dev/null 2>"$work/daemon.log" &
    daemon=$!
    disown "$daemon"   # no "Killed" from the shell at the cleanup
    for _ in $(seq 300); do [ -S "$work/rv.sock" ] && break; sleep 0.1; done
    [ -S "$work/rv.sock" ] || { log "the daemon did not start:"; cat "$work/daemon.log" >&2; exit 1; }
    daemon_ns=$(readlink "/proc/$daemon/ns/net")
    [ "$daemon_ns" != "$(readlink /proc/self/ns/net)" ] || { log "the daemon is not in a namespace of its own"; exit 1; }
    rv() { "$RV" "$@"; }
    rv net create lan0 --subnet 10.77.0.1/24 --dhcp >/dev/null
    i=0
    for vm in srv cli; do
        i=$((i + 1))
        script=$SRV; [ "$vm" = cli ] && script=$CLI
        rv vm create "$vm" --kernel guest/vmlinuz --initrd guest/initrd.img --memory 256M --cpus 1 \
            --accel emu --nic "net=lan0,mac=52:54:00:00:00:0$i" --cmdline "$(cmdline "$script")" >/dev/null
    done
    rv vm start srv >/dev/null
    rv vm start cli >/dev/null
    stamp "$work/state/vms/cli/console.log" "$work/rv-cli.stamped"
    # (not in $(...): a SIGTERM to the script then stops it within 0.5 s)
    collect "$work/rv-cli.stamped" "rustvisor-emu" >"$work/rv.best" || exit 1
    rv_mibs=$(cat "$work/rv.best")
    for vm in srv cli; do rv vm delete "$vm" --force >/dev/null 2>&1 || true; done
fi

# --- QEMU TCG, TAPs on a bridge ----------------------------------------------------------------
qemu_mibs=""
if [ "$ONLY" != rv ]; then
    log "QEMU TCG: bridge and TAPs in namespace $ns; guests booting"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$ns" link add br0 type bridge
    ip -n "$ns" addr add 10.77.0.1/24 dev br0
    ip -n "$ns" link set br0 up
    # microvm has no HPET or PM timer: skip the PIT TSC calibration that can fail under TCG
    # (see scripts/qemu-reference.sh). Boot only; the transfer does not depend on it.
    khz=$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)
    i=0
    for vm in srv cli; do
        i=$((i + 1))
        script=$SRV; [ "$vm" = cli ] && script=$CLI
        ip -n "$ns" tuntap add "tap$i" mode tap
        ip -n "$ns" link set "tap$i" master br0
        ip -n "$ns" link set "tap$i" up
        ip netns exec "$ns" qemu-system-x86_64 -accel tcg -M microvm,pcie=on -cpu qemu64 -m 256 \
            -display none -monitor none -no-reboot -serial "file:$work/qemu-$vm.log" \
            -kernel guest/vmlinux -initrd guest/initrd.img -append "$(cmdline "$script" "tsc_early_khz=$khz")" \
            -netdev "tap,id=n0,ifname=tap$i,script=no,downscript=no" \
            -device "virtio-net-pci,netdev=n0,disable-legacy=on,mac=52:54:00:00:01:0$i" \
            </dev/null >"$work/qemu-$vm.out" 2>&1 &
        qemus+=($!)
    done
    stamp "$work/qemu-cli.log" "$work/qemu-cli.stamped"
    collect "$work/qemu-cli.stamped" "qemu-tcg" >"$work/qemu.best" || exit 1
    qemu_mibs=$(cat "$work/qemu.best")
fi

# --- the table ----------------------------------------------------------------------------------
echo "VM-to-VM TCP (HTTP GET of $MIB MiB, best of $REPS), $(date -u '+%F %T UTC'), load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-28s %s\n' "rustvisor emu (daemon net)" "${rv_mibs:--} MiB/s" "QEMU TCG (TAP, bridge)" "${qemu_mibs:--} MiB/s"
if [ -n "$rv_mibs" ] && [ -n "$qemu_mibs" ]; then
    printf '%-28s %s\n' "ratio rustvisor/QEMU" "$(awk -v a="$rv_mibs" -v b="$qemu_mibs" 'BEGIN { printf "%.2f", a / b }')"
fi
