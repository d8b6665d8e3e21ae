/* Skinny LoRA products on the CPU, one pass over the big operand each.
 *
 * All matrices are contiguous row-major.  N is the number of rows (tokens), k / d the long feature
 * axes, r the rank (small).  The big operand (x or g: N x k or N x d) is read exactly once; the
 * small ones (A, B, the per-thread accumulators) stay in L1/L2 while it streams past.
 *
 *   xat     u   (N x r) = x (N x k) . A^T          A: r x k
 *   g_pass  v   (N x r) = sv . g (N x d) . B        B: d x r   (passed transposed: Bt, r x d)
 *           dBt (r x d) = sb . u^T g                in the same read of g
 *   xt_pass dA  (r x k) = v^T x                     (g_pass without Bt)
 *   g_pass with Aw: also gx (N x k) = v . Aw (Aw: r x k), written as v is made
 *   xat_expand  u = x A^T and h = bias + u . sBt in one pass (h's rows written while u is hot)
 *   expand      out (N x D) = bias + coef (N x r) . w (r x D): the rank-r products (u sB^T in forward)
 *               cost one write of out, where MKL's k = r GEMM runs well below memory speed
 *
 * Rows are split into one contiguous static block per thread; each thread sums its rows into its
 * own accumulator, and the accumulators are then added in thread order.  The result is therefore
 * deterministic for a fixed thread count.  Threads come from OpenMP (linked against the runtime
 * torch already loaded, so both share one pool).  No torch headers: plain C, called via ctypes.
 */
#define _POSIX_C_SOURCE 200112L /* posix_memalign */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* outer_: rows per block (OB rows of m stay in L2 while the register tiles sweep them). */
#define OB 64
/* Rows of g per block in g_pass: both uses of a block (v, then dBt) happen while it is in L2. */
#define GB 64

/* GCC/clang vector extensions: one 64-byte vector (an AVX-512 register; two or four narrower
 * registers elsewhere, which the compiler splits).  aligned(1) + may_alias: loads from any address. */
#define VBYTES 64
typedef float V_f32 __attribute__((vector_size(VBYTES), aligned(1), may_alias));
typedef double V_f64 __attribute__((vector_size(VBYTES), aligned(1), may_alias));
#define VLOAD(VT, p) (*(const VT *)(p))
#define VSTORE(VT, p, v) (*(VT *)(p) = (v))

static void *scratch(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0) return NULL;
    return p;
}

static void split(int64_t n, int nt, int t, int64_t *lo, int64_t *hi) {
    int64_t q = n / nt, rem = n % nt;
    *lo = t * q + (t < rem ? t : rem);
    *hi = *lo + q + (t < rem ? 1 : 0);
}

#define DEFINE_KERNELS(T, SUF)                                                                        \
/* out[i, j] = scale . dot(m[i, :], w[j, :]) for rows i in [lo, hi): m is N x K, w is r x K.          \
 * Tiles of 4 rows x 4 columns: 16 independent sums hide the FMA latency and each load of m or w      \
 * feeds four products. */                                                                            \
static void dots_##SUF(const T *restrict m, const T *restrict w, T *restrict out, int64_t lo,         \
                       int64_t hi, int64_t K, int64_t r, T scale) {                                   \
    int64_t i = lo;                                                                                   \
    for (; i + 4 <= hi; i += 4) {                                                                     \
        const T *restrict a0 = m + i * K, *restrict a1 = a0 + K, *restrict a2 = a1 + K,               \
                          *restrict a3 = a2 + K;                                                      \
        int64_t j = 0;                                                                                \
        for (; j + 4 <= r; j += 4) {                                                                  \
            const T *restrict w0 = w + j * K, *restrict w1 = w0 + K, *restrict w2 = w1 + K,           \
                              *restrict w3 = w2 + K;                                                  \
            T s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;                 \
            T s20 = 0, s21 = 0, s22 = 0, s23 = 0, s30 = 0, s31 = 0, s32 = 0, s33 = 0;                 \
            _Pragma("omp simd reduction(+:s00,s01,s02,s03,s10,s11,s12,s13,s20,s21,s22,s23,s30,s31,s32,s33)") \
            for (int64_t c = 0; c < K; c++) {                                                         \
                T b0 = w0[c], b1 = w1[c], b2 = w2[c], b3 = w3[c], x;                                  \
                x = a0[c]; s00 += x * b0; s01 += x * b1; s02 += x * b2; s03 += x * b3;                \
                x = a1[c]; s10 += x * b0; s11 += x * b1; s12 += x * b2; s13 += x * b3;                \
                x = a2[c]; s20 += x * b0; s21 += x * b1; s22 += x * b2; s23 += x * b3;                \
                x = a3[c]; s30 += x * b0; s31 += x * b1; s32 += x * b2; s33 += x * b3;                \
            }                                                                                         \
            T *o = out + i * r + j;                                                                   \
            o[0] = scale * s00; o[1] = scale * s01; o[2] = scale * s02; o[3] = scale * s03; o += r;   \
            o[0] = scale * s10; o[1] = scale * s11; o[2] = scale * s12; o[3] = scale * s13; o += r;   \
            o[0] = scale * s20; o[1] = scale * s21; o[2] = scale * s22; o[3] = scale * s23; o += r;   \
            o[0] = scale * s30; o[1] = scale * s31; o[2] = scale * s32; o[3] = scale * s33;           \
        }                                                                                             \
        for (; j < r; j++) {                                                                          \
            const T *restrict w0 = w + j * K;                                                         \
            T s0 = 0, s1 = 0, s2 = 0, s3 = 0;                                                         \
            _Pragma("omp simd reduction(+:s0,s1,s2,s3)")                                              \
            for (int64_t c = 0; c < K; c++) {                                                         \
                T b = w0[c];                                                                          \
                s0 += a0[c] * b; s1 += a1[c] * b; s2 += a2[c] * b; s3 += a3[c] * b;                   \
            }                                                                                         \
            out[i * r + j] = scale * s0; out[(i + 1) * r + j] = scale * s1;                           \
            out[(i + 2) * r + j] = scale * s2; out[(i + 3) * r + j] = scale * s3;                     \
        }                                                                                             \
    }                                                                                                 \
    for (; i < hi; i++) {                                                                             \
        const T *restrict mi = m + i * K;                                                             \
        for (int64_t j = 0; j < r; j++) {                                                             \
            const T *restrict w0 = w + j * K;                                                         \
            T s0 = 0;                                                                                 \
            _Pragma("omp simd reduction(+:s0)")                                                       \
            for (int64_t c = 0; c < K; c++) s0 += mi[c] * w0[c];                                      \
            out[i * r + j] = scale * s0;                                                              \
        }                                                                                             \
    }                                                                                                 \
}                                                                                                     \
                                                                                                      \
/* acc (r x K) += coef[lo:hi]^T m[lo:hi] : coef is N x r, m is N x K.  A small GEMM, register-     \
 * blocked: a tile of 4 accumulator rows x 4 vectors (16 registers) takes one row of m at a time,     \
 * 4 loads of m + 4 broadcasts of coef per 16 FMAs, and is loaded/stored once per OB rows.  The OB    \
 * rows of m stay in L2 while the tiles sweep them, so m comes from memory once. */                   \
static void outer_##SUF(const T *restrict coef, const T *restrict m, T *restrict acc, int64_t lo,     \
                        int64_t hi, int64_t K, int64_t r) {                                           \
    enum { L = VBYTES / (int)sizeof(T), CT = 4 * L };                                                 \
    const int64_t Kt = K - K % CT;                                                                    \
    for (int64_t ib = lo; ib < hi; ib += OB) {                                                        \
        int64_t ie = ib + OB < hi ? ib + OB : hi;                                                     \
        for (int64_t c = 0; c < Kt; c += CT) {                                                        \
            int64_t j = 0;                                                                            \
            for (; j + 4 <= r; j += 4) {                                                              \
                V_##SUF t[4][4];                                                                      \
                for (int q = 0; q < 4; q++)                                                           \
                    for (int e = 0; e < 4; e++) t[q][e] = VLOAD(V_##SUF, acc + (j + q) * K + c + e * L); \
                for (int64_t i = ib; i < ie; i++) {                                                   \
                    const T *mi = m + i * K + c;                                                      \
                    V_##SUF x0 = VLOAD(V_##SUF, mi), x1 = VLOAD(V_##SUF, mi + L),                     \
                            x2 = VLOAD(V_##SUF, mi + 2 * L), x3 = VLOAD(V_##SUF, mi + 3 * L);         \
                    for (int q = 0; q < 4; q++) {                                                     \
                        T kq = coef[i * r + j + q];                                                   \
                        t[q][0] += kq * x0; t[q][1] += kq * x1; t[q][2] += kq * x2; t[q][3] += kq * x3; \
                    }                                                                                 \
                }                                                                                     \
                for (int q = 0; q < 4; q++)                                                           \
                    for (int e = 0; e < 4; e++) VSTORE(V_##SUF, acc + (j + q) * K + c + e * L, t[q][e]); \
            }                                                                                         \
            for (; j < r; j++) {                                                                      \
                V_##SUF t0 = VLOAD(V_##SUF, acc + j * K + c), t1 = VLOAD(V_##SUF, acc + j * K + c + L), \
                        t2 = VLOAD(V_##SUF, acc + j * K + c + 2 * L), t3 = VLOAD(V_##SUF, acc + j * K + c + 3 * L); \
                for (int64_t i = ib; i < ie; i++) {                                                   \
                    const T *mi = m + i * K + c;                                                      \
                    T kq = coef[i * r + j];                                                           \
                    t0 += kq * VLOAD(V_##SUF, mi); t1 += kq * VLOAD(V_##SUF, mi + L);                 \
                    t2 += kq * VLOAD(V_##SUF, mi + 2 * L); t3 += kq * VLOAD(V_##SUF, mi + 3 * L);     \
                }                                                                                     \
                VSTORE(V_##SUF, acc + j * K + c, t0); VSTORE(V_##SUF, acc + j * K + c + L, t1);       \
                VSTORE(V_##SUF, acc + j * K + c + 2 * L, t2); VSTORE(V_##SUF, acc + j * K + c + 3 * L, t3); \
            }                                                                                         \
        }                                                                                             \
        for (int64_t i = ib; i < ie && Kt < K; i++) { /* the last K % CT columns */                   \
            const T *restrict mi = m + i * K;                                                         \
            for (int64_t j = 0; j < r; j++) {                                                         \
                T kq = coef[i * r + j];                                                               \
                T *restrict aj = acc + j * K;                                                         \
                _Pragma("omp simd")                                                                   \
                for (int64_t c = Kt; c < K; c++) aj[c] += kq * mi[c];                                 \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
}                                                                                                     \
                                                                                                      \
/* out[i, :] = bias + sum_j coef[i, j] . w[j, :] for rows i in [lo, hi): coef N x r, w r x D, out   \
 * N x D, bias D or NULL.  Vectorised over D; w (r x D) stays in L1/L2 across the rows. */            \
static void expand_##SUF(const T *restrict coef, const T *restrict w, const T *restrict bias,         \
                         T *restrict out, int64_t lo, int64_t hi, int64_t D, int64_t r) {             \
    enum { L = VBYTES / (int)sizeof(T) };                                                             \
    const int64_t Dv = D - D % L;                                                                     \
    for (int64_t i = lo; i < hi; i++) {                                                               \
        const T *restrict ci = coef + i * r;                                                          \
        T *restrict oi = out + i * D;                                                                 \
        for (int64_t c = 0; c < Dv; c += L) {                                                         \
            V_##SUF acc = bias ? VLOAD(V_##SUF, bias + c) : (V_##SUF){0};                             \
            for (int64_t j = 0; j < r; j++) acc += ci[j] * VLOAD(V_##SUF, w + j * D + c);             \
            VSTORE(V_##SUF, oi + c, acc);                                                             \
        }                                                                                             \
        for (int64_t c = Dv; c < D; c++) {                                                            \
            T acc = bias ? bias[c] : (T)0;                                                            \
            for (int64_t j = 0; j < r; j++) acc += ci[j] * w[j * D + c];                              \
            oi[c] = acc;                                                                              \
        }                                                                                             \
    }                                                                                                 \
}                                                                                                     \
                                                                                                      \
/* out (n) = scale . sum_t parts[t] (n each), in thread order; parallel over n. */                    \
static void reduce_##SUF(const T *restrict parts, T *restrict out, int64_t n, int nt, T scale, int t, \
                         int nthreads) {                                                              \
    int64_t lo, hi;                                                                                   \
    split(n, nthreads, t, &lo, &hi);                                                                  \
    for (int64_t e = lo; e < hi; e++) {                                                               \
        T s = parts[e];                                                                               \
        for (int q = 1; q < nt; q++) s += parts[(int64_t)q * n + e];                                  \
        out[e] = scale * s;                                                                           \
    }                                                                                                 \
}                                                                                                     \
                                                                                                      \
/* u = x A^T and h = bias + u . sBt, block by block: h's rows are written while their u is hot (in  \
 * the training step this measured 0.3 ms faster than xat then expand at N = 2048, k = d = 1024).    \
 * x = NULL: u is an input and only h is made; sBt = NULL: only u is made. */                         \
int lk_xat_expand_##SUF(const T *x, const T *A, const T *sBt, const T *bias, T *u, T *h, int64_t N,    \
                        int64_t k, int64_t d, int64_t r, int nthreads) {                              \
    if (nthreads < 1) nthreads = 1;                                                                   \
    _Pragma("omp parallel num_threads(nthreads)")                                                     \
    {                                                                                                 \
        int t = 0, nt = 1;                                                                            \
        LK_TID(t, nt);                                                                                \
        int64_t lo, hi;                                                                               \
        split(N, nt, t, &lo, &hi);                                                                    \
        for (int64_t b = lo; b < hi; b += GB) {                                                       \
            int64_t e = b + GB < hi ? b + GB : hi;                                                    \
            if (x) dots_##SUF(x, A, u, b, e, k, r, (T)1);                                             \
            if (sBt) expand_##SUF(u, sBt, bias, h, b, e, d, r);                                       \
        }                                                                                             \
    }                                                                                                 \
    return 0;                                                                                         \
}                                                                                                     \
                                                                                                      \
/* u = x A^T alone. */                                                                               \
int lk_xat_##SUF(const T *x, const T *A, T *u, int64_t N, int64_t k, int64_t r, int nthreads) {       \
    return lk_xat_expand_##SUF(x, A, NULL, NULL, u, NULL, N, k, 0, r, nthreads);                      \
}                                                                                                     \
                                                                                                      \
/* out = bias + coef . w alone. */                                                                    \
int lk_expand_##SUF(T *coef, const T *w, const T *bias, T *out, int64_t N, int64_t D, int64_t r,      \
                    int nthreads) {                                                                   \
    return lk_xat_expand_##SUF(NULL, NULL, w, bias, coef, out, N, 0, D, r, nthreads);                 \
}                                                                                                     \
                                                                                                      \
/* dBt = sb . u^T g and, when Bt is given, v = sv . g Bt^T; each block of a thread's rows of g is     \
 * read from memory once (dBt's tiles then find it in L2).  With Bt = NULL this is dA = v^T x. */     \
int lk_g_pass_##SUF(const T *g, const T *Bt, const T *u, const T *Aw, T *v, T *dBt, T *gx, int64_t N, \
                    int64_t d, int64_t k, int64_t r, double sv, double sb, int nthreads) {            \
    if (nthreads < 1) nthreads = 1;                                                                   \
    if (N < nthreads) nthreads = N > 0 ? (int)N : 1;                                                  \
    T *parts = (T *)scratch(sizeof(T) * (size_t)nthreads * (size_t)(r * d));                          \
    if (!parts) return -1;                                                                            \
    int failed = 0;                                                                                   \
    _Pragma("omp parallel num_threads(nthreads)")                                                     \
    {                                                                                                 \
        int t = 0, nt = 1;                                                                            \
        LK_TID(t, nt);                                                                                \
        if (nt != nthreads) failed = 1; /* fewer threads than asked: parts would be partly unset */   \
        else {                                                                                        \
            int64_t lo, hi;                                                                           \
            split(N, nt, t, &lo, &hi);                                                                \
            T *acc = parts + (int64_t)t * r * d;                                                      \
            memset(acc, 0, sizeof(T) * (size_t)(r * d));                                              \
            for (int64_t b = lo; b < hi; b += GB) {                                                   \
                int64_t e = b + GB < hi ? b + GB : hi;                                                \
                if (Bt) dots_##SUF(g, Bt, v, b, e, d, r, (T)sv);                                      \
                outer_##SUF(u, g, acc, b, e, d, r);                                                   \
                if (Aw) expand_##SUF(v, Aw, NULL, gx, b, e, k, r); /* gx = v Aw while v is hot */      \
            }                                                                                         \
        }                                                                                             \
        _Pragma("omp barrier")                                                                        \
        if (!failed) reduce_##SUF(parts, dBt, r * d, nthreads, (T)sb, t, nt);                         \
    }                                                                                                 \
    free(parts);                                                                                      \
    return failed ? -2 : 0;                                                                           \
}                                                                                                     \
                                                                                                      \
/* dA = v^T x: the accumulation half of g_pass. */                                                    \
int lk_xt_pass_##SUF(const T *x, const T *v, T *dA, int64_t N, int64_t k, int64_t r, int nthreads) {  \
    return lk_g_pass_##SUF(x, NULL, v, NULL, NULL, dA, NULL, N, k, 0, r, 0.0, 1.0, nthreads);          \
}

#ifdef _OPENMP
#define LK_TID(t, nt) do { (t) = omp_get_thread_num(); (nt) = omp_get_num_threads(); } while (0)
#else
#define LK_TID(t, nt) do { (t) = 0; (nt) = 1; } while (0)
#endif

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(double, f64)

/* The ABI version the Python side checks, so a stale cached library is never used. */
int lk_abi_version(void) { return 3; }
