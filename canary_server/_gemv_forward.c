/* cblas_sgemm with its matrix-vector cases sent to cblas_sgemv (Linux only; loaded by canary_server/_blas.py).

   MLX's CPU backend computes every matmul with cblas_sgemm. For a single row (the decoder step at batch 1:
   x (1 x K) @ W (K x N)) OpenBLAS's sgemm first packs the whole weight matrix into a scratch buffer and then reads
   it again, so it moves ~3x the bytes a matrix-vector product must: on the 2-core dev VM, 16 matrix-vector products
   of 1024 x 4096 took 11.8 ms through sgemm and 6.4 ms through sgemv (bench/decoder_step.py measures the step).
   OpenBLAS >= 0.3.27 can do this forwarding itself (GEMM_GEMV_FORWARD) on some targets; Debian 12 has 0.3.21.

   This library is loaded with RTLD_GLOBAL before OpenBLAS, so MLX's cblas_sgemm resolves here; the real sgemm and
   sgemv are handed over by canary_gemv_forward_init(). Every other case goes to the real sgemm unchanged. The sums
   run in sgemv's order instead of sgemm's: results may differ in the last float32 bits, as between any two BLAS. */
#include <stddef.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float, float *, int);

static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;
static int forwarding = 1;

int canary_gemv_forward_init(void *sgemm, void *sgemv, int enabled) {
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
  __atomic_fetch_add(&passed, 1, __ATOMIC_RELAXED);
  real_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
