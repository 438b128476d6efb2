"""What a run shows while it works: a progress line on a terminal only, and a divergence warning."""

import fcntl
import os
import struct
import subprocess
import sys
import termios

import pytest

from conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models

SMALL_RUN = ["--arch-sparse-feature-size=4", "--arch-mlp-bot=4-8-4", "--arch-mlp-top=8-1",
             "--arch-embedding-size=100-100-100", "--data-size=25600", "--mini-batch-size=32",
             "--loss-function=bce", "--round-targets=True", "--print-freq=400", "--test-freq=400",
             "--test-mini-batch-size=3200", "--num-workers=0"]


def run_with_terminal_stderr(*args, timeout=120):
    """Runs the trainer with stderr on a pseudo-terminal (80 x 24) and stdout on a pipe: (stdout, stderr)."""
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = dict(os.environ, OMP_NUM_THREADS="1")  # a tiny model: one thread, as in this process
    env.pop("WORLD_SIZE", None)
    child = subprocess.Popen([sys.executable, os.path.join(ROOT, "dlrm_s_pytorch.py"), *args], cwd=ROOT, env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal's last writer has exited
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    stdout = child.stdout.read().decode()
    child.stdout.close()
    assert child.wait(timeout) == 0, shown.decode(errors="replace")
    return stdout, shown.decode(errors="replace")


@pytest.mark.slow
def test_progress_line_on_a_terminal_and_not_in_a_piped_log(run_main):
    stdout, terminal = run_with_terminal_stderr(*SMALL_RUN)
    # the live line: what runs, iteration of total, elapsed<ETA, samples/s and the running loss
    assert "training epoch 0:" in terminal and "it 0/800" in terminal and "/800 [" in terminal
    assert "samples/s" in terminal and "loss 0." in terminal
    assert "testing:" in terminal
    # the printed lines go to stdout unchanged, without carriage returns
    assert "\r" not in stdout
    assert "Finished training it 400/800 of epoch 0, -1.00 ms/it, loss" in stdout
    assert "Testing at - 800/800 of epoch 0," in stdout

    # stderr not a terminal (a piped log; in this process, captured)
    code, piped_out, piped_err = run_main(*SMALL_RUN)
    assert code == 0, piped_err
    assert "\r" not in piped_out + piped_err
    assert "training epoch" not in piped_err and "it/s" not in piped_err and "samples/s" not in piped_err
    # the same printed lines, with or without a terminal
    numbers_of = lambda text: [line.split(" loss")[0] for line in text.splitlines()]  # noqa: E731
    assert numbers_of(piped_out) == numbers_of(stdout)


DIVERGING = ["--arch-sparse-feature-size=16", "--arch-mlp-bot=13-512-256-64-16", "--arch-mlp-top=512-256-1",
             "--arch-embedding-size=1000-1000-1000", "--data-size=6400", "--mini-batch-size=128",
             "--loss-function=bce", "--round-targets=True", "--print-freq=10"]


def test_diverging_run_says_so_once_and_names_the_cause(run_main):
    code, out, err = run_main(*DIVERGING, "--optimizer=adagrad", "--learning-rate=3")
    assert code == 0
    warnings = [line for line in err.splitlines() if "diverged" in line]
    assert len(warnings) == 1, err
    assert warnings[0].startswith("warning: training diverged: the loss is")
    assert "--learning-rate=3" in warnings[0] and "--optimizer=adagrad" in warnings[0]
    assert "diverged" not in out  # the original's stdout lines stay as they were
    assert out.count("Finished training it") == 5


def test_sensible_run_has_no_divergence_warning(run_main):
    code, out, err = run_main(*DIVERGING, "--optimizer=adagrad", "--learning-rate=0.01")
    assert code == 0 and "diverged" not in err


def test_nan_loss_is_reported_as_divergence():
    from dlrmkit.progress import DivergenceGuard

    guard = DivergenceGuard("mse", "sgd", 1.0)
    assert guard.check(0.2, 10, 0) is None
    line = guard.check(float("nan"), 20, 0)
    assert line.startswith("warning: training diverged: the loss is nan at iteration 20 of epoch 0")
    assert "--learning-rate=1" in line and "--learning-rate=0.1" in line
    assert guard.check(float("nan"), 30, 0) is None  # once


@pytest.mark.parametrize("loss", ["mse", "wbce"])
def test_a_nan_loss_stops_the_run_with_one_line_naming_the_cause(run_main, tmp_path, loss):
    model = tmp_path / "m.pt"
    code, out, err = run_main(*DIVERGING, f"--loss-function={loss}", "--optimizer=sgd", "--learning-rate=1e30",
                              f"--save-model={model}")
    assert code == 1 and "Traceback" not in err and err.count("\n") == 1, err
    assert "training diverged:" in err and "try --learning-rate=0.1" in err
    assert not model.exists()  # no checkpoint of NaN weights


def test_nan_predictions_under_bce_stop_with_one_line_naming_the_cause(run_main):
    code, out, err = run_main(*DIVERGING, "--optimizer=sgd", "--learning-rate=1e30")
    assert code == 1 and "Traceback" not in err
    assert err.count("\n") == 1 and "training diverged: the model's predictions are NaN at iteration" in err
    assert "--learning-rate=1e+30" in err and "try --learning-rate=0.1" in err


def test_an_untrained_model_above_the_limit_once_is_no_divergence(run_main):
    """The first printed loss of a model whose sigmoid starts saturated may sit above the MSE limit."""
    from dlrmkit.progress import DivergenceGuard

    guard = DivergenceGuard("mse", "sgd", 0.01)
    assert guard.check(0.7, 10, 0) is None and guard.check(0.3, 20, 0) is None and guard.check(0.7, 30, 0) is None
    assert "diverged" in guard.check(0.8, 50, 0)
    assert guard.check(float("nan"), 60, 0) is None  # once


def test_saturation_for_a_few_iterations_is_no_divergence():
    """Adagrad's first step can saturate every prediction for a few iterations; the model comes back."""
    from dlrmkit.progress import DivergenceGuard

    guard = DivergenceGuard("bce", "adagrad", 0.005)
    assert all(guard.check(loss, k, 0) is None for k, loss in enumerate([0.87, 23.8, 22.6, 76.2, 18.4, 80.1, 21.9,
                                                                         3.3, 0.66, 0.52], start=1))
    assert all(guard.check(30.0, k, 0) is None for k in range(11, 31))
    assert "diverged" in guard.check(30.0, 31, 0)
