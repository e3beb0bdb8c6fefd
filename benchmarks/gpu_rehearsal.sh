#!/usr/bin/env bash
# A study's DVC pipeline on the lent GPU machine, one device call at a time (docs/gpu.md).
#
#   bash benchmarks/gpu_rehearsal.sh SECONDS [hydra overrides ...]
#   e.g. bash benchmarks/gpu_rehearsal.sh 540 scale=rehearsal model=qwen2.5-7b-random
#
# Carried: .devenv/part1 (scripts/device_env.py pack) and .devenv/ws.tar.gz (a `git archive` of the
# commit to run). The first call installs the wheels into /root/site and unpacks the snapshot into
# /root/ws (a git repo of its own: the synced checkout would overwrite dvc.lock between calls);
# every call composes params.yaml from the overrides, runs `dvc repro` until SECONDS minus a margin,
# then stops it (a later call, back to back, resumes: that is part of what is rehearsed) and leaves
# in $OUT: env.txt, repro.log, stage_times.json (benchmarks/stage_times.py over every invocation so
# far), gpumem.csv and ws.tgz (dvc.lock, params.yaml, timings.json, metrics/, mlflow.db).
set -u
T0=$(date +%s)
BUDGET=${1:?seconds}
shift
WS=/root/ws
REPO=$PWD
mkdir -p /root/bin "$OUT"
left() { echo $((BUDGET - ($(date +%s) - T0))); }

if [ ! -f /root/site/devenv_manifest.json ]; then
  python3 scripts/device_env.py install --part .devenv/part1 2>&1 | grep -v "^WARNING: Target directory" | tail -40
fi
export PYTHONPATH=/root/site:$WS/src:$WS PATH=/root/bin:/root/site/bin:$PATH PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1
command -v python >/dev/null || ln -sf "$(command -v python3)" /root/bin/python

if [ ! -d $WS/.dvc ]; then
  mkdir -p $WS && tar -xzf .devenv/ws.tar.gz -C $WS
  cd $WS || exit 3
  if command -v git >/dev/null; then
    git init -q && git add -A && git -c user.name=rehearsal -c user.email=rehearsal@localhost commit -qm snapshot
  else
    dvc config --local core.no_scm true
  fi
fi
cd $WS || exit 3
mkdir -p logs
{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 --version
  git --version 2>&1
  python3 -c "import torch, transformers, peft, accelerate, trl, datasets, dvc, mlflow, pydantic, numpy; print(' '.join(f'{m.__name__} {m.__version__}' for m in (torch, transformers, peft, accelerate, trl, datasets, dvc, mlflow, pydantic, numpy)))" 2>&1 | tail -3
  echo "overrides: $*"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

python -m personaspace.cli params "$@" || exit 4
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader -l 5 >> logs/gpumem.csv &
SMI=$!
echo "=== dvc repro, $(left) s left, $(date -u +%T)" | tee -a logs/repro.log
timeout -k 20 $(($(left) - 45)) dvc repro 2>&1 | tee -a logs/repro.log | grep -vE "^\s*$" | cut -c1-300 | tail -60
echo "=== dvc repro rc=${PIPESTATUS[0]} at $(($(date +%s) - T0)) s" | tee -a logs/repro.log
kill $SMI
dvc status 2>&1 | grep -E "changed|modified|new|deleted|up to date" | sort | uniq -c | head -20
python "$REPO/benchmarks/stage_times.py" --db mlflow.db --invocations 99 --out "$OUT/stage_times.json" \
  --note "H200, rehearsal $*" 2>&1 | tail -30
cp logs/repro.log logs/gpumem.csv "$OUT/"
tar -czf "$OUT/ws.tgz" dvc.lock params.yaml timings.json metrics mlflow.db logs 2>/dev/null
ls -la "$OUT"
echo "elapsed $(($(date +%s) - T0)) s"
