#!/usr/bin/env bash
# Builds skiff's pause image, docker.io/skiff/pause:1.0 (containerd's sandbox_image):
#   scripts/build-pause-image.sh [OUT]   is   scripts/build-image.sh --pause [OUT]
exec "$(dirname "${BASH_SOURCE[0]}")/build-image.sh" --pause "$@"
