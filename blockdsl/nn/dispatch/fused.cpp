// The "fused" expert dispatch for CPUs: every expert's rows are gathered, pushed through both
// matmuls and the activation, gated and scattered back one L2-sized tile at a time; and the
// token-choice router's softmax and top-k in one pass.
//
// Why: at the search's scale (1024 tokens, 8 experts of d = d_ff = 48) a routed FFN slot
// cost ~2.8x the dense FFN of equal FLOPs when written as whole-array tensor ops ("bmm"),
// and the time was not the matmuls: each whole-array pass ([M, d] gathers, products, gate
// scalings, scatters) streams a fresh buffer through memory, and on a shared VM an op on
// cold memory runs 1.5-3x slower than on warm (measured: gelu_backward 94 vs 174 us, a
// row-gated mul 15 vs 48 us), and each ATen call costs microseconds of its own. Here the
// gathered rows, the hidden activations and the outputs of one tile never leave L2 (only
// x, the saved h and act(h), and the results cross memory), and nothing between two
// matmuls is an ATen call: the matmuls are the torch build's BLAS on raw pointers (MKL's
// sgemm in fp32, its bf16 x bf16 -> fp32 GEMM in bf16), the loops are hand-written.
//
// Layout: a counting sort of the assignments by expert (skipped ones, id == E, get no row),
// each expert's rows cut into tiles of at most `tile` rows, stored in that order in the
// saved h; the backward recomputes the same layout from the same ids. Experts run in
// parallel over ATen's threads (each expert's tiles on one thread).
//
// The Python side (fused.py) only calls in where the BLAS for the dtype is exported
// (`has_blas`); elsewhere blockdsl uses its "bmm" dispatch.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

using at::Tensor;

// MKL's Fortran sgemm, when the torch build exports it (x86 wheels link MKL into
// libtorch_cpu): a direct call skips at::mm_out's checks and dispatch, a few us per call,
// which at 8 experts x 6 matmuls per step was a tenth of the layer. Weak: where it is
// absent the pointer is null (`has_blas` says so, and Python does not call in).
extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
                       const float*, const int*, const float*, const int*, const float*, float*,
                       const int*) __attribute__((weak));
// MKL's bf16 x bf16 -> fp32 GEMM (CBLAS; also exported by x86 torch builds): bf16 inputs,
// fp32 accumulation and output, ~4x faster than oneDNN's bf16 matmul at a tile's size
// (measured 6 vs 22 us at 256 x 48 x 48, the call's overhead included)
// (MKL_INT is 32-bit in the LP64 interface these unsuffixed names belong to)
extern "C" void cblas_gemm_bf16bf16f32(int, int, int, int, int, int, float, const uint16_t*, int,
                                       const uint16_t*, int, float, float*, int)
    __attribute__((weak));

namespace {

enum Act { NONE = 0, RELU = 1, GELU = 2, GELU_TANH = 3, SILU = 4 };

struct Tile {
  int64_t expert, start, rows, base;  // start: position in sorted order; base: row in saved h
};

// Counting sort by expert and the tile layout. order[p] = assignment at sorted position p.
void layout(const Tensor& expert, int64_t n_exp, int64_t tile, std::vector<int64_t>& order,
            std::vector<Tile>& tiles, int64_t& h_rows) {
  const int64_t m = expert.size(0);
  const int64_t* e = expert.data_ptr<int64_t>();
  std::vector<int64_t> counts(n_exp + 1, 0);
  for (int64_t i = 0; i < m; ++i) {
    int64_t k = e[i];
    TORCH_CHECK(k >= 0 && k <= n_exp, "expert id ", k, " out of range [0, ", n_exp, "]");
    counts[k]++;
  }
  std::vector<int64_t> pos(n_exp + 1, 0);
  for (int64_t k = 1; k <= n_exp; ++k) pos[k] = pos[k - 1] + counts[k - 1];
  const int64_t kept = pos[n_exp];
  order.assign(kept, 0);
  std::vector<int64_t> fill(pos.begin(), pos.end());
  for (int64_t i = 0; i < m; ++i)
    if (e[i] < n_exp) order[fill[e[i]]++] = i;  // stable: assignment order within an expert
  tiles.clear();
  h_rows = 0;
  for (int64_t k = 0; k < n_exp; ++k) {
    for (int64_t s = pos[k]; s < pos[k] + counts[k]; s += tile) {
      int64_t rows = std::min(tile, pos[k] + counts[k] - s);
      tiles.push_back({k, s, rows, h_rows});
      h_rows += rows;
    }
  }
}

template <typename T>
void gather_rows(const T* src, int64_t width, const int64_t* idx, const int64_t* order,
                 int64_t start, int64_t rows, T* dst) {
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(dst + r * width, src + idx[order[start + r]] * width, width * sizeof(T));
}

// ---- raw pointers, no tensor views, hand-vectorised loops -------------------------------
// At 8 experts of d = 48 a tile's matmul takes ~10 us, and ATen's per-call costs (a
// TensorIterator for each activation, views for each operand) came to as much again
// (measured under the profiler: per-tile gelu 38 us, gelu_backward 56 us, for ~10k values).
// The loops below are compiled for AVX-512, AVX2 and plain x86-64, picked at load time.
// GCC 12 vectorises the exp/erf/tanh loops only in the AVX-512 clone (checked with
// -fopt-info-vec); on an AVX2-only CPU they run scalar, which was not measured.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

// row-major C[m, n] = beta C + op(A) op(B); A is stored [m, k] (or [k, m] when ta), B [k, n]
// (or [n, k] when tb), each with its row length as leading dimension
inline void sgemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* A,
                     int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
  const int M = static_cast<int>(m), N = static_cast<int>(n), K = static_cast<int>(k);
  const int LA = static_cast<int>(lda), LB = static_cast<int>(ldb), LC = static_cast<int>(ldc);
  const float one = 1.f;
  sgemm_(&cb, &ca, &N, &M, &K, &one, B, &LB, A, &LA, &beta, C, &LC);  // C^T = B^T A^T
}

// exp by Cody-Waite reduction and a degree-6 polynomial (~1 ulp on the clamped range);
// written so the compiler vectorises it (no libm call in the loop)
__attribute__((always_inline)) static inline float fexp(float x) {
  x = std::min(std::max(x, -87.3f), 88.0f);
  const float n = (x * 1.44269504f + 12582912.f) - 12582912.f;  // round to nearest
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187e-6f;
  float p = 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// erf, Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7, below fp32's step at 1)
__attribute__((always_inline)) static inline float ferf(float x) {
  const float ax = std::fabs(x);
  const float t = 1.f / (1.f + 0.3275911f * ax);
  const float poly =
      ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t +
       0.254829592f) * t;
  return std::copysign(1.f - poly * fexp(-ax * ax), x);
}

__attribute__((always_inline)) static inline float ftanh(float y) { return 1.f - 2.f / (1.f + fexp(2.f * y)); }

CLONES void act_fwd_f32(const float* h, float* a, int64_t n, int64_t act) {
  switch (act) {
    case RELU: for (int64_t i = 0; i < n; ++i) a[i] = h[i] > 0.f ? h[i] : 0.f; break;
    case GELU:
      for (int64_t i = 0; i < n; ++i) a[i] = 0.5f * h[i] * (1.f + ferf(h[i] * 0.70710678f));
      break;
    case GELU_TANH:
      for (int64_t i = 0; i < n; ++i) {
        const float x = h[i];
        a[i] = 0.5f * x * (1.f + ftanh(0.7978845608f * (x + 0.044715f * x * x * x)));
      }
      break;
    case SILU: for (int64_t i = 0; i < n; ++i) a[i] = h[i] / (1.f + fexp(-h[i])); break;
    default: std::memcpy(a, h, n * sizeof(float));
  }
}

// gh = ga * act'(h)
CLONES void act_bwd_f32(const float* ga, const float* h, float* gh, int64_t n, int64_t act) {
  switch (act) {
    case RELU: for (int64_t i = 0; i < n; ++i) gh[i] = h[i] > 0.f ? ga[i] : 0.f; break;
    case GELU:
      for (int64_t i = 0; i < n; ++i) {
        const float x = h[i];
        const float cdf = 0.5f * (1.f + ferf(x * 0.70710678f));
        gh[i] = ga[i] * (cdf + x * 0.3989422804f * fexp(-0.5f * x * x));
      }
      break;
    case GELU_TANH:
      for (int64_t i = 0; i < n; ++i) {
        const float x = h[i], x2 = x * x;
        const float t = ftanh(0.7978845608f * (x + 0.044715f * x2 * x));
        gh[i] = ga[i] * (0.5f * (1.f + t) +
                         0.5f * x * (1.f - t * t) * 0.7978845608f * (1.f + 0.134145f * x2));
      }
      break;
    case SILU:
      for (int64_t i = 0; i < n; ++i) {
        const float s = 1.f / (1.f + fexp(-h[i]));
        gh[i] = ga[i] * s * (1.f + h[i] * (1.f - s));
      }
      break;
    default: std::memcpy(gh, ga, n * sizeof(float));
  }
}

CLONES void mul_f32(const float* a, const float* b, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] * b[i];
}
CLONES void axpy_f32(float g, const float* y, float* o, int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] += g * y[i];
}
CLONES void add_f32(const float* y, float* o, int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] += y[i];
}
CLONES void scale_f32(float g, float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] *= g;
}
CLONES float dot_f32(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// first[e] = index of expert e's first tile (tiles are in expert order); first[E] = #tiles
std::vector<int64_t> expert_tiles(const std::vector<Tile>& tiles, int64_t n_exp) {
  std::vector<int64_t> first(n_exp + 1, static_cast<int64_t>(tiles.size()));
  for (int64_t i = static_cast<int64_t>(tiles.size()) - 1; i >= 0; --i) first[tiles[i].expert] = i;
  for (int64_t e = n_exp - 1; e >= 0; --e) first[e] = std::min(first[e], first[e + 1]);
  return first;
}

// Experts run in parallel over ATen's intra-op threads (each expert's tiles on one thread,
// so its weight gradients need no lock); with one thread, or one tile, everything scatters
// straight into one accumulator. Inside the parallel region the BLAS runs single-threaded.
int64_t lanes_for(int64_t n_exp, size_t n_tiles) {
  const int64_t threads = at::get_num_threads();
  return (threads > 1 && n_exp > 1 && n_tiles > 1 && !at::in_parallel_region()) ? threads : 1;
}

template <typename Fn>
void run_experts(int64_t n_exp, int64_t lanes, const Fn& fn) {
  if (lanes == 1) fn(0, n_exp);
  else at::parallel_for(0, n_exp, 1, fn);
}

// The raw path's element types: In is what the matmuls read (x, weights, the saved h and a,
// the gathered gradient rows): float, or bf16 under autocast; everything computed in
// between (matmul outputs, activations, gradients, accumulators) is fp32.
template <typename In>
struct Raw;

template <>
struct Raw<float> {
  static bool available() { return sgemm_ != nullptr; }
  // row-major C[m, n] = beta C + op(A) op(B)
  static void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* A, int64_t lda,
                   const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
    sgemm_rm(ta, tb, m, n, k, A, lda, B, ldb, beta, C, ldc);
  }
};

template <>
struct Raw<at::BFloat16> {
  static bool available() { return cblas_gemm_bf16bf16f32 != nullptr; }
  static void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const at::BFloat16* A,
                   int64_t lda, const at::BFloat16* B, int64_t ldb, float beta, float* C,
                   int64_t ldc) {
    if (m == 0 || n == 0) return;
    constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
    auto i = [](int64_t v) { return static_cast<int>(v); };
    cblas_gemm_bf16bf16f32(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, i(m), i(n),
                           i(k), 1.f, reinterpret_cast<const uint16_t*>(A), i(lda),
                           reinterpret_cast<const uint16_t*>(B), i(ldb), beta, C, i(ldc));
  }
};

// fp32 <-> bf16 (round to nearest even), as flat loops the compiler vectorises
CLONES void f32_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, src + i, 4);
    dst[i] = static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
  }
}
CLONES void bf16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = static_cast<uint32_t>(src[i]) << 16;
    std::memcpy(dst + i, &b, 4);
  }
}
// In <- fp32 and fp32 <- In; for In = float the caller aliases instead of calling these
inline void to_in(const float* src, at::BFloat16* dst, int64_t n) {
  f32_to_bf16(src, reinterpret_cast<uint16_t*>(dst), n);
}
inline void to_in(const float* src, float* dst, int64_t n) {
  if (src != dst) std::memcpy(dst, src, n * sizeof(float));
}
inline void to_f32(const at::BFloat16* src, float* dst, int64_t n) {
  bf16_to_f32(reinterpret_cast<const uint16_t*>(src), dst, n);
}
inline void to_f32(const float* src, float* dst, int64_t n) {
  if (src != dst) std::memcpy(dst, src, n * sizeof(float));
}

// A scratch arena of fp32 and In buffers for one thread's tiles; for In = float an In
// buffer is the fp32 buffer it mirrors (no conversions, no copies).
template <typename In>
struct Scratch {
  static constexpr bool kSame = std::is_same<In, float>::value;
  Tensor f32, in;
  Scratch(int64_t n_f32, int64_t n_in, const at::TensorOptions& opt)
      : f32(at::empty({std::max<int64_t>(n_f32, 1)}, opt.dtype(at::kFloat))),
        in(kSame ? Tensor() : at::empty({std::max<int64_t>(n_in, 1)}, opt)) {}
};

// Shapes and layout shared by the forward and the backward of one call.
struct Plan {
  int64_t n_exp, d, F, f, d_out, h_rows = 0, cap = 1, lanes = 1;
  bool two;
  std::vector<int64_t> order, first;
  std::vector<Tile> tiles;
};

Plan plan(const Tensor& x, const Tensor& expert, const Tensor& w1,
          const c10::optional<Tensor>& w2, bool gated, int64_t tile) {
  Plan p;
  p.n_exp = w1.size(0), p.d = x.size(1), p.F = w1.size(2);
  p.f = gated ? p.F / 2 : p.F;
  p.two = w2.has_value();
  p.d_out = p.two ? w2->size(2) : p.F;
  layout(expert, p.n_exp, tile, p.order, p.tiles, p.h_rows);
  for (const Tile& t : p.tiles) p.cap = std::max(p.cap, t.rows);
  p.first = expert_tiles(p.tiles, p.n_exp);
  p.lanes = lanes_for(p.n_exp, p.tiles.size());
  return p;
}

template <typename In>
std::vector<Tensor> forward_raw(const Tensor& x, const Tensor& src, const Tensor& dst,
                                const Tensor& expert, const Tensor& gate, const Tensor& w1,
                                const c10::optional<Tensor>& b1, const c10::optional<Tensor>& w2,
                                const c10::optional<Tensor>& b2, int64_t act, bool gated,
                                int64_t n_out, int64_t tile) {
  constexpr bool same = std::is_same<In, float>::value;
  const Plan p = plan(x, expert, w1, w2, gated, tile);
  const auto& [n_exp, d, F, f, d_out, h_rows, cap, lanes, two, order, first, tiles] = p;
  auto opt = x.options();
  auto fopt = opt.dtype(at::kFloat);
  Tensor h = at::empty({std::max<int64_t>(h_rows, 1), F}, opt);
  Tensor a_saved =
      (two && !gated) ? at::empty({std::max<int64_t>(h_rows, 1), f}, opt) : Tensor();
  // one accumulator per thread when experts run in parallel (rows of different experts
  // scatter into the same output rows), summed at the end
  Tensor acc = at::zeros({lanes, n_out, d_out}, fopt);
  const In* xp = x.data_ptr<In>();
  const In* w1p = w1.data_ptr<In>();
  const In* w2p = two ? w2->data_ptr<In>() : nullptr;
  const In* b1p = b1.has_value() ? b1->data_ptr<In>() : nullptr;
  const In* b2p = b2.has_value() ? b2->data_ptr<In>() : nullptr;
  const int64_t* srcp = src.data_ptr<int64_t>();
  const int64_t* dstp = dst.data_ptr<int64_t>();
  const float* gp = gate.data_ptr<float>();
  In* hp0 = h.data_ptr<In>();
  In* ap0 = (two && !gated) ? a_saved.data_ptr<In>() : nullptr;
  float* acc0 = acc.data_ptr<float>();
  std::vector<float> bias1(b1p ? n_exp * F : 0), bias2(b2p ? n_exp * d_out : 0);
  if (b1p) to_f32(b1p, bias1.data(), n_exp * F);
  if (b2p) to_f32(b2p, bias2.data(), n_exp * d_out);
  run_experts(n_exp, lanes, [&](int64_t e0, int64_t e1) {
    float* op = acc0 + (lanes > 1 ? at::get_thread_num() : 0) * n_out * d_out;
    // fp32: hf = the tile's F columns (bf16: scratch, then rounded into the saved h),
    // af = act(h), yf = the output rows; In: xb (gathered rows), ai (a as the matmul reads it)
    Scratch<In> sc(cap * ((same ? 0 : F) + f + d_out), cap * (d + f), opt);
    float* hf_buf = sc.f32.template data_ptr<float>();
    float* af_buf = hf_buf + (same ? 0 : cap * F);
    float* yf = af_buf + cap * f;
    In* xb = same ? reinterpret_cast<In*>(yf + cap * d_out) : sc.in.template data_ptr<In>();
    Tensor xs = same ? at::empty({cap * d}, opt) : Tensor();
    if (same) xb = xs.data_ptr<In>();
    In* ai_buf = same ? reinterpret_cast<In*>(af_buf) : xb + cap * d;
    for (int64_t ti = first[e0]; ti < first[e1]; ++ti) {
      const Tile& t = tiles[ti];
      const int64_t e = t.expert, rows = t.rows;
      gather_rows<In>(xp, d, srcp, order.data(), t.start, rows, xb);
      In* hs = hp0 + t.base * F;
      float* hf = same ? reinterpret_cast<float*>(hs) : hf_buf;
      Raw<In>::gemm(false, false, rows, F, d, xb, d, w1p + e * d * F, F, 0.f, hf, F);
      if (b1p)
        for (int64_t r = 0; r < rows; ++r) add_f32(bias1.data() + e * F, hf + r * F, F);
      if (!same) to_in(hf, hs, rows * F);
      const float* yp = hf;
      if (two) {
        // ungated fp32 writes act(h) straight into the saved a; bf16 rounds it there
        In* ai = gated ? ai_buf : ap0 + t.base * f;
        float* af = (same && !gated) ? reinterpret_cast<float*>(ai) : af_buf;
        if (gated) {
          for (int64_t r = 0; r < rows; ++r) {
            act_fwd_f32(hf + r * F, af + r * f, f, act);
            mul_f32(af + r * f, hf + r * F + f, af + r * f, f);
          }
        } else {
          act_fwd_f32(hf, af, rows * f, act);
        }
        if (!same || gated) to_in(af, ai, rows * f);
        Raw<In>::gemm(false, false, rows, d_out, f, ai, f, w2p + e * f * d_out, d_out, 0.f, yf,
                      d_out);
        if (b2p)
          for (int64_t r = 0; r < rows; ++r) add_f32(bias2.data() + e * d_out, yf + r * d_out, d_out);
        yp = yf;
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t m = order[t.start + r];
        axpy_f32(gp[m], yp + r * d_out, op + dstp[m] * d_out, d_out);
      }
    }
  });
  return {lanes > 1 ? acc.sum(0) : acc.squeeze(0), h, a_saved};
}

template <typename In>
std::vector<Tensor> backward_raw(const Tensor& go, const Tensor& x, const Tensor& src,
                                 const Tensor& dst, const Tensor& expert, const Tensor& gate,
                                 const Tensor& w1, const c10::optional<Tensor>& b1,
                                 const c10::optional<Tensor>& w2, const c10::optional<Tensor>& b2,
                                 const Tensor& h, const Tensor& a_saved, int64_t act, bool gated,
                                 int64_t tile, bool need_x, bool need_w) {
  constexpr bool same = std::is_same<In, float>::value;
  const Plan p = plan(x, expert, w1, w2, gated, tile);  // the forward's layout, recomputed
  const auto& [n_exp, d, F, f, d_out, h_rows, cap, lanes, two, order, first, tiles] = p;
  auto opt = x.options();
  auto fopt = opt.dtype(at::kFloat);
  Tensor gxacc = need_x ? at::zeros({lanes, x.size(0), d}, fopt) : Tensor();
  Tensor ggate = at::zeros({gate.size(0)}, fopt);
  Tensor gw1 = at::zeros({n_exp, d, F}, fopt);
  Tensor gw2 = two ? at::zeros({n_exp, f, d_out}, fopt) : Tensor();
  Tensor gb1 = b1.has_value() ? at::zeros({n_exp, F}, fopt) : Tensor();
  Tensor gb2 = b2.has_value() ? at::zeros({n_exp, d_out}, fopt) : Tensor();
  const In* xp = x.data_ptr<In>();
  const In* gop = go.data_ptr<In>();
  const In* w1p = w1.data_ptr<In>();
  const In* w2p = two ? w2->data_ptr<In>() : nullptr;
  std::vector<float> bias2(b2.has_value() ? n_exp * d_out : 0);
  if (b2.has_value()) to_f32(b2->data_ptr<In>(), bias2.data(), n_exp * d_out);
  const int64_t* srcp = src.data_ptr<int64_t>();
  const int64_t* dstp = dst.data_ptr<int64_t>();
  const float* gp = gate.data_ptr<float>();
  const In* hp0 = h.data_ptr<In>();
  const In* ap0 = (two && !gated) ? a_saved.data_ptr<In>() : nullptr;
  float* ggp = ggate.data_ptr<float>();
  float* gw1p = gw1.data_ptr<float>();
  float* gw2p = two ? gw2.data_ptr<float>() : nullptr;
  float* gb1p = b1.has_value() ? gb1.data_ptr<float>() : nullptr;
  float* gb2p = b2.has_value() ? gb2.data_ptr<float>() : nullptr;
  float* gx0 = need_x ? gxacc.data_ptr<float>() : nullptr;
  run_experts(n_exp, lanes, [&](int64_t e0, int64_t e1) {
    float* gxp = need_x ? gx0 + (lanes > 1 ? at::get_thread_num() : 0) * x.size(0) * d : nullptr;
    // fp32: gyf (dL/dy rows, then gated), hf (bf16: h widened), af (a, bf16 or gated), gab
    // (dL/da), actf (gated: act(gate half)), ghf (dL/dh), gxf; In: gyi, xb, ai, ghi
    const int64_t nf = d_out + (same ? 0 : F) + f + (two ? f : 0) + (gated ? f : 0) + F + d;
    Scratch<In> sc(cap * nf, cap * (d_out + d + f + F), opt);
    float* gyf = sc.f32.template data_ptr<float>();
    float* hf_buf = gyf + cap * d_out;
    float* af_buf = hf_buf + (same ? 0 : cap * F);
    float* gab = af_buf + cap * f;
    float* actf = gab + (two ? cap * f : 0);
    float* ghf = actf + (gated ? cap * f : 0);
    float* gxf = ghf + cap * F;
    Tensor xs = same ? at::empty({cap * d}, opt) : Tensor();
    In* gyi = same ? reinterpret_cast<In*>(gyf) : sc.in.template data_ptr<In>();
    In* xb = same ? xs.data_ptr<In>() : gyi + cap * d_out;
    In* ai_buf = same ? reinterpret_cast<In*>(af_buf) : xb + cap * d;
    In* ghi = same ? reinterpret_cast<In*>(ghf) : ai_buf + cap * f;
    for (int64_t ti = first[e0]; ti < first[e1]; ++ti) {
      const Tile& t = tiles[ti];
      const int64_t e = t.expert, rows = t.rows;
      gather_rows<In>(gop, d_out, dstp, order.data(), t.start, rows, gyi);
      if (!same) to_f32(gyi, gyf, rows * d_out);
      const In* hs = hp0 + t.base * F;
      const float* hf = same ? reinterpret_cast<const float*>(hs) : hf_buf;
      if (!same) to_f32(hs, hf_buf, rows * F);
      if (two) {
        const In* ai = ap0 ? ap0 + t.base * f : ai_buf;
        const float* af = af_buf;
        if (gated) {  // act(gate) is needed for d/d up: recomputed, a is not saved
          for (int64_t r = 0; r < rows; ++r) {
            act_fwd_f32(hf + r * F, actf + r * f, f, act);
            mul_f32(actf + r * f, hf + r * F + f, af_buf + r * f, f);
          }
          if (!same) to_in(af_buf, ai_buf, rows * f);
        } else if (same) {
          af = reinterpret_cast<const float*>(ai);
        } else {
          to_f32(ai, af_buf, rows * f);
        }
        // dL/da before the gate; gate gradient <dL/dy, a W2 + b2> = <dL/dy W2^T, a> + <dL/dy, b2>
        Raw<In>::gemm(false, true, rows, f, d_out, gyi, d_out, w2p + e * f * d_out, d_out, 0.f,
                      gab, f);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t m = order[t.start + r];
          float sdot = dot_f32(gab + r * f, af + r * f, f);
          if (!bias2.empty()) sdot += dot_f32(gyf + r * d_out, bias2.data() + e * d_out, d_out);
          ggp[m] = sdot;
          scale_f32(gp[m], gab + r * f, f);
          scale_f32(gp[m], gyf + r * d_out, d_out);
        }
        if (need_w) {
          if (!same) to_in(gyf, gyi, rows * d_out);  // the gated rows, as the matmul reads them
          Raw<In>::gemm(true, false, f, d_out, rows, ai, f, gyi, d_out, 1.f,
                        gw2p + e * f * d_out, d_out);
          if (gb2p)
            for (int64_t r = 0; r < rows; ++r) add_f32(gyf + r * d_out, gb2p + e * d_out, d_out);
        }
        if (gated) {
          for (int64_t r = 0; r < rows; ++r) {
            float* ghr = ghf + r * F;
            mul_f32(gab + r * f, hf + r * F + f, ghr + f, f);  // d/d act(gate), parked in the up half
            act_bwd_f32(ghr + f, hf + r * F, ghr, f, act);     // d/d gate
            mul_f32(gab + r * f, actf + r * f, ghr + f, f);    // d/d up
          }
        } else {
          act_bwd_f32(gab, hf, ghf, rows * f, act);
        }
      } else {  // y = h: the gate gradient is <dL/dy, h>, dL/dh = gate dL/dy
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t m = order[t.start + r];
          ggp[m] = dot_f32(gyf + r * F, hf + r * F, F);
          std::memcpy(ghf + r * F, gyf + r * F, F * sizeof(float));
          scale_f32(gp[m], ghf + r * F, F);
        }
      }
      if (!same) to_in(ghf, ghi, rows * F);
      if (need_w || need_x) gather_rows<In>(xp, d, srcp, order.data(), t.start, rows, xb);
      if (need_w) {
        Raw<In>::gemm(true, false, d, F, rows, xb, d, ghi, F, 1.f, gw1p + e * d * F, F);
        if (gb1p)
          for (int64_t r = 0; r < rows; ++r) add_f32(ghf + r * F, gb1p + e * F, F);
      }
      if (need_x) {
        Raw<In>::gemm(false, true, rows, d, F, ghi, F, w1p + e * d * F, F, 0.f, gxf, d);
        for (int64_t r = 0; r < rows; ++r)
          add_f32(gxf + r * d, gxp + srcp[order[t.start + r]] * d, d);
      }
    }
  });
  Tensor gx = need_x ? (lanes > 1 ? gxacc.sum(0) : gxacc.squeeze(0)) : Tensor();
  return {gx, ggate, gw1, b1.has_value() ? gb1 : Tensor(), two ? gw2 : Tensor(),
          b2.has_value() ? gb2 : Tensor()};
}

void check(const Tensor& x, const Tensor& src, const Tensor& dst, const Tensor& expert,
           const Tensor& gate, const Tensor& w1) {
  TORCH_CHECK(x.device().is_cpu(), "fused dispatch runs on CPU tensors");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [N, d] tensor");
  TORCH_CHECK(src.scalar_type() == at::kLong && dst.scalar_type() == at::kLong &&
              expert.scalar_type() == at::kLong, "indices must be int64");
  TORCH_CHECK(src.is_contiguous() && dst.is_contiguous() && expert.is_contiguous() &&
              gate.is_contiguous(), "indices and gates must be contiguous");
  TORCH_CHECK(gate.scalar_type() == at::kFloat, "gates must be float32");
  TORCH_CHECK(w1.dim() == 3 && w1.size(1) == x.size(1) && w1.scalar_type() == x.scalar_type(),
              "w1 must be [E, d, F] in x's dtype");
  TORCH_CHECK(src.numel() == expert.numel() && dst.numel() == expert.numel() &&
              gate.numel() == expert.numel(), "src, dst, expert and gate must have one entry per assignment");
}

// Raw pointers index x by src and the output by dst: out-of-range rows are refused here
// rather than read or written (one pass over the assignments)
void check_rows(const Tensor& idx, int64_t rows, const char* what) {
  const int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t i = 0, n = idx.numel(); i < n; ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < rows, what, " row ", p[i], " out of range [0, ", rows, ")");
}

bool has_blas_for(at::ScalarType t) {
  if (t == at::kFloat) return Raw<float>::available();
  if (t == at::kBFloat16) return Raw<at::BFloat16>::available();
  return false;
}

}  // namespace

std::vector<Tensor> fused_forward(Tensor x, Tensor src, Tensor dst, Tensor expert, Tensor gate,
                                  Tensor w1, c10::optional<Tensor> b1, c10::optional<Tensor> w2,
                                  c10::optional<Tensor> b2, int64_t act, bool gated,
                                  int64_t n_out, int64_t tile) {
  check(x, src, dst, expert, gate, w1);
  check_rows(src, x.size(0), "src");
  check_rows(dst, n_out, "dst");
  TORCH_CHECK(has_blas_for(x.scalar_type()), "fused dispatch: no BLAS for ", x.scalar_type());
  at::NoGradGuard no_grad;
  auto c = [](const c10::optional<Tensor>& t) -> c10::optional<Tensor> {
    return t.has_value() ? c10::optional<Tensor>(t->contiguous()) : t;
  };
  if (x.scalar_type() == at::kFloat)
    return forward_raw<float>(x, src, dst, expert, gate, w1.contiguous(), c(b1), c(w2), c(b2),
                              act, gated, n_out, tile);
  return forward_raw<at::BFloat16>(x, src, dst, expert, gate, w1.contiguous(), c(b1), c(w2),
                                   c(b2), act, gated, n_out, tile);
}

std::vector<Tensor> fused_backward(Tensor go, Tensor x, Tensor src, Tensor dst, Tensor expert,
                                   Tensor gate, Tensor w1, c10::optional<Tensor> b1,
                                   c10::optional<Tensor> w2, c10::optional<Tensor> b2, Tensor h,
                                   Tensor a_saved, int64_t act, bool gated, int64_t tile,
                                   bool need_x, bool need_w) {
  check(x, src, dst, expert, gate, w1);
  TORCH_CHECK(has_blas_for(x.scalar_type()), "fused dispatch: no BLAS for ", x.scalar_type());
  at::NoGradGuard no_grad;
  go = go.contiguous().to(x.scalar_type());
  auto c = [](const c10::optional<Tensor>& t) -> c10::optional<Tensor> {
    return t.has_value() ? c10::optional<Tensor>(t->contiguous()) : t;
  };
  if (x.scalar_type() == at::kFloat)
    return backward_raw<float>(go, x, src, dst, expert, gate, w1.contiguous(), c(b1), c(w2),
                               c(b2), h, a_saved, act, gated, tile, need_x, need_w);
  return backward_raw<at::BFloat16>(go, x, src, dst, expert, gate, w1.contiguous(), c(b1), c(w2),
                                    c(b2), h, a_saved, act, gated, tile, need_x, need_w);
}

// ---- the token-choice router: softmax over experts, top-k, balance-loss terms ----------
// Same reason as the experts: at 1024 tokens x 8 experts the router's dozen tensor ops
// (transpose, softmax, topk, bincount, mean, reshapes, and their backward) cost ~0.4 ms
// per layer, ten times their arithmetic. One pass per token here: softmax, k selections
// (ties go to the lower expert id), the rank-major (token, expert, gate) lists, the
// per-expert choice counts and the mean probabilities.
// row softmax of [n, e]. Rows are short (e = 8 at the search's scale), so the exp and the
// normalisation run as flat loops over all n e values against a per-value copy of the row's
// max and 1/sum (vectorised: ~6x faster than row by row); the reductions stay per row.
CLONES void exp_minus(const float* l, const float* m, float* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = fexp(l[i] - m[i]);
}

void softmax_rows(const float* l, float* p, int64_t n, int64_t e) {
  std::vector<float> bc(n * e);
  for (int64_t i = 0; i < n; ++i) {
    float mx = l[i * e];
    for (int64_t j = 1; j < e; ++j) mx = std::max(mx, l[i * e + j]);
    std::fill(bc.begin() + i * e, bc.begin() + (i + 1) * e, mx);
  }
  exp_minus(l, bc.data(), p, n * e);
  for (int64_t i = 0; i < n; ++i) {
    float s = 0.f;
    for (int64_t j = 0; j < e; ++j) s += p[i * e + j];
    std::fill(bc.begin() + i * e, bc.begin() + (i + 1) * e, 1.f / s);
  }
  mul_f32(p, bc.data(), p, n * e);
}

std::vector<Tensor> topk_route_forward(Tensor logits, int64_t k, bool renorm) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.scalar_type() == at::kFloat,
              "the fused router takes CPU float32 [N, E] logits");
  logits = logits.contiguous();
  const int64_t n = logits.size(0), e = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= e, "k must be in [1, ", e, "]");
  auto opt = logits.options();
  Tensor probs = at::empty({n, e}, opt), gate = at::empty({k * n}, opt);
  Tensor expert = at::empty({k * n}, opt.dtype(at::kLong)), token = at::empty({k * n}, opt.dtype(at::kLong));
  Tensor counts = at::zeros({e}, opt);
  const float* lp = logits.data_ptr<float>();
  float* pp = probs.data_ptr<float>();
  float* gp = gate.data_ptr<float>();
  int64_t* ep = expert.data_ptr<int64_t>();
  int64_t* tp = token.data_ptr<int64_t>();
  float* cp = counts.data_ptr<float>();
  softmax_rows(lp, pp, n, e);
  Tensor mean_t = at::zeros({e}, opt);
  float* mp = mean_t.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) add_f32(pp + i * e, mp, e);
  scale_f32(1.f / static_cast<float>(n), mp, e);
  std::vector<float> v(e);
  for (int64_t i = 0; i < n; ++i) {
    const float* p = pp + i * e;
    std::memcpy(v.data(), p, e * sizeof(float));
    float top = 0.f;
    for (int64_t r = 0; r < k; ++r) {  // k branch-free argmax passes (ties: lower id)
      int64_t best = 0;
      float bv = v[0];
      for (int64_t j = 1; j < e; ++j) {
        const bool gt = v[j] > bv;
        bv = gt ? v[j] : bv;
        best = gt ? j : best;
      }
      v[best] = -1.f;  // probabilities are >= 0: never picked again
      ep[r * n + i] = best;
      tp[r * n + i] = i;
      gp[r * n + i] = bv;
      cp[best] += 1.f;
      top += bv;
    }
    if (renorm)
      for (int64_t r = 0; r < k; ++r) gp[r * n + i] /= top;
  }
  return {probs, gate, expert, token, counts, mean_t};
}

// dL/dlogits from dL/dgate [k N] (rank-major) and dL/dmean [E]; either may be undefined
Tensor topk_route_backward(Tensor probs, Tensor expert, Tensor gate, c10::optional<Tensor> dgate,
                           c10::optional<Tensor> dmean, int64_t k, bool renorm) {
  const int64_t n = probs.size(0), e = probs.size(1);
  Tensor dl = at::empty({n, e}, probs.options());
  const float* pp = probs.data_ptr<float>();
  const int64_t* ep = expert.data_ptr<int64_t>();
  const float* gp = gate.data_ptr<float>();
  Tensor dg = dgate.has_value() ? dgate->contiguous() : Tensor();
  Tensor dm = dmean.has_value() ? dmean->contiguous() : Tensor();
  const float* dgp = dg.defined() ? dg.data_ptr<float>() : nullptr;
  const float* dmp = dm.defined() ? dm.data_ptr<float>() : nullptr;
  float* dlp = dl.data_ptr<float>();
  std::vector<float> dp(e);
  for (int64_t i = 0; i < n; ++i) {
    const float* p = pp + i * e;
    for (int64_t j = 0; j < e; ++j) dp[j] = dmp ? dmp[j] / static_cast<float>(n) : 0.f;
    if (dgp) {
      if (renorm) {  // g_j = p_j / S: dL/dp_j = (dL/dg_j - sum_r dL/dg_r g_r) / S
        float dot = 0.f, top = 0.f;
        for (int64_t r = 0; r < k; ++r) {
          dot += dgp[r * n + i] * gp[r * n + i];
          top += p[ep[r * n + i]];
        }
        for (int64_t r = 0; r < k; ++r) dp[ep[r * n + i]] += (dgp[r * n + i] - dot) / top;
      } else {
        for (int64_t r = 0; r < k; ++r) dp[ep[r * n + i]] += dgp[r * n + i];
      }
    }
    float dot = 0.f;
    for (int64_t j = 0; j < e; ++j) dot += p[j] * dp[j];
    for (int64_t j = 0; j < e; ++j) dlp[i * e + j] = p[j] * (dp[j] - dot);
  }
  return dl;
}

bool has_blas(bool bf16) { return has_blas_for(bf16 ? at::kBFloat16 : at::kFloat); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("topk_route_forward", &topk_route_forward, "softmax top-k router forward (CPU fp32)");
  m.def("topk_route_backward", &topk_route_backward, "softmax top-k router backward (CPU fp32)");
  m.def("has_blas", &has_blas, "whether the raw-pointer path has its BLAS (fp32 sgemm, or bf16 GEMM)");
  m.def("forward", &fused_forward, "fused expert FFN forward (CPU)");
  m.def("backward", &fused_backward, "fused expert FFN backward (CPU)");
}
