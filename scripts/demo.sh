#!/usr/bin/env bash
# `make demo`: the whole UniPinRec pipeline locally on synthetic data (kfp's local runner), then
# TorchServe with the promoted model, one request for a user (history from the Feast online
# store) and its top 10 with per-stage timings. Run it again: it retrains with a new seed
# (the data steps come from kfp's cache), the gate promotes or keeps, and a promoted model is
# hot-swapped into the server that is already running.
#
#   DEMO_DIR=runs/demo   where everything goes      DEMO_PORT=8080   TorchServe inference port
#   DEMO_USER=42         the user to recommend for  KEEP_SERVING=1   leave TorchServe running
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${VENV:-.venv}/bin"
DEMO_DIR="${DEMO_DIR:-runs/demo}"
DEPLOY="$DEMO_DIR/deploy"
USER_ID="${DEMO_USER:-42}"
START=$SECONDS

[ -x "$BIN/unipinrec" ] || { echo "error: $BIN/unipinrec not found; run 'make setup' (or 'make demo') first" >&2; exit 1; }
mkdir -p "$DEMO_DIR"
RUN=$(( $(cat "$DEMO_DIR/run_count" 2>/dev/null || echo 0) + 1 ))
echo "$RUN" > "$DEMO_DIR/run_count"

free_port() {  # the wanted port if free, else any free one (TorchServe uses port, +1, +2)
  "$BIN/python" - "$1" <<'PY'
import socket, sys
want = int(sys.argv[1])
def free(p):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", p)); return True
        except OSError:
            return False
if all(free(want + i) for i in range(3)):
    print(want)
else:
    for p in range(18080, 19000, 3):
        if all(free(p + i) for i in range(3)):
            print(p); break
PY
}

serving() { [ -f "$DEPLOY/server/state.json" ] && "$BIN/python" -c "
import sys; from unipinrec.release import running_server
sys.exit(0 if running_server('$DEPLOY/server') else 1)" 2>/dev/null; }

started_here=0
cleanup() {
  if [ "$started_here" = 1 ] && [ "${KEEP_SERVING:-0}" != 1 ]; then
    "$BIN/unipinrec" pipeline serve --stop --deploy-dir "$DEPLOY" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

echo "==> demo run $RUN (everything under $DEMO_DIR/)"
if [ -f "$DEPLOY/current.json" ] && ! serving; then
  PORT=$(free_port "${DEMO_PORT:-8080}")
  echo "==> serving the model deployed by the last run, so this run's deploy step can hot-swap it"
  "$BIN/unipinrec" pipeline serve --deploy-dir "$DEPLOY" --port "$PORT" | sed 's/^/    /'
  started_here=1
fi

echo "==> pipeline: ingest -> validate -> features -> examples -> train -> evaluate -> gate -> index -> package -> deploy"
T0=$SECONDS
"$BIN/unipinrec" pipeline run --local --config pipelines/demo.yaml --seed "$RUN" \
  --deploy-dir "$DEPLOY" --pipeline-root "$DEMO_DIR/pipeline"
PIPELINE_S=$(( SECONDS - T0 ))

if ! serving; then
  PORT=$(free_port "${DEMO_PORT:-8080}")
  echo "==> starting TorchServe with the promoted model"
  "$BIN/unipinrec" pipeline serve --deploy-dir "$DEPLOY" --port "$PORT" | sed 's/^/    /'
  started_here=1
fi

echo "==> request: {\"user_id\": $USER_ID, \"k\": 10} (no history in the request: the server reads it from Feast)"
"$BIN/unipinrec" pipeline request --deploy-dir "$DEPLOY" --user-id "$USER_ID" --k 10

echo "==> done in $(( SECONDS - START )) s (pipeline $PIPELINE_S s)"
echo "    reports: the HTML files listed above (evaluate: metrics and plots; validate-data: the data contracts)"
echo "    deployment: $DEPLOY/current.json, history of gate decisions: $DEPLOY/history.jsonl"
if [ "${KEEP_SERVING:-0}" = 1 ]; then
  echo "    TorchServe keeps running; stop it with: $BIN/unipinrec pipeline serve --stop --deploy-dir $DEPLOY"
else
  echo "    TorchServe is stopped now (KEEP_SERVING=1 leaves it running); run 'make demo' again to retrain"
fi
