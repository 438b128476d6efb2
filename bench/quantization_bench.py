"""Quantized CPU inference against fp32: model size, inference speed and test AUC.

Trains a Criteo-shaped DLRM (13 dense features, 26 tables, dim 16) in fp32 on a random
problem with a planted signal, then evaluates the same weights quantized every way
--quantize-mlp-with-bit / --quantize-emb-with-bit allow. Speeds are ratios to fp32
measured in the same run (interleaved, best of --repeats).

    python bench/quantization_bench.py                 # ~1-2 minutes on 2 cores
    python bench/quantization_bench.py --train-samples=1000000 --rows-scale=4
"""

from __future__ import annotations

import copy
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dlrm_data  # noqa: E402
import dlrm_s_pytorch as dlrm  # noqa: E402
from dlrmkit import flags, quantization  # noqa: E402
from dlrmkit.optim import make_optimizer  # noqa: E402

# Criteo Kaggle's 26 table sizes (as counted by the original's preprocessing) / 100, at least 3
CRITEO_KAGGLE_ROWS = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
                      14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]


def planted_criteo(table_sizes, num_samples, batch_size, seed) -> dlrm_data.OneHotDataset:
    """Criteo-shaped random data: Zipf-distributed ids, one per bag; clicks depend on 4 dense
    features and on per-id effects in 6 tables (a logistic model with ~25% positives)."""
    rng = np.random.default_rng(seed)
    effects = np.random.default_rng(0)
    dense = np.log1p(rng.exponential(3.0, (num_samples, 13))).astype(np.float32)
    ids = np.stack([(rng.zipf(1.2, num_samples) - 1) % n for n in table_sizes], axis=1)
    logit = -1.6 + dense[:, :4] @ np.array([0.8, -0.6, 0.5, 0.4]) - 1.0
    for t in (0, 2, 3, 8, 11, 20):
        logit += effects.normal(0, 1.0, table_sizes[t])[ids[:, t]]
    labels = (rng.random(num_samples) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return dlrm_data.OneHotDataset(dense, ids, labels, batch_size)


def inference_ms(model, batches):
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(batch.dense_x, batch.sparse)
    return 1000 * (time.perf_counter() - start) / len(batches)


def main(argv=None):
    parser = flags.CommandLineParser(description=__doc__.split("\n\n")[0])
    flags.add_number(parser, "--train-samples", int, 300_000, flags.at_least(1), "planted-signal training samples")
    flags.add_number(parser, "--test-samples", int, 100_000, flags.at_least(2), "test samples (both classes for AUC)")
    flags.add_number(parser, "--rows-scale", float, 0.01, flags.positive(), "table rows = Criteo Kaggle's x this")
    flags.add_number(parser, "--batch-size", int, 256, flags.at_least(1), "training mini-batch size")
    flags.add_number(parser, "--inference-batch-size", int, 1024, flags.at_least(1), "timed inference batch size")
    flags.add_number(parser, "--repeats", int, 5, flags.at_least(1), "timed passes over the test set per variant")
    flags.add_number(parser, "--threads", int, 1, flags.at_least(1), "torch threads (1 gives the steadiest timings)")
    args = parser.parse_args(argv)
    problem = flags.check_ranges(parser, args)
    if problem:
        parser.error(problem)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    tables = [max(3, int(n * args.rows_scale)) for n in CRITEO_KAGGLE_ROWS]
    train_args = dlrm.parse_args(["--arch-sparse-feature-size=16", "--arch-mlp-bot=13-512-256-64-16",
                                  "--arch-mlp-top=512-256-1", "--loss-function=bce", "--optimizer=sgd",
                                  "--learning-rate=0.1", f"--mini-batch-size={args.batch_size}",
                                  "--print-freq=100000"])
    train_set = planted_criteo(tables, args.train_samples, args.batch_size, seed=1)
    test_set = planted_criteo(tables, args.test_samples, args.inference_batch_size, seed=2)
    model = dlrm.build_model(train_args, 13, tables)
    start = time.perf_counter()
    dlrm.train(train_args, model, make_optimizer("sgd", model.parameters(), 0.1), train_set, test_set,
               torch.device("cpu"), dlrm.TrainState(), len(train_set), log=lambda s: None)
    print(f"trained fp32 on {args.train_samples} samples, {sum(tables)} embedding rows, "
          f"{100 * train_set.labels.mean():.1f}% clicks, {time.perf_counter() - start:.0f} s; "
          f"torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    variants = {"fp32": (32, 32), "mlp int8": (8, 32), "mlp fp16": (16, 32), "emb 8-bit": (32, 8),
                "emb 4-bit": (32, 4), "mlp int8 + emb 8-bit": (8, 8), "mlp int8 + emb 4-bit": (8, 4)}
    models = {name: quantization.quantize_for_inference(copy.deepcopy(model), *bits) for name, bits in variants.items()}
    batches = [test_set[j] for j in range(min(len(test_set), 20))]
    times = {name: [] for name in models}
    for _ in range(args.repeats):  # interleaved, so every variant sees the same machine load
        for name, m in models.items():
            times[name].append(inference_ms(m, batches))
    fp32_auc = None
    print(f"| variant | size (MiB) | size vs fp32 | ms / batch of {args.inference_batch_size} | speed vs fp32 "
          f"| test AUC | AUC - fp32 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, m in models.items():
        auc = dlrm.evaluate(m, test_set, "bce", None, torch.device("cpu")).auc
        fp32_auc = auc if fp32_auc is None else fp32_auc
        size = quantization.serialized_size(m) / 2**20
        best = min(times[name])
        print(f"| {name} | {size:.2f} | {size / (quantization.serialized_size(models['fp32']) / 2**20):.2f} | "
              f"{best:.2f} | {min(times['fp32']) / best:.2f}x | {auc:.4f} | {auc - fp32_auc:+.4f} |")


if __name__ == "__main__":
    main()
