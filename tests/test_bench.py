"""bench/harness.py: runs configurations in fresh processes and reports them as a table and JSON."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_harness_reports_every_run_as_a_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "harness.py"), "--configs", "smoke", "--precisions", "fp32",
         "bf16", "--iters", "3", "--warmup", "1", "--pool", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("| smoke |")]
    assert len(table) == 2 and "| fp32 |" in table[0] and "| bf16 |" in table[1]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["config"], r["precision"], r["device"]) for r in rows] == [("smoke", "fp32", "cpu"),
                                                                          ("smoke", "bf16", "cpu")]
    for row in rows:
        assert row["ms_per_it"] > 0 and row["samples_per_s"] > 0 and row["mini_batch_size"] == 128
        assert row["samples_per_s"] == pytest.approx(128 * 1000 / row["ms_per_it"], rel=1e-6)
        assert 0 < row["build_s"] < row["startup_s"] and row["peak_mem_gib"] > 0


def test_harness_lists_the_issue_configurations():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "harness.py"), "--list"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for name in ("kaggle-128", "kaggle-2048", "benchmark", "terabyte-small", "kaggle-16384"):
        assert name in result.stdout
    assert "--arch-embedding-size=1000000-1000000-1000000-1000000-1000000-1000000-1000000-1000000" in result.stdout


def test_benchmark_script_is_the_original_model_and_sizes_down():
    script = open(os.path.join(ROOT, "bench", "dlrm_s_benchmark.sh")).read()
    for setting in ('bot_mlp="512-512-64"', 'top_mlp="1024-1024-1024-1"', "emb_size=64", "nindices=100",
                    "MB_SIZE:-2048", "NBATCHES:-1000", "EMB_ROWS:-1000000", "SMALL", "NCORES", "NGPUS"):
        assert setting in script
    assert os.access(os.path.join(ROOT, "bench", "dlrm_s_benchmark.sh"), os.X_OK)
