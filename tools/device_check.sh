#!/usr/bin/env bash
# Every GPU check in one call, for a lent GPU machine with jax (0.11, CUDA) preinstalled and no
# registry (issues 6 and 12). Run from the repository root:
#
#     bash tools/device_check.sh            # about 8 minutes on an H100; stages are time-gated
#
# 1. `vdit bench experiments/bench_gpu.yaml` (the 1.4 B DiT at 16k tokens, bf16): MFU,
# 1b. `vdit bench experiments/bench_gpu_wan.yaml` (Wan 2.1 1.3B at 81 x 480 x 832: 32,760
#    tokens, bf16, remat dots; published architecture, random weights, synthetic batch) and
#    the own DiT at the same 32,760 tokens (stages `wan`, `dit-32k`; SKIP="default ..." gives
#    them the time of stage 1),
# 2. the `gpu`-marked tests (Triton kernels against float64, auto / cuDNN / Pallas against XLA),
# 3. tools/bench_attention.py at 4k, 16k and 64k tokens (xla, cudnn, pallas_gpu),
# 4. a profile of the default step (per-op GPU time by category; the trace comes back),
# 5. bench variants (Pallas attention; cuBLAS for every matmul), each while time is left,
# 6. XLA GPU options as A/B ratios against the defaults (tools/ab_step.py: the two steps
#    alternate in one process, so the ratio is sharper than two bench runs).
# Stages 3 and 5 are skipped by default (their figures are recorded); SKIP= runs them.
# (`model.remat=none` is left out: it needs 92.7 GiB, docs/performance.md.)
# JSON rows and logs land in $OUT (or .cache/device_check) for docs/performance.md.
#
# vdit goes on PYTHONPATH (no registry there). The machine lacks grain and its dependencies;
# prepare their cp312 wheels here once and carry `.whl` (see /work/.library/device/README.md):
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#         grain==0.2.18 array_record==0.8.6 dm-tree==0.1.10 portpicker importlib_resources
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUTDIR=${OUT:-.cache/device_check}
BUDGET=${BUDGET:-480}  # seconds; a stage starts only if its own limit fits in what is left
mkdir -p "$OUTDIR"
LOG="$OUTDIR/stderr.log"  # every stage's stderr, headed by its name
start=$SECONDS
status=0
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92

if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# Stages to leave out. By default the ones whose figures are already in docs/performance.md
# (H100, 2026-11-27: the attention kernels, the Pallas and cuBLAS step variants), so the time
# goes to what is still open; SKIP= runs everything.
SKIP=${SKIP-attention pallas cublas}
fits() {  # fits LIMIT [STAGE]: is there time for a stage of LIMIT seconds, and is it wanted?
    case " $SKIP " in *" ${2:-none} "*) echo "(skipped: SKIP)"; return 1;; esac
    [ $((SECONDS - start + $1)) -le "$BUDGET" ] || { echo "(skipped: budget)"; return 1; }
}

vbench() {  # [CONFIG=FILE] vbench NAME LIMIT [overrides...]: one `vdit bench` row, to bench.jsonl
    local name=$1 limit=$2 row config=${CONFIG:-experiments/bench_gpu.yaml}; shift 2
    echo "-- bench $name $config $*"
    fits "$limit" "$name" || return 0
    echo "== bench $name $config $*" >>"$LOG"
    row=$(timeout "$limit" $PY -c "from vdit.cli import main; raise SystemExit(main())" \
        bench "$config" "$@" --json --steps 10 --warmup 2 2>>"$LOG")
    local rc=$?
    if [ $rc -eq 0 ]; then
        row=$(echo "$row" | tail -1)
        echo "{\"name\": \"$name\", \"config\": \"$config\", \"overrides\": \"$*\", \"result\": $row}" >>"$OUTDIR/bench.jsonl"
        echo "$row" | $PY -c "import json, sys
from vdit.train.bench import format_report
print(format_report(json.loads(sys.stdin.read())))"
    else
        status=1; echo "   failed (rc $rc):"; tail -25 "$LOG"
    fi
}

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader || true
$PY -c "import jax; print('jax', jax.__version__, jax.default_backend(), jax.devices())" || exit 1
if [ "$($PY -c 'import jax; print(jax.default_backend())' 2>/dev/null)" != gpu ]; then
    echo "no GPU here: this script is for a lent GPU machine"; exit 2
fi

echo "== train-step benchmark (experiments/bench_gpu.yaml)"
vbench default 200

echo "== Wan 2.1 1.3B train step at 81 x 480 x 832 (experiments/bench_gpu_wan.yaml), and the own"
echo "   DiT at the same 32,760 tokens per clip (21 x 240 x 416 physics clips, space_to_depth 1x4x4)"
# full remat: under dots vdit plan estimates 75.2 GiB (docs/fine-tuning.md), over an H100's 73.3 usable
CONFIG=experiments/bench_gpu_wan.yaml vbench wan 300 model.remat=full
vbench dit-32k 240 data.world.frames=21 data.world.height=240 data.world.width=416

echo "== gpu tests"
if fits 120 tests; then
    # --noconftest: these tests need only jax, numpy and vdit.ops.
    timeout 120 $PY -m pytest -q --noconftest -p no:cacheprovider -m gpu --tb=short \
        -W ignore::DeprecationWarning tests/test_flash_attention.py -rA 2>&1 | tail -40 || status=1
fi

echo "== profile of the default step (trace in \$OUT/step_trace.json.gz)"
if fits 120 profile; then
    timeout 120 $PY tools/profile_step.py experiments/bench_gpu.yaml --top 12 \
        --save "$OUTDIR/step_trace.json.gz" 2>>"$LOG" || status=1
fi

echo "== attention benchmark (B=1, H=16, D=128, bf16)"
if fits 150 attention; then
    timeout 150 $PY tools/bench_attention.py --iters 5 --warmup 2 \
        --json "$OUTDIR/bench_attention.json" 2>>"$LOG" || status=1
fi

echo "== train-step variants: Pallas attention; cuBLAS for every matmul (no Triton GEMMs)"
vbench pallas 120 model.attention=pallas_gpu
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" vbench cublas 120

echo "== XLA options as B/A step ratios (tools/ab_step.py, 8 rounds each)"
# Candidates for the 120 ms of element-wise kernels and the median-vs-fastest gap
# (docs/performance.md), most promising first: Triton GEMMs that may absorb any element-wise
# producer (the norm + modulation in front of each matmul), cuDNN layer norm, cuBLASLt
# epilogues, no CUDA graphs (command buffers), a wider GEMM tiling search. Option names were
# checked against jax 0.10.2's XLA; an unknown one fails with "No such compile option".
# Two 1.4 B train states (about 22 GiB each) plus one step's temporaries (about 20 GiB) fit.
for opt in "xla_gpu_triton_gemm_any=true" "xla_gpu_enable_cudnn_layer_norm=true" \
           "xla_gpu_enable_cublaslt=true" "xla_gpu_enable_command_buffer=" \
           "xla_gpu_exhaustive_tiling_search=true"; do
    echo "-- ab $opt"
    fits 120 ab || continue
    echo "== ab $opt" >>"$LOG"
    timeout 120 $PY tools/ab_step.py experiments/bench_gpu.yaml --b-xla "$opt" --rounds 8 \
        2>>"$LOG" | tail -3 | tee -a "$OUTDIR/ab.txt" || { status=1; echo "   failed: see stderr.log"; }
done

echo "== done in $((SECONDS - start)) s, status $status"
exit $status
