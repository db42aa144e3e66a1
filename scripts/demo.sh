#!/usr/bin/env bash
# The whole pipeline on the embedded default (scikit-learn's digits): environment, install, teacher,
# distilled student, baseline, evaluation, export to a device bundle; prints the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/edgedistill run recipes/demo-digits.yaml "$@"
