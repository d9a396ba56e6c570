#!/usr/bin/env bash
# Installs kernelstack and its test tools, keeping whatever torch is already installed (a CUDA build stays).
# With no torch at all, takes torch 2.13.0 (on the team's machines: the local CPU wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test]"
