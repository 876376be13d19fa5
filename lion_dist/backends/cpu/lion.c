/* The fused CPU Lion step: one pass over each element's param, grad and momentum, for many tensors per call.
 *
 * Built on first use by build.py (cc -O3 -march=native -funroll-loops -ffp-contract=off, cached per source,
 * compiler, CPU and OpenMP runtime) and called through ctypes (library.py, the only ABI). The caller passes a
 * table of tensors: pointers (param, grad, momentum, and a Kahan compensation buffer or 0), the element count, a
 * dtype code and where its stochastic-rounding noise comes from. The elements of all tensors, concatenated, are
 * cut into chunks that threads take from a shared counter, so one call does all tensors whatever their number
 * and sizes. Threads: torch's own OpenMP pool when built with -fopenmp and linked to torch's OpenMP runtime (its
 * idle threads spin for a while after each torch op, so threads of our own would compete with them for the
 * cores); otherwise pthreads started per call.
 *
 * Every loop equals lion_dist.spec bit for bit (lion_common.h: the math, rounding to nearest, stochastic
 * rounding with the spec's Philox noise from philox.h, Kahan compensation). Entry points: lion_step (float
 * momenta), lion_step_int8 (int8 momentum, lion_int8.h), Distributed Lion's split step lion_direction
 * (int8 signs, momentum advanced) and lion_apply (an agreed direction applied), lion_sr_noise (the noise alone,
 * for torch backends) and lion_nonfinite (the non-finite gradient check).
 */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "lion_common.h"
#include "philox.h"

#define LION_ABI 8
/* Tuning constants; -D overrides them for experiments (they change speed, never results). */
#ifndef ALIGN_ELEMS
#define ALIGN_ELEMS 64 /* chunks start at multiples of 64 elements of a tensor: no cache line in two chunks */
#endif
#ifndef MIN_PER_THREAD
#define MIN_PER_THREAD 32768 /* fewer elements per thread: another thread costs more than it saves */
#endif
#define MAX_THREADS 256
#ifndef CHUNKS_PER_THREAD
#define CHUNKS_PER_THREAD 8 /* a delayed thread leaves its chunks to the others */
#endif
#ifndef NOISE_TILE
#define NOISE_TILE 1024 /* elements whose noise is drawn at once: a 2 KiB buffer that stays in L1 */
#endif

/* One tensor of a call, as its loop sees it. */
typedef struct {
    void *p;        /* the param */
    const void *g;  /* the gradient */
    void *m;        /* the momentum: float, or int8 codes */
    void *c;        /* KAHAN: the compensation buffer (the param's dtype) */
    float *s;       /* int8 momentum: the scales */
    void *u;        /* the split step's direction: written by lion_direction, read by lion_apply */
    int64_t row, block; /* int8 momentum: elements per row (the last dim), per scale */
    noise_stream ns, qs; /* the param's stochastic rounding, the codes' stochastic requantization */
} tensor_view;

typedef void (*segment_fn)(const tensor_view *, int64_t, int64_t, const lion_hp *);

/* ------------------------------------------------------------------ float momenta */

/* Runs the statements that follow (variadic: they may hold commas) for each tile [t, t + len) of elements [i0, i1)
 * of tensor view `a`: with STOCHASTIC rounding a tile is NOISE_TILE elements whose noise is drawn first (sixteen
 * Philox counters at a time; element i's is noise[off + i]), then the tile's elements run as one vectorizable loop;
 * otherwise the whole range is one tile. */
#define FOR_EACH_NOISE_TILE(W, a, i0, i1, ...)                                                                    \
    uint16_t noise[(W) == STOCHASTIC ? NOISE_TILE + NOISE_PAD : 1] __attribute__((aligned(64)));                  \
    const int64_t tile = (W) == STOCHASTIC ? NOISE_TILE : (i1) - (i0);                                            \
    for (int64_t t = (i0); t < (i1); t += tile) {                                                                 \
        const int64_t len = (i1) - t < tile ? (i1) - t : tile;                                                    \
        const int64_t off = (W) == STOCHASTIC ? fill_noise(noise, &(a)->ns, (a)->ns.base + t, len) - t : 0;       \
        (void)off;                                                                                                \
        __VA_ARGS__                                                                                               \
    }

/* One loop per (param, grad, momentum) dtype and write mode W, over elements [i0, i1) of a tensor. */
#define LION_SEGMENT(P, G, M, W)                                                                                  \
    static void seg_##P##_##G##_##M##_##W(const tensor_view *a, int64_t i0, int64_t i1, const lion_hp *hp) {    \
        LION_SCALARS(hp);                                                                                         \
        void *restrict p_ = a->p;                                                                                 \
        const void *restrict g_ = a->g;                                                                           \
        void *restrict m_ = a->m;                                                                                 \
        void *restrict c_ = a->c;                                                                                 \
        (void)c_;                                                                                                 \
        FOR_EACH_NOISE_TILE(W, a, i0, i1, {                                                                       \
            int64_t i = t;                                                                                        \
            if ((P) == BF16 && (G) == BF16 && (M) == BF16) { /* bf16 params' default: two elements per word */    \
                for (; i + 1 < t + len; i += 2) LION_BF16_PAIR(W, p_, g_, m_, c_, i, PAIR(noise, off + i));       \
            }                                                                                                     \
            for (; i < t + len; i++) {                                                                            \
                const float g = LOAD(G, g_, i), m = LOAD(M, m_, i), p = LOAD_PARAM(P, W, p_, c_, i);              \
                LION_UPDATE(p, g, m);                                                                             \
                STORE_PARAM(P, W, p_, c_, i, p_new, noise[off + i]);                                              \
                STORE(M, m_, i, m_new);                                                                           \
            }                                                                                                     \
        })                                                                                                        \
    }

/* fp64 params, grads and momenta: the same update in double. */
static void seg_f64(const tensor_view *a, int64_t i0, int64_t i1, const lion_hp *hp) {
    double *restrict p64 = (double *)a->p;
    const double *restrict g64 = (const double *)a->g;
    double *restrict m64 = (double *)a->m;
    const int has_decay = hp->decay != 1.0;
    for (int64_t i = i0; i < i1; i++) {
        const double g = g64[i], m = m64[i], p = p64[i];
        const double c = fma(g, hp->one_minus_beta1, m * hp->beta1);
        const double u = (c != 0.0 ? copysign(1.0, c) : 0.0) + c * 0.0;
        p64[i] = fma(u, hp->neg_lr, has_decay ? p * hp->decay : p);
        m64[i] = fma(g, hp->one_minus_beta2, m * hp->beta2);
    }
}

#define SEGS_M(P, G, W) LION_SEGMENT(P, G, 0, W) LION_SEGMENT(P, G, 1, W) LION_SEGMENT(P, G, 2, W)
#define SEGS_G(P, W) SEGS_M(P, 0, W) SEGS_M(P, 1, W) SEGS_M(P, 2, W)
SEGS_G(0, 0) /* NEAREST: every param dtype */
SEGS_G(1, 0)
SEGS_G(2, 0)
SEGS_G(1, 1) /* STOCHASTIC: bf16 params */
SEGS_G(1, 2) /* KAHAN: bf16 and fp16 params */
SEGS_G(2, 2)

#define ENTRY(P, G, M, W) [(P) | (G) << 2 | (M) << 4] = seg_##P##_##G##_##M##_##W
#define ENTRIES_M(P, G, W) ENTRY(P, G, 0, W), ENTRY(P, G, 1, W), ENTRY(P, G, 2, W)
#define ENTRIES_G(P, W) ENTRIES_M(P, 0, W), ENTRIES_M(P, 1, W), ENTRIES_M(P, 2, W)
/* [how the param is written][param | grad << 2 | momentum << 4] */
static const segment_fn SEGMENTS[3][64] = {
    {ENTRIES_G(0, 0), ENTRIES_G(1, 0), ENTRIES_G(2, 0), [ALL_F64] = seg_f64},
    {ENTRIES_G(1, 1)},
    {ENTRIES_G(1, 2), ENTRIES_G(2, 2)},
};

/* ------------------------------------------------------------------ int8 momentum */

#include "lion_int8.h"

/* ------------------------------------------------------------------ the split step (Distributed Lion) */

/* The first half: the sign of c = b1 m + (1 - b1) g as int8: +1, -1, and 0 for +-0 and where the spec's
 * sign(c) + 0 * c is NaN (c NaN or Inf): Distributed Lion reads only `< 0` and `> 0`, and a NaN reads as neither.
 * The momentum advances as in the fused step. The param's dtype does not matter. */
#define DIRECTION_SEGMENT(G, M)                                                                                   \
    static void dir_##G##_##M(const tensor_view *a, int64_t i0, int64_t i1, const lion_hp *hp) {                 \
        LION_SCALARS(hp);                                                                                         \
        const void *restrict g_ = a->g;                                                                           \
        void *restrict m_ = a->m;                                                                                 \
        int8_t *restrict d = (int8_t *)a->u;                                                                      \
        for (int64_t i = i0; i < i1; i++) {                                                                       \
            const float g = LOAD(G, g_, i), m = LOAD(M, m_, i);                                                   \
            const float c = fmaf(g, omb1, m * b1);                                                                \
            d[i] = (int8_t)(fabsf(c) <= FLT_MAX ? (c > 0.0f) - (c < 0.0f) : 0); /* Inf, NaN: the spec's NaN */    \
            STORE(M, m_, i, fmaf(g, omb2, m * b2));                                                               \
        }                                                                                                         \
    }

/* fp64: the direction in double, sign(c) + 0 * c as the spec's (an fp64 direction keeps the apply in fp64). */
static void dir_f64(const tensor_view *a, int64_t i0, int64_t i1, const lion_hp *hp) {
    const double *restrict g64 = (const double *)a->g;
    double *restrict m64 = (double *)a->m, *restrict d = (double *)a->u;
    for (int64_t i = i0; i < i1; i++) {
        const double g = g64[i], m = m64[i];
        const double c = fma(g, hp->one_minus_beta1, m * hp->beta1);
        d[i] = (c != 0.0 ? copysign(1.0, c) : 0.0) + c * 0.0;
        m64[i] = fma(g, hp->one_minus_beta2, m * hp->beta2);
    }
}

/* The second half: p <- p (1 - lr wd) - lr u for an fp32 direction u (the agreed vote or mean), the param written
 * back as in the fused step. The math is fp32, also for fp64 params (spec.apply_direction: u's dtype). */
#define APPLY_SEGMENT(P, W)                                                                                       \
    static void apply_##P##_##W(const tensor_view *a, int64_t i0, int64_t i1, const lion_hp *hp) {               \
        LION_SCALARS(hp);                                                                                         \
        void *restrict p_ = a->p;                                                                                 \
        void *restrict c_ = a->c;                                                                                 \
        const float *restrict u_ = (const float *)a->u;                                                           \
        (void)c_;                                                                                                 \
        FOR_EACH_NOISE_TILE(W, a, i0, i1, {                                                                       \
            for (int64_t i = t; i < t + len; i++) {                                                               \
                const float p = LOAD_PARAM(P, W, p_, c_, i);                                                      \
                const float p_new = fmaf(u_[i], neg_lr, has_decay ? p * decay : p);                               \
                STORE_PARAM(P, W, p_, c_, i, p_new, noise[off + i]);                                              \
            }                                                                                                     \
        })                                                                                                        \
    }

/* fp64 params with an fp64 direction: in double. */
static void apply_f64(const tensor_view *a, int64_t i0, int64_t i1, const lion_hp *hp) {
    double *restrict p64 = (double *)a->p;
    const double *restrict u = (const double *)a->u;
    const int has_decay = hp->decay != 1.0;
    for (int64_t i = i0; i < i1; i++) p64[i] = fma(u[i], hp->neg_lr, has_decay ? p64[i] * hp->decay : p64[i]);
}

DIRECTION_SEGMENT(0, 0) DIRECTION_SEGMENT(0, 1) DIRECTION_SEGMENT(0, 2)
DIRECTION_SEGMENT(1, 0) DIRECTION_SEGMENT(1, 1) DIRECTION_SEGMENT(1, 2)
DIRECTION_SEGMENT(2, 0) DIRECTION_SEGMENT(2, 1) DIRECTION_SEGMENT(2, 2)
APPLY_SEGMENT(0, 0) APPLY_SEGMENT(1, 0) APPLY_SEGMENT(2, 0) APPLY_SEGMENT(3, 0)
APPLY_SEGMENT(1, 1) APPLY_SEGMENT(1, 2) APPLY_SEGMENT(2, 2)

/* [param | grad << 2 | momentum << 4], as lion_step's codes */
#define DIR_ENTRY(P, G, M) [(P) | (G) << 2 | (M) << 4] = dir_##G##_##M
#define DIR_ENTRIES_M(P, G) DIR_ENTRY(P, G, 0), DIR_ENTRY(P, G, 1), DIR_ENTRY(P, G, 2)
#define DIR_ENTRIES(P) DIR_ENTRIES_M(P, 0), DIR_ENTRIES_M(P, 1), DIR_ENTRIES_M(P, 2)
static const segment_fn DIRECTIONS[64] = {DIR_ENTRIES(0), DIR_ENTRIES(1), DIR_ENTRIES(2), [ALL_F64] = dir_f64};
/* [how the param is written][param | direction << 2]: fp32 directions, and fp64 ones for fp64 params */
static const segment_fn APPLIES[3][16] = {
    {[0] = apply_0_0, [1] = apply_1_0, [2] = apply_2_0, [3] = apply_3_0, [F64 | F64 << 2] = apply_f64},
    {[1] = apply_1_1},
    {[1] = apply_1_2, [2] = apply_2_2},
};

/* ------------------------------------------------------------------ splitting the work over threads */

typedef struct task task;
typedef void (*range_fn)(const task *t, int64_t tensor, int64_t i0, int64_t i1);

struct task {
    int64_t n_tensors;
    const int64_t *p_ptrs, *g_ptrs, *m_ptrs; /* param, grad, momentum (int8: codes) of each tensor */
    const int64_t *c_ptrs;                   /* compensation buffers (0: none); NULL: none at all */
    const int64_t *u_ptrs;                   /* the split step's directions */
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

/* Tensor k's noise stream from a table of `per` values per tensor (param id, base, shard[, momentum's shard]). */
static noise_stream stream_of(const int64_t *streams, int per, int64_t k, uint32_t k0, uint32_t k1, int which) {
    noise_stream ns = {k0, k1, 0, 0, 0};
    if (streams != NULL) {
        ns.param_id = (uint32_t)streams[per * k];
        ns.base = streams[per * k + 1];
        ns.shard = (uint32_t)streams[per * k + 2 + which];
    }
    return ns;
}

/* How tensor k's param is written: KAHAN where it has a compensation buffer, STOCHASTIC for a bf16 param with
 * a key, else NEAREST. */
static int write_mode(const task *t, int64_t k, int param_dtype, int stochastic) {
    if (t->c_ptrs != NULL && t->c_ptrs[k] != 0) return KAHAN;
    return stochastic && param_dtype == BF16 ? STOCHASTIC : NEAREST;
}

static void step_range(const task *t, int64_t k, int64_t i0, int64_t i1) {
    const uint8_t code = t->codes[k] & 63;
    const tensor_view a = {
        .p = (void *)t->p_ptrs[k],
        .g = (const void *)t->g_ptrs[k],
        .m = (void *)t->m_ptrs[k],
        .c = t->c_ptrs != NULL ? (void *)t->c_ptrs[k] : NULL,
        .ns = stream_of(t->streams, 3, k, t->k0, t->k1, 0),
    };
    SEGMENTS[write_mode(t, k, code & 3, t->streams != NULL)][code](&a, i0, i1, t->hp);
}

static void int8_range(const task *t, int64_t k, int64_t i0, int64_t i1) {
    const uint8_t code = t->codes[k] & 15;
    const tensor_view a = {
        .p = (void *)t->p_ptrs[k],
        .g = (const void *)t->g_ptrs[k],
        .m = (void *)t->m_ptrs[k],
        .c = t->c_ptrs != NULL ? (void *)t->c_ptrs[k] : NULL,
        .s = (float *)t->s_ptrs[k],
        .row = t->blocks[2 * k],
        .block = t->blocks[2 * k + 1],
        .ns = stream_of(t->streams, 4, k, t->k0, t->k1, 0),
        .qs = stream_of(t->streams, 4, k, t->qk0, t->qk1, 1),
    };
    Q8_SEGMENTS[write_mode(t, k, code & 3, t->param_sr)][t->quant_sr != 0][code](&a, i0, i1, t->hp);
}

static void direction_range(const task *t, int64_t k, int64_t i0, int64_t i1) {
    const tensor_view a = {.g = (const void *)t->g_ptrs[k], .m = (void *)t->m_ptrs[k], .u = (void *)t->u_ptrs[k]};
    DIRECTIONS[t->codes[k] & 63](&a, i0, i1, t->hp);
}

static void apply_range(const task *t, int64_t k, int64_t i0, int64_t i1) {
    const uint8_t code = t->codes[k] & 15;
    const tensor_view a = {
        .p = (void *)t->p_ptrs[k],
        .u = (void *)t->u_ptrs[k],
        .c = t->c_ptrs != NULL ? (void *)t->c_ptrs[k] : NULL,
        .ns = stream_of(t->streams, 3, k, t->k0, t->k1, 0),
    };
    APPLIES[write_mode(t, k, code & 3, t->streams != NULL)][code](&a, i0, i1, t->hp);
}

static lion_hp hp_of(const double *v) { return (lion_hp){v[0], v[1], v[2], v[3], v[4], v[5]}; }

int lion_abi_version(void) { return LION_ABI; }

/* Which Philox implementation the build took: "avx512", "avx2" or "portable" (philox.h). */
const char *lion_philox_impl(void) { return PHILOX_IMPL; }

/* Whether a loop exists for dtype code `code` of kind: 0 lion_step, 1 lion_step with compensation, 2
 * lion_step_int8, 3 lion_step_int8 with compensation, 4 lion_direction, 5 lion_apply, 6 lion_apply with
 * compensation. The caller checks every code it can send once, when it loads the library. */
int lion_has_loop(int kind, int code) {
    if (code < 0 || code >= 64) return 0;
    switch (kind) {
    case 0: return SEGMENTS[NEAREST][code] != NULL;
    case 1: return SEGMENTS[KAHAN][code] != NULL;
    case 2: return code < 16 && Q8_SEGMENTS[NEAREST][0][code] != NULL;
    case 3: return code < 16 && Q8_SEGMENTS[KAHAN][0][code] != NULL;
    case 4: return DIRECTIONS[code] != NULL;
    case 5: return code < 16 && APPLIES[NEAREST][code] != NULL;
    case 6: return code < 16 && APPLIES[KAHAN][code] != NULL;
    default: return 0;
    }
}

/* One Lion step over n_tensors tensors. offsets: n_tensors + 1 prefix sums of their element counts. codes:
 * param | grad << 2 | momentum << 4. c_ptrs: per tensor its Kahan compensation buffer (the param's dtype, bf16
 * or fp16) or 0; NULL when no tensor has one. hp: beta1, 1 - beta1, beta2, 1 - beta2, -lr, 1 - lr * wd (1 when
 * wd == 0), in double (the fp32 loops round each once); maximize passes -(1 - beta1) and -(1 - beta2), which is
 * exactly the reference's negated gradient. streams != NULL: stochastic rounding of bf16 params with key
 * (k0, k1) and, per tensor, (param id, base, shard); the noise is a function of those and the element index
 * only, so any thread count gives the same result. */
void lion_step(int64_t n_tensors, const int64_t *p_ptrs, const int64_t *g_ptrs, const int64_t *m_ptrs,
               const int64_t *c_ptrs, const int64_t *offsets, const uint8_t *codes, const double *hp_values,
               const int64_t *streams, uint32_t k0, uint32_t k1, int nthreads) {
    const lion_hp hp = hp_of(hp_values);
    task t = {.n_tensors = n_tensors, .p_ptrs = p_ptrs, .g_ptrs = g_ptrs, .m_ptrs = m_ptrs, .c_ptrs = c_ptrs,
              .offsets = offsets, .codes = codes, .fn = step_range, .hp = &hp, .streams = streams, .k0 = k0,
              .k1 = k1};
    if (n_tensors > 0) run_parallel(&t, nthreads);
}

/* One Lion step over n_tensors tensors with int8 momentum: q_ptrs and s_ptrs their codes (int8, numel elements)
 * and scales (fp32, one per block of each row, rows * ceil(row / block)); c_ptrs as lion_step; blocks: per
 * tensor, the row length (the last dim; 1-D tensors are one row) and the block, 1 <= block <= MAX_INT8_BLOCK;
 * codes: param | grad << 2; hp as lion_step; streams: per tensor, param id, base, shard and the momentum's shard
 * (the param's with spec.MOMENTUM_STREAM); param_sr: stochastic rounding of bf16 params with key (k0, k1);
 * quant_sr: stochastic requantization with key (qk0, qk1), else to nearest. Any thread count gives the same
 * result. */
void lion_step_int8(int64_t n_tensors, const int64_t *p_ptrs, const int64_t *g_ptrs, const int64_t *q_ptrs,
                    const int64_t *s_ptrs, const int64_t *c_ptrs, const int64_t *offsets, const uint8_t *codes,
                    const int64_t *blocks, const double *hp_values, const int64_t *streams, int param_sr,
                    uint32_t k0, uint32_t k1, int quant_sr, uint32_t qk0, uint32_t qk1, int nthreads) {
    const lion_hp hp = hp_of(hp_values);
    task t = {.n_tensors = n_tensors, .p_ptrs = p_ptrs, .g_ptrs = g_ptrs, .m_ptrs = q_ptrs, .c_ptrs = c_ptrs,
              .offsets = offsets, .codes = codes, .fn = int8_range, .hp = &hp, .streams = streams, .k0 = k0,
              .k1 = k1, .s_ptrs = s_ptrs, .blocks = blocks, .param_sr = param_sr, .quant_sr = quant_sr,
              .qk0 = qk0, .qk1 = qk1};
    if (n_tensors > 0) run_parallel(&t, nthreads);
}

/* The first half of a split step over n_tensors tensors (codes as lion_step): per tensor, the sign of
 * b1 m + (1 - b1) g into d_ptrs[k] (int8; fp64 tensors: double, sign(c) + 0 * c), each momentum advanced. */
void lion_direction(int64_t n_tensors, const int64_t *g_ptrs, const int64_t *m_ptrs, const int64_t *d_ptrs,
                    const int64_t *offsets, const uint8_t *codes, const double *hp_values, int nthreads) {
    const lion_hp hp = hp_of(hp_values);
    task t = {.n_tensors = n_tensors, .g_ptrs = g_ptrs, .m_ptrs = m_ptrs, .u_ptrs = d_ptrs, .offsets = offsets,
              .codes = codes, .fn = direction_range, .hp = &hp};
    if (n_tensors > 0) run_parallel(&t, nthreads);
}

/* The second half: p <- p (1 - lr wd) - lr u with the directions u_ptrs[k] (fp32, or fp64 for fp64 params);
 * codes: param | direction << 2; c_ptrs, hp (only -lr and the decay are read), streams, k0, k1 as lion_step. */
void lion_apply(int64_t n_tensors, const int64_t *p_ptrs, const int64_t *u_ptrs, const int64_t *c_ptrs,
                const int64_t *offsets, const uint8_t *codes, const double *hp_values, const int64_t *streams,
                uint32_t k0, uint32_t k1, int nthreads) {
    const lion_hp hp = hp_of(hp_values);
    task t = {.n_tensors = n_tensors, .p_ptrs = p_ptrs, .u_ptrs = u_ptrs, .c_ptrs = c_ptrs, .offsets = offsets,
              .codes = codes, .fn = apply_range, .hp = &hp, .streams = streams, .k0 = k0, .k1 = k1};
    if (n_tensors > 0) run_parallel(&t, nthreads);
}

/* lion_dist.spec.sr_noise of elements base .. base + n - 1 of one stream, into out (n int32 in [0, 65536)): for
 * torch backends' requantization on CPU, where the spec's torch Philox costs about a microsecond per element. */
void lion_sr_noise(int64_t n, int32_t *out, uint32_t k0, uint32_t k1, uint32_t param_id, int64_t base,
                   uint32_t shard) {
    const noise_stream s = {k0, k1, param_id, shard, base};
    uint16_t chunk[NOISE_TILE + NOISE_PAD] __attribute__((aligned(64)));
    for (int64_t i = 0; i < n; i += NOISE_TILE) {
        const int64_t len = n - i < NOISE_TILE ? n - i : NOISE_TILE;
        const int64_t off = fill_noise(chunk, &s, base + i, len);
        for (int64_t j = 0; j < len; j++) out[i + j] = (int32_t)chunk[off + j];
    }
}

/* The largest block lion_step_int8 takes. */
int lion_int8_max_block(void) { return MAX_INT8_BLOCK; }

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

_Static_assert(NOISE_TILE <= MAX_INT8_BLOCK, "an int8 noise window holds max(NOISE_TILE, block) elements");
