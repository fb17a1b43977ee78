#!/usr/bin/env bash
# On every lab VM: installs the host-built binaries copied to /tmp/skiff-install as one tarball (skiff and
# skiff-shim in /usr/local/bin, skiff-cni into /opt/cni/bin by `skiff install-cni`), turns on
# forwarding and makes sure bpffs is mounted. Idempotent.
set -euo pipefail
src=/tmp/skiff-install
[ -s "$src/skiff-bin.tar.gz" ] || { echo "common: $src/skiff-bin.tar.gz was not copied (build on the host: cargo build --bins -p skiff -p skiff-cni -p skiff-runtime)" >&2; exit 1; }
tar -C "$src" -xzf "$src/skiff-bin.tar.gz"
for b in skiff skiff-shim skiff-cni; do
  [ -s "$src/$b" ] || { echo "common: $src/skiff-bin.tar.gz holds no $b" >&2; exit 1; }
done
install -m 0755 "$src/skiff" "$src/skiff-shim" /usr/local/bin/
install -d /usr/local/lib/skiff
install -m 0755 "$src/skiff-cni" /usr/local/lib/skiff/skiff-cni
cat >/usr/local/lib/skiff/join.sh <<'JOIN'
#!/usr/bin/env bash
# Joins this VM as a node: JOIN.sh IP NAME --server URL --token TOKEN --ca-cert-hash HASH
# (the arguments `skiff token create --print-join-command` prints after `skiff agent`).
# Writes the agent's unit (the token in a root-only environment file), (re)starts it and waits
# until the agent reports its node ready. Idempotent: a re-run restarts the agent, which the
# datapath survives.
set -euo pipefail
node_ip=${1:?usage: join.sh IP NAME --server URL --token TOKEN --ca-cert-hash HASH}
node_name=${2:?usage: join.sh IP NAME --server URL --token TOKEN --ca-cert-hash HASH}
shift 2
server="" token="" hash=""
while [ $# -gt 0 ]; do
  case "$1" in
    --server) server=$2; shift 2 ;;
    --token) token=$2; shift 2 ;;
    --ca-cert-hash) hash=$2; shift 2 ;;
    *) echo "join: unexpected argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$server" ] && [ -n "$token" ] && [ -n "$hash" ] || { echo "join: need --server, --token and --ca-cert-hash" >&2; exit 2; }
uplink=$(ip -o -4 addr show | awk -v ip="$node_ip" '{split($4, a, "/"); if (a[1] == ip) {print $2; exit}}')
[ -n "$uplink" ] || { echo "join: no interface holds $node_ip" >&2; exit 1; }
install -d -m 0700 /etc/skiff
umask 077
printf 'SKIFF_TOKEN=%s\n' "$token" >/etc/skiff/agent.env
cat >/etc/systemd/system/skiff-agent.service <<UNIT
[Unit]
Description=skiff node agent (joined $server)
After=network-online.target
Wants=network-online.target

[Service]
EnvironmentFile=/etc/skiff/agent.env
ExecStart=/usr/local/bin/skiff agent --server $server --ca-cert-hash $hash --node-ip $node_ip --node-name $node_name --uplink $uplink --data-dir /var/lib/skiff-agent --image-dir /var/lib/skiff/images
Restart=on-failure
RestartSec=2
KillMode=process

[Install]
WantedBy=multi-user.target
UNIT
chmod 644 /etc/systemd/system/skiff-agent.service
systemctl daemon-reload
systemctl enable skiff-agent.service >/dev/null
since=$(date '+%Y-%m-%d %H:%M:%S')
systemctl restart skiff-agent.service
for _ in $(seq 300); do
  if journalctl -u skiff-agent.service --since "$since" --no-pager -o cat | grep -q "node ready"; then
    echo "join: $node_name is ready (uplink $uplink)"
    exit 0
  fi
  systemctl is-failed --quiet skiff-agent.service && break
  sleep 1
done
echo "join: $node_name did not become ready; the agent's log:" >&2
journalctl -u skiff-agent.service --since "$since" --no-pager -o cat | tail -40 >&2
exit 1
JOIN
chmod 0755 /usr/local/lib/skiff/join.sh
skiff install-cni --source /usr/local/lib/skiff/skiff-cni --bin-dir /opt/cni/bin --conf-dir /etc/cni/net.d
if systemctl is-enabled --quiet systemd-networkd 2>/dev/null; then
  # systemd-networkd (the skiff box) must leave the pods' veths (skf*), skiff's devices and the
  # routes skiff-cni and the agent add alone: a DHCP .network matching every ethernet takes the
  # veths, and networkd drops routes it did not make when it (re)configures a link.
  install -d /etc/systemd/network /etc/systemd/networkd.conf.d
  printf '[Match]\nName=skf* skiff*\n\n[Link]\nUnmanaged=yes\n' >/etc/systemd/network/05-skiff-unmanaged.network
  printf '[Network]\nManageForeignRoutes=no\nManageForeignRoutingPolicyRules=no\n' >/etc/systemd/networkd.conf.d/60-skiff.conf
  systemctl restart systemd-networkd
fi
install -d /etc/sysctl.d
printf 'net.ipv4.ip_forward = 1\n' >/etc/sysctl.d/60-skiff.conf
sysctl -q -p /etc/sysctl.d/60-skiff.conf
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
echo "common: $(skiff --version 2>/dev/null || echo skiff) installed, kernel $(uname -r)"
