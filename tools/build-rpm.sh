#!/bin/sh
# Build the .rpm packages of xerotier-agent.spec (Fedora 40+ / RHEL 10 target) with
# rpmbuild, and check them with rpmlint: xerotier-agent, xim-router, python3-xim-proto.
#
# Usage: tools/build-rpm.sh [--version VERSION] [--no-lint] [OUTDIR]
#   OUTDIR     where <package>-<version>-1.noarch.rpm land (default: dist/)
#   --version  package version; default: [project] version in pyproject.toml. It must be
#              a canonical PEP 440 version (1.2.0, 1.2.0.post1, 1.2.0+build1): the wheel inside
#              the packages is built with it too (tools/package-args.sh)
#   --no-lint  skip rpmlint
# Prints the path of each .rpm on stdout, one a line, xerotier-agent's first; logs go
# to stderr.
#
# On Debian, rpmbuild runs with --nodeps: its rpm database knows none of the dpkg
# packages, so every BuildRequires would look missing. The spec falls back to plain
# commands where Fedora's macros are absent.
# Needs: rpm rpmlint git python3-build python3-installer (Debian) or rpm-build
#        python3-devel pyproject-rpm-macros systemd-rpm-macros (Fedora).
set -eu

die() { echo "build-rpm: $*" >&2; exit 1; }

. "$(dirname "$0")/package-args.sh"
spec="$root/packaging/rpm/xerotier-agent.spec"
rpmlintrc="$root/packaging/rpm/xerotier-agent.rpmlintrc"

command -v rpmbuild >/dev/null || die "missing rpmbuild (apt-get install rpm)"
[ "$lint" = no ] || command -v rpmlint >/dev/null || die "missing rpmlint (apt-get install rpmlint, or pass --no-lint)"

printf '%s' "$version" | grep -Eq '^[0-9][A-Za-z0-9.+~^]*$' || die "version '$version' is not a valid RPM version"

top=$(mktemp -d "${TMPDIR:-/tmp}/build-rpm.XXXXXX")
trap 'rm -rf "$top"' EXIT INT TERM
mkdir -p "$top/SOURCES"
"$root/tools/export-source.sh" "$top/xerotier-agent-$version"
stamp_version "$top/xerotier-agent-$version"
tar -C "$top" -czf "$top/SOURCES/xerotier-agent-$version.tar.gz" "xerotier-agent-$version"
cp "$root/systemd/xerotier-agent.sysusers" "$root/systemd/xim-router.sysusers" "$top/SOURCES/"

# Reproducible: the last commit's date, not the build's.
epoch=$(git -C "$root" log -1 --format=%ct 2>/dev/null || date +%s)
# The spec that is built is the one that is linted: the version is written into it.
# It sits beside its sources so that rpmlint's parse finds Source1 as rpmbuild does.
{
    echo "%global ximd_version $version"
    echo "%global ximd_changelog_date $(LC_ALL=C date -u -d "@$epoch" +'%a %b %d %Y')"
    cat "$spec"
} >"$top/SOURCES/xerotier-agent.spec"

echo "build-rpm: rpmbuild xerotier-agent $version" >&2
env -u VIRTUAL_ENV -u PYTHONPATH -u PYTHONHOME PATH=/usr/sbin:/usr/bin:/sbin:/bin SOURCE_DATE_EPOCH="$epoch" \
    rpmbuild -bb --nodeps --define "_topdir $top" "$top/SOURCES/xerotier-agent.spec" >"$top/build.log" 2>&1 \
    || { tail -n 40 "$top/build.log" >&2; die "rpmbuild failed (log above)"; }

rpm_files=""
for package in xerotier-agent xim-router python3-xim-proto; do
    rpm_file=$(find "$top/RPMS" -name "$package-$version-*.noarch.rpm" | head -n 1)
    [ -n "$rpm_file" ] || die "rpmbuild did not produce $package-$version-*.noarch.rpm"
    rpm_files="$rpm_files $rpm_file"
done
if [ "$lint" = yes ]; then
    echo "build-rpm: rpmlint" >&2
    # shellcheck disable=SC2086 # paths without spaces (mktemp's)
    rpmlint -r "$rpmlintrc" "$top/SOURCES/xerotier-agent.spec" $rpm_files >&2 \
        || die "rpmlint reports errors"
fi
mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)
for rpm_file in $rpm_files; do
    cp "$rpm_file" "$outdir/"
    echo "$outdir/$(basename "$rpm_file")"
done
