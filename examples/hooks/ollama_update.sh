#!/bin/sh
# Hook: turn each new version of an adapter into an Ollama model (export to GGUF, then `ollama create`).
#
# Config (daemon.yaml):
#
#   hooks:
#     - on: [published]
#       command: ["/path/to/examples/hooks/ollama_update.sh"]
#       timeout_seconds: 1800      # exporting merges the adapter into its base model: minutes for a big base
#       retries: 0
#
# The daemon sets TRAINING_DAEMON_ADAPTER, TRAINING_DAEMON_VERSION and TRAINING_DAEMON_ROOT (which
# `training-daemon export` reads). The model is named after the adapter, so `ollama run <adapter>` always gets
# the newest version; each version also stays exported under $OLLAMA_EXPORT_DIR.
#
# Environment:
#   OLLAMA_MODEL        the Ollama model name (default: the adapter's name)
#   OLLAMA_EXPORT_DIR   where each version's GGUF folder goes (default: $TRAINING_DAEMON_ROOT/exports)
#   TRAINING_DAEMON     the training-daemon command, words split by the shell (default: the one in this
#                       project's .venv, else training-daemon on PATH)
#   OLLAMA              the ollama command (default: ollama)
set -eu

adapter="${TRAINING_DAEMON_ADAPTER:?run me as a training-daemon hook}"
version="${TRAINING_DAEMON_VERSION:?run me as a training-daemon hook on published}"
name="${OLLAMA_MODEL:-$adapter}"
project="$(cd "$(dirname "$0")/../.." && pwd)"
if [ -z "${TRAINING_DAEMON:-}" ] && [ -x "$project/.venv/bin/training-daemon" ]; then
    TRAINING_DAEMON="$project/.venv/bin/training-daemon"  # a systemd unit's PATH does not have the venv
fi
out="${OLLAMA_EXPORT_DIR:-$TRAINING_DAEMON_ROOT/exports}/$adapter-v$version"

# A version announced twice (a resumed job does that) is exported once.
if [ ! -f "$out/Modelfile" ]; then
    mkdir -p "$(dirname "$out")"
    # --gguf writes the folder: the merged model as one GGUF file, and an Ollama Modelfile beside it.
    ${TRAINING_DAEMON:-training-daemon} export "$adapter@$version" --gguf "$out"
fi
cd "$out"  # the Modelfile names its GGUF file relative to its own folder
${OLLAMA:-ollama} create "$name" -f Modelfile
echo "ollama model $name is now $adapter v$version"
