#!/usr/bin/env bash
# Fuzzes every input decoder, and the store behind them (the cargo-fuzz targets in fuzz/),
# for a bounded time. The store target needs PostgreSQL (scripts/ensure-postgres.sh;
# FUZZ_DATABASE_SERVER names another server).
#
#   scripts/fuzz.sh [SECONDS]     SECONDS per target, default 30
#
# Installs cargo-fuzz when it is missing, builds all targets once, then runs each for
# SECONDS with libFuzzer's -max_total_time, a 512 MB RSS/malloc limit, inputs up to
# 70,000 bytes (just over the 64 KiB limit, so that `too_large` is exercised) and a 10 s
# per-input timeout. Only the stable toolchain is needed: RUSTC_BOOTSTRAP=1 lets it accept
# the nightly flags cargo-fuzz passes (-Zsanitizer=address, ...).
#
# The tracked seeds (fuzz/corpus/<target>/) are copied into a scratch corpus,
# fuzz/target/fuzz-corpus/<target>/, which is emptied first unless FUZZ_KEEP_CORPUS=1,
# together with two inputs generated from the first seed by padding it with an unknown
# field to exactly 64 KiB (still acceptable) and to 64 KiB + 1 byte (`too_large`):
# libFuzzer grows inputs slowly (a few KB in a minute), so without them the size limit
# would never be reached. libFuzzer's output goes to fuzz/target/fuzz-logs/<target>.log,
# reproducers of failures to fuzz/artifacts/<target>/. Prints per target the executions
# and the corpus size, and exits non-zero if any target crashed, timed out or ran out of
# memory.
# Reproduce a failure with: RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <artifact>  (in fuzz/)
set -euo pipefail

seconds="${1:-30}"
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS]   (a positive whole number of seconds per target, default 30)" >&2
    exit 2
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz_dir="$root/fuzz"
scratch="$fuzz_dir/target/fuzz-corpus"
logs="$fuzz_dir/target/fuzz-logs"
export RUSTC_BOOTSTRAP=1
# AddressSanitizer keeps 256 MB of freed memory by default, which crowds the RSS limit.
export ASAN_OPTIONS="${ASAN_OPTIONS:-quarantine_size_mb=64}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
echo "== $(cargo fuzz --version | head -n 1), $(rustc --version)"

cd "$fuzz_dir"
mapfile -t targets < <(cargo fuzz list)
if [[ ${#targets[@]} -eq 0 ]]; then
    echo "no fuzz targets found in $fuzz_dir" >&2
    exit 1
fi

started=$SECONDS
echo "== building ${#targets[@]} targets"
cargo fuzz build
echo "== built in $((SECONDS - started)) s"

# Writes to $2 a copy of the JSON object in $1 padded with an unknown field to $3 bytes.
padded() {
    local seed="$1" out="$2" size="$3" seed_size pad
    seed_size="$(wc -c <"$seed")"
    pad=$((size - seed_size - 13)) # '{' + '"padding":"' + '",' replace the seed's '{'
    if [[ "$(head -c 1 "$seed")" != "{" || $pad -lt 0 ]]; then
        echo "cannot pad $seed (not a JSON object starting with '{')" >&2
        return 1
    fi
    {
        printf '{"padding":"'
        head -c "$pad" /dev/zero | tr '\0' x
        printf '",'
        tail -c +2 "$seed"
    } >"$out"
}

mkdir -p "$scratch" "$logs"
failed=()
printf '%-32s %-8s %12s %8s %s\n' target result executions corpus "seconds"
for target in "${targets[@]}"; do
    corpus="$scratch/$target"
    log="$logs/$target.log"
    if [[ "${FUZZ_KEEP_CORPUS:-0}" != 1 ]]; then
        rm -rf "$corpus"
    fi
    mkdir -p "$corpus"
    if [[ -d "corpus/$target" ]]; then
        cp -R "corpus/$target/." "$corpus/"
        seed="$(find "corpus/$target" -type f -name '*.json' | sort | head -n 1)"
        if [[ -n "$seed" ]]; then
            padded "$seed" "$corpus/generated-64KiB.json" 65536
            padded "$seed" "$corpus/generated-64KiB-plus-1.json" 65537
        fi
    fi

    target_started=$SECONDS
    status=0
    cargo fuzz run "$target" "$corpus" -- \
        -max_total_time="$seconds" \
        -rss_limit_mb=512 \
        -max_len=70000 \
        -timeout=10 \
        -print_final_stats=1 \
        >"$log" 2>&1 || status=$?

    executions="$(sed -n 's/^stat::number_of_executed_units:[[:space:]]*\([0-9]*\).*/\1/p' "$log" | tail -n 1)"
    if [[ -z "$executions" ]]; then
        executions="$(sed -n 's/^#\([0-9]*\)[[:space:]]*DONE.*/\1/p' "$log" | tail -n 1)"
    fi
    corpus_files="$(find "$corpus" -type f | wc -l)"

    result=ok
    if [[ $status -ne 0 ]]; then
        if grep -q 'ERROR: libFuzzer: timeout' "$log"; then
            result=timeout
        elif grep -qE 'ERROR: libFuzzer: (out-of-memory|malloc limit)' "$log"; then
            result=oom
        else
            result=crash
        fi
        failed+=("$target")
    fi
    printf '%-32s %-8s %12s %8s %s\n' "$target" "$result" "${executions:-?}" \
        "$corpus_files" "$((SECONDS - target_started))"
    if [[ $status -ne 0 ]]; then
        echo "---- $target: exit status $status; from $log:"
        grep -m 1 -A 2 'panicked at' "$log" | cut -c 1-400 || true
        echo "..."
        # Long lines (cargo-fuzz prints the failing input's bytes) are cut.
        tail -n 40 "$log" | cut -c 1-400
        if [[ -d "artifacts/$target" ]]; then
            echo "---- reproducers in $fuzz_dir/artifacts/$target:"
            ls -l "artifacts/$target"
        fi
        echo "----"
    fi
done

echo "== total $((SECONDS - started)) s"
if [[ ${#failed[@]} -ne 0 ]]; then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "all ${#targets[@]} targets ran ${seconds} s each without a crash, timeout or OOM"
