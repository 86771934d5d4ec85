'use strict';
// npm run build: write build/triton.desc, Triton's gRPC service descriptors taken from the
// installed tritonclient Python package (it ships the compiled protos, not .proto files), by
// running scripts/triton_descriptors.py with $PYTHON; without it, the repository's own
// environment (../.venv, the README's setup) when there is one, else python3 on PATH.
const { spawnSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const venv = path.join(__dirname, '..', '..', '.venv', 'bin', 'python');
const python = process.env.PYTHON || (fs.existsSync(venv) ? venv : 'python3');
const script = path.join(__dirname, 'triton_descriptors.py');
const out = path.join(__dirname, '..', 'build');
const r = spawnSync(python, [script, out], { stdio: 'inherit' });
if (r.error) {
  console.error(`build: cannot run ${python} (${r.error.message}); set PYTHON to a Python ` +
    'interpreter that has tritonclient[grpc] installed');
  process.exit(1);
}
process.exit(r.status === null ? 1 : r.status);
