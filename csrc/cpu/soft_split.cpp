// CPU kernels of soft_split_forward / soft_split_backward (contract: t2t_fast/ops/soft_split.py).
//
// Nothing of size (B, L, C*kh*kw) is ever allocated: patches are gathered a tile (kTile patches) at a time into a
// small per-thread buffer straight from x through its strides, normalized there, and multiplied against the
// packed weight. Accumulation is in float (double for float64 inputs).
//
// Backward: per tile, dXn = dY W (the gradient of the normalized patches), the LayerNorm backward per patch, and
// a scatter-add of the patch gradients into grad_x (col2im). Tiles come from bands of patch rows; bands two apart
// touch disjoint image rows, so the even bands run in parallel, then the odd ones, and grad_x needs no atomics.
// dW, db, dgamma, dbeta are summed per work slot (a fixed split of the bands) and the slots are added in order,
// so results are deterministic (and the same for any thread count up to kMinSlots).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "gemm.h"
#include "parallel.h"

namespace t2t_fast {
namespace cpu {
namespace {

constexpr int64_t kTile = 64;     // patches per tile
constexpr int64_t kMinSlots = 8;  // backward work slots (see backward_impl)

template <typename scalar_t>
struct Image {  // x read through its strides
  const scalar_t* data;
  int64_t sb, sc, sh, sw;
};

template <typename scalar_t>
Image<scalar_t> image_of(const at::Tensor& x) {
  return {x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
}

// Visits every in-image element of patches l0 .. l0+np-1 of batch item b:
// f(patch p, column index c*kh*kw + i*kw + j, channel c, image row ih, image column iw).
template <typename F>
inline void for_each_patch_element(const SoftSplitGeometry& g, int64_t l0, int64_t np, F&& f) {
  for (int64_t p = 0; p < np; ++p) {
    const int64_t l = l0 + p;
    const int64_t ih0 = (l / g.Lw) * g.sh - g.ph;
    const int64_t iw0 = (l % g.Lw) * g.sw - g.pw;
    const int64_t i_lo = std::max<int64_t>(0, -ih0), i_hi = std::min(g.kh, g.H - ih0);
    const int64_t j_lo = std::max<int64_t>(0, -iw0), j_hi = std::min(g.kw, g.W - iw0);
    for (int64_t c = 0; c < g.C; ++c) {
      for (int64_t i = i_lo; i < i_hi; ++i) {
        const int64_t col = (c * g.kh + i) * g.kw;
        for (int64_t j = j_lo; j < j_hi; ++j) f(p, col + j, c, ih0 + i, iw0 + j);
      }
    }
  }
}

// out (np x K) = the raw patches (zero where the window hangs over the padding).
template <typename scalar_t, typename acc_t>
void gather_patches(const Image<scalar_t>& x, const SoftSplitGeometry& g, int64_t b, int64_t l0, int64_t np,
                    acc_t* out) {
  std::fill(out, out + np * g.K, acc_t(0));
  const scalar_t* xb = x.data + b * x.sb;
  for_each_patch_element(g, l0, np, [&](int64_t p, int64_t col, int64_t c, int64_t ih, int64_t iw) {
    out[p * g.K + col] = static_cast<acc_t>(xb[c * x.sc + ih * x.sh + iw * x.sw]);
  });
}

// gx (contiguous B, C, H, W) += the patch rows (np x K) of batch item b (col2im).
template <typename acc_t>
void scatter_add_patches(acc_t* gx, const SoftSplitGeometry& g, int64_t b, int64_t l0, int64_t np,
                         const acc_t* rows) {
  acc_t* gb = gx + b * g.C * g.H * g.W;
  for_each_patch_element(g, l0, np, [&](int64_t p, int64_t col, int64_t c, int64_t ih, int64_t iw) {
    gb[(c * g.H + ih) * g.W + iw] += rows[p * g.K + col];
  });
}

// Per-feature vector of an optional 1-D tensor, converted to acc_t (fill where absent).
template <typename acc_t, typename src_t>
std::vector<acc_t> vector_of(const std::optional<at::Tensor>& t, int64_t n, acc_t fill) {
  std::vector<acc_t> out(n, fill);
  if (t.has_value()) {
    const src_t* p = t->data_ptr<src_t>();
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<acc_t>(p[i * t->stride(0)]);
  }
  return out;
}

template <typename scalar_t>
void forward_impl(const at::Tensor& x, const SoftSplitGeometry& g, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& norm_weight,
                  const std::optional<at::Tensor>& norm_bias, double eps, at::Tensor& y, at::Tensor& mean,
                  at::Tensor& rstd) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto img = image_of<scalar_t>(x);
  PackedB<acc_t> wt;  // W^T: K x out
  pack_b(wt, weight.data_ptr<scalar_t>(), weight.stride(1), weight.stride(0), g.K, g.out);
  const auto bias_v = vector_of<acc_t, scalar_t>(bias, g.out, acc_t(0));
  const auto gamma = vector_of<acc_t, float>(norm_weight, g.K, acc_t(1));
  const auto beta = vector_of<acc_t, float>(norm_bias, g.K, acc_t(0));
  scalar_t* yp = y.data_ptr<scalar_t>();
  float* mp = g.has_norm ? mean.data_ptr<float>() : nullptr;
  float* rp = g.has_norm ? rstd.data_ptr<float>() : nullptr;
  const int64_t tiles = (g.L + kTile - 1) / kTile;
  const acc_t inv_k = acc_t(1) / static_cast<acc_t>(g.K);

  parallel_items(g.B * tiles, [&](const auto& claim) {
    std::vector<acc_t> X(kTile * g.K), Y(kTile * g.out);
    for (int64_t item = claim(); item >= 0; item = claim()) {
      const int64_t b = item / tiles, l0 = (item % tiles) * kTile, np = std::min(kTile, g.L - l0);
      gather_patches(img, g, b, l0, np, X.data());
      if (g.has_norm) {
        for (int64_t p = 0; p < np; ++p) {
          acc_t* r = X.data() + p * g.K;
          acc_t s = 0;
          for (int64_t k = 0; k < g.K; ++k) s += r[k];
          const acc_t mu = s * inv_k;
          acc_t v = 0;
          for (int64_t k = 0; k < g.K; ++k) v += (r[k] - mu) * (r[k] - mu);
          const acc_t rs = acc_t(1) / std::sqrt(v * inv_k + static_cast<acc_t>(eps));
          mp[b * g.L + l0 + p] = static_cast<float>(mu);
          rp[b * g.L + l0 + p] = static_cast<float>(rs);
          for (int64_t k = 0; k < g.K; ++k) r[k] = (r[k] - mu) * rs * gamma[k] + beta[k];
        }
      }
      gemm(np, X.data(), g.K, wt, Y.data(), g.out, false);
      for (int64_t p = 0; p < np; ++p) {
        scalar_t* dst = yp + (b * g.L + l0 + p) * g.out;
        const acc_t* src = Y.data() + p * g.out;
        for (int64_t o = 0; o < g.out; ++o) dst[o] = static_cast<scalar_t>(src[o] + bias_v[o]);
      }
    }
  });
}

// Patch rows per band: bands two apart must not share image rows, i.e. G*sh > kh - 1 - sh.
int64_t band_rows(const SoftSplitGeometry& g) {
  const int64_t min_rows = g.kh - 1 - g.sh >= 0 ? (g.kh - 1 - g.sh) / g.sh + 1 : 1;
  return std::max(min_rows, (kTile + g.Lw - 1) / g.Lw);
}

template <typename scalar_t>
void backward_impl(const at::Tensor& grad_y, const at::Tensor& x, const SoftSplitGeometry& g,
                   const at::Tensor& weight, const std::optional<at::Tensor>& norm_weight,
                   const std::optional<at::Tensor>& norm_bias, const at::Tensor& mean_in, const at::Tensor& rstd_in,
                   bool compute_grad_x, at::Tensor& gx, at::Tensor& gw, at::Tensor& gb, at::Tensor& gnw,
                   at::Tensor& gnb) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto img = image_of<scalar_t>(x);
  PackedB<acc_t> wpk;  // W: out x K
  pack_b(wpk, weight.data_ptr<scalar_t>(), weight.stride(0), weight.stride(1), g.out, g.K);
  const auto gamma = vector_of<acc_t, float>(norm_weight, g.K, acc_t(1));
  const auto beta = vector_of<acc_t, float>(norm_bias, g.K, acc_t(0));
  const at::Tensor mean = g.has_norm ? mean_in.contiguous() : mean_in;
  const at::Tensor rstd = g.has_norm ? rstd_in.contiguous() : rstd_in;
  const float* mp = g.has_norm ? mean.data_ptr<float>() : nullptr;
  const float* rp = g.has_norm ? rstd.data_ptr<float>() : nullptr;
  const scalar_t* gyp = grad_y.data_ptr<scalar_t>();
  const int64_t gys0 = grad_y.stride(0), gys1 = grad_y.stride(1), gys2 = grad_y.stride(2);
  const bool need_dxn = compute_grad_x || g.has_norm;
  const acc_t inv_k = acc_t(1) / static_cast<acc_t>(g.K);

  // grad_x accumulates in acc_t, (B, C, H, W)-contiguous: in place for a contiguous float/double gx, else in a
  // buffer copied into gx (which has x's strides) at the end.
  at::Tensor gx_acc;
  if (compute_grad_x) {
    if (std::is_same_v<scalar_t, acc_t> && gx.is_contiguous()) {
      gx.zero_();
      gx_acc = gx;
    } else {
      gx_acc = at::zeros(gx.sizes(), gx.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    }
  }
  acc_t* gxp = compute_grad_x ? gx_acc.data_ptr<acc_t>() : nullptr;

  // Work slots: a fixed split of each phase's bands, each slot with its own gradient sums, run by whichever
  // thread is free. At least kMinSlots, so the results are the same for any thread count up to kMinSlots.
  // Each slot's sums, one block: [dW (out x K) | db (out) | dgamma (K) | dbeta (K)], the last two with norm only.
  const int64_t slots = std::max<int64_t>(kMinSlots, at::get_num_threads());
  const int64_t norm_len = g.has_norm ? g.K : 0;
  const int64_t db_at = g.out * g.K, dgamma_at = db_at + g.out, dbeta_at = dgamma_at + norm_len;
  const int64_t slot_len = dbeta_at + norm_len;
  std::vector<acc_t> sums(slots * slot_len, acc_t(0));

  const int64_t G = band_rows(g);
  const int64_t bands = (g.Lh + G - 1) / G;
  for (int64_t phase = 0; phase < 2; ++phase) {
    const int64_t per_item = (bands - phase + 1) / 2;  // bands with index % 2 == phase
    const int64_t items = g.B * per_item;
    if (items == 0) continue;
    parallel_items(slots, [&](const auto& claim) {
      std::vector<acc_t> X(kTile * g.K), Xn(g.has_norm ? kTile * g.K : 0), dY(kTile * g.out),
          dYt(g.out * kTile), dXn(need_dxn ? kTile * g.K : 0);
      PackedB<acc_t> xpk;
      for (int64_t s = claim(); s >= 0; s = claim()) {
        acc_t* dw = sums.data() + s * slot_len;
        acc_t* db = dw + db_at;
        acc_t* dgamma = dw + dgamma_at;
        acc_t* dbeta = dw + dbeta_at;
        for (int64_t item = items * s / slots; item < items * (s + 1) / slots; ++item) {
          const int64_t b = item / per_item, band = 2 * (item % per_item) + phase;
          const int64_t l_end = std::min(g.Lh, (band + 1) * G) * g.Lw;
          for (int64_t l0 = band * G * g.Lw; l0 < l_end; l0 += kTile) {
            const int64_t np = std::min(kTile, l_end - l0);
            gather_patches(img, g, b, l0, np, X.data());
            if (g.has_norm) {  // X becomes xhat, Xn the LayerNorm output
              for (int64_t p = 0; p < np; ++p) {
                const acc_t mu = mp[b * g.L + l0 + p], rs = rp[b * g.L + l0 + p];
                acc_t* xr = X.data() + p * g.K;
                acc_t* nr = Xn.data() + p * g.K;
                for (int64_t k = 0; k < g.K; ++k) {
                  xr[k] = (xr[k] - mu) * rs;
                  nr[k] = xr[k] * gamma[k] + beta[k];
                }
              }
            }
            for (int64_t p = 0; p < np; ++p) {
              const scalar_t* src = gyp + b * gys0 + (l0 + p) * gys1;
              acc_t* dst = dY.data() + p * g.out;
              for (int64_t o = 0; o < g.out; ++o) {
                dst[o] = static_cast<acc_t>(src[o * gys2]);
                dYt[o * np + p] = dst[o];
                db[o] += dst[o];
              }
            }
            pack_b(xpk, g.has_norm ? Xn.data() : X.data(), g.K, int64_t{1}, np, g.K);
            gemm(g.out, dYt.data(), np, xpk, dw, g.K, true);
            if (!need_dxn) continue;
            gemm(np, dY.data(), g.out, wpk, dXn.data(), g.K, false);
            if (g.has_norm) {
              for (int64_t p = 0; p < np; ++p) {
                const acc_t* xr = X.data() + p * g.K;
                acc_t* dr = dXn.data() + p * g.K;
                for (int64_t k = 0; k < g.K; ++k) {
                  dgamma[k] += dr[k] * xr[k];
                  dbeta[k] += dr[k];
                }
                if (!compute_grad_x) continue;
                // d patch = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dXn * gamma
                acc_t s1 = 0, s2 = 0;
                for (int64_t k = 0; k < g.K; ++k) {
                  const acc_t dxh = dr[k] * gamma[k];
                  s1 += dxh;
                  s2 += dxh * xr[k];
                }
                const acc_t c1 = s1 * inv_k, c2 = s2 * inv_k, rs = rp[b * g.L + l0 + p];
                for (int64_t k = 0; k < g.K; ++k) dr[k] = rs * (dr[k] * gamma[k] - c1 - xr[k] * c2);
              }
            }
            if (compute_grad_x) scatter_add_patches(gxp, g, b, l0, np, dXn.data());
          }
        }
      }
    });
  }

  if (compute_grad_x && !gx_acc.is_same(gx)) gx.copy_(gx_acc);
  // Slots are added in slot order: deterministic.
  auto reduce = [&](int64_t at, int64_t n, auto* out) {
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        acc_t total = 0;
        for (int64_t s = 0; s < slots; ++s) total += sums[s * slot_len + at + i];
        out[i] = static_cast<std::remove_pointer_t<decltype(out)>>(total);
      }
    });
  };
  reduce(0, g.out * g.K, gw.data_ptr<scalar_t>());
  reduce(db_at, g.out, gb.data_ptr<scalar_t>());
  if (g.has_norm) {
    reduce(dgamma_at, g.K, gnw.data_ptr<float>());
    reduce(dbeta_at, g.K, gnb.data_ptr<float>());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_split_forward_cpu(
    const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& norm_weight,
    const std::optional<at::Tensor>& norm_bias, double eps) {
  const auto g = check_soft_split_forward(x, kernel_size, stride, padding, weight, bias, norm_weight, norm_bias, eps,
                                          Backend::CPU);
  auto [y, mean, rstd] = soft_split_forward_outputs(g, x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "soft_split_forward_cpu", [&] {
    forward_impl<scalar_t>(x, g, weight, bias, norm_weight, norm_bias, eps, y, mean, rstd);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_split_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias,
    const std::optional<at::Tensor>& y, const at::Tensor& mean, const at::Tensor& rstd, bool compute_grad_x) {
  // bias and y are only checked: these kernels sum the LayerNorm backward over each token's patch, which they
  // hold anyway (the Triton backend takes those sums from y)
  const auto g = check_soft_split_backward(grad_y, x, kernel_size, stride, padding, weight, bias, norm_weight,
                                           norm_bias, y, mean, rstd, compute_grad_x, Backend::CPU);
  auto [gx, gw, gb, gnw, gnb] = soft_split_backward_outputs(g, x, weight, compute_grad_x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "soft_split_backward_cpu", [&] {
    backward_impl<scalar_t>(grad_y, x, g, weight, norm_weight, norm_bias, mean, rstd, compute_grad_x, gx, gw, gb,
                            gnw, gnb);
  });
  return {gx, gw, gb, gnw, gnb};
}

}  // namespace

TORCH_LIBRARY_IMPL(t2t_fast, CPU, m) {
  m.impl("soft_split_forward", &soft_split_forward_cpu);
  m.impl("soft_split_backward", &soft_split_backward_cpu);
}

}  // namespace cpu
}  // namespace t2t_fast
