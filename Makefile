# The two commands of the README: `make run` (the main job on the embedded default) and `make test`.
.PHONY: setup run test lint generate

setup:
	@bash scripts/setup.sh

run: setup
	@bash scripts/run-default.sh

test: setup
	@bash scripts/test.sh

lint: setup
	@.venv/bin/ruff check operator trainer_image tests examples bench
	@.venv/bin/lint-imports

generate: setup
	@.venv/bin/kubetune generate
