"""Quantized CPU inference: AUC close to fp32 on a planted problem, smaller model, fused lookups."""

import copy

import pytest
import torch
import torch.nn as nn

import dlrm_s_pytorch as dlrm
from dlrmkit import quantization
from dlrmkit.optim import make_optimizer
from helpers import planted_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models

TABLES = (50, 20, 10)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    args = dlrm.parse_args(["--arch-sparse-feature-size=8", "--arch-mlp-bot=4-16-8", "--arch-mlp-top=16-1",
                            "--loss-function=bce", "--optimizer=adagrad", "--learning-rate=0.1",
                            "--mini-batch-size=64"])
    train_set = planted_dataset(3000, 64, seed=1, tables=TABLES)
    test_set = planted_dataset(4000, 1000, seed=2, tables=TABLES)
    model = dlrm.build_model(args, 4, TABLES)
    optimizer = make_optimizer("adagrad", model.parameters(), 0.1)
    dlrm.train(args, model, optimizer, train_set, test_set, torch.device("cpu"), dlrm.TrainState(), len(train_set),
               log=lambda s: None)
    return model, test_set


@pytest.mark.slow
@pytest.mark.parametrize("mlp_bits,emb_bits", [(8, 32), (16, 32), (32, 8), (32, 4), (8, 4), (16, 8)])
def test_quantized_auc_is_within_0_01_of_fp32(trained, mlp_bits, emb_bits):
    model, test_set = trained
    device = torch.device("cpu")
    fp32 = dlrm.evaluate(model, test_set, "bce", None, device)
    quantized = quantization.quantize_for_inference(copy.deepcopy(model), mlp_bits, emb_bits)
    result = dlrm.evaluate(quantized, test_set, "bce", None, device)
    assert fp32.auc > 0.75
    assert abs(result.auc - fp32.auc) < 0.01
    if emb_bits != 32:
        assert all(isinstance(bag, quantization.QuantizedEmbeddingBag) for bag in quantized.emb_l)
    if mlp_bits == 8:
        assert not any(isinstance(m, nn.Linear) and type(m) is nn.Linear for m in quantized.bot_l)


def test_quantized_model_is_smaller():
    args = dlrm.parse_args(["--arch-sparse-feature-size=16", "--arch-mlp-bot=13-256-16", "--arch-mlp-top=256-1"])
    model = dlrm.build_model(args, 13, [20000, 5000])
    fp32 = quantization.serialized_size(model)
    sizes = {bits: quantization.serialized_size(quantization.quantize_for_inference(copy.deepcopy(model), mlp, emb))
             for bits, (mlp, emb) in {"mlp8": (8, 32), "emb8": (32, 8), "emb4": (32, 4), "both": (8, 4)}.items()}
    # rows of 16 fp32 values (64 bytes) become 16 + 8 bytes (8-bit codes, fp32 scale and offset)
    # or 8 + 4 bytes (4-bit codes, fp16 scale and offset)
    assert sizes["mlp8"] < fp32 and sizes["emb8"] < 0.4 * fp32 and sizes["emb4"] < 0.22 * fp32
    assert sizes["both"] < sizes["emb4"]


@pytest.mark.parametrize("bits,dim", [(8, 6), (4, 6), (4, 5)])
def test_quantized_bag_pools_rows_within_the_quantization_step(bits, dim):
    torch.manual_seed(0)
    weight = torch.randn(30, dim)
    bag = quantization.QuantizedEmbeddingBag(weight, bits)
    indices = torch.tensor([0, 29, 5, 5, 7, 12])
    offsets = torch.tensor([0, 2, 2, 5])
    weights = torch.tensor([1.0, 0.5, 2.0, 1.0, 1.0, 3.0])
    expected = nn.functional.embedding_bag(indices, weight, offsets, mode="sum", per_sample_weights=weights)
    step = (weight.max(1).values - weight.min(1).values) / (2 ** bits - 1)  # row-wise quantization step
    tolerance = float((step[indices] * weights).sum()) + 1e-3
    out = bag(indices, offsets, per_sample_weights=weights)
    assert out.shape == expected.shape and (out[1] == 0).all()
    assert float((out - expected).abs().max()) <= tolerance


def test_qr_and_md_tables_quantize_too():
    torch.manual_seed(0)
    args = dlrm.parse_args(["--qr-flag", "--qr-threshold=30", "--md-flag", "--md-threshold=15",
                            "--arch-sparse-feature-size=4", "--arch-mlp-bot=4-8-4"])
    model = dlrm.build_model(args, 4, TABLES)
    batch = planted_dataset(64, 64, seed=3, tables=TABLES)[0]
    with torch.no_grad():
        reference = model(batch.dense_x, batch.offsets, batch.indices)
        quantization.quantize_for_inference(model, 32, 8)
        out = model(batch.dense_x, batch.offsets, batch.indices)
    assert isinstance(model.emb_l[0].embs_q, quantization.QuantizedEmbeddingBag)
    assert isinstance(model.emb_l[1].embs, quantization.QuantizedEmbeddingBag)
    assert float((out - reference).abs().max()) < 0.01


def test_quantized_inference_from_the_command_line(run_main, tmp_path):
    flags = ["--arch-embedding-size=100-50-20", "--mini-batch-size=16", "--data-size=64", "--loss-function=bce",
             "--round-targets"]
    assert run_main(*flags, f"--save-model={tmp_path / 'm.pt'}")[0] == 0
    code, out, err = run_main(*flags, f"--load-model={tmp_path / 'm.pt'}", "--inference-only",
                              "--quantize-mlp-with-bit=8", "--quantize-emb-with-bit=4")
    assert code == 0, err
    assert "Quantized for CPU inference: MLPs int8 (dynamic), embedding rows 4-bit" in out
    assert "Testing for inference only\n accuracy" in out and ", auc=" in out


@pytest.mark.parametrize("argv,message", [
    (["--quantize-mlp-with-bit=8"], "--quantize-mlp-with-bit needs --inference-only"),
    (["--inference-only", "--quantize-emb-with-bit=16"], "--quantize-emb-with-bit must be 4, 8 or 32, got 16"),
    (["--inference-only", "--quantize-mlp-with-bit=4"], "--quantize-mlp-with-bit must be 8, 16 or 32, got 4"),
    (["--inference-only", "--quantize-emb-with-bit=8", "--use-gpu"], "quantized inference runs on the CPU"),
])
def test_bad_quantization_flags_are_one_line_errors(run_main, argv, message):
    code, out, err = run_main(*argv)
    assert code == 1 and message in err and err.count("\n") == 1 and "Finished" not in out
