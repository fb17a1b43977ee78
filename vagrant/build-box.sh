#!/usr/bin/env bash
# Builds the lab's Vagrant box locally, for machines that cannot download one: Debian 12 by
# mmdebstrap into an ext4 image (the whole disk, no partition table), converted to qcow2, with a
# `vagrant` user (passwordless sudo, an SSH key generated here), OpenSSH, systemd-networkd (DHCP on
# every ethernet; Vagrant writes the private network's static address), runc (the agent's
# runtime) and Debian's stock 6.1 kernel. The VM boots that kernel directly (libvirt's
# kernel/initrd/cmdline): no boot loader to install, and it boots in seconds under software qemu.
#
# The box is a libvirt box (metadata.json, Vagrantfile, box.img) added as `skiff/debian12`.
# Usage: vagrant/build-box.sh [--force]
#   SKIFF_BOX_DIR   where the box, kernel and key are built (default /var/lib/skiff-vagrant/box)
#   SKIFF_BOX_NAME  the name it is added under (default skiff/debian12)
#   DEBIAN_MIRROR   (default http://deb.debian.org/debian)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
box_dir=${SKIFF_BOX_DIR:-/var/lib/skiff-vagrant/box}
box_name=${SKIFF_BOX_NAME:-skiff/debian12}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# libvirt's qemu runs as libvirt-qemu: the kernel and initrd must be where it can read them.
boot_dir=${SKIFF_BOX_BOOT_DIR:-/var/lib/libvirt/boot/skiff-debian12}
force=${1:-}
disk_gb=8

if [ "$force" != "--force" ] && vagrant box list 2>/dev/null | grep -q "^${box_name} .*libvirt" \
   && [ -s "$boot_dir/vmlinuz" ] && [ -s "$boot_dir/initrd.img" ] && [ -s "$box_dir/id_ed25519" ]; then
  echo "build-box: $box_name is already added (--force rebuilds it)"
  exit 0
fi
bash "$here/install-deps.sh" >/dev/null
start=$(date +%s)
mkdir -p "$box_dir" "$boot_dir"
work=$(mktemp -d "$box_dir/build.XXXXXX")
cleanup() { rm -rf "$work"; }
trap cleanup EXIT

[ -s "$box_dir/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C skiff-vagrant -f "$box_dir/id_ed25519"
pubkey=$(cat "$box_dir/id_ed25519.pub")

packages=linux-image-amd64,initramfs-tools,systemd-sysv,udev,dbus,openssh-server,sudo,iproute2,iputils-ping,procps,kmod,curl,ca-certificates,runc,rsync,less,netbase
echo "build-box: mmdebstrap bookworm ($packages)"
mmdebstrap --variant=apt --include="$packages" \
  --customize-hook='echo skiff-box > "$1/etc/hostname"' \
  --customize-hook='printf "127.0.0.1 localhost\n127.0.1.1 skiff-box\n" > "$1/etc/hosts"' \
  --customize-hook='printf "/dev/vda / ext4 defaults,errors=remount-ro 0 1\n" > "$1/etc/fstab"' \
  --customize-hook='chroot "$1" useradd -m -s /bin/bash -G sudo vagrant' \
  --customize-hook='echo "vagrant ALL=(ALL) NOPASSWD:ALL" > "$1/etc/sudoers.d/vagrant"; chmod 440 "$1/etc/sudoers.d/vagrant"' \
  --customize-hook="mkdir -p \"\$1/home/vagrant/.ssh\"; echo '$pubkey' > \"\$1/home/vagrant/.ssh/authorized_keys\"" \
  --customize-hook='chroot "$1" chown -R vagrant:vagrant /home/vagrant/.ssh; chmod 700 "$1/home/vagrant/.ssh"; chmod 600 "$1/home/vagrant/.ssh/authorized_keys"' \
  --customize-hook='printf "[Match]\nType=ether\n[Network]\nDHCP=ipv4\n[DHCPv4]\nUseDomains=yes\n" > "$1/etc/systemd/network/99-dhcp.network"' \
  --customize-hook='chroot "$1" systemctl enable systemd-networkd ssh serial-getty@ttyS0' \
  --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*; mkdir -p "$1/etc/systemd/system/ssh.service.d"; printf "[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n" > "$1/etc/systemd/system/ssh.service.d/keys.conf"' \
  --customize-hook='echo "UseDNS no" > "$1/etc/ssh/sshd_config.d/skiff.conf"' \
  --customize-hook='mkdir -p "$1/etc/systemd/system/systemd-networkd-wait-online.service.d"; printf "[Service]\nExecStart=\nExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=30\n" > "$1/etc/systemd/system/systemd-networkd-wait-online.service.d/any.conf"' \
  --customize-hook='chroot "$1" passwd -l root' \
  --customize-hook='rm -f "$1"/etc/machine-id; touch "$1/etc/machine-id"' \
  --customize-hook='chroot "$1" apt-get clean' \
  bookworm "$work/rootfs" "$mirror"

kver=$(basename "$(ls "$work"/rootfs/boot/vmlinuz-* | sort -V | tail -1)" | sed 's/^vmlinuz-//')
cp "$work/rootfs/boot/vmlinuz-$kver" "$boot_dir/vmlinuz"
cp "$work/rootfs/boot/initrd.img-$kver" "$boot_dir/initrd.img"
chmod 644 "$boot_dir/vmlinuz" "$boot_dir/initrd.img"
echo "build-box: kernel $kver"

# The whole disk is one ext4 filesystem built from the directory (mkfs.ext4 -d): no loop device
# or mount needed.
truncate -s "${disk_gb}G" "$work/disk.raw"
mkfs.ext4 -q -F -L skiff-root -d "$work/rootfs" "$work/disk.raw"
qemu-img convert -c -O qcow2 "$work/disk.raw" "$work/box.img"
cat >"$work/metadata.json" <<EOF
{"provider": "libvirt", "format": "qcow2", "virtual_size": $disk_gb}
EOF
cat >"$work/Vagrantfile" <<EOF
# The skiff lab box (vagrant/build-box.sh): Debian 12, kernel $kver, booted directly.
Vagrant.configure("2") do |config|
  config.ssh.username = "vagrant"
  config.ssh.private_key_path = "$box_dir/id_ed25519"
  config.ssh.insert_key = false
  config.vm.synced_folder ".", "/vagrant", disabled: true
  config.vm.provider :libvirt do |lv|
    lv.kernel = "$boot_dir/vmlinuz"
    lv.initrd = "$boot_dir/initrd.img"
    lv.cmd_line = "root=/dev/vda rw console=ttyS0 net.ifnames=0 quiet"
    lv.disk_bus = "virtio"
  end
end
EOF
tar -C "$work" -czf "$box_dir/skiff-debian12.box" metadata.json Vagrantfile box.img
vagrant box add --force --name "$box_name" "$box_dir/skiff-debian12.box"
# vagrant-libvirt copies a box into the storage pool on first use, named after the box (and its
# timestamp when unversioned): copies of an earlier build would stay behind unused.
pool_prefix="$(printf '%s' "$box_name" | sed 's|/|-VAGRANTSLASH-|')_vagrant_box_image_"
if command -v virsh >/dev/null; then
  for vol in $(virsh -c qemu:///system vol-list default 2>/dev/null | awk -v p="$pool_prefix" 'index($1, p) == 1 {print $1}'); do
    virsh -c qemu:///system vol-delete --pool default "$vol" >/dev/null && echo "build-box: removed the old pool copy $vol"
  done
fi
echo "$kver" > "$box_dir/kernel-version"
# Vagrant keeps its own copy: the tarball is not needed again.
rm -f "$box_dir/skiff-debian12.box"
echo "build-box: added $box_name ($(du -h "$work/box.img" | cut -f1) qcow2, kernel $kver) in $(( $(date +%s) - start ))s"
