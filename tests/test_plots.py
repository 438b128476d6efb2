"""tools/plot_metrics.py and tools/plot_interactions.py write labelled PNGs."""

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models

PNG = b"\x89PNG\r\n\x1a\n"
RUN = ["--arch-sparse-feature-size=4", "--arch-mlp-bot=4-8-4", "--arch-mlp-top=8-1",
       "--arch-embedding-size=50-60-70", "--data-size=512", "--mini-batch-size=64", "--loss-function=bce",
       "--round-targets=True", "--test-freq=4", "--print-freq=4"]


def test_metrics_plot_names_runs_and_shows_accuracy_in_percent(run_main, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from tools import plot_metrics

    logs = []
    for name in ("sgd", "adagrad"):
        (tmp_path / name).mkdir()
        logs.append(tmp_path / name / "metrics.jsonl")
        assert run_main(*RUN, f"--optimizer={name}", f"--metrics-log-file={logs[-1]}")[0] == 0
    assert plot_metrics.run_names([str(p) for p in logs]) == ["sgd/metrics", "adagrad/metrics"]

    drawn = {}
    real_plot = plot_metrics.plot

    def remember(runs, output):
        drawn["runs"] = runs
        real_plot(runs, output)

    monkeypatch.setattr(plot_metrics, "plot", remember)
    png = tmp_path / "curves.png"
    assert plot_metrics.main([str(p) for p in logs] + ["-o", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG
    assert [label for label, _ in drawn["runs"]] == ["sgd/metrics", "adagrad/metrics"]
    _, test, loss_function = drawn["runs"][0][1]
    assert loss_function == "bce"
    _, percent = plot_metrics.series(test, "accuracy", 100.0)
    assert all(1 < p <= 100 for p in percent)


def test_interaction_heatmap_from_a_checkpoint(run_main, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from tools import plot_interactions

    checkpoint = tmp_path / "model.pt"
    assert run_main(*RUN, f"--save-model={checkpoint}")[0] == 0
    capsys.readouterr()
    png = tmp_path / "interactions.png"
    assert plot_interactions.main(["-o", str(png), "--batches=2", *RUN, f"--load-model={checkpoint}"]) == 0
    assert png.read_bytes()[:8] == PNG
    out = capsys.readouterr().out
    assert out.startswith("strongest interactions: ") and f"Wrote {png}" in out
    assert "dense x t" in out or " x dense" in out or "t1 x t0" in out
    assert plot_interactions.feature_names("random", 3) == ["dense", "t0", "t1", "t2"]
    assert plot_interactions.feature_names("dataset", 26)[:2] == ["dense (I1-I13)", "C1"]
    assert plot_interactions.feature_names("dataset", 26)[-1] == "C26"

    import torch

    import dlrm_s_pytorch as dlrm

    args = dlrm.parse_args(RUN)
    _, test_set, dense_dim, tables = dlrm.make_datasets(args)
    model = dlrm.build_model(args, dense_dim, tables)
    batch = test_set[0]
    matrix = plot_interactions.mean_abs_dot_products(model, [batch])
    vectors = plot_interactions.feature_vectors(model, batch).detach()
    assert matrix.shape == (4, 4)
    assert matrix[2, 0] == pytest.approx((vectors[:, 2] * vectors[:, 0]).sum(1).abs().mean().item(), rel=1e-5)
    assert torch.allclose(torch.from_numpy(matrix), torch.from_numpy(matrix).T)


def test_interaction_plot_needs_a_checkpoint(capsys):
    from tools import plot_interactions

    assert plot_interactions.main(["-o", "x.png", *RUN]) == 1
    assert "--load-model is needed" in capsys.readouterr().err


def test_interaction_plot_needs_vectors_of_one_width(tmp_path, capsys):
    from tools import plot_interactions

    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"")  # not read: the widths are refused first
    argv = ["-o", str(tmp_path / "x.png"), "--arch-interaction-op=dcn", "--arch-sparse-feature-size=4",
            "--arch-mlp-bot=4-3", f"--load-model={checkpoint}"]
    assert plot_interactions.main(argv) == 1
    assert capsys.readouterr().err == ("plot_interactions.py: error: the bottom MLP's output (3 wide) and the "
                                       "embeddings (4 wide) have no dot products to draw\n")
