#!/usr/bin/env bash
# The GPU check of issue 14, in one command on a lent GPU machine (no network; Python 3.12,
# PyTorch with CUDA 13, onnx, a CPU-only onnxruntime, transformers, numpy 2 preinstalled), from
# the repository root, carrying gpu_wheels/ (scripts/gpu_wheels.sh) and gpu_ort/:
#
#     bash scripts/gpu_check.sh            # writes to $OUT (default /tmp/irt-out)
#
# gpu_ort/ holds onnxruntime-gpu in pieces, ort.tar.xz.part-00, -01, ...: a tar.xz of an
# unpacked onnxruntime_gpu cp312 wheel (the onnxruntime/ package and its dist-info; the
# TensorRT provider library may be left out). Steps, each failing loudly and early:
#   1. source scripts/gpu_env.sh (the carried wheels, the checkout importable as imageragturbo);
#   2. unpack onnxruntime-gpu to /tmp/irt-ort and put it FIRST on PYTHONPATH, shadowing the
#      preinstalled CPU onnxruntime; LD_LIBRARY_PATH gets every site-packages/nvidia/**/lib
#      (the CUDA, cuBLAS, cuDNN, cuFFT, cuRAND that torch's nvidia-* packages installed);
#   3. check, after `import torch` (which loads those libraries too), that a session on the
#      CUDA provider really runs on it (get_available_providers lists CUDA even when its
#      libraries are missing; the session then falls back to the CPU with a warning);
#   4. `imageragturbo bench sdturbo-gpu --batch 1 4`: export the SD-Turbo-sized model once
#      (to /tmp/irt-sdturbo-cuda, reused by a rerun on the same machine), then PyTorch eager fp16,
#      ORT CUDA plain, with IO binding, and the fixed-shape profile with CUDA graphs;
#      sdturbo_gpu.json / .png / .txt to $OUT, rewritten after each configuration, so a
#      timeout keeps what was measured;
#   5. the fp16-vs-fp32 parity tests (`pytest tests/test_export.py -k fp16`, CPU);
#   6. a one-screen summary: the table, Memcpy nodes per graph, what ORT warned about CUDA
#      graphs and Memcpy, the tests' result, the time taken.
# IRT_BATCHES (default "1 4") the batch sizes. Budget: 8 minutes on an H200 (IRT_BENCH_TIMEOUT, default 360 s, and IRT_TEST_TIMEOUT,
# default 100 s, bound steps 4 and 5). IRT_REPEATS (default 10) timed runs per figure.
# Files in $OUT: gpu_check.log, sdturbo_gpu.{json,png,txt}, pytest_fp16.log, ort_warnings.txt.
# IRT_CHECK_DEVICE=cpu runs steps 4-6 on the CPU provider with the SD 2.1-layout toy, after step
# 3 only reports: the script's own test on a machine without a GPU (not a measurement).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-/tmp/irt-out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
exec > >(tee "$LOG") 2>&1
START=$SECONDS
die() { echo "gpu_check: FAILED: $1" >&2; exit "${2:-1}"; }
step() { echo; echo "== [$((SECONDS - START)) s] $*"; }

step "1. environment (scripts/gpu_env.sh)"
# shellcheck source=scripts/gpu_env.sh
source scripts/gpu_env.sh || die "gpu_env.sh failed (carry gpu_wheels/)" 2
PY=${IRT_PYTHON:-$(command -v python3)}

step "2. onnxruntime-gpu from gpu_ort/"
ORT_DIR=${IRT_ORT:-/tmp/irt-ort}
ls gpu_ort/ort.tar.xz.part-* >/dev/null 2>&1 || die "no gpu_ort/ort.tar.xz.part-* (carry gpu_ort)" 2
if [ ! -d "$ORT_DIR/onnxruntime" ]; then
    rm -rf "$ORT_DIR" && mkdir -p "$ORT_DIR" || die "cannot make $ORT_DIR"
    cat gpu_ort/ort.tar.xz.part-* | xz -d | tar -x -C "$ORT_DIR" || die "unpacking failed" 2
fi
# onnxruntime.transformers (the fp16 converter the export uses) may travel apart, small
for t in gpu_ort/*.tar.xz; do
    [ -f "$t" ] && { tar -xJf "$t" -C "$ORT_DIR" || die "unpacking $t failed" 2; }
done
[ -f "$ORT_DIR/onnxruntime/transformers/float16.py" ] \
    || die "$ORT_DIR has no onnxruntime/transformers (the export's fp16 converter)" 2
[ -f "$ORT_DIR/onnxruntime/__init__.py" ] || die "$ORT_DIR/onnxruntime is not a package" 2
export PYTHONPATH="$ORT_DIR:$PYTHONPATH"
NV_LIBS=$("$PY" - <<'EOF'
import glob, os, site
dirs = []
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    for d in sorted(glob.glob(os.path.join(sp, "nvidia", "**", "lib"), recursive=True)):
        if glob.glob(os.path.join(d, "*.so*")) and d not in dirs:
            dirs.append(d)
print(":".join(dirs))
EOF
)
export LD_LIBRARY_PATH="${NV_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "nvidia library folders: $(echo "$NV_LIBS" | tr ':' '\n' | grep -c .)"

DEVICE=${IRT_CHECK_DEVICE:-cuda}
step "3. CUDA execution provider check"
"$PY" - <<'EOF' || [ "$DEVICE" = cpu ] || die "ONNX Runtime cannot run on CUDA here (see above)" 3
import tempfile, sys
import torch  # loads CUDA, cuBLAS and cuDNN from its nvidia-* packages first
import onnx
from onnx import TensorProto, helper
import onnxruntime as ort

print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NONE'}")
print(f"onnxruntime {ort.__version__} from {ort.__file__}")
print("providers:", ort.get_available_providers())
if not torch.cuda.is_available():
    sys.exit("torch sees no GPU")
if "CUDAExecutionProvider" not in ort.get_available_providers():
    sys.exit("this onnxruntime has no CUDAExecutionProvider (the CPU build shadows it?)")
x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 3])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 3])
g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
with tempfile.NamedTemporaryFile(suffix=".onnx") as f:
    onnx.save(m, f.name)
    s = ort.InferenceSession(f.name, providers=["CUDAExecutionProvider"])
    print("session providers:", s.get_providers())
    if s.get_providers()[0] != "CUDAExecutionProvider":
        sys.exit("the CUDA provider did not load (missing CUDA/cuDNN libraries?)")
EOF

step "4. bench sdturbo-gpu (export once, then every configuration)"
timeout --signal=INT --kill-after=20 "${IRT_BENCH_TIMEOUT:-360}" \
    "$PY" -m imageragturbo.commands bench sdturbo-gpu --device "$DEVICE" --batch ${IRT_BATCHES:-1 4} --k 1 \
    --repeats "${IRT_REPEATS:-10}" --warmup 3 --report "$OUT" \
    --out "${IRT_EXPORT:-/tmp/irt-sdturbo-$DEVICE}" --reuse-export
BENCH_RC=$?
[ "$BENCH_RC" -eq 0 ] || echo "gpu_check: bench exited $BENCH_RC (partial report kept)" >&2

step "5. fp16-vs-fp32 parity tests (CPU)"
SELECT=fp16
# Rendering the Triton gpu profile reads model configs with tritonclient, not carried here.
if ! "$PY" -c "import tritonclient.grpc" >/dev/null 2>&1; then
    SELECT="fp16 and not gpu_profile"
    echo "no tritonclient here: leaving out the gpu-profile rendering test"
fi
timeout --kill-after=10 "${IRT_TEST_TIMEOUT:-100}" \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_export.py -k "$SELECT" \
    > "$OUT/pytest_fp16.log" 2>&1
TEST_RC=$?
tail -n 3 "$OUT/pytest_fp16.log"

step "6. summary"
grep -E "Memcpy nodes are added|CUDA Graph|cuda graph|CUDA graph" "$LOG" 2>/dev/null \
    | grep -v "^gpu_check" | sed -E 's/\x1b\[[0-9;]*m//g; s/^.*\] //' | sort | uniq -c \
    > "$OUT/ort_warnings.txt"
echo "---------------------------------------------------------------------------------"
if [ -f "$OUT/sdturbo_gpu.txt" ]; then cat "$OUT/sdturbo_gpu.txt"; else echo "no bench report"; fi
echo "ORT warnings (count, line; full log in gpu_check.log):"
cut -c1-220 "$OUT/ort_warnings.txt" | head -n 8
echo "bench rc $BENCH_RC; fp16 tests rc $TEST_RC: $(tail -n 1 "$OUT/pytest_fp16.log")"
echo "total $((SECONDS - START)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
[ "$BENCH_RC" -eq 0 ] && [ "$TEST_RC" -eq 0 ]
