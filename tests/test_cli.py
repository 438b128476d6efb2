"""The command line: the original's flags and scripts, errors, output formats."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from dlrm_s_pytorch import build_parser, main, parse_args
from dlrmkit import flags

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models

ORIGINAL_FLAGS = flags.ORIGINAL_FLAGS

TRAIN_LINE = re.compile(r"^Finished training it (\d+)/(\d+) of epoch (\d+), (-?[\d.]+) ms/it, loss ([\d.]+)$")


def test_every_original_flag_is_accepted():
    assert len(ORIGINAL_FLAGS) == 76
    known = {opt for action in build_parser()._actions for opt in action.option_strings}
    assert [f for f in ORIGINAL_FLAGS if f not in known] == []
    assert parse_args(["--local-rank=2"]).local_rank == 2


@pytest.mark.parametrize("abbreviation,dest,value", [
    ("--local=3", "local_rank", 3),  # one flag's two spellings
    ("--dist=gloo", "dist_backend", "gloo"),  # the original's --dist-backend, not --dist-timeout
    ("--pro=x.npz", "processed_data_file", "x.npz"),  # not --profiling-trace-file
    ("--in", "inference_only", True),  # not --interaction-branch1-layer-sizes
    ("--me", "memory_map", True),  # not --metrics-log-file
    ("--o=adagrad", "optimizer", "adagrad"),  # not --onnx-file
])
def test_abbreviations_of_the_originals_flags_keep_their_meaning(abbreviation, dest, value):
    assert getattr(parse_args([abbreviation]), dest) == value


def test_an_abbreviation_of_several_new_flags_is_still_ambiguous(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--dcn=2"])  # --dcn-num-layers, --dcn-low-rank-dim
    assert "ambiguous option: --dcn=2 could match --dcn-num-layers, --dcn-low-rank-dim" in capsys.readouterr().err


def test_original_defaults():
    args = parse_args([])
    assert (args.arch_sparse_feature_size, args.arch_embedding_size, args.arch_mlp_bot, args.arch_mlp_top) == (
        2, [4, 3, 2], [4, 3, 2], [4, 2, 1])
    assert (args.loss_function, args.learning_rate, args.numpy_rand_seed, args.mini_batch_size) == ("mse", 0.01, 123, 1)
    assert (args.data_size, args.num_indices_per_lookup, args.optimizer, args.test_freq) == (1, 10, "sgd", -1)
    assert args.test_mini_batch_size == 1 and args.sync_dense_params is True and args.round_targets is False


@pytest.mark.parametrize("argv,attr,value", [
    (["--round-targets=False"], "round_targets", False),
    (["--round-targets", "False"], "round_targets", False),
    (["--round-targets=True"], "round_targets", True),
    (["--round-targets"], "round_targets", True),
    (["--sync-dense-params=0"], "sync_dense_params", False),
    (["--num-indices-per-lookup-fixed=1"], "num_indices_per_lookup_fixed", True),
    (["--data-trace-enable-padding=no"], "data_trace_enable_padding", False),
    (["--debug-mode"], "debug_mode", True),
    (["--print-time=false"], "print_time", False),
])
def test_boolean_flags_mean_what_they_say(argv, attr, value):
    assert getattr(parse_args(argv), attr) is value


def test_bad_boolean_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--round-targets=maybe"])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.strip().count("\n") == 0
    assert "--round-targets" in err and "maybe" in err


def test_default_run_prints_three_iterations(run_main):
    code, out, err = run_main("--mini-batch-size=2", "--data-size=6")
    assert code == 0, err
    lines = [l for l in out.splitlines() if l.startswith("Finished training it")]
    assert [TRAIN_LINE.match(l).group(1, 2, 3, 4) for l in lines] == [
        ("1", "3", "0", "-1.00"), ("2", "3", "0", "-1.00"), ("3", "3", "0", "-1.00")]


@pytest.mark.parametrize("size_args", [
    ["--mini-batch-size=1", "--data-size=1"],
    ["--mini-batch-size=2", "--data-size=4"],
    ["--mini-batch-size=2", "--data-size=5"],
    ["--mini-batch-size=2", "--data-size=5", "--nepochs=3"],
])
def test_original_test_script_runs_clean(run_main, size_args):
    code, out, err = run_main(*size_args, "--arch-interaction-op=dot", "--learning-rate=0.1", "--debug-mode")
    assert code == 0 and err == ""
    assert "model arch:" in out and "initial parameters (weights and bias):" in out
    assert "world size" not in out  # the original starts no process group in debug mode
    assert "updated parameters (weights and bias):" in out
    # as the original prints a batch: 4 decimals, bag lengths as an IntTensor
    assert re.search(r"mini-batch: 0\ntensor\(\[\[0\.\d{4},", out) and "dtype=torch.int32)" in out, out
    epochs = 3 if "--nepochs=3" in size_args else 1
    assert out.count("Finished training it") == epochs * -(-int(size_args[1].split("=")[1]) // int(size_args[0].split("=")[1]))


def test_print_time_reports_milliseconds(run_main):
    code, out, _ = run_main("--mini-batch-size=2", "--data-size=4", "--print-time")
    times = [float(TRAIN_LINE.match(l).group(4)) for l in out.splitlines() if l.startswith("Finished")]
    assert code == 0 and len(times) == 2 and all(t > 0 for t in times)


@pytest.mark.parametrize("mlperf", [False, True])
def test_ms_per_iteration_means_what_the_originals_does(run_main, monkeypatch, mlperf):
    """The original times the forward, backward and update of a batch in hand (its data loading left out), and
    with --mlperf-logging the wall time between iterations (loading included)."""
    import time

    import dlrm_data

    fetch = dlrm_data.RandomDataset.__getitem__
    monkeypatch.setattr(dlrm_data.RandomDataset, "__getitem__", lambda self, j: (time.sleep(0.2), fetch(self, j))[1])
    code, out, err = run_main("--mini-batch-size=2", "--data-size=8", "--print-time", "--print-freq=2",
                              "--loss-function=bce", "--round-targets", *["--mlperf-logging"] * mlperf)
    times = [float(TRAIN_LINE.match(l).group(4)) for l in out.splitlines() if l.startswith("Finished")]
    assert code == 0 and len(times) == 2, err
    assert all(t > 180 for t in times) if mlperf else all(t < 100 for t in times), times


def test_printed_lines_are_the_originals_for_its_parsers(run_main, tmp_path):
    """Scripts written for the original's output read ours: its lines word for word, ours as name=value."""
    path = tmp_path / "m.pt"
    code, out, err = run_main("--mini-batch-size=4", "--data-size=32", "--test-freq=4", "--print-freq=2",
                              "--loss-function=bce", "--round-targets")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "world size: 1, current rank: 0, local rank: 0"
    tests = [i for i, line in enumerate(lines) if line.startswith("Testing at - ")]
    assert len(tests) == 2
    for i in tests:
        assert re.fullmatch(r" accuracy [\d.]+ %, best [\d.]+ %", lines[i + 1])
        assert re.fullmatch(r" test loss=[\d.]+, auc=[\d.]+, best auc=[\d.]+", lines[i + 2])
    # a training-loss curve taken with "loss <number>" holds the training losses alone
    assert len(re.findall(r"loss ([\d.]+)", out)) == out.count("Finished training it") == 4
    assert run_main("--mini-batch-size=4", "--data-size=32", f"--save-model={path}")[0] == 0  # the final model
    code, out, err = run_main("--mini-batch-size=4", "--data-size=32", "--loss-function=bce", "--round-targets",
                              f"--load-model={path}", "--inference-only")
    assert code == 0, err
    assert "\nSaved at: epoch = 0/1, batch = 8/8, ntbatch = 8\n" in out  # the original's end of epoch 0
    assert "\nTesting state: accuracy = 0.000 %\n" in out  # as the original's for a model never tested


def test_mlperf_logging_prints_the_originals_lines_in_its_order(run_main):
    code, out, err = run_main("--mini-batch-size=4", "--data-size=32", "--test-freq=8", "--loss-function=bce",
                              "--round-targets", "--mlperf-logging")
    assert code == 0, err
    lines = out.splitlines()
    settings = json.loads(next(line for line in lines if line.startswith("command line args:  "))[20:])
    assert settings["mini_batch_size"] == 4 and settings["ln_emb"] == [4, 3, 2]
    # the original's dash-separated flags as the strings it keeps
    assert (settings["arch_embedding_size"], settings["arch_mlp_top"], settings["loss_weights"]) == \
        ("4-3-2", "4-2-1", "1.0-1.0")
    assert not [key for key in settings if key.startswith("_")]  # the flags alone
    testing = lines.index("Testing at - 8/8 of epoch 0,")
    assert '"key": "eval_start"' in lines[testing - 1] and lines[testing + 1].startswith("recall ")


def test_raw_data_file_without_dataset_generation_is_an_error(run_main):
    code, out, err = run_main("--raw-data-file=./input/train.txt")
    assert code == 1
    assert "--raw-data-file needs --data-generation=dataset" in err
    assert "Traceback" not in err and "Finished" not in out


@pytest.mark.parametrize("argv,message", [
    (["--arch-mlp-bot=4-3-3"], "arch-sparse-feature-size 2 does not match last dim of bottom mlp 3"),
    (["--arch-sparse-feature-size=3"], "arch-sparse-feature-size 3 does not match last dim of bottom mlp 2"),
    (["--mini-batch-size=0"], "--mini-batch-size must be at least 1"),
    (["--loss-function=wbce", "--loss-weights=1.0"], "--loss-weights needs two values"),
    (["--activation-function=tanh"], "--activation-function=tanh is not supported"),
    (["--arch-embedding-size=4-0-2"], "--arch-embedding-size: every value must be at least 1, got 4-0-2"),
    (["--arch-mlp-top=4-2-3"], "--arch-mlp-top must end in 1"),
    (["--num-workers=-1"], "--num-workers must be at least 0, got -1"),
    (["--save-model=/proc/no/such/dir/m.pt"], "--save-model /proc/no/such/dir/m.pt: cannot create folder"),
])
def test_inconsistent_flags_are_one_line_errors(run_main, argv, message):
    code, out, err = run_main(*argv)
    assert code == 1 and message in err and err.count("\n") == 1


def test_sync_dense_params_false_runs_as_the_original_with_one_device_and_says_it_has_no_effect(run_main):
    code, out, err = run_main("--sync-dense-params=False", "--data-size=8", "--mini-batch-size=4")
    assert code == 0 and out.count("Finished training it") == 2
    assert err == ("note: --sync-dense-params=False has no effect: dense parameters are always kept in sync "
                   "(each process holds one replica on one device)\n")


def test_cat_interaction_allows_different_widths(run_main):
    code, out, _ = run_main("--arch-interaction-op=cat", "--arch-sparse-feature-size=5", "--mini-batch-size=2",
                            "--data-size=4", "--debug-mode")
    assert code == 0 and "[17  4  2  1]" in out  # 2 + 3 tables * 5


def test_dataset_only_flags_are_noted_not_ignored(run_main):
    code, out, err = run_main("--memory-map", "--max-ind-range=100")
    assert code == 0
    assert "--memory-map has no effect without --data-generation=dataset" in err
    assert "--max-ind-range has no effect" in err


def test_use_gpu_without_cuda_says_so(run_main):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    code, out, err = run_main("--use-gpu", "--mini-batch-size=2", "--data-size=4")
    assert code == 0 and "CUDA is not available" in err and "Using CPU..." in out


def test_same_seed_same_losses_different_seed_different(run_main):
    argv = ["--mini-batch-size=4", "--data-size=40", "--optimizer=rwsadagrad", "--learning-rate=0.1"]
    first, second = run_main(*argv)[1], run_main(*argv)[1]
    other = run_main(*argv, "--numpy-rand-seed=7")[1]
    assert first == second and first != other


@pytest.mark.parametrize("dist", ["uniform", "gaussian"])
def test_random_distributions_and_fixed_lookups_run(run_main, dist):
    code, out, _ = run_main("--rand-data-dist=" + dist, "--rand-data-min=0", "--rand-data-max=1.5",
                            "--num-indices-per-lookup=3", "--num-indices-per-lookup-fixed=True",
                            "--mini-batch-size=4", "--data-size=8")
    assert code == 0 and out.count("Finished training it") == 2


def test_readme_documents_every_flag_and_the_ci_test_command():
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md")).read()
    flags = {opt for action in build_parser()._actions for opt in action.option_strings if opt.startswith("--") and opt != "--help"}
    assert [f for f in sorted(flags) if f"`{f}" not in readme and f" {f}`" not in readme and f"/ {f}`" not in readme] == []
    ci = open(os.path.join(root, ".ci", "run")).read()
    assert "python -m pytest -q tests" in readme and "python -m pytest -q tests" in ci


@pytest.mark.parametrize("stop,status,said", [(signal.SIGINT, 130, "interrupted"),
                                               pytest.param(signal.SIGTERM, 143, "terminated", marks=pytest.mark.slow)])
def test_ctrl_c_or_sigterm_during_training_is_one_line_and_ends_the_logs(tmp_path, stop, status, said):
    log = tmp_path / "metrics.jsonl"
    run = subprocess.Popen([sys.executable, os.path.join(ROOT, "dlrm_s_pytorch.py"), "--data-size=1000000",
                            "--mini-batch-size=4", "--print-freq=1", f"--metrics-log-file={log}"], cwd=ROOT, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal
    try:
        for line in run.stdout:
            if line.startswith("Finished training it"):
                break
        run.send_signal(stop)
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == status
    assert err == f"dlrm_s_pytorch.py: {said}\n", err
    assert json.loads(log.read_text().splitlines()[-1])["status"] == "aborted"


@pytest.mark.slow
@pytest.mark.parametrize("program", [["dlrm_s_pytorch.py", "--num-batches=5"],
                                     ["data_utils.py", "make-fake", "--rows=3000000", "--out=fake.txt"]])
def test_ctrl_c_while_the_libraries_load_is_one_line(tmp_path, program):
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, program[0]), *program[1:]], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)  # importing NumPy and PyTorch takes longer
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130 and err in ("", f"{program[0]}: interrupted\n"), err


def test_main_gives_ctrl_c_back_only_where_the_program_took_it(run_main):
    """Run as a program, Ctrl-C is quiet until main() handles it; called from Python, main() leaves the caller's
    handler as it is."""
    from dlrmkit import signals as program_signals

    own = signal.getsignal(signal.SIGINT)
    try:
        def callers(signum, frame):
            pass

        signal.signal(signal.SIGINT, callers)
        assert run_main("--mini-batch-size=2", "--data-size=4")[0] == 0
        assert signal.getsignal(signal.SIGINT) is callers
        program_signals.interrupt_quietly_while_loading("dlrm_s_pytorch.py")
        assert run_main("--mini-batch-size=2", "--data-size=4")[0] == 0
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, own)


def test_sigterm_in_a_run_with_loader_workers_removes_the_checkpoint_being_written(tmp_path):
    """Such runs die by SIGTERM at once (no unwinding around dying workers), but not leaving a half-written
    checkpoint (hundreds of MB) behind."""
    script = f"""
import os, signal, sys, time
sys.path.insert(0, {ROOT!r})
from dlrmkit import signals
from dlrmkit import outputs

def write(tmp):
    with open(tmp, "wb") as f:
        f.write(bytes(1 << 20))
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)

with signals.sigterm_unwinds(False):
    outputs.write_atomically("--save-model", {str(tmp_path / "model.pt")!r}, write)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == -signal.SIGTERM, run.stderr
    assert os.listdir(tmp_path) == []


def test_ids_outside_their_table_stop_the_run_with_one_line_naming_the_batch(run_main, monkeypatch):
    import dlrm_data

    make_batch = dlrm_data.RandomDataset.__getitem__

    def too_large_ids_in_table_2(dataset, j):
        batch = make_batch(dataset, j)
        start, end = batch.sparse.table_bounds()[2:4].tolist()
        batch.indices[start:end] += 1000
        return batch

    monkeypatch.setattr(dlrm_data.RandomDataset, "__getitem__", too_large_ids_in_table_2)
    code, out, err = run_main("--arch-embedding-size=100-200-300-50", "--data-size=256", "--mini-batch-size=64")
    assert code == 1
    assert re.fullmatch(r"dlrm_s_pytorch\.py: error: training batch 1 of epoch 0: embedding index \d+ out of range "
                        r"for table 2 \(300 rows\)\n", err), err


def test_a_loss_made_nan_by_the_data_names_the_batch_not_the_learning_rate(run_main, monkeypatch):
    import dlrm_data

    make_batch = dlrm_data.RandomDataset.__getitem__

    def nan_dense_features_in_batch_2(dataset, j):
        batch = make_batch(dataset, j)
        if j == 1 and batch.batch_size == 64:
            batch.dense_x[5, 0] = float("nan")
        return batch

    monkeypatch.setattr(dlrm_data.RandomDataset, "__getitem__", nan_dense_features_in_batch_2)
    code, out, err = run_main("--arch-embedding-size=100-200", "--data-size=256", "--mini-batch-size=64",
                              "--print-freq=3", "--learning-rate=0.0001")
    assert code == 1
    assert err == ("dlrm_s_pytorch.py: error: training diverged: the loss is nan at iteration 3 of epoch 0; training "
                   "batch 2's dense features hold NaN or infinite values (log(x + 1) of an integer feature below 0: "
                   "damaged data?)\n")


def test_ids_outside_their_table_in_a_test_batch_name_it(run_main, monkeypatch):
    import dlrm_data

    make_batch = dlrm_data.RandomDataset.__getitem__

    def too_large_ids_when_testing(dataset, j):
        batch = make_batch(dataset, j)
        if batch.batch_size == 32:  # the test batches
            start, end = batch.sparse.table_bounds()[0:2].tolist()
            batch.indices[start:end] += 1000
        return batch

    monkeypatch.setattr(dlrm_data.RandomDataset, "__getitem__", too_large_ids_when_testing)
    code, out, err = run_main("--arch-embedding-size=100-200", "--data-size=256", "--mini-batch-size=64",
                              "--test-mini-batch-size=32", "--test-freq=2")
    assert code == 1
    assert re.fullmatch(r"dlrm_s_pytorch\.py: error: test batch 1: embedding index \d+ out of range for table 0 "
                        r"\(100 rows\)\n", err), err
