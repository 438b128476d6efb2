"""Flag definitions and checks: valid ranges, where flags have an effect, memory, paths, the command line."""

import gzip
import math
import os
import subprocess
import sys

import pytest

import data_utils
import dlrm_s_pytorch as dlrm
from conftest import ROOT
from helpers import fake_kaggle, fake_terabyte
from dlrmkit import flags, memory

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models


def numeric_actions(parser):
    return [a for a in parser._actions if flags.number_type(a) is not None]


def one_line_error(code, err, *parts):
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("dlrm_s_pytorch.py: error: ") or err.startswith("data_utils.py: error: "), err
    for part in parts:
        assert part in err, err


# ============================================================================ valid ranges
def out_of_range_values(action):
    """What a user can type for `action` that lies outside its declared range."""
    valid = action.valid_range
    kind = flags.number_type(action)
    candidates = [valid.outside()] + ([math.inf, math.nan] if kind is float else [2**63])
    texts = []
    for value in candidates:
        text = str(int(value)) if kind is int else str(value)
        if action.type is not kind and text.startswith("-"):
            continue  # a dash-separated list cannot hold a negative number
        texts.append(text)
    return texts


TRAINER_NUMBERS = [(a.option_strings[0], text) for a in numeric_actions(dlrm.build_parser())
                   for text in out_of_range_values(a)]


def test_every_numeric_flag_declares_a_valid_range():
    for parser in (dlrm.build_parser(), data_utils.build_parser()._subparsers._group_actions[0].choices["make-fake"],
                   data_utils.build_parser()._subparsers._group_actions[0].choices["preprocess"]):
        missing = [a.option_strings[0] for a in numeric_actions(parser) if getattr(a, "valid_range", None) is None]
        assert missing == []
    assert len(TRAINER_NUMBERS) > 80 and len(DATA_UTILS_NUMBERS) >= 10


@pytest.mark.parametrize("flag,value", TRAINER_NUMBERS)
def test_every_numeric_flag_refuses_a_value_outside_its_range(run_main, flag, value):
    code, out, err = run_main(f"{flag}={value}")
    one_line_error(code, err, flag)
    assert out == ""  # before any work


DATA_UTILS_REQUIRED = {"make-fake": ["--rows=5", "--out=x"], "preprocess": ["--raw-data-file=x"],
                       "multi-hot": ["--raw-data-file=x", "--multi-hot-sizes=2", "--out=x"]}
DATA_UTILS_NUMBERS = [(command, a.option_strings[0], text)
                      for command, sub in data_utils.build_parser()._subparsers._group_actions[0].choices.items()
                      for a in numeric_actions(sub) for text in out_of_range_values(a)]


@pytest.mark.parametrize("command,flag,value", DATA_UTILS_NUMBERS)
def test_data_utils_numeric_flags_are_checked_too(capsys, command, flag, value):
    code = data_utils.main([command, *DATA_UTILS_REQUIRED[command], f"{flag}={value}"])
    one_line_error(code, capsys.readouterr().err, flag)


@pytest.mark.parametrize("argv,message", [
    (["--rows=5", "--days=24"], "--rows 5 cannot fill 24 day files (a day file holds at least one row)"),
    (["--rows=50", "--gzip"], "--gzip compresses day files (--days > 1): the kaggle train.txt is read uncompressed"),
])
def test_make_fake_refuses_files_it_could_not_make_useful(tmp_path, capsys, argv, message):
    code = data_utils.main(["make-fake", f"--out={tmp_path / 'day'}", *argv])
    assert code == 1 and capsys.readouterr().err == f"data_utils.py: error: {message}\n" and os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv,message", [
    (["--learning-rate=-1"], "--learning-rate must be at least 0, got -1"),
    (["--num-indices-per-lookup=-3"], "--num-indices-per-lookup must be at least 0, got -3"),
    (["--rand-data-dist=gaussian", "--rand-data-min=5", "--rand-data-max=1"], "--rand-data-min 5 is above --rand-data-max 1"),
    (["--print-precision=-3"], "--print-precision must be in [0, 17], got -3"),
    (["--numpy-rand-seed=-1"], "--numpy-rand-seed must be in [0, 4294967295], got -1"),
    (["--loss-threshold=0.7"], "--loss-threshold must be in [0, 0.5), got 0.7"),
    (["--test-mini-batch-size=0"], "--test-mini-batch-size must be -1 or at least 1, got 0"),
    (["--max-ind-range=-2"], "--max-ind-range must be -1, 0 or at least 1, got -2"),
    (["--quantize-mlp-with-bit=4", "--inference-only"], "--quantize-mlp-with-bit must be 8, 16 or 32, got 4"),
    (["--dist-timeout=0"], "--dist-timeout must be in (0, 31536000], got 0"),
    (["--arch-mlp-bot=4-0-2"], "--arch-mlp-bot: every value must be at least 1, got 4-0-2"),
    (["--mini-batch-size=99999999999999999999"], "--mini-batch-size: 99999999999999999999 does not fit a 64-bit integer"),
    (["--loss-function=wbce", "--loss-weights=0-0"], "--loss-weights: at least one weight must be positive"),
    (["--rand-data-dist=gaussian", "--rand-data-max=100", "--arch-embedding-size=4-50"],
     "gaussian ids are the values between them truncated (0 .. 100), but the smallest table of --arch-embedding-size "
     "has 4 rows"),  # the original: an index error; clamped silently before
    (["--rand-data-dist=gaussian", "--rand-data-max=1e300"], "gaussian ids are the values between them truncated"),
    (["--lr-num-warmup-steps=5", "--lr-num-decay-steps=3", "--lr-decay-start-step=1"],
     "--lr-decay-start-step 1 is before the end of warmup"),
])
def test_reported_bad_values_are_one_line_errors(run_main, argv, message):
    code, out, err = run_main(*argv)
    one_line_error(code, err, message)


# ============================================================================ shared data flags
def preprocess_parser():
    return data_utils.build_parser()._subparsers._group_actions[0].choices["preprocess"]


def test_data_flags_are_the_same_in_the_trainer_and_data_utils():
    trainer = {o: a for a in dlrm.build_parser()._actions for o in a.option_strings}
    shared = [a for a in preprocess_parser()._actions if a.option_strings and a.option_strings[0] != "-h"]
    assert {a.option_strings[0] for a in shared} == {
        "--data-set", "--raw-data-file", "--processed-data-file", "--max-ind-range", "--data-sub-sample-rate",
        "--dataset-multiprocessing", "--mlperf-bin-loader", "--data-randomize", "--memory-map"}  # the last two: the
    for action in shared:  # original's data_utils.py command line
        mine = trainer[action.option_strings[0]]
        assert (mine.default, mine.choices, getattr(mine, "valid_range", None), mine.const, mine.nargs) == (
            action.default, action.choices, getattr(action, "valid_range", None), action.const, action.nargs)
        assert getattr(mine.type, "__name__", None) == getattr(action.type, "__name__", None)


@pytest.mark.parametrize("text,value", [("--dataset-multiprocessing=True", True), ("--dataset-multiprocessing", True),
                                        ("--dataset-multiprocessing=0", False), ("--mlperf-bin-loader=yes", True)])
def test_boolean_data_flags_parse_alike_in_both_programs(text, value):
    dest = text[2:].split("=")[0].replace("-", "_")
    ours = preprocess_parser().parse_args(["--raw-data-file=x", text])
    assert getattr(ours, dest) is value and getattr(dlrm.parse_args([text]), dest) is value


# ============================================================================ where flags have an effect
# for each condition of the table: flags that make it hold, flags that make it fail (and distributed or not)
CONDITION_CASES = {
    "data from dataset": (["--data-generation=dataset", "--raw-data-file=x", "--arch-mlp-bot=13-3-2"], []),
    "data from random or synthetic": ([], ["--data-generation=dataset", "--raw-data-file=x", "--arch-mlp-bot=13-3-2"]),
    "data from random": ([], ["--data-generation=synthetic"]),
    "data from synthetic": (["--data-generation=synthetic"], []),
    "--rand-data-dist=gaussian": (["--rand-data-dist=gaussian"], []),
    "--mlperf-bin-loader": (["--mlperf-bin-loader"], []),
    "--mlperf-bin-loader=False": ([], ["--mlperf-bin-loader"]),
    "training": ([], ["--inference-only"]),
    "testing": (["--test-freq=3"], []),
    "sized by --data-size": ([], ["--num-batches=2"]),
    "decaying": (["--lr-num-decay-steps=3"], []),
    "distributed": ("distributed", "single process"),
    "--md-flag": (["--md-flag"], []),
    "--qr-flag": (["--qr-flag"], []),
    "--loss-function=wbce": (["--loss-function=wbce"], []),
    "--arch-interaction-op=dot": ([], ["--arch-interaction-op=cat"]),
    "--arch-interaction-op=dcn": (["--arch-interaction-op=dcn"], []),
    "adagrad": (["--optimizer=rwsadagrad"], ["--optimizer=sgd"]),
    "--arch-interaction-op=projection": (["--arch-interaction-op=projection"], []),
    "--save-onnx": (["--save-onnx"], []),
    "--enable-profiling": (["--enable-profiling"], []),
    "--plot-compute-graph": (["--plot-compute-graph"], []),
    "multi-hot": (["--multi-hot-sizes=2"], []),
    "generated bags": ([], ["--multi-hot-sizes=2"]),
    "--quantize-mlp-with-bit=32": ([], ["--quantize-mlp-with-bit=8", "--inference-only"]),
    "memory-map": ([], ["--mlperf-bin-loader"]),  # (no original's --memory-map files there)
}


def another_value(action) -> str:
    """A valid value of the flag other than its default."""
    special = {"--rand-data-min": "0.5", "--rand-data-max": "1.5", "--dist-backend": "gloo",  # gaussian ids: rows
               "--test-num-workers": "1", "--test-mini-batch-size": "3",  # defaults: -1, the training value
               # ending in a multiple of the embedding dimension
               "--interaction-branch1-layer-sizes": "6-4", "--interaction-branch2-layer-sizes": "6-4"}
    if action.option_strings[0] in special:
        return special[action.option_strings[0]]
    if action.type is flags.parse_bool:
        return str(not action.default)
    if action.choices:
        return next(c for c in action.choices if c != action.default)
    kind = flags.number_type(action)
    if kind is None:
        return "some_file"
    if action.type is not kind:  # a dash-separated list
        return "2-2" if kind is float else "5-4-3"
    default = action.default if isinstance(action.default, (int, float)) else 0
    candidates = [kind(default + 1), kind(2), kind(1), 0.5, kind(default - 1)]
    return str(next(v for v in candidates if v != default and v in action.valid_range))


def notes_for(argv, distributed):
    return dlrm.validate_args(dlrm.parse_args(argv), distributed=distributed)


def situation(cases):
    argv, distributed = [], False
    for case in cases:
        if case == "distributed":
            distributed = True
        elif case != "single process":
            argv += case
    return argv, distributed


@pytest.mark.parametrize("flag", list(dlrm.APPLIES_WHEN))
def test_every_flag_of_the_table_notes_exactly_when_it_has_no_effect(flag):
    parser = dlrm.build_parser()
    action = next(a for a in parser._actions if flag in a.option_strings)
    given = [f"{flag}={another_value(action)}"]
    conditions = dlrm.APPLIES_WHEN[flag]
    assert all(c.name in CONDITION_CASES for c in conditions)
    holding = [CONDITION_CASES[c.name][0] for c in conditions]
    argv, distributed = situation(holding)
    assert [n for n in notes_for(argv + given, distributed) if flag + " " in n] == []
    for k, condition in enumerate(conditions):
        argv, distributed = situation(holding[:k] + [CONDITION_CASES[condition.name][1]] + holding[k + 1:])
        expected = f"{flag} has no effect {condition.unless(dlrm.parse_args(argv + given))}"
        if flag in dlrm.REFUSED_WITHOUT_EFFECT:
            with pytest.raises(dlrm.DLRMError, match=f"{flag} needs"):
                notes_for(argv + given, distributed)
        else:
            assert f"note: {expected}" in notes_for(argv + given, distributed)


def test_flags_given_their_default_value_get_no_note():
    parser = dlrm.build_parser()
    argv = [f"{o}={parser.get_default(a.dest)}" for a in parser._actions for o in a.option_strings[:1]
            if o in dlrm.APPLIES_WHEN and parser.get_default(a.dest) not in (None, "")]
    assert len(argv) > 30 and notes_for(argv, False) == []


@pytest.mark.parametrize("argv,notes", [
    (["--data-set=terabyte", "--data-randomize=day"],
     ["--data-set has no effect without --data-generation=dataset",
      "--data-randomize has no effect without --data-generation=dataset"]),
    (["--num-batches=2", "--mini-batch-size=4", "--data-size=8"],
     ["--data-size has no effect with --num-batches=2: the training and test sets have --num-batches x "
      "--mini-batch-size = 8 samples"]),
    (["--lr-decay-start-step=5"], ["--lr-decay-start-step has no effect without --lr-num-decay-steps"]),
    (["--mini-batch-size=2", "--test-mini-batch-size=4"], ["--test-mini-batch-size has no effect without --test-freq"]),
    # a value the flag could not take when it has an effect: noted as well (the original ignores it)
    (["--rand-data-min=5"], ["--rand-data-min has no effect without --rand-data-dist=gaussian"]),
    (["--inference-only", "--nepochs=0", "--print-freq=0"], ["--nepochs has no effect with --inference-only",
                                                             "--print-freq has no effect with --inference-only"]),
    (["--md-flag"], ["--md-flag has no effect: no table has more than --md-threshold=200 rows"]),
    (["--md-flag", "--md-threshold=0", "--qr-flag", "--qr-threshold=0"],
     ["--md-flag has no effect: the tables with more than --md-threshold=0 rows have more than --qr-threshold=0: "
      "QR tables"]),
])
def test_notes_go_to_stderr_and_the_run_goes_on(run_main, argv, notes):
    code, out, err = run_main(*argv)
    assert code == 0 and ("Finished training it" in out or "Testing for inference only" in out)
    for note in notes:
        assert f"note: {note}" in err and note not in out


@pytest.mark.parametrize("argv", [
    ["--data-size=6000", "--num-batches=4", "--mini-batch-size=8"],  # the test set has 6000 samples
    ["--lr-num-warmup-steps=3"],
    ["--lr-num-decay-steps=3"],
    ["--lr-num-decay-steps=3", "--lr-decay-start-step=2"],
])
def test_flags_that_have_an_effect_get_no_note(run_main, argv):
    code, out, err = run_main(*argv)
    assert code == 0 and "has no effect" not in err


def test_data_size_sizes_the_test_set_under_num_batches(run_main):
    args = dlrm.parse_args(["--data-size=6000", "--num-batches=4", "--mini-batch-size=8"])
    train, test, _, _ = dlrm.make_datasets(args)
    assert len(train) == 4 and dlrm.dataset_samples(test, 8) == 6000


def test_dataset_run_notes_random_data_flags(tmp_path, run_main):
    raw = fake_kaggle(tmp_path, 300)
    code, out, err = run_main("--data-generation=dataset", f"--raw-data-file={raw}", "--arch-mlp-bot=13-4-2",
                              "--mini-batch-size=64", "--num-batches=1", "--data-size=5",
                              "--num-indices-per-lookup=3", "--rand-data-dist=gaussian")
    assert code == 0, err
    for flag in ("--data-size", "--num-indices-per-lookup", "--rand-data-dist"):
        assert f"note: {flag} has no effect" in err


# ============================================================================ memory
def test_memory_estimate_lets_the_kaggle_model_run_on_24_gib():
    counts = data_utils.KAGGLE_COUNTS
    width = dlrm.interaction_width("dot", False, len(counts), 16, 16)
    for optimizer in ("sgd", "adagrad", "rwsadagrad"):
        needed = memory.estimate_memory(counts, 16, [[13, 512, 256, 64, 16], [width, 512, 256, 1]], 16384, 26.0,
                                        optimizer, num_workers=2)
        assert 33_000_000 * 16 * 4 < needed.parameters and needed.total < 24 * memory.GIB / 2


def test_memory_estimate_counts_batch_ids_and_optimizer_state():
    small = memory.estimate_memory([1000], 4, [[4, 4]], 10, 2.0, "sgd")
    assert memory.estimate_memory([1000], 4, [[4, 4]], 20, 2.0, "sgd").batch == 2 * small.batch
    assert memory.estimate_memory([1000], 4, [[4, 4]], 10, 4.0, "sgd").batch > small.batch
    assert memory.estimate_memory([1000], 4, [[4, 4]], 10, 2.0, "adagrad").optimizer_state >= 16000
    assert memory.estimate_memory([1000], 4, [[4, 4]], 10, 2.0, "sgd", num_workers=2).loader == 6 * 10 * (96 + 20)
    # 1000 * 4 table floats, 4 * 4 + 4 MLP weights; their gradients only when training
    assert memory.estimate_memory([1000], 4, [[4, 4]], 10, 2.0, "sgd").parameters == 4 * (4000 + 2 * 20)
    assert memory.estimate_memory([1000], 4, [[4, 4]], 10, 2.0, None).parameters == 4 * (4000 + 20)
    assert memory.mean_bag_size(4, 50, False) == 2.125 and memory.mean_bag_size(4, 50, True) == 50
    assert memory.mean_bag_size(1, 10, False) == memory.mean_bag_size(10, 1, False) == 1


def test_huge_table_stops_before_allocating(run_main):
    code, out, err = run_main("--arch-embedding-size=99999999999999-10")
    one_line_error(code, err, "this run needs about", "GiB of memory", "but this process may use", "smaller tables")


def test_huge_synthetic_data_stops_before_it_is_made(run_main):
    code, out, err = run_main("--data-generation=synthetic", f"--data-trace-file={os.path.join(ROOT, 'bench', 'traces', 'dist_emb_j.log')}",
                              "--data-size=100000000000000")
    one_line_error(code, err, "needs about", "a smaller --data-size")


def test_huge_batch_under_an_address_space_limit_stops_with_both_figures(tmp_path):
    command = (f"ulimit -v 6000000 && exec {sys.executable} {os.path.join(ROOT, 'dlrm_s_pytorch.py')} "
               "--mini-batch-size=20000000 --data-size=20000000 --num-indices-per-lookup=50")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    one_line_error(result.returncode, result.stderr, "needs about", "ulimit -v", "--mini-batch-size")


def test_memory_check_uses_the_data_sets_table_sizes(tmp_path, run_main, monkeypatch):
    monkeypatch.setattr(memory, "usable_memory", lambda: (8 * memory.GIB, "a test limit"))
    raw = fake_kaggle(tmp_path, 1000)
    wide = ["--arch-sparse-feature-size=1000000", "--arch-mlp-bot=13-1000000"]
    assert dlrm.estimate_memory(dlrm.parse_args(wide), 13, [4, 3, 2]).total < memory.GIB  # random data's tables
    code, out, err = run_main("--data-generation=dataset", f"--raw-data-file={raw}", *wide)
    last = err.splitlines()[-1] + "\n"
    one_line_error(code, last, "needs about", "may use 8.0 GiB (a test limit)", "smaller tables")
    assert "Processed 1000 rows" in out  # checked once the data's table sizes are known


def test_model_on_a_gpu_is_checked_against_the_gpu_and_its_inputs_against_host_memory(monkeypatch):
    import torch

    args = dlrm.parse_args(["--arch-embedding-size=100000000-10", "--arch-sparse-feature-size=2",
                            "--arch-mlp-bot=4-3-2"])  # 0.75 GiB of tables
    monkeypatch.setattr(memory, "usable_memory", lambda: (memory.GIB // 2, "a host limit"))
    monkeypatch.setattr(memory, "device_memory", lambda device: (8 * memory.GIB, "a device limit"))
    cuda = torch.device("cuda", 0)
    dlrm.check_memory(args, 4, args.arch_embedding_size, None, cuda)  # the tables fit the device
    with pytest.raises(dlrm.DLRMError, match="of memory .parameters .*a host limit"):
        dlrm.check_memory(args, 4, args.arch_embedding_size, None, torch.device("cpu"))
    monkeypatch.setattr(memory, "device_memory", lambda device: (memory.GIB // 2, "the free memory of cuda:0"))
    with pytest.raises(dlrm.DLRMError, match="of memory on cuda:0 .parameters .*smaller tables"):
        dlrm.check_memory(args, 4, args.arch_embedding_size, None, cuda)


@pytest.mark.parametrize("flags,remedy", [
    (["--arch-interaction-op=dcn", "--dcn-low-rank-dim=300000000"], "a smaller --dcn-num-layers or --dcn-low-rank-dim"),
    (["--arch-interaction-op=projection", "--interaction-branch1-layer-sizes=400000000",
      "--interaction-branch2-layer-sizes=4"],
     "a smaller --interaction-branch1-layer-sizes or --interaction-branch2-layer-sizes"),
    (["--arch-mlp-top=4000000000-1"], "a smaller --arch-mlp-top"),
    (["--arch-mlp-top=200000000-1", "--mini-batch-size=64", "--data-size=64"],
     "a smaller --arch-mlp-top or --mini-batch-size"),
    (["--arch-mlp-top=200000000-1", "--mini-batch-size=64", "--data-size=64", "--inference-only"],
     "a smaller --arch-mlp-top or --test-mini-batch-size"),  # no training: its test batch
    (["--multi-hot-sizes=30000000"],
     "a smaller --mini-batch-size (or --test-mini-batch-size, --multi-hot-sizes, --num-workers)"),
    (["--mini-batch-size=300000000", "--data-size=300000000"],
     "a smaller --mini-batch-size (or --test-mini-batch-size, --num-indices-per-lookup, --num-workers)"),
    (["--mini-batch-size=300000000", "--data-size=300000000", "--test-mini-batch-size=1000", "--inference-only"],
     None),  # the training batch does not count: no training
    (["--test-mini-batch-size=300000000", "--data-size=300000000", "--inference-only"],
     "a smaller --test-mini-batch-size (or --num-indices-per-lookup, --test-num-workers)"),
    (["--test-mini-batch-size=300000000", "--data-size=300000000", "--test-freq=1"],
     "a smaller --test-mini-batch-size (or --mini-batch-size, --num-indices-per-lookup, --test-num-workers)"),
    (["--mini-batch-size=300000000"], None),  # a batch holds at most --data-size samples
    (["--arch-embedding-size=20000000000-3"],
     "smaller tables (--arch-embedding-size, or --max-ind-range for a data set) or a smaller "
     "--arch-sparse-feature-size"),
])
def test_memory_error_names_the_flags_that_size_the_largest_part(flags, remedy, monkeypatch):
    monkeypatch.setattr(memory, "usable_memory", lambda: (memory.GIB, "a test limit"))
    args = dlrm.parse_args(["--arch-sparse-feature-size=4", "--arch-mlp-bot=5-8-4", "--arch-embedding-size=20-30-40",
                            "--arch-mlp-top=8-1", "--mini-batch-size=8", *flags])
    if remedy is None:  # fits
        dlrm.check_memory(args, 5, args.arch_embedding_size)
        return
    with pytest.raises(dlrm.DLRMError) as error:
        dlrm.check_memory(args, 5, args.arch_embedding_size)
    assert str(error.value).split("; try ", 1)[1] == remedy
    assert "--num-indices-per-lookup" not in str(error.value) or not args.multi_hot_sizes


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_cgroup_limit_less_non_cache_usage(tmp_path, version):
    files = {"v2": ("memory.max", "memory.current", "file"), "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                                     "total_cache")}[version]
    (tmp_path / files[0]).write_text("1000000\n")
    (tmp_path / files[1]).write_text("600000\n")
    (tmp_path / "memory.stat").write_text(f"anon 400000\n{files[2]} 200000\n")
    assert memory._cgroup_left(str(tmp_path), *files) == 600000
    (tmp_path / files[0]).write_text("max\n" if version == "v2" else f"{2**63 - 4096}\n")
    assert memory._cgroup_left(str(tmp_path), *files) is None


def test_usable_memory_is_positive_and_named():
    usable, why = memory.usable_memory()
    assert usable > 0 and why


# ============================================================================ paths with the hint that fixes them
@pytest.fixture(scope="module")
def raw_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    (root / "kaggle").mkdir()
    (root / "terabyte").mkdir()
    (root / "empty").mkdir()
    (root / "gzipped").mkdir()
    with open(fake_kaggle(root / "kaggle", 100), "rb") as f, gzip.open(root / "gzipped" / "train.txt.gz", "wb") as out:
        out.write(f.read())
    return {"train": str(root / "kaggle" / "train.txt"), "days": fake_terabyte(root / "terabyte", 48),
            "day_5": str(root / "terabyte" / "day_5"), "gzipped": str(root / "gzipped" / "train.txt"),
            "kaggle_dir": str(root / "kaggle"), "terabyte_dir": str(root / "terabyte"), "empty": str(root / "empty")}


@pytest.mark.parametrize("key,data_set,parts", [
    ("days", "kaggle", ["no such file, but", "day_0 exists", "--data-set=terabyte"]),
    ("kaggle_dir", "kaggle", ["is a directory", "train.txt"]),
    ("terabyte_dir", "kaggle", ["is a directory", "--data-set=terabyte", "terabyte/day"]),
    ("empty", "kaggle", ["is a directory", "train.txt"]),
    ("train", "terabyte", ["_0 does not exist", "--data-set=kaggle"]),
    ("terabyte_dir", "terabyte", ["is a directory", "terabyte/day"]),
    ("empty", "terabyte", ["is a directory", "prefix"]),
    ("day_5", "terabyte", ["is one day file", "terabyte/day\n"]),
    ("gzipped", "kaggle", ["no such file, but", "train.txt.gz exists: decompress it first (gunzip"]),
])
def test_raw_data_errors_say_what_is_there_and_which_flags_read_it(raw_files, run_main, capsys, key, data_set, parts):
    path = raw_files[key]
    code, out, err = run_main("--data-generation=dataset", f"--data-set={data_set}", f"--raw-data-file={path}",
                              "--arch-mlp-bot=13-4-2")
    one_line_error(code, err, f"--raw-data-file {path}", *parts)
    assert data_utils.main(["preprocess", f"--data-set={data_set}", f"--raw-data-file={path}"]) == 1
    one_line_error(1, capsys.readouterr().err, *parts)


def test_a_gzipped_kaggle_file_is_refused_before_anything_is_written(raw_files, run_main):
    path = raw_files["gzipped"] + ".gz"
    before = sorted(os.listdir(os.path.dirname(path)))
    code, out, err = run_main("--data-generation=dataset", f"--raw-data-file={path}", "--arch-mlp-bot=13-4-2")
    one_line_error(code, err, f"--raw-data-file {path}: gzip-compressed; the kaggle train.txt must be decompressed "
                   "first (gunzip)")
    assert sorted(os.listdir(os.path.dirname(path))) == before  # no processed folder left behind


def test_processed_data_file_that_is_a_raw_file_says_so(raw_files, run_main):
    code, out, err = run_main("--data-generation=dataset", f"--raw-data-file={raw_files['train']}",
                              f"--processed-data-file={raw_files['train']}", "--arch-mlp-bot=13-4-2")
    one_line_error(code, err, "--processed-data-file", "is a file, not processed data", "--raw-data-file")


def test_processed_data_directory_holding_raw_data_says_so(raw_files, run_main):
    code, out, err = run_main("--data-generation=dataset", f"--processed-data-file={raw_files['terabyte_dir']}",
                              "--arch-mlp-bot=13-4-2")
    one_line_error(code, err, "no processed data", f"--raw-data-file={raw_files['days']} --data-set=terabyte")


def test_tensor_board_directory_that_is_a_file_says_so(tmp_path, run_main):
    path = tmp_path / "events"
    path.write_text("")
    code, out, err = run_main(f"--tensor-board-filename={path}")
    one_line_error(code, err, f"--tensor-board-filename {path}: is a file", "directory")


@pytest.mark.parametrize("argv,parts", [
    (["--load-model={d}"], ["--load-model {d}: is a directory", "checkpoint file"]),
    (["--load-model={d}/none.pt"], ["--load-model {d}/none.pt: no such file"]),
    (["--data-generation=synthetic", "--data-trace-file={d}"], ["--data-trace-file {d}: is a directory", "dist_emb_j.log"]),
    (["--save-model={d}"], ["--save-model {d}: is a directory", "model.pt"]),
    (["--metrics-log-file={d}"], ["--metrics-log-file {d}: is a directory"]),
    (["--save-onnx", "--onnx-file={d}"], ["--onnx-file {d}: is a directory"]),
    (["--enable-profiling", "--profiling-trace-file={d}"], ["--profiling-trace-file {d}: is a directory"]),
    (["--plot-compute-graph", "--compute-graph-file={d}"], ["--compute-graph-file {d}: is a directory"]),
])
def test_paths_that_are_directories_say_so_before_any_work(tmp_path, run_main, argv, parts):
    code, out, err = run_main(*[a.format(d=tmp_path) for a in argv])
    one_line_error(code, err, *[p.format(d=tmp_path) for p in parts])
    assert out == ""


# ============================================================================ the command line
DASH_LIST_FLAGS = [a.option_strings[0] for a in dlrm.build_parser()._actions
                   if getattr(a.type, "element_type", None) is not None]


@pytest.mark.parametrize("flag", DASH_LIST_FLAGS)
@pytest.mark.parametrize("text", ["-5", "5--5", "4-3-", "-0.5-1", "-"])
def test_dash_lists_refuse_empty_parts_instead_of_dropping_a_sign(capsys, flag, text):
    with pytest.raises(SystemExit) as stop:
        dlrm.main([f"{flag}={text}"])
    captured = capsys.readouterr()
    assert stop.value.code == 2 and captured.out == "" and captured.err.count("\n") == 1
    assert f"argument {flag}: empty part in {text!r}" in captured.err
    assert "negative values cannot be written in a dash-separated list" in captured.err


def test_every_dash_list_flag_is_covered():
    assert set(DASH_LIST_FLAGS) >= {"--arch-embedding-size", "--arch-mlp-bot", "--arch-mlp-top", "--loss-weights"}


def test_unknown_flag_suggests_the_closest(capsys):
    with pytest.raises(SystemExit) as stop:
        dlrm.main(["--mini-bach-size=2"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert "did you mean --mini-batch-size?" in err and "--mini-bach-size" in err


@pytest.mark.parametrize("argv,message", [
    (["--optimizer=adagrad", "--adagrad"], "--adagrad is a flag of torchrec_dlrm/dlrm_main.py; here: "
                                           "--optimizer=adagrad --adagrad-eps=1e-8"),  # not --adagrad-eps abbreviated
    (["--adagrad=1"], "--adagrad is a flag of torchrec_dlrm/dlrm_main.py; here: --optimizer=adagrad"),
    (["--over_arch_layer_sizes", "1024,1"], "here: --arch-mlp-top (widths joined by dashes)"),
    (["--embedding_dim=128"], "here: --arch-sparse-feature-size"),
    (["--allow_tf32"], "--allow_tf32 is a flag of torchrec_dlrm/dlrm_main.py; this trainer has no counterpart"),
])
def test_torchrec_flags_name_what_this_trainer_takes(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        dlrm.parse_args(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and err.count("\n") == 1


def test_unknown_data_utils_flag_suggests_the_closest(capsys):
    with pytest.raises(SystemExit) as stop:
        data_utils.main(["preprocess", "--raw-data-file=x", "--dataset-multiprocesing"])
    assert stop.value.code == 2 and "did you mean --dataset-multiprocessing?" in capsys.readouterr().err


def test_version_comes_from_setup_cfg_in_a_checkout(capsys):
    import configparser

    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    with pytest.raises(SystemExit) as stop:
        dlrm.main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip().endswith(f" {config['metadata']['version']}")


def test_version_comes_from_package_metadata_when_installed(monkeypatch, tmp_path):
    monkeypatch.setattr(dlrm, "__file__", str(tmp_path / "dlrm_s_pytorch.py"))  # no setup.cfg next to it
    monkeypatch.setattr(dlrm.importlib.metadata, "version", lambda name: "9.8.7" if name == "dlrm" else None)
    assert dlrm.package_version() == "9.8.7"


def test_help_names_the_installed_command_and_ends_with_two_examples(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/dlrm", "--help"])
    text = dlrm.build_parser().format_help()
    assert text.startswith("usage: dlrm ")
    examples = [line for line in text.splitlines() if line.startswith("  dlrm ")]
    assert len(examples) == 2 and "--raw-data-file=./input/train.txt" in examples[1]
    assert text.rstrip().endswith("--test-mini-batch-size=16384")  # the help ends with the examples
    monkeypatch.setattr(sys, "argv", ["/work/dlrm_s_pytorch.py"])
    assert "  python dlrm_s_pytorch.py --arch-embedding-size" in dlrm.build_parser().format_help()


def test_help_examples_run(tmp_path):
    text = dlrm.build_parser("dlrm_s_pytorch.py").format_help().split("examples:")[1]
    first = text.split("  # ")[1].split("\n", 1)[1].split("  # ")[0].replace("\\\n", " ").split()
    assert first[:2] == ["python", "dlrm_s_pytorch.py"]
    args = dlrm.parse_args(first[2:])
    assert dlrm.validate_args(args, distributed=False) == []


@pytest.mark.parametrize("argv,lowered", [
    (["--num-workers=4"], "--num-workers=4"),  # test workers follow it, and no test runs
    (["--num-workers=4", "--test-freq=1"], "--num-workers=4"),  # test workers follow it: not given
    (["--num-workers=4", "--test-num-workers=3"], "--num-workers=4"),  # no test runs
    (["--test-num-workers=3", "--test-freq=1"], "--test-num-workers=3"),
    (["--num-workers=4", "--test-num-workers=3", "--inference-only"], "--num-workers=4 and --test-num-workers=3"),
])
def test_worker_note_names_only_given_flags_that_matter(run_main, monkeypatch, argv, lowered):
    monkeypatch.setattr(dlrm, "usable_cpus", lambda: 1)
    code, out, err = run_main(*argv, "--mini-batch-size=2", "--data-size=4")
    assert code == 0
    notes = [line for line in err.splitlines() if "lowered to" in line]
    assert notes == [f"note: {lowered} lowered to 1, the number of CPUs this process may use"]


def test_workers_above_the_cpu_count_are_lowered_with_one_note(run_main):
    args = dlrm.parse_args(["--num-workers=64", "--test-num-workers=1"])
    assert dlrm.fit_workers_to_cpus(args, cpus=2) == [
        "note: --num-workers=64 lowered to 2, the number of CPUs this process may use"]
    assert (args.num_workers, args.test_num_workers) == (2, 1)
    assert dlrm.fit_workers_to_cpus(args, cpus=2) == []
    code, out, err = run_main(f"--num-workers={dlrm.usable_cpus() + 50}", "--mini-batch-size=2", "--data-size=4")
    assert code == 0 and err.count("lowered to") == 1 and "Finished training it 2/2" in out


def test_a_test_pass_counts_on_top_of_the_training_batch_it_follows():
    """Evaluation runs while the last training batch is still held: both batches count."""
    flags = ["--mini-batch-size=400000", "--data-size=400000", "--num-indices-per-lookup=50",
             "--arch-embedding-size=1000-1000-1000"]
    without_tests = dlrm.estimate_memory(dlrm.parse_args(flags), 4, [1000, 1000, 1000])
    with_tests = dlrm.estimate_memory(dlrm.parse_args(flags + ["--test-freq=1"]), 4, [1000, 1000, 1000])
    assert with_tests.total > 1.8 * without_tests.total


def test_mlperf_logging_without_scikit_learn_stops_naming_the_package(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else find_spec(name, *a))
    with pytest.raises(dlrm.DLRMError, match="--mlperf-logging needs scikit-learn .*pip install scikit-learn"):
        dlrm.validate_args(dlrm.parse_args(["--mlperf-logging"]))
