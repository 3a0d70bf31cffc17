#!/usr/bin/env bash
# Density and latency benchmark of the host manager (a measurement, not part of the test
# suite). Builds the release binary, then in one run:
#
#   1. API latency: a daemon with BENCH_DEFINED (100) defined, stopped VMs answers
#      BENCH_CALLS (50) `rustvisor vm list` calls (wall time of the client process) and as
#      many `GET /api/v1/vms` through curl --unix-socket (curl's time_total): median, p95.
#   2. Start latency, one guest at a time, BENCH_TRIALS (3) alternated trials, medians:
#      `rustvisor vm start` (returns once the VMM's API answered and the VM booted) next to
#      `rustvisor run --api-socket` started directly (until its API answers `vmm.ping`), and
#      for both the time to the guest's first serial byte and to its shell prompt; QEMU
#      TCG's first byte and prompt for reference.
#   3. Density: BENCH_N (4) VMs started through the daemon and BENCH_N QEMU TCG processes
#      (-M microvm, as scripts/qemu-reference.sh runs it) with the same kernel, initrd and
#      memory, all idle at their shell prompt; CPU per VM over the same BENCH_WINDOW (30) s
#      (utime+stime from /proc/PID/stat) and RSS/PSS per VM (/proc/PID/smaps_rollup), with
#      the rustvisor/QEMU ratios; the daemon's own CPU and memory beside them.
#
# Environment: BENCH_N, BENCH_DEFINED, BENCH_CALLS, BENCH_TRIALS, BENCH_WINDOW (seconds),
# BENCH_MEM (guest MiB, default 256), BENCH_BOOT_TIMEOUT (seconds per wait, default 900).
# Needs guest/ (scripts/setup-guest.sh); installs qemu-system-x86 if missing (as root, like
# scripts/qemu-reference.sh); curl is optional. Everything runs under one temporary folder,
# removed at the end; every daemon, VMM and QEMU it started is killed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
N=${BENCH_N:-4}
DEFINED=${BENCH_DEFINED:-100}
CALLS=${BENCH_CALLS:-50}
WINDOW=${BENCH_WINDOW:-30}
MEM=${BENCH_MEM:-256}
BOOT_TIMEOUT=${BENCH_BOOT_TIMEOUT:-900}
TRIALS=${BENCH_TRIALS:-3}
G=$ROOT/guest
PROMPT='/ # '

for f in vmlinuz vmlinux initrd.img; do
    [ -f "$G/$f" ] || { echo "missing $G/$f: run scripts/setup-guest.sh" >&2; exit 1; }
done
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    echo "[bench-density] installing qemu-system-x86" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-system-x86 >/dev/null
fi
HAVE_CURL=$(command -v curl >/dev/null 2>&1 && echo 1 || echo 0)

echo "[bench-density] building (release)" >&2
cargo build --release -q
TARGET=${CARGO_TARGET_DIR:-target}
case $TARGET in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac
BIN=$TARGET/release/rustvisor
[ -x "$BIN" ] || { echo "no $BIN after the build" >&2; exit 1; }

WORK=$(mktemp -d /tmp/rv-density.XXXXXX)
SOCK=$WORK/rv.sock
DAEMON_PID=""
PIDS=()       # every VMM, QEMU and direct `run` started, killed on exit

cleanup() {
    set +e
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
    [ -n "$DAEMON_PID" ] && kill -9 "$DAEMON_PID" 2>/dev/null
    # VMMs the daemon spawned but whose pid we never read (an interrupted start): their
    # command line names their socket under $WORK, which no other process's does.
    for c in /proc/[0-9]*/cmdline; do
        p=${c#/proc/}; p=${p%/cmdline}
        [ "$p" = $$ ] && continue
        { tr '\0' ' ' <"$c"; } 2>/dev/null | grep -qF -- "$WORK/" && kill -9 "$p" 2>/dev/null
    done
    wait 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- helpers -------------------------------------------------------------------------------
now_us() { local t=${EPOCHREALTIME/./}; echo $((10#$t)); }
ms_since() { awk -v a="$1" -v b="$(now_us)" 'BEGIN { printf "%.1f", (b - a) / 1000 }'; }
ms_between() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", (b - a) / 1000 }'; }
# median and p95 of the numbers on stdin
med_p95() { sort -g | awk '{ a[NR] = $1 } END { p = int(NR * 0.95); if (p < NR * 0.95) p++; printf "%.2f %.2f\n", a[int((NR + 1) / 2)], a[p] }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
# "RSS PSS" of a process in KiB
mem_kib() { awk '/^Rss:/ { r = $2 } /^Pss:/ { p = $2 } END { print r + 0, p + 0 }' "/proc/$1/smaps_rollup"; }
rv() { "$BIN" vm --connect "$SOCK" "$@"; }
vm_pid() { rv list | awk -v n="$1" '$1 == n { print $NF }'; }
die() { echo "[bench-density] $*" >&2; exit 1; }

# Waits until $1 contains $2 (fixed string); prints the time it was seen (now_us).
wait_text() {
    local file=$1 text=$2 deadline=$(($(now_us) + BOOT_TIMEOUT * 1000000))
    until grep -qF -- "$text" "$file" 2>/dev/null; do
        [ "$(now_us)" -lt "$deadline" ] || { tail -c 2000 "$file" >&2 2>/dev/null; die "no '$text' in $file after ${BOOT_TIMEOUT}s"; }
        sleep 0.005
    done
    now_us
}
# Waits until $1 is a non-empty file; prints the time.
wait_nonempty() {
    local deadline=$(($(now_us) + BOOT_TIMEOUT * 1000000))
    until [ -s "$1" ]; do
        [ "$(now_us)" -lt "$deadline" ] || die "$1 stayed empty"
        sleep 0.002
    done
    now_us
}

# QEMU as scripts/qemu-reference.sh runs it (microvm, PVH entry through the ELF vmlinux),
# with the console in a file and the guest left at its shell. tsc_early_khz skips the PIT
# TSC calibration that flakes under TCG (see qemu-reference.sh).
HOST_KHZ=$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)
start_qemu() { # $1 = console log; prints the pid
    qemu-system-x86_64 -accel tcg -M microvm -cpu qemu64 -m "$MEM" -display none -monitor none \
        -no-reboot -serial "file:$1" -kernel "$G/vmlinux" -initrd "$G/initrd.img" \
        -append "console=ttyS0 tsc_early_khz=$HOST_KHZ" </dev/null >/dev/null 2>&1 &
    echo $!
}

# --- 1. daemon API latency with $DEFINED defined VMs ---------------------------------------
"$BIN" daemon --state-dir "$WORK/state" --run-dir "$WORK/run" --socket "$SOCK" \
    </dev/null 2>"$WORK/daemon.log" &
DAEMON_PID=$!
disown "$DAEMON_PID"   # killed by cleanup; no job-control message
for _ in $(seq 1 3000); do [ -S "$SOCK" ] && break; sleep 0.01; done
[ -S "$SOCK" ] || die "the daemon did not open $SOCK"

create() { rv create "$1" --kernel "$G/vmlinuz" --initrd "$G/initrd.img" --memory "${MEM}M" --accel emu >/dev/null; }
echo "[bench-density] defining $DEFINED VMs" >&2
for i in $(seq 1 "$DEFINED"); do create "$(printf 'idle%03d' "$i")"; done
listed=$(rv list | tail -n +2 | wc -l)
[ "$listed" -eq "$DEFINED" ] || die "vm list shows $listed VMs, expected $DEFINED"

echo "[bench-density] timing vm list ($CALLS calls)" >&2
: >"$WORK/list.ms"
for _ in $(seq 1 "$CALLS"); do t=$(now_us); rv list >/dev/null; echo "$(ms_since "$t")" >>"$WORK/list.ms"; done
read -r list_med list_p95 < <(med_p95 <"$WORK/list.ms")
curl_med=- curl_p95=-
if [ "$HAVE_CURL" = 1 ]; then
    : >"$WORK/curl.ms"
    for _ in $(seq 1 "$CALLS"); do
        curl -sf --unix-socket "$SOCK" -o /dev/null -w '%{time_total}\n' http://localhost/api/v1/vms \
            | awk '{ printf "%.3f\n", $1 * 1000 }' >>"$WORK/curl.ms"
    done
    read -r curl_med curl_p95 < <(med_p95 <"$WORK/curl.ms")
fi

# --- 2. start latency, alternating the three, BENCH_TRIALS times -----------------------------
for i in $(seq 1 "$N"); do create "vm$i"; done
console() { echo "$WORK/state/vms/$1/console.log"; }
start_pid() { # rv start output -> pid
    local p
    p=$(sed -n 's/.*(pid \([0-9]*\)).*/\1/p' <<<"$1")
    [ -n "$p" ] || die "vm start printed no pid: $1"
    echo "$p"
}
: >"$WORK/mgr.ms" >"$WORK/run.ms" >"$WORK/qemu.ms"
for trial in $(seq 1 "$TRIALS"); do
    echo "[bench-density] start latency, trial $trial/$TRIALS: vm start, run --api-socket, qemu" >&2
    # Through the daemon: `vm start` returns once the VMM answered and booted the VM.
    t0=$(now_us)
    out=$(rv start vm1)
    t_ret=$(now_us)
    p=$(start_pid "$out")
    PIDS+=("$p")
    echo "$(ms_between "$t0" "$t_ret") $(ms_between "$t0" "$(wait_nonempty "$(console vm1)")")" \
        "$(ms_between "$t0" "$(wait_text "$(console vm1)" "$PROMPT")")" >>"$WORK/mgr.ms"
    rv kill vm1 >/dev/null
    # The supervisor reaps the VMM; a start meanwhile would be refused (one operation at a time).
    for _ in $(seq 1 500); do
        case $(rv list | awk '$1 == "vm1" { print $2 }') in running | starting | paused) sleep 0.02 ;; *) break ;; esac
    done

    # The VMM directly: until its API answers vmm.ping.
    dsock=$WORK/direct$trial.sock dlog=$WORK/direct$trial.log
    t0=$(now_us)
    "$BIN" run --kernel "$G/vmlinuz" --initrd "$G/initrd.img" --memory "${MEM}M" --accel emu \
        --serial "file=$dlog" --api-socket "$dsock" </dev/null >/dev/null 2>"$WORK/direct.err" &
    dpid=$!
    PIDS+=("$dpid")
    until [ -S "$dsock" ]; do kill -0 "$dpid" 2>/dev/null || die "rustvisor run exited: $(cat "$WORK/direct.err")"; sleep 0.001; done
    if [ "$HAVE_CURL" = 1 ]; then
        until curl -sf --unix-socket "$dsock" -o /dev/null http://localhost/api/v1/vmm.ping; do sleep 0.001; done
    else
        until "$BIN" api --socket "$dsock" ping >/dev/null 2>&1; do sleep 0.001; done
    fi
    t_api=$(now_us)
    echo "$(ms_between "$t0" "$t_api") $(ms_between "$t0" "$(wait_nonempty "$dlog")")" \
        "$(ms_between "$t0" "$(wait_text "$dlog" "$PROMPT")")" >>"$WORK/run.ms"
    kill -9 "$dpid"
    wait "$dpid" 2>/dev/null || true

    # QEMU, for reference.
    qlog=$WORK/qemu-trial$trial.log
    t0=$(now_us)
    q=$(start_qemu "$qlog")
    PIDS+=("$q")
    echo "- $(ms_between "$t0" "$(wait_nonempty "$qlog")") $(ms_between "$t0" "$(wait_text "$qlog" "$PROMPT")")" \
        >>"$WORK/qemu.ms"
    kill -9 "$q"
done
# Median of column $2 of file $1.
col_med() { awk -v c="$2" '{ print $c }' "$1" | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
read -r mgr_ready mgr_first mgr_prompt <<<"$(col_med "$WORK/mgr.ms" 1) $(col_med "$WORK/mgr.ms" 2) $(col_med "$WORK/mgr.ms" 3)"
read -r run_ready run_first run_prompt <<<"$(col_med "$WORK/run.ms" 1) $(col_med "$WORK/run.ms" 2) $(col_med "$WORK/run.ms" 3)"
read -r q_first q_prompt <<<"$(col_med "$WORK/qemu.ms" 2) $(col_med "$WORK/qemu.ms" 3)"

# --- 3. density: N idle VMs next to N idle QEMUs --------------------------------------------
echo "[bench-density] starting vm1..vm$N through the daemon and $N QEMUs" >&2
VMM_PIDS=() QEMU_PIDS=()
for i in $(seq 1 "$N"); do
    p=$(start_pid "$(rv start "vm$i")")
    PIDS+=("$p")
    VMM_PIDS+=("$p")
done
for i in $(seq 1 "$N"); do
    q=$(start_qemu "$WORK/qemu$i.log")
    PIDS+=("$q")
    QEMU_PIDS+=("$q")
done
for i in $(seq 1 "$N"); do
    wait_text "$(console "vm$i")" "$PROMPT" >/dev/null
    wait_text "$WORK/qemu$i.log" "$PROMPT" >/dev/null
done
for i in $(seq 1 "$N"); do
    [ "$(vm_pid "vm$i")" = "${VMM_PIDS[$((i - 1))]}" ] || die "vm$i's VMM is not the one started"
done
sleep 5   # let the last boots' background work settle

echo "[bench-density] measuring $WINDOW s of idle" >&2
HZ=$(getconf CLK_TCK)
declare -A T0
ALL=("${VMM_PIDS[@]}" "${QEMU_PIDS[@]}" "$DAEMON_PID")
for p in "${ALL[@]}"; do T0[$p]=$(cpu_ticks "$p"); done
w0=$(now_us)
sleep "$WINDOW"
w1=$(now_us)
secs=$(awk -v a="$w0" -v b="$w1" 'BEGIN { print (b - a) / 1e6 }')
# CPU % of one core per process, then averaged over a group.
cpu_pct() { awk -v a="${T0[$1]}" -v b="$(cpu_ticks "$1")" -v hz="$HZ" -v s="$secs" 'BEGIN { printf "%.3f", (b - a) / hz / s * 100 }'; }
group() { # prints "cpu% rss_mib pss_mib" averaged over the pids given
    local p c r s sum_c=0 sum_r=0 sum_s=0
    for p in "$@"; do
        c=$(cpu_pct "$p"); read -r r s < <(mem_kib "$p")
        sum_c=$(awk -v x="$sum_c" -v y="$c" 'BEGIN { print x + y }')
        sum_r=$((sum_r + r)); sum_s=$((sum_s + s))
    done
    awk -v c="$sum_c" -v r="$sum_r" -v s="$sum_s" -v n=$# 'BEGIN { printf "%.2f %.1f %.1f\n", c / n, r / n / 1024, s / n / 1024 }'
}
read -r rv_cpu rv_rss rv_pss < <(group "${VMM_PIDS[@]}")
read -r q_cpu q_rss q_pss < <(group "${QEMU_PIDS[@]}")
read -r d_cpu d_rss d_pss < <(group "$DAEMON_PID")
per_vm=$(for p in "${VMM_PIDS[@]}"; do printf '%s ' "$(cpu_pct "$p")"; done)
per_q=$(for p in "${QEMU_PIDS[@]}"; do printf '%s ' "$(cpu_pct "$p")"; done)

# --- report ---------------------------------------------------------------------------------
echo
echo "host: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg); guest: $MEM MiB, Debian kernel $(cat "$G/kernel-version" 2>/dev/null || echo '?') + busybox initramfs, emu"
echo
echo "1. daemon API latency, $DEFINED defined VMs, $CALLS calls (ms)"
printf '   %-44s %9s %9s\n' "" median p95
printf '   %-44s %9s %9s\n' "rustvisor vm list (client process, wall)" "$list_med" "$list_p95"
printf '   %-44s %9s %9s\n' "curl GET /api/v1/vms (time_total)" "$curl_med" "$curl_p95"
echo
echo "2. start latency, one guest at a time, median of $TRIALS alternated trials (ms from the command)"
printf '   %-44s %10s %12s %12s\n' "" ready "first byte" prompt
printf '   %-44s %10s %12s %12s\n' "rustvisor vm start (returned: VMM booted)" "$mgr_ready" "$mgr_first" "$mgr_prompt"
printf '   %-44s %10s %12s %12s\n' "rustvisor run --api-socket (API answers)" "$run_ready" "$run_first" "$run_prompt"
printf '   %-44s %10s %12s %12s\n' "qemu-system-x86_64 TCG microvm" - "$q_first" "$q_prompt"
printf '   %-44s %10s %12s %12s\n' "ratio vm start / run" "$(ratio "$mgr_ready" "$run_ready")" "$(ratio "$mgr_first" "$run_first")" "$(ratio "$mgr_prompt" "$run_prompt")"
echo
echo "3. $N idle guests each, same ${WINDOW} s window (per VM; CPU in % of one core)"
printf '   %-44s %9s %9s %9s\n' "" "CPU %" "RSS MiB" "PSS MiB"
printf '   %-44s %9s %9s %9s\n' "rustvisor emu VMM (via the daemon)" "$rv_cpu" "$rv_rss" "$rv_pss"
printf '   %-44s %9s %9s %9s\n' "qemu-system-x86_64 TCG" "$q_cpu" "$q_rss" "$q_pss"
printf '   %-44s %9s %9s %9s\n' "ratio rustvisor / qemu" "$(ratio "$rv_cpu" "$q_cpu")" "$(ratio "$rv_rss" "$q_rss")" "$(ratio "$rv_pss" "$q_pss")"
printf '   %-44s %9s %9s %9s\n' "rustvisor daemon (whole, for $N VMs)" "$d_cpu" "$d_rss" "$d_pss"
echo "   per-VM CPU %: rustvisor $per_vm| qemu $per_q"
