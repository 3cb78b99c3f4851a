#!/usr/bin/env bash
# The GPU check of issue 17, in one call on the GPU machine (Python 3.12 with its own torch,
# no package registry): install the wheels of .gpu-wheels/ (benchmarks/gpu_wheels.txt,
# fetched by benchmarks/fetch_gpu_wheels.sh) with --no-deps into a target dir, then
#   1. pytest -m cuda (tests/test_cuda.py)           -> OUTDIR/pytest_cuda.txt, .xml
#   2. B8, models alone (benchmarks/gpu_bench.py)      -> OUTDIR/b8.json
#   3. wsiflow run on a generated >= 100k-cell slide   -> OUTDIR/run.json (+ GPU utilisation)
# and OUTDIR/gpu_check.json summing it all up. Each step has its own time limit so the whole
# stays within 8 minutes (pytest 180 s, B8 90 s, run 150 s; the slide is generated meanwhile); a failing step is recorded and the next one still runs.
#
#   benchmarks/gpu_check.sh OUTDIR                 # on the GPU machine
#   benchmarks/gpu_check.sh OUTDIR --no-cuda --size 3072 --block 1024   # CPU dry run
#
# --no-cuda: everything on the CPU (the cuda tests with WSIFLOW_CUDA_TEST_DEVICE=cpu, B8 and
# the run with --device cpu): a dry run of the script's own plumbing; it shows nothing about CUDA.
set -uo pipefail

OUTDIR=${1:?usage: gpu_check.sh OUTDIR [--no-cuda] [--size PX] [--block PX] [--no-install]}
shift
DEVICE=cuda
SIZE=38000        # mosaic side (px at 0.25 µm/px): ~40 copies of a 6000² block (~2,800 cells at 2400/mm²) ≈ 110k cells
BLOCK=6000
INSTALL=1
PYTEST_K=""
while [ $# -gt 0 ]; do
  case "$1" in
    --no-cuda) DEVICE=cpu ;;
    --size) SIZE=$2; shift ;;
    --block) BLOCK=$2; shift ;;
    --no-install) INSTALL=0 ;;
    --pytest-k) PYTEST_K=$2; shift ;;
    *) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=${WSIFLOW_GPU_WORK:-/tmp/wsiflow-gpu-check}
SITE=$WORK/site
mkdir -p "$WORK"
T0=$(date +%s)
log() { echo "[gpu_check $(($(date +%s) - T0))s] $*" | tee -a "$OUTDIR/steps.log" >&2; }
: > "$OUTDIR/steps.log"

# ---------------------------------------------------------------- 0. install
if [ "$INSTALL" = 1 ] && ls "$ROOT"/.gpu-wheels/*.whl >/dev/null 2>&1; then
  log "installing $(ls "$ROOT"/.gpu-wheels/*.whl | wc -l) wheels into $SITE (--no-deps; torch is the machine's own)"
  rm -rf "$SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$ROOT"/.gpu-wheels/*.whl > "$OUTDIR/install.log" 2>&1
  echo "install rc=$?" >> "$OUTDIR/steps.log"
fi
# wsiflow from the checkout, not installed: a staging folder maps wsiflow.pipelines to
# pipelines/ as pyproject's package-dir does (every other entry links to the checkout)
STAGE=$WORK/src
rm -rf "$STAGE"
mkdir -p "$STAGE/wsiflow"
for entry in "$ROOT"/wsiflow/*; do ln -s "$entry" "$STAGE/wsiflow/"; done
ln -s "$ROOT/pipelines" "$STAGE/wsiflow/pipelines"
export PYTHONPATH="$STAGE${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - > "$OUTDIR/env.json" 2>> "$OUTDIR/steps.log" <<'EOF'
import json, platform, sys
import numpy, torch
import wsiflow, dask, distributed, zarr, tiffslide, shapely, orjson, pydantic
info = {"python": sys.version.split()[0], "platform": platform.platform(), "numpy": numpy.__version__,
        "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda, "wsiflow": wsiflow.__version__, "dask": dask.__version__,
        "distributed": distributed.__version__, "zarr": zarr.__version__}
if torch.cuda.is_available():
    info["gpu"] = torch.cuda.get_device_name(0)
    info["gpus"] = torch.cuda.device_count()
print(json.dumps(info))
EOF
log "environment: $(cat "$OUTDIR/env.json")"

# ------------------------------------------- the big slide, generated while the tests run
SLIDE=$WORK/mosaic_${SIZE}_b${BLOCK}.svs
( cd "$ROOT/benchmarks" && timeout 300 "$PY" mosaic_slide.py "$SLIDE" --size "$SIZE" --block "$BLOCK" \
    > "$OUTDIR/slide.json" 2> "$WORK/slide.err" ) &
SLIDE_PID=$!

# ---------------------------------------------------------------- 1. pytest -m cuda
cd "$ROOT"
if [ "$DEVICE" = cpu ]; then export WSIFLOW_CUDA_TEST_DEVICE=cpu; fi
log "pytest -m cuda (${WSIFLOW_CUDA_TEST_DEVICE:-cuda})"
K_ARGS=()
if [ -n "$PYTEST_K" ]; then K_ARGS=(-k "$PYTEST_K"); fi
timeout 180 "$PY" -m pytest -m cuda tests/test_cuda.py -q -rA -p no:cacheprovider "${K_ARGS[@]}" \
  --junitxml "$OUTDIR/pytest_cuda.xml" > "$OUTDIR/pytest_cuda.txt" 2>&1
echo "pytest rc=$?" >> "$OUTDIR/steps.log"
unset WSIFLOW_CUDA_TEST_DEVICE
log "pytest: $(tail -1 "$OUTDIR/pytest_cuda.txt")"

# ---------------------------------------------------------------- 2. B8 models alone
log "B8 (models alone, $DEVICE)"
B8_ARGS=(--skip-e2e --work "$WORK/b8" --device "$DEVICE")
B8_TIMEOUT=90
if [ "$DEVICE" = cpu ]; then B8_ARGS+=(--quick --cells 128 --tiles 1); B8_TIMEOUT=400; fi
timeout "$B8_TIMEOUT" "$PY" benchmarks/gpu_bench.py "${B8_ARGS[@]}" > "$OUTDIR/b8.json" 2> "$WORK/b8.err"
echo "b8 rc=$?" >> "$OUTDIR/steps.log"

# ---------------------------------------------------------------- 3. wsiflow run, end to end
wait "$SLIDE_PID"
echo "slide rc=$?" >> "$OUTDIR/steps.log"
log "slide: $(cat "$OUTDIR/slide.json" 2>/dev/null)"
UTIL_PID=""
if [ "$DEVICE" = cuda ] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 250 \
    > "$OUTDIR/gpu_util.csv" 2>/dev/null &
  UTIL_PID=$!
fi
rm -rf "$WORK/run"
log "wsiflow run --device $DEVICE"
RUN_T0=$(date +%s.%N)
timeout 150 "$PY" -m wsiflow run "$SLIDE" -o "$WORK/run" --device "$DEVICE" --no-progress \
  > "$WORK/run.out" 2> "$WORK/run.err"
RUN_RC=$?
RUN_T1=$(date +%s.%N)
[ -n "$UTIL_PID" ] && kill "$UTIL_PID" 2>/dev/null
echo "run rc=$RUN_RC" >> "$OUTDIR/steps.log"
tail -20 "$WORK/run.err" > "$OUTDIR/run_stderr_tail.txt"

# ---------------------------------------------------------------- summary JSON
"$PY" - "$OUTDIR" "$WORK" "$SLIDE" "$RUN_RC" "$RUN_T0" "$RUN_T1" "$DEVICE" "$(($(date +%s) - T0))" <<'EOF'
import json, sys
from pathlib import Path
out, work, slide, rc, t0, t1, device, total = sys.argv[1:]
out, work = Path(out), Path(work)
def load(p):  # a JSON file, or the last line of one step's output
    try:
        text = Path(p).read_text().strip()
        try:
            return json.loads(text)
        except ValueError:
            return json.loads(text.splitlines()[-1])
    except Exception as exc:  # a step that failed: say so, keep going
        return {"error": f"{p}: {type(exc).__name__}: {exc}"}
run = {"returncode": int(rc), "wall_s": round(float(t1) - float(t0), 2), "device": device}
summary = work / "run" / Path(slide).stem / "summary.json"
if summary.is_file():
    s = json.loads(summary.read_text())
    n = s.get("summary", {}).get("n_cells")
    run.update(n_cells=n, cells_per_s=round(n / run["wall_s"], 1) if n else None,
               target="≥ 3,000 cells/s; a 100k-cell slide in < 35 s including cluster start")
util = out / "gpu_util.csv"
if util.is_file():
    vals = [float(r.split(",")[1]) for r in util.read_text().splitlines() if r.count(",") >= 2]
    if vals:
        run["gpu_util_mean_pct"] = round(sum(vals) / len(vals), 1)
        run["gpu_util_samples"] = len(vals)
(out / "run.json").write_text(json.dumps(run, indent=2))
pytest_tail = (out / "pytest_cuda.txt").read_text().splitlines()[-12:] if (out / "pytest_cuda.txt").is_file() else []
result = {
    "check": "issue 17 GPU check (benchmarks/gpu_check.sh)",
    "device": device,
    "note": ("CPU dry run: no GPU; CUDA parts replaced by the CPU, so nothing here is about CUDA"
             if device == "cpu" else "on the GPU machine"),
    "env": load(out / "env.json"),
    "pytest_cuda_tail": pytest_tail,
    "b8": load(out / "b8.json"),
    "slide": load(out / "slide.json"),
    "run": run,
    "steps": (out / "steps.log").read_text().splitlines(),
    "total_s": int(total),
    "budget_s": 480,
}
(out / "gpu_check.json").write_text(json.dumps(result, indent=2))
print(json.dumps({k: result[k] for k in ("device", "run", "total_s")}))
EOF
log "done in $(($(date +%s) - T0)) s"
