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
# The dev extra names the project's own extras, so pip-compile pins the project itself at this
# checkout's absolute path; a constraint on a local path breaks every other clone. Drop it.
python3 - <<'PY'
import re
from pathlib import Path

p = Path("requirements.lock")
p.write_text(re.sub(r"^imageragturbo @ [^\n]*\n(    # via[^\n]*\n)?", "", p.read_text(),
                    flags=re.M))
PY
