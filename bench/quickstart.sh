#!/usr/bin/env bash
# The main job in one command: Criteo-format data -> preprocessing -> the Criteo Kaggle model
# (the flags of bench/dlrm_s_criteo_kaggle.sh) -> test accuracy and AUC -> training curves and the
# trained model's feature interactions as PNGs.
#
# Usage:
#   bash bench/quickstart.sh                              generated data (about two minutes on 2 cores)
#   bash bench/quickstart.sh --raw-data-file=PATH         your Criteo Kaggle train.txt
#   bash bench/quickstart.sh [--rows=N] [--out=DIR] [-- extra dlrm_s_pytorch.py flags]
#
# Data: --raw-data-file, else ./input/train.txt when it exists, else a generated file of N rows
# (--rows, default 2000000; QUICKSTART_ROWS sets it too) in Criteo's format with a learnable signal,
# named synthetic_criteo_kaggle_<N>_rows.txt. Outputs go to --out (default ./quickstart).
# PYTHON overrides the interpreter.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
python_bin=${PYTHON:-python}
rows=${QUICKSTART_ROWS:-2000000}
out=quickstart
raw=""
extra=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --raw-data-file=*) raw=${1#*=} ;;
    --rows=*) rows=${1#*=} ;;
    --out=*) out=${1#*=} ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "quickstart.sh: error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
# the generated file is cut into 7 "days" (6 train, 1 test): fewer rows leave a day empty
if ! [[ $rows =~ ^[1-9][0-9]{0,11}$ ]] || (( rows < 7 )); then
  echo "quickstart.sh: error: --rows (or QUICKSTART_ROWS) must be a whole number of rows from 7 to 999999999999, got '$rows'" >&2
  exit 2
fi
if [[ -z $out ]]; then
  echo "quickstart.sh: error: --out is empty; give the folder for the outputs" >&2
  exit 2
fi
if ! command -v "$python_bin" > /dev/null; then
  echo "quickstart.sh: error: no Python interpreter '$python_bin' (PYTHON)" >&2
  exit 1
fi
# the pictures need matplotlib: said before any work, not after the training
if ! "$python_bin" -c "import matplotlib" 2>/dev/null; then
  echo "quickstart.sh: error: the training curves and interaction maps need matplotlib (pip install matplotlib)" >&2
  exit 1
fi
if [[ -z $raw && -f input/train.txt ]]; then
  raw=input/train.txt
fi
mkdir -p "$out"

say() { printf '\n== %s\n' "$*"; }

started=$SECONDS
# a rerun that fails leaves none of an earlier run's outputs looking current
rm -f "$out/train.log" "$out/metrics.jsonl" "$out/model.pt" "$out/training_curves.png" "$out/feature_interactions.png"
if [[ -n $raw ]]; then
  [[ -f $raw ]] || { echo "quickstart.sh: error: no such file: $raw" >&2; exit 1; }
  say "Data: $raw"
  processed="$(dirname "$raw")/kaggleAdDisplayChallenge_processed.npz"
  test_freq=102400  # as bench/dlrm_s_criteo_kaggle.sh: every 102,400 iterations and at the end
else
  raw="$out/synthetic_criteo_kaggle_${rows}_rows.txt"
  processed="$out/synthetic_criteo_kaggle_${rows}_rows_processed.npz"
  if [[ -f $raw ]]; then
    say "Data: $raw (generated before: synthetic Criteo-format rows with a learnable click signal)"
  else
    say "Generating $raw: $rows synthetic Criteo-format rows with a learnable click signal"
    "$python_bin" "$repo/data_utils.py" make-fake --rows "$rows" --out "$raw"
  fi
  # the first six of seven "days" train (the first days take the remainder), in batches of 128:
  # a test after each quarter of them, the last at the end of the epoch
  train_rows=$(( rows / 7 * 6 + (rows % 7 < 6 ? rows % 7 : 6) ))
  batches=$(( (train_rows + 127) / 128 ))
  test_freq=$(( (batches + 3) / 4 ))
fi

log="$out/train.log"
metrics="$out/metrics.jsonl"
model="$out/model.pt"
curves="$out/training_curves.png"
interactions="$out/feature_interactions.png"
say "Training the Criteo Kaggle model (preprocessing first when the data is new)"
args=(--arch-sparse-feature-size=16 --arch-mlp-bot=13-512-256-64-16 --arch-mlp-top=512-256-1
      --data-generation=dataset --data-set=kaggle --raw-data-file="$raw" --processed-data-file="$processed"
      --loss-function=bce --learning-rate=0.1 --mini-batch-size=128
      --print-freq=1024 --print-time --test-freq="$test_freq" --test-mini-batch-size=16384
      --metrics-log-file="$metrics" --save-model="$model")
echo "$python_bin dlrm_s_pytorch.py ${args[*]} ${extra[*]}"
# the printed lines go to the log; on a terminal, progress bars and notes stay on the terminal
if [[ -t 2 ]]; then
  "$python_bin" "$repo/dlrm_s_pytorch.py" "${args[@]}" "${extra[@]}" | tee "$log"
else
  "$python_bin" "$repo/dlrm_s_pytorch.py" "${args[@]}" "${extra[@]}" 2>&1 | tee "$log"
fi

say "Result"
"$python_bin" - "$metrics" <<'EOF'
import json, sys
tests = [r for r in map(json.loads, open(sys.argv[1])) if r.get("event") == "test"]
if not tests:
    sys.exit("quickstart.sh: error: the run wrote no test result")
last = tests[-1]
def auc(value):  # null: a test set of one class has no AUC
    return "undefined" if value is None else f"{value:.4f}"
one_class = " (the test set has one class)" if last["auc"] is None else ""
print(f"test accuracy {last['accuracy'] * 100:.3f} %, test AUC {auc(last['auc'])}{one_class} "
      f"(best {auc(last['best_auc'])}) on {last['samples']:,} test samples")
EOF
"$python_bin" "$repo/tools/plot_metrics.py" "$metrics" -o "$curves" --labels "Criteo Kaggle model" > /dev/null
# the checkpoint of the best test AUC: how strongly its features interact
"$python_bin" "$repo/tools/plot_interactions.py" -o "$interactions" "${args[@]}" "${extra[@]}" --load-model="$model" \
  | grep '^strongest'

say "Outputs"
echo "data:              $raw"
echo "processed data:    ${processed%.npz}/"
echo "training log:      $log"
echo "metrics log:       $metrics"
echo "checkpoint:        $model"
echo "training curves:   $curves"
echo "interactions:      $interactions"
echo "wall time:         $((SECONDS - started)) s"
