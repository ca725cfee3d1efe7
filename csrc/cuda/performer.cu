// CUDA kernels of performer_forward / performer_backward (contract and statistics: t2t_fast/ops/performer.py).
//
// Tokens are processed in chunks of kChunk held in shared memory together with their features (kChunk x m);
// nothing of size (B, H, T, m) is allocated. Sums over tokens (kv, ksum; dS, dz) run per (batch*head, segment of
// kSegment tokens) with the accumulators in registers (thread i owns entries i, i + kThreads, ...), are written
// as partials, and merged in segment order: deterministic, no atomics.
//
// forward:  kv_kernel (per segment, running max) -> merge_kernel (kv, ksum, kmax) -> out_kernel (y, denom)
// backward: q_kernel (grad_q, partial dS/dz per segment) -> reduce_kernel -> k_kernel (grad_k, grad_v)
#include "device_utils.cuh"

namespace t2t_fast {
namespace gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 16;       // tokens per chunk
constexpr int kSegment = 256;    // tokens per segment of the token sums
constexpr int kPerThread = static_cast<int>((kMaxFeatures * kMaxHeadDim + kThreads - 1) / kThreads);
constexpr int kMaxD = static_cast<int>(kMaxHeadDim);
constexpr int kMaxM = static_cast<int>(kMaxFeatures);

int64_t segments(const PerformerDims& s) { return (s.T + kSegment - 1) / kSegment; }

// out (n x d, row-major) = tokens t0 .. t0+n-1 of (b, h).
template <typename T>
__device__ void load_chunk(const TokenView& tv, int64_t b, int64_t h, int64_t t0, int n, int d, float* out) {
  const T* p = static_cast<const T*>(tv.data);
  for (int e = threadIdx.x; e < n * d; e += blockDim.x) {
    const int t = e / d, i = e - t * d;
    out[e] = to_float(p[b * tv.sb + h * tv.sh + (t0 + t) * tv.st + i * tv.sd]);
  }
}

// out[t][j] = X[t] . w[j] - |X[t]|^2 / 2 for the n rows of X; sq: n floats of scratch. Synchronizes the block.
__device__ void chunk_logits(const float* X, int n, int d, int m, const float* __restrict__ w, float* sq,
                             float* out) {
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  for (int t = threadIdx.x >> 5; t < n; t += warps) {
    float s = 0.f;
    for (int i = lane; i < d; i += 32) s += X[t * d + i] * X[t * d + i];
    s = warp_sum(s);
    if (lane == 0) sq[t] = 0.5f * s;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < n * m; e += blockDim.x) {
    const int t = e / m, j = e - t * m;
    float s = 0.f;
    for (int i = 0; i < d; ++i) s += X[t * d + i] * w[j * d + i];
    out[e] = s - sq[t];
  }
  __syncthreads();
}

// Per token t < n (a warp each): rows[t][j] = exp(rows[t][j] - max_j rows[t][j]); returns nothing, writes rowmax.
__device__ void softmax_shift_rows(float* rows, int n, int m, float* rowmax) {
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  for (int t = threadIdx.x >> 5; t < n; t += warps) {
    float mx = -INFINITY;
    for (int j = lane; j < m; j += 32) mx = fmaxf(mx, rows[t * m + j]);
    mx = warp_max(mx);
    for (int j = lane; j < m; j += 32) rows[t * m + j] = __expf(rows[t * m + j] - mx);
    if (lane == 0) rowmax[t] = mx;
  }
  __syncthreads();
}

// Per token t < n (a warp each): out[t] = sum_j rows[t][j].
__device__ void row_sums(const float* rows, int n, int m, float* out) {
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  for (int t = threadIdx.x >> 5; t < n; t += warps) {
    float s = 0.f;
    for (int j = lane; j < m; j += 32) s += rows[t * m + j];
    s = warp_sum(s);
    if (lane == 0) out[t] = s;
  }
  __syncthreads();
}

// Pass 1 of the forward: per (segment, bh): kv (m x d) and ksum relative to the segment's running max.
// partial[(bh * segs + seg)] = [kv (m*d) | ksum (m) | max (1)].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    kv_kernel(PerformerDims s, TokenView k, TokenView v, const float* __restrict__ w, int64_t segs,
              float* __restrict__ partial) {
  __shared__ float Kc[kChunk * kMaxD], Vc[kChunk * kMaxD], A[kChunk * kMaxM], sq[kChunk], scratch[32];
  const int64_t bh = blockIdx.x, seg = blockIdx.y, b = bh / s.H, h = bh % s.H;
  const int d = static_cast<int>(s.d), m = static_cast<int>(s.m), md = m * d;
  float acc[kPerThread];
#pragma unroll
  for (int r = 0; r < kPerThread; ++r) acc[r] = 0.f;
  float zsum = 0.f, run_max = -INFINITY;
  const int64_t t_end = s.T < (seg + 1) * kSegment ? s.T : (seg + 1) * kSegment;
  for (int64_t t0 = seg * kSegment; t0 < t_end; t0 += kChunk) {
    const int n = static_cast<int>(t_end - t0 < kChunk ? t_end - t0 : kChunk);
    load_chunk<T>(k, b, h, t0, n, d, Kc);
    load_chunk<T>(v, b, h, t0, n, d, Vc);
    __syncthreads();
    chunk_logits(Kc, n, d, m, w, sq, A);
    float local = -INFINITY;
    for (int e = threadIdx.x; e < n * m; e += blockDim.x) local = fmaxf(local, A[e]);
    const float cmax = block_max(local, scratch);
    if (cmax > run_max) {
      const float scale = run_max == -INFINITY ? 0.f : __expf(run_max - cmax);
#pragma unroll
      for (int r = 0; r < kPerThread; ++r) acc[r] *= scale;
      zsum *= scale;
      run_max = cmax;
    }
    for (int e = threadIdx.x; e < n * m; e += blockDim.x) A[e] = __expf(A[e] - run_max);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) {
      const int idx = threadIdx.x + r * kThreads;
      if (idx < md) {
        const int j = idx / d, i = idx - j * d;
        float sum = 0.f;
        for (int t = 0; t < n; ++t) sum += A[t * m + j] * Vc[t * d + i];
        acc[r] += sum;
      }
    }
    if (threadIdx.x < m) {
      float sum = 0.f;
      for (int t = 0; t < n; ++t) sum += A[t * m + threadIdx.x];
      zsum += sum;
    }
    __syncthreads();
  }
  float* out = partial + (bh * segs + seg) * (md + m + 1);
#pragma unroll
  for (int r = 0; r < kPerThread; ++r) {
    const int idx = threadIdx.x + r * kThreads;
    if (idx < md) out[idx] = acc[r];
  }
  if (threadIdx.x < m) out[md + threadIdx.x] = zsum;
  if (threadIdx.x == 0) out[md + m] = run_max;
}

// kv, ksum relative to kmax = the largest segment max, summed in segment order.
__global__ void merge_kernel(PerformerDims s, int64_t segs, const float* __restrict__ partial, float* __restrict__ kv,
                             float* __restrict__ ksum, float* __restrict__ kmax) {
  const int64_t bh = blockIdx.x;
  const int64_t md = s.m * s.d, len = md + s.m + 1;
  const float* p = partial + bh * segs * len;
  float M = -INFINITY;
  for (int64_t sg = 0; sg < segs; ++sg) M = fmaxf(M, p[sg * len + md + s.m]);
  for (int64_t idx = threadIdx.x; idx < md + s.m; idx += blockDim.x) {
    float sum = 0.f;
    for (int64_t sg = 0; sg < segs; ++sg) {
      const float ms = p[sg * len + md + s.m];
      if (ms != -INFINITY) sum += __expf(ms - M) * p[sg * len + idx];
    }
    if (idx < md) {
      kv[bh * md + idx] = sum;
    } else {
      ksum[bh * s.m + idx - md] = sum;
    }
  }
  if (threadIdx.x == 0) kmax[bh] = M;
}

// y and denom for one chunk of queries.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    out_kernel(PerformerDims s, TokenView q, const float* __restrict__ w, const float* __restrict__ kv,
               const float* __restrict__ ksum, const float* __restrict__ kmax, float eps_log, float eps_sign,
               T* __restrict__ y,
               float* __restrict__ denom) {
  __shared__ float Qc[kChunk * kMaxD], Bq[kChunk * kMaxM], sq[kChunk], qmax[kChunk], den[kChunk];
  const int64_t bh = blockIdx.x, t0 = static_cast<int64_t>(blockIdx.y) * kChunk;
  const int d = static_cast<int>(s.d), m = static_cast<int>(s.m);
  const int n = static_cast<int>(s.T - t0 < kChunk ? s.T - t0 : kChunk);
  load_chunk<T>(q, bh / s.H, bh % s.H, t0, n, d, Qc);
  __syncthreads();
  chunk_logits(Qc, n, d, m, w, sq, Bq);
  softmax_shift_rows(Bq, n, m, qmax);
  const float* z = ksum + bh * m;
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  for (int t = threadIdx.x >> 5; t < n; t += warps) {
    float sum = 0.f;
    for (int j = lane; j < m; j += 32) sum += Bq[t * m + j] * z[j];
    sum = warp_sum(sum);
    if (lane == 0) {
      den[t] = sum + eps_sign * __expf(eps_log - qmax[t] - kmax[bh]);
      denom[bh * s.T + t0 + t] = den[t];
    }
  }
  __syncthreads();
  const float* S = kv + bh * m * d;
  for (int e = threadIdx.x; e < n * d; e += blockDim.x) {
    const int t = e / d, i = e - t * d;
    float acc = 0.f;
    for (int j = 0; j < m; ++j) acc += Bq[t * m + j] * S[j * d + i];
    y[(bh * s.T + t0 + t) * d + i] = from_float<T>(acc / den[t]);
  }
}

// Backward, q side, per (segment, bh): grad_q, and partial[(bh * segs + seg)] = [dS (m*d) | dz (m)].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    q_kernel(PerformerDims s, TokenView gy, TokenView q, const float* __restrict__ w, const float* __restrict__ kv,
             const float* __restrict__ ksum, const float* __restrict__ denom, int64_t segs, T* __restrict__ gq,
             float* __restrict__ partial) {
  __shared__ float Qc[kChunk * kMaxD], dN[kChunk * kMaxD], Yc[kChunk * kMaxD], Bq[kChunk * kMaxM],
      DB[kChunk * kMaxM], sq[kChunk], dden[kChunk], rs[kChunk];
  const int64_t bh = blockIdx.x, seg = blockIdx.y, b = bh / s.H, h = bh % s.H;
  const int d = static_cast<int>(s.d), m = static_cast<int>(s.m), md = m * d;
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const float* S = kv + bh * md;
  const float* z = ksum + bh * m;
  float acc[kPerThread];
#pragma unroll
  for (int r = 0; r < kPerThread; ++r) acc[r] = 0.f;
  float dzsum = 0.f;
  const int64_t t_end = s.T < (seg + 1) * kSegment ? s.T : (seg + 1) * kSegment;
  for (int64_t t0 = seg * kSegment; t0 < t_end; t0 += kChunk) {
    const int n = static_cast<int>(t_end - t0 < kChunk ? t_end - t0 : kChunk);
    load_chunk<T>(q, b, h, t0, n, d, Qc);
    load_chunk<T>(gy, b, h, t0, n, d, dN);  // dy for now, dy / den below
    __syncthreads();
    chunk_logits(Qc, n, d, m, w, sq, Bq);
    softmax_shift_rows(Bq, n, m, rs);  // rs: scratch here
    for (int e = threadIdx.x; e < n * d; e += blockDim.x) {
      const int t = e / d, i = e - t * d;
      float a = 0.f;
      for (int j = 0; j < m; ++j) a += Bq[t * m + j] * S[j * d + i];
      Yc[e] = a / denom[bh * s.T + t0 + t];
    }
    __syncthreads();
    for (int t = threadIdx.x >> 5; t < n; t += warps) {  // dden = -(dy . y) / den; dN = dy / den
      const float dn = denom[bh * s.T + t0 + t];
      float dot = 0.f;
      for (int i = lane; i < d; i += 32) dot += dN[t * d + i] * Yc[t * d + i];
      dot = warp_sum(dot);
      for (int i = lane; i < d; i += 32) dN[t * d + i] /= dn;
      if (lane == 0) dden[t] = -dot / dn;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < n * m; e += blockDim.x) {  // db = (S dnum + z dden) * Bq
      const int t = e / m, j = e - t * m;
      float a = 0.f;
      for (int i = 0; i < d; ++i) a += dN[t * d + i] * S[j * d + i];
      DB[e] = (a + z[j] * dden[t]) * Bq[e];
    }
    __syncthreads();
    row_sums(DB, n, m, rs);
    for (int e = threadIdx.x; e < n * d; e += blockDim.x) {  // dq = db W - q sum_j db_j
      const int t = e / d, i = e - t * d;
      float a = 0.f;
      for (int j = 0; j < m; ++j) a += DB[t * m + j] * w[j * d + i];
      gq[(bh * s.T + t0 + t) * d + i] = from_float<T>(a - Qc[e] * rs[t]);
    }
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) {  // dS += Bq^T dnum
      const int idx = threadIdx.x + r * kThreads;
      if (idx < md) {
        const int j = idx / d, i = idx - j * d;
        float a = 0.f;
        for (int t = 0; t < n; ++t) a += Bq[t * m + j] * dN[t * d + i];
        acc[r] += a;
      }
    }
    if (threadIdx.x < m) {  // dz += Bq^T dden
      float a = 0.f;
      for (int t = 0; t < n; ++t) a += Bq[t * m + threadIdx.x] * dden[t];
      dzsum += a;
    }
    __syncthreads();
  }
  float* out = partial + (bh * segs + seg) * (md + m);
#pragma unroll
  for (int r = 0; r < kPerThread; ++r) {
    const int idx = threadIdx.x + r * kThreads;
    if (idx < md) out[idx] = acc[r];
  }
  if (threadIdx.x < m) out[md + threadIdx.x] = dzsum;
}

// dsz[bh] = [dS | dz] summed over the segments in order.
__global__ void reduce_kernel(PerformerDims s, int64_t segs, const float* __restrict__ partial,
                              float* __restrict__ dsz) {
  const int64_t bh = blockIdx.x, len = s.m * s.d + s.m;
  for (int64_t idx = threadIdx.x; idx < len; idx += blockDim.x) {
    float sum = 0.f;
    for (int64_t sg = 0; sg < segs; ++sg) sum += partial[(bh * segs + sg) * len + idx];
    dsz[bh * len + idx] = sum;
  }
}

// Backward, k side, per chunk: grad_k, grad_v.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    k_kernel(PerformerDims s, TokenView k, TokenView v, const float* __restrict__ w, const float* __restrict__ kmax,
             const float* __restrict__ dsz, T* __restrict__ gk, T* __restrict__ gv) {
  __shared__ float Kc[kChunk * kMaxD], Vc[kChunk * kMaxD], A[kChunk * kMaxM], DA[kChunk * kMaxM], sq[kChunk],
      rs[kChunk];
  const int64_t bh = blockIdx.x, t0 = static_cast<int64_t>(blockIdx.y) * kChunk, b = bh / s.H, h = bh % s.H;
  const int d = static_cast<int>(s.d), m = static_cast<int>(s.m), md = m * d;
  const int n = static_cast<int>(s.T - t0 < kChunk ? s.T - t0 : kChunk);
  const float* dS = dsz + bh * (md + m);
  const float* dz = dS + md;
  load_chunk<T>(k, b, h, t0, n, d, Kc);
  load_chunk<T>(v, b, h, t0, n, d, Vc);
  __syncthreads();
  chunk_logits(Kc, n, d, m, w, sq, A);
  const float shift = kmax[bh];
  for (int e = threadIdx.x; e < n * m; e += blockDim.x) A[e] = __expf(A[e] - shift);
  __syncthreads();
  for (int e = threadIdx.x; e < n * m; e += blockDim.x) {  // da = (dS v + dz) * A
    const int t = e / m, j = e - t * m;
    float a = 0.f;
    for (int i = 0; i < d; ++i) a += Vc[t * d + i] * dS[j * d + i];
    DA[e] = (a + dz[j]) * A[e];
  }
  __syncthreads();
  row_sums(DA, n, m, rs);
  for (int e = threadIdx.x; e < n * d; e += blockDim.x) {
    const int t = e / d, i = e - t * d;
    float dv = 0.f, dk = 0.f;
    for (int j = 0; j < m; ++j) {
      dv += A[t * m + j] * dS[j * d + i];
      dk += DA[t * m + j] * w[j * d + i];
    }
    const int64_t o = (bh * s.T + t0 + t) * d + i;
    gv[o] = from_float<T>(dv);
    gk[o] = from_float<T>(dk - Kc[e] * rs[t]);
  }
}

}  // namespace

size_t performer_forward_workspace(const PerformerDims& s) {
  return static_cast<size_t>(s.B * s.H * segments(s) * (s.m * s.d + s.m + 1)) * sizeof(float);
}

cudaError_t performer_forward(DType dtype, const PerformerDims& s, TokenView q, TokenView k, TokenView v,
                              const float* w, double eps, void* y, float* kv, float* ksum, float* kmax, float* denom,
                              void* workspace, cudaStream_t stream) {
  if (s.d > kMaxHeadDim || s.m > kMaxFeatures) return cudaErrorInvalidValue;
  const int64_t BH = s.B * s.H, segs = segments(s);
  float* partial = static_cast<float*>(workspace);
  // eps * m * exp(-qmax - kmax) as sign * exp(log|eps m| - qmax - kmax): exp(-qmax - kmax) alone overflows once
  // qmax + kmax < -88.7 (token norms of ~13 and more), and with eps = 0 that would be 0 * inf.
  const float eps_log = eps == 0 ? -INFINITY : static_cast<float>(log(fabs(eps) * static_cast<double>(s.m)));
  const float eps_sign = eps < 0 ? -1.f : 1.f;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    kv_kernel<T><<<dim3(static_cast<unsigned>(BH), static_cast<unsigned>(segs)), kThreads, 0, stream>>>(s, k, v, w, segs,
                                                                                                      partial);
    merge_kernel<<<static_cast<unsigned>(BH), kThreads, 0, stream>>>(s, segs, partial, kv, ksum, kmax);
    const dim3 grid(static_cast<unsigned>(BH), static_cast<unsigned>((s.T + kChunk - 1) / kChunk));
    out_kernel<T><<<grid, kThreads, 0, stream>>>(s, q, w, kv, ksum, kmax, eps_log, eps_sign, static_cast<T*>(y),
                                                 denom);
    return cudaGetLastError();
  });
}

size_t performer_backward_workspace(const PerformerDims& s) {
  const int64_t len = s.m * s.d + s.m;
  return static_cast<size_t>(s.B * s.H * (segments(s) + 1) * len) * sizeof(float);
}

cudaError_t performer_backward(DType dtype, const PerformerDims& s, TokenView grad_y, TokenView q, TokenView k,
                               TokenView v, const float* w, const float* kv, const float* ksum, const float* kmax,
                               const float* denom, void* grad_q, void* grad_k, void* grad_v, void* workspace,
                               cudaStream_t stream) {
  if (s.d > kMaxHeadDim || s.m > kMaxFeatures) return cudaErrorInvalidValue;
  const int64_t BH = s.B * s.H, segs = segments(s), len = s.m * s.d + s.m;
  float* partial = static_cast<float*>(workspace);
  float* dsz = partial + BH * segs * len;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    q_kernel<T><<<dim3(static_cast<unsigned>(BH), static_cast<unsigned>(segs)), kThreads, 0, stream>>>(
        s, grad_y, q, w, kv, ksum, denom, segs, static_cast<T*>(grad_q), partial);
    reduce_kernel<<<static_cast<unsigned>(BH), kThreads, 0, stream>>>(s, segs, partial, dsz);
    const dim3 grid(static_cast<unsigned>(BH), static_cast<unsigned>((s.T + kChunk - 1) / kChunk));
    k_kernel<T><<<grid, kThreads, 0, stream>>>(s, k, v, w, kmax, dsz, static_cast<T*>(grad_k), static_cast<T*>(grad_v));
    return cudaGetLastError();
  });
}

}  // namespace gpu
}  // namespace t2t_fast
