# Shared by tools/build-deb.sh and tools/build-rpm.sh (sourced, not run): their common
# command line, [--version VERSION] [--no-lint] [OUTDIR], and the project's version.
# Sets: root, version, lint (yes/no), outdir. Needs die() from the caller.

root=$(cd "$(dirname "$0")/.." && pwd)
version=""
lint=yes
outdir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --version) [ $# -ge 2 ] || die "--version needs a value"; version=$2; shift 2 ;;
        --no-lint) lint=no; shift ;;
        # The calling script's header comment is its help.
        -h|--help) sed -n '2,/^set -eu/p' "$0" | sed -e '/^set -eu/d' -e 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [ -z "$outdir" ] || die "only one OUTDIR"; outdir=$1; shift ;;
    esac
done
outdir=${outdir:-$root/dist}

# pyproject.toml is the one place the version is bumped.
if [ -z "$version" ]; then
    version=$(/usr/bin/python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
        "$root/pyproject.toml") || die "cannot read [project] version from $root/pyproject.toml"
fi

# The packages hold the project's wheel, which carries VERSION too (stamp_version), so
# VERSION must be one that Python's packaging tools keep as it is: a canonical PEP 440
# version without an epoch. With any other the wheel and its dist-info would be named by
# another form (1.0-1 -> 1.0.post1; 1.0~rc1 is no PEP 440 version at all) and the RPM's
# %files would miss them: refused here, before anything is built. A pre-release passes (1.2.0rc1) but is no use for a
# release: rpm and dpkg sort it after 1.2.0, unlike pip, and rpmlint refuses "rc" in a
# Version (invalid-version); their own 1.2.0~rc1 is not a PEP 440 version.
pep440_number='(0|[1-9][0-9]*)'
pep440_local="([a-z0-9]*[a-z][a-z0-9]*|$pep440_number)"
pep440="^$pep440_number(\\.$pep440_number)*((a|b|rc)$pep440_number)?(\\.post$pep440_number)?(\\.dev$pep440_number)?(\\+$pep440_local(\\.$pep440_local)*)?\$"
case $version in
    *[!0-9a-z.+]*|"") false ;;   # also a newline, which grep would take for two versions
    *) printf '%s\n' "$version" | grep -Eqx "$pep440" ;;
esac || die "version '$version' is not a canonical PEP 440 version, which the wheel in the packages must carry unchanged (like 1.2.0, 1.2.0.post1 or 1.2.0+build1)"

# The daemon reports the package's version (`ximd status`, `ximd reexec`, the router's
# agent list): written into the scratch copy's xim_proto/__init__.py, which holds the
# one __version__ both programs re-export, and into its pyproject.toml, so that the
# wheel, its dist-info (which the RPM's %files names by version) and the metadata pip
# and rpm's python3dist() provides read agree with the package. A no-op when VERSION is
# pyproject.toml's.
stamp_version() {
    init="$1/xim_proto/__init__.py"
    grep -q '^__version__ = ' "$init" || die "no __version__ line in $init"
    sed -i "s/^__version__ = \"[^\"]*\"/__version__ = \"$version\"/" "$init"
    grep -q "^__version__ = \"$version\"" "$init" || die "could not write version $version into $init"
    pyproject="$1/pyproject.toml"
    sed -i "/^\[project\]\$/,/^\[/ s/^version = \"[^\"]*\"\$/version = \"$version\"/" "$pyproject"
    /usr/bin/python3 -c 'import sys, tomllib; sys.exit(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"] != sys.argv[2])' \
        "$pyproject" "$version" || die "could not write version $version into $pyproject"
}
