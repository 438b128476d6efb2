import contextlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CRITEO_SAMPLE = os.path.join(ROOT, "..", "shared", "data", "criteo_sample.tsv")


def run_cli(*args, cwd=None, timeout=120, env=None):
    """Runs dlrm_s_pytorch.py in a fresh process; returns the CompletedProcess."""
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "dlrm_s_pytorch.py"), *args],
        capture_output=True, text=True, cwd=cwd or ROOT, timeout=timeout, env=full_env,
    )


@pytest.fixture
def cli():
    return run_cli


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
