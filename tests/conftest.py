import contextlib
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CRITEO_SAMPLE = os.path.join(ROOT, "..", "shared", "data", "criteo_sample.tsv")


@pytest.fixture
def run_main(capsys):
    """Runs dlrm_s_pytorch.main in-process; returns (exit code, stdout, stderr)."""
    import dlrm_s_pytorch

    def call(*args):
        code = dlrm_s_pytorch.main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


@contextlib.contextmanager
def torch_threads(count):
    """PyTorch's intra-op threads set to `count` inside the block."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_torch_thread():
    """Tiny models: more threads only add start-up costs (and stalls on a shared 2-core box)."""
    with torch_threads(1):
        yield
