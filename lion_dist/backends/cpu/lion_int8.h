/* The int8-momentum loops of the CPU kernel (lion_dist.spec.lion_reference_int8), included by lion.c.
 *
 * The momentum is int8 codes with one fp32 scale per block of `block` elements along the last dim (never across
 * a row; a row's last block may be short). A thread owns whole blocks (lion.c splits the work at block starts).
 * Per block: the float loop's step with m = code * scale (one rounding), the new momentum kept in a stack
 * buffer, its absmax taken on the magnitude bits (as unsigned integers these order like the floats, and every NaN
 * above Inf, so a NaN anywhere makes the absmax NaN, which C's fmaxf would drop), then the block requantized:
 * scale = absmax / 127 (NaN stays NaN), code = clamp(rint(m / scale)) or, stochastically,
 * clamp(floor(m / scale + noise / 65536)) with the spec's noise in the momentum's own stream, and 0 where that
 * is not finite, which happens for whole blocks only (a scale of 0, NaN or Inf). One pass: p, g and the codes are read once and written once.
 *
 * The noise (the param's stochastic rounding and the codes' requantization) is drawn for a window of at least
 * NOISE_TILE elements at a time, across blocks and rows: it is a function of the flat element index only, so a
 * window of many small blocks costs one vectorized fill instead of one per block.
 */
#ifndef LION_INT8_H
#define LION_INT8_H

#include <float.h>

#define MAX_INT8_BLOCK 4096         /* elements per scale of an int8 momentum: the stack buffers of a block */
#define NOISE_UNIT (1.0f / 65536.0f) /* noise / 65536: exact */

/* floorf(x), exactly (NaN and +-Inf included), from rintf (to nearest even): gcc vectorizes rintf but, unless
 * -fno-trapping-math, not floorf, and the requantization loop is where the int8 step spends its time. */
static inline float floor_exact(float x) {
    const float r = rintf(x);
    return r - (r > x ? 1.0f : 0.0f);
}

/* clamp(k, -127, 127), written so that gcc vectorizes it as a min and a max (a chain of ?: becomes byte blends). */
static inline int32_t min_i32(int32_t a, int32_t b) { return a < b ? a : b; }
static inline int32_t max_i32(int32_t a, int32_t b) { return a > b ? a : b; }
static inline int32_t clamp127(int32_t k) { return max_i32(min_i32(k, 127), -127); }
static inline uint32_t max_u32(uint32_t a, uint32_t b) { return a > b ? a : b; }

/* Two int8 codes in one 16-bit word, element i in the low byte (the pairs of bf16 params and grads). */
typedef uint16_t u16_pair __attribute__((aligned(1), may_alias));
#define CODE_PAIR(ptr, i) (*(u16_pair *)((int8_t *)(ptr) + (i)))

/* One loop per (param, grad) dtype; W: how the param is written (NEAREST, STOCHASTIC for bf16, KAHAN for
 * bf16/fp16); QSR: stochastic requantization. Elements [i0, i1) of the tensor, whole blocks. */
#define LION_INT8_SEGMENT(P, G, W, QSR)                                                                            \
    static void q8_##P##_##G##_##W##_##QSR(const tensor_view *a, int64_t i0, int64_t i1, const lion_hp *hp) {     \
        LION_SCALARS(hp);                                                                                          \
        void *restrict p_ = a->p;                                                                                  \
        const void *restrict g_ = a->g;                                                                            \
        int8_t *restrict q_ = (int8_t *)a->m;                                                                      \
        float *restrict s_ = a->s;                                                                                 \
        void *restrict c_ = a->c;                                                                                  \
        float mbuf[MAX_INT8_BLOCK] __attribute__((aligned(64)));                                                   \
        uint16_t noise[(W) == STOCHASTIC ? MAX_INT8_BLOCK + NOISE_PAD : 1] __attribute__((aligned(64)));           \
        uint16_t qnoise[QSR ? MAX_INT8_BLOCK + NOISE_PAD : 1] __attribute__((aligned(64)));                       \
        int64_t w1 = i0, w0 = i0, off = 0, qoff = 0; /* the noise drawn: elements [w0, w1) */                     \
        (void)c_, (void)w0, (void)off, (void)qoff;                                                                 \
        const int64_t row = a->row, block = a->block, per_row = (row + block - 1) / block;                        \
        int64_t r = i0 / row, col = i0 - r * row;                                                                  \
        for (int64_t i = i0; i < i1;) {                                                                            \
            const int64_t len = row - col < block ? row - col : block;                                             \
            const int64_t si = r * per_row + col / block;                                                          \
            if (((W) == STOCHASTIC || QSR) && i + len > w1) {                                                      \
                w0 = i, w1 = i + (len > NOISE_TILE ? len : NOISE_TILE);                                            \
                if (w1 > i1) w1 = i1;                                                                              \
                if ((W) == STOCHASTIC) off = fill_noise(noise, &a->ns, a->ns.base + w0, w1 - w0);                  \
                if (QSR) qoff = fill_noise(qnoise, &a->qs, a->qs.base + w0, w1 - w0);                              \
            }                                                                                                      \
            const uint16_t *restrict nz = noise + off + (i - w0), *restrict qz = qnoise + qoff + (i - w0);        \
            (void)nz, (void)qz;                                                                                    \
            const float scale_in = s_[si];                                                                         \
            uint32_t absmax = 0;                                                                                   \
            /* bf16 params and grads, an even block: two elements per word, the new momenta of the even elements  \
             * in mbuf[0 .. len / 2), of the odd ones after them (see LION_BF16_PAIR) */                           \
            const int pairs = (P) == BF16 && (G) == BF16 && len % 2 == 0;                                          \
            float *restrict m_even = mbuf, *restrict m_odd = mbuf + MAX_INT8_BLOCK / 2;                            \
            if (pairs) {                                                                                           \
                for (int64_t k = 0; k < len / 2; k++) {                                                            \
                    const int64_t j = 2 * k;                                                                       \
                    const uint32_t pw = PAIR(p_, i + j), gw = PAIR_IN(g_, i + j), qw = CODE_PAIR(q_, i + j);       \
                    const uint32_t cw = (W) == KAHAN ? PAIR(c_, i + j) : 0;                                        \
                    const float p_lo = (W) == KAHAN ? BF16_LO(pw) + BF16_LO(cw) : BF16_LO(pw);                     \
                    const float p_hi = (W) == KAHAN ? BF16_HI(pw) + BF16_HI(cw) : BF16_HI(pw);                     \
                    float lo_p, hi_p;                                                                              \
                    {                                                                                              \
                        LION_UPDATE(p_lo, BF16_LO(gw), (float)(int8_t)(qw & 0xffu) * scale_in);                    \
                        lo_p = p_new, m_even[k] = m_new;                                                           \
                        absmax = max_u32(absmax, bits_from_f32(m_new) & 0x7fffffffu);                              \
                    }                                                                                              \
                    {                                                                                              \
                        LION_UPDATE(p_hi, BF16_HI(gw), (float)(int8_t)(qw >> 8) * scale_in);                       \
                        hi_p = p_new, m_odd[k] = m_new;                                                            \
                        absmax = max_u32(absmax, bits_from_f32(m_new) & 0x7fffffffu);                              \
                    }                                                                                              \
                    STORE_PARAM_PAIR(W, p_, c_, i + j, lo_p, hi_p, PAIR_IN(nz, j));                                \
                }                                                                                                  \
            } else {                                                                                               \
                for (int64_t j = 0; j < len; j++) {                                                                \
                    const float g = LOAD(G, g_, i + j);                                                            \
                    const float m = (float)q_[i + j] * scale_in;                                                   \
                    const float p = LOAD_PARAM(P, W, p_, c_, i + j);                                               \
                    LION_UPDATE(p, g, m);                                                                          \
                    STORE_PARAM(P, W, p_, c_, i + j, p_new, nz[j]);                                                \
                    mbuf[j] = m_new;                                                                               \
                    absmax = max_u32(absmax, bits_from_f32(m_new) & 0x7fffffffu);                                  \
                }                                                                                                  \
            }                                                                                                      \
            const float scale = f32_from_bits(absmax) / 127.0f;                                                    \
            if (scale > 0.0f && scale <= FLT_MAX && pairs) { /* then every |m| <= absmax: every x finite */     \
                for (int64_t k = 0; k < len / 2; k++) {                                                            \
                    const uint32_t nw = QSR ? PAIR_IN(qz, 2 * k) : 0;                                              \
                    const float x_lo = m_even[k] / scale, x_hi = m_odd[k] / scale;                                 \
                    const float y_lo = QSR ? floor_exact(x_lo + (float)(nw & 0xffffu) * NOISE_UNIT) : rintf(x_lo); \
                    const float y_hi = QSR ? floor_exact(x_hi + (float)(nw >> 16) * NOISE_UNIT) : rintf(x_hi);     \
                    CODE_PAIR(q_, i + 2 * k) = (uint16_t)((uint32_t)clamp127((int32_t)y_lo) & 0xffu) |             \
                                               (uint16_t)(((uint32_t)clamp127((int32_t)y_hi) & 0xffu) << 8);       \
                }                                                                                                  \
            } else if (scale > 0.0f && scale <= FLT_MAX) {                                                         \
                for (int64_t j = 0; j < len; j++) {                                                                \
                    const float x = mbuf[j] / scale;                                                               \
                    const float y = QSR ? floor_exact(x + (float)qz[j] * NOISE_UNIT) : rintf(x);                   \
                    q_[i + j] = (int8_t)clamp127((int32_t)y); /* exact: y is an integer, |y| <= 128 */            \
                }                                                                                                  \
            } else { /* an all-zero block (0 / 0), a NaN or an Inf in it: every x is NaN or +-0, every code 0 */   \
                memset(q_ + i, 0, (size_t)len);                                                                    \
            }                                                                                                      \
            s_[si] = scale;                                                                                        \
            i += len, col += len;                                                                                  \
            if (col == row) col = 0, r++;                                                                          \
        }                                                                                                          \
    }

#define Q8_SEGS_G(P, W, QSR) LION_INT8_SEGMENT(P, 0, W, QSR) LION_INT8_SEGMENT(P, 1, W, QSR) LION_INT8_SEGMENT(P, 2, W, QSR)
#define Q8_SEGS_Q(P, W) Q8_SEGS_G(P, W, 0) Q8_SEGS_G(P, W, 1)
Q8_SEGS_Q(0, 0) /* NEAREST: every param dtype */
Q8_SEGS_Q(1, 0)
Q8_SEGS_Q(2, 0)
Q8_SEGS_Q(1, 1) /* STOCHASTIC: bf16 params */
Q8_SEGS_Q(1, 2) /* KAHAN: bf16 and fp16 params */
Q8_SEGS_Q(2, 2)

typedef void (*q8_fn)(const tensor_view *, int64_t, int64_t, const lion_hp *);

/* [how the param is written][stochastic requantization][param | grad << 2] */
#define Q8_ENTRY(P, G, W, QSR) [(P) | (G) << 2] = q8_##P##_##G##_##W##_##QSR
#define Q8_ENTRIES_G(P, W, QSR) Q8_ENTRY(P, 0, W, QSR), Q8_ENTRY(P, 1, W, QSR), Q8_ENTRY(P, 2, W, QSR)
static const q8_fn Q8_SEGMENTS[3][2][16] = {
    {{Q8_ENTRIES_G(0, 0, 0), Q8_ENTRIES_G(1, 0, 0), Q8_ENTRIES_G(2, 0, 0)},
     {Q8_ENTRIES_G(0, 0, 1), Q8_ENTRIES_G(1, 0, 1), Q8_ENTRIES_G(2, 0, 1)}},
    {{Q8_ENTRIES_G(1, 1, 0)}, {Q8_ENTRIES_G(1, 1, 1)}},
    {{Q8_ENTRIES_G(1, 2, 0), Q8_ENTRIES_G(2, 2, 0)}, {Q8_ENTRIES_G(1, 2, 1), Q8_ENTRIES_G(2, 2, 1)}},
};

#endif
