"""Profiling, compute graph, TensorBoard, MLPerf log lines, the metrics log and its plot."""

import datetime
import importlib.util
import json
import os
import re
import subprocess
import sys
import types
import weakref

import pytest
import torch

from dlrmkit import compute_graph
from dlrmkit.mlperf_logger import parse_mllog

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models

RUN = ["--mini-batch-size=4", "--data-size=16", "--test-freq=2", "--loss-function=bce", "--round-targets"]


def run_compliance_checker(lines, ruleset, tmp_path):
    """mlperf_logging's training compliance checker on these :::MLLOG lines (a CompletedProcess)."""
    log = tmp_path / "mlperf.log"
    log.write_text("\n".join(lines) + "\n")
    return subprocess.run([sys.executable, "-m", "mlperf_logging.compliance_checker", "--usage", "training",
                           "--ruleset", ruleset, str(log)], capture_output=True, text=True, cwd=tmp_path)


def test_profiling_writes_the_originals_trace_and_operator_tables(run_main, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the original's names are in the working folder
    code, out, err = run_main(*RUN, "--enable-profiling")
    assert code == 0, err
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 3 and re.fullmatch(r"dlrm_s_pytorch\d{4}-\d\d-\d\d_[\d:.]+\.json", names[0]), names
    stem = names[0][:-5]
    assert names[1:] == [stem + "_shape.prof", stem + "_total.prof"]
    events = json.loads((tmp_path / names[0]).read_text())["traceEvents"]
    assert any(e.get("name", "").startswith("aten::embedding_bag") for e in events)
    shape, total = ((tmp_path / n).read_text() for n in names[1:])
    assert "Input Shapes" in shape and "Input Shapes" not in total and "aten::addmm" in total
    assert "Self CPU time total" in out and f"Chrome trace to {names[0]}" in out


def test_profiling_trace_file_names_the_trace_with_the_tables_next_to_it(run_main, tmp_path):
    trace = tmp_path / "prof" / "trace.json"
    code, out, err = run_main(*RUN, "--enable-profiling", f"--profiling-trace-file={trace}")
    assert code == 0, err
    assert "Self CPU time total" in out and "aten::" in out and f"Wrote the profiler's Chrome trace to {trace}" in out
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name", "").startswith("aten::embedding_bag") for e in events)
    assert sorted(os.listdir(tmp_path / "prof")) == ["trace.json", "trace_shape.prof", "trace_total.prof"]


def test_a_distributed_process_names_its_profiling_files_by_its_rank():
    from dlrmkit import profiling

    now = datetime.datetime(2026, 1, 2, 3, 4, 5)
    assert profiling.output_paths("out/trace.json", rank=1) == {
        "trace": "out/trace.rank1.json", "shape": "out/trace.rank1_shape.prof", "total": "out/trace.rank1_total.prof"}
    assert profiling.output_paths("", now, 0)["trace"] == "dlrm_s_pytorch2026-01-02_03:04:05.rank0.json"


def test_a_trace_file_named_gz_is_gzipped_and_the_tables_lie_beside_it(tmp_path):
    import gzip

    from dlrmkit import profiling

    assert profiling.output_paths("out/trace.json.gz", rank=1) == {
        "trace": "out/trace.rank1.json.gz", "shape": "out/trace.rank1_shape.prof",
        "total": "out/trace.rank1_total.prof"}
    assert profiling.output_paths("T.JSON.GZ")["shape"] == "T_shape.prof"

    class Profile:  # what the profiler writes: its trace as JSON, whatever the name
        def export_chrome_trace(self, path):
            with open(path, "w") as f:
                json.dump({"traceEvents": [{"name": "aten::mm"}]}, f)

    trace = tmp_path / "trace.json.gz"
    profiling._export_trace(Profile(), True, str(trace))
    assert json.load(gzip.open(trace))["traceEvents"] == [{"name": "aten::mm"}]
    assert os.listdir(tmp_path) == ["trace.json.gz"]


@pytest.mark.parametrize("torchviz_present", [True, False])
def test_compute_graph_source_is_written_and_rendered_only_with_dot(run_main, tmp_path, monkeypatch, torchviz_present):
    if torchviz_present:
        pytest.importorskip("torchviz")
    else:
        monkeypatch.setitem(sys.modules, "torchviz", None)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no `dot`
    path = tmp_path / "graph.dot"
    code, out, err = run_main(*RUN, "--plot-compute-graph", f"--compute-graph-file={path}")
    assert code == 0, err
    source = path.read_text()
    assert source.startswith("digraph") and "emb_l.weight" in source and "bot_l.0.weight" in source
    # the lookup: EmbeddingBagBackward, or with SGD the lookup whose backward updates the rows
    assert "AddmmBackward" in source and re.search(r"EmbeddingBag(FusedUpdate)?Backward", source)
    assert "note: Graphviz `dot` not found" in err and not (tmp_path / "graph.pdf").exists()  # notes: stderr


def test_compute_graph_is_rendered_to_pdf_when_dot_exists(tmp_path, monkeypatch):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    dot = fake_bin / "dot"  # records its arguments, writes a PDF header to the -o file
    dot.write_text(f'#!/bin/sh\necho "$@" > {fake_bin / "args"}\nwhile [ "$1" != "-o" ]; do shift; done\n'
                   'printf "%%PDF-1.4" > "$2"\n')
    dot.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake_bin))
    layer = torch.nn.Linear(3, 2)
    messages = []
    pdf = compute_graph.write_compute_graph(layer(torch.ones(1, 3)).sum(), dict(layer.named_parameters()),
                                            str(tmp_path / "g.dot"), log=messages.append)
    assert pdf == str(tmp_path / "g.pdf") and (tmp_path / "g.pdf").read_bytes().startswith(b"%PDF")
    assert (fake_bin / "args").read_text().split() == ["-Tpdf", str(tmp_path / "g.dot"), "-o", pdf]
    assert messages[-1] == f"Rendered the compute graph to {pdf}"


def test_autograd_dot_names_parameters_and_links_functions():
    layer = torch.nn.Linear(3, 2)
    source = compute_graph.autograd_dot(layer(torch.ones(1, 3)).sum(), dict(layer.named_parameters()))
    assert 'weight\\n(2, 3)' in source and "SumBackward0" in source and source.count("->") >= 4


def test_tensorboard_scalars(run_main, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    code, _, err = run_main(*RUN, "--optimizer=adagrad", f"--tensor-board-filename={tmp_path / 'tb'}")
    assert code == 0, err
    events = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"Train/Loss", "Train/LR", "Train/SamplesPerSec", "Test/Loss", "Test/Acc", "Test/AUC"} <= tags
    assert [e.step for e in events.Scalars("Train/Loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("Test/AUC")] == [2, 4]


def test_missing_tensorboard_is_a_clear_error(run_main, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    code, out, err = run_main(*RUN, f"--tensor-board-filename={tmp_path / 'tb'}")
    assert code == 1 and "Finished" not in out
    assert err.strip() == ("dlrm_s_pytorch.py: error: --tensor-board-filename needs the tensorboard package "
                           "(pip install tensorboard)")


def test_mlperf_log_lines_follow_the_benchmark_structure(run_main):
    code, out, _ = run_main(*RUN, "--nepochs=2", "--mlperf-logging", "--mlperf-auc-threshold=0.01")
    assert code == 0
    records = parse_mllog(out.splitlines())
    keys = [r["key"] for r in records]
    assert keys[:2] == ["cache_clear", "init_start"] and keys[-1] == "run_stop"
    for key in ("submission_benchmark", "seed", "global_batch_size", "opt_base_learning_rate", "train_samples",
                "eval_samples", "init_stop", "run_start", "block_start", "epoch_start", "eval_start",
                "eval_accuracy", "eval_stop", "epoch_stop", "block_stop"):
        assert key in keys, key
    assert keys.index("init_stop") < keys.index("run_start") < keys.index("epoch_start") < keys.index("eval_accuracy")
    by_key = {r["key"]: r for r in records}
    assert by_key["submission_benchmark"]["value"] == "dlrm" and by_key["global_batch_size"]["value"] == 4
    assert by_key["eval_accuracy"]["metadata"]["epoch_num"] == 1.5 and 0 <= by_key["eval_accuracy"]["value"] <= 1
    # the AUC target is reached at the first test: training stops there and the run succeeded
    assert keys.count("eval_accuracy") == 1 and by_key["run_stop"]["metadata"]["status"] == "success"
    assert all(r["event_type"] in ("POINT_IN_TIME", "INTERVAL_START", "INTERVAL_END") for r in records)
    assert all(line.startswith(":::MLLOG {") for line in out.splitlines() if "MLLOG" in line)


def test_mlperf_epoch_num_of_tests_counts_from_one_like_epochs(run_main):
    code, out, _ = run_main("--mini-batch-size=4", "--test-freq=2", "--nepochs=2", "--num-batches=4",
                            "--mlperf-logging")
    assert code == 0
    records = parse_mllog(out.splitlines())
    for key in ("eval_start", "eval_accuracy", "eval_stop"):
        assert [r["metadata"]["epoch_num"] for r in records if r["key"] == key] == [1.5, 2.0, 2.5, 3.0]
    assert [r["metadata"]["epoch_num"] for r in records if r["key"] == "epoch_start"] == [1, 2]


def test_mlperf_epoch_num_is_a_fraction_of_the_whole_epoch_not_of_the_batch_cap(run_main, tmp_path):
    from helpers import fake_kaggle

    raw = fake_kaggle(tmp_path, 1400)  # 6 training days of 200 rows: 10 batches of 120
    code, out, err = run_main("--data-generation=dataset", f"--raw-data-file={raw}", "--arch-mlp-bot=13-4-2",
                              "--mini-batch-size=120", "--num-batches=4", "--test-freq=2", "--mlperf-logging")
    assert code == 0, err
    records = parse_mllog(out.splitlines())
    assert [r["metadata"]["epoch_num"] for r in records if r["key"] == "eval_accuracy"] == [1.2, 1.4]
    assert [r["value"] for r in records if r["key"] == "train_samples"] == [1200]


def test_mlperf_log_passes_the_compliance_checker_apart_from_the_accuracy_target(run_main, tmp_path):
    pytest.importorskip("mlperf_logging")
    # the benchmark's model shape (3 bottom, 5 top layers), small tables
    code, out, err = run_main("--arch-sparse-feature-size=16", "--arch-mlp-bot=13-32-32-16",
                              "--arch-mlp-top=32-32-16-8-1", "--arch-embedding-size=50-40-30", "--mini-batch-size=8",
                              "--num-batches=4", "--nepochs=2", "--test-freq=2", "--mlperf-logging")
    assert code == 0, err
    records = parse_mllog(out.splitlines())
    assert [r["metadata"]["tensor"] for r in records if r["key"] == "weights_initialization"] == [
        "embeddings", "bottom_mlp_dense1", "bottom_mlp_dense2", "bottom_mlp_dense3",
        "top_mlp_dense1", "top_mlp_dense2", "top_mlp_dense3", "top_mlp_dense4", "top_mlp_dense5"]
    lines = [line for line in out.splitlines() if line.startswith(":::MLLOG")]

    def check(lines):
        return run_compliance_checker(lines, "2.1.0", tmp_path)

    result = check(lines)
    assert result.returncode != 0 and "Failed checks for eval_accuracy : v['value'] >= 0.8025" in result.stderr
    # the same log with the target AUC reached: nothing else fails
    last = max(k for k, line in enumerate(lines) if '"key": "eval_accuracy"' in line)
    record = json.loads(lines[last].split(" ", 1)[1])
    record["value"] = 0.81
    result = check(lines[:last] + [":::MLLOG " + json.dumps(record)] + lines[last + 1:])
    assert result.returncode == 0, result.stdout + result.stderr


def test_mlperf_log_of_dlrm_dcnv2_passes_the_4_1_0_checker_apart_from_the_target_and_the_eval_set(
        run_main, tmp_path):
    pytest.importorskip("mlperf_logging")
    # the MLPerf DLRMv2 settings in small: dcn interaction, Adagrad with the reference's epsilon
    code, out, err = run_main("--arch-interaction-op=dcn", "--dcn-low-rank-dim=8", "--arch-sparse-feature-size=16",
                              "--arch-mlp-bot=13-32-16", "--arch-mlp-top=32-16-1", "--arch-embedding-size=50-40-30",
                              "--optimizer=adagrad", "--adagrad-eps=1e-8", "--mini-batch-size=8", "--num-batches=4",
                              "--nepochs=2", "--test-freq=2", "--mlperf-logging")
    assert code == 0, err
    records = parse_mllog(out.splitlines())
    by_key = {r["key"]: r["value"] for r in records}
    assert by_key["submission_benchmark"] == "dlrm_dcnv2" and by_key["opt_name"] == "adagrad"
    assert by_key["opt_adagrad_epsilon"] == 1e-8 and by_key["opt_learning_rate_decay_steps"] == 0
    assert "sgd_opt_base_learning_rate" not in by_key  # the 2.1.0 DLRM names are not the 4.1.0 benchmark's
    lines = [line for line in out.splitlines() if line.startswith(":::MLLOG")]

    def check(lines):
        return run_compliance_checker(lines, "4.1.0", tmp_path)

    result = check(lines)
    assert result.returncode != 0 and "Failed checks for eval_accuracy : v['value'] >= 0.80275" in result.stderr
    assert "failed test:  v['value'] == 89137319" in result.stdout + result.stderr
    # the same log with the target AUC reached on the benchmark's evaluation set (its 89137319 samples):
    # nothing else fails
    patched = []
    for line in lines:
        record = json.loads(line.split(" ", 1)[1])
        if record["key"] == "eval_accuracy":
            record["value"] = 0.81
        if record["key"] == "eval_samples":
            record["value"] = 89137319
        patched.append(":::MLLOG " + json.dumps(record))
    result = check(patched)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mlperf_run_stop_is_aborted_when_the_target_is_missed(run_main):
    code, out, _ = run_main(*RUN, "--mlperf-logging", "--mlperf-auc-threshold=0.999")
    assert code == 0
    assert parse_mllog(out.splitlines())[-1]["metadata"]["status"] == "aborted"


@pytest.mark.parametrize("mode", [["--inference-only"], ["--test-freq=0"]])
def test_a_threshold_without_effect_leaves_the_run_a_success(run_main, mode):
    code, out, err = run_main(*RUN, "--mlperf-logging", "--mlperf-auc-threshold=0.999", *mode)
    assert code == 0 and "note: --mlperf-auc-threshold has no effect" in err
    assert parse_mllog(out.splitlines())[-1]["metadata"]["status"] == "success"


def test_a_run_stopped_before_its_start_leaves_the_logs_of_an_earlier_run(run_main, tmp_path):
    log, board = tmp_path / "metrics.jsonl", tmp_path / "tb" / "run"
    flags = [*RUN, f"--metrics-log-file={log}"]
    code, _, err = run_main(*flags)
    assert code == 0, err
    earlier = log.read_text()
    late_errors = [["--precision=fp16"],  # CPU: refused once the device is known
                   ["--load-model=" + str(tmp_path / "missing.pt")]]
    if importlib.util.find_spec("tensorboard"):
        late_errors = [[*argv, f"--tensor-board-filename={board}"] for argv in late_errors]
    for argv in late_errors:
        code, _, err = run_main(*flags, *argv)
        assert code == 1 and err.count("\n") == 1, err
        assert log.read_text() == earlier
        assert not (tmp_path / "tb").exists()


def test_metrics_log_and_plot_script(run_main, tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    code, _, err = run_main(*RUN, "--nepochs=2", f"--metrics-log-file={log}")
    assert code == 0, err
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["event"] for r in records] == ["start"] + ["train", "train", "test"] * 4 + ["end"]
    train = [r for r in records if r["event"] == "train"]
    test = [r for r in records if r["event"] == "test"]
    assert [r["global_iteration"] for r in train] == list(range(1, 9))
    assert [(r["epoch"], r["iteration"]) for r in test] == [(0, 2), (0, 4), (1, 2), (1, 4)]
    assert all(0 <= r["auc"] <= 1 and 0 <= r["accuracy"] <= 1 and r["samples"] == 16 for r in test)
    assert all(r["lr"] == 0.01 and r["samples"] == 4 and r["samples_per_second"] > 0 for r in train)

    pytest.importorskip("matplotlib")
    from tools.plot_metrics import main as plot_metrics

    png = tmp_path / "plots" / "curves.png"
    assert plot_metrics([str(log), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10000
    assert plot_metrics([str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "x.png")]) == 1
    assert "none.jsonl: cannot read" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_inference_only_logs_its_test(run_main, tmp_path):
    checkpoint, log = tmp_path / "m.pt", tmp_path / "metrics.jsonl"
    assert run_main(*RUN, f"--save-model={checkpoint}")[0] == 0
    code, _, err = run_main(*RUN, f"--load-model={checkpoint}", "--inference-only", f"--metrics-log-file={log}")
    assert code == 0, err
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert events == ["start", "test", "end"]  # the test set alone


def test_metrics_log_of_a_criteo_run_records_the_table_sizes_used(run_main, tmp_path):
    from helpers import fake_kaggle, preprocess_quietly

    raw, log = fake_kaggle(tmp_path, 1400), tmp_path / "metrics.jsonl"
    code, _, err = run_main("--data-generation=dataset", f"--raw-data-file={raw}", "--arch-mlp-bot=13-4-2",
                            "--max-ind-range=300", "--mini-batch-size=100", "--num-batches=2",
                            f"--metrics-log-file={log}")
    assert code == 0, err
    processed, _ = preprocess_quietly(raw, tmp_path / "kaggleAdDisplayChallenge_processed", max_ind_range=300)
    config = json.loads(log.read_text().splitlines()[0])["config"]
    assert config["args"]["arch_embedding_size"] == processed.counts and len(processed.counts) == 26


def test_autograd_dot_walks_graphs_whose_node_objects_are_freed_and_made_again():
    """Some torch versions keep a node's Python object only while something holds it and make a new one
    at the next access: a freed object's id can come back for another node, which must not count as
    visited. A node reached twice while its object lives is one node."""
    alive = weakref.WeakValueDictionary()

    class StepBackward:  # node k, a fresh object unless the last one is still held, as such torch gives
        def __init__(self, k):
            self.k = k

        @classmethod
        def of(cls, k):
            node = alive.get(k)
            if node is None:
                node = alive[k] = cls(k)
            return node

        @property
        def next_functions(self):  # a chain 0 <- 1 <- ... <- 19, and 19 also feeds 17 (a shared node)
            nexts = [(StepBackward.of(self.k + 1), 0)] if self.k < 19 else []
            return tuple(nexts + ([(StepBackward.of(19), 0)] if self.k == 17 else []))

    output = types.SimpleNamespace(shape=(1,), grad_fn=StepBackward.of(0))
    source = compute_graph.autograd_dot(output, {})
    assert source.count('[label="StepBackward"]') == 20 and source.count("->") == 21


def test_the_bf16_compute_graph_is_the_one_trained(run_main, tmp_path, monkeypatch):
    """--plot-compute-graph draws the forward pass under --precision, with its casts."""
    monkeypatch.setitem(sys.modules, "torchviz", None)
    graphs = {}
    for precision in ("fp32", "bf16"):
        path = tmp_path / f"{precision}.dot"
        code, out, err = run_main(*RUN, f"--precision={precision}", "--plot-compute-graph",
                                  f"--compute-graph-file={path}")
        assert code == 0, err
        graphs[precision] = path.read_text()
    assert "ToCopyBackward" not in graphs["fp32"] and "ToCopyBackward" in graphs["bf16"]
    assert "emb_l.weight" in graphs["bf16"] and "top_l.0.weight" in graphs["bf16"]


MLPERF_TEST_LINE = re.compile(r"^recall ([\d.]+), precision ([\d.]+), f1 ([\d.]+), ap ([\d.]+), auc ([\d.]+), "
                              r"best auc [\d.]+, accuracy ([\d.]+) %, best accuracy [\d.]+ %$")


def test_mlperf_logging_prints_the_originals_test_line(run_main):
    code, out, err = run_main("--mini-batch-size=16", "--data-size=256", "--test-freq=8", "--loss-function=bce",
                              "--round-targets", "--mlperf-logging")
    assert code == 0, err
    lines = [MLPERF_TEST_LINE.match(line) for line in out.splitlines() if line.startswith("recall")]
    assert len(lines) == 2 and all(lines) and not any(line.startswith(" accuracy") for line in out.splitlines())


def test_classification_metrics_count_the_rounded_predictions():
    import dlrm_s_pytorch as dlrm

    scores = torch.tensor([0.9, 0.8, 0.4, 0.6, 0.2, 0.7, 0.1, 0.55])
    targets = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    recall, precision, f1, ap = dlrm.classification_metrics(scores, targets)
    # predicted positive: 0.9, 0.8, 0.6, 0.7, 0.55 -> 3 of the 4 positives, 3 of 5 predictions
    assert (recall, precision) == (0.75, 0.6) and f1 == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    # ranked: 1 1 1 0 0 1 0 0 -> precision at each positive 1, 1, 1, 4/6; recall steps of 1/4
    assert ap == pytest.approx((1 + 1 + 1 + 4 / 6) / 4)
    assert dlrm.classification_metrics(scores, torch.zeros(8))[:3] == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("stop,code", [(KeyboardInterrupt, 130), ("error", 1), ("bug", None)])
def test_a_run_that_stops_early_ends_its_metrics_log_as_aborted(run_main, tmp_path, monkeypatch, stop, code):
    import dlrm_s_pytorch as dlrm

    log = tmp_path / "metrics.jsonl"
    real_test = dlrm.run_test

    def stopping_test(*args, **kwargs):  # after the first test's record
        real_test(*args, **kwargs)
        if stop is KeyboardInterrupt:
            raise KeyboardInterrupt
        raise dlrm.DLRMError("stopped by the test") if stop == "error" else RuntimeError("an unexpected fault")

    monkeypatch.setattr(dlrm, "run_test", stopping_test)
    if code is None:
        with pytest.raises(RuntimeError, match="an unexpected fault"):
            run_main(*RUN, f"--metrics-log-file={log}")
    else:
        assert run_main(*RUN, f"--metrics-log-file={log}")[0] == code
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["event"] for r in records][-2:] == ["test", "end"] and records[-1]["status"] == "aborted"
