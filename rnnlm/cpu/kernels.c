/* Whole-window recurrences for the CPU, compiled at first use by rnnlm/cpu/native.py (gcc -O3 -march=native).

   The book's RNN spends its time in 70 small dependent matmuls per minibatch, (batch, 256) x (256, 256). Through
   torch each costs a Python call and a oneDNN call (about 15 us of overhead on 20 us of arithmetic); here a whole
   window (35 steps forward, or 35 back) is one call into a register-blocked matmul with the elementwise work fused
   in, and the caller runs two halves of the batch on two cores at once (ctypes releases the GIL).

   Layouts are torch's: row-major float32, tokens int64, states (steps, batch, hidden). The tanh RNN's windows and
   the LSTM's bf16 ones (`amp`) work on the batch rows [r0, r1) only, so that two threads can share one call's
   buffers; the GRU's and the LSTM's float32 windows split the hidden units instead (see barrier). */

#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* this thread's number in its OpenMP team and the team's size (0 and 1 outside a team, or without OpenMP) */
#if defined(_OPENMP)
#include <omp.h>
static inline int team_rank(void) { return omp_get_thread_num(); }
static inline int team_size(void) { return omp_get_num_threads(); }
#else
static inline int team_rank(void) { return 0; }
static inline int team_size(void) { return 1; }
#endif
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define VL 16 /* floats per vector register */
#define MR 8  /* rows per register block: MR x 2 accumulators */
#else
#define VL 8
#define MR 6
#endif
#define NR (2 * VL) /* columns per packed panel */

typedef float vf __attribute__((vector_size(VL * 4), aligned(4)));

/* panels of NR columns that hold n columns */
static inline int panels_of(int n) { return (n + NR - 1) / NR; }

int rnnlm_panel_width(void) { return NR; }

/* B (K x N), given as W: B[k][j] = W[j][k] when `trans` (a torch weight used as x @ W.T), else W[k][j]; written as
   ceil(N / NR) panels of K x NR, the last one padded with zeros; panels [p0, p1) only (two workers can pack one
   matrix in halves). */
static void pack_panels(const float *W, int K, int N, int trans, int p0, int p1, float *out) {
    for (int p = p0; p < p1; p++)
        for (int k = 0; k < K; k++)
            for (int jj = 0; jj < NR; jj++) {
                int j = p * NR + jj;
                float v = 0.0f;
                if (j < N) v = trans ? W[(size_t)j * K + k] : W[(size_t)k * N + j];
                out[((size_t)p * K + k) * NR + jj] = v;
            }
}

/* all of B's panels */
void rnnlm_pack(const float *W, int K, int N, int trans, float *out) {
    pack_panels(W, K, N, trans, 0, panels_of(N), out);
}

/* B (H x G*U) of the worker's units of each of G gates, packed as rnnlm_pack's panels: column c = gate * U + j is
   row gate * H + u0 + j of W_hh (G*H x H), the operand of a forward step's h_prev @ W_hh.T */
static void pack_unit_rows(const float *W, int G, int H, int u0, int U, float *out) {
    int N = G * U;
    for (int p = 0; p < panels_of(N); p++)
        for (int jj = 0; jj < NR; jj++) {
            int c = p * NR + jj;
            const float *row = c < N ? W + ((size_t)(c / U) * H + u0 + c % U) * H : NULL;
            for (int k = 0; k < H; k++) out[((size_t)p * H + k) * NR + jj] = row ? row[k] : 0.0f;
        }
}

/* B (G*U x H): the rows of W_hh (G*H x H) of the worker's units of each of G gates (row gate * U + j is row
   gate * H + u0 + j), all H columns, packed as rnnlm_pack's panels: a split backward step's operand */
static void pack_unit_rows_untransposed(const float *W, int G, int H, int u0, int U, float *out) {
    for (int p = 0; p < panels_of(H); p++)
        for (int k = 0; k < G * U; k++) {
            const float *row = W + ((size_t)(k / U) * H + u0 + k % U) * H;
            for (int jj = 0; jj < NR; jj++) {
                int j = p * NR + jj;
                out[((size_t)p * G * U + k) * NR + jj] = j < H ? row[j] : 0.0f;
            }
        }
}

/* B (G*H x U) = the worker's columns [u0, u0 + U) of W_hh (G*H x H), packed: a backward step's operand */
static void pack_unit_columns(const float *W, int G, int H, int u0, int U, float *out) {
    for (int p = 0; p < panels_of(U); p++)
        for (int k = 0; k < G * H; k++)
            for (int jj = 0; jj < NR; jj++) {
                int j = p * NR + jj;
                out[((size_t)p * G * H + k) * NR + jj] = j < U ? W[(size_t)k * H + u0 + j] : 0.0f;
            }
}

/* C[0:R, 0:NR] = A[0:R, 0:K] @ panel (with `acc`, C +=), for R <= MR known when it is inlined: 2R accumulators stay
   in registers */
static inline __attribute__((always_inline)) void block(const int R, int K, const float *A, int lda, const float *B,
                                                        float *C, int ldc, int acc) {
    vf c[MR][2];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        c[r][0] = acc ? *(const vf *)(C + (size_t)r * ldc) : (vf){0};
        c[r][1] = acc ? *(const vf *)(C + (size_t)r * ldc + VL) : (vf){0};
    }
    for (int k = 0; k < K; k++) {
        vf b0 = *(const vf *)(B + (size_t)k * NR), b1 = *(const vf *)(B + (size_t)k * NR + VL);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            vf a = A[(size_t)r * lda + k] - (vf){0}; /* a broadcast: x - 0 is x, x + 0 is not (-0) */
            c[r][0] += a * b0;
            c[r][1] += a * b1;
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        *(vf *)(C + (size_t)r * ldc) = c[r][0];
        *(vf *)(C + (size_t)r * ldc + VL) = c[r][1];
    }
}

/* `block` for 1 to MR rows, each count with its own registers */
static void block_rows(int rows, int K, const float *A, int lda, const float *B, float *C, int ldc, int acc) {
    switch (rows) {
#define ROWS(R)                                                                                                        \
    case R:                                                                                                            \
        block(R, K, A, lda, B, C, ldc, acc);                                                                           \
        break;
        ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6)
#if MR > 6
        ROWS(7) ROWS(8)
#endif
#undef ROWS
    }
}

/* The rows of the next register block when `left` rows remain: shared out evenly over the fewest blocks of at most
   MR. A window's 20 rows on AVX2 go 5 + 5 + 5 + 5, not 6 + 6 + 6 + 2, whose block of 2 rows (4 accumulators) waits
   on its FMAs' latency: about 1.1x the matmul's speed at 20 rows, 1.2x at 10 (each sum the same, in the same
   order). */
static inline int block_height(int left) { return left / ((left + MR - 1) / MR); }

/* C (M x panels * NR, row stride ldc) = A (M x K, row stride lda) @ packed B */
static void gemm(int M, int K, int panels, const float *A, int lda, const float *Bp, float *C, int ldc) {
    for (int p = 0; p < panels; p++) {
        const float *B = Bp + (size_t)p * K * NR;
        for (int i = 0, rows; i < M; i += rows) {
            rows = block_height(M - i);
            block_rows(rows, K, A + (size_t)i * lda, lda, B, C + (size_t)i * ldc + p * NR, ldc, 0);
        }
    }
}

/* gemm for a long K (a weight's gradient summed over a window's rows): K in blocks of KB, so that a panel's block
   stays in L1 while every row block of A goes over it, the products added up in C */
#define KB 256
static void gemm_long(int M, int K, int panels, const float *A, int lda, const float *Bp, float *C, int ldc) {
    for (int k0 = 0; k0 < K; k0 += KB) {
        int kk = K - k0 < KB ? K - k0 : KB, acc = k0 > 0;
        for (int p = 0; p < panels; p++) {
            const float *B = Bp + ((size_t)p * K + k0) * NR;
            float *Cp = C + p * NR;
            const float *Ak = A + k0;
            for (int i = 0, rows; i < M; i += rows) {
                rows = block_height(M - i);
                block_rows(rows, kk, Ak + (size_t)i * lda, lda, B, Cp + (size_t)i * ldc, ldc, acc);
            }
        }
    }
}
#undef KB

/* bf16 matmuls (the LSTM under `amp`): products of bf16 inputs summed in float32. B is packed as panels of
   ceil(K / 2) k-pairs x NR lanes, each lane a 32-bit word holding B[2kk][j] (low half) and B[2kk + 1][j] (high half),
   which is the operand layout of AVX512-BF16's vdpbf16ps; A is bf16 rows whose k-pairs are read as 32-bit words.
   Without AVX512-BF16 the same arithmetic runs on float32 FMAs (correct, and slower than the float32 kernels). */

typedef uint32_t vu __attribute__((vector_size(VL * 4), aligned(4)));

int rnnlm_bf16_native(void) {
#if defined(__AVX512BF16__) && VL == 16
    return 1;
#else
    return 0;
#endif
}

/* float32 -> bf16, rounded to nearest even */
static inline uint16_t bf16_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float bf16_float(uint32_t bits16) {
    uint32_t u = bits16 << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

/* dst[0:n] = bf16(src[0:n]), and a zero in the pad column when the row stride is odd-padded (n odd) */
static void bf16_row(int n, const float *src, uint16_t *dst) {
    for (int j = 0; j < n; j++) dst[j] = bf16_bits(src[j]);
    if (n & 1) dst[n] = 0;
}

static inline uint32_t bf16_pair(float low, float high) { return bf16_bits(low) | (uint32_t)bf16_bits(high) << 16; }

/* Panels [p0, p1) of rnnlm_pack_bf16's layout. With trans, a word holds two neighbours of a row of W: they are
   converted along W's rows into a tile of 16 k-pairs and stored transposed, so that reads and writes stay
   sequential. */
static void pack_bf16_panels(const float *W, int K, int N, int trans, int p0, int p1, uint32_t *out) {
    int pairs = (K + 1) / 2;
    for (int p = p0; p < p1; p++) {
        uint32_t *panel = out + (size_t)p * pairs * NR;
        int width = N - p * NR < NR ? N - p * NR : NR;
        if (!trans) {
            for (int kk = 0; kk < pairs; kk++) {
                const float *row0 = W + (size_t)2 * kk * N + p * NR, *row1 = row0 + N;
                int whole = 2 * kk + 1 < K; /* the pair's second row exists */
                uint32_t *word = panel + (size_t)kk * NR;
                if (width == NR && whole)
                    for (int jj = 0; jj < NR; jj++) word[jj] = bf16_pair(row0[jj], row1[jj]);
                else
                    for (int jj = 0; jj < NR; jj++)
                        word[jj] = jj < width ? bf16_pair(row0[jj], whole ? row1[jj] : 0.0f) : 0;
            }
            continue;
        }
        for (int k0 = 0; k0 < pairs; k0 += 16) {
            uint32_t tile[NR][16];
            int count = pairs - k0 < 16 ? pairs - k0 : 16;
            for (int jj = 0; jj < NR; jj++) {
                const float *row = W + (size_t)(p * NR + jj) * K + 2 * k0;
                if (jj < width && 2 * (k0 + 16) <= K)
                    for (int kk = 0; kk < 16; kk++) tile[jj][kk] = bf16_pair(row[2 * kk], row[2 * kk + 1]);
                else
                    for (int kk = 0; kk < 16; kk++) {
                        int k = 2 * (k0 + kk);
                        int inside = jj < width && k < K; /* rows past N and columns past K read nothing */
                        tile[jj][kk] = inside ? bf16_pair(row[2 * kk], k + 1 < K ? row[2 * kk + 1] : 0.0f) : 0;
                    }
            }
            for (int kk = 0; kk < count; kk++)
                for (int jj = 0; jj < NR; jj++) panel[(size_t)(k0 + kk) * NR + jj] = tile[jj][kk];
        }
    }
}

/* B = W.T (trans, W N x K) or B = W (W K x N) in the layout above, zeros past the edges */
void rnnlm_pack_bf16(const float *W, int K, int N, int trans, uint32_t *out) {
    pack_bf16_panels(W, K, N, trans, 0, panels_of(N), out);
}

/* c + the two products of the k-pair a (one A element pair) with the k-pairs of b (VL columns) */
static inline vf dot2(vf c, uint32_t a, vu b) {
#if defined(__AVX512BF16__) && VL == 16
    return (vf)_mm512_dpbf16_ps((__m512)c, (__m512bh)_mm512_set1_epi32((int)a), (__m512bh)b);
#else
    vf lo = (vf)(b << 16), hi = (vf)(b & 0xffff0000u);
    return c + bf16_float(a & 0xffffu) * lo + bf16_float(a >> 16) * hi;
#endif
}

/* C[0:rows, 0:NR] = A[0:rows, k-pairs 0:P] @ panel, rows <= MR (full blocks unrolled); the word of row r and
   k-pair kk is A[r * rs + kk * ps] */
static inline void block16(int rows, int P, const uint32_t *A, size_t rs, size_t ps, const uint32_t *B, float *C,
                           int ldc) {
    vf c[MR][2];
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++) c[r][0] = c[r][1] = (vf){0};
    if (rows == MR) {
        for (int kk = 0; kk < P; kk++) {
            vu b0 = *(const vu *)(B + (size_t)kk * NR), b1 = *(const vu *)(B + (size_t)kk * NR + VL);
#pragma GCC unroll 8
            for (int r = 0; r < MR; r++) {
                c[r][0] = dot2(c[r][0], A[r * rs + kk * ps], b0);
                c[r][1] = dot2(c[r][1], A[r * rs + kk * ps], b1);
            }
        }
    } else {
        for (int r = 0; r < rows; r++)
            for (int kk = 0; kk < P; kk++) {
                c[r][0] = dot2(c[r][0], A[r * rs + kk * ps], *(const vu *)(B + (size_t)kk * NR));
                c[r][1] = dot2(c[r][1], A[r * rs + kk * ps], *(const vu *)(B + (size_t)kk * NR + VL));
            }
    }
    for (int r = 0; r < rows; r++) {
        *(vf *)(C + (size_t)r * ldc) = c[r][0];
        *(vf *)(C + (size_t)r * ldc + VL) = c[r][1];
    }
}

/* C (M x panels * NR, row stride ldc) = A (M rows of bf16, row stride 2 * lda, K = 2 * P) @ packed B */
static void gemm16(int M, int P, int panels, const uint32_t *A, int lda, const uint32_t *Bp, float *C, int ldc) {
    for (int p = 0; p < panels; p++) /* each panel of B is read from L2 once, while A's few rows stay in L1 */
        for (int i = 0; i < M; i += MR)
            block16(M - i < MR ? M - i : MR, P, A + (size_t)i * lda, lda, 1, Bp + (size_t)p * P * NR,
                    C + (size_t)i * ldc + p * NR, ldc);
}

/* The bf16 operand of a weight gradient whose k-pairs run along the rows n of a sequence (steps * batch rows): row n
   of an N x G matrix is stored at the half (n & 1) of the words of pair n / 2, in panels of NR columns: halfword
   2 * ((p * ceil(N / 2) + n / 2) * NR + jj) + (n & 1) for column j = p * NR + jj. The pad columns, and the missing
   partner of the last row when N is odd, are zeros. put_pair_rows writes rows n and n + 1 (n even) as whole words,
   put_pair_row one row into its halves. */
static void put_pair_rows(int N, int G, int n, const float *row0, const float *row1, uint32_t *out) {
    int P = (N + 1) / 2, panels = panels_of(G);
    for (int p = 0; p < panels; p++) {
        uint32_t *word = out + ((size_t)p * P + n / 2) * NR;
        int width = G - p * NR < NR ? G - p * NR : NR;
        for (int jj = 0; jj < width; jj++)
            word[jj] = bf16_pair(row0[p * NR + jj], row1[p * NR + jj]);
        for (int jj = width; jj < NR; jj++) word[jj] = 0;
    }
}

static void put_pair_row(int N, int G, int n, const float *row, uint16_t *out) {
    int P = (N + 1) / 2, panels = panels_of(G), half = n & 1;
    for (int p = 0; p < panels; p++) {
        uint16_t *word = out + 2 * ((size_t)p * P + n / 2) * NR;
        for (int jj = 0; jj < NR; jj++) {
            int j = p * NR + jj;
            word[2 * jj + half] = j < G ? bf16_bits(row[j]) : 0;
            if (n == N - 1 && !half) word[2 * jj + 1] = 0;
        }
    }
}

/* Rows [k0, k1) of sum over n < N of x[n][k] * grad[n][j] (K x G, the transpose of the weight's gradient), from bf16
   products summed in float32: x (N x K, float32; x[n] = first[n] for n < n_first, else rest[n - n_first]) and grad
   given as put_pair_row's panels. a_buf: ceil(N / 2) x (k1 - k0) words, the pairs of rows of x's columns [k0, k1).
   out: rows [k0, k1) of (K x panels(G) * NR). The loop runs panel by panel, so that A stays in L2 and each panel of
   grad is read once. */
void rnnlm_weight_grad_bf16(int N, int K, int G, int k0, int k1, int n_first, const float *first, const float *rest,
                            const uint32_t *grad, float *out, uint32_t *a_buf) {
    int P = (N + 1) / 2, panels = panels_of(G), ldc = panels * NR, M = k1 - k0;
    for (int m = 0; m < P; m++) {
        const float *x[2];
        for (int half = 0; half < 2; half++) {
            int n = 2 * m + half;
            x[half] = n >= N ? NULL : n < n_first ? first + (size_t)n * K : rest + (size_t)(n - n_first) * K;
        }
        uint32_t *words = a_buf + (size_t)m * M;
        for (int k = k0; k < k1; k++)
            words[k - k0] = bf16_pair(x[0][k], x[1] ? x[1][k] : 0.0f);
    }
    for (int p = 0; p < panels; p++)
        for (int i = 0; i < M; i += MR)
            block16(M - i < MR ? M - i : MR, P, a_buf + i, 1, M, grad + (size_t)p * P * NR,
                    out + (size_t)(k0 + i) * ldc + p * NR, ldc);
}

/* tanh to a few float32 ulps: Eigen's rational approximation on [-7.9, 7.9] (beyond it tanh is +-1 in float32) */
static inline float tanh_approx(float x) {
    x = x > 7.90531110763549805f ? 7.90531110763549805f : x;
    x = x < -7.90531110763549805f ? -7.90531110763549805f : x;
    float x2 = x * x;
    float p = -2.76076847742355e-16f;
    p = p * x2 + 2.00018790482477e-13f;
    p = p * x2 + -8.60467152213735e-11f;
    p = p * x2 + 5.12229709037114e-08f;
    p = p * x2 + 1.48572235717979e-05f;
    p = p * x2 + 6.37261928875436e-04f;
    p = p * x2 + 4.89352455891786e-03f;
    float q = 1.19825839466702e-06f;
    q = q * x2 + 1.18534705686654e-04f;
    q = q * x2 + 2.26843463243900e-03f;
    q = q * x2 + 4.89352518554385e-03f;
    return x * p / q;
}

void rnnlm_tanh(const float *x, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = tanh_approx(x[i]);
}

/* The input product of row n (n = t * batch + i), G columns wide: row tokens[n] of emb (W_ih.T + biases: a one-hot
   input's product is a row of it) or, with tokens NULL, row n of emb (the products of dense inputs, computed before
   the window as one matmul: an embedding's, or a lower layer's outputs). */
static inline const float *input_row(const int64_t *tokens, const float *emb, size_t n, int G) {
    return emb + (tokens ? (size_t)tokens[n] : n) * G;
}

/* The input of step t: `first` (h0 or c0) at t = 0, else row block t - 1 of `seq` (steps, batch, H). */
static inline const float *previous(const float *first, const float *seq, int t, int batch, int H) {
    return t == 0 ? first : seq + (size_t)(t - 1) * batch * H;
}

/* Tanh RNN forward over rows [r0, r1): hs[t] = tanh(hs[t-1] @ W_hh.T + emb[tokens[t]]), hs[-1] = h0.
   emb (vocab x H) is W_ih.T + b_ih + b_hh (the one-hot input's product is a row of it), or with tokens NULL the
   inputs' products with the biases, (steps * batch) x H (see input_row). whh: W_hh packed with trans=1. scratch:
   (r1 - r0) x panels * NR floats. */
void rnnlm_rnn_forward(int steps, int batch, int H, int r0, int r1, const int64_t *tokens, const float *h0,
                       const float *emb, const float *whh, float *hs, float *scratch) {
    int panels = panels_of(H), ldc = panels * NR, M = r1 - r0;
    for (int t = 0; t < steps; t++) {
        const float *prev = previous(h0, hs, t, batch, H);
        gemm(M, H, panels, prev + (size_t)r0 * H, H, whh, scratch, ldc);
        for (int i = 0; i < M; i++) {
            const float *e = input_row(tokens, emb, (size_t)t * batch + r0 + i, H);
            const float *acc = scratch + (size_t)i * ldc;
            float *h = hs + ((size_t)t * batch + r0 + i) * H;
            for (int j = 0; j < H; j++) h[j] = tanh_approx(acc[j] + e[j]);
        }
    }
}

/* Its backward over rows [r0, r1): with d[t] = 1 - hs[t]^2,
   g[T-1] = grad_out[T-1] * d[T-1];  g[t-1] = (g[t] @ W_hh + grad_out[t-1]) * d[t-1];  grad_h0 = g[0] @ W_hh.
   g is d loss / d pre-activation, (steps, batch, H). whh: W_hh packed with trans=0. grad_h0 NULL: not computed. */
void rnnlm_rnn_backward(int steps, int batch, int H, int r0, int r1, const float *hs, const float *grad_out,
                        const float *whh, float *g, float *grad_h0, float *scratch) {
    int panels = panels_of(H), ldc = panels * NR, M = r1 - r0;
    size_t last = (size_t)(steps - 1) * batch * H;
    for (int i = r0; i < r1; i++)
        for (int j = 0; j < H; j++) {
            float h = hs[last + (size_t)i * H + j];
            g[last + (size_t)i * H + j] = grad_out[last + (size_t)i * H + j] * (1.0f - h * h);
        }
    for (int t = steps - 1; t >= 0; t--) {
        if (t == 0 && grad_h0 == NULL) break; /* the caller needs no gradient for h0 */
        gemm(M, H, panels, g + ((size_t)t * batch + r0) * H, H, whh, scratch, ldc);
        for (int i = 0; i < M; i++) {
            const float *acc = scratch + (size_t)i * ldc;
            if (t == 0) {
                float *out = grad_h0 + (size_t)(r0 + i) * H;
                for (int j = 0; j < H; j++) out[j] = acc[j];
                continue;
            }
            size_t row = ((size_t)(t - 1) * batch + r0 + i) * H;
            for (int j = 0; j < H; j++) {
                float h = hs[row + j];
                g[row + j] = (acc[j] + grad_out[row + j]) * (1.0f - h * h);
            }
        }
    }
}

static inline float sigmoid_approx(float x) { return 0.5f + 0.5f * tanh_approx(0.5f * x); }

/* dst[0:n] += src[0:n] (the arrays do not overlap) */
static inline void add_row(int n, const float *src, float *dst) {
#pragma GCC ivdep
    for (int j = 0; j < n; j++) dst[j] += src[j];
}

/* out[tokens[i], 0:N] += grad[i, 0:N] for i < rows (row strides ld_grad, ld_out): the gradient of a weight that the
   one-hot inputs select rows of (torch's index_add_ on the CPU takes 10x longer for these shapes) */
void rnnlm_token_grad(int64_t rows, int N, const int64_t *tokens, const float *grad, int64_t ld_grad, float *out,
                      int64_t ld_out) {
    for (int64_t i = 0; i < rows; i++) add_row(N, grad + i * ld_grad, out + tokens[i] * ld_out);
}

/* The GRU and LSTM windows below split the work between `workers` threads (1 or 2) by hidden units: worker number
   `worker` owns units [u0, u1) of every gate, for all batch rows, and its slice of W_hh (packed by the caller) stays
   in its core's L2 cache; splitting the batch instead would make both cores stream all of W_hh (0.75-1 MB) every
   step, and they then run at half speed. The workers wait for each other once per step (barrier): each publishes the
   steps it has finished in its own cache line of `flags` (zeros at the start of a call) and waits for the others to
   catch up. A nonzero flags[workers * 8] (set by the caller when a worker failed to start) makes the waiting workers
   return. */

static int barrier(int64_t *flags, int worker, int workers, int64_t step) {
    if (workers < 2) return 0;
    __atomic_store_n(&flags[worker * 8], step, __ATOMIC_RELEASE);
    for (int k = 0; k < workers; k++) {
        int spins = 0;
        while (k != worker && __atomic_load_n(&flags[k * 8], __ATOMIC_ACQUIRE) < step) {
            if (__atomic_load_n(&flags[workers * 8], __ATOMIC_ACQUIRE)) return 1;
            if (++spins > 256) sched_yield(); /* a partner descheduled on a shared machine gets the core */
        }
    }
    return 0;
}

/* barrier for callers that run the stages between barriers themselves (rnnlm/cpu/threads.py: by_rows_then_units) */
int rnnlm_barrier(int64_t *flags, int worker, int workers, int64_t step) {
    return barrier(flags, worker, workers, step);
}

/* dst (batch x U) = the worker's columns [u0, u0 + U) of src (batch x H) */
static void take_units(int batch, int H, int u0, int U, const float *src, float *dst) {
    for (int i = 0; i < batch; i++)
        for (int j = 0; j < U; j++) dst[(size_t)i * U + j] = src[(size_t)i * H + u0 + j];
}

/* the worker's columns [u0, u0 + U) of dst (batch x H) = src (batch x U) */
static void put_units(int batch, int H, int u0, int U, const float *src, float *dst) {
    for (int i = 0; i < batch; i++)
        for (int j = 0; j < U; j++) dst[(size_t)i * H + u0 + j] = src[(size_t)i * U + j];
}

/* dst (batch x U) += the first U columns of src (batch x ldc) */
static void add_block(int batch, int U, const float *src, int ldc, float *dst) {
    for (int i = 0; i < batch; i++)
        for (int j = 0; j < U; j++) dst[(size_t)i * U + j] += src[(size_t)i * ldc + j];
}

/* torch's GRU (gates r, z, n) forward, units [u0, u1) of U = u1 - u0:
     r = sigmoid(xr + gh_r)  z = sigmoid(xz + gh_z)  n = tanh(xn + r * gh_n)  h = n + z * (h_prev - n)
   with x = emb[tokens[t]] (emb: vocab x 3H, W_ih.T + b_ih; or dense rows, see input_row) and gh = h_prev @ W_hh.T +
   b_hh. w_hh: W_hh (3H x H) as torch holds it; each worker packs the rows of its units into its scratch first.
   Saved for the backward: rz (steps, batch, 2H), n and hn = gh_n (steps, batch, H). scratch: (batch + H) x
   panels(3U). */
void rnnlm_gru_forward(int steps, int batch, int H, int u0, int u1, int worker, int workers, int64_t *flags,
                       const int64_t *tokens, const float *h0, const float *emb, const float *b_hh, const float *w_hh,
                       float *hs, float *rz, float *n, float *hn, float *scratch) {
    int U = u1 - u0, panels = panels_of(3 * U), ldc = panels * NR;
    float *whh = scratch + (size_t)batch * ldc;
    pack_unit_rows(w_hh, 3, H, u0, U, whh);
    for (int t = 0; t < steps; t++) {
        const float *prev = previous(h0, hs, t, batch, H);
        gemm(batch, H, panels, prev, H, whh, scratch, ldc);
        for (int i = 0; i < batch; i++) {
            size_t row = (size_t)t * batch + i;
            const float *x = input_row(tokens, emb, row, 3 * H) + u0, *acc = scratch + (size_t)i * ldc;
            const float *h_prev = prev + (size_t)i * H + u0, *b = b_hh + u0;
            float *rz_row = rz + row * 2 * H + u0, *n_row = n + row * H + u0, *hn_row = hn + row * H + u0;
            float *h = hs + row * H + u0;
#pragma GCC ivdep /* the arrays do not overlap */
            for (int j = 0; j < U; j++) {
                float r = sigmoid_approx(x[j] + acc[j] + b[j]);
                float z = sigmoid_approx(x[H + j] + acc[U + j] + b[H + j]);
                float gh_n = acc[2 * U + j] + b[2 * H + j];
                float nn = tanh_approx(x[2 * H + j] + r * gh_n);
                rz_row[j] = r;
                rz_row[H + j] = z;
                n_row[j] = nn;
                hn_row[j] = gh_n;
                h[j] = nn + z * (h_prev[j] - nn);
            }
        }
        if (barrier(flags, worker, workers, t + 1)) return;
    }
}

/* Its backward, units [u0, u1). dh, the gradient reaching h of the current step, starts at grad_out[T-1]; per step:
     grad_pre_n = dh (1 - z)(1 - n^2)      grad_gates = [grad_pre_n hn r (1 - r) | dh (h_prev - n) z (1 - z) | grad_pre_n r]
     dh <- grad_gates @ W_hh + dh z + grad_out[t-1]
   grad_gates is d loss / d gh (steps, batch, 3H), grad_pre_n d loss / d (W_in x + b_in); grad_h0 is the last dh.
   w_hh: W_hh (3H x H); each worker packs its columns [u0, u1) into its scratch first. dh: batch x U; scratch:
   (batch + 3H) x panels(U). */
void rnnlm_gru_backward(int steps, int batch, int H, int u0, int u1, int worker, int workers, int64_t *flags,
                        const float *h0, const float *hs, const float *rz, const float *n, const float *hn,
                        const float *grad_out, const float *w_hh, float *grad_gates, float *grad_pre_n, float *grad_h0,
                        float *dh, float *scratch) {
    int U = u1 - u0, panels = panels_of(U), ldc = panels * NR;
    float *whh = scratch + (size_t)batch * ldc;
    pack_unit_columns(w_hh, 3, H, u0, U, whh);
    take_units(batch, H, u0, U, grad_out + (size_t)(steps - 1) * batch * H, dh);
    for (int t = steps - 1; t >= 0; t--) {
        for (int i = 0; i < batch; i++) {
            size_t row = (size_t)t * batch + i;
            const float *h_prev = (t == 0 ? h0 + (size_t)i * H : hs + (row - batch) * H) + u0;
            const float *out_prev = t == 0 ? NULL : grad_out + (row - batch) * H + u0;
            const float *rz_row = rz + row * 2 * H + u0, *n_row = n + row * H + u0, *hn_row = hn + row * H + u0;
            float *gg = grad_gates + row * 3 * H + u0, *gpn_row = grad_pre_n + row * H + u0, *d_row = dh + (size_t)i * U;
#pragma GCC ivdep /* the arrays do not overlap */
            for (int j = 0; j < U; j++) {
                float d = d_row[j], r = rz_row[j], z = rz_row[H + j], nn = n_row[j];
                float gpn = d * (1.0f - z) * (1.0f - nn * nn);
                gpn_row[j] = gpn;
                gg[j] = gpn * hn_row[j] * r * (1.0f - r);
                gg[H + j] = d * (h_prev[j] - nn) * z * (1.0f - z);
                gg[2 * H + j] = gpn * r;
                d_row[j] = d * z + (out_prev ? out_prev[j] : 0.0f);
            }
        }
        if (barrier(flags, worker, workers, steps - t)) return; /* all workers' columns of grad_gates[t] written */
        gemm(batch, 3 * H, panels, grad_gates + (size_t)t * batch * 3 * H, 3 * H, whh, scratch, ldc);
        add_block(batch, U, scratch, ldc, dh);
    }
    put_units(batch, H, u0, U, dh, grad_h0);
}

typedef float v8 __attribute__((vector_size(32), aligned(4))); /* 8 floats, wherever they start */
typedef int32_t v8i __attribute__((vector_size(32)));

/* dst[j][i] = src[i][j] for an 8 x 8 block (row strides ld_src, ld_dst): in registers, three rounds of shuffles */
static inline void transpose8(const float *src, int ld_src, float *dst, int ld_dst) {
    v8 r[8], t[8], u[8];
    for (int i = 0; i < 8; i++) r[i] = *(const v8 *)(src + (size_t)i * ld_src);
    for (int i = 0; i < 8; i += 2) { /* pairs of rows interleaved */
        t[i] = __builtin_shuffle(r[i], r[i + 1], (v8i){0, 8, 1, 9, 4, 12, 5, 13});
        t[i + 1] = __builtin_shuffle(r[i], r[i + 1], (v8i){2, 10, 3, 11, 6, 14, 7, 15});
    }
    for (int i = 0; i < 8; i += 4) /* then pairs of pairs */
        for (int k = 0; k < 2; k++) {
            u[i + 2 * k] = __builtin_shuffle(t[i + k], t[i + 2 + k], (v8i){0, 1, 8, 9, 4, 5, 12, 13});
            u[i + 2 * k + 1] = __builtin_shuffle(t[i + k], t[i + 2 + k], (v8i){2, 3, 10, 11, 6, 7, 14, 15});
        }
    for (int j = 0; j < 4; j++) { /* u[j] holds columns j and j + 4 of rows 0-3, u[j + 4] of rows 4-7 */
        *(v8 *)(dst + (size_t)j * ld_dst) = __builtin_shuffle(u[j], u[j + 4], (v8i){0, 1, 2, 3, 8, 9, 10, 11});
        *(v8 *)(dst + (size_t)(j + 4) * ld_dst) = __builtin_shuffle(u[j], u[j + 4], (v8i){4, 5, 6, 7, 12, 13, 14, 15});
    }
}

/* Rows [n0, n1) of the worker's columns of the gate gradients (grad_gates: those rows, G * H wide, G = gates): added
   to token_grad's rows of their tokens (W_ih's gradient, transposed, V x G * H), and written transposed into gates_t
   (G * U x N: row gate * U + j is column gate * H + u0 + j). Eight rows at a time are copied into `tile` (8 x ld floats, ld >= G * U),
   whose columns are then read a cache line at a time; read in place, rows 4H apart (4 KB at H = 256) would share a
   cache set and evict each other. */
static void gate_grad_rows(int N, int H, int gates, int u0, int U, int n0, int n1, const int64_t *tokens,
                           const float *grad_gates, float *token_grad, float *gates_t, float *tile, int ld) {
    int G = gates * H;
    for (int b0 = n0; b0 < n1; b0 += 8) {
        int rows = n1 - b0 < 8 ? n1 - b0 : 8;
        for (int r = 0; r < rows; r++)
            for (int gate = 0; gate < gates; gate++) {
                size_t col = (size_t)gate * H + u0;
                const float *src = grad_gates + (size_t)(b0 - n0 + r) * G + col;
                memcpy(tile + (size_t)r * ld + gate * U, src, sizeof(float) * U);
                add_row(U, src, token_grad + (size_t)tokens[b0 + r] * G + col);
            }
        int c = 0;
        if (rows == 8)
            for (; c + 8 <= gates * U; c += 8) transpose8(tile + c, ld, gates_t + (size_t)c * N + b0, N);
        for (; c < gates * U; c++)
            for (int r = 0; r < rows; r++) gates_t[(size_t)c * N + b0 + r] = tile[(size_t)r * ld + c];
    }
}

/* the row length of gate_grad_rows' tile: G * U rounded up to a cache line, and one more, so that its rows fall in
   different cache sets */
static inline size_t tile_ld(int gates, size_t U) { return (gates * U + 15) / 16 * 16 + 16; }

/* One batch row of an LSTM step over U units (see rnnlm_lstm_forward): x, gt are the row's 4H-wide input product and
   gates, acc the matmul's 4 blocks of `ldg` columns, c_prev, c, tc, h its U-wide cell and state slices. */
static inline void lstm_cell(int U, int H, int ldg, const float *x, const float *acc, const float *c_prev, float *gt,
                             float *c, float *tc, float *h) {
#pragma GCC ivdep /* the arrays do not overlap */
    for (int j = 0; j < U; j++) {
        float ig = sigmoid_approx(x[j] + acc[j]), fg = sigmoid_approx(x[H + j] + acc[ldg + j]);
        float gg = tanh_approx(x[2 * H + j] + acc[2 * ldg + j]), og = sigmoid_approx(x[3 * H + j] + acc[3 * ldg + j]);
        float cell = fg * c_prev[j] + ig * gg, tanh_cell = tanh_approx(cell);
        gt[j] = ig;
        gt[H + j] = fg;
        gt[2 * H + j] = gg;
        gt[3 * H + j] = og;
        c[j] = cell;
        tc[j] = tanh_cell;
        h[j] = og * tanh_cell;
    }
}

/* One batch row of an LSTM step's backward over U units (see rnnlm_lstm_backward): writes the row's gate gradients
   gg_out (4H wide), updates dc and sets dh to the gradient from the step's output below (`out_prev`, NULL at t = 0). */
static inline void lstm_cell_grad(int U, int H, const float *gt, const float *tc, const float *c_prev,
                                  const float *out_prev, float *gg_out, float *dh, float *dc) {
#pragma GCC ivdep /* the arrays do not overlap */
    for (int j = 0; j < U; j++) {
        float d = dh[j], ig = gt[j], fg = gt[H + j], gg = gt[2 * H + j], og = gt[3 * H + j];
        float dct = dc[j] + d * og * (1.0f - tc[j] * tc[j]);
        gg_out[j] = dct * gg * ig * (1.0f - ig);
        gg_out[H + j] = dct * c_prev[j] * fg * (1.0f - fg);
        gg_out[2 * H + j] = dct * ig * (1.0f - gg * gg);
        gg_out[3 * H + j] = d * tc[j] * og * (1.0f - og);
        dc[j] = dct * fg;
        dh[j] = out_prev ? out_prev[j] : 0.0f;
    }
}

/* torch's LSTM (gates i, f, g, o) forward, units [u0, u1) of U = u1 - u0:
     [i f g o] = [sigmoid sigmoid tanh sigmoid](emb[tokens[t]] + h_prev @ W_hh.T)   c = f c_prev + i g   h = o tanh(c)
   with emb (vocab x 4H) = W_ih.T + b_ih + b_hh (or dense rows, see input_row). whh: the rows of W_hh for the
   worker's units of each gate (4U x H), packed with trans=1. Saved for the backward: gates (steps, batch, 4H, after
   their activations), cs and tcs = tanh(cs) (steps, batch, H). scratch: batch x panels(4U). */
static int lstm_forward(int steps, int batch, int H, int u0, int u1, int worker, int workers, int64_t *flags,
                        int64_t base, const int64_t *tokens, const float *h0, const float *c0, const float *emb,
                        const float *whh, float *hs, float *cs, float *gates, float *tcs, float *scratch) {
    int U = u1 - u0, panels = panels_of(4 * U), ldc = panels * NR;
    for (int t = 0; t < steps; t++) {
        const float *prev_h = previous(h0, hs, t, batch, H), *prev_c = previous(c0, cs, t, batch, H);
        gemm(batch, H, panels, prev_h, H, whh, scratch, ldc);
        for (int i = 0; i < batch; i++) {
            size_t row = (size_t)t * batch + i;
            lstm_cell(U, H, U, input_row(tokens, emb, row, 4 * H) + u0, scratch + (size_t)i * ldc,
                      prev_c + (size_t)i * H + u0, gates + row * 4 * H + u0, cs + row * H + u0, tcs + row * H + u0,
                      hs + row * H + u0);
        }
        if (barrier(flags, worker, workers, base + t + 1)) return 1;
    }
    return 0;
}

/* the forward window alone: lstm_forward with the workers' barriers counted from 0, from W_hh (4H x H) as torch
   holds it: each worker packs the rows of its units into its scratch first ((batch + H) x panels(4U)) */
void rnnlm_lstm_forward(int steps, int batch, int H, int u0, int u1, int worker, int workers, int64_t *flags,
                        const int64_t *tokens, const float *h0, const float *c0, const float *emb, const float *w_hh,
                        float *hs, float *cs, float *gates, float *tcs, float *scratch) {
    float *whh = scratch + (size_t)batch * panels_of(4 * (u1 - u0)) * NR;
    pack_unit_rows(w_hh, 4, H, u0, u1 - u0, whh);
    lstm_forward(steps, batch, H, u0, u1, worker, workers, flags, 0, tokens, h0, c0, emb, whh, hs, cs, gates, tcs,
                 scratch);
}

/* Part `part` (0 or 1) of a backward step's product in parts (see lstm_backward): the units [*p0, *p1), [0, H / 2)
   or [H / 2, H); returns whether the worker of units [u0, u1) computes it */
static inline int own_part(int part, int H, int u0, int u1, int *p0, int *p1) {
    *p0 = part ? H / 2 : 0, *p1 = part ? H : H / 2;
    return u0 <= *p0 && *p1 <= u1;
}

/* Its backward, units [u0, u1). dh and dc, the gradients reaching the step's h and c, start at grad_out[T-1] and
   grad_c_last; per step, with dc_t = dc + dh o (1 - tanh(c)^2):
     grad_gates = [dc_t g i (1 - i) | dc_t c_prev f (1 - f) | dc_t i (1 - g^2) | dh tanh(c) o (1 - o)]
     dc <- dc_t f     dh <- grad_gates @ W_hh + grad_out[t-1]
   grad_gates is d loss / d gates before activation (steps, batch, 4H); grad_h0, grad_c0 are the last dh, dc.
   dh, dc: batch x U. grad_gates @ W_hh is computed one of two ways:
   - whole (`exchange` NULL): after a barrier (every worker's columns of the step's grad_gates written), each worker
     multiplies all 4H columns by its columns [u0, u1) of W_hh (whh: 4H x U, packed by pack_unit_columns);
     scratch: batch x panels(U).
   - in parts (`exchange`; `split_parts`): the product is the sum of two parts, over the gate columns of the units
     [0, H / 2) and over those of [H / 2, H), each part the product of those columns of the step's grad_gates (copied
     to scratch while they are in cache) by those rows of W_hh (whh: a 4 (H / 2) x H block a part, packed by
     pack_unit_rows_untransposed), for all H units. Two workers (the units of each one part) each compute their own
     part into their block of `exchange` (2 x 2 blocks of batch x panels(H) * NR, by the step's parity: a worker
     reads the other's block of a step after the barrier, before the next step's barrier); one worker computes both.
     After the barrier each adds part 0 and then part 1 for its units: the same numbers on one worker as on two. A
     step moves a quarter of the bytes between the cores (a part's U columns, not the other worker's 4U columns of
     grad_gates), and no panel of U = H / 2 columns is padded (AVX-512: 128 columns for 100 units; AVX2: 112): the
     backward window 1.2x quicker on two cores of a Xeon at H = 200.
   With gates_t, each step's rows of the worker's gate gradients go to gates_t and token_grad (gate_grad_rows, `tile`
   its buffer) while they are in cache, and grad_gates holds only two steps' rows (batch x 4H each, the step's and the
   one before, which the other worker may still be reading); grad_h0, grad_c0 NULL: not written. */
static int lstm_backward(int steps, int batch, int H, int u0, int u1, int worker, int workers, int64_t *flags,
                         int64_t base, const float *c0, const float *cs, const float *gates, const float *tcs,
                         const float *grad_out, const float *grad_c_last, const float *whh, float *grad_gates,
                         float *grad_h0, float *grad_c0, float *dh, float *dc, float *scratch, float *exchange,
                         const int64_t *tokens, float *token_grad, float *gates_t, float *tile) {
    int U = u1 - u0, panels = panels_of(exchange ? H : U), ldc = panels * NR;
    take_units(batch, H, u0, U, grad_out + (size_t)(steps - 1) * batch * H, dh);
    take_units(batch, H, u0, U, grad_c_last, dc);
    for (int t = steps - 1; t >= 0; t--) {
        float *step_grads = grad_gates + (size_t)(gates_t ? t & 1 : t) * batch * 4 * H; /* this step's rows */
        for (int i = 0; i < batch; i++) {
            size_t row = (size_t)t * batch + i;
            lstm_cell_grad(U, H, gates + row * 4 * H + u0, tcs + row * H + u0,
                           previous(c0, cs, t, batch, H) + (size_t)i * H + u0,
                           t == 0 ? NULL : grad_out + (row - batch) * H + u0, step_grads + (size_t)i * 4 * H + u0,
                           dh + (size_t)i * U, dc + (size_t)i * U);
        }
        if (gates_t) /* the step's rows while they are in cache (see gate_grad_rows) */
            gate_grad_rows(steps * batch, H, 4, u0, U, t * batch, (t + 1) * batch, tokens, step_grads, token_grad,
                           gates_t, tile, (int)tile_ld(4, (size_t)U));
        if (exchange) {
            size_t block = (size_t)batch * ldc;
            float *parts = exchange + (size_t)(t & 1) * 2 * block;
            const float *packed = whh;
            for (int part = 0, p0, p1; part < 2; part++) {
                if (!own_part(part, H, u0, u1, &p0, &p1)) continue; /* the other worker's */
                int P = p1 - p0;
                for (int i = 0; i < batch; i++)
                    for (int gate = 0; gate < 4; gate++)
                        memcpy(scratch + ((size_t)i * 4 + gate) * P, step_grads + (size_t)i * 4 * H + gate * H + p0,
                               sizeof(float) * P);
                gemm(batch, 4 * P, panels, scratch, 4 * P, packed, parts + part * block, ldc);
                packed += (size_t)4 * P * ldc;
            }
            if (barrier(flags, worker, workers, base + steps - t)) return 1; /* every worker's part written */
            for (int part = 0; part < 2; part++) add_block(batch, U, parts + part * block + u0, ldc, dh);
            continue;
        }
        if (barrier(flags, worker, workers, base + steps - t)) return 1; /* every worker's grad_gates[t] written */
        gemm(batch, 4 * H, panels, step_grads, 4 * H, whh, scratch, ldc);
        add_block(batch, U, scratch, ldc, dh);
    }
    if (grad_h0) put_units(batch, H, u0, U, dh, grad_h0);
    if (grad_c0) put_units(batch, H, u0, U, dc, grad_c0);
    return 0;
}

/* Whether a backward window over units [u0, u1) computes its product in parts (see lstm_backward): H of 2 or more,
   and the units those of one part for each of two workers ([0, H / 2) and [H / 2, H), threads.halves' halves), or
   all of them for one */
static inline int split_parts(int H, int u0, int u1, int worker, int workers) {
    if (H < 2) return 0;
    if (workers == 1) return u0 == 0 && u1 == H;
    return workers == 2 && u0 == (worker ? H / 2 : 0) && u1 == (worker ? H : H / 2);
}

/* The floats of a backward step's gate gradients of one part (batch x 4 (H - H / 2)), rounded up to a cache line:
   where in the scratch the packed W_hh starts when the product is computed in parts */
static inline size_t part_rows(int batch, int H) { return ((size_t)batch * 4 * (H - H / 2) + 15) / 16 * 16; }

/* the backward window alone: lstm_backward with the workers' barriers counted from 0, from W_hh (4H x H) as torch
   holds it, in parts where `exchange` is given (the same for every worker) and `split_parts` allows, else whole: each
   worker packs its part of W_hh into its scratch first, after the step's buffer (rnnlm_lstm_backward_scratch floats
   in all) */
void rnnlm_lstm_backward(int steps, int batch, int H, int u0, int u1, int worker, int workers, int64_t *flags,
                         const float *c0, const float *cs, const float *gates, const float *tcs, const float *grad_out,
                         const float *grad_c_last, const float *w_hh, float *grad_gates, float *grad_h0,
                         float *grad_c0, float *exchange, float *dh, float *dc, float *scratch) {
    int U = u1 - u0;
    if (!split_parts(H, u0, u1, worker, workers)) exchange = NULL;
    float *whh = scratch + (exchange ? part_rows(batch, H) : (size_t)batch * panels_of(U) * NR);
    if (!exchange) pack_unit_columns(w_hh, 4, H, u0, U, whh);
    for (int part = 0, at = 0, p0, p1; exchange && part < 2; part++) { /* the worker's parts' rows, in turn */
        if (!own_part(part, H, u0, u1, &p0, &p1)) continue;
        pack_unit_rows_untransposed(w_hh, 4, H, p0, p1 - p0, whh + (size_t)at * panels_of(H) * NR);
        at += 4 * (p1 - p0);
    }
    lstm_backward(steps, batch, H, u0, u1, worker, workers, flags, 0, c0, cs, gates, tcs, grad_out, grad_c_last, whh,
                  grad_gates, grad_h0, grad_c0, dh, dc, scratch, exchange, NULL, NULL, NULL, NULL);
}

/* The floats rnnlm_lstm_backward's scratch takes for the worker's units [u0, u1) of H, with an exchange given
   (`exchange`: 1) or not: the step's buffer, then the worker's part of W_hh, packed */
int64_t rnnlm_lstm_backward_scratch(int batch, int H, int u0, int u1, int worker, int workers, int exchange) {
    if (exchange && split_parts(H, u0, u1, worker, workers))
        return (int64_t)part_rows(batch, H) + (int64_t)4 * (u1 - u0) * panels_of(H) * NR;
    return ((int64_t)batch + 4 * H) * panels_of(u1 - u0) * NR;
}

/* The LSTM with bf16 matmuls (`amp` on CPUs with AVX512-BF16) and the output layer, over batch rows [r0, r1) and
   all units: in bf16 W_hh (0.5 MB at H = 256) fits one core's L2, so two threads take half the batch each and never
   wait for each other. The gates, cell and state stay float32; only the recurrent matmuls' inputs are rounded to
   bf16. The output layer (V logits a row, float32) is computed in the same windows, a few rows at a time, instead of
   as three skinny matmuls over the whole window afterwards.

   Forward: as rnnlm_lstm_forward, plus hs16 (steps + 1, batch, ldh) = bf16 of [h0, hs], ldh = H rounded up to even
   (row block t is what step t multiplies), and logits (steps * batch, V) = hs @ W_out.T + b_out. whh: W_hh packed by
   rnnlm_pack_bf16 with trans=1; wout: W_out (V x H) packed by rnnlm_pack with trans=1. scratch: (r1 - r0) x
   panels(4H); scratch_out: (r1 - r0) x panels(V). */
void rnnlm_lstm_forward_bf16(int steps, int batch, int H, int V, int r0, int r1, const int64_t *tokens,
                             const float *h0, const float *c0, const float *emb, const uint32_t *whh,
                             const float *wout, const float *b_out, uint16_t *hs16, float *hs, float *cs, float *gates,
                             float *tcs, float *logits, float *scratch, float *scratch_out) {
    int M = r1 - r0, ldh = H + (H & 1), panels = panels_of(4 * H), ldc = panels * NR;
    int out_panels = panels_of(V), ldo = out_panels * NR;
    for (int i = r0; i < r1; i++) bf16_row(H, h0 + (size_t)i * H, hs16 + (size_t)i * ldh);
    for (int t = 0; t < steps; t++) {
        const float *prev_c = previous(c0, cs, t, batch, H);
        size_t first = (size_t)t * batch + r0;
        gemm16(M, ldh / 2, panels, (const uint32_t *)(hs16 + first * ldh), ldh / 2, whh, scratch, ldc);
        for (int i = r0; i < r1; i++) {
            size_t row = (size_t)t * batch + i;
            float *h = hs + row * H;
            lstm_cell(H, H, H, emb + (size_t)tokens[row] * 4 * H, scratch + (size_t)(i - r0) * ldc,
                      prev_c + (size_t)i * H, gates + row * 4 * H, cs + row * H, tcs + row * H, h);
            bf16_row(H, h, hs16 + (row + batch) * ldh);
        }
        gemm(M, H, out_panels, hs + first * H, H, wout, scratch_out, ldo);
        for (int i = 0; i < M; i++)
            for (int v = 0; v < V; v++) logits[(first + i) * V + v] = scratch_out[(size_t)i * ldo + v] + b_out[v];
    }
}

/* go (rows [r0, r1) of step t, row stride ldc) = dlogits[t] @ W_out: the gradient reaching h from the output layer.
   wout: W_out (V x H) packed by rnnlm_pack with trans=0. */
static void output_grad(int t, int batch, int H, int V, int r0, int r1, const float *dlogits, const float *wout,
                        float *go, int ldc) {
    gemm(r1 - r0, V, panels_of(H), dlogits + ((size_t)t * batch + r0) * V, V, wout, go, ldc);
}

/* Its backward over rows [r0, r1): as rnnlm_lstm_backward, with the gradient reaching each step's h computed from
   dlogits (steps * batch, V), plus grad_h_last (batch x H) at the last step; the gate gradients are not kept in
   float32. Each row's goes (1) in bf16 to g16 (this worker's rows of the step), the input of the step's matmul,
   (2) in bf16 to gpanels, laid out by put_pair_row for W_hh's gradient (rnnlm_weight_grad_bf16), and (3) added to
   token_grad[tokens] (this worker's vocab x 4H buffer, zeros at the start), whose sum over the vocabulary is the
   biases' gradient. whh: W_hh (4H x H) packed by rnnlm_pack_bf16 with trans=0; wout: W_out packed by rnnlm_pack with
   trans=0. dh, dc: (r1 - r0) x H; rows: 2 x 4H floats; g16: (r1 - r0) x 4H; scratch, go: (r1 - r0) x panels(H). */
void rnnlm_lstm_backward_bf16(int steps, int batch, int H, int V, int r0, int r1, const int64_t *tokens,
                              const float *c0, const float *cs, const float *gates, const float *tcs,
                              const float *dlogits, const float *wout, const float *grad_h_last,
                              const float *grad_c_last, const uint32_t *whh, uint16_t *gpanels, float *token_grad,
                              float *grad_h0, float *grad_c0, float *dh, float *dc, float *rows, uint16_t *g16,
                              float *scratch, float *go) {
    int M = r1 - r0, N = steps * batch, panels = panels_of(H), ldc = panels * NR;
    output_grad(steps - 1, batch, H, V, r0, r1, dlogits, wout, go, ldc);
    take_units(M, H, 0, H, grad_h_last + (size_t)r0 * H, dh);
    add_block(M, H, go, ldc, dh);
    take_units(M, H, 0, H, grad_c_last + (size_t)r0 * H, dc);
    for (int t = steps - 1; t >= 0; t--) {
        if (t > 0) output_grad(t - 1, batch, H, V, r0, r1, dlogits, wout, go, ldc);
        for (int i = r0; i < r1; i++) {
            size_t n = (size_t)t * batch + i;
            int first = (n & 1) == 0 && i + 1 < r1, second = (n & 1) && i > r0; /* rows n, n + 1 both here */
            float *out = rows + (second ? 4 * H : 0);
            lstm_cell_grad(H, H, gates + n * 4 * H, tcs + n * H, previous(c0, cs, t, batch, H) + (size_t)i * H,
                           t == 0 ? NULL : go + (size_t)(i - r0) * ldc, out, dh + (size_t)(i - r0) * H,
                           dc + (size_t)(i - r0) * H);
            bf16_row(4 * H, out, g16 + (size_t)(i - r0) * 4 * H);
            add_row(4 * H, out, token_grad + (size_t)tokens[n] * 4 * H);
            if (second)
                put_pair_rows(N, 4 * H, (int)n - 1, rows, out, (uint32_t *)gpanels);
            else if (!first)
                put_pair_row(N, 4 * H, (int)n, out, gpanels);
        }
        gemm16(M, 2 * H, panels, (const uint32_t *)g16, 2 * H, whh, scratch, ldc);
        add_block(M, H, scratch, ldc, dh);
    }
    put_units(M, H, 0, H, dh, grad_h0 + (size_t)r0 * H);
    put_units(M, H, 0, H, dc, grad_c0 + (size_t)r0 * H);
}

/* exp(x) to about 2 float32 ulps (Cephes' expf: 2^n times a polynomial on [-ln 2 / 2, ln 2 / 2]), 0 below -87 and
   for x <= 0 only (the softmax below subtracts each row's largest logit first) */
static inline float exp_approx(float x) {
    float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f), small = x < -87.0f;
    x = small ? -87.0f : x;
    n = small ? -126.0f : n;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f, p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { uint32_t u; float f; } scale = {.u = (uint32_t)((int32_t)n + 127) << 23};
    return small ? 0.0f : p * scale.f;
}

/* C[0:R, 0:NR] += A[0:K, 0:R].T @ B[0:K, 0:NR], A and B read in place (row strides lda, ldb), for R <= MR known
   when it is inlined */
static inline __attribute__((always_inline)) void block_tn(const int R, int K, const float *A, int lda,
                                                           const float *B, int ldb, float *C, int ldc) {
    vf c[MR][2];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        c[r][0] = *(const vf *)(C + (size_t)r * ldc);
        c[r][1] = *(const vf *)(C + (size_t)r * ldc + VL);
    }
    for (int k = 0; k < K; k++) {
        vf b0 = *(const vf *)(B + (size_t)k * ldb), b1 = *(const vf *)(B + (size_t)k * ldb + VL);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            vf a = A[(size_t)k * lda + r] - (vf){0};
            c[r][0] += a * b0;
            c[r][1] += a * b1;
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        *(vf *)(C + (size_t)r * ldc) = c[r][0];
        *(vf *)(C + (size_t)r * ldc + VL) = c[r][1];
    }
}

/* block_tn for 1 to MR rows, each count with its own registers */
static void block_tn_rows(int rows, int K, const float *A, int lda, const float *B, int ldb, float *C, int ldc) {
    switch (rows) {
#define ROWS(R)                                                                                                        \
    case R:                                                                                                            \
        block_tn(R, K, A, lda, B, ldb, C, ldc);                                                                        \
        break;
        ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6)
#if MR > 6
        ROWS(7) ROWS(8)
#endif
#undef ROWS
    }
}

/* The columns [whole, N) of gemm_tn_acc (fewer than a panel): B's columns copied into a zero-padded panel and C's
   into a tile, so that the same register blocks run over them without reading or writing past a row's end */
static void tn_acc_tail(int M, int N, int K, const float *A, int lda, const float *B, int ldb, float *C, int ldc,
                        int whole) {
    int tail = N - whole;
    float *panel = calloc((size_t)K * NR, sizeof(float)), tile[MR * NR];
    for (int k = 0; k < K; k++) memcpy(panel + (size_t)k * NR, B + (size_t)k * ldb + whole, sizeof(float) * tail);
    for (int i = 0, rows; i < M; i += rows) {
        rows = block_height(M - i);
        for (int r = 0; r < rows; r++) memcpy(tile + r * NR, C + (size_t)(i + r) * ldc + whole, sizeof(float) * tail);
        block_tn_rows(rows, K, A + i, lda, panel, NR, tile, NR);
        for (int r = 0; r < rows; r++) memcpy(C + (size_t)(i + r) * ldc + whole, tile + r * NR, sizeof(float) * tail);
    }
    free(panel);
}

/* C (M x N, row stride ldc) += A.T @ B for A (K x M) and B (K x N), both row-major and read in place (row strides
   lda, ldb): a weight's gradient from the rows of a window, without packing */
static void gemm_tn_acc(int M, int N, int K, const float *A, int lda, const float *B, int ldb, float *C, int ldc) {
    int whole = N / NR * NR;
    for (int j = 0; j < whole; j += NR)
        for (int i = 0, rows; i < M; i += rows) {
            rows = block_height(M - i);
            block_tn_rows(rows, K, A + i, lda, B + j, ldb, C + (size_t)i * ldc + j, ldc);
        }
    if (whole < N) tn_acc_tail(M, N, K, A, lda, B, ldb, C, ldc, whole);
}

/* out (M x panels(N) * NR) = x (M x K) @ W.T + bias (bias NULL: none) for W (N x K) as torch holds a linear layer's
   weight: a wide, shallow product (a softmax's logits, a layer's input products) on an OpenMP team of `parts`
   threads. Each packs a share of W's panels into packed (panels(N) * K * NR floats), then takes a share of x's rows,
   4 * MR at a time, their bias added while they are in cache. Each output sums its products in order, so the bits
   are the same whatever the team (a short one, or a build without OpenMP, runs every share on fewer threads). */
void rnnlm_linear(int M, int K, int N, const float *x, const float *W, const float *bias, float *packed, float *out,
                  int parts) {
    int panels = panels_of(N), ldc = panels * NR, chunk = 4 * MR;
#pragma omp parallel num_threads(parts)
    {
        for (int h = team_rank(); h < parts; h += team_size())
            pack_panels(W, K, N, 1, panels * h / parts, panels * (h + 1) / parts, packed);
#if defined(_OPENMP)
#pragma omp barrier
#endif
        for (int h = team_rank(); h < parts; h += team_size()) {
            int r1 = (int)((int64_t)M * (h + 1) / parts);
            for (int r0 = (int)((int64_t)M * h / parts); r0 < r1; r0 += chunk) {
                int rows = r1 - r0 < chunk ? r1 - r0 : chunk;
                float *C = out + (size_t)r0 * ldc;
                gemm(rows, K, panels, x + (size_t)r0 * K, K, packed, C, ldc);
                if (bias)
                    for (int i = 0; i < rows; i++) add_row(N, bias, C + (size_t)i * ldc);
            }
        }
    }
}

/* The cross-entropy of logits rows [n0, n1) (row stride ld, V classes, targets by row), and what it sends back:
   each row replaced by its gradient, (softmax - one_hot(target)) * scale; loss[0] += the rows' summed cross-entropy,
   grad_b (V) += their gradients' sum. Each row's exponentials are summed in order (`in_order`: the bits the fused
   steps of the book's models have always had) or in vector lanes (about 3x quicker; rounding in another order). */
static inline void rows_loss(int64_t n0, int64_t n1, int V, int ld, const int64_t *targets, float *logits, float scale,
                             double *loss, float *grad_b, int in_order) {
    double total = 0.0;
    for (int64_t n = n0; n < n1; n++) {
        float *row = logits + (size_t)n * ld, top = row[0], sum = 0.0f;
#pragma omp simd reduction(max : top)
        for (int v = 1; v < V; v++) top = row[v] > top ? row[v] : top;
        total += top - row[targets[n]];
        if (in_order) {
#pragma GCC ivdep
            for (int v = 0; v < V; v++) row[v] = exp_approx(row[v] - top);
            for (int v = 0; v < V; v++) sum += row[v];
        } else {
#pragma omp simd reduction(+ : sum)
            for (int v = 0; v < V; v++) sum += row[v] = exp_approx(row[v] - top);
        }
        total += __builtin_logf(sum);
        float norm = scale / sum;
        for (int v = 0; v < V; v++) row[v] *= norm;
        row[targets[n]] -= scale;
        add_row(V, row, grad_b);
    }
    loss[0] += total;
}

/* rows_loss with the sums in vector lanes: the large output layers' and the adaptive softmax's head
   (rnnlm/cpu/fused.py) */
void rnnlm_rows_loss(int64_t n0, int64_t n1, int V, int ld, const int64_t *targets, float *logits, float scale,
                     double *loss, float *grad_b) {
    rows_loss(n0, n1, V, ld, targets, logits, scale, loss, grad_b, 0);
}

/* rnnlm_rows_loss over rows [0, n) in two halves, half h's loss into loss[8 h] and its gradients' sum into row h of
   grad_b (2 x V): with `team`, the halves on an OpenMP team of the calling thread (torch's two threads where the
   kernels share its runtime), else in turn on this thread (also where the team is smaller or the build has no
   OpenMP); the same sums either way. */
void rnnlm_rows_loss_halves(int64_t n, int V, int ld, const int64_t *targets, float *logits, float scale,
                            double *loss, float *grad_b, int team) {
    (void)team; /* read by the pragma only, in a build with OpenMP */
#pragma omp parallel num_threads(2) if (team)
    for (int h = team_rank(); h < 2; h += team_size())
        rows_loss(n * h / 2, n * (h + 1) / 2, V, ld, targets, logits, scale, loss + 8 * h, grad_b + (size_t)h * V, 0);
}

/* The mean cross-entropy of the logits (steps * batch, V; rows n = t * batch + i, targets the same way) over batch
   rows [r0, r1) of every step, and what it sends back, without autograd: each logits row is replaced by its
   gradient, (softmax - one_hot(target)) * scale with scale = 1 / (steps * batch); loss[0] gets the rows' summed
   cross-entropy, grad_b (V) their gradients' sum and grad_w (V x H) sum_n grad[n]^T hs[n]: the output layer's
   bias and weight gradients (this worker's share; zeros at the start). */
static void output_loss(int steps, int batch, int H, int V, int r0, int r1, const int64_t *targets, const float *hs,
                        float *logits, float scale, double *loss, float *grad_b, float *grad_w) {
    for (int t = 0; t < steps; t++) {
        size_t first = (size_t)t * batch + r0;
        rows_loss(first, first + (r1 - r0), V, V, targets, logits, scale, loss, grad_b, 1);
        gemm_tn_acc(V, H, r1 - r0, logits + first * V, V, hs + first * H, H, grad_w, H);
    }
}

/* The output layer's whole training step over the rows [n0, n1) of a window (steps * batch rows, time-major; the
   small vocabularies; large ones take torch's matmuls around rnnlm_rows_loss, rnnlm/cpu/fused.py): logits = hs @
   W_out.T + b_out (rows of ldl >= V floats), then rows_loss (the summed cross-entropy into loss[0], the logits
   replaced by their gradient, the bias gradient), the weight gradient grad_w (V x H) += dlogits.T @ hs, and grad_h
   (the rows' gradient reaching hs, H wide) = dlogits @ W_out (with grad_w NULL, the loss only). This worker's
   grad_b, grad_w: zeros at the start. wout: W_out (V x H) packed by rnnlm_pack with trans=1, wout_back with trans=0;
   ldl = panels(V) * NR; scratch: (n1 - n0) x panels(H) * NR floats. */
void rnnlm_output_step(int64_t n0, int64_t n1, int H, int V, const float *hs, const float *wout, const float *b_out,
                       const float *wout_back, const int64_t *targets, float scale, float *logits, double *loss,
                       float *grad_b, float *grad_w, float *grad_h, float *scratch) {
    int M = (int)(n1 - n0), ldl = panels_of(V) * NR, ldh = panels_of(H) * NR;
    float *rows = logits + (size_t)n0 * ldl;
    gemm(M, H, panels_of(V), hs + (size_t)n0 * H, H, wout, rows, ldl);
    for (int i = 0; i < M; i++) add_row(V, b_out, rows + (size_t)i * ldl);
    rows_loss(n0, n1, V, ldl, targets, logits, scale, loss, grad_b, 1);
    if (grad_w == NULL) return; /* the loss only (evaluation) */
    gemm_tn_acc(V, H, M, rows, ldl, hs + (size_t)n0 * H, H, grad_w, H);
    gemm(M, V, panels_of(H), rows, ldl, wout_back, scratch, ldh);
    for (int i = 0; i < M; i++) memcpy(grad_h + (size_t)(n0 + i) * H, scratch + (size_t)i * ldh, sizeof(float) * H);
}

/* The sum of squares of x[0:n]: vector sums of 1024 floats at a time, added in double */
static double squares(const float *x, int64_t n) {
    double total = 0.0;
    for (int64_t j0 = 0; j0 < n; j0 += 1024) {
        int64_t j1 = j0 + 1024 < n ? j0 + 1024 : n, j = j0;
        vf acc = (vf){0};
        for (; j + VL <= j1; j += VL) {
            vf v = *(const vf *)(x + j);
            acc += v * v;
        }
        float part = 0.0f;
        for (int l = 0; l < VL; l++) part += acc[l];
        for (; j < j1; j++) part += x[j] * x[j];
        total += part;
    }
    return total;
}

/* `squares` for reading at memory speed: blocks of up to 1024 floats summed in four vectors, the blocks in double */
static double squares_of_chunk(const float *x, int64_t n) {
    double total = 0.0;
    int64_t j = 0;
    while (j + 4 * VL <= n) {
        int64_t end = j + 1024 < n ? j + 1024 : n;
        vf a0 = (vf){0}, a1 = (vf){0}, a2 = (vf){0}, a3 = (vf){0};
        for (; j + 4 * VL <= end; j += 4 * VL) {
            vf v0 = *(const vf *)(x + j), v1 = *(const vf *)(x + j + VL);
            vf v2 = *(const vf *)(x + j + 2 * VL), v3 = *(const vf *)(x + j + 3 * VL);
            a0 += v0 * v0, a1 += v1 * v1, a2 += v2 * v2, a3 += v3 * v3;
        }
        vf acc = (a0 + a1) + (a2 + a3);
        float part = 0.0f;
        for (int l = 0; l < VL; l++) part += acc[l];
        total += part;
    }
    for (; j < n; j++) total += (double)x[j] * x[j];
    return total;
}

/* The sum of squares of n float32 arrays (x[k]: sizes[k] floats), a gradients' global norm squared, on an OpenMP
   team of `parts` threads: each array cut in chunks of SQUARES_CHUNK floats, chunk c's sum (`squares_of_chunk`) put
   in partial[c] (a double for each chunk) by one thread, each thread taking a run of chunks; then the chunks' sums
   added in order: the same bits on any team. */
#define SQUARES_CHUNK 65536
double rnnlm_sum_squares(int n, const float *const *x, const int64_t *sizes, double *partial, int parts) {
    int64_t chunks = 0;
    for (int k = 0; k < n; k++) chunks += (sizes[k] + SQUARES_CHUNK - 1) / SQUARES_CHUNK;
#pragma omp parallel num_threads(parts)
    {
        int64_t c = 0, first = chunks * team_rank() / team_size(), last = chunks * (team_rank() + 1) / team_size();
        for (int k = 0; k < n; k++)
            for (int64_t j = 0; j < sizes[k]; j += SQUARES_CHUNK, c++) {
                int64_t size = sizes[k] - j < SQUARES_CHUNK ? sizes[k] - j : SQUARES_CHUNK;
                if (c >= first && c < last) partial[c] = squares_of_chunk(x[k] + j, size);
            }
    }
    double total = 0.0;
    for (int64_t c = 0; c < chunks; c++) total += partial[c];
    return total;
}

int64_t rnnlm_squares_chunk(void) { return SQUARES_CHUNK; }

/* torch's clip_grad_norm_ and SGD step over n tensors at once (the float32 fused step): with the global norm of the
   gradients (summed in double), coef = min(1, max_norm / (norm + 1e-6)), each parameter p -= lr * coef * g; NaN
   stays NaN. Returns the norm. params[k], grads[k]: sizes[k] floats each. */
double rnnlm_clip_sgd(int n, float *const *params, const float *const *grads, const int64_t *sizes, float lr,
                      float max_norm) {
    double total = 0.0;
    for (int k = 0; k < n; k++) total += squares(grads[k], sizes[k]);
    double norm = __builtin_sqrt(total);
    float coef = (float)(max_norm / (norm + 1e-6));
    coef = coef < 1.0f ? coef : 1.0f;
    if (norm != norm) coef = (float)norm; /* NaN: as torch's clip, the update is NaN */
    for (int k = 0; k < n; k++) {
        float *p = params[k];
        const float *g = grads[k];
#pragma GCC ivdep
        for (int64_t j = 0; j < sizes[k]; j++) p[j] -= lr * (g[j] * coef);
    }
    return norm;
}

/* dst (C x R, row stride ld_dst) += alpha * src (R x C, row stride ld_src): the SGD step of a weight whose gradient
   was computed as its transpose (W_hh's, W_ih's), 16 x 16 tiles at a time */
static void add_transposed(int R, int C, float alpha, const float *src, int ld_src, float *dst, int ld_dst) {
    for (int r0 = 0; r0 < R; r0 += 16)
        for (int c0 = 0; c0 < C; c0 += 16) {
            int r1 = r0 + 16 < R ? r0 + 16 : R, c1 = c0 + 16 < C ? c0 + 16 : C;
            for (int c = c0; c < c1; c++)
                for (int r = r0; r < r1; r++) dst[(size_t)c * ld_dst + r] += alpha * src[(size_t)r * ld_src + c];
        }
}

static double sum_squares(int rows, int n, const float *x, int ld) {
    double total = 0.0;
    for (int i = 0; i < rows; i++) {
        float row = 0.0f;
        for (int j = 0; j < n; j++) row += x[(size_t)i * ld + j] * x[(size_t)i * ld + j];
        total += row;
    }
    return total;
}

/* The whole steps' output-layer gradients, one slot a worker (grad_w_out: workers x V x H, grad_b_out: workers x
   V), summed into the last worker's slot (by the last worker, once all are in); returns their sum of squares */
static double sum_output_grads(int V, int H, int workers, float *grad_w_out, float *grad_b_out) {
    int last = workers - 1;
    float *gw = grad_w_out + (size_t)last * V * H, *gb = grad_b_out + (size_t)last * V;
    for (int p = 0; p < last; p++) {
        add_row(V * H, grad_w_out + (size_t)p * V * H, gw);
        add_row(V, grad_b_out + (size_t)p * V, gb);
    }
    return sum_squares(V, H, gw, H) + sum_squares(1, V, gb, V);
}

/* The SGD step's factor, -lr times torch's global-norm clip coefficient (max_norm / (norm + 1e-6), at most 1), from
   the workers' shares of the gradients' sum of squares (loss[8 * p + 1]); a NaN norm stays NaN, as in torch */
static float clipped_rate(const double *loss, int workers, float lr, float max_norm) {
    double total = 0.0;
    for (int p = 0; p < workers; p++) total += loss[8 * p + 1];
    float coef = max_norm / ((float)__builtin_sqrt(total) + 1e-6f);
    return -lr * (coef > 1.0f ? 1.0f : coef);
}

/* W_out += alpha * gw, b_out += alpha * gb (V x H and V) */
static void sgd_output(int V, int H, float alpha, const float *gw, const float *gb, float *w_out, float *b_out) {
    for (int i = 0; i < V * H; i++) w_out[i] += alpha * gw[i];
    for (int v = 0; v < V; v++) b_out[v] += alpha * gb[v];
}

/* the fields every whole-step struct starts with: sizes, learning rate and clip, inputs, state, parameters */
#define STEP_HEAD                                                                                                      \
    int steps, batch, H, V;                                                                                            \
    float lr, max_norm;                                                                                                \
    const int64_t *tokens, *targets;                                                                                   \
    const float *h0, *c0, *zeros;                                                                                      \
    float *w_ih, *w_hh, *b_ih, *b_hh, *w_out, *b_out;

/* One SGD step of the bf16 LSTM with its output layer, without autograd (rnnlm/cpu/fused.py): everything the workers
   (threads) share. tokens, targets: (steps, batch), time-major as the logits; h0, c0: the state (batch x H); zeros:
   batch x H zeros (the gradient reaching the last state). The parameters are torch's and are updated in place. The
   other arrays are buffers of the shapes their users above describe; emb (V x 4H) and the packs are made from the
   parameters here. loss: 8 doubles a worker (a cache line each): [0] the worker's summed cross-entropy, [1] its share
   of the gradients' sum of squares. token_grad (V x 4H), grad_w_out (V x H), grad_b_out (V): one each a worker, zeros
   at the start; grad_b: 4H. */
struct lstm_sgd_step {
    STEP_HEAD
    float *emb;
    uint32_t *whh_fwd, *whh_back;
    float *wout_fwd, *wout_back;
    uint16_t *hs16;
    float *hs, *cs, *gates, *tcs, *logits;
    uint16_t *gpanels;
    float *grad_h0, *grad_c0, *grad_w_hh_t;
    double *loss;
    float *token_grad, *grad_b, *grad_w_out, *grad_b_out;
};

static void share(int n, int worker, int workers, int *lo, int *hi) {
    *lo = (int)((int64_t)n * worker / workers);
    *hi = (int)((int64_t)n * (worker + 1) / workers);
}

/* at[i]: the offset of buffer i of `count` buffers of floats[i] floats each in one work array, each starting on a
   cache line of its own; returns the floats they take */
static size_t lay_out(int count, const size_t *floats, size_t *at) {
    size_t used = 0;
    for (int i = 0; i < count; i++) {
        at[i] = used;
        used += (floats[i] + 15) / 16 * 16;
    }
    return used;
}

/* The work buffers of worker number `worker` for rnnlm_lstm_sgd_bf16, as offsets in floats into its work array (each
   on a cache line of its own); returns the floats they take */
enum { W_SCRATCH, W_SCRATCH_OUT, W_DH, W_DC, W_ROWS, W_G16, W_SCRATCH_H, W_GO, W_A, W_COUNT };
static size_t sgd_work_layout(int steps, int batch, int H, int V, int worker, int workers, size_t at[W_COUNT]) {
    int r0, r1, k0, k1;
    share(batch, worker, workers, &r0, &r1);
    share(H, worker, workers, &k0, &k1);
    size_t M = (size_t)(r1 - r0), G = 4 * (size_t)H, pairs = ((size_t)steps * batch + 1) / 2;
    size_t floats[W_COUNT] = {
        [W_SCRATCH] = M * panels_of(4 * H) * NR, /* the forward's matmul */
        [W_SCRATCH_OUT] = M * panels_of(V) * NR, /* the output layer's */
        [W_DH] = M * H,
        [W_DC] = M * H,
        [W_ROWS] = 2 * G,                        /* a row pair of gate gradients */
        [W_G16] = M * G / 2 + 1,                 /* the step's gate gradients in bf16 */
        [W_SCRATCH_H] = M * panels_of(H) * NR,   /* the backward's matmul */
        [W_GO] = M * panels_of(H) * NR,          /* the output layer's gradient to h */
        [W_A] = pairs * (size_t)(k1 - k0),       /* W_hh's gradient: h's row pairs in bf16 */
    };
    return lay_out(W_COUNT, floats, at);
}

/* The floats of the work array of worker number `worker` for rnnlm_lstm_sgd_bf16 */
int64_t rnnlm_lstm_sgd_work(int steps, int batch, int H, int V, int worker, int workers) {
    size_t at[W_COUNT];
    return (int64_t)sgd_work_layout(steps, batch, H, V, worker, workers, at);
}

/* Worker number `worker` of `workers` (1 or 2) runs its share of the step, waiting for the others (barrier) where it
   needs their results: (1) emb's columns and W_hh's packed panels; (2) its batch rows' forward window, loss, the loss's
   gradient and the output layer's gradients (output_loss), and backward window; (3) its hidden units' rows of W_hh's
   gradient (transposed), the worker-summed small gradients (worker 0: W_ih's and the biases', the last worker: the
   output layer's), and their sums of squares; (4) the global-norm clip (torch's: max_norm / (norm + 1e-6), at most 1)
   and the SGD step of its share of the parameters. work: rnnlm_lstm_sgd_work floats. */
void rnnlm_lstm_sgd_bf16(const struct lstm_sgd_step *s, int worker, int workers, int64_t *flags, float *work) {
    int steps = s->steps, batch = s->batch, H = s->H, V = s->V, G = 4 * H, N = steps * batch;
    int r0, r1, k0, k1, g0, g1, f0, f1, b0, b1, last = workers - 1;
    share(batch, worker, workers, &r0, &r1);
    share(H, worker, workers, &k0, &k1);
    share(G, worker, workers, &g0, &g1);
    share(panels_of(G), worker, workers, &f0, &f1);
    share(panels_of(H), worker, workers, &b0, &b1);
    size_t at[W_COUNT], pG = (size_t)panels_of(G) * NR;
    sgd_work_layout(steps, batch, H, V, worker, workers, at);
    double *mine = s->loss + 8 * worker;

    for (int v = 0; v < V; v++)
        for (int g = g0; g < g1; g++) s->emb[(size_t)v * G + g] = s->w_ih[(size_t)g * V + v] + s->b_ih[g] + s->b_hh[g];
    pack_bf16_panels(s->w_hh, H, G, 1, f0, f1, s->whh_fwd);
    pack_bf16_panels(s->w_hh, G, H, 0, b0, b1, s->whh_back);
    if (worker == last) {
        rnnlm_pack(s->w_out, H, V, 1, s->wout_fwd);
        rnnlm_pack(s->w_out, V, H, 0, s->wout_back);
    }
    if (barrier(flags, worker, workers, 1)) return;

    rnnlm_lstm_forward_bf16(steps, batch, H, V, r0, r1, s->tokens, s->h0, s->c0, s->emb, s->whh_fwd, s->wout_fwd,
                            s->b_out, s->hs16, s->hs, s->cs, s->gates, s->tcs, s->logits, work + at[W_SCRATCH],
                            work + at[W_SCRATCH_OUT]);
    output_loss(steps, batch, H, V, r0, r1, s->targets, s->hs, s->logits, 1.0f / (float)N, mine,
                s->grad_b_out + (size_t)worker * V, s->grad_w_out + (size_t)worker * V * H);
    rnnlm_lstm_backward_bf16(steps, batch, H, V, r0, r1, s->tokens, s->c0, s->cs, s->gates, s->tcs, s->logits,
                             s->wout_back, s->zeros, s->zeros, s->whh_back, s->gpanels,
                             s->token_grad + (size_t)worker * V * G, s->grad_h0, s->grad_c0, work + at[W_DH],
                             work + at[W_DC], work + at[W_ROWS], (uint16_t *)(work + at[W_G16]),
                             work + at[W_SCRATCH_H], work + at[W_GO]);
    if (barrier(flags, worker, workers, 2)) return;

    rnnlm_weight_grad_bf16(N, H, G, k0, k1, batch, s->h0, s->hs, (const uint32_t *)s->gpanels, s->grad_w_hh_t,
                           (uint32_t *)(work + at[W_A]));
    double squares = sum_squares(k1 - k0, G, s->grad_w_hh_t + (size_t)k0 * pG, (int)pG);
    if (worker == 0) {
        for (int p = 1; p < workers; p++) add_row(V * G, s->token_grad + (size_t)p * V * G, s->token_grad);
        for (int g = 0; g < G; g++) s->grad_b[g] = 0.0f;
        for (int v = 0; v < V; v++) add_row(G, s->token_grad + (size_t)v * G, s->grad_b);
        squares += sum_squares(V, G, s->token_grad, G) + 2.0 * sum_squares(1, G, s->grad_b, G);
    }
    if (worker == last) squares += sum_output_grads(V, H, workers, s->grad_w_out, s->grad_b_out);
    mine[1] = squares;
    if (barrier(flags, worker, workers, 3)) return;

    float alpha = clipped_rate(s->loss, workers, s->lr, s->max_norm);
    add_transposed(k1 - k0, G, alpha, s->grad_w_hh_t + (size_t)k0 * pG, (int)pG, s->w_hh + k0, H);
    if (worker == 0) {
        add_transposed(V, G, alpha, s->token_grad, G, s->w_ih, V);
        for (int g = 0; g < G; g++) {
            s->b_ih[g] += alpha * s->grad_b[g];
            s->b_hh[g] += alpha * s->grad_b[g];
        }
    }
    if (worker == last)
        sgd_output(V, H, alpha, s->grad_w_out + (size_t)last * V * H, s->grad_b_out + (size_t)last * V, s->w_out,
                   s->b_out);
}

/* The float32 whole SGD steps with their output layers, one C call per worker (`float32_step` in rnnlm/cpu/fused.py:
   the one-layer one-hot LSTM and tanh RNN with a small vocabulary, where bf16 is not fast or `amp` is off). Their
   arrays, shared between the workers: the parameters (torch's, updated in place), hs (steps, batch, H) and for the
   LSTM cs, gates, tcs as its windows keep them; logits (steps * batch, panels(V) * NR); grad_h (steps * batch, H:
   the gradient reaching hs from the output layer); grad_gates (d loss / d the pre-activations, gates * H wide: every
   row n of the RNN's, the LSTM's only for two steps at a time, see lstm_backward); hprev (the states rows n = t *
   batch + i multiply, h0's rows then hs's, as rnnlm_pack's panels: panels(H) x steps * batch x NR); grad_w_hh (gates
   * H x panels(H) * NR); emb (V x gates * H: W_ih.T + b_ih + b_hh); token_grad (V x gates * H, W_ih's gradient
   transposed); grad_b (gates * H); wout_fwd, wout_back (W_out packed with trans=1 and 0); grad_w_out (workers x V x
   H), grad_b_out (workers x V); loss (8 doubles a worker: its summed cross-entropy and its share of the gradients'
   sum of squares); whh_fwd, whh_back (the RNN's W_hh packed with trans=1 and 0). */
struct f32_step {
    STEP_HEAD
    float *emb, *wout_fwd, *wout_back, *whh_fwd, *whh_back;
    float *hs, *cs, *gates, *tcs, *logits, *grad_h, *grad_gates, *hprev, *grad_w_hh;
    double *loss;
    float *token_grad, *grad_b, *grad_w_out, *grad_b_out;
};

/* The work buffers of a worker of the float32 steps (`gates` 4: the LSTM's, 1: the tanh RNN's), as offsets in floats
   into its work array (each on a cache line of its own); returns the floats they take. The RNN's windows take batch
   rows, so it needs no packs or carried state of its own. */
enum { F_WHH, F_WHH_BACK, F_SCRATCH, F_DH, F_DC, F_SCRATCH_BACK, F_SCRATCH_OUT, F_GATES_T, F_TILE, F_COUNT };
static size_t f32_work_layout(int steps, int batch, int H, int gates, int worker, int workers, size_t at[F_COUNT]) {
    int u0, u1, r0, r1, n0, n1, N = steps * batch, lstm = gates == 4;
    share(H, worker, workers, &u0, &u1);
    share(batch, worker, workers, &r0, &r1);
    share(N, worker, workers, &n0, &n1);
    size_t U = (size_t)(u1 - u0), wide = (size_t)panels_of(4 * (int)U) * NR, narrow = (size_t)panels_of((int)U) * NR;
    size_t ldh = (size_t)panels_of(H) * NR, out_rows = (size_t)(lstm ? n1 - n0 : r1 - r0);
    size_t floats[F_COUNT] = {
        [F_WHH] = lstm ? wide * H : 0,              /* the LSTM's W_hh rows of its units, packed (forward) */
        [F_WHH_BACK] = lstm ? narrow * 4 * H : 0,   /* their columns, packed (backward) */
        [F_SCRATCH] = lstm ? wide * batch : ldh * (r1 - r0), /* the forward's matmul */
        [F_DH] = lstm ? U * batch : 0,
        [F_DC] = lstm ? U * batch : 0,
        [F_SCRATCH_BACK] = lstm ? narrow * batch : ldh * (r1 - r0), /* the backward's matmul */
        [F_SCRATCH_OUT] = out_rows * ldh,           /* the output layer's gradient to h */
        [F_GATES_T] = (size_t)gates * U * N,        /* its gate gradients, transposed (gates * U x N) */
        [F_TILE] = 8 * tile_ld(gates, U),           /* 8 rows of them, for gate_grad_rows */
    };
    return lay_out(F_COUNT, floats, at);
}

/* The floats of the work array of worker number `worker` for rnnlm_lstm_sgd_f32 (gates 4) or rnnlm_rnn_sgd_f32 (1) */
int64_t rnnlm_sgd_f32_work(int steps, int batch, int H, int gates, int worker, int workers) {
    size_t at[F_COUNT];
    return (int64_t)f32_work_layout(steps, batch, H, gates, worker, workers, at);
}

/* hprev's panels [p0, p1), batch rows [r0, r1) of every step (see struct f32_step) */
static void pack_prev(const struct f32_step *s, int p0, int p1, int r0, int r1) {
    int N = s->steps * s->batch, H = s->H;
    for (int t = 0; t < s->steps; t++)
        for (int i = r0; i < r1; i++) {
            int n = t * s->batch + i;
            const float *h = t == 0 ? s->h0 + (size_t)i * H : s->hs + (size_t)(n - s->batch) * H;
            for (int p = p0; p < p1; p++) {
                float *panel = s->hprev + ((size_t)p * N + n) * NR;
                for (int jj = 0; jj < NR; jj++) panel[jj] = p * NR + jj < H ? h[p * NR + jj] : 0.0f;
            }
        }
}

/* The start every float32 step shares: the worker's loss and output-layer gradient slots zeroed, emb's and
   token_grad's columns of its units [u0, u1) of each gate block, and (the last worker) W_out's packs */
static void f32_begin(const struct f32_step *s, int gates, int u0, int u1, int worker, int workers) {
    int H = s->H, V = s->V, G = gates * H;
    s->loss[8 * worker] = s->loss[8 * worker + 1] = 0.0;
    memset(s->grad_w_out + (size_t)worker * V * H, 0, sizeof(float) * V * H);
    memset(s->grad_b_out + (size_t)worker * V, 0, sizeof(float) * V);
    for (int v = 0; v < V; v++)
        for (int gate = 0; gate < gates; gate++) {
            size_t first = (size_t)gate * H + u0;
            for (size_t g = first; g < (size_t)gate * H + u1; g++)
                s->emb[(size_t)v * G + g] = s->w_ih[g * V + v] + s->b_ih[g] + s->b_hh[g];
            memset(s->token_grad + (size_t)v * G + first, 0, sizeof(float) * (u1 - u0));
        }
    if (worker == workers - 1) {
        rnnlm_pack(s->w_out, H, s->V, 1, s->wout_fwd);
        rnnlm_pack(s->w_out, s->V, H, 0, s->wout_back);
    }
}

/* The end every float32 step shares, once every worker's grad_gates, hprev and output-layer gradients are in: the
   worker's units' rows of W_hh's gradient (each gate block's, its gate gradients transposed @ hprev, K-blocked over
   the window's rows), their columns of token_grad and of the biases' gradient (token_grad's column sums; b_ih's and
   b_hh's are the same), the last worker the output layer's summed over the workers, and their sums of squares; then,
   after the workers' barrier number `step` + 1, the global-norm clip (torch's: max_norm / (norm + 1e-6), at most 1)
   and the SGD step of the worker's share of the parameters. */
static void f32_finish(const struct f32_step *s, int gates, int u0, int u1, int worker, int workers, int64_t *flags,
                       int64_t step, float *gates_t, float *tile) { /* tile NULL: gates_t and token_grad are in */
    int H = s->H, V = s->V, G = gates * H, N = s->steps * s->batch, U = u1 - u0, last = workers - 1;
    int ldp = panels_of(H) * NR;
    if (tile) /* else the backward window did it a step at a time */
        gate_grad_rows(N, H, gates, u0, U, 0, N, s->tokens, s->grad_gates, s->token_grad, gates_t, tile,
                       (int)tile_ld(gates, (size_t)U));
    double squares = 0.0;
    for (int gate = 0; gate < gates; gate++) { /* W_hh's rows: sum over rows n of grad_gates[n]^T h_prev[n] */
        size_t first = (size_t)gate * H + u0;
        float *rows = s->grad_w_hh + first * ldp, *grad_b = s->grad_b + first, *by_token = s->token_grad + first;
        gemm_long(U, N, panels_of(H), gates_t + (size_t)gate * U * N, N, s->hprev, rows, ldp);
        memset(grad_b, 0, sizeof(float) * U);
        for (int v = 0; v < V; v++) add_row(U, by_token + (size_t)v * G, grad_b);
        squares += sum_squares(U, H, rows, ldp) + sum_squares(V, U, by_token, G) + 2.0 * sum_squares(1, U, grad_b, U);
    }
    if (worker == last) squares += sum_output_grads(V, H, workers, s->grad_w_out, s->grad_b_out);
    s->loss[8 * worker + 1] = squares;
    if (barrier(flags, worker, workers, step + 1)) return;

    float alpha = clipped_rate(s->loss, workers, s->lr, s->max_norm);
    for (int gate = 0; gate < gates; gate++) {
        size_t first = (size_t)gate * H + u0;
        for (size_t r = first; r < first + U; r++) {
            float *w = s->w_hh + r * H;
            const float *g = s->grad_w_hh + r * ldp;
#pragma GCC ivdep
            for (int k = 0; k < H; k++) w[k] += alpha * g[k];
        }
        add_transposed(V, U, alpha, s->token_grad + first, G, s->w_ih + first * V, V);
        for (size_t g = first; g < first + U; g++) {
            s->b_ih[g] += alpha * s->grad_b[g];
            s->b_hh[g] += alpha * s->grad_b[g];
        }
    }
    if (worker == last)
        sgd_output(V, H, alpha, s->grad_w_out + (size_t)last * V * H, s->grad_b_out + (size_t)last * V, s->w_out,
                   s->b_out);
}

/* What one worker of a whole float32 step takes: its hidden units [u0, u1), its part [a0, a1) of what the step also
   splits (the window's rows for the LSTM, the batch's rows for the RNN), its panels [p0, p1) of H, and where its
   work arrays lie (at, indexed by F_*). */
struct worker_part {
    int u0, u1, a0, a1, p0, p1;
    size_t at[F_COUNT];
};

static void take_part(const struct f32_step *s, int gates, int along, int worker, int workers, struct worker_part *w) {
    share(s->H, worker, workers, &w->u0, &w->u1);
    share(along, worker, workers, &w->a0, &w->a1);
    share(panels_of(s->H), worker, workers, &w->p0, &w->p1);
    f32_work_layout(s->steps, s->batch, s->H, gates, worker, workers, w->at);
}

/* The float32 LSTM's step, worker number `worker` of `workers` (1 or 2), the workers splitting the hidden units as
   the float32 windows do (W_hh, 1 MB at H = 256, does not fit one core's L2; each worker's quarter of it, packed
   both ways, stays in its own) and the output layer's rows: (1) f32_begin and W_hh's packs for its units [u0, u1);
   (2) the forward window over its units (lstm_forward), then its share of hprev's panels; (3) the output layer's
   step over its rows [n0, n1) of the window (rnnlm_output_step: loss, logits' gradient, grad_h, its output-layer
   gradients); (4) the backward window over its units (lstm_backward); (5) f32_finish. Between the stages the workers
   wait for each other (barrier). work: rnnlm_sgd_f32_work floats. */
void rnnlm_lstm_sgd_f32(const struct f32_step *s, int worker, int workers, int64_t *flags, float *work) {
    int steps = s->steps, batch = s->batch, H = s->H, V = s->V, N = steps * batch;
    struct worker_part w;
    take_part(s, 4, N, worker, workers, &w);
    int u0 = w.u0, u1 = w.u1, n0 = w.a0, n1 = w.a1, p0 = w.p0, p1 = w.p1, U = u1 - u0;
    const size_t *at = w.at;
    int64_t step = 0; /* the barriers passed */

    f32_begin(s, 4, u0, u1, worker, workers);
    pack_unit_rows(s->w_hh, 4, H, u0, U, work + at[F_WHH]);
    pack_unit_columns(s->w_hh, 4, H, u0, U, work + at[F_WHH_BACK]);
    if (lstm_forward(steps, batch, H, u0, u1, worker, workers, flags, step, s->tokens, s->h0, s->c0, s->emb,
                     work + at[F_WHH], s->hs, s->cs, s->gates, s->tcs, work + at[F_SCRATCH]))
        return;
    step += steps; /* every worker's hs are in */
    pack_prev(s, p0, p1, 0, batch);
    if (barrier(flags, worker, workers, ++step)) return; /* every worker's panels of hprev; W_out's packs */

    rnnlm_output_step(n0, n1, H, V, s->hs, s->wout_fwd, s->b_out, s->wout_back, s->targets, 1.0f / (float)N,
                      s->logits, s->loss + 8 * worker, s->grad_b_out + (size_t)worker * V,
                      s->grad_w_out + (size_t)worker * V * H, s->grad_h, work + at[F_SCRATCH_OUT]);
    if (barrier(flags, worker, workers, ++step)) return; /* every worker's rows of grad_h */

    if (lstm_backward(steps, batch, H, u0, u1, worker, workers, flags, step, s->c0, s->cs, s->gates, s->tcs, s->grad_h,
                      s->zeros, work + at[F_WHH_BACK], s->grad_gates, NULL, NULL, work + at[F_DH], work + at[F_DC],
                      work + at[F_SCRATCH_BACK], NULL, s->tokens, s->token_grad, work + at[F_GATES_T],
                      work + at[F_TILE]))
        return;
    step += steps;
    f32_finish(s, 4, u0, u1, worker, workers, flags, step, work + at[F_GATES_T], NULL);
}

/* The float32 tanh RNN's step, worker number `worker` of `workers` (1 or 2): W_hh (256 KB at H = 256) fits a core's
   L2, so each worker runs its batch rows [r0, r1) through the forward window, the output layer's step (a call per
   time step, its rows only) and the backward window without waiting for the other; then, by hidden units [u0, u1),
   f32_finish. Before the windows the workers pack W_hh both ways in halves and wait for each other once.
   work: rnnlm_sgd_f32_work floats. */
void rnnlm_rnn_sgd_f32(const struct f32_step *s, int worker, int workers, int64_t *flags, float *work) {
    int steps = s->steps, batch = s->batch, H = s->H, V = s->V, N = steps * batch;
    struct worker_part w;
    take_part(s, 1, batch, worker, workers, &w);
    int u0 = w.u0, u1 = w.u1, r0 = w.a0, r1 = w.a1, p0 = w.p0, p1 = w.p1;
    const size_t *at = w.at;

    f32_begin(s, 1, u0, u1, worker, workers);
    pack_panels(s->w_hh, H, H, 1, p0, p1, s->whh_fwd);
    pack_panels(s->w_hh, H, H, 0, p0, p1, s->whh_back);
    if (barrier(flags, worker, workers, 1)) return; /* emb and the packs are in */

    rnnlm_rnn_forward(steps, batch, H, r0, r1, s->tokens, s->h0, s->emb, s->whh_fwd, s->hs, work + at[F_SCRATCH]);
    pack_prev(s, 0, panels_of(H), r0, r1);
    for (int t = 0; t < steps; t++) {
        int64_t first = (int64_t)t * batch + r0;
        rnnlm_output_step(first, first + (r1 - r0), H, V, s->hs, s->wout_fwd, s->b_out, s->wout_back, s->targets,
                          1.0f / (float)N, s->logits, s->loss + 8 * worker, s->grad_b_out + (size_t)worker * V,
                          s->grad_w_out + (size_t)worker * V * H, s->grad_h, work + at[F_SCRATCH_OUT]);
    }
    rnnlm_rnn_backward(steps, batch, H, r0, r1, s->hs, s->grad_h, s->whh_back, s->grad_gates, NULL,
                       work + at[F_SCRATCH_BACK]);
    if (barrier(flags, worker, workers, 2)) return; /* every worker's rows of grad_gates and hprev */
    f32_finish(s, 1, u0, u1, worker, workers, flags, 2, work + at[F_GATES_T], work + at[F_TILE]);
}

/* torch's CPU `bernoulli_(p)` of a float tensor, the same bits from the same generator: each element takes two words
   of torch's mt19937 (hi, then lo), keeps 53 bits of ((hi << 32) | lo) as a uniform double in [0, 1) and is 1 where
   that is below p (`value` there instead of 1: dropout's mask comes out scaled). `state` is the generator's 624
   words as torch's state holds them (uint64 each), `left` and `next` its position; all three are advanced as torch's
   engine advances them, so that the caller can hand the state back. The words are made in blocks of 624 (the
   regeneration and the tempering vectorise) instead of one call each, and turned into elements four at a time. */
#define MT_N 624
#define MT_M 397

static inline uint32_t mt_twist(uint32_t u, uint32_t v) {
    return (((u & 0x80000000u) | (v & 0x7fffffffu)) >> 1) ^ ((v & 1u) ? 0x9908b0dfu : 0u);
}

static void mt_regenerate(uint32_t *s) {
    int i = 0;
    for (; i < MT_N - MT_M; i++) s[i] = s[i + MT_M] ^ mt_twist(s[i], s[i + 1]);
    for (; i < MT_N - 1; i++) s[i] = s[i + MT_M - MT_N] ^ mt_twist(s[i], s[i + 1]);
    s[MT_N - 1] = s[MT_M - 1] ^ mt_twist(s[MT_N - 1], s[0]);
}

static inline uint32_t mt_temper(uint32_t y) {
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    return y ^ (y >> 18);
}

typedef uint64_t u64x4 __attribute__((vector_size(32), aligned(4)));
typedef int64_t i64x4 __attribute__((vector_size(32)));
typedef int32_t i32x4 __attribute__((vector_size(16), aligned(4)));

#define MASK53 ((1ull << 53) - 1)

/* One element from the tempered words hi and lo: `value` where the 53 bits of ((hi << 32) | lo) lie below `limit`,
   else 0 */
static inline float drawn(uint32_t hi, uint32_t lo, uint64_t limit, float value) {
    return ((((uint64_t)hi << 32) | lo) & MASK53) < limit ? value : 0.0f;
}

/* out[j] = drawn(words[2j], words[2j + 1]) for j < pairs: four pairs at a time as 64-bit lanes (the values are below
   2^53, so a signed compare serves) */
static void pairs_below(int64_t pairs, const uint32_t *words, uint64_t limit, float value, float *out) {
    int32_t bits;
    memcpy(&bits, &value, sizeof bits);
    const i64x4 below = {(int64_t)limit, (int64_t)limit, (int64_t)limit, (int64_t)limit};
    int64_t j = 0;
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    for (; j + 4 <= pairs; j += 4) {
        u64x4 v = *(const u64x4 *)(words + 2 * j); /* a lane: hi in its low half, lo in its high half */
        v = ((v << 32) | (v >> 32)) & MASK53;      /* (hi << 32) | lo, 53 bits */
        i32x4 hit = __builtin_convertvector((i64x4)v < below, i32x4); /* -1 or 0 */
        *(i32x4 *)(out + j) = hit & bits;
    }
#endif
    for (; j < pairs; j++) out[j] = drawn(words[2 * j], words[2 * j + 1], limit, value);
}

void rnnlm_bernoulli(float *out, int64_t n, double p, float value, uint64_t *state, int32_t *left, uint64_t *next) {
    uint32_t s[MT_N], words[MT_N];
    for (int i = 0; i < MT_N; i++) s[i] = (uint32_t)state[i];
    /* below p * 2^53 as an integer: x * 2^-53 < p for the 53-bit x exactly where x < ceil(p * 2^53) */
    double scaled = p * 9007199254740992.0, whole = (double)(uint64_t)scaled;
    uint64_t limit = p <= 0 ? 0 : p >= 1 ? (1ull << 53) : (uint64_t)whole + (whole < scaled);
    int64_t l = *left, nx = (int64_t)*next, i = 0;
    uint32_t pending = 0;
    int have_hi = 0;
    while (i < n) {
        /* the words torch's engine hands out before it regenerates: state[nx .. nx + l - 2], l - 1 of them */
        if (l == 1) {
            mt_regenerate(s);
            l = MT_N + 1, nx = 0;
        }
        int64_t count = l - 1, k = 0;
        for (int64_t w = 0; w < count; w++) words[w] = mt_temper(s[nx + w]);
        if (have_hi) { /* the element whose hi word came from the block before */
            out[i++] = drawn(pending, words[0], limit, value);
            k = 1, have_hi = 0;
        }
        int64_t pairs = (count - k) / 2;
        if (pairs > n - i) pairs = n - i;
        pairs_below(pairs, words + k, limit, value, out + i);
        i += pairs, k += 2 * pairs;
        if (i < n && k < count) { /* one word left in the block: the next element's hi */
            pending = words[k++], have_hi = 1;
        }
        l -= k, nx += k;
    }
    for (int j = 0; j < MT_N; j++) state[j] = s[j];
    *left = (int32_t)l, *next = (uint64_t)nx;
}

/* The split windows on torch's own threads. With two torch threads (the adaptive softmax's models), a helper thread
   for the second core would contend with torch's second OpenMP thread, which spins a while after every torch op
   waiting for the next; built with -fopenmp, this library shares torch's OpenMP runtime (libgomp is loaded once per
   process), so a window's two workers run as one OpenMP team of the calling thread: on the very threads torch's
   matmuls run on, the spinning one taking its share at once. A window is given as TEAM_ARGS int64 words: its kind,
   the 7 ints and flags of the split windows (steps, batch, H, u0, u1, worker, workers, flags), then its arrays. */
enum { LSTM_FORWARD, LSTM_BACKWARD, GRU_FORWARD, GRU_BACKWARD };
#define TEAM_ARGS 24

#if defined(_OPENMP)
static void run_window(const int64_t *w) {
    int s[7];
    for (int k = 0; k < 7; k++) s[k] = (int)w[1 + k];
    int64_t *flags = (int64_t *)(intptr_t)w[8];
    void *a[TEAM_ARGS - 9];
    for (int k = 0; k < TEAM_ARGS - 9; k++) a[k] = (void *)(intptr_t)w[9 + k];
#define SPLIT s[0], s[1], s[2], s[3], s[4], s[5], s[6], flags
    switch (w[0]) {
    case LSTM_FORWARD:
        rnnlm_lstm_forward(SPLIT, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9]);
        break;
    case LSTM_BACKWARD:
        rnnlm_lstm_backward(SPLIT, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12],
                            a[13]);
        break;
    case GRU_FORWARD:
        rnnlm_gru_forward(SPLIT, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9]);
        break;
    case GRU_BACKWARD:
        rnnlm_gru_backward(SPLIT, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11]);
        break;
    }
#undef SPLIT
}
#endif

/* The OpenMP threads a team of the calling thread would get (omp_get_max_threads), or -1 in a build without OpenMP:
   equal to torch.get_num_threads() after each torch.set_num_threads where the runtime is torch's. */
int rnnlm_team_threads(void) {
#if defined(_OPENMP)
    return omp_get_max_threads();
#else
    return -1;
#endif
}

/* Runs `workers` windows (workers * TEAM_ARGS words) at once, window w on thread w of an OpenMP team of the calling
   thread. Returns 0, or 1 with none of them run where the team has another number of threads (the workers wait for
   each other every step, so they must all run at once) or the build has no OpenMP. */
int rnnlm_team(int workers, const int64_t *windows) {
#if defined(_OPENMP)
    int short_team = 0;
#pragma omp parallel num_threads(workers)
    {
        if (team_size() != workers) {
#pragma omp atomic write
            short_team = 1;
        } else
            run_window(windows + (size_t)team_rank() * TEAM_ARGS);
    }
    return short_team;
#else
    (void)workers, (void)windows;
    return 1;
#endif
}
