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

# The daemon reports the package's version (`ximd status`, `ximd reexec`, the router's
# agent list): written into the scratch copy's xim_proto/__init__.py, which holds the
# one __version__ both programs re-export. A no-op when VERSION is pyproject.toml's.
stamp_version() {
    init="$1/xim_proto/__init__.py"
    grep -q '^__version__ = ' "$init" || die "no __version__ line in $init"
    sed -i "s/^__version__ = \"[^\"]*\"/__version__ = \"$version\"/" "$init"
    grep -q "^__version__ = \"$version\"" "$init" || die "could not write version $version into $init"
}
