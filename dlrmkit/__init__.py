"""The parts of the DLRM trainer behind `dlrm_s_pytorch.py`, in one package.

- `sparse`: `SparseFeatures`, the one sparse batch type (flat indices + offsets, per-table views);
- `embeddings`: the embedding-collection interface and its batched and per-table collections;
- `interactions`: the feature interactions (dot, cat, dcn, projection), chosen by name;
- `optim`: SGD, Adagrad and row-wise Adagrad with fused sparse updates;
- `kernels`: native CPU kernels of the hot path (built on first use; PyTorch operators without a compiler);
- `tricks`: quotient-remainder and mixed-dimension tables, weighted pooling;
- `onnx_export`, `quantization`: deployment; `run_logs`, `mlperf_logger`, `profiling`,
  `compute_graph`: what a run writes besides its printed lines; `trace_data`: trace-driven ids;
- `multihot`: one-hot ids expanded into the fixed-size bags of MLPerf DLRMv2; `hashing`: SplitMix64;
- `flags`: the command-line pieces shared by the trainer and data_utils.py (valid ranges, data flags);
  `memory`: the memory a run needs and what the process may use; `outputs`: output files written under a
  temporary name; `signals`: SIGTERM unwound as Ctrl-C.
"""
