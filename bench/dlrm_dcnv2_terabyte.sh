#!/bin/bash
# DLRM-DCNv2, the MLPerf Training "dlrm_dcnv2" benchmark (the model of the original repository's
# torchrec_dlrm/ directory), on Criteo Terabyte-format data, with the MLPerf log:
#   bash bench/dlrm_dcnv2_terabyte.sh ["extra options" | extra options...]   (run where ./input/day_0 .. day_23[.gz] are)
# Reference settings: embedding dim 128, bottom MLP 13-512-256-128, top MLP 1024-1024-512-256-1,
# DCNv2 with 3 layers of rank 512, Adagrad at 0.005 (epsilon 1e-8), global batch 65536, tables capped at 40M rows,
# multi-hot sizes 3,2,1,2,6,1,1,1,1,7,3,8,1,6,9,5,1,1,1,12,100,27,10,3,1,1 drawn uniformly, a test
# every 1/20 epoch, stop at test AUC 0.80275.
# Sized down for a small machine with environment variables (defaults: the reference):
#   MAX_IND_RANGE  table cap (rows)                       40000000
#   BATCH          global mini-batch                      65536
#   TEST_BATCH     test mini-batch                        16384
#   TRAIN_SAMPLES  training rows (for the test frequency) 4195197692 (Terabyte days 0-22)
#   MULTI_HOT_DISTRIBUTION  uniform | pareto              uniform
# e.g. on generated data (python data_utils.py make-fake --rows 2400000 --days 24 --out input/day):
#   MAX_IND_RANGE=100000 BATCH=2048 TEST_BATCH=2048 TRAIN_SAMPLES=2300000 bash bench/dlrm_dcnv2_terabyte.sh
# The first run preprocesses the days into ./input/terabyte_processed/ (shared with the other
# Terabyte scripts). PYTHON overrides the interpreter. The log goes to ./run_dcnv2_terabyte_pt.log.
set -o pipefail

# extra options: one quoted string of flags, as the original takes them, or the flags one by one
if [[ $# == 1 ]]; then
    read -r -a dlrm_extra_options <<< "$1"
else
    dlrm_extra_options=("$@")
fi

max_ind_range=${MAX_IND_RANGE:-40000000}
batch=${BATCH:-65536}
test_batch=${TEST_BATCH:-16384}
train_samples=${TRAIN_SAMPLES:-4195197692}
distribution=${MULTI_HOT_DISTRIBUTION:-uniform}
for setting in "MAX_IND_RANGE=$max_ind_range" "BATCH=$batch" "TEST_BATCH=$test_batch" "TRAIN_SAMPLES=$train_samples"; do
    if ! [[ ${setting#*=} =~ ^[1-9][0-9]*$ ]]; then
        echo "error: $setting: must be a positive whole number" >&2
        exit 2
    fi
done
test_freq=$(( train_samples / (batch * 20) ))
if (( test_freq < 1 )); then test_freq=1; fi

dlrm_args=("$(dirname "$0")/../dlrm_s_pytorch.py"
    --arch-sparse-feature-size=128 --arch-mlp-bot="13-512-256-128" --arch-mlp-top="1024-1024-512-256-1"
    --arch-interaction-op=dcn --dcn-num-layers=3 --dcn-low-rank-dim=512
    --multi-hot-sizes=3-2-1-2-6-1-1-1-1-7-3-8-1-6-9-5-1-1-1-12-100-27-10-3-1-1
    --multi-hot-distribution-type="$distribution"
    --max-ind-range="$max_ind_range" --data-generation=dataset --data-set=terabyte --raw-data-file=./input/day
    --processed-data-file=./input/terabyte_processed.npz --memory-map --loss-function=bce
    --optimizer=adagrad --learning-rate=0.005 --adagrad-eps=1e-8 --mini-batch-size="$batch" --nepochs=1
    --print-freq=$(( test_freq > 16 ? test_freq / 16 : 1 )) --print-time --test-freq="$test_freq"
    --test-mini-batch-size="$test_batch" --mlperf-logging --mlperf-auc-threshold=0.80275)
# the printed lines go to the log; on a terminal, progress bars and notes stay on the terminal
if [[ -t 2 ]]; then
    ${PYTHON:-python} "${dlrm_args[@]}" "${dlrm_extra_options[@]}" | tee run_dcnv2_terabyte_pt.log
else
    ${PYTHON:-python} "${dlrm_args[@]}" "${dlrm_extra_options[@]}" 2>&1 | tee run_dcnv2_terabyte_pt.log
fi
status=$?

echo "done"
exit $status
