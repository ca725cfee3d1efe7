// Plain C++ interface of the CUDA kernels (no torch headers, so the .cu files compile with nvcc alone).
// csrc/cuda/registration.cpp allocates outputs and workspaces with torch, checks the arguments and calls these.
// Every pointer is device memory; every launcher enqueues on `stream` and returns the launch error, if any.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace t2t_fast {
namespace gpu {

enum class DType { F32, F16, BF16 };  // element type of the dtype-generic tensors (x, weight, q, k, v, outputs)

struct SoftSplitDims {
  int64_t B, C, H, W;
  int64_t kh, kw, sh, sw, ph, pw;
  int64_t Lh, Lw, L, K, out;
  int64_t xs[4];  // strides of x (elements)
};

// y (B, L, out) contiguous; mean, rstd (B, L) float32, written when norm_weight is given (else may be null).
// weight_t: the weight transposed, (K, out) contiguous; bias (out) or null; norm_weight, norm_bias (K) or null.
cudaError_t soft_split_forward(DType dtype, const SoftSplitDims& g, const void* x, const void* weight_t,
                               const void* bias, const float* norm_weight, const float* norm_bias, float eps, void* y,
                               float* mean, float* rstd, cudaStream_t stream);

size_t soft_split_backward_workspace(const SoftSplitDims& g, bool has_norm, bool compute_grad_x);

// grad_y (B, L, out) contiguous; weight (out, K) contiguous; mean, rstd (B, L) when norm_weight is given.
// Writes grad_x (B, C, H, W) contiguous when compute_grad_x, grad_weight (out, K), grad_bias (out), and
// grad_norm_weight/grad_norm_bias (K) float32 when norm_weight is given. workspace: the size above, any content.
cudaError_t soft_split_backward(DType dtype, const SoftSplitDims& g, const void* grad_y, const void* x,
                                const void* weight, const float* norm_weight, const float* norm_bias,
                                const float* mean, const float* rstd, bool compute_grad_x, void* grad_x,
                                void* grad_weight, void* grad_bias, float* grad_norm_weight, float* grad_norm_bias,
                                void* workspace, cudaStream_t stream);

struct PerformerDims {
  int64_t B, H, T, d, m;
};

struct TokenView {  // a (B, H, T, d) tensor with any strides (elements)
  const void* data;
  int64_t sb, sh, st, sd;
};

// Largest sizes the kernels take (checked by the caller): d <= kMaxHeadDim, m <= kMaxFeatures.
constexpr int64_t kMaxHeadDim = 128;
constexpr int64_t kMaxFeatures = 64;

size_t performer_forward_workspace(const PerformerDims& s);

// w (m, d) float32 contiguous. y (B, H, T, d) contiguous; kv (B, H, m, d), ksum (B, H, m), kmax (B, H),
// denom (B, H, T) float32 contiguous.
cudaError_t performer_forward(DType dtype, const PerformerDims& s, TokenView q, TokenView k, TokenView v,
                              const float* w, double eps, void* y, float* kv, float* ksum, float* kmax, float* denom,
                              void* workspace, cudaStream_t stream);

size_t performer_backward_workspace(const PerformerDims& s);

// kv, ksum, kmax, denom as written by performer_forward (contiguous). grad_q, grad_k, grad_v (B, H, T, d)
// contiguous.
cudaError_t performer_backward(DType dtype, const PerformerDims& s, TokenView grad_y, TokenView q, TokenView k,
                               TokenView v, const float* w, const float* kv, const float* ksum, const float* kmax,
                               const float* denom, void* grad_q, void* grad_k, void* grad_v, void* workspace,
                               cudaStream_t stream);

}  // namespace gpu
}  // namespace t2t_fast
