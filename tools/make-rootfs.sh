#!/bin/sh
# Build (once) and cache a Debian bookworm root filesystem that boots with a real
# systemd under `systemd-nspawn --boot`, for the system tests.
#
# Usage: tools/make-rootfs.sh [EXTRA_PACKAGE...]
#   Prints the path of the cached tarball on stdout (everything else goes to stderr).
#   EXTRA_PACKAGE: packages baked in so that `apt-get install ./xerotier-agent_*.deb`
#   works inside a guest without network (pass the .deb's Depends).
#
# Cache: ${XIMD_CACHE_DIR:-/var/cache/ximd-dev}/rootfs-bookworm-<hash>.tar.zst, where
# the hash covers this script, the package list and the apt sources, so any change to
# them builds a new tarball instead of reusing a stale one.
# Needs: root, debootstrap, zstd, network to the Debian mirror (cold build only, ~90 s).
set -eu

SUITE=bookworm
CACHE_DIR=${XIMD_CACHE_DIR:-/var/cache/ximd-dev}
HOST_SOURCES=/etc/apt/sources.list.d/debian.sources
# debootstrap's resolver does not follow virtual packages (python3-zmq needs
# python3-cffi-backend-api-min), so --include stays minimal and the rest comes from apt.
BASE_PACKAGES="systemd,systemd-sysv,dbus,python3"
# Tools the tests call inside the guest (ps/pgrep/pkill).
TEST_PACKAGES="procps"

die() { echo "make-rootfs: $*" >&2; exit 1; }
log() { echo "make-rootfs: $*" >&2; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap and chroot need it)"
for tool in debootstrap zstd tar sha256sum flock; do
    command -v "$tool" >/dev/null || die "missing tool '$tool' (apt-get install debootstrap zstd)"
done
[ -r "$HOST_SOURCES" ] || die "cannot read $HOST_SOURCES (the mirror comes from there)"

extra=$(printf '%s\n' $TEST_PACKAGES "$@" | sed '/^$/d' | sort -u | tr '\n' ' ')
key=$( { cat "$0"; echo "$SUITE $BASE_PACKAGES $extra"; cat "$HOST_SOURCES"; } \
       | sha256sum | cut -c1-16)
tarball="$CACHE_DIR/rootfs-$SUITE-$key.tar.zst"

mkdir -p "$CACHE_DIR"
# Two test runs may ask for the same rootfs at once: build it once.
exec 9>"$CACHE_DIR/.rootfs.lock"
flock 9
if [ -s "$tarball" ]; then
    touch "$tarball"  # in use: keeps it out of the pruning below
    log "cached: $tarball"
    echo "$tarball"
    exit 0
fi

work=$(mktemp -d "$CACHE_DIR/.rootfs-build.XXXXXX")
cleanup() {
    # A failed build must not leave the host's /proc or /dev mounted inside the tree.
    for m in proc dev/pts dev sys; do
        mountpoint -q "$work/root/$m" 2>/dev/null && umount -l "$work/root/$m"
    done
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

# Never hard-code the mirror: CI machines point at their own.
mirror=$(awk '/^URIs:/ {print $2; exit}' "$HOST_SOURCES")
[ -n "$mirror" ] || die "no URIs: line in $HOST_SOURCES"

start=$(date +%s)
log "debootstrap $SUITE from $mirror (about 90 s)"
debootstrap --variant=minbase --include="$BASE_PACKAGES" \
    "$SUITE" "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed"; }

# The same suites as the host (updates, security), so the guest runs the same
# systemd and Python library versions that the .deb will meet on a real host.
rm -f "$work/root/etc/apt/sources.list"
cp "$HOST_SOURCES" "$work/root/etc/apt/sources.list.d/debian.sources"
mount -t proc proc "$work/root/proc"
in_root() { chroot "$work/root" env DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 "$@"; }
log "apt-get install $extra"
{
    in_root apt-get update -q
    in_root apt-get -y -q dist-upgrade
    # shellcheck disable=SC2086  # word splitting of the package list is intended
    in_root apt-get install -y -q --no-install-recommends $extra
    in_root apt-get clean
} >"$work/apt.log" 2>&1 || { tail -n 30 "$work/apt.log" >&2; die "apt-get in the rootfs failed"; }
umount "$work/root/proc"

# Root logs in without a password on the (unused) console; the tests use nsenter.
chroot "$work/root" passwd -dq root
echo ximd-guest >"$work/root/etc/hostname"
# Each boot gets a fresh machine-id (systemd creates it when the file is empty).
: >"$work/root/etc/machine-id"
rm -rf "$work/root/var/lib/apt/lists/"* "$work/root/var/cache/apt/"*.bin

tar -C "$work/root" --numeric-owner -cf - . | zstd -q -T0 -o "$tarball.tmp"
mv "$tarball.tmp" "$tarball"
# Each recipe or package-list change makes a new ~70 MB tarball: drop those unused for a week.
find "$CACHE_DIR" -maxdepth 1 -name "rootfs-$SUITE-*.tar.zst" ! -newer "$tarball" -mtime +7 -delete
log "built $tarball in $(( $(date +%s) - start )) s ($(du -h "$tarball" | cut -f1))"
echo "$tarball"
