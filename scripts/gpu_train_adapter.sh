#!/usr/bin/env bash
# ImageRAGTurbo fine-tuning runs on a GPU machine with no network, in one go: the shipped
# weights' run (the default configuration), the no-retrieval control, and the ablations, all
# with the same configuration and steps, started in parallel on one GPU (each run is small:
# the tiny family's UNet is 3.7 M parameters, so one run leaves the GPU mostly idle).
#
#   bash scripts/gpu_train_adapter.sh OUT [VARIANT ...]
#
# Needs: gpu_wheels/ (scripts/gpu_wheels.sh) carried with the checkout; PyTorch with CUDA
# preinstalled. Writes OUT/<variant>.log and OUT/<variant>.tgz (export/ with h_adapter/,
# unet_lora/, adapter_training.json; each stage's done.json; the loss history); caches stay
# in /tmp. IRT_TRAIN_FLAGS adds flags to every run; IRT_RUN_TIMEOUT bounds each run (s).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_train_adapter.sh OUT [VARIANT ...]}
shift
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(full control lam-one no-lora no-perceptual k1)
mkdir -p "$out"
# shellcheck source=/dev/null
source scripts/gpu_env.sh || exit 1
python3 - <<'PY' || exit 1
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
from imageragturbo.serving.assets import ensure_index
print("index:", ensure_index("tiny-shapes"))
PY
flags() {
    case $1 in
        full) echo "" ;;
        control) echo "--control" ;;
        lam-one) echo "--lam-one" ;;
        no-lora) echo "--no-lora" ;;
        no-perceptual) echo "--no-perceptual" ;;
        k1) echo "--k-max 1" ;;
        long) echo "--steps 6000" ;;
        *) echo "unknown variant $1" >&2; return 1 ;;
    esac
}
# Each run packs what it made into OUT/<variant>.tgz as soon as it ends (the export folder,
# each stage's done.json, the loss history), so a run cut short loses only itself.
pack() {
    local v=$1 d=/tmp/adapter-runs/$1
    (cd "$d" 2>/dev/null && tar czf "$out/$v.tgz" --ignore-failed-read export \
        ./*/done.json train/history.json 2>/dev/null)
}
pids=()
for v in "${variants[@]}"; do
    f=$(flags "$v") || exit 2
    # shellcheck disable=SC2086
    (timeout "${IRT_RUN_TIMEOUT:-3000}" python3 -m imageragturbo.cli train adapter \
        --run-dir "/tmp/adapter-runs/$v" --threads 2 --quiet $f ${IRT_TRAIN_FLAGS:-} \
        > "$out/$v.log" 2>&1; echo "exit $?" >> "$out/$v.log"; pack "$v") &
    pids+=($!)
done
t0=$(date +%s)
for p in "${pids[@]}"; do wait "$p"; done
echo "all runs ended in $(( $(date +%s) - t0 )) s"
for v in "${variants[@]}"; do
    echo "== $v: $(tail -n 1 "$out/$v.log")"
done
