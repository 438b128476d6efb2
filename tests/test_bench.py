"""bench/harness.py: runs configurations in fresh processes and reports them as a table and JSON."""

import json
import os
import subprocess
import sys

import pytest

import dlrm_s_pytorch
from conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models


@pytest.mark.slow
def test_harness_reports_every_run_as_a_table_and_json(tmp_path):
    """One precision's runs in their child processes (bf16; fp32's differ only in the flags they are given;
    several precisions in turn: the next test)."""
    out = tmp_path / "bench.json"
    result = subprocess.run(  # a tiny model: one thread in each run
        [sys.executable, os.path.join(ROOT, "bench", "harness.py"), "--configs", "smoke", "--precisions", "bf16",
         "--iters", "3", "--warmup", "1", "--pool", "2", "--repeat", "3", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    # the machine: CPU model and the instruction sets bf16 depends on
    assert result.stdout.startswith("CPU: ") and "AVX-512: " in result.stdout and "AMX: " in result.stdout
    table = [line for line in result.stdout.splitlines() if line.startswith("| smoke |")]
    assert [line.split(" | ")[1:3] for line in table] == [["reference", "bf16"], ["dense floor", "bf16"],
                                                          ["this", "bf16"]]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["config"], r["code"], r["precision"], r["device"]) for r in rows] == [
        ("smoke", code, "bf16", "cpu") for code in ("reference", "dense floor", "this")]
    for row in rows:
        assert row["ms_per_it"] > 0 and row["samples_per_s"] > 0 and row["mini_batch_size"] == 128
        assert row["samples_per_s"] == pytest.approx(128 * 1000 / row["ms_per_it"], rel=1e-6)
        assert 0 < row["build_s"] < row["startup_s"] and row["peak_mem_gib"] > 0
        # the median of three alternating rounds
        assert len(row["round_ms"]) == 3 and row["ms_per_it"] == sorted(row["round_ms"])[1]
    # ratios only from figures measured in this run: the median of the ratios within each round
    reference, floor, ours = rows
    assert ours["x_reference"] == pytest.approx(
        sorted(r / o for r, o in zip(reference["round_ms"], ours["round_ms"]))[1])
    assert ours["x_floor"] == pytest.approx(sorted(o / f for o, f in zip(ours["round_ms"], floor["round_ms"]))[1])
    assert "original" not in result.stdout


def test_harness_runs_precisions_in_turn_and_pairs_ratios_within_each(tmp_path, monkeypatch, capsys):
    """Stand-ins for the child processes (the real ones: the test above) with figures of their own per
    precision, code and round: each precision's runs are started and measured before the next one's, and
    each ratio pairs runs of one precision."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import harness

    started = []

    class StandIn:
        def __init__(self, name, code, code_dir, precision, opts, compile_run=False):
            started.append((code, precision))
            self.row = dict(config=name, code=code, precision=precision, device=opts.device, startup_s=2.0,
                            build_s=1.0)
            self.rounds = []

        def measure(self):
            assert [code for code, _ in started[-3:]] == ["reference", "dense floor", "this"]
            assert {precision for _, precision in started[-3:]} == {self.row["precision"]}  # one precision at a time
            base = {"reference": 5.0, "dense floor": 1.0, "this": 2.0}[self.row["code"]]
            ms = base * (3 if self.row["precision"] == "bf16" else 1) + [0.0, 0.9, 0.3][len(self.rounds)]
            self.rounds.append(ms)
            return {"ms_per_it": ms}

        def finish(self):
            median = sorted(self.rounds)[1]
            return dict(self.row, ms_per_it=median, median_ms_per_it=median, cpu_ms_per_it=median,
                        round_ms=self.rounds, round_cpu_ms=self.rounds, samples_per_s=128e3 / median,
                        peak_mem_gib=0.1, mini_batch_size=128)

    monkeypatch.setattr(harness, "Child", StandIn)
    out = tmp_path / "bench.json"
    assert harness.main(["--configs", "smoke", "--precisions", "fp32", "bf16", "--repeat", "3",
                         "--json", str(out)]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| smoke |")]
    assert [line.split(" | ")[1:3] for line in table] == [
        ["reference", "fp32"], ["dense floor", "fp32"], ["this", "fp32"],
        ["reference", "bf16"], ["dense floor", "bf16"], ["this", "bf16"]]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["config"], r["code"], r["precision"], r["device"]) for r in rows] == [
        ("smoke", code, precision, "cpu") for precision in ("fp32", "bf16") for code in ("reference", "dense floor", "this")]
    for i in (2, 5):
        ours, reference, floor = rows[i], rows[i - 2], rows[i - 1]
        assert ours["x_reference"] == pytest.approx(
            sorted(r / o for r, o in zip(reference["round_ms"], ours["round_ms"]))[1])
        assert ours["x_floor"] == pytest.approx(sorted(o / f for o, f in zip(ours["round_ms"], floor["round_ms"]))[1])
    assert rows[2]["x_reference"] != pytest.approx(rows[5]["x_reference"])


@pytest.mark.parametrize("interaction", [
    [], ["--arch-interaction-op=dcn", "--dcn-low-rank-dim=8"],
    ["--arch-interaction-op=projection", "--interaction-branch1-layer-sizes=32",
     "--interaction-branch2-layer-sizes=32"],
], ids=["dot", "dcn", "projection"])
def test_harness_plain_pytorch_reference_trains(interaction):
    import torch

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import dlrm_s_pytorch as dlrm
    import harness

    args = dlrm.parse_args(harness.CONFIGS["smoke"][0] + ["--num-batches=4", "--learning-rate=0.1", *interaction])
    train_set, _, dense_dim, tables = dlrm.make_datasets(args)
    for kind in (harness.REFERENCE, harness.FLOOR):
        torch.manual_seed(0)
        step, _ = harness.plain_pytorch_steps(kind, args, train_set, dense_dim, tables, torch.device("cpu"), 0.0)
        losses = [step(j % 4).item() for j in range(40)]
        assert sum(losses[-4:]) < sum(losses[:4])  # the same four batches, learnt


def test_harness_lists_the_named_configurations():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "harness.py"), "--list"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for name in ("kaggle-128", "kaggle-2048", "benchmark", "terabyte-small", "dcnv2-small", "kaggle-16384"):
        assert name in result.stdout
    assert "--arch-embedding-size=1000000-1000000-1000000-1000000-1000000-1000000-1000000-1000000" in result.stdout


def test_benchmark_script_is_the_original_model_and_sizes_down():
    script = open(os.path.join(ROOT, "bench", "dlrm_s_benchmark.sh")).read()
    for setting in ('bot_mlp="512-512-64"', 'top_mlp="1024-1024-1024-1"', "emb_size=64", "nindices=100",
                    "MB_SIZE:-2048", "NBATCHES:-1000", "EMB_ROWS:-1000000", "SMALL", "NCORES", "NGPUS"):
        assert setting in script
    assert os.access(os.path.join(ROOT, "bench", "dlrm_s_benchmark.sh"), os.X_OK)


@pytest.mark.slow
def test_harness_original_column_times_whole_programs_between_progress_lines(tmp_path):
    # a stand-in for the original's script: its progress lines in the original's words, 50 ms apart
    fake = tmp_path / "dlrm_s_pytorch.py"
    fake.write_text("import sys, time\n"
                    "n = int(next(a for a in sys.argv if a.startswith('--num-batches=')).split('=')[1])\n"
                    "for k in range(1, n + 1):\n"
                    "    time.sleep(0.05)\n"
                    "    print(f'Finished training it {k}/{n} of epoch 0, 1.00 ms/it, loss 0.5', flush=True)\n")
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "harness.py"), "--configs", "smoke", "--precisions", "fp32",
         "--iters", "3", "--warmup", "1", "--pool", "1", "--repeat", "1", "--plain", "--original", str(fake),
         "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    original, ours = json.loads(out.read_text())["original"]
    assert (original["code"], ours["code"], ours["precision"]) == ("original", "this (program)", "fp32")
    assert 45 < original["wall_ms_per_it"] < 500
    assert ours["x_original"] == pytest.approx(original["wall_ms_per_it"] / ours["wall_ms_per_it"])
    assert "× original" in result.stdout


def run_script_with_stub_python(script, tmp_path, env, options=()):
    """Runs a bench script (with `options` after it) with PYTHON set to a stand-in that writes the trainer's
    command line as JSON; returns those flags parsed by the trainer's own parser: the script's command line,
    checked without training."""
    stub = tmp_path / "stub.py"
    stub.write_text(f"#!{sys.executable}\n"
                    "import json, os, sys\n"
                    "print('argv:', json.dumps([os.path.basename(sys.argv[1]), sys.argv[2:]]))\n")
    stub.chmod(0o755)
    result = subprocess.run(["bash", os.path.join(ROOT, "bench", script), *options], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path, env={**os.environ, **env, "PYTHON": str(stub)})
    assert result.returncode == 0, result.stderr
    program, argv = json.loads(next(line[6:] for line in result.stdout.splitlines() if line.startswith("argv: ")))
    assert program == "dlrm_s_pytorch.py"
    return vars(dlrm_s_pytorch.build_parser().parse_args(argv))


@pytest.mark.slow
def test_dcnv2_script_is_the_mlperf_dlrmv2_model_and_sizes_down(tmp_path):
    assert os.access(os.path.join(ROOT, "bench", "dlrm_dcnv2_terabyte.sh"), os.X_OK)
    args = run_script_with_stub_python("dlrm_dcnv2_terabyte.sh", tmp_path, {})
    assert (args["arch_interaction_op"], args["dcn_num_layers"], args["dcn_low_rank_dim"]) == ("dcn", 3, 512)
    assert (args["arch_sparse_feature_size"], args["arch_mlp_bot"], args["arch_mlp_top"]) == \
        (128, [13, 512, 256, 128], [1024, 1024, 512, 256, 1])
    assert args["multi_hot_sizes"] == [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1]
    assert (args["optimizer"], args["learning_rate"], args["adagrad_eps"]) == ("adagrad", 0.005, 1e-8)
    assert (args["mini_batch_size"], args["max_ind_range"], args["data_set"]) == (65536, 40000000, "terabyte")
    assert args["test_freq"] == 4195197692 // (65536 * 20) and args["mlperf_logging"]
    assert args["mlperf_auc_threshold"] == 0.80275 and args["multi_hot_distribution_type"] == "uniform"

    small = run_script_with_stub_python("dlrm_dcnv2_terabyte.sh", tmp_path, {
        "MAX_IND_RANGE": "1000", "BATCH": "512", "TEST_BATCH": "256", "TRAIN_SAMPLES": "100000",
        "MULTI_HOT_DISTRIBUTION": "pareto"})
    assert (small["max_ind_range"], small["mini_batch_size"], small["test_mini_batch_size"]) == (1000, 512, 256)
    assert small["test_freq"] == 100000 // (512 * 20) and small["multi_hot_distribution_type"] == "pareto"


def test_dcnv2_script_refuses_a_bad_size_in_one_line(tmp_path):
    result = subprocess.run(["bash", os.path.join(ROOT, "bench", "dlrm_dcnv2_terabyte.sh")], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path, env={**os.environ, "BATCH": "0"})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: BATCH=0: must be a positive whole number\n"
    assert not (tmp_path / "run_dcnv2_terabyte_pt.log").exists()


@pytest.mark.parametrize("script,options", [
    ("dlrm_s_criteo_kaggle.sh", ["--num-batches=3 --print-freq=1"]),  # one quoted string, as the original's
    ("dlrm_s_criteo_kaggle.sh", ["--num-batches=3", "--print-freq=1"]),  # one by one
    *(pytest.param(name, ["--num-batches=3", "--print-freq=1"], marks=pytest.mark.slow)
      for name in ("dlrm_s_criteo_terabyte.sh", "run_and_time.sh", "dlrm_dcnv2_terabyte.sh")),
])
def test_data_set_scripts_pass_extra_options_as_the_original_or_one_by_one(tmp_path, script, options):
    args = run_script_with_stub_python(script, tmp_path, {}, options)
    assert (args["num_batches"], args["print_freq"]) == (3, 1)


@pytest.mark.parametrize("tool,argv,message", [
    ("bench/criteo_pipeline_bench.py", ["--rows=0"], "criteo_pipeline_bench.py: error: --rows must be at least 7, got 0"),
    pytest.param("bench/quantization_bench.py", ["--train-samples=0"],
                 "quantization_bench.py: error: --train-samples must be at least 1, got 0", marks=pytest.mark.slow),
    pytest.param("tools/flag_table.py", ["--check=/no/such/README.md"],
                 "flag_table.py: error: /no/such/README.md: cannot read (No such file or directory)",
                 marks=pytest.mark.slow),  # each imports torch
])
def test_tools_refuse_bad_values_in_one_line(tmp_path, tool, argv, message):
    result = subprocess.run([sys.executable, os.path.join(ROOT, tool), *argv], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode in (1, 2) and result.stderr == message + "\n" and os.listdir(tmp_path) == []
