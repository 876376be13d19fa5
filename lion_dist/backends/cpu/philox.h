/* The spec's stochastic-rounding noise (lion_dist.spec.sr_noise), sixteen Philox counters at a time.
 *
 * Element e of a stream takes 16 bits of Philox-4x32-10(counter = (e / 8 low and high 32 bits, param id, shard),
 * key): word (e % 8) / 2 of the four outputs, its low half for even e. The four output words of one counter,
 * stored one after the other as uint32 (little-endian), are therefore exactly the 16-bit noise of its eight
 * elements in order, which is how fill_noise lays them out: no shuffling per element.
 *
 * One counter at a time, Philox is a chain of dependent 32x32->64-bit multiplies that no compiler vectorizes
 * well (gcc 12 widens them to 64-bit multiplies and permutes). So the counters run side by side, one per
 * 64-bit lane, with the unsigned even-lane multiply (AVX-512F: 8 counters per register, AVX2: 4), which takes
 * the low 32 bits of each lane and gives the full 64-bit product: its high half is the next word's input and
 * the lane's low half the other. The high half is brought down by swapping the lane's halves (a shuffle, which
 * Intel cores run beside the multiplies; a shift would queue with them). A lane's upper 32 bits are never
 * cleared: the multiply ignores them, and the xor only spoils upper halves, which the store drops. Without AVX2 (a portable build) the same lanes run
 * as plain C. Which one the build took is compiled in (the library is built for this CPU and cached per CPU);
 * all three are tested against lion_dist.spec.sr_noise.
 */
#ifndef LION_PHILOX_H
#define LION_PHILOX_H

#include <stdint.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define PHILOX_A 0xD2511F53u /* the round multipliers and key increments of Triton's tl.philox and cuRAND */
#define PHILOX_B 0xCD9E8D57u
#define PHILOX_KA 0x9E3779B9u
#define PHILOX_KB 0xBB67AE85u
#define NOISE_COUNTERS 16                       /* counters per fill step */
#define NOISE_PAD (8 * NOISE_COUNTERS + 8)      /* a noise buffer holds len + NOISE_PAD values (see fill_noise) */

/* Where one tensor's stochastic-rounding noise comes from (lion_dist.spec.NoiseStream). */
typedef struct {
    uint32_t k0, k1, param_id, shard;
    int64_t base;
} noise_stream;

typedef uint32_t u32_alias __attribute__((may_alias)); /* the noise buffer is uint16; its words are written whole */

#if defined(__AVX512F__)
#define PHILOX_IMPL "avx512"
/* Ten rounds on 8 counters per register, two registers at once (independent chains keep the multiplier busy). */
static inline void philox16(u32_alias *out, uint64_t first, const noise_stream *s) {
    const __m512i a = _mm512_set1_epi64(PHILOX_A), b = _mm512_set1_epi64(PHILOX_B);
    const __m512i lanes = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    __m512i x0[2], x1[2], x2[2], x3[2];
    for (int h = 0; h < 2; h++) {
        const __m512i counter = _mm512_add_epi64(_mm512_set1_epi64((int64_t)(first + 8 * h)), lanes);
        x0[h] = counter, x1[h] = _mm512_srli_epi64(counter, 32);
        x2[h] = _mm512_set1_epi64(s->param_id), x3[h] = _mm512_set1_epi64(s->shard);
    }
    uint32_t k0 = s->k0, k1 = s->k1;
    for (int round = 0; round < 10; round++) {
        const __m512i key0 = _mm512_set1_epi64(k0), key1 = _mm512_set1_epi64(k1);
        for (int h = 0; h < 2; h++) {
            const __m512i p0 = _mm512_mul_epu32(x0[h], a), p2 = _mm512_mul_epu32(x2[h], b);
            /* 0x96: a ^ b ^ c */
            x0[h] = _mm512_ternarylogic_epi64(_mm512_shuffle_epi32(p2, _MM_PERM_CDAB), x1[h], key0, 0x96);
            x2[h] = _mm512_ternarylogic_epi64(_mm512_shuffle_epi32(p0, _MM_PERM_CDAB), x3[h], key1, 0x96);
            x1[h] = p2, x3[h] = p0;
        }
        k0 += PHILOX_KA, k1 += PHILOX_KB;
    }
    /* per counter (x0, x1, x2, x3) low halves, in counter order: lanes (x0 | x1 << 32), (x2 | x3 << 32) */
    const __m512i lo = _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0), hi = _mm512_set_epi64(15, 7, 14, 6, 13, 5, 12, 4);
    for (int h = 0; h < 2; h++) {
        const __m512i w01 = _mm512_mask_blend_epi32(0xAAAA, x0[h], _mm512_slli_epi64(x1[h], 32));
        const __m512i w23 = _mm512_mask_blend_epi32(0xAAAA, x2[h], _mm512_slli_epi64(x3[h], 32));
        _mm512_storeu_si512((void *)(out + 32 * h), _mm512_permutex2var_epi64(w01, lo, w23));
        _mm512_storeu_si512((void *)(out + 32 * h + 16), _mm512_permutex2var_epi64(w01, hi, w23));
    }
}
#elif defined(__AVX2__)
#define PHILOX_IMPL "avx2"
/* The same on 4 counters per register, four registers at once. */
static inline void philox16(u32_alias *out, uint64_t first, const noise_stream *s) {
    const __m256i a = _mm256_set1_epi64x(PHILOX_A), b = _mm256_set1_epi64x(PHILOX_B);
    const __m256i lanes = _mm256_set_epi64x(3, 2, 1, 0);
    __m256i x0[4], x1[4], x2[4], x3[4];
    for (int h = 0; h < 4; h++) {
        const __m256i counter = _mm256_add_epi64(_mm256_set1_epi64x((int64_t)(first + 4 * h)), lanes);
        x0[h] = counter, x1[h] = _mm256_srli_epi64(counter, 32);
        x2[h] = _mm256_set1_epi64x(s->param_id), x3[h] = _mm256_set1_epi64x(s->shard);
    }
    uint32_t k0 = s->k0, k1 = s->k1;
    for (int round = 0; round < 10; round++) {
        const __m256i key0 = _mm256_set1_epi64x(k0), key1 = _mm256_set1_epi64x(k1);
        for (int h = 0; h < 4; h++) {
            const __m256i p0 = _mm256_mul_epu32(x0[h], a), p2 = _mm256_mul_epu32(x2[h], b);
            x0[h] = _mm256_xor_si256(_mm256_xor_si256(_mm256_shuffle_epi32(p2, 0xB1), x1[h]), key0);
            x2[h] = _mm256_xor_si256(_mm256_xor_si256(_mm256_shuffle_epi32(p0, 0xB1), x3[h]), key1);
            x1[h] = p2, x3[h] = p0;
        }
        k0 += PHILOX_KA, k1 += PHILOX_KB;
    }
    for (int h = 0; h < 4; h++) {
        const __m256i w01 = _mm256_blend_epi32(x0[h], _mm256_slli_epi64(x1[h], 32), 0xAA);
        const __m256i w23 = _mm256_blend_epi32(x2[h], _mm256_slli_epi64(x3[h], 32), 0xAA);
        const __m256i even = _mm256_unpacklo_epi64(w01, w23), odd = _mm256_unpackhi_epi64(w01, w23);
        _mm256_storeu_si256((__m256i *)(out + 16 * h), _mm256_permute2x128_si256(even, odd, 0x20));
        _mm256_storeu_si256((__m256i *)(out + 16 * h + 8), _mm256_permute2x128_si256(even, odd, 0x31));
    }
}
#else
#define PHILOX_IMPL "portable"
static inline void philox16(u32_alias *out, uint64_t first, const noise_stream *s) {
    for (int l = 0; l < NOISE_COUNTERS; l++) {
        const uint64_t counter = first + (uint64_t)l;
        uint32_t c0 = (uint32_t)counter, c1 = (uint32_t)(counter >> 32), c2 = s->param_id, c3 = s->shard;
        uint32_t k0 = s->k0, k1 = s->k1;
        for (int round = 0; round < 10; round++) {
            const uint64_t p0 = (uint64_t)PHILOX_A * c0, p2 = (uint64_t)PHILOX_B * c2;
            c0 = (uint32_t)(p2 >> 32) ^ c1 ^ k0, c1 = (uint32_t)p2;
            c2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1, c3 = (uint32_t)p0;
            k0 += PHILOX_KA, k1 += PHILOX_KB;
        }
        out[4 * l] = c0, out[4 * l + 1] = c1, out[4 * l + 2] = c2, out[4 * l + 3] = c3;
    }
}
#endif

/* The 16-bit noise of elements e0 .. e0 + len - 1 of stream s (len >= 1): element e0 + j's is out[off + j], where
 * off = e0 % 8 is returned. out holds len + NOISE_PAD values (whole steps of 16 counters are written). */
static inline int64_t fill_noise(uint16_t *restrict out, const noise_stream *s, int64_t e0, int64_t len) {
    const uint64_t first = (uint64_t)(e0 >> 3);
    const int64_t n_counters = ((e0 + len - 1) >> 3) - (e0 >> 3) + 1;
    for (int64_t q = 0; q < n_counters; q += NOISE_COUNTERS) philox16((u32_alias *)out + 4 * q, first + q, s);
    return e0 & 7;
}

#endif
