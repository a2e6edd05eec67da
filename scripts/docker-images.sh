#!/usr/bin/env bash
# Builds the local images that let the compose stack run where no registry can be reached (the test
# suite's tests/test_compose_stack.py runs this): a Debian bookworm base made by debootstrap from
# Debian's package archive, a Python environment on it, and PostgreSQL from Debian's packages
# (deploy/docker/postgres). The worker image itself is built by `docker compose build` with
# BASE_IMAGE=nkat-python:bookworm; docs/clusters.md says how.
#
# The engine is the one DOCKER_HOST names (or the default). What can be reused is: the debootstrap
# root filesystem as a tarball in CACHE (default .cache/docker, git-ignored), and the images in the
# engine. An image that exists is not rebuilt. Needs root (debootstrap) and Debian's debootstrap.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${CACHE:-.cache/docker}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
mkdir -p "$cache"

have() { docker image inspect "$1" >/dev/null 2>&1; }
took() { echo "$1: $((SECONDS - $2)) s"; }

if ! have nkat-debian:bookworm; then
  tarball="$cache/debian-bookworm.tar"
  if [ ! -s "$tarball" ]; then
    t=$SECONDS
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror" \
      > "$cache/debootstrap.log" 2>&1 || { tail -20 "$cache/debootstrap.log"; exit 1; }
    # This host's trusted certificates, so that pip and apt in the images trust what the host trusts
    # (a proxy's own certificate authority included).
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
    rm -rf "$rootfs"
    trap - EXIT
    took debootstrap "$t"
  fi
  t=$SECONDS
  docker import "$tarball" nkat-debian:bookworm >/dev/null
  took "docker import" "$t"
fi

if ! have nkat-python:bookworm; then
  t=$SECONDS
  docker build -q --network host -t nkat-python:bookworm - >/dev/null <<'DOCKERFILE'
FROM nkat-debian:bookworm
# Debian's Python 3.11 with a virtual environment first on PATH: the Dockerfile's `pip install` goes there.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
DOCKERFILE
  took nkat-python:bookworm "$t"
fi

if ! have nkat-postgres:15; then
  t=$SECONDS
  docker build -q --network host --build-arg BASE_IMAGE=nkat-debian:bookworm -t nkat-postgres:15 deploy/docker/postgres >/dev/null
  took nkat-postgres:15 "$t"
fi
echo "local images: nkat-debian:bookworm nkat-python:bookworm nkat-postgres:15"
