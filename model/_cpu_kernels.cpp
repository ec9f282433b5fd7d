// Fused float32 kernels for the encoder and the decoder step on MLX's CPU backend, as MLX primitives
// (model/cpu_kernels.py builds, loads and calls them; model/conformer.py and model/decoder.py use them on the CPU
// paths).
//
// MLX's x86-64 CPU build evaluates exp (so sigmoid, SiLU, softmax) one element at a time and runs every other
// elementwise op as its own pass over memory: a SiLU written as MLX arithmetic (model/cpu_math.py) is ~20 passes,
// a LayerNorm ~10. Each kernel here is one vectorised loop (AVX2 + FMA where the CPU has them, chosen at run time
// by target_clones) computing the same function: the exp polynomial is cpu_math's (Cephes, MLX's own CPU exp), the
// sums are in the order the MLX composition makes them. The packed matmul and the conformer attention built on it
// are register-blocked AVX-512 or AVX2 code chosen at load (their sums are in another order than BLAS's: equal up
// to float32 rounding). CPU only: eval_gpu throws (the GPU paths never call these).
//
// Inputs must be row-contiguous float32 (the Python wrappers make them so); outputs are fresh row-contiguous arrays.

#include <linux/futex.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <limits>
#include <mutex>
#include <system_error>
#include <thread>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include <nanobind/nanobind.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;
namespace nb = nanobind;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CANARY_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CANARY_CLONES
#endif

namespace {

constexpr float kLog2e = 1.4426950408889634f;

// 2**y for float32 y, clipped to [-126, 126]: model/cpu_math.py's _exp2, the same Cephes polynomial.
inline float exp2_poly(float y) {
  y = std::max(-126.0f, std::min(126.0f, y));
  float r = y + 12582912.0f;  // 1.5 * 2**23: rounds y to an integer kept in the low mantissa bits
  int32_t ri;
  std::memcpy(&ri, &r, 4);
  float f = y - (r - 12582912.0f);
  float p = 1.535336188319500e-4f * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  int32_t e = (ri - (0x4B400000 - 127)) * (1 << 23);
  float two_n;
  std::memcpy(&two_n, &e, 4);
  return two_n * p;
}

inline float silu1(float v) { return v / (1.0f + exp2_poly(v * -kLog2e)); }

CANARY_CLONES void silu_kernel(const float* x, float* y, size_t n) {
  for (size_t i = 0; i < n; i++) y[i] = silu1(x[i]);
}

// x (rows, 2C) -> y (rows, C): GLU over the last axis (first half times the sigmoid of the second), rows whose
// valid flag is false set to zero (the conformer convolution's masked_fill before the depthwise conv).
CANARY_CLONES void glu_mask_kernel(const float* x, const bool* valid, float* y, size_t rows, size_t c) {
  for (size_t r = 0; r < rows; r++) {
    float* out = y + r * c;
    if (valid != nullptr && !valid[r]) {
      std::fill(out, out + c, 0.0f);
      continue;
    }
    const float* a = x + r * 2 * c;
    const float* g = a + c;
    for (size_t i = 0; i < c; i++) out[i] = a[i] * (1.0f / (1.0f + exp2_poly(g[i] * -kLog2e)));
  }
}

// x (B, T, C) -> y (B, T, C): depthwise conv over time (kernel K, stride 1, zero 'same' padding), its bias, an
// affine per channel (inference BatchNorm folded to scale and shift), then SiLU. taps (K, C), bias/scale/shift (C).
// Output rows [r0, r1) of the B * T.
CANARY_CLONES void dwconv_affine_silu_kernel(const float* x, const float* taps, const float* bias, const float* scale,
                                             const float* shift, float* y, size_t t, size_t c, size_t k, size_t r0,
                                             size_t r1) {
  const long pad = static_cast<long>(k - 1) / 2;
  std::vector<float> acc(c);
  for (size_t r = r0; r < r1; r++) {
    const size_t bi = r / t, ti = r % t;
    const float* xb = x + bi * t * c;
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (size_t ki = 0; ki < k; ki++) {  // taps in order; a zero-padding tap would add 0
      long src = static_cast<long>(ti) + static_cast<long>(ki) - pad;
      if (src < 0 || src >= static_cast<long>(t)) continue;
      const float* xs = xb + static_cast<size_t>(src) * c;
      const float* w = taps + ki * c;
      for (size_t i = 0; i < c; i++) acc[i] += xs[i] * w[i];
    }
    float* out = y + (bi * t + ti) * c;
    for (size_t i = 0; i < c; i++) {
      float v = bias != nullptr ? acc[i] + bias[i] : acc[i];
      out[i] = silu1(v * scale[i] + shift[i]);
    }
  }
}

// The sum of value(0) .. value(n - 1): eight running partial sums over the first multiple of 8 values, added
// pairwise, then the rest one by one (LayerNorm's two sums and the row softmax's: the order they were written in).
template <class F>
__attribute__((always_inline)) inline float sum8(size_t n, F value) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; j++) s[j] += value(i + j);
  float sum = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  for (; i < n; i++) sum += value(i);
  return sum;
}

// x (rows, D) -> y: LayerNorm over the last axis (biased variance, two passes), then weight and bias.
CANARY_CLONES void layer_norm_kernel(const float* x, const float* w, const float* bias, float* y, size_t rows,
                                     size_t d, float eps) {
  for (size_t r = 0; r < rows; r++) {
    const float* xr = x + r * d;
    float* out = y + r * d;
    const float mean = sum8(d, [=](size_t i) { return xr[i]; }) / static_cast<float>(d);
    const float sq = sum8(d, [=](size_t i) {
      const float dv = xr[i] - mean;
      return dv * dv;
    });
    const float rstd = 1.0f / std::sqrt(sq / static_cast<float>(d) + eps);
    for (size_t i = 0; i < d; i++) out[i] = (xr[i] - mean) * rstd * w[i] + bias[i];
  }
}

// One row of relative-position attention weights: out[j] = softmax_j((ac[j] + bd[j]) / sqrt_dk) over n valid
// columns (bd already shifted to the row's position T-1-i); out must not alias ac or bd.
CANARY_CLONES void rel_softmax_row(const float* ac, const float* bd, float* out, size_t n, float sqrt_dk) {
  float m = -INFINITY;
  for (size_t j = 0; j < n; j++) {
    out[j] = (ac[j] + bd[j]) / sqrt_dk;
    m = std::max(m, out[j]);
  }
  for (size_t j = 0; j < n; j++) out[j] = exp2_poly((out[j] - m) * kLog2e);
  const float sum = sum8(n, [=](size_t j) { return out[j]; });
  for (size_t j = 0; j < n; j++) out[j] /= sum;
}

// Relative-position attention weights (NeMo's RelPositionMultiHeadAttention): ac (B, H, T, T) content scores,
// bd (B, H, T, 2T-1) position scores before rel_shift, valid (B, T). Row i of head h:
//   s[j] = (ac[i, j] + bd[i, T-1-i+j]) / sqrt_dk  for valid j, then softmax over the valid j, 0 elsewhere;
// a padded query row is all zeros (NeMo: masked_fill(-10000), softmax, masked_fill(0)).
CANARY_CLONES void rel_softmax_kernel(const float* ac, const float* bd, const bool* valid, float* y, size_t b,
                                      size_t h, size_t t, float sqrt_dk) {
  const size_t n = 2 * t - 1;
  for (size_t bi = 0; bi < b; bi++) {
    const bool* vb = valid + bi * t;
    size_t t_valid = 0;  // the valid frames are a prefix (lengths), so the valid columns are [0, t_valid)
    while (t_valid < t && vb[t_valid]) t_valid++;
    for (size_t hi = 0; hi < h; hi++) {
      for (size_t i = 0; i < t; i++) {
        const size_t row = (bi * h + hi) * t + i;
        float* out = y + row * t;
        if (i < t_valid) rel_softmax_row(ac + row * t, bd + row * n + (t - 1 - i), out, t_valid, sqrt_dk);
        std::fill(out + (i < t_valid ? t_valid : 0), out + t, 0.0f);
      }
    }
  }
}

// Greedy pick of a decoder step: per row of logits (B, V), the first index of the maximum and its log-softmax value
// logits[arg] - (max + log(sum_j exp(logits[j] - max))) (MLX's argmax and logsumexp, as the batch decoder's _pick
// composes them; its CPU exp is a scalar loop: ~0.9 ms of a batch-16 step at vocab 5248). Out (B, 2): the index as
// a float (exact below 2**24) and the log-prob; a row with +inf or NaN gets NaN, as the composition gives it (the
// overflow guard's signal); -inf logits are tokens that are never picked.
CANARY_CLONES void greedy_pick_kernel(const float* x, float* y, size_t b, size_t v) {
  constexpr size_t kChunk = 64;
  float e[kChunk];
  for (size_t r = 0; r < b; r++) {
    const float* row = x + r * v;
    float m = row[0];
    size_t arg = 0, bad = 0;
    for (size_t j = 0; j < v; j++) {
      bad += !(row[j] <= std::numeric_limits<float>::max());  // +inf or NaN (-inf is a token never picked)
      if (row[j] > m) m = row[j], arg = j;
    }
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (size_t j0 = 0; j0 < v; j0 += kChunk) {
      const size_t n = std::min(kChunk, v - j0);
      for (size_t j = 0; j < n; j++) e[j] = exp2_poly((row[j0 + j] - m) * kLog2e);
      size_t j = 0;
      for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) s[l] += e[j + l];
      for (; j < n; j++) s[j % 8] += e[j];
    }
    const float sum = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    y[2 * r] = static_cast<float>(arg);
    y[2 * r + 1] = bad == 0 ? row[arg] - (m + std::log(sum)) : NAN;
  }
}

// The walk the subsampling convs share: a 3x3 stride-2 window with padding 1 over (T, F), output row (bi, ti) of
// F_out positions written to `row`. A frame at or past len_out[bi] is zero; for every other output position, acc (C)
// starts at zero and tap(acc, bi, ts, fs, w_tap) is called for each in-range tap in row order (input frames at or
// past len_in[bi] count as zero padding, so they are skipped), then finish(acc, out) writes its C values.
template <class Tap, class Finish>
__attribute__((always_inline)) inline void stride2_3x3_row(const float* w, const int32_t* len_in,
                                                           const int32_t* len_out, float* row, float* acc, size_t t,
                                                           size_t f, size_t c, size_t f_out, size_t bi, size_t ti,
                                                           Tap tap, Finish finish) {
  if (static_cast<long>(ti) >= len_out[bi]) {
    std::fill(row, row + f_out * c, 0.0f);
    return;
  }
  const long t_in = std::min<long>(static_cast<long>(t), len_in[bi]);
  for (size_t fi = 0; fi < f_out; fi++) {
    std::fill(acc, acc + c, 0.0f);
    for (long i = 0; i < 3; i++) {
      long ts = 2 * static_cast<long>(ti) - 1 + i;
      if (ts < 0 || ts >= t_in) continue;
      for (long j = 0; j < 3; j++) {
        long fs = 2 * static_cast<long>(fi) - 1 + j;
        if (fs < 0 || fs >= static_cast<long>(f)) continue;
        tap(acc, bi, static_cast<size_t>(ts), static_cast<size_t>(fs), w + (i * 3 + j) * c);
      }
    }
    finish(acc, row + fi * c);
  }
}

// The first conv's tap and finish (3x3 stride-2 from one input channel x (B, T, F), + bias, ReLU), and the depthwise
// conv's (x (B, T, F, C), read through a ReLU with relu_in; + bias).
inline auto conv0_tap(const float* x, size_t t, size_t f, size_t c) {
  return [=](float* acc, size_t bi, size_t ts, size_t fs, const float* wt) {
    const float v = x[(bi * t + ts) * f + fs];
    for (size_t k = 0; k < c; k++) acc[k] += v * wt[k];
  };
}
inline auto conv0_finish(const float* bias, size_t c) {
  return [=](const float* acc, float* out) {
    for (size_t k = 0; k < c; k++) out[k] = std::max(acc[k] + bias[k], 0.0f);
  };
}
inline auto dw_finish(const float* bias, size_t c) {
  return [=](const float* acc, float* out) {
    for (size_t k = 0; k < c; k++) out[k] = acc[k] + bias[k];
  };
}
__attribute__((always_inline)) inline void dw_tap_row(float* acc, const float* xs, const float* wt, size_t c,
                                                      bool relu_in) {
  if (relu_in) {
    for (size_t k = 0; k < c; k++) acc[k] += std::max(xs[k], 0.0f) * wt[k];
  } else {
    for (size_t k = 0; k < c; k++) acc[k] += xs[k] * wt[k];
  }
}

// The dw_striding subsampling's first conv: features x (B, T, F) -> y (B, T1, F1, C), T1 = (T - 1) / 2 + 1 (F1
// likewise): 3x3 stride-2 conv from one input channel with padding 1, + bias, then ReLU. Input frames at or past
// len_in[b] read as zero (the masked features); output frames at or past len_out[b] are zero. w (3, 3, C). Output
// rows [r0, r1) of the B * T1.
CANARY_CLONES void conv0_kernel(const float* x, const float* w, const float* bias, const int32_t* len_in,
                                const int32_t* len_out, float* y, size_t t, size_t f, size_t c, size_t t1, size_t f1,
                                size_t r0, size_t r1) {
  std::vector<float> acc(c);
  for (size_t r = r0; r < r1; r++)
    stride2_3x3_row(w, len_in, len_out, y + r * f1 * c, acc.data(), t, f, c, f1, r / t1, r % t1,
                    conv0_tap(x, t, f, c), conv0_finish(bias, c));
}

// A depthwise 3x3 stride-2 conv with padding 1, + bias: x (B, T, F, C) -> y (B, T2, F2, C), taps (3, 3, C) summed
// in row order (model/conformer.py's _depthwise_shift_add). Input frames at or past len_in[b] read as zero, and
// with relu_in the input is read through a ReLU (the previous pointwise conv's mask and ReLU, fused here); output
// frames at or past len_out[b] are zero. Output rows [r0, r1) of the B * T2.
CANARY_CLONES void dw_s2_kernel(const float* x, const float* w, const float* bias, const int32_t* len_in,
                                const int32_t* len_out, bool relu_in, float* y, size_t t, size_t f, size_t c,
                                size_t t2, size_t f2, size_t r0, size_t r1) {
  std::vector<float> acc(c);
  auto tap = [=](float* acc, size_t bi, size_t ts, size_t fs, const float* wt) {
    dw_tap_row(acc, x + ((bi * t + ts) * f + fs) * c, wt, c, relu_in);
  };
  for (size_t r = r0; r < r1; r++)
    stride2_3x3_row(w, len_in, len_out, y + r * f2 * c, acc.data(), t, f, c, f2, r / t2, r % t2, tap,
                    dw_finish(bias, c));
}

// conv0_kernel then dw_s2_kernel (relu_in false) without the first conv's output in memory (at 30 s ~100 MB, written
// and read back): each thread computes the first conv's frames a depthwise row needs (three, the last one kept for
// the next row) into a ring of three frames and runs the depthwise taps over them. Same sums, so the same values.
// x (B, T, F) -> y (B, T2, F2, C); len0 (B) the features' lengths, len1 the first conv's, len2 the output's. Output
// rows [r0, r1) of the B * T2.
CANARY_CLONES void conv0_dw_s2_kernel(const float* x, const float* w0, const float* b0, const float* w1,
                                      const float* b1, const int32_t* len0, const int32_t* len1,
                                      const int32_t* len2, float* y, size_t t, size_t f, size_t c, size_t t1,
                                      size_t f1, size_t t2, size_t f2, size_t r0, size_t r1) {
  std::vector<float> acc(c), ring(3 * f1 * c);
  long tag[3] = {-1, -1, -1};  // bi * t1 + frame held by each slot
  auto frame = [&](size_t bi, size_t ts) -> const float* {
    const long want = static_cast<long>(bi * t1 + ts);
    float* slot = ring.data() + (ts % 3) * f1 * c;
    if (tag[ts % 3] != want) {
      stride2_3x3_row(w0, len0, len1, slot, acc.data(), t, f, c, f1, bi, ts, conv0_tap(x, t, f, c),
                      conv0_finish(b0, c));
      tag[ts % 3] = want;
    }
    return slot;
  };
  std::vector<float> acc2(c);
  auto tap = [&](float* a, size_t bi, size_t ts, size_t fs, const float* wt) {
    dw_tap_row(a, frame(bi, ts) + fs * c, wt, c, false);
  };
  for (size_t r = r0; r < r1; r++)
    stride2_3x3_row(w1, len1, len2, y + r * f2 * c, acc2.data(), t1, f1, c, f2, r / t2, r % t2, tap,
                    dw_finish(b1, c));
}

// y (M, N) = x (M, K) @ W^T for MLX's 8-bit affine quantization of W: q (N, K) bytes (MLX's uint32 words read as
// bytes: value k is byte k), scales and biases (N, K / gs), W[n, k] = scales[n, g] * q[n, k] + biases[n, g] for
// k in group g. Per group: scale * (x . q) + bias * sum(x), so the weights are read once, as bytes (a quarter of
// float32's), and never dequantised into memory. Rows n0 <= n < n1 of W.
// ---- two threads: the calling one (MLX's CPU stream) and one helper, for the kernels that read a lot of memory.
// The helper spins briefly after a job (a decoder step's matmuls come back to back), then sleeps on a futex; a
// forked child starts its own. One job at a time: a second caller meanwhile runs its work alone. Whoever claims the
// upper half first computes it: a caller done with its half before the helper woke up (on 2 cores the helper often
// waits for a core while Python builds the next step) does the rest itself instead of waiting for it.
namespace two_threads {

std::mutex start_mu, call_mu;
bool started = false;
unsigned job_gen = 0, done_gen = 0;  // futex words (generations wrap around)
unsigned claimed = 0;                // the last job whose upper half someone took
std::function<void()> job;
constexpr int kSpin = 2000;

inline void relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
}
void futex_wait(unsigned* addr, unsigned val) { syscall(SYS_futex, addr, FUTEX_WAIT_PRIVATE, val, nullptr, nullptr, 0); }
void futex_wake(unsigned* addr) { syscall(SYS_futex, addr, FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0); }

void worker(unsigned seen) {
  for (;;) {
    unsigned g;
    for (int i = 0; (g = __atomic_load_n(&job_gen, __ATOMIC_ACQUIRE)) == seen; i++) {
      if (i < kSpin)
        relax();
      else
        futex_wait(&job_gen, seen);
    }
    seen = g;
    unsigned expected = g - 1;
    if (!__atomic_compare_exchange_n(&claimed, &expected, g, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
      continue;  // the caller did this job's upper half
    job();
    __atomic_store_n(&done_gen, seen, __ATOMIC_RELEASE);
    futex_wake(&done_gen);
  }
}

void after_fork_in_child() {
  new (&start_mu) std::mutex();
  new (&call_mu) std::mutex();
  started = false;
  job_gen = done_gen = claimed = 0;
}

bool ensure_started() {
  std::lock_guard<std::mutex> lock(start_mu);
  if (!started) {
    static bool atfork = pthread_atfork(nullptr, nullptr, after_fork_in_child) == 0;
    if (!atfork) return false;
    try {
      std::thread(worker, __atomic_load_n(&job_gen, __ATOMIC_ACQUIRE)).detach();
      started = true;
    } catch (const std::system_error&) {
      return false;
    }
  }
  return true;
}

// fn(n0, n1) over [0, n): the helper takes the upper half when `worth` and it can run, else the caller does all.
template <class F>
void run(size_t n, bool worth, F fn) {
  std::unique_lock<std::mutex> call(call_mu, std::try_to_lock);
  if (!worth || n < 8 || !call.owns_lock() || !ensure_started()) {
    fn(0, n);
    return;
  }
  const size_t half = n / 2;
  job = [&fn, half, n]() { fn(half, n); };
  unsigned g = __atomic_add_fetch(&job_gen, 1, __ATOMIC_ACQ_REL);
  futex_wake(&job_gen);
  fn(0, half);
  unsigned expected = g - 1;
  if (__atomic_compare_exchange_n(&claimed, &expected, g, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
    fn(half, n);  // the helper has not started: do it here
    return;
  }
  unsigned d;
  for (int i = 0; (d = __atomic_load_n(&done_gen, __ATOMIC_ACQUIRE)) != g; i++) {
    if (i < kSpin)
      relax();
    else
      futex_wait(&done_gen, d);
  }
}

}  // namespace two_threads

void qmatmul8_generic(const float* x, const uint8_t* q, const float* scales, const float* biases, float* y,
                      size_t ldy, size_t m, size_t n, size_t k, size_t gs, const float* xsum) {
  const size_t groups = k / gs;
  for (size_t ni = 0; ni < n; ni++) {
    for (size_t mi = 0; mi < m; mi++) {
      float total = 0.0f;
      for (size_t g = 0; g < groups; g++) {
        float dot = 0.0f;
        for (size_t kk = 0; kk < gs; kk++) dot += static_cast<float>(q[ni * k + g * gs + kk]) * x[mi * k + g * gs + kk];
        total += scales[ni * groups + g] * dot + biases[ni * groups + g] * xsum[mi * groups + g];
      }
      y[mi * ldy + ni] = total;
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
// AVX2 + FMA: 16 bytes -> 16 floats once, FMA'd into up to 4 rows of x; the group's scale is applied to each row's
// vector sum (one horizontal sum per output, not per group).
template <int R>
__attribute__((target("avx2,fma"), always_inline)) inline void qmatmul8_rows(const float* x, size_t ldx,
                                                                             const uint8_t* qr, const float* sr,
                                                                             const float* br, const float* xsum,
                                                                             size_t groups, size_t k, size_t gs,
                                                                             float* out, size_t ldo) {
  __m256 total[R];
  float bias_part[R];
  for (int r = 0; r < R; r++) total[r] = _mm256_setzero_ps(), bias_part[r] = 0.0f;
  for (size_t g = 0; g < groups; g++) {
    __m256 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    const uint8_t* qg = qr + g * gs;
    for (size_t kk = 0; kk < gs; kk += 16) {
      __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qg + kk));
      __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
      __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
      for (int r = 0; r < R; r++) {
        const float* xg = x + r * ldx + g * gs + kk;
        acc[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xg), acc[r]);
        acc[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xg + 8), acc[r]);
      }
    }
    const __m256 scale = _mm256_set1_ps(sr[g]);
    for (int r = 0; r < R; r++) {
      total[r] = _mm256_fmadd_ps(scale, acc[r], total[r]);
      bias_part[r] += br[g] * xsum[r * groups + g];
    }
  }
  for (int r = 0; r < R; r++) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(total[r]), _mm256_extractf128_ps(total[r], 1));
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    out[r * ldo] = _mm_cvtss_f32(lo) + bias_part[r];
  }
}

__attribute__((target("avx2,fma"))) void qmatmul8_avx2(const float* x, const uint8_t* q, const float* scales,
                                                       const float* biases, float* y, size_t ldy, size_t m, size_t n,
                                                       size_t k, size_t gs, const float* xsum) {
  const size_t groups = k / gs;
  for (size_t ni = 0; ni < n; ni++) {
    const uint8_t* qr = q + ni * k;
    const float* sr = scales + ni * groups;
    const float* br = biases + ni * groups;
    size_t mi = 0;
    for (; mi + 4 <= m; mi += 4)
      qmatmul8_rows<4>(x + mi * k, k, qr, sr, br, xsum + mi * groups, groups, k, gs, y + mi * ldy + ni, ldy);
    for (; mi < m; mi++)
      qmatmul8_rows<1>(x + mi * k, k, qr, sr, br, xsum + mi * groups, groups, k, gs, y + mi * ldy + ni, ldy);
  }
}
#endif

// y (M, N) = x (M, K) @ W^T for MLX's 8-bit affine quantization of W: q (N, K) bytes (MLX's uint32 words read as
// bytes: value k is byte k), scales and biases (N, K / gs), W[n, k] = scales[n, g] * q[n, k] + biases[n, g] for
// k in group g. Per group: scale * (x . q) + bias * sum(x), so the weights are read once, as bytes (a quarter of
// float32's), and never dequantised into memory.
// Rows [n0, n1) of W.
void qmatmul8_part(const float* x, const uint8_t* q, const float* scales, const float* biases, float* y, size_t m,
                   size_t n, size_t k, size_t gs, const float* xsum, size_t n0, size_t n1) {
  const size_t groups = k / gs;
  const uint8_t* qp = q + n0 * k;
  const float *sp = scales + n0 * groups, *bp = biases + n0 * groups;
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2 && gs % 16 == 0) return qmatmul8_avx2(x, qp, sp, bp, y + n0, n, m, n1 - n0, k, gs, xsum);
#endif
  qmatmul8_generic(x, qp, sp, bp, y + n0, n, m, n1 - n0, k, gs, xsum);
}

void qmatmul8_kernel(const float* x, const uint8_t* q, const float* scales, const float* biases, float* y, size_t m,
                     size_t n, size_t k, size_t gs) {
  const size_t groups = k / gs;
  std::vector<float> xsum(m * groups);
  for (size_t mi = 0; mi < m; mi++)
    for (size_t g = 0; g < groups; g++) {
      float s = 0.0f;
      for (size_t kk = 0; kk < gs; kk++) s += x[mi * k + g * gs + kk];
      xsum[mi * groups + g] = s;
    }
  const float* xs = xsum.data();
  two_threads::run(n, m * n * k >= (1u << 16), [=](size_t n0, size_t n1) {
    qmatmul8_part(x, q, scales, biases, y, m, n, k, gs, xs, n0, n1);
  });
}

// Attention of one query per row (a decoder step): q (R = B * H, D), k and v (R, L, D), an additive mask (B or 1
// rows, L) or none. Row r (batch b = r / h): s[j] = (q * scale) . k[j] + mask[j], softmax over j, out = sum_j p[j]
// v[j] (MLX's scaled_dot_product_attention composition on the CPU: the same function). Positions masked with
// NeMo's NEG_INF (mask <= -10000) are left out: their weight exp(-10000 - max) is 0 in float32 anyway (at most
// 2**-126 through the clipped exp), and their K/V are never read, so a self-attention cache is read up to the
// row's position, not to its capacity. A row with no unmasked position uses them all (the composition's result).
constexpr float kMasked = -10000.0f;

CANARY_CLONES void decode_attention_part(const float* q, const float* k, const float* v, const float* mask,
                                         size_t mask_stride, float* y, size_t h, size_t l, size_t d, float scale,
                                         size_t r0, size_t r1) {
  std::vector<float> e(l), qs(d);
  std::vector<uint32_t> idx(l);
  for (size_t r = r0; r < r1; r++) {
    const float* mr = mask != nullptr ? mask + (r / h) * mask_stride : nullptr;
    const float* qr = q + r * d;
    const float* kr = k + r * l * d;
    const float* vr = v + r * l * d;
    for (size_t i = 0; i < d; i++) qs[i] = qr[i] * scale;
    size_t n = 0;
    for (size_t j = 0; j < l; j++)
      if (mr == nullptr || mr[j] > kMasked) idx[n++] = static_cast<uint32_t>(j);
    if (n == 0)
      for (size_t j = 0; j < l; j++) idx[n++] = static_cast<uint32_t>(j);
    float m = -INFINITY;
    for (size_t t = 0; t < n; t++) {
      const float* kj = kr + size_t(idx[t]) * d;
      float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      size_t i = 0;
      for (; i + 8 <= d; i += 8)
        for (int u = 0; u < 8; u++) a[u] += qs[i + u] * kj[i + u];
      float s = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
      for (; i < d; i++) s += qs[i] * kj[i];
      if (mr != nullptr) s += mr[idx[t]];
      e[t] = s;
      m = std::max(m, s);
    }
    float sum = 0.0f;
    for (size_t t = 0; t < n; t++) {
      e[t] = exp2_poly((e[t] - m) * kLog2e);
      sum += e[t];
    }
    const float inv = 1.0f / sum;
    float* out = y + r * d;
    std::fill(out, out + d, 0.0f);
    for (size_t t = 0; t < n; t++) {
      const float p = e[t] * inv;
      const float* vj = vr + size_t(idx[t]) * d;
      for (size_t i = 0; i < d; i++) out[i] += p * vj[i];
    }
  }
}

void decode_attention_kernel(const float* q, const float* k, const float* v, const float* mask, size_t mask_stride,
                             float* y, size_t rows, size_t h, size_t l, size_t d, float scale) {
  two_threads::run(rows, rows * l * d >= (1u << 15), [=](size_t r0, size_t r1) {
    decode_attention_part(q, k, v, mask, mask_stride, y, h, l, d, scale, r0, r1);
  });
}

// ---- packed matmul (AVX-512 or AVX2): y = x @ W^T + bias for the encoder's and decoder's Linear layers --------
// W (N, K) is stored once, at load, as panels of 32 output features, K-major: wp[p][k][j] = W[32 p + j][k]
// (model/cpu_layout.py's PackedLinear). Each 12 x 32 block of y is 24 AVX-512 accumulators fed by one panel row
// (two vectors) and 12 broadcasts of x per k. Against OpenBLAS's sgemm it saves packing W on every call (~20% at
// the 63 rows of a 5 s clip) and uses the full 512-bit FMAs where the CPU has them, which the AVX2 kernels of an
// OpenBLAS that does not know the CPU (or is told to run them) leave at half width. K is cut into blocks of 512
// (a block of 120 rows of x and one panel's block stay in L2), y accumulates across them; the calling thread and
// the helper take half of the panels each; while one panel is computed the next one's block is prefetched.
constexpr size_t kPanel = 32, kTileRows = 12, kBlockK = 512, kBlockTiles = 10;

#if defined(__x86_64__) && defined(__GNUC__)
#define CANARY_AVX512 __attribute__((target("avx512f,fma")))

template <int R>
CANARY_AVX512 __attribute__((always_inline)) inline void packed_block(const float* a, const float* b, size_t kn,
                                                                       float* y, size_t ldy, const float* bias,
                                                                       bool first, const char* pf, int pf_lines) {
  __m512 c0[R], c1[R];
#pragma GCC unroll 12
  for (int i = 0; i < R; i++) {
    if (!first) {
      c0[i] = _mm512_loadu_ps(y + i * ldy);
      c1[i] = _mm512_loadu_ps(y + i * ldy + 16);
    } else if (bias) {
      c0[i] = _mm512_loadu_ps(bias);
      c1[i] = _mm512_loadu_ps(bias + 16);
    } else {
      c0[i] = c1[i] = _mm512_setzero_ps();
    }
  }
  for (size_t k = 0; k < kn; k++) {
    if (pf_lines) {  // the next panel's block: pf_lines cache lines per k
      _mm_prefetch(pf + k * 64 * pf_lines, _MM_HINT_T0);
      if (pf_lines == 2) _mm_prefetch(pf + k * 128 + 64, _MM_HINT_T0);
    }
    const __m512 b0 = _mm512_loadu_ps(b + k * kPanel), b1 = _mm512_loadu_ps(b + k * kPanel + 16);
#pragma GCC unroll 12
    for (int i = 0; i < R; i++) {
      const __m512 av = _mm512_set1_ps(a[k * kTileRows + i]);
      c0[i] = _mm512_fmadd_ps(av, b0, c0[i]);
      c1[i] = _mm512_fmadd_ps(av, b1, c1[i]);
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < R; i++) {
    _mm512_storeu_ps(y + i * ldy, c0[i]);
    _mm512_storeu_ps(y + i * ldy + 16, c1[i]);
  }
}

using packed_block_fn = void (*)(const float*, const float*, size_t, float*, size_t, const float*, bool, const char*,
                                 int);
template <int R>
CANARY_AVX512 void packed_block_rows(const float* a, const float* b, size_t kn, float* y, size_t ldy,
                                     const float* bias, bool first, const char* pf, int pf_lines) {
  packed_block<R>(a, b, kn, y, ldy, bias, first, pf, pf_lines);
}
constexpr packed_block_fn kPackedBlocks[kTileRows + 1] = {
    nullptr,               packed_block_rows<1>,  packed_block_rows<2>, packed_block_rows<3>, packed_block_rows<4>,
    packed_block_rows<5>,  packed_block_rows<6>,  packed_block_rows<7>, packed_block_rows<8>, packed_block_rows<9>,
    packed_block_rows<10>, packed_block_rows<11>, packed_block_rows<12>};

// conv0_dw_s2_kernel with the channels in registers, 64 at a time (AVX-512; C a multiple of 64): the same products
// and sums in the same order, unfused as the C++ loops compile (multiply, then add), so the same values; ~3x faster
// (the loops keep their sums in memory).
CANARY_AVX512 void conv0_frame_avx512(const float* x, const float* w0, const float* b0, const int32_t* len0,
                                      const int32_t* len1, float* out, size_t t, size_t f, size_t c, size_t f1,
                                      size_t bi, size_t ts) {
  if (static_cast<long>(ts) >= len1[bi]) {
    std::fill(out, out + f1 * c, 0.0f);
    return;
  }
  const long t_in = std::min<long>(static_cast<long>(t), len0[bi]);
  const __m512 zero = _mm512_setzero_ps();
  for (size_t fi = 0; fi < f1; fi++) {
    for (size_t c0 = 0; c0 < c; c0 += 64) {
      __m512 acc[4] = {zero, zero, zero, zero};
      for (long i = 0; i < 3; i++) {
        const long src = 2 * static_cast<long>(ts) - 1 + i;
        if (src < 0 || src >= t_in) continue;
        for (long j = 0; j < 3; j++) {
          const long fs = 2 * static_cast<long>(fi) - 1 + j;
          if (fs < 0 || fs >= static_cast<long>(f)) continue;
          const __m512 v = _mm512_set1_ps(x[(bi * t + static_cast<size_t>(src)) * f + static_cast<size_t>(fs)]);
          const float* wt = w0 + (i * 3 + j) * c + c0;
          for (int q = 0; q < 4; q++) acc[q] = _mm512_add_ps(acc[q], _mm512_mul_ps(v, _mm512_loadu_ps(wt + 16 * q)));
        }
      }
      for (int q = 0; q < 4; q++)  // max(0, a) as std::max(a, 0.0f): a NaN stays NaN
        _mm512_storeu_ps(out + fi * c + c0 + 16 * q,
                         _mm512_max_ps(zero, _mm512_add_ps(acc[q], _mm512_loadu_ps(b0 + c0 + 16 * q))));
    }
  }
}

CANARY_AVX512 void conv0_dw_s2_avx512(const float* x, const float* w0, const float* b0, const float* w1,
                                      const float* b1, const int32_t* len0, const int32_t* len1,
                                      const int32_t* len2, float* y, size_t t, size_t f, size_t c, size_t t1,
                                      size_t f1, size_t t2, size_t f2, size_t r0, size_t r1) {
  std::vector<float> ring(3 * f1 * c);
  long tag[3] = {-1, -1, -1};  // bi * t1 + frame held by each slot
  const __m512 zero = _mm512_setzero_ps();
  for (size_t r = r0; r < r1; r++) {
    const size_t bi = r / t2, ti = r % t2;
    float* row = y + r * f2 * c;
    if (static_cast<long>(ti) >= len2[bi]) {
      std::fill(row, row + f2 * c, 0.0f);
      continue;
    }
    const long t_in = std::min<long>(static_cast<long>(t1), len1[bi]);
    const float* frames[3] = {nullptr, nullptr, nullptr};  // the first conv's frames 2 ti - 1 .. 2 ti + 1
    for (long i = 0; i < 3; i++) {
      const long ts = 2 * static_cast<long>(ti) - 1 + i;
      if (ts < 0 || ts >= t_in) continue;
      float* slot = ring.data() + (ts % 3) * f1 * c;
      const long want = static_cast<long>(bi * t1) + ts;
      if (tag[ts % 3] != want) {
        conv0_frame_avx512(x, w0, b0, len0, len1, slot, t, f, c, f1, bi, static_cast<size_t>(ts));
        tag[ts % 3] = want;
      }
      frames[i] = slot;
    }
    for (size_t fo = 0; fo < f2; fo++) {
      for (size_t c0 = 0; c0 < c; c0 += 64) {
        __m512 acc[4] = {zero, zero, zero, zero};
        for (long i = 0; i < 3; i++) {
          if (frames[i] == nullptr) continue;
          for (long j = 0; j < 3; j++) {
            const long fs = 2 * static_cast<long>(fo) - 1 + j;
            if (fs < 0 || fs >= static_cast<long>(f1)) continue;
            const float* xs = frames[i] + static_cast<size_t>(fs) * c + c0;
            const float* wt = w1 + (i * 3 + j) * c + c0;
            for (int q = 0; q < 4; q++)
              acc[q] = _mm512_add_ps(acc[q], _mm512_mul_ps(_mm512_loadu_ps(xs + 16 * q), _mm512_loadu_ps(wt + 16 * q)));
          }
        }
        for (int q = 0; q < 4; q++)
          _mm512_storeu_ps(row + fo * c + c0 + 16 * q, _mm512_add_ps(acc[q], _mm512_loadu_ps(b1 + c0 + 16 * q)));
      }
    }
  }
}

// x's rows as one K-major tile (pack_tiles' layout) with AVX-512: 16 columns of up to 12 rows at a time, loaded as
// rows (missing rows zero), transposed in registers (16 x 16: 32-bit and 64-bit interleaves, then two rounds of
// 128-bit lane shuffles) and stored column by column; plus add (k) if given, the same single addition per value.
CANARY_AVX512 void pack_tile_avx512(const float* x, size_t ldx, const float* add, float* tile, size_t rows,
                                    size_t k) {
  const __m512 zero = _mm512_setzero_ps();
  for (size_t k0 = 0; k0 < k; k0 += 16) {
    const size_t cols = std::min<size_t>(16, k - k0);
    const __mmask16 cm = static_cast<__mmask16>(cols == 16 ? 0xFFFFu : (1u << cols) - 1);
    const __m512 av = add ? _mm512_maskz_loadu_ps(cm, add + k0) : zero;
    __m512 r[16], t[16];
#pragma GCC unroll 16
    for (size_t i = 0; i < 16; i++) {
      if (i < rows) {
        const __m512 v = _mm512_maskz_loadu_ps(cm, x + i * ldx + k0);
        r[i] = add ? _mm512_add_ps(v, av) : v;
      } else {
        r[i] = zero;
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) {  // per 128-bit lane L: (a[4L], b[4L], a[4L+1], b[4L+1]) and (a[4L+2], ...)
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) {  // r[4i + j], lane L: rows 4i .. 4i+3 of column 4L + j
      const __m512d a0 = _mm512_castps_pd(t[4 * i]), a1 = _mm512_castps_pd(t[4 * i + 1]);
      const __m512d b0 = _mm512_castps_pd(t[4 * i + 2]), b1 = _mm512_castps_pd(t[4 * i + 3]);
      r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, b0));
      r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, b0));
      r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, b1));
      r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, b1));
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) {  // lanes 0, 2 (0x88) or 1, 3 (0xdd) of two groups of rows
      t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
      t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xdd);
      t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
      t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xdd);
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) {  // r[c]: column c, rows 0 .. 15
      r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
      r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
      r[4 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88);
      r[12 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xdd);
    }
    // whole 16-lane stores (lanes 12..15 are zero rows, overwritten by the next column's store), but a masked
    // one for the tile's last column (past it is the next tile, maybe being packed by the other thread)
#pragma GCC unroll 16
    for (size_t j = 0; j < 16; j++) {
      if (j >= cols) break;
      if (k0 + j + 1 < k)
        _mm512_storeu_ps(tile + (k0 + j) * kTileRows, r[j]);
      else
        _mm512_mask_storeu_ps(tile + (k0 + j) * kTileRows, 0x0FFF, r[j]);
    }
  }
}

// AVX2 + FMA (16 vector registers): the same layouts, a 12-row tile as groups of 3 rows x 32 columns (12
// accumulators, one panel vector and 3 broadcasts live); the panel's block is read once per group, from L2.
#define CANARY_AVX2 __attribute__((target("avx2,fma")))

template <int R>
CANARY_AVX2 __attribute__((always_inline)) inline void packed_group_avx2(const float* a, const float* b, size_t kn,
                                                                          float* y, size_t ldy, const float* bias,
                                                                          bool first, const char* pf, int pf_lines) {
  __m256 c[R][4];
#pragma GCC unroll 3
  for (int i = 0; i < R; i++)
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++)
      c[i][j] = !first ? _mm256_loadu_ps(y + i * ldy + 8 * j) : bias ? _mm256_loadu_ps(bias + 8 * j) : _mm256_setzero_ps();
  for (size_t k = 0; k < kn; k++) {
    if (pf_lines) {
      _mm_prefetch(pf + k * 64 * pf_lines, _MM_HINT_T0);
      if (pf_lines == 2) _mm_prefetch(pf + k * 128 + 64, _MM_HINT_T0);
    }
    __m256 av[R];
#pragma GCC unroll 3
    for (int i = 0; i < R; i++) av[i] = _mm256_broadcast_ss(a + k * kTileRows + i);
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) {
      const __m256 bj = _mm256_loadu_ps(b + k * kPanel + 8 * j);
#pragma GCC unroll 3
      for (int i = 0; i < R; i++) c[i][j] = _mm256_fmadd_ps(av[i], bj, c[i][j]);
    }
  }
#pragma GCC unroll 3
  for (int i = 0; i < R; i++)
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) _mm256_storeu_ps(y + i * ldy + 8 * j, c[i][j]);
}

template <int R>
CANARY_AVX2 void packed_block_avx2(const float* a, const float* b, size_t kn, float* y, size_t ldy,
                                   const float* bias, bool first, const char* pf, int pf_lines) {
  int i = 0;
  for (; i + 3 <= R; i += 3)  // only the first group prefetches
    packed_group_avx2<3>(a + i, b, kn, y + i * ldy, ldy, bias, first, i == 0 ? pf : nullptr, i == 0 ? pf_lines : 0);
  if constexpr (R % 3 != 0)
    packed_group_avx2<R % 3>(a + i, b, kn, y + i * ldy, ldy, bias, first, i == 0 ? pf : nullptr,
                             i == 0 ? pf_lines : 0);
}
constexpr packed_block_fn kPackedBlocksAvx2[kTileRows + 1] = {
    nullptr,               packed_block_avx2<1>,  packed_block_avx2<2>, packed_block_avx2<3>, packed_block_avx2<4>,
    packed_block_avx2<5>,  packed_block_avx2<6>,  packed_block_avx2<7>, packed_block_avx2<8>, packed_block_avx2<9>,
    packed_block_avx2<10>, packed_block_avx2<11>, packed_block_avx2<12>};

// The blocks this CPU runs: AVX-512's, else AVX2's, else none (the packed matmul is then not offered).
int best_packed_isa() {
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
  return 0;
}
std::atomic<int> packed_isa_now{best_packed_isa()};
const packed_block_fn* packed_blocks() {
  const int isa = packed_isa_now.load(std::memory_order_relaxed);
  return isa == 2 ? kPackedBlocks : isa == 1 ? kPackedBlocksAvx2 : nullptr;
}

// x's m rows in tiles of at most 12: as few tiles as that takes, their rows shared out evenly (16 rows: 8 + 8, not
// 12 + 4: a block of few rows is bound by the FMA latency, not its arithmetic, and a fast block's prefetches of the
// next panel come too close together). Tile t holds rows [tile_row(t), tile_row(t + 1)).
inline size_t tile_count(size_t m) { return (m + kTileRows - 1) / kTileRows; }
inline size_t tile_row(size_t t, size_t m) { return t * m / tile_count(m); }

// Panels [p0, p1) of y (m rows, row stride ldy) from the packed x (pack_tiles: tiles of up to 12 rows, K-major) and
// the packed weight.
void packed_part(const float* ap, const float* wp, const float* bias, float* y, size_t ldy, size_t m, size_t k,
                 size_t p0, size_t p1) {
  const size_t tiles = tile_count(m);
  const packed_block_fn* blocks = packed_blocks();
  for (size_t t0 = 0; t0 < tiles; t0 += kBlockTiles) {  // a group of tiles: its x and its y stay in L2
    const size_t t1 = std::min(tiles, t0 + kBlockTiles);
    for (size_t k0 = 0; k0 < k; k0 += kBlockK) {
      const size_t kn = std::min(kBlockK, k - k0);
      for (size_t p = p0; p < p1; p++) {
        const float* b = wp + (p * k + k0) * kPanel;
        const char* next = p + 1 < p1 ? reinterpret_cast<const char*>(wp + ((p + 1) * k + k0) * kPanel) : nullptr;
        for (size_t t = t0; t < t1; t++) {
          // the next panel's block (kn * 128 bytes) is prefetched by the first two tiles, a line per k each (one
          // tile: two lines per k)
          const char* pf = nullptr;
          int pf_lines = 0;
          if (next && t1 - t0 == 1) {
            pf = next, pf_lines = 2;
          } else if (next && t - t0 < 2) {
            pf = next + (t - t0) * kn * 64, pf_lines = 1;
          }
          const size_t row0 = tile_row(t, m), rows = tile_row(t + 1, m) - row0;
          blocks[rows](ap + (t * k + k0) * kTileRows, b, kn, y + row0 * ldy + p * kPanel, ldy,
                       bias ? bias + p * kPanel : nullptr, k0 == 0, pf, pf_lines);
        }
      }
    }
  }
}

bool packed_supported() { return packed_blocks() != nullptr; }
// The hand-vectorised AVX-512 loops (the subsampling's first two convs, packing x into tiles) run where the packed
// matmul's AVX-512 build does (set_packed_isa turns them off with it for tests: the same values either way).
bool avx512_loops() { return packed_isa_now.load(std::memory_order_relaxed) == 2; }

// 'avx512', 'avx2' or '' (none); set_packed_isa(name) runs a lower build than the best (tests and benches compare
// them; '': the best) and returns the previous one. Layouts are the same for every build.
const char* packed_isa_name(int isa) { return isa == 2 ? "avx512" : isa == 1 ? "avx2" : ""; }
std::string packed_isa() { return packed_isa_name(packed_isa_now.load()); }
std::string set_packed_isa(const std::string& name) {
  const int best = best_packed_isa();
  int want = name == "avx512" ? 2 : name == "avx2" ? 1 : name.empty() ? best : -1;
  if (want < 0) throw std::invalid_argument("set_packed_isa: 'avx512', 'avx2' or ''");
  return packed_isa_name(packed_isa_now.exchange(std::min(want, best)));
}
#else
bool packed_supported() { return false; }
bool avx512_loops() { return false; }
void pack_tile_avx512(const float*, size_t, const float*, float*, size_t, size_t) {}
std::string packed_isa() { return ""; }
std::string set_packed_isa(const std::string&) { return ""; }
void packed_part(const float*, const float*, const float*, float*, size_t, size_t, size_t, size_t, size_t) {}
void conv0_dw_s2_avx512(const float*, const float*, const float*, const float*, const float*, const int32_t*,
                        const int32_t*, const int32_t*, float*, size_t, size_t, size_t, size_t, size_t, size_t, size_t,
                        size_t, size_t) {}
#endif

inline size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

// tiles [t0, t1) of x's m rows (row stride ldx; tile_row's tiles), plus add (k) if given -> K-major tiles of 12
// rows: ap[t][k][i] = x[tile_row(t) + i][k] (+ add[k]); a tile's missing rows are left unset or zero (the blocks
// read only the rows they have). With AVX-512 a tile is transposed in registers (pack_tile_avx512; as scalar copies
// the packing took ~5% of a batch's encoder, ~10% of one clip's)
void pack_tiles(const float* x, size_t ldx, const float* add, float* ap, size_t m, size_t k, size_t t0, size_t t1) {
  const bool vec = avx512_loops();
  for (size_t t = t0; t < t1; t++) {
    const size_t row0 = tile_row(t, m), rows = tile_row(t + 1, m) - row0;
    float* tile = ap + t * k * kTileRows;
    if (vec) {
      pack_tile_avx512(x + row0 * ldx, ldx, add, tile, rows, k);
      continue;
    }
    for (size_t k0 = 0; k0 < k; k0 += 16) {  // 16 columns at a time: the tile's part written stays in L1
      const size_t k1 = std::min(k, k0 + 16);
      for (size_t i = 0; i < rows; i++) {
        const float* src = x + (row0 + i) * ldx;
        if (add) {
          for (size_t kk = k0; kk < k1; kk++) tile[kk * kTileRows + i] = src[kk] + add[kk];
        } else {
          for (size_t kk = k0; kk < k1; kk++) tile[kk * kTileRows + i] = src[kk];
        }
      }
    }
  }
}

// rows [0, m) of w (row stride ldw, k columns) as weight panels of 32 rows (pack_weight's layout), rows past m zero
void pack_panels(const float* w, size_t ldw, float* wp, size_t m, size_t k) {
  const size_t panels = round_up(m, kPanel) / kPanel;
  for (size_t pi = 0; pi < panels; pi++) {
    float* dst = wp + pi * k * kPanel;
    for (size_t l = 0; l < kPanel; l++) {
      const size_t r = pi * kPanel + l;
      if (r < m) {
        const float* src = w + r * ldw;
        for (size_t kk = 0; kk < k; kk++) dst[kk * kPanel + l] = src[kk];
      } else {
        for (size_t kk = 0; kk < k; kk++) dst[kk * kPanel + l] = 0.0f;
      }
    }
  }
}

void packed_linear_kernel(const float* x, const float* wp, const float* bias, float* y, float* ap, size_t m,
                          size_t k, size_t n) {
  two_threads::run(tile_count(m), m * k >= (1u << 16),
                   [=](size_t t0, size_t t1) { pack_tiles(x, k, nullptr, ap, m, k, t0, t1); });
  two_threads::run(n / kPanel, m * n * k >= (1u << 18),
                   [=](size_t p0, size_t p1) { packed_part(ap, wp, bias, y, n, m, k, p0, p1); });
}

// ---- relative-position self-attention (through the packed matmul's blocks) -----------------------------------
// The conformer's attention after its q, k, v projections (NeMo's RelPositionMultiHeadAttention): q, k, v (B, T,
// D = H * dk) as the Linears give them, p (2T-1, D) the projected positions T-1 .. -(T-1), u and vb (H, dk) the
// position biases, valid (B, T) (a prefix per row). Query row i of head h: s[j] = ((q_i + u) . k_j + (q_i + vb) .
// p[T-1-i+j]) / sqrt(dk) over the valid j, softmax, out_i = sum_j a[j] v_j, written to y (B, T, D) at the head's
// columns; a padded query row is zero (NeMo: its weights are masked to 0). The same function as the composition
// (two score matmuls, rel_shift, masked softmax, the weighted sum), computed per batch row and head with the
// packed matmul's blocks (AVX-512 or AVX2): MLX's CPU backend makes one BLAS call per batch row and head for each of the
// three products, which at a 5 s clip's 63 frames cost more than their arithmetic. Needs dk a multiple of 32.
void rel_attention_part(const float* q, const float* k, const float* v, const float* p, const float* u,
                        const float* vb, const bool* valid, float* y, size_t t, size_t h, size_t dk, size_t job0,
                        size_t job1) {
  const size_t d_model = h * dk, n = 2 * t - 1;
  const size_t tiles = tile_count(t), tp = round_up(t, kPanel), np = round_up(n, kPanel);
  std::vector<float> qu(tiles * kTileRows * dk), qv(qu.size()), kp(tp * dk), pp(np * dk), vp(dk * t),
      ac(t * tp), bd(t * np), at(tiles * kTileRows * t), e(t);
  const float sqrt_dk = std::sqrt(static_cast<float>(dk));
  for (size_t job = job0; job < job1; job++) {
    const size_t bi = job / h, col = (job % h) * dk;
    const bool* vrow = valid + bi * t;
    size_t tv = 0;  // the valid frames are a prefix (lengths)
    while (tv < t && vrow[tv]) tv++;
    float* out = y + bi * t * d_model + col;
    for (size_t i = tv; i < t; i++) std::fill(out + i * d_model, out + i * d_model + dk, 0.0f);
    if (tv == 0) continue;
    const float* qb = q + bi * t * d_model + col;
    const float* kb = k + bi * t * d_model + col;
    const float* vbase = v + bi * t * d_model + col;
    pack_tiles(qb, d_model, u + col, qu.data(), tv, dk, 0, tile_count(tv));
    pack_tiles(qb, d_model, vb + col, qv.data(), tv, dk, 0, tile_count(tv));
    pack_panels(kb, d_model, kp.data(), tv, dk);
    pack_panels(p + col, d_model, pp.data(), n, dk);
    // ac (tv, keys), bd (tv, positions): only the positions some valid row reads, [t - tv, t - 1 + tv)
    const size_t pos0 = (t - tv) / kPanel, pos1 = round_up(t - 1 + tv, kPanel) / kPanel;
    packed_part(qu.data(), kp.data(), nullptr, ac.data(), tp, tv, dk, 0, round_up(tv, kPanel) / kPanel);
    packed_part(qv.data(), pp.data(), nullptr, bd.data(), np, tv, dk, pos0, pos1);
    // V^T as panels of 32 of its dk rows: vp[c][j][l] = v[j][32 c + l], j < tv
    for (size_t c = 0; c < dk / kPanel; c++)
      for (size_t j = 0; j < tv; j++)
        std::memcpy(vp.data() + (c * tv + j) * kPanel, vbase + j * d_model + c * kPanel, kPanel * sizeof(float));
    for (size_t ti = 0; ti < tile_count(tv); ti++) {  // the weights in pack_tiles' layout
      for (size_t i = tile_row(ti, tv); i < tile_row(ti + 1, tv); i++) {
        rel_softmax_row(ac.data() + i * tp, bd.data() + i * np + (t - 1 - i), e.data(), tv, sqrt_dk);
        float* dst = at.data() + ti * tv * kTileRows + (i - tile_row(ti, tv));
        for (size_t j = 0; j < tv; j++) dst[j * kTileRows] = e[j];
      }
    }
    packed_part(at.data(), vp.data(), nullptr, out, d_model, tv, tv, 0, dk / kPanel);
  }
}

void rel_attention_kernel(const float* q, const float* k, const float* v, const float* p, const float* u,
                          const float* vb, const bool* valid, float* y, size_t b, size_t t, size_t h, size_t dk) {
  two_threads::run(b * h, b * h * t * t * dk >= (1u << 16), [=](size_t j0, size_t j1) {
    rel_attention_part(q, k, v, p, u, vb, valid, y, t, h, dk, j0, j1);
  });
}

// The elementwise kernels above split their rows (silu: blocks of kSplitBlock values) between the two threads from
// kSplitMin output values (~10 us of work): each row is computed as one thread alone would, so the results are too.
constexpr size_t kSplitMin = 1u << 15, kSplitBlock = 4096;

// ---- MLX primitives ------------------------------------------------------------------------------------------

enum class Op {
  Silu, GluMask, DwConvAffineSilu, LayerNorm, RelSoftmax, Conv0, DwS2, Conv0DwS2, QMatmul8, DecodeAttention,
  PackedLinear, RelAttention, GreedyPick, PackedRows, KvWrite
};

class CanaryCpuKernel : public mx::UnaryPrimitive {
 public:
  CanaryCpuKernel(mx::Stream s, Op op, float param = 0.0f) : mx::UnaryPrimitive(s), op_(op), param_(param) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    for (auto& a : inputs) {
      if (!a.flags().row_contiguous) throw std::runtime_error("canary cpu kernel: input not row-contiguous");
    }
    // SiLU writes over its input, and KvWrite into its cache, when nothing else holds it (else KvWrite copies it)
    const bool donated = (op_ == Op::Silu || op_ == Op::KvWrite) && inputs[0].is_donatable() &&
                         inputs[0].itemsize() == out.itemsize();
    if (donated) {
      out.copy_shared_buffer(inputs[0]);
    } else {
      out.set_data(mx::allocator::malloc(out.nbytes()));
    }
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& a : inputs) enc.set_input_array(a);
    enc.set_output_array(out);
    const float param = param_;
    float* y = out.data<float>();
    switch (op_) {
      case Op::Silu:
        enc.dispatch([x = inputs[0].data<float>(), y, n = out.size()]() {
          const size_t blocks = (n + kSplitBlock - 1) / kSplitBlock;
          two_threads::run(blocks, n >= kSplitMin, [=](size_t b0, size_t b1) {
            silu_kernel(x + b0 * kSplitBlock, y + b0 * kSplitBlock, std::min(n, b1 * kSplitBlock) - b0 * kSplitBlock);
          });
        });
        break;
      case Op::GluMask: {
        const bool* valid = inputs.size() > 1 ? inputs[1].data<bool>() : nullptr;
        size_t c = out.shape(-1);
        enc.dispatch([x = inputs[0].data<float>(), valid, y, rows = out.size() / c, c]() {
          two_threads::run(rows, rows * c >= kSplitMin, [=](size_t r0, size_t r1) {
            glu_mask_kernel(x + r0 * 2 * c, valid ? valid + r0 : nullptr, y + r0 * c, r1 - r0, c);
          });
        });
        break;
      }
      case Op::DwConvAffineSilu: {
        // inputs: x (B, T, C), taps (K, C), scale (C), shift (C)[, bias (C)]
        const float* bias = inputs.size() > 4 ? inputs[4].data<float>() : nullptr;
        enc.dispatch([x = inputs[0].data<float>(), taps = inputs[1].data<float>(), bias,
                      scale = inputs[2].data<float>(), shift = inputs[3].data<float>(), y, b = size_t(out.shape(0)),
                      t = size_t(out.shape(1)), c = size_t(out.shape(2)), k = size_t(inputs[1].shape(0))]() {
          two_threads::run(b * t, b * t * c * k >= kSplitMin, [=](size_t r0, size_t r1) {
            dwconv_affine_silu_kernel(x, taps, bias, scale, shift, y, t, c, k, r0, r1);
          });
        });
        break;
      }
      case Op::LayerNorm: {
        size_t d = out.shape(-1);
        enc.dispatch([x = inputs[0].data<float>(), w = inputs[1].data<float>(), bias = inputs[2].data<float>(), y,
                      rows = out.size() / d, d, param]() {
          two_threads::run(rows, rows * d >= kSplitMin, [=](size_t r0, size_t r1) {
            layer_norm_kernel(x + r0 * d, w, bias, y + r0 * d, r1 - r0, d, param);
          });
        });
        break;
      }
      case Op::Conv0: {
        // inputs: x (B, T, F), w (3, 3, C), bias (C), len_in (B), len_out (B)
        enc.dispatch([x = inputs[0].data<float>(), w = inputs[1].data<float>(), bias = inputs[2].data<float>(),
                      len_in = inputs[3].data<int32_t>(), len_out = inputs[4].data<int32_t>(), y,
                      b = size_t(inputs[0].shape(0)), t = size_t(inputs[0].shape(1)), f = size_t(inputs[0].shape(2)),
                      c = size_t(out.shape(3)), t1 = size_t(out.shape(1)), f1 = size_t(out.shape(2))]() {
          two_threads::run(b * t1, b * t1 * f1 * c >= kSplitMin, [=](size_t r0, size_t r1) {
            conv0_kernel(x, w, bias, len_in, len_out, y, t, f, c, t1, f1, r0, r1);
          });
        });
        break;
      }
      case Op::DwS2: {
        // inputs: x (B, T, F, C), w (3, 3, C), bias (C), len_in (B), len_out (B); param: relu_in
        enc.dispatch([x = inputs[0].data<float>(), w = inputs[1].data<float>(), bias = inputs[2].data<float>(),
                      len_in = inputs[3].data<int32_t>(), len_out = inputs[4].data<int32_t>(), relu = param != 0.0f,
                      y, b = size_t(inputs[0].shape(0)), t = size_t(inputs[0].shape(1)),
                      f = size_t(inputs[0].shape(2)), c = size_t(out.shape(3)), t2 = size_t(out.shape(1)),
                      f2 = size_t(out.shape(2))]() {
          two_threads::run(b * t2, b * t2 * f2 * c >= kSplitMin, [=](size_t r0, size_t r1) {
            dw_s2_kernel(x, w, bias, len_in, len_out, relu, y, t, f, c, t2, f2, r0, r1);
          });
        });
        break;
      }
      case Op::Conv0DwS2: {
        // inputs: x (B, T, F), w0 (3, 3, C), b0 (C), w1 (3, 3, C), b1 (C), len0, len1, len2 (B)
        const size_t t = inputs[0].shape(1), f = inputs[0].shape(2);
        enc.dispatch([x = inputs[0].data<float>(), w0 = inputs[1].data<float>(), b0 = inputs[2].data<float>(),
                      w1 = inputs[3].data<float>(), b1 = inputs[4].data<float>(), len0 = inputs[5].data<int32_t>(),
                      len1 = inputs[6].data<int32_t>(), len2 = inputs[7].data<int32_t>(), y,
                      b = size_t(out.shape(0)), t, f, c = size_t(out.shape(3)), t1 = (t - 1) / 2 + 1,
                      f1 = (f - 1) / 2 + 1, t2 = size_t(out.shape(1)), f2 = size_t(out.shape(2))]() {
          const bool vec = c % 64 == 0 && avx512_loops();
          two_threads::run(b * t2, b * t2 * f2 * c >= kSplitMin, [=](size_t r0, size_t r1) {
            if (vec)
              conv0_dw_s2_avx512(x, w0, b0, w1, b1, len0, len1, len2, y, t, f, c, t1, f1, t2, f2, r0, r1);
            else
              conv0_dw_s2_kernel(x, w0, b0, w1, b1, len0, len1, len2, y, t, f, c, t1, f1, t2, f2, r0, r1);
          });
        });
        break;
      }
      case Op::QMatmul8: {
        // inputs: x (M, K), w (N, K / 4) uint32, scales (N, K / gs), biases (N, K / gs); param: gs
        enc.dispatch([x = inputs[0].data<float>(), q = inputs[1].data<uint8_t>(), scales = inputs[2].data<float>(),
                      biases = inputs[3].data<float>(), y, m = size_t(out.shape(0)), n = size_t(out.shape(1)),
                      k = size_t(inputs[0].shape(1)), gs = size_t(param)]() {
          qmatmul8_kernel(x, q, scales, biases, y, m, n, k, gs);
        });
        break;
      }
      case Op::DecodeAttention: {
        // inputs: q (B, H, 1, D), k, v (B, H, L, D)[, mask (B or 1, 1, 1, L)]; param: scale
        const float* mask = inputs.size() > 3 ? inputs[3].data<float>() : nullptr;
        const size_t l = inputs[1].shape(2);
        const size_t mask_stride = inputs.size() > 3 && inputs[3].shape(0) > 1 ? l : 0;
        enc.dispatch([q = inputs[0].data<float>(), k = inputs[1].data<float>(), v = inputs[2].data<float>(), mask,
                      mask_stride, y, rows = size_t(out.shape(0) * out.shape(1)), h = size_t(out.shape(1)), l,
                      d = size_t(out.shape(3)), param]() {
          decode_attention_kernel(q, k, v, mask, mask_stride, y, rows, h, l, d, param);
        });
        break;
      }
      case Op::PackedLinear: {
        // inputs: x (..., K), wp (N / 32, K, 32)[, bias (N)]; a scratch buffer for x in tiles, from MLX's allocator
        const float* bias = inputs.size() > 2 ? inputs[2].data<float>() : nullptr;
        const size_t k = inputs[0].shape(-1), n = out.shape(-1), m = out.size() / n;
        if (m == 0) break;
        const size_t tiles = tile_count(m);
        auto scratch = mx::allocator::allocator().malloc(tiles * kTileRows * k * sizeof(float));
        enc.dispatch([x = inputs[0].data<float>(), wp = inputs[1].data<float>(), bias, y, scratch, m, k, n]() mutable {
          packed_linear_kernel(x, wp, bias, y, static_cast<float*>(scratch.raw_ptr()), m, k, n);
          mx::allocator::allocator().free(scratch);
        });
        break;
      }
      case Op::PackedRows: {
        // inputs: wp (P, H, 32), ids (...) int32 or uint32: row id of the packed table (clamped to the table)
        const bool is_signed = inputs[1].dtype() == mx::int32;
        enc.dispatch([wp = inputs[0].data<float>(), ids = inputs[1].data<uint32_t>(), is_signed, y,
                      n = inputs[1].size(), h = size_t(inputs[0].shape(1)), rows = size_t(inputs[0].shape(0)) * kPanel]() {
          for (size_t i = 0; i < n; i++) {
            const int64_t raw = is_signed ? int64_t(int32_t(ids[i])) : int64_t(ids[i]);
            const size_t id = size_t(std::clamp<int64_t>(raw, 0, int64_t(rows) - 1));
            const float* src = wp + (id / kPanel) * h * kPanel + id % kPanel;
            for (size_t j = 0; j < h; j++) y[i * h + j] = src[j * kPanel];
          }
        });
        break;
      }
      case Op::KvWrite: {
        // inputs: cache (B, H, L, D), offsets (B) int32, new (B, H, 1, D): out = cache with new at each row's offset
        enc.dispatch([c = inputs[0].data<float>(), off = inputs[1].data<int32_t>(), x = inputs[2].data<float>(), y,
                      donated, n = size_t(out.size()), b = size_t(out.shape(0)), h = size_t(out.shape(1)),
                      l = size_t(out.shape(2)), d = size_t(out.shape(3))]() {
          if (!donated) std::memcpy(y, c, n * sizeof(float));
          for (size_t bi = 0; bi < b; bi++) {
            if (off[bi] < 0 || size_t(off[bi]) >= l) continue;  // never past the buffer (the caller grows it first)
            for (size_t hi = 0; hi < h; hi++)
              std::memcpy(y + ((bi * h + hi) * l + size_t(off[bi])) * d, x + (bi * h + hi) * d, d * sizeof(float));
          }
        });
        break;
      }
      case Op::GreedyPick: {
        enc.dispatch([x = inputs[0].data<float>(), y, b = size_t(inputs[0].shape(0)), v = size_t(inputs[0].shape(1))]() {
          greedy_pick_kernel(x, y, b, v);
        });
        break;
      }
      case Op::RelAttention: {
        // inputs: q, k, v (B, T, D), p (2T-1, D), u, vb (H, dk), valid (B, T)
        enc.dispatch([q = inputs[0].data<float>(), k = inputs[1].data<float>(), v = inputs[2].data<float>(),
                      p = inputs[3].data<float>(), u = inputs[4].data<float>(), vb = inputs[5].data<float>(),
                      valid = inputs[6].data<bool>(), y, b = size_t(out.shape(0)), t = size_t(out.shape(1)),
                      h = size_t(inputs[4].shape(0)), dk = size_t(inputs[4].shape(1))]() {
          rel_attention_kernel(q, k, v, p, u, vb, valid, y, b, t, h, dk);
        });
        break;
      }
      case Op::RelSoftmax: {
        enc.dispatch([ac = inputs[0].data<float>(), bd = inputs[1].data<float>(), valid = inputs[2].data<bool>(),
                      y, b = size_t(out.shape(0)), h = size_t(out.shape(1)), t = size_t(out.shape(2)), param]() {
          rel_softmax_kernel(ac, bd, valid, y, b, h, t, param);
        });
        break;
      }
    }
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("canary cpu kernels run on the CPU only");
  }

  const char* name() const override { return "CanaryCpuKernel"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const CanaryCpuKernel&>(other);
    return op_ == o.op_ && param_ == o.param_;
  }

 private:
  Op op_;
  float param_;
};

mx::Stream cpu_stream() {
  auto device = mx::default_device();
  if (device != mx::Device::cpu) throw std::invalid_argument("canary cpu kernels need MLX's default device to be the CPU");
  return mx::default_stream(device);
}

mx::array prep(const mx::array& a, mx::Stream s) {
  if (a.dtype() != mx::float32 && a.dtype() != mx::bool_ && a.dtype() != mx::int32 && a.dtype() != mx::uint32)
    throw std::invalid_argument("float32 inputs only");
  // An evaluated row-contiguous array (a weight) is passed as it is: a Contiguous node would be one more op to
  // dispatch per input per call; so is another kernel's output (always a fresh row-contiguous array). Anything else
  // may turn out strided when it is computed: MLX makes it contiguous (a no-op when it already is).
  if (a.status() != mx::array::Status::unscheduled && a.flags().row_contiguous) return a;
  if (a.has_primitive() && dynamic_cast<const CanaryCpuKernel*>(&a.primitive()) != nullptr) return a;
  return mx::contiguous(a, false, s);
}

mx::array make(const mx::Shape& shape, mx::Dtype dtype, Op op, std::vector<mx::array> inputs, float param = 0.0f) {
  auto s = cpu_stream();
  for (auto& a : inputs) a = prep(a, s);
  return mx::array(shape, dtype, std::make_shared<CanaryCpuKernel>(s, op, param), std::move(inputs));
}

mx::array silu(const mx::array& x) { return make(x.shape(), mx::float32, Op::Silu, {x}); }

mx::array glu_mask(const mx::array& x, const std::optional<mx::array>& valid) {
  auto shape = x.shape();
  if (shape.back() % 2 != 0) throw std::invalid_argument("glu_mask: odd last axis");
  shape.back() /= 2;
  if (!valid) return make(shape, mx::float32, Op::GluMask, {x});
  if (valid->dtype() != mx::bool_ || valid->size() * 2 * shape.back() != x.size())
    throw std::invalid_argument("glu_mask: valid must be bool, one flag per row");
  return make(shape, mx::float32, Op::GluMask, {x, *valid});
}

mx::array dwconv_affine_silu(const mx::array& x, const mx::array& taps, const mx::array& scale,
                             const mx::array& shift, const std::optional<mx::array>& bias) {
  if (x.ndim() != 3 || taps.ndim() != 2 || taps.shape(1) != x.shape(2) || taps.shape(0) % 2 != 1 ||
      scale.size() != size_t(x.shape(2)) || shift.size() != size_t(x.shape(2)) ||
      (bias && bias->size() != size_t(x.shape(2))))
    throw std::invalid_argument("dwconv_affine_silu: x (B, T, C), taps (K odd, C), scale/shift/bias (C)");
  std::vector<mx::array> inputs = {x, taps, scale, shift};
  if (bias) inputs.push_back(*bias);
  return make(x.shape(), mx::float32, Op::DwConvAffineSilu, std::move(inputs));
}

mx::array layer_norm(const mx::array& x, const mx::array& w, const mx::array& b, float eps) {
  auto d = size_t(x.shape(-1));
  if (w.size() != d || b.size() != d) throw std::invalid_argument("layer_norm: weight and bias (D,)");
  return make(x.shape(), mx::float32, Op::LayerNorm, {x, w, b}, eps);
}

mx::array rel_softmax(const mx::array& ac, const mx::array& bd, const mx::array& valid, float sqrt_dk) {
  if (ac.ndim() != 4 || bd.ndim() != 4 || ac.shape(2) != ac.shape(3) || bd.shape(0) != ac.shape(0) ||
      bd.shape(1) != ac.shape(1) || bd.shape(2) != ac.shape(2) || bd.shape(3) != 2 * ac.shape(3) - 1 ||
      valid.dtype() != mx::bool_ || valid.ndim() != 2 || valid.shape(0) != ac.shape(0) ||
      valid.shape(1) != ac.shape(2))
    throw std::invalid_argument("rel_softmax: ac (B, H, T, T), bd (B, H, T, 2T-1), valid (B, T) bool");
  return make(ac.shape(), mx::float32, Op::RelSoftmax, {ac, bd, valid}, sqrt_dk);
}

void check_stride2(const mx::array& x, size_t ndim, const mx::array& w, const mx::array& bias,
                   const mx::array& len_in, const mx::array& len_out, const char* name) {
  const int c = w.ndim() == 3 ? w.shape(2) : -1;
  if (x.ndim() != ndim || w.ndim() != 3 || w.shape(0) != 3 || w.shape(1) != 3 || bias.size() != size_t(c) ||
      len_in.dtype() != mx::int32 || len_out.dtype() != mx::int32 || len_in.size() != size_t(x.shape(0)) ||
      len_out.size() != size_t(x.shape(0)) || (ndim == 4 && x.shape(3) != c))
    throw std::invalid_argument(std::string(name) + ": bad shapes or dtypes");
}

mx::array subsample_conv0(const mx::array& x, const mx::array& w, const mx::array& bias, const mx::array& len_in,
                          const mx::array& len_out) {
  check_stride2(x, 3, w, bias, len_in, len_out, "subsample_conv0");
  mx::Shape shape = {x.shape(0), (x.shape(1) - 1) / 2 + 1, (x.shape(2) - 1) / 2 + 1, w.shape(2)};
  return make(shape, mx::float32, Op::Conv0, {x, w, bias, len_in, len_out});
}

mx::array depthwise_s2(const mx::array& x, const mx::array& w, const mx::array& bias, const mx::array& len_in,
                       const mx::array& len_out, bool relu_in) {
  check_stride2(x, 4, w, bias, len_in, len_out, "depthwise_s2");
  mx::Shape shape = {x.shape(0), (x.shape(1) - 1) / 2 + 1, (x.shape(2) - 1) / 2 + 1, x.shape(3)};
  return make(shape, mx::float32, Op::DwS2, {x, w, bias, len_in, len_out}, relu_in ? 1.0f : 0.0f);
}

mx::array subsample_conv0_dw(const mx::array& x, const mx::array& w0, const mx::array& b0, const mx::array& w1,
                             const mx::array& b1, const mx::array& len0, const mx::array& len1,
                             const mx::array& len2) {
  check_stride2(x, 3, w0, b0, len0, len1, "subsample_conv0_dw");
  if (w1.shape() != w0.shape() || b1.shape() != b0.shape() || len2.dtype() != mx::int32 ||
      len2.size() != size_t(x.shape(0)))
    throw std::invalid_argument("subsample_conv0_dw: bad shapes or dtypes");
  const int t1 = (x.shape(1) - 1) / 2 + 1, f1 = (x.shape(2) - 1) / 2 + 1;
  mx::Shape shape = {x.shape(0), (t1 - 1) / 2 + 1, (f1 - 1) / 2 + 1, w0.shape(2)};
  return make(shape, mx::float32, Op::Conv0DwS2, {x, w0, b0, w1, b1, len0, len1, len2});
}

mx::array qmatmul8(const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases,
                   int group_size) {
  if (x.ndim() != 2 || w.ndim() != 2 || w.dtype() != mx::uint32 || group_size % 8 != 0 ||
      x.shape(1) != w.shape(1) * 4 || x.shape(1) % group_size != 0 || scales.ndim() != 2 ||
      scales.shape(0) != w.shape(0) || scales.shape(1) != x.shape(1) / group_size || biases.shape() != scales.shape())
    throw std::invalid_argument("qmatmul8: x (M, K), w (N, K/4) uint32, scales and biases (N, K/group_size)");
  return make({x.shape(0), w.shape(0)}, mx::float32, Op::QMatmul8, {x, w, scales, biases},
              static_cast<float>(group_size));
}

mx::array decode_attention(const mx::array& q, const mx::array& k, const mx::array& v,
                           const std::optional<mx::array>& mask, float scale) {
  if (q.ndim() != 4 || q.shape(2) != 1 || k.ndim() != 4 || v.shape() != k.shape() || k.shape(0) != q.shape(0) ||
      k.shape(1) != q.shape(1) || k.shape(3) != q.shape(3) || k.shape(2) < 1 ||
      (mask && (mask->dtype() != mx::float32 || mask->ndim() != 4 || mask->shape(1) != 1 || mask->shape(2) != 1 ||
                mask->shape(3) != k.shape(2) || (mask->shape(0) != 1 && mask->shape(0) != q.shape(0)))))
    throw std::invalid_argument(
        "decode_attention: q (B, H, 1, D), k and v (B, H, L, D), mask float32 (B or 1, 1, 1, L) or None");
  std::vector<mx::array> inputs = {q, k, v};
  if (mask) inputs.push_back(*mask);
  return make(q.shape(), mx::float32, Op::DecodeAttention, std::move(inputs), scale);
}

mx::array kv_write(const mx::array& cache, const mx::array& offsets, const mx::array& x) {
  if (cache.ndim() != 4 || cache.dtype() != mx::float32 || offsets.dtype() != mx::int32 || offsets.ndim() != 1 ||
      offsets.shape(0) != cache.shape(0) || x.ndim() != 4 || x.shape(0) != cache.shape(0) ||
      x.shape(1) != cache.shape(1) || x.shape(2) != 1 || x.shape(3) != cache.shape(3) || x.dtype() != mx::float32)
    throw std::invalid_argument("kv_write: cache (B, H, L, D) float32, offsets (B) int32, x (B, H, 1, D) float32");
  return make(cache.shape(), mx::float32, Op::KvWrite, {cache, offsets, x});
}

mx::array greedy_pick(const mx::array& logits) {
  if (logits.ndim() != 2 || logits.shape(1) < 1) throw std::invalid_argument("greedy_pick: logits (B, V), V >= 1");
  return make({logits.shape(0), 2}, mx::float32, Op::GreedyPick, {logits});
}

mx::array packed_rows(const mx::array& wp, const mx::array& ids) {
  if (wp.ndim() != 3 || wp.shape(2) != int(kPanel) || wp.dtype() != mx::float32 ||
      (ids.dtype() != mx::int32 && ids.dtype() != mx::uint32))
    throw std::invalid_argument("packed_rows: wp (P, H, 32) float32, ids int32 or uint32");
  auto shape = ids.shape();
  shape.push_back(wp.shape(1));
  return make(shape, mx::float32, Op::PackedRows, {wp, ids});
}

mx::array rel_attention(const mx::array& q, const mx::array& k, const mx::array& v, const mx::array& p,
                        const mx::array& u, const mx::array& vb, const mx::array& valid) {
  const bool ok = q.ndim() == 3 && k.shape() == q.shape() && v.shape() == q.shape() && u.ndim() == 2 &&
                  vb.shape() == u.shape() && u.shape(0) * u.shape(1) == q.shape(2) && p.ndim() == 2 &&
                  p.shape(0) == 2 * q.shape(1) - 1 && p.shape(1) == q.shape(2) && valid.dtype() == mx::bool_ &&
                  valid.ndim() == 2 && valid.shape(0) == q.shape(0) && valid.shape(1) == q.shape(1) && q.shape(1) > 0;
  if (!ok)
    throw std::invalid_argument(
        "rel_attention: q, k, v (B, T, D), p (2T-1, D), pos_bias_u and pos_bias_v (H, D / H), valid (B, T) bool");
  if (!packed_supported() || u.shape(1) % int(kPanel) != 0)
    throw std::invalid_argument("rel_attention: needs AVX-512 or AVX2 and a head size that is a multiple of 32");
  return make(q.shape(), mx::float32, Op::RelAttention, {q, k, v, p, u, vb, valid});
}

mx::array packed_linear(const mx::array& x, const mx::array& wp, const std::optional<mx::array>& bias) {
  if (!packed_supported()) throw std::invalid_argument("packed_linear: this CPU has neither AVX-512 nor AVX2");
  if (x.ndim() < 1 || wp.ndim() != 3 || wp.shape(0) < 1 || wp.shape(2) != int(kPanel) || wp.shape(1) != x.shape(-1) ||
      (bias && (bias->ndim() != 1 || bias->shape(0) != wp.shape(0) * int(kPanel))))
    throw std::invalid_argument("packed_linear: x (..., K), wp (N / 32, K, 32), bias (N) or None");
  std::vector<mx::array> inputs = {x, wp};
  if (bias) inputs.push_back(*bias);
  auto shape = x.shape();
  shape.back() = wp.shape(0) * int(kPanel);
  return make(shape, mx::float32, Op::PackedLinear, std::move(inputs));
}

}  // namespace

#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

NB_MODULE(_cpu_kernels, m) {
  m.doc() = "canary-server's fused float32 encoder kernels for MLX's CPU backend (model/cpu_kernels.py)";
  m.def("silu", &silu, nb::arg("x"));
  m.def("glu_mask", &glu_mask, nb::arg("x"), nb::arg("valid").none());
  m.def("dwconv_affine_silu", &dwconv_affine_silu, nb::arg("x"), nb::arg("taps"), nb::arg("scale"),
        nb::arg("shift"), nb::arg("bias").none());
  m.def("layer_norm", &layer_norm, nb::arg("x"), nb::arg("weight"), nb::arg("bias"), nb::arg("eps"));
  m.def("subsample_conv0", &subsample_conv0, nb::arg("x"), nb::arg("taps"), nb::arg("bias"), nb::arg("len_in"),
        nb::arg("len_out"));
  m.def("depthwise_s2", &depthwise_s2, nb::arg("x"), nb::arg("taps"), nb::arg("bias"), nb::arg("len_in"),
        nb::arg("len_out"), nb::arg("relu_in"));
  m.def("subsample_conv0_dw", &subsample_conv0_dw, nb::arg("x"), nb::arg("taps0"), nb::arg("bias0"),
        nb::arg("taps1"), nb::arg("bias1"), nb::arg("len_in"), nb::arg("len_mid"), nb::arg("len_out"));
  m.def("qmatmul8", &qmatmul8, nb::arg("x"), nb::arg("w"), nb::arg("scales"), nb::arg("biases"),
        nb::arg("group_size"));
  m.def("decode_attention", &decode_attention, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("mask").none(),
        nb::arg("scale"));
  m.def("packed_linear", &packed_linear, nb::arg("x"), nb::arg("wp"), nb::arg("bias").none());
  m.def("greedy_pick", &greedy_pick, nb::arg("logits"));
  m.def("kv_write", &kv_write, nb::arg("cache"), nb::arg("offsets"), nb::arg("x"));
  m.def("packed_rows", &packed_rows, nb::arg("wp"), nb::arg("ids"));
  m.def("packed_supported", &packed_supported);
  m.def("packed_isa", &packed_isa);
  m.def("set_packed_isa", &set_packed_isa, nb::arg("name"));
  m.def("rel_attention", &rel_attention, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("p"), nb::arg("u"),
        nb::arg("vb"), nb::arg("valid"));
  m.def("rel_softmax", &rel_softmax, nb::arg("ac"), nb::arg("bd"), nb::arg("valid"), nb::arg("sqrt_dk"));
}
