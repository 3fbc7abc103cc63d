#!/usr/bin/env bash
# The GPU runs behind docs/results.md, in one command on one GPU (examples built beforehand, see
# configs/*.yaml first lines):
#   bash bench/gpu_results.sh runs/gpu runs/ml1m_ex runs/syn_ex [guard_seconds]
# 1) throughput / time / memory per kind, each kind alone on the GPU (bench/train_bench.py);
# 2) the trainings in parallel on the same GPU (ML-1M unified 2- and 8-block, retrieval-only,
#    ranking-only; synthetic unified), each under a time guard: a run cut by the guard resumes
#    from its checkpoint when this script runs again;
# 3) evaluation of every finished model.
set -u
R=${1:-runs/gpu}; ML=${2:-runs/ml1m_ex}; SYN=${3:-runs/syn_ex}; GUARD=${4:-480}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}src
PY=${PYTHON:-python3}
CLI=("$PY" -c "from unipinrec.cli import main; main()")
mkdir -p "$R"
"$PY" -c "import torch, yaml, safetensors; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 1
START=$(date +%s)

if [ ! -f "$R/bench_gpu.json" ]; then
  "$PY" bench/train_bench.py --config configs/ml1m.yaml --examples "$ML" --device cuda \
      --kinds unified interleaved retrieval_only --steps 40 --json "$R/bench_gpu.json" 2>&1 | tee "$R/bench_gpu.log"
fi
LEFT=$(( GUARD - ($(date +%s) - START) ))

train() {  # name, config, examples, extra args...
  local name=$1 cfg=$2 ex=$3; shift 3
  if [ -f "$R/$name/meta.json" ]; then return 0; fi
  timeout "$LEFT" "${CLI[@]}" train --config "$cfg" --examples "$ex" --out "$R/$name" --device cuda \
      --no-progress "$@" >> "$R/$name.log" 2>&1
  echo "$name: exit $? after $(( $(date +%s) - START )) s"
}
train ml1m-large configs/ml1m-large.yaml "$ML" &
train ml1m configs/ml1m.yaml "$ML" &
train ml1m-retrieval_only configs/ml1m.yaml "$ML" --kind retrieval_only &
train ml1m-ranking_only configs/ml1m.yaml "$ML" --kind ranking_only &
train synthetic configs/synthetic.yaml "$SYN" &
wait

for name in ml1m ml1m-large ml1m-retrieval_only ml1m-ranking_only synthetic; do
  ex=$ML; [ "$name" = synthetic ] && ex=$SYN
  if [ -f "$R/$name/meta.json" ] && [ ! -f "$R/$name/metrics.json" ]; then
    "${CLI[@]}" evaluate --model "$R/$name" --examples "$ex" --out "$R/$name/metrics.json" --device cuda --no-progress
  fi
done
echo "total $(( $(date +%s) - START )) s"
