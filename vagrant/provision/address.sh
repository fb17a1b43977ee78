#!/usr/bin/env bash
# Gives the lab NIC its private address (libvirt: Vagrant's auto_config is off; the skiff box
# runs systemd-networkd). Idempotent; a no-op where Vagrant already configured it (VirtualBox).
# Usage: address.sh IP MAC
set -euo pipefail
ip_addr=${1:?usage: address.sh IP MAC}
mac=${2:-}
if ip -o -4 addr show | grep -q " inet ${ip_addr}/"; then
  echo "address: ${ip_addr} already configured"
  exit 0
fi
# The lab NIC is found by the MAC the Vagrantfile gave it: there is no default route to tell the
# management NIC by (its network is isolated), and interface order is not a contract.
dev=""
if [ -n "$mac" ]; then
  for d in /sys/class/net/*; do
    [ "$(cat "$d/address" 2>/dev/null)" = "$mac" ] && { dev=$(basename "$d"); break; }
  done
fi
[ -n "$dev" ] || { echo "address: no interface has MAC ${mac:-(none given)} for ${ip_addr} (have: $(for d in /sys/class/net/*; do printf '%s=%s ' "$(basename "$d")" "$(cat "$d/address")"; done))" >&2; exit 1; }
mkdir -p /etc/systemd/network
printf '[Match]\nMACAddress=%s\n\n[Network]\nAddress=%s/24\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n' "$mac" "$ip_addr" \
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
