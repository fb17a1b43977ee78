#!/usr/bin/env bash
# The whole test suite: unit tests, the store conformance suite on SQLite and on a real etcd, the
# apiserver driven by real kubectl, the Python client and kube-rs, and the eBPF datapath with real
# packets between network namespaces, then every fuzz target for a bounded time. Needs root. With
# CI=true nothing may skip.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# A fresh clone (CI) gains nothing from incremental compilation, and its caches take as much disk
# as the build itself.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi
log=$(mktemp /tmp/skiff-test.XXXXXX)
trap 'rm -f "$log"' EXIT
# --no-fail-fast: every test binary runs, so one failure does not hide the state of the rest.
# Two test threads: the machine has two cores and the end-to-end tests start real servers.
status=0
cargo test --workspace --locked --no-fail-fast -- --test-threads=2 2>&1 | tee "$log" || status=$?
# Every cargo-fuzz target (decoders, patch engines, CNI input, parsers of network data) for a
# bounded time; a crash fails the run and prints its input.
SKIFF_FUZZ_QUICK=1 ./scripts/fuzz.sh "${SKIFF_FUZZ_SECONDS:-10}" || status=$?
# cargo prints one "test result" line per test binary; the last is often a doc-test run with no
# tests, so close with the totals.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "%d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit $status
