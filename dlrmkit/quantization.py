"""Quantized CPU inference: --quantize-mlp-with-bit and --quantize-emb-with-bit.

- MLPs (8 or 16 bit): PyTorch dynamic quantization of every nn.Linear of the bottom and
  top MLPs and of the interaction (the dcn cross layers' U and V, the projection's branches),
  int8 weights with per-batch int8 activations (8) or fp16 weights (16);
- embedding tables (4 or 8 bit): row-wise quantization, each row stored as 4/8-bit codes
  with its own scale and offset, looked up and pooled by the fused FBGEMM kernels
  `quantized::embedding_bag_{4bit,byte}_rowwise_offsets` (per-sample weights included).
  Every nn.EmbeddingBag of the model is replaced, also those inside QR and MD tables.

    model = quantize_for_inference(model, mlp_bits=8, emb_bits=4)   # in place, returns model
"""

from __future__ import annotations

import io
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

MLP_BITS = (8, 16, 32)
EMB_BITS = (4, 8, 32)


class QuantizedEmbeddingBag(nn.Module):
    """A sum-pooled embedding table with row-wise 4- or 8-bit weights; called like nn.EmbeddingBag."""

    def __init__(self, weight: torch.Tensor, bits: int):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"embedding quantization supports 4 or 8 bits, got {bits}")
        weight = weight.detach().float().cpu()
        self.bits = bits
        self.num_embeddings, self.embedding_dim = weight.shape
        if bits == 4:
            if self.embedding_dim % 2:  # 4-bit rows pack two values per byte
                weight = F.pad(weight, (0, 1))
            packed = torch.ops.quantized.embedding_bag_4bit_prepack(weight)
        else:
            packed = torch.ops.quantized.embedding_bag_byte_prepack(weight)
        self.register_buffer("packed_weight", packed)

    def forward(self, indices, offsets, per_sample_weights=None):
        op = (torch.ops.quantized.embedding_bag_4bit_rowwise_offsets if self.bits == 4
              else torch.ops.quantized.embedding_bag_byte_rowwise_offsets)
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.float()
        # (weight, indices, offsets, scale_grad_by_freq, mode=sum, pruned_weights, per_sample_weights,
        #  compressed_indices_mapping, include_last_offset)
        pooled = op(self.packed_weight, indices, offsets, False, 0, False, per_sample_weights, None, False)
        return pooled[:, : self.embedding_dim]

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}"


def quantize_embeddings(module: nn.Module, bits: int) -> int:
    """Replaces every nn.EmbeddingBag below `module` (in place); returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.EmbeddingBag):
            if child.mode != "sum":
                raise ValueError(f"only sum-pooled tables can be quantized ({name} has mode={child.mode})")
            setattr(module, name, QuantizedEmbeddingBag(child.weight, bits))
            count += 1
        else:
            count += quantize_embeddings(child, bits)
    return count


def quantize_mlp(mlp: nn.Module, bits: int) -> nn.Module:
    dtype = torch.qint8 if bits == 8 else torch.float16
    with warnings.catch_warnings():  # torch.ao's notice that eager-mode quantization moves to torchao
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(mlp, {nn.Linear}, dtype=dtype)


def quantize_for_inference(model: nn.Module, mlp_bits: int = 32, emb_bits: int = 32) -> nn.Module:
    """Quantizes a DLRM_Net on the CPU in place (32 leaves that part in fp32)."""
    if mlp_bits not in MLP_BITS:
        raise ValueError(f"--quantize-mlp-with-bit must be one of {MLP_BITS}, got {mlp_bits}")
    if emb_bits not in EMB_BITS:
        raise ValueError(f"--quantize-emb-with-bit must be one of {EMB_BITS}, got {emb_bits}")
    model.cpu().eval()
    if mlp_bits != 32:
        model.bot_l = quantize_mlp(model.bot_l, mlp_bits)
        model.top_l = quantize_mlp(model.top_l, mlp_bits)
        if any(isinstance(m, nn.Linear) for m in model.interaction.modules()):
            model.interaction = quantize_mlp(model.interaction, mlp_bits)
    if emb_bits != 32:  # row-wise quantized, one table module at a time
        model.emb_l = model.emb_l.to_per_table()
        quantize_embeddings(model.emb_l, emb_bits)
    return model


def serialized_size(model: nn.Module) -> int:
    """Bytes of torch.save(model.state_dict()): the size a deployed checkpoint takes."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()
