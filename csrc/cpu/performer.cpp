// CPU kernels of performer_forward / performer_backward (contract and statistics: t2t_fast/ops/performer.py).
//
// Per (batch, head) the tokens are processed in chunks of kChunk: the chunk's features exp(x.w_j - |x|^2/2 - shift)
// live in a kChunk x m buffer, never a (T, m) tensor. Forward pass 1 accumulates kv and ksum over fixed segments
// of kSegment tokens with a running maximum (the segment sums are merged in order, so results do not depend on the
// thread count); pass 2 produces y and denom per chunk. The backward recomputes the features:
//   q side (per chunk): Bq = exp(b - qmax), y = Bq S / den, dnum = dy / den, dden = -(dy . y) / den,
//     db = (S dnum + z dden) * Bq, dq = db W - q sum_j db_j; and dS = sum_t Bq^T dnum, dz = sum_t Bq dden.
//   k side (per chunk): A = exp(a - kmax), dA = dS v + dz, dv = A dS, da = dA * A, dk = da W - k sum_j da_j.
// Accumulation is in float (double for float64 inputs); q, k, v, grad_y are read through their strides.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common.h"
#include "gemm.h"
#include "parallel.h"

namespace t2t_fast {
namespace cpu {
namespace {

constexpr int64_t kChunk = 64;     // tokens per chunk
constexpr int64_t kSegment = 512;  // tokens per forward/backward pass-1 work item

template <typename scalar_t>
struct Tokens {  // a (B, H, T, d) tensor read through its strides
  const scalar_t* data;
  int64_t sb, sh, st, sd;

  explicit Tokens(const at::Tensor& t)
      : data(t.data_ptr<scalar_t>()), sb(t.stride(0)), sh(t.stride(1)), st(t.stride(2)), sd(t.stride(3)) {}

  // out (n x d) = tokens t0 .. t0+n-1 of (b, h)
  template <typename acc_t>
  void gather(int64_t b, int64_t h, int64_t t0, int64_t n, int64_t d, acc_t* out) const {
    for (int64_t t = 0; t < n; ++t) {
      const scalar_t* src = data + b * sb + h * sh + (t0 + t) * st;
      for (int64_t i = 0; i < d; ++i) out[t * d + i] = static_cast<acc_t>(src[i * sd]);
    }
  }
};

// out (n x m) = x_t . w_j - |x_t|^2 / 2 for the rows of X (n x d); wt is W^T packed (d x m).
template <typename acc_t>
void logits(const acc_t* X, int64_t n, int64_t d, const PackedB<acc_t>& wt, acc_t* out) {
  const int64_t m = wt.cols;
  gemm(n, X, d, wt, out, m, false);
  for (int64_t t = 0; t < n; ++t) {
    acc_t sq = 0;
    for (int64_t i = 0; i < d; ++i) sq += X[t * d + i] * X[t * d + i];
    sq /= 2;
    for (int64_t j = 0; j < m; ++j) out[t * m + j] -= sq;
  }
}

// The shift is stored as float32 (kmax); rounding it before use keeps forward and backward on the same shift.
template <typename acc_t>
acc_t as_stored(acc_t v) {
  return static_cast<acc_t>(static_cast<float>(v));
}

template <typename scalar_t>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w, double eps,
                  const PerformerShape& s, at::Tensor& y, at::Tensor& kv, at::Tensor& ksum, at::Tensor& kmax,
                  at::Tensor& denom) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t BH = s.B * s.H, T = s.T, d = s.d, m = s.m;
  const Tokens<scalar_t> qt(q), kt(k), vt(v);
  PackedB<acc_t> wt;  // W^T: d x m
  pack_b(wt, w.data_ptr<float>(), w.stride(1), w.stride(0), d, m);
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  // Pass 1: per (bh, segment): kv (m x d), ksum (m) relative to the segment's running max, then the max.
  const int64_t segs = (T + kSegment - 1) / kSegment;
  const int64_t part_len = m * d + m + 1;
  std::vector<acc_t> part(BH * segs * part_len);
  parallel_items(BH * segs, [&](const auto& claim) {
    std::vector<acc_t> Kc(kChunk * d), Vc(kChunk * d), a(kChunk * m), At(m * kChunk);
    PackedB<acc_t> vpk;
    for (int64_t item = claim(); item >= 0; item = claim()) {
      const int64_t bh = item / segs, seg = item % segs, b = bh / s.H, h = bh % s.H;
      acc_t* kvp = part.data() + item * part_len;
      acc_t* ksp = kvp + m * d;
      acc_t& run_max = ksp[m];
      std::fill(kvp, kvp + m * d + m, acc_t(0));
      run_max = kNegInf;
      const int64_t t_end = std::min(T, (seg + 1) * kSegment);
      for (int64_t t0 = seg * kSegment; t0 < t_end; t0 += kChunk) {
        const int64_t n = std::min(kChunk, t_end - t0);
        kt.gather(b, h, t0, n, d, Kc.data());
        vt.gather(b, h, t0, n, d, Vc.data());
        logits(Kc.data(), n, d, wt, a.data());
        acc_t cmax = kNegInf;
        for (int64_t i = 0; i < n * m; ++i) cmax = std::max(cmax, a[i]);
        cmax = as_stored(cmax);
        if (cmax > run_max) {
          if (run_max != kNegInf) {
            const acc_t scale = std::exp(run_max - cmax);
            for (int64_t i = 0; i < m * d + m; ++i) kvp[i] *= scale;
          }
          run_max = cmax;
        }
        for (int64_t t = 0; t < n; ++t) {
          for (int64_t j = 0; j < m; ++j) At[j * n + t] = std::exp(a[t * m + j] - run_max);
        }
        for (int64_t j = 0; j < m; ++j) {
          for (int64_t t = 0; t < n; ++t) ksp[j] += At[j * n + t];
        }
        pack_b(vpk, Vc.data(), d, int64_t{1}, n, d);
        gemm(m, At.data(), n, vpk, kvp, d, true);
      }
    }
  });

  // Merge the segments (in order) into kv, ksum, kmax.
  std::vector<acc_t> kv_acc(BH * m * d), ksum_acc(BH * m), kmax_acc(BH);
  std::vector<PackedB<acc_t>> kv_pk(BH);  // kv as B (m x d)
  float* kvo = kv.data_ptr<float>();
  float* kso = ksum.data_ptr<float>();
  float* kmo = kmax.data_ptr<float>();
  parallel_items(BH, [&](const auto& claim) {
    for (int64_t bh = claim(); bh >= 0; bh = claim()) {
      const acc_t* first = part.data() + bh * segs * part_len;
      acc_t M = kNegInf;
      for (int64_t sg = 0; sg < segs; ++sg) M = std::max(M, first[sg * part_len + m * d + m]);
      acc_t* kvb = kv_acc.data() + bh * m * d;
      acc_t* ksb = ksum_acc.data() + bh * m;
      std::fill(kvb, kvb + m * d, acc_t(0));
      std::fill(ksb, ksb + m, acc_t(0));
      for (int64_t sg = 0; sg < segs; ++sg) {
        const acc_t* p = first + sg * part_len;
        const acc_t ms = p[m * d + m];
        if (ms == kNegInf) continue;
        const acc_t scale = std::exp(ms - M);
        for (int64_t i = 0; i < m * d; ++i) kvb[i] += scale * p[i];
        for (int64_t j = 0; j < m; ++j) ksb[j] += scale * p[m * d + j];
      }
      kmax_acc[bh] = M;
      for (int64_t i = 0; i < m * d; ++i) kvo[bh * m * d + i] = static_cast<float>(kvb[i]);
      for (int64_t j = 0; j < m; ++j) kso[bh * m + j] = static_cast<float>(ksb[j]);
      kmo[bh] = static_cast<float>(M);
      pack_b(kv_pk[bh], kvb, d, int64_t{1}, m, d);
    }
  });

  // Pass 2: y and denom per chunk.
  const int64_t chunks = (T + kChunk - 1) / kChunk;
  scalar_t* yp = y.data_ptr<scalar_t>();
  float* dp = denom.data_ptr<float>();
  // eps * m * exp(-qmax - kmax) as sign * exp(log|eps m| - qmax - kmax): exp(-qmax - kmax) alone overflows once
  // qmax + kmax < -88.7 (token norms of ~13 and more), and with eps = 0 that would be 0 * inf.
  const acc_t eps_log = eps == 0 ? -std::numeric_limits<acc_t>::infinity()
                                 : static_cast<acc_t>(std::log(std::abs(eps) * static_cast<double>(m)));
  const acc_t eps_sign = eps < 0 ? acc_t(-1) : acc_t(1);
  parallel_items(BH * chunks, [&](const auto& claim) {
    std::vector<acc_t> Qc(kChunk * d), bq(kChunk * m), Yc(kChunk * d), den(kChunk);
    for (int64_t item = claim(); item >= 0; item = claim()) {
      const int64_t bh = item / chunks, t0 = (item % chunks) * kChunk, n = std::min(kChunk, T - t0);
      qt.gather(bh / s.H, bh % s.H, t0, n, d, Qc.data());
      logits(Qc.data(), n, d, wt, bq.data());
      const acc_t* z = ksum_acc.data() + bh * m;
      for (int64_t t = 0; t < n; ++t) {
        acc_t* r = bq.data() + t * m;
        acc_t qmax = kNegInf;
        for (int64_t j = 0; j < m; ++j) qmax = std::max(qmax, r[j]);
        acc_t sum = 0;
        for (int64_t j = 0; j < m; ++j) {
          r[j] = std::exp(r[j] - qmax);
          sum += r[j] * z[j];
        }
        den[t] = sum + eps_sign * std::exp(eps_log - qmax - kmax_acc[bh]);
      }
      gemm(n, bq.data(), m, kv_pk[bh], Yc.data(), d, false);
      for (int64_t t = 0; t < n; ++t) {
        scalar_t* dst = yp + (bh * T + t0 + t) * d;
        for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<scalar_t>(Yc[t * d + i] / den[t]);
        dp[bh * T + t0 + t] = static_cast<float>(den[t]);
      }
    }
  });
}

template <typename scalar_t>
void backward_impl(const at::Tensor& grad_y, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& w, const at::Tensor& kv_in, const at::Tensor& ksum_in,
                   const at::Tensor& kmax_in, const at::Tensor& denom_in, const PerformerShape& s, at::Tensor& gq,
                   at::Tensor& gk, at::Tensor& gv) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t BH = s.B * s.H, T = s.T, d = s.d, m = s.m;
  const Tokens<scalar_t> qt(q), kt(k), vt(v), gyt(grad_y);
  PackedB<acc_t> wt, wpk;  // W^T (d x m) and W (m x d)
  pack_b(wt, w.data_ptr<float>(), w.stride(1), w.stride(0), d, m);
  pack_b(wpk, w.data_ptr<float>(), w.stride(0), w.stride(1), m, d);
  const at::Tensor kv = kv_in.contiguous(), ksum = ksum_in.contiguous(), kmax = kmax_in.contiguous(),
                   denom = denom_in.contiguous();
  const float* kvp = kv.data_ptr<float>();
  const float* zp = ksum.data_ptr<float>();
  const float* kmp = kmax.data_ptr<float>();
  const float* dnp = denom.data_ptr<float>();
  std::vector<PackedB<acc_t>> s_pk(BH), st_pk(BH);  // S = kv as B (m x d) and S^T (d x m)
  parallel_items(BH, [&](const auto& claim) {
    for (int64_t bh = claim(); bh >= 0; bh = claim()) {
      pack_b(s_pk[bh], kvp + bh * m * d, d, int64_t{1}, m, d);
      pack_b(st_pk[bh], kvp + bh * m * d, int64_t{1}, d, d, m);
    }
  });
  const int64_t segs = (T + kSegment - 1) / kSegment;
  const int64_t part_len = m * d + m;
  std::vector<acc_t> part(BH * segs * part_len, acc_t(0));
  scalar_t* gqp = gq.data_ptr<scalar_t>();
  scalar_t* gkp = gk.data_ptr<scalar_t>();
  scalar_t* gvp = gv.data_ptr<scalar_t>();

  // q side, per (bh, segment): grad_q, and the segment's share of dS (m x d), dz (m).
  parallel_items(BH * segs, [&](const auto& claim) {
    std::vector<acc_t> Qc(kChunk * d), dYc(kChunk * d), bq(kChunk * m), Yc(kChunk * d), dnum(kChunk * d),
        dden(kChunk), dBq(kChunk * m), rsum(kChunk), dq(kChunk * d), BqT(m * kChunk);
    PackedB<acc_t> dn_pk;
    for (int64_t item = claim(); item >= 0; item = claim()) {
      const int64_t bh = item / segs, seg = item % segs, b = bh / s.H, h = bh % s.H;
      acc_t* dS = part.data() + item * part_len;
      acc_t* dz = dS + m * d;
      const float* z = zp + bh * m;
      const int64_t t_end = std::min(T, (seg + 1) * kSegment);
      for (int64_t t0 = seg * kSegment; t0 < t_end; t0 += kChunk) {
        const int64_t n = std::min(kChunk, t_end - t0);
        qt.gather(b, h, t0, n, d, Qc.data());
        gyt.gather(b, h, t0, n, d, dYc.data());
        logits(Qc.data(), n, d, wt, bq.data());
        for (int64_t t = 0; t < n; ++t) {
          acc_t* r = bq.data() + t * m;
          acc_t qmax = -std::numeric_limits<acc_t>::infinity();
          for (int64_t j = 0; j < m; ++j) qmax = std::max(qmax, r[j]);
          for (int64_t j = 0; j < m; ++j) r[j] = std::exp(r[j] - qmax);
        }
        gemm(n, bq.data(), m, s_pk[bh], Yc.data(), d, false);
        for (int64_t t = 0; t < n; ++t) {
          const acc_t den = dnp[bh * T + t0 + t];
          acc_t dot = 0;
          for (int64_t i = 0; i < d; ++i) {
            dot += dYc[t * d + i] * (Yc[t * d + i] / den);
            dnum[t * d + i] = dYc[t * d + i] / den;
          }
          dden[t] = -dot / den;
        }
        gemm(n, dnum.data(), d, st_pk[bh], dBq.data(), m, false);
        for (int64_t t = 0; t < n; ++t) {
          acc_t rs = 0;
          for (int64_t j = 0; j < m; ++j) {
            const acc_t e = bq[t * m + j];
            const acc_t db = (dBq[t * m + j] + static_cast<acc_t>(z[j]) * dden[t]) * e;
            dBq[t * m + j] = db;
            rs += db;
            BqT[j * n + t] = e;
            dz[j] += e * dden[t];
          }
          rsum[t] = rs;
        }
        gemm(n, dBq.data(), m, wpk, dq.data(), d, false);
        for (int64_t t = 0; t < n; ++t) {
          scalar_t* dst = gqp + (bh * T + t0 + t) * d;
          for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<scalar_t>(dq[t * d + i] - Qc[t * d + i] * rsum[t]);
        }
        pack_b(dn_pk, dnum.data(), d, int64_t{1}, n, d);
        gemm(m, BqT.data(), n, dn_pk, dS, d, true);
      }
    }
  });

  // Merge the segments (in order) into dS, dz per bh.
  std::vector<acc_t> dz_all(BH * m);
  std::vector<PackedB<acc_t>> ds_pk(BH), dst_pk(BH);  // dS as B (m x d) and dS^T (d x m)
  parallel_items(BH, [&](const auto& claim) {
    std::vector<acc_t> dS(m * d);
    for (int64_t bh = claim(); bh >= 0; bh = claim()) {
      std::fill(dS.begin(), dS.end(), acc_t(0));
      acc_t* dz = dz_all.data() + bh * m;
      std::fill(dz, dz + m, acc_t(0));
      for (int64_t sg = 0; sg < segs; ++sg) {
        const acc_t* p = part.data() + (bh * segs + sg) * part_len;
        for (int64_t i = 0; i < m * d; ++i) dS[i] += p[i];
        for (int64_t j = 0; j < m; ++j) dz[j] += p[m * d + j];
      }
      pack_b(ds_pk[bh], dS.data(), d, int64_t{1}, m, d);
      pack_b(dst_pk[bh], dS.data(), int64_t{1}, d, d, m);
    }
  });

  // k side, per chunk: grad_k, grad_v.
  const int64_t chunks = (T + kChunk - 1) / kChunk;
  parallel_items(BH * chunks, [&](const auto& claim) {
    std::vector<acc_t> Kc(kChunk * d), Vc(kChunk * d), A(kChunk * m), dA(kChunk * m), rsum(kChunk), out(kChunk * d);
    for (int64_t item = claim(); item >= 0; item = claim()) {
      const int64_t bh = item / chunks, t0 = (item % chunks) * kChunk, n = std::min(kChunk, T - t0);
      const int64_t b = bh / s.H, h = bh % s.H;
      kt.gather(b, h, t0, n, d, Kc.data());
      vt.gather(b, h, t0, n, d, Vc.data());
      logits(Kc.data(), n, d, wt, A.data());
      const acc_t shift = kmp[bh];
      for (int64_t i = 0; i < n * m; ++i) A[i] = std::exp(A[i] - shift);
      gemm(n, A.data(), m, ds_pk[bh], out.data(), d, false);
      for (int64_t t = 0; t < n; ++t) {
        scalar_t* dst = gvp + (bh * T + t0 + t) * d;
        for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<scalar_t>(out[t * d + i]);
      }
      gemm(n, Vc.data(), d, dst_pk[bh], dA.data(), m, false);
      const acc_t* dz = dz_all.data() + bh * m;
      for (int64_t t = 0; t < n; ++t) {
        acc_t rs = 0;
        for (int64_t j = 0; j < m; ++j) {
          const acc_t da = (dA[t * m + j] + dz[j]) * A[t * m + j];
          dA[t * m + j] = da;
          rs += da;
        }
        rsum[t] = rs;
      }
      gemm(n, dA.data(), m, wpk, out.data(), d, false);
      for (int64_t t = 0; t < n; ++t) {
        scalar_t* dst = gkp + (bh * T + t0 + t) * d;
        for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<scalar_t>(out[t * d + i] - Kc[t * d + i] * rsum[t]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> performer_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w, double eps) {
  const auto s = check_performer_forward(q, k, v, w, eps, Backend::CPU);
  auto [y, kv, ksum, kmax, denom] = performer_forward_outputs(s, q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "performer_forward_cpu", [&] {
    forward_impl<scalar_t>(q, k, v, w, eps, s, y, kv, ksum, kmax, denom);
  });
  return {y, kv, ksum, kmax, denom};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> performer_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
    const at::Tensor& kv, const at::Tensor& ksum, const at::Tensor& kmax, const at::Tensor& denom) {
  const auto s = check_performer_backward(grad_y, q, k, v, w, kv, ksum, kmax, denom, Backend::CPU);
  auto [gq, gk, gv] = performer_backward_outputs(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "performer_backward_cpu", [&] {
    backward_impl<scalar_t>(grad_y, q, k, v, w, kv, ksum, kmax, denom, s, gq, gk, gv);
  });
  return {gq, gk, gv};
}

}  // namespace

TORCH_LIBRARY_IMPL(t2t_fast, CPU, m) {
  m.impl("performer_forward", &performer_forward_cpu);
  m.impl("performer_backward", &performer_backward_cpu);
}

}  // namespace cpu
}  // namespace t2t_fast
