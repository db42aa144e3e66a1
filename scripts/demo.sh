#!/usr/bin/env bash
# The whole pipeline on the embedded default (scikit-learn's digits): environment, install, teacher,
# distilled student, baseline, evaluation, export to a device bundle, then the device commands through the
# ONNX Runtime runner on this host (on a Jetson, add --engine after `edgerun build`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/edgedistill run recipes/demo-digits.yaml "$@"
.venv/bin/edgedistill pack runs/demo-digits/bundle -o runs/demo-digits/demo-digits.edb
.venv/bin/edgerun validate runs/demo-digits/demo-digits.edb
.venv/bin/edgerun bench runs/demo-digits/demo-digits.edb --fps-target 30 --budget-mb 500 --iterations 200
