"""bench/quickstart.sh: the main job in one command, here on a small generated file."""

import os
import subprocess

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_quickstart_generates_data_trains_tests_and_draws_the_curves(tmp_path):
    pytest.importorskip("matplotlib")
    # 1,000 rows: 858 train in 7 batches, tested after 2, 4 and 6 and at the end; a small model: one thread
    env = dict(os.environ, QUICKSTART_ROWS="1000", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(["bash", os.path.join(ROOT, "bench", "quickstart.sh")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    data = tmp_path / "quickstart" / "synthetic_criteo_kaggle_1000_rows.txt"
    assert len(data.read_text().splitlines()) == 1000
    # the original's Kaggle model on the processed file, tested four times
    assert "--arch-mlp-bot=13-512-256-64-16 --arch-mlp-top=512-256-1" in out
    assert out.count("Testing at - ") == 4
    result_line = next(line for line in out.splitlines() if line.startswith("test accuracy"))
    assert " %, test AUC 0." in result_line
    # where every output went, and each is there
    for name in ("data:", "processed data:", "training log:", "metrics log:", "checkpoint:", "training curves:",
                 "interactions:"):
        path = next(line for line in out.splitlines() if line.startswith(name)).split(":", 1)[1].strip()
        assert os.path.exists(tmp_path / path), name
    for png in ("training_curves.png", "feature_interactions.png"):
        assert (tmp_path / "quickstart" / png).read_bytes()[:4] == b"\x89PNG"
    assert "strongest interactions: " in out
    log = (tmp_path / "quickstart" / "train.log").read_text()
    assert "Finished training it" in log and "\r" not in log


@pytest.mark.parametrize("option,message", [
    ("--rows=abc", "--rows (or QUICKSTART_ROWS) must be a whole number of rows from 7"),
    ("--rows=0", "--rows (or QUICKSTART_ROWS) must be a whole number of rows from 7"),
    ("--rows=-5", "--rows (or QUICKSTART_ROWS) must be a whole number of rows from 7"),
    ("--rows=6", "--rows (or QUICKSTART_ROWS) must be a whole number of rows from 7"),
    ("--out=", "--out is empty"),
])
def test_quickstart_refuses_bad_options_before_any_work(tmp_path, option, message):
    result = subprocess.run(["bash", os.path.join(ROOT, "bench", "quickstart.sh"), option], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"quickstart.sh: error: {message}") and result.stderr.count("\n") == 1
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_quickstart_reports_an_undefined_auc_of_a_one_class_test_set(tmp_path):
    pytest.importorskip("matplotlib")
    env = dict(os.environ, OMP_NUM_THREADS="1")  # a small model: one thread
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(["bash", os.path.join(ROOT, "bench", "quickstart.sh"), "--rows=7"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert ("test AUC undefined (the test set has one class) (best undefined) on 1 test samples"
            in result.stdout)


def test_quickstart_names_a_missing_interpreter_before_any_work(tmp_path):
    result = subprocess.run(["bash", os.path.join(ROOT, "bench", "quickstart.sh")], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PYTHON": "no-such-python3"})
    assert result.returncode == 1 and os.listdir(tmp_path) == []
    assert result.stderr == "quickstart.sh: error: no Python interpreter 'no-such-python3' (PYTHON)\n"
