"""`pip install .`: the four modules users know, one package for the rest, and the `dlrm` command."""

import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_the_wheel_adds_no_generic_top_level_names(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info next to setup.cfg
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "tests", "bench", "input", "output", "build",
                                                                "*.egg-info", "__pycache__", "*.pt", "*.onnx"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel, = tmp_path.glob("dlrm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"dlrm_s_pytorch.py", "dlrm_data.py", "data_utils.py", "extend_distributed.py", "dlrmkit"}
    assert "dlrmkit/optim/sparse_optimizers.py" in names and "dlrmkit/tricks/qr_embedding_bag.py" in names
    assert "dlrmkit/kernels.c" in names  # the native kernels' source, built on first use
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "dlrm = dlrm_s_pytorch:main" in entry_points
