/* Spatial Group-wise Enhance on the CPU, float32, contiguous NCHW, one pass over memory.
 *
 * The activation is seen as N = B*G rows of K channels x P positions (row n = sample b, group
 * g = n % G; channel c = g*K + k). A row is at most a few hundred KB, so after its first read it
 * stays in the core's L2 cache: every kernel below reads each row from memory once and writes
 * its result once, where an eager formulation makes 4-9 passes. Statistics are accumulated in
 * double. Rows are independent and split over OpenMP threads (the same libgomp as torch's).
 *
 * An optional per-channel affine x = z * scale[c] + shift[c] fuses a BatchNorm in front of SGE:
 * the BN output x is then never written to memory.
 *
 * Forward, per row:  m_k = mean_p x_kp;  c_p = sum_k m_k x_kp;  d = c - mean(c);
 *   s = sqrt(sum d^2 / (P-1));  gate = sigmoid(w_g d / (s + eps) + b_g);  y = x * gate.
 * Backward: the hand-derived gradient (see sge.py, _sge_backward_core).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define SGE_EPS 1e-5

/* Reductions over a row keep LANES independent float partial sums (vectorised, no dependency
 * chain through one accumulator) and combine them in double. */
#define LANES 32
/* Block of positions whose per-position accumulators stay in registers / L1 across channels. */
#define BLOCK 64

static double sum_f32(const float *a, int64_t n) {
    float lanes[LANES] = {0};
    int64_t p = 0;
    for (; p + LANES <= n; p += LANES)
        for (int j = 0; j < LANES; ++j) lanes[j] += a[p + j];
    double total = 0.0;
    for (; p < n; ++p) total += a[p];
    for (int j = 0; j < LANES; ++j) total += lanes[j];
    return total;
}

static double dot_f32(const float *a, const float *b, int64_t n) {
    float lanes[LANES] = {0};
    int64_t p = 0;
    for (; p + LANES <= n; p += LANES)
        for (int j = 0; j < LANES; ++j) lanes[j] += a[p + j] * b[p + j];
    double total = 0.0;
    for (; p < n; ++p) total += (double)a[p] * b[p];
    for (int j = 0; j < LANES; ++j) total += lanes[j];
    return total;
}

/* out_p = sum_k alpha_k (z_kp - offset_k) for the K channel rows of z (stride P): one write of
 * out instead of K read-modify-writes. */
static void channel_combination(const float *z, const float *alpha, const float *offset, int64_t K, int64_t P,
                                float *out) {
    int64_t p0 = 0;
    for (; p0 + BLOCK <= P; p0 += BLOCK) {
        float acc[BLOCK] = {0};
        for (int64_t k = 0; k < K; ++k) {
            const float a = alpha[k], o = offset[k], *zk = z + k * P + p0;
            for (int j = 0; j < BLOCK; ++j) acc[j] += a * (zk[j] - o);
        }
        for (int j = 0; j < BLOCK; ++j) out[p0 + j] = acc[j];
    }
    for (int64_t p = p0; p < P; ++p) out[p] = 0.0f;
    for (int64_t k = 0; k < K; ++k) {  /* the tail (all of a small map): vectorised over positions */
        const float a = alpha[k], o = offset[k], *zk = z + k * P;
#pragma omp simd
        for (int64_t p = p0; p < P; ++p) out[p] += a * (zk[p] - o);
    }
}

/* out_p = sum_k g_kp (s_k z_kp + t_k) (s, t NULL: identity), blocked as channel_combination. */
static void channel_products(const float *g, const float *z, const float *s, const float *t, int64_t K, int64_t P,
                             float *out) {
    int64_t p0 = 0;
    for (; p0 + BLOCK <= P; p0 += BLOCK) {
        float acc[BLOCK] = {0};
        for (int64_t k = 0; k < K; ++k) {
            const float sk = s ? s[k] : 1.0f, tk = s ? t[k] : 0.0f, *zk = z + k * P + p0, *gk = g + k * P + p0;
            for (int j = 0; j < BLOCK; ++j) acc[j] += gk[j] * (zk[j] * sk + tk);
        }
        for (int j = 0; j < BLOCK; ++j) out[p0 + j] = acc[j];
    }
    for (int64_t p = p0; p < P; ++p) out[p] = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
        const float sk = s ? s[k] : 1.0f, tk = s ? t[k] : 0.0f, *zk = z + k * P, *gk = g + k * P;
#pragma omp simd
        for (int64_t p = p0; p < P; ++p) out[p] += gk[p] * (zk[p] * sk + tk);
    }
}

/* The per-channel means of z (into `zbar`) of one row and m_k = mean of x_k = scale_k zbar_k + shift_k
 * (into `pooled`). zbar is rounded to float first: the backward recomputes m from it. */
static void pooled_row(const float *z, const float *scale, const float *shift, int64_t channel0, int64_t K, int64_t P,
                       double *pooled, float *zbar) {
    for (int64_t k = 0; k < K; ++k) {
        zbar[k] = (float)(sum_f32(z + k * P, P) / (double)P);
        pooled[k] = scale ? (double)zbar[k] * scale[channel0 + k] + shift[channel0 + k] : zbar[k];
    }
}

/* Centred similarity d_p (into `centered`) of one row; returns its unbiased std + eps.
 * d_p = c_p - mean(c) = sum_k m_k (x_kp - mean(x_k)) = sum_k (m_k s_k) (z_kp - zbar_k): summing
 * centred terms keeps float accumulation accurate however large mean(c) is. `alpha`: K scratch. */
static double centered_similarity(const float *z, const double *pooled, const float *zbar, const float *scale,
                                  int64_t channel0, int64_t K, int64_t P, float *alpha, float *centered) {
    for (int64_t k = 0; k < K; ++k) alpha[k] = (float)(pooled[k] * (scale ? (double)scale[channel0 + k] : 1.0));
    channel_combination(z, alpha, zbar, K, P, centered);
    const float residual = (float)(sum_f32(centered, P) / (double)P); /* rounding only */
#pragma omp simd
    for (int64_t p = 0; p < P; ++p) centered[p] -= residual;
    return sqrt(dot_f32(centered, centered, P) / (double)(P - 1)) + SGE_EPS;
}

/* y = SGE(affine(z)); y may alias z. zmean_out (N*K floats: the per-channel means of z, which the
 * backward needs) is filled when not NULL. */
void sge_forward_f32(const float *z, float *y, const float *scale, const float *shift, const float *weight,
                     const float *bias, float *zmean_out, int64_t B, int64_t G, int64_t K, int64_t P) {
    const int64_t N = B * G;
#pragma omp parallel
    {
        float *centered = malloc(sizeof(float) * P), *gate = malloc(sizeof(float) * P);
        float *zbar = malloc(sizeof(float) * K), *alpha = malloc(sizeof(float) * K);
        double *pooled = malloc(sizeof(double) * K);
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; ++n) {
            const int64_t g = n % G, channel0 = g * K;
            const float *zr = z + n * K * P;
            float *yr = y + n * K * P;
            pooled_row(zr, scale, shift, channel0, K, P, pooled, zbar);
            if (zmean_out)
                for (int64_t k = 0; k < K; ++k) zmean_out[n * K + k] = zbar[k];
            const double std_eps = centered_similarity(zr, pooled, zbar, scale, channel0, K, P, alpha, centered);
            const float gain = (float)(weight[g] / std_eps), offset = bias[g];
#pragma omp simd
            for (int64_t p = 0; p < P; ++p) gate[p] = 1.0f / (1.0f + expf(-(gain * centered[p] + offset)));
            for (int64_t k = 0; k < K; ++k) {
                const float s = scale ? scale[channel0 + k] : 1.0f, t = scale ? shift[channel0 + k] : 0.0f;
                const float *zk = zr + k * P;
                float *yk = yr + k * P;
#pragma omp simd
                for (int64_t p = 0; p < P; ++p) yk[p] = (zk[p] * s + t) * gate[p];
            }
        }
        free(centered);
        free(gate);
        free(zbar);
        free(alpha);
        free(pooled);
    }
}

/* grad_x = dL/dx for y = SGE(x), x = affine(z) (grad_x may alias grad_y). Per row also:
 * grad_weight_rows[n], grad_bias_rows[n] (to be summed over the batch) and, with the affine,
 * channel_sums[n*K+k] = sum_p grad_x_kp and channel_dots[n*K+k] = sum_p grad_x_kp (z_kp - zbar_k)
 * with zbar_k the row's channel mean (centred, so float lanes stay accurate): what the
 * BatchNorm backward needs. zmean_all: what the forward wrote to zmean_out. */
void sge_backward_f32(const float *z, const float *grad_y, float *grad_x, const float *scale, const float *shift,
                      const float *weight, const float *bias, const float *zmean_all, double *grad_weight_rows,
                      double *grad_bias_rows, double *channel_sums, double *channel_dots, int64_t B, int64_t G,
                      int64_t K, int64_t P) {
    const int64_t N = B * G;
#pragma omp parallel
    {
        float *centered = malloc(sizeof(float) * P), *grad_gate = malloc(sizeof(float) * P);
        float *gate = malloc(sizeof(float) * P), *zbar = malloc(sizeof(float) * K);
        float *alpha = malloc(sizeof(float) * K);
        double *pooled = malloc(sizeof(double) * K);
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; ++n) {
            const int64_t g = n % G, channel0 = g * K;
            const float *zr = z + n * K * P, *gyr = grad_y + n * K * P;
            float *gxr = grad_x + n * K * P;
            for (int64_t k = 0; k < K; ++k) {  /* as pooled_row computed them, without re-reading the row */
                zbar[k] = zmean_all[n * K + k];
                pooled[k] = scale ? (double)zbar[k] * scale[channel0 + k] + shift[channel0 + k] : zbar[k];
            }
            const double std_eps = centered_similarity(zr, pooled, zbar, scale, channel0, K, P, alpha, centered);
            /* dL/dgate_p = sum_k gy_kp x_kp */
            channel_products(gyr, zr, scale ? scale + channel0 : NULL, scale ? shift + channel0 : NULL, K, P, grad_gate);
            /* Through the sigmoid and the normalisation: grad_gate becomes dL/dc (centred). */
            const double std = std_eps - SGE_EPS;
            const float wf = weight[g], bf = bias[g], inv_std_eps = (float)(1.0 / std_eps);
            double grad_w = 0.0, grad_b = 0.0, dot = 0.0;
#pragma omp simd reduction(+ : grad_w, grad_b, dot)
            for (int64_t p = 0; p < P; ++p) {
                const float normalized = centered[p] * inv_std_eps;
                const float sig = 1.0f / (1.0f + expf(-(wf * normalized + bf)));
                gate[p] = sig;
                const float grad_affine = grad_gate[p] * sig * (1.0f - sig);
                grad_w += grad_affine * normalized;
                grad_b += grad_affine;
                grad_gate[p] = grad_affine * wf; /* now dL/dnormalized */
                dot += (double)grad_gate[p] * centered[p];
            }
            grad_weight_rows[n] = grad_w;
            grad_bias_rows[n] = grad_b;
            const float correction = std > 1e-30 ? (float)(dot / (std_eps * std_eps * std * (double)(P - 1))) : 0.0f;
            double sum = 0.0;
#pragma omp simd reduction(+ : sum)
            for (int64_t p = 0; p < P; ++p) {
                grad_gate[p] = grad_gate[p] * inv_std_eps - centered[p] * correction;
                sum += grad_gate[p];
            }
            const float mean = (float)(sum / (double)P);
#pragma omp simd
            for (int64_t p = 0; p < P; ++p) grad_gate[p] -= mean; /* dL/dc */
            /* dx_kp = gy_kp gate_p + m_k dc_p + (1/P) sum_p' x_kp' dc_p'; sum_p dc_p = 0, so the
             * last term is s_k/P sum_p' z_kp' dc_p'. */
            for (int64_t k = 0; k < K; ++k) {
                const double s = scale ? scale[channel0 + k] : 1.0;
                const float *zk = zr + k * P, *gyk = gyr + k * P;
                float *gxk = gxr + k * P;
                const float grad_pooled = (float)(s * dot_f32(zk, grad_gate, P) / (double)P), m = (float)pooled[k];
                const float zk_mean = zbar[k];
                float sums[LANES] = {0}, dots[LANES] = {0};
                int64_t p = 0;
                for (; p + LANES <= P; p += LANES)
                    for (int j = 0; j < LANES; ++j) {
                        const float gx = gyk[p + j] * gate[p + j] + m * grad_gate[p + j] + grad_pooled;
                        gxk[p + j] = gx;
                        sums[j] += gx;
                        dots[j] += gx * (zk[p + j] - zk_mean);
                    }
                double gsum = 0.0, gzdot = 0.0;
                for (; p < P; ++p) {
                    const float gx = gyk[p] * gate[p] + m * grad_gate[p] + grad_pooled;
                    gxk[p] = gx;
                    gsum += gx;
                    gzdot += (double)gx * (zk[p] - zk_mean);
                }
                for (int j = 0; j < LANES; ++j) {
                    gsum += sums[j];
                    gzdot += dots[j];
                }
                if (channel_sums) {
                    channel_sums[n * K + k] = gsum;
                    channel_dots[n * K + k] = gzdot;
                }
            }
        }
        free(centered);
        free(grad_gate);
        free(gate);
        free(zbar);
        free(alpha);
        free(pooled);
    }
}

/* Per-channel sum and sum of squares of z (B, C, P) over batch and positions: BatchNorm's batch
 * statistics in one read. */
void channel_moments_f32(const float *z, double *sums, double *squares, int64_t B, int64_t C, int64_t P) {
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < C; ++c) {
        double sum = 0.0, square = 0.0;
        for (int64_t b = 0; b < B; ++b) {
            const float *zc = z + (b * C + c) * P;
#pragma omp simd reduction(+ : sum, square)
            for (int64_t p = 0; p < P; ++p) {
                sum += zc[p];
                square += (double)zc[p] * zc[p];
            }
        }
        sums[c] = sum;
        squares[c] = square;
    }
}

/* out = a[c] * u + b[c] * v + d[c] elementwise over (B, C, P); out may alias u. */
void channel_affine2_f32(const float *u, const float *v, float *out, const float *a, const float *b, const float *d,
                         int64_t B, int64_t C, int64_t P) {
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < B * C; ++row) {
        const int64_t c = row % C;
        const float ac = a[c], bc = b[c], dc = d[c];
        const float *ur = u + row * P, *vr = v + row * P;
        float *outr = out + row * P;
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) outr[p] = ac * ur[p] + bc * vr[p] + dc;
    }
}

/* scale/shift of x = z * scale + shift for BatchNorm with statistics (mean, invstd) and optional
 * affine parameters. Computed identically in the forward and the backward. */
static void bn_affine(const float *bn_weight, const float *bn_bias, const float *mean, const float *invstd, int64_t C,
                      float *scale, float *shift) {
    for (int64_t c = 0; c < C; ++c) {
        const double s = (bn_weight ? (double)bn_weight[c] : 1.0) * invstd[c];
        scale[c] = (float)s;
        shift[c] = (float)((bn_bias ? (double)bn_bias[c] : 0.0) - (double)mean[c] * s);
    }
}

/* y = SGE(BatchNorm(z)). With use_batch_stats, the batch statistics (and, when running_mean is
 * not NULL, the running statistics: unbiased variance, `momentum`) as nn.BatchNorm2d; otherwise
 * the running statistics. Writes mean_out / invstd_out (C) and zmean_out (B*C) for the backward. */
void bn_sge_forward_f32(const float *z, float *y, const float *bn_weight, const float *bn_bias, float *running_mean,
                        float *running_var, float *mean_out, float *invstd_out, const float *weight, const float *bias,
                        float *zmean_out, int64_t use_batch_stats, double momentum, double eps, int64_t B, int64_t C,
                        int64_t G, int64_t P) {
    float *scale = malloc(sizeof(float) * C), *shift = malloc(sizeof(float) * C);
    if (use_batch_stats) {
        double *sums = malloc(sizeof(double) * C), *squares = malloc(sizeof(double) * C);
        channel_moments_f32(z, sums, squares, B, C, P);
        const double count = (double)(B * P);
        for (int64_t c = 0; c < C; ++c) {
            const double mean = sums[c] / count, var = fmax(squares[c] / count - mean * mean, 0.0);
            mean_out[c] = (float)mean;
            invstd_out[c] = (float)(1.0 / sqrt(var + eps));
            if (running_mean) {
                const double unbiased = count > 1 ? var * count / (count - 1) : var;
                running_mean[c] = (float)((1 - momentum) * running_mean[c] + momentum * mean);
                running_var[c] = (float)((1 - momentum) * running_var[c] + momentum * unbiased);
            }
        }
        free(sums);
        free(squares);
    } else {
        for (int64_t c = 0; c < C; ++c) {
            mean_out[c] = running_mean[c];
            invstd_out[c] = (float)(1.0 / sqrt((double)running_var[c] + eps));
        }
    }
    bn_affine(bn_weight, bn_bias, mean_out, invstd_out, C, scale, shift);
    sge_forward_f32(z, y, scale, shift, weight, bias, zmean_out, B, G, C / G, P);
    free(scale);
    free(shift);
}

/* Gradients of y = SGE(BatchNorm(z)) given what bn_sge_forward_f32 wrote: grad_z (B*C*P),
 * grad_weight / grad_bias (G, SGE), grad_bn_weight / grad_bn_bias (C; skipped when NULL). */
void bn_sge_backward_f32(const float *z, const float *grad_y, float *grad_z, const float *bn_weight,
                         const float *bn_bias, const float *mean, const float *invstd, const float *zmean,
                         const float *weight, const float *bias, int64_t use_batch_stats, float *grad_weight,
                         float *grad_bias, float *grad_bn_weight, float *grad_bn_bias, int64_t B, int64_t C, int64_t G,
                         int64_t P) {
    const int64_t N = B * G;
    float *scale = malloc(sizeof(float) * C), *shift = malloc(sizeof(float) * C);
    float *a = malloc(sizeof(float) * C), *b = malloc(sizeof(float) * C), *d = malloc(sizeof(float) * C);
    double *weight_rows = malloc(sizeof(double) * N), *bias_rows = malloc(sizeof(double) * N);
    double *sums = malloc(sizeof(double) * B * C), *dots = malloc(sizeof(double) * B * C);
    bn_affine(bn_weight, bn_bias, mean, invstd, C, scale, shift);
    sge_backward_f32(z, grad_y, grad_z, scale, shift, weight, bias, zmean, weight_rows, bias_rows, sums, dots, B, G,
                     C / G, P);
    for (int64_t g = 0; g < G; ++g) {
        double gw = 0.0, gb = 0.0;
        for (int64_t s = 0; s < B; ++s) {
            gw += weight_rows[s * G + g];
            gb += bias_rows[s * G + g];
        }
        grad_weight[g] = (float)gw;
        grad_bias[g] = (float)gb;
    }
    /* BatchNorm backward from per-(sample, channel) sums of dx and dx (z - zbar), zbar the sample's
     * channel mean: with xhat = (z - mean) invstd,
     * sum dx xhat = invstd sum_b [sum dx (z - zbar_b) + (zbar_b - mean) sum dx]. */
    const double count = (double)(B * P);
    for (int64_t c = 0; c < C; ++c) {
        double total = 0.0, centred = 0.0;
        for (int64_t s = 0; s < B; ++s) {
            total += sums[s * C + c];
            centred += dots[s * C + c] + sums[s * C + c] * ((double)zmean[s * C + c] - mean[c]);
        }
        const double dot_xhat = invstd[c] * centred, ac = (bn_weight ? (double)bn_weight[c] : 1.0) * invstd[c];
        if (grad_bn_weight) grad_bn_weight[c] = (float)dot_xhat;
        if (grad_bn_bias) grad_bn_bias[c] = (float)total;
        a[c] = (float)ac;
        if (use_batch_stats) { /* dz = a (dx - sum dx / M - xhat sum dx xhat / M) */
            const double bc = -ac * invstd[c] * dot_xhat / count;
            b[c] = (float)bc;
            d[c] = (float)(-ac * total / count - bc * mean[c]);
        } else {
            b[c] = 0.0f;
            d[c] = 0.0f;
        }
    }
    channel_affine2_f32(grad_z, z, grad_z, a, b, d, B, C, P);
    free(scale);
    free(shift);
    free(a);
    free(b);
    free(d);
    free(weight_rows);
    free(bias_rows);
    free(sums);
    free(dots);
}
