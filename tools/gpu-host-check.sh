#!/bin/bash
# What ximd sees on a GPU host, captured in one short run: the raw outputs of the
# tools its parsers read (for tests/fixtures/), `ximd doctor` and `ximd plan` on
# two model sizes and a few masks, and whether the unit's DeviceAllow= patterns
# cover every GPU device node that exists.
#
#   tools/gpu-host-check.sh OUTDIR        (from the repository root)
#
# Needs python3 >= 3.11 with ximd's dependencies importable (PYTHON= to choose
# another interpreter). Runs nothing as a service and writes only under OUTDIR
# and a scratch directory.
set -u
out=${1:?usage: tools/gpu-host-check.sh OUTDIR}
py=${PYTHON:-python3}
mkdir -p "$out"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
ximd() { "$py" -m ximd "$@"; }

step() { echo "== $*"; }

step host
{ uname -a; cat /etc/os-release; "$py" --version; nproc; free -g; } > "$out/host.txt" 2>&1

step "raw tool outputs (ximd's own commands)"
query=$("$py" -c 'from ximd.hardware import NVIDIA_QUERY_COMMAND as c; print(" ".join(c))')
$query > "$out/nvidia-smi-query-noheader.csv" 2> "$out/nvidia-smi-query.stderr"
echo "query rc=$? ($query)"
nvidia-smi -q -x > "$out/nvidia-smi-q.xml" 2>&1
{ echo "# nvidia-smi"; nvidia-smi; echo "# nvidia-smi -L"; nvidia-smi -L
  echo "# /proc/devices"; cat /proc/devices
  echo "# ls -l /dev/nvidia* /dev/dri /dev/kfd"; ls -l /dev/nvidia* /dev/dri /dev/kfd
  echo "# /proc/driver/nvidia/version"; cat /proc/driver/nvidia/version; } > "$out/gpu-facts.txt" 2>&1
cp /proc/devices "$out/proc-devices.txt"

step "two model directories: 8B (fits one GPU) and 70B (does not)"
make_model() {   # dir hidden_size layers heads kv_heads vocab max_pos weight_bytes
    mkdir -p "$1"
    printf '{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": %s, "num_hidden_layers": %s, "num_attention_heads": %s, "num_key_value_heads": %s, "vocab_size": %s, "max_position_embeddings": %s, "torch_dtype": "bfloat16"}\n' \
        "$2" "$3" "$4" "$5" "$6" "$7" > "$1/config.json"
    truncate -s "$8" "$1/model.safetensors"      # sparse: only its size matters to the plan
}
make_model "$scratch/llama-8b" 4096 32 32 8 128256 131072 16060522496
make_model "$scratch/llama-70b" 8192 80 64 8 128256 131072 141107412992
for name in 8b 70b; do
    printf '[agent]\nstate_dir = "%s"\n[engine]\nmodel = "%s"\n' \
        "$scratch/state" "$scratch/llama-$name" > "$scratch/$name.toml"
done

step "ximd plan"
for name in 8b 70b; do
    ximd plan --config "$scratch/$name.toml" > "$out/plan-$name.txt" 2>&1; echo "plan $name rc=$?"
done
ximd plan --config "$scratch/8b.toml" --format json > "$out/plan-8b.json" 2>&1
{ echo "# CUDA_VISIBLE_DEVICES=0 (env of ximd, the seed's spelling)"
  XEROTIER_AGENT_CUDA_VISIBLE_DEVICES=0 ximd plan --config "$scratch/8b.toml"; echo "rc=$?"
  echo "# a mask naming a GPU that does not exist: a config error (78)"
  XEROTIER_AGENT_CUDA_VISIBLE_DEVICES=3 ximd plan --config "$scratch/8b.toml"; echo "rc=$?"
  echo "# tensor_parallel_size=2 on one GPU: a config error (78)"
  XEROTIER_AGENT_TENSOR_PARALLEL_SIZE=2 ximd plan --config "$scratch/8b.toml"; echo "rc=$?"
} > "$out/plan-masks.txt" 2>&1

step "ximd doctor"
ximd doctor --config "$scratch/8b.toml" > "$out/doctor.txt" 2>&1; echo "doctor rc=$?"
ximd doctor --config "$scratch/8b.toml" --format json > "$out/doctor.json" 2>&1

step "the unit's DeviceAllow= against the device nodes present"
"$py" - systemd/ximd.service > "$out/deviceallow.txt" 2>&1 <<'EOF'
import fnmatch, glob, os, stat, sys
from ximd.hardware import parse_proc_devices
patterns = [line.split("=", 1)[1].split()[0] for line in open(sys.argv[1])
            if line.startswith("DeviceAllow=")]
names = parse_proc_devices(open("/proc/devices").read(), names=tuple(
    line.split()[1] for line in open("/proc/devices") if line[:1] == " " or line[:1].isdigit()))
by_major = {}
for name, major in names.items():
    by_major.setdefault(major, []).append(name)
uncovered = 0
for node in sorted(glob.glob("/dev/nvidia*") + glob.glob("/dev/nvidia-caps/*") + glob.glob("/dev/dri/*")
                   + glob.glob("/dev/kfd")):
    st = os.stat(node)
    if not stat.S_ISCHR(st.st_mode):
        continue
    major = os.major(st.st_rdev)
    groups = by_major.get(major, [])
    covered = [p for p in patterns for g in groups if fnmatch.fnmatch(f"char-{g}", p)]
    uncovered += not covered
    print(f"{node:<28} major {major:<4} groups {','.join(groups) or '?':<24} "
          f"{'covered by ' + covered[0] if covered else 'NOT COVERED'}")
print(f"patterns: {patterns}; uncovered nodes: {uncovered}")
EOF
echo "deviceallow rc=$?"; tail -1 "$out/deviceallow.txt"
