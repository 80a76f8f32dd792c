// Distance attention on the CPU: scores -lambda_h * d(q_i, k_j) for d in l1, l2, chebyshev, lp.
//
// Why a native kernel: the same math as kernels.py, but each pass (forward, backward) is ONE
// parallel region over (batch*head, block) tasks taken from a shared counter. A pass made of
// many compiled calls ends each call in a barrier that waits for the slowest thread; here a
// descheduled thread simply takes fewer tasks. Nothing of size Tq x Tk is ever held: scores
// live in (kRows x kKeys) tiles, with the online softmax in the forward and the recompute from
// the saved log-sum-exp in the backward (the flash-attention recurrences).
//
// L1 uses |a - b| = a + b - 2 min(a, b):
//     -lambda sum_d |q_d - k_d| = lambda (2 sum_d min(q_d, k_d) - sum_d k_d) - lambda sum_d q_d
// The last term is constant along a query row, so the softmax cancels it; it is never
// computed. The inner loop is min + add (a dot product's is one FMA), and in the backward one
// comparison q_d < k_d gives the gradient for both dq and dk:
//     ds/dq_d = 2 lambda [q_d < k_d] (- lambda, which sums to zero over a row of dS)
//     ds/dk_d = lambda (1 - 2 [q_d < k_d])
// At a tie (q_d == k_d) this is the subgradient +1 of |x| at x = q_d - k_d = 0 (the plain and
// eager paths use sign(0) = 0, as torch.cdist does).
//
// Vector code uses GCC vector extensions (64-byte vectors) and is compiled for AVX-512, AVX2
// and baseline x86-64 with target_clones; the loader picks the one the CPU runs.
// No floating-point environment is changed (no fast-math flags: subnormals survive).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <limits>
#include <vector>

namespace truthgpt_native {
namespace {

constexpr int64_t kRows = 64;  // query rows per tile
constexpr int64_t kKeys = 64;  // keys per tile (a multiple of every vector width)
constexpr int64_t kDecodeRows = 8;  // at most this many queries: a decoding step
constexpr double kMask = -1e30;  // masked score: finite, so exp(m_old - m_new) stays defined
constexpr double kDeadRow = kMask / 2;  // a row whose running max stayed below saw no key

enum Kind : int64_t { kL1 = 0, kL2 = 1, kChebyshev = 2, kLp = 3 };

#define TG_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && !defined(__clang__)
#define TG_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TG_CLONES
#endif

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int W = 64 / sizeof(T);
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
template <typename V, typename T>
TG_INLINE V splat(T x) {
  return V{} + x;
}
// |x| by clearing the sign bit: one instruction (x < 0 ? -x : x is three)
template <typename V>
TG_INLINE V vabs(V x) {
  using E = std::remove_reference_t<decltype(x[0])>;
  using I = std::conditional_t<sizeof(E) == 4, int32_t, int64_t>;
  typedef I VI __attribute__((vector_size(64)));
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
  typedef int32_t VI __attribute__((vector_size(64)));
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
  typedef int32_t VI __attribute__((vector_size(64)));
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
// score tiles: out[r][c] = reduce_d op(a[r][d], bt[d][c]) for rows r < rows, keys c < kKeys.
// Keys run along the vector lanes (bt is k transposed), a[r][d] is broadcast; a register tile
// of 4 rows x kKeys keys, the shape of a GEMM micro-kernel.

struct MinSum {  // l1: sum_d min(a, b)
  template <typename V>
  TG_INLINE static V step(V acc, V a, V b) { return acc + (a < b ? a : b); }
};
struct SqSum {  // l2: sum_d (a - b)^2
  template <typename V>
  TG_INLINE static V step(V acc, V a, V b) { V t = a - b; return acc + t * t; }
};
struct AbsMax {  // chebyshev: max_d |a - b|
  template <typename V>
  TG_INLINE static V step(V acc, V a, V b) {
    const V t = vabs(a - b);
    return acc > t ? acc : t;
  }
};
struct Dot {  // dP = dO . v
  template <typename V>
  TG_INLINE static V step(V acc, V a, V b) { return acc + a * b; }
};

template <typename T, typename Op>
TG_INLINE void score_tile(const T* a, int64_t rows, const T* bt, int64_t ldb, int64_t D, T* out) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W, NV = kKeys / W;
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    V acc[4][NV];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < NV; ++j) acc[i][j] = V{};
    for (int64_t d = 0; d < D; ++d) {
      V b[NV];
      for (int j = 0; j < NV; ++j) b[j] = load<V>(bt + d * ldb + j * W);
      for (int i = 0; i < 4; ++i) {
        V x = splat<V>(a[(r + i) * D + d]);
        for (int j = 0; j < NV; ++j) acc[i][j] = Op::step(acc[i][j], x, b[j]);
      }
    }
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < NV; ++j) store(out + (r + i) * kKeys + j * W, acc[i][j]);
  }
  for (; r < rows; ++r) {
    V acc[NV];
    for (int j = 0; j < NV; ++j) acc[j] = V{};
    for (int64_t d = 0; d < D; ++d) {
      V x = splat<V>(a[r * D + d]);
      for (int j = 0; j < NV; ++j) acc[j] = Op::step(acc[j], x, load<V>(bt + d * ldb + j * W));
    }
    for (int j = 0; j < NV; ++j) store(out + r * kKeys + j * W, acc[j]);
  }
}

// lp: sum_d |a - b|^p, with |x|^p = exp(p log |x|) on the lanes (float); plain loops (double).
template <typename T>
TG_INLINE void lp_tile(const T* a, int64_t rows, const T* bt, int64_t ldb, int64_t D, T p, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    using V = Vec<float>::type;
    constexpr int W = Vec<float>::W, NV = kKeys / W;
    const int ip = integer_exponent(p);
    for (int64_t r = 0; r < rows; ++r) {
      V acc[NV] = {};
      for (int64_t d = 0; d < D; ++d) {
        const V x = splat<V>(a[r * D + d]);
        for (int j = 0; j < NV; ++j)
          acc[j] += vpow(vabs(x - load<V>(bt + d * ldb + j * W)), p, ip);
      }
      for (int j = 0; j < NV; ++j) store(out + r * kKeys + j * W, acc[j]);
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    T* o = out + r * kKeys;
    for (int64_t c = 0; c < kKeys; ++c) o[c] = 0;
    for (int64_t d = 0; d < D; ++d) {
      const T x = a[r * D + d];
      const T* b = bt + d * ldb;
      for (int64_t c = 0; c < kKeys; ++c) o[c] += std::pow(std::abs(x - b[c]), p);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// accumulating products with the head dimension along the lanes (D = NVd vectors):
//   rows_acc: out[r][:] += sum_c w[r][c] * b[c][:]     (P.V, and dq of l2)
//   cols_acc: out[c][:] += sum_r w[r][c] * b[r][:]     (dV, and dk of l2)
// NVd = 0 means D is not a multiple of the width: plain loops.

template <typename T, int NVd>
TG_INLINE void rows_acc(const T* w, int64_t rows, int64_t cols, const T* b, int64_t D, T* out) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  if constexpr (NVd == 0) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const T x = w[r * kKeys + c];
        for (int64_t d = 0; d < D; ++d) out[r * D + d] += x * b[c * D + d];
      }
  } else {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
      V acc[4][NVd];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < NVd; ++j) acc[i][j] = load<V>(out + (r + i) * D + j * W);
      for (int64_t c = 0; c < cols; ++c) {
        V bv[NVd];
        for (int j = 0; j < NVd; ++j) bv[j] = load<V>(b + c * D + j * W);
        for (int i = 0; i < 4; ++i) {
          V x = splat<V>(w[(r + i) * kKeys + c]);
          for (int j = 0; j < NVd; ++j) acc[i][j] += x * bv[j];
        }
      }
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < NVd; ++j) store(out + (r + i) * D + j * W, acc[i][j]);
    }
    for (; r < rows; ++r) {
      V acc[NVd];
      for (int j = 0; j < NVd; ++j) acc[j] = load<V>(out + r * D + j * W);
      for (int64_t c = 0; c < cols; ++c) {
        V x = splat<V>(w[r * kKeys + c]);
        for (int j = 0; j < NVd; ++j) acc[j] += x * load<V>(b + c * D + j * W);
      }
      for (int j = 0; j < NVd; ++j) store(out + r * D + j * W, acc[j]);
    }
  }
}

template <typename T, int NVd>
TG_INLINE void cols_acc(const T* w, int64_t rows, int64_t cols, const T* b, int64_t D, T* out) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  if constexpr (NVd == 0) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const T x = w[r * kKeys + c];
        for (int64_t d = 0; d < D; ++d) out[c * D + d] += x * b[r * D + d];
      }
  } else {
    int64_t c = 0;
    for (; c + 4 <= cols; c += 4) {
      V acc[4][NVd];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < NVd; ++j) acc[i][j] = load<V>(out + (c + i) * D + j * W);
      for (int64_t r = 0; r < rows; ++r) {
        V bv[NVd];
        for (int j = 0; j < NVd; ++j) bv[j] = load<V>(b + r * D + j * W);
        for (int i = 0; i < 4; ++i) {
          V x = splat<V>(w[r * kKeys + c + i]);
          for (int j = 0; j < NVd; ++j) acc[i][j] += x * bv[j];
        }
      }
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < NVd; ++j) store(out + (c + i) * D + j * W, acc[i][j]);
    }
    for (; c < cols; ++c) {
      V acc[NVd];
      for (int j = 0; j < NVd; ++j) acc[j] = load<V>(out + c * D + j * W);
      for (int64_t r = 0; r < rows; ++r) {
        V x = splat<V>(w[r * kKeys + c]);
        for (int j = 0; j < NVd; ++j) acc[j] += x * load<V>(b + r * D + j * W);
      }
      for (int j = 0; j < NVd; ++j) store(out + c * D + j * W, acc[j]);
    }
  }
}

// l1 backward, D along the lanes: with m = [q_rd < k_cd],
//   dq_acc[r][d] += sum_c g[r][c] m,   dk_acc[c][d] += sum_r g[r][c] m.
// Two keys at a time, so each q row is loaded once per pair and dq_acc stored once per pair.
template <typename T, int NVd>
TG_INLINE void l1_grad(const T* g, int64_t rows, int64_t cols, const T* q, const T* k, int64_t D,
                       T* dq_acc, T* dk_acc) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  if constexpr (NVd == 0) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const T x = g[r * kKeys + c];
        for (int64_t d = 0; d < D; ++d) {
          const T gm = q[r * D + d] < k[c * D + d] ? x : T(0);
          dq_acc[r * D + d] += gm;
          dk_acc[c * D + d] += gm;
        }
      }
  } else {
    const V zero{};
    int64_t c = 0;
    for (; c + 2 <= cols; c += 2) {
      V k0[NVd], k1[NVd], a0[NVd], a1[NVd];
      for (int j = 0; j < NVd; ++j) {
        k0[j] = load<V>(k + c * D + j * W);
        k1[j] = load<V>(k + (c + 1) * D + j * W);
        a0[j] = load<V>(dk_acc + c * D + j * W);
        a1[j] = load<V>(dk_acc + (c + 1) * D + j * W);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const V g0 = splat<V>(g[r * kKeys + c]), g1 = splat<V>(g[r * kKeys + c + 1]);
        for (int j = 0; j < NVd; ++j) {
          const V qv = load<V>(q + r * D + j * W);
          const V m0 = qv < k0[j] ? g0 : zero;
          const V m1 = qv < k1[j] ? g1 : zero;
          a0[j] += m0;
          a1[j] += m1;
          store(dq_acc + r * D + j * W, load<V>(dq_acc + r * D + j * W) + (m0 + m1));
        }
      }
      for (int j = 0; j < NVd; ++j) {
        store(dk_acc + c * D + j * W, a0[j]);
        store(dk_acc + (c + 1) * D + j * W, a1[j]);
      }
    }
    for (; c < cols; ++c) {
      V k0[NVd], a0[NVd];
      for (int j = 0; j < NVd; ++j) {
        k0[j] = load<V>(k + c * D + j * W);
        a0[j] = load<V>(dk_acc + c * D + j * W);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const V g0 = splat<V>(g[r * kKeys + c]);
        for (int j = 0; j < NVd; ++j) {
          const V m0 = load<V>(q + r * D + j * W) < k0[j] ? g0 : zero;
          a0[j] += m0;
          store(dq_acc + r * D + j * W, load<V>(dq_acc + r * D + j * W) + m0);
        }
      }
      for (int j = 0; j < NVd; ++j) store(dk_acc + c * D + j * W, a0[j]);
    }
  }
}

// chebyshev backward, D along the lanes: g = dL/d dist, and dd/dq_d = sign(x) at every
// coordinate where |x| = d (x = q - k); pairs at distance 0 give nothing.
template <typename T, int NVd>
TG_INLINE void chebyshev_grad(const T* g, const T* dist, int64_t rows, int64_t cols, const T* q,
                              const T* k, int64_t D, T* dq, T* dk) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  const V zero{};
  for (int64_t c = 0; c < cols; ++c) {
    V kc[NVd], acc[NVd];
    for (int j = 0; j < NVd; ++j) {
      kc[j] = load<V>(k + c * D + j * W);
      acc[j] = load<V>(dk + c * D + j * W);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const T gv = g[r * kKeys + c], dv = dist[r * kKeys + c];
      if (gv == 0 || dv == 0) continue;
      const V gp = splat<V>(gv), dd = splat<V>(dv);
      for (int j = 0; j < NVd; ++j) {
        const V x = load<V>(q + r * D + j * W) - kc[j];
        const V ax = vabs(x);
        const V w = ax == dd ? (x > 0 ? gp : -gp) : zero;
        acc[j] -= w;
        store(dq + r * D + j * W, load<V>(dq + r * D + j * W) + w);
      }
    }
    for (int j = 0; j < NVd; ++j) store(dk + c * D + j * W, acc[j]);
  }
}

// lp backward, float, D along the lanes: dd/dq_d = sign(x) (|x| / d)^(p-1), 0 where x = 0
TG_INLINE void lp_grad(float p, const float* g, const float* dist, int64_t rows, int64_t cols,
                       const float* q, const float* k, int64_t D, float* dq, float* dk) {
  using V = Vec<float>::type;
  constexpr int W = Vec<float>::W;
  const V zero{}, one = splat<V>(1.0f);
  const int ip = integer_exponent(p);
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = 0; r < rows; ++r) {
      const float gv = g[r * kKeys + c], dv = dist[r * kKeys + c];
      if (gv == 0 || dv == 0) continue;
      const V gp = splat<V>(gv), logd = splat<V>(std::log(dv));
      const V gscaled = splat<V>(ip > 1 ? gv * std::pow(dv, 1.0f - p) : gv);  // g d^(1-p)
      for (int64_t j = 0; j < D; j += W) {
        const V x = load<V>(q + r * D + j) - load<V>(k + c * D + j);
        const V ax = vabs(x);
        V w = ip == 1   ? gp
              : ip > 1 ? gscaled * vpow(ax, p - 1.0f, ip - 1)
                       : gp * vexp((p - 1.0f) * (vlog(ax > 0 ? ax : one) - logd));
        w = ax > 0 ? (x > 0 ? w : -w) : zero;
        store(dq + r * D + j, load<V>(dq + r * D + j) + w);
        store(dk + c * D + j, load<V>(dk + c * D + j) - w);
      }
    }
}

// chebyshev and lp backward (plain loops): g = dL/d dist;
//   dq[r] += g * dd/dq,  dk[c] -= g * dd/dq,  dd/dq_d = sign(x) [|x| = d] (chebyshev: every
// coordinate attaining the max), sign(x) (|x| / d)^(p-1) (lp), 0 where x = 0 or d = 0.
template <typename T>
TG_INLINE void generic_grad(Kind kind, T p, const T* g, const T* dist, int64_t rows,
                            int64_t cols, const T* q, const T* k, int64_t D, T* dq, T* dk) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const T gv = g[r * kKeys + c], dv = dist[r * kKeys + c];
      if (gv == 0 || dv == 0) continue;
      for (int64_t d = 0; d < D; ++d) {
        const T x = q[r * D + d] - k[c * D + d];
        if (x == 0) continue;
        const T ax = std::abs(x);
        T w;
        if (kind == kChebyshev) {
          if (ax != dv) continue;
          w = gv;
        } else {
          w = gv * std::pow(ax / dv, p - 1);
        }
        w = x > 0 ? w : -w;
        dq[r * D + d] += w;
        dk[c * D + d] -= w;
      }
    }
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

// ---------------------------------------------------------------------------------------------
// dropout: a counter-based hash of (seed, batch*head, row, key), so the backward regenerates
// the forward's mask exactly, whatever the tiling and whichever thread computes a tile.

TG_INLINE float uniform(uint64_t seed, uint64_t index) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + index;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return float(z >> 40) * (1.0f / 16777216.0f);  // 24 random bits: [0, 1)
}

// ---------------------------------------------------------------------------------------------
// the problem, shared by both passes

template <typename T>
struct Strided {  // a (B, H, T, D) tensor whose last dimension is contiguous
  const T* data;
  int64_t sb, sh, sr, H, D;

  const T* row(int64_t bh, int64_t r) const { return data + bh / H * sb + bh % H * sh + r * sr; }
  // rows [r0, r0 + n) of head bh, contiguous: in place when they are, else copied into buf
  TG_INLINE const T* rows(int64_t bh, int64_t r0, int64_t n, T* buf) const {
    if (sr == D) return row(bh, r0);
    for (int64_t i = 0; i < n; ++i) std::memcpy(buf + i * D, row(bh, r0 + i), sizeof(T) * D);
    return buf;
  }
};

template <typename T>
struct Problem {
  int64_t B, H, Tq, Tk, Tkp, D;  // Tkp: Tk rounded up to kKeys (kt and vt are zero-padded)
  Kind kind;
  T p;
  bool causal;
  int64_t offset;     // Tk - Tq: key c is visible to query r iff c <= r + offset
  // q (B, H, Tq, D), k and v (B, H, Tk, D), each with its own batch, head and row strides
  // (the head dimension contiguous): the model's q, k, v are views of one projection, read
  // in place; a tile's rows are gathered into a buffer when they are not contiguous.
  Strided<T> q, k, v;
  const T* kt;        // (B, H, D, Tkp): k transposed, keys along the lanes
  const T* ksum;      // (B, H, Tkp): sum_d k (l1)
  const T* scale;     // (H,)
  const T* bias;      // additive user mask (B, H, Tq, Tk) by the strides below, or null
  int64_t bs0, bs1, bs2, bs3;
  double dropout_p;  // kept in double: the 1 / (1 - p) rescaling is exact in float64
  uint64_t seed;

  int64_t rows_at(int64_t bh) const { return bh * Tq * D; }  // in our contiguous outputs
  int64_t keys_at(int64_t bh) const { return bh * Tk * D; }
  // keys [0, key_end(r + 1)) are visible to row r
  int64_t key_end(int64_t r1) const { return causal ? std::min(Tk, r1 + offset) : Tk; }
  // the first row that sees key c0
  int64_t row_begin(int64_t c0) const { return causal ? std::max<int64_t>(0, c0 - offset) : 0; }

  // Scores s and distances dist (may be null) of rows [r0, r0 + rows) x keys [c0, c0 + kKeys);
  // masked scores are kMask. For l1, dist leaves out the row constant sum_d q_d.
  // qr: the rows' queries, contiguous (Strided::rows).
  // ktb, ksb: this head's kt and ksum (P.kt, P.ksum, or the task's own copy).
  TG_INLINE void scores(int64_t bh, const T* qr, const T* ktb, const T* ksb, int64_t r0,
                        int64_t rows, int64_t c0, T* s, T* dist) const {
    const T* ktc = ktb + c0;
    const T lam = scale[bh % H];
    const int64_t n = rows * kKeys;
    switch (kind) {
      case kL1: {
        score_tile<T, MinSum>(qr, rows, ktc, Tkp, D, s);
        const T* ks = ksb + c0;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < kKeys; ++c) {
            const T d = ks[c] - 2 * s[r * kKeys + c];
            if (dist) dist[r * kKeys + c] = d;
            s[r * kKeys + c] = -lam * d;
          }
        break;
      }
      case kL2:
        score_tile<T, SqSum>(qr, rows, ktc, Tkp, D, s);
        for (int64_t i = 0; i < n; ++i) s[i] = std::sqrt(s[i]);
        break;
      case kChebyshev:
        score_tile<T, AbsMax>(qr, rows, ktc, Tkp, D, s);
        break;
      case kLp:
        lp_tile<T>(qr, rows, ktc, Tkp, D, p, s);
        if constexpr (std::is_same_v<T, float>) {  // d = (sum)^(1/p) on the lanes
          using V = Vec<float>::type;
          for (int64_t i = 0; i < n; i += Vec<float>::W)
            store(s + i, vpow(load<V>(s + i), 1.0f / p, 0));
        } else {
          for (int64_t i = 0; i < n; ++i) s[i] = std::pow(s[i], T(1) / p);
        }
        break;
    }
    if (kind != kL1) {
      if (dist) std::memcpy(dist, s, sizeof(T) * n);
      for (int64_t i = 0; i < n; ++i) s[i] *= -lam;
    }
    const int64_t b = bh / H, h = bh % H;
    for (int64_t r = 0; r < rows; ++r) {
      T* sr = s + r * kKeys;
      const int64_t visible = std::clamp<int64_t>(key_end(r0 + r + 1) - c0, 0, kKeys);
      for (int64_t c = visible; c < kKeys; ++c) sr[c] = T(kMask);
      if (bias) {
        const T* br = bias + b * bs0 + h * bs1 + (r0 + r) * bs2 + c0 * bs3;
        for (int64_t c = 0; c < visible; ++c) sr[c] = std::max<T>(sr[c] + br[c * bs3], T(kMask));
      }
    }
  }

  // w *= keep / (1 - p) on rows [r0, r0 + rows) x keys [c0, c0 + cols)
  TG_INLINE void drop(int64_t bh, int64_t r0, int64_t rows, int64_t c0, int64_t cols, T* w) const {
    const T inv = T(1) / (T(1) - T(dropout_p));
    for (int64_t r = 0; r < rows; ++r) {
      const uint64_t base = uint64_t((bh * Tq + r0 + r) * Tk + c0);
      for (int64_t c = 0; c < cols; ++c)
        w[r * kKeys + c] *= uniform(seed, base + c) >= dropout_p ? inv : T(0);
    }
  }
};

// xt (D, Tkp) = head bh of x transposed, zero-padded; xsum (Tkp) = sum_d x (if not null)
template <typename T>
TG_INLINE void transpose_head(const Strided<T>& x, int64_t bh, int64_t Tk, int64_t Tkp, T* xt,
                              T* xsum) {
  const int64_t D = x.D;
  for (int64_t c = 0; c < Tkp; ++c) {
    const T* row = c < Tk ? x.row(bh, c) : nullptr;
    T sum = 0;
    for (int64_t d = 0; d < D; ++d) {
      const T value = row ? row[d] : T(0);
      xt[d * Tkp + c] = value;
      sum += value;
    }
    if (xsum) xsum[c] = sum;
  }
}

// ---------------------------------------------------------------------------------------------
// forward: one task per (batch*head, row tile), the heaviest (last rows, causal) first

template <typename T, int NVd>
TG_INLINE void forward_task(const Problem<T>& P, int64_t task, T* out, T* lse) {
  const int64_t BH = P.B * P.H, nrt = (P.Tq + kRows - 1) / kRows;
  const int64_t bh = task % BH, rt = nrt - 1 - task / BH;
  const int64_t r0 = rt * kRows, rows = std::min(kRows, P.Tq - r0), D = P.D;
  alignas(64) T s[kRows * kKeys];
  T m[kRows], l[kRows];
  T* o = out + P.rows_at(bh) + r0 * D;  // accumulated in place
  std::fill(o, o + rows * D, T(0));
  std::fill(m, m + rows, T(kMask));
  std::fill(l, l + rows, T(0));
  std::vector<T> qbuf(kRows * D), vbuf(kKeys * D), own_kt, own_ksum;
  const T* qr = P.q.rows(bh, r0, rows, qbuf.data());
  const T* ktb = P.kt ? P.kt + bh * D * P.Tkp : nullptr;
  const T* ksb = P.kt ? P.ksum + bh * P.Tkp : nullptr;
  if (!ktb) {  // one task per head (short queries, e.g. decoding): transpose k right here
    own_kt.resize(D * P.Tkp), own_ksum.resize(P.Tkp);
    transpose_head(P.k, bh, P.Tk, P.Tkp, own_kt.data(), own_ksum.data());
    ktb = own_kt.data(), ksb = own_ksum.data();
  }
  const int64_t kend = P.key_end(r0 + rows);
  for (int64_t c0 = 0; c0 < kend; c0 += kKeys) {
    const int64_t cols = std::min(kKeys, P.Tk - c0);
    P.scores(bh, qr, ktb, ksb, r0, rows, c0, s, nullptr);
    for (int64_t r = 0; r < rows; ++r) {  // online softmax
      T* sr = s + r * kKeys;
      const T mx = row_max(sr, m[r]);
      const T alpha = std::exp(m[r] - mx);
      l[r] = l[r] * alpha + exp_row(sr, mx);
      m[r] = mx;
      if (alpha != T(1))
        for (int64_t d = 0; d < D; ++d) o[r * D + d] *= alpha;
    }
    if (P.dropout_p > 0) P.drop(bh, r0, rows, c0, cols, s);  // on what reaches v, not on l
    rows_acc<T, NVd>(s, rows, cols, P.v.rows(bh, c0, cols, vbuf.data()), D, o);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const bool dead = m[r] < T(kDeadRow);  // every key masked: zeros, and no gradient
    const T inv = dead ? T(0) : T(1) / l[r];
    for (int64_t d = 0; d < D; ++d) o[r * D + d] *= inv;
    lse[bh * P.Tq + r0 + r] = dead ? T(-kMask) : m[r] + std::log(l[r]);
  }
}

// ---------------------------------------------------------------------------------------------
// backward: one task per (batch*head, group of key tiles); a task owns dk and dv of its key
// tiles. More than one group only when batch*head gives fewer tasks than threads: each group
// then accumulates dq in a buffer of its own, summed afterwards.

template <typename T>
struct Grads {
  Strided<T> dout, out;  // (B, H, Tq, D)
  const T* lse;    // (B, H, Tq)
  const T* vt;     // (B, H, D, Tkp): v transposed
  T* dq;           // (groups, B, H, Tq, D); l1: sum dS [q < k], scaled by 2 lambda afterwards
  T* dk;           // (B, H, Tk, D)
  T* dv;           // (B, H, Tk, D)
  T* dscale;       // (groups, B, H)
  const T* scale2;  // l1: 2 lambda per head, applied to this task's dq when it owns it
  int64_t groups;
};

template <typename T, int NVd>
TG_INLINE void backward_task(const Problem<T>& P, const Grads<T>& G, int64_t task) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  const int64_t BH = P.B * P.H, D = P.D;
  const int64_t bh = task % BH, group = task / BH;
  const int64_t nkt = (P.Tk + kKeys - 1) / kKeys;
  alignas(64) T s[kRows * kKeys], dist[kRows * kKeys], dp[kRows * kKeys], pd[kRows * kKeys];
  std::vector<T> dk_acc(kKeys * D), dv_acc(kKeys * D);
  std::vector<T> qbuf(kRows * D), kbuf(kKeys * D), dobuf(kRows * D), obuf(kRows * D);
  alignas(64) T colsum[kKeys], delta[kRows];
  const T lam = P.scale[bh % P.H];
  T* dq = G.dq + (group * BH + bh) * P.Tq * D;
  double dscale = 0;  // a sum of many terms that cancel: double, even for float
  for (int64_t ti = group; ti < nkt; ti += G.groups) {
    const int64_t c0 = ti * kKeys, cols = std::min(kKeys, P.Tk - c0);
    const T* kc = P.k.rows(bh, c0, cols, kbuf.data());
    std::fill(dk_acc.begin(), dk_acc.end(), T(0));
    std::fill(dv_acc.begin(), dv_acc.end(), T(0));
    std::fill(colsum, colsum + kKeys, T(0));
    for (int64_t r0 = P.row_begin(c0); r0 < P.Tq; r0 += kRows) {
      const int64_t rows = std::min(kRows, P.Tq - r0);
      const T* qr = P.q.rows(bh, r0, rows, qbuf.data());
      const T* dor = G.dout.rows(bh, r0, rows, dobuf.data());
      const T* orow = G.out.rows(bh, r0, rows, obuf.data());
      for (int64_t r = 0; r < rows; ++r) {  // delta = dO . O (holds with dropout too)
        T acc = 0;
        for (int64_t d = 0; d < D; ++d) acc += dor[r * D + d] * orow[r * D + d];
        delta[r] = acc;
      }
      P.scores(bh, qr, P.kt + bh * D * P.Tkp, P.ksum + bh * P.Tkp, r0, rows, c0, s, dist);
      for (int64_t r = 0; r < rows; ++r)  // probabilities from the saved log-sum-exp
        exp_row(s + r * kKeys, G.lse[bh * P.Tq + r0 + r]);
      score_tile<T, Dot>(dor, rows, G.vt + bh * D * P.Tkp + c0, P.Tkp, D, dp);  // dP = dO v^T
      if (P.dropout_p > 0) {  // dv sees the dropped weights; dP passes through the same mask
        std::memcpy(pd, s, sizeof(T) * rows * kKeys);
        P.drop(bh, r0, rows, c0, cols, pd);
        P.drop(bh, r0, rows, c0, cols, dp);
        cols_acc<T, NVd>(pd, rows, cols, dor, D, dv_acc.data());
      } else {
        cols_acc<T, NVd>(s, rows, cols, dor, D, dv_acc.data());
      }
      // dS = P (dP - delta), in s (zero on the padded keys); dscale -= dS . dist
      for (int64_t r = 0; r < rows; ++r) {
        const V dl = splat<V>(delta[r]);
        V row{};
        for (int64_t c = 0; c < kKeys; c += W) {
          const int64_t i = r * kKeys + c;
          V ds = load<V>(s + i) * (load<V>(dp + i) - dl);
          store(s + i, ds);
          row -= ds * load<V>(dist + i);
        }
        dscale += hsum<T>(row);
        for (int64_t c = cols; c < kKeys; ++c) s[r * kKeys + c] = 0;
      }
      if (P.kind == kL1) {  // dq += sum dS m (times 2 lam later); dk: lam colsum - 2 lam sum dS m
        l1_grad<T, NVd>(s, rows, cols, qr, kc, D, dq + r0 * D, dk_acc.data());
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < kKeys; ++c) colsum[c] += s[r * kKeys + c];
      } else if (P.kind == kL2) {
        // w = (dL/d dist) / dist = -lam dS / dist: dq_r += sum_c w (q_r - k_c), dk_c the
        // negative: rowsum(w) q_r - (W K)_r and colsum(w) k_c - (W^T Q)_c, two products
        T rowsum[kRows];
        for (int64_t r = 0; r < rows; ++r) {
          T acc = 0;
          for (int64_t c = 0; c < kKeys; ++c) {
            const int64_t i = r * kKeys + c;
            const T w = dist[i] > 0 ? -lam * s[i] / dist[i] : T(0);
            acc += w;
            colsum[c] += w;
            s[i] = -w;
          }
          rowsum[r] = acc;
        }
        T* dqr = dq + r0 * D;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t d = 0; d < D; ++d) dqr[r * D + d] += rowsum[r] * qr[r * D + d];
        rows_acc<T, NVd>(s, rows, cols, kc, D, dqr);
        cols_acc<T, NVd>(s, rows, cols, qr, D, dk_acc.data());
      } else {
        for (int64_t i = 0; i < rows * kKeys; ++i) s[i] *= -lam;  // dL/d dist
        if (P.kind == kChebyshev && NVd > 0)
          chebyshev_grad<T, NVd>(s, dist, rows, cols, qr, kc, D, dq + r0 * D, dk_acc.data());
        else if constexpr (std::is_same_v<T, float> && NVd > 0)
          lp_grad(P.p, s, dist, rows, cols, qr, kc, D, dq + r0 * D, dk_acc.data());
        else
          generic_grad<T>(P.kind, P.p, s, dist, rows, cols, qr, kc, D, dq + r0 * D,
                          dk_acc.data());
      }
    }
    T* dkc = G.dk + P.keys_at(bh) + c0 * D;
    T* dvc = G.dv + P.keys_at(bh) + c0 * D;
    for (int64_t c = 0; c < cols; ++c)
      for (int64_t d = 0; d < D; ++d) {
        const T a = dk_acc[c * D + d];
        T x = a;
        if (P.kind == kL1) x = lam * colsum[c] - 2 * lam * a;
        if (P.kind == kL2) x = a + colsum[c] * kc[c * D + d];
        dkc[c * D + d] = x;
        dvc[c * D + d] = dv_acc[c * D + d];
      }
  }
  if (P.kind == kL1 && G.groups == 1) {  // this task owns every row of its dq
    const T f = G.scale2[bh % P.H];
    for (int64_t i = 0; i < P.Tq * D; ++i) dq[i] *= f;
  }
  G.dscale[group * BH + bh] = T(dscale);
}

// ---------------------------------------------------------------------------------------------
// entry points compiled per instruction set: the head dimension picks the vector variant

// NVd: the head dimension in vectors, 0 when it is not a multiple of the width (plain loops).
// A switch, not a lambda: the loops must be inlined into each instruction-set clone.
// float: D = 16, 32, 64, 128; double (tests): D = 8.
template <typename T>
int64_t width_case(int64_t D) {
  constexpr int W = Vec<T>::W;
  const int64_t n = D % W ? 0 : D / W;
  if (sizeof(T) == 8) return n == 1 ? 1 : 0;
  return n == 1 || n == 2 || n == 4 || n == 8 ? n : 0;
}

#define TG_BY_WIDTH(T, D, ...)                           \
  switch (width_case<T>(D)) {                            \
    case 1: { constexpr int NVd = 1; __VA_ARGS__; } break;      \
    case 2: if constexpr (sizeof(T) == 4) { constexpr int NVd = 2; __VA_ARGS__; } break; \
    case 4: if constexpr (sizeof(T) == 4) { constexpr int NVd = 4; __VA_ARGS__; } break; \
    case 8: if constexpr (sizeof(T) == 4) { constexpr int NVd = 8; __VA_ARGS__; } break; \
    default: { constexpr int NVd = 0; __VA_ARGS__; } break;     \
  }

#define TG_ENTRY_POINTS(T, SUFFIX, CLONES)                                                    \
  CLONES void forward_tasks_##SUFFIX(const Problem<T>& P, int64_t begin, int64_t end,      \
                                        T* out, T* lse) {                                     \
    TG_BY_WIDTH(T, P.D, for (int64_t t = begin; t < end; ++t)                                 \
                            forward_task<T, NVd>(P, t, out, lse))                             \
  }                                                                                           \
  CLONES void backward_tasks_##SUFFIX(const Problem<T>& P, const Grads<T>& G,              \
                                         int64_t begin, int64_t end) {                        \
    TG_BY_WIDTH(T, P.D, for (int64_t t = begin; t < end; ++t) backward_task<T, NVd>(P, G, t)) \
  }
TG_ENTRY_POINTS(float, f32, TG_CLONES)
TG_ENTRY_POINTS(double, f64, )  // float64 serves tests and gradcheck: one build, less compiling

void forward_tasks(const Problem<float>& P, int64_t b, int64_t e, float* o, float* l) {
  forward_tasks_f32(P, b, e, o, l);
}
void forward_tasks(const Problem<double>& P, int64_t b, int64_t e, double* o, double* l) {
  forward_tasks_f64(P, b, e, o, l);
}
void backward_tasks(const Problem<float>& P, const Grads<float>& G, int64_t b, int64_t e) {
  backward_tasks_f32(P, G, b, e);
}
void backward_tasks(const Problem<double>& P, const Grads<double>& G, int64_t b, int64_t e) {
  backward_tasks_f64(P, G, b, e);
}

// Tasks from a shared counter, one parallel region: a thread that is descheduled (another
// process on its core) takes fewer tasks instead of holding the others at a barrier.
template <typename F>
void run_tasks(int64_t n, const F& f) {
  std::atomic<int64_t> next{0};
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t t = next++; t < n; t = next++) f(t);
  });
}

// ---------------------------------------------------------------------------------------------
// host side

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The head dimension must be contiguous; anything else about the layout is read as it is.
at::Tensor rows_contiguous(const at::Tensor& x) { return x.stride(3) == 1 ? x : x.contiguous(); }

template <typename T>
Strided<T> strided(const at::Tensor& x) {
  return {x.data_ptr<T>(), x.stride(0), x.stride(1), x.stride(2), x.size(1), x.size(3)};
}

// xt (B, H, D, Tkp) = x transposed, zero-padded; xsum (B, H, Tkp) = sum_d x (if not null):
// one task per head, in the kernel's own parallel region (no ATen copies).
template <typename T>
void transpose_keys(const Strided<T>& x, int64_t BH, int64_t Tk, int64_t Tkp, T* xt, T* xsum) {
  run_tasks(BH, [&](int64_t bh) {
    transpose_head(x, bh, Tk, Tkp, xt + bh * x.D * Tkp, xsum ? xsum + bh * Tkp : nullptr);
  });
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& scale, int64_t kind) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be (B, H, T, D)");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "the native kernel takes float32 or float64, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k, v must share a dtype");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "the native kernel runs on the CPU");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3) &&
                  v.sizes() == k.sizes(),
              "k, v must be (B, H, Tk, D) matching q");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == q.size(1), "scale must be (H,)");
  TORCH_CHECK(kind >= kL1 && kind <= kLp, "unknown kind ", kind);
}

template <typename T>
Problem<T> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const T* kt, const T* ksum, int64_t Tkp, const at::Tensor& scale,
                        const std::optional<at::Tensor>& bias, int64_t kind, double p,
                        bool causal, double dropout_p, int64_t seed) {
  Problem<T> P{};
  P.B = q.size(0), P.H = q.size(1), P.Tq = q.size(2), P.Tk = k.size(2), P.D = q.size(3);
  P.Tkp = Tkp;
  P.kind = Kind(kind), P.p = T(p), P.causal = causal, P.offset = P.Tk - P.Tq;
  P.q = strided<T>(q), P.k = strided<T>(k), P.v = strided<T>(v);
  P.kt = kt, P.ksum = ksum, P.scale = scale.data_ptr<T>();
  if (bias) {
    P.bias = bias->data_ptr<T>();
    P.bs0 = bias->stride(0), P.bs1 = bias->stride(1), P.bs2 = bias->stride(2);
    P.bs3 = bias->stride(3);
  }
  P.dropout_p = dropout_p, P.seed = uint64_t(seed);
  return P;
}

std::optional<at::Tensor> expanded_bias(const std::optional<at::Tensor>& bias,
                                        const at::Tensor& q, int64_t Tk) {
  if (!bias) return std::nullopt;
  return bias->to(q.scalar_type()).expand({q.size(0), q.size(1), q.size(2), Tk});
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q_, const at::Tensor& k_,
                                           const at::Tensor& v_, const at::Tensor& scale_,
                                           int64_t kind, double p, bool causal,
                                           const std::optional<at::Tensor>& bias_,
                                           double dropout_p, int64_t seed) {
  check_inputs(q_, k_, v_, scale_, kind);
  const at::Tensor q = rows_contiguous(q_), k = rows_contiguous(k_), v = rows_contiguous(v_);
  const at::Tensor scale = scale_.to(q.scalar_type()).contiguous();
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Tk = k.size(2), D = q.size(3);
  TORCH_CHECK(!causal || Tk >= Tq, "causal attention needs Tk >= Tq");
  const int64_t Tkp = round_up(std::max<int64_t>(Tk, 1), kKeys);
  const auto bias = expanded_bias(bias_, q, Tk);
  at::Tensor out = at::empty({B, H, Tq, D}, q.options());
  at::Tensor lse = at::empty({B, H, Tq}, q.options());
  if (q.numel() == 0 || Tk == 0) return {out.zero_(), lse.fill_(-kMask)};
  // Decoding (a few queries, one task per head): each task transposes its own keys, saving a
  // parallel region per call; otherwise the heads' row tiles share one transposition.
  const bool shared_keys = Tq > kDecodeRows;
  at::Tensor kt, ksum;
  if (shared_keys)
    kt = at::empty({B, H, D, Tkp}, q.options()), ksum = at::empty({B, H, Tkp}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "distance_attention_forward", [&] {
    scalar_t* kt_data = shared_keys ? kt.data_ptr<scalar_t>() : nullptr;
    scalar_t* ksum_data = shared_keys ? ksum.data_ptr<scalar_t>() : nullptr;
    if (shared_keys) transpose_keys(strided<scalar_t>(k), B * H, Tk, Tkp, kt_data, ksum_data);
    const auto P = make_problem<scalar_t>(q, k, v, kt_data, ksum_data, Tkp, scale, bias, kind,
                                          p, causal, dropout_p, seed);
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* l = lse.data_ptr<scalar_t>();
    run_tasks(B * H * ((Tq + kRows - 1) / kRows),
              [&](int64_t t) { forward_tasks(P, t, t + 1, o, l); });
  });
  return {out, lse};
}

// Returns dq, dk, dv and dscale summed over the batch, (H,).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, const at::Tensor& scale_, int64_t kind,
    double p, bool causal, const std::optional<at::Tensor>& bias_, double dropout_p,
    int64_t seed) {
  check_inputs(q_, k_, v_, scale_, kind);
  const at::Tensor q = rows_contiguous(q_), k = rows_contiguous(k_), v = rows_contiguous(v_);
  const at::Tensor dout = rows_contiguous(dout_.to(q.scalar_type()));
  const at::Tensor out = rows_contiguous(out_.to(q.scalar_type()));
  const at::Tensor lse = lse_.contiguous();
  const at::Tensor scale = scale_.to(q.scalar_type()).contiguous();
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Tk = k.size(2), D = q.size(3);
  const int64_t Tkp = round_up(std::max<int64_t>(Tk, 1), kKeys), BH = B * H;
  const auto bias = expanded_bias(bias_, q, Tk);
  const int64_t threads = at::get_num_threads(), nkt = (Tk + kKeys - 1) / kKeys;
  const int64_t groups =
      BH >= 2 * threads ? 1 : std::clamp<int64_t>((2 * threads + BH - 1) / BH, 1, nkt);
  at::Tensor dq = at::zeros({groups, B, H, Tq, D}, q.options());
  at::Tensor dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  at::Tensor dscale = at::zeros({groups, B, H}, q.options());
  if (q.numel() == 0 || Tk == 0) return {dq.sum(0), dk.zero_(), dv.zero_(), dscale.sum({0, 1})};
  const at::Tensor scale2 = scale * 2;
  at::Tensor kt = at::empty({B, H, D, Tkp}, q.options()), ksum = at::empty({B, H, Tkp}, q.options());
  at::Tensor vt = at::empty({B, H, D, Tkp}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "distance_attention_backward", [&] {
    transpose_keys(strided<scalar_t>(k), BH, Tk, Tkp, kt.data_ptr<scalar_t>(),
                   ksum.data_ptr<scalar_t>());
    transpose_keys(strided<scalar_t>(v), BH, Tk, Tkp, vt.data_ptr<scalar_t>(),
                   static_cast<scalar_t*>(nullptr));
    const auto P = make_problem<scalar_t>(q, k, v, kt.data_ptr<scalar_t>(),
                                          ksum.data_ptr<scalar_t>(), Tkp, scale, bias, kind, p,
                                          causal, dropout_p, seed);
    Grads<scalar_t> G{strided<scalar_t>(dout), strided<scalar_t>(out),
                      lse.data_ptr<scalar_t>(),  vt.data_ptr<scalar_t>(),
                      dq.data_ptr<scalar_t>(),   dk.data_ptr<scalar_t>(),
                      dv.data_ptr<scalar_t>(),   dscale.data_ptr<scalar_t>(),
                      scale2.data_ptr<scalar_t>(), groups};
    run_tasks(groups * BH, [&](int64_t t) { backward_tasks(P, G, t, t + 1); });
  });
  at::Tensor dq_sum = dq.select(0, 0);  // l1 with one group: already times 2 lambda
  if (groups > 1) {
    dq_sum = dq.sum(0);
    if (kind == kL1) dq_sum.mul_(scale2.view({1, H, 1, 1}));
  }
  return {dq_sum, dk, dv, dscale.sum({0, 1})};
}

// The dropout keep-mask (1 = kept) the kernel uses for a seed: for tests and analysis.
at::Tensor dropout_keep(int64_t seed, int64_t B, int64_t H, int64_t Tq, int64_t Tk, double p) {
  at::Tensor keep = at::empty({B, H, Tq, Tk}, at::kFloat);
  float* out = keep.data_ptr<float>();
  for (int64_t i = 0; i < keep.numel(); ++i)
    out[i] = uniform(uint64_t(seed), uint64_t(i)) >= p ? 1.0f : 0.0f;  // as Problem::drop
  return keep;
}

}  // namespace
}  // namespace truthgpt_native

TORCH_LIBRARY(truthgpt, m) {
  m.def(
      "distance_attention_forward(Tensor q, Tensor k, Tensor v, Tensor scale, int kind, "
      "float p, bool causal, Tensor? bias, float dropout_p, int seed) -> (Tensor, Tensor)");
  m.def(
      "distance_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor scale, int kind, float p, bool causal, Tensor? bias, float dropout_p, "
      "int seed) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("dropout_keep(int seed, int B, int H, int Tq, int Tk, float p) -> Tensor",
        &truthgpt_native::dropout_keep);
}

TORCH_LIBRARY_IMPL(truthgpt, CPU, m) {
  m.impl("distance_attention_forward", &truthgpt_native::forward);
  m.impl("distance_attention_backward", &truthgpt_native::backward);
}

// Importing the module registers the operators above under torch.ops.truthgpt.
extern "C" PyMODINIT_FUNC PyInit__native(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native",
                               "Native CPU kernels of truthgpt (torch.ops.truthgpt)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
