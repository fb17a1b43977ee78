#!/usr/bin/env bash
# Installs what building, running and testing skiff needs on Debian 12, as root. Idempotent: every
# step checks first and does nothing when the thing is already there. Says clearly what is missing
# when it cannot install it.
set -euo pipefail

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[setup] error:\033[0m %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: skiff loads eBPF programs and creates network namespaces"
command -v apt-get >/dev/null || die "this script supports Debian 12 (apt-get not found)"

# Debian packages. etcd-server: the etcd backend and its tests. iproute2: network namespaces and
# veths for the lab. bpftool: inspecting the datapath. protobuf-compiler: gRPC code generation.
# containerd (+ containernetworking-plugins for its loopback plugin): the CRI runtime (--runtime cri).
# g++: libFuzzer's C++ sources in the fuzz targets' build. e2fsprogs (mkfs.ext4) and nftables: the
# disk-full and partition fault tests.
packages=(etcd-server iproute2 bpftool protobuf-compiler ca-certificates curl git gcc g++ e2fsprogs pkg-config runc busybox-static skopeo umoci podman iptables nftables linux-perf containerd containernetworking-plugins docker-registry)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
fi

# kubectl 1.32: the tests drive the apiserver with real kubectl. Debian 12's kubernetes-client is
# 1.20, too old; Google's `kubectl` package ships every minor as kubectl.1.NN.
KUBECTL_DIR=/usr/lib/google-cloud-sdk/bin
if [ ! -x "$KUBECTL_DIR/kubectl.1.32" ] && ! command -v kubectl.1.32 >/dev/null; then
  say "kubectl 1.32 not found; trying the kubectl package"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubectl >/dev/null 2>&1 || true
  [ -x "$KUBECTL_DIR/kubectl.1.32" ] || command -v kubectl.1.32 >/dev/null \
    || die "kubectl 1.32 is missing: install it as $KUBECTL_DIR/kubectl.1.32 or kubectl.1.32 on PATH"
fi

# Python kubernetes client (the client test).
# On a stock Debian 12, python3 is "externally managed" (PEP 668) and has no pip: use Debian's
# python3-kubernetes there; where python3 has its own pip (pyenv, a venv), use that.
if ! command -v python3 >/dev/null; then
  say "installing python3"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 >/dev/null || die "apt-get install python3 failed"
fi
if ! python3 -c 'import kubernetes' 2>/dev/null; then
  say "installing the Python kubernetes client"
  python3 -m pip install -q kubernetes 2>/dev/null \
    || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-kubernetes >/dev/null 2>&1 \
    || true
  python3 -c 'import kubernetes' 2>/dev/null \
    || die "the Python kubernetes client is missing: pip install kubernetes (or apt-get install python3-kubernetes)"
fi

# Rust: stable builds userspace; nightly + rust-src builds the eBPF programs (bpfel-unknown-none
# with -Z build-std=core); bpf-linker 0.10.3 links them with the nightly toolchain's own LLVM.
command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (stable 1.95 and a nightly)"
rustup toolchain list | grep -q '^nightly' || { say "installing the nightly toolchain"; rustup toolchain install nightly --profile minimal; }
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  say "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly || die "rustup component add rust-src --toolchain nightly failed"
fi
if ! command -v bpf-linker >/dev/null || ! bpf-linker --version 2>/dev/null | grep -q '0\.10\.3'; then
  say "installing bpf-linker 0.10.3 (about 2 minutes)"
  cargo install bpf-linker --version 0.10.3 --locked -q || die "cargo install bpf-linker --version 0.10.3 failed"
fi

# The kernel features the datapath needs.
[ -e /sys/kernel/btf/vmlinux ] || say "warning: no BTF at /sys/kernel/btf/vmlinux"
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf || die "cannot mount bpffs at /sys/fs/bpf"
say "ready"
