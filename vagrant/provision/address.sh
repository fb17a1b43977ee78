#!/usr/bin/env bash
# Gives the lab NIC its private address (libvirt: Vagrant's auto_config is off; the skiff box
# runs systemd-networkd). Idempotent; a no-op where Vagrant already configured it (VirtualBox).
# Usage: address.sh IP
set -euo pipefail
ip_addr=${1:?usage: address.sh IP}
if ip -o -4 addr show | grep -q " inet ${ip_addr}/"; then
  echo "address: ${ip_addr} already configured"
  exit 0
fi
mgmt=$(ip -o route show default | awk '{print $5; exit}')
dev=""
for d in /sys/class/net/*; do
  n=$(basename "$d")
  [ "$n" = lo ] || [ "$n" = "$mgmt" ] || [ ! -e "$d/device" ] && continue
  dev=$n
  break
done
[ -n "$dev" ] || { echo "address: no second network interface for ${ip_addr} (only: $(ls /sys/class/net))" >&2; exit 1; }
mkdir -p /etc/systemd/network
printf '[Match]\nName=%s\n\n[Network]\nAddress=%s/24\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n' "$dev" "$ip_addr" \
  >/etc/systemd/network/10-skiff-lab.network
networkctl reload
networkctl reconfigure "$dev"
for _ in $(seq 100); do
  ip -o -4 addr show dev "$dev" | grep -q " inet ${ip_addr}/" && { echo "address: ${ip_addr}/24 on ${dev}"; exit 0; }
  sleep 0.2
done
echo "address: ${ip_addr} did not appear on ${dev}" >&2
ip addr show "$dev" >&2
exit 1
