#!/usr/bin/env bash
# The main job on the embedded default: validate the example CPU FineTuneJob and print the exact
# objects the operator creates for it (ConfigMap with the trainer job config + PyTorchJob).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
example=examples/finetunejob-cpu-tiny.yaml
kubetune validate -f "$example"
kubetune render -f "$example"
