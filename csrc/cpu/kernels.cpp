// CPU kernels: JWTH attention pooling, the linear probe and tile preprocessing.
//
// Compiled once per instruction set (CMakeLists.txt defines JWTH_CPU_ISA_NS and the -m flags);
// vec.h picks the vector width from the predefined ISA macros. All arithmetic is fp32.
//
// JWTH pooling is done in three stages so the per-token work is only what the single query needs:
//   A  q = W_q c + b_q and u_h = W_k,h^T q_h / sqrt(d) for all tiles    (batched linear layers)
//   B  one streaming pass over each tile's P patch tokens: H scores per token, online softmax,
//      z_h = sum_i a_hi p_i accumulated in fp32                          (tiles in parallel)
//   C  o_h = W_v,h z_h + b_v,h, pooled = W_o o + b_o, logits = W_c pooled + b_c   (batched)
// The key bias only adds q_h . b_k,h to every score of head h, which softmax cancels; the value bias
// passes through unchanged because each head's weights sum to one.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/vec.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef JWTH_CPU_ISA_NS
#error "kernels.cpp must be compiled with -DJWTH_CPU_ISA_NS=<namespace> (see CMakeLists.txt)"
#endif

namespace jwth {
namespace cpu {
namespace JWTH_CPU_ISA_NS {
namespace {

int resolve_threads(int requested) {
#ifdef _OPENMP
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

// ---- dot-product form: C[m, n] = alpha sum_k A[m, k] B[n, k] (+ bias[n]), k contiguous -------------
// Used where the contraction is long and contiguous in both operands (token scores, small batches).
// MR x NR vector accumulators; AVX-512 has the registers for 4 x 4, narrower ISAs for 2 x 4.
#if defined(__AVX512F__)
constexpr int kDotMR = 4;
#else
constexpr int kDotMR = 2;
#endif
constexpr int kDotNR = 4;

template <int MR, int NR>
void dot_block(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
               float alpha, const float* col_bias, bool accumulate) {
  vfloat acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) acc[r][c] = vfloat{};
  int64_t k = 0;
  for (; k + kW <= K; k += kW) {
    vfloat a[MR];
    for (int r = 0; r < MR; ++r) a[r] = vload(A + r * lda + k);
    for (int c = 0; c < NR; ++c) {
      const vfloat b = vload(B + c * ldb + k);
      for (int r = 0; r < MR; ++r) acc[r][c] += a[r] * b;
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int c = 0; c < NR; ++c) {
      float s = vsum(acc[r][c]);
      for (int64_t kk = k; kk < K; ++kk) s += A[r * lda + kk] * B[c * ldb + kk];
      const float v = alpha * s + (col_bias ? col_bias[c] : 0.f);
      float* dst = C + r * ldc + c;
      *dst = accumulate ? *dst + v : v;
    }
  }
}

using DotFn = void (*)(int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t, float,
                       const float*, bool);

template <int MR>
DotFn pick_dot_n(int nr) {
  switch (nr) {
    case 1: return &dot_block<MR, 1>;
    case 2: return &dot_block<MR, 2>;
    case 3: return &dot_block<MR, 3>;
    default: return &dot_block<MR, kDotNR>;
  }
}

DotFn pick_dot(int mr, int nr) {
  switch (mr) {
    case 1: return pick_dot_n<1>(nr);
    case 2: return pick_dot_n<2>(nr);
    case 3: return pick_dot_n<3>(nr);
    default: return pick_dot_n<4>(nr);
  }
}

void gemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
             int64_t ldc, float alpha, const float* col_bias, bool accumulate) {
  for (int64_t m0 = 0; m0 < M; m0 += kDotMR) {
    const int mr = int(std::min<int64_t>(kDotMR, M - m0));
    for (int64_t n0 = 0; n0 < N; n0 += kDotNR) {
      const int nr = int(std::min<int64_t>(kDotNR, N - n0));
      pick_dot(mr, nr)(K, A + m0 * lda, lda, B + n0 * ldb, ldb, C + m0 * ldc + n0, ldc, alpha,
                       col_bias ? col_bias + n0 : nullptr, accumulate);
    }
  }
}

// ---- axpy form: C[m, n] = alpha sum_k A[m, k] B[k, n] (+ bias[m]), n contiguous ------------------
// A is read as broadcast scalars through arbitrary strides, B and C as vectors along n. No horizontal
// sums, so it suits short contractions (z update) and the batched linear layers after a transpose.
constexpr int kAxMR = 6;  // 6 x 2 vector accumulators fit the 16 registers of AVX2

template <int MR, int NV>
void axpy_block(int64_t K, const float* A, int64_t a_sm, int64_t a_sk, const float* B, int64_t ldb, float* C,
                int64_t ldc, float alpha, const float* row_bias, bool accumulate) {
  vfloat acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vfloat{};
  for (int64_t k = 0; k < K; ++k) {
    vfloat b[NV];
    for (int v = 0; v < NV; ++v) b[v] = vload(B + k * ldb + v * kW);
    for (int r = 0; r < MR; ++r) {
      const vfloat a = vsplat(A[r * a_sm + k * a_sk]);
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < MR; ++r) {
    const float bias = row_bias ? row_bias[r] : 0.f;
    for (int v = 0; v < NV; ++v) {
      float* dst = C + r * ldc + v * kW;
      vfloat out = acc[r][v] * alpha + bias;
      if (accumulate) out += vload(dst);
      vstore(dst, out);
    }
  }
}

using AxpyFn = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t, float,
                        const float*, bool);

template <int NV>
AxpyFn pick_axpy(int mr) {
  switch (mr) {
    case 1: return &axpy_block<1, NV>;
    case 2: return &axpy_block<2, NV>;
    case 3: return &axpy_block<3, NV>;
    case 4: return &axpy_block<4, NV>;
    case 5: return &axpy_block<5, NV>;
    default: return &axpy_block<kAxMR, NV>;
  }
}

void gemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_sm, int64_t a_sk, const float* B,
             int64_t ldb, float* C, int64_t ldc, float alpha, const float* row_bias, bool accumulate) {
  const int64_t n_full2 = N / (2 * kW) * (2 * kW);
  const int64_t n_full1 = N / kW * kW;
  for (int64_t m0 = 0; m0 < M; m0 += kAxMR) {
    const int mr = int(std::min<int64_t>(kAxMR, M - m0));
    const float* Am = A + m0 * a_sm;
    float* Cm = C + m0 * ldc;
    const float* bias = row_bias ? row_bias + m0 : nullptr;
    const AxpyFn two = pick_axpy<2>(mr), one = pick_axpy<1>(mr);
    for (int64_t n = 0; n < n_full2; n += 2 * kW) two(K, Am, a_sm, a_sk, B + n, ldb, Cm + n, ldc, alpha, bias, accumulate);
    for (int64_t n = n_full2; n < n_full1; n += kW) one(K, Am, a_sm, a_sk, B + n, ldb, Cm + n, ldc, alpha, bias, accumulate);
    for (int r = 0; r < mr; ++r) {  // the last N % kW columns
      for (int64_t n = n_full1; n < N; ++n) {
        float s = 0.f;
        for (int64_t k = 0; k < K; ++k) s += Am[r * a_sm + k * a_sk] * B[k * ldb + n];
        const float v = alpha * s + (bias ? bias[r] : 0.f);
        Cm[r * ldc + n] = accumulate ? Cm[r * ldc + n] + v : v;
      }
    }
  }
}

// ---- batched linear layer: Y[m, :] = W X[m, :] + b, W in nn.Linear layout [N, K] ------------------
// Few rows: dot products along k. Many rows: Y^T = W X^T, vectorised along the batch, with a
// k-panel of X^T small enough to stay in L1 while a block of weight rows streams past it once.
constexpr int64_t kPanelK = 64;
constexpr int64_t kRowsPerTask = 4 * kAxMR;

void linear(int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx, const float* W, const float* bias,
            float* Y, int64_t ldy, float* xt, float* yt, int nthreads) {
  if (M < kW) {
    constexpr int64_t kCols = 16;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += kCols) {
      gemm_nt(M, std::min(kCols, N - n0), K, X, ldx, W + n0 * K, K, Y + n0, ldy, 1.f, bias ? bias + n0 : nullptr,
              false);
    }
    return;
  }
#pragma omp parallel num_threads(nthreads)
  {
#pragma omp for schedule(static)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t m = 0; m < M; ++m) xt[k * M + m] = X[m * ldx + k];
#pragma omp for schedule(static)
    for (int64_t r0 = 0; r0 < N; r0 += kRowsPerTask) {
      const int64_t rows = std::min(kRowsPerTask, N - r0);
      for (int64_t k0 = 0; k0 < K; k0 += kPanelK) {
        const int64_t kl = std::min(kPanelK, K - k0);
        gemm_nn(rows, M, kl, W + r0 * K + k0, K, 1, xt + k0 * M, M, yt + r0 * M, M, 1.f,
                (k0 == 0 && bias) ? bias + r0 : nullptr, k0 > 0);
      }
    }
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) Y[m * ldy + n] = yt[n * M + m];
  }
}

// ---- stage C's value projection, all heads in one parallel region ------------------------------
// o[b, h d + r] = W_v[h d + r, :] . z[b, h, :] + b_v[h d + r]: H small linear layers with
// different inputs. One task per (head, block of kCols output rows), dot form along D (both
// operands contiguous), instead of one parallel region (and its barriers) per head: on a busy
// machine each barrier can wait a scheduler quantum.
void value_projection(int64_t B, int64_t D, int64_t H, const float* z, const float* wv, const float* bv, float* o,
                      int nthreads) {
  constexpr int64_t kCols = 16;
  const int64_t d = D / H, blocks = (d + kCols - 1) / kCols;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t task = 0; task < H * blocks; ++task) {
    const int64_t h = task / blocks, n0 = (task % blocks) * kCols;
    gemm_nt(B, std::min(kCols, d - n0), D, z + h * D, H * D, wv + (h * d + n0) * D, D, o + h * d + n0, D, 1.f,
            bv + h * d + n0, false);
  }
}

template <typename T>
void gather_class_tokens(const T* tokens, int64_t B, int64_t T_, int64_t D, float* out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    const T* src = tokens + b * T_ * D;
    for (int64_t k = 0; k < D; ++k) out[b * D + k] = to_float(src[k]);
  }
}

// ---- stage B: one pass over each tile's patch tokens --------------------------------------------
// Tokens go through in chunks of kChunk: scores S = X U^T (dot form), online-softmax update, then
// Z += A X (axpy form). A chunk (<= 32 x D floats) stays in L2 between the two products, so each
// token is read from memory once. Raw scores go to `attn` and are normalised with the final
// max/sum at the end, so the returned weights are the exact softmax.
//
// With fewer tiles than threads (B = 1 at the end of a slide, or a latency-bound caller) each
// tile's chunks are split into runs, one task per run, and the runs' softmax states (max m, sum l,
// unnormalised Z) are merged after, as flash-decoding splits the key sequence: otherwise a single
// tile would run on one core while the others wait at the barrier.
constexpr int64_t kChunk = 32;

template <typename T>
struct TokenRun {
  // Tokens [i_begin, i_end) of one tile into Zs (H x D, unnormalised), m and l (H each).
  static void run(const JwthPoolParams& p, const T* tile, const float* Ub, float* Zs, float* m, float* l, float* attn,
                  int64_t i_begin, int64_t i_end, float* converted, float* S, float* probs) {
    const int64_t D = p.D, P = p.P, H = p.H;
    std::fill(Zs, Zs + H * D, 0.f);
    std::fill(m, m + H, -std::numeric_limits<float>::infinity());
    std::fill(l, l + H, 0.f);
    for (int64_t i0 = i_begin; i0 < i_end; i0 += kChunk) {
      const int64_t n = std::min(kChunk, i_end - i0);
      const float* X;
      if constexpr (std::is_same<T, float>::value) {
        X = tile + i0 * D;
      } else {
        const T* src = tile + i0 * D;
        for (int64_t e = 0; e < n * D; ++e) converted[e] = to_float(src[e]);
        X = converted;
      }
      gemm_nt(n, H, D, X, D, Ub, D, S, H, 1.f, nullptr, false);
      for (int64_t h = 0; h < H; ++h) {
        float mx = m[h];
        for (int64_t i = 0; i < n; ++i) mx = std::max(mx, S[i * H + h]);
        const float rescale = std::exp(m[h] - mx);  // 0 on the first chunk (m = -inf)
        float sum = 0.f;
        for (int64_t i = 0; i < n; ++i) {
          const float s = S[i * H + h];
          const float e = std::exp(s - mx);
          probs[h * kChunk + i] = e;
          sum += e;
          if (attn) attn[h * P + i0 + i] = s;
        }
        l[h] = l[h] * rescale + sum;
        m[h] = mx;
        if (rescale != 1.f)
          for (int64_t k = 0; k < D; ++k) Zs[h * D + k] *= rescale;
      }
      gemm_nn(H, D, n, probs, kChunk, 1, X, D, Zs, D, 1.f, nullptr, true);
    }
  }
};

template <typename T>
void token_pass(const JwthPoolParams& p, const float* U, float* Z, int nthreads) {
  const int64_t B = p.B, T_ = p.T, D = p.D, P = p.P, H = p.H;
  const T* tokens = static_cast<const T*>(p.tokens);
  const int64_t chunks = (P + kChunk - 1) / kChunk;
  const int64_t splits = B >= nthreads ? 1 : std::min<int64_t>(chunks, (nthreads + B - 1) / B);
  // Split runs keep their own state; run 0 of each tile writes straight into Z.
  std::vector<float> part_z(splits > 1 ? size_t(B * (splits - 1) * H * D) : 0);
  std::vector<float> part_ml(splits > 1 ? size_t(B * splits * 2 * H) : 0);
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> converted(std::is_same<T, float>::value ? 0 : size_t(kChunk * D));
    std::vector<float> S(static_cast<size_t>(kChunk * H)), probs(static_cast<size_t>(H * kChunk));
    std::vector<float> ml(static_cast<size_t>(2 * H));
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < B * splits; ++task) {
      const int64_t b = task / splits, s = task % splits;
      const T* tile = tokens + (b * T_ + p.num_prefix) * D;
      float* attn = p.attn ? p.attn + b * H * P : nullptr;
      const int64_t i_begin = (s * chunks / splits) * kChunk;
      const int64_t i_end = std::min(P, ((s + 1) * chunks / splits) * kChunk);
      float* Zs = s == 0 ? Z + b * H * D : part_z.data() + (b * (splits - 1) + s - 1) * H * D;
      float* m = splits > 1 ? part_ml.data() + (b * splits + s) * 2 * H : ml.data();
      float* l = m + H;
      TokenRun<T>::run(p, tile, U + b * H * D, Zs, m, l, attn, i_begin, i_end, converted.data(), S.data(),
                       probs.data());
      if (splits > 1) continue;
      for (int64_t h = 0; h < H; ++h) {
        const float inv = 1.f / l[h];
        for (int64_t k = 0; k < D; ++k) Zs[h * D + k] *= inv;
        if (attn)
          for (int64_t i = 0; i < P; ++i) attn[h * P + i] = std::exp(attn[h * P + i] - m[h]) * inv;
      }
    }
    if (splits > 1) {
      // Merge the runs of each (tile, head): M = max_s m_s, weights e^(m_s - M), L = sum_s l_s e^(m_s - M).
#pragma omp for schedule(static)
      for (int64_t task = 0; task < B * H; ++task) {
        const int64_t b = task / H, h = task % H;
        const float* mls = part_ml.data() + b * splits * 2 * H;
        float M = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < splits; ++s) M = std::max(M, mls[s * 2 * H + h]);
        float L = 0.f;
        for (int64_t s = 0; s < splits; ++s) L += mls[s * 2 * H + H + h] * std::exp(mls[s * 2 * H + h] - M);
        const float inv = 1.f / L;
        float* Zh = Z + b * H * D + h * D;
        const float w0 = std::exp(mls[h] - M) * inv;
        for (int64_t k = 0; k < D; ++k) Zh[k] *= w0;
        for (int64_t s = 1; s < splits; ++s) {
          const float ws = std::exp(mls[s * 2 * H + h] - M) * inv;
          const float* Zp = part_z.data() + (b * (splits - 1) + s - 1) * H * D + h * D;
          for (int64_t k = 0; k < D; ++k) Zh[k] += ws * Zp[k];
        }
        if (p.attn) {
          float* a = p.attn + b * H * P + h * P;
          for (int64_t i = 0; i < P; ++i) a[i] = std::exp(a[i] - M) * inv;
        }
      }
    }
  }
}

// ---- preprocessing: antialiased bilinear taps, as torch's interpolate(antialias=True) ------------
// For output index i: center = scale (i + 0.5), support = max(scale, 1) (the triangle filter is
// widened by the scale when downsampling), taps j in [xmin, xmax) with weight
// tri((j - center + 0.5) / max(scale, 1)), normalised to sum to one. Weights in double, like the
// float64 reference, then stored as fp32.
struct Taps {
  std::vector<int64_t> start, count;
  std::vector<float> w;
  int64_t kmax = 0;
};

Taps antialias_taps(int64_t in, int64_t out) {
  Taps t;
  const double scale = double(in) / double(out);
  const double support = scale >= 1.0 ? scale : 1.0;
  const double invscale = scale >= 1.0 ? 1.0 / scale : 1.0;
  t.kmax = int64_t(std::ceil(support)) * 2 + 1;
  t.start.resize(size_t(out));
  t.count.resize(size_t(out));
  t.w.assign(size_t(out * t.kmax), 0.f);
  std::vector<double> w(static_cast<size_t>(t.kmax));
  for (int64_t i = 0; i < out; ++i) {
    const double center = scale * (double(i) + 0.5);
    const int64_t xmin = std::max<int64_t>(int64_t(center - support + 0.5), 0);
    const int64_t xmax = std::min<int64_t>(int64_t(center + support + 0.5), in);
    const int64_t cnt = std::min<int64_t>(xmax - xmin, t.kmax);
    double total = 0.0;
    for (int64_t j = 0; j < cnt; ++j) {
      const double x = (double(j + xmin) - center + 0.5) * invscale;
      w[size_t(j)] = std::max(0.0, 1.0 - std::fabs(x));
      total += w[size_t(j)];
    }
    for (int64_t j = 0; j < cnt; ++j) t.w[size_t(i * t.kmax + j)] = float(total != 0.0 ? w[size_t(j)] / total : 0.0);
    t.start[size_t(i)] = xmin;
    t.count[size_t(i)] = std::max<int64_t>(cnt, 0);
  }
  return t;
}

template <typename OutT>
void preprocess_typed(const PreprocessParams& p) {
  const int nthreads = resolve_threads(p.num_threads);
  const int64_t N = p.N, ih = p.in_h, iw = p.in_w, oh = p.out_h, ow = p.out_w;
  OutT* dst = static_cast<OutT*>(p.dst);
  const int64_t plane = oh * ow;
  if (ih == oh && iw == ow) {  // no resize: normalise and convert only
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const uint8_t* src = p.src + n * ih * iw * 3;
      for (int c = 0; c < 3; ++c) {
        OutT* out = dst + (n * 3 + c) * plane;
        const float sc = p.scale[c], sh = p.shift[c];
        for (int64_t e = 0; e < plane; ++e) store_as(out + e, float(src[e * 3 + c]) * sc + sh);
      }
    }
    return;
  }
  const Taps tx = antialias_taps(iw, ow), ty = antialias_taps(ih, oh);
#pragma omp parallel num_threads(nthreads)
  {
    // Horizontal pass into planar fp32 rows [3][ih][ow], then vertical pass along whole rows.
    std::vector<float> tmp(static_cast<size_t>(3 * ih * ow)), row(static_cast<size_t>(ow));
#pragma omp for schedule(dynamic, 1)
    for (int64_t n = 0; n < N; ++n) {
      const uint8_t* src = p.src + n * ih * iw * 3;
      for (int64_t y = 0; y < ih; ++y) {
        const uint8_t* in = src + y * iw * 3;
        for (int64_t x = 0; x < ow; ++x) {
          const float* w = tx.w.data() + x * tx.kmax;
          const uint8_t* px = in + tx.start[size_t(x)] * 3;
          float s0 = 0.f, s1 = 0.f, s2 = 0.f;
          for (int64_t j = 0; j < tx.count[size_t(x)]; ++j) {
            s0 += w[j] * float(px[3 * j]);
            s1 += w[j] * float(px[3 * j + 1]);
            s2 += w[j] * float(px[3 * j + 2]);
          }
          tmp[size_t((0 * ih + y) * ow + x)] = s0;
          tmp[size_t((1 * ih + y) * ow + x)] = s1;
          tmp[size_t((2 * ih + y) * ow + x)] = s2;
        }
      }
      for (int c = 0; c < 3; ++c) {
        const float sc = p.scale[c], sh = p.shift[c];
        for (int64_t y = 0; y < oh; ++y) {
          std::fill(row.begin(), row.end(), 0.f);
          const float* w = ty.w.data() + y * ty.kmax;
          for (int64_t j = 0; j < ty.count[size_t(y)]; ++j) {
            const float* r = tmp.data() + (c * ih + ty.start[size_t(y)] + j) * ow;
            const float wj = w[j];
            for (int64_t x = 0; x < ow; ++x) row[size_t(x)] += wj * r[x];
          }
          OutT* out = dst + (n * 3 + c) * plane + y * ow;
          for (int64_t x = 0; x < ow; ++x) store_as(out + x, row[size_t(x)] * sc + sh);
        }
      }
    }
  }
}

}  // namespace

int vector_width() { return kW; }

void jwth_pool(const JwthPoolParams& p) {
  const int nthreads = resolve_threads(p.num_threads);
  const int64_t B = p.B, D = p.D, H = p.H, C = p.C, d = D / H;
  const JwthCpuWorkspace ws = jwth_cpu_workspace(B, D, H, C);
  float* w = p.workspace;
  float *xc = w + ws.xc, *q = w + ws.q, *u = w + ws.u, *z = w + ws.z, *o = w + ws.o;
  float *xt = w + ws.xt, *yt = w + ws.yt;
  float* pooled = p.pooled ? p.pooled : w + ws.pooled;

  JWTH_DISPATCH_TOKEN_TYPES(p.tokens_dtype, float, fp16_t, bf16_t, T, "tokens", [&] {
    gather_class_tokens(static_cast<const T*>(p.tokens), B, p.T, D, xc, nthreads);
  });
  // Stage A.
  linear(B, D, D, xc, D, p.wq, p.bq, q, D, xt, yt, nthreads);
  const float inv_sqrt_d = 1.f / std::sqrt(float(d));
  constexpr int64_t kCols = 128;
  const int64_t col_blocks = (D + kCols - 1) / kCols;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t task = 0; task < H * col_blocks; ++task) {
    const int64_t h = task / col_blocks, n0 = (task % col_blocks) * kCols;
    // U[b, h, n] = sum_i q[b, h d + i] W_k[h d + i, n] / sqrt(d)
    gemm_nn(B, std::min(kCols, D - n0), d, q + h * d, D, 1, p.wk + h * d * D + n0, D, u + h * D + n0, H * D,
            inv_sqrt_d, nullptr, false);
  }
  // Stage B.
  JWTH_DISPATCH_TOKEN_TYPES(p.tokens_dtype, float, fp16_t, bf16_t, T, "tokens", [&] {
    token_pass<T>(p, u, z, nthreads);
  });
  // Stage C.
  value_projection(B, D, H, z, p.wv, p.bv, o, nthreads);
  linear(B, D, D, o, D, p.wo, p.bo, pooled, D, xt, yt, nthreads);
  linear(B, C, D, pooled, D, p.wc, p.bc, p.logits, C, xt, yt, nthreads);
}

void linear_probe(const LinearProbeParams& p) {
  const int nthreads = resolve_threads(p.num_threads);
  const LinearProbeCpuWorkspace ws = linear_probe_cpu_workspace(p.B, p.D, p.C);
  float* xc = p.workspace + ws.xc;
  JWTH_DISPATCH_TOKEN_TYPES(p.tokens_dtype, float, fp16_t, bf16_t, T, "tokens", [&] {
    gather_class_tokens(static_cast<const T*>(p.tokens), p.B, p.T, p.D, xc, nthreads);
  });
  linear(p.B, p.C, p.D, xc, p.D, p.wc, p.bc, p.logits, p.C, p.workspace + ws.xt, p.workspace + ws.yt, nthreads);
  if (p.pooled) std::copy(xc, xc + p.B * p.D, p.pooled);
}

void preprocess(const PreprocessParams& p) {
  switch (p.dst_dtype) {
    case DType::kFloat32: preprocess_typed<float>(p); break;
    case DType::kFloat16: preprocess_typed<fp16_t>(p); break;
    case DType::kBFloat16: preprocess_typed<bf16_t>(p); break;
    default: throw std::invalid_argument(std::string("dst: unsupported dtype ") + dtype_name(p.dst_dtype));
  }
}

}  // namespace JWTH_CPU_ISA_NS
}  // namespace cpu
}  // namespace jwth
