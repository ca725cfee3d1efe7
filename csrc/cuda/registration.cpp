// Torch side of the CUDA kernels: argument checks (shared with the CPU kernels), output and workspace allocation
// on the current device and stream, and the TORCH_LIBRARY_IMPL(t2t_fast, CUDA) registration. Only compiled when
// the extension is built with CUDA; the kernels themselves are in soft_split.cu / performer.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"
#include "launchers.h"

namespace t2t_fast {
namespace {

static_assert(kCudaMaxHeadDim == gpu::kMaxHeadDim && kCudaMaxFeatures == gpu::kMaxFeatures,
              "the limits checked in common.h must be the kernels' limits");

gpu::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return gpu::DType::F32;
    case at::kHalf:
      return gpu::DType::F16;
    case at::kBFloat16:
      return gpu::DType::BF16;
    default:
      TORCH_CHECK_TYPE(false, "t2t_fast CUDA kernels: unsupported dtype ", t.scalar_type());
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

gpu::SoftSplitDims dims_of(const SoftSplitGeometry& g, const at::Tensor& x) {
  return {g.B,  g.C,  g.H,  g.W,  g.kh, g.kw,  g.sh,
          g.sw, g.ph, g.pw, g.Lh, g.Lw, g.L,   g.K,
          g.out, {x.stride(0), x.stride(1), x.stride(2), x.stride(3)}};
}

gpu::TokenView view_of(const at::Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

const float* float_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_split_forward_cuda(
    const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& norm_weight,
    const std::optional<at::Tensor>& norm_bias, double eps) {
  const auto g = check_soft_split_forward(x, kernel_size, stride, padding, weight, bias, norm_weight, norm_bias, eps,
                                          Backend::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  auto [y, mean, rstd] = soft_split_forward_outputs(g, x);
  const at::Tensor weight_t = weight.t().contiguous();
  const at::Tensor b = contiguous_or_undefined(bias), nw = contiguous_or_undefined(norm_weight),
                   nb = contiguous_or_undefined(norm_bias);
  check_launch(gpu::soft_split_forward(dtype_of(x), dims_of(g, x), x.data_ptr(), weight_t.data_ptr(),
                                       b.defined() ? b.data_ptr() : nullptr, float_ptr(nw), float_ptr(nb),
                                       eps, y.data_ptr(),
                                       g.has_norm ? mean.data_ptr<float>() : nullptr,
                                       g.has_norm ? rstd.data_ptr<float>() : nullptr, stream_of(x)),
               "soft_split_forward");
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_split_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias,
    const std::optional<at::Tensor>& y, const at::Tensor& mean, const at::Tensor& rstd, bool compute_grad_x) {
  // bias and y are only checked: these kernels sum the LayerNorm backward over each token's patch, which they
  // hold anyway (the Triton backend takes those sums from y)
  const auto g = check_soft_split_backward(grad_y, x, kernel_size, stride, padding, weight, bias, norm_weight,
                                           norm_bias, y, mean, rstd, compute_grad_x, Backend::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  auto [gx, gw, gb, gnw, gnb] = soft_split_backward_outputs(g, x, weight, compute_grad_x);
  const at::Tensor gy = grad_y.contiguous(), w = weight.contiguous(), nw = contiguous_or_undefined(norm_weight),
                   nb = contiguous_or_undefined(norm_bias);
  const at::Tensor mu = g.has_norm ? mean.contiguous() : at::Tensor(), rs = g.has_norm ? rstd.contiguous() : at::Tensor();
  const auto dims = dims_of(g, x);
  const at::Tensor ws = workspace(gpu::soft_split_backward_workspace(dims, g.has_norm, compute_grad_x), x);
  // the kernels write grad_x (B, C, H, W)-contiguous; gx has x's strides (a token view's: channels innermost)
  const at::Tensor gx_out = compute_grad_x && !gx.is_contiguous() ? at::empty(gx.sizes(), gx.options()) : gx;
  check_launch(gpu::soft_split_backward(dtype_of(x), dims, gy.data_ptr(), x.data_ptr(), w.data_ptr(), float_ptr(nw),
                                        float_ptr(nb), float_ptr(mu), float_ptr(rs), compute_grad_x,
                                        compute_grad_x ? gx_out.data_ptr() : nullptr, gw.data_ptr(), gb.data_ptr(),
                                        g.has_norm ? gnw.data_ptr<float>() : nullptr,
                                        g.has_norm ? gnb.data_ptr<float>() : nullptr, ws.data_ptr(), stream_of(x)),
               "soft_split_backward");
  if (!gx_out.is_same(gx)) gx.copy_(gx_out);
  return {gx, gw, gb, gnw, gnb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> performer_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w, double eps) {
  const auto s = check_performer_forward(q, k, v, w, eps, Backend::CUDA);
  const c10::cuda::CUDAGuard guard(q.device());
  auto [y, kv, ksum, kmax, denom] = performer_forward_outputs(s, q);
  const gpu::PerformerDims dims{s.B, s.H, s.T, s.d, s.m};
  const at::Tensor wc = w.contiguous();
  const at::Tensor ws = workspace(gpu::performer_forward_workspace(dims), q);
  check_launch(gpu::performer_forward(dtype_of(q), dims, view_of(q), view_of(k), view_of(v), wc.data_ptr<float>(),
                                      eps, y.data_ptr(), kv.data_ptr<float>(),
                                      ksum.data_ptr<float>(), kmax.data_ptr<float>(), denom.data_ptr<float>(),
                                      ws.data_ptr(), stream_of(q)),
               "performer_forward");
  return {y, kv, ksum, kmax, denom};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> performer_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
    const at::Tensor& kv, const at::Tensor& ksum, const at::Tensor& kmax, const at::Tensor& denom) {
  const auto s = check_performer_backward(grad_y, q, k, v, w, kv, ksum, kmax, denom, Backend::CUDA);
  const c10::cuda::CUDAGuard guard(q.device());
  auto [gq, gk, gv] = performer_backward_outputs(q);
  const gpu::PerformerDims dims{s.B, s.H, s.T, s.d, s.m};
  const at::Tensor wc = w.contiguous(), kvc = kv.contiguous(), ksc = ksum.contiguous(), kmc = kmax.contiguous(),
                   dnc = denom.contiguous();
  const at::Tensor ws = workspace(gpu::performer_backward_workspace(dims), q);
  check_launch(gpu::performer_backward(dtype_of(q), dims, view_of(grad_y), view_of(q), view_of(k), view_of(v),
                                       wc.data_ptr<float>(), kvc.data_ptr<float>(), ksc.data_ptr<float>(),
                                       kmc.data_ptr<float>(), dnc.data_ptr<float>(), gq.data_ptr(), gk.data_ptr(),
                                       gv.data_ptr(), ws.data_ptr(), stream_of(q)),
               "performer_backward");
  return {gq, gk, gv};
}

}  // namespace

TORCH_LIBRARY_IMPL(t2t_fast, CUDA, m) {
  m.impl("soft_split_forward", &soft_split_forward_cuda);
  m.impl("soft_split_backward", &soft_split_backward_cuda);
  m.impl("performer_forward", &performer_forward_cuda);
  m.impl("performer_backward", &performer_backward_cuda);
}

}  // namespace t2t_fast
