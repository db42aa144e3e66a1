#!/usr/bin/env bash
# The whole pipeline on the embedded default (scikit-learn's digits): environment, install, the planner's
# estimate, teacher, distilled student, baseline, evaluation (ONNX Runtime speed, cost), the report, export
# to a device bundle, then the device commands through the ONNX Runtime runner on this host (on a Jetson,
# add --engine after `edgerun build`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/edgedistill run recipes/demo-digits.yaml "$@"
.venv/bin/edgedistill pack runs/demo-digits/bundle -o runs/demo-digits/demo-digits.edb
.venv/bin/edgerun validate runs/demo-digits/demo-digits.edb
.venv/bin/edgerun bench runs/demo-digits/demo-digits.edb --fps-target 30 --budget-mb 500 --iterations 200
cat <<MSG

report: runs/demo-digits/report.html (one self-contained file) and runs/demo-digits/report.md
the same recipe over 3 seeds: benchmarks/results/demo.md (python benchmarks/quality.py --recipe recipes/demo-digits.yaml ...)
to a Jetson over ssh in one command (copy, verify, build, validate, bench, results back into the report):
  .venv/bin/edgedistill deploy runs/demo-digits --host USER@JETSON --precision fp16 --fps-target 30 --budget-mb 500
or by hand, on a Jetson Nano (JetPack 4.6), with runs/demo-digits/demo-digits.edb copied over:
  pip3 install ./jetson
  edgerun build demo-digits.edb --precision fp16
  edgerun validate demo-digits.edb --engine demo-digits.fp16.engine
  edgerun bench demo-digits.edb --engine demo-digits.fp16.engine --fps-target 30 --budget-mb 500 --json bench.json
then, back here: .venv/bin/edgedistill report runs/demo-digits --measured bench.json
MSG
