#!/usr/bin/env bash
# The Vagrant lab from a clean state, checked, and destroyed, in one command (issue 7):
# builds the binaries, the echo image and (libvirt) the box if needed, brings up the server and
# the agents, deploys a Deployment and a Service, and checks: pods spread over the agent VMs,
# pod-to-pod across VMs, the ClusterIP from every node (all backends answer), the NodePort from
# the host; then destroys everything and checks nothing is left.
#
# STATUS: written and `bash -n` checked only; it has never run (no VM was booted while it was
# written). The short service benchmark across VMs is not part of it yet.
#
# Usage: sudo vagrant/test-lab.sh        (SKIFF_LAB_PROVIDER=libvirt|virtualbox, default libvirt;
#        SKIFF_LAB_KEEP=1 leaves the lab up; the other SKIFF_LAB_* settings as in the Vagrantfile)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
provider=${SKIFF_LAB_PROVIDER:-libvirt}
export VAGRANT_CWD=$here
kc=$here/.lab/kubeconfig
start=$(date +%s)
failures=0
say() { printf '[test-lab %4ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }
check() { # check WHAT CMD...: runs CMD, prints PASS/FAIL, counts failures
  local what=$1; shift
  if "$@"; then say "PASS $what"; else say "FAIL $what"; failures=$((failures + 1)); fi
}

leftovers() {
  local left=0
  if [ "$provider" = libvirt ]; then
    if virsh -c qemu:///system list --all --name 2>/dev/null | grep -q "vagrant_"; then
      say "left behind: libvirt domains: $(virsh -c qemu:///system list --all --name | grep vagrant_ | tr '\n' ' ')"
      left=1
    fi
    if virsh -c qemu:///system net-list --all --name 2>/dev/null | grep -q "^skiff-lab"; then
      say "left behind: libvirt networks: $(virsh -c qemu:///system net-list --all --name | grep '^skiff-lab' | tr '\n' ' ')"
      left=1
    fi
  fi
  return $left
}

destroy() {
  say "destroying the lab"
  vagrant destroy -f >/dev/null 2>&1 || true
  if [ "$provider" = libvirt ]; then
    # vagrant-libvirt keeps the networks it made; they are this lab's by name.
    for net in skiff-lab skiff-lab-mgmt; do
      virsh -c qemu:///system net-destroy "$net" >/dev/null 2>&1 || true
      virsh -c qemu:///system net-undefine "$net" >/dev/null 2>&1 || true
    done
  fi
  rm -f "$kc" "$here/.lab/join"
}

finish() {
  local rc=$?
  if [ "${SKIFF_LAB_KEEP:-0}" != 1 ]; then
    destroy
    if leftovers; then say "nothing left behind"; else failures=$((failures + 1)); fi
  fi
  say "done: $failures failure(s), exit status $rc before cleanup"
  if [ "$rc" -ne 0 ] || [ "$failures" -ne 0 ]; then exit 1; fi
  exit 0
}
trap finish EXIT

say "host: prerequisites"
[ "$provider" = libvirt ] && bash "$here/install-deps.sh"
kubectl=$(command -v kubectl.1.32 || command -v kubectl || true)
[ -n "$kubectl" ] || { say "kubectl not found"; exit 1; }
k() { "$kubectl" --kubeconfig "$kc" "$@"; }

say "host: building skiff, skiff-cni, skiff-shim and the echo image"
(cd "$root" && cargo build -q --bins -p skiff -p skiff-cni -p skiff-runtime)
bash "$root/scripts/build-image.sh" "$root/target/images/skiff-echo-1.0.oci.tar"
[ "$provider" = libvirt ] && bash "$here/build-box.sh"

destroy # from a clean state
say "vagrant up ($provider)"
vagrant up --provider "$provider"
agents=$(vagrant status --machine-readable | awk -F, '$3 == "state" && $2 ~ /^agent/ {print $2}' | sort -u | wc -l)
say "lab up: server + $agents agents"

say "waiting for $agents Ready nodes"
for _ in $(seq 120); do
  ready=$(k get nodes -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' 2>/dev/null | grep -c True || true)
  [ "$ready" -ge "$agents" ] && break
  sleep 2
done
check "$agents nodes Ready" test "${ready:-0}" -ge "$agents"

replicas=$((agents * 2))
k apply -f - <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: default}
spec:
  replicas: $replicas
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      topologySpreadConstraints:
      - {maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule, labelSelector: {matchLabels: {app: echo}}}
      containers:
      - name: echo
        image: skiff/echo:1.0
        ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  type: NodePort
  selector: {app: echo}
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
EOF
check "the Deployment rolls out" k rollout status deployment/echo --timeout=300s

mapfile -t pods < <(k get pods -l app=echo -o jsonpath='{range .items[*]}{.metadata.name} {.status.podIP} {.spec.nodeName}{"\n"}{end}')
nodes_used=$(printf '%s\n' "${pods[@]}" | awk '{print $3}' | sort -u | wc -l)
check "pods spread over every agent VM ($nodes_used of $agents)" test "$nodes_used" -eq "$agents"

# Pod to pod across VMs: every pod asks one pod on another node (busybox wget in the image).
cross_ok=1
for p in "${pods[@]}"; do
  read -r name _ node <<<"$p"
  target=$(printf '%s\n' "${pods[@]}" | awk -v n="$node" '$3 != n {print; exit}')
  [ -n "$target" ] || continue
  read -r tname tip _ <<<"$target"
  answer=$(k exec "$name" -- wget -qO- -T 5 "http://$tip:8080/" 2>/dev/null || true)
  case "$answer" in "$tname "*) ;; *) say "  $name ($node) -> $tname ($tip): got '${answer}'"; cross_ok=0 ;; esac
done
check "pod-to-pod across VMs" test "$cross_ok" = 1

# The ClusterIP from every node: node processes get socket LB in the agent's host cgroup
# (<cgroup2>/skiff/<node>/host), so the client joins it first. Every backend must answer.
vip=$(k get service echo -o jsonpath='{.spec.clusterIP}')
seen=""
vip_ok=1
for m in $(vagrant status --machine-readable | awk -F, '$3 == "state" && $2 ~ /^agent/ {print $2}' | sort -u); do
  out=$(vagrant ssh "$m" -c "sudo sh -c 'echo \$\$ > /sys/fs/cgroup/skiff/$m/host/cgroup.procs && for i in \$(seq 20); do curl -s --max-time 3 http://$vip/; done'" 2>/dev/null || true)
  n=$(printf '%s\n' "$out" | grep -c ' ' || true)
  [ "$n" -ge 20 ] || { say "  $m: $n/20 answers from $vip"; vip_ok=0; }
  seen="$seen $(printf '%s\n' "$out" | awk '{print $1}')"
done
check "ClusterIP $vip answers 20/20 from every agent VM" test "$vip_ok" = 1
distinct=$(printf '%s\n' $seen | sort -u | grep -c . || true)
check "the ClusterIP reached every backend ($distinct of $replicas)" test "$distinct" -eq "$replicas"

# The NodePort from the host, on every agent's lab address.
np_ok=1
net=${SKIFF_LAB_NET:-192.168.56}
for i in $(seq "$agents"); do
  ip="$net.$((10 + i))"
  answers=$(for _ in $(seq 10); do curl -s --max-time 3 "http://$ip:30080/" || true; done | grep -c ' ' || true)
  [ "$answers" -eq 10 ] || { say "  NodePort $ip:30080: $answers/10 answers"; np_ok=0; }
done
check "NodePort 30080 from the host on every agent" test "$np_ok" = 1

say "checks finished: $failures failure(s) in $(( $(date +%s) - start ))s"
if [ "${SKIFF_LAB_KEEP:-0}" = 1 ]; then say "lab kept (SKIFF_LAB_KEEP=1): vagrant destroy -f to remove it"; fi
