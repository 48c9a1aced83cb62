#!/usr/bin/env bash
# Install everything (scripts/setup.sh), then run the quick Split MNIST benchmark: every Fisher
# estimator at its paper-scale λ, plus no regularisation. MNIST is read from $EWC_REG_DATA (default
# ./data) and downloaded there when missing. Extra arguments go to the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m benchmarks.split_mnist --quick "$@"
