#!/usr/bin/env bash
# Create the throw-away venv that bench/peers.py runs in: the same torch as .venv (so our built
# grass_kernels/_C*.so loads; our packages come in through PYTHONPATH), plus dattri and bergson.
# The peers are installed with --no-deps and their light dependencies by hand: their declared
# torchvision/torchaudio/bitsandbytes would pull a second multi-GB CUDA torch.
#
#   bash bench/peers_setup.sh            # creates .venv-peers (gitignored by .venv-*/)
#   PYTHONPATH=$PWD:$PWD/python .venv-peers/bin/python bench/peers.py
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PEERS_VENV:-.venv-peers}
PY="$VENV/bin/python"

[ -x "$PY" ] || python3.11 -m venv "$VENV"
"$PY" -m pip install -q torch==2.14.1
# Light dependencies, by hand. transformers is pinned to the one in .venv so both sides build
# the same model; bergson requires transformers >= 5.
"$PY" -m pip install -q numpy scipy pyyaml tqdm "transformers==$(.venv/bin/python -c 'import transformers; print(transformers.__version__)')" \
    accelerate datasets jaxtyping ml_dtypes natsort peft petname pyarrow simple-parsing \
    "huggingface-hub>=1.13.0" torchopt ninja
"$PY" -m pip install -q --no-deps dattri==0.3.0 bergson==2.5.1
"$PY" - <<'EOF'
import torch, dattri, bergson
print("peers venv ready: torch", torch.__version__, "| dattri", getattr(dattri, "__version__", "0.3.0"), "| bergson ok")
EOF
