// Distance attention on the CPU: scores -lambda_h * d(q_i, k_j) for d in l1, l2, chebyshev, lp,
// plus ALiBi's -m_h |i - j| when slopes are given (computed from the indices in each tile).
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
// Vector code uses GCC vector extensions, as wide as the registers (TG_VEC_BYTES), and is
// compiled for AVX-512, AVX2 and baseline x86-64, each in its own translation unit (isa_*.cpp,
// built in parallel); the first call picks the one the CPU runs.
// No floating-point environment is changed (no fast-math flags: subnormals survive).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "tasks.h"

namespace truthgpt_native {
namespace {

// ---------------------------------------------------------------------------------------------
// the task loops of the instruction set the CPU runs (tasks.h)

struct F32Tasks {
  decltype(&forward_tasks_f32) forward;
  decltype(&backward_tasks_f32) backward;
};

// Picked on the first call, best first, as the loader picks among target_clones.
const F32Tasks& f32_tasks() {
  static const F32Tasks tasks = [] {
#if TG_ISA_VARIANTS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4"))
      return F32Tasks{forward_tasks_f32_v4, backward_tasks_f32_v4};
    if (__builtin_cpu_supports("x86-64-v3"))
      return F32Tasks{forward_tasks_f32_v3, backward_tasks_f32_v3};
#endif
    return F32Tasks{forward_tasks_f32, backward_tasks_f32};
  }();
  return tasks;
}

void forward_tasks(const Problem<float>& P, int64_t b, int64_t e, float* o, float* l) {
  f32_tasks().forward(P, b, e, o, l);
}
void forward_tasks(const Problem<double>& P, int64_t b, int64_t e, double* o, double* l) {
  forward_tasks_f64(P, b, e, o, l);
}
void backward_tasks(const Problem<float>& P, const Grads<float>& G, int64_t b, int64_t e) {
  f32_tasks().backward(P, G, b, e);
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

// xt (B, H, Tkp / kKeys, D, kKeys) = x transposed tile by tile, zero-padded; xsum (B, H, Tkp) =
// sum_d x (if not null): one task per head, in the kernel's own parallel region (no ATen copies).
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
  TORCH_CHECK(known_kind(kind), "unknown kind code ", kind, " (kinds: l1 ", int64_t(kL1),
              ", l2 ", int64_t(kL2), ", chebyshev ", int64_t(kChebyshev), ", lp ", int64_t(kLp),
              ")");
}

// ALiBi slopes (H,) in q's dtype, or an undefined tensor
at::Tensor slopes_of(const std::optional<at::Tensor>& alibi, const at::Tensor& q) {
  if (!alibi) return {};
  TORCH_CHECK(alibi->dim() == 1 && alibi->size(0) == q.size(1), "alibi must be (H,)");
  return alibi->to(q.scalar_type()).contiguous();
}

template <typename T>
Problem<T> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const T* kt, const T* ksum, int64_t Tkp, const at::Tensor& scale,
                        const std::optional<at::Tensor>& bias, const at::Tensor& alibi,
                        int64_t kind, double p, bool causal, double dropout_p, int64_t seed) {
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
  P.alibi = alibi.defined() ? alibi.data_ptr<T>() : nullptr;
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
                                           double dropout_p, int64_t seed,
                                           const std::optional<at::Tensor>& alibi_) {
  check_inputs(q_, k_, v_, scale_, kind);
  const at::Tensor q = rows_contiguous(q_), k = rows_contiguous(k_), v = rows_contiguous(v_);
  const at::Tensor scale = scale_.to(q.scalar_type()).contiguous();
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Tk = k.size(2), D = q.size(3);
  TORCH_CHECK(!causal || Tk >= Tq, "causal attention needs Tk >= Tq");
  const int64_t Tkp = round_up(std::max<int64_t>(Tk, 1), kKeys);
  const auto bias = expanded_bias(bias_, q, Tk);
  const at::Tensor alibi = slopes_of(alibi_, q);
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
    const auto P = make_problem<scalar_t>(q, k, v, kt_data, ksum_data, Tkp, scale, bias, alibi,
                                          kind, p, causal, dropout_p, seed);
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* l = lse.data_ptr<scalar_t>();
    run_tasks(B * H * ((Tq + kForwardRows - 1) / kForwardRows),
              [&](int64_t t) { forward_tasks(P, t, t + 1, o, l); });
  });
  return {out, lse};
}

// Returns dq, dk, dv and dscale summed over the batch, (H,).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, const at::Tensor& scale_, int64_t kind,
    double p, bool causal, const std::optional<at::Tensor>& bias_, double dropout_p,
    int64_t seed, const std::optional<at::Tensor>& alibi_) {
  check_inputs(q_, k_, v_, scale_, kind);
  const at::Tensor q = rows_contiguous(q_), k = rows_contiguous(k_), v = rows_contiguous(v_);
  const at::Tensor dout = rows_contiguous(dout_.to(q.scalar_type()));
  const at::Tensor out = rows_contiguous(out_.to(q.scalar_type()));
  const at::Tensor lse = lse_.contiguous();
  const at::Tensor scale = scale_.to(q.scalar_type()).contiguous();
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Tk = k.size(2), D = q.size(3);
  const int64_t Tkp = round_up(std::max<int64_t>(Tk, 1), kKeys), BH = B * H;
  const auto bias = expanded_bias(bias_, q, Tk);
  const at::Tensor alibi = slopes_of(alibi_, q);
  const int64_t threads = at::get_num_threads(), nkt = (Tk + kKeys - 1) / kKeys;
  const int64_t groups =
      BH >= 2 * threads ? 1 : std::clamp<int64_t>((2 * threads + BH - 1) / BH, 1, nkt);
  at::Tensor dq = at::zeros({groups, B, H, Tq, D}, q.options());
  at::Tensor dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  at::Tensor dscale = at::zeros({groups, B, H}, q.options());
  if (q.numel() == 0 || Tk == 0) return {dq.sum(0), dk.zero_(), dv.zero_(), dscale.sum({0, 1})};
  const at::Tensor scale2 = scale * 2;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "distance_attention_backward", [&] {
    // no shared transposition: each task transposes its own key tiles (passes.h)
    const auto P = make_problem<scalar_t>(q, k, v, nullptr, nullptr, Tkp, scale, bias, alibi,
                                          kind, p, causal, dropout_p, seed);
    Grads<scalar_t> G{strided<scalar_t>(dout), strided<scalar_t>(out),
                      lse.data_ptr<scalar_t>(),
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
      "float p, bool causal, Tensor? bias, float dropout_p, int seed, Tensor? alibi=None) -> "
      "(Tensor, Tensor)");
  m.def(
      "distance_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor scale, int kind, float p, bool causal, Tensor? bias, float dropout_p, "
      "int seed, Tensor? alibi=None) -> (Tensor, Tensor, Tensor, Tensor)");
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
