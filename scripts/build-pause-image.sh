#!/usr/bin/env bash
# Builds skiff's pause image, docker.io/skiff/pause:1.0, as an OCI image layout archive: one file,
# a static skiff-echo, run as `skiff-echo pause` (sleeps until SIGTERM/SIGINT, reaps nothing else).
# containerd's CRI plugin uses it as its sandbox_image (no registry is needed):
#
#   scripts/build-pause-image.sh [OUT]   (default: target/images/skiff-pause-1.0.oci.tar)
#   ctr -n k8s.io images import OUT
#
# Env: SKIFF_ECHO_BIN=path uses that (static) binary instead of building one. Reproducible like
# build-image.sh (same static build, fixed mtimes/owners/order). Needs: cargo, tar, gzip, sha256sum.
set -euo pipefail

say() { printf '\033[1m[build-pause-image]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[build-pause-image] error:\033[0m %s\n' "$*" >&2; exit 1; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$ROOT/target/images/skiff-pause-1.0.oci.tar}
IMAGE_NAME=docker.io/skiff/pause:1.0
IMAGE_TAG=1.0
# The same target dir as build-image.sh: one static build serves both images.
BUILD=$ROOT/target/image-build
TARGET=x86_64-unknown-linux-gnu
for tool in tar gzip sha256sum; do command -v "$tool" >/dev/null || die "$tool not found"; done
is_static() { { ldd "$1" 2>&1 || true; } | grep -qE 'not a dynamic executable|statically linked'; }

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

WORK=$(mktemp -d "${TMPDIR:-/tmp}/skiff-pause.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOTFS=$WORK/rootfs
LAYOUT=$WORK/layout
mkdir -p "$ROOTFS"/{dev,proc,sys,etc}
cp "$ECHO_BIN" "$ROOTFS/pause"
chmod 0755 "$ROOTFS/pause"
find "$ROOTFS" -type d -exec chmod 0755 {} +

mkdir -p "$LAYOUT/blobs/sha256"
tar --format=gnu --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$ROOTFS" -cf "$WORK/layer.tar" .
DIFF_ID=$(sha256sum "$WORK/layer.tar" | cut -d' ' -f1)
gzip -n -6 -c "$WORK/layer.tar" >"$WORK/layer.tar.gz"
add_blob() {
  local d s
  d=$(sha256sum "$1" | cut -d' ' -f1)
  s=$(stat -c %s "$1")
  mv "$1" "$LAYOUT/blobs/sha256/$d"
  echo "$d $s"
}
read -r LAYER_DIGEST LAYER_SIZE < <(add_blob "$WORK/layer.tar.gz")
printf '%s' '{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/pause","pause"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:'"$DIFF_ID"'"]},"history":[{"created_by":"scripts/build-pause-image.sh"}]}' >"$WORK/config.json"
read -r CONFIG_DIGEST CONFIG_SIZE < <(add_blob "$WORK/config.json")
printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:'"$CONFIG_DIGEST"'","size":'"$CONFIG_SIZE"'},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:'"$LAYER_DIGEST"'","size":'"$LAYER_SIZE"'}]}' >"$WORK/manifest.json"
read -r MANIFEST_DIGEST MANIFEST_SIZE < <(add_blob "$WORK/manifest.json")
printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:'"$MANIFEST_DIGEST"'","size":'"$MANIFEST_SIZE"',"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"'"$IMAGE_NAME"'","org.opencontainers.image.ref.name":"'"$IMAGE_TAG"'"}}]}' >"$LAYOUT/index.json"
printf '%s' '{"imageLayoutVersion":"1.0.0"}' >"$LAYOUT/oci-layout"

mkdir -p "$(dirname "$OUT")"
tar --format=gnu --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$LAYOUT" -cf "$WORK/image.tar" oci-layout index.json blobs
if [ -f "$OUT" ] && cmp -s "$WORK/image.tar" "$OUT"; then
  say "$OUT is up to date ($IMAGE_NAME, manifest sha256:$MANIFEST_DIGEST)"
else
  mv "$WORK/image.tar" "$OUT.tmp" && mv "$OUT.tmp" "$OUT"
  say "wrote $OUT ($IMAGE_NAME, manifest sha256:$MANIFEST_DIGEST)"
fi
echo "$OUT"
