/*
 * AVX2 + FMA + F16C kernels. Built with -mavx2 -mfma -mf16c and only called after dispatch.c has seen
 * those features. Loads are unaligned throughout; tails shorter than a vector go through maskload or a
 * zero-padded copy, never past the caller's buffers. The loops that do not depend on the instruction set
 * (over heads, bit widths and rows) are in loops.h, included at the end.
 */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "kernels/kernels.h"

/* Lane j < k of the result is all ones: the mask for the first k lanes of a tail, 0 <= k <= 8. */
static __m256i tail_mask(unsigned k)
{
	static const int32_t ramp[16] = { -1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0 };

	return _mm256_loadu_si256((const __m256i *)(ramp + 8 - k));
}

/* k < 8 halves into a vector, zeros above; a 16-byte load could run past the row end. */
static __m256 load_f16_tail(const uint16_t *p, unsigned k)
{
	uint16_t tmp[8] = { 0 };

	memcpy(tmp, p, k * sizeof *p);
	return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)tmp));
}

static __m256 load_f16(const uint16_t *p)
{
	return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

static float hsum(__m256 v)
{
	__m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));

	s = _mm_add_ps(s, _mm_movehl_ps(s, s));
	s = _mm_add_ss(s, _mm_movehdup_ps(s));
	return _mm_cvtss_f32(s);
}

/* The four horizontal sums of a..d, in order, in one vector. */
static __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d)
{
	__m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));

	return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/*
 * Four rows per pass so four FMA chains are in flight; FMA latency is 4 cycles at 2 per cycle, so one
 * row at a time would leave the FMA units mostly idle for the usual d = 64 or 128.
 */
static void dot_f32(unsigned d, unsigned n, const float *rows, const float *q, float scale, float *out)
{
	const unsigned d8 = d & ~7u, k = d & 7u;
	const __m256i mask = k ? tail_mask(k) : _mm256_setzero_si256();
	const __m128 vscale = _mm_set1_ps(scale);
	unsigned i = 0;

	for (; i + 4 <= n; i += 4) {
		const float *r0 = rows + (size_t)i * d, *r1 = r0 + d, *r2 = r1 + d, *r3 = r2 + d;
		__m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;

		for (unsigned j = 0; j < d8; j += 8) {
			__m256 qv = _mm256_loadu_ps(q + j);

			a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r0 + j), qv, a0);
			a1 = _mm256_fmadd_ps(_mm256_loadu_ps(r1 + j), qv, a1);
			a2 = _mm256_fmadd_ps(_mm256_loadu_ps(r2 + j), qv, a2);
			a3 = _mm256_fmadd_ps(_mm256_loadu_ps(r3 + j), qv, a3);
		}
		if (k) {
			__m256 qv = _mm256_maskload_ps(q + d8, mask);

			a0 = _mm256_fmadd_ps(_mm256_maskload_ps(r0 + d8, mask), qv, a0);
			a1 = _mm256_fmadd_ps(_mm256_maskload_ps(r1 + d8, mask), qv, a1);
			a2 = _mm256_fmadd_ps(_mm256_maskload_ps(r2 + d8, mask), qv, a2);
			a3 = _mm256_fmadd_ps(_mm256_maskload_ps(r3 + d8, mask), qv, a3);
		}
		_mm_storeu_ps(out + i, _mm_mul_ps(hsum4(a0, a1, a2, a3), vscale));
	}
	for (; i < n; i++) {
		const float *r = rows + (size_t)i * d;
		__m256 a = _mm256_setzero_ps();

		for (unsigned j = 0; j < d8; j += 8)
			a = _mm256_fmadd_ps(_mm256_loadu_ps(r + j), _mm256_loadu_ps(q + j), a);
		if (k) {
			__m256 qv = _mm256_maskload_ps(q + d8, mask);

			a = _mm256_fmadd_ps(_mm256_maskload_ps(r + d8, mask), qv, a);
		}
		out[i] = scale * hsum(a);
	}
}

/* ahead: see dot_f16_group in kernels.h */
static void dot_f16_ahead(unsigned d, unsigned n, const uint16_t *rows, const float *q, float scale,
			  float *out, const uint16_t *ahead)
{
	const unsigned d8 = d & ~7u, k = d & 7u;
	const __m256i mask = k ? tail_mask(k) : _mm256_setzero_si256();
	const __m128 vscale = _mm_set1_ps(scale);
	unsigned i = 0;

	for (; i + 4 <= n; i += 4) {
		const uint16_t *r0 = rows + (size_t)i * d, *r1 = r0 + d, *r2 = r1 + d, *r3 = r2 + d;
		__m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;

		kvp_prefetch_span(ahead, (size_t)i * d * 2, (size_t)(i + 4) * d * 2);

		for (unsigned j = 0; j < d8; j += 8) {
			__m256 qv = _mm256_loadu_ps(q + j);

			a0 = _mm256_fmadd_ps(load_f16(r0 + j), qv, a0);
			a1 = _mm256_fmadd_ps(load_f16(r1 + j), qv, a1);
			a2 = _mm256_fmadd_ps(load_f16(r2 + j), qv, a2);
			a3 = _mm256_fmadd_ps(load_f16(r3 + j), qv, a3);
		}
		if (k) {
			__m256 qv = _mm256_maskload_ps(q + d8, mask);

			a0 = _mm256_fmadd_ps(load_f16_tail(r0 + d8, k), qv, a0);
			a1 = _mm256_fmadd_ps(load_f16_tail(r1 + d8, k), qv, a1);
			a2 = _mm256_fmadd_ps(load_f16_tail(r2 + d8, k), qv, a2);
			a3 = _mm256_fmadd_ps(load_f16_tail(r3 + d8, k), qv, a3);
		}
		_mm_storeu_ps(out + i, _mm_mul_ps(hsum4(a0, a1, a2, a3), vscale));
	}
	for (; i < n; i++) {
		const uint16_t *r = rows + (size_t)i * d;
		__m256 a = _mm256_setzero_ps();

		for (unsigned j = 0; j < d8; j += 8)
			a = _mm256_fmadd_ps(load_f16(r + j), _mm256_loadu_ps(q + j), a);
		if (k)
			a = _mm256_fmadd_ps(load_f16_tail(r + d8, k), _mm256_maskload_ps(q + d8, mask), a);
		out[i] = scale * hsum(a);
	}
}

/*
 * Columns outer, rows inner: a strip of 32 accumulators stays in registers across all n rows, so acc is
 * read and written once per call rather than once per row.
 */
static void axpy_f32(unsigned d, unsigned n, const float *rows, const float *w, float *acc)
{
	unsigned j = 0;

	for (; j + 32 <= d; j += 32) {
		__m256 a0 = _mm256_loadu_ps(acc + j), a1 = _mm256_loadu_ps(acc + j + 8);
		__m256 a2 = _mm256_loadu_ps(acc + j + 16), a3 = _mm256_loadu_ps(acc + j + 24);

		for (unsigned i = 0; i < n; i++) {
			const float *r = rows + (size_t)i * d + j;
			__m256 wv = _mm256_broadcast_ss(w + i);

			a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(r), a0);
			a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(r + 8), a1);
			a2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(r + 16), a2);
			a3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(r + 24), a3);
		}
		_mm256_storeu_ps(acc + j, a0);
		_mm256_storeu_ps(acc + j + 8, a1);
		_mm256_storeu_ps(acc + j + 16, a2);
		_mm256_storeu_ps(acc + j + 24, a3);
	}
	for (; j + 8 <= d; j += 8) {
		__m256 a = _mm256_loadu_ps(acc + j);

		for (unsigned i = 0; i < n; i++) {
			const float *r = rows + (size_t)i * d + j;

			a = _mm256_fmadd_ps(_mm256_broadcast_ss(w + i), _mm256_loadu_ps(r), a);
		}
		_mm256_storeu_ps(acc + j, a);
	}
	if (j < d) {
		const __m256i mask = tail_mask(d - j);
		__m256 a = _mm256_maskload_ps(acc + j, mask);

		for (unsigned i = 0; i < n; i++)
			a = _mm256_fmadd_ps(_mm256_broadcast_ss(w + i),
					    _mm256_maskload_ps(rows + (size_t)i * d + j, mask), a);
		_mm256_maskstore_ps(acc + j, mask, a);
	}
}

/*
 * Columns outer, rows inner, so ahead's bytes are spread over the strip loop's steps rather than its
 * rows: step `it` asks for bytes [it * share, (it + 1) * share) of the n * d halves.
 */
static void axpy_f16_ahead(unsigned d, unsigned n, const uint16_t *rows, const float *w, float *acc,
			   const uint16_t *ahead)
{
	const size_t steps = (size_t)(d / 32) * n, share = kvp_prefetch_share((size_t)n * d * 2, steps);
	unsigned j = 0;

	for (; j + 32 <= d; j += 32) {
		__m256 a0 = _mm256_loadu_ps(acc + j), a1 = _mm256_loadu_ps(acc + j + 8);
		__m256 a2 = _mm256_loadu_ps(acc + j + 16), a3 = _mm256_loadu_ps(acc + j + 24);

		for (unsigned i = 0; i < n; i++) {
			const uint16_t *r = rows + (size_t)i * d + j;
			const size_t it = (size_t)(j / 32) * n + i;
			__m256 wv = _mm256_broadcast_ss(w + i);

			kvp_prefetch_span(ahead, it * share, (it + 1) * share);
			a0 = _mm256_fmadd_ps(wv, load_f16(r), a0);
			a1 = _mm256_fmadd_ps(wv, load_f16(r + 8), a1);
			a2 = _mm256_fmadd_ps(wv, load_f16(r + 16), a2);
			a3 = _mm256_fmadd_ps(wv, load_f16(r + 24), a3);
		}
		_mm256_storeu_ps(acc + j, a0);
		_mm256_storeu_ps(acc + j + 8, a1);
		_mm256_storeu_ps(acc + j + 16, a2);
		_mm256_storeu_ps(acc + j + 24, a3);
	}
	for (; j + 8 <= d; j += 8) {
		__m256 a = _mm256_loadu_ps(acc + j);

		for (unsigned i = 0; i < n; i++)
			a = _mm256_fmadd_ps(_mm256_broadcast_ss(w + i), load_f16(rows + (size_t)i * d + j),
					    a);
		_mm256_storeu_ps(acc + j, a);
	}
	if (j < d) {
		const unsigned k = d - j;
		const __m256i mask = tail_mask(k);
		__m256 a = _mm256_maskload_ps(acc + j, mask);

		for (unsigned i = 0; i < n; i++)
			a = _mm256_fmadd_ps(_mm256_broadcast_ss(w + i),
					    load_f16_tail(rows + (size_t)i * d + j, k), a);
		_mm256_maskstore_ps(acc + j, mask, a);
	}
}

/* acc[j] += w * row[j] for from <= j < d: the column tail of the grouped axpy. */
static void axpy_f16_columns(unsigned d, unsigned from, const uint16_t *row, float w, float *acc)
{
	unsigned j = from;

	for (; j + 8 <= d; j += 8)
		_mm256_storeu_ps(acc + j, _mm256_fmadd_ps(_mm256_set1_ps(w), load_f16(row + j),
							  _mm256_loadu_ps(acc + j)));
	if (j < d) {
		const __m256i mask = tail_mask(d - j);
		__m256 a = _mm256_maskload_ps(acc + j, mask);

		a = _mm256_fmadd_ps(_mm256_set1_ps(w), load_f16_tail(row + j, d - j), a);
		_mm256_maskstore_ps(acc + j, mask, a);
	}
}

/*
 * Four heads over two rows per pass: each widened row chunk feeds four FMAs, so the F16C conversion
 * (one per cycle) no longer bounds the loop, and eight chains keep both FMA pipes busy.
 */
static void dot_f16_heads4(unsigned d, unsigned n, const uint16_t *rows, const float *q, float scale,
			   float *out, const uint16_t *ahead)
{
	const unsigned d8 = d & ~7u, k = d & 7u;
	const __m256i mask = k ? tail_mask(k) : _mm256_setzero_si256();
	const float *q0 = q, *q1 = q + d, *q2 = q1 + d, *q3 = q2 + d;
	float *o0 = out, *o1 = out + n, *o2 = o1 + n, *o3 = o2 + n;
	unsigned i = 0;

	for (; i + 2 <= n; i += 2) {
		const uint16_t *r0 = rows + (size_t)i * d, *r1 = r0 + d;
		__m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
		__m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
		float s[8];

		kvp_prefetch_span(ahead, (size_t)i * d * 2, (size_t)(i + 2) * d * 2);

		for (unsigned j = 0; j < d8; j += 8) {
			__m256 x = load_f16(r0 + j), y = load_f16(r1 + j), qv;

			qv = _mm256_loadu_ps(q0 + j), a0 = _mm256_fmadd_ps(x, qv, a0), b0 = _mm256_fmadd_ps(y, qv, b0);
			qv = _mm256_loadu_ps(q1 + j), a1 = _mm256_fmadd_ps(x, qv, a1), b1 = _mm256_fmadd_ps(y, qv, b1);
			qv = _mm256_loadu_ps(q2 + j), a2 = _mm256_fmadd_ps(x, qv, a2), b2 = _mm256_fmadd_ps(y, qv, b2);
			qv = _mm256_loadu_ps(q3 + j), a3 = _mm256_fmadd_ps(x, qv, a3), b3 = _mm256_fmadd_ps(y, qv, b3);
		}
		if (k) {
			__m256 x = load_f16_tail(r0 + d8, k), y = load_f16_tail(r1 + d8, k), qv;

			qv = _mm256_maskload_ps(q0 + d8, mask), a0 = _mm256_fmadd_ps(x, qv, a0), b0 = _mm256_fmadd_ps(y, qv, b0);
			qv = _mm256_maskload_ps(q1 + d8, mask), a1 = _mm256_fmadd_ps(x, qv, a1), b1 = _mm256_fmadd_ps(y, qv, b1);
			qv = _mm256_maskload_ps(q2 + d8, mask), a2 = _mm256_fmadd_ps(x, qv, a2), b2 = _mm256_fmadd_ps(y, qv, b2);
			qv = _mm256_maskload_ps(q3 + d8, mask), a3 = _mm256_fmadd_ps(x, qv, a3), b3 = _mm256_fmadd_ps(y, qv, b3);
		}
		_mm_storeu_ps(s, _mm_mul_ps(hsum4(a0, a1, a2, a3), _mm_set1_ps(scale)));
		_mm_storeu_ps(s + 4, _mm_mul_ps(hsum4(b0, b1, b2, b3), _mm_set1_ps(scale)));
		o0[i] = s[0], o1[i] = s[1], o2[i] = s[2], o3[i] = s[3];
		o0[i + 1] = s[4], o1[i + 1] = s[5], o2[i + 1] = s[6], o3[i + 1] = s[7];
	}
	for (unsigned h = 0; i < n && h < 4; h++)
		dot_f16_ahead(d, n - i, rows + (size_t)i * d, q + (size_t)h * d, scale, out + (size_t)h * n + i,
			      NULL);
}

/* Sixteen columns of four heads per pass: two conversions per row feed eight FMAs. ahead is spread
 * over the steps as in axpy_f16_ahead. */
static void axpy_f16_heads4(unsigned d, unsigned n, const uint16_t *rows, const float *w, float *acc,
			    const uint16_t *ahead)
{
	const float *w0 = w, *w1 = w + n, *w2 = w1 + n, *w3 = w2 + n;
	float *c0 = acc, *c1 = acc + d, *c2 = c1 + d, *c3 = c2 + d;
	const size_t steps = (size_t)(d / 16) * n, share = kvp_prefetch_share((size_t)n * d * 2, steps);
	unsigned j = 0;

	for (; j + 16 <= d; j += 16) {
		__m256 a0 = _mm256_loadu_ps(c0 + j), a1 = _mm256_loadu_ps(c1 + j);
		__m256 a2 = _mm256_loadu_ps(c2 + j), a3 = _mm256_loadu_ps(c3 + j);
		__m256 b0 = _mm256_loadu_ps(c0 + j + 8), b1 = _mm256_loadu_ps(c1 + j + 8);
		__m256 b2 = _mm256_loadu_ps(c2 + j + 8), b3 = _mm256_loadu_ps(c3 + j + 8);

		for (unsigned i = 0; i < n; i++) {
			const uint16_t *r = rows + (size_t)i * d + j;
			const size_t it = (size_t)(j / 16) * n + i;
			__m256 x = load_f16(r), y = load_f16(r + 8), wv;

			kvp_prefetch_span(ahead, it * share, (it + 1) * share);
			wv = _mm256_broadcast_ss(w0 + i), a0 = _mm256_fmadd_ps(wv, x, a0), b0 = _mm256_fmadd_ps(wv, y, b0);
			wv = _mm256_broadcast_ss(w1 + i), a1 = _mm256_fmadd_ps(wv, x, a1), b1 = _mm256_fmadd_ps(wv, y, b1);
			wv = _mm256_broadcast_ss(w2 + i), a2 = _mm256_fmadd_ps(wv, x, a2), b2 = _mm256_fmadd_ps(wv, y, b2);
			wv = _mm256_broadcast_ss(w3 + i), a3 = _mm256_fmadd_ps(wv, x, a3), b3 = _mm256_fmadd_ps(wv, y, b3);
		}
		_mm256_storeu_ps(c0 + j, a0), _mm256_storeu_ps(c0 + j + 8, b0);
		_mm256_storeu_ps(c1 + j, a1), _mm256_storeu_ps(c1 + j + 8, b1);
		_mm256_storeu_ps(c2 + j, a2), _mm256_storeu_ps(c2 + j + 8, b2);
		_mm256_storeu_ps(c3 + j, a3), _mm256_storeu_ps(c3 + j + 8, b3);
	}
	if (j < d) {
		/* the last d % 16 columns, as a narrower matrix with the same row stride */
		for (unsigned h = 0; h < 4; h++) {
			const float *wh = w + (size_t)h * n;
			float *ch = acc + (size_t)h * d;
			for (unsigned i = 0; i < n; i++)
				axpy_f16_columns(d, j, rows + (size_t)i * d, wh[i], ch);
		}
	}
}

/* The immediate rounding mode (not MXCSR) makes this round to nearest even whatever the caller set. */
static void f32_to_f16(size_t n, const float *x, uint16_t *y)
{
	size_t i = 0;

	for (; i + 8 <= n; i += 8) {
		__m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT);

		_mm_storeu_si128((__m128i *)(y + i), h);
	}
	if (i < n) {
		const unsigned k = (unsigned)(n - i);
		uint16_t tmp[8];
		__m256 v = _mm256_maskload_ps(x + i, tail_mask(k));
		__m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);

		_mm_storeu_si128((__m128i *)tmp, h);
		memcpy(y + i, tmp, k * sizeof *y);
	}
}

static void f16_to_f32(size_t n, const uint16_t *x, float *y)
{
	size_t i = 0;

	for (; i + 8 <= n; i += 8)
		_mm256_storeu_ps(y + i, load_f16(x + i));
	if (i < n) {
		const unsigned k = (unsigned)(n - i);

		_mm256_maskstore_ps(y + i, tail_mask(k), load_f16_tail(x + i, k));
	}
}

/*
 * e^x for a vector: x = n ln2 + r with |r| <= ln2/2, e^r by a degree-6 polynomial (1 + r + r^2 p(r),
 * p a least-squares fit of (e^r - 1 - r) / r^2, relative error 4e-9 before rounding; ~2 ulp after), then
 * times 2^n built in the exponent field. 2^n is applied as two halves so results down in the subnormal
 * range round once, as expf's do; x is clamped to [-104, 89], outside which e^x is 0 or inf anyway.
 * NaN propagates through r.
 */
static __m256 exp_ps(__m256 x)
{
	const __m256 ln2_hi = _mm256_set1_ps(0x1.62e4p-1f);   /* 15 significant bits: n*ln2_hi is exact */
	const __m256 ln2_lo = _mm256_set1_ps(0x1.7f7d1cp-20f);
	const __m256 one = _mm256_set1_ps(1.0f);

	x = _mm256_min_ps(_mm256_set1_ps(89.0f), x);   /* operand order keeps a NaN x */
	x = _mm256_max_ps(_mm256_set1_ps(-104.0f), x);

	__m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(0x1.715476p+0f)),
				   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
	__m256 r = _mm256_fnmadd_ps(n, ln2_hi, x);

	r = _mm256_fnmadd_ps(n, ln2_lo, r);

	__m256 p = _mm256_set1_ps(1.374882297e-03f);

	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.369628340e-03f));
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166964442e-02f));
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666651219e-01f));
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.999998808e-01f));
	p = _mm256_fmadd_ps(_mm256_mul_ps(r, r), p, _mm256_add_ps(r, one));

	__m256i ni = _mm256_cvtps_epi32(n);
	__m256i n1 = _mm256_srai_epi32(ni, 1);
	__m256i n2 = _mm256_sub_epi32(ni, n1);
	__m256i bias = _mm256_set1_epi32(127);
	__m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
	__m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));

	return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

static float hmax(__m256 v)
{
	__m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));

	m = _mm_max_ps(m, _mm_movehl_ps(m, m));
	m = _mm_max_ss(m, _mm_movehdup_ps(m));
	return _mm_cvtss_f32(m);
}

/* fmaxf(a, b) for a that is not NaN, without the libm call gcc leaves for fmaxf: maxss returns its second
 * operand, a, when either is NaN, so a NaN b leaves a as fmaxf would. */
static inline float max_keeping(float a, float b)
{
	return _mm_cvtss_f32(_mm_max_ss(_mm_set_ss(b), _mm_set_ss(a)));
}

static void scale(unsigned d, float a, float *y)
{
	const __m256 va = _mm256_set1_ps(a);
	unsigned j = 0;

	for (; j + 8 <= d; j += 8)
		_mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_loadu_ps(y + j), va));
	if (j < d) {
		const __m256i mask = tail_mask(d - j);

		_mm256_maskstore_ps(y + j, mask, _mm256_mul_ps(_mm256_maskload_ps(y + j, mask), va));
	}
}

/* The largest of head h's n scores times scale, written back scaled (and to raw when it is not NULL):
 * loops.h's softmax_group (KVP_ISA_SOFTMAX_GROUP) runs it before exp_sum below. */
static inline float scaled_max(unsigned n, float scale_by, float *s, float *raw)
{
	const unsigned n8 = n & ~7u, k = n & 7u;
	const __m256 vscale = _mm256_set1_ps(scale_by), ninf = _mm256_set1_ps(-INFINITY);
	__m256 vmax = ninf;

	for (unsigned i = 0; i < n8; i += 8) {
		const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(s + i), vscale);

		_mm256_storeu_ps(s + i, x);
		if (raw)
			_mm256_storeu_ps(raw + i, x);
		vmax = _mm256_max_ps(vmax, x);
	}
	if (k) {
		const __m256i mask = tail_mask(k);
		const __m256 x = _mm256_mul_ps(_mm256_maskload_ps(s + n8, mask), vscale);

		_mm256_maskstore_ps(s + n8, mask, x);
		if (raw)
			_mm256_maskstore_ps(raw + n8, mask, x);
		vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(ninf, x, _mm256_castsi256_ps(mask)));
	}
	return hmax(vmax);
}

/* s[i] = e^(s[i] - mx), returning their sum. */
static inline float exp_sum(unsigned n, float mx, float *s)
{
	const unsigned n8 = n & ~7u, k = n & 7u;
	const __m256 vmx = _mm256_set1_ps(mx);
	__m256 sum = _mm256_setzero_ps();

	for (unsigned i = 0; i < n8; i += 8) {
		__m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(s + i), vmx));

		_mm256_storeu_ps(s + i, e);
		sum = _mm256_add_ps(sum, e);
	}
	if (k) {
		const __m256i mask = tail_mask(k);
		__m256 e = exp_ps(_mm256_sub_ps(_mm256_maskload_ps(s + n8, mask), vmx));

		e = _mm256_and_ps(e, _mm256_castsi256_ps(mask));
		_mm256_maskstore_ps(s + n8, mask, e);
		sum = _mm256_add_ps(sum, e);
	}
	return hsum(sum);
}

/*
 * Packed codes. Eight codes of b bits fill exactly b bytes, so the block of codes j..j+7 (j a multiple of
 * 8) is one little-endian word of b <= 4 bytes at byte j*b/8. The word is broadcast and each lane shifted
 * right by its own multiple of b (srlv): eight indices, with the next codes' bits above them. The lookup
 * is a register permute: permutevar8x32 reads the low 3 bits, so 4-bit codes take the upper half of the
 * table where bit 3 is set (blendv keys on the sign bit, where a per-lane shift left puts bit 3; see
 * lut_regs). The functions are always inlined into loops.h's switch on bits, so every width gets its own
 * loop with constant shifts and load sizes.
 */
#define INLINE static inline __attribute__((always_inline))

/*
 * vpermps reads only the low three bits of each index, so codes are never masked out of their word:
 * tables of 2 and 4 entries are repeated to fill eight (the bits above a code then change nothing),
 * and a 4-bit code's top bit, which picks the upper half, is shifted to the sign bit that blendv reads.
 */
struct lut_regs {
	__m256 lo, hi;
	__m256i shifts, top;
};

INLINE struct lut_regs lut_regs(unsigned bits, const float *lut)
{
	float tab[16] = { 0 };
	struct lut_regs r;
	int b = (int)bits;

	for (unsigned i = 0; i < 16; i++)
		tab[i] = lut[bits < 4 ? i & ((1u << bits) - 1) : i];
	r.lo = _mm256_loadu_ps(tab);
	r.hi = _mm256_loadu_ps(tab + 8);
	r.shifts = _mm256_setr_epi32(0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b);
	r.top = _mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0);
	return r;
}

INLINE __m256 lookup8(unsigned bits, uint32_t word, const struct lut_regs *r)
{
	const __m256i w = _mm256_set1_epi32((int)word), idx = _mm256_srlv_epi32(w, r->shifts);
	__m256 lo = _mm256_permutevar8x32_ps(r->lo, idx);

	if (bits < 4)
		return lo;
	return _mm256_blendv_ps(lo, _mm256_permutevar8x32_ps(r->hi, idx),
				_mm256_castsi256_ps(_mm256_sllv_epi32(w, r->top)));
}

/* Two accumulators per row: the FMA chain would otherwise wait 4 cycles per block of 8 codes. */
INLINE void lut_dot_bits(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			 const float *lut, const float *q, float *out)
{
	const struct lut_regs r = lut_regs(bits, lut);
	const unsigned m8 = m & ~7u, k = m & 7u, kbytes = (k * bits + 7) / 8;
	const __m256 qt = k ? _mm256_maskload_ps(q + m8, tail_mask(k)) : _mm256_setzero_ps();

	for (unsigned i = 0; i < n; i++) {
		const uint8_t *row = codes + (size_t)i * stride;
		__m256 a0 = _mm256_setzero_ps(), a1 = a0;
		unsigned j = 0;

		for (; j + 16 <= m8; j += 16) {
			a0 = _mm256_fmadd_ps(lookup8(bits, kvp_code_block(row, j, bits, m), &r),
					     _mm256_loadu_ps(q + j), a0);
			a1 = _mm256_fmadd_ps(lookup8(bits, kvp_code_block(row, j + 8, bits, m), &r),
					     _mm256_loadu_ps(q + j + 8), a1);
		}
		if (j < m8)
			a0 = _mm256_fmadd_ps(lookup8(bits, kvp_code_block(row, j, bits, m), &r),
					     _mm256_loadu_ps(q + j), a0);
		/* lanes past the tail may hold the next field's bits; their q is 0 */
		if (k)
			a1 = _mm256_fmadd_ps(lookup8(bits, kvp_code_word(row + m8 * bits / 8, kbytes), &r), qt, a1);
		out[i] = hsum(_mm256_add_ps(a0, a1));
	}
}

/* Columns outer in strips of 8, rows inner in pairs: the strip's sums stay in two registers. */
INLINE void lut_axpy_bits(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			  const float *lut, const float *w, float *acc)
{
	const struct lut_regs r = lut_regs(bits, lut);

	for (unsigned j = 0; j < m; j += 8) {
		const unsigned k = m - j < 8 ? m - j : 8, nbytes = (k * bits + 7) / 8;
		const __m256i mask = tail_mask(k < 8 ? k : 7), all = _mm256_set1_epi32(-1);
		const __m256i keep = k < 8 ? mask : all;
		const uint8_t *col = codes + j * bits / 8;
		__m256 a0 = _mm256_maskload_ps(acc + j, keep), a1 = _mm256_setzero_ps();
		unsigned i = 0;

		if (k == 8) {
			for (; i + 2 <= n; i += 2) {
				const uint8_t *r0 = codes + (size_t)i * stride;

				a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(w + i),
						     lookup8(bits, kvp_code_block(r0, j, bits, m), &r), a0);
				a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(w + i + 1),
						     lookup8(bits, kvp_code_block(r0 + stride, j, bits, m), &r), a1);
			}
		}
		for (; i + 2 <= n; i += 2) {
			const uint8_t *r0 = col + (size_t)i * stride;

			a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(w + i), lookup8(bits, kvp_code_word(r0, nbytes), &r),
					     a0);
			a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(w + i + 1),
					     lookup8(bits, kvp_code_word(r0 + stride, nbytes), &r), a1);
		}
		if (i < n)
			a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(w + i),
					     lookup8(bits, kvp_code_word(col + (size_t)i * stride, nbytes), &r), a0);
		_mm256_maskstore_ps(acc + j, keep, _mm256_add_ps(a0, a1));
	}
}

/* Four heads per looked-up block: the unpack and the permutes, which bound lut_dot, are shared. */
INLINE void lut_dot_heads4(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			   const float *lut, const float *q, size_t qs, float *out)
{
	const struct lut_regs r = lut_regs(bits, lut);
	const unsigned m8 = m & ~7u, k = m & 7u, kbytes = (k * bits + 7) / 8;
	const __m256i tail = k ? tail_mask(k) : _mm256_setzero_si256();
	const float *q0 = q, *q1 = q + qs, *q2 = q1 + qs, *q3 = q2 + qs;

	for (unsigned i = 0; i < n; i++) {
		const uint8_t *row = codes + (size_t)i * stride;
		__m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, x;
		float s[4];

		for (unsigned j = 0; j < m8; j += 8) {
			x = lookup8(bits, kvp_code_block(row, j, bits, m), &r);
			a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(q0 + j), a0);
			a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(q1 + j), a1);
			a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(q2 + j), a2);
			a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(q3 + j), a3);
		}
		if (k) {
			/* lanes past the tail may hold the next field's bits; their q is 0 */
			x = lookup8(bits, kvp_code_word(row + m8 * bits / 8, kbytes), &r);
			a0 = _mm256_fmadd_ps(x, _mm256_maskload_ps(q0 + m8, tail), a0);
			a1 = _mm256_fmadd_ps(x, _mm256_maskload_ps(q1 + m8, tail), a1);
			a2 = _mm256_fmadd_ps(x, _mm256_maskload_ps(q2 + m8, tail), a2);
			a3 = _mm256_fmadd_ps(x, _mm256_maskload_ps(q3 + m8, tail), a3);
		}
		_mm_storeu_ps(s, hsum4(a0, a1, a2, a3));
		out[i] = s[0], out[n + i] = s[1], out[2 * (size_t)n + i] = s[2], out[3 * (size_t)n + i] = s[3];
	}
}

INLINE void lut_axpy_heads4(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			    const float *lut, const float *w, float *acc, size_t as)
{
	const struct lut_regs r = lut_regs(bits, lut);
	const float *w0 = w, *w1 = w + n, *w2 = w1 + n, *w3 = w2 + n;
	float *c0 = acc, *c1 = acc + as, *c2 = c1 + as, *c3 = c2 + as;

	for (unsigned j = 0; j < m; j += 8) {
		const unsigned k = m - j < 8 ? m - j : 8, nbytes = (k * bits + 7) / 8;
		const __m256i keep = k < 8 ? tail_mask(k) : _mm256_set1_epi32(-1);
		const uint8_t *col = codes + j * bits / 8;
		__m256 a0 = _mm256_maskload_ps(c0 + j, keep), a1 = _mm256_maskload_ps(c1 + j, keep);
		__m256 a2 = _mm256_maskload_ps(c2 + j, keep), a3 = _mm256_maskload_ps(c3 + j, keep), x;

		for (unsigned i = 0; i < n; i++) {
			x = k == 8 ? lookup8(bits, kvp_code_block(codes + (size_t)i * stride, j, bits, m), &r) :
				     lookup8(bits, kvp_code_word(col + (size_t)i * stride, nbytes), &r);
			a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(w0 + i), x, a0);
			a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(w1 + i), x, a1);
			a2 = _mm256_fmadd_ps(_mm256_broadcast_ss(w2 + i), x, a2);
			a3 = _mm256_fmadd_ps(_mm256_broadcast_ss(w3 + i), x, a3);
		}
		_mm256_maskstore_ps(c0 + j, keep, a0), _mm256_maskstore_ps(c1 + j, keep, a1);
		_mm256_maskstore_ps(c2 + j, keep, a2), _mm256_maskstore_ps(c3 + j, keep, a3);
	}
}

/*
 * Masked rows, eight channels (one mask byte) per step. The byte's entry of kvp_kernels_mask_below gives
 * each lane its place among the byte's kept values, so one permute moves the kept values (a maskload of
 * exactly popcount values) into their lanes; a pruned lane's place among the pruned ones is its lane
 * minus that, which shifts its sign bit down for a variable shift. A blend picks per lane.
 */
static void mask_expand_row(unsigned d, const uint8_t *mask, const uint8_t *sign, const float *v, float scale,
			    const float *mag, float *x)
{
	const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), one = _mm256_set1_epi32(1);
	const __m256 vscale = _mm256_set1_ps(scale);
	unsigned t = 0, r = 0, pruned = 0, sbytes;

	for (unsigned j = 0; j < d; j += 8) {
		const unsigned k = d - j < 8 ? d - j : 8;
		pruned += k - (unsigned)__builtin_popcount(mask[j >> 3] & ((1u << k) - 1));
	}
	sbytes = (pruned + 7) / 8;
	for (unsigned j = 0; j < d; j += 8) {
		const unsigned k = d - j < 8 ? d - j : 8, m = mask[j >> 3] & ((1u << k) - 1);
		const unsigned nk = (unsigned)__builtin_popcount(m), np = k - nk;
		const __m256i below = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)&kvp_kernels_mask_below[m]));
		const __m256i keep = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)m), lane),
									   one), one);
		__m256 kv = _mm256_permutevar8x32_ps(_mm256_maskload_ps(v + t, tail_mask(nk)), below);
		__m256 pv = _mm256_setzero_ps();

		if (sign && np) {
			/* both bytes always, the second clamped into the field: no branch to mispredict */
			const unsigned b = r >> 3, b1 = b + 1 < sbytes ? b + 1 : b;
			unsigned w = (sign[b] | (unsigned)sign[b1] << 8) >> (r & 7);
			__m256i bit;

			bit = _mm256_slli_epi32(_mm256_srlv_epi32(_mm256_set1_epi32((int)w), _mm256_sub_epi32(lane, below)),
						31);
			pv = _mm256_xor_ps(_mm256_mul_ps(vscale, _mm256_maskload_ps(mag + j, tail_mask(k))),
					   _mm256_castsi256_ps(bit));
		}
		kv = _mm256_blendv_ps(pv, kv, _mm256_castsi256_ps(keep));
		if (k == 8)
			_mm256_storeu_ps(x + j, kv);
		else
			_mm256_maskstore_ps(x + j, tail_mask(k), kv);
		t += nk;
		r += np;
	}
}

/* Bands [0, returned) of one row, eight at a time; mul, mul, add, sqrt are each rounded as in the scalar
 * reference. */
INLINE unsigned band_norms_vector(unsigned F, int interleaved, const float *r, float *o)
{
	const unsigned F8 = F & ~7u;

	for (unsigned f = 0; f < F8; f += 8) {
		__m256 sum;
		if (interleaved) {
			__m256 a = _mm256_loadu_ps(r + 2 * f), b = _mm256_loadu_ps(r + 2 * f + 8);
			/* hadd pairs re^2 + im^2 per band; lanes come out as bands 0 1 4 5 | 2 3 6 7 */
			sum = _mm256_hadd_ps(_mm256_mul_ps(a, a), _mm256_mul_ps(b, b));
			sum = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(sum), 0xd8));
		} else {
			__m256 re = _mm256_loadu_ps(r + f), im = _mm256_loadu_ps(r + f + F);
			sum = _mm256_add_ps(_mm256_mul_ps(re, re), _mm256_mul_ps(im, im));
		}
		_mm256_storeu_ps(o + f, _mm256_sqrt_ps(sum));
	}
	return F8;
}

/*
 * Integer lookups. AVX2 has no per-byte or per-word variable shift, so codes become one per 16-bit word:
 * vpshufb puts the two bytes holding a code into its word, and vpmullw by 2^(16 - b - s) (s the code's
 * bit within the first byte) shifts the code to the top of the word, dropping the codes above it; a
 * constant shift then brings it down. The bytes come from a window of the row broadcast to both 128-bit
 * lanes, since vpshufb cannot cross lanes.
 */
struct spread {
	__m256i ctl[2], mul[2];
};

/* Word t of lane l of vector v reads the code at bit pos[v][l][t] of the (16-byte) window. */
INLINE struct spread spread_of(unsigned bits, const unsigned pos[2][2][8])
{
	uint8_t ctl[2][32];
	uint16_t mul[2][16];
	struct spread s;

	for (unsigned v = 0; v < 2; v++)
		for (unsigned l = 0; l < 2; l++)
			for (unsigned t = 0; t < 8; t++) {
				const unsigned p = pos[v][l][t], at = 16 * l + 2 * t;

				ctl[v][at] = (uint8_t)(p / 8);
				ctl[v][at + 1] = (uint8_t)(p / 8 + 1 < 16 ? p / 8 + 1 : 0x80);
				mul[v][8 * l + t] = (uint16_t)(1u << (16 - bits - p % 8));
			}
	for (unsigned v = 0; v < 2; v++) {
		s.ctl[v] = _mm256_loadu_si256((const __m256i *)ctl[v]);
		s.mul[v] = _mm256_loadu_si256((const __m256i *)mul[v]);
	}
	return s;
}

/* Vector v of a spread window: each word's code in its top `bits` bits, the bits below it not cleared. */
INLINE __m256i spread_top(const struct spread *s, unsigned v, __m256i window)
{
	return _mm256_mullo_epi16(_mm256_shuffle_epi8(window, s->ctl[v]), s->mul[v]);
}

/* The first `count` entries of a 16-entry table of bytes, repeated in both lanes; zeros after them. */
INLINE __m256i byte_table(const uint8_t *bytes, unsigned count, unsigned step)
{
	uint8_t t[16] = { 0 };

	for (unsigned i = 0; i < count; i++)
		t[i] = bytes[i * step];
	return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)t));
}

/* Loads of 1, 2, 4 or 8 bytes repeated over the vector. */
INLINE __m256i broadcast_bytes(const uint8_t *p, unsigned nbytes)
{
	uint16_t w;
	uint32_t d;
	uint64_t q;

	switch (nbytes) {
	case 2: memcpy(&w, p, 2); return _mm256_set1_epi16((short)w);
	case 4: memcpy(&d, p, 4); return _mm256_set1_epi32((int)d);
	default: memcpy(&q, p, 8); return _mm256_set1_epi64x((long long)q);
	}
}

/* acc + vpdpbusd of a (unsigned bytes) and b (signed bytes): AVX-VNNI's VEX form, written as assembly so that the
 * kernels the avx2 and avx2-vnni tables share (KIVI's) need no target attribute and the file no -mavxvnni; only
 * avx2-vnni's calls reach it. (This file is built without AVX-512, so "x" is one of ymm0-15, which VEX encodes.) */
INLINE __m256i dpbusd_vex(__m256i acc, __m256i a, __m256i b)
{
	__asm__("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(a), "xm"(b));
	return acc;
}

/* key_window for a whole chunk that one load of 4b bytes (16 for 3 bits) reads within the row. */
INLINE __m256i key_direct(unsigned bits, const uint8_t *p)
{
	if (bits == 1 || bits == 2)
		return broadcast_bytes(p, 4 * bits);
	return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
}

/*
 * Keys, codes j..j+31 of a row in both lanes of the window. 32 codes fill 4b bytes; for 3 bits the 16-byte
 * load covers 12 and, near the row's end, starts 4 bytes early instead. A shorter tail goes through a
 * zeroed copy, its missing codes reading as 0.
 */
INLINE __m256i key_window(unsigned bits, const uint8_t *row, unsigned j, unsigned m)
{
	const uint8_t *p = row + j * bits / 8;
	uint8_t tmp[16] = { 0 };

	if (j + 32 <= m) {
		if (bits != 3 || j + 48 <= m)
			return key_direct(bits, p);
		if (j >= 32)
			return _mm256_srli_si256(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(p - 4))),
						 4);
	}
	memcpy(tmp, p, ((m - j < 32 ? m - j : 32) * bits + 7) / 8);
	return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)tmp));
}

/*
 * Keys: the table's entry lands in the high byte of the word (the code is there, below bit 7 and with
 * zeros above it; the low byte is whatever), and an arithmetic shift sign-extends it, so vpmaddwd takes
 * two int16 products per lane, exact. vpmaddubsw would saturate for full-range tables and queries.
 */
INLINE __m256i key_values(unsigned bits, const struct spread *s, unsigned v, __m256i window, __m256i tab)
{
	const __m256i code = _mm256_srli_epi16(spread_top(s, v, window), 8 - (int)bits);

	return _mm256_srai_epi16(_mm256_shuffle_epi8(tab, code), 8);
}

/* The four int32 horizontal sums of a..d, in order. */
INLINE __m128i hsum4_epi32(__m256i a, __m256i b, __m256i c, __m256i d)
{
	__m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));

	return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* How many of a pass's columns [j0, j0 + len), from its start, lie in whole chunks of 32 that key_direct reads
 * (key_window's test for it); key_window sorts out the rest. */
INLINE unsigned key_direct_end(unsigned bits, unsigned m, unsigned j0, unsigned len)
{
	unsigned direct = 0;

	while (direct + 32 <= len && (bits != 3 || j0 + direct + 48 <= m))
		direct += 32;
	return direct;
}

/* Columns per pass of dot_i8_core: the widened queries of four heads stay on the stack (2 KiB). */
#define KEY_COLUMNS 256u

/* a[h] + the products of the chunk's 32 values x0, x1 with the widened queries qw[h][0..32). */
INLINE __m256i dot_i8_head(__m256i a, __m256i x0, __m256i x1, const int16_t *qw)
{
	const __m256i p0 = _mm256_madd_epi16(x0, _mm256_loadu_si256((const __m256i *)qw));
	const __m256i p1 = _mm256_madd_epi16(x1, _mm256_loadu_si256((const __m256i *)(qw + 16)));

	return _mm256_add_epi32(a, _mm256_add_epi32(p0, p1));
}

/* The chunk of 32 codes in window, from column t of the pass, into the sums of hn heads (written out per
 * head: GCC keeps a loop over hn, and with it the sums, in memory). */
INLINE void dot_i8_chunk(unsigned hn, unsigned bits, const struct spread *s, __m256i tab, __m256i window,
			 int16_t qw[][KEY_COLUMNS], unsigned t, __m256i *a)
{
	const __m256i x0 = key_values(bits, s, 0, window, tab), x1 = key_values(bits, s, 1, window, tab);

	a[0] = dot_i8_head(a[0], x0, x1, qw[0] + t);
	if (hn > 1)
		a[1] = dot_i8_head(a[1], x0, x1, qw[1] + t);
	if (hn > 2)
		a[2] = dot_i8_head(a[2], x0, x1, qw[2] + t);
	if (hn > 3)
		a[3] = dot_i8_head(a[3], x0, x1, qw[3] + t);
}

/*
 * hn <= 4 heads over the columns [j0, j0 + len) of every row, added to out unless first. The queries are
 * widened to int16 once per pass, zero past len to a multiple of 32, so the missing codes of a row's
 * last chunk add nothing.
 */
INLINE void dot_i8_heads(unsigned hn, unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			 const struct spread *s, __m256i tab, const int8_t *q, size_t qs, unsigned j0, unsigned len,
			 int first, int32_t *out)
{
	int16_t qw[4][KEY_COLUMNS];
	const unsigned len32 = (len + 31) & ~31u;
	int32_t sum[4];

	for (unsigned h = 0; h < hn; h++) {
		const int8_t *qh = q + h * qs + j0;
		unsigned t = 0;

		for (; t + 16 <= len; t += 16)
			_mm256_storeu_si256((__m256i *)&qw[h][t],
					    _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qh + t))));
		for (; t < len32; t++)
			qw[h][t] = t < len ? qh[t] : 0;
	}
	const unsigned direct = key_direct_end(bits, m, j0, len);
	for (unsigned i = 0; i < n; i++) {
		const uint8_t *row = codes + (size_t)i * stride;
		__m256i a[4] = { _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
				 _mm256_setzero_si256() };
		unsigned t = 0;

		for (; t < direct; t += 32)
			dot_i8_chunk(hn, bits, s, tab, key_direct(bits, row + (j0 + t) * bits / 8), qw, t, a);
		for (; t < len32; t += 32)
			dot_i8_chunk(hn, bits, s, tab, key_window(bits, row, j0 + t, m), qw, t, a);
		_mm_storeu_si128((__m128i *)sum, hsum4_epi32(a[0], a[1], a[2], a[3]));
		for (unsigned h = 0; h < hn; h++)
			out[(size_t)h * n + i] = first ? sum[h] : out[(size_t)h * n + i] + sum[h];
	}
}

/* The passes of KEY_COLUMNS columns over every row, four heads at a time and then the rest, through `heads`
 * (dot_i8_heads, or avx2-vnni's vnni_key_heads below: the same arguments). */
#define KEY_PASS(heads, hn) \
	heads(hn, bits, m, n, codes, stride, &s, tab, q + h * qs, qs, j0, len, j0 == 0, out + (size_t)h * n)
#define KEY_PASSES(heads)                                                                \
	for (unsigned j0 = 0; j0 < m; j0 += KEY_COLUMNS) {                                \
		const unsigned len = m - j0 < KEY_COLUMNS ? m - j0 : KEY_COLUMNS;         \
		unsigned h = 0;                                                            \
                                                                                           \
		for (; h + 4 <= g; h += 4)                                                 \
			KEY_PASS(heads, 4);                                                \
		switch (g - h) {                                                           \
		case 3: KEY_PASS(heads, 3); break;                                         \
		case 2: KEY_PASS(heads, 2); break;                                         \
		case 1: KEY_PASS(heads, 1); break;                                         \
		default: break;                                                            \
		}                                                                          \
	}

/* The spread of a key chunk whose vector v, lane l, word t reads code per_vector * v + per_lane * l + t. */
INLINE struct spread key_spread(unsigned bits, unsigned per_vector, unsigned per_lane)
{
	unsigned pos[2][2][8];

	for (unsigned v = 0; v < 2; v++)
		for (unsigned l = 0; l < 2; l++)
			for (unsigned t = 0; t < 8; t++)
				pos[v][l][t] = (per_vector * v + per_lane * l + t) * bits;
	return spread_of(bits, pos);
}

INLINE void dot_i8_width(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			 const int8_t *lut, unsigned g, const int8_t *q, size_t qs, int32_t *out)
{
	/* natural order: vector v, lane l, word t holds code 16v + 8l + t of the chunk */
	const struct spread s = key_spread(bits, 16, 8);
	__m256i tab;

	tab = byte_table((const uint8_t *)lut, 1u << bits, 1);
	KEY_PASSES(dot_i8_heads);
}

/* dot_i8_core's body on `width` (dot_i8_width, or avx2-vnni's vnni_key_width below) */
#define KEY_WIDTHS(width)                                                               \
	do {                                                                            \
		if (m == 0) {                                                           \
			for (size_t i = 0; i < (size_t)g * n; i++)                      \
				out[i] = 0;                                             \
			return;                                                         \
		}                                                                       \
		switch (bits) {                                                         \
		case 1: width(1, m, n, codes, stride, lut, g, q, q_stride, out); break; \
		case 2: width(2, m, n, codes, stride, lut, g, q, q_stride, out); break; \
		case 3: width(3, m, n, codes, stride, lut, g, q, q_stride, out); break; \
		default: width(4, m, n, codes, stride, lut, g, q, q_stride, out); break; \
		}                                                                       \
	} while (0)

/* not inlined into loops.h's lut_dot_i8_group, so that their frames stay apart (make stack) */
static __attribute__((noinline)) void dot_i8_core(unsigned bits, unsigned m, unsigned n, const uint8_t *codes,
						  size_t stride, const int8_t *lut, unsigned g, const int8_t *q,
						  size_t q_stride, int32_t *out)
{
	KEY_WIDTHS(dot_i8_width);
}

/*
 * Values, columns j..j+15 of rows i and i+1: 2b bytes of each row, row i's in bytes 0-7 of both lanes
 * and row i+1's in bytes 8-15. For 3 bits the 8-byte load covers 6 and, near the row's end, starts 2
 * bytes early instead; a shorter tail is read byte by byte.
 */
INLINE __m256i value_row(unsigned bits, const uint8_t *row, unsigned j, unsigned m)
{
	const uint8_t *p = row + j * bits / 8;
	uint64_t word = 0;

	if (j + 16 <= m) {
		if (bits != 3 || j + 32 <= m)
			return broadcast_bytes(p, 2 * bits);
		if (j >= 16)
			return _mm256_srli_epi64(broadcast_bytes(p - 2, 8), 16);
	}
	for (unsigned b = 0, nb = ((m - j < 16 ? m - j : 16) * bits + 7) / 8; b < nb; b++)
		word |= (uint64_t)p[b] << 8 * b;
	return _mm256_set1_epi64x((long long)word);
}

/*
 * The int16 values of the window's 32 codes, two rows interleaved so that each int32 lane holds one
 * column of both (row i low): vector 0 holds columns 0-7, vector 1 columns 8-15. The codes come out as
 * bytes in the order that the byte unpack of the two table halves needs for that.
 */
INLINE void value_pairs(unsigned bits, const struct spread *s, __m256i window, __m256i lo, __m256i hi,
			__m256i *d0, __m256i *d1)
{
	const __m256i a = _mm256_srli_epi16(spread_top(s, 0, window), 16 - (int)bits);
	const __m256i b = _mm256_srli_epi16(spread_top(s, 1, window), 16 - (int)bits);
	const __m256i code = _mm256_packus_epi16(a, b);
	const __m256i l = _mm256_shuffle_epi8(lo, code), h = _mm256_shuffle_epi8(hi, code);

	*d0 = _mm256_unpacklo_epi8(l, h);
	*d1 = _mm256_unpackhi_epi8(l, h);
}

/* acc[0..k) += the k <= 16 int32 of a (columns 0-7) and b (8-15). */
INLINE void add_columns(int32_t *acc, unsigned k, __m256i a, __m256i b)
{
	if (k == 16) {
		_mm256_storeu_si256((__m256i *)acc, _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)acc), a));
		_mm256_storeu_si256((__m256i *)(acc + 8),
				    _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)(acc + 8)), b));
		return;
	}
	const __m256i m0 = tail_mask(k < 8 ? k : 8), m1 = tail_mask(k > 8 ? k - 8 : 0);

	_mm256_maskstore_epi32(acc, m0, _mm256_add_epi32(_mm256_maskload_epi32(acc, m0), a));
	_mm256_maskstore_epi32(acc + 8, m1, _mm256_add_epi32(_mm256_maskload_epi32(acc + 8, m1), b));
}

/* a[0..1] += d0, d1 times the pair of weights (one int32, the first row's weight low). */
INLINE void axpy_i16_head(__m256i *a, __m256i d0, __m256i d1, uint32_t pair)
{
	const __m256i wp = _mm256_set1_epi32((int)pair);

	a[0] = _mm256_add_epi32(a[0], _mm256_madd_epi16(d0, wp));
	a[1] = _mm256_add_epi32(a[1], _mm256_madd_epi16(d1, wp));
}

/* Weights w[0] and w[1] as one int32, w[0] low; w[1] is not read and counts as 0 without a pair. */
INLINE uint32_t weight_pair(const int16_t *w, int pair)
{
	uint32_t two = (uint16_t)w[0];

	if (pair)
		memcpy(&two, w, sizeof two);
	return two;
}

/* Rows i and i + 1 of hn heads (written out per head: GCC keeps a loop over hn, and with it the sums, in
 * memory). Without a row i + 1, row i is read twice and the second weighs 0. */
INLINE void axpy_i16_rows(unsigned hn, unsigned bits, int direct, int pair, unsigned m, unsigned n,
			  const uint8_t *codes, size_t stride, unsigned i, unsigned j, const struct spread *s,
			  __m256i lo, __m256i hi, const int16_t *w, __m256i a[4][2])
{
	const uint8_t *r0 = codes + (size_t)i * stride, *r1 = pair ? r0 + stride : r0;
	const __m256i x0 = direct ? broadcast_bytes(r0 + j * bits / 8, 2 * bits) : value_row(bits, r0, j, m);
	const __m256i x1 = direct ? broadcast_bytes(r1 + j * bits / 8, 2 * bits) : value_row(bits, r1, j, m);
	const __m256i window = _mm256_blend_epi32(x0, x1, 0xcc);
	__m256i d0, d1;

	value_pairs(bits, s, window, lo, hi, &d0, &d1);
	axpy_i16_head(a[0], d0, d1, weight_pair(w + i, pair));
	if (hn > 1)
		axpy_i16_head(a[1], d0, d1, weight_pair(w + n + i, pair));
	if (hn > 2)
		axpy_i16_head(a[2], d0, d1, weight_pair(w + 2 * (size_t)n + i, pair));
	if (hn > 3)
		axpy_i16_head(a[3], d0, d1, weight_pair(w + 3 * (size_t)n + i, pair));
}

/* Columns j..j+15 of all rows into a. */
INLINE void axpy_i16_chunk(unsigned hn, unsigned bits, int direct, unsigned m, unsigned n, const uint8_t *codes,
			   size_t stride, unsigned j, const struct spread *s, __m256i lo, __m256i hi, const int16_t *w,
			   __m256i a[4][2])
{
	unsigned i = 0;

	for (; i + 2 <= n; i += 2)
		axpy_i16_rows(hn, bits, direct, 1, m, n, codes, stride, i, j, s, lo, hi, w, a);
	if (i < n)
		axpy_i16_rows(hn, bits, direct, 0, m, n, codes, stride, i, j, s, lo, hi, w, a);
}

/*
 * hn <= 4 heads, columns in chunks of 16 so the 2 * hn sums stay in registers, rows in pairs: each
 * vpmaddwd multiplies a column of two rows by the pair of weights.
 */
INLINE void axpy_i16_heads(unsigned hn, unsigned bits, unsigned m, unsigned n, const uint8_t *codes,
			   size_t stride, const struct spread *s, __m256i lo, __m256i hi, const int16_t *w,
			   int32_t *acc, size_t as)
{
	for (unsigned j = 0; j < m; j += 16) {
		/* whole chunks that one load of 2b bytes (8 for 3 bits) per row reads within the row */
		const int direct = j + 16 <= m && (bits != 3 || j + 32 <= m);
		__m256i a[4][2];

		for (unsigned h = 0; h < 4; h++)
			a[h][0] = a[h][1] = _mm256_setzero_si256();
		if (direct)
			axpy_i16_chunk(hn, bits, 1, m, n, codes, stride, j, s, lo, hi, w, a);
		else
			axpy_i16_chunk(hn, bits, 0, m, n, codes, stride, j, s, lo, hi, w, a);
		for (unsigned h = 0; h < hn; h++)
			add_columns(acc + h * as + j, m - j < 16 ? m - j : 16, a[h][0], a[h][1]);
	}
}

INLINE void axpy_i16_width(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			   const int16_t *lut, unsigned g, const int16_t *w, int32_t *acc, size_t as)
{
	unsigned pos[2][2][8];
	struct spread s;
	__m256i lo, hi;
	uint8_t bytes[32];
	unsigned h = 0;

	/*
	 * Vector v, lane l, word t: column 8v + 4l + t/2 of row i + t % 2 (row i + 1 from bit 64 of the
	 * window). After the pack, lane l holds columns 4l..4l+3 and then 8+4l..8+4l+3, each of both rows,
	 * so the byte unpacks of the looked-up halves give columns 0-7 and 8-15 in order.
	 */
	for (unsigned v = 0; v < 2; v++)
		for (unsigned l = 0; l < 2; l++)
			for (unsigned t = 0; t < 8; t++)
				pos[v][l][t] = 64 * (t % 2) + (8 * v + 4 * l + t / 2) * bits;
	s = spread_of(bits, pos);
	for (unsigned i = 0; i < 16; i++) {
		const uint16_t v = (uint16_t)lut[i < (1u << bits) ? i : 0];
		bytes[2 * i] = (uint8_t)v, bytes[2 * i + 1] = (uint8_t)(v >> 8);
	}
	lo = byte_table(bytes, 1u << bits, 2);
	hi = byte_table(bytes + 1, 1u << bits, 2);
	for (; h + 4 <= g; h += 4)
		axpy_i16_heads(4, bits, m, n, codes, stride, &s, lo, hi, w + (size_t)h * n, acc + h * as, as);
	w += (size_t)h * n, acc += h * as;
	switch (g - h) {
	case 3: axpy_i16_heads(3, bits, m, n, codes, stride, &s, lo, hi, w, acc, as); break;
	case 2: axpy_i16_heads(2, bits, m, n, codes, stride, &s, lo, hi, w, acc, as); break;
	case 1: axpy_i16_heads(1, bits, m, n, codes, stride, &s, lo, hi, w, acc, as); break;
	default: break;
	}
}

/*
 * fwht's stages within 16 values, two registers of eight: stages 1, 2 and 4 by a permute and a blend of the
 * sum and the difference (a lane with bit h set keeps partner - self), stage 8 between the registers.
 */
/* a macro: the blend's lanes must be a constant where the compiler checks it, before any inlining */
#define FWHT_STEP8(x, partner, high) _mm256_blend_ps(_mm256_add_ps(x, partner), _mm256_sub_ps(partner, x), high)

INLINE __m256 fwht_within8(__m256 x)
{
	__m256 p = _mm256_permute_ps(x, 0xb1);

	x = FWHT_STEP8(x, p, 0xaa);
	p = _mm256_permute_ps(x, 0x4e);
	x = FWHT_STEP8(x, p, 0xcc);
	p = _mm256_permute2f128_ps(x, x, 0x01);
	return FWHT_STEP8(x, p, 0xf0);
}

#undef FWHT_STEP8

static void fwht_blocks16(unsigned p, float *v)
{
	for (unsigned i = 0; i < p; i += 16) {
		__m256 lo = fwht_within8(_mm256_loadu_ps(v + i)), hi = fwht_within8(_mm256_loadu_ps(v + i + 8));

		_mm256_storeu_ps(v + i, _mm256_add_ps(lo, hi));
		_mm256_storeu_ps(v + i + 8, _mm256_sub_ps(lo, hi));
	}
}

#define KVP_ISA_FWHT
/*
 * TurboQuant's encoder steps. sym_codes: eight values per register, one compare per threshold on
 * b = a (above zero) or min(a, 2^31 - 2) + 1 (at or below: a >= t as b > t), the code mirrored below
 * zero, then eight codes packed by shifts into `bits` bytes.
 */
INLINE __m256i sym_count8(const float *y, const __m256i *th, int32_t half)
{
	const __m256i u = _mm256_loadu_si256((const __m256i *)y);
	const __m256i a = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
	const __m256i pos = _mm256_cmpgt_epi32(u, _mm256_setzero_si256());
	const __m256i up = _mm256_add_epi32(_mm256_min_epi32(a, _mm256_set1_epi32(0x7ffffffe)), _mm256_set1_epi32(1));
	const __m256i b = _mm256_blendv_epi8(up, a, pos);
	__m256i cnt = _mm256_setzero_si256();

	for (int32_t k = 0; k + 1 < half; k++)
		cnt = _mm256_sub_epi32(cnt, _mm256_cmpgt_epi32(b, th[k]));
	/* half + cnt above zero, half - 1 - cnt at or below */
	return _mm256_blendv_epi8(_mm256_sub_epi32(_mm256_set1_epi32(half - 1), cnt),
				  _mm256_add_epi32(_mm256_set1_epi32(half), cnt), pos);
}

INLINE void sym_codes_width(unsigned bits, unsigned m, const float *y, const int32_t *t, uint8_t *out)
{
	const int32_t half = 1 << (bits - 1);
	__m256i th[7];

	for (int32_t k = 0; k + 1 < half; k++)
		th[k] = _mm256_set1_epi32(t[k]);
	for (unsigned j = 0; j < m; j += 8, out += bits) {
		int32_t code[8];

		_mm256_storeu_si256((__m256i *)code, sym_count8(y + j, th, half));
		kvp_pack8(code, bits, out);
	}
}

/* Two registers of four doubles are the definition's eight running sums. */
static double sum_squares(unsigned m, const float *y)
{
	__m256d lo = _mm256_setzero_pd(), hi = lo;
	double a[8];
	unsigned j = 0;

	for (; j + 8 <= m; j += 8) {
		const __m256d v0 = _mm256_cvtps_pd(_mm_loadu_ps(y + j)), v1 = _mm256_cvtps_pd(_mm_loadu_ps(y + j + 4));
		lo = _mm256_add_pd(lo, _mm256_mul_pd(v0, v0));
		hi = _mm256_add_pd(hi, _mm256_mul_pd(v1, v1));
	}
	_mm256_storeu_pd(a, lo);
	_mm256_storeu_pd(a + 4, hi);
	return kvp_sum_squares_end(a, j, m, y);
}

/*
 * spark_choose (contract in kernels.h) for d <= 256, the plain code beyond: the keys in registers, eight to a
 * register, through the bit-by-bit search (a compare and a movemask's popcount per register and bit); then
 * per eight channels the keep bits by movemask, the kept values placed by vpermps with indices from a table of
 * the 256 masks, the pruned signs taken lane by lane over the pruned bits (this table has no pext), and the
 * pruned scores summed in two registers of four doubles, the plain code's a[0..3] and a[4..7].
 */
#define CHOOSE_BIT(m, j) (((m) >> (j)) & 1u)
#define CHOOSE_BELOW(m, j)                                                                                  \
	(((j) > 0 ? CHOOSE_BIT(m, 0) : 0) + ((j) > 1 ? CHOOSE_BIT(m, 1) : 0) + ((j) > 2 ? CHOOSE_BIT(m, 2) : 0) + \
	 ((j) > 3 ? CHOOSE_BIT(m, 3) : 0) + ((j) > 4 ? CHOOSE_BIT(m, 4) : 0) + ((j) > 5 ? CHOOSE_BIT(m, 5) : 0) + \
	 ((j) > 6 ? CHOOSE_BIT(m, 6) : 0))
/* nibble k: the lane of the k-th set bit of m */
#define CHOOSE_LANE(m, j) (CHOOSE_BIT(m, j) ? (uint32_t)(j) << (4 * CHOOSE_BELOW(m, j)) : 0u)
#define CHOOSE_PERM(m)                                                                                        \
	(CHOOSE_LANE(m, 0) | CHOOSE_LANE(m, 1) | CHOOSE_LANE(m, 2) | CHOOSE_LANE(m, 3) | CHOOSE_LANE(m, 4) |     \
	 CHOOSE_LANE(m, 5) | CHOOSE_LANE(m, 6) | CHOOSE_LANE(m, 7))
#define CHOOSE_PERM4(m) CHOOSE_PERM(m), CHOOSE_PERM((m) + 1), CHOOSE_PERM((m) + 2), CHOOSE_PERM((m) + 3)
#define CHOOSE_PERM16(m) CHOOSE_PERM4(m), CHOOSE_PERM4((m) + 4), CHOOSE_PERM4((m) + 8), CHOOSE_PERM4((m) + 12)
#define CHOOSE_PERM64(m) CHOOSE_PERM16(m), CHOOSE_PERM16((m) + 16), CHOOSE_PERM16((m) + 32), CHOOSE_PERM16((m) + 48)
static const uint32_t choose_perm[256] = { CHOOSE_PERM64(0), CHOOSE_PERM64(64), CHOOSE_PERM64(128), CHOOSE_PERM64(192) };

#define CHOOSE_VECTORS 32

/* How many keys exceed `below`: the compares' -1 lanes summed in two registers, one horizontal sum a pass. */
INLINE unsigned count_above8(unsigned nv, const __m256i *k, int32_t below)
{
	const __m256i c = _mm256_set1_epi32(below);
	__m256i a0 = _mm256_setzero_si256(), a1 = a0;
	__m128i h;

	for (unsigned v = 0; v + 1 < nv; v += 2) {
		a0 = _mm256_sub_epi32(a0, _mm256_cmpgt_epi32(k[v], c));
		a1 = _mm256_sub_epi32(a1, _mm256_cmpgt_epi32(k[v + 1], c));
	}
	if (nv & 1)
		a0 = _mm256_sub_epi32(a0, _mm256_cmpgt_epi32(k[nv - 1], c));
	a0 = _mm256_add_epi32(a0, a1);
	h = _mm_add_epi32(_mm256_castsi256_si128(a0), _mm256_extracti128_si256(a0, 1));
	h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
	h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
	return (unsigned)_mm_cvtsi128_si32(h);
}

static double spark_choose(unsigned d, unsigned kept, const int32_t *key, const float *x, uint8_t *mask,
			   uint8_t *signs, float *y)
{
	const unsigned nv = (d + 7) / 8, whole = d / 8;
	int32_t key_tail[8] = { 0 };
	float x_tail[8] = { 0 }, y_tail[8];
	__m256i k[CHOOSE_VECTORS];
	unsigned keep[CHOOSE_VECTORS];
	__m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
	const __m256i lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128), shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
	struct kvp_bit_run sign = { .out = signs };
	double a[8];
	unsigned above = 0, ties, n = 0;
	int32_t t = 0;

	if (d > 8 * CHOOSE_VECTORS)
		return kvp_spark_choose_plain(d, kept, key, x, mask, signs, y);
	/* a last vector shorter than eight: its lanes past d are keys of 0, which no candidate (>= 1) counts */
	memcpy(key_tail, key + 8 * whole, sizeof *key * (d - 8 * whole));
	memcpy(x_tail, x + 8 * whole, sizeof *x * (d - 8 * whole));
	for (unsigned v = 0; v < nv; v++)
		k[v] = _mm256_loadu_si256((const __m256i *)(const void *)(v < whole ? key + 8 * v : key_tail));
	for (int b = 30; b >= 0; b--) {
		const int32_t cand = t | (int32_t)1 << b;
		const unsigned c = count_above8(nv, k, cand - 1);

		if (c >= kept) {
			t = cand;
			if (c == kept)
				break;
		}
	}
	for (unsigned v = 0; v < nv; v++) {
		const unsigned live = d - 8 * v < 8 ? d - 8 * v : 8, in = (1u << live) - 1;
		const __m256i tv = _mm256_set1_epi32(t);

		keep[v] = in & (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(
				       _mm256_or_si256(_mm256_cmpgt_epi32(k[v], tv), _mm256_cmpeq_epi32(k[v], tv))));
		above += (unsigned)__builtin_popcount(in & (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(k[v], tv))));
	}
	/* of the keys equal to t, the lowest channels' stay */
	ties = kept - above;
	for (unsigned v = 0; v < nv; v++) {
		const unsigned live = d - 8 * v < 8 ? d - 8 * v : 8, in = (1u << live) - 1;
		unsigned eq = in & (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(k[v], _mm256_set1_epi32(t))));

		for (; eq; eq &= eq - 1) {
			if (ties)
				ties--;
			else
				keep[v] &= ~(eq & -eq);
		}
	}
	for (unsigned v = 0; v < nv; v++) {
		const unsigned live = d - 8 * v < 8 ? d - 8 * v : 8, in = (1u << live) - 1, pruned = ~keep[v] & in;
		const __m256 xv = _mm256_loadu_ps(v < whole ? x + 8 * v : x_tail);
		const __m256i kv = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)keep[v]), lanes), lanes);
		const __m256 sv = _mm256_andnot_ps(_mm256_castsi256_ps(kv), _mm256_castsi256_ps(k[v]));
		const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)choose_perm[keep[v]]), shifts),
						     _mm256_set1_epi32(7));
		const unsigned sb = (unsigned)_mm256_movemask_ps(xv);

		mask[v] = (uint8_t)keep[v];
		/* eight floats from y + n stay within y's d until a last vector shorter than eight */
		_mm256_storeu_ps(v < whole ? y + n : y_tail, _mm256_permutevar8x32_ps(xv, idx));
		if (v == whole)
			memcpy(y + n, y_tail, sizeof *y * (unsigned)__builtin_popcount(keep[v]));
		n += (unsigned)__builtin_popcount(keep[v]);
		for (unsigned p = pruned; p; p &= p - 1)
			kvp_bit_put(&sign, sb >> __builtin_ctz(p) & 1u, 1);
		if (8 * v + 8 <= (d & ~7u)) {
			lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(sv)));
			hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(sv, 1)));
		}
	}
	kvp_bit_end(&sign);
	_mm256_storeu_pd(a, lo);
	_mm256_storeu_pd(a + 4, hi);
	return kvp_spark_pruned_sum(d, key, mask, a);
}

#undef CHOOSE_VECTORS

/* loops.h's own version, for the shapes dot_i8_scaled below leaves; not inlined, so that its frame and this one
 * stay apart (make stack) */
static void loops_dot_i8_scaled(unsigned bits, unsigned m, unsigned n, const uint8_t *group, unsigned g,
				const float *q, size_t q_stride, float *out, size_t out_stride) __attribute__((noinline));

/*
 * dot_i8_scaled (contract in kernels.h), 2- and 4-bit codes, m <= 256 (KIVI's keys; other shapes take
 * loops.h's). Eight rows at a time, a row per dword: the row's codes of channels 4k..4k+3 (column byte k of
 * 2-bit codes, bytes 2k and 2k + 1 of 4-bit ones) go a code per byte by shifts and ors, and vpmaddubsw
 * multiplies them with the head's int8 query of those channels, broadcast as one int32: two products per
 * word, at most 2 * 15 * 127 apart from zero, so nothing saturates. The words add up in int16 for as many
 * quads as stay below 2^15 (32 at 2 bits, 8 at 4), then vpmaddwd with ones joins each row's two words
 * into its int32 sum. loops.h's lanes multiplied every code by an int32 query: a block of 64 rows in cache at
 * d=128 took 27.0 ns a row for four heads there, 10.9 here (the query's pass included; 2-bit codes).
 */
#define SCALED_QUAD_MAX 64 /* 256 channels */

/* Eight rows' codes of channels 4k..4k+3 at col (4-bit: the second byte a column, n bytes, later), a row per
 * dword and a code per byte. */
INLINE __m256i scaled_quads8(unsigned bits, const uint8_t *col, size_t n)
{
	const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)col));

	if (bits == 2) {
		/* copies of the byte at bits 0, 6, 12 and 18: code t lands at bits 8t..8t+1 */
		const __m256i t = _mm256_or_si256(x, _mm256_slli_epi32(x, 6));

		return _mm256_and_si256(_mm256_or_si256(t, _mm256_slli_epi32(t, 12)), _mm256_set1_epi32(0x03030303));
	}
	{
		const __m256i y = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)(col + n)));
		const __m256i d = _mm256_or_si256(x, _mm256_slli_epi32(y, 16)); /* bytes x, 0, y, 0 */

		return _mm256_or_si256(_mm256_and_si256(d, _mm256_set1_epi32(0x000f000f)),
				       _mm256_and_si256(_mm256_slli_epi32(d, 4), _mm256_set1_epi32(0x0f000f00)));
	}
}

/* Four heads' sums of the eight rows whose codes start at codes, q8[h] the head's int8 query (four bytes a quad
 * of channels); per_quad bytes from one quad's first column to the next's. With vnni (avx2-vnni), vpdpbusd
 * multiplies and adds in int32 at once. */
INLINE void scaled_sums8(int vnni, unsigned bits, unsigned nq, size_t n, const uint8_t *codes, size_t per_quad,
			 const uint8_t (*q8)[4 * SCALED_QUAD_MAX], __m256i s[4])
{
	const unsigned flush = bits == 2 ? 32 : 8; /* quads of int16 sums below 2^15 */
	const __m256i ones = _mm256_set1_epi16(1);
	__m256i w0 = _mm256_setzero_si256(), w1 = w0, w2 = w0, w3 = w0;

	s[0] = s[1] = s[2] = s[3] = w0;
	for (unsigned k = 0; k < nq; k++) {
		const __m256i c = scaled_quads8(bits, codes + k * per_quad, n);

		if (vnni) {
			s[0] = dpbusd_vex(s[0], c, broadcast_bytes(q8[0] + 4 * k, 4));
			s[1] = dpbusd_vex(s[1], c, broadcast_bytes(q8[1] + 4 * k, 4));
			s[2] = dpbusd_vex(s[2], c, broadcast_bytes(q8[2] + 4 * k, 4));
			s[3] = dpbusd_vex(s[3], c, broadcast_bytes(q8[3] + 4 * k, 4));
			continue;
		}
		w0 = _mm256_add_epi16(w0, _mm256_maddubs_epi16(c, broadcast_bytes(q8[0] + 4 * k, 4)));
		w1 = _mm256_add_epi16(w1, _mm256_maddubs_epi16(c, broadcast_bytes(q8[1] + 4 * k, 4)));
		w2 = _mm256_add_epi16(w2, _mm256_maddubs_epi16(c, broadcast_bytes(q8[2] + 4 * k, 4)));
		w3 = _mm256_add_epi16(w3, _mm256_maddubs_epi16(c, broadcast_bytes(q8[3] + 4 * k, 4)));
		if ((k + 1) % flush == 0 || k + 1 == nq) {
			s[0] = _mm256_add_epi32(s[0], _mm256_madd_epi16(w0, ones));
			s[1] = _mm256_add_epi32(s[1], _mm256_madd_epi16(w1, ones));
			s[2] = _mm256_add_epi32(s[2], _mm256_madd_epi16(w2, ones));
			s[3] = _mm256_add_epi32(s[3], _mm256_madd_epi16(w3, ones));
			w0 = w1 = w2 = w3 = _mm256_setzero_si256();
		}
	}
}

/* k <= 8 fp16 numbers at p + 2j as floats, zeros past them; nothing past them is read. */
INLINE __m256 f16_run8(const uint8_t *p, unsigned j, unsigned k)
{
	uint16_t t[8] = { 0 };

	if (k == 8)
		return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(p + 2 * (size_t)j)));
	memcpy(t, p + 2 * (size_t)j, 2 * k);
	return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)t));
}

/* The first k <= 8 floats at p, zeros past them; nothing past them is read. */
INLINE __m256 f32_run8(const float *p, unsigned k)
{
	return k == 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, tail_mask(k));
}

/*
 * kvp_scaled_query_i8 for hn <= 4 heads at once (the same products, maxima and rounding) into q8 (zeros for
 * the heads past hn and the channels past m, to the end of the last quad), each head's step into step and its
 * float sum of q_j z_j in kvp_fold16's order into z: running sums of channels j % 16 < 8 in one register and
 * of the others in a second, the lanes of channels past m adding +0 (a lane's sum starts at +0, so that
 * changes no bit).
 */
static void scaled_queries_q8(unsigned hn, unsigned m, const float *q, size_t qs, const uint8_t *group,
			      uint8_t (*q8)[4 * SCALED_QUAD_MAX], float *step, float *z)
{
	const uint8_t *s = group + 2 * (size_t)m;
	const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
	__m256 top[4], sums[4][2];
	float inv[4];

	memset(q8, 0, 4 * sizeof *q8);
	for (unsigned h = 0; h < hn; h++)
		top[h] = sums[h][0] = sums[h][1] = _mm256_setzero_ps();
	for (unsigned j = 0; j < m; j += 8) {
		const unsigned k = m - j < 8 ? m - j : 8;
		const __m256 sv = f16_run8(s, j, k), zv = f16_run8(group, j, k);

		for (unsigned h = 0; h < hn; h++) {
			const __m256 qv = f32_run8(q + h * qs + j, k);

			top[h] = _mm256_max_ps(top[h], _mm256_and_ps(_mm256_mul_ps(qv, sv), magnitude));
			sums[h][j / 8 % 2] = _mm256_add_ps(sums[h][j / 8 % 2], _mm256_mul_ps(qv, zv));
		}
	}
	for (unsigned h = 0; h < hn; h++) {
		const float t = hmax(top[h]); /* magnitudes, from +0: the plain code's maximum in any order */
		float lanes[16];

		inv[h] = t > 127.0f / 3.0e38f ? 127.0f / t : 0.0f;
		step[h] = t / 127.0f;
		_mm256_storeu_ps(lanes, sums[h][0]);
		_mm256_storeu_ps(lanes + 8, sums[h][1]);
		z[h] = kvp_fold16(lanes);
	}
	for (unsigned j = 0; j < m; j += 8) {
		const unsigned k = m - j < 8 ? m - j : 8;
		const __m256 sv = f16_run8(s, j, k);

		for (unsigned h = 0; h < hn; h++) {
			const __m256 u = _mm256_mul_ps(_mm256_mul_ps(f32_run8(q + h * qs + j, k), sv), _mm256_set1_ps(inv[h]));
			const __m256i x = _mm256_cvtps_epi32(u); /* to nearest even, as nearbyintf */
			const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));

			_mm_storel_epi64((__m128i *)(void *)(q8[h] + j), _mm_packs_epi16(w, w));
		}
	}
}

INLINE void scaled_dot(int vnni, unsigned bits, unsigned m, unsigned n, const uint8_t *group, unsigned g,
		       const float *q, size_t q_stride, float *out, size_t out_stride)
{
	const unsigned nq = (m + 3) / 4;
	const size_t per_quad = bits / 2 * (size_t)n;
	const uint8_t *codes = group + 4 * (size_t)m;
	uint8_t q8[4][4 * SCALED_QUAD_MAX];
	float step[4], z[4];

	/* 4-bit quads read two column bytes: whole ones only */
	if ((bits != 2 && (bits != 4 || m % 4)) || m > 4 * SCALED_QUAD_MAX || !m) {
		loops_dot_i8_scaled(bits, m, n, group, g, q, q_stride, out, out_stride);
		return;
	}
	for (unsigned h0 = 0; h0 < g; h0 += 4) {
		const unsigned hn = g - h0 < 4 ? g - h0 : 4;

		scaled_queries_q8(hn, m, q + h0 * q_stride, q_stride, group, q8, step, z);
		for (unsigned i = 0; i < n; i += 8) {
			const unsigned rows = n - i < 8 ? n - i : 8;
			uint8_t tail[2 * SCALED_QUAD_MAX][16];
			float o[8];
			__m256i s[4];

			if (rows == 8) {
				scaled_sums8(vnni, bits, nq, n, codes + i, per_quad, (const uint8_t (*)[4 * SCALED_QUAD_MAX])q8, s);
			} else {
				/* the last rows' bytes, column by column, into eight zeroed ones: no read past the codes */
				memset(tail, 0, sizeof tail);
				for (unsigned c = 0; c < nq * bits / 2; c++)
					memcpy(tail[c], codes + (size_t)c * n + i, rows);
				scaled_sums8(vnni, bits, nq, 16, tail[0], bits / 2 * 16, (const uint8_t (*)[4 * SCALED_QUAD_MAX])q8, s);
			}
			for (unsigned h = 0; h < hn; h++) {
				const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(s[h]), _mm256_set1_ps(step[h]));

				_mm256_storeu_ps(o, _mm256_add_ps(_mm256_set1_ps(z[h]), v));
				memcpy(out + (h0 + h) * out_stride + i, o, rows * sizeof(float));
			}
		}
	}
}

static void dot_i8_scaled(unsigned bits, unsigned m, unsigned n, const uint8_t *group, unsigned g, const float *q,
			  size_t q_stride, float *out, size_t out_stride)
{
	scaled_dot(0, bits, m, n, group, g, q, q_stride, out, out_stride);
}

/* avx2-vnni's */
static void dot_i8_scaled_vnni(unsigned bits, unsigned m, unsigned n, const uint8_t *group, unsigned g,
			       const float *q, size_t q_stride, float *out, size_t out_stride)
{
	scaled_dot(1, bits, m, n, group, g, q, q_stride, out, out_stride);
}

#define KVP_ISA_DOT_I8_SCALED

/*
 * axpy_u8_scaled (contract in kernels.h): codes of 2 or 4 bits, column groups of a multiple of 8 (at most
 * U8_GROUPS of them), m a multiple of 8 (KIVI's values); other shapes are declined, and take axpy_i16_scaled.
 * The records' fp16 z and s go planar, one pass over them gives every head's z sums, largest and least u,
 * a second its weights as bytes, a row per (head, group). Then per eight columns, four rows at a time: the
 * rows' bytes of those columns in one register, vpshufb gives each column's dword the four rows' byte that
 * holds it, vpsrlvd brings the code to the bottom of each byte, and a vpshufb table its centred value
 * 2 code - L; vpmaddubsw multiplies those with the four rows' weights of the column's group (unsigned bytes
 * against signed ones, pairs at most 2 * 255 * 15 from zero: nothing saturates), and the words add up for as
 * many quads of rows as stay below 2^15 before vpmaddwd joins each column's two. Column sums (weights 1) carry
 * the least weight's term. Before it, AVX2 declined every call and KIVI's values took loops.h's 12-bit loops:
 * a span of 256 rows in cache at d=128, 2-bit codes, took 39.5 ns a row for four heads there, 14.6 here.
 */
#define U8_GROUPS 4

struct u8_values {
	unsigned bits, m, gsize, ng, n;
	const struct kvp_row_runs *rows;
	uint16_t (*zs)[KVP_AXPY_I16_ROWS + 8]; /* z(i, c) at [c][i], s(i, c) at [ng + c][i]; zeros past n */
	uint8_t (*w8)[U8_GROUPS][KVP_AXPY_I16_ROWS + 4]; /* [head][group][row], four zeros past the last row */
	float f[4], e[4]; /* (top - lo) / 510 and lo / 2, per head */
	__m256i centred;  /* 2 code - L at byte `code` of each 128-bit lane */
};

/* kvp_any_sign_bit: the sign bits of every weight or'ed together */
static int any_sign(unsigned g, unsigned n, const float *w, size_t ws)
{
	__m256 bits = _mm256_setzero_ps();

	for (unsigned h = 0; h < g; h++)
		for (unsigned i = 0; i < n; i += 8)
			bits = _mm256_or_ps(bits, f32_run8(w + h * ws + i, n - i < 8 ? n - i : 8));
	return _mm256_movemask_ps(bits) != 0;
}

/* Every row's 2 ng scalars, planar, zeros past n to a multiple of eight. Eight rows at a time where a record
 * holds the sixteen bytes that one load takes: their 8 x 8 words transposed by three rounds of unpacks. */
static void u8_values_scalars(struct u8_values *k)
{
	const size_t record = 4 * (size_t)k->ng + (size_t)k->m * k->bits / 8;
	unsigned i = 0;

	for (unsigned r = 0, i0 = 0; record >= 16 && i0 < k->n; r++, i0 += k->rows->run) {
		const unsigned end = k->n - i0 < k->rows->run ? k->n : i0 + k->rows->run;
		const uint8_t *p = k->rows->code[r];

		for (i = i0; i + 8 <= end; i += 8, p += 8 * k->rows->stride) {
			__m128i x[8], y[8], t[8];

			for (unsigned a = 0; a < 8; a++)
				x[a] = _mm_loadu_si128((const __m128i *)(const void *)(p + a * k->rows->stride));
			for (unsigned a = 0; a < 4; a++) /* words of rows 2a, 2a + 1 interleaved */
				y[2 * a] = _mm_unpacklo_epi16(x[2 * a], x[2 * a + 1]), y[2 * a + 1] = _mm_unpackhi_epi16(x[2 * a], x[2 * a + 1]);
			for (unsigned a = 0; a < 2; a++) /* dwords of row pairs 2a, 2a + 1 */
				for (unsigned b = 0; b < 2; b++) {
					t[4 * a + 2 * b] = _mm_unpacklo_epi32(y[4 * a + b], y[4 * a + 2 + b]);
					t[4 * a + 2 * b + 1] = _mm_unpackhi_epi32(y[4 * a + b], y[4 * a + 2 + b]);
				}
			/* t[4a + e'] holds scalars 2e'', 2e'' + 1 of rows 4a..4a+3: qwords of both halves of the rows */
			for (unsigned e = 0; e < 2 * k->ng; e++) {
				const unsigned at = e / 4 * 2 + e % 4 / 2; /* the t holding scalar e (words 2 (e % 2).. of it) */
				const __m128i v = e % 2 ? _mm_unpackhi_epi64(t[at], t[4 + at]) : _mm_unpacklo_epi64(t[at], t[4 + at]);

				_mm_storeu_si128((__m128i *)(void *)(k->zs[e] + i), v);
			}
		}
		if (i < end)
			break;
	}
	for (; i < k->n; i++) {
		uint16_t one[2 * U8_GROUPS];

		memcpy(one, kvp_run_codes(k->rows, i), 4 * (size_t)k->ng);
		for (unsigned e = 0; e < 2 * k->ng; e++)
			k->zs[e][i] = one[e];
	}
	for (unsigned e = 0; e < 2 * k->ng; e++)
		memset(k->zs[e] + k->n, 0, 8 * sizeof **k->zs);
}

/* hmax's twin for the least lane */
INLINE float hmin(__m256 v)
{
	__m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));

	m = _mm_min_ps(m, _mm_movehl_ps(m, m));
	m = _mm_min_ss(m, _mm_movehdup_ps(m));
	return _mm_cvtss_f32(m);
}

/* kvp_weight_u8_in over eight lanes */
INLINE __m256 weight_u8_in8(__m256 w, __m256 s)
{
	return _mm256_max_ps(_mm256_mul_ps(w, s), _mm256_setzero_ps());
}

/* hn <= 4 heads' z sums into acc (kvp_fold16's order: channels' rows i % 16 < 8 in one register, the others in
 * a second; lanes past n add +0, which changes no bit of a sum that starts at +0), their largest and least u,
 * then their weights as bytes, with the same operations as the plain code's. */
static void u8_values_weights(unsigned hn, struct u8_values *k, const float *w, size_t ws, float *acc, size_t as)
{
	const unsigned n = k->n, ng = k->ng;
	const __m256 half_levels = _mm256_set1_ps((float)((1u << k->bits) - 1) * 0.5f);
	const __m256 inf = _mm256_set1_ps(INFINITY);
	__m256 top[4], least[4];

	for (unsigned h = 0; h < hn; h++)
		top[h] = _mm256_setzero_ps(), least[h] = inf;
	for (unsigned c = 0; c < ng; c++) {
		__m256 sums[4][2];

		for (unsigned h = 0; h < hn; h++)
			sums[h][0] = sums[h][1] = _mm256_setzero_ps();
		for (unsigned i = 0; i < n; i += 8) {
			const unsigned rows = n - i < 8 ? n - i : 8;
			const __m256 in = _mm256_castsi256_ps(tail_mask(rows));
			const __m256 sv = f16_run8((const uint8_t *)k->zs[ng + c], i, 8);
			/* z + s * L / 2: the codes' centre (kernels.h) */
			const __m256 zc = _mm256_add_ps(f16_run8((const uint8_t *)k->zs[c], i, 8), _mm256_mul_ps(sv, half_levels));

			for (unsigned h = 0; h < hn; h++) {
				const __m256 wv = f32_run8(w + h * ws + i, rows), u = weight_u8_in8(wv, sv);

				top[h] = _mm256_max_ps(top[h], u);
				least[h] = _mm256_min_ps(least[h], _mm256_blendv_ps(inf, u, in));
				sums[h][i / 8 % 2] = _mm256_add_ps(sums[h][i / 8 % 2], _mm256_mul_ps(wv, zc));
			}
		}
		for (unsigned h = 0; h < hn; h++) {
			float lanes[16];

			_mm256_storeu_ps(lanes, sums[h][0]);
			_mm256_storeu_ps(lanes + 8, sums[h][1]);
			acc[h * as + k->m + c] += kvp_fold16(lanes);
		}
	}
	for (unsigned h = 0; h < hn; h++) {
		const float t = hmax(top[h]), lo = n ? hmin(least[h]) : 0.0f;
		const __m256 lov = _mm256_set1_ps(lo), inv = _mm256_set1_ps(kvp_weight_inv_u8(t - lo));

		k->f[h] = (t - lo) / (2.0f * KVP_WEIGHT_MAX_U8), k->e[h] = lo * 0.5f;
		for (unsigned c = 0; c < ng; c++) {
			uint8_t *row = k->w8[h][c];

			for (unsigned i = 0; i < n; i += 8) {
				const unsigned rows = n - i < 8 ? n - i : 8;
				const __m256 u = weight_u8_in8(f32_run8(w + h * ws + i, rows), f16_run8((const uint8_t *)k->zs[ng + c], i, 8));
				/* u >= lo: x is never below 0 nor NaN, and x + 0.5 truncated is kvp_weight_u8's rounding */
				const __m256 x = _mm256_mul_ps(_mm256_sub_ps(u, lov), inv);
				const __m256i v = _mm256_min_epi32(_mm256_cvttps_epi32(_mm256_add_ps(x, _mm256_set1_ps(0.5f))),
								   _mm256_set1_epi32(255));
				const __m128i wd = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
				const __m128i b = _mm_packus_epi16(wd, wd);

				if (rows == 8) {
					_mm_storel_epi64((__m128i *)(void *)(row + i), b);
				} else {
					uint8_t tail[16];

					_mm_storeu_si128((__m128i *)(void *)tail, b);
					memcpy(row + i, tail, rows);
				}
			}
			memset(row + n, 0, 4);
		}
	}
}

/* The eight columns' bytes of rows a..d in each 128-bit lane, row t's `bits` bytes from byte t * bits. Loaded
 * into general registers each at its own width: a narrower store to a buffer read back wider stalls the load. */
INLINE __m256i u8_values_words(unsigned bits, uint32_t a, uint32_t b, uint32_t c, uint32_t d)
{
	if (bits == 2)
		return _mm256_set1_epi64x((long long)((uint64_t)a | (uint64_t)b << 16 | (uint64_t)c << 32 | (uint64_t)d << 48));
	return _mm256_broadcastsi128_si256(_mm_setr_epi32((int)a, (int)b, (int)c, (int)d));
}

/* Row p's `bits` bytes (2 or 4) as an integer. */
INLINE uint32_t u8_values_load(unsigned bits, const uint8_t *p)
{
	uint16_t h;
	uint32_t w;

	if (bits == 2) {
		memcpy(&h, p, 2);
		return h;
	}
	memcpy(&w, p, 4);
	return w;
}

/* Four whole rows from p on, `stride` apart. */
INLINE __m256i u8_values_four(unsigned bits, const uint8_t *p, size_t stride)
{
	return u8_values_words(bits, u8_values_load(bits, p), u8_values_load(bits, p + stride),
			       u8_values_load(bits, p + 2 * stride), u8_values_load(bits, p + 3 * stride));
}

/* The first k < 4 rows from p on, `stride` apart, the others zeros. */
INLINE __m256i u8_values_some(unsigned bits, const uint8_t *p, size_t stride, unsigned k)
{
	uint32_t v[3] = { 0, 0, 0 };

	for (unsigned t = 0; t < k; t++)
		v[t] = u8_values_load(bits, p + t * stride);
	return u8_values_words(bits, v[0], v[1], v[2], 0);
}

/* One quad of rows from i: its centred codes (x: the rows' bytes) into the column sums (ones: 1 for each row
 * present) and into each head's sums against the four rows' weights of the group (wc + h * U8_HEAD). */
#define U8_HEAD (U8_GROUPS * (KVP_AXPY_I16_ROWS + 4)) /* bytes from a head's weights to the next's */
#define U8V_HEAD(a, s, h, cv)                                                                          \
	do {                                                                                           \
		const __m256i w4 = broadcast_bytes(wc + (h) * U8_HEAD + i, 4);                         \
                                                                                                       \
		if (vnni)                                                                              \
			s = dpbusd_vex(s, w4, cv);                                                     \
		else                                                                                   \
			a = _mm256_add_epi16(a, _mm256_maddubs_epi16(w4, cv));                         \
	} while (0)
#define U8V_STEP(x, ones)                                                                                        \
	do {                                                                                                     \
		const __m256i cv = _mm256_shuffle_epi8(tab, _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(x, sel), \
											      shift), low));         \
		U8V_HEAD(a0, s0, 0, cv);                                                                         \
		if (hn > 1)                                                                                      \
			U8V_HEAD(a1, s1, 1, cv);                                                                 \
		if (hn > 2)                                                                                      \
			U8V_HEAD(a2, s2, 2, cv);                                                                 \
		if (hn > 3)                                                                                      \
			U8V_HEAD(a3, s3, 3, cv);                                                                 \
		if (vnni)                                                                                        \
			c32 = dpbusd_vex(c32, ones, cv);                                                         \
		else                                                                                             \
			c16 = _mm256_add_epi16(c16, _mm256_maddubs_epi16(ones, cv));                             \
		if (!vnni && ++quads == flush) {                                                                 \
			s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(a0, ones16)), a0 = _mm256_setzero_si256();   \
			s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(a1, ones16)), a1 = _mm256_setzero_si256();   \
			s2 = _mm256_add_epi32(s2, _mm256_madd_epi16(a2, ones16)), a2 = _mm256_setzero_si256();   \
			s3 = _mm256_add_epi32(s3, _mm256_madd_epi16(a3, ones16)), a3 = _mm256_setzero_si256();   \
			c32 = _mm256_add_epi32(c32, _mm256_madd_epi16(c16, ones16)), c16 = _mm256_setzero_si256(); \
			quads = 0;                                                                               \
		}                                                                                                \
	} while (0)

/* acc[0..kc) += f * (float)s + e * (float)c, as the plain code adds a column (kc <= 8): both 8-bit value
 * kernels' last step, KIVI's (always eight columns) and avx2-vnni's TurboQuant one */
INLINE void u8_add_columns(float *acc, unsigned kc, float f, float e, __m256i s, __m256i c)
{
	const __m256 add = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(f), _mm256_cvtepi32_ps(s)),
					 _mm256_mul_ps(_mm256_set1_ps(e), _mm256_cvtepi32_ps(c)));

	if (kc == 8) {
		_mm256_storeu_ps(acc, _mm256_add_ps(_mm256_loadu_ps(acc), add));
		return;
	}
	const __m256i in = tail_mask(kc);

	_mm256_maskstore_ps(acc, in, _mm256_add_ps(_mm256_maskload_ps(acc, in), add));
}

/* hn <= 4 heads over columns [j, j + 8) of every row (hn and bits constants once inlined): per four rows, their
 * centred codes a column per dword (sel: each dword's four source bytes, shift: its code's place in them, tab:
 * 2 code - L by code). */
INLINE void u8_values_columns(int vnni, unsigned hn, unsigned bits, const struct u8_values *k, unsigned j, float *acc,
			      size_t as, const struct kvp_ahead *ahead, unsigned *step, unsigned steps)
{
	const unsigned flush = bits == 2 ? 16 : 4; /* quads of rows whose int16 sums stay below 2^15 */
	const unsigned n = k->n, at = 4 * k->ng + j * bits / 8;
	const size_t stride = k->rows->stride;
	const uint8_t *const wc = k->w8[0][j / k->gsize];
	const __m256i sel = bits == 2 ? _mm256_setr_epi8(0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 1, 3, 5, 7, 1, 3, 5,
							  7, 1, 3, 5, 7, 1, 3, 5, 7)
				      : _mm256_setr_epi8(0, 4, 8, 12, 0, 4, 8, 12, 1, 5, 9, 13, 1, 5, 9, 13, 2, 6, 10, 14, 2,
							  6, 10, 14, 3, 7, 11, 15, 3, 7, 11, 15);
	const __m256i shift = bits == 2 ? _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6) : _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
	const __m256i low = _mm256_set1_epi8((char)((1u << bits) - 1)), ones16 = _mm256_set1_epi16(1);
	const __m256i all4 = _mm256_set1_epi32(0x01010101), tab = k->centred;
	__m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, s0 = a0, s1 = a0, s2 = a0, s3 = a0;
	__m256i c16 = a0, c32 = a0;
	unsigned quads = 0;

	for (unsigned r = 0, i0 = 0; i0 < n; r++, i0 += k->rows->run) {
		const unsigned end = n - i0 < k->rows->run ? n : i0 + k->rows->run;
		const uint8_t *codes = k->rows->code[r] + at;
		unsigned i = i0;

		kvp_ahead_share(ahead, (*step)++, steps);
		for (; i + 4 <= end; i += 4, codes += 4 * stride)
			U8V_STEP(u8_values_four(bits, codes, stride), all4);
		if (i < end)
			U8V_STEP(u8_values_some(bits, codes, stride, end - i),
				 _mm256_set1_epi32((int)(0x01010101u >> 8 * (4 - (end - i)))));
	}
	c32 = _mm256_add_epi32(c32, _mm256_madd_epi16(c16, ones16));
	/* the int16 sums left since the last flush (none with vnni) */
	s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(a0, ones16));
	s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(a1, ones16));
	s2 = _mm256_add_epi32(s2, _mm256_madd_epi16(a2, ones16));
	s3 = _mm256_add_epi32(s3, _mm256_madd_epi16(a3, ones16));
	u8_add_columns(acc + j, 8, k->f[0], k->e[0], s0, c32);
	if (hn > 1)
		u8_add_columns(acc + as + j, 8, k->f[1], k->e[1], s1, c32);
	if (hn > 2)
		u8_add_columns(acc + 2 * as + j, 8, k->f[2], k->e[2], s2, c32);
	if (hn > 3)
		u8_add_columns(acc + 3 * as + j, 8, k->f[3], k->e[3], s3, c32);
}

#undef U8V_STEP
#undef U8V_HEAD
#undef U8_HEAD

/* Every eight columns of hn heads, hn and bits constants once inlined. */
INLINE void u8_values_heads(int vnni, unsigned hn, unsigned bits, const struct u8_values *k, float *acc, size_t as,
			    const struct kvp_ahead *ahead)
{
	const unsigned steps = k->m / 8 * ((k->n + k->rows->run - 1) / k->rows->run);
	unsigned step = 0;

	for (unsigned j = 0; j < k->m; j += 8)
		u8_values_columns(vnni, hn, bits, k, j, acc, as, ahead, &step, steps);
}

INLINE int u8_scaled(int vnni, unsigned bits, unsigned m, unsigned gsize, const struct kvp_row_runs *rows, unsigned g,
		     const float *w, size_t w_stride, float *acc, size_t acc_stride, const struct kvp_ahead *ahead)
{
	const unsigned ng = gsize ? (m + gsize - 1) / gsize : 0, n = rows->n;
	uint8_t w8[4][U8_GROUPS][KVP_AXPY_I16_ROWS + 4];
	uint16_t zs[2 * U8_GROUPS][KVP_AXPY_I16_ROWS + 8];
	struct u8_values k = { bits, m, gsize, ng, n, rows, zs, w8, { 0 }, { 0 }, _mm256_setzero_si256() };
	int8_t centred[16] = { 0 };

	if ((bits != 2 && bits != 4) || !gsize || gsize % 8 || m % 8 || ng > U8_GROUPS || n > KVP_AXPY_I16_ROWS ||
	    rows->run % KVP_RUN_ROWS || any_sign(g, n, w, w_stride))
		return 0;
	for (unsigned v = 0; v < (1u << bits); v++)
		centred[v] = (int8_t)kvp_centred_code(v, bits);
	k.centred = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(const void *)centred));
	u8_values_scalars(&k);
	for (unsigned h0 = 0; h0 < g; h0 += 4) {
		const unsigned hn = g - h0 < 4 ? g - h0 : 4;
		const struct kvp_ahead *a = h0 ? NULL : ahead;
		float *ah = acc + h0 * acc_stride;

		u8_values_weights(hn, &k, w + h0 * w_stride, w_stride, ah, acc_stride);
#define U8V_HEADS(hn) (bits == 2 ? u8_values_heads(vnni, hn, 2, &k, ah, acc_stride, a) \
			       : u8_values_heads(vnni, hn, 4, &k, ah, acc_stride, a))
		switch (hn) {
		case 4: U8V_HEADS(4); break;
		case 3: U8V_HEADS(3); break;
		case 2: U8V_HEADS(2); break;
		default: U8V_HEADS(1); break;
		}
#undef U8V_HEADS
	}
	return 1;
}

static int axpy_u8_scaled(unsigned bits, unsigned m, unsigned gsize, const struct kvp_row_runs *rows, unsigned g,
			  const float *w, size_t w_stride, float *acc, size_t acc_stride, const struct kvp_ahead *ahead)
{
	return u8_scaled(0, bits, m, gsize, rows, g, w, w_stride, acc, acc_stride, ahead);
}

/* avx2-vnni's: the same steps, each quad of rows multiplied and added in int32 by vpdpbusd */
static int axpy_u8_scaled_vnni(unsigned bits, unsigned m, unsigned gsize, const struct kvp_row_runs *rows, unsigned g,
			       const float *w, size_t w_stride, float *acc, size_t acc_stride,
			       const struct kvp_ahead *ahead)
{
	return u8_scaled(1, bits, m, gsize, rows, g, w, w_stride, acc, acc_stride, ahead);
}

/*
 * lut_axpy_u8_group on AVX-VNNI (the avx2-vnni table: AVX2 CPUs with the VEX-encoded vpdpbusd, Intel's client
 * cores since Alder Lake, Sierra Forest, AMD Zen 5), the same bits as AVX-512's. The plain avx2 table declines
 * it: vpmaddubsw's pairs of an int8 table against 8-bit weights reach 2 * 255 * 128 and saturate, so its
 * values take the 12-bit lut_axpy_i16_group, two rows per vpmaddwd lane and an add. Here four rows' values of
 * a column share a dword, and one vpdpbusd multiplies them with the four rows' weights and adds.
 * Per eight columns (a multiple of 8, so a row's codes of them start on a byte and fill `bits` bytes), four
 * rows at a time: the rows' bytes go to the four dwords of a 128-bit lane, repeated in both; vpshufb gives
 * each (column, row) word the row's two bytes around the code (the second only where the code crosses into
 * it), vpmullw by a power of two lifts the code to the word's top and a shift brings it down (the bits above
 * it leave the word, those below are shifted out), and vpackuswb of the two registers (columns 4L, 4L + 1 of
 * lane L in one, 4L + 2, 4L + 3 in the other) leaves dword q of lane L holding column 4L + q's four rows, in
 * column order. A vpshufb of the table gives their values. Column sums (weights 1) carry the least weight's term.
 */
struct vnni_values {
	unsigned bits, m, n;
	const struct kvp_row_runs *rows;
	float *scale;                           /* each row's, zeros past n to a multiple of 8 */
	uint8_t (*w8)[KVP_AXPY_I16_ROWS + 8];   /* [head][row], zeros past n */
	float f[4], e[4];                       /* unit * (top - lo) / 255 and unit * lo, per head */
	__m256i ctl[2], mul[2], tab;
};

/* Word 4d + t of lane L of register v: the bytes of row t (at 4t) around column c = 4L + 2v + d's code, and
 * the power of two that lifts it to the word's top. */
static void vnni_spread(struct vnni_values *k)
{
	uint8_t ctl[2][32];
	int16_t mul[2][16];

	for (unsigned v = 0; v < 2; v++)
		for (unsigned L = 0; L < 2; L++)
			for (unsigned d = 0; d < 2; d++)
				for (unsigned t = 0; t < 4; t++) {
					const unsigned c = 4 * L + 2 * v + d, bit = c * k->bits, s = bit % 8;
					const unsigned word = 8 * L + 4 * d + t;

					ctl[v][2 * word] = (uint8_t)(4 * t + bit / 8);
					ctl[v][2 * word + 1] = s + k->bits > 8 ? (uint8_t)(4 * t + bit / 8 + 1) : 0x80;
					mul[v][word] = (int16_t)(uint16_t)(1u << (16 - k->bits - s));
				}
	for (unsigned v = 0; v < 2; v++) {
		k->ctl[v] = _mm256_loadu_si256((const __m256i *)(const void *)ctl[v]);
		k->mul[v] = _mm256_loadu_si256((const __m256i *)(const void *)mul[v]);
	}
}

/* kvp_weights_u8 for hn <= 4 heads (the same products, least and largest, rounding), eight rows at a time. */
static void vnni_weights(unsigned hn, struct vnni_values *k, float unit, const float *w, size_t ws)
{
	const unsigned n = k->n;
	const __m256 inf = _mm256_set1_ps(INFINITY);

	for (unsigned h = 0; h < hn; h++) {
		__m256 top = _mm256_setzero_ps(), least = inf;
		float t, lo;

		for (unsigned i = 0; i < n; i += 8) {
			const unsigned rows = n - i < 8 ? n - i : 8;
			const __m256 u = weight_u8_in8(f32_run8(w + h * ws + i, rows), _mm256_loadu_ps(k->scale + i));

			top = _mm256_max_ps(top, u);
			least = _mm256_min_ps(least, _mm256_blendv_ps(inf, u, _mm256_castsi256_ps(tail_mask(rows))));
		}
		t = hmax(top), lo = n ? hmin(least) : 0.0f;
		k->f[h] = unit * ((t - lo) / KVP_WEIGHT_MAX_U8), k->e[h] = unit * lo;
		const __m256 lov = _mm256_set1_ps(lo), inv = _mm256_set1_ps(kvp_weight_inv_u8(t - lo));

		for (unsigned i = 0; i < n; i += 8) {
			const unsigned rows = n - i < 8 ? n - i : 8;
			const __m256 u = weight_u8_in8(f32_run8(w + h * ws + i, rows), _mm256_loadu_ps(k->scale + i));
			/* u >= lo, so x is not below 0; a NaN x converts to INT_MIN, which the pack takes to 0 as
			 * kvp_weight_u8 does */
			const __m256 x = _mm256_mul_ps(_mm256_sub_ps(u, lov), inv);
			const __m256i v = _mm256_min_epi32(_mm256_cvttps_epi32(_mm256_add_ps(x, _mm256_set1_ps(0.5f))),
							   _mm256_set1_epi32(255));
			const __m128i wd = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));

			_mm_storel_epi64((__m128i *)(void *)(k->w8[h] + i), _mm_packus_epi16(wd, wd));
		}
		memset(k->w8[h] + n, 0, 8); /* the last quad of rows may reach three past n */
	}
}

/* The nbytes <= 4 bytes at p as an integer, nothing past them read. */
INLINE uint32_t vnni_row_bytes(const uint8_t *p, unsigned nbytes)
{
	uint32_t v = 0;

	switch (nbytes) {
	case 4: memcpy(&v, p, 4); break;
	case 3: memcpy(&v, p, 2), v |= (uint32_t)p[2] << 16; break;
	case 2: memcpy(&v, p, 2); break;
	default: v = p[0]; break;
	}
	return v;
}

/* Four rows' nbytes from p on, `stride` apart, row t at bytes 4t of both lanes: built in registers (four
 * narrow stores read back as one wide load would stall it). */
INLINE __m256i vnni_four(const uint8_t *p, size_t stride, unsigned nbytes)
{
	__m128i x = _mm_cvtsi32_si128((int)vnni_row_bytes(p, nbytes));

	x = _mm_insert_epi32(x, (int)vnni_row_bytes(p + stride, nbytes), 1);
	x = _mm_insert_epi32(x, (int)vnni_row_bytes(p + 2 * stride, nbytes), 2);
	x = _mm_insert_epi32(x, (int)vnni_row_bytes(p + 3 * stride, nbytes), 3);
	return _mm256_broadcastsi128_si256(x);
}

/* The first k < 4 rows the same way, zeros past them. */
INLINE __m256i vnni_some(const uint8_t *p, size_t stride, unsigned nbytes, unsigned k)
{
	__m128i x = _mm_cvtsi32_si128((int)vnni_row_bytes(p, nbytes));

	if (k > 1)
		x = _mm_insert_epi32(x, (int)vnni_row_bytes(p + stride, nbytes), 1);
	if (k > 2)
		x = _mm_insert_epi32(x, (int)vnni_row_bytes(p + 2 * stride, nbytes), 2);
	return _mm256_broadcastsi128_si256(x);
}

/* The table's values of the four rows' codes in x, column q of lane L in dword 4L + q (byte t: row t). */
INLINE __m256i vnni_values_of(unsigned bits, const struct vnni_values *k, __m256i x)
{
	const int down = 16 - (int)bits;
	const __m256i a = _mm256_srli_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(x, k->ctl[0]), k->mul[0]), down);
	const __m256i b = _mm256_srli_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(x, k->ctl[1]), k->mul[1]), down);

	return _mm256_shuffle_epi8(k->tab, _mm256_packus_epi16(a, b));
}

#define VNNI_HEAD(a, h) a = dpbusd_vex(a, _mm256_set1_epi32((int)vnni_weights4(k->w8[h] + i)), cv)
#define VNNI_STEP(x, ones)                                  \
	do {                                                \
		const __m256i cv = vnni_values_of(bits, k, x); \
		VNNI_HEAD(a0, 0);                           \
		if (hn > 1)                                 \
			VNNI_HEAD(a1, 1);                   \
		if (hn > 2)                                 \
			VNNI_HEAD(a2, 2);                   \
		if (hn > 3)                                 \
			VNNI_HEAD(a3, 3);                   \
		c = dpbusd_vex(c, ones, cv);                \
	} while (0)

/* Rows i..i+3's weights of one head as a dword, row i's lowest. */
INLINE uint32_t vnni_weights4(const uint8_t *w)
{
	uint32_t v;

	memcpy(&v, w, 4);
	return v;
}

/* hn <= 4 heads over columns [j, j + 8) of every row, hn and bits constants once inlined. */
INLINE void vnni_columns(unsigned hn, unsigned bits, const struct vnni_values *k, unsigned j, float *acc,
			 size_t as, const struct kvp_ahead *ahead, unsigned *step, unsigned steps)
{
	const unsigned n = k->n, kc = k->m - j < 8 ? k->m - j : 8, nbytes = (kc * bits + 7) / 8;
	const size_t at = (size_t)j * bits / 8, stride = k->rows->stride;
	/* four bytes where the row has them (the codes past the chunk's are never looked at), else only its own */
	const int wide = at + 4 <= ((size_t)k->m * bits + 7) / 8;
	const __m256i all4 = _mm256_set1_epi32(0x01010101);
	__m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, c = a0;

	for (unsigned r = 0, i0 = 0; i0 < n; r++, i0 += k->rows->run) {
		const unsigned end = n - i0 < k->rows->run ? n : i0 + k->rows->run;
		const uint8_t *codes = k->rows->code[r] + at;
		unsigned i = i0;

		kvp_ahead_share(ahead, (*step)++, steps);
		if (wide)
			for (; i + 4 <= end; i += 4, codes += 4 * stride)
				VNNI_STEP(vnni_four(codes, stride, 4), all4);
		else
			for (; i + 4 <= end; i += 4, codes += 4 * stride)
				VNNI_STEP(vnni_four(codes, stride, nbytes), all4);
		if (i < end)
			VNNI_STEP(vnni_some(codes, stride, nbytes, end - i),
				  _mm256_set1_epi32((int)(0x01010101u >> 8 * (4 - (end - i)))));
	}
	u8_add_columns(acc + j, kc, k->f[0], k->e[0], a0, c);
	if (hn > 1)
		u8_add_columns(acc + as + j, kc, k->f[1], k->e[1], a1, c);
	if (hn > 2)
		u8_add_columns(acc + 2 * as + j, kc, k->f[2], k->e[2], a2, c);
	if (hn > 3)
		u8_add_columns(acc + 3 * as + j, kc, k->f[3], k->e[3], a3, c);
}

#undef VNNI_STEP
#undef VNNI_HEAD

INLINE void vnni_heads(unsigned hn, unsigned bits, const struct vnni_values *k, float *acc, size_t as,
		       const struct kvp_ahead *ahead)
{
	const unsigned steps = (k->m + 7) / 8 * ((k->n + k->rows->run - 1) / k->rows->run);
	unsigned step = 0;

	for (unsigned j = 0; j < k->m; j += 8)
		vnni_columns(hn, bits, k, j, acc, as, ahead, &step, steps);
}

/* One width's heads, four at a time. */
INLINE void vnni_width(unsigned bits, struct vnni_values *k, float unit, unsigned g, const float *w,
		       size_t ws, float *acc, size_t as, const struct kvp_ahead *ahead)
{
	for (unsigned h0 = 0; h0 < g; h0 += 4) {
		const unsigned hn = g - h0 < 4 ? g - h0 : 4;
		const struct kvp_ahead *a = h0 ? NULL : ahead;
		float *ah = acc + h0 * as;

		vnni_weights(hn, k, unit, w + h0 * ws, ws);
		switch (hn) {
		case 4: vnni_heads(4, bits, k, ah, as, a); break;
		case 3: vnni_heads(3, bits, k, ah, as, a); break;
		case 2: vnni_heads(2, bits, k, ah, as, a); break;
		default: vnni_heads(1, bits, k, ah, as, a); break;
		}
	}
}

static int lut_axpy_u8_group_vnni(unsigned bits, unsigned m, const struct kvp_row_runs *rows,
				  const int8_t *lut, float unit, unsigned g, const float *w, size_t w_stride,
				  float *acc, size_t acc_stride, const struct kvp_ahead *ahead)
{
	const unsigned n = rows->n;
	float scale[KVP_AXPY_I16_ROWS + 8];
	uint8_t w8[4][KVP_AXPY_I16_ROWS + 8];
	struct vnni_values k = { .bits = bits, .m = m, .n = n, .rows = rows, .scale = scale, .w8 = w8 };
	int8_t tab[16] = { 0 };

	if (any_sign(g, n, w, w_stride))
		return 0;
	for (unsigned i = 0; i < n; i++)
		scale[i] = kvp_load_f32(kvp_run_scale(rows, i));
	memset(scale + n, 0, 8 * sizeof *scale);
	memcpy(tab, lut, (size_t)1 << bits);
	k.tab = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(const void *)tab));
	vnni_spread(&k);
	switch (bits) {
	case 1: vnni_width(1, &k, unit, g, w, w_stride, acc, acc_stride, ahead); break;
	case 2: vnni_width(2, &k, unit, g, w, w_stride, acc, acc_stride, ahead); break;
	case 3: vnni_width(3, &k, unit, g, w, w_stride, acc, acc_stride, ahead); break;
	default: vnni_width(4, &k, unit, g, w, w_stride, acc, acc_stride, ahead); break;
	}
	return 1;
}

/*
 * Keys on AVX-VNNI (avx2-vnni's lut_dot_i8_group, the same integers as every table's): a chunk's 32 codes go to
 * bytes in column order (the spread's two word registers, lane l of the first holding codes 16l..16l+7 and of
 * the second 16l+8..16l+15, packed), a vpshufb gives lut + 128 as unsigned bytes, and one vpdpbusd per head
 * multiplies them with the head's 32 query bytes as they are: sum (v + 128) q = sum v q + 128 sum q, whose
 * last term each row gives back. The avx2 table widens both to int16 for two vpmaddwd and two adds per head
 * and chunk (vpmaddubsw would saturate on full-range tables and queries).
 */
INLINE void vnni_key_chunk(unsigned hn, unsigned bits, const struct spread *s, __m256i tab, __m256i window,
			   int8_t q8[][KEY_COLUMNS], unsigned t, __m256i *a)
{
	const __m256i lo = _mm256_srli_epi16(spread_top(s, 0, window), 16 - (int)bits);
	const __m256i hi = _mm256_srli_epi16(spread_top(s, 1, window), 16 - (int)bits);
	const __m256i v = _mm256_shuffle_epi8(tab, _mm256_packus_epi16(lo, hi));

	a[0] = dpbusd_vex(a[0], v, _mm256_loadu_si256((const __m256i *)(const void *)(q8[0] + t)));
	if (hn > 1)
		a[1] = dpbusd_vex(a[1], v, _mm256_loadu_si256((const __m256i *)(const void *)(q8[1] + t)));
	if (hn > 2)
		a[2] = dpbusd_vex(a[2], v, _mm256_loadu_si256((const __m256i *)(const void *)(q8[2] + t)));
	if (hn > 3)
		a[3] = dpbusd_vex(a[3], v, _mm256_loadu_si256((const __m256i *)(const void *)(q8[3] + t)));
}

/* One row's sums of the hn heads over the pass's columns, less the bias: head h in lane h. */
INLINE __m128i vnni_key_row(unsigned hn, unsigned bits, unsigned m, const uint8_t *row, const struct spread *s,
			    __m256i tab, int8_t q8[][KEY_COLUMNS], unsigned j0, unsigned len32, unsigned direct,
			    __m128i biases)
{
	__m256i a[4] = { _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256() };
	unsigned t = 0;

	for (; t < direct; t += 32)
		vnni_key_chunk(hn, bits, s, tab, key_direct(bits, row + (j0 + t) * bits / 8), q8, t, a);
	for (; t < len32; t += 32)
		vnni_key_chunk(hn, bits, s, tab, key_window(bits, row, j0 + t, m), q8, t, a);
	return _mm_sub_epi32(hsum4_epi32(a[0], a[1], a[2], a[3]), biases);
}

/* k <= 4 rows' sums r[t] (head h in lane h) to out[h * n + t], added to what is there unless first: the 4 x 4
 * transposed, so that each head's rows go by one store (stored per row, the sums were read back from memory
 * as soon as written, which stalled every row). */
INLINE void vnni_key_out(unsigned hn, unsigned k, const __m128i r[4], int first, int32_t *out, size_t n)
{
	const __m128i a = _mm_unpacklo_epi32(r[0], r[1]), b = _mm_unpacklo_epi32(r[2], r[3]);
	const __m128i c = _mm_unpackhi_epi32(r[0], r[1]), d = _mm_unpackhi_epi32(r[2], r[3]);
	const __m128i by_head[4] = { _mm_unpacklo_epi64(a, b), _mm_unpackhi_epi64(a, b), _mm_unpacklo_epi64(c, d),
				     _mm_unpackhi_epi64(c, d) };

	for (unsigned h = 0; h < hn; h++) {
		int32_t *o = out + h * n;

		if (k == 4) {
			const __m128i v = first ? by_head[h] : _mm_add_epi32(by_head[h], _mm_loadu_si128((const __m128i *)(void *)o));

			_mm_storeu_si128((__m128i *)(void *)o, v);
		} else {
			int32_t lanes[4];

			_mm_storeu_si128((__m128i *)(void *)lanes, by_head[h]);
			for (unsigned t = 0; t < k; t++)
				o[t] = first ? lanes[t] : o[t] + lanes[t];
		}
	}
}

/* dot_i8_heads on vpdpbusd: the queries copied once per pass, zeros past len to a multiple of 32, and their
 * sums (128 times which each row's sums lose). */
INLINE void vnni_key_heads(unsigned hn, unsigned bits, unsigned m, unsigned n, const uint8_t *codes,
			   size_t stride, const struct spread *s, __m256i tab, const int8_t *q, size_t qs,
			   unsigned j0, unsigned len, int first, int32_t *out)
{
	int8_t q8[4][KEY_COLUMNS];
	const unsigned len32 = (len + 31) & ~31u;
	int32_t bias[4] = { 0, 0, 0, 0 };

	for (unsigned h = 0; h < hn; h++) {
		__m256i qsum = _mm256_setzero_si256();

		memset(q8[h], 0, len32);
		memcpy(q8[h], q + h * qs + j0, len);
		for (unsigned t = 0; t < len32; t += 32)
			qsum = dpbusd_vex(qsum, _mm256_set1_epi8(1),
					  _mm256_loadu_si256((const __m256i *)(const void *)(q8[h] + t)));
		bias[h] = 128 * _mm_cvtsi128_si32(hsum4_epi32(qsum, qsum, qsum, qsum));
	}
	const __m128i biases = _mm_loadu_si128((const __m128i *)(const void *)bias);

	const unsigned direct = key_direct_end(bits, m, j0, len);
	for (unsigned i = 0; i < n; i += 4) {
		__m128i r[4];

		for (unsigned t = 0; t < 4; t++)
			r[t] = i + t < n ? vnni_key_row(hn, bits, m, codes + (size_t)(i + t) * stride, s, tab, q8, j0, len32,
							direct, biases)
					 : _mm_setzero_si128();
		vnni_key_out(hn, n - i < 4 ? n - i : 4, r, first, out + i, n);
	}
}

INLINE void vnni_key_width(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			   const int8_t *lut, unsigned g, const int8_t *q, size_t qs, int32_t *out)
{
	/* vector v, lane l, word t: code 16l + 8v + t of the chunk, so that the pack leaves them in order */
	const struct spread s = key_spread(bits, 8, 16);
	uint8_t biased[16];
	__m256i tab;

	for (unsigned v = 0; v < 16; v++)
		biased[v] = (uint8_t)(lut[v < (1u << bits) ? v : 0] + 128);
	tab = byte_table(biased, 16, 1);
	KEY_PASSES(vnni_key_heads);
}

/* dot_i8_core's contract, for loops.h's lut_dot_i8_group (KVP_DOT_I8_GROUP) */
static __attribute__((noinline)) void dot_i8_core_vnni(unsigned bits, unsigned m, unsigned n, const uint8_t *codes,
						       size_t stride, const int8_t *lut, unsigned g, const int8_t *q,
						       size_t q_stride, int32_t *out)
{
	KEY_WIDTHS(vnni_key_width);
}

/*
 * spark_dot_i16_group (contract in kernels.h) for SparK's shapes at keep=0.5, d = 128 and 64 (T = d / 2 kept,
 * codes of 2 to 4 bits); other shapes take loops.h's. Per row:
 * 1. z: the T codes looked up as TurboQuant's keys are (key_window, key_values: sixteen int16 lanes a
 *    register, natural order), the T-point transform in those registers (a stage across registers is an add
 *    and a subtract; one within a register a shuffle to the partner, an add, a subtract and a blend), times
 *    sgn << shift, stored;
 * 2. x, sixteen channels at a time: a vpshufb per 128-bit lane whose control a table gives for the mask byte
 *    (spark_expand: lane l takes the rank-th value from where the byte's ranks start, or zero) places the
 *    kept values from z; the same control for the complement places the pruned channels' sign masks (the
 *    sign bits spread to int16 masks once per row) and marks the pruned lanes, where the pruned value
 *    (rho * ell by vpmulhrsw, which rounds as the contract does) goes, negated under its mask;
 * 3. vpmaddwd of x against each head's query, the four heads' sums reduced together.
 * Loops.h's version ran this shape at 32K tokens, d=128, in 93 ms a layer (with TurboQuant 3-bit values).
 */
#define SPARK_POP8(m) (((m) & 1) + ((m) >> 1 & 1) + ((m) >> 2 & 1) + ((m) >> 3 & 1) + ((m) >> 4 & 1) + ((m) >> 5 & 1) + \
		       ((m) >> 6 & 1) + ((m) >> 7 & 1))
/* byte b of the control for mask byte m: word b / 2 takes word rank (of the set bits below it), or zero */
#define SPARK_CTL(m, b) \
	(char)((m) >> ((b) / 2) & 1 ? 2 * SPARK_POP8((m) & ((1 << ((b) / 2)) - 1)) + (b) % 2 : 0x80)
#define SPARK_ROW(m)                                                                                                    \
	{ SPARK_CTL(m, 0), SPARK_CTL(m, 1), SPARK_CTL(m, 2), SPARK_CTL(m, 3), SPARK_CTL(m, 4), SPARK_CTL(m, 5),          \
	  SPARK_CTL(m, 6), SPARK_CTL(m, 7), SPARK_CTL(m, 8), SPARK_CTL(m, 9), SPARK_CTL(m, 10), SPARK_CTL(m, 11),       \
	  SPARK_CTL(m, 12), SPARK_CTL(m, 13), SPARK_CTL(m, 14), SPARK_CTL(m, 15) }
#define SPARK_ROWS16(m)                                                                                                 \
	SPARK_ROW(m), SPARK_ROW(m + 1), SPARK_ROW(m + 2), SPARK_ROW(m + 3), SPARK_ROW(m + 4), SPARK_ROW(m + 5),          \
	SPARK_ROW(m + 6), SPARK_ROW(m + 7), SPARK_ROW(m + 8), SPARK_ROW(m + 9), SPARK_ROW(m + 10), SPARK_ROW(m + 11),    \
	SPARK_ROW(m + 12), SPARK_ROW(m + 13), SPARK_ROW(m + 14), SPARK_ROW(m + 15)

static const char spark_expand[256][16] __attribute__((aligned(16))) = {
	SPARK_ROWS16(0),   SPARK_ROWS16(16),  SPARK_ROWS16(32),  SPARK_ROWS16(48),  SPARK_ROWS16(64),  SPARK_ROWS16(80),
	SPARK_ROWS16(96),  SPARK_ROWS16(112), SPARK_ROWS16(128), SPARK_ROWS16(144), SPARK_ROWS16(160), SPARK_ROWS16(176),
	SPARK_ROWS16(192), SPARK_ROWS16(208), SPARK_ROWS16(224), SPARK_ROWS16(240)
};

#undef SPARK_ROWS16
#undef SPARK_ROW
#undef SPARK_CTL
#undef SPARK_POP8

static void loops_spark_dot_i16_group(const struct kvp_masked_codes *rc, unsigned n, const uint8_t *base,
				      const int16_t *ell, const float *row_scale, unsigned g, const int16_t *q,
				      size_t q_stride, const float *head_scale, float *out, size_t out_stride)
	__attribute__((noinline));

/* One stage of the transform within a register: lanes with bit h of their rank clear keep self + partner, the
 * others partner - self (the definition's a + c and a - c). */
INLINE __m256i spark_stage(__m256i x, unsigned h)
{
	__m256i p;

	switch (h) {
	case 1: p = _mm256_shufflehi_epi16(_mm256_shufflelo_epi16(x, 0xb1), 0xb1); break;
	case 2: p = _mm256_shuffle_epi32(x, 0xb1); break;
	case 4: p = _mm256_shuffle_epi32(x, 0x4e); break;
	default: p = _mm256_permute2x128_si256(x, x, 0x01); break;
	}
	{
		const __m256i sum = _mm256_add_epi16(x, p), diff = _mm256_sub_epi16(p, x);

		switch (h) {
		case 1: return _mm256_blend_epi16(sum, diff, 0xaa);
		case 2: return _mm256_blend_epi16(sum, diff, 0xcc);
		case 4: return _mm256_blend_epi16(sum, diff, 0xf0);
		default: return _mm256_blend_epi32(sum, diff, 0xf0);
		}
	}
}

/* Row `codes`' z (T / 16 registers of int16, T a constant once inlined) into z[0..T), sgs[k]: sgn << shift of
 * ranks 16k..16k+15; early: the four bytes before codes belong to the row. */
INLINE void spark_z16(unsigned bits, unsigned T, const uint8_t *codes, int early, const struct spread *sp, __m256i tab,
		      const __m256i *sgs, int16_t *z)
{
	__m256i r[4];

	for (unsigned j = 0; j < T; j += 32) {
		/* 3-bit rows of 32 codes end 4 bytes short of a 16-byte load: it starts 4 bytes early (the row's
		 * mask lies before its codes), where key_window would copy them */
		const __m256i window = bits == 3 && T == 32 && early
					       ? _mm256_srli_si256(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(const void *)(codes - 4))), 4)
					       : key_window(bits, codes, j, T);

		r[j / 16] = key_values(bits, sp, 0, window, tab);
		r[j / 16 + 1] = key_values(bits, sp, 1, window, tab);
	}
	for (unsigned k = 0; k < T / 16; k++)
		for (unsigned h = 1; h < 16; h *= 2)
			r[k] = spark_stage(r[k], h);
	for (unsigned h = 16; h < T; h *= 2)
		for (unsigned k = 0; k < T / 16; k++)
			if (!(k & h / 16)) {
				const __m256i a = r[k], c = r[k + h / 16];

				r[k] = _mm256_add_epi16(a, c), r[k + h / 16] = _mm256_sub_epi16(a, c);
			}
	for (unsigned k = 0; k < T / 16; k++)
		_mm256_storeu_si256((__m256i *)(void *)(z + 16 * k), _mm256_mullo_epi16(r[k], sgs[k]));
}

/* The bytes' popcounts below each byte of w, byte k holding those of bytes 0..k-1 (all below 64). */
INLINE uint64_t spark_ranks(uint64_t w)
{
	w = w - (w >> 1 & 0x5555555555555555ull);
	w = (w & 0x3333333333333333ull) + (w >> 2 & 0x3333333333333333ull);
	w = (w + (w >> 4)) & 0x0f0f0f0f0f0f0f0full;
	return (w * 0x0101010101010101ull) << 8;
}

/* Byte b of the 16 bytes in w[0] (low first), then w[1]. */
INLINE unsigned spark_byte(const uint64_t w[2], unsigned b)
{
	return (unsigned)(w[b / 8] >> 8 * (b % 8)) & 0xff;
}

/* Eight int16 at p (in the first 128-bit lane) and at p2 (in the second). */
INLINE __m256i spark_pair(const void *p, const void *p2)
{
	return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p)),
				       _mm_loadu_si128((const __m128i *)p2), 1);
}

/* Row `row`'s x into x[0..D) (D, T constants once inlined); z: its kept values by rank. Returns 0, x untouched,
 * when its mask does not keep T channels. */
INLINE int spark_x16(unsigned D, unsigned T, const struct kvp_masked_codes *rc, const uint8_t *row, int16_t ell,
		     const int16_t *z, int16_t *x)
{
	const __m256i bit = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
					      (short)0x8000);
	const __m256i ones = _mm256_set1_epi16(-1), ellv = _mm256_set1_epi16(ell);
	const unsigned P = D - T;
	int16_t neg[64 + 8];
	uint64_t m[2] = { 0, 0 }, sw = 0, kr[2], pr[2];

	memcpy(m, row + rc->mask_at, D / 8);
	memcpy(&sw, row + rc->sign_at, P / 8);
	if ((unsigned)(__builtin_popcountll(m[0]) + __builtin_popcountll(m[1])) != T)
		return 0;
	for (unsigned k = 0; k < P / 16; k++) /* the pruned signs as int16 masks, in the pruned channels' order */
		_mm256_storeu_si256((__m256i *)(void *)(neg + 16 * k),
				    _mm256_cmpeq_epi16(_mm256_and_si256(_mm256_set1_epi16((short)(sw >> 16 * k)), bit), bit));
	memset(neg + P, 0, 8 * sizeof *neg);
	kr[0] = spark_ranks(m[0]), kr[1] = spark_ranks(m[1]) + (uint64_t)(unsigned)__builtin_popcountll(m[0]) * 0x0101010101010101ull;
	pr[0] = spark_ranks(~m[0]), pr[1] = spark_ranks(D > 64 ? ~m[1] : 0) + (uint64_t)(64 - __builtin_popcountll(m[0])) * 0x0101010101010101ull;
	for (unsigned c = 0; c < D / 16; c++) {
		/* the lanes' mask bytes 2c and 2c + 1, and the ranks of kept and pruned channels they start at */
		const unsigned k0 = spark_byte(m, 2 * c), k1 = spark_byte(m, 2 * c + 1);
		const unsigned a0 = spark_byte(kr, 2 * c), a1 = spark_byte(kr, 2 * c + 1);
		const unsigned p0 = spark_byte(pr, 2 * c), p1 = spark_byte(pr, 2 * c + 1);
		const __m256i kc = spark_pair(spark_expand[k0], spark_expand[k1]);
		const __m256i pc = spark_pair(spark_expand[k0 ^ 0xff], spark_expand[k1 ^ 0xff]);
		const __m256i kept = _mm256_shuffle_epi8(spark_pair(z + a0, z + a1), kc);
		const __m256i nm = _mm256_shuffle_epi8(spark_pair(neg + p0, neg + p1), pc);
		__m256i v = _mm256_and_si256(_mm256_mulhrs_epi16(_mm256_loadu_si256((const __m256i *)(const void *)(rc->rho + 16 * c)), ellv),
					     _mm256_shuffle_epi8(ones, pc));

		v = _mm256_sub_epi16(_mm256_xor_si256(v, nm), nm);
		_mm256_storeu_si256((__m256i *)(void *)(x + 16 * c), _mm256_or_si256(v, kept));
	}
	return 1;
}

/* The rows for hn <= 4 heads (q16: their queries, D int16 each), D and T constants once inlined. */
INLINE void spark_rows(unsigned D, unsigned T, const struct kvp_masked_codes *rc, unsigned n, const uint8_t *base,
		       const int16_t *ell, const float *row_scale, unsigned hn, const int16_t (*q16)[128],
		       const float *head_scale, float *out, size_t os)
{
	unsigned pos[2][2][8];
	struct spread sp;
	__m256i sgs[4];
	const __m256i tab = byte_table((const uint8_t *)rc->lut, 1u << rc->bits, 1);
	int16_t z[64 + 8], x[128];

	for (unsigned v = 0; v < 2; v++)
		for (unsigned l = 0; l < 2; l++)
			for (unsigned t = 0; t < 8; t++)
				pos[v][l][t] = (16 * v + 8 * l + t) * rc->bits;
	sp = spread_of(rc->bits, pos);
	for (unsigned k = 0; k < T / 16; k++) {
		int16_t s16[16];

		for (unsigned l = 0; l < 16; l++)
			s16[l] = (int16_t)(rc->sgn[16 * k + l] * (1 << rc->shift));
		sgs[k] = _mm256_loadu_si256((const __m256i *)(void *)s16);
	}
	memset(z + T, 0, 8 * sizeof *z);
	for (unsigned i = 0; i < n; i++) {
		const uint8_t *row = base + (size_t)i * rc->stride;
		int32_t sum[4];

		spark_z16(rc->bits, T, row + rc->code_at, rc->code_at >= 4, &sp, tab, sgs, z);
		if (!spark_x16(D, T, rc, row, ell[i], z, x)) {
			memset(sum, 0, sizeof sum); /* bytes the encoder never wrote: the row scores 0 */
		} else {
			/* written out per head: GCC keeps a loop over heads, and with it the sums, in memory */
			__m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;

#define SPARK_HEAD(a, h) a = _mm256_add_epi32(a, _mm256_madd_epi16(xv, _mm256_loadu_si256((const __m256i *)(const void *)(q16[h] + 16 * c))))
			for (unsigned c = 0; c < D / 16; c++) {
				const __m256i xv = _mm256_loadu_si256((const __m256i *)(void *)(x + 16 * c));

				SPARK_HEAD(a0, 0);
				SPARK_HEAD(a1, 1);
				SPARK_HEAD(a2, 2);
				SPARK_HEAD(a3, 3);
			}
#undef SPARK_HEAD
			_mm_storeu_si128((__m128i *)(void *)sum, hsum4_epi32(a0, a1, a2, a3));
		}
		for (unsigned h = 0; h < hn; h++)
			out[h * os + i] = ((float)sum[h] * head_scale[h]) * row_scale[i];
	}
}

static void spark_dot_i16_group(const struct kvp_masked_codes *rc, unsigned n, const uint8_t *base,
				const int16_t *ell, const float *row_scale, unsigned g, const int16_t *q,
				size_t q_stride, const float *head_scale, float *out, size_t out_stride)
{
	int16_t q16[4][128];

	if (!((rc->d == 128 && rc->kept == 64) || (rc->d == 64 && rc->kept == 32)) || rc->bits < 2 || rc->bits > 4) {
		loops_spark_dot_i16_group(rc, n, base, ell, row_scale, g, q, q_stride, head_scale, out, out_stride);
		return;
	}
	for (unsigned h0 = 0; h0 < g; h0 += 4) {
		const unsigned hn = g - h0 < 4 ? g - h0 : 4;

		memset(q16, 0, sizeof q16);
		for (unsigned h = 0; h < hn; h++)
			memcpy(q16[h], q + (h0 + h) * q_stride, rc->d * sizeof *q);
		if (rc->d == 128)
			spark_rows(128, 64, rc, n, base, ell, row_scale, hn, (const int16_t (*)[128])q16, head_scale + h0,
				   out + h0 * out_stride, out_stride);
		else
			spark_rows(64, 32, rc, n, base, ell, row_scale, hn, (const int16_t (*)[128])q16, head_scale + h0,
				   out + h0 * out_stride, out_stride);
	}
}

#define KVP_ISA_SPARK

/* loops.h's integer lanes: eight int32 in a ymm register, and eight bytes widened into them */
#define LOOPS_LANES 8
typedef int32_t loops_i32v __attribute__((vector_size(32)));

INLINE loops_i32v loops_bytes(const uint8_t *p)
{
	return (loops_i32v)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)p));
}

/* Eight rows' scales, the floats at p + t * stride (anywhere), loaded one by one and put together in registers. */
INLINE __m256 row_scales8(const uint8_t *p, size_t stride)
{
	return _mm256_setr_ps(kvp_load_f32(p), kvp_load_f32(p + stride), kvp_load_f32(p + 2 * stride),
			      kvp_load_f32(p + 3 * stride), kvp_load_f32(p + 4 * stride), kvp_load_f32(p + 5 * stride),
			      kvp_load_f32(p + 6 * stride), kvp_load_f32(p + 7 * stride));
}

/* loops.h's dot_i8_step (lut_dot_i8_group's float step) eight rows at a time: the same two products, rounded
 * one at a time, and the sum. The plain loop took a tenth of TurboQuant's attention at d=64. */
static void dot_i8_step(unsigned g, unsigned n, const int32_t *s, const float *head_scale, const uint8_t *row_scale,
			size_t scale_stride, float *out, size_t out_stride, int add)
{
	unsigned i = 0;

	for (; i + 8 <= n; i += 8) {
		const __m256 sc = row_scales8(row_scale + (size_t)i * scale_stride, scale_stride);

		for (unsigned h = 0; h < g; h++) {
			const __m256 v = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(const void *)(s + h * n + i)));
			float *o = out + h * out_stride + i;

			const __m256 x = _mm256_mul_ps(_mm256_mul_ps(v, _mm256_set1_ps(head_scale[h])), sc);

			_mm256_storeu_ps(o, add ? _mm256_add_ps(_mm256_loadu_ps(o), x) : x);
		}
	}
	for (unsigned h = 0; h < g; h++)
		for (unsigned t = i; t < n; t++)
			kvp_put_score(out + h * out_stride + t,
				      ((float)s[h * n + t] * head_scale[h]) * kvp_load_f32(row_scale + (size_t)t * scale_stride),
				      add);
}

#define KVP_ISA_DOT_I8_STEP

/* kvp_weights_i16 (lut_axpy_i16_group's 12-bit weights, the avx2 table's values) eight rows at a time: the same
 * products, the largest magnitude (a NaN product passes over, as there), the same rounding of halves away from
 * zero, and the int32 cut to its low 16 bits as the cast there does. The plain loop took half of the time that
 * TurboQuant 3-bit's values spent outside their integer kernel. */
static float weights_i16(unsigned n, const float *w, const uint8_t *row_scale, size_t scale_stride, int16_t *w16)
{
	const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
	float u[KVP_AXPY_I16_ROWS + 8];
	__m256 top = _mm256_setzero_ps();
	unsigned i = 0;
	float t;

	for (; i + 8 <= n; i += 8) {
		const __m256 sc = row_scales8(row_scale + (size_t)i * scale_stride, scale_stride);
		const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(w + i), sc);

		_mm256_storeu_ps(u + i, v);
		top = _mm256_max_ps(_mm256_and_ps(v, magnitude), top); /* a NaN magnitude keeps top */
	}
	t = hmax(top);
	for (; i < n; i++) {
		u[i] = w[i] * kvp_load_f32(row_scale + (size_t)i * scale_stride);
		t = fabsf(u[i]) > t ? fabsf(u[i]) : t;
	}
	const float inv = kvp_weight_inv(t);
	const __m256 vinv = _mm256_set1_ps(inv), half = _mm256_set1_ps(0.5f);
	const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));

	for (i = 0; i + 8 <= n; i += 8) {
		const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(u + i), vinv);
		/* x + 0.5 or x - 0.5 by the sign bit (-0 gets -0.5, whose truncation is 0 as well) */
		const __m256 r = _mm256_add_ps(x, _mm256_or_ps(_mm256_and_ps(x, sign), half));
		const __m256i v = _mm256_and_si256(_mm256_cvttps_epi32(r), _mm256_set1_epi32(0xffff));

		_mm_storeu_si128((__m128i *)(void *)(w16 + i),
				 _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
	}
	for (; i < n; i++)
		w16[i] = (int16_t)kvp_nearest(u[i] * inv);
	return t / KVP_WEIGHT_MAX;
}

/*
 * mask_codes' two steps (loops.h builds mask_codes from them, KVP_ISA_MASK_LEVELS). AVX2 has no byte
 * expansion, so a row goes in two. First its kept channels' levels (1 + magnitude), one byte each in rank
 * order, into a small array: each magnitude byte repeated four times by vpshufb and each field shifted
 * into place (at 1 bit: repeated eight times and its bit tested). Then per 32 channels one vpshufb places them: within each 16-channel
 * half the control byte of a kept channel is its rank counted from the half's first kept one (the bits below
 * it in its mask byte, kvp_kernels_mask_below, plus the first mask byte's count in the second 8), a pruned
 * channel's is 0x80 (zero), and the source is the 16 levels from the half's first rank on. The signs add 8
 * through the same bits-to-bytes step as the mask, and vpmaddubsw packs two codes to a byte. Hot rows take
 * 12.6 ns at d=64 and 22 ns at d=128 (keep=0.5, 2-bit magnitudes; Zen 5 VM), where the plain code took 130
 * and 270; a layer at 32K tokens over avx2-vnni went from 20-24x the fp16 cache's time to 1.5-1.6x.
 */
/* Bytes 0..3 of a 32-bit word, each eight times (per 128-bit lane: two of them). */
static const char eight_each[32] = { 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
				     2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3 };
/* Magnitude bytes 0..7 each as four bytes: lane 0 takes bytes 0..3, lane 1 bytes 4..7 of the broadcast. */
static const char four_each[32] = { 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3,
				    4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7 };

/* Bit j of w as byte j: 0xff where set. */
INLINE __m256i bits_to_bytes(uint32_t w)
{
	const __m256i which = _mm256_loadu_si256((const __m256i *)(const void *)eight_each);
	const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);

	return _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)w), which), bit), bit);
}

/*
 * The levels (1 + magnitude) of 32 kept ranks from the magnitude bytes at mag (8 at 2 bits, 4 at 1 bit), a
 * byte each. At 2 bits byte 4i+k of the result is field k of byte i: each byte four times, then shifted
 * by 2k where it sits at k; at 1 bit each byte eight times and its bit k tested.
 */
INLINE __m256i levels32(unsigned mb, const uint8_t *mag, unsigned nb)
{
	uint64_t w = 0;
	__m256i v;

	memcpy(&w, mag, nb);
	if (mb == 1)
		return _mm256_sub_epi8(_mm256_set1_epi8(1), bits_to_bytes((uint32_t)w));
	v = _mm256_set1_epi64x((long long)w);
	v = _mm256_shuffle_epi8(v, _mm256_loadu_si256((const __m256i *)(const void *)four_each));
	v = _mm256_or_si256(_mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi32(0x00000003)),
					    _mm256_and_si256(_mm256_srli_epi16(v, 2), _mm256_set1_epi32(0x00000300))),
			    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi32(0x00030000)),
					    _mm256_and_si256(_mm256_srli_epi16(v, 6), _mm256_set1_epi32(0x03000000))));
	return _mm256_add_epi8(v, _mm256_set1_epi8(1));
}

/* The kept channels' levels of one row into lv[0..kept), 32 at a time (bytes past them are scratch). */
INLINE void mask_levels(const struct kvp_mask_rows *rs, const uint8_t *mag, uint8_t *lv)
{
	const unsigned bytes = (rs->kept * rs->mb + 7) / 8;

	for (unsigned r = 0; r < rs->kept; r += 32) {
		const unsigned at = r * rs->mb / 8, nb = bytes - at < 4 * rs->mb ? bytes - at : 4 * rs->mb;

		_mm256_storeu_si256((__m256i *)(void *)(lv + r),
				    rs->mb ? levels32(rs->mb, mag + at, nb) : _mm256_set1_epi8(1));
	}
}

/* 32 channels' codes (mask and sign bits w and s, the first kept one at lv[0]) packed into 16 bytes at out;
 * returns how many of them are kept. */
INLINE unsigned mask_codes32(uint32_t w, uint32_t s, const uint8_t *lv, uint8_t *out)
{
	const uint64_t b0 = kvp_kernels_mask_below[w & 0xff], b1 = kvp_kernels_mask_below[w >> 8 & 0xff];
	const uint64_t b2 = kvp_kernels_mask_below[w >> 16 & 0xff], b3 = kvp_kernels_mask_below[w >> 24];
	/* avx2.c is built without POPCNT */
	const unsigned c0 = kvp_mask_below_count(b0, w), c1 = kvp_mask_below_count(b1, w >> 8);
	const unsigned c2 = kvp_mask_below_count(b2, w >> 16), c3 = kvp_mask_below_count(b3, w >> 24);
	const __m256i keep = bits_to_bytes(w);
	__m256i ctl = _mm256_setr_epi64x((long long)b0, (long long)(b1 + c0 * 0x0101010101010101ull), (long long)b2,
					 (long long)(b3 + c2 * 0x0101010101010101ull));
	__m256i c;

	ctl = _mm256_or_si256(ctl, _mm256_andnot_si256(keep, _mm256_set1_epi8((char)0x80)));
	c = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(const void *)lv)),
				    _mm_loadu_si128((const __m128i *)(const void *)(lv + c0 + c1)), 1);
	c = _mm256_shuffle_epi8(c, ctl);
	c = _mm256_or_si256(c, _mm256_and_si256(bits_to_bytes(s), _mm256_set1_epi8(8)));
	c = _mm256_maddubs_epi16(c, _mm256_set1_epi16(0x1001));
	c = _mm256_permute4x64_epi64(_mm256_packus_epi16(c, c), 0x08);
	_mm_storeu_si128((__m128i *)(void *)out, _mm256_castsi256_si128(c));
	return c0 + c1 + c2 + c3;
}

#define KVP_ISA_MASK_LEVELS
#define KVP_ISA_WEIGHTS_I16
#define KVP_ISA_ENCODE
#define KVP_ISA_SPARK_CHOOSE
#define KVP_ISA_SOFTMAX_GROUP
#define KVP_ISA_NAME "avx2"
#define KVP_ISA_TABLE kvp_kernels_avx2
#include "kernels/loops.h"

KVP_DOT_I8_GROUP(lut_dot_i8_group_vnni, dot_i8_core_vnni)
KVP_SCALED_GROUPS(dot_i8_scaled_groups_vnni, dot_i8_scaled_vnni)

const struct kvp_kernels kvp_kernels_avx2_vnni = {
	.name = "avx2-vnni",
	KVP_ISA_ENTRIES(lut_dot_i8_group_vnni, lut_axpy_u8_group_vnni, dot_i8_scaled_groups_vnni, axpy_u8_scaled_vnni)
};
