#!/usr/bin/env bash
# Install the project's [serve] extra, pinned by requirements.lock, into one Python.
#
# The one install command of the deployment: deploy/Dockerfile runs this script as it is (into
# the Triton container's python3), and tests/test_deploy.py runs it with --dry-run (pip then
# resolves the same requirements against the same lock and installs nothing). Arguments are
# passed on to pip; PYTHON chooses the interpreter (default: python3 on PATH).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"

# Triton's images install into the system Python, which Ubuntu marks as externally managed
# (PEP 668); NVIDIA's own build sets the same variable. Inside a venv it has no effect.
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1

exec "$python" -m pip install -c "$root/requirements.lock" "$root[serve]" "$@"
