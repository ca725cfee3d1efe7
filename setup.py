"""Build t2t_fast and its C++ extension t2t_fast._C (ninja, torch.utils.cpp_extension).

CPU sources are always built; CUDA sources too when torch has CUDA and nvcc is found.
Environment: T2T_FAST_CUDA=0|1 overrides the CUDA detection; T2T_FAST_SKIP_EXT=1 installs pure Python.
Install with ``pip install --no-build-isolation -e .`` so the installed torch is used (and never replaced).
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("T2T_FAST_SKIP_EXT", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("t2t-fast: torch is not importable in the build environment; installing without the C++ extension "
              "(use pip install --no-build-isolation)")
        return [], {}
    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not cpu_sources:
        return [], {}
    flag = os.environ.get("T2T_FAST_CUDA")
    use_cuda = flag == "1" if flag in ("0", "1") else (torch.version.cuda is not None and CUDA_HOME is not None)
    # No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++20 for torch >= 2.10).
    cxx = ["-O3", "-fopenmp"] if os.name != "nt" else ["/O2"]
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"] if os.name != "nt" else [])
    if use_cuda:
        sources = cpu_sources + sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo"]
        kwargs["define_macros"] = [("T2T_FAST_WITH_CUDA", "1")]
        ext = CUDAExtension("t2t_fast._C", sources, **kwargs)
    else:
        ext = CppExtension("t2t_fast._C", cpu_sources, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="t2t-fast",
    version="0.1.0",
    description="Fused GPU kernels and a drop-in Tokens-to-Token ViT",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["t2t_fast", "t2t_fast.ops", "t2t_fast.models", "t2t_fast.train", "t2t_fast.kernels"],
    package_dir={"t2t_fast.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy", "ninja", "pybind11", "pillow", "triton>=3.6; platform_system=='Linux'"],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["t2t-fast=t2t_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
