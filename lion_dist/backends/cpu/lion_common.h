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

/* Stochastic rounding to bf16: add 16 random low bits, then truncate (unbiased); Inf and NaN round to nearest. */
static inline uint16_t to_bf16_stochastic(float f, uint32_t noise) {
    const uint32_t b = bits_from_f32(f);
    const uint16_t rounded = (uint16_t)((b + noise) >> 16);
    return ((b & 0x7f800000u) == 0x7f800000u) ? to_bf16(f) : rounded;
}

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

#endif
