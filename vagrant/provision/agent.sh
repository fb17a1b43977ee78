#!/usr/bin/env bash
# An agent VM before it joins: imports the images copied from the host into the node's image
# store. Joining (the agent's unit) happens from the host once the server's join command exists
# (see the Vagrantfile's trigger and /usr/local/lib/skiff/join.sh).
set -euo pipefail
shopt -s nullglob
if ! command -v runc >/dev/null; then
  # The skiff box has runc; a downloaded box (VirtualBox) may not, and has the internet.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq runc >/dev/null \
    || { echo "agent: runc is missing and could not be installed" >&2; exit 1; }
fi
archives=(/tmp/skiff-install/images/*)
if ((${#archives[@]})); then
  skiff image --image-dir /var/lib/skiff/images import "${archives[@]}"
else
  echo "agent: no images to import (set SKIFF_LAB_IMAGES on the host)"
fi
