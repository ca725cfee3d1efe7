"""The reference (``t2t_fast.reference``) twin of a registered production model, for the comparison tests."""
import torch
import torch.nn as nn

from t2t_fast import models, reference
from t2t_fast.models.registry import _MODELS

_TWINS = {models.T2TViT: reference.T2TViT, models.T2TViTDense: reference.T2TViTDense, models.TNT: reference.TNT}


def reference_model(name: str, **kwargs) -> nn.Module:
    """``t2t_fast.reference``'s model with the configuration of the registered ``name`` (kwargs win)."""
    fn = _MODELS[name]
    return _TWINS[fn.model_cls](**{**fn.model_args, **kwargs})


def models_with_same_weights(name: str, **kwargs) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(reference, production fused, production unfused) models of ``name`` holding the reference's weights,
    in eval mode."""
    ref = reference_model(name, **kwargs).eval()
    fused = models.create_model(name, **kwargs).eval()
    unfused = models.create_model(name, fused=False, **kwargs).eval()
    for m in (fused, unfused):
        m.load_state_dict(ref.state_dict())
    return ref, fused, unfused


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (inf when they differ in shape, NaN when either has one)."""
    if actual.shape != expected.shape:
        return float("inf")
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def check_fused_on_gpu(name: str, batch: int = 4, logits_tol: float = 1e-4, grad_tol: float = 1e-3) -> None:
    """Fused against reference model ``name`` on CUDA in fp32, same weights and input: logits and every
    parameter's gradient (of ``sum(logits^2)``) within a norm-relative error; under bf16 autocast the logits
    within 5e-2. Both run fp32 math (TF32 off for matmuls and for cuDNN's convolutions, which default to it;
    the fused kernels' fp32 dots are 3xTF32) in different summation orders, so errors grow with depth: norms,
    not elementwise bounds, judge them."""
    ref, fused, _ = models_with_same_weights(name, num_classes=10)
    fused, ref = fused.cuda(), ref.cuda()
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _compare(name, fused, ref, x, logits_tol, grad_tol)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _compare(name: str, fused: nn.Module, ref: nn.Module, x: torch.Tensor, logits_tol: float,
             grad_tol: float) -> None:
    out, out_ref = fused(x), ref(x)
    err = relative_error(out, out_ref)
    assert err <= logits_tol, f"{name}: logits relative error {err:.3g} > {logits_tol}"
    out.square().sum().backward()
    out_ref.square().sum().backward()
    ref_grads = dict(ref.named_parameters())
    trained = [(n, p) for n, p in fused.named_parameters() if p.requires_grad]  # frozen ones have no gradient
    assert all(p.grad is not None and ref_grads[n].grad is not None for n, p in trained), name
    errors = {n: relative_error(p.grad, ref_grads[n].grad) for n, p in trained}
    worst = sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    assert worst[0][1] <= grad_tol, f"{name}: gradient relative errors over {grad_tol}: {worst}"
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        err = relative_error(fused(x).float(), out_ref.detach())
    assert err <= 5e-2, f"{name}: bf16 autocast logits relative error {err:.3g}"
