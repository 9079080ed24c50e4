#!/usr/bin/env bash
# The GPU checks of the attention kernels in one call (issue 6), for a lent GPU machine with
# jax (0.11, CUDA) preinstalled and no internet. Run from the repository root:
#
#     bash tools/device_check.sh            # about 5 minutes on an H100; budget 8
#
# 1. the `gpu`-marked tests (compiled Triton kernels against a float64 reference, and auto /
#    cuDNN / Pallas against XLA), 2. tools/bench_attention.py at 4k, 16k and 64k tokens
#    (xla, cudnn, pallas_gpu), 3. a short sweep of Pallas tiles at 16k. Prints tables; the JSON
#    rows land in $OUT (or .cache/device_check) for docs/performance.md.
#
# vdit is put on PYTHONPATH rather than pip-installed (no registry there). pytest may be
# missing on the machine: prepare wheels here first and carry them,
#     .venv/bin/pip download pytest -d .cache/wheels     # then run(..., carry=[".cache/wheels"])
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
OUTDIR=${OUT:-.cache/device_check}
mkdir -p "$OUTDIR"
start=$SECONDS
status=0

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
$PY -c "import jax; print('jax', jax.__version__, jax.default_backend(), jax.devices())" || exit 1
if [ "$($PY -c 'import jax; print(jax.default_backend())' 2>/dev/null)" != gpu ]; then
    echo "no GPU here: this script is for a lent GPU machine (CPU checks: pytest tests/test_flash_attention.py)"
    exit 2
fi

echo "== gpu tests"
if ! $PY -c "import pytest" 2>/dev/null && [ -d .cache/wheels ]; then
    $PY -m pip install --quiet --no-index --find-links .cache/wheels pytest
fi
if $PY -c "import pytest" 2>/dev/null; then
    # --noconftest: the shared conftest imports the whole of vdit (yaml, grain, ...), which the
    # GPU machine may lack; these tests need only jax, numpy and vdit.ops.
    timeout 240 $PY -m pytest -q --noconftest -p no:cacheprovider -m gpu \
        tests/test_flash_attention.py -rA 2>&1 | tail -15 || status=1
else
    echo "pytest missing and no .cache/wheels: gpu tests NOT run"; status=1
fi

echo "== benchmark (B=1, H=16, D=128, bf16)"
# Rows print as JSON while they finish (kept if the timeout cuts the run), then the table.
timeout 300 $PY tools/bench_attention.py --iters 5 --warmup 2 \
    --json "$OUTDIR/bench_attention.json" 2>"$OUTDIR/bench_stderr.log" || status=1

echo "== pallas_gpu tiles at 16k (fwd q k | dkv q k | dq q k)"
for blocks in "128 64 32 128 128 32" "128 128 64 128 128 64" "64 64 64 64 64 64" \
              "128 64 64 64 64 64"; do
    [ $((SECONDS - start)) -gt 420 ] && { echo "(time budget: sweep cut short)"; break; }
    echo "-- blocks $blocks"
    timeout 90 $PY tools/bench_attention.py --impls pallas_gpu --lengths 16384 --iters 5 \
        --warmup 2 --in-process --blocks $blocks 2>>"$OUTDIR/bench_stderr.log" \
        | grep -E '^\| pallas|error' || status=1
done

echo "== done in $((SECONDS - start)) s, status $status"
exit $status
