// Small dense matrix products for the CPU kernels: C (+)= A * B on tiles that live in cache (a tile of patches
// against the soft split weight, a chunk of tokens against the random features).
//
// B is packed once into column panels (see PackedB) so the micro-kernel streams it contiguously; A and C are
// plain row-major. The micro-kernel is compiled for AVX-512, AVX2+FMA and the baseline ISA and picked at run time
// (T2T_FAST_CPU_ISA=avx512|avx2|base forces one, for tests).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace t2t_fast {
namespace cpu {

// Panel width in elements: two 64-byte vectors.
template <typename T>
constexpr int64_t kPanel = 128 / sizeof(T);

// B (rows x cols) as ceil(cols / kPanel) panels, each rows x kPanel row-major, zero-padded past cols.
template <typename T>
struct PackedB {
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<T> data;
};

// Packs B[r][c] = src[r * stride_row + c * stride_col] (any strides, so B^T is a pack away) converted to T.
template <typename T, typename S>
void pack_b(PackedB<T>& out, const S* src, int64_t stride_row, int64_t stride_col, int64_t rows, int64_t cols) {
  constexpr int64_t P = kPanel<T>;
  const int64_t panels = (cols + P - 1) / P;
  out.rows = rows;
  out.cols = cols;
  out.data.resize(static_cast<size_t>(panels * rows * P));
  for (int64_t q = 0; q < panels; ++q) {
    const int64_t c0 = q * P;
    const int64_t nc = std::min(P, cols - c0);
    T* dst = out.data.data() + q * rows * P;
    for (int64_t r = 0; r < rows; ++r, dst += P) {
      const S* s = src + r * stride_row + c0 * stride_col;
      int64_t c = 0;
      for (; c < nc; ++c) dst[c] = static_cast<T>(s[c * stride_col]);
      for (; c < P; ++c) dst[c] = T(0);
    }
  }
}

// C[M][B.cols] = A[M][B.rows] * B (accumulate: C += ...). lda, ldc: row strides of A and C in elements.
template <typename T>
void gemm(int64_t M, const T* A, int64_t lda, const PackedB<T>& B, T* C, int64_t ldc, bool accumulate);

extern template void gemm<float>(int64_t, const float*, int64_t, const PackedB<float>&, float*, int64_t, bool);
extern template void gemm<double>(int64_t, const double*, int64_t, const PackedB<double>&, double*, int64_t, bool);

// The micro-kernel variant in use: "avx512", "avx2" or "base".
const char* gemm_isa();

}  // namespace cpu
}  // namespace t2t_fast
