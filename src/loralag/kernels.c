/* loralag's native kernels: the SpectR stage's A*x over (token, candidate) pairs, grouped by adapter, and
   the winners' B* applied to their tokens the same way.

   MKL pays microseconds of setup per small GEMM, and LAG's grouped projection is a thousand GEMMs of
   ~10 rows: most of its time was that setup plus gathering token rows into place. Here each adapter's
   A* (r x d, read in place from the bank, any segment) meets its tokens' rows (read in place from X)
   in 4x4 register tiles of dot products. Built at first use by kernels.py with the machine's own
   vector width (GCC vector extensions: AVX-512, AVX2 or NEON as the compiler targets). */
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
                memset(bt, 0, sizeof bt);
                for (int64_t o = 0; o < no; o++)
                    for (int64_t j = 0; j < nj; j++) bt[j][o] = B[(o0 + o) * rg + j0 + j];
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
