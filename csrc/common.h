// Shared by the CPU and CUDA registrations: argument checks, output allocation (with the poison testing aid)
// and the geometry both backends derive from the arguments. The operator contract is documented in
// t2t_fast/ops/soft_split.py and t2t_fast/ops/performer.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace t2t_fast {

enum class Backend { CPU, CUDA };

// True while t2t_fast._C._set_poison(True) is on.
bool poison_enabled();

// Allocates a kernel output; NaN-filled (floating point) while poison is on, so an element a kernel forgets to
// write fails the tests instead of passing by luck.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options);
// The same with t's sizes, dtype, device and (as at::empty_like) strides.
at::Tensor new_output_like(const at::Tensor& t);

// Kernel limits of the CUDA kernels (the CPU kernels have none beyond memory).
constexpr int64_t kCudaMaxPatchLen = 4096;   // soft split: C*kh*kw
constexpr int64_t kCudaMaxOut = 4096;        // soft split: out features
constexpr int64_t kCudaMaxHeadDim = 128;     // performer: d
constexpr int64_t kCudaMaxFeatures = 64;     // performer: m

struct SoftSplitGeometry {
  int64_t B, C, H, W;     // input image
  int64_t kh, kw, sh, sw, ph, pw;
  int64_t Lh, Lw, L;      // patch grid, L = Lh * Lw
  int64_t K;              // patch length C*kh*kw
  int64_t out;            // output features
  bool has_bias;
  bool has_norm;          // LayerNorm over each patch (norm_weight given)
  bool has_norm_bias;
};

SoftSplitGeometry check_soft_split_forward(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                           at::IntArrayRef padding, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& norm_weight,
                                           const std::optional<at::Tensor>& norm_bias, double eps, Backend backend);

SoftSplitGeometry check_soft_split_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                            at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                            at::IntArrayRef padding, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias,
                                            const std::optional<at::Tensor>& norm_weight,
                                            const std::optional<at::Tensor>& norm_bias,
                                            const std::optional<at::Tensor>& y, const at::Tensor& mean,
                                            const at::Tensor& rstd, bool compute_grad_x, Backend backend);

struct PerformerShape {
  int64_t B, H, T, d, m;
};

PerformerShape check_performer_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& w, double eps, Backend backend);

PerformerShape check_performer_backward(const at::Tensor& grad_y, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& w, const at::Tensor& kv,
                                        const at::Tensor& ksum, const at::Tensor& kmax, const at::Tensor& denom,
                                        Backend backend);

// The operators' outputs, allocated (with new_output) as the contract in t2t_fast/ops/*.py documents them.
// soft_split_forward: y (B, L, out) in x's dtype; mean, rstd (B, L) float32, or (0,) without norm.
std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_split_forward_outputs(const SoftSplitGeometry& g,
                                                                           const at::Tensor& x);
// soft_split_backward: grad_x (x's shape and strides, as empty_like; or (0,)), grad_weight, grad_bias (out,),
// norm grads (K,) float32 or (0,).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_split_backward_outputs(
    const SoftSplitGeometry& g, const at::Tensor& x, const at::Tensor& weight, bool compute_grad_x);
// performer_forward: y (B, H, T, d) in q's dtype; kv (B, H, m, d), ksum (B, H, m), kmax (B, H), denom (B, H, T).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> performer_forward_outputs(
    const PerformerShape& s, const at::Tensor& q);
// performer_backward: grad_q, grad_k, grad_v, each (B, H, T, d) in q's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> performer_backward_outputs(const at::Tensor& q);

}  // namespace t2t_fast
