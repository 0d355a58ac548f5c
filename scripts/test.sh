#!/usr/bin/env bash
# Sets up .venv and buf, then runs every check: generated code, buf lint, ruff,
# mypy, and the test suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh test
# buf lints the proto; configurable-http-proxy is the bench's baseline proxy.
if [ ! -x node_modules/.bin/buf ] || [ ! -x node_modules/.bin/configurable-http-proxy ] \
  || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --silent --no-audit --no-fund
fi
py=.venv/bin/python

echo "== buf lint"
$py tools/protogen.py vendor
node_modules/.bin/buf lint

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .

echo "== mypy"
.venv/bin/mypy

echo "== pytest"
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
