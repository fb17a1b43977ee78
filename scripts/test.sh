#!/usr/bin/env bash
# The whole test suite: unit tests, the store conformance suite on SQLite and on a real etcd, the
# apiserver driven by real kubectl, the Python client and kube-rs, and the eBPF datapath with real
# packets between network namespaces. Needs root. With CI=true nothing may skip.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# Two test threads: the machine has two cores and the end-to-end tests start real servers.
cargo test --workspace --locked -- --test-threads=2 2>&1
