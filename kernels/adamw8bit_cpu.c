/* minidb.adamw8bit's update of one fp32 tensor as one C loop, for CPU tensors.
 *
 * The same arithmetic as the Triton kernel (kernels/adamw8bit.py), block by block of `block`
 * values: dequantise m and v, torch.optim.AdamW's update in fp32, then each block's absmax and its
 * values' codes. A block's new m and v wait in two small buffers between the update and the
 * quantisation (the absmax needs the whole block first), so every byte of the state is read once
 * and written once. The torch path moves ~176 bytes per weight through ~20 whole-chunk operations,
 * and its code lookups run on one core; here the blocks are split between `threads` threads.
 *
 * Compiled with -ffp-contract=off (no fused multiply-adds) and without -ffast-math: each operation
 * rounds as torch's does, division and sqrtf correctly rounded. The loops are written so that the
 * compiler vectorises them (restrict pointers, selects by masks), all but the code lookups.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

/* The float with these bits, and back. */
static inline float as_float(int32_t i) { union { int32_t i; float f; } u = { i }; return u.f; }
static inline int32_t as_bits(float f) { union { float f; int32_t i; } u = { f }; return u.i; }

/* fp32 (given as its bits) -> the bits of the nearest fp16, ties to even (as torch's .half());
 * NaN and inf kept. Selects by masks, not branches, so that the compiler vectorises it. fp16's
 * subnormals are the multiples of 2**-24, the spacing of fp32 in [0.5, 1): adding 0.5 rounds |f|
 * to one of them, to nearest even. */
static inline int32_t fp16_bits(int32_t f) {
    int32_t sign = (f >> 16) & 0x8000, x = f & 0x7FFFFFFF;                 /* x >= 0: signed compares */
    int32_t normal = (x + 0x0FFF + ((x >> 13) & 1) - 0x38000000) >> 13;   /* drop 13 bits, rebias */
    int32_t subnormal = as_bits(as_float(x) + 0.5f) - 0x3F000000;
    int32_t is_normal = -(x >= 0x38800000), is_inf = -(x >= 0x477FF000), is_nan = -(x > 0x7F800000);
    int32_t h = (normal & is_normal) | (subnormal & ~is_normal);
    h = (0x7C00 & is_inf) | (h & ~is_inf);                                /* >= 65520: inf */
    h = (0x7E00 & is_nan) | (h & ~is_nan);
    return sign | h;
}

typedef struct {
    float decay, beta1, beta2, one_minus_beta1, one_minus_beta2, bc2_sqrt, eps, step_size;
} hyper_t;

/* One block: the AdamW update of w, and the block's new m and v into m_new, v_new. */
static void update(int64_t len, float *restrict w, const float *restrict g, const uint8_t *restrict mc,
                   const uint8_t *restrict vc, float m_scale, float v_scale, const float *restrict m_code,
                   const float *restrict v_code, float *restrict m_new, float *restrict v_new, hyper_t h) {
    for (int64_t i = 0; i < len; i++) {
        float m = m_code[mc[i]] * m_scale, v = v_code[vc[i]] * v_scale, gi = g[i];  /* dequantise */
        float wi = w[i] * h.decay;                                            /* decoupled weight decay */
        m = m + h.one_minus_beta1 * (gi - m);
        v = v * h.beta2 + h.one_minus_beta2 * gi * gi;
        w[i] = wi + h.step_size * (m / (sqrtf(v) / h.bc2_sqrt + h.eps));
        m_new[i] = m;
        v_new[i] = v;
    }
}

/* torch.amax of |x| (v >= 0 is its own): the largest bit pattern with the sign bit cleared, since
 * non-negative floats order as their bits do, and a NaN's bits exceed every number's, as torch's
 * amax lets a NaN win. Integer maxima vectorise where float ones, NaN-aware, do not. */
static float absmax_of(int64_t len, const float *restrict x) {
    int32_t best = 0;
    for (int64_t i = 0; i < len; i++) {
        int32_t b = as_bits(x[i]) & 0x7FFFFFFF;
        best = b > best ? b : best;
    }
    return as_float(best);
}

/* Each value's code: the nearest-code table at the fp16 bits of value / absmax. lift (v's code):
 * values under 2**-24 are lifted to it, as the torch path lifts them, so a positive v never codes
 * as 0. Two loops: the arithmetic vectorises, the byte lookups cannot. */
static void quantize(int64_t len, const float *restrict x, float absmax, int lift, const uint8_t *restrict table,
                     int32_t *restrict bits, uint8_t *restrict codes) {
    const float tiny = 1.17549435e-38f;                                      /* fp32's smallest normal */
    const int32_t floor = lift ? 0x33800000 : INT32_MIN;                   /* 2**-24; v/absmax >= +0 */
    float divisor = absmax < tiny ? tiny : absmax;
    for (int64_t i = 0; i < len; i++) {
        int32_t y = as_bits(x[i] / divisor);
        bits[i] = fp16_bits(y < floor ? floor : y);
    }
    for (int64_t i = 0; i < len; i++)
        codes[i] = table[bits[i]];
}

typedef struct {
    float *w; const float *g;
    uint8_t *m_codes, *v_codes; float *m_absmax, *v_absmax;
    const float *m_code, *v_code; const uint8_t *m_table, *v_table;
    int64_t n, block, first, last;                           /* this job's blocks: [first, last) */
    hyper_t h;
    float *buffer;                                           /* 3 x block: a block's new m, v; fp16 bits */
} job_t;

static void *run(void *arg) {
    const job_t *j = arg;
    float *m = j->buffer, *v = j->buffer + j->block;
    int32_t *bits = (int32_t *)(j->buffer + 2 * j->block);
    for (int64_t b = j->first; b < j->last; b++) {
        int64_t start = b * j->block, len = j->n - start < j->block ? j->n - start : j->block;
        update(len, j->w + start, j->g + start, j->m_codes + start, j->v_codes + start, j->m_absmax[b],
               j->v_absmax[b], j->m_code, j->v_code, m, v, j->h);
        j->m_absmax[b] = absmax_of(len, m);
        j->v_absmax[b] = absmax_of(len, v);
        quantize(len, m, j->m_absmax[b], 0, j->m_table, bits, j->m_codes + start);
        quantize(len, v, j->v_absmax[b], 1, j->v_table, bits, j->v_codes + start);
    }
    return NULL;
}

/* Steps all n values. Returns 0, or -1 (nothing touched) if the block buffers cannot be allocated. */
int adamw8bit_step(float *w, const float *g, uint8_t *m_codes, float *m_absmax, uint8_t *v_codes,
                   float *v_absmax, const float *m_code, const float *v_code, const uint8_t *m_table,
                   const uint8_t *v_table, int64_t n, int64_t block, float decay, float beta1,
                   float beta2, float one_minus_beta1, float one_minus_beta2, float bc2_sqrt,
                   float eps, float step_size, int threads) {
    enum { MAX_THREADS = 256 };
    int64_t blocks = (n + block - 1) / block;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > blocks / 64) threads = (int)(blocks / 64);  /* small tensors: not worth a thread */
    if (threads < 1) threads = 1;
    job_t jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    float *buffers = malloc((size_t)threads * 3 * block * sizeof(float));
    if (!buffers) return -1;
    for (int t = 0; t < threads; t++) {
        jobs[t] = (job_t){ w, g, m_codes, v_codes, m_absmax, v_absmax, m_code, v_code, m_table, v_table,
                           n, block, blocks * t / threads, blocks * (t + 1) / threads,
                           { decay, beta1, beta2, one_minus_beta1, one_minus_beta2, bc2_sqrt, eps, step_size },
                           buffers + (int64_t)t * 3 * block };
        if (t > 0) started[t] = pthread_create(&ids[t], NULL, run, &jobs[t]) == 0;
    }
    run(&jobs[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
        else run(&jobs[t]);                                  /* no thread to be had: this one does it */
    }
    free(buffers);
    return 0;
}

/* fp16_bits over n values, for the tests (tests/test_adamw8bit_cpu.py checks it against torch's .half()). */
void fp16_bits_of(const float *x, int32_t *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = fp16_bits(as_bits(x[i]));
}
