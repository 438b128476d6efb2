"""Training behaviour: learning, accumulation, evaluation, checkpoints, early stop."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import dlrm_s_pytorch as dlrm
from conftest import ROOT
from dlrmkit.optim import make_optimizer
from helpers import PLANTED_TABLES, parse_tests, planted_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models

TRAIN_LINE = re.compile(r"^Finished training it (\d+)/\d+ of epoch (\d+), .* loss ([\d.]+)$")


def losses_by_position(out):
    return {(int(m.group(2)), int(m.group(1))): m.group(3)
            for m in map(TRAIN_LINE.match, out.splitlines()) if m}


def small_args(*extra):
    return dlrm.parse_args(["--arch-sparse-feature-size=8", "--arch-mlp-bot=4-16-8", "--arch-mlp-top=16-1",
                            "--loss-function=bce", *extra])


@pytest.mark.slow
def test_trainer_learns_a_planted_signal():
    torch.manual_seed(0)
    args = small_args("--optimizer=adagrad", "--learning-rate=0.05", "--nepochs=3", "--mini-batch-size=64")
    train_set, test_set = planted_dataset(6000, 64, seed=1), planted_dataset(2000, 256, seed=2)
    model = dlrm.build_model(args, 4, list(PLANTED_TABLES))
    device = torch.device("cpu")
    before = dlrm.evaluate(model, test_set, "bce", None, device)
    optimizer = make_optimizer("adagrad", model.parameters(), args.learning_rate)
    dlrm.train(args, model, optimizer, train_set, test_set, device, dlrm.TrainState(), len(train_set), log=lambda s: None)
    after = dlrm.evaluate(model, test_set, "bce", None, device)
    assert after.samples == 2000
    assert after.auc > 0.75 and after.auc > before.auc + 0.15
    assert after.loss < before.loss


def train_params(batches, accum):
    torch.manual_seed(0)
    args = small_args("--optimizer=sgd", "--learning-rate=0.5", f"--mlperf-grad-accum-iter={accum}")
    model = dlrm.build_model(args, 4, (50, 20, 10))
    optimizer = make_optimizer("sgd", model.parameters(), args.learning_rate)
    state = dlrm.train(args, model, optimizer, batches, batches, torch.device("cpu"), dlrm.TrainState(),
                       len(batches), log=lambda s: None)
    return model.state_dict(), state.updates


def test_gradient_accumulation_equals_one_big_batch():
    data = planted_dataset(12, 12, seed=3)
    big = [data[0]]
    micro = [planted_dataset(12, 4, seed=3)[j] for j in range(3)]  # same 12 samples, 3 micro-batches
    params_big, updates_big = train_params(big, accum=1)
    params_micro, updates_micro = train_params(micro, accum=3)
    assert updates_big == updates_micro == 1
    for name in params_big:
        torch.testing.assert_close(params_micro[name], params_big[name], rtol=1e-5, atol=1e-6)


def test_evaluation_covers_the_whole_test_set_regardless_of_num_batches(run_main):
    code, out, _ = run_main("--mini-batch-size=4", "--data-size=40", "--num-batches=3", "--test-freq=3",
                            "--test-mini-batch-size=7", "--round-targets")
    assert code == 0 and out.count("Finished training it") == 3
    model_args = dlrm.parse_args(["--mini-batch-size=4", "--data-size=40", "--num-batches=3",
                                  "--test-mini-batch-size=7"])
    _, test_set, _, _ = dlrm.make_datasets(model_args)
    assert len(test_set) == 6 and test_set.samples_in_batch(5) == 5  # all 40 samples, batches of 7: none dropped


def test_an_inference_only_rerun_reports_the_metrics_of_the_runs_own_test(run_main, tmp_path):
    checkpoint = tmp_path / "m.pt"
    flags = ["--mini-batch-size=16", "--data-size=512", "--loss-function=bce", "--round-targets"]
    code, out, err = run_main(*flags, "--num-batches=8", "--test-freq=8", f"--save-model={checkpoint}")
    assert code == 0, err
    own = [(acc, loss, auc) for acc, _, loss, auc, _ in parse_tests(out)]
    code, rerun, err = run_main(*flags, f"--load-model={checkpoint}", "--inference-only")
    assert code == 0, err
    again = [(acc, loss, auc) for acc, _, loss, auc, _ in parse_tests(rerun)]
    assert len(own) == 1 and again == own  # accuracy, loss, auc over the same 512 test samples


def test_a_test_set_of_one_class_says_the_auc_is_undefined(run_main, tmp_path):
    log = tmp_path / "metrics.jsonl"
    # a test set of one sample has one class
    code, out, err = run_main("--mini-batch-size=1", "--data-size=1", "--nepochs=2", "--test-freq=1",
                              "--round-targets", f"--metrics-log-file={log}")
    assert code == 0, err
    tests = [line for line in out.splitlines() if line.startswith(" test loss=")]
    assert len(tests) == 2 and all(", auc=undefined (the test set has one class), best auc=undefined" in line
                                   for line in tests), tests
    assert "nan" not in out
    tests = [json.loads(line) for line in log.read_text().splitlines() if '"test"' in line]
    assert [(t["auc"], t["best_auc"]) for t in tests] == [(None, None), (None, None)]


def test_loading_an_original_checkpoint_prints_its_stored_state(run_main, tmp_path):
    path = tmp_path / "original.pt"
    assert run_main("--mini-batch-size=2", "--data-size=8", f"--save-model={path}")[0] == 0
    ours = torch.load(path, weights_only=False)
    original = {key: ours[key] for key in ("state_dict", "opt_state_dict", "nepochs", "nbatches", "nbatches_test")}
    original.update(epoch=0, iter=2, train_loss=0.3125, total_loss=1.25, test_acc=0.75)  # the original's keys
    torch.save(original, path)
    code, out, err = run_main("--mini-batch-size=2", "--data-size=8", "--test-freq=4", f"--load-model={path}")
    assert code == 0, err
    assert "Saved at: epoch = 0/1, batch = 2/4, ntbatch = 4" in out
    original.update(nepochs=3, nbatches=7, nbatches_test=5)  # the saving run's counts, whatever this run's flags
    torch.save(original, path)
    assert "Saved at: epoch = 0/3, batch = 2/7, ntbatch = 5" in run_main("--mini-batch-size=2", "--data-size=8",
                                                                        f"--load-model={path}", "--num-batches=1")[1]
    assert "Training state: loss = 0.312500" in out and "Testing state: accuracy = 75.000 %" in out
    assert out.count("Finished training it") == 2  # the rest of epoch 0
    best = re.search(r"best ([\d.]+) %", out).group(1)
    assert float(best) >= 75.0  # the stored accuracy is the best so far, as in the original


FLAGS = ["--mini-batch-size=4", "--data-size=32", "--nepochs=2", "--test-freq=3", "--optimizer=adagrad",
         "--learning-rate=0.1", "--loss-function=bce", "--round-targets=True",
         "--lr-num-warmup-steps=3", "--lr-decay-start-step=4", "--lr-num-decay-steps=20"]


@pytest.mark.parametrize("extra", [[], ["--embedding-precision=bf16", "--optimizer=sgd"]])  # bf16 tables: a rounding seed
def test_save_load_resume_continues_with_identical_losses(run_main, tmp_path, extra):
    checkpoint = tmp_path / "model.pt"
    code, full, _ = run_main(*FLAGS, *extra)
    assert code == 0
    code, saving, _ = run_main(*FLAGS, *extra, f"--save-model={checkpoint}")
    assert code == 0 and checkpoint.exists()
    assert losses_by_position(saving) == losses_by_position(full)
    # the last save happened at the test line preceding the last "Saving model"
    lines = saving.splitlines()
    last_save = max(i for i, l in enumerate(lines) if l.startswith("Saving model"))
    saved_at = re.match(r"Testing at - (\d+)/\d+ of epoch (\d+),", lines[last_save - 3])
    epoch, it = int(saved_at.group(2)), int(saved_at.group(1))

    code, resumed, err = run_main(*FLAGS, *extra, f"--load-model={checkpoint}")
    assert code == 0, err
    after = {k: v for k, v in losses_by_position(full).items() if k > (epoch, it)}
    assert after and losses_by_position(resumed) == after


def test_save_model_writes_only_when_test_auc_improves(run_main, tmp_path):
    checkpoint = tmp_path / "m.pt"
    code, out, _ = run_main(*FLAGS, "--test-freq=1", f"--save-model={checkpoint}")
    assert code == 0
    lines = out.splitlines()
    aucs, saves, best = [], 0, -1.0
    for i, line in enumerate(lines):
        m = parse_tests("\n".join(lines[i - 1 : i + 1])) if line.startswith(" test loss=") else None
        if m:
            auc = m[0][3]
            improved = auc > best
            best = max(best, auc)
            saved = i + 1 < len(lines) and lines[i + 1].startswith("Saving model")
            assert saved == improved, line
            assert m[0][4] == pytest.approx(best, abs=1e-4)
            aucs.append(auc)
            saves += saved
    assert len(aucs) == 16 and 1 <= saves < 16
    assert not list(tmp_path.glob("*.tmp*"))


def test_auc_threshold_stops_training_at_once(run_main):
    code, out, _ = run_main(*FLAGS, "--mlperf-auc-threshold=0.01")
    assert code == 0
    assert "MLPerf testing auc threshold 0.01 reached, stop training" in out
    assert out.count("Finished training it") == 3  # stopped at the first test


def test_accuracy_threshold_stops_training(run_main):
    code, out, _ = run_main(*FLAGS, "--mlperf-acc-threshold=0.01")
    assert code == 0 and "accuracy threshold 0.01 reached" in out and out.count("Finished training it") == 3


def test_inference_only_evaluates_a_loaded_model_without_changing_it(run_main, tmp_path):
    checkpoint = tmp_path / "m.pt"
    assert run_main(*FLAGS, f"--save-model={checkpoint}")[0] == 0
    before = torch.load(checkpoint, weights_only=False)["state_dict"]
    code, out, err = run_main(*FLAGS, f"--load-model={checkpoint}", "--inference-only", "--nepochs=3",
                              "--mlperf-acc-threshold=0.01")  # nothing to stop
    # as the original: the test set alone, once (no pass over the training data, whatever --nepochs says)
    lines = out.splitlines()
    assert code == 0 and lines[-4:-2] == ["time/loss/accuracy (if enabled):", "Testing for inference only"]
    assert parse_tests("\n".join(lines[-2:])) and "Finished" not in out and "Testing at" not in out
    assert "note: --nepochs has no effect with --inference-only" in err and "threshold" not in out
    assert "note: --mlperf-acc-threshold has no effect with --inference-only" in err
    after = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_save_model_without_tests_saves_the_final_model(run_main, tmp_path):
    checkpoint = tmp_path / "final.pt"
    code, out, _ = run_main("--mini-batch-size=2", "--data-size=6", f"--save-model={checkpoint}")
    assert code == 0 and checkpoint.exists()
    saved = torch.load(checkpoint, weights_only=False)
    assert (saved["train_state"]["epoch"], saved["train_state"]["next_batch"]) == (1, 0)
    assert (saved["epoch"], saved["iter"]) == (0, 3)  # as the original saves the end of epoch 0


@pytest.mark.parametrize("content,message", [(b"garbage", "not a readable checkpoint"), (None, "no such file")])
def test_bad_checkpoint_is_a_clear_error(run_main, tmp_path, content, message):
    path = tmp_path / "bad.pt"
    if content is not None:
        path.write_bytes(content)
    code, _, err = run_main("--mini-batch-size=2", "--data-size=4", f"--load-model={path}")
    assert code == 1 and message in err and err.count("\n") == 1


@pytest.mark.parametrize("saved,resumed", [("adagrad", "rwsadagrad"), ("rwsadagrad", "adagrad")])
def test_resuming_with_the_other_adagrad_is_a_clear_error(run_main, tmp_path, saved, resumed):
    checkpoint = tmp_path / "m.pt"
    flags = ["--mini-batch-size=2", "--data-size=4", "--arch-sparse-feature-size=4", "--arch-mlp-bot=4-4"]
    assert run_main(*flags, f"--optimizer={saved}", f"--save-model={checkpoint}")[0] == 0
    code, _, err = run_main(*flags, f"--optimizer={resumed}", f"--load-model={checkpoint}")
    assert code == 1 and "optimizer state does not fit --optimizer" in err and err.count("\n") == 1, err


def test_checkpoint_from_other_architecture_is_refused(run_main, tmp_path):
    path = tmp_path / "m.pt"
    assert run_main("--mini-batch-size=2", "--data-size=4", f"--save-model={path}")[0] == 0
    code, _, err = run_main("--mini-batch-size=2", "--data-size=4", "--arch-embedding-size=5-3-2", f"--load-model={path}")
    assert code == 1 and "--arch-embedding-size (the tables' rows): saved 4-3-2, flags give 5-3-2)" in err


@pytest.mark.parametrize("change,detail", [
    ("missing", 'Missing key(s) in state_dict: "bot_l.0.bias"'),
    ("unexpected", 'Unexpected key(s) in state_dict: "extra.weight"'),
    ("size", "size mismatch for bot_l.0.bias: copying a param with shape torch.Size([5])"),
])
def test_checkpoint_that_does_not_fit_says_which_keys(run_main, tmp_path, change, detail):
    path = tmp_path / "m.pt"
    assert run_main("--mini-batch-size=2", "--data-size=4", f"--save-model={path}")[0] == 0
    checkpoint = torch.load(path, weights_only=False)
    checkpoint.pop("arch")  # as a checkpoint without the architecture record
    state = checkpoint["state_dict"]
    if change == "missing":
        del state["bot_l.0.bias"]
    elif change == "unexpected":
        state["extra.weight"] = torch.zeros(1)
    else:
        state["bot_l.0.bias"] = torch.zeros(5)
    torch.save(checkpoint, path)
    code, _, err = run_main("--mini-batch-size=2", "--data-size=4", f"--load-model={path}")
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"--load-model {path}: does not fit this model: {detail}" in err
    assert len(err) < 400


def test_workers_give_the_same_losses(run_main):
    argv = ["--mini-batch-size=4", "--data-size=24", "--num-indices-per-lookup=4"]
    assert run_main(*argv)[1] == run_main(*argv, "--num-workers=2")[1]


def test_save_model_saves_the_final_model_when_no_test_improved(run_main, tmp_path):
    """A one-class test set at 0 % accuracy never improves: the run still leaves its model."""
    path = tmp_path / "m.pt"
    code, out, err = run_main("--num-batches=3", "--test-freq=2", f"--save-model={path}")
    assert code == 0 and "auc=undefined" in out
    assert path.exists() and out.count("Saving model") == 1


@pytest.mark.slow
def test_testing_with_loader_workers_keeps_no_file_per_batch_open(tmp_path):
    """Each worker batch's tensors hold a file descriptor while kept: the test targets are copied."""
    command = (f"ulimit -n 200 && exec {sys.executable} {os.path.join(ROOT, 'dlrm_s_pytorch.py')} --data-size=600 "
               "--test-mini-batch-size=1 --test-num-workers=1 --inference-only --arch-embedding-size=10-10")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))  # a tiny model
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Testing for inference only\n accuracy" in result.stdout
