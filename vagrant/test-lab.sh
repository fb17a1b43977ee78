#!/usr/bin/env bash
# The Vagrant lab from a clean state, checked, and destroyed, in one command (issue 7):
# builds the binaries, the echo image and (libvirt) the box if needed, brings up the server and
# the agents one at a time, deploys a Deployment and a NodePort Service, and checks: every node
# Ready, the datapath loaded on the guests' kernel (with the features it lacks and the fallbacks
# it took), pods spread over the agent VMs, pod-to-pod across VMs, the ClusterIP from every node
# (every backend answers), the API through the kubernetes Service from every node, the NodePort
# from the host on every agent; runs a short service
# benchmark across VMs (new connection per request, ClusterIP against the pods' own IPs); then
# destroys everything and checks that no domain, volume or network of the lab is left (the box
# stays cached).
#
# Usage: sudo vagrant/test-lab.sh        (SKIFF_LAB_PROVIDER=libvirt|virtualbox, default libvirt;
#        SKIFF_LAB_KEEP=1 leaves the lab up; SKIFF_LAB_REUSE=1 only runs the checks on a lab that
#        is up (no build, no destroy); SKIFF_LAB_BENCH_REQUESTS (default 200) per path;
#        the other SKIFF_LAB_* settings as in the Vagrantfile)
# Exit status 0 only when every check passed and nothing was left behind.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
provider=${SKIFF_LAB_PROVIDER:-libvirt}
export VAGRANT_CWD=$here
# The binaries this script builds (a release build elsewhere in target/ is not this run's).
export SKIFF_BIN_DIR=${SKIFF_BIN_DIR:-$root/target/debug}
kc=$here/.lab/kubeconfig
net=${SKIFF_LAB_NET:-192.168.56}
bench_requests=${SKIFF_LAB_BENCH_REQUESTS:-200}
virsh=(virsh -c qemu:///system)
start=$(date +%s)
failures=0
say() { printf '[test-lab %4ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }
check() { # check WHAT CMD...: runs CMD, prints PASS/FAIL, counts failures
  local what=$1; shift
  if "$@"; then say "PASS $what"; else say "FAIL $what"; failures=$((failures + 1)); fi
}
# Vagrant's output without its progress bars (carriage-return redraws), indented.
vagrant_q() { vagrant "$@" </dev/null 2>&1 | tr '\r' '\n' | sed -u -e 's/\x1b\[[0-9;]*[A-Za-z]//g' -e '/Progress: /d' -e '/^\s*$/d' -e 's/^/    /'; return "${PIPESTATUS[0]}"; }

leftovers() { # prints what of the lab is left; fails if anything is
  local left=0 doms vols nets
  if [ "$provider" = libvirt ]; then
    doms=$("${virsh[@]}" list --all --name 2>/dev/null | grep '^vagrant_' || true)
    # The box's base image (skiff-VAGRANTSLASH-debian12_vagrant_box_image_*) is the cache that
    # may stay; every machine's disk is vagrant_<machine>.img.
    vols=$("${virsh[@]}" vol-list default 2>/dev/null | awk 'NR > 2 && $1 ~ /^vagrant_/ {print $1}' || true)
    nets=$("${virsh[@]}" net-list --all --name 2>/dev/null | grep '^skiff-lab' || true)
    [ -z "$doms" ] || { say "left behind: libvirt domains: $(echo $doms)"; left=1; }
    [ -z "$vols" ] || { say "left behind: libvirt volumes: $(echo $vols)"; left=1; }
    [ -z "$nets" ] || { say "left behind: libvirt networks: $(echo $nets)"; left=1; }
  fi
  return $left
}

destroy() {
  say "destroying the lab"
  vagrant_q destroy -f || true
  if [ "$provider" = libvirt ]; then
    # vagrant-libvirt removes the networks with the last machine; a run that died before could
    # have left them, and they are this lab's by name.
    for n in skiff-lab skiff-lab-mgmt; do
      "${virsh[@]}" net-destroy "$n" >/dev/null 2>&1 || true
      "${virsh[@]}" net-undefine "$n" >/dev/null 2>&1 || true
    done
  fi
  rm -f "$kc" "$here/.lab/join"
}

finish() {
  local rc=$?
  trap - EXIT
  if [ "${SKIFF_LAB_KEEP:-0}" != 1 ]; then
    destroy
    if leftovers; then say "PASS nothing left behind (domains, volumes, networks)"; else say "FAIL something was left behind"; failures=$((failures + 1)); fi
  else
    say "lab kept (SKIFF_LAB_KEEP=1): vagrant destroy -f in $here removes it"
  fi
  say "done in $(( $(date +%s) - start ))s: $failures failure(s), exit status $rc before cleanup"
  if [ "$rc" -ne 0 ] || [ "$failures" -ne 0 ]; then exit 1; fi
  exit 0
}
trap finish EXIT
trap 'exit 130' INT TERM

say "host: $(uname -r), HEAD $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?'), provider $provider"
say "host: prerequisites"
if [ "$provider" = libvirt ]; then bash "$here/install-deps.sh"; fi
kubectl=$(command -v kubectl.1.32 || command -v kubectl || true)
[ -n "$kubectl" ] || { say "kubectl not found"; exit 1; }
k() { "$kubectl" --kubeconfig "$kc" --request-timeout=60s "$@"; }

machines=$(vagrant status --machine-readable </dev/null | awk -F, '$3 == "state" {print $2}')
agent_names=$(printf '%s\n' $machines | grep '^agent' || true)
agents=$(printf '%s\n' $agent_names | grep -c . || true)
if [ "${SKIFF_LAB_REUSE:-0}" = 1 ]; then
  say "SKIFF_LAB_REUSE=1: checking the lab that is up (no build, no up; it is kept)"
  export SKIFF_LAB_KEEP=1
  k delete deployment/echo service/echo --ignore-not-found --wait=true >/dev/null
else
  say "host: building skiff, skiff-cni, skiff-shim (into $SKIFF_BIN_DIR) and the echo image"
  (cd "$root" && cargo build -q --bins -p skiff -p skiff-cni -p skiff-runtime)
  bash "$root/scripts/build-image.sh" "$root/target/images/skiff-echo-1.0.oci.tar"
  if [ "$provider" = libvirt ]; then bash "$here/build-box.sh"; fi

  destroy # from a clean state
  leftovers || { say "the lab could not be cleaned up before starting"; exit 1; }
  for m in $machines; do # one at a time (the agents join with the server's command)
    t0=$(date +%s)
    say "vagrant up $m ($provider)"
    vagrant_q up "$m" --provider "$provider" || { say "vagrant up $m failed"; exit 1; }
    say "$m up and provisioned in $(( $(date +%s) - t0 ))s"
  done
  say "lab up: server + $agents agents in $(( $(date +%s) - start ))s since the start"
fi

if [ "$provider" = libvirt ]; then
  # Test traffic from the host goes only to the lab's own isolated bridge: a host address that
  # routes anywhere else (the network gone, an address typo) is not sent to.
  bridge=$("${virsh[@]}" net-info skiff-lab | awk '/^Bridge:/ {print $2}')
  for n in skiff-lab skiff-lab-mgmt; do
    fwd=$("${virsh[@]}" net-dumpxml "$n" | grep -c '<forward' || true)
    check "libvirt network $n is isolated (no forward mode)" test "$fwd" -eq 0
  done
else
  bridge=""
fi
on_lab_bridge() { # on_lab_bridge IP: the host's route to IP is the lab bridge
  [ -z "$bridge" ] && return 0
  ip route get "$1" 2>/dev/null | grep -q " dev $bridge "
}

say "waiting for $agents Ready nodes"
ready=0
for _ in $(seq 120); do
  ready=$(k get nodes -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' 2>/dev/null | grep -c True || true)
  [ "$ready" -ge "$agents" ] && break
  sleep 2
done
check "$agents nodes Ready" test "${ready:-0}" -ge "$agents"
k get nodes -o wide | sed 's/^/    /'

# The datapath on the guests' kernel: what the agent found missing and the fallback it took.
dp_ok=1
for m in $agent_names; do
  features=$(vagrant ssh "$m" -c "sudo journalctl -u skiff-agent.service --no-pager -o cat | sed 's/\x1b\[[0-9;]*m//g' | grep -E 'kernel features|tc fallback|skiff_datapath: datapath loaded' | tail -3" </dev/null 2>/dev/null || true)
  printf '%s\n' "$features" | sed -e 's/^[^ ]* *INFO */    '"$m"': /'
  printf '%s\n' "$features" | grep -q "datapath loaded" || dp_ok=0
  # Without TCX (before 6.6) the tc programs must have gone in as netlink cls_bpf filters.
  if printf '%s\n' "$features" | grep -q "tcx=false" && ! printf '%s\n' "$features" | grep -q "tc=Netlink"; then dp_ok=0; fi
done
check "the eBPF datapath loaded on every agent (features and fallbacks above)" test "$dp_ok" = 1

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
check "the Deployment rolls out ($replicas replicas)" k rollout status deployment/echo --timeout=300s
k get pods -l app=echo -o wide | sed 's/^/    /'

mapfile -t pods < <(k get pods -l app=echo -o jsonpath='{range .items[*]}{.metadata.name} {.status.podIP} {.spec.nodeName}{"\n"}{end}')
nodes_used=$(printf '%s\n' "${pods[@]}" | awk '{print $3}' | sort -u | grep -c . || true)
check "pods spread over every agent VM ($nodes_used of $agents)" test "$nodes_used" -eq "$agents"

# Pod to pod across VMs: every pod asks one pod on another node (busybox wget in the image; its
# -T crashes, so the whole exec is bounded instead).
cross_ok=1
cross_n=0
for p in "${pods[@]}"; do
  read -r name _ node <<<"$p"
  target=$(printf '%s\n' "${pods[@]}" | awk -v n="$node" '$3 != n {print; exit}')
  [ -n "$target" ] || continue
  read -r tname tip tnode <<<"$target"
  answer=$(timeout 30 "$kubectl" --kubeconfig "$kc" exec "$name" -- wget -qO- "http://$tip:8080/" 2>/dev/null || true)
  case "$answer" in
    "$tname "*) cross_n=$((cross_n + 1)); say "  $name ($node) -> $tname ($tip on $tnode): '$answer'" ;;
    *) say "  $name ($node) -> $tname ($tip on $tnode): got '${answer}'"; cross_ok=0 ;;
  esac
done
check "pod-to-pod across VMs ($cross_n of ${#pods[@]} pods)" test "$cross_ok" = 1 -a "$cross_n" -eq "${#pods[@]}"

# The ClusterIP from every node: node processes get socket LB in the agent's host cgroup
# (<cgroup2>/skiff/<node>/host), so the client joins it first. Every backend must answer.
vip=$(k get service echo -o jsonpath='{.spec.clusterIP}')
seen=""
vip_ok=1
for m in $agent_names; do
  out=$(vagrant ssh "$m" -c "sudo sh -c 'echo \$\$ > /sys/fs/cgroup/skiff/$m/host/cgroup.procs && for i in \$(seq 20); do curl -s --max-time 3 http://$vip/; done'" </dev/null 2>/dev/null || true)
  n=$(printf '%s\n' "$out" | grep -c ' ' || true)
  say "  $m -> $vip: $n/20 answers from $(printf '%s\n' "$out" | awk '{print $1}' | sort -u | grep -c . || true) backends"
  [ "$n" -ge 20 ] || vip_ok=0
  seen="$seen $(printf '%s\n' "$out" | awk '{print $1}')"
done
check "ClusterIP $vip answers 20/20 from every agent VM" test "$vip_ok" = 1
distinct=$(printf '%s\n' $seen | sort -u | grep -c . || true)
check "the ClusterIP reached every backend ($distinct of $replicas)" test "$distinct" -eq "$replicas"

# The API through the kubernetes Service (10.96.0.1:443 -> the server's lab address), from every
# agent's host cgroup (/healthz needs no credentials).
api_vip=$(k get service kubernetes -o jsonpath='{.spec.clusterIP}')
api_ok=1
for m in $agent_names; do
  out=$(vagrant ssh "$m" -c "sudo sh -c 'echo \$\$ > /sys/fs/cgroup/skiff/$m/host/cgroup.procs && curl -sk --max-time 5 https://$api_vip/healthz'" </dev/null 2>/dev/null || true)
  say "  $m -> https://$api_vip/healthz: '$out'"
  [ "$out" = ok ] || api_ok=0
done
# Not from pods yet: a pod's packets reach the server with the pod's IP (no egress masquerade,
# issue 3) and the server VM has no route back to the pod ranges.
check "the API through the kubernetes Service from every agent VM" test "$api_ok" = 1

# The NodePort from the host, on every agent's lab address (XDP on the agent's uplink).
np_ok=1
i=0
for m in $agent_names; do
  i=$((i + 1))
  ip="$net.$((10 + i))"
  if ! on_lab_bridge "$ip"; then say "  $ip does not route to the lab bridge $bridge: not sent"; np_ok=0; continue; fi
  out=$(for _ in $(seq 10); do curl -s --max-time 3 ${bridge:+--interface "$bridge"} "http://$ip:30080/" || true; done)
  answers=$(printf '%s\n' "$out" | grep -c ' ' || true)
  say "  host -> $ip:30080 ($m): $answers/10 answers from $(printf '%s\n' "$out" | awk '{print $1}' | sort -u | grep -c . || true) backends"
  [ "$answers" -eq 10 ] || np_ok=0
done
check "NodePort 30080 from the host on every agent" test "$np_ok" = 1

# The short service benchmark across VMs: from each agent's host cgroup, one curl process makes
# $bench_requests requests, each on a new connection (Connection: close: TCP_CRR-like), to the
# ClusterIP (socket LB at connect(); half the backends on the other VM) and then to the same
# backends by pod IP directly (round robin), and reports requests/s and latency percentiles.
# Under software emulation the absolute numbers are the emulator's; the ratio is the datapath's.
bench_ok=1
mapfile -t pod_ips < <(printf '%s\n' "${pods[@]}" | awk '{print $2}')
for m in $agent_names; do
  direct_urls=""
  vip_urls=""
  for j in $(seq "$bench_requests"); do
    direct_urls="$direct_urls http://${pod_ips[$(( (j - 1) % ${#pod_ips[@]} ))]}:8080/"
    vip_urls="$vip_urls http://$vip/"
  done
  for path in clusterip direct; do
    urls=$vip_urls; [ "$path" = direct ] && urls=$direct_urls
    # curl's -o applies to one URL only: the bodies (<pod> <ip>) stay in the output, each
    # request's result is its own RESULT line.
    res=$(vagrant ssh "$m" -c "sudo sh -c 'echo \$\$ > /sys/fs/cgroup/skiff/$m/host/cgroup.procs && s=\$(date +%s%N) && timeout 150 curl -s -H \"Connection: close\" --max-time 5 -w \"\\nRESULT %{http_code} %{time_total} %{exitcode} %{url_effective}\\n\" $urls; e=\$(date +%s%N); echo WALL \$(( (e - s) / 1000000 ))'" </dev/null 2>/dev/null || true)
    ok=$(printf '%s\n' "$res" | grep -c '^RESULT 200 ' || true)
    wall=$(printf '%s\n' "$res" | awk '$1 == "WALL" {print $2}')
    backends=$(printf '%s\n' "$res" | awk '$1 ~ /^echo-/ {print $1}' | sort -u | grep -c . || true)
    stats=$(printf '%s\n' "$res" | awk '$1 == "RESULT" && $2 == "200" {print $3 * 1000}' | sort -n | awk '{a[NR] = $1} END {if (NR) printf "p50 %.2f ms, p90 %.2f ms, p99 %.2f ms", a[int(NR * 0.5 + 0.5)], a[int(NR * 0.9 + 0.5)], a[int(NR * 0.99 + 0.5)]}')
    rate=$(awk -v n="$ok" -v w="${wall:-0}" 'BEGIN {if (w > 0) printf "%.1f", n * 1000 / w; else print 0}')
    say "  bench $m -> $path: $ok/$bench_requests answered by $backends backends in ${wall:-?} ms: $rate req/s, $stats"
    printf '%s\n' "$res" | awk '$1 == "RESULT" && $2 != "200" {print "    not answered: " $5 " (curl exit " $4 ", " $3 " s)"}'
    [ "$ok" -eq "$bench_requests" ] || bench_ok=0
    eval "rate_$path=$rate"
  done
  say "  bench $m: ClusterIP/direct request rate $(awk -v a="$rate_clusterip" -v b="$rate_direct" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "n/a"}')"
done
check "service benchmark across VMs: every request answered on both paths" test "$bench_ok" = 1

say "checks finished: $failures failure(s) in $(( $(date +%s) - start ))s"
