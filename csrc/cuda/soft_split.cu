// CUDA kernels of soft_split_forward / soft_split_backward (contract: t2t_fast/ops/soft_split.py).
//
// Forward: one block per tile of up to kMaxTile patches of one image. The block gathers the patches (through x's
// strides) into shared memory, normalizes them (a warp per patch), and each thread computes output features
// against the transposed weight (coalesced over features). Nothing of size (B, L, C*kh*kw) is allocated.
//
// Backward, deterministic (no floating-point atomics):
//  - tile kernel, one block per (image, band of patch rows): dXn = dY W for each tile of the band, the LayerNorm
//    backward per patch, per-block partial sums of dgamma/dbeta, and the col2im accumulation of grad_x, one patch
//    at a time. Bands two apart touch disjoint image rows: even bands run in one launch, odd bands in the next.
//  - dW kernel: dW and db as one reduction over patches of dY^T [Xn, 1], 32x32 output tiles, split over patch
//    ranges into partial sums; then reductions over the partials in a fixed order.
#include "device_utils.cuh"

namespace t2t_fast {
namespace gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxTile = 16;                 // patches per tile
constexpr size_t kSmemBudget = 48 * 1024;    // shared memory per block without opt-in
constexpr int kDwTile = 32;                  // dW kernel: output tile is kDwTile x kDwTile
constexpr int64_t kDwPatchesPerSplit = 1024;
constexpr int64_t kDwMaxSplits = 16;

// Patches per tile when each patch needs `floats` floats of shared memory.
int tile_patches(int64_t floats) {
  const int64_t fit = static_cast<int64_t>(kSmemBudget / sizeof(float)) / floats;
  return static_cast<int>(fit < 1 ? 1 : (fit > kMaxTile ? kMaxTile : fit));
}

// Patch rows per band of the tile kernel: bands two apart must not share image rows (G*sh > kh - 1 - sh).
__host__ __device__ int64_t band_rows(const SoftSplitDims& g) {
  return g.kh - 1 - g.sh >= 0 ? (g.kh - 1 - g.sh) / g.sh + 1 : 1;
}
__host__ __device__ int64_t band_count(const SoftSplitDims& g) { return (g.Lh + band_rows(g) - 1) / band_rows(g); }
int64_t dw_splits(const SoftSplitDims& g) {
  const int64_t s = (g.B * g.L + kDwPatchesPerSplit - 1) / kDwPatchesPerSplit;
  return s < 1 ? 1 : (s > kDwMaxSplits ? kDwMaxSplits : s);
}

struct PatchPos {
  bool inside;
  int64_t c, ih, iw;
};

// Image position of column col = c*kh*kw + i*kw + j of patch l; inside is false in the padding.
__device__ __forceinline__ PatchPos patch_pos(const SoftSplitDims& g, int64_t l, int64_t col) {
  const int64_t khw = g.kh * g.kw;
  const int64_t c = col / khw, r = col - c * khw, i = r / g.kw, j = r - i * g.kw;
  const int64_t ih = (l / g.Lw) * g.sh - g.ph + i, iw = (l % g.Lw) * g.sw - g.pw + j;
  return {ih >= 0 && ih < g.H && iw >= 0 && iw < g.W, c, ih, iw};
}

template <typename T>
__device__ __forceinline__ float load_patch(const T* x, const SoftSplitDims& g, int64_t b, int64_t l, int64_t col) {
  const PatchPos p = patch_pos(g, l, col);
  return p.inside ? to_float(x[b * g.xs[0] + p.c * g.xs[1] + p.ih * g.xs[2] + p.iw * g.xs[3]]) : 0.f;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(SoftSplitDims g, int tp, const T* __restrict__ x, const T* __restrict__ weight_t,
                   const T* __restrict__ bias, const float* __restrict__ gamma, const float* __restrict__ beta,
                   float eps, T* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd) {
  extern __shared__ float patches[];  // [tp][K]
  const int64_t b = blockIdx.y;
  const int64_t l0 = static_cast<int64_t>(blockIdx.x) * tp;
  const int np = static_cast<int>(g.L - l0 < tp ? g.L - l0 : tp);
  for (int64_t e = threadIdx.x; e < np * g.K; e += blockDim.x) {
    const int64_t pi = e / g.K;
    patches[e] = load_patch(x, g, b, l0 + pi, e - pi * g.K);
  }
  __syncthreads();
  if (gamma != nullptr) {
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int pi = threadIdx.x >> 5; pi < np; pi += warps) {
      float* r = patches + pi * g.K;
      float s = 0.f;
      for (int64_t k = lane; k < g.K; k += 32) s += r[k];
      const float mu = warp_sum(s) / static_cast<float>(g.K);
      float v = 0.f;
      for (int64_t k = lane; k < g.K; k += 32) v += (r[k] - mu) * (r[k] - mu);
      const float rs = rsqrtf(warp_sum(v) / static_cast<float>(g.K) + eps);
      if (lane == 0) {
        mean[b * g.L + l0 + pi] = mu;
        rstd[b * g.L + l0 + pi] = rs;
      }
      for (int64_t k = lane; k < g.K; k += 32) r[k] = (r[k] - mu) * rs * gamma[k] + (beta ? beta[k] : 0.f);
    }
    __syncthreads();
  }
  for (int64_t o = threadIdx.x; o < g.out; o += blockDim.x) {
    float acc[kMaxTile];
#pragma unroll
    for (int pi = 0; pi < kMaxTile; ++pi) acc[pi] = 0.f;
    for (int64_t k = 0; k < g.K; ++k) {
      const float wv = to_float(weight_t[k * g.out + o]);
#pragma unroll
      for (int pi = 0; pi < kMaxTile; ++pi) {
        if (pi < np) acc[pi] += patches[pi * g.K + k] * wv;
      }
    }
    const float bv = bias ? to_float(bias[o]) : 0.f;
#pragma unroll
    for (int pi = 0; pi < kMaxTile; ++pi) {
      if (pi < np) y[(b * g.L + l0 + pi) * g.out + o] = from_float<T>(acc[pi] + bv);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    tile_backward_kernel(SoftSplitDims g, int tp, int phase, const T* __restrict__ grad_y, const T* __restrict__ x,
                         const T* __restrict__ weight, const float* __restrict__ gamma,
                         const float* __restrict__ beta, const float* __restrict__ mean,
                         const float* __restrict__ rstd, float* __restrict__ gx, float* __restrict__ norm_partial) {
  extern __shared__ float smem[];
  float* xh = smem;               // [tp][K]: xhat, the normalized patch (only with norm)
  float* dxn = xh + tp * g.K;     // [tp][K]: gradient of the LayerNorm output, then of the patch
  float* dy = dxn + tp * g.K;     // [tp][out]
  const int64_t G = band_rows(g), bands = band_count(g);
  const int64_t b = blockIdx.y, band = 2 * static_cast<int64_t>(blockIdx.x) + phase;
  if (band >= bands) return;
  const bool norm = gamma != nullptr;
  float* part = norm ? norm_partial + (b * bands + band) * 2 * g.K : nullptr;  // [dgamma | dbeta] of this block
  const int64_t l_end = (g.Lh < (band + 1) * G ? g.Lh : (band + 1) * G) * g.Lw;
  for (int64_t l0 = band * G * g.Lw; l0 < l_end; l0 += tp) {
    const int np = static_cast<int>(l_end - l0 < tp ? l_end - l0 : tp);
    for (int64_t e = threadIdx.x; norm && e < np * g.K; e += blockDim.x) {
      const int64_t pi = e / g.K;
      const float v = load_patch(x, g, b, l0 + pi, e - pi * g.K);
      xh[e] = (v - mean[b * g.L + l0 + pi]) * rstd[b * g.L + l0 + pi];
    }
    for (int64_t e = threadIdx.x; e < np * g.out; e += blockDim.x) dy[e] = to_float(grad_y[(b * g.L + l0) * g.out + e]);
    __syncthreads();
    for (int64_t k = threadIdx.x; k < g.K; k += blockDim.x) {
      float acc[kMaxTile];
#pragma unroll
      for (int pi = 0; pi < kMaxTile; ++pi) acc[pi] = 0.f;
      for (int64_t o = 0; o < g.out; ++o) {
        const float wv = to_float(weight[o * g.K + k]);
#pragma unroll
        for (int pi = 0; pi < kMaxTile; ++pi) {
          if (pi < np) acc[pi] += dy[pi * g.out + o] * wv;
        }
      }
#pragma unroll
      for (int pi = 0; pi < kMaxTile; ++pi) {
        if (pi < np) dxn[pi * g.K + k] = acc[pi];
      }
      if (norm) {
        float sg = 0.f, sb = 0.f;
#pragma unroll
        for (int pi = 0; pi < kMaxTile; ++pi) {
          if (pi < np) {
            sg += acc[pi] * xh[pi * g.K + k];
            sb += acc[pi];
          }
        }
        part[k] += sg;
        part[g.K + k] += sb;
      }
    }
    __syncthreads();
    if (gx != nullptr) {
      if (norm) {  // d patch = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dXn * gamma
        const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
        for (int pi = threadIdx.x >> 5; pi < np; pi += warps) {
          float* d = dxn + pi * g.K;
          const float* xr = xh + pi * g.K;
          float s1 = 0.f, s2 = 0.f;
          for (int64_t k = lane; k < g.K; k += 32) {
            const float dxh = d[k] * gamma[k];
            s1 += dxh;
            s2 += dxh * xr[k];
          }
          const float c1 = warp_sum(s1) / static_cast<float>(g.K), c2 = warp_sum(s2) / static_cast<float>(g.K);
          const float rs = rstd[b * g.L + l0 + pi];
          for (int64_t k = lane; k < g.K; k += 32) d[k] = rs * (d[k] * gamma[k] - c1 - xr[k] * c2);
        }
        __syncthreads();
      }
      // col2im, one patch at a time: within a patch every column is a different pixel.
      for (int pi = 0; pi < np; ++pi) {
        for (int64_t k = threadIdx.x; k < g.K; k += blockDim.x) {
          const PatchPos p = patch_pos(g, l0 + pi, k);
          if (p.inside) gx[((b * g.C + p.c) * g.H + p.ih) * g.W + p.iw] += dxn[pi * g.K + k];
        }
        __syncthreads();
      }
    }
    __syncthreads();
  }
}

// partial[split][o][k] = sum over the split's patches n of dY[n][o] * Xn_ext[n][k], Xn_ext = [LayerNorm output, 1].
template <typename T>
__global__ void __launch_bounds__(kDwTile * 8)
    dw_kernel(SoftSplitDims g, int64_t per_split, const T* __restrict__ grad_y, const T* __restrict__ x,
              const float* __restrict__ gamma, const float* __restrict__ beta, const float* __restrict__ mean,
              const float* __restrict__ rstd, float* __restrict__ partial) {
  __shared__ float sdy[kDwTile][kDwTile + 1];  // [patch][o]
  __shared__ float sx[kDwTile][kDwTile + 1];   // [patch][k]
  const int tx = threadIdx.x, ty = threadIdx.y;  // blockDim (kDwTile, 8)
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kDwTile, o0 = static_cast<int64_t>(blockIdx.y) * kDwTile;
  const int64_t Kx = g.K + 1, N = g.B * g.L;
  const int64_t n_begin = blockIdx.z * per_split;
  const int64_t n_end = N < n_begin + per_split ? N : n_begin + per_split;
  float acc[kDwTile / 8] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kDwTile) {
    for (int r = ty; r < kDwTile; r += 8) {
      const int64_t n = n0 + r, o = o0 + tx, k = k0 + tx;
      const bool valid = n < n_end;
      sdy[r][tx] = valid && o < g.out ? to_float(grad_y[n * g.out + o]) : 0.f;
      float xv = 0.f;
      if (valid && k < g.K) {
        const int64_t b = n / g.L;
        xv = load_patch(x, g, b, n - b * g.L, k);
        if (gamma != nullptr) xv = (xv - mean[n]) * rstd[n] * gamma[k] + (beta ? beta[k] : 0.f);
      } else if (valid && k == g.K) {
        xv = 1.f;  // the bias column
      }
      sx[r][tx] = xv;
    }
    __syncthreads();
#pragma unroll 8
    for (int r = 0; r < kDwTile; ++r) {
      const float xv = sx[r][tx];
#pragma unroll
      for (int i = 0; i < kDwTile / 8; ++i) acc[i] += sdy[r][ty + 8 * i] * xv;
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kDwTile / 8; ++i) {
    const int64_t o = o0 + ty + 8 * i, k = k0 + tx;
    if (o < g.out && k < Kx) partial[(blockIdx.z * g.out + o) * Kx + k] = acc[i];
  }
}

template <typename T>
__global__ void dw_reduce_kernel(int64_t out, int64_t K, int64_t splits, const float* __restrict__ partial,
                                 T* __restrict__ gw, T* __restrict__ gb) {
  const int64_t Kx = K + 1;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= out * Kx) return;
  float s = 0.f;
  for (int64_t sp = 0; sp < splits; ++sp) s += partial[sp * out * Kx + idx];
  const int64_t o = idx / Kx, k = idx - o * Kx;
  if (k < K) {
    gw[o * K + k] = from_float<T>(s);
  } else {
    gb[o] = from_float<T>(s);
  }
}

// grad_norm_weight[k], grad_norm_bias[k] = sums over the tile blocks' rows [dgamma | dbeta], in row order.
__global__ void norm_reduce_kernel(int64_t K, int64_t rows, const float* __restrict__ partial,
                                   float* __restrict__ gnw, float* __restrict__ gnb) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= 2 * K) return;
  float s = 0.f;
  for (int64_t r = 0; r < rows; ++r) s += partial[r * 2 * K + idx];
  if (idx < K) {
    gnw[idx] = s;
  } else {
    gnb[idx - K] = s;
  }
}

template <typename T>
__global__ void convert_kernel(int64_t n, const float* __restrict__ src, T* __restrict__ dst) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = from_float<T>(src[i]);
  }
}

struct BackwardWorkspace {  // float offsets into the workspace
  int64_t gx, norm_partial, dw_partial, total;
};

BackwardWorkspace workspace_layout(const SoftSplitDims& g, bool has_norm, bool compute_grad_x) {
  BackwardWorkspace w{};
  w.gx = 0;
  w.norm_partial = w.gx + (compute_grad_x ? g.B * g.C * g.H * g.W : 0);
  w.dw_partial = w.norm_partial + (has_norm ? g.B * band_count(g) * 2 * g.K : 0);
  w.total = w.dw_partial + dw_splits(g) * g.out * (g.K + 1);
  return w;
}

}  // namespace

cudaError_t soft_split_forward(DType dtype, const SoftSplitDims& g, const void* x, const void* weight_t,
                               const void* bias, const float* norm_weight, const float* norm_bias, float eps, void* y,
                               float* mean, float* rstd, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int tp = tile_patches(g.K);
    const dim3 grid(static_cast<unsigned>((g.L + tp - 1) / tp), static_cast<unsigned>(g.B));
    forward_kernel<T><<<grid, kThreads, tp * g.K * sizeof(float), stream>>>(
        g, tp, static_cast<const T*>(x), static_cast<const T*>(weight_t), static_cast<const T*>(bias), norm_weight,
        norm_bias, eps, static_cast<T*>(y), mean, rstd);
    return cudaGetLastError();
  });
}

size_t soft_split_backward_workspace(const SoftSplitDims& g, bool has_norm, bool compute_grad_x) {
  return static_cast<size_t>(workspace_layout(g, has_norm, compute_grad_x).total) * sizeof(float);
}

cudaError_t soft_split_backward(DType dtype, const SoftSplitDims& g, const void* grad_y, const void* x,
                                const void* weight, const float* norm_weight, const float* norm_bias,
                                const float* mean, const float* rstd, bool compute_grad_x, void* grad_x,
                                void* grad_weight, void* grad_bias, float* grad_norm_weight, float* grad_norm_bias,
                                void* workspace, cudaStream_t stream) {
  const bool has_norm = norm_weight != nullptr;
  const BackwardWorkspace layout = workspace_layout(g, has_norm, compute_grad_x);
  float* ws = static_cast<float*>(workspace);
  float* gx32 = compute_grad_x ? ws + layout.gx : nullptr;
  float* norm_partial = has_norm ? ws + layout.norm_partial : nullptr;
  float* dw_partial = ws + layout.dw_partial;
  // Zero the accumulators (grad_x and the norm partial rows; the dW partials are written, not accumulated).
  cudaError_t err = cudaMemsetAsync(ws, 0, layout.dw_partial * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* gy = static_cast<const T*>(grad_y);
    const T* xp = static_cast<const T*>(x);
    if (compute_grad_x || has_norm) {
      const int tp = tile_patches(2 * g.K + g.out);
      const size_t smem = static_cast<size_t>(tp) * (2 * g.K + g.out) * sizeof(float);
      const int64_t bands = band_count(g);
      for (int phase = 0; phase < 2; ++phase) {
        const int64_t phase_bands = (bands - phase + 1) / 2;
        if (phase_bands == 0) continue;
        const dim3 grid(static_cast<unsigned>(phase_bands), static_cast<unsigned>(g.B));
        tile_backward_kernel<T><<<grid, kThreads, smem, stream>>>(g, tp, phase, gy, xp, static_cast<const T*>(weight),
                                                                 norm_weight, norm_bias, mean, rstd, gx32,
                                                                 norm_partial);
      }
    }
    const int64_t splits = dw_splits(g);
    const int64_t per_split = (g.B * g.L + splits - 1) / splits;
    const dim3 grid_dw(static_cast<unsigned>((g.K + 1 + kDwTile - 1) / kDwTile),
                       static_cast<unsigned>((g.out + kDwTile - 1) / kDwTile), static_cast<unsigned>(splits));
    dw_kernel<T><<<grid_dw, dim3(kDwTile, 8), 0, stream>>>(g, per_split, gy, xp, norm_weight, norm_bias, mean, rstd,
                                                         dw_partial);
    dw_reduce_kernel<T><<<blocks_for(g.out * (g.K + 1), kThreads), kThreads, 0, stream>>>(
        g.out, g.K, splits, dw_partial, static_cast<T*>(grad_weight), static_cast<T*>(grad_bias));
    if (has_norm) {
      norm_reduce_kernel<<<blocks_for(2 * g.K, kThreads), kThreads, 0, stream>>>(
          g.K, g.B * band_count(g), norm_partial, grad_norm_weight, grad_norm_bias);
    }
    if (compute_grad_x) {
      const int64_t n = g.B * g.C * g.H * g.W;
      const unsigned blocks = blocks_for(n, kThreads) < 65535u ? blocks_for(n, kThreads) : 65535u;
      convert_kernel<T><<<blocks, kThreads, 0, stream>>>(n, gx32, static_cast<T*>(grad_x));
    }
    return cudaGetLastError();
  });
}

}  // namespace gpu
}  // namespace t2t_fast
