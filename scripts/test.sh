#!/usr/bin/env bash
# The whole test suite: lint, layer contracts, generated-file check, unit and integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.tools/bin:$PWD/.venv/bin:$PATH"
echo "== ruff"
ruff check operator trainer_image testing tests examples bench
echo "== import-linter (operator layers)"
lint-imports --no-cache
echo "== commit messages"
python scripts/check-commits.py
echo "== generated files"
kubetune generate --check
echo "== pytest"
pytest -q -p no:cacheprovider "$@"
