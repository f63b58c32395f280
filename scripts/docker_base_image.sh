#!/usr/bin/env bash
# Build the local Docker image `lloom-python-base:3.11` from a Debian bookworm root filesystem,
# for machines that reach the Debian mirror but no image registry (no Docker Hub): debootstrap
# (minbase) with python3 (3.11 on bookworm), python3-venv, python3-pip and ca-certificates, then
# `docker import`. compose/docker-compose.yml builds on it with BASE_IMAGE=lloom-python-base:3.11.
#
# The root filesystem tarball is cached outside the checkout (${LLOOM_CACHE_DIR:-~/.cache/lloom}/docker/),
# so a rerun only imports it again (a few seconds), and does nothing at all when the image exists.
# Usage: bash scripts/docker_base_image.sh [--force]   (--force: debootstrap afresh)
# Needs root, debootstrap and a running Docker engine.
set -euo pipefail

IMAGE="lloom-python-base:3.11"
SUITE="bookworm"   # Debian 12: its python3 is 3.11, as the project is tested with
CACHE="${LLOOM_CACHE_DIR:-$HOME/.cache/lloom}/docker"
TARBALL="$CACHE/debian-$SUITE-python3.11-rootfs.tar"
force="${1:-}"

# The mirror this machine's apt uses (deb822 or one-line sources), else Debian's own.
mirror="${DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
  mirror=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/* \
    | grep -oE 'https?://[^ ]+/debian/?' | grep -v security | head -n1 || true)
fi
mirror="${mirror:-http://deb.debian.org/debian}"

if [ "$force" != "--force" ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "$IMAGE exists"
  exit 0
fi

mkdir -p "$CACHE"
if [ "$force" = "--force" ] || [ ! -s "$TARBALL" ]; then
  command -v debootstrap >/dev/null || { echo "debootstrap missing: apt-get install -y debootstrap" >&2; exit 1; }
  root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  echo "debootstrap $SUITE from $mirror into $root (a few minutes)"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    "$SUITE" "$root" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
  # Leave no package lists or caches in the image: they are large and stale at once.
  chroot "$root" apt-get clean
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/tmp/* "$root"/var/log/*.log
  tar -C "$root" --numeric-owner -cf "$TARBALL.part" .
  mv "$TARBALL.part" "$TARBALL"
fi

# ENV and CMD are set here because an imported root filesystem has no image config of its own.
docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/usr/bin/python3"]' \
  "$TARBALL" "$IMAGE" >/dev/null
echo "built $IMAGE from $TARBALL ($(docker run --rm "$IMAGE" python3 --version))"
