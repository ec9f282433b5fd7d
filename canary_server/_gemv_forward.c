/* cblas_sgemm with its matrix-vector cases sent to cblas_sgemv and its few-row cases computed here (Linux only;
   loaded by canary_server/_blas.py).

   MLX's CPU backend computes every matmul with cblas_sgemm. For a single row (the decoder step at batch 1:
   x (1 x K) @ W (K x N)) OpenBLAS's sgemm first packs the whole weight matrix into a scratch buffer and then reads
   it again, so it moves ~3x the bytes a matrix-vector product must: on the 2-core dev VM, 16 matrix-vector products
   of 1024 x 4096 took 11.8 ms through sgemm and 6.4 ms through sgemv (bench/decoder_step.py measures the step).
   OpenBLAS >= 0.3.27 can do this forwarding itself (GEMM_GEMV_FORWARD) on some targets; Debian 12 has 0.3.21.

   For a few rows times an nn.Linear weight (x (M x K) @ W^T, W stored N x K: the decoder step at batch 2..16, the
   prompt prefill, beam search) sgemm packs the weights the same way; `small_m_gemm` below reads each weight row
   once from memory for all M rows (register blocks of 4 x 4 weight rows with AVX-512, 3 x 4 with AVX2 + FMA,
   chosen at run time; the next weight rows prefetched meanwhile) on two threads (this one and one helper thread).
   32 decoder-sized matrices on a Zen 4 (bench/decoder_step.py --matmuls), sgemm -> here: M = 4 19.9 -> 5.9 ms,
   M = 9 22.8 -> 6.9, M = 16 17.2 -> 10.8, M = 54 41.3 -> 36.3 (AVX2 build: 5.7 / 6.5 / 11.5 / 37.0). Up to 64 rows
   with AVX2 or AVX-512, up to 12 without.

   This library is loaded with RTLD_GLOBAL before OpenBLAS, so MLX's cblas_sgemm resolves here; the real sgemm and
   sgemv are handed over by canary_gemv_forward_init(). Every other case goes to the real sgemm unchanged. The sums
   run in sgemv's order instead of sgemm's: results may differ in the last float32 bits, as between any two BLAS. */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <pthread.h>
#include <stddef.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() __asm__ __volatile__("" ::: "memory")
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HAVE_ISAS 1 /* the kernel is also compiled for AVX2 + FMA and for AVX-512, chosen at run time */
#endif

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
/* Rows computed by small_m_gemm (1 goes to sgemv), per instruction set. With AVX-512 a 4 x 4 block (16
   accumulators and 5 operands: AVX-512's 32 vector registers, used for 8-float vectors, hold them); AVX2's 16
   registers do not hold it (it spilled), so there a 3 x 4 block (12 accumulators). Either beats sgemm up to ~64
   rows (a prompt prefill of 6 requests is 54; at 64 they tie); the generic build (SSE2) up to 12. */
enum { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
enum { SMALL_M_MIN = 2, SMALL_M_MAX_GENERIC = 12, SMALL_M_MAX_VECTOR = 64 };
static int isa = ISA_GENERIC, small_m_max = SMALL_M_MAX_GENERIC;

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float, float *, int);

static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;
static int forwarding = 1;

/* The best kernel this CPU runs: the x86-64-v4 (AVX-512) or v3 (AVX2 + FMA) build of it, or the generic one. */
static int detect_isa(void) {
#if defined(HAVE_ISAS)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("bmi2"))
    return ISA_AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
    return ISA_AVX2;
#endif
  return ISA_GENERIC;
}

/* The kernel's instruction set: want -2 only asks; -1 sets the CPU's best; 0..2 a lower one if asked (tests run
   every variant the CPU has). Returns the one in effect. */
int canary_small_m_isa(int want) {
  if (want == -2) return isa;
  int best = detect_isa();
  isa = want >= 0 && want < best ? want : best;
  small_m_max = isa == ISA_GENERIC ? SMALL_M_MAX_GENERIC : SMALL_M_MAX_VECTOR;
  return isa;
}

int canary_gemv_forward_init(void *sgemm, void *sgemv, int enabled) {
  canary_small_m_isa(-1);
  real_sgemm = (sgemm_fn)sgemm;
  real_sgemv = (sgemv_fn)sgemv;
  forwarding = enabled;
  return real_sgemm != NULL && real_sgemv != NULL;
}

/* On or off after init (benches compare both in one process). */
void canary_gemv_forward_enable(int enabled) { forwarding = enabled; }

/* How many matmuls went each way (tests check that the forwarding happens). */
static unsigned long forwarded, passed;
unsigned long canary_gemv_forwarded(void) { return forwarded; }
unsigned long canary_gemv_passed(void) { return passed; }

/* ---- the few-row kernel ---- */
typedef float v8 __attribute__((vector_size(32), aligned(4)));


static inline float hsum(v8 v) {
  float s = 0; for (int i = 0; i < 8; i++) s += v[i]; return s;
}

#define LD(p) (*(const v8 *)(p))

static inline void store4(float *c, const float s[4], float alpha, float beta) {
  for (int j = 0; j < 4; j++) c[j] = alpha * s[j] + (beta == 0.0f ? 0.0f : beta * c[j]);
}

/* Software prefetch of the next 4 weight rows while a block computes on the current ones: the hardware prefetchers
   fall behind while the core is busy with FMAs (32 decoder products at 16 rows: 15.8 -> 10.5 ms, at 4 rows 8.7 ->
   7.2 ms, two threads, AVX-512 build). The block calls on one group of 4 weight rows share the next group between
   them: call j of `calls` prefetches its share of each row, one 64-byte line per row every `calls` times 16 floats
   of its own loop. */
typedef struct {
  const float *p, *end;
  int ldw, every, count;
} prefetch_t;

static inline prefetch_t prefetch_share(const float *next, int ldw, int K, int j, int calls) {
  prefetch_t pf = {NULL, NULL, ldw, calls, 1};
  if (next != NULL) {
    pf.p = next + (((long)K * j / calls) & ~15L);
    pf.end = j + 1 == calls ? next + K : next + (((long)K * (j + 1) / calls) & ~15L);
  }
  return pf;
}

static inline __attribute__((always_inline)) void prefetch_step(prefetch_t *pf) { /* every 16 floats of a loop */
  if (pf->p == NULL || --pf->count > 0) return;
  pf->count = pf->every;
  if (pf->p >= pf->end) return;
  __builtin_prefetch(pf->p);
  __builtin_prefetch(pf->p + pf->ldw);
  __builtin_prefetch(pf->p + 2 * pf->ldw);
  __builtin_prefetch(pf->p + 3 * pf->ldw);
  pf->p += 16;
}

/* `rb` (3 or 4: a constant where this is inlined) rows of A against 4 rows of W: 4 x rb accumulators in registers.
   With AVX-512's 32 registers rb = 4; AVX2's 16 hold rb = 3. (Named variables, not arrays: the generic build keeps
   arrays of vectors in memory.) */
static inline __attribute__((always_inline)) void block_rx4(const int rb, int K, const float *a0, int lda,
                                                            const float *w0, int ldw, float out[4][4],
                                                            prefetch_t pf) {
  const float *a1 = a0 + lda, *a2 = a1 + lda, *a3 = rb == 4 ? a2 + lda : a2;
  const float *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
  v8 c00 = {0}, c01 = {0}, c02 = {0}, c03 = {0}, c10 = {0}, c11 = {0}, c12 = {0}, c13 = {0};
  v8 c20 = {0}, c21 = {0}, c22 = {0}, c23 = {0}, c30 = {0}, c31 = {0}, c32 = {0}, c33 = {0};
  int k = 0;
  for (; k + 8 <= K; k += 8) {
    if ((k & 15) == 0) prefetch_step(&pf);
    v8 x0 = LD(w0 + k), x1 = LD(w1 + k), x2 = LD(w2 + k), x3 = LD(w3 + k);
    v8 y = LD(a0 + k);
    c00 += y * x0; c01 += y * x1; c02 += y * x2; c03 += y * x3;
    y = LD(a1 + k);
    c10 += y * x0; c11 += y * x1; c12 += y * x2; c13 += y * x3;
    y = LD(a2 + k);
    c20 += y * x0; c21 += y * x1; c22 += y * x2; c23 += y * x3;
    if (rb == 4) {
      y = LD(a3 + k);
      c30 += y * x0; c31 += y * x1; c32 += y * x2; c33 += y * x3;
    }
  }
  v8 acc[4][4] = {{c00, c01, c02, c03}, {c10, c11, c12, c13}, {c20, c21, c22, c23}, {c30, c31, c32, c33}};
  const float *a[4] = {a0, a1, a2, a3}, *w[4] = {w0, w1, w2, w3};
  for (int i = 0; i < rb; i++)
    for (int j = 0; j < 4; j++) {
      float s = hsum(acc[i][j]);
      for (int kk = k; kk < K; kk++) s += a[i][kk] * w[j][kk];
      out[i][j] = s;
    }
}

/* 1 row of A against 4 rows of W (two K chunks in flight). */
static inline __attribute__((always_inline)) void block1x4(int K, const float *a0, const float *w0, int ldw,
                                                           float out[4], prefetch_t pf) {
  const float *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
  v8 c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0}, d0 = {0}, d1 = {0}, d2 = {0}, d3 = {0};
  int k = 0;
  for (; k + 16 <= K; k += 16) {
    prefetch_step(&pf);
    v8 y = LD(a0 + k), z = LD(a0 + k + 8);
    c0 += y * LD(w0 + k); c1 += y * LD(w1 + k); c2 += y * LD(w2 + k); c3 += y * LD(w3 + k);
    d0 += z * LD(w0 + k + 8); d1 += z * LD(w1 + k + 8); d2 += z * LD(w2 + k + 8); d3 += z * LD(w3 + k + 8);
  }
  for (; k + 8 <= K; k += 8) {
    v8 y = LD(a0 + k);
    c0 += y * LD(w0 + k); c1 += y * LD(w1 + k); c2 += y * LD(w2 + k); c3 += y * LD(w3 + k);
  }
  v8 acc[4] = {c0 + d0, c1 + d1, c2 + d2, c3 + d3};
  const float *w[4] = {w0, w1, w2, w3};
  for (int j = 0; j < 4; j++) {
    float s = hsum(acc[j]);
    for (int kk = k; kk < K; kk++) s += a0[kk] * w[j][kk];
    out[j] = s;
  }
}

/* C[m][n] (ldc) = alpha * sum_k A[m][k] (lda) * W[n][k] (ldw) + beta * C[m][n], for rows n0 <= n < n1, in blocks
   of `rb` (3 or 4: a constant where this is inlined) rows of A. */
static inline __attribute__((always_inline)) void kernel_rows_rb(const int rb, int M, int n0, int n1, int K,
                                                                 float alpha, const float *A, int lda, const float *W,
                                                                 int ldw, float beta, float *C, int ldc) {
  const int calls = M / rb + M % rb; /* block calls per group of 4 weight rows */
  int n = n0;
  for (; n + 4 <= n1; n += 4) {
    const float *w0 = W + (size_t)n * ldw;
    const float *next = n + 8 <= n1 ? w0 + 4 * (size_t)ldw : NULL;
    int m = 0, j = 0;
    for (; m + rb <= M; m += rb) {
      float out[4][4];
      prefetch_t pf = prefetch_share(next, ldw, K, j++, calls);
      block_rx4(rb, K, A + (size_t)m * lda, lda, w0, ldw, out, pf);
      for (int i = 0; i < rb; i++) store4(C + (size_t)(m + i) * ldc + n, out[i], alpha, beta);
    }
    for (; m < M; m++) {
      float out[4];
      block1x4(K, A + (size_t)m * lda, w0, ldw, out, prefetch_share(next, ldw, K, j++, calls));
      store4(C + (size_t)m * ldc + n, out, alpha, beta);
    }
  }
  for (; n < n1; n++) {
    const float *w = W + (size_t)n * ldw;
    for (int m = 0; m < M; m++) {
      const float *a = A + (size_t)m * lda;
      float s = 0;
      for (int kk = 0; kk < K; kk++) s += a[kk] * w[kk];
      float *c = C + (size_t)m * ldc + n;
      *c = alpha * s + (beta == 0.0f ? 0.0f : beta * *c);
    }
  }
}


#if defined(HAVE_ISAS)
__attribute__((target("arch=x86-64-v4"))) static void kernel_rows_avx512(int M, int n0, int n1, int K, float alpha,
                                                                          const float *A, int lda, const float *W,
                                                                          int ldw, float beta, float *C, int ldc) {
  kernel_rows_rb(4, M, n0, n1, K, alpha, A, lda, W, ldw, beta, C, ldc);
}

__attribute__((target("arch=x86-64-v3"))) static void kernel_rows_avx2(int M, int n0, int n1, int K, float alpha,
                                                                        const float *A, int lda, const float *W,
                                                                        int ldw, float beta, float *C, int ldc) {
  kernel_rows_rb(3, M, n0, n1, K, alpha, A, lda, W, ldw, beta, C, ldc);
}
#endif

static void kernel_rows(int M, int n0, int n1, int K, float alpha, const float *A, int lda, const float *W, int ldw,
                        float beta, float *C, int ldc) {
#if defined(HAVE_ISAS)
  if (isa == ISA_AVX512) {
    kernel_rows_avx512(M, n0, n1, K, alpha, A, lda, W, ldw, beta, C, ldc);
    return;
  }
  if (isa == ISA_AVX2) {
    kernel_rows_avx2(M, n0, n1, K, alpha, A, lda, W, ldw, beta, C, ldc);
    return;
  }
#endif
  kernel_rows_rb(4, M, n0, n1, K, alpha, A, lda, W, ldw, beta, C, ldc);
}

/* ---- the few-row kernel's helper thread: it computes the upper half of the weight rows while the caller does the
   lower half. It spins briefly after a job (the decoder step calls back to back), then sleeps on a futex. Whoever
   claims the upper half first computes it: a caller done with its half before the helper woke up (on 2 cores the
   helper often waits for a core while Python builds the next step) takes the upper half itself instead of waiting
   for the helper to be scheduled. */
static struct {
  int m, n0, n1, k, lda, ldw, ldc;
  float alpha, beta;
  const float *a, *w;
  float *c;
} job;
static unsigned job_gen, done_gen; /* futex words (generations wrap around) */
static unsigned claimed;           /* the last job whose upper half someone took */
static int worker_started;
static pthread_mutex_t start_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER; /* one two-thread call at a time */
enum { SPIN = 2000 };

static void futex_wait(unsigned *addr, unsigned val) {
  syscall(SYS_futex, addr, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0);
}
static void futex_wake(unsigned *addr) { syscall(SYS_futex, addr, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0); }

static void *worker(void *arg) {
  unsigned seen = (unsigned)(size_t)arg; /* job_gen when it was started: the first job may be posted before it runs */
  for (;;) {
    unsigned g;
    for (int i = 0; (g = __atomic_load_n(&job_gen, __ATOMIC_ACQUIRE)) == seen; i++) {
      if (i < SPIN)
        CPU_RELAX();
      else
        futex_wait(&job_gen, seen);
    }
    seen = g;
    unsigned expected = g - 1;
    if (!__atomic_compare_exchange_n(&claimed, &expected, g, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
      continue; /* the caller did this job's upper half */
    kernel_rows(job.m, job.n0, job.n1, job.k, job.alpha, job.a, job.lda, job.w, job.ldw, job.beta, job.c, job.ldc);
    __atomic_store_n(&done_gen, seen, __ATOMIC_RELEASE);
    futex_wake(&done_gen);
  }
  return NULL;
}

/* A forked child has no helper thread: start a new one there if it needs one. */
static void after_fork_in_child(void) {
  worker_started = 0;
  job_gen = done_gen = claimed = 0;
  pthread_mutex_init(&call_lock, NULL);
  pthread_mutex_init(&start_lock, NULL);
}

static int ensure_worker(void) {
  if (__atomic_load_n(&worker_started, __ATOMIC_ACQUIRE)) return 1;
  pthread_mutex_lock(&start_lock);
  if (!worker_started) {
    static int atfork_registered;
    if (!atfork_registered) atfork_registered = pthread_atfork(NULL, NULL, after_fork_in_child) == 0;
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    void *start_gen = (void *)(size_t)__atomic_load_n(&job_gen, __ATOMIC_ACQUIRE);
    if (atfork_registered && pthread_create(&t, &attr, worker, start_gen) == 0)
      __atomic_store_n(&worker_started, 1, __ATOMIC_RELEASE);
    pthread_attr_destroy(&attr);
  }
  pthread_mutex_unlock(&start_lock);
  return worker_started;
}

static void small_m_gemm(int m, int n, int k, float alpha, const float *a, int lda, const float *w, int ldw,
                         float beta, float *c, int ldc) {
  /* Another thread's call in flight (MLX has one CPU stream per device, but more can be made): this one alone. */
  if (n < 64 || !ensure_worker() || pthread_mutex_trylock(&call_lock) != 0) {
    kernel_rows(m, 0, n, k, alpha, a, lda, w, ldw, beta, c, ldc);
    return;
  }
  int half = (n / 2) & ~3;
  job.m = m, job.n0 = half, job.n1 = n, job.k = k, job.lda = lda, job.ldw = ldw, job.ldc = ldc;
  job.alpha = alpha, job.beta = beta, job.a = a, job.w = w, job.c = c;
  unsigned g = __atomic_add_fetch(&job_gen, 1, __ATOMIC_ACQ_REL);
  futex_wake(&job_gen);
  kernel_rows(m, 0, half, k, alpha, a, lda, w, ldw, beta, c, ldc);
  unsigned expected = g - 1;
  if (__atomic_compare_exchange_n(&claimed, &expected, g, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
    kernel_rows(m, half, n, k, alpha, a, lda, w, ldw, beta, c, ldc); /* the helper has not started: do it here */
    pthread_mutex_unlock(&call_lock);
    return;
  }
  unsigned d;
  for (int i = 0; (d = __atomic_load_n(&done_gen, __ATOMIC_ACQUIRE)) != g; i++) {
    if (i < SPIN)
      CPU_RELAX();
    else
      futex_wait(&done_gen, d);
  }
  pthread_mutex_unlock(&call_lock);
}

static unsigned long small_m;
unsigned long canary_small_m_count(void) { return small_m; }
int canary_small_m_max(void) { return small_m_max; }

static void zero(float *y, int n, int inc) {
  for (int i = 0; i < n; i++) y[(size_t)i * inc] = 0.0f;
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
  if (forwarding && order == ROW_MAJOR && real_sgemv != NULL && k > 0 && (m == 1 || n == 1)) {
    /* beta == 0 must not read C (it may hold anything, NaN included); some OpenBLAS versions scale it by 0. */
    if (m == 1) {
      /* c (1 x n) = alpha * a (1 x k) * op(b) (k x n) + beta * c: a matrix-vector product with op(b)^T. */
      int inc_a = trans_a == NO_TRANS ? 1 : lda;
      if (beta == 0.0f) zero(c, n, 1);
      if (trans_b == NO_TRANS) /* b stored k x n */
        real_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, inc_a, beta, c, 1);
      else /* b stored n x k */
        real_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, inc_a, beta, c, 1);
    } else {
      /* c (m x 1) = alpha * op(a) (m x k) * b (k x 1) + beta * c; c's elements are ldc apart. */
      int inc_b = trans_b == NO_TRANS ? ldb : 1;
      if (beta == 0.0f) zero(c, m, ldc);
      if (trans_a == NO_TRANS) /* a stored m x k */
        real_sgemv(ROW_MAJOR, NO_TRANS, m, k, alpha, a, lda, b, inc_b, beta, c, ldc);
      else /* a stored k x m */
        real_sgemv(ROW_MAJOR, TRANS, k, m, alpha, a, lda, b, inc_b, beta, c, ldc);
    }
    __atomic_fetch_add(&forwarded, 1, __ATOMIC_RELAXED); /* MLX may call from several stream threads */
    return;
  }
  if (forwarding && order == ROW_MAJOR && trans_a == NO_TRANS && trans_b == TRANS && m >= SMALL_M_MIN &&
      m <= small_m_max && n >= 4 && k >= 8) {
    small_m_gemm(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    __atomic_fetch_add(&small_m, 1, __ATOMIC_RELAXED);
    return;
  }
  __atomic_fetch_add(&passed, 1, __ATOMIC_RELAXED);
  real_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
