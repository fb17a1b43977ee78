#!/usr/bin/env bash
# Brings up skiff on this machine with a demo workload and shows Service traffic flowing through
# the eBPF datapath. Needs root. Idempotent: a server already started by this script is reused.
#
#   SKIFF_DATA=/var/lib/skiff-lab   where the server keeps its store, certificates and kubeconfig
#   SKIFF_PORT=6443                 the HTTPS port (on 127.0.0.1)
#   ./scripts/up.sh down            stops the server this script started and removes the lab
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${SKIFF_DATA:-/var/lib/skiff-lab}
PORT=${SKIFF_PORT:-6443}
PIDFILE="$DATA/server.pid"
say() { printf '\033[1m[up]\033[0m %s\n' "$*"; }

if [ "${1:-}" = down ]; then
  if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    kill "$(cat "$PIDFILE")" && say "stopped the server (pid $(cat "$PIDFILE"))"
  fi
  rm -f "$PIDFILE"
  exit 0
fi

./scripts/setup.sh
say "building skiff (release)"
cargo build --release --locked -p skiff
SKIFF=$PWD/target/release/skiff
KUBECTL=/usr/lib/google-cloud-sdk/bin/kubectl.1.32
command -v kubectl.1.32 >/dev/null && KUBECTL=$(command -v kubectl.1.32)

mkdir -p "$DATA"
if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
  say "server already running (pid $(cat "$PIDFILE"))"
else
  say "starting skiff server on https://127.0.0.1:$PORT (data in $DATA, log in $DATA/server.log)"
  rm -f "$DATA/admin.kubeconfig"
  nohup "$SKIFF" server --data-dir "$DATA" --bind "127.0.0.1:$PORT" >"$DATA/server.log" 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 100); do
    [ -f "$DATA/admin.kubeconfig" ] && break
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { cat "$DATA/server.log"; exit 1; }
    sleep 0.2
  done
fi
export KUBECONFIG="$DATA/admin.kubeconfig"
K() { "$KUBECTL" --cache-dir "$DATA/kube-cache" "$@"; }

say "applying the demo workload (examples/demo.yaml)"
K apply -f examples/demo.yaml
K get all -n demo -o wide

say "Service traffic through eBPF: the demo Service's ClusterIP, programmed into the datapath"
"$SKIFF" demo --kubeconfig "$KUBECONFIG" --namespace demo --service echo

cat <<MSG

skiff is up.
  export KUBECONFIG=$KUBECONFIG
  $KUBECTL get all -A
  ./scripts/up.sh down       # stop the server
MSG
