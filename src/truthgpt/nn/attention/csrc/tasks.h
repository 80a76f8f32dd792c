// The task loops of both passes, compiled once per instruction set. Each set has its own
// translation unit (isa_*.cpp), so a parallel build compiles them at the same time;
// distance_attention.cpp picks the one the CPU runs.
#pragma once

#include "passes.h"

// Only the entry points carry a target attribute: the always-inline loops they call are
// compiled into each of them, and any function left out of line stays baseline x86-64 (the
// linker keeps one copy of such a function, which every CPU must be able to run).
#if defined(__x86_64__) && !defined(__clang__)
#define TG_ISA_VARIANTS 1
#define TG_TARGET(arch) __attribute__((target(arch)))
#else
#define TG_ISA_VARIANTS 0
#endif

namespace truthgpt_native {

// NVd: the head dimension in vectors, 0 when it is not one of the counts compiled below (plain
// loops). A switch, not a lambda: the loops must be inlined into each instruction-set variant.
// float: D = 16, 32, 64, 128 at 64-byte vectors (D = 64 is 4, 8 or 16 vectors, by the width);
// double (tests): D = 8 at 64- or 16-byte vectors.
template <typename T>
int64_t width_case(int64_t D) {
  constexpr int W = Vec<T>::W;
  const int64_t n = D % W ? 0 : D / W;
  if (sizeof(T) == 8) return n == 1 || n == 4 ? n : 0;
  return n == 1 || n == 2 || n == 4 || n == 8 || n == 16 ? n : 0;
}

#define TG_BY_WIDTH(T, D, ...)                           \
  switch (width_case<T>(D)) {                            \
    case 1: { constexpr int NVd = 1; __VA_ARGS__; } break;      \
    case 2: if constexpr (sizeof(T) == 4) { constexpr int NVd = 2; __VA_ARGS__; } break; \
    case 4: if constexpr (true) { constexpr int NVd = 4; __VA_ARGS__; } break; \
    case 8: if constexpr (sizeof(T) == 4) { constexpr int NVd = 8; __VA_ARGS__; } break; \
    case 16: if constexpr (sizeof(T) == 4) { constexpr int NVd = 16; __VA_ARGS__; } break; \
    default: { constexpr int NVd = 0; __VA_ARGS__; } break;     \
  }

#define TG_ENTRY_POINTS(T, SUFFIX, TARGET)                                                    \
  TARGET void forward_tasks_##SUFFIX(const Problem<T>& P, int64_t begin, int64_t end,      \
                                        T* out, T* lse) {                                     \
    TG_BY_WIDTH(T, P.D, for (int64_t t = begin; t < end; ++t)                                 \
                            forward_task<T, NVd>(P, t, out, lse))                             \
  }                                                                                           \
  TARGET void backward_tasks_##SUFFIX(const Problem<T>& P, const Grads<T>& G,              \
                                         int64_t begin, int64_t end) {                        \
    TG_BY_WIDTH(T, P.D, for (int64_t t = begin; t < end; ++t) backward_task<T, NVd>(P, G, t)) \
  }

#define TG_DECLARE_ENTRY_POINTS(T, SUFFIX)                                                  \
  void forward_tasks_##SUFFIX(const Problem<T>& P, int64_t begin, int64_t end, T* out,   \
                              T* lse);                                                    \
  void backward_tasks_##SUFFIX(const Problem<T>& P, const Grads<T>& G, int64_t begin,    \
                               int64_t end);

TG_DECLARE_ENTRY_POINTS(float, f32)  // isa_baseline.cpp
TG_DECLARE_ENTRY_POINTS(double, f64)  // isa_baseline.cpp
#if TG_ISA_VARIANTS
TG_DECLARE_ENTRY_POINTS(float, f32_v3)  // isa_x86_64_v3.cpp: AVX2
TG_DECLARE_ENTRY_POINTS(float, f32_v4)  // isa_x86_64_v4.cpp: AVX-512
#endif

}  // namespace truthgpt_native
