"""Draw training and test curves from metrics logs (--metrics-log-file) to a PNG.

Usage:
    python dlrm_s_pytorch.py ... --test-freq=1000 --metrics-log-file=run.jsonl
    python tools/plot_metrics.py run.jsonl -o curves.png
    python tools/plot_metrics.py sgd.jsonl adagrad.jsonl -o compare.png --labels sgd,adagrad

Three panels against the iteration (counted across epochs): loss (training and test),
test accuracy in percent (as the trainer prints it) and test AUC. Several logs are drawn over
each other, each named by its run: `--labels`, else the log's file name (with its directory when
two names are the same).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from dlrmkit import outputs  # noqa: E402


class PlotError(ValueError):
    pass


def read_metrics(path):
    """(train records, test records, loss function) of one metrics log."""
    train, test, loss_function = [], [], None
    try:
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PlotError(f"{path}:{number}: not a JSON line ({e.msg})")
                if record.get("event") == "train":
                    train.append(record)
                elif record.get("event") == "test":
                    test.append(record)
                elif record.get("event") == "start":
                    loss_function = (record.get("config", {}).get("args") or {}).get("loss_function", loss_function)
    except OSError as e:
        raise PlotError(f"{path}: cannot read ({e.strerror or e})")
    if not train and not test:
        raise PlotError(f"{path}: no train or test records (is it a --metrics-log-file?)")
    return train, test, loss_function


def series(records, key, scale=1.0):
    points = [(r["global_iteration"], r[key] * scale) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def run_names(paths):
    """Each log's run name: its file name without the extension, with its directory where names repeat."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    return [os.path.join(os.path.basename(os.path.dirname(os.path.abspath(p))), stem) if stems.count(stem) > 1
            else stem for p, stem in zip(paths, stems)]


def plot(runs, output):
    try:
        import matplotlib
    except ImportError:
        raise PlotError("plotting needs matplotlib (pip install matplotlib)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc, ax_auc) = plt.subplots(1, 3, figsize=(15, 4.2))
    loss_functions = set()
    for label, (train, test, loss_function) in runs:
        loss_functions.add(loss_function)
        x, y = series(train, "loss")
        line = ax_loss.plot(x, y, marker="o" if len(x) == 1 else None, markersize=3,  # one point: a marker
                            label=f"{label} (training)")[0]
        ax_loss.plot(*series(test, "loss"), "o--", color=line.get_color(), label=f"{label} (test)", markersize=3)
        ax_acc.plot(*series(test, "accuracy", 100.0), "o-", color=line.get_color(), label=label, markersize=3)
        ax_auc.plot(*series(test, "auc"), "o-", color=line.get_color(), label=label, markersize=3)
    loss_name = loss_functions.pop() if len(loss_functions) == 1 and None not in loss_functions else None
    loss_axis = f"loss ({loss_name.upper()})" if loss_name else "loss"
    for ax, title, ylabel in ((ax_loss, "training and test loss", loss_axis),
                              (ax_acc, "test accuracy", "accuracy (%)"), (ax_auc, "test AUC", "AUC")):
        ax.set_title(title)
        ax.set_xlabel("iteration (across epochs)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        outputs.save_figure("-o/--output", output, fig)
    except outputs.OutputError as e:
        raise PlotError(str(e))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", help="metrics logs written by --metrics-log-file")
    parser.add_argument("-o", "--output", default="dlrm_metrics.png", help="PNG to write")
    parser.add_argument("--labels", default="", help="comma-separated run names (default: the logs' file names)")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else run_names(args.logs)
    try:
        if len(labels) != len(args.logs):
            raise PlotError(f"--labels has {len(labels)} labels for {len(args.logs)} logs")
        problem = outputs.output_problem(args.output)
        if problem:
            raise PlotError(f"-o/--output {args.output}: {problem}")
        plot([(label, read_metrics(path)) for label, path in zip(labels, args.logs)], args.output)
    except PlotError as e:
        print(f"plot_metrics.py: error: {e}", file=sys.stderr)
        return 1
    print(f"Wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
