#!/usr/bin/env bash
# Set everything up, then let the daemon train the bundled example on the embedded SmolLM2-135M-Instruct
# (on the CPU when there is no GPU) and show the model's answers before and after.
# Exits non-zero unless the trained model states the made-up fact and still knows the control answer.
# DEMO_ROOT=DIR: the daemon's data root (default: demo/, recreated on every run).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${DEMO_ROOT:-demo}
PY=.venv/bin/python
# Offline: everything was fetched by setup. TQDM_DISABLE: no weight-loading progress bars between answers.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1

echo "== 1/4 Setup: .venv, torch, the embedded SmolLM2-135M-Instruct (minutes the first time, then seconds)"
bash scripts/setup.sh

td() { "$PY" training_daemon.py "$@" --root "$ROOT" --config config/demo.yaml; }
question() { "$PY" -c "import json,sys; print(json.load(open('examples/questions.json'))[sys.argv[1]][sys.argv[2]])" "$@"; }
PROBE=$(question probe question) PROBE_WANT=$(question probe expected)
CONTROL=$(question control question) CONTROL_WANT=$(question control expected)
rm -rf "$ROOT" && mkdir -p "$ROOT"

echo
echo "== 2/4 The base model, before training"
echo "Q: $PROBE"; echo "A: $(td ask "$PROBE")"
echo "Q: $CONTROL"; echo "A: $(td ask "$CONTROL")"

echo
echo "== 3/4 Training: examples/made_up_fact.jsonl goes into $ROOT/inbox/, the daemon trains it, then exits (run --once)"
td submit examples/made_up_fact.jsonl
td run --once

VERSION=$ROOT/checkpoints/default/$(readlink "$ROOT/checkpoints/default/latest")
echo
echo "== 4/4 The same questions, with the adapter the daemon published ($VERSION)"
PROBE_ANSWER=$(td ask --adapter default "$PROBE")
CONTROL_ANSWER=$(td ask --adapter default "$CONTROL")
echo "Q: $PROBE"; echo "A: $PROBE_ANSWER"
echo "Q: $CONTROL"; echo "A: $CONTROL_ANSWER"
echo
if [[ "$PROBE_ANSWER" != *"$PROBE_WANT"* || "$CONTROL_ANSWER" != *"$CONTROL_WANT"* ]]; then
    echo "FAILED: expected the answers to say $PROBE_WANT and $CONTROL_WANT. The job's log: $ROOT/status.log," \
         "the trainer's: $ROOT/queue/done/*/trainer.log" >&2
    exit 1
fi
echo "The model learned the made-up fact ($PROBE_WANT) and still knows that the capital of France is $CONTROL_WANT."
echo "Adapter: $VERSION (metadata.json, loss.png)   Daemon log: $ROOT/status.log"
echo
echo "Try next:"
echo "  .venv/bin/training-daemon ask --root $ROOT --config config/demo.yaml --adapter default \"Where is Quintara?\""
echo "  .venv/bin/training-daemon validate my_data.jsonl     # check your own chats (same format as the example)"
echo "  .venv/bin/training-daemon run                       # the daemon for real: drop files into inbox/,"
echo "                                                      # watch http://127.0.0.1:8765/ (config: config/daemon.yaml)"
echo "  docs/operations.md: run it as a systemd service"
