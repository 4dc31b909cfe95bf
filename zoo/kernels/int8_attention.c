/* Integer attention on x86 CPUs with AVX-512 VNNI: softmax(q k^T * s + mask) v on signed 8-bit codes.

   q, k, v: int8 codes [B, H, T, D], zero points 0 (symmetric quantization); element (b, h, t, d) of q at
   q + b*strides[0] + h*strides[1] + t*strides[2] + d, of k with strides[3..5], of v with strides[6..8].
   out[b, h, i, :] = v_scale * sum_j P[i, j] v[j, :], float32 [B, H, T, D], where
   P[i, j] = round(levels * softmax_j(qk_scale * (q_i . k_j) + mask[b, h, i, j])), unsigned codes.

   q . k runs on VNNI's u8 x s8 dot product: the query codes travel as q + 128 (their sign bit flipped) and
   128 * sum_d k[j, d] is subtracted after, so the int32 sums are exact. The softmax is float32; the probabilities are
   rounded to their codes (round half to even, as torch.round) and P v is again an exact u8 x s8 dot product. This is
   the arithmetic zoo.quant.attention.quantized_product trains with, on the codes: only float32's rounding in exp and the sums may differ.

   mask: float32 additive, element (b, h, i, j) at mask + b*mask_sb + h*mask_sh + i*mask_si + j (strides 0 to
   broadcast), or NULL. A row whose every logit is -inf gets a zero output (float SDPA would give NaN).

   Returns 0, 1 when a thread's scratch buffer cannot be allocated, 2 for arguments it does not take.

   Compiled at first use by zoo/kernels/int8_attention.py with -march=native -fopenmp; the OpenMP runtime is the one
   torch already loaded (libgomp.so.1), so the kernel shares torch's threads. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__))
#error "zoo int8 attention needs AVX-512 F, BW and VNNI"
#endif

/* exp of 16 floats, x <= 0 (logits minus their row's maximum): 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2, and a
   degree-6 Taylor polynomial: relative error at most 2.3e-7 over [-87, 0] against float64 (a one-off check), the
   last two bits of float32 */
static inline __m512 exp_neg(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* Pack one head's keys for the q.k dot products: kp[d4][j] = the 4 codes k[j, 4*d4 .. 4*d4 + 3] as one int32
   (j < Tp, a multiple of 16; zero past T), and ksum128[j] = 128 * sum_d k[j, d]. */
static void pack_keys(const int8_t *k, int64_t row_stride, int64_t T, int64_t D, int64_t Tp, int32_t *kp,
                      int32_t *ksum128) {
    const int64_t D4 = D / 4;
    for (int64_t d4 = 0; d4 < D4; ++d4) {
        int32_t *row = kp + d4 * Tp;
        for (int64_t j = 0; j < T; ++j) memcpy(row + j, k + j * row_stride + 4 * d4, 4);
        for (int64_t j = T; j < Tp; ++j) row[j] = 0;
    }
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t j0 = 0; j0 < Tp; j0 += 16) {
        __m512i s = _mm512_setzero_si512();
        for (int64_t d4 = 0; d4 < D4; ++d4) s = _mm512_dpbusd_epi32(s, ones, _mm512_loadu_si512(kp + d4 * Tp + j0));
        _mm512_storeu_si512(ksum128 + j0, _mm512_slli_epi32(s, 7));
    }
}

/* Pack one head's values for P v: vp[jg][e] = the 4 codes v[4*jg .. 4*jg + 3, e] as one int32 (jg < Tp / 4, e < Dp;
   zero past D and past T). */
static void pack_values(const int8_t *v, int64_t row_stride, int64_t T, int64_t D, int64_t Tp, int64_t Dp,
                        int8_t *vp) {
    memset(vp, 0, (size_t)(Tp * Dp));
    for (int64_t jg = 0; jg < (T + 3) / 4; ++jg) {
        const int64_t rows = T - 4 * jg < 4 ? T - 4 * jg : 4;
        int8_t *dst = vp + jg * Dp * 4;
        int64_t e = 0;
        if (rows == 4) {
            for (; e + 16 <= D; e += 16) {
                const int8_t *src = v + 4 * jg * row_stride + e;
                const __m128i r0 = _mm_loadu_si128((const __m128i *)src);
                const __m128i r1 = _mm_loadu_si128((const __m128i *)(src + row_stride));
                const __m128i r2 = _mm_loadu_si128((const __m128i *)(src + 2 * row_stride));
                const __m128i r3 = _mm_loadu_si128((const __m128i *)(src + 3 * row_stride));
                const __m128i a = _mm_unpacklo_epi8(r0, r1), b = _mm_unpackhi_epi8(r0, r1);
                const __m128i c = _mm_unpacklo_epi8(r2, r3), d = _mm_unpackhi_epi8(r2, r3);
                _mm_storeu_si128((__m128i *)(dst + 4 * e), _mm_unpacklo_epi16(a, c));
                _mm_storeu_si128((__m128i *)(dst + 4 * e + 16), _mm_unpackhi_epi16(a, c));
                _mm_storeu_si128((__m128i *)(dst + 4 * e + 32), _mm_unpacklo_epi16(b, d));
                _mm_storeu_si128((__m128i *)(dst + 4 * e + 48), _mm_unpackhi_epi16(b, d));
            }
        }
        for (; e < D; ++e)
            for (int64_t r = 0; r < rows; ++r) dst[4 * e + r] = v[(4 * jg + r) * row_stride + e];
    }
}

int zoo_int8_attention(const int8_t *q, const int8_t *k, const int8_t *v, const int64_t *strides, const float *mask,
                       int64_t mask_sb, int64_t mask_sh, int64_t mask_si, float *out, int64_t B, int64_t H, int64_t T,
                       int64_t D, float qk_scale, float v_scale, int32_t levels) {
    if (D % 4 != 0 || T <= 0 || levels < 1 || levels > 255) return 2;
    /* Tq: keys padded to whole groups of 4 blocks of 16 (the q.k loop runs 4 independent accumulators); Tp: whole
       blocks of 16 (the softmax, and the values in groups of 4 rows, 4 accumulators each) */
    const int64_t Tq = (T + 63) / 64 * 64, Tp = (T + 15) / 16 * 16, Dp = (D + 15) / 16 * 16, D4 = D / 4;
    const size_t scratch = sizeof(int32_t) * (size_t)(D4 * Tq + Tq) + (size_t)(Tp * Dp) + sizeof(float) * Tq + Tq;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        char *buffer = aligned_alloc(64, (scratch + 4 * 64 + 63) / 64 * 64);
        if (buffer == NULL) {
            failed = 1;
        } else {
            int32_t *kp = (int32_t *)buffer;
            int32_t *ksum128 = kp + D4 * Tq;
            int8_t *vp = (int8_t *)(ksum128 + Tq);
            float *row = (float *)(((uintptr_t)(vp + Tp * Dp) + 63) & ~(uintptr_t)63);
            uint8_t *codes = (uint8_t *)(row + Tq);
            const __m512 ninf = _mm512_set1_ps(-INFINITY), scale = _mm512_set1_ps(qk_scale);
            const __m512 vscale = _mm512_set1_ps(v_scale);
            const int32_t sign = (int32_t)0x80808080u;
#pragma omp for schedule(static)
            for (int64_t bh = 0; bh < B * H; ++bh) {
                const int64_t b = bh / H, h = bh % H, head = bh * T * D;
                const int8_t *qh = q + b * strides[0] + h * strides[1];
                pack_keys(k + b * strides[3] + h * strides[4], strides[5], T, D, Tq, kp, ksum128);
                pack_values(v + b * strides[6] + h * strides[7], strides[8], T, D, Tp, Dp, vp);
                for (int64_t i = 0; i < T; ++i) {
                    const int8_t *qi = qh + i * strides[2];
                    const float *mi = mask ? mask + b * mask_sb + h * mask_sh + i * mask_si : NULL;
                    __m512 vmax = ninf;
                    for (int64_t j0 = 0; j0 < Tq; j0 += 64) {
                        /* four blocks of 16 keys at once: four independent chains of dot products */
                        __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                                          _mm512_setzero_si512()};
                        for (int64_t d4 = 0; d4 < D4; ++d4) {
                            int32_t word;
                            memcpy(&word, qi + 4 * d4, 4);
                            const __m512i qw = _mm512_set1_epi32(word ^ sign);
                            const int32_t *kd = kp + d4 * Tq + j0;
                            for (int u = 0; u < 4; ++u)
                                acc[u] = _mm512_dpbusd_epi32(acc[u], qw, _mm512_loadu_si512(kd + 16 * u));
                        }
                        for (int u = 0; u < 4 && j0 + 16 * u < Tp; ++u) {
                            const int64_t jb = j0 + 16 * u;
                            const __m512i dot = _mm512_sub_epi32(acc[u], _mm512_loadu_si512(ksum128 + jb));
                            const __mmask16 valid =
                                T - jb >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (T - jb)) - 1);
                            __m512 logit = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), scale);
                            if (mi) logit = _mm512_add_ps(logit, _mm512_maskz_loadu_ps(valid, mi + jb));
                            logit = _mm512_mask_blend_ps(valid, ninf, logit);
                            _mm512_store_ps(row + jb, logit);
                            vmax = _mm512_max_ps(vmax, logit);
                        }
                    }
                    float *oi = out + head + i * D;
                    const float m = _mm512_reduce_max_ps(vmax);
                    if (m == -INFINITY) {
                        memset(oi, 0, sizeof(float) * (size_t)D);
                        continue;
                    }
                    const __m512 vm = _mm512_set1_ps(m);
                    __m512 vsum = _mm512_setzero_ps();
                    for (int64_t j0 = 0; j0 < Tp; j0 += 16) {
                        const __m512 logit = _mm512_load_ps(row + j0);
                        const __mmask16 live = _mm512_cmp_ps_mask(logit, ninf, _CMP_NEQ_OQ);
                        const __m512 e = _mm512_maskz_mov_ps(live, exp_neg(_mm512_sub_ps(logit, vm)));
                        _mm512_store_ps(row + j0, e);
                        vsum = _mm512_add_ps(vsum, e);
                    }
                    /* levels / sum once, then one multiplication per probability */
                    const __m512 per_sum = _mm512_set1_ps((float)levels / _mm512_reduce_add_ps(vsum));
                    for (int64_t j0 = 0; j0 < Tp; j0 += 16) {
                        /* rounded half to even (the default rounding mode), as torch.round */
                        const __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_load_ps(row + j0), per_sum));
                        _mm_storeu_si128((__m128i *)(codes + j0), _mm512_cvtusepi32_epi8(c));
                    }
                    for (int64_t e0 = 0; e0 < Dp; e0 += 16) {
                        /* four groups of 4 rows at once: four independent chains of dot products */
                        __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                                          _mm512_setzero_si512()};
                        for (int64_t jg = 0; jg < Tp / 4; jg += 4) {
                            for (int u = 0; u < 4; ++u) {
                                int32_t word;
                                memcpy(&word, codes + 4 * (jg + u), 4);
                                acc[u] = _mm512_dpbusd_epi32(acc[u], _mm512_set1_epi32(word),
                                                             _mm512_loadu_si512(vp + ((jg + u) * Dp + e0) * 4));
                            }
                        }
                        const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(acc[0], acc[1]),
                                                             _mm512_add_epi32(acc[2], acc[3]));
                        const __mmask16 cols = D - e0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - e0)) - 1);
                        _mm512_mask_storeu_ps(oi + e0, cols, _mm512_mul_ps(_mm512_cvtepi32_ps(sum), vscale));
                    }
                }
            }
            free(buffer);
        }
    }
    return failed;
}
