#!/usr/bin/env bash
# Builds one of skiff's two images as an OCI image layout archive (no registry, no daemon):
#
#   scripts/build-image.sh [OUT]          docker.io/skiff/echo:1.0 (default OUT:
#                                         target/images/skiff-echo-1.0.oci.tar): a busybox-static
#                                         rootfs (sh, ls, cat, wget, nc, sleep, ... as applet
#                                         symlinks) plus a static /usr/local/bin/skiff-echo as the
#                                         entrypoint; the workload image of tests and the demo.
#   scripts/build-image.sh --pause [OUT]  docker.io/skiff/pause:1.0 (default OUT:
#                                         target/images/skiff-pause-1.0.oci.tar): one file, the
#                                         same static skiff-echo run as `skiff-echo pause` (sleeps
#                                         until SIGTERM/SIGINT). containerd's CRI plugin uses it as
#                                         its sandbox_image: `ctr -n k8s.io images import OUT`.
#
# Both share the static build and the reproducible OCI packing below.
# Env: SKIFF_ECHO_BIN=path uses that (static) binary instead of building one.
# Reproducible: fixed mtimes, owners and order, so an unchanged tree gives the same bytes and
# digests; OUT is only replaced when its content changes. Needs: cargo, busybox-static, tar, gzip,
# sha256sum.
set -euo pipefail

say() { printf '\033[1m[build-image]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[build-image] error:\033[0m %s\n' "$*" >&2; exit 1; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KIND=echo
if [ "${1:-}" = --pause ]; then KIND=pause; shift; fi
OUT=${1:-$ROOT/target/images/skiff-$KIND-1.0.oci.tar}
IMAGE_NAME=docker.io/skiff/$KIND:1.0
IMAGE_TAG=1.0
# Its own target dir: the static, release build must not invalidate the workspace's debug build.
BUILD=$ROOT/target/image-build
TARGET=x86_64-unknown-linux-gnu

BUSYBOX=/bin/busybox
is_static() { { ldd "$1" 2>&1 || true; } | grep -qE 'not a dynamic executable|statically linked'; }
if [ "$KIND" = echo ]; then
  [ -x "$BUSYBOX" ] || die "$BUSYBOX not found: apt-get install busybox-static"
  is_static "$BUSYBOX" || die "$BUSYBOX is dynamically linked: install busybox-static"
fi
for tool in tar gzip sha256sum; do command -v "$tool" >/dev/null || die "$tool not found"; done

if [ -n "${SKIFF_ECHO_BIN:-}" ]; then
  ECHO_BIN=$SKIFF_ECHO_BIN
else
  command -v cargo >/dev/null || die "cargo not found"
  say "building a static skiff-echo"
  (cd "$ROOT" && RUSTFLAGS='-C target-feature=+crt-static' \
    CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=true \
    cargo build -q --release -p skiff-echo --target "$TARGET" --target-dir "$BUILD/cargo") \
    || die "cargo build of skiff-echo failed"
  ECHO_BIN=$BUILD/cargo/$TARGET/release/skiff-echo
fi
[ -x "$ECHO_BIN" ] || die "$ECHO_BIN is not an executable"
is_static "$ECHO_BIN" || die "$ECHO_BIN is dynamically linked; the image has no libc"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/skiff-image.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOTFS=$WORK/rootfs
LAYOUT=$WORK/layout

# The root filesystem.
if [ "$KIND" = pause ]; then
  mkdir -p "$ROOTFS"/{dev,proc,sys,etc}
  cp "$ECHO_BIN" "$ROOTFS/pause"
  chmod 0755 "$ROOTFS/pause"
  find "$ROOTFS" -type d -exec chmod 0755 {} +
  IMAGE_CONFIG='"Entrypoint":["/pause","pause"],"WorkingDir":"/"'
  # The name the pause image was first built under: keeps its digest unchanged.
  CREATED_BY=scripts/build-pause-image.sh
else
  mkdir -p "$ROOTFS"/{bin,etc,dev,proc,sys,tmp,root,run,var/tmp,usr/local/bin}
  cp "$BUSYBOX" "$ROOTFS/bin/busybox"
  for applet in $("$BUSYBOX" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$ROOTFS/bin/$applet"
  done
  cp "$ECHO_BIN" "$ROOTFS/usr/local/bin/skiff-echo"
  printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' \
    >"$ROOTFS/etc/passwd"
  printf '%s\n' 'root:x:0:' 'nogroup:x:65534:' >"$ROOTFS/etc/group"
  echo skiff-echo >"$ROOTFS/etc/hostname"
  find "$ROOTFS" -type d -exec chmod 0755 {} +
  chmod 1777 "$ROOTFS/tmp" "$ROOTFS/var/tmp"
  chmod 0700 "$ROOTFS/root"
  chmod 0644 "$ROOTFS"/etc/{passwd,group,hostname}
  chmod 0755 "$ROOTFS/bin/busybox" "$ROOTFS/usr/local/bin/skiff-echo"
  IMAGE_CONFIG='"Entrypoint":["/usr/local/bin/skiff-echo"],"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"ExposedPorts":{"8080/tcp":{},"9000/tcp":{},"9001/udp":{}},"WorkingDir":"/"'
  CREATED_BY=scripts/build-image.sh
fi

# One gzip layer, built reproducibly.
mkdir -p "$LAYOUT/blobs/sha256"
tar --format=gnu --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
  -C "$ROOTFS" -cf "$WORK/layer.tar" .
DIFF_ID=$(sha256sum "$WORK/layer.tar" | cut -d' ' -f1)
gzip -n -6 -c "$WORK/layer.tar" >"$WORK/layer.tar.gz"

# add_blob FILE: moves FILE into the layout's blobs and prints "DIGEST SIZE".
add_blob() {
  local d s
  d=$(sha256sum "$1" | cut -d' ' -f1)
  s=$(stat -c %s "$1")
  mv "$1" "$LAYOUT/blobs/sha256/$d"
  echo "$d $s"
}
read -r LAYER_DIGEST LAYER_SIZE < <(add_blob "$WORK/layer.tar.gz")

printf '%s' '{"architecture":"amd64","os":"linux","config":{'"$IMAGE_CONFIG"'},"rootfs":{"type":"layers","diff_ids":["sha256:'"$DIFF_ID"'"]},"history":[{"created_by":"'"$CREATED_BY"'"}]}' >"$WORK/config.json"
read -r CONFIG_DIGEST CONFIG_SIZE < <(add_blob "$WORK/config.json")

printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:'"$CONFIG_DIGEST"'","size":'"$CONFIG_SIZE"'},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:'"$LAYER_DIGEST"'","size":'"$LAYER_SIZE"'}]}' >"$WORK/manifest.json"
read -r MANIFEST_DIGEST MANIFEST_SIZE < <(add_blob "$WORK/manifest.json")

printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:'"$MANIFEST_DIGEST"'","size":'"$MANIFEST_SIZE"',"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"'"$IMAGE_NAME"'","org.opencontainers.image.ref.name":"'"$IMAGE_TAG"'"}}]}' >"$LAYOUT/index.json"
printf '%s' '{"imageLayoutVersion":"1.0.0"}' >"$LAYOUT/oci-layout"

mkdir -p "$(dirname "$OUT")"
tar --format=gnu --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
  -C "$LAYOUT" -cf "$WORK/image.tar" oci-layout index.json blobs
if [ -f "$OUT" ] && cmp -s "$WORK/image.tar" "$OUT"; then
  say "$OUT is up to date ($IMAGE_NAME, manifest sha256:$MANIFEST_DIGEST)"
else
  mv "$WORK/image.tar" "$OUT.tmp" && mv "$OUT.tmp" "$OUT"
  say "wrote $OUT ($IMAGE_NAME, manifest sha256:$MANIFEST_DIGEST)"
fi
if command -v skopeo >/dev/null; then
  skopeo inspect "oci-archive:$OUT" >/dev/null 2>"$WORK/skopeo.err" \
    || die "skopeo cannot read $OUT: $(cat "$WORK/skopeo.err")"
fi
echo "$OUT"
