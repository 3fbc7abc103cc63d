#!/usr/bin/env bash
# The GPU runs behind docs/results.md (examples built beforehand, see configs/*.yaml first lines):
#   bash bench/gpu_results.sh OUT_DIR ML1M_EXAMPLES SYNTHETIC_EXAMPLES [guard_seconds] [jobs...]
# Each job trains under a time guard (a run cut by it resumes from its checkpoint when the script
# runs again), jobs on the same GPU run in parallel; then every finished model is evaluated.
# Jobs (name:gpu[:extra train args, comma-separated]), default: the first GPU call's set.
# BENCH=1 first measures throughput / time / memory per kind alone on the GPU (bench/train_bench.py).
# A job's config: its line in JOBS_FILE (default bench/gpu_jobs.txt: base config + override lines),
# else configs/<name>.yaml when that exists, else the config its name starts with.
# SYN_IMP=DIR: examples of the synthetic-imp* jobs (built with --history-impressions).
# DRY_RUN=1: print each job's `unipinrec train` command and stop (nothing runs).
# COLLECT=DIR: at the end, every job's metrics in DIR/results.json and its logs in DIR/logs.tgz.
set -u
R=${1:-runs/gpu}; ML=${2:-runs/ml1m_ex}; SYN=${3:-runs/syn_ex}; GUARD=${4:-480}; shift $(( $# < 4 ? $# : 4 ))
JOBS=("$@")
[ ${#JOBS[@]} -eq 0 ] && JOBS=(ml1m-large:0 ml1m:0 ml1m-retrieval_only:0:--kind,retrieval_only
                                ml1m-ranking_only:0:--kind,ranking_only synthetic:0)
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}src
PY=${PYTHON:-python3}
CLI=("$PY" -c "from unipinrec.cli import main; main()")
JOBS_FILE=${JOBS_FILE:-bench/gpu_jobs.txt}
config_args() {  # the job's `--config BASE --set name=JOB --set key=value ...`, one word a line
  local row; row=$(awk -v job="$1" '$1 == job { $1 = ""; print; exit }' "$JOBS_FILE")
  if [ -n "$row" ]; then
    local words kv; read -r -a words <<< "$row"  # (read -a: no glob expansion of [..] values)
    printf '%s\n' --config "${words[0]}" --set "name=$1"
    for kv in "${words[@]:1}"; do printf '%s\n' --set "$kv"; done
  else
    local base=configs/ml1m.yaml; case $1 in synthetic*) base=configs/synthetic.yaml;; ml1m-large*) base=configs/ml1m-large.yaml;; esac
    [ -f "configs/$1.yaml" ] && base=configs/$1.yaml
    printf '%s\n' --config "$base"
  fi
}
examples_of() { case $1 in synthetic-imp*) echo "${SYN_IMP:-runs/syn_ex_imp}";; synthetic*) echo "$SYN";; *) echo "$ML";; esac; }
train_args() {  # everything `unipinrec train` gets for job $1 on GPU $2 with extra args $3 (one word a line)
  config_args "$1"
  printf '%s\n' --examples "$(examples_of "$1")" --out "$R/$1" --device "cuda:$2" --no-progress ${3//,/ }
}
if [ "${DRY_RUN:-0}" = 1 ]; then  # print each job's train command (shell-quoted), run nothing
  for job in "${JOBS[@]}"; do
    IFS=: read -r name gpu extra <<< "$job"; mapfile -t ARGS < <(train_args "$name" "$gpu" "$extra")
    printf 'unipinrec train'; printf ' %q' "${ARGS[@]}"; echo
  done
  exit 0
fi
mkdir -p "$R"
"$PY" -c "import torch, yaml, safetensors; print('torch', torch.__version__, torch.cuda.device_count(), 'x', torch.cuda.get_device_name(0))" || exit 1
START=$(date +%s)
if [ "${BENCH:-0}" = 1 ]; then
  "$PY" bench/train_bench.py --config configs/ml1m.yaml --examples "$ML" --device cuda \
      --kinds unified interleaved retrieval_only --steps 40 --json "$R/bench_gpu.json" 2>&1 | tee "$R/bench_gpu.log"
fi
LEFT=$(( GUARD - ($(date +%s) - START) ))

for job in "${JOBS[@]}"; do
  IFS=: read -r name gpu extra <<< "$job"
  [ -f "$R/$name/meta.json" ] && continue
  mapfile -t ARGS < <(train_args "$name" "$gpu" "$extra")
  ( timeout "$LEFT" "${CLI[@]}" train "${ARGS[@]}" >> "$R/$name.log" 2>&1
    echo "$name: exit $? after $(( $(date +%s) - START )) s" ) &
done
wait

for job in "${JOBS[@]}"; do
  IFS=: read -r name gpu extra <<< "$job"
  if [ -f "$R/$name/meta.json" ] && [ ! -f "$R/$name/metrics.json" ]; then
    "${CLI[@]}" evaluate --model "$R/$name" --examples "$(examples_of "$name")" --out "$R/$name/metrics.json" \
        --device "cuda:$gpu" --no-progress 2>&1 | tail -2 &
  fi
done
wait
echo "total $(( $(date +%s) - START )) s"
if [ -n "${COLLECT:-}" ]; then
  mkdir -p "$COLLECT"
  "$PY" - "$R" "$COLLECT/results.json" "${JOBS[@]}" <<'PYEOF'
import json, sys
from pathlib import Path
r, out, jobs = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
res = {}
for job in jobs:
    name = job.split(":")[0]
    d = {p.stem: json.loads(p.read_text()) for p in (r / name / "metrics.json", r / name / "train_summary.json") if p.exists()}
    curve = r / name / "eval_log.csv"
    d["eval_log"] = curve.read_text() if curve.exists() else None
    res[name] = d
out.write_text(json.dumps(res, indent=1))
PYEOF
  tar czf "$COLLECT/logs.tgz" $(cd "$R" && ls -d */train_log.csv */eval_log.csv */train_summary.json *.log 2>/dev/null | sed "s|^|$R/|")
fi
