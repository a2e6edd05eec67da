#!/usr/bin/env bash
# The GPU check, in one call of at most 10 minutes on the lent GPU machine (Python 3.12 with torch
# 2.11 and torchvision 0.26 preinstalled, no network). Needs wheels/ from scripts/gpu-wheels.sh.
#
#   bash scripts/gpu-check.sh [--device cuda|cpu] [--out FILE.json] [--wheels DIR] [--python PY] [--tiny]
#
# Stages, each under its own time limit and all under one deadline (NKAT_GPU_CHECK_SECONDS, 560 s;
# the device tool's call gets at most 10 minutes):
#   env      Python, torch, CUDA devices, the packages there before the install
#   install  a venv that sees the machine's packages after its own (so the preinstalled torch is
#            reused), nkat-search installed into it from wheels/ with pip's resolver (--no-index);
#            should the resolver fail, every wheel --no-deps, and the JSON says so
#   tests    the quick suite: -m "not slow and not postgres and not browser"
#   train    the research baseline (tiny stem, patch 2, embed 384, depth 7) on Stage-1-sized
#            synthetic CIFAR-10 (50,000 generated: 45,000 train, 5,000 validation), bf16, 3 epochs,
#            each iteration replayed as a CUDA graph (--graphs auto)
#   train_eager  the same run with --graphs off: the same losses within bf16 tolerance, and the speed-up
#   bench128 nkat-search bench --only train --batch-size 128 --json (Round 2's batch; eager and graphed)
#   bench    nkat-search bench --json (batch 512; eager and graphed)
#   round2   nkat-search bench --only round2 --json: one epoch per dataset of a Round 2 trial at the
#            real sizes, scaled by the stages' epochs, and the 50-trial search projected from it
#   ops      nkat-search bench --only ops --json: the aten ops and host syncs of one batch at 128
#   procs    nkat-search bench --only procs --json: K = 1, 2, 4 training processes on GPU 0, eager
#            and graphed, in aggregate
#   search   nkat-search start --study smoke with several workers on GPU 0, then status --json
# Every figure goes into one JSON file: --out, else $OUT/gpu-check.json (the device tool's $OUT),
# else ./gpu-check.json; each stage's output lies beside it in gpu-check-logs/.
# --tiny shrinks every stage (a few tests, small model and data, 2 trials) so that
# tests/test_gpu_check.py proves this script's logic on a CPU in CI. NKAT_GPU_CHECK_TESTS,
# NKAT_GPU_CHECK_STUDY, NKAT_GPU_CHECK_TRIALS and NKAT_GPU_CHECK_WORKERS override the stages' choices.
set -uo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD

DEVICE=cuda OUTFILE="" WHEELS=wheels BASE=${PYTHON:-python3} TINY=0
while [ $# -gt 0 ]; do
  case $1 in
    --device) DEVICE=$2; shift 2 ;;
    --out) OUTFILE=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --python) BASE=$2; shift 2 ;;
    --tiny) TINY=1; shift ;;
    *) echo "gpu-check: unknown argument $1; use --device cuda|cpu, --out FILE, --wheels DIR, --python PY, --tiny" >&2
       exit 2 ;;
  esac
done
case $DEVICE in cuda|cpu) ;; *) echo "gpu-check: --device is cuda or cpu, not $DEVICE" >&2; exit 2 ;; esac
[ -n "$OUTFILE" ] || OUTFILE=${OUT:-.}/gpu-check.json
mkdir -p "$(dirname "$OUTFILE")"
OUTFILE=$(cd "$(dirname "$OUTFILE")" && pwd)/$(basename "$OUTFILE")
WHEELS=$(cd "$WHEELS" 2>/dev/null && pwd || echo "$WHEELS")
LOGS=$(dirname "$OUTFILE")/gpu-check-logs
rm -rf "$LOGS" && mkdir -p "$LOGS"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/nkat-gpu-check.XXXXXX")
V=$WORK/venv/bin/python
START=$(date +%s)

# Sizes: the real check, or --tiny for the CPU test. Each can be overridden through the environment.
if [ "$TINY" = 1 ]; then
  TESTS=${NKAT_GPU_CHECK_TESTS:-tests/test_metrics.py}
  TRAIN=(--synthetic_train 300 --val_size 60 --synthetic_test 60 --embed_dim 32 --num_heads 2 --depth 1
         --epochs 1 --warmup 0 --batch_size 32 --precision fp32)
  BENCH=(--only train --images 64 --eval-images 32 --steps 1 --warmup 1 --repeats 1 --embed-dim 32 --depth 1
         --batch-size 16 --threads 1)
  TRIALS=${NKAT_GPU_CHECK_TRIALS:-2} WORKERS=${NKAT_GPU_CHECK_WORKERS:-1}
  OPS=(--batch-size 8 --images 64 --embed-dim 32 --depth 1 --threads 1)
  BENCH128=(--images 64 --eval-images 32 --steps 1 --warmup 1 --repeats 1 --embed-dim 32 --depth 1 --threads 1)
  ROUND2=(--scale 0.003 --embed-dim 32 --depth 1 --threads 1)
  PROCS=(--processes 1 2 --jobs 1 --images 64 --eval-images 32 --batch-size 16 --embed-dim 32 --depth 1)
  LIMITS=(env=60 install=150 tests=120 train=120 train_eager=120 bench128=120 bench=120 round2=120 ops=120
          procs=180 search=240 status=60)
else
  TESTS=${NKAT_GPU_CHECK_TESTS:-tests}
  TRAIN=(--synthetic_train 50000 --val_size 5000 --embed_dim 384 --depth 7 --epochs 3 --warmup 1
         --batch_size 512 --lr 4e-4 --precision bf16)
  BENCH=()
  TRIALS=${NKAT_GPU_CHECK_TRIALS:-8} WORKERS=${NKAT_GPU_CHECK_WORKERS:-4}
  OPS=()
  BENCH128=()
  ROUND2=()
  PROCS=(--jobs 2)
  LIMITS=(env=30 install=60 tests=90 train=60 train_eager=60 bench128=40 bench=60 round2=120 ops=20
          procs=90 search=60 status=20)
fi
STUDY=${NKAT_GPU_CHECK_STUDY:-smoke}
GPUS=$([ "$DEVICE" = cuda ] && echo 0 || echo cpu)
DEADLINE=$((START + ${NKAT_GPU_CHECK_SECONDS:-$([ "$TINY" = 1 ] && echo 1200 || echo 560)}))

limit_of() { local kv; for kv in "${LIMITS[@]}"; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}"; done; }

# stage NAME COMMAND...: run it under its limit (never past the deadline); stdout, stderr and
# (rc, seconds, limit) into $LOGS. SIGINT first, so pytest still writes its report.
stage() {
  local name=$1; shift
  local limit left t0 rc
  limit=$(limit_of "$name")
  left=$((DEADLINE - $(date +%s)))
  [ "$left" -lt "$limit" ] && limit=$left
  printf '%s\n' "$@" > "$LOGS/$name.cmd"
  if [ "$limit" -le 0 ]; then
    echo "skipped: no time left before the deadline" > "$LOGS/$name.err"
    printf '%s %s %s\n' -1 0 0 > "$LOGS/$name.meta"
    return
  fi
  echo "gpu-check: $name (up to ${limit} s)" >&2
  t0=$(date +%s%N)
  timeout -s INT -k 15 "$limit" "$@" > "$LOGS/$name.out" 2> "$LOGS/$name.err" < /dev/null
  rc=$?
  printf '%s %s %s\n' "$rc" "$(( ($(date +%s%N) - t0) / 1000000 ))" "$limit" > "$LOGS/$name.meta"
}

install_steps() {
  set -x
  "$BASE" -m venv --without-pip "$WORK/venv" || return 10
  # The venv sees the machine's packages after its own, as --system-site-packages would (and that
  # works from a venv too); pip, run by the venv's Python, installs into the venv only.
  "$BASE" -c 'import site; print("\n".join(site.getsitepackages()))' \
    > "$("$V" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/machine-packages.pth" || return 11
  "$V" -m pip freeze --all > "$LOGS/freeze-before.txt" || return 12
  # The project's wheel from this checkout (a copy: an in-tree build leaves build/ behind); the one
  # gpu-wheels.sh built if no build backend is at hand here.
  mkdir -p "$WORK/src" "$WORK/dist"
  cp -r "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/nkat_search" "$WORK/src/"
  "$V" -m pip wheel -q --no-deps --no-index --find-links "$WHEELS" -w "$WORK/dist" "$WORK/src" \
    || "$V" -m pip wheel -q --no-deps --no-index --no-build-isolation -w "$WORK/dist" "$WORK/src" \
    || cp "$WHEELS"/nkat_search-*.whl "$WORK/dist/" || return 13
  if "$V" -m pip install --no-index --find-links "$WHEELS" --no-compile "$WORK"/dist/nkat_search-*.whl \
       pytest hypothesis; then
    echo "install_mode=resolved"
  else
    echo "install_mode=no-deps"
    "$V" -m pip install --no-deps --no-index --no-compile "$WHEELS"/*.whl "$WORK"/dist/nkat_search-*.whl \
      || return 14
  fi
  "$V" -m pip freeze --all > "$LOGS/freeze-after.txt"
  "$V" -m pip check || true
}
export -f install_steps
export BASE WORK V SRC WHEELS LOGS

stage env "$BASE" -c '
import json, os, platform, shutil, subprocess, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda, "cpus": os.cpu_count(), "machine": platform.machine()}
if torch.cuda.is_available():
    info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info["bf16_supported"] = torch.cuda.is_bf16_supported()
if shutil.which("nvidia-smi"):
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                         "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
print(json.dumps(info))'
stage install bash -c install_steps

# From an empty folder, so that the installed package runs, not the checkout beside it.
mkdir -p "$WORK/run" && cd "$WORK/run"
NKAT=$WORK/venv/bin/nkat-search
STORAGE="journal:$WORK/run/search.journal"
[ -f "$SRC/benchmarks/research_pipeline.py" ] && BENCH+=(--reference "$SRC/benchmarks/research_pipeline.py")
tests=()
for t in $TESTS; do tests+=("$SRC/$t"); done
stage tests "$V" -m pytest -q -p no:cacheprovider -m "not slow and not postgres and not browser" \
  --junit-xml="$LOGS/junit.xml" "${tests[@]}"
stage train "$NKAT" train --device "$DEVICE" --dataset cifar10 --data-source synthetic \
  --conv_stem tiny --patch_size 2 "${TRAIN[@]}" --graphs auto --json
stage train_eager "$NKAT" train --device "$DEVICE" --dataset cifar10 --data-source synthetic \
  --conv_stem tiny --patch_size 2 "${TRAIN[@]}" --graphs off --json
stage bench128 "$NKAT" bench --device "$DEVICE" --only train --batch-size 128 "${BENCH128[@]}" --json
stage bench "$NKAT" bench --device "$DEVICE" "${BENCH[@]}" --json
stage round2 "$NKAT" bench --device "$DEVICE" --only round2 "${ROUND2[@]}" --json
stage ops "$NKAT" bench --device "$DEVICE" --only ops "${OPS[@]}" --json
stage procs "$NKAT" bench --device "$DEVICE" --only procs "${PROCS[@]}" --json
stage search "$NKAT" start --study "$STUDY" --trials "$TRIALS" --gpus "$GPUS" --workers "$WORKERS" --storage "$STORAGE"
stage status "$NKAT" status --storage "$STORAGE" --json

"$BASE" - "$OUTFILE" "$LOGS" "$DEVICE" "$TINY" "$TRIALS" "$WORKERS" "$START" <<'EOF'
import json, re, sys, time
import xml.etree.ElementTree as ET
from pathlib import Path

out, logs, device, tiny, trials, workers, start = sys.argv[1:]
logs = Path(logs)


def last_json(text):
    """A stage's stdout as JSON (bench prints an indented object), else its last JSON line, else None."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                pass
    return None


def freeze(name):
    path = logs / name
    lines = path.read_text().splitlines() if path.exists() else []
    return dict(re.match(r"([^=@ ]+)\s*(?:==|@)\s*(.+)", ln).groups() for ln in lines if re.match(r"[^=@ ]+\s*(?:==|@)", ln))


report = {"check": "nkat-search GPU check", "device": device, "tiny": tiny == "1", "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
          "seconds": round(time.time() - int(start), 1), "stages": {}}
STAGES = ("env", "install", "tests", "train", "train_eager", "bench128", "bench", "round2", "ops", "procs", "search", "status")
for name in STAGES:
    meta = (logs / f"{name}.meta").read_text().split() if (logs / f"{name}.meta").exists() else ["-1", "0", "0"]
    rc, seconds, limit = int(meta[0]), int(meta[1]) / 1000, int(meta[2])
    stdout = (logs / f"{name}.out").read_text(errors="replace") if (logs / f"{name}.out").exists() else ""
    stderr = (logs / f"{name}.err").read_text(errors="replace") if (logs / f"{name}.err").exists() else ""
    entry = {"ok": rc == 0, "rc": rc, "seconds": round(seconds, 1), "limit_s": limit, "timed_out": rc in (124, 137),
             "command": (logs / f"{name}.cmd").read_text().split("\n")[:-1] if (logs / f"{name}.cmd").exists() else []}
    if rc != 0:
        entry["stderr_tail"] = stderr[-2000:]
    result = last_json(stdout)
    if result is not None:
        entry["result"] = result
    report["stages"][name] = entry

install = report["stages"]["install"]
text = (logs / "install.out").read_text() if (logs / "install.out").exists() else ""
install["mode"] = (re.findall(r"install_mode=(\S+)", text) or ["not reached"])[-1]
before, after = freeze("freeze-before.txt"), freeze("freeze-after.txt")
install["kept"] = {p: {"before": before.get(p), "after": after.get(p)} for p in ("torch", "torchvision")}
install["torch_unchanged"] = bool(before.get("torch")) and all(v["before"] == v["after"] for v in install["kept"].values())
install["added"] = sorted(f"{p}=={v}" for p, v in after.items() if before.get(p) != v)

junit = logs / "junit.xml"
if junit.exists():
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    report["stages"]["tests"]["summary"] = {k: (float(suite.get(k)) if k == "time" else int(suite.get(k, 0)))
                                            for k in ("tests", "failures", "errors", "skipped", "time")}
    report["stages"]["tests"]["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                                           if c.find("failure") is not None or c.find("error") is not None]

train = report["stages"]["train"].get("result")
if train:
    report["stages"]["train"]["stage1_estimate_s"] = None
    if train.get("images_per_second"):
        # README's Stage-1 estimate: 10 epochs of 45,000 images at the measured training rate.
        report["stages"]["train"]["stage1_estimate_s"] = round(450_000 / train["images_per_second"], 1)
eager = report["stages"]["train_eager"].get("result")
if train and eager:
    # The same run with and without CUDA graphs: per-epoch training losses and the speed-up.
    ours, theirs = [h["train_loss"] for h in train["history"]], [h["train_loss"] for h in eager["history"]]
    diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours, theirs)) if ours and len(ours) == len(theirs) else None
    report["stages"]["train"]["graphs_vs_eager"] = {
        "graphs": train.get("graphs"), "eager": eager.get("graphs"), "losses": ours, "eager_losses": theirs,
        "max_relative_loss_difference": diff, "same_losses_within_bf16": diff is not None and diff <= 0.02,
        "speedup": train["images_per_second"] / eager["images_per_second"] if eager.get("images_per_second") else None}
report["stages"]["search"]["trials"], report["stages"]["search"]["workers"] = int(trials), int(workers)
report["ok"] = all(s["ok"] for s in report["stages"].values())
Path(out).write_text(json.dumps(report, indent=2) + "\n")
print(f"gpu-check: wrote {out} (all stages ok: {report['ok']})")
EOF
rm -rf "$WORK"
