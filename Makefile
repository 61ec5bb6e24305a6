# The two commands of the README: `make run` (the main job on the embedded default) and `make test`.
.PHONY: setup run serve sweep test lint generate hooks

setup:
	@bash scripts/setup.sh

run: setup
	@bash scripts/run-default.sh

# Serve the adapter `make run` trained (CPU engine + agent), send 40 requests, print the answers (~15 s)
serve: setup
	@bash scripts/serve-default.sh

# The main job with the baseline gate and a rank sweep in front (one process halving four ranks
# within 30% of the run's steps)
sweep: setup
	@bash scripts/run-default.sh --set 'baseline={target: {metric: accuracy, value: 0.95}}' \
	  --set 'rankSweep={ranks: [1, 2, 4, 8], metric: eval_loss}'

test: setup
	@bash scripts/test.sh

lint: setup
	@.venv/bin/ruff check operator trainer_image testing tests examples bench
	@.venv/bin/lint-imports
	@.venv/bin/python scripts/check-commits.py

generate: setup
	@.venv/bin/kubetune generate

# The commit-message rule as a commit-msg hook of this clone (the same check `make lint` runs)
hooks:
	@mkdir -p "$$(git rev-parse --git-path hooks)"
	@ln -sf "$(CURDIR)/scripts/commit-msg" "$$(git rev-parse --git-path hooks)/commit-msg"
	@echo "installed the commit-msg hook: $$(git rev-parse --git-path hooks)/commit-msg"
