"""Output paths that cannot be written: one line naming the flag, exit non-zero, before any work,
nothing left behind; a write that fails late is one line too."""

import os
import stat
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models

SMALL = ["--num-batches=3", "--mini-batch-size=8"]


@pytest.mark.parametrize("argv,flag", [
    (["--enable-profiling", "--profiling-trace-file=/proc/p.json"], "--profiling-trace-file /proc/p.json"),
    (["--plot-compute-graph", "--compute-graph-file=/proc/g.dot"], "--compute-graph-file /proc/g.dot"),
    (["--save-model=/proc/m.pt"], "--save-model /proc/m.pt"),
    (["--save-onnx", "--onnx-file=/proc/x.onnx"], "--onnx-file /proc/x.onnx"),
    (["--metrics-log-file=/proc/m.jsonl"], "--metrics-log-file /proc/m.jsonl"),
    (["--tensor-board-filename=/proc/tb"], "--tensor-board-filename /proc/tb"),
])
def test_unwritable_trainer_outputs_are_refused_before_training(run_main, argv, flag):
    code, out, err = run_main(*SMALL, *argv)
    assert code == 1
    assert err.startswith(f"dlrm_s_pytorch.py: error: {flag}: ") and err.count("\n") == 1
    assert "time/loss/accuracy" not in out


@pytest.mark.parametrize("argv,flag,example", [
    (["--save-onnx", "--onnx-file=out/"], "--onnx-file", "model.onnx"),
    (["--save-model=out/."], "--save-model", "model.pt"),
    (["--save-model=out/"], "--save-model", "model.pt"),
    (["--plot-compute-graph", "--compute-graph-file=out/"], "--compute-graph-file", "graph.dot"),
    (["--enable-profiling", "--profiling-trace-file=out/"], "--profiling-trace-file", "trace.json"),
])
def test_an_output_named_as_a_folder_is_refused_before_training(run_main, tmp_path, monkeypatch, argv, flag, example):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(*SMALL, *argv)
    given = argv[-1].split("=", 1)[1]
    assert code == 1 and err == (f"dlrm_s_pytorch.py: error: {flag} {given}: is a directory name; give a file name "
                                 f"(e.g. {os.path.join(given, example)})\n")
    assert "time/loss/accuracy" not in out and not os.path.exists(tmp_path / "out")


def test_profiling_tables_next_to_the_trace_are_checked_too(run_main, tmp_path):
    (tmp_path / "trace_total.prof").mkdir()
    code, out, err = run_main(*SMALL, "--enable-profiling", f"--profiling-trace-file={tmp_path / 'trace.json'}")
    assert code == 1 and f"{tmp_path / 'trace_total.prof'}: is a directory" in err and err.count("\n") == 1
    assert "time/loss/accuracy" not in out


@pytest.mark.parametrize("argv,flag", [
    (["--save-model=/proc/m.pt"], "--save-model /proc/m.pt"),
    (["--plot-compute-graph", "--compute-graph-file=/proc/g.dot"], "--compute-graph-file /proc/g.dot"),
    (["--enable-profiling", "--profiling-trace-file=/proc/p.json"], "--profiling-trace-file /proc/"),
])
def test_a_write_that_fails_after_training_is_one_line(run_main, monkeypatch, argv, flag):
    from dlrmkit import outputs

    monkeypatch.setattr(outputs, "output_problem", lambda path: None)  # as if the folder broke after the checks
    code, out, err = run_main(*SMALL, *argv)
    assert code == 1
    assert err.startswith(f"dlrm_s_pytorch.py: error: {flag}") and err.count("\n") == 1
    assert "cannot write" in err and "time/loss/accuracy" in out


def run_tool(*args, cwd=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd or ROOT, timeout=120)


@pytest.mark.parametrize("out,problem", [("/proc/x.txt", "cannot create a file in /proc"), ("{d}", "is a directory")])
def test_make_fake_refuses_an_unwritable_out(tmp_path, out, problem):
    target = tmp_path / "target"
    target.mkdir()
    out = out.format(d=target)
    result = run_tool("data_utils.py", "make-fake", "--rows", "10", "--out", out)
    assert result.returncode == 1
    assert result.stderr.startswith(f"data_utils.py: error: --out {out}: {problem}")
    assert result.stderr.count("\n") == 1
    assert not os.path.exists(out + ".tmp") and os.listdir(target) == []


@pytest.mark.parametrize("out,problem", [("/proc/a.png", "cannot create a file in /proc"), ("{d}", "is a directory")])
def test_plot_metrics_refuses_an_unwritable_output(tmp_path, out, problem):
    log = tmp_path / "run.jsonl"
    log.write_text('{"event": "train", "global_iteration": 1, "loss": 0.5}\n')
    target = tmp_path / "target"
    target.mkdir()
    out = out.format(d=target)
    result = run_tool("tools/plot_metrics.py", str(log), "-o", out)
    assert result.returncode == 1
    assert result.stderr.startswith(f"plot_metrics.py: error: -o/--output {out}: {problem}")
    assert result.stderr.count("\n") == 1
    assert os.listdir(target) == []


def test_plot_interactions_refuses_an_unwritable_output_before_loading(tmp_path, capsys):
    from tools import plot_interactions

    assert plot_interactions.main(["-o", "/proc/i.png", f"--load-model={tmp_path / 'none.pt'}"]) == 1
    assert capsys.readouterr().err == "plot_interactions.py: error: -o/--output /proc/i.png: cannot create a file " \
                                      "in /proc (No such file or directory)\n"


def test_a_device_or_pipe_is_never_replaced_by_an_output(run_main, tmp_path):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    code, out, err = run_main("--mini-batch-size=2", "--data-size=4", f"--save-model={pipe}")
    assert code == 1 and "is not a regular file" in err and "Finished" not in out
    assert stat.S_ISFIFO(os.stat(pipe).st_mode)


def test_an_output_through_a_symbolic_link_is_written_to_its_target(run_main, tmp_path):
    target, link = tmp_path / "real.pt", tmp_path / "link.pt"
    target.write_bytes(b"old")
    link.symlink_to(target)
    code, out, err = run_main("--mini-batch-size=2", "--data-size=4", f"--save-model={link}")
    assert code == 0, err
    assert link.is_symlink() and target.stat().st_size > 3


def test_a_short_write_of_torch_save_names_its_likely_causes(tmp_path):
    from dlrmkit import outputs

    def full_disk(tmp):
        open(tmp, "wb").close()
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3136 vs 3030")

    with pytest.raises(outputs.OutputError, match=r"--save-model .*m.pt: cannot write \(the write stopped short: no "
                                                  r"space left on the device \([\d,]+ bytes free\) or a file size"):
        outputs.write_atomically("--save-model", str(tmp_path / "m.pt"), full_disk)
    assert os.listdir(tmp_path) == []
