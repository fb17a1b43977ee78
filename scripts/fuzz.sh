#!/usr/bin/env bash
# Builds and runs every cargo-fuzz target in the repository for a bounded time each, and fails
# on the first crash, printing the input that caused it.
#
#   scripts/fuzz.sh [seconds-per-target]      (default 15)
#
# Targets: every fuzz/ crate (userspace/api/fuzz, userspace/store/fuzz, userspace/agent/fuzz,
# cni/fuzz), every target `cargo fuzz list` names there. Needs the nightly toolchain (libFuzzer's
# sanitizer flags); installs cargo-fuzz from crates.io when it is missing. Everything built goes
# to target/fuzz (not the workspace's target/debug); corpora and crash artifacts go to
# target/fuzz/corpus and target/fuzz/artifacts, so a run leaves the source tree untouched.
# A corpus grows across runs there: later runs start from what earlier ones found.
#
# Env: SKIFF_FUZZ_QUICK=1 builds the targets unoptimised and without AddressSanitizer
# (`--dev --sanitizer none`): the test suite uses it, because a cold optimised ASan build of the
# targets takes about 25 minutes on two cores and this one about 5. The code under test is safe
# Rust, so what a bounded run can find (panics, overflows, hangs, runaway memory) is still found.
set -euo pipefail

seconds="${1:-15}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
    echo "usage: $0 [seconds-per-target]  (a positive whole number; got '$seconds')" >&2
    exit 2
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz_target_dir="$root/target/fuzz"
build_flags=()
if [ "${SKIFF_FUZZ_QUICK:-0}" = 1 ]; then
    build_flags=(--dev --sanitizer none)
    fuzz_target_dir="$root/target/fuzz-quick"
fi
crates=(userspace/api/fuzz userspace/store/fuzz userspace/agent/fuzz cni/fuzz)

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz.sh: the nightly toolchain is missing (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz (cargo install cargo-fuzz --locked)"
    cargo install cargo-fuzz --locked
fi

started=$(date +%s)
ran=0
for crate in "${crates[@]}"; do
    dir="$root/$crate"
    [ -f "$dir/Cargo.toml" ] || { echo "fuzz.sh: $crate/Cargo.toml is missing" >&2; exit 1; }
    name="$(basename "$(dirname "$dir")")"
    echo "== $crate: building"
    build_started=$(date +%s)
    (cd "$dir" && cargo +nightly fuzz build "${build_flags[@]}" --target-dir "$fuzz_target_dir")
    echo "== $crate: built in $(( $(date +%s) - build_started )) s"
    mapfile -t targets < <(cd "$dir" && cargo +nightly fuzz list)
    for target in "${targets[@]}"; do
        corpus="$fuzz_target_dir/corpus/$name/$target"
        artifacts="$fuzz_target_dir/artifacts/$name/$target"
        mkdir -p "$corpus" "$artifacts"
        echo "== $crate: $target for ${seconds} s"
        log="$artifacts/last-run.log"
        # Only this run's findings are reported below.
        rm -f "$artifacts"/crash-* "$artifacts"/oom-* "$artifacts"/timeout-* "$artifacts"/leak-*
        set +e
        (cd "$dir" && cargo +nightly fuzz run "${build_flags[@]}" --target-dir "$fuzz_target_dir" "$target" "$corpus" -- \
            -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
            -artifact_prefix="$artifacts/" -print_final_stats=1) >"$log" 2>&1
        status=$?
        set -e
        grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb)|^#[0-9]+ +DONE' "$log" | tail -3 || true
        if [ "$status" -ne 0 ]; then
            echo "fuzz.sh: $crate $target FAILED (exit $status); the end of its output:" >&2
            tail -60 "$log" >&2
            for input in "$artifacts"/crash-* "$artifacts"/oom-* "$artifacts"/timeout-* "$artifacts"/leak-*; do
                [ -f "$input" ] || continue
                echo "--- crash input $input ($(wc -c <"$input") bytes), hex:" >&2
                od -A x -t x1z -v "$input" | head -40 >&2
                echo "--- base64:" >&2
                base64 -w0 "$input" >&2; echo >&2
                echo "--- reproduce: (cd $crate && cargo +nightly fuzz run --target-dir $fuzz_target_dir $target $input)" >&2
            done
            exit 1
        fi
        ran=$((ran + 1))
    done
done
echo "fuzz.sh: $ran targets, ${seconds} s each, no crash; $(( $(date +%s) - started )) s in total"
