"""Command-line pieces shared by the trainer (`dlrm_s_pytorch.py`) and `data_utils.py`.

- `parse_bool`, `dash_separated`: the value types of the original's flags;
- `CommandLineParser`: one-line errors, and a suggestion for a misspelt flag;
- `add_bool_flag`, `add_number`: flag definitions; a number carries its valid `Range`,
  which `check_ranges` checks for every flag of a parser;
- `add_data_flags`, `add_multi_hot_flags`: the Criteo data and multi-hot flags, defined once for both
  command lines;
- `Condition`, `ineffective_flags`: which flags have an effect in a run (the notes).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import re
import sys
from typing import Callable

INT64_MAX = 2**63 - 1  # every integer flag ends up in a NumPy or PyTorch int64


def parse_bool(value) -> bool:
    """`True/False`, `1/0`, `yes/no`, `on/off` (any case); raises argparse.ArgumentTypeError otherwise."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "t", "yes", "y", "on"):
        return True
    if text in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False/1/0), got {value!r}")


def dash_separated(kind, commas: bool = False):
    """A parser of `4-3-2`-style lists of `kind` (int or float); with `commas` also `4,3,2`, and an
    empty text is the empty list."""
    def parse(text):
        if commas and not str(text).strip():
            return []
        parts = re.split("[-,]" if commas else "-", str(text))
        if "" in parts and str(text).strip():
            raise argparse.ArgumentTypeError(
                f"empty part in {text!r} (a leading, trailing or doubled {'separator' if commas else 'dash'}); values "
                f"are separated by single {'dashes or commas' if commas else 'dashes'}, so negative values cannot be "
                "written in a dash-separated list")
        try:
            values = [kind(v) for v in parts]
        except ValueError:
            values = []
        if not values:
            raise argparse.ArgumentTypeError(f"expected {'dash- or comma-' if commas else 'dash-'}separated "
                                             f"{kind.__name__}s like 4-3-2, got {text!r}")
        return values

    parse.__name__ = f"dash-separated {kind.__name__}s"
    parse.element_type = kind
    return parse


def number_type(action: argparse.Action):
    """int or float for a numeric flag (a dash-separated list counts by its elements), else None."""
    kind = getattr(action.type, "element_type", action.type)
    return kind if kind in (int, float) else None


# ============================================================================ valid ranges
@dataclasses.dataclass(frozen=True)
class Range:
    """The valid values of a numeric flag: finite numbers in [low, high] (an open end when
    `open_low`/`open_high`), plus `special` values with a meaning of their own (e.g. -1: off);
    `values`, when given, lists every valid value instead. A list flag checks each element."""

    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False
    special: tuple = ()
    values: tuple = ()

    def __contains__(self, value) -> bool:
        if value in self.special or value in self.values:
            return True
        if self.values or not math.isfinite(value):
            return False
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.values:
            return _one_of(self.values)
        low, high = _number(self.low), _number(self.high)
        if math.isinf(self.low) and math.isinf(self.high):
            text = "a finite number"
        elif math.isinf(self.high):
            text = f"more than {low}" if self.open_low else f"at least {low}"
        elif math.isinf(self.low):
            text = f"less than {high}" if self.open_high else f"at most {high}"
        else:
            text = f"in {'(' if self.open_low else '['}{low}, {high}{')' if self.open_high else ']'}"
        return f"{', '.join(_number(v) for v in self.special)} or {text}" if self.special else text

    def outside(self):
        """A value outside the range (for tests)."""
        if self.values:
            return max(self.values) + 1
        if math.isfinite(self.low):
            below = self.low - 1
            while below in self.special:
                below -= 1
            return below
        return self.high + 1


def at_least(low, *special) -> Range:
    return Range(low=low, special=special)


def positive() -> Range:
    return Range(low=0, open_low=True)


def between(low, high, open_high=False) -> Range:
    return Range(low=low, high=high, open_high=open_high)


def one_of(*values) -> Range:
    return Range(values=values)


def _number(x) -> str:
    if isinstance(x, int):
        return str(x)
    return str(int(x)) if math.isfinite(x) and x.is_integer() and abs(x) < 1e16 else f"{x:g}"


def _one_of(values) -> str:
    texts = [_number(v) for v in values]
    return texts[0] if len(texts) == 1 else f"{', '.join(texts[:-1])} or {texts[-1]}"


def check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace, unused=()) -> str | None:
    """The first flag value of `args` outside its declared range, as a one-line message, or None
    (the flags of a chosen sub-command included); flags in `unused` (without effect in this run: their
    value is noted, not used) are not checked."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            problem = check_ranges(action.choices[getattr(args, action.dest)], args, unused)
            if problem:
                return problem
        valid = getattr(action, "valid_range", None)
        value = getattr(args, action.dest, None)
        if valid is None or value is None or isinstance(value, str) or set(action.option_strings) & set(unused):
            continue
        flag = action.option_strings[0]
        values = value if isinstance(value, list) else [value]
        if not all(v in valid for v in values):
            if isinstance(value, list):
                return f"{flag}: every value must be {valid}, got {'-'.join(_number(v) for v in value)}"
            return f"{flag} must be {valid}, got {_number(value) if math.isfinite(value) else value}"
        too_big = [v for v in values if isinstance(v, int) and abs(v) > INT64_MAX]
        if too_big:
            return f"{flag}: {too_big[0]} does not fit a 64-bit integer"
    return None


# ============================================================================ the parser and its flags
# torchrec_dlrm/dlrm_main.py's flags (the MLPerf DLRMv2 reference) and what this trainer takes instead
TORCHREC_FLAGS = {
    "--interaction_type": "--arch-interaction-op=dcn / projection / dot (its original)",
    "--dcn_num_layers": "--dcn-num-layers", "--dcn_low_rank_dim": "--dcn-low-rank-dim",
    "--interaction_branch1_layer_sizes": "--interaction-branch1-layer-sizes (widths joined by dashes)",
    "--interaction_branch2_layer_sizes": "--interaction-branch2-layer-sizes (widths joined by dashes)",
    "--embedding_dim": "--arch-sparse-feature-size",
    "--dense_arch_layer_sizes": "--arch-mlp-bot (the 13 dense features first, widths joined by dashes)",
    "--over_arch_layer_sizes": "--arch-mlp-top (widths joined by dashes)",
    "--num_embeddings_per_feature": "--max-ind-range (one cap for every table)",
    "--adagrad": "--optimizer=adagrad --adagrad-eps=1e-8", "--learning_rate": "--learning-rate",
    "--eps": "--adagrad-eps (with --optimizer=adagrad)", "--num_embeddings": "--arch-embedding-size (random data)",
    "--batch_size": "--mini-batch-size (all processes together)",
    "--lr_warmup_steps": "--lr-num-warmup-steps", "--lr_decay_start": "--lr-decay-start-step",
    "--lr_decay_steps": "--lr-num-decay-steps", "--epochs": "--nepochs", "--seed": "--numpy-rand-seed",
    "--test_batch_size": "--test-mini-batch-size", "--validation_freq_within_epoch": "--test-freq",
    "--multi_hot_sizes": "--multi-hot-sizes", "--multi_hot_distribution_type": "--multi-hot-distribution-type",
    "--dataset_name": "--data-set=terabyte / kaggle with --data-generation=dataset",
    "--in_memory_binary_criteo_path": "--raw-data-file and --processed-data-file (preprocessed here, once)",
    "--synthetic_multi_hot_criteo_path": "--processed-data-file of a set written by `python data_utils.py multi-hot`",
    "--mmap_mode": "--memory-map", "--shuffle_training_set": "--data-randomize=total",
    "--limit_train_batches": "--num-batches",
    "--undersampling_rate": "--data-sub-sample-rate=1-r (the share of negatives dropped, not kept)",
    "--pin_memory": "no flag (pinned memory is automatic with --use-gpu)",
    **{flag: None for flag in ("--limit_val_batches", "--limit_test_batches", "--print_lr", "--allow_tf32",
                               "--print_sharding_plan", "--collect_multi_hot_freqs_stats",
                               "--drop_last_training_batch", "--shuffle_batches")},
}


# the original dlrm_s_pytorch.py's flags: their abbreviations keep the meaning they had there
ORIGINAL_FLAGS = """--arch-sparse-feature-size --arch-embedding-size --arch-mlp-bot --arch-mlp-top
--arch-interaction-op --arch-interaction-itself --weighted-pooling --md-flag --md-threshold --md-temperature
--md-round-dims --qr-flag --qr-threshold --qr-operation --qr-collisions --activation-function --loss-function
--loss-weights --loss-threshold --round-targets --data-size --num-batches --data-generation --rand-data-dist
--rand-data-min --rand-data-max --rand-data-mu --rand-data-sigma --data-trace-file --data-set --raw-data-file
--processed-data-file --data-randomize --data-trace-enable-padding --max-ind-range --data-sub-sample-rate
--num-indices-per-lookup --num-indices-per-lookup-fixed --num-workers --memory-map --mini-batch-size --nepochs
--learning-rate --print-precision --numpy-rand-seed --sync-dense-params --optimizer --dataset-multiprocessing
--inference-only --quantize-mlp-with-bit --quantize-emb-with-bit --save-onnx --use-gpu --local_rank
--dist-backend --print-freq --test-freq --test-mini-batch-size --test-num-workers --print-time --print-wall-time
--debug-mode --enable-profiling --plot-compute-graph --tensor-board-filename --save-model --load-model
--mlperf-logging --mlperf-acc-threshold --mlperf-auc-threshold --mlperf-bin-loader --mlperf-bin-shuffle
--mlperf-grad-accum-iter --lr-num-warmup-steps --lr-decay-start-step --lr-num-decay-steps""".split()


class CommandLineParser(argparse.ArgumentParser):
    """Errors as one line `prog: error: ...` (exit 2); an unknown flag names the closest known one.
    `foreign_flags`: {flag of the program `foreign_program`: what to use instead (None: nothing)}, named when
    given (before argparse would take one as an abbreviation of a flag here, as `--adagrad` of `--adagrad-eps`).
    `established_flags`: flags whose abbreviations must keep their meaning when flags are added (an abbreviation
    that matches several flags, only one of them established, is that one)."""

    def __init__(self, *args, foreign_flags=None, foreign_program="", established_flags=(), **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.foreign_flags, self.foreign_program = foreign_flags or {}, foreign_program
        self.established_flags = set(established_flags)

    def _get_option_tuples(self, option_string):
        # argparse's matches of an abbreviation; ambiguous only when they are several flags, not one flag's
        # spellings (--local: --local_rank, --local-rank), and not when one of them is established
        tuples = super()._get_option_tuples(option_string)
        if len({id(t[0]) for t in tuples}) > 1:
            established = [t for t in tuples if t[1] in self.established_flags]
            if len({id(t[0]) for t in established}) == 1:
                tuples = established
        return tuples[:1] if len({id(t[0]) for t in tuples}) == 1 else tuples

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_args(self, args=None, namespace=None):
        words = sys.argv[1:] if args is None else list(args)
        for word in words:
            if word == "--":
                break
            name = word.split("=", 1)[0]
            if name in self.foreign_flags:
                instead = self.foreign_flags[name]
                self.error(f"{name} is a flag of {self.foreign_program}; "
                           + (f"here: {instead}" if instead else "this trainer has no counterpart"))
        args, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(self.unknown_message(unknown))
        return args

    def known_flags(self) -> list[str]:
        flags = []
        for action in self._actions:
            flags += [o for o in action.option_strings if o.startswith("--")]
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    flags += [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
        return flags

    def unknown_message(self, unknown: list[str]) -> str:
        message = f"unrecognized arguments: {' '.join(unknown)}"
        for word in unknown:
            if word.startswith("-"):
                name = "--" + word.split("=", 1)[0].lstrip("-")
                close = difflib.get_close_matches(name, self.known_flags(), n=1, cutoff=0.6)
                if close:
                    return f"{message} (did you mean {close[0]}?)"
        return message


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the flag help; the epilog's example lines kept as written."""


def add_bool_flag(group, name: str, default: bool, help: str) -> argparse.Action:
    """A boolean flag: bare `--x` means True, `--x=False` / `--x=0` mean False."""
    return group.add_argument(name, type=parse_bool, nargs="?", const=True, default=default, metavar="BOOL", help=help)


def add_number(group, name: str, kind, default, valid: Range, help: str, aliases=(), **kwargs) -> argparse.Action:
    """A numeric flag (`kind` int, float or a dash_separated list) with its valid range."""
    action = group.add_argument(name, *aliases, type=kind, default=default, help=help, **kwargs)
    action.valid_range = valid
    return action


def add_data_flags(group, data_sets, raw_required: bool = False, bin_loader: bool = True):
    """The Criteo data flags that both the trainer and `data_utils.py preprocess` take (`bin_loader`:
    with --mlperf-bin-loader)."""
    group.add_argument("--data-set", type=str, default=data_sets[0], choices=list(data_sets), help="Criteo data set")
    group.add_argument("--raw-data-file", type=str, default="", required=raw_required,
                       help="raw Criteo data: the Kaggle train.txt, or the prefix of the Terabyte day files "
                            "(<prefix>_0 .. <prefix>_23)")
    group.add_argument("--processed-data-file", type=str, default="",
                       help="processed data: a directory (given with or without .npz), or the original's .npz")
    add_number(group, "--max-ind-range", int, -1, at_least(1, -1, 0),
               "hash categorical values into [0, M) (-1 or 0: number them with a dictionary)")
    add_number(group, "--data-sub-sample-rate", float, 0.0, between(0.0, 1.0),
               "drop this fraction of negatives from the training days")
    add_bool_flag(group, "--dataset-multiprocessing", False, "preprocess with all cores")
    if bin_loader:
        add_bool_flag(group, "--mlperf-bin-loader", False,
                      "the binary one-file-per-split format (train/test/val.bin next to the processed data)")


MULTI_HOT_DISTRIBUTIONS = ("uniform", "pareto")  # dlrmkit.multihot's, named here so parsing needs no torch


def add_multi_hot_flags(group, required: bool = False):
    """--multi-hot-sizes and --multi-hot-distribution-type (dlrmkit.multihot), for both command lines."""
    add_number(group, "--multi-hot-sizes", dash_separated(int, commas=True), "" if not required else None, at_least(1),
               "multi-hot bag size of each table, dash- or comma-separated (one value: all tables); each id "
               "becomes itself plus size-1 synthetic ids (MLPerf DLRMv2)" + ("" if required else ". Empty: one-hot"),
               required=required)
    group.add_argument("--multi-hot-distribution-type", type=str, default="uniform", choices=list(MULTI_HOT_DISTRIBUTIONS),
                       help="distribution of the synthetic ids: uniform over the table, or Pareto (a=0.25) "
                            "modulo its rows")


# ============================================================================ which flags have an effect
@dataclasses.dataclass(frozen=True)
class Condition:
    """When a flag has an effect: `holds(args, distributed)`; `needs` names it (`--md-flag`), and
    `unless(args)` says why it has none, completing "has no effect ..." (e.g. "without --md-flag")."""

    name: str
    holds: Callable[[argparse.Namespace, bool], bool]
    needs: str
    unless: Callable[[argparse.Namespace], str]


def default_value(parser: argparse.ArgumentParser, args: argparse.Namespace, dest: str, derived: dict):
    """The value `dest` has when its flag is not given: the parser's default (converted by the
    flag's type, as argparse does), or for a `derived` flag the value of the flag it copies."""
    if dest in derived:
        return getattr(args, derived[dest])
    default = parser.get_default(dest)
    action = next(a for a in parser._actions if a.dest == dest)
    if isinstance(default, str) and action.type is not None:
        default = action.type(default)
    return default


def ineffective_flags(parser, args, applies: dict, distributed: bool, derived: dict | None = None):
    """(flag, condition) for each flag of `applies` (flag -> its Conditions) set to another value than
    its default although the first failing condition says it has no effect in this run."""
    dests = {o: a.dest for a in parser._actions for o in a.option_strings}
    found = []
    for flag, conditions in applies.items():
        dest = dests[flag]
        if getattr(args, dest) == default_value(parser, args, dest, derived or {}):
            continue
        failing = next((c for c in conditions if not c.holds(args, distributed)), None)
        if failing is not None:
            found.append((flag, failing))
    return found


def program_name(default: str) -> str:
    """The name the user typed for this program: the console script (`dlrm`), else `default`."""
    name = os.path.basename(sys.argv[0] or "")
    return name if name in ("dlrm", "dlrm.exe") else default
