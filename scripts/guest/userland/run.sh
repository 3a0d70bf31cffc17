#!/bin/bash
# The guest side of scripts/bench-userland.sh: run by rv-bench.service once the Debian
# benchmark image reaches multi-user.target. Prints to the console (the serial port):
#   RV-BENCH-START <guest uptime s> <cpu features>
#   RV-BOOT <kernel s> <initramfs s> <systemd s>             the boot's phases by the guest's
#       clock: to the kernel's "Run /init" (dmesg), from there to systemd's start in the real
#       root (UserspaceTimestampMonotonic), from there to this script's start
#   RV-STEP <name> <seconds> <exit status> <check...>     one line per step, seconds measured
#                                                         by the guest's own clock
#   RV-BENCH-DONE <guest uptime s>
# then powers the guest off. <check> is the step's result (a digest or the program's answer):
# it must be the same under every correct CPU. Work sizes are fixed here; the inputs were
# generated when the image was built (/opt/rv-bench/data). The steps:
#   python   bench.py, 25 rounds of pure-Python work
#   sha256   openssl dgst -sha256 of a 32 MiB file
#   aes      openssl enc -aes-256-cbc of the same file (to disk)
#   xz       xz -9 of 1 MiB of text, then xz -d of the result
#   gcc      gcc -O2 -c nbody.c
#   nbody    the n-body simulation compiled at build time, 2,000,000 steps
#   sqlite   100,000 INSERTs in one transaction into a new database, then queries.sql
set -u
B=/opt/rv-bench
W=/var/tmp/rv-bench
rm -rf "$W"
mkdir -p "$W"
cd "$W" || exit 1
export PYTHONHASHSEED=0 LC_ALL=C

flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' \
    | grep -xE 'sse4_2|ssse3|popcnt|aes|pclmulqdq|avx|avx2|avx512f|sha_ni|rdrand|bmi2' | tr '\n' ',')
up=$(cut -d' ' -f1 /proc/uptime)
echo "RV-BENCH-START $up ${flags%,}"
init=$(dmesg | sed -n 's/^\[ *\([0-9.]*\)\] Run \/init as init process.*/\1/p' | head -n1)
sd=$(systemctl show -p UserspaceTimestampMonotonic --value)
awk -v i="${init:-0}" -v s="${sd:-0}" -v u="$up" \
    'BEGIN {printf "RV-BOOT %.2f %.2f %.2f\n", i, s / 1e6 - i, u - s / 1e6}'

# step NAME COMMAND...: runs COMMAND, whose last output line is the check.
step() {
    local name=$1 t0 t1 out rc
    shift
    t0=$EPOCHREALTIME
    out=$("$@" 2>&1)
    rc=$?
    t1=$EPOCHREALTIME
    printf 'RV-STEP %s %s %s %s\n' "$name" \
        "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')" "$rc" \
        "$(printf '%s\n' "$out" | tail -n1 | tr -c '[:alnum:].,=:_+\n-' '_')"
}

py() { python3 "$B/bench.py" 25; }
sha() { openssl dgst -sha256 -r "$B/data/blob" | cut -c1-16; }
# AES-256-CBC encryption (a fixed key and IV, no salt: no randomness); the output is checked
# with cksum (a CRC), so the step measures openssl's AES, not another SHA-256.
aes() {
    openssl enc -aes-256-cbc -nosalt -K "$(printf '%064d' 7)" -iv "$(printf '%032d' 3)" \
        -in "$B/data/blob" -out aes.out && cksum < aes.out | tr ' ' _
}
xzs() {
    xz -9 -c "$B/data/text" > text.xz || return 1
    echo "xz=$(stat -c %s text.xz) unxz=$(xz -d -c text.xz | sha256sum | cut -c1-16)"
}
cc() { gcc -O2 -c "$B/nbody.c" -o nbody.o && echo "gcc=$(sha256sum < nbody.o | cut -c1-16)"; }
nbody() { "$B/nbody" 2000000; }
sql() {
    local out
    out=$({ cat "$B/data/insert.sql"; cat "$B/queries.sql"; } | sqlite3 bench.db) || return 1
    printf '%s\n' "$out" >&2
    echo "sqlite=$(printf '%s\n' "$out" | sha256sum | cut -c1-16)"
}

step python py
step sha256 sha
step aes aes
step xz xzs
step gcc cc
step nbody nbody
step sqlite sql
echo "RV-BENCH-DONE $(cut -d' ' -f1 /proc/uptime)"
sync
systemctl poweroff --no-block
