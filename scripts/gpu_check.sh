#!/usr/bin/env bash
# One run of ppldelta.hf's accelerator paths on a machine with a GPU, from a bare copy of the
# repository (no virtualenv): installs what it needs, then
#   1. scripts/gpu_check.py: hf.score under every protocol, compare_models, build_reference +
#      evaluate_against_reference and the torch twins of the kernels on the GPU against the CPU;
#   2. benchmarks/bench_throughput.py --device cuda (the default size and a larger model).
# Every step runs under `timeout` and the next one runs whatever happened; logs, gpu_check.json,
# the benchmark JSONs and summary.json go to $OUT (default ./gpu_check_out), and a table of the
# steps ends the output.  The exit status is the number of steps that did not succeed.
#
#   scripts/gpu_check.sh                  # on the GPU machine (about 8 minutes with the installs)
#   scripts/gpu_check.sh --device cpu     # a dry run here: same steps on the CPU, small benchmark
#
# Environment: OUT, VENV (default: python3's own virtualenv if it runs in one, else
# /tmp/ppldelta-gpu-venv: used if it exists, else created with --system-site-packages so that a
# torch already installed is used), PYTHON (default python3), T_TORCH / T_INSTALL /
# T_CHECK / T_BENCH (step time limits in seconds).
set -u
DEVICE=cuda
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --device=*) DEVICE="${1#*=}"; shift ;;
        *) echo "usage: $0 [--device cuda|cpu]" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PYTHON="${PYTHON:-python3}"
# a python3 that is itself a virtualenv's (the GPU image's /opt/torch/.venv) is used as it is: a
# virtualenv made from it would see the base interpreter's packages, not its torch
VENV="${VENV:-$("$PYTHON" -c 'import sys; print(sys.prefix if sys.prefix != sys.base_prefix else "/tmp/ppldelta-gpu-venv")' 2>/dev/null || echo /tmp/ppldelta-gpu-venv)}"
STEPS="$OUT/steps.tsv"
: > "$STEPS"
T0=$(date +%s)

step() {  # step NAME LIMIT_S COMMAND...: run under timeout, log to $OUT/NAME.log, record the outcome
    local name="$1" limit="$2"; shift 2
    local t rc
    t=$(date +%s)
    echo "== $name (limit ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t ))" >> "$STEPS"
    tail -n 25 "$OUT/$name.log"
    [ "$rc" = 124 ] && echo "!! $name ran past its ${limit} s limit"
    echo "== $name: exit $rc after $(( $(date +%s) - t )) s"
    return 0
}

# ---- environment: a virtualenv over the system's packages, else the system's python
{
    echo "date: $(date -u)"; uname -a; "$PYTHON" --version
    command -v nvidia-smi > /dev/null && nvidia-smi
    command -v gcc > /dev/null && gcc --version | head -1 || echo "no gcc: the C extension cannot build"
    nproc; free -g 2>/dev/null | head -2
} > "$OUT/machine.log" 2>&1
if [ -x "$VENV/bin/python" ]; then
    echo "using the existing virtualenv $VENV"
else
    step venv 90 "$PYTHON" -m venv --system-site-packages "$VENV"
fi
if [ -x "$VENV/bin/python" ]; then
    PY="$VENV/bin/python"
else
    PY="$PYTHON"; export PIP_BREAK_SYSTEM_PACKAGES=1
    echo "no virtualenv: installing into $PYTHON's site-packages"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

if [ "$DEVICE" = cpu ]; then
    TORCH_OK='import torch'
else
    TORCH_OK='import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'
fi
if "$PY" -c "$TORCH_OK" > /dev/null 2>&1; then
    echo "torch already usable for $DEVICE: $("$PY" -c 'import torch; print(torch.__version__)')"
    printf 'torch\t0\t0\n' >> "$STEPS"
else
    # PyPI's Linux x86_64 wheel of torch is the CUDA build (the CUDA libraries come as wheels
    # too); --ignore-installed: a CPU-only torch of the system's must not satisfy it
    step torch "${T_TORCH:-330}" "$PY" -m pip install --progress-bar off --ignore-installed torch
    if [ "$DEVICE" != cpu ] && ! "$PY" -c "$TORCH_OK" > /dev/null 2>&1; then
        echo "the newest torch sees no GPU (driver older than its CUDA?): trying torch 2.5.1 (CUDA 12.4)"
        step torch_fallback "${T_TORCH:-330}" "$PY" -m pip install --progress-bar off --ignore-installed "torch==2.5.1"
    fi
fi
# the package (its C extension builds here: needs gcc) unless this checkout's is already importable
REPO="$PWD"
if (cd /tmp && "$PY" -c "import ppldelta._core, transformers, tqdm, os, sys
sys.exit(0 if os.path.realpath(ppldelta.__file__).startswith(os.path.realpath(sys.argv[1]) + os.sep) else 1)" "$REPO") \
        > /dev/null 2>&1; then
    echo "ppldelta of this checkout and transformers already importable: no install"
    printf 'install\t0\t0\n' >> "$STEPS"
else
    step install "${T_INSTALL:-180}" "$PY" -m pip install --progress-bar off --no-build-isolation --no-deps -e .
fi
step versions 60 "$PY" -c 'import torch, transformers, numpy, ppldelta, ppldelta._core as c
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("transformers", transformers.__version__, "numpy", numpy.__version__, "ppldelta simd", c.simd())
if torch.cuda.is_available(): print(torch.cuda.get_device_name(0))'

# ---- the checks, then the throughput
step check "${T_CHECK:-240}" "$PY" scripts/gpu_check.py --device "$DEVICE" --out "$OUT"
if [ "$DEVICE" = cpu ]; then
    step bench "${T_BENCH:-150}" "$PY" benchmarks/bench_throughput.py --device cpu --windows 4 --seq 128 \
        --repeat 1 --json "$OUT/bench.json"
else
    step bench "${T_BENCH:-150}" "$PY" benchmarks/bench_throughput.py --device cuda --repeat 5 \
        --json "$OUT/bench.json"
    step bench_large "${T_BENCH:-150}" "$PY" benchmarks/bench_throughput.py --device cuda --hidden 1024 \
        --layers 8 --seq 1024 --windows 64 --batch 8 --repeat 3 --json "$OUT/bench_large.json"
    # the bfloat16 forward is 8x faster: more windows and rounds for stable ratios, and a profile
    step bench_large_bf16 "${T_BENCH:-150}" "$PY" benchmarks/bench_throughput.py --device cuda --hidden 1024 \
        --layers 8 --seq 1024 --windows 256 --batch 8 --repeat 7 --dtype bfloat16 --profile \
        --json "$OUT/bench_large_bf16.json"
fi

# ---- summary: the steps, the checks, the benchmark fractions
"$PY" - "$OUT" "$(( $(date +%s) - T0 ))" <<'EOF' || cat "$STEPS"
import json, os, sys
out, wall = sys.argv[1], int(sys.argv[2])
steps = [dict(zip(("step", "rc", "seconds"), l.rstrip("\n").split("\t"))) for l in open(os.path.join(out, "steps.tsv"))]
summary = {"wall_seconds": wall, "steps": steps}
print(f"\n{'step':<20}{'exit':>6}{'seconds':>9}")
for s in steps:
    print(f"{s['step']:<20}{s['rc']:>6}{s['seconds']:>9}")
p = os.path.join(out, "gpu_check.json")
if os.path.exists(p):
    g = json.load(open(p))
    summary["checks"] = [{k: r.get(k) for k in ("check", "status", "max_abs_diff", "tolerance", "error")}
                         for r in g["checks"]]
    print(f"\n{'check':<58}{'status':>7}{'max diff':>12}{'tol':>9}")
    for r in summary["checks"]:
        d = r["max_abs_diff"]
        print(f"{r['check']:<58}{r['status']:>7}{(f'{d:.2e}' if isinstance(d, float) else '-'):>12}"
              f"{str(r['tolerance']):>9}  {r['error'] or ''}")
for name in ("bench", "bench_large", "bench_large_bf16"):
    p = os.path.join(out, name + ".json")
    if os.path.exists(p):
        b = json.load(open(p))
        summary[name] = b
        print(f"\n{name}: {b['where']}, {b['args']['dtype']}, hidden {b['args']['hidden']}, "
              f"{b['args']['layers']} layers, seq {b['args']['seq']}, batch {b['args']['batch']}")
        for r in b["loops"]:
            print(f"  {r['loop']:<26}{r['tok_s']:>12,.0f} tok/s{r['of_forward']:>8.3f} of forward")
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(f"\n{sum(s['rc'] != '0' for s in steps)} step(s) not ok; wall {wall} s; files in {out}")
EOF
exit "$(awk -F'\t' '$2 != 0' "$STEPS" | wc -l)"
