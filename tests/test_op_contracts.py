"""The op declarations agree with the C++ sources and with each other (CPU only, no kernel runs).

- csrc/ops.cpp's TORCH_LIBRARY schemas are the source: each descriptor's copy, and the Triton operators it
  declares, match them exactly; every operator there has a descriptor.
- The CUDA limits the descriptors' verify functions check are csrc/common.h's.
- Each Triton kernel file's ``verify`` takes exactly its ``forward``'s arguments (the backend registry calls it
  with them), and neither the kernel files nor ``t2t_fast/runtime.py`` import the op layer (no cycle).
"""
import ast
import importlib
import inspect
import os
import re

import pytest
import torch

import t2t_fast
from t2t_fast.backends import extension_error
from t2t_fast.ops import OPS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the op modules (t2t_fast.ops.soft_split is also the name of the function the package exports)
soft_split = importlib.import_module("t2t_fast.ops.soft_split")
performer = importlib.import_module("t2t_fast.ops.performer")


def _cpp_schemas() -> dict[str, str]:
    """name -> "(args) -> (returns)" of every m.def in csrc/ops.cpp (adjacent string literals joined)."""
    src = open(os.path.join(ROOT, "csrc", "ops.cpp")).read()
    out = {}
    for literals in re.findall(r'm\.def\(\s*((?:"(?:[^"\\]|\\.)*"\s*)+)\)', src):
        text = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', literals))
        name, rest = text.split("(", 1)
        out[name] = "(" + rest
    return out


def test_every_cpp_operator_has_a_descriptor():
    declared = {f"{d.prefix}_{kind}" for d in OPS.values() for kind in ("forward", "backward")}
    assert declared == set(_cpp_schemas())


@pytest.mark.parametrize("op", sorted(OPS))
def test_schemas_match_csrc(op):
    cpp = _cpp_schemas()
    desc = OPS[op]
    for kind, schema in zip(("forward", "backward"), desc.schemas):
        name = f"{desc.prefix}_{kind}"
        assert schema == cpp[name], f"{op}: the descriptor's {kind} schema differs from csrc/ops.cpp"
        expected = str(torch._C.parse_schema(f"t2t_fast_triton::{name}{cpp[name]}"))
        assert str(getattr(torch.ops.t2t_fast_triton, name).default._schema) == expected
        if not extension_error():
            assert str(getattr(torch.ops.t2t_fast, name).default._schema) == expected.replace("t2t_fast_triton::",
                                                                                                "t2t_fast::")


def test_cuda_limits_match_csrc():
    src = open(os.path.join(ROOT, "csrc", "common.h")).read()
    limits = {name: int(value) for name, value in re.findall(r"constexpr int64_t (kCuda\w+) = (\d+);", src)}
    assert limits == {"kCudaMaxPatchLen": soft_split.CUDA_MAX_PATCH_LEN, "kCudaMaxOut": soft_split.CUDA_MAX_OUT,
                      "kCudaMaxHeadDim": performer.CUDA_MAX_HEAD_DIM, "kCudaMaxFeatures": performer.CUDA_MAX_FEATURES}
    q = torch.empty(1, 1, 4, 8, device="meta")
    assert performer.cuda_verify(q, q, q, torch.empty(65, 8, device="meta"), 1e-8) == "m=65 exceeds 64"
    assert performer.cuda_verify(q, q, q, torch.empty(64, 8, device="meta"), 1e-8) is None
    x = torch.empty(1, 3, 9, 9, device="meta")
    assert soft_split.cuda_verify(x, (3, 3), (2, 2), (1, 1), torch.empty(4097, 27, device="meta"), None, None, None,
                                  1e-5) == "out=4097 exceeds 4096"


def _imports(path: str) -> set[str]:
    tree = ast.parse(open(path).read())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


@pytest.mark.parametrize("op", sorted(OPS))
def test_kernel_file_verify_takes_forward_arguments(op):
    path = os.path.join(ROOT, "kernels", f"{OPS[op].prefix}.py")
    tree = ast.parse(open(path).read())
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    params = {name: [a.arg for a in functions[name].args.args] for name in ("forward", "verify")}
    assert params["verify"] == params["forward"]
    assert not {m for m in _imports(path) if m.startswith("t2t_fast.") and m != "t2t_fast.runtime"}


def test_runtime_imports_nothing_from_t2t_fast():
    assert not {m for m in _imports(os.path.join(ROOT, "t2t_fast", "runtime.py")) if m.startswith("t2t_fast")}


def test_front_doors_document_their_errors():
    for fn in (t2t_fast.soft_split, t2t_fast.performer_attention):
        assert "TypeError or ValueError" in inspect.getdoc(fn)
