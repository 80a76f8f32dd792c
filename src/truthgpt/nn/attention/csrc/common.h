// Shared pieces of the native kernel: tile sizes, vector types and the vector math.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace truthgpt_native {

constexpr int64_t kRows = 64;  // query rows per tile
// query rows per forward task: each key tile it loads (k transposed, v) serves this many rows,
// so at long lengths k and v stream from the shared cache half as often as with kRows
constexpr int64_t kForwardRows = 2 * kRows;
constexpr int64_t kKeys = 64;  // keys per tile (a multiple of every vector width)
constexpr int64_t kDecodeRows = 8;  // at most this many queries: a decoding step
constexpr double kMask = -1e30;  // masked score: finite, so exp(m_old - m_new) stays defined
constexpr double kDeadRow = kMask / 2;  // a row whose running max stayed below saw no key

// The kind codes come from kernel_codes.py, the registry's table, through setup.py's -D flags:
// the kernel cannot disagree with the registry about which code is which distance.
#if !defined(TG_KIND_L1) || !defined(TG_KIND_L2) || !defined(TG_KIND_CHEBYSHEV) || \
    !defined(TG_KIND_LP)
#error "TG_KIND_L1, TG_KIND_L2, TG_KIND_CHEBYSHEV and TG_KIND_LP must be defined (setup.py)"
#endif
enum Kind : int64_t {
  kL1 = TG_KIND_L1,
  kL2 = TG_KIND_L2,
  kChebyshev = TG_KIND_CHEBYSHEV,
  kLp = TG_KIND_LP
};
inline bool known_kind(int64_t kind) {
  return kind == kL1 || kind == kL2 || kind == kChebyshev || kind == kLp;
}

#define TG_INLINE inline __attribute__((always_inline))

// Vector width in bytes: the register width of the instruction set the translation unit is
// built for (isa_*.cpp define it). A wider GCC vector is split into registers, and its selects
// (a < b ? a : b) into scalar code, ten times slower. Everything that depends on the width is
// always inlined into one translation unit's entry points, so no out-of-line copy of it can be
// shared between instruction sets.
#ifndef TG_VEC_BYTES
#define TG_VEC_BYTES 64
#endif

// Vectors per row of a 4-row register tile: 4 x 4 accumulators fill half of AVX-512's 32
// registers, 4 x 2 half of AVX2's (and SSE2's) 16; more would spill to the stack.
constexpr int kRegVecs = TG_VEC_BYTES == 64 ? 4 : 2;

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(TG_VEC_BYTES)));
  static constexpr int W = TG_VEC_BYTES / sizeof(T);
};

template <typename V, typename T>
TG_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
TG_INLINE void store(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}
// every lane x, by a broadcast (V{} + x would first add 0.0f to x as a scalar: without
// fast-math the compiler must keep that add, since -0.0f + 0.0f is +0.0f)
template <typename V, typename T>
TG_INLINE V splat(T x) {
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef I VI __attribute__((vector_size(sizeof(V))));
  V v{};
  v[0] = x;
  return __builtin_shuffle(v, VI{});  // lane 0 everywhere: one broadcast instruction
}
// |x| by clearing the sign bit: one instruction (x < 0 ? -x : x is three)
template <typename V>
TG_INLINE V vabs(V x) {
  using E = std::remove_reference_t<decltype(x[0])>;
  using I = std::conditional_t<sizeof(E) == 4, int32_t, int64_t>;
  typedef I VI __attribute__((vector_size(TG_VEC_BYTES)));
  VI bits;
  std::memcpy(&bits, &x, sizeof(V));
  bits &= std::numeric_limits<I>::max();
  std::memcpy(&x, &bits, sizeof(V));
  return x;
}

// ---------------------------------------------------------------------------------------------
// exp and log on float lanes (Cephes' expf and logf, about 1 ulp): std::exp and std::log do
// not vectorise without fast-math. float64 (tests) uses the std functions.

TG_INLINE Vec<float>::type vexp(Vec<float>::type x) {  // Cephes' expf, ~1 ulp; 0 below -87.3
  using V = Vec<float>::type;
  typedef int32_t VI __attribute__((vector_size(TG_VEC_BYTES)));
  const V zero{};
  const V xc = x < -87.3f ? splat<V>(-87.3f) : (x > 88.3f ? splat<V>(88.3f) : x);
  V n = xc * 1.44269504088896341f;
  const VI ni = __builtin_convertvector(n + (n < 0 ? splat<V>(-0.5f) : splat<V>(0.5f)), VI);
  n = __builtin_convertvector(ni, V);
  V r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V y = splat<V>(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const VI e = (ni + 127) << 23;
  V scale;
  std::memcpy(&scale, &e, sizeof(V));
  return x < -87.3f ? zero : y * scale;
}

TG_INLINE Vec<float>::type vlog(Vec<float>::type x) {  // x > 0
  using V = Vec<float>::type;
  typedef int32_t VI __attribute__((vector_size(TG_VEC_BYTES)));
  VI bits;
  std::memcpy(&bits, &x, sizeof(V));
  V e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, V);
  bits = (bits & 0x807fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  V m;
  std::memcpy(&m, &bits, sizeof(V));
  const auto small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const V z = m * m;
  V y = splat<V>(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  return m + y + e * 0.693359375f;
}

// a^p for a >= 0, p > 0 (0^p = 0). An integer p (ip = p, up to 8) is repeated
// multiplication, exact and ~20x cheaper than exp(p log a); ip = 0 for any other p.
TG_INLINE Vec<float>::type vpow(Vec<float>::type a, float p, int ip) {
  using V = Vec<float>::type;
  if (ip > 0) {
    V r = a;
    for (int i = 1; i < ip; ++i) r *= a;
    return r;
  }
  const V one = splat<V>(1.0f);
  return a > 0 ? vexp(p * vlog(a > 0 ? a : one)) : V{};
}

TG_INLINE int integer_exponent(double p) {
  return p == std::round(p) && p >= 1 && p <= 8 ? int(p) : 0;
}


// ---------------------------------------------------------------------------------------------
// row operations on one tile row of kKeys values, on the vector lanes (GCC does not vectorise
// max/sum reductions or std::exp without fast-math, which we do not use)

template <typename T>
TG_INLINE T row_max(const T* x, T init) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  V m = load<V>(x);
  for (int j = 1; j < kKeys / W; ++j) {
    const V y = load<V>(x + j * W);
    m = m > y ? m : y;
  }
  T r = init;
  for (int i = 0; i < W; ++i) r = std::max(r, T(m[i]));
  return r;
}

template <typename T>
TG_INLINE T hsum(typename Vec<T>::type v) {
  T r = 0;
  for (int i = 0; i < Vec<T>::W; ++i) r += v[i];
  return r;
}

// x[c] = exp(x[c] - shift); returns the sum
TG_INLINE float exp_row(float* x, float shift) {
  using V = Vec<float>::type;
  V sum{};
  for (int64_t c = 0; c < kKeys; c += Vec<float>::W) {
    const V e = vexp(load<V>(x + c) - shift);
    store(x + c, e);
    sum += e;
  }
  return hsum<float>(sum);
}
TG_INLINE double exp_row(double* x, double shift) {
  double sum = 0;
  for (int64_t c = 0; c < kKeys; ++c) sum += (x[c] = std::exp(x[c] - shift));
  return sum;
}


}  // namespace truthgpt_native
