#!/bin/sh
# Build the .deb packages of the source package xerotier-agent with dpkg-buildpackage
# (debhelper + pybuild) on the distribution's own python3, and check them with lintian:
# xerotier-agent (the node, ximd), xim-router (the router) and python3-xim-proto (the
# protocol package both depend on).
#
# Usage: tools/build-deb.sh [--version VERSION] [--no-lint] [OUTDIR]
#   OUTDIR     where <package>_<version>_all.deb land (default: dist/)
#   --version  package version; default: [project] version in pyproject.toml. It must be
#              a canonical PEP 440 version (1.2.0, 1.2.0.post1, 1.2.0+build1): the wheel inside
#              the packages is built with it too (tools/package-args.sh). The system
#              test builds a higher one to exercise upgrades
#   --no-lint  skip lintian (the build itself is unchanged)
# Prints the path of each .deb on stdout, one a line, xerotier-agent's first; logs go
# to stderr.
#
# debian/ lives in packaging/debian/ (the repository root is the Python project), so
# the build runs in a scratch copy of the source tree with debian/ in place and a
# changelog generated from the version: pyproject.toml stays the one place to bump.
# Needs: dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all
#        python3-setuptools lintian git, and for the unit tests the build runs:
#        python3-pytest python3-aiohttp python3-msgpack python3-psutil python3-redis
#        python3-yaml python3-zmq (or DEB_BUILD_OPTIONS=nocheck)
set -eu

die() { echo "build-deb: $*" >&2; exit 1; }

. "$(dirname "$0")/package-args.sh"

for tool in dpkg-buildpackage dh git /usr/bin/python3; do
    command -v "$tool" >/dev/null || die "missing '$tool' (apt-get install dpkg-dev debhelper git python3)"
done
[ "$lint" = no ] || command -v lintian >/dev/null || die "missing lintian (apt-get install lintian, or pass --no-lint)"

# Debian versions may not contain '-' in a native package, nor start with a non-digit.
printf '%s' "$version" | grep -Eq '^[0-9][A-Za-z0-9.+~]*$' \
    || die "version '$version' is not a valid native Debian version"

work=$(mktemp -d "${TMPDIR:-/tmp}/build-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
src="$work/xerotier-agent-$version"

"$root/tools/export-source.sh" "$src"
stamp_version "$src"

cp -a "$root/packaging/debian" "$src/debian"
# The sysusers and tmpfiles snippets are shared with the RPM; debhelper wants them here.
for package in xerotier-agent xim-router; do
    cp "$root/systemd/$package.sysusers" "$src/debian/$package.sysusers"
    cp "$root/systemd/$package.tmpfiles" "$src/debian/$package.tmpfiles"
done

maintainer=$(sed -n 's/^Maintainer: //p' "$src/debian/control")
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
# Reproducible: the date of the last commit, not the time of the build.
epoch=$(git -C "$root" log -1 --format=%ct 2>/dev/null || date +%s)
cat >"$src/debian/changelog" <<EOF
xerotier-agent ($version) unstable; urgency=medium

  * Release $version, built from commit $commit.

 -- $maintainer  $(LC_ALL=C date -u -R -d "@$epoch")
EOF

echo "build-deb: dpkg-buildpackage xerotier-agent $version" >&2
# Debian's python3 and tools only, whatever venv the caller has activated.
(cd "$src" && env -u VIRTUAL_ENV -u PYTHONPATH -u PYTHONHOME \
    PATH=/usr/sbin:/usr/bin:/sbin:/bin SOURCE_DATE_EPOCH="$epoch" \
    dpkg-buildpackage -us -uc -b >"$work/build.log" 2>&1) \
    || { tail -n 40 "$work/build.log" >&2; die "dpkg-buildpackage failed (log above)"; }

debs=""
for package in xerotier-agent xim-router python3-xim-proto; do
    deb="$work/${package}_${version}_all.deb"
    [ -f "$deb" ] || die "dpkg-buildpackage did not produce $(basename "$deb")"
    debs="$debs $deb"
done
if [ "$lint" = yes ]; then
    echo "build-deb: lintian" >&2
    # Errors fail the build; warnings and info are printed for the reader.
    # shellcheck disable=SC2086 # three paths without spaces (mktemp's)
    lintian --fail-on error $debs >&2 || die "lintian reports errors"
fi
mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)
for deb in $debs; do
    cp "$deb" "$outdir/"
    echo "$outdir/$(basename "$deb")"
done
