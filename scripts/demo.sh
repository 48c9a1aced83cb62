#!/usr/bin/env bash
# Install everything (scripts/setup.sh), then run the quick Split MNIST benchmark: every Fisher
# estimator at its paper-scale λ, plus no regularisation. MNIST is read from $EWC_REG_DATA (default
# ./data) and downloaded there when missing. Extra arguments go to the benchmark.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
(cd "$repo" && bash scripts/setup.sh)
# (run from the caller's directory: relative paths, in $EWC_REG_DATA or the arguments, are theirs)
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$repo/.venv/bin/python" -m benchmarks.split_mnist --quick "$@"
