/* What every loop of the CPU kernel shares: dtype codes, element loads and stores, rounding to bf16 (to nearest,
 * stochastically, with Kahan compensation) and the Lion math of one element, written once for all loops.
 *
 * Rounding follows lion_dist.spec exactly: `x * a + y * b` is fma(y, b, x * a) (torch's add with alpha),
 * everything else is one plain operation in the math type, and the compiler may neither contract nor reassociate
 * (-ffp-contract=off, no -ffast-math). Every helper is branch-free, so that the loops vectorize.
 */
#ifndef LION_COMMON_H
#define LION_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* dtype codes, two bits per operand: a float step's code is P | G << 2 | M << 4 */
enum { F32 = 0, BF16 = 1, F16 = 2, F64 = 3 };
#define ALL_F64 (F64 | F64 << 2 | F64 << 4)

/* How a param is written back (lion_dist.spec.write_back): rounded to nearest, stochastically (bf16 with a key),
 * or with a Kahan compensation buffer of the param's dtype (bf16, fp16), which takes precedence as in the spec. */
enum { NEAREST = 0, STOCHASTIC = 1, KAHAN = 2 };

typedef struct {
    double beta1, one_minus_beta1, beta2, one_minus_beta2, neg_lr, decay;
} lion_hp;

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
 * does not specify a NaN's sign or payload either). Integer operations: exact for subnormals too, which the
 * hardware conversion (AVX512-BF16) flushes to zero. */
static inline uint16_t to_bf16(float f) {
    const uint32_t b = bits_from_f32(f);
    const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    return (uint16_t)(f != f ? 0x7fc0u : rounded);
}

/* Stochastic rounding to bf16: add 16 random low bits, then truncate (unbiased). The spec rounds Inf and NaN to
 * nearest instead; truncation gives the same: an Inf's low bits are zero, so it stays Inf, and the values written
 * here are results of arithmetic, whose NaNs are quiet (bit 22 set), so no carry reaches the exponent and a NaN
 * stays a NaN (its payload may differ, as torch's may). Finite values that round up past the largest bf16 become
 * Inf, as in the spec. */
static inline uint16_t to_bf16_stochastic(float f, uint32_t noise) { return (uint16_t)((bits_from_f32(f) + noise) >> 16); }

/* Element loads and stores by dtype code T (a constant in every loop, so the branches fold away). F64 appears
 * only where fp64 params meet fp32 math (an fp32 direction applied to them, as the spec does: math in u's dtype). */
#define LOAD(T, ptr, i)                                                                                       \
    ((T) == F32    ? ((const float *)(ptr))[i]                                                                \
     : (T) == BF16 ? from_bf16(((const uint16_t *)(ptr))[i])                                                  \
     : (T) == F16  ? (float)((const _Float16 *)(ptr))[i]                                                      \
                   : (float)((const double *)(ptr))[i])
#define STORE(T, ptr, i, x)                                                                                   \
    do {                                                                                                      \
        if ((T) == F32) {                                                                                     \
            ((float *)(ptr))[i] = (x);                                                                        \
        } else if ((T) == BF16) {                                                                             \
            ((uint16_t *)(ptr))[i] = to_bf16(x);                                                              \
        } else if ((T) == F16) {                                                                              \
            ((_Float16 *)(ptr))[i] = (_Float16)(x);                                                           \
        } else {                                                                                              \
            ((double *)(ptr))[i] = (double)(x);                                                               \
        }                                                                                                     \
    } while (0)

/* The param in the math type: plus its compensation with KAHAN (spec.compensated: p + c, one rounding). */
#define LOAD_PARAM(P, W, p_, c_, i) ((W) == KAHAN ? LOAD(P, p_, i) + LOAD(P, c_, i) : LOAD(P, p_, i))

/* Write the math-type value x back into the param (spec.write_back). KAHAN: the param rounded to nearest, and
 * what that rounding dropped, x - rounded (exact in fp32), kept in c rounded to the param's dtype. */
#define STORE_PARAM(P, W, p_, c_, i, x, noise)                                                                \
    do {                                                                                                      \
        if ((W) == STOCHASTIC) {                                                                              \
            ((uint16_t *)(p_))[i] = to_bf16_stochastic((x), (noise));                                         \
        } else if ((W) == KAHAN && (P) == BF16) {                                                             \
            const uint16_t rounded_ = to_bf16(x);                                                             \
            ((uint16_t *)(p_))[i] = rounded_;                                                                 \
            ((uint16_t *)(c_))[i] = to_bf16((x) - from_bf16(rounded_));                                       \
        } else if ((W) == KAHAN) {                                                                            \
            const _Float16 rounded_ = (_Float16)(x);                                                          \
            ((_Float16 *)(p_))[i] = rounded_;                                                                 \
            ((_Float16 *)(c_))[i] = (_Float16)((x) - (float)rounded_);                                        \
        } else {                                                                                              \
            STORE(P, p_, i, x);                                                                               \
        }                                                                                                     \
    } while (0)

/* Two bf16 elements in one 32-bit word (little-endian: element i in the low half, i + 1 in the high half). Loops
 * whose operands are all 16-bit process them so: widening is a shift or a mask and narrowing a shift or a mask and
 * an or, where one element per lane costs the vectorized loop zero-extensions and cross-lane packs. Words start at
 * any element, so they are read and written unaligned. */
typedef uint32_t u32_pair __attribute__((aligned(2), may_alias));
#define PAIR(ptr, i) (*(u32_pair *)((uint16_t *)(ptr) + (i)))
#define PAIR_IN(ptr, i) (*(const u32_pair *)((const uint16_t *)(ptr) + (i)))
#define BF16_LO(w) f32_from_bits((w) << 16)
#define BF16_HI(w) f32_from_bits((w) & 0xffff0000u)

static inline uint32_t bf16_pair(float lo, float hi) { return (uint32_t)to_bf16(lo) | (uint32_t)to_bf16(hi) << 16; }

static inline uint32_t bf16_pair_stochastic(float lo, float hi, uint32_t noise) {
    return (uint32_t)to_bf16_stochastic(lo, noise & 0xffffu) | (uint32_t)to_bf16_stochastic(hi, noise >> 16) << 16;
}

/* sign(c) + 0 * c (spec.lion_reference): +-1 with c's sign, +0 for +-0, NaN for NaN or Inf (c != 0 holds for
 * NaN), so a non-finite value makes the param NaN instead of silently freezing it. */
static inline float lion_sign(float c) {
    const float one = f32_from_bits((bits_from_f32(c) & 0x80000000u) | 0x3f800000u);
    return (c != 0.0f ? one : 0.0f) + c * 0.0f;
}

/* The fp32 hyperparameters of a loop, each rounded once from the caller's doubles (as torch rounds a scalar). */
#define LION_SCALARS(hp)                                                                                      \
    const float b1 = (float)(hp)->beta1, omb1 = (float)(hp)->one_minus_beta1;                                 \
    const float b2 = (float)(hp)->beta2, omb2 = (float)(hp)->one_minus_beta2;                                 \
    const float neg_lr = (float)(hp)->neg_lr, decay = (float)(hp)->decay;                                     \
    const int has_decay = decay != 1.0f;                                                                      \
    (void)b1, (void)omb1, (void)b2, (void)omb2, (void)neg_lr, (void)has_decay

/* One element's step in fp32 from p, g, m: c = b1 m + (1 - b1) g, u = sign(c), p' = p (1 - lr wd) - lr u,
 * m' = b2 m + (1 - b2) g (maximize arrives as negated 1 - b: fma(-g, b, x) == fma(g, -b, x) exactly). */
#define LION_UPDATE(p, g, m)                                                                                  \
    const float u = lion_sign(fmaf((g), omb1, (m) * b1));                                                     \
    const float p_new = fmaf(u, neg_lr, has_decay ? (p) * decay : (p));                                       \
    const float m_new = fmaf((g), omb2, (m) * b2)

/* LION_UPDATE on the two bf16 elements of words i, i + 1 of the param, grad and momentum (and compensation), written
 * back as STORE_PARAM and STORE would write them; noise_word: their two 16-bit noises (STOCHASTIC). */
#define LION_BF16_PAIR(W, p_, g_, m_, c_, i, noise_word)                                                      \
    do {                                                                                                      \
        const uint32_t pw_ = PAIR(p_, i), gw_ = PAIR_IN(g_, i), mw_ = PAIR(m_, i);                            \
        const uint32_t cw_ = (W) == KAHAN ? PAIR(c_, i) : 0;                                                  \
        const float p_lo_ = (W) == KAHAN ? BF16_LO(pw_) + BF16_LO(cw_) : BF16_LO(pw_);                        \
        const float p_hi_ = (W) == KAHAN ? BF16_HI(pw_) + BF16_HI(cw_) : BF16_HI(pw_);                        \
        float lo_p_, lo_m_, hi_p_, hi_m_;                                                                     \
        {                                                                                                     \
            LION_UPDATE(p_lo_, BF16_LO(gw_), BF16_LO(mw_));                                                   \
            lo_p_ = p_new, lo_m_ = m_new;                                                                     \
        }                                                                                                     \
        {                                                                                                     \
            LION_UPDATE(p_hi_, BF16_HI(gw_), BF16_HI(mw_));                                                   \
            hi_p_ = p_new, hi_m_ = m_new;                                                                     \
        }                                                                                                     \
        PAIR(m_, i) = bf16_pair(lo_m_, hi_m_);                                                                \
        STORE_PARAM_PAIR(W, p_, c_, i, lo_p_, hi_p_, noise_word);                                             \
    } while (0)

/* The bf16 param (and compensation) of words i, i + 1 from the math-type lo and hi, as STORE_PARAM writes them. */
#define STORE_PARAM_PAIR(W, p_, c_, i, lo, hi, noise_word)                                                    \
    do {                                                                                                      \
        if ((W) == STOCHASTIC) {                                                                              \
            PAIR(p_, i) = bf16_pair_stochastic((lo), (hi), (noise_word));                                     \
        } else {                                                                                              \
            const uint32_t rounded_ = bf16_pair((lo), (hi));                                                  \
            PAIR(p_, i) = rounded_;                                                                           \
            if ((W) == KAHAN) PAIR(c_, i) = bf16_pair((lo) - BF16_LO(rounded_), (hi) - BF16_HI(rounded_));    \
        }                                                                                                     \
    } while (0)

#endif
