#!/usr/bin/env bash
# Fuzzes every parser a guest or a user feeds (issue 14): runs each cargo-fuzz target of fuzz/
# for SECONDS (default 60), one after the other at the lowest CPU priority, then prints a
# table: target, seconds, executions, executions per second, crashes, corpus inputs.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]   fuzz (all targets, or the ones named)
#   scripts/fuzz.sh --merge [TARGET...]     fold what the runs found into the checked-in corpus,
#                                           minimised (libFuzzer -merge=1, as cargo fuzz cmin)
#   scripts/fuzz.sh --list                  the targets
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). New inputs go to
# fuzz/corpus-run/<target>/ (ignored by git); the checked-in fuzz/corpus/<target>/ is read,
# never written, except by --merge. A crash stops its target (libFuzzer's default) and leaves
# the input in fuzz/artifacts/<target>/; replay it with
#   cargo +nightly fuzz run <target> fuzz/artifacts/<target>/crash-...
# and, once fixed, copy it into fuzz/corpus/<target>/ so that `cargo test -p fuzzing` (part of
# `cargo test --workspace`) replays it on stable from then on.
#
# Limits per input: 10 s (a hang is a crash), 1.5 GiB RSS and 256 MiB for one allocation (an
# allocation sized by the input beyond that is reported as a crash: nothing a guest or a file
# controls may make the host allocate without bound).
set -euo pipefail
cd "$(dirname "$0")/.."

TARGETS=$(sed -n 's/^name = "\([a-z0-9_]*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^rustvisor-fuzz$')
FUZZ=(cargo +nightly fuzz)
LIBFUZZER_LIMITS=(-timeout=10 -rss_limit_mb=1536 -malloc_limit_mb=256)

if [[ "${1:-}" == "--list" ]]; then
    echo "$TARGETS"
    exit 0
fi

if [[ "${1:-}" == "--merge" ]]; then
    shift
    selected=${*:-$TARGETS}
    nice -n 19 "${FUZZ[@]}" build >/dev/null
    for t in $selected; do
        mkdir -p "fuzz/corpus/$t" "fuzz/corpus-run/$t"
        before=$(find "fuzz/corpus/$t" -type f | wc -l)
        # Keep a copy of the checked-in corpus to merge from, then rebuild it minimised.
        tmp=$(mktemp -d)
        cp -r "fuzz/corpus/$t" "$tmp/old"
        find "fuzz/corpus/$t" -type f ! -name 'crash-*' ! -name 'seed-*' -delete
        nice -n 19 "${FUZZ[@]}" run "$t" "fuzz/corpus/$t" "$tmp/old" "fuzz/corpus-run/$t" -- -merge=1 \
            "${LIBFUZZER_LIMITS[@]}" >"$tmp/log" 2>&1 || { tail -20 "$tmp/log"; rm -rf "$tmp"; exit 1; }
        rm -rf "$tmp"
        after=$(find "fuzz/corpus/$t" -type f | wc -l)
        echo "$t: $before -> $after inputs ($(du -sh "fuzz/corpus/$t" | cut -f1))"
    done
    du -sh fuzz/corpus
    exit 0
fi

SECONDS_EACH=${1:-60}
shift || true
selected=${*:-$TARGETS}

echo "building the fuzz targets (nightly, ASan, sanitizer coverage) ..." >&2
nice -n 19 "${FUZZ[@]}" build >&2

rows=()
for t in $selected; do
    mkdir -p "fuzz/corpus-run/$t" "fuzz/artifacts/$t"
    crashes_before=$(find "fuzz/artifacts/$t" -type f | wc -l)
    log="fuzz/artifacts/$t.log"
    echo "fuzzing $t for ${SECONDS_EACH}s ..." >&2
    start=$(date +%s)
    set +e
    nice -n 19 "${FUZZ[@]}" run "$t" "fuzz/corpus-run/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$SECONDS_EACH" -print_final_stats=1 "${LIBFUZZER_LIMITS[@]}" \
        -artifact_prefix="fuzz/artifacts/$t/" >"$log" 2>&1
    rc=$?
    set -e
    took=$(( $(date +%s) - start ))
    execs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -1)
    if [[ -z "$execs" ]]; then
        # Stopped by a crash: libFuzzer's last status line (#N) has the count.
        execs=$(grep -ao '^#[0-9]*' "$log" | tail -1 | tr -d '#')
    fi
    execs=${execs:-0}
    crashes=$(( $(find "fuzz/artifacts/$t" -type f | wc -l) - crashes_before ))
    if (( rc != 0 && crashes == 0 )); then
        crashes="? (exit $rc, see $log)"
    fi
    inputs=$(( $(find "fuzz/corpus-run/$t" -type f | wc -l) + $(find "fuzz/corpus/$t" -type f | wc -l) ))
    rate=$(( took > 0 ? execs / took : execs ))
    rows+=("$(printf '%-16s %6s %12s %8s %8s %8s' "$t" "$took" "$execs" "$rate" "$crashes" "$inputs")")
done

printf '%-16s %6s %12s %8s %8s %8s\n' target seconds executions exec/s crashes corpus
for r in "${rows[@]}"; do
    echo "$r"
done
