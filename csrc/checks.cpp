// Argument checks of the four operators, shared by the CPU and CUDA registrations. Shape and device errors raise
// ValueError, dtype errors TypeError; every message names the operator and the argument.
#include "common.h"

#include <cmath>
#include <vector>

namespace t2t_fast {
namespace {

constexpr int64_t kMaxGeometryValue = int64_t{1} << 30;

void check_device(const at::Tensor& t, const char* op, const char* name, Backend backend) {
  const auto want = backend == Backend::CPU ? at::kCPU : at::kCUDA;
  TORCH_CHECK_VALUE(t.device().type() == want, op, ": ", name, " must be a ",
                    backend == Backend::CPU ? "CPU" : "CUDA", " tensor for this kernel, got one on ", t.device());
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                       const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device());
}

void check_input_dtype(const at::Tensor& t, const char* op, const char* name, Backend backend) {
  const auto st = t.scalar_type();
  const bool ok = st == at::kFloat || st == at::kHalf || st == at::kBFloat16 ||
                  (st == at::kDouble && backend == Backend::CPU);
  TORCH_CHECK_TYPE(ok, op, ": ", name, " must be float32, float16 or bfloat16",
                   backend == Backend::CPU ? " or float64" : " (float64 is only supported by the CPU kernels)",
                   ", got ", st);
}

void check_dtype_is(const at::Tensor& t, at::ScalarType want, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, op, ": ", name, " must be ", want, ", got ", t.scalar_type());
}

void check_sizes(const at::Tensor& t, at::IntArrayRef want, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == want, op, ": ", name, " must have shape ", want, ", got ", t.sizes());
}

void check_pair(at::IntArrayRef v, const char* op, const char* name) {
  TORCH_CHECK_VALUE(v.size() == 2, op, ": ", name, " must have 2 values (h, w), got ", v);
}

void check_eps(double eps, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
}

SoftSplitGeometry soft_split_geometry(const char* op, const at::Tensor& x, at::IntArrayRef kernel_size,
                                      at::IntArrayRef stride, at::IntArrayRef padding, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& norm_weight,
                                      const std::optional<at::Tensor>& norm_bias, Backend backend) {
  check_device(x, op, "x", backend);
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be (B, C, H, W), got shape ", x.sizes());
  check_input_dtype(x, op, "x", backend);
  TORCH_CHECK_VALUE(x.numel() > 0, op, ": x must not be empty, got shape ", x.sizes());
  check_pair(kernel_size, op, "kernel_size");
  check_pair(stride, op, "stride");
  check_pair(padding, op, "padding");
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK_VALUE(kernel_size[i] >= 1 && kernel_size[i] <= kMaxGeometryValue, op,
                      ": kernel_size must be in [1, 2^30], got ", kernel_size);
    TORCH_CHECK_VALUE(stride[i] >= 1 && stride[i] <= kMaxGeometryValue, op, ": stride must be in [1, 2^30], got ",
                      stride);
    TORCH_CHECK_VALUE(padding[i] >= 0 && padding[i] <= kMaxGeometryValue, op,
                      ": padding must be in [0, 2^30], got ", padding);
  }
  SoftSplitGeometry g{};
  g.B = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.kh = kernel_size[0];
  g.kw = kernel_size[1];
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  TORCH_CHECK_VALUE(g.H + 2 * g.ph >= g.kh && g.W + 2 * g.pw >= g.kw, op, ": image ", g.H, "x", g.W,
                    " is smaller than kernel_size ", kernel_size, " with padding ", padding);
  g.Lh = (g.H + 2 * g.ph - g.kh) / g.sh + 1;
  g.Lw = (g.W + 2 * g.pw - g.kw) / g.sw + 1;
  g.L = g.Lh * g.Lw;
  TORCH_CHECK_VALUE(g.kh * g.kw <= kMaxGeometryValue && g.C <= kMaxGeometryValue / (g.kh * g.kw), op,
                    ": patch length C*kh*kw is too large (C=", g.C, ", kernel_size ", kernel_size, ")");
  g.K = g.C * g.kh * g.kw;

  check_same_device(weight, x, op, "weight", "x");
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == g.K && weight.size(0) >= 1, op,
                    ": weight must be (out, C*kh*kw) = (out, ", g.K, ") with out >= 1 for C=", g.C, ", kernel_size ",
                    kernel_size, "; got shape ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
                   " differs from x dtype ", x.scalar_type());
  g.out = weight.size(0);

  g.has_norm = norm_weight.has_value();
  g.has_norm_bias = norm_bias.has_value();
  TORCH_CHECK_VALUE(g.has_norm || !g.has_norm_bias, op,
                    ": norm_bias needs norm_weight (the LayerNorm runs when norm_weight is given)");
  if (g.has_norm) {
    check_same_device(*norm_weight, x, op, "norm_weight", "x");
    check_sizes(*norm_weight, {g.K}, op, "norm_weight");
    check_dtype_is(*norm_weight, at::kFloat, op, "norm_weight");
  }
  if (g.has_norm_bias) {
    check_same_device(*norm_bias, x, op, "norm_bias", "x");
    check_sizes(*norm_bias, {g.K}, op, "norm_bias");
    check_dtype_is(*norm_bias, at::kFloat, op, "norm_bias");
  }
  if (backend == Backend::CUDA) {
    TORCH_CHECK_VALUE(g.K <= kCudaMaxPatchLen, op, ": the CUDA kernels take patches of at most ", kCudaMaxPatchLen,
                      " values (C*kh*kw), got ", g.K);
    TORCH_CHECK_VALUE(g.out <= kCudaMaxOut, op, ": the CUDA kernels take at most ", kCudaMaxOut,
                      " output features, got ", g.out);
  }
  return g;
}

// bias: (out,) in x's dtype, on x's device; sets g.has_bias.
void check_bias(SoftSplitGeometry& g, const at::Tensor& x, const std::optional<at::Tensor>& bias, const char* op) {
  g.has_bias = bias.has_value();
  if (g.has_bias) {
    check_same_device(*bias, x, op, "bias", "x");
    check_sizes(*bias, {g.out}, op, "bias");
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                     " differs from x dtype ", x.scalar_type());
  }
}

PerformerShape performer_shape(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& w, Backend backend) {
  check_device(q, op, "q", backend);
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be (B, H, T, d), got shape ", q.sizes());
  check_input_dtype(q, op, "q", backend);
  TORCH_CHECK_VALUE(q.numel() > 0, op, ": q must not be empty, got shape ", q.sizes());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{k, "k"}, {v, "v"}}) {
    check_same_device(t, q, op, name, "q");
    TORCH_CHECK_VALUE(t.sizes() == q.sizes(), op, ": ", name, " shape ", t.sizes(), " differs from q shape ",
                      q.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
                     " differs from q dtype ", q.scalar_type());
  }
  PerformerShape s{q.size(0), q.size(1), q.size(2), q.size(3), 0};
  check_same_device(w, q, op, "w", "q");
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) == s.d && w.size(0) >= 1, op, ": w must be (m, d) = (m, ", s.d,
                    ") with m >= 1, got shape ", w.sizes());
  check_dtype_is(w, at::kFloat, op, "w");
  s.m = w.size(0);
  if (backend == Backend::CUDA) {
    TORCH_CHECK_VALUE(s.d <= kCudaMaxHeadDim, op, ": the CUDA kernels take head dims d <= ", kCudaMaxHeadDim,
                      ", got ", s.d);
    TORCH_CHECK_VALUE(s.m <= kCudaMaxFeatures, op, ": the CUDA kernels take at most ", kCudaMaxFeatures,
                      " random features (m), got ", s.m);
  }
  return s;
}

}  // namespace

SoftSplitGeometry check_soft_split_forward(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                           at::IntArrayRef padding, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& norm_weight,
                                           const std::optional<at::Tensor>& norm_bias, double eps, Backend backend) {
  const char* op = "soft_split_forward";
  auto g = soft_split_geometry(op, x, kernel_size, stride, padding, weight, norm_weight, norm_bias, backend);
  check_bias(g, x, bias, op);
  check_eps(eps, op);
  return g;
}

SoftSplitGeometry check_soft_split_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                            at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                            at::IntArrayRef padding, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias,
                                            const std::optional<at::Tensor>& norm_weight,
                                            const std::optional<at::Tensor>& norm_bias,
                                            const std::optional<at::Tensor>& y, const at::Tensor& mean,
                                            const at::Tensor& rstd, bool compute_grad_x, Backend backend) {
  const char* op = "soft_split_backward";
  auto g = soft_split_geometry(op, x, kernel_size, stride, padding, weight, norm_weight, norm_bias, backend);
  check_bias(g, x, bias, op);
  const at::Tensor* y_given = y.has_value() ? &*y : nullptr;
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&grad_y, "grad_y"}, {y_given, "y"}}) {
    if (t == nullptr) continue;
    check_same_device(*t, x, op, name, "x");
    check_sizes(*t, {g.B, g.L, g.out}, op, name);
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), op, ": ", name, " dtype ", t->scalar_type(),
                     " differs from x dtype ", x.scalar_type());
  }
  TORCH_CHECK_VALUE(y.has_value() || !(g.has_norm && compute_grad_x), op,
                    ": y (the forward's output) is needed with norm_weight and compute_grad_x");
  if (g.has_norm) {
    for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{mean, "mean"}, {rstd, "rstd"}}) {
      check_same_device(t, x, op, name, "x");
      check_sizes(t, {g.B, g.L}, op, name);
      check_dtype_is(t, at::kFloat, op, name);
    }
  }
  return g;
}

PerformerShape check_performer_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& w, double eps, Backend backend) {
  const auto s = performer_shape("performer_forward", q, k, v, w, backend);
  check_eps(eps, "performer_forward");
  return s;
}

PerformerShape check_performer_backward(const at::Tensor& grad_y, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& w, const at::Tensor& kv,
                                        const at::Tensor& ksum, const at::Tensor& kmax, const at::Tensor& denom,
                                        Backend backend) {
  const char* op = "performer_backward";
  const auto s = performer_shape(op, q, k, v, w, backend);
  check_same_device(grad_y, q, op, "grad_y", "q");
  TORCH_CHECK_VALUE(grad_y.sizes() == q.sizes(), op, ": grad_y shape ", grad_y.sizes(), " differs from q shape ",
                    q.sizes());
  TORCH_CHECK_TYPE(grad_y.scalar_type() == q.scalar_type(), op, ": grad_y dtype ", grad_y.scalar_type(),
                   " differs from q dtype ", q.scalar_type());
  const std::pair<const at::Tensor&, std::vector<int64_t>> stats[] = {
      {kv, {s.B, s.H, s.m, s.d}}, {ksum, {s.B, s.H, s.m}}, {kmax, {s.B, s.H}}, {denom, {s.B, s.H, s.T}}};
  const char* names[] = {"kv", "ksum", "kmax", "denom"};
  for (int i = 0; i < 4; ++i) {
    check_same_device(stats[i].first, q, op, names[i], "q");
    check_sizes(stats[i].first, stats[i].second, op, names[i]);
    check_dtype_is(stats[i].first, at::kFloat, op, names[i]);
  }
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_split_forward_outputs(const SoftSplitGeometry& g,
                                                                           const at::Tensor& x) {
  const auto stats = g.has_norm ? std::vector<int64_t>{g.B, g.L} : std::vector<int64_t>{0};
  return {new_output({g.B, g.L, g.out}, x.options()), new_output(stats, x.options().dtype(at::kFloat)),
          new_output(stats, x.options().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_split_backward_outputs(
    const SoftSplitGeometry& g, const at::Tensor& x, const at::Tensor& weight, bool compute_grad_x) {
  const auto norm_shape = g.has_norm ? std::vector<int64_t>{g.K} : std::vector<int64_t>{0};
  return {compute_grad_x ? new_output_like(x) : new_output({0}, x.options()),
          new_output(weight.sizes(), weight.options()), new_output({g.out}, weight.options()),
          new_output(norm_shape, x.options().dtype(at::kFloat)), new_output(norm_shape, x.options().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> performer_forward_outputs(
    const PerformerShape& s, const at::Tensor& q) {
  const auto f32 = q.options().dtype(at::kFloat);
  return {new_output({s.B, s.H, s.T, s.d}, q.options()), new_output({s.B, s.H, s.m, s.d}, f32),
          new_output({s.B, s.H, s.m}, f32), new_output({s.B, s.H}, f32), new_output({s.B, s.H, s.T}, f32)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> performer_backward_outputs(const at::Tensor& q) {
  return {new_output(q.sizes(), q.options()), new_output(q.sizes(), q.options()), new_output(q.sizes(), q.options())};
}

}  // namespace t2t_fast
