#!/usr/bin/env bash
# GPU check, under 8 minutes on one H200: trains each model (vae, mixture, indmom, momix, tree) for
# a few epochs on data/pbmc.h5ad and on 100,000 synthetic cells (written on the spot by
# scvae_hier.synthetic, trained out of core), checks that every run reloads on the CPU (a second
# process with CUDA_VISIBLE_DEVICES=) with the same outputs to tolerance, and prints s/epoch and
# training cells/s. Run from anywhere:
#
#     bash benchmarks/gpu.sh                 # on the GPU machine
#     GPU_SMOKE=1 bash benchmarks/gpu.sh     # small and quick, to check the script on a CPU
#
# The log and the table's rows go to $OUT (gpu.log, rows.jsonl) when OUT is set, else to logs/gpu;
# the synthetic file and the runs go to $GPU_WORK (default logs/gpu, ignored by git). Python: ./.venv if it imports TensorFlow; else a python3.11 that already has the
# project's requirements; else a new .venv installed with pip (needs the package index: the GPU
# machine may have none). It says which it uses.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=${GPU_WORK:-$ROOT/logs/gpu}
LOGS=${OUT:-$WORK}
mkdir -p "$WORK" "$LOGS"
exec > >(tee "$LOGS/gpu.log") 2>&1
STARTED=$(date +%s)
say() { echo "[gpu.sh $(( $(date +%s) - STARTED )) s] $*"; }

# -- Python ---------------------------------------------------------------------------------------
has_requirements() { "$1" -c "import tensorflow, tensorflow_probability, keras, anndata, scanpy, skmisc" 2>/dev/null; }
if [ -x .venv/bin/python ] && has_requirements .venv/bin/python; then
    PY=.venv/bin/python; say "Python: the existing .venv ($PY)"
elif command -v python3.11 >/dev/null && has_requirements python3.11; then
    PY=python3.11; say "Python: python3.11 on PATH, which has the requirements (no .venv used)"
else
    say "Python: no usable .venv or python3.11 with the requirements; creating .venv with pip (needs the package index)"
    python3.11 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e . \
        || { say "pip install failed (no package index here?). Carry a .venv or install the requirements, then rerun."; exit 2; }
    PY=.venv/bin/python
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}  # this checkout's package, whatever an editable install points at
"$PY" -c "import scvae_hier, sys; print('scvae_hier from', scvae_hier.__file__, 'on Python', sys.version.split()[0])"
"$PY" -c "import tensorflow as tf; g = tf.config.list_physical_devices('GPU'); print('GPUs:', g or 'NONE (TensorFlow runs on the CPU; for CUDA: pip install tensorflow[and-cuda]==2.21.0)')"

# -- settings -------------------------------------------------------------------------------------
if [ "${GPU_SMOKE:-0}" = 1 ]; then
    SYNTHETIC_CELLS=3000; PBMC_EPOCHS=2; SYNTHETIC_EPOCHS=2; SMALL=(--n-genes 200 --latent-dim 4 --hidden 16 16)
    say "GPU_SMOKE=1: $SYNTHETIC_CELLS synthetic cells, small networks"
else
    SYNTHETIC_CELLS=100000; PBMC_EPOCHS=4; SYNTHETIC_EPOCHS=2; SMALL=()
fi
# Each dataset's models stop being started once its share of the 8 minutes is spent (skipped
# models are listed in the table), so the script ends in time whatever the GPU's speed.
PBMC_BUDGET_S=${PBMC_BUDGET_S:-120}
SYNTHETIC_BUDGET_S=${SYNTHETIC_BUDGET_S:-180}
RUNS=$WORK/runs
rm -f "$RUNS/rows.jsonl"
mkdir -p "$RUNS"

# -- data -----------------------------------------------------------------------------------------
SYNTHETIC=$WORK/synthetic-$SYNTHETIC_CELLS.h5ad
if [ ! -f "$SYNTHETIC" ]; then
    say "writing $SYNTHETIC_CELLS synthetic cells x 2,400 genes (2/4/8 hierarchy) to $SYNTHETIC"
    "$PY" -c "from scvae_hier import synthetic; synthetic.write_h5ad('$SYNTHETIC', $SYNTHETIC_CELLS, 2400, seed=0)"
fi

# -- training on the GPU --------------------------------------------------------------------------
say "training on data/pbmc.h5ad, $PBMC_EPOCHS epochs per model"
GPU_BUDGET_S=$PBMC_BUDGET_S "$PY" benchmarks/gpu.py train data/pbmc.h5ad pbmc "$PBMC_EPOCHS" "$RUNS" "${SMALL[@]}"
say "training on $SYNTHETIC_CELLS synthetic cells (out of core, 2,000 genes), $SYNTHETIC_EPOCHS epochs per model"
GPU_BUDGET_S=$SYNTHETIC_BUDGET_S "$PY" benchmarks/gpu.py train "$SYNTHETIC" synthetic "$SYNTHETIC_EPOCHS" "$RUNS" \
    --n-genes 2000 --dispersion gene --out-of-core on "${SMALL[@]}"

# -- reload on the CPU ----------------------------------------------------------------------------
say "reloading every run on the CPU (CUDA_VISIBLE_DEVICES= in a second process)"
STATUS=0
CUDA_VISIBLE_DEVICES= "$PY" benchmarks/gpu.py reload "$RUNS" || STATUS=$?

say "results"
"$PY" benchmarks/gpu.py summary "$RUNS"
cp "$RUNS/rows.jsonl" "$LOGS/rows.jsonl" 2>/dev/null || true
rm -rf "$RUNS"/*/counts  # the out-of-core stores (hundreds of MB), not needed after the check
if [ "$STATUS" = 0 ]; then say "done: every run reloads on the CPU with the same outputs"; else
    say "done, but some runs gave different outputs on the CPU (see RELOAD lines)"; fi
exit "$STATUS"
