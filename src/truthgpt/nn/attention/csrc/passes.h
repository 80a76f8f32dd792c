// One task of each pass: the forward over a row tile, the backward over a group of key tiles.
#pragma once

#include <vector>

#include "tiles.h"

namespace truthgpt_native {

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
  // (B, H, Tkp / kKeys, D, kKeys): k transposed tile by tile, keys along the lanes (forward; or
  // null). Tile-major: a (D, Tk) transpose would put a tile's D rows Tk floats apart, at long
  // power-of-two lengths all in the same L1 sets, which thrashes them.
  const T* kt;
  const T* ksum;      // (B, H, Tkp): sum_d k (l1)
  const T* scale;     // (H,)
  const T* bias;      // additive user mask (B, H, Tq, Tk) by the strides below, or null
  int64_t bs0, bs1, bs2, bs3;
  const T* alibi;     // (H,) ALiBi slopes m: scores get -m_h |i - j| (i = row + offset), or null
  double dropout_p;  // kept in double: the 1 / (1 - p) rescaling is exact in float64
  uint64_t seed;

  int64_t rows_at(int64_t bh) const { return bh * Tq * D; }  // in our contiguous outputs
  int64_t keys_at(int64_t bh) const { return bh * Tk * D; }
  // keys [0, key_end(r + 1)) are visible to row r
  int64_t key_end(int64_t r1) const { return causal ? std::min(Tk, r1 + offset) : Tk; }
  // the first row that sees key c0
  int64_t row_begin(int64_t c0) const { return causal ? std::max<int64_t>(0, c0 - offset) : 0; }

  // Scores s and distances dist (may be null) of rows [r0, r0 + rows) x keys [c0, c0 + kKeys);
  // masked scores are kMask. dist is the distance alone, without ALiBi's term (dscale needs
  // the score's derivative in lambda, which the term does not have). For l1, dist leaves out
  // the row constant sum_d q_d.
  // qr: the rows' queries, contiguous (Strided::rows).
  // ktc: the tile's keys transposed (D rows, ldk apart, from key c0 on); ksc: their sums.
  TG_INLINE void scores(int64_t bh, const T* qr, const T* ktc, int64_t ldk, const T* ksc,
                        int64_t r0, int64_t rows, int64_t c0, T* s, T* dist) const {
    const T lam = scale[bh % H];
    const int64_t n = rows * kKeys;
    switch (kind) {
      case kL1: {
        score_tile<T, MinSum>(qr, rows, ktc, ldk, D, s);
        const T* ks = ksc;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < kKeys; ++c) {
            const T d = ks[c] - 2 * s[r * kKeys + c];
            if (dist) dist[r * kKeys + c] = d;
            s[r * kKeys + c] = -lam * d;
          }
        break;
      }
      case kL2:
        score_tile<T, SqSum>(qr, rows, ktc, ldk, D, s);
        for (int64_t i = 0; i < n; ++i) s[i] = std::sqrt(s[i]);
        break;
      case kChebyshev:
        score_tile<T, AbsMax>(qr, rows, ktc, ldk, D, s);
        break;
      case kLp:
        lp_tile<T>(qr, rows, ktc, ldk, D, p, s);
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
    finish(bh, r0, rows, c0, s);
  }

  // Whether decode_scores serves this problem's kind (lp takes the transposed path).
  bool decodes_in_place() const { return kind == kL1 || kind == kL2 || kind == kChebyshev; }

  // scores for a decoding step (a few rows), the keys kc (rows D apart, cols of them) read in
  // place. Same scores as scores(): l1 leaves out sum_d q_d here too (the backward recomputes
  // through scores() from the log-sum-exp saved here).
  template <int NVd>
  TG_INLINE void decode_scores(int64_t bh, const T* qr, int64_t r0, int64_t rows, int64_t c0,
                               const T* kc, int64_t cols, T* s) const {
    const T lam = scale[bh % H];
    const int64_t n = rows * kKeys;
    if (kind == kL1) {
      key_rows_tile<T, NVd, AbsSum, false>(qr, rows, kc, cols, D, s);
      for (int64_t r = 0; r < rows; ++r) {
        T qsum = 0;
        for (int64_t d = 0; d < D; ++d) qsum += qr[r * D + d];
        for (int64_t c = 0; c < kKeys; ++c) s[r * kKeys + c] = -lam * (s[r * kKeys + c] - qsum);
      }
    } else {
      if (kind == kL2) {
        key_rows_tile<T, NVd, SqSum, false>(qr, rows, kc, cols, D, s);
        for (int64_t i = 0; i < n; ++i) s[i] = std::sqrt(s[i]);
      } else {
        key_rows_tile<T, NVd, AbsMax, true>(qr, rows, kc, cols, D, s);
      }
      for (int64_t i = 0; i < n; ++i) s[i] *= -lam;
    }
    finish(bh, r0, rows, c0, s);
  }

  // The position term, the causal mask and the user's mask on a tile of -lambda d.
  TG_INLINE void finish(int64_t bh, int64_t r0, int64_t rows, int64_t c0, T* s) const {
    const int64_t b = bh / H, h = bh % H;
    // ALiBi from the indices: the row's position minus the tile's first key, less c (exact in
    // T: positions are far below 2^24). Without slopes the loop is skipped once per row.
    const T slope = alibi ? alibi[h] : T(0);
    for (int64_t r = 0; r < rows; ++r) {
      T* sr = s + r * kKeys;
      const int64_t visible = std::clamp<int64_t>(key_end(r0 + r + 1) - c0, 0, kKeys);
      if (alibi) {
        const T i = T(r0 + r + offset - c0);
        for (int64_t c = 0; c < visible; ++c) sr[c] -= slope * std::abs(i - T(c));
      }
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

// xt (D, kKeys) = keys [c0, c0 + cols) of head bh transposed, zero-padded; xsum (kKeys) = their
// sums (if not null)
template <typename T>
TG_INLINE void transpose_tile(const Strided<T>& x, int64_t bh, int64_t c0, int64_t cols, T* xt,
                              T* xsum) {
  constexpr int64_t kBlock = 16;  // keys at a time: each write fills a cache line, not a word
  const int64_t D = x.D;
  for (int64_t i0 = 0; i0 < kKeys; i0 += kBlock) {
    const T* rows[kBlock];
    for (int64_t i = 0; i < kBlock; ++i) rows[i] = i0 + i < cols ? x.row(bh, c0 + i0 + i) : nullptr;
    for (int64_t d = 0; d < D; ++d) {
      T* out = xt + d * kKeys + i0;
      for (int64_t i = 0; i < kBlock; ++i) out[i] = rows[i] ? rows[i][d] : T(0);
    }
    if (xsum)
      for (int64_t i = 0; i < kBlock; ++i) {
        T sum = 0;
        for (int64_t d = 0; rows[i] && d < D; ++d) sum += rows[i][d];
        xsum[i0 + i] = sum;
      }
  }
}

// xt (Tkp / kKeys, D, kKeys) = head bh of x transposed tile by tile, zero-padded; xsum (Tkp) =
// sum_d x (if not null)
template <typename T>
TG_INLINE void transpose_head(const Strided<T>& x, int64_t bh, int64_t Tk, int64_t Tkp, T* xt,
                              T* xsum) {
  for (int64_t c0 = 0; c0 < Tkp; c0 += kKeys)  // Tkp is a multiple of kKeys
    transpose_tile(x, bh, c0, std::min(kKeys, Tk - c0), xt + c0 * x.D, xsum ? xsum + c0 : xsum);
}

// ---------------------------------------------------------------------------------------------
// forward: one task per (batch*head, kForwardRows rows), the heaviest (last rows, causal) first

template <typename T, int NVd>
TG_INLINE void forward_task(const Problem<T>& P, int64_t task, T* out, T* lse) {
  const int64_t BH = P.B * P.H, nrt = (P.Tq + kForwardRows - 1) / kForwardRows;
  const int64_t bh = task % BH, rt = nrt - 1 - task / BH;
  const int64_t r0 = rt * kForwardRows, rows = std::min(kForwardRows, P.Tq - r0), D = P.D;
  alignas(64) T s[kForwardRows * kKeys];
  T m[kForwardRows], l[kForwardRows];
  T* o = out + P.rows_at(bh) + r0 * D;  // accumulated in place
  std::fill(o, o + rows * D, T(0));
  std::fill(m, m + rows, T(kMask));
  std::fill(l, l + rows, T(0));
  std::vector<T> qbuf(kForwardRows * D), vbuf(kKeys * D), kbuf, own_kt, own_ksum;
  const T* qr = P.q.rows(bh, r0, rows, qbuf.data());
  const T* ktb = P.kt ? P.kt + bh * D * P.Tkp : nullptr;
  const T* ksb = P.kt ? P.ksum + bh * P.Tkp : nullptr;
  // one task per head (short queries, e.g. decoding): keys read in place (the cache's rows),
  // or, for lp and odd head sizes, transposed right here
  const bool in_place = !ktb && NVd > 0 && P.decodes_in_place();
  if (in_place) {
    kbuf.resize(kKeys * D);
  } else if (!ktb) {
    own_kt.resize(D * P.Tkp), own_ksum.resize(P.Tkp);
    transpose_head(P.k, bh, P.Tk, P.Tkp, own_kt.data(), own_ksum.data());
    ktb = own_kt.data(), ksb = own_ksum.data();
  }
  const int64_t kend = P.key_end(r0 + rows);
  for (int64_t c0 = 0; c0 < kend; c0 += kKeys) {
    const int64_t cols = std::min(kKeys, P.Tk - c0);
    if constexpr (NVd > 0) {
      if (in_place)
        P.template decode_scores<NVd>(bh, qr, r0, rows, c0, P.k.rows(bh, c0, cols, kbuf.data()),
                                      cols, s);
      else
        P.scores(bh, qr, ktb + c0 * D, kKeys, ksb + c0, r0, rows, c0, s, nullptr);
    } else {
      P.scores(bh, qr, ktb + c0 * D, kKeys, ksb + c0, r0, rows, c0, s, nullptr);
    }
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
  std::vector<T> qbuf(kRows * D), kbuf(kKeys * D), dobuf(kRows * D), delta(P.Tq);
  // the task's key tile, k and v transposed: each key tile belongs to one task, so it is
  // transposed once, here, and no (B, H, D, Tk) copy is held
  std::vector<T> kt(D * kKeys), vt(D * kKeys);
  alignas(64) T ksum[kKeys];
  alignas(64) T colsum[kKeys];
  for (int64_t r = 0; r < P.Tq; ++r) {  // delta = dO . O for every row (holds with dropout)
    const T* a = G.dout.row(bh, r);
    const T* b = G.out.row(bh, r);
    T acc[4] = {0, 0, 0, 0};  // four partial sums: no single dependency chain
    int64_t d = 0;
    for (; d + 4 <= D; d += 4)
      for (int i = 0; i < 4; ++i) acc[i] += a[d + i] * b[d + i];
    for (; d < D; ++d) acc[0] += a[d] * b[d];
    delta[r] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  }
  const T lam = P.scale[bh % P.H];
  T* dq = G.dq + (group * BH + bh) * P.Tq * D;
  double dscale = 0;  // a sum of many terms that cancel: double, even for float
  for (int64_t ti = group; ti < nkt; ti += G.groups) {
    const int64_t c0 = ti * kKeys, cols = std::min(kKeys, P.Tk - c0);
    const T* kc = P.k.rows(bh, c0, cols, kbuf.data());
    transpose_tile(P.k, bh, c0, cols, kt.data(), ksum);
    transpose_tile(P.v, bh, c0, cols, vt.data(), static_cast<T*>(nullptr));
    std::fill(dk_acc.begin(), dk_acc.end(), T(0));
    std::fill(dv_acc.begin(), dv_acc.end(), T(0));
    std::fill(colsum, colsum + kKeys, T(0));
    for (int64_t r0 = P.row_begin(c0); r0 < P.Tq; r0 += kRows) {
      const int64_t rows = std::min(kRows, P.Tq - r0);
      const T* qr = P.q.rows(bh, r0, rows, qbuf.data());
      const T* dor = G.dout.rows(bh, r0, rows, dobuf.data());
      P.scores(bh, qr, kt.data(), kKeys, ksum, r0, rows, c0, s, dist);
      for (int64_t r = 0; r < rows; ++r)  // probabilities from the saved log-sum-exp
        exp_row(s + r * kKeys, G.lse[bh * P.Tq + r0 + r]);
      score_tile<T, Dot>(dor, rows, vt.data(), kKeys, D, dp);  // dP = dO v^T
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
        const V dl = splat<V>(delta[r0 + r]);
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


}  // namespace truthgpt_native
