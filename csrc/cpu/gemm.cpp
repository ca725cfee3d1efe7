#include "gemm.h"

#include <cstdlib>
#include <cstring>
#include <string>

#include <c10/util/Exception.h>

#if !defined(__GNUC__)
#error "csrc/cpu/gemm.cpp uses GCC/Clang vector extensions and target attributes; build with GCC or Clang"
#endif

namespace t2t_fast {
namespace cpu {
namespace {

// GCC/Clang generic vectors: one 64-byte vector is one zmm register, or two ymm / four xmm registers when the
// function is compiled for a narrower ISA. A panel row is two of them.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
};

// C tile (MR x kPanel) (+)= A rows (MR x Kd) * one B panel (Kd x kPanel). always_inline so that every ISA variant
// below compiles it with its own instruction set.
template <typename T, int MR>
inline __attribute__((always_inline)) void micro(int64_t Kd, const T* A, int64_t lda, const T* Bp, T* C,
                                                 int64_t ldc, bool accumulate) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = 64 / sizeof(T);
  V c0[MR], c1[MR];
  for (int i = 0; i < MR; ++i) {
    if (accumulate) {
      std::memcpy(&c0[i], C + i * ldc, sizeof(V));
      std::memcpy(&c1[i], C + i * ldc + L, sizeof(V));
    } else {
      c0[i] = V{};
      c1[i] = V{};
    }
  }
  for (int64_t k = 0; k < Kd; ++k) {
    V b0, b1;
    std::memcpy(&b0, Bp + k * 2 * L, sizeof(V));
    std::memcpy(&b1, Bp + k * 2 * L + L, sizeof(V));
    for (int i = 0; i < MR; ++i) {
      const T a = A[i * lda + k];
      c0[i] += a * b0;
      c1[i] += a * b1;
    }
  }
  for (int i = 0; i < MR; ++i) {
    std::memcpy(C + i * ldc, &c0[i], sizeof(V));
    std::memcpy(C + i * ldc + L, &c1[i], sizeof(V));
  }
}

// micro<T, mr> for a run-time row count mr <= MR (the last rows of A).
template <typename T, int MR>
inline __attribute__((always_inline)) void micro_rows(int64_t mr, int64_t Kd, const T* A, int64_t lda, const T* Bp,
                                                      T* C, int64_t ldc, bool accumulate) {
  if constexpr (MR > 1) {
    if (mr < MR) {
      micro_rows<T, MR - 1>(mr, Kd, A, lda, Bp, C, ldc, accumulate);
      return;
    }
  }
  micro<T, MR>(Kd, A, lda, Bp, C, ldc, accumulate);
}

template <typename T, int MR>
inline __attribute__((always_inline)) void gemm_blocked(int64_t M, const T* A, int64_t lda, const PackedB<T>& B,
                                                        T* C, int64_t ldc, bool accumulate) {
  constexpr int64_t P = kPanel<T>;
  const int64_t Kd = B.rows;
  const int64_t N = B.cols;
  alignas(64) T tile[MR * P];
  for (int64_t c0 = 0; c0 < N; c0 += P) {
    const T* Bp = B.data.data() + (c0 / P) * Kd * P;
    const int64_t nc = std::min(P, N - c0);
    for (int64_t i0 = 0; i0 < M; i0 += MR) {
      const int64_t mr = std::min<int64_t>(MR, M - i0);
      T* Ci = C + i0 * ldc + c0;
      if (nc == P) {
        micro_rows<T, MR>(mr, Kd, A + i0 * lda, lda, Bp, Ci, ldc, accumulate);
        continue;
      }
      // Partial panel: go through a full-width tile so the micro-kernel never touches C past column N.
      if (accumulate) {
        for (int64_t i = 0; i < mr; ++i) std::memcpy(tile + i * P, Ci + i * ldc, nc * sizeof(T));
      }
      micro_rows<T, MR>(mr, Kd, A + i0 * lda, lda, Bp, tile, P, accumulate);
      for (int64_t i = 0; i < mr; ++i) std::memcpy(Ci + i * ldc, tile + i * P, nc * sizeof(T));
    }
  }
}

template <typename T>
using GemmFn = void (*)(int64_t, const T*, int64_t, const PackedB<T>&, T*, int64_t, bool);

// Rows per micro-tile: the accumulators (2 * MR vectors) must fit the register file with room for B.
template <typename T>
void gemm_base(int64_t M, const T* A, int64_t lda, const PackedB<T>& B, T* C, int64_t ldc, bool accumulate) {
  gemm_blocked<T, 2>(M, A, lda, B, C, ldc, accumulate);
}

#if defined(__GNUC__) && defined(__x86_64__)
#define T2T_FAST_X86_VARIANTS 1
template <typename T>
__attribute__((target("avx512f"))) void gemm_avx512(int64_t M, const T* A, int64_t lda, const PackedB<T>& B, T* C,
                                                    int64_t ldc, bool accumulate) {
  gemm_blocked<T, 8>(M, A, lda, B, C, ldc, accumulate);
}

template <typename T>
__attribute__((target("avx2,fma"))) void gemm_avx2(int64_t M, const T* A, int64_t lda, const PackedB<T>& B, T* C,
                                                   int64_t ldc, bool accumulate) {
  gemm_blocked<T, 3>(M, A, lda, B, C, ldc, accumulate);
}
#endif

std::string isa_name() {
  const char* forced = std::getenv("T2T_FAST_CPU_ISA");
  std::string want = forced ? forced : "";
#ifdef T2T_FAST_X86_VARIANTS
  __builtin_cpu_init();
  const bool has512 = __builtin_cpu_supports("avx512f");
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (want.empty()) return has512 ? "avx512" : has2 ? "avx2" : "base";
  TORCH_CHECK(want == "base" || (want == "avx2" && has2) || (want == "avx512" && has512),
              "T2T_FAST_CPU_ISA=", want, " is not supported on this CPU (use avx512, avx2 or base)");
  return want;
#else
  TORCH_CHECK(want.empty() || want == "base", "T2T_FAST_CPU_ISA=", want, " is not available on this platform");
  return "base";
#endif
}

const std::string& isa() {
  static const std::string name = isa_name();
  return name;
}

template <typename T>
GemmFn<T> select() {
#ifdef T2T_FAST_X86_VARIANTS
  if (isa() == "avx512") return gemm_avx512<T>;
  if (isa() == "avx2") return gemm_avx2<T>;
#endif
  return gemm_base<T>;
}

}  // namespace

template <typename T>
void gemm(int64_t M, const T* A, int64_t lda, const PackedB<T>& B, T* C, int64_t ldc, bool accumulate) {
  static const GemmFn<T> fn = select<T>();
  fn(M, A, lda, B, C, ldc, accumulate);
}

template void gemm<float>(int64_t, const float*, int64_t, const PackedB<float>&, float*, int64_t, bool);
template void gemm<double>(int64_t, const double*, int64_t, const PackedB<double>&, double*, int64_t, bool);

const char* gemm_isa() { return isa().c_str(); }

}  // namespace cpu
}  // namespace t2t_fast
