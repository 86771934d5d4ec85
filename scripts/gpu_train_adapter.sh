#!/usr/bin/env bash
# ImageRAGTurbo fine-tuning runs on a GPU machine with no network, in one go: the shipped
# weights' run (the default configuration), the no-retrieval control, and the ablations, all
# with the same configuration and steps, started in parallel on one GPU (each run is small:
# the tiny family's UNet is 3.7 M parameters, so one run leaves the GPU mostly idle); then,
# with IRT_EVAL=1, one `bench quality --runs-only` over every run that finished.
#
#   bash scripts/gpu_train_adapter.sh OUT [VARIANT[@SEED] ...]
#
# VARIANT: full (the shipped recipe, the paper's H-adapter + decoder LoRA), control, lam-one,
# no-lora, no-perceptual, k1, long, dec (beyond the paper: + decoder neighbour attention),
# dec-scene (dec + scene-neighbour augmentation on half the targets), scene (the paper's
# H-adapter with that augmentation); @SEED sets the training
# seed (two seeds per arm give the spread between training runs).
# Needs: gpu_wheels/ (scripts/gpu_wheels.sh) carried with the checkout; PyTorch with CUDA
# preinstalled. Writes OUT/<run>.log and OUT/<run>.tgz (export/ with h_adapter/,
# unet_lora/, adapter_training.json; each stage's done.json; the loss history); caches stay
# in /tmp. IRT_TRAIN_FLAGS adds flags to every run; IRT_RUN_TIMEOUT bounds each run (s);
# IRT_EVAL=1 adds OUT/quality.{json,md} (IRT_EVAL_N prompts, default 500, IRT_EVAL_SEEDS 3,
# bounded by IRT_EVAL_TIMEOUT s).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_train_adapter.sh OUT [VARIANT[@SEED] ...]}
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
from imageragturbo.model import load_retrieval_encoder
from imageragturbo.retriever.ensure import ensure_index
print("index:", ensure_index("tiny-shapes", load_encoder=load_retrieval_encoder))
PY
flags() {
    local arm=${1%@*} seed=0
    [[ $1 == *@* ]] && seed=${1#*@}
    case $arm in
        full) echo "--seed $seed" ;;
        control) echo "--seed $seed --control" ;;
        lam-one) echo "--seed $seed --lam-one" ;;
        no-lora) echo "--seed $seed --no-lora" ;;
        no-perceptual) echo "--seed $seed --no-perceptual" ;;
        k1) echo "--seed $seed --k-max 1" ;;
        long) echo "--seed $seed --steps 6000" ;;
        dec) echo "--seed $seed --decoder-attention" ;;
        dec-scene) echo "--seed $seed --decoder-attention --scene-neighbour 0.5" ;;
        scene) echo "--seed $seed --scene-neighbour 0.5" ;;
        *) echo "unknown variant $1" >&2; return 1 ;;
    esac
}
name() { printf '%s' "${1/@/-s}"; }
# Each run packs what it made into OUT/<run>.tgz as soon as it ends (the export folder,
# each stage's done.json, the loss history), so a run cut short loses only itself.
pack() {
    local v=$1 d=/tmp/adapter-runs/$1
    (cd "$d" 2>/dev/null && tar czf "$out/$v.tgz" --ignore-failed-read export \
        ./*/done.json train/history.json 2>/dev/null)
}
pids=()
for v in "${variants[@]}"; do
    f=$(flags "$v") || exit 2
    n=$(name "$v")
    # shellcheck disable=SC2086
    (timeout "${IRT_RUN_TIMEOUT:-3000}" python3 -m imageragturbo.commands train adapter \
        --run-dir "/tmp/adapter-runs/$n" --threads 2 --quiet $f ${IRT_TRAIN_FLAGS:-} \
        > "$out/$n.log" 2>&1; echo "exit $?" >> "$out/$n.log"; pack "$n") &
    pids+=($!)
done
t0=$(date +%s)
for p in "${pids[@]}"; do wait "$p"; done
echo "all runs ended in $(( $(date +%s) - t0 )) s"
rows=()
for v in "${variants[@]}"; do
    n=$(name "$v")
    echo "== $n: $(tail -n 1 "$out/$n.log")"
    [ -d "/tmp/adapter-runs/$n/export/h_adapter" ] && rows+=(--run "$n=/tmp/adapter-runs/$n/export")
done
if [ "${IRT_EVAL:-0}" = 1 ] && [ ${#rows[@]} -gt 0 ]; then
    t0=$(date +%s)
    timeout "${IRT_EVAL_TIMEOUT:-1800}" python3 -m imageragturbo.commands bench quality --runs-only \
        --n "${IRT_EVAL_N:-500}" --seeds "${IRT_EVAL_SEEDS:-3}" "${rows[@]}" \
        --json "$out/quality.json" --markdown "$out/quality.md" > "$out/eval.log" 2>&1
    echo "eval exit $? in $(( $(date +%s) - t0 )) s"
    cat "$out/quality.md" 2>/dev/null
fi
