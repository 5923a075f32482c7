#!/usr/bin/env bash
# A stand-in for the pinned base image (python:3.11-slim-bookworm), for machines that reach
# Debian's mirror but no container registry: the same Debian release (bookworm) with its own
# Python 3.11, debootstrapped from the mirror this machine's apt already uses, imported into
# podman as IMAGE. Its interpreter is /usr/bin/python3.11 (the pinned base's is in
# /usr/local/bin); the Containerfiles call python3.11 by name, which both have on PATH.
# Usage: stand-in.sh IMAGE   (as root: debootstrap and chroot need it)
set -euo pipefail
image=${1:?usage: stand-in.sh IMAGE}
# The mirror from this machine's own apt sources (deb822 or one-line format).
mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
           2>/dev/null | awk '/^URIs:/ || /^deb / {print $2}' | grep -v -- '-security' | head -1 || true)
[ -n "$mirror" ] || { echo "stand-in.sh: no Debian mirror in this machine's apt sources" >&2; exit 1; }
root=$(mktemp -d /var/tmp/harness-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "building $image: debootstrap bookworm from $mirror (the pinned base image cannot be pulled)"
debootstrap --variant=minbase bookworm "$root" "$mirror" >/dev/null
chroot "$root" /bin/sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends python3.11 python3.11-venv ca-certificates \
  >/dev/null && apt-get clean && rm -rf /var/lib/apt/lists/*'
tar -C "$root" -c . | podman import --change 'CMD ["/usr/bin/python3.11"]' - "$image" >/dev/null
echo "built $image ($(podman image inspect --format '{{.Size}}' "$image") bytes)"
