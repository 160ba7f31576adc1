/*
 * kernels/ — the hot loops, each with a scalar reference (scalar.c) and vector versions (avx512.c,
 * avx2.c, neon.c, sharing the loops of loops.h), chosen once at start-up from the CPU's features by
 * dispatch.c, together with the CRC32C version (crc32c.h). KVP_KERNELS=scalar|avx2|avx512|neon|neon-dotprod
 * forces one (neon-dotprod is neon with sdot for TurboQuant's keys and KIVI's keys and values, on CPUs with
 * the dot product).
 *
 * Rows are contiguous: rows[i*d + j] is element j of row i. No alignment is required of any pointer.
 */
#ifndef KVP_KERNELS_H
#define KVP_KERNELS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "base/base.h"

/*
 * Rows of SparK keys over Hadamard-coded kept values (spark_dot_i16_group): row i starts at
 * base + i*stride and holds its keep mask (d bits, LSB first) at mask_at, the signs of its pruned channels
 * (d - kept bits, in channel order, 1 = negative) at sign_at, and `kept` codes of `bits` bits (packed as
 * for the lut kernels) at code_at. lut has 1 << bits entries in [-127, 127]; sgn[r] is +1 or -1; rho has
 * d entries in [0, 32767].
 */
struct kvp_masked_codes {
	unsigned d, kept, bits, shift;
	size_t stride, mask_at, sign_at, code_at;
	const int8_t *lut, *sgn;
	const int16_t *rho;
};

/*
 * Rows of spark(quantize=rotated) tokens (mask_codes): row i starts at base + i*stride and holds its keep
 * mask (d bits, LSB first) at mask_at, a sign bit for every one of its d channels (1 = negative) at sign_at,
 * and the kept channels' magnitudes at mag_at: `kept` fields of mb bits (0 to 2; none at 0), in channel
 * order, packed LSB first.
 */
struct kvp_mask_rows {
	unsigned d, kept, mb;
	size_t stride, mask_at, sign_at, mag_at;
};

/*
 * Rows in runs (lut_axpy_u8_group): n rows, run r holding rows [r*run, r*run + run) of them; row r*run + t
 * has its codes at code[r] + t*stride and its scale (a float, no alignment needed) at scale[r] +
 * t*scale_stride. run is a multiple of KVP_RUN_ROWS, and n <= KVP_RUNS_MAX * run. The rows of one array are
 * one run (run >= n); a cache's consecutive blocks, separate allocations, are a run each.
 */
#define KVP_RUNS_MAX 4u
#define KVP_RUN_ROWS 16u

struct kvp_row_runs {
	unsigned n, run;
	size_t stride, scale_stride;
	const uint8_t *code[KVP_RUNS_MAX], *scale[KVP_RUNS_MAX];
};

struct kvp_ahead; /* below: what a caller reads next */

/* Row i of runs: its codes, and its scale's bytes. */
static inline const uint8_t *kvp_run_codes(const struct kvp_row_runs *r, unsigned i)
{
	return r->code[i / r->run] + (size_t)(i % r->run) * r->stride;
}

static inline const uint8_t *kvp_run_scale(const struct kvp_row_runs *r, unsigned i)
{
	return r->scale[i / r->run] + (size_t)(i % r->run) * r->scale_stride;
}

/* The rows of an array as one run. */
static inline struct kvp_row_runs kvp_one_run(unsigned n, const uint8_t *codes, size_t stride,
					      const uint8_t *row_scale, size_t scale_stride)
{
	struct kvp_row_runs r = { .n = n, .run = (n + KVP_RUN_ROWS - 1) / KVP_RUN_ROWS * KVP_RUN_ROWS,
				  .stride = stride, .scale_stride = scale_stride };

	r.run = r.run ? r.run : KVP_RUN_ROWS;
	r.code[0] = codes, r.scale[0] = row_scale;
	return r;
}

struct kvp_kernels {
	const char *name;
	/* out[i] = scale * <q, row_i> for i < n */
	void (*dot_f32)(unsigned d, unsigned n, const float *rows, const float *q, float scale, float *out);
	void (*dot_f16)(unsigned d, unsigned n, const uint16_t *rows, const float *q, float scale,
			float *out);
	/* acc[j] += sum_i w[i] * row_i[j] for j < d */
	void (*axpy_f32)(unsigned d, unsigned n, const float *rows, const float *w, float *acc);
	void (*axpy_f16)(unsigned d, unsigned n, const uint16_t *rows, const float *w, float *acc);
	/*
	 * dot_f16 and axpy_f16 for the g query heads of one GQA group at once: q and acc hold g rows of d,
	 * out and w hold g rows of n (row h is head h). Each fp16 row is widened once for several heads
	 * instead of once per head, which is what bounds the single-head versions.
	 *
	 * ahead, when not NULL, is n rows of d that the caller reads next (the next block's K or V): the
	 * vector versions ask for them, a share per step of their loop, while they compute on rows. A read
	 * from memory then overlaps the arithmetic instead of following it; one burst of prefetches per
	 * block would stall on the core's few line-fill buffers instead. Results never depend on ahead.
	 */
	void (*dot_f16_group)(unsigned d, unsigned n, const uint16_t *rows, unsigned g, const float *q,
			      float scale, float *out, const uint16_t *ahead);
	void (*axpy_f16_group)(unsigned d, unsigned n, const uint16_t *rows, unsigned g, const float *w,
			       float *acc, const uint16_t *ahead);
	/*
	 * Magnitudes of the d/2 complex bands of n rows (d even): out[i*d/2 + f] = sqrt(re^2 + im^2) with
	 * (re, im) = (row[f], row[f + d/2]) in the half-split RoPE layout, (row[2f], row[2f+1]) interleaved.
	 * Two products, one sum and one square root, each rounded (never fused), so every implementation
	 * gives the same bits.
	 */
	void (*band_norms)(unsigned d, unsigned n, int interleaved, const float *rows, float *out);
	/* IEEE binary16, round to nearest even, bit-identical across implementations */
	void (*f32_to_f16)(size_t n, const float *x, uint16_t *y);
	void (*f16_to_f32)(size_t n, const uint16_t *x, float *y);
	/*
	 * One step of online softmax over a block of scores s[0..n):
	 *   m' = max(*m, max_i s[i]); s[i] = exp(s[i] - m'); *l = *l * exp(*m - m') + sum_i s[i]; *m = m'
	 * Returns exp(old m - m'), the factor the caller applies to its running output. With *m = -INFINITY
	 * on entry (first block) it returns 0. n >= 1.
	 */
	float (*softmax_step)(unsigned n, float *s, float *m, float *l);
	/*
	 * softmax_step for each of the g heads of a GQA group over one block of n scores, the scores scaled
	 * first (attention's 1/sqrt(d), or 1 where the dot kernels applied it). Head h's scores are
	 * s[h*n .. h*n + n): each becomes s * scale (rounded, as scale() rounds), is stored at
	 * raw[h*raw_stride + i] as such when raw is not NULL (the scores an observing policy is shown), then
	 * goes through softmax_step with m[h] and l[h], whose factor is corr[h]. The same bits as scale(g*n,
	 * scale, s) then softmax_step on each head of the same table. n >= 1.
	 */
	void (*softmax_group)(unsigned n, unsigned g, float scale, float *s, float *raw, size_t raw_stride,
			      float *m, float *l, float *corr);
	/* y[j] *= a for j < d */
	void (*scale)(unsigned d, float a, float *y);
	/*
	 * Packed codes, the fused inner loops of the codecs. A row holds m codes of `bits` (1..4) bits each,
	 * packed least significant bit first from bit 0 of byte 0 (code j is bits [j*bits, (j+1)*bits));
	 * rows start `stride` bytes apart, and no byte past ceil(m*bits/8) of a row is read. A code is an
	 * index into lut, which has 1 << bits entries (a codebook, or 0, 1, 2, ... for integer codes).
	 *   lut_dot:  out[i] = sum_j lut[code(i, j)] * q[j]            for i < n
	 *   lut_axpy: acc[j] += sum_i w[i] * lut[code(i, j)]           for j < m
	 */
	void (*lut_dot)(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			const float *lut, const float *q, float *out);
	void (*lut_axpy)(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			 const float *lut, const float *w, float *acc);
	/*
	 * The same for the g query heads of a GQA group, each code looked up once for all of them:
	 *   lut_dot_group:  out[h*n + i] = sum_j lut[code(i, j)] * q[h*q_stride + j]
	 *   lut_axpy_group: acc[h*acc_stride + j] += sum_i w[h*n + i] * lut[code(i, j)]
	 */
	void (*lut_dot_group)(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			      const float *lut, unsigned g, const float *q, size_t q_stride, float *out);
	void (*lut_axpy_group)(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			       const float *lut, unsigned g, const float *w, float *acc, size_t acc_stride);
	/*
	 * The integer lookups of compressed attention, for the g heads of a GQA group: the sums over codes are
	 * exact int32 (keys: int8 table times int8 query, VNNI vpdpbusd or NEON sdot; values: int16 table times
	 * int16 weights, vpdpwssd or smlal), and the few float steps around them are the same operations in
	 * the same order everywhere (products and sums rounded one at a time, never fused), so every
	 * implementation gives the same bits. Row i's scale is the float at row_scale + i * scale_stride
	 * bytes (no alignment needed: a norm stored inside the row itself).
	 *
	 *   lut_dot_i8_group: out[h*out_stride + i] += ((float)S(h, i) * head_scale[h]) * scale(i) when add is
	 *     1, out[h*out_stride + i] = the same product when add is 0 (a caller's first call then needs no
	 *     zeroed out: zeroing it and reading it back made TurboQuant 2-bit's attention at 32K tokens, d=64,
	 *     4-15% slower in cache), where
	 *     S(h, i) = sum_j lut[code(i, j)] * q[h*q_stride + j]; lut entries in [-127, 127].
	 *
	 *   lut_axpy_i16_group: n <= 256. Per head, u(i) = w[h*w_stride + i] * scale(i); top = max |u(i)|;
	 *     W(i) = nearest(u(i) * kvp_weight_inv(top)) (halves away from zero; 0 when top is 0 or tiny);
	 *     acc[h*acc_stride + j] += (unit * (top / 4095)) * (float)sum_i W(i) * lut[code(i, j)];
	 *     lut entries in [-2047, 2047], so that 256 rows stay within int32. 12-bit weights keep the output
	 *     within about 1e-4 of the float sum, where 8 bits would move it by 1e-3. ahead (NULL: none) is what
	 *     the caller reads next, asked for while it computes (struct kvp_ahead below).
	 */
	void (*lut_dot_i8_group)(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
				 const int8_t *lut, unsigned g, const int8_t *q, size_t q_stride, const float *head_scale,
				 const uint8_t *row_scale, size_t scale_stride, float *out, size_t out_stride, int add);
	void (*lut_axpy_i16_group)(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
				   const int16_t *lut, float unit, unsigned g, const float *w, size_t w_stride,
				   const uint8_t *row_scale, size_t scale_stride, float *acc, size_t acc_stride,
				   const struct kvp_ahead *ahead);
	/*
	 * lut_axpy_u8_group: lut_axpy_i16_group for weights that are not negative (attention's), in 8 bits above
	 * their least against an int8 table, four rows per int32 lane (VNNI vpdpbusd: four tokens' codes of one
	 * column times their four weights), rows given as runs (struct kvp_row_runs below: one run is an array of
	 * rows, several are consecutive blocks of a cache, which then share one weight step). n = rows->n <= 256.
	 * Per head, u(i) = w[h*w_stride + i] * scale(i) where that
	 * is > 0, else 0 (a negative or NaN product counts as 0); lo and top = the least and the largest u(i);
	 * W(i) = nearest((u(i) - lo) * kvp_weight_inv_u8(top - lo)), at most 255 (0 unless positive);
	 *     acc[h*acc_stride + j] += (unit * ((top - lo) / 255)) * (float)sum_i W(i) * lut[code(i, j)]
	 *                              + (unit * lo) * (float)sum_i lut[code(i, j)]
	 * (the two products summed, then added to acc), lut entries in [-128, 127]. The step is the weights'
	 * spread, not their largest: attention that is nearly flat keeps about as many bits as 12-bit weights
	 * on the largest would give it. Returns 1; or 0, having changed nothing, when a weight w[h*w_stride + i]
	 * (h < g, i < n) has its sign bit set (-0 included), and on every call in a table without a vector
	 * version of it (avx2, neon, neon-dotprod: their vector lut_axpy_i16_group beats plain code): the caller
	 * then takes lut_axpy_i16_group. The scalar table always computes it (the reference). Every
	 * implementation that computes it gives the same bits. ahead (NULL: none) is what the caller reads next,
	 * asked for while it computes (struct kvp_ahead below).
	 */
	int (*lut_axpy_u8_group)(unsigned bits, unsigned m, const struct kvp_row_runs *rows, const int8_t *lut,
				 float unit, unsigned g, const float *w, size_t w_stride, float *acc, size_t acc_stride,
				 const struct kvp_ahead *ahead);
	/*
	 * dot_i8_scaled: KIVI's key groups (keys quantized per channel over n tokens) scored for the g heads of a
	 * GQA group. The group at `group`: m little-endian fp16 zero points z_j, m fp16 scales s_j (at least 0),
	 * then n rows of m codes of `bits` bits, each row packed LSB first into ceil(m*bits/8) bytes and stored
	 * by columns: byte k of row i is group[4m + k*n + i]. Per head (q + h*q_stride), the int8 query of
	 * kvp_scaled_query_i8 below (u_j = q_j * s_j rounded to int8 on the step max |u| / 127), then
	 *   out[h*out_stride + i] = Z(h) + (float)S(h, i) * step(h),  S(h, i) = sum_j Q(h, j) * code(i, j)  (exact int32),
	 * Z(h) the float sum of q_j * z_j in kvp_fold16's order. m <= KVP_SCALED_DOT_DIM_MAX. `groups` such groups
	 * of n rows lie one after the other, group k at group + k * kvp_scaled_group_bytes(bits, m, n), and each
	 * is scored as it would be alone, its rows into out + k*n (a cache block of several groups is one call,
	 * so that a kernel may prepare a group's queries while it scores the group before). Every implementation
	 * gives the same bits.
	 */
	void (*dot_i8_scaled)(unsigned bits, unsigned m, unsigned n, unsigned groups, const uint8_t *group, unsigned g,
			      const float *q, size_t q_stride, float *out, size_t out_stride);
	/*
	 * axpy_i16_scaled: weighted sums of KIVI's value tokens, whose rows carry a zero point z and a scale s per
	 * group of gsize columns. Row i's record at rows + i*stride: ng = ceil(m/gsize) little-endian fp16 z(i, c),
	 * then ng fp16 s(i, c) (c: columns [c*gsize, (c+1)*gsize)), then its m codes, LSB first as for lut_axpy.
	 * n <= KVP_AXPY_I16_ROWS. Per head, u(i, c) = w[h*w_stride + i] * s(i, c); top = max |u|;
	 * W(i, c) = kvp_nearest_even(u(i, c) * kvp_weight_inv(top)), and
	 *   acc[h*acc_stride + j] += (top / 4095) * (float)sum_i W(i, j / gsize) * code(i, j)  (exact int32), j < m;
	 *   acc[h*acc_stride + m + c] += the float sum over i of w[h*w_stride + i] * z(i, c), in kvp_sum16's order.
	 * Every implementation gives the same bits.
	 */
	void (*axpy_i16_scaled)(unsigned bits, unsigned m, unsigned gsize, unsigned n, const uint8_t *rows,
				size_t stride, unsigned g, const float *w, size_t w_stride, float *acc, size_t acc_stride);
	/*
	 * axpy_u8_scaled: axpy_i16_scaled for weights that are not negative (attention's), in 8 bits above their
	 * least, four rows per int32 lane (VNNI vpdpbusd: four tokens' codes of one column times their four
	 * weights of its group), with the records given as runs (struct kvp_row_runs: record i at
	 * kvp_run_codes(rows, i), each laid out as for axpy_i16_scaled; rows->scale is not read), so that a span
	 * of a cache's blocks shares one weight step. n = rows->n <= KVP_AXPY_I16_ROWS. The codes are centred:
	 * z + s * code = (z + s * (L / 2)) + (s / 2) * (2 code - L), L = 2^bits - 1, so that the integers
	 * 2 code - L the weights multiply have no common part for the weights' rounding to add up in. Per head,
	 * u(i, c) = w[h*w_stride + i] * s(i, c) where that is > 0, else 0; lo and top = the least and the largest
	 * u(i, c) over i < n, c < ng; W(i, c) = nearest((u(i, c) - lo) * kvp_weight_inv_u8(top - lo)), at most 255;
	 *   acc[h*acc_stride + j] += ((top - lo) / 510) * (float)sum_i W(i, j / gsize) * (2 code(i, j) - L)
	 *                            + (lo * 0.5f) * (float)sum_i (2 code(i, j) - L)   (summed, then added), j < m;
	 *   acc[h*acc_stride + m + c] += the float sum over i of w[h*w_stride + i] * (z(i, c) + s(i, c) * (L * 0.5f))
	 *                                in kvp_fold16's order.
	 * A channel's sum moves by at most (top - lo) / 510 / 2 * sum_i |2 code(i, j) - L| from the float one.
	 * Returns 1; or 0, having changed nothing, when a weight (h < g, i < n) has its sign bit set (-0
	 * included), and for shapes a table's vector version leaves (AVX-512: codes of 2 or 4 bits, groups of a
	 * multiple of 16 columns, at most 4 of them, m a multiple of 64; AVX2, neon and neon-dotprod: codes of 2
	 * or 4 bits, groups of a multiple of 8 columns, at most 4 of them, m a multiple of 8): the caller then
	 * takes axpy_i16_scaled. The scalar table always computes it (the reference). Every implementation that
	 * computes it gives the same bits. ahead (NULL: none) is what the caller reads next, asked for while it
	 * computes.
	 */
	int (*axpy_u8_scaled)(unsigned bits, unsigned m, unsigned gsize, const struct kvp_row_runs *rows, unsigned g,
			      const float *w, size_t w_stride, float *acc, size_t acc_stride, const struct kvp_ahead *ahead);
	/*
	 * The Walsh-Hadamard transform of v[0..p), p a power of two, in place and unnormalized: stages
	 * h = 1, 2, 4, ..., p/2, each taking (v[j], v[j+h]) to (v[j] + v[j+h], v[j] - v[j+h]) for j with bit h
	 * clear. Every output is the same tree of sums in every implementation, so all give the same bits.
	 */
	void (*fwht)(unsigned p, float *v);
	/*
	 * TurboQuant's encoder. sym_codes: the cells of y[0..m) (m a multiple of 16) in a symmetric codebook
	 * of 2^bits levels (bits 1..4, half = 2^(bits-1)), whose positive thresholds t[0..half-1) are given as
	 * the bit patterns of their floats; with u the bit pattern of y_j read as an int32, code j =
	 * half + #{k : (u & 0x7fffffff) > t[k]} when u > 0, and half - 1 - #{k : (u & 0x7fffffff) >= t[k]}
	 * otherwise (y <= 0, -0 included). The codes are packed LSB first into m * bits / 8 bytes of out.
	 * sum_squares: eight running sums, a[j % 8] += (double)y[j] * y[j] for j below m rounded down to 8, the
	 * rest added to a[0] in order, returned as ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)). Both give
	 * the same results in every implementation.
	 */
	void (*sym_codes)(unsigned bits, unsigned m, const float *y, const int32_t *t, uint8_t *out);
	double (*sum_squares)(unsigned m, const float *y);
	/*
	 * Masked rows (SparK's per-token channel pruning). Row i's keep mask is d bits at masks + i*stride
	 * (bit j set: channel j is kept; LSB first; bits past d are ignored). Its kept channels' values, in
	 * channel order, are kept[i*kept_stride + t] for t below the mask's popcount, and nothing past that
	 * is read. signs + i*stride holds one bit per pruned channel of row i, in channel order (1 =
	 * negative), and no byte past the last pruned channel's is read; signs == NULL means pruned channels
	 * are 0 and scale, mag are not read.
	 *   mask_expand: x[i*d + j] = kept[i*kept_stride + (kept channels below j)]   when j is kept
	 *                             (sign ? -1 : 1) * (scale[i] * mag[j])              when j is pruned
	 * The result is exact (a product and a sign per value), so every implementation gives the same bits.
	 */
	void (*mask_expand)(unsigned d, unsigned n, const uint8_t *masks, const uint8_t *signs, size_t stride,
			    const float *kept, size_t kept_stride, const float *scale, const float *mag, float *x);
	/*
	 * SparK keys whose kept values are coded by one Hadamard pass (spark|turboquant), scored for the g heads
	 * of a GQA group in integers, each row decoded once for the whole group. Rows as described by *rows
	 * (struct kvp_masked_codes below), T = rows->kept a power of two in [2, 64], d <= 256. A row whose mask
	 * does not keep exactly T channels (bytes the encoder never wrote) has x_i = 0, so S(h, i) = 0:
	 *   z_i[r] = sgn[r] * ((H lut[code(i, 0..T)])[r] << shift)     r < T, H the unnormalized Walsh-Hadamard
	 *   x_i[j] = z_i[kept channels of row i below j]                   j kept
	 *            (neg ? -1 : 1) * ((rho[j] * ell[i] + 2^14) >> 15)     j pruned, neg its sign bit
	 *   S(h, i) = sum_j x_i[j] * q[h*q_stride + j]                      (int32)
	 *   out[h*out_stride + i] = ((float)S(h, i) * head_scale[h]) * row_scale[i]
	 * The caller keeps every x in int16 (127 * T << shift <= 32767, rho and ell in [0, 32767]) and the sums
	 * in int32 (d * 32767 * max |q| < 2^31), so every implementation gives the same bits.
	 */
	void (*spark_dot_i16_group)(const struct kvp_masked_codes *rows, unsigned n, const uint8_t *base,
				    const int16_t *ell, const float *row_scale, unsigned g, const int16_t *q,
				    size_t q_stride, const float *head_scale, float *out, size_t out_stride);
	/*
	 * SparK's choice of channels for one token x of d channels, 0 < kept <= d. key[j] holds the bits of
	 * channel j's score, a float >= 0 and not NaN, so that the keys order as the scores do. The kept
	 * channels are those of the kept largest keys, ties to the lower index: t is the largest key with at
	 * least kept keys >= t, found bit by bit from bit 30 down (stopping once exactly kept keys reach it), and
	 * of the keys equal to t the highest channels go until kept remain. Writes
	 *   mask:  ceil(d/8) bytes, bit j (LSB first) set when channel j is kept, bits past d clear;
	 *   signs: unless NULL, ceil((d-kept)/8) bytes: the sign bits of x's pruned channels in channel order,
	 *          LSB first from bit 0, the bits past them clear;
	 *   y:     x's kept values in channel order in y[0..kept); y has room for d floats, the rest scratch;
	 * and returns the pruned channels' scores summed in double: a[j % 8] += score j for the channels below
	 * d rounded down to 8, in channel order, those past it into a[0] after them, then
	 * ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)). Every implementation gives the same bits.
	 */
	double (*spark_choose)(unsigned d, unsigned kept, const int32_t *key, const float *x, uint8_t *mask,
			       uint8_t *signs, float *y);
	/*
	 * spark(quantize=rotated)'s tokens as dense rows of 4-bit codes, for the lut kernels: n rows as *rows
	 * describes (struct kvp_mask_rows above; d even), row i into the d / 2 bytes at codes + i * d / 2:
	 *   code j = (sign bit j << 3) | L_j,  L_j = 1 + the magnitude of the r-th kept channel when channel j is
	 *            the r-th kept one, 0 when j is pruned;
	 * code j in the low four bits of byte j / 2 when j is even, the high four when odd. A row whose mask does
	 * not keep exactly rows->kept channels (bytes the encoder never wrote) gets code 15 everywhere, and reads
	 * no magnitude. Every implementation gives the same bytes.
	 */
	void (*mask_codes)(const struct kvp_mask_rows *rows, unsigned n, const uint8_t *base, uint8_t *codes);
};

/*
 * Asks for the cache lines that start within bytes [from, to) of base, into L2, or into L1 with to_l1 (a
 * constant once inlined). Prefetches never fault, so a hint that runs past base's allocation is harmless;
 * base == NULL asks for nothing. It and the helpers below that only ask for lines are always inlined: gcc 12
 * finds a function whose only effect is prefetches "looping pure" (-fdump-tree-local-pure-const1) and drops
 * every call it has not inlined by then, silently (so a loop of them in a function of its own disappears).
 */
static inline __attribute__((always_inline)) void kvp_prefetch_lines(const void *base, size_t from, size_t to, int to_l1)
{
	if (!base)
		return;
	for (size_t at = (from + 63) & ~(size_t)63; at < to; at += 64) {
		if (to_l1)
			__builtin_prefetch((const char *)base + at, 0, 3);
		else
			__builtin_prefetch((const char *)base + at, 0, 2);
	}
}

/* kvp_prefetch_lines into L2: the kernels' own hints, whose lines are read one loop step later, long after
 * L1 would have kept them. */
static inline __attribute__((always_inline)) void kvp_prefetch_span(const void *base, size_t from, size_t to)
{
	kvp_prefetch_lines(base, from, to, 0);
}

/*
 * Byte ranges a caller reads next (lut_axpy_u8_group's ahead, a span's keys): a kernel asks for their lines
 * into L1, one share per step of its loop, while it computes; results never depend on them.
 */
struct kvp_ahead {
	unsigned n;
	const void *base[KVP_RUNS_MAX];
	size_t bytes[KVP_RUNS_MAX];
};

/* Part `part` of `parts` of the ranges taken as one run of bytes cut in equal parts, as bytes [*from, *to)
 * of that run; 0 for a NULL ahead or no parts. */
static inline int kvp_ahead_bounds(const struct kvp_ahead *a, unsigned part, unsigned parts, size_t *from, size_t *to)
{
	size_t total = 0;

	if (!a || !parts)
		return 0;
	for (unsigned i = 0; i < a->n; i++)
		total += a->bytes[i];
	*from = total * part / parts, *to = total * (part + 1) / parts;
	return 1;
}

/* The bytes [*lo, *hi) of the range starting `at` bytes into the run, `bytes` long, that lie in [from, to);
 * 0 when none do. */
static inline int kvp_ahead_clip(size_t at, size_t bytes, size_t from, size_t to, size_t *lo, size_t *hi)
{
	*lo = from > at ? from - at : 0, *hi = to < at + bytes ? to - at : bytes;
	return at < to && at + bytes > from;
}

/* Part `part` of `parts` of the ranges (kvp_ahead_bounds): an ahead of its own for one of several calls. */
static inline struct kvp_ahead kvp_ahead_part(const struct kvp_ahead *a, unsigned part, unsigned parts)
{
	struct kvp_ahead p = { .n = 0 };
	size_t from, to, lo, hi, at = 0;

	if (!kvp_ahead_bounds(a, part, parts, &from, &to))
		return p;
	for (unsigned i = 0; i < a->n; at += a->bytes[i++])
		if (kvp_ahead_clip(at, a->bytes[i], from, to, &lo, &hi))
			p.base[p.n] = (const char *)a->base[i] + lo, p.bytes[p.n++] = hi - lo;
	return p;
}

/* Share `step` of `steps` of the ranges' lines (kvp_ahead_bounds), each line as its range's alignment puts it. */
static inline __attribute__((always_inline)) void kvp_ahead_share(const struct kvp_ahead *a, unsigned step, unsigned steps)
{
	size_t from, to, lo, hi, at = 0;

	if (!kvp_ahead_bounds(a, step, steps, &from, &to))
		return;
	for (unsigned i = 0; i < a->n; at += a->bytes[i++])
		if (kvp_ahead_clip(at, a->bytes[i], from, to, &lo, &hi))
			kvp_prefetch_lines(a->base[i], lo, hi, 1);
}

/* Bytes of ahead one of `steps` loop steps asks for, so that the steps cover `bytes` (0 without steps). */
static inline size_t kvp_prefetch_share(size_t bytes, size_t steps)
{
	return steps ? (bytes + steps - 1) / steps : 0;
}

/*
 * One band's magnitude, for band_norms and the scalar tails of its vector versions. Separate statements,
 * so no compiler fuses the products into the sum: every implementation rounds the same steps.
 */
static inline float kvp_band_norm(float re, float im)
{
	float rr = re * re, ii = im * im, sum = rr + ii;

	return sqrtf(sum);
}

/*
 * Packed codes for the vector lut kernels (layout in struct kvp_kernels). Eight codes of b bits fill
 * exactly b bytes, so the block of codes j..j+7 (j a multiple of 8) is one little-endian word of b <= 4
 * bytes at byte j*b/8. Always inlined, so nbytes and bits are constants in each width's own loop.
 *
 * kvp_code_word: nbytes bytes, byte by byte. With nbytes a constant this folds to one or two loads; a
 * variable-length memcpy would be a library call per block.
 */
static inline __attribute__((always_inline)) uint32_t kvp_code_word(const uint8_t *p, unsigned nbytes)
{
	switch (nbytes) {
	case 1: return p[0];
	case 2: return (uint32_t)p[0] | (uint32_t)p[1] << 8;
	case 3: return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16;
	case 4: return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
	default: return 0;
	}
}

/* The word of the block of codes j..j+7 of a row of m codes. A 3-bit block is 3 bytes; when another
 * whole block follows it in the row, one 4-byte load (the top byte is shifted out) replaces three. */
static inline __attribute__((always_inline)) uint32_t kvp_code_block(const uint8_t *row, unsigned j, unsigned bits,
								      unsigned m)
{
	const uint8_t *p = row + j * bits / 8;

	if (bits == 3 && j + 16 <= m) {
		uint32_t w;
		memcpy(&w, p, sizeof w);
		return w;
	}
	return kvp_code_word(p, bits);
}

/* The weights of lut_axpy_i16_group: at most this magnitude, and at most this many rows per call. */
#define KVP_WEIGHT_MAX 4095.0f
#define KVP_AXPY_I16_ROWS 256u

/* KVP_WEIGHT_MAX / top, or 0 where that is not a finite float (top 0 or below 1e-35: such weights count as
 * 0, where an infinite factor would leave the integers undefined). */
static inline float kvp_weight_inv(float top)
{
	return top > KVP_WEIGHT_MAX / 3.0e38f ? KVP_WEIGHT_MAX / top : 0.0f;
}

/* Nearest integer, halves away from zero, as every implementation of the integer lookups rounds. */
static inline int32_t kvp_nearest(float x)
{
	return (int32_t)(x + (x < 0.0f ? -0.5f : 0.5f));
}

/* Nearest integer, ties to even (the default rounding mode, which the library runs in), as KIVI's kernels
 * round: their vector versions convert with embedded round-to-nearest, one instruction. */
static inline int32_t kvp_nearest_even(float x)
{
	return (int32_t)nearbyintf(x);
}

/* The float at p, wherever it is. */
static inline float kvp_load_f32(const uint8_t *p)
{
	float v;

	memcpy(&v, p, sizeof v);
	return v;
}

/* One head's weights as lut_axpy_i16_group rounds them, in plain code; returns top / KVP_WEIGHT_MAX. */
static inline float kvp_weights_i16(unsigned n, const float *w, const uint8_t *row_scale, size_t scale_stride,
				    int16_t *w16)
{
	float top = 0.0f, inv;

	for (unsigned i = 0; i < n; i++) {
		float u = w[i] * kvp_load_f32(row_scale + i * scale_stride);
		top = fabsf(u) > top ? fabsf(u) : top;
	}
	inv = kvp_weight_inv(top);
	for (unsigned i = 0; i < n; i++)
		w16[i] = (int16_t)kvp_nearest((w[i] * kvp_load_f32(row_scale + i * scale_stride)) * inv);
	return top / KVP_WEIGHT_MAX;
}

/* One score of lut_dot_i8_group: x added to *o (add 1) or written over it (add 0). */
static inline void kvp_put_score(float *o, float x, int add)
{
	*o = add ? *o + x : x;
}

/* The largest weight of lut_axpy_u8_group, and KVP_WEIGHT_MAX_U8 / top as kvp_weight_inv gives it. */
#define KVP_WEIGHT_MAX_U8 255.0f

static inline float kvp_weight_inv_u8(float top)
{
	return top > KVP_WEIGHT_MAX_U8 / 3.0e38f ? KVP_WEIGHT_MAX_U8 / top : 0.0f;
}

/* u as lut_axpy_u8_group takes it: the product where it is > 0, else 0. */
static inline float kvp_weight_u8_in(float w, float scale)
{
	const float u = w * scale;

	return u > 0.0f ? u : 0.0f;
}

/* One weight of lut_axpy_u8_group: x = (u - lo) * inv to the nearest integer in [0, 255]; 0 unless x > 0. */
static inline uint8_t kvp_weight_u8(float u, float lo, float inv)
{
	const float x = (u - lo) * inv;
	int32_t v;

	if (!(x > 0.0f))
		return 0;
	v = (int32_t)(x + 0.5f);
	return (uint8_t)(v < 255 ? v : 255);
}

/* One head's weights as lut_axpy_u8_group rounds them, in plain code; sets *lo, returns (top - lo) / 255. */
static inline float kvp_weights_u8(const struct kvp_row_runs *rows, const float *w, uint8_t *w8, float *lo)
{
	const unsigned n = rows->n;
	float top = 0.0f, least = 0.0f, inv;

	for (unsigned i = 0; i < n; i++) {
		const float u = kvp_weight_u8_in(w[i], kvp_load_f32(kvp_run_scale(rows, i)));

		top = u > top ? u : top;
		least = i == 0 || u < least ? u : least;
	}
	inv = kvp_weight_inv_u8(top - least);
	for (unsigned i = 0; i < n; i++)
		w8[i] = kvp_weight_u8(kvp_weight_u8_in(w[i], kvp_load_f32(kvp_run_scale(rows, i))), least, inv);
	*lo = least;
	return (top - least) / KVP_WEIGHT_MAX_U8;
}

/* Code j of a row packed LSB first (1 to 8 bits; a code spans at most two bytes). */
static inline unsigned kvp_row_code(const uint8_t *row, unsigned j, unsigned bits)
{
	const size_t o = (size_t)j * bits;
	const unsigned shift = (unsigned)(o & 7);
	unsigned v = (unsigned)row[o >> 3] >> shift;

	if (shift + bits > 8)
		v |= (unsigned)row[(o >> 3) + 1] << (8 - shift);
	return v & ((1u << bits) - 1);
}

/* Whether a weight w[h*w_stride + i] (h < g, i < n) has its sign bit set (-0 included): the 8-bit kernels
 * decline those. */
static inline int kvp_any_sign_bit(unsigned g, unsigned n, const float *w, size_t w_stride)
{
	for (unsigned h = 0; h < g; h++)
		for (unsigned i = 0; i < n; i++)
			if (signbit(w[h * w_stride + i]))
				return 1;
	return 0;
}

/* lut_axpy_u8_group in plain code: the scalar reference, and the tables without a vector version. Columns in
 * passes of 256, whose int32 sums live on the stack. */
static inline int kvp_lut_axpy_u8_plain(unsigned bits, unsigned m, const struct kvp_row_runs *rows,
					const int8_t *lut, float unit, unsigned g, const float *w, size_t w_stride,
					float *acc, size_t acc_stride, const struct kvp_ahead *ahead)
{
	const unsigned n = rows->n;
	uint8_t w8[KVP_AXPY_I16_ROWS];
	int32_t sums[256], cols[256];

	(void)ahead; /* plain code: the hardware's own prefetcher */
	if (kvp_any_sign_bit(g, n, w, w_stride))
		return 0;
	for (unsigned h = 0; h < g; h++) {
		float lo;
		const float f = unit * kvp_weights_u8(rows, w + h * w_stride, w8, &lo), e = unit * lo;

		for (unsigned j0 = 0; j0 < m; j0 += 256) {
			const unsigned k = m - j0 < 256 ? m - j0 : 256;

			memset(sums, 0, sizeof sums);
			memset(cols, 0, sizeof cols);
			for (unsigned i = 0; i < n; i++)
				for (unsigned j = 0; j < k; j++) {
					const int32_t v = lut[kvp_row_code(kvp_run_codes(rows, i), j0 + j, bits)];

					sums[j] += w8[i] * v;
					cols[j] += v;
				}
			for (unsigned j = 0; j < k; j++)
				acc[h * acc_stride + j0 + j] += f * (float)sums[j] + e * (float)cols[j];
		}
	}
	return 1;
}

/* How many of n keys are >= t: with n a constant 16, a loop gcc vectorizes at -O2 (it takes none of unknown
 * count). */
static inline unsigned kvp_count_at_least(const int32_t *restrict key, int32_t t, unsigned n)
{
	unsigned c = 0;

	for (unsigned j = 0; j < n; j++)
		c += key[j] >= t;
	return c;
}

/* spark_choose in plain code: the scalar reference, and the tables without a vector version. */
static inline int32_t kvp_spark_threshold(unsigned d, unsigned kept, const int32_t *key)
{
	int32_t t = 0;

	for (int b = 30; b >= 0; b--) {
		const int32_t cand = t | (int32_t)1 << b;
		unsigned c = 0, j = 0;

		for (; j + 16 <= d; j += 16)
			c += kvp_count_at_least(key + j, cand, 16);
		c += kvp_count_at_least(key + j, cand, d - j);
		if (c >= kept) {
			t = cand;
			if (c == kept)
				break;
		}
	}
	return t;
}

/* spark_choose's sign bits, appended LSB first a 64-bit word at a time into out (NULL: only counted). */
struct kvp_bit_run {
	uint8_t *out;
	uint64_t word;
	unsigned done, n; /* bits written out, bits in word */
};

/* Appends bit (0 or 1) when take is 1; nothing when it is 0 (so the caller need not branch). */
static inline void kvp_bit_put(struct kvp_bit_run *b, unsigned bit, unsigned take)
{
	b->word |= (uint64_t)(bit & take) << b->n;
	b->n += take;
	if (b->n == 64) {
		if (b->out)
			memcpy(b->out + b->done / 8, &b->word, sizeof b->word);
		b->done += 64, b->n = 0, b->word = 0;
	}
}

/* The bytes of the bits still in the word. */
static inline void kvp_bit_end(const struct kvp_bit_run *b)
{
	for (unsigned i = 0; b->out && i < (b->n + 7) / 8; i++)
		b->out[b->done / 8 + i] = (uint8_t)(b->word >> 8 * i);
}

/* spark_choose's sum of the pruned scores, from a[j % 8], the pruned scores of the channels below d rounded
 * down to 8: the pruned channels past them (mask bit clear) go into a[0], then the sums are folded. */
static inline double kvp_spark_pruned_sum(unsigned d, const int32_t *key, const uint8_t *mask, double a[8])
{
	for (unsigned j = d & ~7u; j < d; j++) {
		float score;

		memcpy(&score, key + j, sizeof score);
		if (!(mask[j >> 3] >> (j & 7) & 1))
			a[0] += score;
	}
	return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

/* Without a branch on the data (half the channels go, at random): the kept value is written wherever the next
 * one goes and counted only when kept, a kept channel adds +0 to its sum, and the signs collect in a word. */
static inline double kvp_spark_choose_plain(unsigned d, unsigned kept, const int32_t *key, const float *x,
					    uint8_t *mask, uint8_t *signs, float *y)
{
	const int32_t t = kvp_spark_threshold(d, kept, key);
	struct kvp_bit_run sign = { .out = signs };
	unsigned above = 0, ties, n = 0;
	double a[8] = { 0 };

	for (unsigned j = 0; j < d; j++)
		above += key[j] > t;
	ties = kept - above; /* the keys equal to t that stay: the lowest channels' */
	memset(mask, 0, (d + 7) / 8);
	for (unsigned j = 0; j < d; j++) {
		const unsigned eq = key[j] == t, keep = (key[j] > t) | (eq & (ties != 0)), go = keep ^ 1u;
		const int32_t bits = key[j] & -(int32_t)go;
		uint32_t xb;
		float score;

		ties -= eq & keep;
		mask[j >> 3] |= (uint8_t)(keep << (j & 7));
		y[n] = x[j];
		n += keep;
		memcpy(&score, &bits, sizeof score);
		if (j < (d & ~7u))
			a[j % 8] += score;
		memcpy(&xb, x + j, sizeof xb);
		kvp_bit_put(&sign, xb >> 31, go);
	}
	kvp_bit_end(&sign);
	return kvp_spark_pruned_sum(d, key, mask, a);
}

/* The most channels dot_i8_scaled takes. */
#define KVP_SCALED_DOT_DIM_MAX 4096u

/* The little-endian fp16 number at p + 2j as a float. */
static inline float kvp_f16_at(const uint8_t *p, unsigned j)
{
	return kvp_f16_to_f32((uint16_t)(p[2 * (size_t)j] | p[2 * (size_t)j + 1] << 8));
}

/* dot_i8_scaled's query: Q_j = kvp_nearest_even((q_j * s_j) * inv), inv = 127 / max_j |q_j * s_j| (0 where
 * that is not a finite float), s_j the fp16 numbers at s; returns the step, max / 127. */
static inline float kvp_scaled_query_i8(unsigned m, const float *q, const uint8_t *s, int8_t *q8)
{
	float top = 0.0f, inv;

	for (unsigned j = 0; j < m; j++) {
		float u = q[j] * kvp_f16_at(s, j);
		top = fabsf(u) > top ? fabsf(u) : top;
	}
	inv = top > 127.0f / 3.0e38f ? 127.0f / top : 0.0f;
	for (unsigned j = 0; j < m; j++)
		q8[j] = (int8_t)kvp_nearest_even((q[j] * kvp_f16_at(s, j)) * inv);
	return top / 127.0f;
}

/* Code j of row i of n rows stored by columns (dot_i8_scaled's layout). */
static inline unsigned kvp_column_code(const uint8_t *codes, unsigned n, unsigned i, unsigned j, unsigned bits)
{
	const size_t o = (size_t)j * bits, k = o >> 3;
	const unsigned shift = (unsigned)(o & 7);
	unsigned v = (unsigned)codes[k * n + i] >> shift;

	if (shift + bits > 8)
		v |= (unsigned)codes[(k + 1) * n + i] << (8 - shift);
	return v & ((1u << bits) - 1);
}

/*
 * The float sum of a(i) * b(i), i < n, in one order every implementation keeps: sixteen running sums, lane
 * i % 16 taking each rounded product in turn (from +0), then halves folded: lane l + lane l + 8 (l < 8), then
 * l + 4, l + 2, l + 1 (the order of sixteen vector lanes reduced by halves).
 */
static inline float kvp_fold16(float p[16])
{
	for (unsigned w = 8; w; w /= 2)
		for (unsigned l = 0; l < w; l++)
			p[l] += p[l + w];
	return p[0];
}

/* The float sum of a[j] * (fp16 at b + 2j), j < m, in kvp_fold16's order. */
static inline float kvp_dot_f16_fold16(unsigned m, const float *a, const uint8_t *b)
{
	float p[16] = { 0 };

	for (unsigned j = 0; j < m; j++)
		p[j % 16] += a[j] * kvp_f16_at(b, j);
	return kvp_fold16(p);
}

/* Bytes of one of dot_i8_scaled's key groups: m fp16 z, m fp16 s, n rows of ceil(m*bits/8) code bytes. */
static inline size_t kvp_scaled_group_bytes(unsigned bits, unsigned m, unsigned n)
{
	return 4 * (size_t)m + (size_t)n * (((size_t)m * bits + 7) / 8);
}

/* One group of dot_i8_scaled in plain code (the scalar reference's, and the tables' for shapes their vector
 * versions leave). */
static inline void kvp_dot_i8_scaled_group_plain(unsigned bits, unsigned m, unsigned n, const uint8_t *group,
						 unsigned g, const float *q, size_t q_stride, float *out,
						 size_t out_stride)
{
	const uint8_t *codes = group + 4 * (size_t)m;
	int8_t q8[KVP_SCALED_DOT_DIM_MAX];

	for (unsigned h = 0; h < g; h++) {
		const float step = kvp_scaled_query_i8(m, q + h * q_stride, group + 2 * (size_t)m, q8);
		const float z = kvp_dot_f16_fold16(m, q + h * q_stride, group);

		for (unsigned i = 0; i < n; i++) {
			int32_t sum = 0;
			for (unsigned j = 0; j < m; j++)
				sum += q8[j] * (int32_t)kvp_column_code(codes, n, i, j, bits);
			out[h * out_stride + i] = z + (float)sum * step;
		}
	}
}

/* A dot_i8_scaled (the contract above) from a version for one group (one): the groups in turn. */
#define KVP_SCALED_GROUPS(name, one)                                                                           \
	static inline void name(unsigned bits, unsigned m, unsigned n, unsigned groups, const uint8_t *group,  \
				unsigned g, const float *q, size_t q_stride, float *out, size_t out_stride)    \
	{                                                                                                      \
		const size_t bytes = kvp_scaled_group_bytes(bits, m, n);                                       \
                                                                                                               \
		for (unsigned k = 0; k < groups; k++)                                                          \
			one(bits, m, n, group + k * bytes, g, q, q_stride, out + (size_t)k * n, out_stride);    \
	}

/* dot_i8_scaled in plain code: the scalar reference. */
KVP_SCALED_GROUPS(kvp_dot_i8_scaled_plain, kvp_dot_i8_scaled_group_plain)


/* Scalar e of row i in axpy_i16_scaled's layout (z(i, e) for e < ng, then s(i, e - ng)). */
static inline float kvp_row_scalar(const uint8_t *rows, size_t stride, unsigned i, unsigned e)
{
	const uint8_t *p = rows + i * stride + 2 * (size_t)e;

	return kvp_f16_to_f32((uint16_t)(p[0] | p[1] << 8));
}

/* axpy_i16_scaled in plain code: the scalar reference, and the tables without a vector version. Columns in
 * passes of 256, whose int32 sums live on the stack. */
static inline void kvp_axpy_i16_scaled_plain(unsigned bits, unsigned m, unsigned gsize, unsigned n,
					     const uint8_t *rows, size_t stride, unsigned g, const float *w,
					     size_t w_stride, float *acc, size_t acc_stride)
{
	const unsigned ng = (m + gsize - 1) / gsize;
	const uint8_t *codes = rows + 4 * (size_t)ng;
	int32_t sums[256];

	for (unsigned h = 0; h < g; h++) {
		const float *wh = w + h * w_stride;
		float top = 0.0f, inv, f;

		for (unsigned c = 0; c < ng; c++) {
			float p[16] = { 0 };
			for (unsigned i = 0; i < n; i++)
				p[i % 16] += wh[i] * kvp_row_scalar(rows, stride, i, c);
			acc[h * acc_stride + m + c] += kvp_fold16(p);
		}
		for (unsigned i = 0; i < n; i++)
			for (unsigned c = 0; c < ng; c++) {
				float u = wh[i] * kvp_row_scalar(rows, stride, i, ng + c);
				top = fabsf(u) > top ? fabsf(u) : top;
			}
		inv = kvp_weight_inv(top);
		f = top / KVP_WEIGHT_MAX;
		for (unsigned j0 = 0; j0 < m; j0 += 256) {
			const unsigned k = m - j0 < 256 ? m - j0 : 256;

			memset(sums, 0, sizeof sums);
			for (unsigned i = 0; i < n; i++)
				for (unsigned j = 0; j < k; j++) {
					const unsigned c = (j0 + j) / gsize;
					const int32_t wq = kvp_nearest_even((wh[i] * kvp_row_scalar(rows, stride, i, ng + c)) * inv);
					sums[j] += wq * (int32_t)kvp_row_code(codes + i * stride, j0 + j, bits);
				}
			for (unsigned j = 0; j < k; j++)
				acc[h * acc_stride + j0 + j] += f * (float)sums[j];
		}
	}
}

/* axpy_u8_scaled's integer value of a code: 2 code - (2^bits - 1), odd and centred on 0. */
static inline int32_t kvp_centred_code(unsigned code, unsigned bits)
{
	return 2 * (int32_t)code - (int32_t)((1u << bits) - 1);
}

/* axpy_u8_scaled in plain code: the scalar reference. Columns in passes of 256, whose int32 sums live on the
 * stack. */
static inline int kvp_axpy_u8_scaled_plain(unsigned bits, unsigned m, unsigned gsize, const struct kvp_row_runs *rows,
					   unsigned g, const float *w, size_t w_stride, float *acc, size_t acc_stride,
					   const struct kvp_ahead *ahead)
{
	const unsigned n = rows->n, ng = (m + gsize - 1) / gsize;
	const float half_levels = (float)((1u << bits) - 1) * 0.5f;
	int32_t sums[256], cols[256];

	(void)ahead; /* plain code: the hardware's own prefetcher */
	if (kvp_any_sign_bit(g, n, w, w_stride))
		return 0;
	for (unsigned h = 0; h < g; h++) {
		const float *wh = w + h * w_stride;
		float *ah = acc + h * acc_stride, top = 0.0f, lo = 0.0f, inv, f;

		for (unsigned c = 0; c < ng; c++) {
			float p[16] = { 0 };

			for (unsigned i = 0; i < n; i++) {
				const uint8_t *rec = kvp_run_codes(rows, i);

				p[i % 16] += wh[i] * (kvp_row_scalar(rec, 0, 0, c) + kvp_row_scalar(rec, 0, 0, ng + c) * half_levels);
			}
			ah[m + c] += kvp_fold16(p);
		}
		for (unsigned i = 0; i < n; i++)
			for (unsigned c = 0; c < ng; c++) {
				const float u = kvp_weight_u8_in(wh[i], kvp_row_scalar(kvp_run_codes(rows, i), 0, 0, ng + c));

				top = u > top ? u : top;
				lo = (i == 0 && c == 0) || u < lo ? u : lo;
			}
		inv = kvp_weight_inv_u8(top - lo);
		f = (top - lo) / (2.0f * KVP_WEIGHT_MAX_U8);
		for (unsigned j0 = 0; j0 < m; j0 += 256) {
			const unsigned k = m - j0 < 256 ? m - j0 : 256;

			memset(sums, 0, sizeof sums);
			memset(cols, 0, sizeof cols);
			for (unsigned i = 0; i < n; i++) {
				const uint8_t *rec = kvp_run_codes(rows, i);

				for (unsigned j = 0; j < k; j++) {
					const unsigned c = (j0 + j) / gsize;
					const int32_t v = kvp_centred_code(kvp_row_code(rec + 4 * (size_t)ng, j0 + j, bits), bits);
					const float u = kvp_weight_u8_in(wh[i], kvp_row_scalar(rec, 0, 0, ng + c));

					sums[j] += kvp_weight_u8(u, lo, inv) * v;
					cols[j] += v;
				}
			}
			for (unsigned j = 0; j < k; j++)
				ah[j0 + j] += f * (float)sums[j] + (lo * 0.5f) * (float)cols[j];
		}
	}
	return 1;
}

/* The end of sum_squares (contract in struct kvp_kernels): the values from j on into a[0], then the tree. */
static inline double kvp_sum_squares_end(double a[8], unsigned j, unsigned m, const float *y)
{
	for (; j < m; j++)
		a[0] += (double)y[j] * y[j];
	return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

/* Eight codes of `bits` bits into `bits` bytes, LSB first (sym_codes' packing without BMI2). */
static inline void kvp_pack8(const int32_t code[8], unsigned bits, uint8_t *out)
{
	uint64_t word = 0;

	for (unsigned l = 0; l < 8; l++)
		word |= (uint64_t)(uint32_t)code[l] << (bits * l);
	for (unsigned q = 0; q < bits; q++)
		out[q] = (uint8_t)(word >> (8 * q));
}

/* Code j of `bits` bits into a zeroed row, LSB first (a code spans at most two bytes). */
static inline void kvp_code_put(uint8_t *row, unsigned j, unsigned bits, unsigned v)
{
	size_t o = (size_t)j * bits;

	row[o >> 3] |= (uint8_t)(v << (o & 7));
	if ((o & 7) + bits > 8)
		row[(o >> 3) + 1] |= (uint8_t)(v >> (8 - (o & 7)));
}

/* Set bits of w by halves, quarters, ...: without -mpopcnt, __builtin_popcountll is a call into libgcc,
 * which a token's check would pay on the query path. */
static inline unsigned kvp_popcount64(uint64_t w)
{
	w -= (w >> 1) & 0x5555555555555555u;
	w = (w & 0x3333333333333333u) + ((w >> 2) & 0x3333333333333333u);
	w = (w + (w >> 4)) & 0x0f0f0f0f0f0f0f0fu;
	return (unsigned)((w * 0x0101010101010101u) >> 56);
}

/* The set bits among the first d of a keep mask (LSB first; bits past d are not counted). */
static inline unsigned kvp_mask_count(unsigned d, const uint8_t *mask)
{
	unsigned bits = 0, j = 0;

	for (; j + 64 <= d; j += 64) {
		uint64_t w;
		memcpy(&w, mask + j / 8, sizeof w);
		bits += kvp_popcount64(w);
	}
	for (; j < d; j++)
		bits += mask[j >> 3] >> (j & 7) & 1;
	return bits;
}

/* mask_codes in plain code: the scalar reference, and the tables without a vector version. */
static inline void kvp_mask_codes_plain(const struct kvp_mask_rows *rows, unsigned n, const uint8_t *base,
					uint8_t *codes)
{
	const unsigned d = rows->d, mb = rows->mb;

	for (unsigned i = 0; i < n; i++) {
		const uint8_t *row = base + (size_t)i * rows->stride;
		const uint8_t *mask = row + rows->mask_at, *sign = row + rows->sign_at, *mag = row + rows->mag_at;
		uint8_t *out = codes + (size_t)i * (d / 2);
		unsigned r = 0;

		if (kvp_mask_count(d, mask) != rows->kept) {
			memset(out, 0xff, d / 2);
			continue;
		}
		memset(out, 0, d / 2);
		for (unsigned j = 0; j < d; j++) {
			unsigned code = (unsigned)(sign[j >> 3] >> (j & 7) & 1) << 3;

			if (mask[j >> 3] >> (j & 7) & 1) {
				size_t o = (size_t)r++ * mb;
				unsigned m = 0;

				for (unsigned b = 0; b < mb; b++, o++)
					m |= (unsigned)(mag[o >> 3] >> (o & 7) & 1) << b;
				code |= 1 + m;
			}
			out[j / 2] |= (uint8_t)(code << 4 * (j & 1));
		}
	}
}

/* Byte j of entry m is the number of set bits of m below bit j: where the value of a kept channel j of a
 * mask byte m sits among that byte's kept values. Shared by the vector mask_expand kernels. */
extern const uint64_t kvp_kernels_mask_below[256];

/* The set bits of mask byte m from its entry below = kvp_kernels_mask_below[m] (the bits below bit 7, and bit
 * 7): a count without a POPCNT instruction where the entry is loaded anyway. */
static inline unsigned kvp_mask_below_count(uint64_t below, unsigned m)
{
	return (unsigned)(below >> 56) + (m >> 7 & 1);
}

/* The implementation chosen for this process (KVP_KERNELS or the best the CPU supports). */
const struct kvp_kernels *kvp_kernels(void);
/* A named implementation, or NULL when this build or CPU cannot run it. For tests and benchmarks. */
const struct kvp_kernels *kvp_kernels_named(const char *name);

extern const struct kvp_kernels kvp_kernels_scalar;
#if defined(__x86_64__)
extern const struct kvp_kernels kvp_kernels_avx2;
extern const struct kvp_kernels kvp_kernels_avx2_vnni;
extern const struct kvp_kernels kvp_kernels_avx512;
#endif
#if defined(__aarch64__)
extern const struct kvp_kernels kvp_kernels_neon;
extern const struct kvp_kernels kvp_kernels_neon_dotprod;
#endif

#endif /* KVP_KERNELS_H */
