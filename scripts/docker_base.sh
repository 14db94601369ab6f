#!/usr/bin/env bash
# A stand-in for the CUDA base image, built from Debian's packages, for a machine that cannot pull from a
# container registry but reaches a Debian mirror and PyPI (through a TLS-inspecting proxy, possibly).
#
#   sudo scripts/docker_base.sh [TAG]            # default TAG: proxy-serve-base:bookworm
#   docker build --build-arg BASE_IMAGE=proxy-serve-base:bookworm -t proxy-serve .
#
# It holds what the Dockerfile expects of its base: apt, python3 with venv and pip, ca-certificates, useradd.
# It carries this host's extra CA certificates (/usr/local/share/ca-certificates, and the bundle
# /etc/ssl/certs/ca-certificates.crt) and points pip at that bundle (/etc/pip.conf), so that apt and pip inside
# the build trust the same proxy as the host does. There is no CUDA in it: the image built on it runs on the CPU.
# Needs root (debootstrap, chroot) and a running Docker daemon.
set -euo pipefail

TAG=${1:-proxy-serve-base:bookworm}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
HOST_BUNDLE=/etc/ssl/certs/ca-certificates.crt

ROOT=$(mktemp -d /tmp/proxy-serve-base.XXXXXX)
trap 'rm -rf "$ROOT"' EXIT

debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    "$SUITE" "$ROOT" "$MIRROR"

# The host's own CAs first (update-ca-certificates inside the image, e.g. when apt reinstalls ca-certificates,
# then keeps them), then the host's whole bundle (it may hold CAs added some other way).
if compgen -G "/usr/local/share/ca-certificates/*.crt" > /dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
fi
chroot "$ROOT" update-ca-certificates --fresh > /dev/null
if [ -s "$HOST_BUNDLE" ]; then
    cp "$HOST_BUNDLE" "$ROOT/etc/ssl/certs/ca-certificates.crt"
fi

# pip uses its own CA list (certifi) unless told otherwise: point it at the system bundle, as the host's pip
# configuration does (`pip config list` here: global.cert=/etc/ssl/certs/ca-certificates.crt). Only the
# certificate and timeout settings are carried: the host's local indexes and wheel folders are not in the image.
cat > "$ROOT/etc/pip.conf" <<PIPCONF
[global]
cert = /etc/ssl/certs/ca-certificates.crt
timeout = 180
PIPCONF

chroot "$ROOT" apt-get clean
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/tmp/*

tar -C "$ROOT" --numeric-owner -c . \
    | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$TAG"
docker image ls "$TAG"
