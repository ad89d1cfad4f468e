#!/usr/bin/env bash
# The lent GPU's Python stack on a machine without a GPU: torch 2.11, triton 3.6, transformers 5.17
# (as /work/.library/device/KINDS.md lists them), so that API drift shows up here and not in the
# first minutes of a 15-minute lease. In a venv of its own (default /tmp/dayzero-gpu-stack):
#   1. the whole test suite (Triton kernels in triton 3.6's interpreter, transformers 5.17 as reference);
#   2. every Triton kernel compiled ahead of time by triton 3.6 for sm_90 and sm_80
#      (scripts/aot_compile.py; every variant's record goes to $2, default /tmp/aot-triton3.6.json).
# torch 2.11 comes from PyPI as its CUDA build (about 3 GB with its nvidia-* wheels; it runs on CPUs).
# numpy < 2.4: triton 3.6's interpreter cannot loop over kernel arguments with numpy 2.4
# (dayzero/ops/triton/probe.py says so at start). The GPU itself compiles, so its numpy does not matter.
#   scripts/gpu_stack.sh [VENV] [AOT_JSON]
set -euo pipefail
venv=${1:-/tmp/dayzero-gpu-stack}
aot=${2:-/tmp/aot-triton3.6.json}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q torch==2.11.0 triton==3.6.0 transformers==5.17.0 "numpy<2.4"
pip install -q --no-deps -e .
pip install -q "safetensors>=0.8" "tokenizers>=0.20" "tqdm>=4.60" fastapi uvicorn "pytest>=8" "openai>=1.30" "httpx>=0.27"
python -c "import torch, triton, transformers, numpy; print('torch', torch.__version__, 'triton', triton.__version__,
      'transformers', transformers.__version__, 'numpy', numpy.__version__)"
rc=0
python -m pytest -q -p no:cacheprovider || rc=1
python scripts/aot_compile.py --json "$aot" | tail -n 40 || rc=1
exit $rc
