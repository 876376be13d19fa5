/* The fused CPU Lion step: one pass over each element's param, grad and momentum, for many tensors per call.
 *
 * Built on first use by lion_dist/cpu_kernel.py (cc -O3 -march=native -funroll-loops -ffp-contract=off,
 * cached per source, compiler, CPU and OpenMP runtime) and called through ctypes. The caller passes a table
 * of tensors: three pointers each (param, grad, momentum), the element count and a dtype code. The elements
 * of all tensors, concatenated, are cut into chunks that threads take from a shared counter, so one call does
 * all tensors whatever their number and sizes. Threads: torch's own OpenMP pool when built with -fopenmp and
 * linked to torch's OpenMP runtime (its idle threads spin for a while after each torch op, so threads of our
 * own would compete with them for the cores); otherwise pthreads started per call.
 *
 * Rounding follows lion_dist.functional.lion_reference exactly: every `x * a + y * b` of the reference is
 * fmaf(y, b, x * a) (torch's add with alpha), everything else is a plain fp32 operation, and the compiler may
 * not contract or reassociate (-ffp-contract=off, no -ffast-math). sign(c) is `sign(c) + 0 * c` as in the
 * reference: a NaN or Inf in c makes the param NaN instead of silently freezing it. bf16 is widened exactly
 * and written back rounded to nearest even, or stochastically for bf16 params when a seed is given.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define LION_ABI 4
#define ALIGN_ELEMS 64 /* chunks start at multiples of 64 elements of a tensor: no cache line in two chunks */
#define MIN_PER_THREAD 32768 /* fewer elements per thread: another thread costs more than it saves */
#define MAX_THREADS 256
#define CHUNKS_PER_THREAD 8 /* a delayed thread leaves its chunks to the others */

/* dtype code bits: param bf16 = 1, grad bf16 = 2, momentum bf16 = 4 (otherwise fp32) */
enum { P_BF16 = 1, G_BF16 = 2, M_BF16 = 4 };

typedef struct {
    float beta1, one_minus_beta1, beta2, one_minus_beta2, neg_lr, decay;
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
 * does not specify a NaN's sign or payload either). */
static inline uint16_t to_bf16(float f) {
    uint32_t b = bits_from_f32(f);
    uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    return (uint16_t)(f != f ? 0x7fc0u : rounded);
}

/* A 32-bit integer hash with low bias (lowbias32, C. Wellons): the counter-based RNG of stochastic rounding. */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

static inline uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* Stochastic rounding to bf16: add 16 random low bits, then truncate (unbiased); Inf and NaN round to nearest. */
static inline uint16_t to_bf16_stochastic(float f, uint32_t noise) {
    uint32_t b = bits_from_f32(f);
    uint16_t rounded = (uint16_t)((b + (noise & 0xffffu)) >> 16);
    return ((b & 0x7f800000u) == 0x7f800000u) ? to_bf16(f) : rounded;
}

/* One loop per dtype combination; P, G, M are 0 (fp32) or 1 (bf16), SR is stochastic rounding of bf16 params. */
#define LION_SEGMENT(NAME, P, G, M, SR)                                                                            \
    static void NAME(void *p_, const void *g_, void *m_, int64_t i0, int64_t i1, const lion_hp *hp, uint32_t k0, \
                     uint32_t k1) {                                                                                \
        float *restrict p32 = (float *)p_;                                                                        \
        uint16_t *restrict p16 = (uint16_t *)p_;                                                                  \
        const float *restrict g32 = (const float *)g_;                                                            \
        const uint16_t *restrict g16 = (const uint16_t *)g_;                                                      \
        float *restrict m32 = (float *)m_;                                                                        \
        uint16_t *restrict m16 = (uint16_t *)m_;                                                                  \
        const float b1 = hp->beta1, omb1 = hp->one_minus_beta1, b2 = hp->beta2, omb2 = hp->one_minus_beta2;      \
        const float neg_lr = hp->neg_lr, decay = hp->decay;                                                      \
        const int has_decay = decay != 1.0f;                                                                      \
        (void)p32, (void)p16, (void)g32, (void)g16, (void)m32, (void)m16, (void)k0, (void)k1;                     \
        for (int64_t i = i0; i < i1; i++) {                                                                       \
            const float g = G ? from_bf16(g16[i]) : g32[i];                                                       \
            const float m = M ? from_bf16(m16[i]) : m32[i];                                                       \
            const float p = P ? from_bf16(p16[i]) : p32[i];                                                       \
            const float c = fmaf(g, omb1, m * b1);                                                                \
            /* sign(c) + 0 * c: +-1 with c's sign, +0 for +-0, NaN for NaN or Inf (c != 0 holds for NaN) */       \
            const float one = f32_from_bits((bits_from_f32(c) & 0x80000000u) | 0x3f800000u);                      \
            const float u = (c != 0.0f ? one : 0.0f) + c * 0.0f;                                                  \
            const float p_new = fmaf(u, neg_lr, has_decay ? p * decay : p);                                       \
            const float m_new = fmaf(g, omb2, m * b2);                                                            \
            if (P && SR) {                                                                                        \
                p16[i] = to_bf16_stochastic(p_new, mix32(mix32((uint32_t)i ^ k0) ^ k1 ^ (uint32_t)(i >> 32)));  \
            } else if (P) {                                                                                       \
                p16[i] = to_bf16(p_new);                                                                          \
            } else {                                                                                              \
                p32[i] = p_new;                                                                                   \
            }                                                                                                     \
            if (M) {                                                                                              \
                m16[i] = to_bf16(m_new);                                                                          \
            } else {                                                                                              \
                m32[i] = m_new;                                                                                   \
            }                                                                                                     \
        }                                                                                                         \
    }

LION_SEGMENT(seg_fff, 0, 0, 0, 0)
LION_SEGMENT(seg_bff, 1, 0, 0, 0)
LION_SEGMENT(seg_fbf, 0, 1, 0, 0)
LION_SEGMENT(seg_bbf, 1, 1, 0, 0)
LION_SEGMENT(seg_ffb, 0, 0, 1, 0)
LION_SEGMENT(seg_bfb, 1, 0, 1, 0)
LION_SEGMENT(seg_fbb, 0, 1, 1, 0)
LION_SEGMENT(seg_bbb, 1, 1, 1, 0)
LION_SEGMENT(seg_bff_sr, 1, 0, 0, 1)
LION_SEGMENT(seg_bbf_sr, 1, 1, 0, 1)
LION_SEGMENT(seg_bfb_sr, 1, 0, 1, 1)
LION_SEGMENT(seg_bbb_sr, 1, 1, 1, 1)

typedef void (*segment_fn)(void *, const void *, void *, int64_t, int64_t, const lion_hp *, uint32_t, uint32_t);

static const segment_fn SEGMENTS[8] = {seg_fff, seg_bff, seg_fbf, seg_bbf, seg_ffb, seg_bfb, seg_fbb, seg_bbb};
static const segment_fn SEGMENTS_SR[8] = {seg_fff, seg_bff_sr, seg_fbf, seg_bbf_sr,
                                          seg_ffb, seg_bfb_sr, seg_fbb, seg_bbb_sr};

/* ------------------------------------------------------------------ splitting the work over threads */

typedef struct task task;
typedef void (*range_fn)(const task *t, int64_t tensor, int64_t i0, int64_t i1);

struct task {
    int64_t n_tensors;
    const int64_t *p_ptrs, *g_ptrs, *m_ptrs; /* param, grad, momentum of each tensor */
    const int64_t *numels;
    const int64_t *offsets; /* n_tensors + 1 prefix sums of numels */
    const uint8_t *codes;
    range_fn fn;
    const lion_hp *hp;
    uint64_t seed;
    int sr;
    uint8_t *flags;
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

/* Split point near element `e`, moved down to a multiple of ALIGN_ELEMS inside its tensor. */
static int64_t aligned_split(const task *t, int64_t e) {
    int64_t total = t->offsets[t->n_tensors];
    if (e >= total) return total;
    int64_t k = tensor_of(t, e);
    return t->offsets[k] + ((e - t->offsets[k]) / ALIGN_ELEMS) * ALIGN_ELEMS;
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

static void run_parallel(task *t, int64_t *offsets, int nthreads) {
    offsets[0] = 0;
    for (int64_t k = 0; k < t->n_tensors; k++) offsets[k + 1] = offsets[k] + t->numels[k];
    t->offsets = offsets;
    int64_t total = offsets[t->n_tensors];
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
    uint32_t k0 = 0, k1 = 0;
    if (t->sr && (code & P_BF16)) {
        uint64_t key = splitmix64(t->seed ^ splitmix64((uint64_t)k));
        k0 = (uint32_t)key;
        k1 = (uint32_t)(key >> 32);
    }
    const segment_fn fn = (t->sr ? SEGMENTS_SR : SEGMENTS)[code & 7];
    fn((void *)t->p_ptrs[k], (const void *)t->g_ptrs[k], (void *)t->m_ptrs[k], i0, i1, t->hp, k0, k1);
}

int lion_abi_version(void) { return LION_ABI; }

/* One Lion step over n_tensors tensors. hp: beta1, 1 - beta1, beta2, 1 - beta2, -lr, 1 - lr * wd (1 when
 * wd == 0), each already rounded to fp32; maximize passes -(1 - beta1) and -(1 - beta2), which is exactly
 * the reference's negated gradient. sr != 0: stochastic rounding of bf16
 * params from `seed`, a function of (seed, tensor index, element index) only, so any thread count gives the
 * same result. offsets_scratch holds n_tensors + 1 int64. */
void lion_step(int64_t n_tensors, const int64_t *p_ptrs, const int64_t *g_ptrs, const int64_t *m_ptrs,
               const int64_t *numels, const uint8_t *codes, const float *hp_values, int sr, uint64_t seed,
               int nthreads, int64_t *offsets_scratch) {
    lion_hp hp = {hp_values[0], hp_values[1], hp_values[2], hp_values[3], hp_values[4], hp_values[5]};
    task t = {n_tensors, p_ptrs, g_ptrs, m_ptrs, numels, NULL, codes, lion_range, &hp, seed, sr, NULL};
    if (n_tensors > 0) run_parallel(&t, offsets_scratch, nthreads);
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
    task t = {n_tensors, ptrs, NULL, NULL, numels, NULL, codes, nonfinite_range, NULL, 0, 0, flags};
    if (n_tensors > 0) run_parallel(&t, offsets_scratch, nthreads);
}
