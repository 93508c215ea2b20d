#!/bin/sh
# Copy the project's source tree into DEST: what git tracks plus new files git does not
# ignore, as they are in the working tree. Never a venv, a build directory or an old
# dist/. Used by tools/build-deb.sh and tools/build-rpm.sh.
#
# Usage: tools/export-source.sh DEST     (DEST must not exist yet)
set -eu

die() { echo "export-source: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 DEST"
dest=$1
[ ! -e "$dest" ] || die "$dest already exists"
root=$(cd "$(dirname "$0")/.." && pwd)
git -C "$root" rev-parse --git-dir >/dev/null 2>&1 || die "$root is not a git checkout"

mkdir -p "$dest"
# Files deleted in the working tree but still in the index are skipped.
git -C "$root" ls-files -z --cached --others --exclude-standard \
    | (cd "$root" && xargs -0 sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh) \
    | (cd "$root" && tar --null -T - -cf -) | tar -C "$dest" -xf -
