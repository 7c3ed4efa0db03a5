#!/usr/bin/env bash
# CPU-scale CIFAR-10 results: each rule's `tiny` preset pretrained for the same number of
# steps, then probed with the same protocol; plus the random-init encoder. Prints a table.
#   TFDS_DATA_DIR=../shared/tensorflow_datasets bash benchmarks/cpu_results.sh [STEPS] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-2000}
out=${2:-runs/cpu_results}
python=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
runs=("both:configs/clapp_cifar.py:both,tiny" "dfb:configs/clapp_cifar.py:dfb,tiny"
      "lateral:configs/clapp_cifar.py:lateral,tiny" "bp:configs/clapp_cifar.py:bp,tiny"
      "infonce:configs/infonce_cifar.py:tiny")
for run in "${runs[@]}"; do
  name=${run%%:*}; config=${run#*:}
  start=$(date +%s)
  "$python" main.py --config="$config" --workdir="$out/$name" \
      --config.num_train_steps="$steps" > "$out/$name.pretrain.log" 2>&1
  echo "$name: pretrained $steps steps in $(( $(date +%s) - start )) s"
  "$python" main.py --config="$config" --workdir="$out/$name" --mode=linear_eval \
      --config.eval.per_layer=True > "$out/$name.eval.log" 2>&1
done
"$python" main.py --config=configs/clapp_cifar.py:both,tiny --workdir="$out/random_init" \
    --mode=linear_eval --config.eval.random_init=True --config.eval.per_layer=True \
    > "$out/random_init.eval.log" 2>&1
"$python" - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
print(f'{"run":<12} {"test acc":>9} {"val acc":>8} {"best epoch":>10} {"step":>6}  per-layer test acc')
for name in ('both', 'dfb', 'lateral', 'bp', 'infonce', 'random_init'):
  file = 'linear_eval_random_init.json' if name == 'random_init' else 'linear_eval.json'
  path = os.path.join(out, name, file)
  if not os.path.exists(path):
    continue
  r = json.load(open(path))
  layers = ' '.join(f'{100 * v["test_accuracy"]:.1f}' for _, v in sorted(r.get('per_layer', {}).items()))
  print(f'{name:<12} {100 * r["test_accuracy"]:9.2f} {100 * r["val_accuracy"]:8.2f} '
        f'{r["best_epoch"]:>10} {r["checkpoint_step"]:>6}  {layers}')
PY
