"""Draw how strongly a trained DLRM's features interact, as a labelled heatmap PNG.

Usage:
    python tools/plot_interactions.py -o interactions.png ...the run's flags... --load-model=model.pt
    python tools/plot_interactions.py -o interactions.png --batches=4 --arch-sparse-feature-size=16 \\
        --arch-mlp-bot=13-512-256-64-16 --arch-mlp-top=512-256-1 --data-generation=dataset \\
        --raw-data-file=input/train.txt --processed-data-file=input/kaggleAdDisplayChallenge_processed.npz \\
        --load-model=model.pt

The model and data come from the trainer's own flags (those of the run that wrote the checkpoint).
Every feature is one vector per sample: the bottom MLP's output for the dense features ("dense",
I1-I13 on Criteo data) and each table's pooled embedding (C1..C26 on Criteo data, t0..tN-1 on
random or synthetic data). For each pair of features the picture shows the mean over the first
`--batches` test batches of |dot product| of their vectors: the terms the dot interaction hands the
top MLP. The strongest pairs are printed too.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from dlrmkit import outputs  # noqa: E402

class PlotError(ValueError):
    pass


def feature_names(data_generation: str, num_tables: int) -> list[str]:
    if data_generation == "dataset":
        return ["dense (I1-I13)"] + [f"C{t + 1}" for t in range(num_tables)]
    return ["dense"] + [f"t{t}" for t in range(num_tables)]


def feature_vectors(model, batch):
    """[B, 1 + tables, D]: the bottom MLP's output, then each table's pooled embedding."""
    import torch

    dense = model.bot_l(batch.dense_x)
    pooled = model.apply_emb(batch.sparse)  # [B, T, D], with the pooling weights of --weighted-pooling
    return torch.cat([dense.unsqueeze(1).float(), pooled.float()], dim=1)


def mean_abs_dot_products(model, batches):
    """[F, F]: the mean over all samples of |<v_i, v_j>| for every pair of feature vectors."""
    import torch

    total, samples = None, 0
    with torch.no_grad():
        for batch in batches:
            features = feature_vectors(model, batch)
            gram = torch.bmm(features, features.transpose(1, 2)).abs().sum(0)
            total = gram if total is None else total + gram
            samples += features.shape[0]
    return (total / samples).double().numpy()


def draw(matrix, names, output, title):
    try:
        import matplotlib
    except ImportError:
        raise PlotError("plotting needs matplotlib (pip install matplotlib)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pairs = np.ma.masked_where(np.triu(np.ones_like(matrix, dtype=bool)), matrix)  # each pair once, i > j
    size = max(6.0, 0.32 * len(names) + 3)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(pairs, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("feature")
    ax.set_ylabel("feature")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="mean |dot product|", shrink=0.8)
    fig.tight_layout()
    try:
        outputs.save_figure("-o/--output", output, fig)
    except outputs.OutputError as e:
        raise PlotError(str(e))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="All other flags are dlrm_s_pytorch.py's (--load-model needed).")
    parser.add_argument("-o", "--output", default="dlrm_interactions.png", help="PNG to write")
    parser.add_argument("--batches", type=int, default=1, help="test batches to average over")
    parser.add_argument("--top", type=int, default=5, help="strongest pairs to print")
    opts, trainer_argv = parser.parse_known_args(argv)

    import torch

    import dlrm_s_pytorch as dlrm

    args = dlrm.parse_args(trainer_argv)
    try:
        if not args.load_model:
            raise PlotError("--load-model is needed: the checkpoint to draw")
        if opts.batches < 1:
            raise PlotError("--batches must be at least 1")
        problem = outputs.output_problem(opts.output)
        if problem:
            raise PlotError(f"-o/--output {opts.output}: {problem}")
        dlrm.validate_args(args)
        emb_dim = dlrm.embedding_output_dim(args.arch_sparse_feature_size, args.qr_flag, args.qr_operation)
        if args.arch_mlp_bot[-1] != emb_dim:  # allowed by cat, dcn and projection
            raise PlotError(f"the bottom MLP's output ({args.arch_mlp_bot[-1]} wide) and the embeddings "
                            f"({emb_dim} wide) have no dot products to draw")
        torch.manual_seed(args.numpy_rand_seed)
        _, test_set, dense_dim, table_sizes = dlrm.make_datasets(args)
        model = dlrm.build_model(args, dense_dim, table_sizes)
        dlrm.load_checkpoint(args.load_model, model, None)
        model.eval()
        batches = [test_set[j] for j in range(min(opts.batches, len(test_set)))]
        matrix = mean_abs_dot_products(model, batches)
        names = feature_names(args.data_generation, len(table_sizes))
        samples = sum(b.dense_x.shape[0] for b in batches)
        draw(matrix, names, opts.output,
             f"Feature interactions of {os.path.basename(args.load_model)}: mean |dot product| over {samples:,} "
             f"test samples")
    except (PlotError, dlrm.DLRMError) as e:
        print(f"plot_interactions.py: error: {e}", file=sys.stderr)
        return 1
    pairs = sorted(((matrix[i, j], names[i], names[j]) for i in range(len(names)) for j in range(i)), reverse=True)
    print("strongest interactions: " + ", ".join(f"{a} x {b} {value:.3g}" for value, a, b in pairs[:opts.top]))
    print(f"Wrote {opts.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
