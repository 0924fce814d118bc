#!/usr/bin/env bash
# Set everything up, then let the daemon train the bundled example on the embedded SmolLM2-135M-Instruct
# (on the CPU when there is no GPU) and show the model's answer before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
ROOT=${DEMO_ROOT:-demo}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
rm -rf "$ROOT" && mkdir -p "$ROOT"
td() { "$PY" training_daemon.py "$@" --root "$ROOT" --config config/demo.yaml; }
q() { "$PY" -c "import json,sys; print(json.load(open('examples/questions.json'))[sys.argv[1]]['question'])" "$1"; }
PROBE=$(q probe); CONTROL=$(q control)

echo "== Before training (base model)"
echo "Q: $PROBE"; echo "A: $(td ask "$PROBE")"
echo "Q: $CONTROL"; echo "A: $(td ask "$CONTROL")"

echo "== Dropping examples/made_up_fact.jsonl into $ROOT/inbox/ and running the daemon until the queue is empty"
td submit examples/made_up_fact.jsonl
td run --once

echo "== After training (adapter $(readlink "$ROOT/checkpoints/default/latest"))"
echo "Q: $PROBE"; echo "A: $(td ask --adapter default "$PROBE")"
echo "Q: $CONTROL"; echo "A: $(td ask --adapter default "$CONTROL")"
echo
td jobs
echo "Metadata: $ROOT/checkpoints/default/latest/metadata.json   Log: $ROOT/status.log"
