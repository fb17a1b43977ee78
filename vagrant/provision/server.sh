#!/usr/bin/env bash
# The server VM: `skiff server` as a systemd unit on the lab address (6443; the address it binds
# is the `kubernetes` Service's endpoint and the one it publishes in cluster-info: with 0.0.0.0
# pods would have no kubernetes.default), its certificate naming that address; waits until it
# answers and its admin kubeconfig exists.
# One server: no leader election (under software emulation a debug build can miss a 10 s
# renewal and stop its controllers until it wins the Lease again).
# Usage: server.sh IP
set -euo pipefail
ip_addr=${1:?usage: server.sh IP}
cat >/etc/systemd/system/skiff-server.service <<UNIT
[Unit]
Description=skiff server (apiserver, controllers, scheduler)
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=/usr/local/bin/skiff server --data-dir /var/lib/skiff --bind ${ip_addr}:6443 --tls-san $ip_addr --leader-elect=false
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable skiff-server.service >/dev/null
systemctl restart skiff-server.service
for _ in $(seq 120); do
  if [ -s /var/lib/skiff/admin.kubeconfig ] && curl -skf "https://${ip_addr}:6443/healthz" >/dev/null; then
    echo "server: answering on https://${ip_addr}:6443"
    journalctl -u skiff-server.service --no-pager -o cat | grep -A1 "join nodes with" | tail -2 || true
    exit 0
  fi
  systemctl is-failed --quiet skiff-server.service && break
  sleep 1
done
echo "server: not answering; its log:" >&2
journalctl -u skiff-server.service --no-pager -o cat | tail -40 >&2
exit 1
