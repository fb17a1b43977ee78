#!/usr/bin/env bash
# Installs what the Vagrant lab needs on a Debian 12 host, idempotently: Vagrant with the libvirt
# provider, libvirt + qemu (software emulation is enough), and mmdebstrap for the locally built box.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# Machines that carry qemu-utils from bookworm-backports cannot take bookworm's qemu-system-x86
# (qemu-utils >= 8 breaks qemu-system-common 7.2): take qemu from backports there too.
qemu_from=()
if installed qemu-utils && dpkg-query -W -f='${Version}' qemu-utils | grep -q '~bpo12'; then
  src=/etc/apt/sources.list.d/skiff-bookworm-backports.sources
  if [ ! -e "$src" ] && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' >"$src"
    apt-get update -qq
  fi
  qemu_from=(-t bookworm-backports)
fi

pkgs=(vagrant vagrant-libvirt libvirt-daemon-system libvirt-clients mmdebstrap dnsmasq-base
      ebtables openssh-client rsync qemu-utils)
missing=()
for p in "${pkgs[@]}"; do installed "$p" || missing+=("$p"); done
if ((${#missing[@]})) || ! installed qemu-system-x86; then
  apt-get update -qq
  installed qemu-system-x86 || apt-get install -y -qq --no-install-recommends "${qemu_from[@]}" qemu-system-x86 qemu-system-common qemu-system-data
  ((${#missing[@]})) && apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# libvirtd must run for vagrant-libvirt (no systemd on some hosts: start it directly).
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
  if command -v systemctl >/dev/null && systemctl is-system-running >/dev/null 2>&1; then
    systemctl enable --now libvirtd virtlogd
  else
    pgrep -x virtlogd >/dev/null || virtlogd -d
    pgrep -x libvirtd >/dev/null || libvirtd -d
  fi
  for _ in $(seq 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
fi
echo "install-deps: vagrant $(vagrant --version 2>/dev/null | cut -d' ' -f2), $(qemu-system-x86_64 --version | head -1), libvirt $(virsh -c qemu:///system version --daemon 2>/dev/null | sed -n 's/.*daemon: //p' | head -1)"
