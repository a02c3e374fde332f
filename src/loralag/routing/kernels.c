/* loralag's native kernels: the SpectR stage's A*x over (token, candidate) pairs, grouped by adapter; the
   winners' B* applied to their tokens the same way; and one decoding token's whole routing in one call.

   MKL pays microseconds of setup per small GEMM, and LAG's grouped projection is a thousand GEMMs of
   ~10 rows: most of its time was that setup plus gathering token rows into place. Here each adapter's
   A* (r x d, read in place from the bank, any segment) meets its tokens' rows (read in place from X)
   in 4x4 register tiles of dot products. Built at first use by kernels.py with the machine's own
   vector width (GCC vector extensions: AVX-512, AVX2 or NEON as the compiler targets). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define W 16 /* floats per vector: one AVX-512 register, two AVX2 ones */
typedef float vf __attribute__((vector_size(W * sizeof(float))));

static inline vf load(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v); /* unaligned load */
    return v;
}

/* out[t * ld + a] = xs[t] . as[a] for t < NT, a < NA (both at most 4), over d floats. */
static inline __attribute__((always_inline)) void tile(const float *const *xs, const float *const *as, int NT,
                                                       int NA, int64_t d, float *out, int64_t ld) {
    vf acc[4][4];
    memset(acc, 0, sizeof acc);
    int64_t i = 0;
    for (; i + W <= d; i += W) {
        vf x[4], a[4];
        for (int t = 0; t < NT; t++) x[t] = load(xs[t] + i);
        for (int c = 0; c < NA; c++) a[c] = load(as[c] + i);
        for (int t = 0; t < NT; t++)
            for (int c = 0; c < NA; c++) acc[t][c] += x[t] * a[c];
    }
    for (int t = 0; t < NT; t++)
        for (int c = 0; c < NA; c++) {
            float s = 0;
            for (int l = 0; l < W; l++) s += acc[t][c][l];
            for (int64_t j = i; j < d; j++) s += xs[t][j] * as[c][j];
            out[t * ld + c] = s;
        }
}

/* Constant tile sizes, so the compiler unrolls each case fully and keeps acc in registers. */
static void tile_any(const float *const *xs, const float *const *as, int nt, int na, int64_t d, float *out,
                     int64_t ld) {
#define CASE(T, A) case (T) * 8 + (A): tile(xs, as, T, A, d, out, ld); break;
    switch (nt * 8 + na) {
        CASE(1, 1) CASE(1, 2) CASE(1, 3) CASE(1, 4) CASE(2, 1) CASE(2, 2) CASE(2, 3) CASE(2, 4)
        CASE(3, 1) CASE(3, 2) CASE(3, 3) CASE(3, 4) CASE(4, 1) CASE(4, 2) CASE(4, 3) CASE(4, 4)
    }
#undef CASE
}

/* For groups g in [g0, g1): adapter A*_g (rank[g] rows of d floats at address a[g]) and the pairs
   s in [offs[g], offs[g + 1]), pair[s] = token * k + candidate slot. Writes Z[pair[s], :] (rows of r
   floats): A*_g x_token, zero beyond rank[g]. first (or NULL): each pair's first coordinate, already
   known (the arrow score a·x, a being A*'s first row), copied instead of computed again. */
static void project_groups(const float *X, int64_t d, const int64_t *a, const int64_t *rank, const int64_t *offs,
                           const int64_t *pair, int64_t k, const float *first, float *Z, int64_t r, int64_t g0,
                           int64_t g1) {
    for (int64_t g = g0; g < g1; g++) {
        const float *A = (const float *)(intptr_t)a[g];
        const int64_t ra = rank[g];
        for (int64_t s = offs[g]; s < offs[g + 1]; s += 4) {
            const int nt = (int)(offs[g + 1] - s < 4 ? offs[g + 1] - s : 4);
            const float *xs[4];
            float tmp[4 * 4];
            for (int t = 0; t < nt; t++) xs[t] = X + (pair[s + t] / k) * d;
            if (first)
                for (int t = 0; t < nt; t++) Z[pair[s + t] * r] = first[pair[s + t]];
            for (int64_t j = first ? 1 : 0; j < ra; j += 4) {
                const int na = (int)(ra - j < 4 ? ra - j : 4);
                const float *as[4];
                for (int c = 0; c < na; c++) as[c] = A + (j + c) * d;
                tile_any(xs, as, nt, na, d, tmp, 4);
                for (int t = 0; t < nt; t++) memcpy(Z + pair[s + t] * r + j, tmp + t * 4, na * sizeof(float));
            }
            for (int t = 0; t < nt; t++) memset(Z + pair[s + t] * r + ra, 0, (r - ra) * sizeof(float));
        }
    }
}

/* The groups split into `parts` runs at bounds[0..parts], one per thread. With OpenMP this is the OpenMP
   runtime torch already loaded (the same soname), so its idle threads do the work rather than compete. */
void lag_project_pairs(const float *X, int64_t d, const int64_t *a, const int64_t *rank, const int64_t *offs,
                       const int64_t *pair, int64_t k, const float *first, float *Z, int64_t r, const int64_t *bounds,
                       int64_t parts) {
#pragma omp parallel for schedule(static, 1) num_threads(parts) if (parts > 1)
    for (int64_t p = 0; p < parts; p++)
        project_groups(X, d, a, rank, offs, pair, k, first, Z, r, bounds[p], bounds[p + 1]);
}

/* For groups g in [g0, g1): adapter B*_g (d_out rows of rank[g] floats at address b[g]) applied to the
   pairs s in [offs[g], offs[g + 1]): out[pair[s], :] = B*_g Z[pair[s], :rank[g]]. B* is read a block of
   64 output rows at a time, transposed into a small buffer, so each pair's block is 4 vectors of FMAs. */
#define OB 64
#define JB 32
static void apply_groups(const float *Z, int64_t r, const int64_t *b, const int64_t *rank, const int64_t *offs,
                         const int64_t *pair, float *out, int64_t d_out, int64_t g0, int64_t g1) {
    float bt[JB][OB];
    for (int64_t g = g0; g < g1; g++) {
        const float *B = (const float *)(intptr_t)b[g];
        const int64_t rg = rank[g];
        for (int64_t o0 = 0; o0 < d_out; o0 += OB) {
            const int64_t no = d_out - o0 < OB ? d_out - o0 : OB;
            for (int64_t j0 = 0; j0 < rg; j0 += JB) {
                const int64_t nj = rg - j0 < JB ? rg - j0 : JB;
                for (int64_t o = 0; o < no; o++)
                    for (int64_t j = 0; j < nj; j++) bt[j][o] = B[(o0 + o) * rg + j0 + j];
                if (no < OB) /* the last block's spare columns: computed on, never stored */
                    for (int64_t j = 0; j < nj; j++) memset(bt[j] + no, 0, (OB - no) * sizeof(float));
                for (int64_t s = offs[g]; s < offs[g + 1]; s++) {
                    const float *z = Z + pair[s] * r + j0;
                    float *y = out + pair[s] * d_out + o0;
                    vf acc[OB / W];
                    float tmp[OB];
                    if (j0 == 0) memset(acc, 0, sizeof acc);
                    else { memset(tmp, 0, sizeof tmp); memcpy(tmp, y, no * sizeof(float)); for (int v = 0; v < OB / W; v++) acc[v] = load(tmp + v * W); }
                    for (int64_t j = 0; j < nj; j++)
                        for (int v = 0; v < OB / W; v++) acc[v] += z[j] * load(bt[j] + v * W);
                    if (no == OB) memcpy(y, acc, sizeof acc);
                    else { memcpy(tmp, acc, sizeof acc); memcpy(y, tmp, no * sizeof(float)); }
                }
            }
        }
    }
}

void lag_apply_pairs(const float *Z, int64_t r, const int64_t *b, const int64_t *rank, const int64_t *offs,
                     const int64_t *pair, float *out, int64_t d_out, const int64_t *bounds, int64_t parts) {
#pragma omp parallel for schedule(static, 1) num_threads(parts) if (parts > 1)
    for (int64_t p = 0; p < parts; p++) apply_groups(Z, r, b, rank, offs, pair, out, d_out, bounds[p], bounds[p + 1]);
}

/* ---- decoding: one token through lag in one call ------------------------------------------------------ */

/* float16 values (the arrows' half-size copy) converted by F16C instructions: the compiler's own _Float16
   conversions go one element at a time on CPUs without AVX512-FP16. */
#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#define HAVE_HALF 1
int lag_has_half(void) { return 1; }
static inline vf load_half(const uint16_t *p) {
    __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8)));
    vf v;
    memcpy(&v, &lo, sizeof lo);
    memcpy((char *)&v + sizeof lo, &hi, sizeof hi);
    return v;
}
#else
int lag_has_half(void) { return 0; }
#endif

/* W values of a row from i on, float32 or (half) float16; `half` is a constant at every call site. */
static inline __attribute__((always_inline)) vf load_row(const void *a, int64_t i, int half) {
#ifdef HAVE_HALF
    if (half) return load_half((const uint16_t *)a + i);
#endif
    return load((const float *)a + i);
}

static inline __attribute__((always_inline)) float row_at(const void *a, int64_t i, int half) {
#ifdef HAVE_HALF
    if (half) return _cvtsh_ss(((const uint16_t *)a)[i]);
#endif
    return ((const float *)a)[i];
}

/* a . x over d values, four accumulators deep (one would wait on each FMA's latency). */
static inline __attribute__((always_inline)) float dot(const void *a, const float *x, int64_t d, int half) {
    vf acc[4] = {{0}, {0}, {0}, {0}};
    int64_t i = 0;
    for (; i + 4 * W <= d; i += 4 * W)
        for (int u = 0; u < 4; u++) acc[u] += load_row(a, i + u * W, half) * load(x + i + u * W);
    for (; i + W <= d; i += W) acc[0] += load_row(a, i, half) * load(x + i);
    vf v = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    float s = 0;
    for (int l = 0; l < W; l++) s += v[l];
    for (; i < d; i++) s += row_at(a, i, half) * x[i];
    return s;
}

static float dot32(const float *a, const float *x, int64_t d) { return dot(a, x, d, 0); }
#ifdef HAVE_HALF
static float dot16(const uint16_t *a, const float *x, int64_t d) { return dot(a, x, d, 1); }
#endif

/* Keep the m largest of (value, id) in best[0..m) sorted descending: insertion into a short sorted list. */
static void keep(float *val, int64_t *id, int64_t *have, int64_t m, float v, int64_t i) {
    if (*have == m && !(v > val[m - 1])) return;
    int64_t p = *have < m ? (*have)++ : m - 1;
    while (p > 0 && v > val[p - 1]) { val[p] = val[p - 1]; id[p] = id[p - 1]; p--; }
    val[p] = v;
    id[p] = i;
}

/* One token x through lag over n adapters: the top k of |a.x| (with arrows16: the best `margin` by the
   float16 arrows, re-ranked with the float32 ones), then the largest ||A* x|| among those k (A* of
   adapter i: rank[i] <= 256 rows at a[i]), then delta = B*_w (A*_w x) (B* of adapter i: d_out rows of
   brank[i] floats at b[i]). Returns the winner; its score goes to *score. sval, sid: scratch of
   margin + k entries each. */
int64_t lag_decode(const float *x, int64_t d, int64_t n, const float *arrows, const void *arrows16, int64_t k,
                   int64_t margin, const int64_t *a, const int64_t *rank, const int64_t *b, const int64_t *brank,
                   int64_t d_out, float *delta, float *score, float *sval, int64_t *sid) {
    int64_t have = 0;
    if (arrows16) {
#ifdef HAVE_HALF
        const uint16_t *h = (const uint16_t *)arrows16;
        for (int64_t i = 0; i < n; i++) keep(sval, sid, &have, margin, fabsf(dot16(h + i * d, x, d)), i);
        const int64_t m = have;
        float *val2 = sval + margin;
        int64_t *id2 = sid + margin, have2 = 0;
        for (int64_t j = 0; j < m; j++) keep(val2, id2, &have2, k, fabsf(dot32(arrows + sid[j] * d, x, d)), sid[j]);
        memcpy(sval, val2, have2 * sizeof(float));
        memcpy(sid, id2, have2 * sizeof(int64_t));
        have = have2;
#endif
    } else {
        for (int64_t i = 0; i < n; i++) keep(sval, sid, &have, k, fabsf(dot32(arrows + i * d, x, d)), i);
    }
    /* SpectR among the k, in arrow order; the first largest wins (as torch's max) */
    int64_t best = -1;
    float best_sq = -1, zbest[256];
    for (int64_t c = 0; c < have; c++) {
        const float *A = (const float *)(intptr_t)a[sid[c]];
        const int64_t ra = rank[sid[c]] < 256 ? rank[sid[c]] : 256;
        float z[256], sq = 0;
        for (int64_t j = 0; j < ra; j++) { z[j] = dot32(A + j * d, x, d); sq += z[j] * z[j]; }
        if (sq > best_sq) { best_sq = sq; best = c; memcpy(zbest, z, ra * sizeof(float)); }
    }
    if (have == 0) return -1;
    if (best < 0) best = 0; /* NaN scores: the arrow's first pick, as a delta of NaN */
    const int64_t w = sid[best];
    const float *B = (const float *)(intptr_t)b[w];
    const int64_t rb = brank[w] < 256 ? brank[w] : 256;
    for (int64_t o = 0; o < d_out; o++) {
        float s = 0;
        for (int64_t j = 0; j < rb; j++) s += B[o * brank[w] + j] * zbest[j];
        delta[o] = s;
    }
    *score = sqrtf(best_sq);
    return w;
}
