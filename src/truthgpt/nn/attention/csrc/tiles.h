// The micro-kernels of one (kRows x kKeys) tile: scores, the products with the head dimension
// along the lanes, and each kind's gradient loops.
#pragma once

#include <utility>

#include "common.h"

namespace truthgpt_native {

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
  constexpr int W = Vec<T>::W, NV = kKeys / W, NC = NV < kRegVecs ? NV : kRegVecs;
  for (int j0 = 0; j0 < NV; j0 += NC) {  // key chunks of NC vectors: the tile stays in registers
    const T* bj = bt + j0 * W;
    T* oj = out + j0 * W;
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
      V acc[4][NC];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < NC; ++j) acc[i][j] = V{};
      for (int64_t d = 0; d < D; ++d) {
        V b[NC];
        for (int j = 0; j < NC; ++j) b[j] = load<V>(bj + d * ldb + j * W);
        for (int i = 0; i < 4; ++i) {
          V x = splat<V>(a[(r + i) * D + d]);
          for (int j = 0; j < NC; ++j) acc[i][j] = Op::step(acc[i][j], x, b[j]);
        }
      }
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < NC; ++j) store(oj + (r + i) * kKeys + j * W, acc[i][j]);
    }
    for (; r < rows; ++r) {
      V acc[NC];
      for (int j = 0; j < NC; ++j) acc[j] = V{};
      for (int64_t d = 0; d < D; ++d) {
        V x = splat<V>(a[r * D + d]);
        for (int j = 0; j < NC; ++j) acc[j] = Op::step(acc[j], x, load<V>(bj + d * ldb + j * W));
      }
      for (int j = 0; j < NC; ++j) store(oj + r * kKeys + j * W, acc[j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// decoding: scores of a few query rows against keys read in place, (Tk, D) rows with the head
// dimension along the lanes (the cache's layout), instead of a transposed copy of every key
// per step. Each key gives a vector of partial sums; W such vectors fold into one vector of W
// keys' results (W - 1 two-source shuffles), in key order.

// Source lane of output lane o when folding blocks of 2h lanes (one key each, W / 2h keys per
// vector) of x (indices < W) and y (indices >= W) into blocks of h lanes: x's keys, then y's.
constexpr int fold_lane(int W, int h, bool upper, int o) {
  const int t = o / h, per = W / (2 * h);
  return (t < per ? 0 : W) + (t % per) * 2 * h + (upper ? h : 0) + o % h;
}

template <typename VI, int W, int h, bool upper, int... L>
TG_INLINE VI fold_mask(std::integer_sequence<int, L...>) {
  return VI{fold_lane(W, h, upper, L)...};
}

template <typename T, bool Max, int h>
TG_INLINE typename Vec<T>::type fold(typename Vec<T>::type x, typename Vec<T>::type y) {
  using V = typename Vec<T>::type;
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef I VI __attribute__((vector_size(TG_VEC_BYTES)));
  constexpr int W = Vec<T>::W;
  constexpr auto lanes = std::make_integer_sequence<int, W>{};
  const V lo = __builtin_shuffle(x, y, fold_mask<VI, W, h, false>(lanes));
  const V hi = __builtin_shuffle(x, y, fold_mask<VI, W, h, true>(lanes));
  if constexpr (Max) return lo > hi ? lo : hi;
  return lo + hi;
}

// acc[0..W) (one key each, W lanes of partial results) -> one vector of W keys' results
template <typename T, bool Max, int h = Vec<T>::W / 2>
TG_INLINE typename Vec<T>::type fold_keys(typename Vec<T>::type* acc) {
  // 2h vectors in (keys in blocks of 2h lanes), h out
  for (int i = 0; i < h; ++i) acc[i] = fold<T, Max, h>(acc[2 * i], acc[2 * i + 1]);
  if constexpr (h == 1) return acc[0];
  else return fold_keys<T, Max, h / 2>(acc);
}

// out[r][c] = reduce_d op(q[r][d], k[c][d]) for c < cols (0 up to kKeys), k's rows D apart.
template <typename T, int NVd, typename Op, bool Max>
TG_INLINE void key_rows_tile(const T* q, int64_t rows, const T* k, int64_t cols, int64_t D,
                             T* out) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  for (int64_t r = 0; r < rows; ++r) {
    const T* qr = q + r * D;
    for (int64_t c0 = 0; c0 < kKeys; c0 += W) {
      V acc[W];
      for (int i = 0; i < W; ++i) acc[i] = V{};
      if (c0 + W <= cols) {
        for (int j = 0; j < NVd; ++j) {
          const V qv = load<V>(qr + j * W);
          for (int i = 0; i < W; ++i)
            acc[i] = Op::step(acc[i], qv, load<V>(k + (c0 + i) * D + j * W));
        }
      } else {  // the last keys: those past cols stay 0 (the caller masks them)
        for (int i = 0; c0 + i < cols; ++i)
          for (int j = 0; j < NVd; ++j)
            acc[i] = Op::step(acc[i], load<V>(qr + j * W), load<V>(k + (c0 + i) * D + j * W));
      }
      store(out + r * kKeys + c0, fold_keys<T, Max>(acc));
    }
  }
}

struct AbsSum {  // l1 on the lanes of the head dimension: sum_d |a - b|
  template <typename V>
  TG_INLINE static V step(V acc, V a, V b) { return acc + vabs(a - b); }
};

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
  constexpr int W = Vec<T>::W, NC = NVd < kRegVecs ? NVd : kRegVecs;
  if constexpr (NVd == 0) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const T x = w[r * kKeys + c];
        for (int64_t d = 0; d < D; ++d) out[r * D + d] += x * b[c * D + d];
      }
  } else {
    for (int j0 = 0; j0 < NVd; j0 += NC) {  // chunks of NC vectors of the head dimension
      const T* bj = b + j0 * W;
      T* oj = out + j0 * W;
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4) {
        V acc[4][NC];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < NC; ++j) acc[i][j] = load<V>(oj + (r + i) * D + j * W);
        for (int64_t c = 0; c < cols; ++c) {
          V bv[NC];
          for (int j = 0; j < NC; ++j) bv[j] = load<V>(bj + c * D + j * W);
          for (int i = 0; i < 4; ++i) {
            V x = splat<V>(w[(r + i) * kKeys + c]);
            for (int j = 0; j < NC; ++j) acc[i][j] += x * bv[j];
          }
        }
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < NC; ++j) store(oj + (r + i) * D + j * W, acc[i][j]);
      }
      for (; r < rows; ++r) {
        V acc[NC];
        for (int j = 0; j < NC; ++j) acc[j] = load<V>(oj + r * D + j * W);
        for (int64_t c = 0; c < cols; ++c) {
          V x = splat<V>(w[r * kKeys + c]);
          for (int j = 0; j < NC; ++j) acc[j] += x * load<V>(bj + c * D + j * W);
        }
        for (int j = 0; j < NC; ++j) store(oj + r * D + j * W, acc[j]);
      }
    }
  }
}

template <typename T, int NVd>
TG_INLINE void cols_acc(const T* w, int64_t rows, int64_t cols, const T* b, int64_t D, T* out) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W, NC = NVd < kRegVecs ? NVd : kRegVecs;
  if constexpr (NVd == 0) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const T x = w[r * kKeys + c];
        for (int64_t d = 0; d < D; ++d) out[c * D + d] += x * b[r * D + d];
      }
  } else {
    for (int j0 = 0; j0 < NVd; j0 += NC) {  // chunks of NC vectors of the head dimension
      const T* bj = b + j0 * W;
      T* oj = out + j0 * W;
      int64_t c = 0;
      for (; c + 4 <= cols; c += 4) {
        V acc[4][NC];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < NC; ++j) acc[i][j] = load<V>(oj + (c + i) * D + j * W);
        for (int64_t r = 0; r < rows; ++r) {
          V bv[NC];
          for (int j = 0; j < NC; ++j) bv[j] = load<V>(bj + r * D + j * W);
          for (int i = 0; i < 4; ++i) {
            V x = splat<V>(w[r * kKeys + c + i]);
            for (int j = 0; j < NC; ++j) acc[i][j] += x * bv[j];
          }
        }
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < NC; ++j) store(oj + (c + i) * D + j * W, acc[i][j]);
      }
      for (; c < cols; ++c) {
        V acc[NC];
        for (int j = 0; j < NC; ++j) acc[j] = load<V>(oj + c * D + j * W);
        for (int64_t r = 0; r < rows; ++r) {
          V x = splat<V>(w[r * kKeys + c]);
          for (int j = 0; j < NC; ++j) acc[j] += x * load<V>(bj + r * D + j * W);
        }
        for (int j = 0; j < NC; ++j) store(oj + c * D + j * W, acc[j]);
      }
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
    constexpr int NC = NVd < kRegVecs ? NVd : kRegVecs;
    const V zero{};
    for (int j0 = 0; j0 < NVd; j0 += NC) {  // chunks of NC vectors of the head dimension
      const int64_t o = j0 * W;
      int64_t c = 0;
      for (; c + 2 <= cols; c += 2) {
        V k0[NC], k1[NC], a0[NC], a1[NC];
        for (int j = 0; j < NC; ++j) {
          k0[j] = load<V>(k + c * D + o + j * W);
          k1[j] = load<V>(k + (c + 1) * D + o + j * W);
          a0[j] = load<V>(dk_acc + c * D + o + j * W);
          a1[j] = load<V>(dk_acc + (c + 1) * D + o + j * W);
        }
        for (int64_t r = 0; r < rows; ++r) {
          const V g0 = splat<V>(g[r * kKeys + c]), g1 = splat<V>(g[r * kKeys + c + 1]);
          for (int j = 0; j < NC; ++j) {
            const V qv = load<V>(q + r * D + o + j * W);
            const V m0 = qv < k0[j] ? g0 : zero;
            const V m1 = qv < k1[j] ? g1 : zero;
            a0[j] += m0;
            a1[j] += m1;
            T* dqp = dq_acc + r * D + o + j * W;
            store(dqp, load<V>(dqp) + (m0 + m1));
          }
        }
        for (int j = 0; j < NC; ++j) {
          store(dk_acc + c * D + o + j * W, a0[j]);
          store(dk_acc + (c + 1) * D + o + j * W, a1[j]);
        }
      }
      for (; c < cols; ++c) {
        V k0[NC], a0[NC];
        for (int j = 0; j < NC; ++j) {
          k0[j] = load<V>(k + c * D + o + j * W);
          a0[j] = load<V>(dk_acc + c * D + o + j * W);
        }
        for (int64_t r = 0; r < rows; ++r) {
          const V g0 = splat<V>(g[r * kKeys + c]);
          for (int j = 0; j < NC; ++j) {
            const V m0 = load<V>(q + r * D + o + j * W) < k0[j] ? g0 : zero;
            a0[j] += m0;
            T* dqp = dq_acc + r * D + o + j * W;
            store(dqp, load<V>(dqp) + m0);
          }
        }
        for (int j = 0; j < NC; ++j) store(dk_acc + c * D + o + j * W, a0[j]);
      }
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


}  // namespace truthgpt_native
