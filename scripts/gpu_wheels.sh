#!/usr/bin/env bash
# Fill OUT_DIR with the wheels that a lent GPU machine (no network; Python 3.12, torch, onnx,
# onnxruntime, transformers 5.x, peft, accelerate, safetensors, numpy 2 preinstalled) lacks
# to run this project: diffusers, open_clip_torch, ftfy, wcwidth, importlib_metadata (+ zipp,
# lazy-importer), hnswlib, and the test runner (pytest, pluggy, iniconfig, pygments,
# pytest-timeout; IRT_NO_TEST_WHEELS=1 leaves these out). Run it HERE, with PyPI reachable,
# from anywhere:
#
#     bash scripts/gpu_wheels.sh gpu_wheels [EXTRA_SPEC ...]
#
# EXTRA_SPECs (e.g. timm==1.0.31) are downloaded too, without their dependencies.
# Versions come from requirements.lock where it pins them. The pure-Python wheels are fetched
# with `pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64`
# (py3-none-any wheels match any platform). hnswlib 0.8.0 has no binary wheel on PyPI, so it is
# built here with a Python 3.12 (PY312, default /root/.pyenv/versions/3.12.1/bin/python3.12)
# in a scratch venv, against numpy>=2 so it imports under the target's numpy 2, for a portable
# CPU (x86-64-v3 = AVX2/FMA instead of -march=native; HNSWLIB_MARCH overrides), loadable with
# glibc >= 2.32 and a libstdc++ from gcc >= 11 (Ubuntu 22.04+, Debian 12, RHEL 9); the unused
# libgomp link is dropped.
# Needs: network to PyPI, a C++ compiler, that Python 3.12. Prints the wheels and total size.
# Then `source scripts/gpu_env.sh` on the GPU machine (see scripts/README.md).
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 OUT_DIR [EXTRA_SPEC ...]" >&2
    exit 2
fi
OUT=$1
shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY312=${PY312:-/root/.pyenv/versions/3.12.1/bin/python3.12}
MARCH=${HNSWLIB_MARCH:-x86-64-v3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# The version that requirements.lock pins for a (normalised, lowercase-hyphen) name, or "".
lock_version() {
    sed -n "s/^$1==\([^ ;]*\).*/\1/p" "$ROOT/requirements.lock" | head -n 1
}
spec() {  # name [fallback-version] -> name==version, or bare name when nothing pins it
    local v
    v=$(lock_version "$1")
    v=${v:-${2:-}}
    if [ -n "$v" ]; then echo "$1==$v"; else echo "$1"; fi
}

[ -x "$PY312" ] || { echo "no Python 3.12 at $PY312 (set PY312)" >&2; exit 1; }

SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
"$PY312" -m venv "$SCRATCH/venv"
PIP="$SCRATCH/venv/bin/pip"
"$PIP" install -q --disable-pip-version-check --upgrade pip

# --- wheels PyPI has (pure Python, or abi3 manylinux) ---------------------------------------
SPECS=(
    "$(spec diffusers 0.42.1)"
    "$(spec open-clip-torch 3.3.0)"
    "$(spec ftfy)"
    "$(spec wcwidth)"
    "$(spec importlib-metadata)"   # diffusers' requirement (unused on 3.12, but pinned)...
    "$(spec zipp)"                 # ...and its dependencies, so it imports if anything asks
    "$(spec lazy-importer)"
    "$@"
)
# The test runner, for running the suite there (IRT_NO_TEST_WHEELS=1 leaves it out).
if [ -z "${IRT_NO_TEST_WHEELS:-}" ]; then
    SPECS+=("$(spec pytest)" "$(spec pluggy)" "$(spec iniconfig)" "$(spec pygments)"
            "$(spec pytest-timeout)")
fi
echo "downloading: ${SPECS[*]}"
"$PIP" download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux2014_x86_64 -d "$OUT" "${SPECS[@]}"

# --- hnswlib, built here ------------------------------------------------------------------
HNSW=$(spec hnswlib 0.8.0)
if ls "$OUT"/hnswlib-*-cp312-*.whl >/dev/null 2>&1; then
    echo "hnswlib: keeping $(basename "$(ls "$OUT"/hnswlib-*-cp312-*.whl | head -n 1)")"
else
    echo "building $HNSW (numpy>=2, pybind11, -march=$MARCH)"
    "$PIP" install -q --disable-pip-version-check "numpy>=2" "pybind11>=2.12" setuptools wheel
    # Bind the glibc symbols that glibc 2.34 re-versioned to their old versions, so the module
    # loads on an older glibc than this machine's (what remains: 2.32, __libc_single_threaded,
    # from gcc 12's libstdc++ headers; libstdc++ from gcc >= 11 is needed, as on Ubuntu 22.04+).
    cat > "$SCRATCH/glibc_compat.h" <<'H'
__asm__(".symver pthread_create,pthread_create@GLIBC_2.2.5");
__asm__(".symver pthread_join,pthread_join@GLIBC_2.2.5");
__asm__(".symver pthread_detach,pthread_detach@GLIBC_2.2.5");
__asm__(".symver pthread_once,pthread_once@GLIBC_2.2.5");
__asm__(".symver pthread_key_create,pthread_key_create@GLIBC_2.2.5");
__asm__(".symver log,log@GLIBC_2.2.5");
H
    flags="-march=$MARCH -include $SCRATCH/glibc_compat.h"
    # No build isolation: build against the numpy 2 just installed (its ABI covers numpy 2).
    # New setuptools compiles C++ with CXXFLAGS, older with CFLAGS: set both.
    HNSWLIB_NO_NATIVE=1 CFLAGS="$flags" CXXFLAGS="$flags" LDFLAGS="-Wl,--as-needed" \
        "$PIP" wheel -q --disable-pip-version-check --no-cache-dir --no-deps --no-build-isolation \
        --no-binary hnswlib -w "$SCRATCH/hnsw" "$HNSW"
    whl=$(ls "$SCRATCH"/hnsw/hnswlib-*-cp312-*.whl)
    # Report what the extension still links dynamically (expect only libc/libm & co).
    (cd "$SCRATCH/hnsw" && "$SCRATCH/venv/bin/python" -m zipfile -e "$whl" x >/dev/null \
        && for so in x/*.so; do
               echo "hnswlib needs: $(objdump -p "$so" 2>/dev/null | awk '/NEEDED/{printf "%s ", $2}')"
               for v in GLIBC GLIBCXX CXXABI; do
                   echo "hnswlib max $v: $(objdump -T "$so" 2>/dev/null \
                       | grep -o "${v}_[0-9.]*" | sort -uV | tail -n 1)"
               done
           done) || true
    cp "$whl" "$OUT/"
    # A smoke test with the numpy 2 it was built against.
    "$PIP" install -q --disable-pip-version-check --no-deps --force-reinstall "$whl"
    "$SCRATCH/venv/bin/python" -c 'import hnswlib, numpy as np
i = hnswlib.Index(space="ip", dim=8); i.init_index(10)
i.add_items(np.random.rand(10, 8).astype("float32"))
print("hnswlib OK with numpy", np.__version__, i.knn_query(np.random.rand(1, 8).astype("float32"), k=3)[0])'
fi

echo
echo "wheels in $OUT:"
ls -l "$OUT"/*.whl | awk '{printf "  %8d  %s\n", $5, $NF}'
echo "total: $(du -ch "$OUT"/*.whl | tail -n 1 | cut -f1)"
