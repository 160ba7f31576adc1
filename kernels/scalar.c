/*
 * The reference kernels: plain loops in the order the contract in kernels.h reads. Every vector version
 * is tested against these, so they favour obviousness over speed.
 */
#include <math.h>
#include <string.h>

#include "base/base.h"
#include "kernels/kernels.h"

static void dot_f32(unsigned d, unsigned n, const float *rows, const float *q, float scale, float *out)
{
	for (unsigned i = 0; i < n; i++) {
		const float *r = rows + (size_t)i * d;
		float s = 0.0f;

		for (unsigned j = 0; j < d; j++)
			s += r[j] * q[j];
		out[i] = scale * s;
	}
}

static void dot_f16(unsigned d, unsigned n, const uint16_t *rows, const float *q, float scale, float *out)
{
	for (unsigned i = 0; i < n; i++) {
		const uint16_t *r = rows + (size_t)i * d;
		float s = 0.0f;

		for (unsigned j = 0; j < d; j++)
			s += kvp_f16_to_f32(r[j]) * q[j];
		out[i] = scale * s;
	}
}

static void axpy_f32(unsigned d, unsigned n, const float *rows, const float *w, float *acc)
{
	for (unsigned i = 0; i < n; i++) {
		const float *r = rows + (size_t)i * d;

		for (unsigned j = 0; j < d; j++)
			acc[j] += w[i] * r[j];
	}
}

static void axpy_f16(unsigned d, unsigned n, const uint16_t *rows, const float *w, float *acc)
{
	for (unsigned i = 0; i < n; i++) {
		const uint16_t *r = rows + (size_t)i * d;

		for (unsigned j = 0; j < d; j++)
			acc[j] += w[i] * kvp_f16_to_f32(r[j]);
	}
}

/* The reference reads no ahead: a prefetch changes when bytes arrive, never what is computed. */
static void dot_f16_group(unsigned d, unsigned n, const uint16_t *rows, unsigned g, const float *q,
			  float scale, float *out, const uint16_t *ahead)
{
	(void)ahead;
	for (unsigned h = 0; h < g; h++)
		dot_f16(d, n, rows, q + (size_t)h * d, scale, out + (size_t)h * n);
}

static void axpy_f16_group(unsigned d, unsigned n, const uint16_t *rows, unsigned g, const float *w,
			   float *acc, const uint16_t *ahead)
{
	(void)ahead;
	for (unsigned h = 0; h < g; h++)
		axpy_f16(d, n, rows, w + (size_t)h * n, acc + (size_t)h * d);
}

static void f32_to_f16(size_t n, const float *x, uint16_t *y)
{
	for (size_t i = 0; i < n; i++)
		y[i] = kvp_f32_to_f16(x[i]);
}

static void f16_to_f32(size_t n, const uint16_t *x, float *y)
{
	for (size_t i = 0; i < n; i++)
		y[i] = kvp_f16_to_f32(x[i]);
}

/*
 * When the new maximum is still -inf (every score so far masked out) exp(-inf - -inf) would be NaN;
 * nothing has been accumulated yet, so zero weights, a zero sum and a zero factor are the true values.
 * The vector versions treat this case the same way.
 */
static float softmax_step(unsigned n, float *s, float *m, float *l)
{
	float mx = *m;

	for (unsigned i = 0; i < n; i++)
		mx = fmaxf(mx, s[i]);
	if (mx == -INFINITY) {
		for (unsigned i = 0; i < n; i++)
			s[i] = 0.0f;
		*l = 0.0f;
		return 0.0f;
	}

	float sum = 0.0f;

	for (unsigned i = 0; i < n; i++) {
		s[i] = expf(s[i] - mx);
		sum += s[i];
	}

	float corr = expf(*m - mx);

	*l = *l * corr + sum;
	*m = mx;
	return corr;
}

static void scale(unsigned d, float a, float *y)
{
	for (unsigned j = 0; j < d; j++)
		y[j] *= a;
}

static void softmax_group(unsigned n, unsigned g, float scale_by, float *s, float *raw, size_t raw_stride,
			  float *m, float *l, float *corr)
{
	scale(g * n, scale_by, s);
	for (unsigned h = 0; h < g; h++) {
		if (raw)
			memcpy(raw + h * raw_stride, s + (size_t)h * n, n * sizeof *s);
		corr[h] = softmax_step(n, s + (size_t)h * n, &m[h], &l[h]);
	}
}

/* Code j of a row: up to 4 bits, so it spans at most two bytes. */
static unsigned code_at(const uint8_t *row, unsigned bits, unsigned j)
{
	size_t o = (size_t)j * bits;
	unsigned v = row[o >> 3] >> (o & 7);

	if ((o & 7) + bits > 8)
		v |= (unsigned)row[(o >> 3) + 1] << (8 - (o & 7));
	return v & ((1u << bits) - 1);
}

static void lut_dot(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
		    const float *lut, const float *q, float *out)
{
	for (unsigned i = 0; i < n; i++) {
		const uint8_t *row = codes + (size_t)i * stride;
		float s = 0.0f;

		for (unsigned j = 0; j < m; j++)
			s += lut[code_at(row, bits, j)] * q[j];
		out[i] = s;
	}
}

static void lut_axpy(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
		     const float *lut, const float *w, float *acc)
{
	for (unsigned i = 0; i < n; i++) {
		const uint8_t *row = codes + (size_t)i * stride;

		for (unsigned j = 0; j < m; j++)
			acc[j] += w[i] * lut[code_at(row, bits, j)];
	}
}

static void lut_dot_group(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			  const float *lut, unsigned g, const float *q, size_t q_stride, float *out)
{
	for (unsigned h = 0; h < g; h++)
		lut_dot(bits, m, n, codes, stride, lut, q + h * q_stride, out + (size_t)h * n);
}

static void lut_axpy_group(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			   const float *lut, unsigned g, const float *w, float *acc, size_t acc_stride)
{
	for (unsigned h = 0; h < g; h++)
		lut_axpy(bits, m, n, codes, stride, lut, w + (size_t)h * n, acc + h * acc_stride);
}

static void fwht(unsigned p, float *v)
{
	for (unsigned h = 1; h < p; h *= 2)
		for (unsigned i = 0; i < p; i += 2 * h)
			for (unsigned j = i; j < i + h; j++) {
				float a = v[j], b = v[j + h];
				v[j] = a + b;
				v[j + h] = a - b;
			}
}

static void sym_codes(unsigned bits, unsigned m, const float *y, const int32_t *t, uint8_t *out)
{
	const int32_t half = 1 << (bits - 1);

	memset(out, 0, (size_t)m * bits / 8);
	for (unsigned j = 0; j < m; j++) {
		int32_t u, a, cnt = 0;

		memcpy(&u, y + j, sizeof u);
		a = u & 0x7fffffff;
		for (int32_t k = 0; k + 1 < half; k++)
			cnt += u > 0 ? a > t[k] : a >= t[k];
		kvp_code_put(out, j, bits, (unsigned)(u > 0 ? half + cnt : half - 1 - cnt));
	}
}

static double sum_squares(unsigned m, const float *y)
{
	double a[8] = { 0 };
	unsigned j = 0;

	for (; j + 8 <= m; j += 8)
		for (unsigned l = 0; l < 8; l++)
			a[l] += (double)y[j + l] * y[j + l];
	return kvp_sum_squares_end(a, j, m, y);
}

static void lut_dot_i8_group(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			     const int8_t *lut, unsigned g, const int8_t *q, size_t q_stride, const float *head_scale,
			     const uint8_t *row_scale, size_t scale_stride, float *out, size_t out_stride, int add)
{
	for (unsigned h = 0; h < g; h++)
		for (unsigned i = 0; i < n; i++) {
			const uint8_t *row = codes + (size_t)i * stride;
			int32_t s = 0;

			for (unsigned j = 0; j < m; j++)
				s += lut[code_at(row, bits, j)] * q[h * q_stride + j];
			kvp_put_score(out + h * out_stride + i,
				      ((float)s * head_scale[h]) * kvp_load_f32(row_scale + i * scale_stride), add);
		}
}

static void lut_axpy_i16_group(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			       const int16_t *lut, float unit, unsigned g, const float *w, size_t w_stride,
			       const uint8_t *row_scale, size_t scale_stride, float *acc, size_t acc_stride,
			       const struct kvp_ahead *ahead)
{
	int16_t w16[KVP_AXPY_I16_ROWS];

	(void)ahead; /* the reference: no hints */

	for (unsigned h = 0; h < g; h++) {
		float f = unit * kvp_weights_i16(n, w + h * w_stride, row_scale, scale_stride, w16);
		float *a = acc + h * acc_stride;

		for (unsigned j = 0; j < m; j++) {
			int32_t s = 0;

			for (unsigned i = 0; i < n; i++)
				s += w16[i] * lut[code_at(codes + (size_t)i * stride, bits, j)];
			a[j] += f * (float)s;
		}
	}
}

/* Built by the preprocessor so the table is constant data, not something filled at start-up. */
#define BIT(m, j) (((m) >> (j)) & 1u)
#define BELOW(m, j) ((j) > 0 ? BIT(m, 0) : 0) + ((j) > 1 ? BIT(m, 1) : 0) + ((j) > 2 ? BIT(m, 2) : 0) + \
	((j) > 3 ? BIT(m, 3) : 0) + ((j) > 4 ? BIT(m, 4) : 0) + ((j) > 5 ? BIT(m, 5) : 0) + ((j) > 6 ? BIT(m, 6) : 0)
#define ROW(m) ((uint64_t)(BELOW(m, 1)) << 8 | (uint64_t)(BELOW(m, 2)) << 16 | (uint64_t)(BELOW(m, 3)) << 24 | \
		(uint64_t)(BELOW(m, 4)) << 32 | (uint64_t)(BELOW(m, 5)) << 40 | (uint64_t)(BELOW(m, 6)) << 48 | \
		(uint64_t)(BELOW(m, 7)) << 56)
#define ROW4(m) ROW(m), ROW((m) + 1), ROW((m) + 2), ROW((m) + 3)
#define ROW16(m) ROW4(m), ROW4((m) + 4), ROW4((m) + 8), ROW4((m) + 12)
#define ROW64(m) ROW16(m), ROW16((m) + 16), ROW16((m) + 32), ROW16((m) + 48)

const uint64_t kvp_kernels_mask_below[256] = { ROW64(0u), ROW64(64u), ROW64(128u), ROW64(192u) };

static void mask_expand(unsigned d, unsigned n, const uint8_t *masks, const uint8_t *signs, size_t stride,
			const float *kept, size_t kept_stride, const float *scale, const float *mag, float *x)
{
	for (unsigned i = 0; i < n; i++, x += d) {
		const uint8_t *mask = masks + (size_t)i * stride, *sign = signs ? signs + (size_t)i * stride : NULL;
		const float *v = kept + (size_t)i * kept_stride;
		unsigned t = 0, r = 0;

		for (unsigned j = 0; j < d; j++) {
			if (mask[j >> 3] >> (j & 7) & 1) {
				x[j] = v[t++];
			} else if (sign) {
				float a = scale[i] * mag[j];
				x[j] = sign[r >> 3] >> (r & 7) & 1 ? -a : a;
				r++;
			} else {
				x[j] = 0.0f;
			}
		}
	}
}

/* Bit `at` of p onwards, w <= 8 bits, LSB first. */
static unsigned bits_at(const uint8_t *p, size_t at, unsigned w)
{
	unsigned v = 0;

	for (unsigned b = 0; b < w; b++)
		v |= (unsigned)(p[(at + b) >> 3] >> ((at + b) & 7) & 1) << b;
	return v;
}

/* One row's x (contract in kernels.h): the transform in int32, then the kept and pruned channels in order. */
static void spark_row(const struct kvp_masked_codes *rc, const uint8_t *row, int16_t ell, int16_t *x)
{
	int32_t z[64];
	unsigned t = 0, r = 0;

	for (unsigned k = 0; k < rc->kept; k++)
		z[k] = rc->lut[bits_at(row + rc->code_at, (size_t)k * rc->bits, rc->bits)];
	for (unsigned h = 1; h < rc->kept; h *= 2)
		for (unsigned k = 0; k < rc->kept; k++)
			if (!(k & h)) {
				int32_t a = z[k], b = z[k + h];
				z[k] = a + b;
				z[k + h] = a - b;
			}
	for (unsigned j = 0; j < rc->d; j++) {
		if (bits_at(row + rc->mask_at, j, 1)) {
			x[j] = t < rc->kept ? (int16_t)(rc->sgn[t] * (z[t] * (1 << rc->shift))) : 0;
			t++;
		} else {
			int32_t v = (rc->rho[j] * ell + (1 << 14)) >> 15;
			x[j] = (int16_t)(bits_at(row + rc->sign_at, r++, 1) ? -v : v);
		}
	}
	if (t != rc->kept)
		memset(x, 0, sizeof *x * rc->d);
}

static void spark_dot_i16_group(const struct kvp_masked_codes *rc, unsigned n, const uint8_t *base,
				const int16_t *ell, const float *row_scale, unsigned g, const int16_t *q,
				size_t q_stride, const float *head_scale, float *out, size_t out_stride)
{
	int16_t x[256];

	for (unsigned i = 0; i < n; i++) {
		spark_row(rc, base + (size_t)i * rc->stride, ell[i], x);
		for (unsigned h = 0; h < g; h++) {
			int32_t s = 0;
			for (unsigned j = 0; j < rc->d; j++)
				s += x[j] * q[h * q_stride + j];
			out[h * out_stride + i] = ((float)s * head_scale[h]) * row_scale[i];
		}
	}
}

static void band_norms(unsigned d, unsigned n, int interleaved, const float *rows, float *out)
{
	const unsigned F = d / 2;

	for (unsigned i = 0; i < n; i++) {
		const float *r = rows + (size_t)i * d;
		float *o = out + (size_t)i * F;

		for (unsigned f = 0; f < F; f++)
			o[f] = interleaved ? kvp_band_norm(r[2 * f], r[2 * f + 1]) : kvp_band_norm(r[f], r[f + F]);
	}
}

const struct kvp_kernels kvp_kernels_scalar = {
	.name = "scalar",
	.dot_f32 = dot_f32,
	.dot_f16 = dot_f16,
	.axpy_f32 = axpy_f32,
	.axpy_f16 = axpy_f16,
	.dot_f16_group = dot_f16_group,
	.axpy_f16_group = axpy_f16_group,
	.band_norms = band_norms,
	.f32_to_f16 = f32_to_f16,
	.f16_to_f32 = f16_to_f32,
	.softmax_step = softmax_step,
	.softmax_group = softmax_group,
	.scale = scale,
	.lut_dot = lut_dot,
	.lut_axpy = lut_axpy,
	.lut_dot_group = lut_dot_group,
	.lut_axpy_group = lut_axpy_group,
	.lut_dot_i8_group = lut_dot_i8_group,
	.lut_axpy_i16_group = lut_axpy_i16_group,
	.lut_axpy_u8_group = kvp_lut_axpy_u8_plain,
	.dot_i8_scaled = kvp_dot_i8_scaled_plain,
	.axpy_i16_scaled = kvp_axpy_i16_scaled_plain,
	.axpy_u8_scaled = kvp_axpy_u8_scaled_plain,
	.fwht = fwht,
	.sym_codes = sym_codes,
	.sum_squares = sum_squares,
	.mask_expand = mask_expand,
	.spark_dot_i16_group = spark_dot_i16_group,
	.spark_choose = kvp_spark_choose_plain,
	.mask_codes = kvp_mask_codes_plain,
};
