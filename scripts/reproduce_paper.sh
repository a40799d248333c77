#!/usr/bin/env bash
# Reproduce the analogues of Figures 1 and 2 of Wolinski (arXiv:2312.03885) on CIFAR-10:
# train LeNet-5 (epochs 1 and 21) and VGG-11' (epochs 1 and 6) with the paper's setup
# (docs/DESIGN.md §2: SGD, batches of 100, no augmentation, log-softmax + NLL), analyse every
# checkpoint over the training split, render the trajectory heatmaps and audit the
# block-diagonal approximations. Everything goes to OUT (default reports/paper/).
#
#   scripts/reproduce_paper.sh DATA_ROOT [OUT]      DATA_ROOT: the cifar-10-batches-py folder
#
# Settings (environment): LR (SGD learning rate, default 0.01), LENET_EPOCHS (1,21), VGG_EPOCHS (1,6),
# VGG_KWARGS (JSON, default {}), SAMPLES (analysis set size, default the whole training split),
# ANALYSE_ARGS (extra `curvscope analyse` flags, default --no-spectrum: the paper has no spectra),
# PYTHON (default python). The audit's exit code 1 (some approximation not valid) is a result,
# not a failure; it is written to OUT/audit.txt and OUT/audit.json.
set -euo pipefail
DATA_ROOT=${1:?usage: scripts/reproduce_paper.sh DATA_ROOT [OUT]}
OUT=${2:-reports/paper}
PY=${PYTHON:-python}
LR=${LR:-0.01}
LENET_EPOCHS=${LENET_EPOCHS:-1,21}
VGG_EPOCHS=${VGG_EPOCHS:-1,6}
VGG_KWARGS=${VGG_KWARGS:-"{}"}
ANALYSE_ARGS=${ANALYSE_ARGS:---no-spectrum}
SAMPLES_ARGS=()
if [[ -n "${SAMPLES:-}" ]]; then SAMPLES_ARGS=(--samples "$SAMPLES"); fi
HERE="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$OUT/checkpoints"

run() {  # run MODEL KWARGS EPOCHS
  local model=$1 kwargs=$2 epochs=$3 last=${3##*,}
  "$PY" "$HERE/train.py" --model "$model" --model-kwargs "$kwargs" --data cifar10 --data-root "$DATA_ROOT" \
    --loss nll --epochs "$last" --save-at "$epochs" --lr "$LR" --batch-size 100 --seed 0 \
    --out "$OUT/checkpoints/${model}_cifar10"
  # shellcheck disable=SC2086
  "$PY" -m curvscope analyse "$OUT"/checkpoints/"${model}"_cifar10_ep*.pt -o "$OUT/$model.h5" \
    --data-root "$DATA_ROOT" --scale linear --scale normalized --shared-scale "${SAMPLES_ARGS[@]}" $ANALYSE_ARGS
}

run lenet5 "{}" "$LENET_EPOCHS"
run vgg11 "$VGG_KWARGS" "$VGG_EPOCHS"
set +e
"$PY" -m curvscope audit "$OUT/lenet5.h5" "$OUT/vgg11.h5" --approximation layer --approximation tensor \
  > "$OUT/audit.txt"
"$PY" -m curvscope audit "$OUT/lenet5.h5" "$OUT/vgg11.h5" --approximation layer --approximation tensor --json \
  > "$OUT/audit.json"
status=$?
set -e
if [[ $status -gt 1 ]]; then echo "the audit failed (exit $status)" >&2; exit "$status"; fi
echo "figures: $OUT/lenet5/trajectory-heatmaps-*.pdf (Figure 1), $OUT/vgg11/trajectory-heatmaps-*.pdf (Figure 2)"
echo "audit: $OUT/audit.txt"
