#!/usr/bin/env bash
# Everything vmkeep needs on a fresh Debian 12 machine (as root): packages, venv, running daemons.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev pkg-config
          qemu-guest-agent linux-image-amd64 busybox-static e2fsprogs restic rsync openssh-server
          cpio python3-venv openssl postgresql-15 fdisk dosfstools xfsprogs fuse3
          iproute2 util-linux  # the two-host lab: ip netns, veth, unshare, nsenter
          jq curl  # the README's API examples
          chromium chromium-driver)  # the web dashboard's browser tests (tests/e2e/test_web.py)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import vmkeep, libvirt, pytest, random_order, hypothesis, fastapi, uvicorn, httpx, prometheus_client, schemathesis, psycopg, selenium" 2>/dev/null; then
  echo "setup: installing vmkeep into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
fi

# No systemd here: start the daemons when they are not running.
pgrep -x virtlogd >/dev/null || virtlogd -d
pgrep -x libvirtd >/dev/null || libvirtd -d
for _ in $(seq 1 50); do
  virsh -c qemu:///system version >/dev/null 2>&1 && break
  sleep 0.2
done
virsh -c qemu:///system version >/dev/null
echo "setup: ready (libvirt $(virsh -c qemu:///system version --daemon | awk '/daemon/ {print $NF}'))"
