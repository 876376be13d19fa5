/* The fused CPU Lion step: one pass over each element's param, grad and momentum, for many tensors per call.
 *
 * Built on first use by lion_dist/backends/cpu_kernel.py (cc -O3 -march=native -funroll-loops -ffp-contract=off,
 * cached per source, compiler, CPU and OpenMP runtime) and called through ctypes. The caller passes a table
 * of tensors: three pointers each (param, grad, momentum), the element count, a dtype code and where its
 * stochastic-rounding noise comes from. The elements of all tensors, concatenated, are cut into chunks that
 * threads take from a shared counter, so one call does all tensors whatever their number and sizes. Threads:
 * torch's own OpenMP pool when built with -fopenmp and linked to torch's OpenMP runtime (its idle threads spin
 * for a while after each torch op, so threads of our own would compete with them for the cores); otherwise
 * pthreads started per call.
 *
 * Rounding follows lion_dist.spec.lion_reference exactly: every `x * a + y * b` of the reference is
 * fma(y, b, x * a) (torch's add with alpha), everything else is a plain operation in the math type (float, or
 * double for fp64 params), and the compiler may not contract or reassociate (-ffp-contract=off, no
 * -ffast-math). sign(c) is `sign(c) + 0 * c` as in the reference: a NaN or Inf in c makes the param NaN instead
 * of silently freezing it. bf16 and fp16 are widened exactly and written back rounded to nearest even, or, for
 * bf16 params with a key, stochastically with the spec's Philox-4x32-10 noise (lion_dist.spec.sr_noise), so the
 * result equals the reference bit for bit in every case.
 *
 * int8 momentum (lion_dist.spec.lion_reference_int8): the momentum is int8 codes with one fp32 scale per block of
 * `block` elements along the last dim (never across a row; a row's last block may be short). lion_step_int8 is
 * the same step with m = code * scale; a thread owns whole blocks (chunks split at block boundaries), keeps the
 * block's new momentum in a stack buffer, then requantizes it: scale = absmax / 127 (NaN if any element is NaN),
 * code = clamp(rint(m / scale)) or, stochastically, clamp(floor(m / scale + noise / 65536)) with the spec's Philox
 * noise in the momentum's own stream, and 0 where that is not finite. One pass: p, g and the codes are read
 * once and written once.
 */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define LION_ABI 7
#define ALIGN_ELEMS 64 /* chunks start at multiples of 64 elements of a tensor: no cache line in two chunks */
#define MIN_PER_THREAD 32768 /* fewer elements per thread: another thread costs more than it saves */
#define MAX_THREADS 256
#define CHUNKS_PER_THREAD 8 /* a delayed thread leaves its chunks to the others */
#define MAX_INT8_BLOCK 4096 /* elements per scale of an int8 momentum: the stack buffers of a block */

/* dtype codes, two bits per operand: code = P | G << 2 | M << 4 */
enum { F32 = 0, BF16 = 1, F16 = 2, F64 = 3 };
#define ALL_F64 (F64 | F64 << 2 | F64 << 4)

typedef struct {
    double beta1, one_minus_beta1, beta2, one_minus_beta2, neg_lr, decay;
} lion_hp;

/* Where one tensor's stochastic-rounding noise comes from (lion_dist.spec.NoiseStream). */
typedef struct {
    uint32_t k0, k1, param_id, shard;
    int64_t base;
} noise_stream;

static inline float f32_from_bits(uint32_t b) {
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static inline uint32_t bits_from_f32(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    return b;
}

static inline float from_bf16(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }

/* Round to nearest even, as torch's float -> bfloat16 conversion; a NaN becomes the quiet NaN 0x7fc0 (torch
 * does not specify a NaN's sign or payload either). */
static inline uint16_t to_bf16(float f) {
    uint32_t b = bits_from_f32(f);
    uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    return (uint16_t)(f != f ? 0x7fc0u : rounded);
}

/* Stochastic rounding to bf16: add 16 random low bits, then truncate (unbiased); Inf and NaN round to nearest. */
static inline uint16_t to_bf16_stochastic(float f, uint32_t noise) {
    uint32_t b = bits_from_f32(f);
    uint16_t rounded = (uint16_t)((b + noise) >> 16);
    return ((b & 0x7f800000u) == 0x7f800000u) ? to_bf16(f) : rounded;
}

/* Philox-4x32-10 (Salmon et al. 2011) with the constants of Triton's tl.philox and cuRAND, in place on c. */
static inline void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
    for (int round = 0; round < 10; round++) {
        uint64_t a = (uint64_t)0xD2511F53u * c[0];
        uint64_t b = (uint64_t)0xCD9E8D57u * c[2];
        uint32_t c0 = (uint32_t)(b >> 32) ^ c[1] ^ k0;
        uint32_t c2 = (uint32_t)(a >> 32) ^ c[3] ^ k1;
        c[0] = c0;
        c[1] = (uint32_t)b;
        c[2] = c2;
        c[3] = (uint32_t)a;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
}

/* Element loads and stores by dtype code T (a constant in every loop below, so the branches fold away). */
#define LOAD(T, ptr, i)                                                                                       \
    ((T) == F32 ? ((const float *)(ptr))[i]                                                                   \
                : (T) == BF16 ? from_bf16(((const uint16_t *)(ptr))[i]) : (float)((const _Float16 *)(ptr))[i])
#define STORE(T, ptr, i, x)                                                                                   \
    do {                                                                                                      \
        if ((T) == F32) {                                                                                     \
            ((float *)(ptr))[i] = (x);                                                                        \
        } else if ((T) == BF16) {                                                                             \
            ((uint16_t *)(ptr))[i] = to_bf16(x);                                                              \
        } else {                                                                                              \
            ((_Float16 *)(ptr))[i] = (_Float16)(x);                                                           \
        }                                                                                                     \
    } while (0)

/* One loop per (param, grad, momentum) dtype combination; SR: stochastic rounding of a bf16 param. */
#define LION_SEGMENT(P, G, M, SR)                                                                                  \
    static void seg_##P##_##G##_##M##_##SR(void *p_, const void *g_, void *m_, int64_t i0, int64_t i1,               \
                                           const lion_hp *hp, const noise_stream *ns) {                             \
        const float b1 = (float)hp->beta1, omb1 = (float)hp->one_minus_beta1;                                      \
        const float b2 = (float)hp->beta2, omb2 = (float)hp->one_minus_beta2;                                      \
        const float neg_lr = (float)hp->neg_lr, decay = (float)hp->decay;                                          \
        const int has_decay = decay != 1.0f;                                                                        \
        uint32_t words[4] = {0, 0, 0, 0};                                                                           \
        int64_t word_block = -1;                                                                                    \
        (void)ns, (void)words, (void)word_block;                                                                    \
        for (int64_t i = i0; i < i1; i++) {                                                                        \
            const float g = LOAD(G, g_, i);                                                                         \
            const float m = LOAD(M, m_, i);                                                                         \
            const float p = LOAD(P, p_, i);                                                                         \
            const float c = fmaf(g, omb1, m * b1);                                                                  \
            /* sign(c) + 0 * c: +-1 with c's sign, +0 for +-0, NaN for NaN or Inf (c != 0 holds for NaN) */         \
            const float one = f32_from_bits((bits_from_f32(c) & 0x80000000u) | 0x3f800000u);                        \
            const float u = (c != 0.0f ? one : 0.0f) + c * 0.0f;                                                    \
            const float p_new = fmaf(u, neg_lr, has_decay ? p * decay : p);                                         \
            const float m_new = fmaf(g, omb2, m * b2);                                                              \
            if (SR) { /* lion_dist.spec.sr_noise: 16 bits of Philox word (e % 8) / 2 of counter e / 8 */              \
                const int64_t e = ns->base + i;                                                                     \
                if ((e >> 3) != word_block) {                                                                       \
                    word_block = e >> 3;                                                                            \
                    words[0] = (uint32_t)word_block, words[1] = (uint32_t)(word_block >> 32);                       \
                    words[2] = ns->param_id, words[3] = ns->shard;                                                  \
                    philox4x32_10(words, ns->k0, ns->k1);                                                           \
                }                                                                                                   \
                const uint32_t noise = (words[(e & 7) >> 1] >> ((e & 1) * 16)) & 0xffffu;                           \
                ((uint16_t *)p_)[i] = to_bf16_stochastic(p_new, noise);                                             \
            } else {                                                                                                \
                STORE(P, p_, i, p_new);                                                                             \
            }                                                                                                       \
            STORE(M, m_, i, m_new);                                                                                 \
        }                                                                                                           \
    }

/* fp64 params, grads and momenta: the same update in double. */
static void seg_f64(void *p_, const void *g_, void *m_, int64_t i0, int64_t i1, const lion_hp *hp,
                    const noise_stream *ns) {
    double *restrict p64 = (double *)p_;
    const double *restrict g64 = (const double *)g_;
    double *restrict m64 = (double *)m_;
    const int has_decay = hp->decay != 1.0;
    (void)ns;
    for (int64_t i = i0; i < i1; i++) {
        const double g = g64[i], m = m64[i], p = p64[i];
        const double c = fma(g, hp->one_minus_beta1, m * hp->beta1);
        const double u = (c != 0.0 ? copysign(1.0, c) : 0.0) + c * 0.0;
        p64[i] = fma(u, hp->neg_lr, has_decay ? p * hp->decay : p);
        m64[i] = fma(g, hp->one_minus_beta2, m * hp->beta2);
    }
}

#define SEGS_M(P, G) LION_SEGMENT(P, G, 0, 0) LION_SEGMENT(P, G, 1, 0) LION_SEGMENT(P, G, 2, 0)
#define SEGS_G(P) SEGS_M(P, 0) SEGS_M(P, 1) SEGS_M(P, 2)
SEGS_G(0)
SEGS_G(1)
SEGS_G(2)
#undef SEGS_M /* and the stochastic-rounding variants of bf16 params: */
#define SEGS_M(P, G) LION_SEGMENT(P, G, 0, 1) LION_SEGMENT(P, G, 1, 1) LION_SEGMENT(P, G, 2, 1)
SEGS_G(1)

typedef void (*segment_fn)(void *, const void *, void *, int64_t, int64_t, const lion_hp *, const noise_stream *);

#define ENTRY(P, G, M, SR) [(P) | (G) << 2 | (M) << 4] = seg_##P##_##G##_##M##_##SR
#define ENTRIES_M(P, G, SR) ENTRY(P, G, 0, SR), ENTRY(P, G, 1, SR), ENTRY(P, G, 2, SR)
#define ENTRIES_G(P, SR) ENTRIES_M(P, 0, SR), ENTRIES_M(P, 1, SR), ENTRIES_M(P, 2, SR)
static const segment_fn SEGMENTS[64] = {ENTRIES_G(0, 0), ENTRIES_G(1, 0), ENTRIES_G(2, 0), [ALL_F64] = seg_f64};
static const segment_fn SEGMENTS_SR[64] = {ENTRIES_G(0, 0), ENTRIES_G(1, 1), ENTRIES_G(2, 0), [ALL_F64] = seg_f64};

/* ------------------------------------------------------------------ int8 momentum */

#define NOISE_UNIT (1.0f / 65536.0f) /* noise / 65536: exact */

/* The spec's 16-bit noise (lion_dist.spec.sr_noise) of elements e0 .. e0 + len - 1 of stream `s`, one Philox call
 * per counter e / 8 and one loop lane per counter (so the compiler vectorizes it): out[off + j] is element
 * e0 + j's noise, where off = e0 % 8 is returned. Element e takes 16 bits of word (e % 8) / 2 of its counter's
 * four outputs, the low half for even e: that is out[8 * (e / 8 - e0 / 8) + e % 8]. out holds len + 16 values. */
static inline int64_t fill_noise(uint32_t *restrict out, const noise_stream *s, int64_t e0, int64_t len) {
    const int64_t g0 = e0 >> 3, n_groups = ((e0 + len - 1) >> 3) - g0 + 1;
    const uint32_t param_id = s->param_id, shard = s->shard, k0 = s->k0, k1 = s->k1;
    for (int64_t q = 0; q < n_groups; q++) {
        const uint64_t counter = (uint64_t)(g0 + q);
        uint32_t c0 = (uint32_t)counter, c1 = (uint32_t)(counter >> 32), c2 = param_id, c3 = shard;
        uint32_t a0 = k0, a1 = k1;
#pragma GCC unroll 10
        for (int round = 0; round < 10; round++) { /* philox4x32_10, with the words in registers */
            const uint64_t a = (uint64_t)0xD2511F53u * c0;
            const uint64_t b = (uint64_t)0xCD9E8D57u * c2;
            const uint32_t n0 = (uint32_t)(b >> 32) ^ c1 ^ a0;
            const uint32_t n2 = (uint32_t)(a >> 32) ^ c3 ^ a1;
            c0 = n0, c1 = (uint32_t)b, c2 = n2, c3 = (uint32_t)a;
            a0 += 0x9E3779B9u, a1 += 0xBB67AE85u;
        }
        uint32_t *o = out + 8 * q;
        o[0] = c0 & 0xffffu, o[1] = c0 >> 16, o[2] = c1 & 0xffffu, o[3] = c1 >> 16;
        o[4] = c2 & 0xffffu, o[5] = c2 >> 16, o[6] = c3 & 0xffffu, o[7] = c3 >> 16;
    }
    return e0 & 7;
}

/* One tensor with int8 momentum, as its loop sees it. */
typedef struct {
    void *p;
    const void *g;
    int8_t *q;
    float *s;
    int64_t row, block;   /* elements per row (the last dim), per scale */
    noise_stream ns, qs;  /* the param's stochastic rounding, the codes' stochastic requantization */
} q8_tensor;

/* One loop per (param, grad) dtype; SR: stochastic rounding of a bf16 param; QSR: stochastic requantization.
 * Elements [i0, i1) of the tensor, whole blocks: per block, the Lion step of the float kernel with
 * m = code * scale (one rounding), the new momentum kept in mbuf, its absmax taken on the magnitude bits (as
 * unsigned integers these order like the floats, and every NaN above Inf, so a NaN anywhere makes the absmax NaN,
 * which C's fmaxf would drop), then the codes and the scale written. */
#define LION_INT8_SEGMENT(P, G, SR, QSR)                                                                           \
    static void q8_##P##_##G##_##SR##_##QSR(const q8_tensor *a, int64_t i0, int64_t i1, const lion_hp *hp) {        \
        const float b1 = (float)hp->beta1, omb1 = (float)hp->one_minus_beta1;                                      \
        const float b2 = (float)hp->beta2, omb2 = (float)hp->one_minus_beta2;                                      \
        const float neg_lr = (float)hp->neg_lr, decay = (float)hp->decay;                                          \
        const int has_decay = decay != 1.0f;                                                                        \
        void *restrict p_ = a->p;                                                                                   \
        const void *restrict g_ = a->g;                                                                             \
        int8_t *restrict q_ = a->q;                                                                                 \
        float *restrict s_ = a->s;                                                                                  \
        float mbuf[MAX_INT8_BLOCK];                                                                                 \
        uint32_t noise[MAX_INT8_BLOCK + 16];                                                                        \
        const int64_t row = a->row, block = a->block, per_row = (row + block - 1) / block;                         \
        int64_t r = i0 / row, col = i0 - r * row;                                                                   \
        for (int64_t i = i0; i < i1;) {                                                                             \
            const int64_t len = row - col < block ? row - col : block;                                              \
            const int64_t si = r * per_row + col / block;                                                           \
            const float scale_in = s_[si];                                                                          \
            int64_t off = 0;                                                                                        \
            if (SR) off = fill_noise(noise, &a->ns, a->ns.base + i, len);                                           \
            uint32_t absmax = 0;                                                                                    \
            for (int64_t j = 0; j < len; j++) {                                                                     \
                const float g = LOAD(G, g_, i + j);                                                                 \
                const float m = (float)q_[i + j] * scale_in;                                                        \
                const float p = LOAD(P, p_, i + j);                                                                 \
                const float c = fmaf(g, omb1, m * b1);                                                              \
                const float one = f32_from_bits((bits_from_f32(c) & 0x80000000u) | 0x3f800000u);                    \
                const float u = (c != 0.0f ? one : 0.0f) + c * 0.0f;                                                \
                const float p_new = fmaf(u, neg_lr, has_decay ? p * decay : p);                                     \
                const float m_new = fmaf(g, omb2, m * b2);                                                          \
                if (SR) {                                                                                           \
                    ((uint16_t *)p_)[i + j] = to_bf16_stochastic(p_new, noise[off + j]);                            \
                } else {                                                                                            \
                    STORE(P, p_, i + j, p_new);                                                                     \
                }                                                                                                   \
                mbuf[j] = m_new;                                                                                    \
                const uint32_t magnitude = bits_from_f32(m_new) & 0x7fffffffu;                                      \
                absmax = magnitude > absmax ? magnitude : absmax;                                                   \
            }                                                                                                       \
            const float scale = f32_from_bits(absmax) / 127.0f; /* NaN stays NaN */                                 \
            if (QSR) off = fill_noise(noise, &a->qs, a->qs.base + i, len);                                          \
            for (int64_t j = 0; j < len; j++) {                                                                     \
                const float x = mbuf[j] / scale;                                                                    \
                const float y = QSR ? floorf(x + (float)(int32_t)noise[off + j] * NOISE_UNIT) : rintf(x);          \
                const float clamped = y > 127.0f ? 127.0f : (y < -127.0f ? -127.0f : y);                            \
                q_[i + j] = (int8_t)(fabsf(y) <= FLT_MAX ? clamped : 0.0f); /* NaN or Inf: code 0 */               \
            }                                                                                                       \
            s_[si] = scale;                                                                                         \
            i += len, col += len;                                                                                   \
            if (col == row) col = 0, r++;                                                                           \
        }                                                                                                           \
    }

#define Q8_SEGS_G(P, SR, QSR) LION_INT8_SEGMENT(P, 0, SR, QSR) LION_INT8_SEGMENT(P, 1, SR, QSR) LION_INT8_SEGMENT(P, 2, SR, QSR)
#define Q8_SEGS_Q(P, SR) Q8_SEGS_G(P, SR, 0) Q8_SEGS_G(P, SR, 1)
Q8_SEGS_Q(0, 0)
Q8_SEGS_Q(1, 0)
Q8_SEGS_Q(2, 0)
Q8_SEGS_Q(1, 1)

typedef void (*q8_fn)(const q8_tensor *, int64_t, int64_t, const lion_hp *);

/* [stochastic rounding of bf16 params][stochastic requantization][param | grad << 2] */
#define Q8_ENTRY(P, G, SR, QSR) [(P) | (G) << 2] = q8_##P##_##G##_##SR##_##QSR
#define Q8_ENTRIES_G(P, SR, QSR) Q8_ENTRY(P, 0, SR, QSR), Q8_ENTRY(P, 1, SR, QSR), Q8_ENTRY(P, 2, SR, QSR)
#define Q8_ENTRIES(SR, QSR) {Q8_ENTRIES_G(0, 0, QSR), Q8_ENTRIES_G(1, SR, QSR), Q8_ENTRIES_G(2, 0, QSR)}
static const q8_fn Q8_SEGMENTS[2][2][16] = {
    {Q8_ENTRIES(0, 0), Q8_ENTRIES(0, 1)},
    {Q8_ENTRIES(1, 0), Q8_ENTRIES(1, 1)},
};

/* ------------------------------------------------------------------ splitting the work over threads */

typedef struct task task;
typedef void (*range_fn)(const task *t, int64_t tensor, int64_t i0, int64_t i1);

struct task {
    int64_t n_tensors;
    const int64_t *p_ptrs, *g_ptrs, *m_ptrs; /* param, grad, momentum (int8: codes) of each tensor */
    const int64_t *offsets;                  /* n_tensors + 1 prefix sums of the element counts */
    const uint8_t *codes;
    range_fn fn;
    const lion_hp *hp;
    const int64_t *streams; /* per tensor: param id, base, shard (int8: and the momentum's shard); NULL: nearest */
    uint32_t k0, k1;
    uint8_t *flags;
    /* int8 momentum only: */
    const int64_t *s_ptrs; /* the scales of each tensor */
    const int64_t *blocks; /* per tensor: elements per row (its last dim), elements per scale; NULL: float momentum */
    int param_sr, quant_sr; /* stochastic rounding of bf16 params (key k0, k1), of the codes (key qk0, qk1) */
    uint32_t qk0, qk1;
};

/* The tensor holding element `e` of the concatenation (offsets[k] <= e < offsets[k + 1]). */
static int64_t tensor_of(const task *t, int64_t e) {
    int64_t lo = 0, hi = t->n_tensors - 1;
    while (lo < hi) {
        int64_t mid = (lo + hi + 1) / 2;
        if (t->offsets[mid] <= e) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    return lo;
}

/* Apply t->fn to elements [start, end) of the concatenation, one call per tensor it overlaps. */
static void run_range(const task *t, int64_t start, int64_t end) {
    if (start >= end) return;
    for (int64_t k = tensor_of(t, start); k < t->n_tensors && t->offsets[k] < end; k++) {
        int64_t i0 = start > t->offsets[k] ? start - t->offsets[k] : 0;
        int64_t i1 = (end < t->offsets[k + 1] ? end : t->offsets[k + 1]) - t->offsets[k];
        if (i0 < i1) t->fn(t, k, i0, i1);
    }
}

/* Split point near element `e`, moved down to a multiple of ALIGN_ELEMS inside its tensor (int8 momentum: to the
 * start of its quantization block, so that a thread owns whole blocks). */
static int64_t aligned_split(const task *t, int64_t e) {
    int64_t total = t->offsets[t->n_tensors];
    if (e >= total) return total;
    int64_t k = tensor_of(t, e);
    int64_t i = e - t->offsets[k];
    if (t->blocks != NULL) {
        const int64_t row = t->blocks[2 * k], block = t->blocks[2 * k + 1], col = i % row;
        return t->offsets[k] + (i - col) + (col / block) * block;
    }
    return t->offsets[k] + (i / ALIGN_ELEMS) * ALIGN_ELEMS;
}

/* Work shared by the threads of one call: CHUNKS_PER_THREAD chunks per thread, taken from a counter, so a
 * thread that the OS delays (a busy machine) leaves its share to the others instead of holding up the call. */
typedef struct {
    const task *t;
    int64_t chunk, n_chunks, next;
} work;

static void *run_chunks(void *arg) {
    work *w = (work *)arg;
    int64_t total = w->t->offsets[w->t->n_tensors];
    for (;;) {
        int64_t i = __atomic_fetch_add(&w->next, 1, __ATOMIC_RELAXED);
        if (i >= w->n_chunks) return NULL;
        int64_t start = aligned_split(w->t, i * w->chunk);
        int64_t end = i == w->n_chunks - 1 ? total : aligned_split(w->t, (i + 1) * w->chunk);
        run_range(w->t, start, end);
    }
}

static void run_parallel(const task *t, int nthreads) {
    int64_t total = t->offsets[t->n_tensors];
    int64_t most = total / MIN_PER_THREAD;
    if (nthreads > most) nthreads = (int)(most > 0 ? most : 1);
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads < 1) nthreads = 1;
    if (nthreads == 1) {
        run_range(t, 0, total);
        return;
    }
    int64_t n_chunks = (int64_t)nthreads * CHUNKS_PER_THREAD;
    work w = {t, (total + n_chunks - 1) / n_chunks, n_chunks, 0};
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
    run_chunks(&w);
#else
    pthread_t threads[MAX_THREADS];
    int started[MAX_THREADS];
    for (int i = 1; i < nthreads; i++) started[i] = pthread_create(&threads[i], NULL, run_chunks, &w) == 0;
    run_chunks(&w); /* returns when every chunk is taken; a thread that failed to start takes none */
    for (int i = 1; i < nthreads; i++) {
        if (started[i]) pthread_join(threads[i], NULL);
    }
#endif
}

/* ------------------------------------------------------------------ entry points */

static void lion_range(const task *t, int64_t k, int64_t i0, int64_t i1) {
    uint8_t code = t->codes[k];
    noise_stream ns = {t->k0, t->k1, 0, 0, 0};
    if (t->streams != NULL) {
        ns.param_id = (uint32_t)t->streams[3 * k];
        ns.base = t->streams[3 * k + 1];
        ns.shard = (uint32_t)t->streams[3 * k + 2];
    }
    const segment_fn fn = (t->streams != NULL ? SEGMENTS_SR : SEGMENTS)[code & 63];
    fn((void *)t->p_ptrs[k], (const void *)t->g_ptrs[k], (void *)t->m_ptrs[k], i0, i1, t->hp, &ns);
}

int lion_abi_version(void) { return LION_ABI; }

/* Whether dtype code `code` has a loop here (the caller checks every tensor before calling lion_step). */
int lion_supports(int code) { return code >= 0 && code < 64 && SEGMENTS[code] != NULL; }

/* One Lion step over n_tensors tensors. offsets: n_tensors + 1 prefix sums of their element counts. hp: beta1,
 * 1 - beta1, beta2, 1 - beta2, -lr, 1 - lr * wd (1 when wd == 0), in double (the fp32 loops round each once);
 * maximize passes -(1 - beta1) and -(1 - beta2), which is exactly the reference's negated gradient.
 * streams != NULL: stochastic rounding of bf16 params with key (k0, k1) and, per tensor, (param id, base,
 * shard); the noise is a function of those and the element index only, so any thread count gives the same
 * result. */
void lion_step(int64_t n_tensors, const int64_t *p_ptrs, const int64_t *g_ptrs, const int64_t *m_ptrs,
               const int64_t *offsets, const uint8_t *codes, const double *hp_values, const int64_t *streams,
               uint32_t k0, uint32_t k1, int nthreads) {
    lion_hp hp = {hp_values[0], hp_values[1], hp_values[2], hp_values[3], hp_values[4], hp_values[5]};
    task t = {.n_tensors = n_tensors, .p_ptrs = p_ptrs, .g_ptrs = g_ptrs, .m_ptrs = m_ptrs, .offsets = offsets,
              .codes = codes, .fn = lion_range, .hp = &hp, .streams = streams, .k0 = k0, .k1 = k1};
    if (n_tensors > 0) run_parallel(&t, nthreads);
}

static void int8_range(const task *t, int64_t k, int64_t i0, int64_t i1) {
    const int64_t *stream = t->streams + 4 * k;
    const q8_tensor a = {
        .p = (void *)t->p_ptrs[k],
        .g = (const void *)t->g_ptrs[k],
        .q = (int8_t *)t->m_ptrs[k],
        .s = (float *)t->s_ptrs[k],
        .row = t->blocks[2 * k],
        .block = t->blocks[2 * k + 1],
        .ns = {t->k0, t->k1, (uint32_t)stream[0], (uint32_t)stream[2], stream[1]},
        .qs = {t->qk0, t->qk1, (uint32_t)stream[0], (uint32_t)stream[3], stream[1]},
    };
    Q8_SEGMENTS[t->param_sr != 0][t->quant_sr != 0][t->codes[k] & 15](&a, i0, i1, t->hp);
}

/* lion_dist.spec.sr_noise of elements base .. base + n - 1 of one stream, into out (n int32 in [0, 65536)): for the
 * foreach backend's requantization on CPU, where the spec's torch Philox costs about a microsecond per element. */
void lion_sr_noise(int64_t n, int32_t *out, uint32_t k0, uint32_t k1, uint32_t param_id, int64_t base,
                   uint32_t shard) {
    const noise_stream s = {k0, k1, param_id, shard, base};
    uint32_t chunk[MAX_INT8_BLOCK + 16];
    for (int64_t i = 0; i < n; i += MAX_INT8_BLOCK) {
        const int64_t len = n - i < MAX_INT8_BLOCK ? n - i : MAX_INT8_BLOCK;
        const int64_t off = fill_noise(chunk, &s, base + i, len);
        for (int64_t j = 0; j < len; j++) out[i + j] = (int32_t)chunk[off + j];
    }
}

/* The largest block lion_step_int8 takes, and whether dtype code `code` (param | grad << 2) has a loop. */
int lion_int8_max_block(void) { return MAX_INT8_BLOCK; }
int lion_int8_supports(int code) { return code >= 0 && code < 16 && Q8_SEGMENTS[0][0][code] != NULL; }

/* One Lion step over n_tensors tensors with int8 momentum: q_ptrs and s_ptrs their codes (int8, numel elements)
 * and scales (fp32, one per block of each row, rows * ceil(row / block)); blocks: per tensor, the row length
 * (the last dim; 1-D tensors are one row) and the block, 1 <= block <= MAX_INT8_BLOCK; codes: param | grad << 2;
 * hp as lion_step; streams: per tensor, param id, base, shard and the momentum's shard (the param's with
 * spec.MOMENTUM_STREAM); param_sr: stochastic rounding of bf16 params with key (k0, k1); quant_sr: stochastic
 * requantization with key (qk0, qk1), else to nearest. Any thread count gives the same result. */
void lion_step_int8(int64_t n_tensors, const int64_t *p_ptrs, const int64_t *g_ptrs, const int64_t *q_ptrs,
                    const int64_t *s_ptrs, const int64_t *offsets, const uint8_t *codes, const int64_t *blocks,
                    const double *hp_values, const int64_t *streams, int param_sr, uint32_t k0, uint32_t k1,
                    int quant_sr, uint32_t qk0, uint32_t qk1, int nthreads) {
    lion_hp hp = {hp_values[0], hp_values[1], hp_values[2], hp_values[3], hp_values[4], hp_values[5]};
    task t = {.n_tensors = n_tensors, .p_ptrs = p_ptrs, .g_ptrs = g_ptrs, .m_ptrs = q_ptrs, .offsets = offsets,
              .codes = codes, .fn = int8_range, .hp = &hp, .streams = streams, .k0 = k0, .k1 = k1,
              .s_ptrs = s_ptrs, .blocks = blocks, .param_sr = param_sr, .quant_sr = quant_sr, .qk0 = qk0,
              .qk1 = qk1};
    if (n_tensors > 0) run_parallel(&t, nthreads);
}

/* Does each tensor hold a NaN or an Inf? flags[k] is set to 1 if so (the caller zeroes it); codes: 0 fp32,
 * 1 bf16. */
static void nonfinite_range(const task *t, int64_t k, int64_t i0, int64_t i1) {
    uint32_t bad = 0;
    if (t->codes[k] & 1) {
        const uint16_t *x = (const uint16_t *)t->p_ptrs[k];
        for (int64_t i = i0; i < i1; i++) bad |= (x[i] & 0x7f80u) == 0x7f80u;
    } else {
        const uint32_t *x = (const uint32_t *)t->p_ptrs[k];
        for (int64_t i = i0; i < i1; i++) bad |= (x[i] & 0x7f800000u) == 0x7f800000u;
    }
    if (bad) __atomic_store_n(&t->flags[k], 1, __ATOMIC_RELAXED);
}

void lion_nonfinite(int64_t n_tensors, const int64_t *ptrs, const int64_t *numels, const uint8_t *codes,
                    uint8_t *flags, int nthreads, int64_t *offsets_scratch) {
    offsets_scratch[0] = 0;
    for (int64_t k = 0; k < n_tensors; k++) offsets_scratch[k + 1] = offsets_scratch[k] + numels[k];
    task t = {.n_tensors = n_tensors, .p_ptrs = ptrs, .offsets = offsets_scratch, .codes = codes,
              .fn = nonfinite_range, .flags = flags};
    if (n_tensors > 0) run_parallel(&t, nthreads);
}
