#!/usr/bin/env bash
# make image / make image-gpu: build IMAGE from images/<variant>/Containerfile,
# offline from container registries when need be:
# - the base stays the Containerfile's digest-pinned default when podman has it or can pull
#   it; otherwise the stand-in from Debian's packages (images/base/stand-in.sh), said so;
# - torch's CPU wheel from the local wheel folder (PIP_FIND_LINKS, /opt/wheels) when present;
# - pip in the build trusts this machine's CA bundle, passed as a build secret (no layer
#   keeps it);
# - docker format, which keeps HEALTHCHECK (the OCI format drops it).
# Usage: images/build.sh VARIANT IMAGE   (as root: the rootful podman store the tests use)
set -euo pipefail
variant=${1:?usage: build.sh cpu|gpu IMAGE}
image=${2:?usage: build.sh cpu|gpu IMAGE}
[ -n "${CONTAINERS_CONF:-}" ] && export CONTAINERS_CONF=$(realpath "$CONTAINERS_CONF")
cd "$(dirname "$0")/.."
case $variant in
  cpu|gpu) containerfile=images/$variant/Containerfile ;;
  *) echo "build.sh: unknown variant $variant (cpu or gpu)" >&2; exit 2 ;;
esac
pinned=$(sed -n 's/^ARG BASE=//p' "$containerfile")
stand_in=localhost/py311-base:bookworm
args=()
if podman image exists "$pinned" || timeout 120 podman pull -q "$pinned" >/dev/null 2>&1; then
  echo "base: $pinned"
else
  echo "base: $pinned cannot be pulled here; using the stand-in $stand_in (Debian bookworm's python3.11)"
  podman image exists "$stand_in" || images/base/stand-in.sh "$stand_in"
  args+=(--build-arg "BASE=$stand_in")
fi
rm -rf .image-wheels && mkdir -p .image-wheels
for dir in ${PIP_FIND_LINKS:-} /opt/wheels; do
  if [ "$variant" = cpu ] && ls "$dir"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
    cp "$dir"/torch-2.13.0+cpu-*.whl .image-wheels/ && echo "torch: the local wheel from $dir"
    break
  fi
done
ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
started=$(date +%s)
podman build --format docker --secret "id=ca_bundle,src=$ca" "${args[@]}" \
  -f "$containerfile" -t "$image" .
size=$(podman image inspect --format '{{.Size}}' "$image")
echo "built $image in $(( $(date +%s) - started )) s: $(( size / 1000000 )) MB"
