#!/usr/bin/env bash
# Refresh requirements.lock, the exact versions that the README's commands and .ci/run install
# (pip-tools' pip-compile over pyproject.toml's `dev` extra, which includes every other extra).
# Run from the repository root, then run the test suite before committing the new lock.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pip-compile ] || .venv/bin/pip install -q pip-tools
CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh" .venv/bin/pip-compile --quiet --upgrade \
    --extra dev --strip-extras --no-emit-index-url --no-emit-find-links \
    --output-file requirements.lock pyproject.toml
