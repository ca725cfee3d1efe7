"""The CUDA sources compile (nvcc -c -arch=sm_90) on a machine without a GPU, so CI catches CUDA breakage."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="nvcc not found")
def test_cuda_sources_compile():
    out = subprocess.run(["bash", os.path.join(ROOT, "csrc", "check_cuda.sh")], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
