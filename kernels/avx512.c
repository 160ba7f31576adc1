/*
 * AVX-512 (F, BW, DQ, VL) + FMA + F16C kernels. Built with those flags and only called after dispatch.c
 * has seen the features and that the OS saves the zmm and mask registers. Sixteen floats per vector;
 * tails shorter than a vector use AVX-512 masked loads and stores, which never touch (or fault on) the
 * lanes masked off, so no read or write goes past the caller's buffers. The loops that do not depend on
 * the instruction set (over heads, bit widths and rows) are in loops.h, included at the end.
 */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "kernels/kernels.h"

#define INLINE static inline __attribute__((always_inline))

/* The first k lanes, 0 <= k <= 16. */
INLINE __mmask16 tail16(unsigned k)
{
	return (__mmask16)((1u << k) - 1);
}

/*
 * Zero, as a value the compiler cannot see is zero. Zero-masked vpexpand and vpcompress wait for their
 * destination register's old value on the Zen 5 this was measured on: in a loop whose register allocation
 * reuses that register, each iteration waits for the previous one (mask_codes at d=64: 2.47 against 1.21 ns
 * a row). Merged into a copy of this zero instead (a register move, which renaming makes free), they wait
 * for nothing; the compiler would turn a visible zero back into the zero-masked form.
 */
INLINE __m512i opaque_zero(void)
{
	__m512i z = _mm512_setzero_si512();

	__asm__("" : "+v"(z));
	return z;
}

INLINE __m512 load_f16(const uint16_t *p)
{
	return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

/* k <= 16 halves, zeros above; the masked load reads nothing past them. */
INLINE __m512 load_f16_tail(const uint16_t *p, unsigned k)
{
	return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(tail16(k), p));
}

INLINE __m512 load_f32_tail(const float *p, unsigned k)
{
	return _mm512_maskz_loadu_ps(tail16(k), p);
}

/* The 16 lanes added pairwise into 8: the first step of every horizontal sum. */
INLINE __m256 fold(__m512 v)
{
	return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
}

INLINE float hsum(__m512 v)
{
	__m256 h = fold(v);
	__m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));

	s = _mm_add_ps(s, _mm_movehl_ps(s, s));
	s = _mm_add_ss(s, _mm_movehdup_ps(s));
	return _mm_cvtss_f32(s);
}

/* The four horizontal sums of a..d, in order, in one vector. */
INLINE __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d)
{
	__m256 h = _mm256_hadd_ps(_mm256_hadd_ps(fold(a), fold(b)), _mm256_hadd_ps(fold(c), fold(d)));

	return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* Four rows per pass, so four FMA chains are in flight (see avx2.c). */
static void dot_f32(unsigned d, unsigned n, const float *rows, const float *q, float scale, float *out)
{
	const unsigned d16 = d & ~15u, k = d & 15u;
	const __m128 vscale = _mm_set1_ps(scale);
	unsigned i = 0;

	for (; i + 4 <= n; i += 4) {
		const float *r0 = rows + (size_t)i * d, *r1 = r0 + d, *r2 = r1 + d, *r3 = r2 + d;
		__m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;

		for (unsigned j = 0; j < d16; j += 16) {
			__m512 qv = _mm512_loadu_ps(q + j);

			a0 = _mm512_fmadd_ps(_mm512_loadu_ps(r0 + j), qv, a0);
			a1 = _mm512_fmadd_ps(_mm512_loadu_ps(r1 + j), qv, a1);
			a2 = _mm512_fmadd_ps(_mm512_loadu_ps(r2 + j), qv, a2);
			a3 = _mm512_fmadd_ps(_mm512_loadu_ps(r3 + j), qv, a3);
		}
		if (k) {
			__m512 qv = load_f32_tail(q + d16, k);

			a0 = _mm512_fmadd_ps(load_f32_tail(r0 + d16, k), qv, a0);
			a1 = _mm512_fmadd_ps(load_f32_tail(r1 + d16, k), qv, a1);
			a2 = _mm512_fmadd_ps(load_f32_tail(r2 + d16, k), qv, a2);
			a3 = _mm512_fmadd_ps(load_f32_tail(r3 + d16, k), qv, a3);
		}
		_mm_storeu_ps(out + i, _mm_mul_ps(hsum4(a0, a1, a2, a3), vscale));
	}
	for (; i < n; i++) {
		const float *r = rows + (size_t)i * d;
		__m512 a = _mm512_setzero_ps();

		for (unsigned j = 0; j < d16; j += 16)
			a = _mm512_fmadd_ps(_mm512_loadu_ps(r + j), _mm512_loadu_ps(q + j), a);
		if (k)
			a = _mm512_fmadd_ps(load_f32_tail(r + d16, k), load_f32_tail(q + d16, k), a);
		out[i] = scale * hsum(a);
	}
}

/* ahead: see dot_f16_group in kernels.h */
static void dot_f16_ahead(unsigned d, unsigned n, const uint16_t *rows, const float *q, float scale,
			  float *out, const uint16_t *ahead)
{
	const unsigned d16 = d & ~15u, k = d & 15u;
	const __m128 vscale = _mm_set1_ps(scale);
	unsigned i = 0;

	for (; i + 4 <= n; i += 4) {
		const uint16_t *r0 = rows + (size_t)i * d, *r1 = r0 + d, *r2 = r1 + d, *r3 = r2 + d;
		__m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;

		kvp_prefetch_span(ahead, (size_t)i * d * 2, (size_t)(i + 4) * d * 2);

		for (unsigned j = 0; j < d16; j += 16) {
			__m512 qv = _mm512_loadu_ps(q + j);

			a0 = _mm512_fmadd_ps(load_f16(r0 + j), qv, a0);
			a1 = _mm512_fmadd_ps(load_f16(r1 + j), qv, a1);
			a2 = _mm512_fmadd_ps(load_f16(r2 + j), qv, a2);
			a3 = _mm512_fmadd_ps(load_f16(r3 + j), qv, a3);
		}
		if (k) {
			__m512 qv = load_f32_tail(q + d16, k);

			a0 = _mm512_fmadd_ps(load_f16_tail(r0 + d16, k), qv, a0);
			a1 = _mm512_fmadd_ps(load_f16_tail(r1 + d16, k), qv, a1);
			a2 = _mm512_fmadd_ps(load_f16_tail(r2 + d16, k), qv, a2);
			a3 = _mm512_fmadd_ps(load_f16_tail(r3 + d16, k), qv, a3);
		}
		_mm_storeu_ps(out + i, _mm_mul_ps(hsum4(a0, a1, a2, a3), vscale));
	}
	for (; i < n; i++) {
		const uint16_t *r = rows + (size_t)i * d;
		__m512 a = _mm512_setzero_ps();

		for (unsigned j = 0; j < d16; j += 16)
			a = _mm512_fmadd_ps(load_f16(r + j), _mm512_loadu_ps(q + j), a);
		if (k)
			a = _mm512_fmadd_ps(load_f16_tail(r + d16, k), load_f32_tail(q + d16, k), a);
		out[i] = scale * hsum(a);
	}
}

/* acc[j] += sum_i w[i] * rows[i*d + j] for from <= j < d, sixteen columns (the last masked) at a time. */
static void axpy_f32_columns(unsigned d, unsigned from, unsigned n, const float *rows, const float *w,
			     float *acc)
{
	for (unsigned j = from; j < d; j += 16) {
		const unsigned k = d - j < 16 ? d - j : 16;
		__m512 a = load_f32_tail(acc + j, k);

		for (unsigned i = 0; i < n; i++)
			a = _mm512_fmadd_ps(_mm512_set1_ps(w[i]), load_f32_tail(rows + (size_t)i * d + j, k), a);
		_mm512_mask_storeu_ps(acc + j, tail16(k), a);
	}
}

/* Columns outer, rows inner: a strip of 64 accumulators stays in registers across all n rows. */
static void axpy_f32(unsigned d, unsigned n, const float *rows, const float *w, float *acc)
{
	unsigned j = 0;

	for (; j + 64 <= d; j += 64) {
		__m512 a0 = _mm512_loadu_ps(acc + j), a1 = _mm512_loadu_ps(acc + j + 16);
		__m512 a2 = _mm512_loadu_ps(acc + j + 32), a3 = _mm512_loadu_ps(acc + j + 48);

		for (unsigned i = 0; i < n; i++) {
			const float *r = rows + (size_t)i * d + j;
			__m512 wv = _mm512_set1_ps(w[i]);

			a0 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(r), a0);
			a1 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(r + 16), a1);
			a2 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(r + 32), a2);
			a3 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(r + 48), a3);
		}
		_mm512_storeu_ps(acc + j, a0);
		_mm512_storeu_ps(acc + j + 16, a1);
		_mm512_storeu_ps(acc + j + 32, a2);
		_mm512_storeu_ps(acc + j + 48, a3);
	}
	axpy_f32_columns(d, j, n, rows, w, acc);
}

/* The same over fp16 rows; ahead is spread over the strip loop's steps as in avx2.c. */
static void axpy_f16_ahead(unsigned d, unsigned n, const uint16_t *rows, const float *w, float *acc,
			   const uint16_t *ahead)
{
	const size_t steps = (size_t)(d / 64) * n, share = kvp_prefetch_share((size_t)n * d * 2, steps);
	unsigned j = 0;

	for (; j + 64 <= d; j += 64) {
		__m512 a0 = _mm512_loadu_ps(acc + j), a1 = _mm512_loadu_ps(acc + j + 16);
		__m512 a2 = _mm512_loadu_ps(acc + j + 32), a3 = _mm512_loadu_ps(acc + j + 48);

		for (unsigned i = 0; i < n; i++) {
			const uint16_t *r = rows + (size_t)i * d + j;
			const size_t it = (size_t)(j / 64) * n + i;
			__m512 wv = _mm512_set1_ps(w[i]);

			kvp_prefetch_span(ahead, it * share, (it + 1) * share);
			a0 = _mm512_fmadd_ps(wv, load_f16(r), a0);
			a1 = _mm512_fmadd_ps(wv, load_f16(r + 16), a1);
			a2 = _mm512_fmadd_ps(wv, load_f16(r + 32), a2);
			a3 = _mm512_fmadd_ps(wv, load_f16(r + 48), a3);
		}
		_mm512_storeu_ps(acc + j, a0);
		_mm512_storeu_ps(acc + j + 16, a1);
		_mm512_storeu_ps(acc + j + 32, a2);
		_mm512_storeu_ps(acc + j + 48, a3);
	}
	for (; j < d; j += 16) {
		const unsigned k = d - j < 16 ? d - j : 16;
		__m512 a = load_f32_tail(acc + j, k);

		for (unsigned i = 0; i < n; i++)
			a = _mm512_fmadd_ps(_mm512_set1_ps(w[i]), load_f16_tail(rows + (size_t)i * d + j, k), a);
		_mm512_mask_storeu_ps(acc + j, tail16(k), a);
	}
}

/*
 * Four heads over two rows per pass: each widened row chunk feeds four FMAs, so the conversions do not
 * bound the loop, and eight chains keep both FMA pipes busy.
 */
static void dot_f16_heads4(unsigned d, unsigned n, const uint16_t *rows, const float *q, float scale,
			   float *out, const uint16_t *ahead)
{
	const unsigned d16 = d & ~15u, k = d & 15u;
	const float *q0 = q, *q1 = q + d, *q2 = q1 + d, *q3 = q2 + d;
	float *o0 = out, *o1 = out + n, *o2 = o1 + n, *o3 = o2 + n;
	unsigned i = 0;

	for (; i + 2 <= n; i += 2) {
		const uint16_t *r0 = rows + (size_t)i * d, *r1 = r0 + d;
		__m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
		__m512 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
		float s[8];

		kvp_prefetch_span(ahead, (size_t)i * d * 2, (size_t)(i + 2) * d * 2);

		for (unsigned j = 0; j < d16; j += 16) {
			__m512 x = load_f16(r0 + j), y = load_f16(r1 + j), qv;

			qv = _mm512_loadu_ps(q0 + j), a0 = _mm512_fmadd_ps(x, qv, a0), b0 = _mm512_fmadd_ps(y, qv, b0);
			qv = _mm512_loadu_ps(q1 + j), a1 = _mm512_fmadd_ps(x, qv, a1), b1 = _mm512_fmadd_ps(y, qv, b1);
			qv = _mm512_loadu_ps(q2 + j), a2 = _mm512_fmadd_ps(x, qv, a2), b2 = _mm512_fmadd_ps(y, qv, b2);
			qv = _mm512_loadu_ps(q3 + j), a3 = _mm512_fmadd_ps(x, qv, a3), b3 = _mm512_fmadd_ps(y, qv, b3);
		}
		if (k) {
			__m512 x = load_f16_tail(r0 + d16, k), y = load_f16_tail(r1 + d16, k), qv;

			qv = load_f32_tail(q0 + d16, k), a0 = _mm512_fmadd_ps(x, qv, a0), b0 = _mm512_fmadd_ps(y, qv, b0);
			qv = load_f32_tail(q1 + d16, k), a1 = _mm512_fmadd_ps(x, qv, a1), b1 = _mm512_fmadd_ps(y, qv, b1);
			qv = load_f32_tail(q2 + d16, k), a2 = _mm512_fmadd_ps(x, qv, a2), b2 = _mm512_fmadd_ps(y, qv, b2);
			qv = load_f32_tail(q3 + d16, k), a3 = _mm512_fmadd_ps(x, qv, a3), b3 = _mm512_fmadd_ps(y, qv, b3);
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

/* Thirty-two columns of four heads per pass: two conversions per row feed eight FMAs; the last d % 32
 * columns sixteen (the last masked) at a time. ahead is spread over the steps as in axpy_f16_ahead. */
static void axpy_f16_heads4(unsigned d, unsigned n, const uint16_t *rows, const float *w, float *acc,
			    const uint16_t *ahead)
{
	const float *w0 = w, *w1 = w + n, *w2 = w1 + n, *w3 = w2 + n;
	float *c0 = acc, *c1 = acc + d, *c2 = c1 + d, *c3 = c2 + d;
	const size_t steps = (size_t)(d / 32) * n, share = kvp_prefetch_share((size_t)n * d * 2, steps);
	unsigned j = 0;

	for (; j + 32 <= d; j += 32) {
		__m512 a0 = _mm512_loadu_ps(c0 + j), a1 = _mm512_loadu_ps(c1 + j);
		__m512 a2 = _mm512_loadu_ps(c2 + j), a3 = _mm512_loadu_ps(c3 + j);
		__m512 b0 = _mm512_loadu_ps(c0 + j + 16), b1 = _mm512_loadu_ps(c1 + j + 16);
		__m512 b2 = _mm512_loadu_ps(c2 + j + 16), b3 = _mm512_loadu_ps(c3 + j + 16);

		for (unsigned i = 0; i < n; i++) {
			const uint16_t *r = rows + (size_t)i * d + j;
			const size_t it = (size_t)(j / 32) * n + i;
			__m512 x = load_f16(r), y = load_f16(r + 16), wv;

			kvp_prefetch_span(ahead, it * share, (it + 1) * share);
			wv = _mm512_set1_ps(w0[i]), a0 = _mm512_fmadd_ps(wv, x, a0), b0 = _mm512_fmadd_ps(wv, y, b0);
			wv = _mm512_set1_ps(w1[i]), a1 = _mm512_fmadd_ps(wv, x, a1), b1 = _mm512_fmadd_ps(wv, y, b1);
			wv = _mm512_set1_ps(w2[i]), a2 = _mm512_fmadd_ps(wv, x, a2), b2 = _mm512_fmadd_ps(wv, y, b2);
			wv = _mm512_set1_ps(w3[i]), a3 = _mm512_fmadd_ps(wv, x, a3), b3 = _mm512_fmadd_ps(wv, y, b3);
		}
		_mm512_storeu_ps(c0 + j, a0), _mm512_storeu_ps(c0 + j + 16, b0);
		_mm512_storeu_ps(c1 + j, a1), _mm512_storeu_ps(c1 + j + 16, b1);
		_mm512_storeu_ps(c2 + j, a2), _mm512_storeu_ps(c2 + j + 16, b2);
		_mm512_storeu_ps(c3 + j, a3), _mm512_storeu_ps(c3 + j + 16, b3);
	}
	for (; j < d; j += 16) {
		const unsigned k = d - j < 16 ? d - j : 16;
		__m512 a0 = load_f32_tail(c0 + j, k), a1 = load_f32_tail(c1 + j, k);
		__m512 a2 = load_f32_tail(c2 + j, k), a3 = load_f32_tail(c3 + j, k);

		for (unsigned i = 0; i < n; i++) {
			__m512 x = load_f16_tail(rows + (size_t)i * d + j, k);

			a0 = _mm512_fmadd_ps(_mm512_set1_ps(w0[i]), x, a0);
			a1 = _mm512_fmadd_ps(_mm512_set1_ps(w1[i]), x, a1);
			a2 = _mm512_fmadd_ps(_mm512_set1_ps(w2[i]), x, a2);
			a3 = _mm512_fmadd_ps(_mm512_set1_ps(w3[i]), x, a3);
		}
		_mm512_mask_storeu_ps(c0 + j, tail16(k), a0), _mm512_mask_storeu_ps(c1 + j, tail16(k), a1);
		_mm512_mask_storeu_ps(c2 + j, tail16(k), a2), _mm512_mask_storeu_ps(c3 + j, tail16(k), a3);
	}
}

/* The immediate rounding mode (not MXCSR) makes this round to nearest even whatever the caller set. */
static void f32_to_f16(size_t n, const float *x, uint16_t *y)
{
	size_t i = 0;

	for (; i + 16 <= n; i += 16)
		_mm256_storeu_si256((__m256i *)(y + i), _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
	if (i < n) {
		const unsigned k = (unsigned)(n - i);

		_mm256_mask_storeu_epi16(y + i, tail16(k), _mm512_cvtps_ph(load_f32_tail(x + i, k),
									    _MM_FROUND_TO_NEAREST_INT));
	}
}

static void f16_to_f32(size_t n, const uint16_t *x, float *y)
{
	size_t i = 0;

	for (; i + 16 <= n; i += 16)
		_mm512_storeu_ps(y + i, load_f16(x + i));
	if (i < n) {
		const unsigned k = (unsigned)(n - i);

		_mm512_mask_storeu_ps(y + i, tail16(k), load_f16_tail(x + i, k));
	}
}

/* 2^(j/16), j = 0..15, each to the nearest float */
static const float exp2_sixteenths[16] = {
	0x1p+0f,	0x1.0b5586p+0f, 0x1.172b84p+0f, 0x1.2387a6p+0f, 0x1.306fep+0f,  0x1.3dea64p+0f,
	0x1.4bfdaep+0f, 0x1.5ab07ep+0f, 0x1.6a09e6p+0f, 0x1.7a1148p+0f, 0x1.8ace54p+0f, 0x1.9c4918p+0f,
	0x1.ae89fap+0f, 0x1.c199bep+0f, 0x1.d5818ep+0f, 0x1.ea4afap+0f,
};

/*
 * e^x for x <= 0 or NaN (softmax's score minus the maximum), within about an ulp: x = n ln2 + r with n a
 * multiple of 1/16, so e^x = 2^floor(n) * 2^frac(n) * e^r, 2^frac(n) from a sixteen-entry table (one
 * vpermps) and e^r, |r| <= ln2/32, to its r^3 term (the r^4 term is below 1e-8). One fused multiply-add puts
 * x log2(e) on a grid of sixteenths by adding 1.5 * 2^19, whose float then holds 16n + 2^22 in its low bits:
 * their last four are the table's index. ln2_hi has 15 significant bits and n's multiples of 1/16 up to 150
 * have 12, so x - n ln2_hi, inside one fused multiply-add, is exact. Within 1.07 ulp of e^x (every x of
 * [-87, 0] in steps of 1.3e-5, against double precision). Eight operations go to the multiply-add pipes,
 * against ten for avx2.c's exp_ps's scheme (a degree-6 polynomial on |r| <= ln2/2, which this file followed
 * bit for bit before): softmax_group over four heads of 256 scores, 0.159-0.161 against 0.188 ns a score (L1,
 * best of 50, three runs each, interleaved). kernels_check holds both to the scalar reference's expf.
 */
INLINE __m512 exp_nonpositive_ps(__m512 x)
{
	const __m512 ln2_hi = _mm512_set1_ps(0x1.62e4p-1f);
	const __m512 ln2_lo = _mm512_set1_ps(0x1.7f7d1cp-20f);
	const __m512 grid = _mm512_set1_ps(0x1.8p+19f);
	const __m512 table = _mm512_loadu_ps(exp2_sixteenths);

	x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);   /* operand order keeps a NaN x */

	const __m512 on_grid = _mm512_fmadd_ps(x, _mm512_set1_ps(0x1.715476p+0f), grid);
	const __m512 n = _mm512_sub_ps(on_grid, grid);
	__m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);

	r = _mm512_fnmadd_ps(n, ln2_lo, r);

	const __m512 t = _mm512_permutexvar_ps(_mm512_castps_si512(on_grid), table);
	__m512 p = _mm512_fmadd_ps(r, _mm512_set1_ps(1.0f / 6.0f), _mm512_set1_ps(0.5f));

	p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
	/* vscalefps multiplies by 2^floor(n) */
	return _mm512_scalef_ps(_mm512_fmadd_ps(_mm512_mul_ps(t, r), p, t), n);
}

/* fmaxf(a, b) for a that is not NaN, without the libm call gcc leaves for fmaxf: vmaxss returns its second
 * operand, a, when either is NaN, so a NaN b leaves a as fmaxf would. */
INLINE float max_keeping(float a, float b)
{
	return _mm_cvtss_f32(_mm_max_ss(_mm_set_ss(b), _mm_set_ss(a)));
}

/* Sixteen scores times scale, written back (and to raw when it is not NULL), and returned. */
INLINE __m512 scaled16(float *s, float *raw, __m512 vscale)
{
	const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(s), vscale);

	_mm512_storeu_ps(s, x);
	if (raw)
		_mm512_storeu_ps(raw, x);
	return x;
}

/* The largest of head h's n scores times scale, written back scaled (and to raw when it is not NULL). */
INLINE float scaled_max(unsigned n, float scale_by, float *s, float *raw)
{
	const unsigned n16 = n & ~15u, k = n & 15u;
	const __m512 vscale = _mm512_set1_ps(scale_by);
	__m512 vmax = _mm512_set1_ps(-INFINITY), vmax2 = vmax;
	unsigned i = 0;

	/* two maxima, so that each vmaxps waits for the one two steps back */
	for (; i + 32 <= n16; i += 32) {
		vmax = _mm512_max_ps(vmax, scaled16(s + i, raw ? raw + i : NULL, vscale));
		vmax2 = _mm512_max_ps(vmax2, scaled16(s + i + 16, raw ? raw + i + 16 : NULL, vscale));
	}
	vmax = _mm512_max_ps(vmax, vmax2);
	if (i < n16)
		vmax = _mm512_max_ps(vmax, scaled16(s + i, raw ? raw + i : NULL, vscale));
	if (k) {
		const __m512 x = _mm512_mul_ps(load_f32_tail(s + n16, k), vscale);

		_mm512_mask_storeu_ps(s + n16, tail16(k), x);
		if (raw)
			_mm512_mask_storeu_ps(raw + n16, tail16(k), x);
		vmax = _mm512_mask_max_ps(vmax, tail16(k), vmax, x);
	}
	return _mm512_reduce_max_ps(vmax);
}

/* Sixteen scores s[i] = e^(s[i] - mx), returned. */
INLINE __m512 exp16(float *s, __m512 vmx)
{
	const __m512 e = exp_nonpositive_ps(_mm512_sub_ps(_mm512_loadu_ps(s), vmx));

	_mm512_storeu_ps(s, e);
	return e;
}

/* s[i] = e^(s[i] - mx), returning their sum. */
INLINE float exp_sum(unsigned n, float mx, float *s)
{
	const unsigned n16 = n & ~15u, k = n & 15u;
	const __m512 vmx = _mm512_set1_ps(mx);
	__m512 sum = _mm512_setzero_ps(), sum2 = sum;
	unsigned i = 0;

	/* two sums, as scaled_max keeps two maxima: softmax_group over four heads of 256 scores 0.146 against
	 * 0.157 ns a score with one of each (L1, best of 50, three runs each, interleaved) */
	for (; i + 32 <= n16; i += 32) {
		sum = _mm512_add_ps(sum, exp16(s + i, vmx));
		sum2 = _mm512_add_ps(sum2, exp16(s + i + 16, vmx));
	}
	sum = _mm512_add_ps(sum, sum2);
	if (i < n16)
		sum = _mm512_add_ps(sum, exp16(s + i, vmx));
	if (k) {
		/* masked-off lanes would give e^-mx: zero them before they reach the sum */
		__m512 e = _mm512_maskz_mov_ps(tail16(k),
					       exp_nonpositive_ps(_mm512_sub_ps(load_f32_tail(s + n16, k), vmx)));

		_mm512_mask_storeu_ps(s + n16, tail16(k), e);
		sum = _mm512_add_ps(sum, e);
	}
	return hsum(sum);
}

static void scale(unsigned d, float a, float *y)
{
	const __m512 va = _mm512_set1_ps(a);
	unsigned j = 0;

	for (; j + 16 <= d; j += 16)
		_mm512_storeu_ps(y + j, _mm512_mul_ps(_mm512_loadu_ps(y + j), va));
	if (j < d)
		_mm512_mask_storeu_ps(y + j, tail16(d - j), _mm512_mul_ps(load_f32_tail(y + j, d - j), va));
}

/*
 * Packed codes, sixteen per vector. Sixteen codes of b bits fill exactly 2b bytes (at most 8), so the
 * block of codes j..j+15 (j a multiple of 16) starts at byte j*b/8. Those bytes are loaded (masked: no
 * byte past them), repeated into every 128-bit lane, and one byte shuffle gives lane L the two bytes
 * holding code L (a code of 4 bits at bit offset 7 at most ends within them); a per-lane shift right
 * by (L*b) % 8 brings it to bit 0. vpermps then reads the low four bits of each lane as the index into
 * a 16-entry table in one register: 4-bit codes need no second half and no blend, and tables of 2, 4
 * and 8 entries are repeated to fill 16, so the bits above a narrower code change nothing.
 */
struct lut_regs {
	__m512 tab;
	__m512i bytes, shifts;
};

INLINE struct lut_regs lut_regs(unsigned bits, const float *lut)
{
	float tab[16];
	int8_t bytes[64];
	int32_t shifts[16];
	struct lut_regs r;

	for (unsigned i = 0; i < 16; i++) {
		const unsigned bit = i * bits, at = (i & 3) * 4;

		tab[i] = lut[i & ((1u << bits) - 1)];
		shifts[i] = (int32_t)(bit & 7);
		/* pshufb indexes within a 128-bit lane: lane L's bytes sit at (L % 4) * 4 of lane L / 4 */
		bytes[(i / 4) * 16 + at] = (int8_t)(bit >> 3);
		bytes[(i / 4) * 16 + at + 1] = (int8_t)((bit >> 3) + 1);
		bytes[(i / 4) * 16 + at + 2] = -128;
		bytes[(i / 4) * 16 + at + 3] = -128;
	}
	r.tab = _mm512_loadu_ps(tab);
	r.bytes = _mm512_loadu_si512(bytes);
	r.shifts = _mm512_loadu_si512(shifts);
	return r;
}

/* nbytes <= 8 bytes of codes at p, in the low 8 bytes of every 128-bit lane. The 8-byte block of 4-bit
 * codes is one broadcast load; shorter blocks a masked load that reads only their bytes. */
INLINE __m512i load_codes(const uint8_t *p, unsigned nbytes)
{
	if (nbytes == 8) {
		long long w;
		memcpy(&w, p, sizeof w);
		return _mm512_set1_epi64(w);
	}
	return _mm512_broadcastq_epi64(_mm_maskz_loadu_epi8((__mmask16)((1u << nbytes) - 1), p));
}

INLINE __m512 lookup16(__m512i codes, const struct lut_regs *r)
{
	__m512i idx = _mm512_srlv_epi32(_mm512_shuffle_epi8(codes, r->bytes), r->shifts);

	return _mm512_permutexvar_ps(idx, r->tab);
}

/* The block of codes j..j+15 of a row of m codes (j + 16 <= m). When the row holds 8 bytes from the
 * block on, one plain broadcast load replaces the masked one (the bytes past the block are ignored). */
INLINE __m512 lookup_block(unsigned bits, const uint8_t *row, unsigned j, unsigned m,
			   const struct lut_regs *r)
{
	return lookup16(load_codes(row + j * bits / 8, (m - j) * bits >= 64 ? 8 : 2 * bits), r);
}

/* The k < 16 codes from j on: lanes past k look up whatever bits follow (within the row's last byte). */
INLINE __m512 lookup_tail(unsigned bits, const uint8_t *row, unsigned j, unsigned k, const struct lut_regs *r)
{
	return lookup16(load_codes(row + j * bits / 8, (k * bits + 7) / 8), r);
}

/* Two accumulators per row: the FMA chain would otherwise wait 4 cycles per block of 16 codes. */
INLINE void lut_dot_bits(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			 const float *lut, const float *q, float *out)
{
	const struct lut_regs r = lut_regs(bits, lut);
	const unsigned m16 = m & ~15u, k = m & 15u;
	/* lanes past the tail look up stray bits; their q is 0 */
	const __m512 qt = load_f32_tail(q + m16, k);

	for (unsigned i = 0; i < n; i++) {
		const uint8_t *row = codes + (size_t)i * stride;
		__m512 a0 = _mm512_setzero_ps(), a1 = a0;
		unsigned j = 0;

		for (; j + 32 <= m16; j += 32) {
			a0 = _mm512_fmadd_ps(lookup_block(bits, row, j, m, &r), _mm512_loadu_ps(q + j), a0);
			a1 = _mm512_fmadd_ps(lookup_block(bits, row, j + 16, m, &r), _mm512_loadu_ps(q + j + 16), a1);
		}
		if (j < m16)
			a0 = _mm512_fmadd_ps(lookup_block(bits, row, j, m, &r), _mm512_loadu_ps(q + j), a0);
		if (k)
			a1 = _mm512_fmadd_ps(lookup_tail(bits, row, m16, k, &r), qt, a1);
		out[i] = hsum(_mm512_add_ps(a0, a1));
	}
}

/* Columns outer in strips of 16, rows inner in pairs: the strip's sums stay in two registers. */
INLINE void lut_axpy_bits(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			  const float *lut, const float *w, float *acc)
{
	const struct lut_regs r = lut_regs(bits, lut);

	for (unsigned j = 0; j < m; j += 16) {
		const unsigned k = m - j < 16 ? m - j : 16;
		__m512 a0 = load_f32_tail(acc + j, k), a1 = _mm512_setzero_ps();
		unsigned i = 0;

		if (k == 16) {
			for (; i + 2 <= n; i += 2) {
				const uint8_t *r0 = codes + (size_t)i * stride;

				a0 = _mm512_fmadd_ps(_mm512_set1_ps(w[i]), lookup_block(bits, r0, j, m, &r), a0);
				a1 = _mm512_fmadd_ps(_mm512_set1_ps(w[i + 1]), lookup_block(bits, r0 + stride, j, m, &r), a1);
			}
			if (i < n)
				a0 = _mm512_fmadd_ps(_mm512_set1_ps(w[i]),
						     lookup_block(bits, codes + (size_t)i * stride, j, m, &r), a0);
		} else {
			for (; i < n; i++)
				a0 = _mm512_fmadd_ps(_mm512_set1_ps(w[i]),
						     lookup_tail(bits, codes + (size_t)i * stride, j, k, &r), a0);
		}
		_mm512_mask_storeu_ps(acc + j, tail16(k), _mm512_add_ps(a0, a1));
	}
}

/* Four heads per looked-up block: the unpack and the permute, which bound lut_dot, are shared. */
INLINE void lut_dot_heads4(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			   const float *lut, const float *q, size_t qs, float *out)
{
	const struct lut_regs r = lut_regs(bits, lut);
	const unsigned m16 = m & ~15u, k = m & 15u;
	const float *q0 = q, *q1 = q + qs, *q2 = q1 + qs, *q3 = q2 + qs;

	for (unsigned i = 0; i < n; i++) {
		const uint8_t *row = codes + (size_t)i * stride;
		__m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, x;
		float s[4];

		for (unsigned j = 0; j < m16; j += 16) {
			x = lookup_block(bits, row, j, m, &r);
			a0 = _mm512_fmadd_ps(x, _mm512_loadu_ps(q0 + j), a0);
			a1 = _mm512_fmadd_ps(x, _mm512_loadu_ps(q1 + j), a1);
			a2 = _mm512_fmadd_ps(x, _mm512_loadu_ps(q2 + j), a2);
			a3 = _mm512_fmadd_ps(x, _mm512_loadu_ps(q3 + j), a3);
		}
		if (k) {
			/* lanes past the tail look up stray bits; their q is 0 */
			x = lookup_tail(bits, row, m16, k, &r);
			a0 = _mm512_fmadd_ps(x, load_f32_tail(q0 + m16, k), a0);
			a1 = _mm512_fmadd_ps(x, load_f32_tail(q1 + m16, k), a1);
			a2 = _mm512_fmadd_ps(x, load_f32_tail(q2 + m16, k), a2);
			a3 = _mm512_fmadd_ps(x, load_f32_tail(q3 + m16, k), a3);
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

	for (unsigned j = 0; j < m; j += 16) {
		const unsigned k = m - j < 16 ? m - j : 16;
		const __mmask16 keep = tail16(k);
		__m512 a0 = load_f32_tail(c0 + j, k), a1 = load_f32_tail(c1 + j, k);
		__m512 a2 = load_f32_tail(c2 + j, k), a3 = load_f32_tail(c3 + j, k), x;

		for (unsigned i = 0; i < n; i++) {
			const uint8_t *row = codes + (size_t)i * stride;

			x = k == 16 ? lookup_block(bits, row, j, m, &r) : lookup_tail(bits, row, j, k, &r);
			a0 = _mm512_fmadd_ps(_mm512_set1_ps(w0[i]), x, a0);
			a1 = _mm512_fmadd_ps(_mm512_set1_ps(w1[i]), x, a1);
			a2 = _mm512_fmadd_ps(_mm512_set1_ps(w2[i]), x, a2);
			a3 = _mm512_fmadd_ps(_mm512_set1_ps(w3[i]), x, a3);
		}
		_mm512_mask_storeu_ps(c0 + j, keep, a0), _mm512_mask_storeu_ps(c1 + j, keep, a1);
		_mm512_mask_storeu_ps(c2 + j, keep, a2), _mm512_mask_storeu_ps(c3 + j, keep, a3);
	}
}

/*
 * Masked rows, sixteen channels (two mask bytes) per step. An expanding load puts the step's kept
 * values, read exactly popcount of them, into the kept lanes in order. Expanding 0, 1, 2, ... into the
 * pruned lanes gives each its place among the step's pruned channels, which shifts its sign bit down
 * for a variable shift. A blend on the keep mask picks per lane; no table is needed.
 */
static void mask_expand_row(unsigned d, const uint8_t *mask, const uint8_t *sign, const float *v, float scale,
			    const float *mag, float *x)
{
	const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
	const __m512 vscale = _mm512_set1_ps(scale);
	unsigned t = 0, r = 0, pruned = 0, last;

	for (unsigned j = 0; j < d; j += 8) {
		const unsigned k = d - j < 8 ? d - j : 8;
		pruned += k - (unsigned)__builtin_popcount(mask[j >> 3] & ((1u << k) - 1));
	}
	last = pruned ? (pruned - 1) / 8 : 0; /* the last byte of sign that may be read */
	for (unsigned j = 0; j < d; j += 16) {
		const unsigned k = d - j < 16 ? d - j : 16;
		const unsigned bits = mask[j >> 3] | (j + 8 < d ? (unsigned)mask[(j >> 3) + 1] << 8 : 0u);
		const __mmask16 keep = (__mmask16)(bits & tail16(k)), prune = (__mmask16)(~bits & tail16(k));
		const unsigned nk = (unsigned)__builtin_popcount(keep), np = k - nk;
		__m512 kv = _mm512_mask_expandloadu_ps(_mm512_castsi512_ps(opaque_zero()), keep, v + t), pv = _mm512_setzero_ps();

		if (sign && np) {
			/* three bytes hold the step's at most 16 sign bits from bit r & 7; clamped into the field */
			const unsigned b = r >> 3, b1 = b + 1 < last ? b + 1 : last, b2 = b + 2 < last ? b + 2 : last;
			const unsigned w = (sign[b] | (unsigned)sign[b1] << 8 | (unsigned)sign[b2] << 16) >> (r & 7);
			const __m512i place = _mm512_mask_expand_epi32(opaque_zero(), prune, lane);
			const __m512i bit = _mm512_slli_epi32(_mm512_srlv_epi32(_mm512_set1_epi32((int)w), place), 31);

			pv = _mm512_xor_ps(_mm512_mul_ps(vscale, load_f32_tail(mag + j, k)), _mm512_castsi512_ps(bit));
		}
		_mm512_mask_storeu_ps(x + j, tail16(k), _mm512_mask_blend_ps(keep, pv, kv));
		t += nk;
		r += np;
	}
}

/* Bands [0, returned) of one row, sixteen at a time; mul, mul, add, sqrt are each rounded as in the
 * scalar reference. */
INLINE unsigned band_norms_vector(unsigned F, int interleaved, const float *r, float *o)
{
	const unsigned F16 = F & ~15u;
	const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
	const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));

	for (unsigned f = 0; f < F16; f += 16) {
		__m512 sum;
		if (interleaved) {
			__m512 a = _mm512_loadu_ps(r + 2 * f), b = _mm512_loadu_ps(r + 2 * f + 16);
			__m512 aa = _mm512_mul_ps(a, a), bb = _mm512_mul_ps(b, b);

			sum = _mm512_add_ps(_mm512_permutex2var_ps(aa, even, bb), _mm512_permutex2var_ps(aa, odd, bb));
		} else {
			__m512 re = _mm512_loadu_ps(r + f), im = _mm512_loadu_ps(r + f + F);
			sum = _mm512_add_ps(_mm512_mul_ps(re, re), _mm512_mul_ps(im, im));
		}
		_mm512_storeu_ps(o + f, _mm512_sqrt_ps(sum));
	}
	return F16;
}

/*
 * Integer lookups (VBMI, VNNI). A row's codes from code j on (j a multiple of 64) become one byte each:
 * up to 8b bytes are loaded (masked: none past the row's last code byte), vpermb gives qword k the 8
 * bytes from byte k*b on, and vpmultishiftqb moves code 8k+r, at bit r*b of that qword, to bit 0 of
 * byte 8k+r. The bits above a code are the next code's: tables are repeated with the code's period, so
 * a lookup that reads 6 (vpermb) or 5 (vpermw) index bits sees only the code.
 */
struct int_regs {
	__m512i spread, shifts, tab8, tab16, tab_lo, tab_hi;
};

/* Byte i of a spread or shift vector for width b, written out by the preprocessor as constant data. */
#define SPREAD(b, i) (char)(((i) / 8) * (b) + (i) % 8)
#define SHIFT(b, i) (char)(((i) % 8) * (b))
#define BYTES8(F, b, i) F(b, i), F(b, i + 1), F(b, i + 2), F(b, i + 3), F(b, i + 4), F(b, i + 5), F(b, i + 6), F(b, i + 7)
#define BYTES64(F, b)                                                                                         \
	{ BYTES8(F, b, 0), BYTES8(F, b, 8), BYTES8(F, b, 16), BYTES8(F, b, 24), BYTES8(F, b, 32), BYTES8(F, b, 40), \
	  BYTES8(F, b, 48), BYTES8(F, b, 56) }

static const char spread_of[5][64] = { { 0 }, BYTES64(SPREAD, 1), BYTES64(SPREAD, 2), BYTES64(SPREAD, 3),
					BYTES64(SPREAD, 4) };
static const char iota[64] = BYTES64(SPREAD, 8);
static const char shift_of[5][64] = { { 0 }, BYTES64(SHIFT, 1), BYTES64(SHIFT, 2), BYTES64(SHIFT, 3),
				       BYTES64(SHIFT, 4) };

/* The tables repeat the 1 << bits entries of lut across the register: an index i reads lut[i % 2^bits].
 * Keys' bytes are stored + 128: vpdpbusd multiplies unsigned bytes, and callers subtract 128 * sum(q). */
INLINE struct int_regs int_regs(unsigned bits, const int8_t *lut8, const int16_t *lut16, int bias)
{
	const unsigned levels = 1u << bits;
	const __m512i iota8 = _mm512_loadu_si512(iota), period = _mm512_set1_epi8((char)(levels - 1));
	struct int_regs r;

	r.spread = _mm512_loadu_si512(spread_of[bits]);
	r.shifts = _mm512_loadu_si512(shift_of[bits]);
	r.tab8 = _mm512_setzero_si512();
	if (lut8)
		r.tab8 = _mm512_add_epi8(_mm512_permutexvar_epi8(_mm512_and_si512(iota8, period),
								 _mm512_maskz_loadu_epi8(((__mmask64)1 << levels) - 1, lut8)),
					 _mm512_set1_epi8((char)bias));
	r.tab_lo = r.tab_hi = _mm512_setzero_si512();
	if (lut16) {
		/* the low and the high bytes of the int16 table, each a byte table of its own */
		const __m512i words = _mm512_maskz_loadu_epi16((__mmask32)((1u << levels) - 1), lut16);
		const __m512i at = _mm512_add_epi8(_mm512_and_si512(iota8, period), _mm512_and_si512(iota8, period));

		r.tab_lo = _mm512_permutexvar_epi8(at, words);
		r.tab_hi = _mm512_permutexvar_epi8(_mm512_add_epi8(at, _mm512_set1_epi8(1)), words);
	}
	return r;
}

/* The first k <= 64 lanes. */
INLINE __mmask64 tail64(unsigned k)
{
	return k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << k) - 1);
}

/* nb <= 16 bytes at p, zeros after them. */
INLINE __m128i row_chunk(const uint8_t *p, unsigned nb)
{
	return nb >= 16 ? _mm_loadu_si128((const __m128i *)p) : _mm_maskz_loadu_epi8((__mmask16)((1u << nb) - 1), p);
}

/* Codes j..j+k-1 (k <= 64) of a row, one per byte; lanes past k hold zeros or stray bits. */
INLINE __m512i code_bytes(unsigned bits, const uint8_t *row, unsigned j, unsigned k, const struct int_regs *r)
{
	__m512i raw = _mm512_maskz_loadu_epi8(tail64((k * bits + 7) / 8), row + j * bits / 8);

	return _mm512_multishift_epi64_epi8(r->shifts, _mm512_permutexvar_epi8(r->spread, raw));
}

/* The four int32 horizontal sums of a..d, in order. */
INLINE __m128i hsum4_epi32(__m512i a, __m512i b, __m512i c, __m512i d)
{
	__m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
	__m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
	__m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
	__m256i v = _mm256_add_epi32(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64(u, 1));

	return _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
}

/* sum(q[0..m)) of int8 values, by vpdpbusd against ones. */
INLINE int32_t sum_i8(const int8_t *q, unsigned m)
{
	const __m512i ones = _mm512_set1_epi8(1);
	__m512i s = _mm512_setzero_si512();

	for (unsigned j = 0; j < m; j += 64)
		s = _mm512_dpbusd_epi32(s, ones, _mm512_maskz_loadu_epi8(tail64(m - j), q + j));
	return _mm512_reduce_add_epi32(s);
}

/*
 * Sixteen rows' sums, R[k] holding rows 4k..4k+3 as [row][head], become one vector per head, H[h] holding
 * rows 0..15: two rounds of two-source permutes, eight in all.
 */
INLINE void rows_to_heads(const __m512i R[4], __m512i H[4])
{
	const __m512i pick01 = _mm512_set_epi32(29, 25, 21, 17, 13, 9, 5, 1, 28, 24, 20, 16, 12, 8, 4, 0);
	const __m512i pick23 = _mm512_set_epi32(31, 27, 23, 19, 15, 11, 7, 3, 30, 26, 22, 18, 14, 10, 6, 2);
	const __m512i low = _mm512_set_epi32(23, 22, 21, 20, 19, 18, 17, 16, 7, 6, 5, 4, 3, 2, 1, 0);
	const __m512i high = _mm512_set_epi32(31, 30, 29, 28, 27, 26, 25, 24, 15, 14, 13, 12, 11, 10, 9, 8);
	const __m512i a = _mm512_permutex2var_epi32(R[0], pick01, R[1]), b = _mm512_permutex2var_epi32(R[0], pick23, R[1]);
	const __m512i c = _mm512_permutex2var_epi32(R[2], pick01, R[3]), d = _mm512_permutex2var_epi32(R[2], pick23, R[3]);

	H[0] = _mm512_permutex2var_epi32(a, low, c);
	H[1] = _mm512_permutex2var_epi32(a, high, c);
	H[2] = _mm512_permutex2var_epi32(b, low, d);
	H[3] = _mm512_permutex2var_epi32(b, high, d);
}

/* The sums of `rows` <= 16 rows, four per row as [row][head], as one vector per head (lane i: row i). The
 * missing rows' lanes are never stored; zeros keep them defined. */
INLINE void sums_to_heads(int32_t sums[16 * 4], unsigned rows, __m512i H[4])
{
	__m512i R[4];

	if (rows < 16)
		memset(sums + 4 * rows, 0, sizeof(int32_t) * 4 * (16 - rows));
	for (unsigned k = 0; k < 4; k++)
		R[k] = _mm512_loadu_si512(sums + 16 * k);
	rows_to_heads(R, H);
}

/* A head's scores of the rows in keep: v added to out's (add 1), or v itself (add 0), as lut_dot_i8_group's
 * contract reads. */
INLINE void put_scores(float *o, __mmask16 keep, __m512 v, int add)
{
	_mm512_mask_storeu_ps(o, keep, add ? _mm512_add_ps(_mm512_maskz_loadu_ps(keep, o), v) : v);
}

/* put_scores of sixteen rows */
INLINE void put_scores16(float *o, __m512 v, int add)
{
	_mm512_storeu_ps(o, add ? _mm512_add_ps(_mm512_loadu_ps(o), v) : v);
}

/*
 * hn <= 4 heads (a constant once inlined; the accumulators are named so that they stay in registers):
 * each row's 64-code chunks are looked up once, as unsigned bytes (lut + 128), and multiplied into every
 * head's sum by vpdpbusd; 128 * sum(q) comes off each head's total. Query lanes past m are loaded as
 * zeros, so the stray lanes of a row's last chunk add nothing. A row's four sums are kept, with its
 * scale, until sixteen rows are done; their float steps then run sixteen rows per instruction.
 */
INLINE void dot_i8_heads(unsigned hn, unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			 const struct int_regs *r, const int8_t *q, size_t qs, const float *head_scale,
			 const uint8_t *row_scale, size_t scale_stride, float *out, size_t os, int add)
{
	const int8_t *q0 = q, *q1 = q + qs, *q2 = q1 + qs, *q3 = q2 + qs;
	int32_t bias[4] = { 0, 0, 0, 0 }, sums[16 * 4];
	float scale[16];
	__m128i bias4;

	for (unsigned h = 0; h < hn; h++)
		bias[h] = 128 * sum_i8(q + h * qs, m);
	bias4 = _mm_loadu_si128((const __m128i *)bias);
	for (unsigned i0 = 0; i0 < n; i0 += 16) {
		const unsigned rows = n - i0 < 16 ? n - i0 : 16;
		__m512i H[4];

		for (unsigned t = 0; t < rows; t++) {
			const uint8_t *row = codes + (size_t)(i0 + t) * stride;
			__m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;

			for (unsigned j = 0; j < m; j += 64) {
				const unsigned k = m - j < 64 ? m - j : 64;
				const __mmask64 in = tail64(k);
				const __m512i x = _mm512_permutexvar_epi8(code_bytes(bits, row, j, k, r), r->tab8);

				a0 = _mm512_dpbusd_epi32(a0, x, _mm512_maskz_loadu_epi8(in, q0 + j));
				if (hn > 1)
					a1 = _mm512_dpbusd_epi32(a1, x, _mm512_maskz_loadu_epi8(in, q1 + j));
				if (hn > 2)
					a2 = _mm512_dpbusd_epi32(a2, x, _mm512_maskz_loadu_epi8(in, q2 + j));
				if (hn > 3)
					a3 = _mm512_dpbusd_epi32(a3, x, _mm512_maskz_loadu_epi8(in, q3 + j));
			}
			_mm_storeu_si128((__m128i *)(sums + 4 * t), _mm_sub_epi32(hsum4_epi32(a0, a1, a2, a3), bias4));
			scale[t] = kvp_load_f32(row_scale + (size_t)(i0 + t) * scale_stride);
		}
		sums_to_heads(sums, rows, H);
		/* ((float)S * head scale) * row scale, rounded step by step as the scalar reference does */
		for (unsigned h = 0; h < hn; h++) {
			const __mmask16 keep = tail16(rows);
			float *o = out + h * os + i0;
			__m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(H[h]), _mm512_set1_ps(head_scale[h])),
						 _mm512_maskz_loadu_ps(keep, scale));
			put_scores(o, keep, v, add);
		}
	}
}

/*
 * x[t] lane c becomes x[c] lane t: dwords within 128-bit lanes by unpacks, then the 128-bit lanes by two
 * rounds of shuffles, 64 instructions for the 16 registers.
 */
INLINE void transpose16_epi32(__m512i x[16])
{
	__m512i y[16];

#pragma GCC unroll 16
	for (unsigned t = 0; t < 16; t += 2) {
		y[t] = _mm512_unpacklo_epi32(x[t], x[t + 1]);
		y[t + 1] = _mm512_unpackhi_epi32(x[t], x[t + 1]);
	}
#pragma GCC unroll 16
	for (unsigned t = 0; t < 16; t += 4) {
		x[t] = _mm512_unpacklo_epi64(y[t], y[t + 2]);
		x[t + 1] = _mm512_unpackhi_epi64(y[t], y[t + 2]);
		x[t + 2] = _mm512_unpacklo_epi64(y[t + 1], y[t + 3]);
		x[t + 3] = _mm512_unpackhi_epi64(y[t + 1], y[t + 3]);
	}
	/* x[4G + e] lane (L, r) is row 4G + r, dword 4L + e */
#pragma GCC unroll 4
	for (unsigned e = 0; e < 4; e++) {
		y[4 * e] = _mm512_shuffle_i32x4(x[e], x[4 + e], 0x44);
		y[4 * e + 1] = _mm512_shuffle_i32x4(x[e], x[4 + e], 0xee);
		y[4 * e + 2] = _mm512_shuffle_i32x4(x[8 + e], x[12 + e], 0x44);
		y[4 * e + 3] = _mm512_shuffle_i32x4(x[8 + e], x[12 + e], 0xee);
	}
	/* y[4e] lanes: (G0 L0, G0 L1, G1 L0, G1 L1), y[4e+1]: L2, L3 of G0, G1; +2, +3: the same of G2, G3 */
#pragma GCC unroll 4
	for (unsigned e = 0; e < 4; e++) {
		x[e] = _mm512_shuffle_i32x4(y[4 * e], y[4 * e + 2], 0x88);
		x[4 + e] = _mm512_shuffle_i32x4(y[4 * e], y[4 * e + 2], 0xdd);
		x[8 + e] = _mm512_shuffle_i32x4(y[4 * e + 1], y[4 * e + 3], 0x88);
		x[12 + e] = _mm512_shuffle_i32x4(y[4 * e + 1], y[4 * e + 3], 0xdd);
	}
}

/* Four int8 query values as the int32 vpdpbusd broadcasts: a broadcast from memory (a load), where one from
 * a general register would take the shuffle port the lookups need. */
INLINE __m512i quad_of(const int8_t *q)
{
	return _mm512_broadcastd_epi32(_mm_loadu_si32(q));
}

/*
 * The same sums for m a multiple of 64 and n a multiple of 16, sixteen rows at a time with the rows in the
 * lanes: each row's looked-up chunk of 64 codes is one register of sixteen 4-code dwords, and a 16 x 16
 * transpose turns sixteen rows' registers into one register per dword (lane t: row t), which vpdpbusd
 * multiplies by that dword's four query values broadcast. A head's sixteen row sums then sit in one
 * register: no horizontal sums, which cost as much as the products in the row-by-row loop above.
 */
INLINE void dot_i8_tiles(unsigned hn, unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			 const struct int_regs *r, const int8_t *q, size_t qs, const float *head_scale,
			 const uint8_t *row_scale, size_t scale_stride, float *out, size_t os, int add)
{
	const int8_t *q0 = q, *q1 = q + qs, *q2 = q1 + qs, *q3 = q2 + qs;
	int32_t bias[4] = { 0, 0, 0, 0 };
	float scale[16];

	for (unsigned h = 0; h < hn; h++)
		bias[h] = 128 * sum_i8(q + h * qs, m);
	for (unsigned i0 = 0; i0 < n; i0 += 16) {
		__m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;

		for (unsigned j = 0; j < m; j += 64) {
			__m512i x[16];

#pragma GCC unroll 16
			for (unsigned t = 0; t < 16; t++)
				x[t] = _mm512_permutexvar_epi8(code_bytes(bits, codes + (size_t)(i0 + t) * stride, j, 64, r),
							       r->tab8);
			transpose16_epi32(x);
#pragma GCC unroll 16
			for (unsigned c = 0; c < 16; c++) {
				a0 = _mm512_dpbusd_epi32(a0, x[c], quad_of(q0 + j + 4 * c));
				if (hn > 1)
					a1 = _mm512_dpbusd_epi32(a1, x[c], quad_of(q1 + j + 4 * c));
				if (hn > 2)
					a2 = _mm512_dpbusd_epi32(a2, x[c], quad_of(q2 + j + 4 * c));
				if (hn > 3)
					a3 = _mm512_dpbusd_epi32(a3, x[c], quad_of(q3 + j + 4 * c));
			}
		}
		for (unsigned t = 0; t < 16; t++)
			scale[t] = kvp_load_f32(row_scale + (size_t)(i0 + t) * scale_stride);
		/* ((float)S * head scale) * row scale, rounded step by step as the scalar reference does */
		const __m512i a[4] = { a0, a1, a2, a3 };
		for (unsigned h = 0; h < hn; h++) {
			float *o = out + h * os + i0;
			__m512 v = _mm512_mul_ps(
				_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a[h], _mm512_set1_epi32(bias[h]))),
					      _mm512_set1_ps(head_scale[h])),
				_mm512_loadu_ps(scale));
			put_scores16(o, v, add);
		}
	}
}

/*
 * The same sums for m = 64 at 2 to 4 bits, sixteen rows at a time with the rows in the lanes, without the
 * transpose: a chunk of each row's code bytes (16 at 2 and 4 bits, 12 at 3) is loaded, four rows to a
 * register (row t in 128-bit lane t % 4 of register t / 4). Per group of `gb` bytes of the chunk (4, or 3
 * at 3 bits: whole 4-code quads), two two-source vpermb and a blend give dword t the group's bytes of row
 * t; vpmultishiftqb then brings each quad's four codes to the low bits of the dword's four bytes, vpermb
 * looks them up, and vpdpbusd multiplies them by the quad's four query values, broadcast: a head's sixteen
 * row sums build up in one register, lane t for row t.
 * Tried and dropped (2 bits, m = 64, 4 heads, 256 rows in L1, ns a row, best of five, builds interleaved):
 * dword t of each group by an in-lane 4 x 4 transpose of dwords (rows a, a + 4, a + 8, a + 12 in register a,
 * eight unpacks) instead of the two-source vpermb and blend, 1.47-1.50 against 1.48-1.50; four rows by two
 * 64-byte loads and one two-source vpermb instead of four loads and three inserts, 2.1-2.2 against 1.5; the
 * rows' scales by one gather, 1.63-1.71 against 1.51-1.55, by four loads, three inserts each and two
 * permutes, 1.59-1.63 against 1.51-1.58, stored a step of sixteen rows early (so that the vector load finds
 * no scalar store in flight), 1.70 and up against 1.47-1.53, or the loop unrolled or _mm512_set_ps of the
 * sixteen, 1.57-1.65 against 1.45-1.52. With the scales contiguous (one vector load, a layout the rows'
 * records do not have: TurboQuant's are separable, which eviction relies on to move rows), 1.27-1.33
 * against 1.45-1.47.
 */
#define ROWS16_PICK(i) (char)((((i) / 4 % 8) / 4) * 64 + ((i) / 4 % 4) * 16 + (i) % 4)
#define ROWS16_BYTES8(i) ROWS16_PICK(i), ROWS16_PICK(i + 1), ROWS16_PICK(i + 2), ROWS16_PICK(i + 3), \
	ROWS16_PICK(i + 4), ROWS16_PICK(i + 5), ROWS16_PICK(i + 6), ROWS16_PICK(i + 7)
static const char rows16_pick[64] = { ROWS16_BYTES8(0), ROWS16_BYTES8(8), ROWS16_BYTES8(16), ROWS16_BYTES8(24),
				      ROWS16_BYTES8(32), ROWS16_BYTES8(40), ROWS16_BYTES8(48), ROWS16_BYTES8(56) };
/* byte b of dword t (t odd: the qword's high dword) takes the bits of code b of quad e of the group */
#define QUAD_BITS(b, e, i) (char)(32 * ((i) / 4 % 2) + (e) * 4 * (b) + ((i) % 4) * (b))
#define QUAD_BITS8(b, e, i) QUAD_BITS(b, e, i), QUAD_BITS(b, e, i + 1), QUAD_BITS(b, e, i + 2), QUAD_BITS(b, e, i + 3), \
	QUAD_BITS(b, e, i + 4), QUAD_BITS(b, e, i + 5), QUAD_BITS(b, e, i + 6), QUAD_BITS(b, e, i + 7)
#define QUAD_BITS64(b, e) { QUAD_BITS8(b, e, 0), QUAD_BITS8(b, e, 8), QUAD_BITS8(b, e, 16), QUAD_BITS8(b, e, 24), \
	QUAD_BITS8(b, e, 32), QUAD_BITS8(b, e, 40), QUAD_BITS8(b, e, 48), QUAD_BITS8(b, e, 56) }
static const char quad_bits[5][4][64] = {
	{ { 0 } }, { { 0 } },
	{ QUAD_BITS64(2, 0), QUAD_BITS64(2, 1), QUAD_BITS64(2, 2), QUAD_BITS64(2, 3) },
	{ QUAD_BITS64(3, 0), QUAD_BITS64(3, 1), { 0 }, { 0 } },
	{ QUAD_BITS64(4, 0), QUAD_BITS64(4, 1), { 0 }, { 0 } },
};

/* Bytes [at, at + nb) of rows i..i+3 (nb <= 16, zeros after them), row t in 128-bit lane t. */
INLINE __m512i rows4_chunk(const uint8_t *codes, size_t stride, unsigned i, unsigned at, unsigned nb)
{
	const uint8_t *p = codes + (size_t)i * stride + at;
	__m512i v = _mm512_castsi128_si512(row_chunk(p, nb));

	v = _mm512_inserti32x4(v, row_chunk(p + stride, nb), 1);
	v = _mm512_inserti32x4(v, row_chunk(p + 2 * stride, nb), 2);
	return _mm512_inserti32x4(v, row_chunk(p + 3 * stride, nb), 3);
}

INLINE void dot_i8_rows16(unsigned bits, unsigned mm, unsigned n, const uint8_t *codes, size_t stride, const struct int_regs *r,
			  const int8_t *q, size_t qs, const float *head_scale, const uint8_t *row_scale,
			  size_t scale_stride, float *out, size_t os, int add)
{
	/* chunk bytes, group bytes, quads per group, codes per chunk */
	const unsigned cb = bits == 3 ? 12 : 16, gb = bits == 3 ? 3 : 4, qg = 8 / bits, cc = cb * 8 / bits;
	const unsigned row_bytes = mm * bits / 8;
	const int8_t *q0 = q, *q1 = q + qs, *q2 = q1 + qs, *q3 = q2 + qs;
	const __m512i pick = _mm512_loadu_si512(rows16_pick);
	const __m512i e0 = _mm512_loadu_si512(quad_bits[bits][0]), e1 = _mm512_loadu_si512(quad_bits[bits][1]);
	const __m512i e2 = _mm512_loadu_si512(quad_bits[bits][2]), e3 = _mm512_loadu_si512(quad_bits[bits][3]);
	int32_t bias[4];
	float scale[16];

	for (unsigned h = 0; h < 4; h++)
		bias[h] = 128 * sum_i8(q + h * qs, mm);
	for (unsigned i0 = 0; i0 < n; i0 += 16) {
		/* two sums per head, for odd and even quads: chains of 8 vpdpbusd instead of 16 */
		__m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;

		for (unsigned j = 0; j < mm; j += cc) {
			const unsigned at = j * bits / 8, nb = row_bytes - at < 16 ? row_bytes - at : 16;
			const __m512i z0 = rows4_chunk(codes, stride, i0, at, nb), z1 = rows4_chunk(codes, stride, i0 + 4, at, nb);
			const __m512i z2 = rows4_chunk(codes, stride, i0 + 8, at, nb), z3 = rows4_chunk(codes, stride, i0 + 12, at, nb);

			/* cb / gb == 4 at every width: a constant bound, which -O1 unrolls too */
#pragma GCC unroll 4
			for (unsigned k = 0; k < 4; k++) {
				const __m512i at_k = _mm512_add_epi8(pick, _mm512_set1_epi8((char)(gb * k)));
				const __m512i g = _mm512_mask_blend_epi8(0xffffffff00000000ull, _mm512_permutex2var_epi8(z0, at_k, z1),
									 _mm512_permutex2var_epi8(z2, at_k, z3));
				const __m512i es[4] = { e0, e1, e2, e3 };

#pragma GCC unroll 4
				for (unsigned e = 0; e < 4 && e < qg; e++) {
					const __m512i x = _mm512_permutexvar_epi8(_mm512_multishift_epi64_epi8(es[e], g), r->tab8);
					const unsigned c = j + 4 * (k * qg + e);

					if (e % 2) {
						b0 = _mm512_dpbusd_epi32(b0, x, quad_of(q0 + c));
						b1 = _mm512_dpbusd_epi32(b1, x, quad_of(q1 + c));
						b2 = _mm512_dpbusd_epi32(b2, x, quad_of(q2 + c));
						b3 = _mm512_dpbusd_epi32(b3, x, quad_of(q3 + c));
					} else {
						a0 = _mm512_dpbusd_epi32(a0, x, quad_of(q0 + c));
						a1 = _mm512_dpbusd_epi32(a1, x, quad_of(q1 + c));
						a2 = _mm512_dpbusd_epi32(a2, x, quad_of(q2 + c));
						a3 = _mm512_dpbusd_epi32(a3, x, quad_of(q3 + c));
					}
				}
			}
		}
		a0 = _mm512_add_epi32(a0, b0), a1 = _mm512_add_epi32(a1, b1);
		a2 = _mm512_add_epi32(a2, b2), a3 = _mm512_add_epi32(a3, b3);
		for (unsigned t = 0; t < 16; t++)
			scale[t] = kvp_load_f32(row_scale + (size_t)(i0 + t) * scale_stride);
		/* ((float)S * head scale) * row scale, rounded step by step as the scalar reference does */
		const __m512i a[4] = { a0, a1, a2, a3 };
		for (unsigned h = 0; h < 4; h++) {
			float *o = out + h * os + i0;
			__m512 v = _mm512_mul_ps(
				_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a[h], _mm512_set1_epi32(bias[h]))),
					      _mm512_set1_ps(head_scale[h])),
				_mm512_loadu_ps(scale));
			put_scores16(o, v, add);
		}
	}
}

#define DOT_ROWS16(mm)                                                                                          \
	static __attribute__((noinline)) void dot_i8_rows16_##mm(unsigned bits, unsigned n, const uint8_t *codes,  \
								 size_t stride, const struct int_regs *r,         \
								 const int8_t *q, size_t qs, const float *hs,     \
								 const uint8_t *rs, size_t ss, float *out, size_t os,   \
								 int add)                                                \
	{                                                                                                       \
		switch (bits) {                                                                                 \
		case 2: dot_i8_rows16(2, mm, n, codes, stride, r, q, qs, hs, rs, ss, out, os, add); break;      \
		case 3: dot_i8_rows16(3, mm, n, codes, stride, r, q, qs, hs, rs, ss, out, os, add); break;      \
		default: dot_i8_rows16(4, mm, n, codes, stride, r, q, qs, hs, rs, ss, out, os, add); break;     \
		}                                                                                               \
	}
DOT_ROWS16(64)
DOT_ROWS16(128)
#undef DOT_ROWS16

/*
 * Four heads over rows of 64 codes, sixteen rows at a time: one function each, not inlined into every
 * width's loop, so that the sixteen-register transposes (memory under AddressSanitizer) have a frame of
 * their own instead of one per width and head count in lut_dot_i8_group's.
 */
#define DOT_TILES4(mm)                                                                                         \
	static __attribute__((noinline)) void dot_i8_tiles4_##mm(unsigned bits, unsigned n, const uint8_t *codes, \
								 size_t stride, const struct int_regs *r,        \
								 const int8_t *q, size_t qs, const float *hs,    \
								 const uint8_t *rs, size_t ss, float *out, size_t os,  \
								 int add)                                               \
	{                                                                                                      \
		dot_i8_tiles(4, bits, mm, n, codes, stride, r, q, qs, hs, rs, ss, out, os, add);               \
	}
DOT_TILES4(64)
#undef DOT_TILES4

INLINE void dot_i8_width(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			 const int8_t *lut, unsigned g, const int8_t *q, size_t qs, const float *head_scale,
			 const uint8_t *row_scale, size_t scale_stride, float *out, size_t os, int add)
{
	const struct int_regs r = int_regs(bits, lut, NULL, 128);
	/* at 64 codes the row loop's horizontal sums cost as much as its products; at 128 they weigh half
	 * as much and the transposes more (measured 10% slower there) */
	const unsigned tiled = m == 64 || (m == 128 && bits >= 2) ? n - n % 16 : 0;
	unsigned h = 0;

/* Head dimensions of 64 and 128 get loops of their own: constant chunks, no masks, queries in registers.
 * Rows from `from` on. */
#define DOT_HEADS_M(hn, mm, from)                                                                             \
	dot_i8_heads(hn, bits, mm, n - (from), codes + (from) * stride, stride, &r, q + h * qs, qs, head_scale + h, \
		     row_scale + (from) * scale_stride, scale_stride, out + h * os + (from), os, add)
#define DOT_HEADS(hn, from)                                                                 \
	(m == 128 ? DOT_HEADS_M(hn, 128, from) : m == 64 ? DOT_HEADS_M(hn, 64, from) : DOT_HEADS_M(hn, m, from))
	for (; h + 4 <= g; h += 4) {
		if (tiled && m == 128)
			dot_i8_rows16_128(bits, tiled, codes, stride, &r, q + h * qs, qs, head_scale + h, row_scale,
					  scale_stride, out + h * os, os, add);
		else if (tiled && bits >= 2)
			dot_i8_rows16_64(bits, tiled, codes, stride, &r, q + h * qs, qs, head_scale + h, row_scale,
					 scale_stride, out + h * os, os, add);
		else if (tiled)
			dot_i8_tiles4_64(bits, tiled, codes, stride, &r, q + h * qs, qs, head_scale + h, row_scale,
					 scale_stride, out + h * os, os, add);
		if (tiled < n)
			DOT_HEADS(4, tiled);
	}
	switch (g - h) {
	case 3: DOT_HEADS(3, 0); break;
	case 2: DOT_HEADS(2, 0); break;
	case 1: DOT_HEADS(1, 0); break;
	default: break;
	}
#undef DOT_HEADS
#undef DOT_HEADS_M
}

static void lut_dot_i8_group(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			     const int8_t *lut, unsigned g, const int8_t *q, size_t q_stride, const float *head_scale,
			     const uint8_t *row_scale, size_t scale_stride, float *out, size_t out_stride, int add)
{
#define DOT_I8_WIDTH(b) \
	dot_i8_width(b, m, n, codes, stride, lut, g, q, q_stride, head_scale, row_scale, scale_stride, out, out_stride, add)
	switch (bits) {
	case 1: DOT_I8_WIDTH(1); break;
	case 2: DOT_I8_WIDTH(2); break;
	case 3: DOT_I8_WIDTH(3); break;
	default: DOT_I8_WIDTH(4); break;
	}
#undef DOT_I8_WIDTH
}

/*
 * Codes j..j+k-1 (k <= 64) of rows x and y as int16 table values, each int32 lane holding one column of
 * both (x low): the two rows' code bytes are interleaved first, so that two byte lookups (the table's low
 * and high bytes) and one more interleave give the pairs. d[e] lane (L, t) is column 16L + 4e + t.
 */
INLINE void value_pairs(__m512i cx, __m512i cy, const struct int_regs *r, __m512i d[4])
{
	const __m512i p0 = _mm512_unpacklo_epi8(cx, cy), p1 = _mm512_unpackhi_epi8(cx, cy);
	const __m512i lo0 = _mm512_permutexvar_epi8(p0, r->tab_lo), hi0 = _mm512_permutexvar_epi8(p0, r->tab_hi);
	const __m512i lo1 = _mm512_permutexvar_epi8(p1, r->tab_lo), hi1 = _mm512_permutexvar_epi8(p1, r->tab_hi);

	d[0] = _mm512_unpacklo_epi8(lo0, hi0), d[1] = _mm512_unpackhi_epi8(lo0, hi0);
	d[2] = _mm512_unpacklo_epi8(lo1, hi1), d[3] = _mm512_unpackhi_epi8(lo1, hi1);
}



/*
 * acc[0..k) += f * a 64-column chunk's sums, k <= 64: a[e] lane (L, t) holds column 16L + 4e + t, so the
 * four registers' 128-bit lanes are transposed (column block L gathers lane L of each) before the steps.
 */
INLINE void add_columns(float *acc, unsigned k, float f, __m512i a0, __m512i a1, __m512i a2, __m512i a3)
{
	const __m512i t0 = _mm512_shuffle_i64x2(a0, a1, 0x44), t1 = _mm512_shuffle_i64x2(a0, a1, 0xee);
	const __m512i t2 = _mm512_shuffle_i64x2(a2, a3, 0x44), t3 = _mm512_shuffle_i64x2(a2, a3, 0xee);
	const __m512i c[4] = { _mm512_shuffle_i64x2(t0, t2, 0x88), _mm512_shuffle_i64x2(t0, t2, 0xdd),
			       _mm512_shuffle_i64x2(t1, t3, 0x88), _mm512_shuffle_i64x2(t1, t3, 0xdd) };
	const __m512 fv = _mm512_set1_ps(f);

	for (unsigned q = 0; q < 4 && 16 * q < k; q++) {
		const __mmask16 keep = tail16(k - 16 * q < 16 ? k - 16 * q : 16);
		float *p = acc + 16 * q;
		_mm512_mask_storeu_ps(p, keep, _mm512_add_ps(_mm512_maskz_loadu_ps(keep, p),
							     _mm512_mul_ps(fv, _mm512_cvtepi32_ps(c[q]))));
	}
}

/*
 * One head's weights as int16 (the rounding of kernels.h, lane by lane): u = w * scale, top = max |u|,
 * W = nearest(u * (4095 / top)). Returns unit * (top / 4095), the factor of the head's integer sums.
 */
INLINE float weights_i16(unsigned n, const float *w, const float *scale, float unit, int16_t *w16)
{
	const __m512 half = _mm512_set1_ps(0.5f), minus_half = _mm512_set1_ps(-0.5f), zero = _mm512_setzero_ps();
	__m512 top = zero, inv;
	float t;

	for (unsigned i = 0; i < n; i += 16) {
		const __mmask16 in = tail16(n - i < 16 ? n - i : 16);
		__m512 u = _mm512_mul_ps(_mm512_maskz_loadu_ps(in, w + i), _mm512_maskz_loadu_ps(in, scale + i));
		top = _mm512_max_ps(top, _mm512_abs_ps(u));
	}
	t = _mm512_reduce_max_ps(top);
	inv = _mm512_set1_ps(kvp_weight_inv(t));
	for (unsigned i = 0; i < n; i += 16) {
		const __mmask16 in = tail16(n - i < 16 ? n - i : 16);
		__m512 x = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(in, w + i), _mm512_maskz_loadu_ps(in, scale + i)),
					 inv);
		__m512 r = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, zero, _CMP_LT_OQ), half, minus_half);
		_mm256_mask_storeu_epi16(w16 + i, in, _mm512_cvtsepi32_epi16(_mm512_cvttps_epi32(_mm512_add_ps(x, r))));
	}
	return unit * (t / KVP_WEIGHT_MAX);
}

/* Two int16 weights as the int32 they make in memory (little-endian: the first in the low half). */
INLINE int32_t pair_at(const int16_t *w)
{
	int32_t v;

	memcpy(&v, w, sizeof v);
	return v;
}

/* One head's step: the pair of weights against the four unpacked vectors d0..d3. */
#define AXPY_HEAD(wrow, a0, a1, a2, a3)                                 \
	do {                                                            \
		const __m512i wp = _mm512_set1_epi32(pair_at((wrow) + i)); \
		a0 = _mm512_dpwssd_epi32(a0, d0, wp);                   \
		a1 = _mm512_dpwssd_epi32(a1, d1, wp);                   \
		a2 = _mm512_dpwssd_epi32(a2, d2, wp);                   \
		a3 = _mm512_dpwssd_epi32(a3, d3, wp);                   \
	} while (0)

/*
 * Columns in chunks of 64, rows in pairs: unpacking the two rows' int16 values interleaves them so that
 * each int32 lane holds one column of both, which vpdpwssd multiplies by the pair of weights. A 128-bit
 * lane L of the unpacked low half holds columns 8L..8L+3, of the high half 8L+4..8L+7; one permute per
 * 16 columns puts them back in order at the end. hn <= 4 heads, a constant once inlined.
 */
INLINE void axpy_i16_heads(unsigned hn, unsigned bits, unsigned m, unsigned n, const uint8_t *codes,
			   size_t stride, const struct int_regs *r, float unit, const float *w, size_t ws,
			   const float *scale, float *acc, size_t as)
{
	/* each head's weights as int16: rows i and i + 1 (i even) are one little-endian int32, the first in the
	 * low half, which vpdpwssd takes straight from memory; a missing last row weighs 0 */
	int16_t w16[4][KVP_AXPY_I16_ROWS + 2] __attribute__((aligned(4)));
	const int16_t *w0 = w16[0], *w1 = w16[1], *w2 = w16[2], *w3 = w16[3];
	float f[4];

	for (unsigned h = 0; h < hn; h++) {
		f[h] = weights_i16(n, w + h * ws, scale, unit, w16[h]);
		w16[h][n] = 0;
	}

	for (unsigned j = 0; j < m; j += 64) {
		const unsigned k = m - j < 64 ? m - j : 64;
		__m512i a00 = _mm512_setzero_si512(), a01 = a00, a02 = a00, a03 = a00;
		__m512i a10 = a00, a11 = a00, a12 = a00, a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00;
		__m512i a30 = a00, a31 = a00, a32 = a00, a33 = a00;

		for (unsigned i = 0; i < n; i += 2) {
			const __m512i cx = code_bytes(bits, codes + (size_t)i * stride, j, k, r);
			const __m512i cy = i + 1 < n ? code_bytes(bits, codes + (size_t)(i + 1) * stride, j, k, r)
						     : _mm512_setzero_si512();
			__m512i d[4], d0, d1, d2, d3;

			value_pairs(cx, cy, r, d);
			d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3];
			AXPY_HEAD(w0, a00, a01, a02, a03);
			if (hn > 1)
				AXPY_HEAD(w1, a10, a11, a12, a13);
			if (hn > 2)
				AXPY_HEAD(w2, a20, a21, a22, a23);
			if (hn > 3)
				AXPY_HEAD(w3, a30, a31, a32, a33);
		}
		add_columns(acc + j, k, f[0], a00, a01, a02, a03);
		if (hn > 1)
			add_columns(acc + as + j, k, f[1], a10, a11, a12, a13);
		if (hn > 2)
			add_columns(acc + 2 * as + j, k, f[2], a20, a21, a22, a23);
		if (hn > 3)
			add_columns(acc + 3 * as + j, k, f[3], a30, a31, a32, a33);
	}
}

#undef AXPY_HEAD

INLINE void axpy_i16_width(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			   const int16_t *lut, float unit, unsigned g, const float *w, size_t ws, const float *scale,
			   float *acc, size_t as)
{
	const struct int_regs r = int_regs(bits, NULL, lut, 0);
	unsigned h = 0;

#define AXPY_HEADS(hn) \
	axpy_i16_heads(hn, bits, m, n, codes, stride, &r, unit, w + h * ws, ws, scale, acc + h * as, as)
	for (; h + 4 <= g; h += 4)
		AXPY_HEADS(4);
	switch (g - h) {
	case 3: AXPY_HEADS(3); break;
	case 2: AXPY_HEADS(2); break;
	case 1: AXPY_HEADS(1); break;
	default: break;
	}
#undef AXPY_HEADS
}

/*
 * The floats at row_scale + i * scale_stride for i < n into scale[0..n): sixteen per gather where the byte
 * offsets fit the gather's int32 lanes, one at a time otherwise.
 */
INLINE void gather_scales(unsigned n, const uint8_t *row_scale, size_t scale_stride, float *scale)
{
	unsigned i = 0;

	if (scale_stride <= INT32_MAX / KVP_AXPY_I16_ROWS) {
		const __m512i at = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
						      _mm512_set1_epi32((int)scale_stride));

		for (; i < n; i += 16) {
			const __mmask16 in = tail16(n - i < 16 ? n - i : 16);

			_mm512_mask_storeu_ps(scale + i, in, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), in, at,
										       row_scale + i * scale_stride, 1));
		}
	}
	for (; i < n; i++)
		scale[i] = kvp_load_f32(row_scale + i * scale_stride);
}

/* The rows' scales are gathered once into a contiguous array for every head's weights. */
static void lut_axpy_i16_group(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			       const int16_t *lut, float unit, unsigned g, const float *w, size_t w_stride,
			       const uint8_t *row_scale, size_t scale_stride, float *acc, size_t acc_stride,
			       const struct kvp_ahead *ahead)
{
	float scale[KVP_AXPY_I16_ROWS];

	/* this table's values take lut_axpy_u8_group, which spreads ahead; here (weights of either sign, QJL's
	 * signs) it goes in one request before the sums */
	kvp_ahead_share(ahead, 0, 1);
	gather_scales(n, row_scale, scale_stride, scale);
	switch (bits) {
	case 1: axpy_i16_width(1, m, n, codes, stride, lut, unit, g, w, w_stride, scale, acc, acc_stride); break;
	case 2: axpy_i16_width(2, m, n, codes, stride, lut, unit, g, w, w_stride, scale, acc, acc_stride); break;
	case 3: axpy_i16_width(3, m, n, codes, stride, lut, unit, g, w, w_stride, scale, acc, acc_stride); break;
	default: axpy_i16_width(4, m, n, codes, stride, lut, unit, g, w, w_stride, scale, acc, acc_stride); break;
	}
}

/*
 * lut_axpy_u8_group: four rows per int32 lane. A chunk of columns (64 at up to 2 bits, 32 at 3 and 4: up to
 * 16 bytes of a row) of rows i..i+3 is one register, row t in 128-bit lane t. Per 16 columns, vpermb gives
 * qword p the two bytes of each row that hold its columns 2p and 2p + 1 (row t at bytes 2t and 2t + 1),
 * vpmultishiftqb brings code (t, c) to the low bits of byte 4c + t, and vpermb looks it up in the table
 * repeated with the code's period (the bits above a code need no mask): int32 lane c holds the four rows'
 * values of column c, which vpdpbusd multiplies with a head's four weights, broadcast as one int32. The
 * codes are expanded once for all the heads, and no row is summed horizontally.
 * On this Zen 5 vpmultishiftqb issues to the two pipes vpdpbusd takes (eight of each: 8.0 cycles, eight
 * vpdpbusd alone 4.5), where shifts do not (with eight vpsrlw, 4.5). Tried at 2 and 4 bits, whose codes never
 * straddle a byte: vpermb putting the byte of row t that holds column c at byte 4c + t and vpsrld by the
 * column's offset in it (the same lookups), here and in axpy_u8_scaled: lut_axpy_u8_group at d=64, 4 heads,
 * 256 rows in L1, 2.03-2.11 against 2.08-2.15 ns a row, and bench_attend's d=64 rows within their noise
 * (three runs each, interleaved). Not kept. The row scales by four loads, three inserts each and two
 * permutes instead of the gather: 2.25-2.34 against 2.07-2.11.
 */
#define QSEL(b, q, i) (char)((16 * (((i) % 8) / 2) + ((16 * (q) + 2 * ((i) / 8)) * (b)) / 8 + (i) % 2) & 63)
#define QSHF(b, q, i) (char)(16 * ((i) % 4) + (16 * (q) + (i) / 4) * (b) - 8 * (((16 * (q) + ((i) / 4 & ~1)) * (b)) / 8))
#define QBYTES8(F, b, q, i) F(b, q, i), F(b, q, i + 1), F(b, q, i + 2), F(b, q, i + 3), F(b, q, i + 4), \
	F(b, q, i + 5), F(b, q, i + 6), F(b, q, i + 7)
#define QBYTES64(F, b, q)                                                                                  \
	{ QBYTES8(F, b, q, 0), QBYTES8(F, b, q, 8), QBYTES8(F, b, q, 16), QBYTES8(F, b, q, 24),            \
	  QBYTES8(F, b, q, 32), QBYTES8(F, b, q, 40), QBYTES8(F, b, q, 48), QBYTES8(F, b, q, 56) }
#define QWIDTH(F, b) { QBYTES64(F, b, 0), QBYTES64(F, b, 1), QBYTES64(F, b, 2), QBYTES64(F, b, 3) }

static const char quad_select[5][4][64] = { { { 0 } }, QWIDTH(QSEL, 1), QWIDTH(QSEL, 2), QWIDTH(QSEL, 3),
					    QWIDTH(QSEL, 4) };
static const char quad_shift[5][4][64] = { { { 0 } }, QWIDTH(QSHF, 1), QWIDTH(QSHF, 2), QWIDTH(QSHF, 3),
					   QWIDTH(QSHF, 4) };

/* The floats at p + k * stride for the lanes k of in (the others 0): one gather where the byte offsets fit
 * its int32 lanes, one float at a time otherwise. */
INLINE __m512 row_scales16(__mmask16 in, const uint8_t *p, size_t stride)
{
	float s[16];

	if (stride <= INT32_MAX / 16)
		return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), in,
						_mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4,
										    3, 2, 1, 0),
								   _mm512_set1_epi32((int)stride)),
						p, 1);
	for (unsigned k = 0; k < 16; k++)
		s[k] = in >> k & 1 ? kvp_load_f32(p + k * stride) : 0.0f;
	return _mm512_loadu_ps(s);
}

/* The largest lane of each of a..d, in 128-bit lane h of the result (every float of it): the four
 * registers' halves folded by one shuffle and max each, then each 128-bit lane's four floats. */
INLINE __m512 max_of4(__m512 a, __m512 b, __m512 c, __m512 d)
{
	const __m512 ab = _mm512_max_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xee));
	const __m512 cd = _mm512_max_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xee));
	__m512 x = _mm512_max_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xdd));

	x = _mm512_max_ps(x, _mm512_permute_ps(x, 0x4e));
	return _mm512_max_ps(x, _mm512_permute_ps(x, 0xb1));
}

/* 128-bit lane h of x in every lane. */
INLINE __m512 lane_of(__m512 x, unsigned h)
{
	switch (h) {
	case 0: return _mm512_shuffle_f32x4(x, x, 0x00);
	case 1: return _mm512_shuffle_f32x4(x, x, 0x55);
	case 2: return _mm512_shuffle_f32x4(x, x, 0xaa);
	default: return _mm512_shuffle_f32x4(x, x, 0xff);
	}
}

/* kvp_weight_u8_in in lanes: u = w * s where that is > 0, else 0 (a product that is not > 0, NaN included,
 * gives vmaxps's second operand, 0). */
INLINE __m512 weight_u8_in(__m512 w, __m512 s)
{
	return _mm512_max_ps(_mm512_mul_ps(w, s), _mm512_setzero_ps());
}

/* kvp_weight_u8 in the lanes of in, stored as bytes at out: u >= lo, so x = (u - lo) * inv is never below 0
 * nor NaN, and x + 0.5 truncated is the plain code's rounding without its test of x > 0. */
INLINE void store_weights_u8(uint8_t *out, __mmask16 in, __m512 u, __m512 lo, __m512 inv)
{
	const __m512 x = _mm512_mul_ps(_mm512_sub_ps(u, lo), inv);

	_mm512_mask_cvtepi32_storeu_epi8(out, in, _mm512_min_epi32(_mm512_cvttps_epi32(_mm512_add_ps(x, _mm512_set1_ps(0.5f))),
								   _mm512_set1_epi32(255)));
}

/*
 * The weights of hn heads as uint8 (kernels.h's rounding, lane by lane), each row of w8 with four zeros after
 * its last; f[h] = unit * ((top - lo) / 255) and e[h] = unit * lo. Returns 0, having written only w8, when a
 * weight has its sign bit set; else 1. One pass gathers sixteen rows' scales and takes every head's u,
 * its largest and its least (weight_u8_in); the four heads' largest and least are reduced together, and
 * their steps computed in one register, head h in 128-bit lane h (the same operations as the plain code's,
 * so the same bits), then store_weights_u8 rounds them.
 */
INLINE int weights_u8(unsigned hn, const struct kvp_row_runs *rows, const float *w, size_t ws, float unit,
		      uint8_t (*w8)[KVP_AXPY_I16_ROWS + 4], float *f, float *e)
{
	const unsigned n = rows->n;
	const __m512 zero = _mm512_setzero_ps(), inf = _mm512_set1_ps(INFINITY);
	float u[4][KVP_AXPY_I16_ROWS], fe[2][16];
	__m512 top[4] = { zero, zero, zero, zero }, least[4] = { inf, inf, inf, inf }, t, l, spread, inv;
	__m512i bits = _mm512_setzero_si512();

	for (unsigned i = 0; i < n; i += 16) {
		const __mmask16 in = tail16(n - i < 16 ? n - i : 16);
		/* sixteen rows never straddle two runs */
		const __m512 s = row_scales16(in, kvp_run_scale(rows, i), rows->scale_stride);

		for (unsigned h = 0; h < hn; h++) {
			const __m512 x = _mm512_maskz_loadu_ps(in, w + h * ws + i), v = weight_u8_in(x, s);

			bits = _mm512_or_si512(bits, _mm512_castps_si512(x));
			_mm512_storeu_ps(u[h] + i, v);
			top[h] = _mm512_max_ps(v, top[h]);
			least[h] = _mm512_mask_min_ps(least[h], in, v, least[h]);
		}
	}
	if (_mm512_test_epi32_mask(bits, _mm512_set1_epi32(INT32_MIN)))
		return 0;
	for (unsigned h = hn; h < 4; h++)
		top[h] = zero, least[h] = zero;
	t = max_of4(top[0], top[1], top[2], top[3]);
	/* the least as minus the largest of the negated, which max_of4 folds in the same lanes */
	l = n ? _mm512_sub_ps(zero, max_of4(_mm512_sub_ps(zero, least[0]), _mm512_sub_ps(zero, least[1]),
					    _mm512_sub_ps(zero, least[2]), _mm512_sub_ps(zero, least[3])))
	      : zero;
	spread = _mm512_sub_ps(t, l);
	inv = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(spread, _mm512_set1_ps(KVP_WEIGHT_MAX_U8 / 3.0e38f), _CMP_GT_OQ),
				  _mm512_set1_ps(KVP_WEIGHT_MAX_U8), spread);
	_mm512_storeu_ps(fe[0], _mm512_mul_ps(_mm512_set1_ps(unit), _mm512_div_ps(spread, _mm512_set1_ps(KVP_WEIGHT_MAX_U8))));
	_mm512_storeu_ps(fe[1], _mm512_mul_ps(_mm512_set1_ps(unit), l));
	for (unsigned h = 0; h < hn; h++) {
		const __m512 lo = lane_of(l, h), step = lane_of(inv, h);

		f[h] = fe[0][4 * h], e[h] = fe[1][4 * h];
		for (unsigned i = 0; i < n; i += 16)
			store_weights_u8(w8[h] + i, tail16(n - i < 16 ? n - i : 16), _mm512_loadu_ps(u[h] + i), lo, step);
		memset(w8[h] + n, 0, 4);
	}
	return 1;
}

/* Bytes [at, at + nb) of rows i..i+3 (those below n; the others zeros), row t in 128-bit lane t. */
INLINE __m512i four_rows(const uint8_t *codes, size_t stride, unsigned i, unsigned n, unsigned at, unsigned nb)
{
	const uint8_t *p = codes + (size_t)i * stride + at;
	__m512i v = _mm512_zextsi128_si512(row_chunk(p, nb));

	if (i + 1 < n)
		v = _mm512_inserti32x4(v, row_chunk(p + stride, nb), 1);
	if (i + 2 < n)
		v = _mm512_inserti32x4(v, row_chunk(p + 2 * stride, nb), 2);
	if (i + 3 < n)
		v = _mm512_inserti32x4(v, row_chunk(p + 3 * stride, nb), 3);
	return v;
}

/* Four weights of a row of w8 as the int32 they make in memory. */
INLINE int32_t quad_at(const uint8_t *w8)
{
	int32_t v;

	memcpy(&v, w8, sizeof v);
	return v;
}

/* Four rows' int8 values of 16 columns (register q of a chunk), looked up from src as described above. */
#define QUAD_VALUES(q) \
	_mm512_permutexvar_epi8(_mm512_multishift_epi64_epi8(shf##q, _mm512_permutexvar_epi8(sel##q, src)), tab)

/* Head h's four weights times v into its accumulators a(h)q (hn heads, constant once inlined), and the
 * column sums (weights 1 for the rows below n) into c(q). */
#define QUAD_HEADS(q, v)                                                        \
	do {                                                                    \
		c##q = _mm512_dpbusd_epi32(c##q, ones, v);                      \
		a0##q = _mm512_dpbusd_epi32(a0##q, w0, v);                      \
		if (hn > 1)                                                     \
			a1##q = _mm512_dpbusd_epi32(a1##q, w1, v);              \
		if (hn > 2)                                                     \
			a2##q = _mm512_dpbusd_epi32(a2##q, w2, v);              \
		if (hn > 3)                                                     \
			a3##q = _mm512_dpbusd_epi32(a3##q, w3, v);              \
	} while (0)

/* One step of four rows from src: the heads' weights of rows i..i+3 (ones: 1 for each of them below n),
 * then nq registers of columns. */
#define QUAD_STEP(src_expr, ones_expr)                                                                 \
	do {                                                                                           \
		const __m512i src = (src_expr);                                                        \
		const __m512i ones = (ones_expr);                                                      \
		const __m512i w0 = _mm512_set1_epi32(quad_at(w8[0] + i));                              \
		const __m512i w1 = hn > 1 ? _mm512_set1_epi32(quad_at(w8[1] + i)) : w0;                \
		const __m512i w2 = hn > 2 ? _mm512_set1_epi32(quad_at(w8[2] + i)) : w0;                \
		const __m512i w3 = hn > 3 ? _mm512_set1_epi32(quad_at(w8[3] + i)) : w0;                \
		const __m512i v0 = QUAD_VALUES(0), v1 = QUAD_VALUES(1);                                \
                                                                                                       \
		QUAD_HEADS(0, v0);                                                                     \
		QUAD_HEADS(1, v1);                                                                     \
		if (nq > 2) {                                                                          \
			const __m512i v2 = QUAD_VALUES(2), v3 = QUAD_VALUES(3);                        \
			QUAD_HEADS(2, v2);                                                             \
			QUAD_HEADS(3, v3);                                                             \
		}                                                                                      \
	} while (0)

/* acc[0..k) += f * a chunk's weighted sums s0..s3 + e * its column sums c0..c3 (column 16q + l in lane l of
 * register q). */
INLINE void add_quads(float *acc, unsigned k, unsigned nq, float f, float e, __m512i s0, __m512i s1, __m512i s2,
		      __m512i s3, const __m512i *c)
{
	const __m512i sums[4] = { s0, s1, s2, s3 };
	const __m512 fv = _mm512_set1_ps(f), ev = _mm512_set1_ps(e);

	for (unsigned q = 0; q < nq && 16 * q < k; q++) {
		const __mmask16 keep = tail16(k - 16 * q < 16 ? k - 16 * q : 16);
		const __m512 add = _mm512_add_ps(_mm512_mul_ps(fv, _mm512_cvtepi32_ps(sums[q])),
						 _mm512_mul_ps(ev, _mm512_cvtepi32_ps(c[q])));
		float *p = acc + 16 * q;

		_mm512_mask_storeu_ps(p, keep, _mm512_add_ps(_mm512_maskz_loadu_ps(keep, p), add));
	}
}

/* Rows i..i+3, all below n, whole 16-byte chunks (nb == 16): four loads and three inserts. */
INLINE __m512i four_whole_rows(const uint8_t *codes, size_t stride, unsigned i, unsigned at)
{
	const uint8_t *p = codes + (size_t)i * stride + at;
	__m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)p));

	v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + stride)), 1);
	v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + 2 * stride)), 2);
	return _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + 3 * stride)), 3);
}

INLINE int axpy_u8_heads(unsigned hn, unsigned bits, unsigned m, const struct kvp_row_runs *rows, __m512i tab,
			  float unit, const float *w, size_t ws, float *acc, size_t as, const struct kvp_ahead *ahead)
{
	const unsigned cols = bits <= 2 ? 64 : 32, nq = cols / 16, row_bytes = (m * bits + 7) / 8, n = rows->n;
	/* ahead in a share per run of each chunk of columns */
	const unsigned steps = (m + cols - 1) / cols * ((n + rows->run - 1) / rows->run);
	unsigned step = 0;
	const size_t stride = rows->stride;
	uint8_t w8[4][KVP_AXPY_I16_ROWS + 4] __attribute__((aligned(4)));
	const __m512i all4 = _mm512_set1_epi32(0x01010101);
	const __m512i base0 = _mm512_loadu_si512(quad_select[bits][0]), shf0 = _mm512_loadu_si512(quad_shift[bits][0]);
	const __m512i base1 = _mm512_loadu_si512(quad_select[bits][1]), shf1 = _mm512_loadu_si512(quad_shift[bits][1]);
	const __m512i base2 = _mm512_loadu_si512(quad_select[bits][2]), shf2 = _mm512_loadu_si512(quad_shift[bits][2]);
	const __m512i base3 = _mm512_loadu_si512(quad_select[bits][3]), shf3 = _mm512_loadu_si512(quad_shift[bits][3]);
	float f[4], e[4];

	if (!weights_u8(hn, rows, w, ws, unit, w8, f, e))
		return 0;
	for (unsigned j = 0; j < m; j += cols) {
		const unsigned k = m - j < cols ? m - j : cols, want = j * bits / 8;
		/* a chunk shorter than 16 bytes of a row of at least 16 is read as the row's last 16 bytes, its
		 * codes `back` bytes into each lane, where the selection looks for them (the lanes of columns past
		 * k then select stray bytes, which add_quads leaves out) */
		const unsigned back = row_bytes >= 16 && row_bytes - want < 16 ? 16 - (row_bytes - want) : 0;
		const unsigned at = want - back, nb = row_bytes - at < 16 ? row_bytes - at : 16;
		const __m512i by = _mm512_set1_epi8((char)back);
		const __m512i sel0 = _mm512_add_epi8(base0, by), sel1 = _mm512_add_epi8(base1, by);
		const __m512i sel2 = _mm512_add_epi8(base2, by), sel3 = _mm512_add_epi8(base3, by);
		__m512i a00 = _mm512_setzero_si512(), a01 = a00, a02 = a00, a03 = a00;
		__m512i a10 = a00, a11 = a00, a12 = a00, a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00;
		__m512i a30 = a00, a31 = a00, a32 = a00, a33 = a00, c0 = a00, c1 = a00, c2 = a00, c3 = a00;

		/* run by run: row i of the run from i0 is row i - i0 of its codes */
		for (unsigned r = 0, i0 = 0; i0 < n; r++, i0 += rows->run) {
			const uint8_t *codes = rows->code[r];
			const unsigned end = n - i0 < rows->run ? n : i0 + rows->run;
			unsigned i = i0;

			kvp_ahead_share(ahead, step++, steps);
			if (nb == 16)
				for (; i + 4 <= end; i += 4)
					QUAD_STEP(four_whole_rows(codes, stride, i - i0, at), all4);
			for (; i < end; i += 4)
				QUAD_STEP(four_rows(codes, stride, i - i0, end - i0, at, nb),
					  end - i >= 4 ? all4 : _mm512_set1_epi32((int)(0x01010101u >> 8 * (4 - (end - i)))));
		}
		{
			const __m512i c[4] = { c0, c1, c2, c3 };

			add_quads(acc + j, k, nq, f[0], e[0], a00, a01, a02, a03, c);
			if (hn > 1)
				add_quads(acc + as + j, k, nq, f[1], e[1], a10, a11, a12, a13, c);
			if (hn > 2)
				add_quads(acc + 2 * as + j, k, nq, f[2], e[2], a20, a21, a22, a23, c);
			if (hn > 3)
				add_quads(acc + 3 * as + j, k, nq, f[3], e[3], a30, a31, a32, a33, c);
		}
	}
	return 1;
}

#undef QUAD_STEP
#undef QUAD_HEADS
#undef QUAD_VALUES

/* Returns 0, having changed nothing, when a weight of the first (or only) four heads has its sign bit set
 * (the caller has checked the others when there are more). */
INLINE int axpy_u8_width(unsigned bits, unsigned m, const struct kvp_row_runs *rows, const int8_t *lut, float unit,
			 unsigned g, const float *w, size_t ws, float *acc, size_t as, const struct kvp_ahead *ahead)
{
	const __m512i tab = int_regs(bits, lut, NULL, 0).tab8;
	unsigned h = 0;

#define AXPY_U8_HEADS(hn) \
	axpy_u8_heads(hn, bits, m, rows, tab, unit, w + h * ws, ws, acc + h * as, as, h ? NULL : ahead)
	for (; h + 4 <= g; h += 4)
		if (!AXPY_U8_HEADS(4))
			return 0;
	switch (g - h) {
	case 3: return AXPY_U8_HEADS(3);
	case 2: return AXPY_U8_HEADS(2);
	case 1: return AXPY_U8_HEADS(1);
	default: return 1;
	}
#undef AXPY_U8_HEADS
}

/* Whether a weight of g rows of n has its sign bit set: the weights ORed together, sixteen at a time. */
INLINE int any_sign(unsigned g, unsigned n, const float *w, size_t ws)
{
	__m512i bits = _mm512_setzero_si512();

	for (unsigned h = 0; h < g; h++)
		for (unsigned i = 0; i < n; i += 16)
			bits = _mm512_or_si512(bits, _mm512_maskz_loadu_epi32(tail16(n - i < 16 ? n - i : 16), w + h * ws + i));
	return _mm512_test_epi32_mask(bits, _mm512_set1_epi32(INT32_MIN)) != 0;
}

/* any_sign for the u8 kernels, which take heads four at a time: up to four, their weights' pass finds a sign
 * before anything is written; past four, a later group of heads would follow writes already made, so all are
 * checked first. */
INLINE int signed_past_four(unsigned g, unsigned n, const float *w, size_t ws)
{
	return g > 4 && any_sign(g, n, w, ws);
}

static int lut_axpy_u8_group(unsigned bits, unsigned m, const struct kvp_row_runs *rows, const int8_t *lut,
			     float unit, unsigned g, const float *w, size_t w_stride, float *acc, size_t acc_stride,
			     const struct kvp_ahead *ahead)
{
	if (signed_past_four(g, rows->n, w, w_stride))
		return 0;
	switch (bits) {
	case 1: return axpy_u8_width(1, m, rows, lut, unit, g, w, w_stride, acc, acc_stride, ahead);
	case 2: return axpy_u8_width(2, m, rows, lut, unit, g, w, w_stride, acc, acc_stride, ahead);
	case 3: return axpy_u8_width(3, m, rows, lut, unit, g, w, w_stride, acc, acc_stride, ahead);
	default: return axpy_u8_width(4, m, rows, lut, unit, g, w, w_stride, acc, acc_stride, ahead);
	}
}

/* loops.h's KIVI kernels on this table's vectors (LOOPS_LANES below), for the shapes these versions leave; not
 * inlined, so that their frames and these stay apart (make stack) */
static void loops_dot_i8_scaled(unsigned bits, unsigned m, unsigned n, const uint8_t *group, unsigned g,
				const float *q, size_t q_stride, float *out, size_t out_stride) __attribute__((noinline));
static void loops_axpy_i16_scaled(unsigned bits, unsigned m, unsigned gsize, unsigned n, const uint8_t *rows,
				  size_t stride, unsigned g, const float *w, size_t w_stride, float *acc,
				  size_t acc_stride) __attribute__((noinline));

/*
 * dot_i8_scaled, 2- and 4-bit codes (KIVI's keys; other widths, and m > 1024, take loops.h's).
 * Column byte k of sixteen rows is one 16-byte load: a zero-extension gives each row a lane, and
 * vpmultishiftqb copies its four codes (bits 0, 2, 4, 6 of the lane) to the lane's four bytes, which
 * vpdpbusd multiplies with the head's int8 query of channels 4k..4k+3, broadcast as one int32. At 4 bits
 * the two column bytes 2k and 2k + 1 are interleaved into a word per row first (codes at bits 0, 4, 8, 12).
 * The sums stay in one register per head and sixteen rows: no horizontal sums. (Before the 4-bit version,
 * and loops.h's for the rest, other widths took the plain code: kivi(bits=4) at 32K tokens, d=128, took
 * 610 ms a layer.)
 */
#define SCALED_QUADS 256 /* 1024 channels */
#define SCALED_PRODUCTS 256 /* channels whose products q * s the first pass keeps for the second */

/* Sixteen int32 lanes of kvp_nearest_even(x): one conversion with embedded round-to-nearest. */
INLINE __m512i nearest16(__m512 x)
{
	return _mm512_cvt_roundps_epi32(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

/* max(top, |u|) in one instruction (vrangeps: the larger magnitude, sign cleared; top is never negative) */
INLINE __m512 max_abs(__m512 top, __m512 u)
{
	return _mm512_range_ps(top, u, 0x0B);
}

/* kvp_scaled_query_i8 for hn heads at once (the same products, maxima and rounding), and each head's float sum
 * of q_j z_j (kvp_fold16's order) in zq: the maxima and those sums in one pass over the channels, then each
 * head's int8 query as whole 64-byte rows of quads[h] (channels past m weigh 0). Whole-row stores, not
 * byte-masked ones: the kernel's 4-byte loads that follow are forwarded from them. */
INLINE __m512 f16_at(__mmask16 in, const uint8_t *p, unsigned j)
{
	return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(in, p + 2 * (size_t)j));
}

/* hsum of each of a..d (the same additions in the same order, so the same bits), in lane 4h for the h-th:
 * the four reduced together, each step adding halves of two vectors at once. hsum16 (below) over a..d and
 * twelve zeros gives the same lanes, but gcc keeps its work on the zeros: dot_i8_scaled at d=64 took 2.28
 * against 1.95 ns a token with it. */
INLINE __m512 hsum_of4(__m512 a, __m512 b, __m512 c, __m512 d)
{
	/* [a | b] and [c | d], each lane l < 8 of a half: l + (l + 8) */
	const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
	const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
	/* 128-bit lane h of x: the h-th's l + (l + 4) */
	__m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));

	x = _mm512_add_ps(x, _mm512_permute_ps(x, 0x4e)); /* l + (l + 2) */
	return _mm512_add_ps(x, _mm512_permute_ps(x, 0xb1)); /* l + (l + 1) */
}

/* kvp_scaled_query_i8's step and its inverse for hn <= 4 heads' largest |u| in top, and their sums of q * z in zs
 * (hsum's order): the four heads reduced and divided together. */
INLINE void heads_steps(unsigned hn, __m512 *top, __m512 *zs, float *inv, float *step, float *zq)
{
	const __m512 zero = _mm512_setzero_ps();
	float invs[16], steps[16], sums[16];
	__m512 t;

	for (unsigned h = hn; h < 4; h++)
		top[h] = zs[h] = zero;
	t = max_of4(top[0], top[1], top[2], top[3]);
	_mm512_storeu_ps(invs, _mm512_maskz_div_ps(_mm512_cmp_ps_mask(t, _mm512_set1_ps(127.0f / 3.0e38f), _CMP_GT_OQ),
						   _mm512_set1_ps(127.0f), t));
	_mm512_storeu_ps(steps, _mm512_div_ps(t, _mm512_set1_ps(127.0f)));
	_mm512_storeu_ps(sums, hsum_of4(zs[0], zs[1], zs[2], zs[3]));
#pragma GCC unroll 4
	for (unsigned h = 0; h < hn; h++)
		inv[h] = invs[4 * h], step[h] = steps[4 * h], zq[h] = sums[4 * h];
}

INLINE void scaled_queries_i8(unsigned hn, unsigned m, const float *q, size_t qs, const uint8_t *group,
			      int32_t *quads, unsigned quad_stride, float *step, float *zq, float (*u)[SCALED_PRODUCTS])
{
	const uint8_t *s = group + 2 * (size_t)m;
	__m512 top[4], zs[4];
	float inv[4];

#pragma GCC unroll 4
	for (unsigned h = 0; h < hn; h++)
		top[h] = zs[h] = _mm512_setzero_ps();
	for (unsigned j = 0; j < m; j += 16) {
		const __mmask16 in = tail16(m - j < 16 ? m - j : 16);
		const __m512 sv = f16_at(in, s, j), zv = f16_at(in, group, j);
#pragma GCC unroll 4
		for (unsigned h = 0; h < hn; h++) {
			const __m512 qv = _mm512_maskz_loadu_ps(in, q + h * qs + j), uv = _mm512_mul_ps(qv, sv);
			top[h] = max_abs(top[h], uv);
			if (u)
				_mm512_storeu_ps(u[h] + j, uv);
			zs[h] = _mm512_add_ps(zs[h], _mm512_mul_ps(qv, zv));
		}
	}
	heads_steps(hn, top, zs, inv, step, zq);
	for (unsigned j = 0; j < m; j += 64) {
		const __mmask16 in0 = tail16(m - j < 16 ? m - j : 16);
		const __mmask16 in1 = m - j > 16 ? tail16(m - j - 16 < 16 ? m - j - 16 : 16) : 0;
		const __mmask16 in2 = m - j > 32 ? tail16(m - j - 32 < 16 ? m - j - 32 : 16) : 0;
		const __mmask16 in3 = m - j > 48 ? tail16(m - j - 48 < 16 ? m - j - 48 : 16) : 0;
		/* packs work within 128-bit lanes: dword 4v + L of the packed row is lane L's dword v, put back in order */
		const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
		__m512 s0, s1, s2, s3;

		if (!u)
			s0 = f16_at(in0, s, j), s1 = f16_at(in1, s, j + 16), s2 = f16_at(in2, s, j + 32), s3 = f16_at(in3, s, j + 48);
#pragma GCC unroll 4
		for (unsigned h = 0; h < hn; h++) {
			const float *qh = q + h * qs + j;
			const __m512 iv = _mm512_set1_ps(inv[h]);
			/* the products of the first pass where they were kept (the same floats), else again */
#define PRODUCTS(in, off, sv) \
	(u ? _mm512_maskz_loadu_ps(in, u[h] + j + (off)) : _mm512_mul_ps(_mm512_maskz_loadu_ps(in, qh + (off)), sv))
#define QUERY_LANES(in, off, sv) nearest16(_mm512_mul_ps(PRODUCTS(in, off, sv), iv))
			const __m512i r01 = _mm512_packs_epi32(QUERY_LANES(in0, 0, s0), QUERY_LANES(in1, 16, s1));
			const __m512i r23 = _mm512_packs_epi32(QUERY_LANES(in2, 32, s2), QUERY_LANES(in3, 48, s3));
			const __m512i row = _mm512_permutexvar_epi32(order, _mm512_packs_epi16(r01, r23));
#undef QUERY_LANES
#undef PRODUCTS
			_mm512_storeu_si512(quads + h * quad_stride + j / 4, row);
		}
	}
}

/* One head's step of the sums: the lanes' four codes of two blocks of 16 rows times the head's query of
 * column byte k, broadcast once for both. */
#define SCALED_HEAD(acc, acc2, quads)                                   \
	do {                                                            \
		const __m512i qk = _mm512_set1_epi32((quads)[k]);       \
		acc = _mm512_dpbusd_epi32(acc, c, qk);                  \
		acc2 = _mm512_dpbusd_epi32(acc2, c2, qk);               \
	} while (0)

/* out[0..rows) = z + step * the sums of a block of rows */
INLINE void add_rows(float *o, unsigned rows, float z, float step, __m512i sums)
{
	const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(step));

	_mm512_mask_storeu_ps(o, tail16(rows), _mm512_add_ps(_mm512_set1_ps(z), v));
}

/* The codes of channels 4k..4k+3 of sixteen rows from col (column byte k of 2-bit codes, or bytes 2k and 2k + 1
 * of 4-bit ones, a column n bytes after the other), one row per lane, a code per byte: the lane's bytes widened
 * to a dword, vpmultishiftqb copies each code's bits to its byte, and a mask clears the bits above. */
INLINE __m512i quad_codes(unsigned bits, const uint8_t *col, size_t n, __mmask16 keep)
{
	const __m128i x = _mm_maskz_loadu_epi8(keep, col);

	if (bits == 2)
		return _mm512_and_si512(_mm512_multishift_epi64_epi8(_mm512_set1_epi64(0x2624222006040200ll),
								     _mm512_cvtepu8_epi32(x)),
					_mm512_set1_epi8(3));
	{
		const __m128i y = _mm_maskz_loadu_epi8(keep, col + n);
		const __m256i xy = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi8(x, y)),
							   _mm_unpackhi_epi8(x, y), 1);

		return _mm512_and_si512(_mm512_multishift_epi64_epi8(_mm512_set1_epi64(0x2c2824200c080400ll),
								     _mm512_cvtepu16_epi32(xy)),
					_mm512_set1_epi8(15));
	}
}

/* Rows 32 at a time, in two blocks of 16 lanes (the second empty past n: its loads are masked off); codes of
 * 2 or 4 bits (a constant once inlined), quads[h * qs + k] the head's int8 query of channels 4k..4k+3. */
INLINE void dot_i8_scaled_heads(unsigned hn, unsigned bits, unsigned nquads, unsigned n, const uint8_t *codes,
				const int32_t *quads, unsigned qs, const float *step, const float *zq, float *out, size_t os)
{
	const size_t per_quad = bits / 2 * (size_t)n; /* bytes from one quad's first column to the next's */

	for (unsigned i0 = 0; i0 < n; i0 += 32) {
		const unsigned rows = n - i0 < 16 ? n - i0 : 16, rows2 = n - i0 > 16 ? (n - i0 - 16 < 16 ? n - i0 - 16 : 16) : 0;
		const __mmask16 keep = tail16(rows), keep2 = tail16(rows2);
		__m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;

		for (unsigned k = 0; k < nquads; k++) {
			const uint8_t *col = codes + (size_t)k * per_quad + i0;
			const __m512i c = quad_codes(bits, col, n, keep), c2 = quad_codes(bits, col + 16, n, keep2);

			SCALED_HEAD(a0, b0, quads);
			if (hn > 1)
				SCALED_HEAD(a1, b1, quads + qs);
			if (hn > 2)
				SCALED_HEAD(a2, b2, quads + 2 * qs);
			if (hn > 3)
				SCALED_HEAD(a3, b3, quads + 3 * qs);
		}
		{
			const __m512i a[4] = { a0, a1, a2, a3 }, b[4] = { b0, b1, b2, b3 };
			for (unsigned h = 0; h < hn; h++) {
				add_rows(out + h * os + i0, rows, zq[h], step[h], a[h]);
				if (rows2)
					add_rows(out + h * os + i0 + 16, rows2, zq[h], step[h], b[h]);
			}
		}
	}
}

#undef SCALED_HEAD

/* One group (the shapes dot_i8_scaled_groups below does not take in turns); not inlined, so that its frame and
 * that one stay apart (make stack). */
__attribute__((noinline)) static void dot_i8_scaled(unsigned bits, unsigned m, unsigned n, const uint8_t *group,
						    unsigned g, const float *q, size_t q_stride, float *out,
						    size_t out_stride)
{
	int32_t quads[4][SCALED_QUADS];
	float products[4][SCALED_PRODUCTS], (*u)[SCALED_PRODUCTS] = m <= SCALED_PRODUCTS ? products : NULL;
	const unsigned nquads = (m + 3) / 4;
	const uint8_t *codes = group + 4 * (size_t)m;
	float step[4], zq[4];

	/* 4-bit quads read two column bytes: whole ones only */
	if ((bits != 2 && (bits != 4 || m % 4)) || m > 4 * SCALED_QUADS) {
		loops_dot_i8_scaled(bits, m, n, group, g, q, q_stride, out, out_stride);
		return;
	}
	for (unsigned h0 = 0; h0 < g; h0 += 4) {
		const unsigned hn = g - h0 < 4 ? g - h0 : 4;
		const float *qh = q + h0 * q_stride;
		float *o = out + h0 * out_stride;

#define SCALED_BLOCK(hn) \
	scaled_queries_i8(hn, m, qh, q_stride, group, quads[0], SCALED_QUADS, step, zq, u), \
	(bits == 2 ? dot_i8_scaled_heads(hn, 2, nquads, n, codes, quads[0], SCALED_QUADS, step, zq, o, out_stride) \
		   : dot_i8_scaled_heads(hn, 4, nquads, n, codes, quads[0], SCALED_QUADS, step, zq, o, out_stride))
		switch (hn) {
		case 4: SCALED_BLOCK(4); break;
		case 3: SCALED_BLOCK(3); break;
		case 2: SCALED_BLOCK(2); break;
		default: SCALED_BLOCK(1); break;
		}
#undef SCALED_BLOCK
	}
}

#define KVP_ISA_DOT_I8_SCALED

/*
 * dot_i8_scaled (contract in kernels.h) for a block's groups in a row, m <= 4 * GROUPS_QUADS: each group's
 * queries are made (scaled_queries_i8) before the group ahead of it is scored, into the other of two buffers,
 * so that their chain of dependent steps (the maxima, their reductions and division, the rounding) runs
 * while that group's codes are summed instead of before. Against one group per call (kivi 2-bit, two groups
 * a block, best of interleaved runs): 2.7% less time a layer at d=64 with the rows in cache (4K tokens), 2%
 * at 32K tokens read in turns over 12 layers; at d=128 within the runs' spread.
 */
#define GROUPS_QUADS 64 /* 256 channels */

INLINE void scaled_groups_heads(unsigned hn, unsigned bits, unsigned m, unsigned n, unsigned groups,
				const uint8_t *group, const float *q, size_t qs, float *out, size_t os)
{
	const size_t bytes = kvp_scaled_group_bytes(bits, m, n);
	const unsigned nquads = (m + 3) / 4;
	int32_t quads[2][4 * GROUPS_QUADS];
	float products[4][SCALED_PRODUCTS], step[2][4], zq[2][4];

	scaled_queries_i8(hn, m, q, qs, group, quads[0], GROUPS_QUADS, step[0], zq[0], products);
	for (unsigned k = 0; k < groups; k++) {
		const unsigned b = k & 1;
		const uint8_t *codes = group + k * bytes + 4 * (size_t)m;

		if (k + 1 < groups)
			scaled_queries_i8(hn, m, q, qs, group + (k + 1) * bytes, quads[b ^ 1], GROUPS_QUADS, step[b ^ 1],
					  zq[b ^ 1], products);
		if (bits == 2)
			dot_i8_scaled_heads(hn, 2, nquads, n, codes, quads[b], GROUPS_QUADS, step[b], zq[b], out + (size_t)k * n, os);
		else
			dot_i8_scaled_heads(hn, 4, nquads, n, codes, quads[b], GROUPS_QUADS, step[b], zq[b], out + (size_t)k * n, os);
	}
}

KVP_SCALED_GROUPS(scaled_groups_in_turn, dot_i8_scaled)

static void dot_i8_scaled_groups(unsigned bits, unsigned m, unsigned n, unsigned groups, const uint8_t *group,
				 unsigned g, const float *q, size_t q_stride, float *out, size_t out_stride)
{
	if ((bits != 2 && (bits != 4 || m % 4)) || m > 4 * GROUPS_QUADS || groups < 2) {
		scaled_groups_in_turn(bits, m, n, groups, group, g, q, q_stride, out, out_stride);
		return;
	}
	for (unsigned h0 = 0; h0 < g; h0 += 4) {
		const unsigned hn = g - h0 < 4 ? g - h0 : 4;
		const float *qh = q + h0 * q_stride;
		float *o = out + h0 * out_stride;

		switch (hn) {
		case 4: scaled_groups_heads(4, bits, m, n, groups, group, qh, q_stride, o, out_stride); break;
		case 3: scaled_groups_heads(3, bits, m, n, groups, group, qh, q_stride, o, out_stride); break;
		case 2: scaled_groups_heads(2, bits, m, n, groups, group, qh, q_stride, o, out_stride); break;
		default: scaled_groups_heads(1, bits, m, n, groups, group, qh, q_stride, o, out_stride); break;
		}
	}
}

#define KVP_ISA_DOT_I8_GROUPS

/*
 * axpy_i16_scaled, 2-bit codes, column groups of a multiple of 16 (at most 4 of them), m a multiple of 64
 * (KIVI's values at d = 64 and 128; otherwise loops.h's). The rows' fp16 z and s are gathered once into
 * planar floats; one pass over the rows gives every head's maximum and z sums, a second its weights, rounded
 * once per (row, group): into wq[h][c][i] for the column-pass kernel below, or as pairs of rows for the plane
 * kernel (groups of 32, further down). Column-pass kernel: columns in passes of 64, rows in pairs; a 16-byte
 * load of each row's 64 codes, and per 16 columns one vpermb puts the two rows' bytes of column L into lane
 * L's two int16 halves, vpmultishiftqb and a mask leave the codes: the pairs vpdpwssd multiplies by the
 * rows' two weights of that column group, broadcast as one int32. Lanes are columns: no horizontal sums.
 */
#define SCALED_WEIGHTS 528 /* (rows + 2) * groups per head: 128 rows of 4 groups, 64 of 8 */

/* Per 16 columns e of a 64-column pass: byte 4L of lane L from byte 4e + L/4 of the first row (bytes 0-15),
 * byte 4L + 2 from the second row's (bytes 16-31); bytes 4L + 1 and 4L + 3 take byte 0 (masked off later). */
#define PAIR_BYTE(e, i) (char)((i) % 4 == 0 ? 4 * (e) + (i) / 16 : (i) % 4 == 2 ? 16 + 4 * (e) + (i) / 16 : 0)
#define PAIR8(e, i) PAIR_BYTE(e, i), PAIR_BYTE(e, i + 1), PAIR_BYTE(e, i + 2), PAIR_BYTE(e, i + 3), \
		    PAIR_BYTE(e, i + 4), PAIR_BYTE(e, i + 5), PAIR_BYTE(e, i + 6), PAIR_BYTE(e, i + 7)
#define PAIR64(e) { PAIR8(e, 0), PAIR8(e, 8), PAIR8(e, 16), PAIR8(e, 24), PAIR8(e, 32), PAIR8(e, 40), PAIR8(e, 48), \
		    PAIR8(e, 56) }
static const char pair_bytes[4][64] = { PAIR64(0), PAIR64(1), PAIR64(2), PAIR64(3) };

/* vpmultishiftqb's bit offsets after the byte permutation above: byte r of qword Q (lanes 2Q and 2Q + 1) takes
 * the 8 bits from the code of its lane (column 2Q + r/4 of 16, at bit 2 (L % 4) of its byte), in the first
 * row's byte for bytes 0, 4 of the qword and the second row's for bytes 2, 6 (odd bytes: masked off later). */
#define SHIFT_BYTE(i) (char)(8 * ((i) % 8 / 4 * 4 + (i) % 4 / 2 * 2) + 2 * (((i) / 8 * 2 + (i) % 8 / 4) % 4))
#define SHIFT8(i) SHIFT_BYTE(i), SHIFT_BYTE(i + 1), SHIFT_BYTE(i + 2), SHIFT_BYTE(i + 3), SHIFT_BYTE(i + 4), \
		  SHIFT_BYTE(i + 5), SHIFT_BYTE(i + 6), SHIFT_BYTE(i + 7)
static const char shift_bytes[64] = { SHIFT8(0), SHIFT8(8), SHIFT8(16), SHIFT8(24), SHIFT8(32), SHIFT8(40), SHIFT8(48),
				      SHIFT8(56) };

/* acc += the pairs of x times the pairs of y, in place: gcc moves the intrinsic's accumulators between registers
 * around every use in the sixteen-accumulator loop below (41 moves for 16 products), which this keeps out. */
#define DPWSSD(acc, x, y) __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(y))

/*
 * The horizontal sums of v[0..16), each in hsum's order (lane l + lane l + 8, then l + 4, l + 2, l + 1), all
 * sixteen in one vector: each step adds halves of two vectors at once, so that 16 sums take 15 additions.
 * Lane k of the result is the sum of v[hsum16_lane[k]].
 */
static const int hsum16_lane[16] = { 0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15 };

INLINE __m512 hsum16(const __m512 *v)
{
	__m512 a[8], b[4], c[2];

	for (unsigned k = 0; k < 8; k++) /* [v 2k: l + (l + 8), v 2k+1: the same] */
		a[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44),
				     _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE));
	for (unsigned k = 0; k < 4; k++) /* blocks 0 + 1 of each half: l + (l + 4) */
		b[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0x88),
				     _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0xDD));
	for (unsigned k = 0; k < 2; k++) /* within blocks: l + (l + 2) */
		c[k] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * k], b[2 * k + 1], 0x44), _mm512_shuffle_ps(b[2 * k], b[2 * k + 1], 0xEE));
	return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD)); /* l + (l + 1) */
}

/* Sixteen weights u * inv rounded (kvp_nearest_even), two vectors packed to 32 int16 in order. */
INLINE __m512i weights32(__m512 x0, __m512 x1)
{
	const __m512i order = _mm512_set_epi64(7, 5, 3, 1, 6, 4, 2, 0); /* packs interleave 128-bit lanes */

	return _mm512_permutexvar_epi64(order, _mm512_packs_epi32(nearest16(x0), nearest16(x1)));
}

/*
 * Pass 2 of scaled_weights_heads for the plane kernel (groups of 32 columns): per head h and pair of groups
 * v (2v, 2v + 1), one qword per pair of rows p, pq[h * hs + v * pv + p] = W(2p, 2v), W(2p + 1, 2v),
 * W(2p, 2v + 1), W(2p + 1, 2v + 1); rows past n weigh 0. Written 32 rows (16 qwords) at a time.
 */
INLINE void weight_pairs(unsigned hn, unsigned n, unsigned ng, const float *w, size_t w_stride, const float *sf,
			 const __m512 *inv, int64_t *pq, size_t pv)
{
	const __m512i lo_order = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0), hi_order = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
	const size_t hs = (size_t)ng / 2 * pv;

	for (unsigned h = 0; h < hn; h++)
		for (unsigned v = 0; v < ng / 2; v++) {
			const float *wh = w + h * w_stride, *s0 = sf + 2 * v * (size_t)n, *s1 = s0 + n;
			int64_t *out = pq + h * hs + v * pv;
			for (unsigned i = 0; i < n; i += 32) {
				const unsigned k = n - i < 32 ? n - i : 32;
				const __mmask16 in0 = tail16(k < 16 ? k : 16), in1 = k > 16 ? tail16(k - 16) : 0;
				const __m512 w0 = _mm512_maskz_loadu_ps(in0, wh + i), w1 = _mm512_maskz_loadu_ps(in1, wh + i + 16);
				const __m512i r0 = weights32(
					_mm512_mul_ps(_mm512_mul_ps(w0, _mm512_maskz_loadu_ps(in0, s0 + i)), inv[h]),
					_mm512_mul_ps(_mm512_mul_ps(w1, _mm512_maskz_loadu_ps(in1, s0 + i + 16)), inv[h]));
				const __m512i r1 = weights32(
					_mm512_mul_ps(_mm512_mul_ps(w0, _mm512_maskz_loadu_ps(in0, s1 + i)), inv[h]),
					_mm512_mul_ps(_mm512_mul_ps(w1, _mm512_maskz_loadu_ps(in1, s1 + i + 16)), inv[h]));
				/* dwords (pairs of rows) of the two groups interleaved: qwords 0, 1, 4, 5, ... and 2, 3, 6, 7, ... */
				const __m512i lo = _mm512_unpacklo_epi32(r0, r1), hi = _mm512_unpackhi_epi32(r0, r1);
				_mm512_storeu_si512(out + i / 2, _mm512_permutex2var_epi64(lo, lo_order, hi));
				_mm512_storeu_si512(out + i / 2 + 8, _mm512_permutex2var_epi64(lo, hi_order, hi));
			}
		}
}

/*
 * hn heads' weights W(i, c) in int16 (head h's rows of n + 2 per group at wq + h * ws; the pad rows weigh 0),
 * f[h] = top / 4095, and their sums of w_i z(i, c) added to acc[h * as + c] (ng <= 4: hn * ng <= 16 sums).
 * z and s: planar floats, zs[c * n + i] and zs[(ng + c) * n + i]. The maxima in one pass over the tokens with
 * the z sums, then the products again, rounded and packed two vectors at a time.
 */
INLINE void scaled_weights_heads(unsigned hn, unsigned n, unsigned ng, const float *w, size_t w_stride,
				 const float *zs, int16_t *wq, size_t ws, int64_t *pq, size_t pv, float *f, float *acc,
				 size_t as)
{
	const float *sf = zs + (size_t)ng * n;
	__m512 top[4], zsum[16], inv[4];
	const __m512i order = _mm512_set_epi64(7, 5, 3, 1, 6, 4, 2, 0); /* packs interleave 128-bit lanes */

#pragma GCC unroll 16
	for (unsigned k = 0; k < 16; k++)
		zsum[k] = _mm512_setzero_ps();
#pragma GCC unroll 4
	for (unsigned h = 0; h < hn; h++)
		top[h] = _mm512_setzero_ps();
	for (unsigned i = 0; i < n; i += 16) {
		const __mmask16 in = tail16(n - i < 16 ? n - i : 16);
		__m512 wv[4];
#pragma GCC unroll 4
		for (unsigned h = 0; h < hn; h++)
			wv[h] = _mm512_maskz_loadu_ps(in, w + h * w_stride + i);
#pragma GCC unroll 4
		for (unsigned c = 0; c < ng; c++) {
			const __m512 zv = _mm512_maskz_loadu_ps(in, zs + c * n + i), sv = _mm512_maskz_loadu_ps(in, sf + c * n + i);
#pragma GCC unroll 4
			for (unsigned h = 0; h < hn; h++) {
				zsum[h * ng + c] = _mm512_add_ps(zsum[h * ng + c], _mm512_mul_ps(wv[h], zv));
				top[h] = max_abs(top[h], _mm512_mul_ps(wv[h], sv));
			}
		}
	}
	{
		float sums[16];
		_mm512_storeu_ps(sums, hsum16(zsum));
		for (unsigned k = 0; k < 16; k++)
			if (hsum16_lane[k] < (int)(hn * ng))
				acc[hsum16_lane[k] / ng * as + hsum16_lane[k] % ng] += sums[k];
	}
	for (unsigned h = 0; h < hn; h++) {
		const float t = _mm512_reduce_max_ps(top[h]);
		inv[h] = _mm512_set1_ps(kvp_weight_inv(t));
		f[h] = t / KVP_WEIGHT_MAX;
	}
	if (pq) {
		weight_pairs(hn, n, ng, w, w_stride, sf, inv, pq, pv);
		return;
	}
	for (unsigned h = 0; h < hn; h++)
		for (unsigned c = 0; c < ng; c++) {
			int16_t *row = wq + h * ws + c * (n + 2);
			const float *wh = w + h * w_stride, *sc = sf + c * n;
			for (unsigned i = 0; i < n; i += 32) {
				const unsigned k = n - i < 32 ? n - i : 32;
				const __mmask16 in0 = tail16(k < 16 ? k : 16), in1 = k > 16 ? tail16(k - 16) : 0;
				const __m512 x0 = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(in0, wh + i), _mm512_maskz_loadu_ps(in0, sc + i)), inv[h]);
				const __m512 x1 = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(in1, wh + i + 16), _mm512_maskz_loadu_ps(in1, sc + i + 16)), inv[h]);
				const __m512i packed = _mm512_permutexvar_epi64(order, _mm512_packs_epi32(nearest16(x0), nearest16(x1)));
				_mm512_mask_storeu_epi16(row + i, (__mmask32)(k == 32 ? ~0u : (1u << k) - 1), packed);
			}
			row[n] = row[n + 1] = 0;
		}
}

/* The step of 16 columns e: their codes of the two rows as int16 pairs (byte permutation, then each lane's bits
 * selected and masked), against each head's two weights of their group ce, broadcast as one int32. */
#define SCALED_COLUMNS(e, pe, ce)                                                                              \
	do {                                                                                                   \
		const __m512i de = _mm512_and_si512(_mm512_multishift_epi64_epi8(shift, _mm512_permutexvar_epi8(pe, xy)), low); \
		const int16_t *at = wq + (size_t)(ce) * (n + 2) + i;                                            \
		DPWSSD(a0##e, de, _mm512_set1_epi32(pair_at(at)));                                             \
		if (hn > 1)                                                                                     \
			DPWSSD(a1##e, de, _mm512_set1_epi32(pair_at(at + ws)));                                 \
		if (hn > 2)                                                                                     \
			DPWSSD(a2##e, de, _mm512_set1_epi32(pair_at(at + 2 * ws)));                             \
		if (hn > 3)                                                                                     \
			DPWSSD(a3##e, de, _mm512_set1_epi32(pair_at(at + 3 * ws)));                             \
	} while (0)

/* acc[0..64) += f * a pass's four registers of sums */
INLINE void add_pass(float *o, float f, __m512i s0, __m512i s1, __m512i s2, __m512i s3)
{
	const __m512 fv = _mm512_set1_ps(f);

	_mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), _mm512_mul_ps(fv, _mm512_cvtepi32_ps(s0))));
	_mm512_storeu_ps(o + 16, _mm512_add_ps(_mm512_loadu_ps(o + 16), _mm512_mul_ps(fv, _mm512_cvtepi32_ps(s1))));
	_mm512_storeu_ps(o + 32, _mm512_add_ps(_mm512_loadu_ps(o + 32), _mm512_mul_ps(fv, _mm512_cvtepi32_ps(s2))));
	_mm512_storeu_ps(o + 48, _mm512_add_ps(_mm512_loadu_ps(o + 48), _mm512_mul_ps(fv, _mm512_cvtepi32_ps(s3))));
}

INLINE void axpy_i16_scaled_heads(unsigned hn, unsigned m, unsigned gsize, unsigned n, const uint8_t *codes,
				  size_t stride, const int16_t *wq, const float *f, float *acc, size_t as)
{
	const __m512i p0 = _mm512_loadu_si512(pair_bytes[0]), p1 = _mm512_loadu_si512(pair_bytes[1]);
	const __m512i p2 = _mm512_loadu_si512(pair_bytes[2]), p3 = _mm512_loadu_si512(pair_bytes[3]);
	const __m512i shift = _mm512_loadu_si512(shift_bytes), low = _mm512_set1_epi16(3);
	const size_t ws = (size_t)(m / gsize + (m % gsize != 0)) * (n + 2);

	for (unsigned j0 = 0; j0 < m; j0 += 64) {
		const unsigned c0 = j0 / gsize, c1 = (j0 + 16) / gsize, c2 = (j0 + 32) / gsize, c3 = (j0 + 48) / gsize;
		__m512i a00 = _mm512_setzero_si512(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00;
		__m512i a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;

		for (unsigned i = 0; i < n; i += 2) {
			const __m128i x = _mm_loadu_si128((const __m128i *)(codes + (size_t)i * stride + j0 / 4));
			const __m128i y = i + 1 < n ? _mm_loadu_si128((const __m128i *)(codes + (size_t)(i + 1) * stride + j0 / 4))
						    : _mm_setzero_si128();
			const __m512i xy = _mm512_inserti32x4(_mm512_castsi128_si512(x), y, 1);

			SCALED_COLUMNS(0, p0, c0);
			SCALED_COLUMNS(1, p1, c1);
			SCALED_COLUMNS(2, p2, c2);
			SCALED_COLUMNS(3, p3, c3);
		}
		add_pass(acc + j0, f[0], a00, a01, a02, a03);
		if (hn > 1)
			add_pass(acc + as + j0, f[1], a10, a11, a12, a13);
		if (hn > 2)
			add_pass(acc + 2 * as + j0, f[2], a20, a21, a22, a23);
		if (hn > 3)
			add_pass(acc + 3 * as + j0, f[3], a30, a31, a32, a33);
	}
}

#undef SCALED_COLUMNS

/*
 * The plane kernel (column groups of 32): per 64-column chunk v of two rows x, y (16 bytes each: groups 2v and
 * 2v + 1), one vpermb puts into int32 lane L the byte 8 (L & 1) + L/2 of x (low int16) and of y (high int16);
 * that byte holds the codes of four columns (b = 4 byte + j at bits 2j). Masking plane j of every lane leaves
 * code * 4^j in each int16, which vpdpwssd multiplies with the rows' weights of the lane's group: one qword
 * broadcast per head (even lanes group 2v, odd lanes 2v + 1). So a chunk takes one permutation and four
 * masks for sixteen products of four heads; plane j's sums are 4^j times the codes' and lane L of plane j is
 * column 32 (L & 1) + 4 (L / 2) + j, which the end of the chunk undoes exactly (a power of two, then lanes).
 */
#define PLACE_BYTE(b) (char)((b) % 4 == 0 ? 8 * ((b) / 4 % 2) + (b) / 8 : (b) % 4 == 2 ? 16 + 8 * ((b) / 4 % 2) + (b) / 8 : 0)
#define PLACE8(b) PLACE_BYTE(b), PLACE_BYTE(b + 1), PLACE_BYTE(b + 2), PLACE_BYTE(b + 3), PLACE_BYTE(b + 4), \
		  PLACE_BYTE(b + 5), PLACE_BYTE(b + 6), PLACE_BYTE(b + 7)
static const char place_bytes[64] = { PLACE8(0), PLACE8(8), PLACE8(16), PLACE8(24), PLACE8(32), PLACE8(40), PLACE8(48),
				      PLACE8(56) };

/* acc[0..64) += f * the columns of a chunk's four planes (sums times 4^j, lanes as above), in column order */
INLINE void add_planes(float *o, float f, __m512i s0, __m512i s1, __m512i s2, __m512i s3)
{
	/* output vector r, lane t: plane t % 4, lane 8 (r % 2) + 2 (t / 4) + r / 2 (+16: the second source) */
#define PLANE_LANE(r, t) (8 * ((r) % 2) + 2 * ((t) / 4) + (r) / 2 + ((t) % 2 ? 16 : 0))
#define PLANE_IDX(r) _mm512_set_epi32(PLANE_LANE(r, 15), PLANE_LANE(r, 14), PLANE_LANE(r, 13), PLANE_LANE(r, 12), \
				      PLANE_LANE(r, 11), PLANE_LANE(r, 10), PLANE_LANE(r, 9), PLANE_LANE(r, 8), \
				      PLANE_LANE(r, 7), PLANE_LANE(r, 6), PLANE_LANE(r, 5), PLANE_LANE(r, 4), \
				      PLANE_LANE(r, 3), PLANE_LANE(r, 2), PLANE_LANE(r, 1), PLANE_LANE(r, 0))
	const __m512 fv = _mm512_set1_ps(f);
	const __m512 p0 = _mm512_cvtepi32_ps(s0), p1 = _mm512_mul_ps(_mm512_cvtepi32_ps(s1), _mm512_set1_ps(0.25f));
	const __m512 p2 = _mm512_mul_ps(_mm512_cvtepi32_ps(s2), _mm512_set1_ps(0.0625f));
	const __m512 p3 = _mm512_mul_ps(_mm512_cvtepi32_ps(s3), _mm512_set1_ps(0.015625f));
	const __m512i idx[4] = { PLANE_IDX(0), PLANE_IDX(1), PLANE_IDX(2), PLANE_IDX(3) };

	for (unsigned r = 0; r < 4; r++) {
		const __m512 x = _mm512_mask_blend_ps(0xCCCC, _mm512_permutex2var_ps(p0, idx[r], p1),
						      _mm512_permutex2var_ps(p2, idx[r], p3));
		_mm512_storeu_ps(o + 16 * r, _mm512_add_ps(_mm512_loadu_ps(o + 16 * r), _mm512_mul_ps(fv, x)));
	}
#undef PLANE_IDX
#undef PLANE_LANE
}

/* One plane j of the chunk: its codes against each head's weights. */
#define PLANE(j, mask)                                              \
	do {                                                        \
		const __m512i dj = _mm512_and_si512(placed, mask);  \
		DPWSSD(a0##j, dj, b0);                              \
		if (hn > 1)                                         \
			DPWSSD(a1##j, dj, b1);                      \
		if (hn > 2)                                         \
			DPWSSD(a2##j, dj, b2);                      \
		if (hn > 3)                                         \
			DPWSSD(a3##j, dj, b3);                      \
	} while (0)

/* The qword at p (weights written by vector stores into an int16 buffer: read without an int64 lvalue). */
INLINE long long qword_at(const int64_t *p)
{
	long long v;

	memcpy(&v, p, sizeof v);
	return v;
}

INLINE void axpy_i16_planes_heads(unsigned hn, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
				  const int64_t *pq, size_t pv, const float *f, float *acc, size_t as)
{
	const __m512i place = _mm512_loadu_si512(place_bytes);
	const __m512i m0 = _mm512_set1_epi16(3), m1 = _mm512_set1_epi16(12), m2 = _mm512_set1_epi16(48);
	const __m512i m3 = _mm512_set1_epi16(192);
	const __mmask64 low_bytes = 0x5555555555555555ull;
	const size_t hs = (size_t)m / 64 * pv;

	for (unsigned v = 0; v < m / 64; v++) {
		const int64_t *w = pq + v * pv;
		__m512i a00 = _mm512_setzero_si512(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00;
		__m512i a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;

		for (unsigned i = 0; i < n; i += 2) {
			const __m128i x = _mm_loadu_si128((const __m128i *)(codes + (size_t)i * stride + 16 * v));
			const __m128i y = i + 1 < n ? _mm_loadu_si128((const __m128i *)(codes + (size_t)(i + 1) * stride + 16 * v))
						    : _mm_setzero_si128();
			const __m512i placed = _mm512_maskz_permutexvar_epi8(
				low_bytes, place, _mm512_inserti32x4(_mm512_castsi128_si512(x), y, 1));
			const __m512i b0 = _mm512_set1_epi64(qword_at(w + i / 2));
			const __m512i b1 = hn > 1 ? _mm512_set1_epi64(qword_at(w + hs + i / 2)) : b0;
			const __m512i b2 = hn > 2 ? _mm512_set1_epi64(qword_at(w + 2 * hs + i / 2)) : b0;
			const __m512i b3 = hn > 3 ? _mm512_set1_epi64(qword_at(w + 3 * hs + i / 2)) : b0;

			PLANE(0, m0);
			PLANE(1, m1);
			PLANE(2, m2);
			PLANE(3, m3);
		}
		add_planes(acc + 64 * v, f[0], a00, a01, a02, a03);
		if (hn > 1)
			add_planes(acc + as + 64 * v, f[1], a10, a11, a12, a13);
		if (hn > 2)
			add_planes(acc + 2 * as + 64 * v, f[2], a20, a21, a22, a23);
		if (hn > 3)
			add_planes(acc + 3 * as + 64 * v, f[3], a30, a31, a32, a33);
	}
}

#undef PLANE

/* Sixteen fp16 scalars h to fo[at..at+16) as floats, or to ho as they are (where fo is NULL: a constant once
 * inlined), in the lanes of in. */
INLINE void store_scalars16(float *fo, uint16_t *ho, size_t at, __mmask16 in, __m256i h)
{
	if (fo)
		_mm512_mask_storeu_ps(fo + at, in, _mm512_cvtph_ps(h));
	else
		_mm256_mask_storeu_epi16(ho + at, in, h);
}

/* gather_scalars for four or eight scalars (two or four groups) of records of at least 16 bytes: a row's 16
 * bytes by one load, four rows per register, then words to scalar-major order and qwords across the
 * registers: shuffles instead of gathers (which took a tenth of axpy_u8_scaled's time at d=64). */
INLINE void load_scalars(unsigned ns, unsigned n, const uint8_t *rows, size_t stride, float *fo, uint16_t *ho,
			 size_t pitch)
{
	/* word 4e + b of each register: scalar e of its row b (word 8b + e) */
	const __m512i by_scalar = _mm512_set_epi16(31, 23, 15, 7, 30, 22, 14, 6, 29, 21, 13, 5, 28, 20, 12, 4, 27, 19, 11, 3,
						   26, 18, 10, 2, 25, 17, 9, 1, 24, 16, 8, 0);
	const __m512i pairs_lo = _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0), pairs_hi = _mm512_set_epi64(15, 7, 14, 6, 13, 5, 12, 4);
	const __m512i quads_lo = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0), quads_hi = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
	const __mmask16 all = 0xffff;

	for (unsigned i0 = 0; i0 + 16 <= n; i0 += 16) {
		__m512i r[4], t01, t01b, t23, t23b, u;
		for (unsigned a = 0; a < 4; a++) {
			const uint8_t *p = rows + (size_t)(i0 + 4 * a) * stride;
			__m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)p));
			v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + stride)), 1);
			v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + 2 * stride)), 2);
			v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + 3 * stride)), 3);
			r[a] = _mm512_permutexvar_epi16(by_scalar, v); /* qword e: scalar e of the four rows */
		}
		t01 = _mm512_permutex2var_epi64(r[0], pairs_lo, r[1]); /* scalars 0-3 of rows 0-7, by pairs of qwords */
		t01b = _mm512_permutex2var_epi64(r[0], pairs_hi, r[1]);
		t23 = _mm512_permutex2var_epi64(r[2], pairs_lo, r[3]);
		t23b = _mm512_permutex2var_epi64(r[2], pairs_hi, r[3]);
		u = _mm512_permutex2var_epi64(t01, quads_lo, t23); /* scalars 0 and 1 of the sixteen rows */
		store_scalars16(fo, ho, i0, all, _mm512_castsi512_si256(u));
		store_scalars16(fo, ho, pitch + i0, all, _mm512_extracti64x4_epi64(u, 1));
		u = _mm512_permutex2var_epi64(t01, quads_hi, t23);
		store_scalars16(fo, ho, 2 * pitch + i0, all, _mm512_castsi512_si256(u));
		store_scalars16(fo, ho, 3 * pitch + i0, all, _mm512_extracti64x4_epi64(u, 1));
		if (ns < 8)
			continue;
		u = _mm512_permutex2var_epi64(t01b, quads_lo, t23b);
		store_scalars16(fo, ho, 4 * pitch + i0, all, _mm512_castsi512_si256(u));
		store_scalars16(fo, ho, 5 * pitch + i0, all, _mm512_extracti64x4_epi64(u, 1));
		u = _mm512_permutex2var_epi64(t01b, quads_hi, t23b);
		store_scalars16(fo, ho, 6 * pitch + i0, all, _mm512_castsi512_si256(u));
		store_scalars16(fo, ho, 7 * pitch + i0, all, _mm512_extracti64x4_epi64(u, 1));
	}
}

/* The ns fp16 scalars at the start of each of n records (ns even), planar: scalar e of row i at [e * pitch + i]
 * (pitch >= n) of fo as a float, or of ho as it is (fo NULL). Sixteen rows at a time: dword k of each record
 * by one gather, split into its two halves. */
INLINE void gather_scalars(unsigned ns, unsigned n, const uint8_t *rows, size_t stride, float *fo, uint16_t *ho,
			   size_t pitch)
{
	const __m512i at = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
					      _mm512_set1_epi32((int)stride));

	unsigned from = 0;

	if ((ns == 4 || ns == 8) && stride >= 16) { /* whole blocks of sixteen rows by loads and shuffles, the rest gathered */
		load_scalars(ns, n, rows, stride, fo, ho, pitch);
		from = n & ~15u;
	}
	for (unsigned i0 = from; i0 < n; i0 += 16) {
		const __mmask16 in = tail16(n - i0 < 16 ? n - i0 : 16);
		const uint8_t *base = rows + (size_t)i0 * stride;

		for (unsigned k = 0; k < ns / 2; k++) {
			const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), in, at, base + 4 * k, 1);
			store_scalars16(fo, ho, 2 * k * pitch + i0, in, _mm512_cvtepi32_epi16(v));
			store_scalars16(fo, ho, (2 * k + 1) * pitch + i0, in, _mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16)));
		}
	}
}

static void axpy_i16_scaled(unsigned bits, unsigned m, unsigned gsize, unsigned n, const uint8_t *rows, size_t stride,
			    unsigned g, const float *w, size_t w_stride, float *acc, size_t acc_stride)
{
	const unsigned ng = (m + gsize - 1) / gsize;
	/* groups of 32 take the plane kernel (weights in pq, 32-row blocks of pairs: pv per group pair); others wq */
	const int planes = gsize == 32;
	const size_t pv = (size_t)(n + 31) / 32 * 16;
	int16_t wq[4 * SCALED_WEIGHTS] __attribute__((aligned(8)));
	int64_t *pq = planes ? (int64_t *)(void *)wq : NULL;
	float zs[2 * SCALED_WEIGHTS], f[4];

	if (bits != 2 || gsize % 16 || m % 64 || ng > 4 || (size_t)ng * (n + 2) > SCALED_WEIGHTS ||
	    (planes && 4 * (size_t)ng / 2 * pv * 4 > 4 * SCALED_WEIGHTS)) {
		loops_axpy_i16_scaled(bits, m, gsize, n, rows, stride, g, w, w_stride, acc, acc_stride);
		return;
	}
	gather_scalars(2 * ng, n, rows, stride, zs, NULL, n);
	for (unsigned h0 = 0; h0 < g; h0 += 4) {
		const unsigned hn = g - h0 < 4 ? g - h0 : 4;
		const size_t ws = (size_t)ng * (n + 2);

		/* both counts constants in each case: the sixteen z sums and four maxima stay in registers */
#define WEIGHTS(hn, ng) scaled_weights_heads(hn, n, ng, w + h0 * w_stride, w_stride, zs, wq, ws, pq, pv, f, \
					     acc + h0 * acc_stride + m, acc_stride)
#define WEIGHTS_NG(hn) \
	switch (ng) { \
	case 4: WEIGHTS(hn, 4); break; \
	case 3: WEIGHTS(hn, 3); break; \
	case 2: WEIGHTS(hn, 2); break; \
	default: WEIGHTS(hn, 1); break; \
	}
		switch (hn) {
		case 4: WEIGHTS_NG(4); break;
		case 3: WEIGHTS_NG(3); break;
		case 2: WEIGHTS_NG(2); break;
		default: WEIGHTS_NG(1); break;
		}
#undef WEIGHTS_NG
#undef WEIGHTS
#define SCALED_HEADS(hn) \
	planes ? axpy_i16_planes_heads(hn, m, n, rows + 4 * (size_t)ng, stride, pq, pv, f, acc + h0 * acc_stride, acc_stride) \
	       : axpy_i16_scaled_heads(hn, m, gsize, n, rows + 4 * (size_t)ng, stride, wq, f, acc + h0 * acc_stride, acc_stride)
		switch (hn) {
		case 4: SCALED_HEADS(4); break;
		case 3: SCALED_HEADS(3); break;
		case 2: SCALED_HEADS(2); break;
		default: SCALED_HEADS(1); break;
		}
#undef SCALED_HEADS
	}
}

#undef DPWSSD

#define KVP_ISA_AXPY_I16_SCALED

/*
 * axpy_u8_scaled (contract in kernels.h): codes of 2 or 4 bits, column groups of a multiple of 16 (at most
 * U8_SCALED_GROUPS of them), m a multiple of 64 (KIVI's values at d = 64 and 128); other shapes are declined,
 * and take axpy_i16_scaled. The records' fp16 z and s are gathered run by run into planar rows (still fp16);
 * one pass over them gives every head's z sums, largest and least u and whether a weight has its sign bit set
 * (a pass of its own over the weights was 6% of the kernel at d=64), a second its weights as bytes, a row per
 * (head, group). Then lut_axpy_u8_group's loop (above) without its table: four rows' codes of a chunk are one
 * register (row t in 128-bit lane t), vpermb and vpmultishiftqb bring code (t, c) to byte 4c + t, a vpermb
 * looks up its centred value, and vpdpbusd multiplies that with the four rows' weights of its column's
 * group, broadcast as one int32; the column sums (weights 1) carry the least weight's term. Against
 * axpy_i16_scaled's vpdpwssd on two rows, a vpdpbusd takes four, and the codes need no plane masks.
 * Tried and dropped (in cache, d=64, 4 heads, builds interleaved): the codes by vpermb, a vpsrlvd by each
 * lane's offset and a mask instead of vpmultishiftqb and the table (the centring then at the end, as
 * 2 sum W code - L sum W: the same integers), 3.48 against 2.98 ns a token; with the column sums also added
 * bytewise (widened every 64 rows), 3.2-3.3 against 3.0-3.2 (gcc spilled accumulators to make room). Each
 * head's weights broadcast once for the two registers whose columns share a group: within 1%.
 */
#define U8_SCALED_GROUPS 4
#define U8_HEAD (U8_SCALED_GROUPS * (KVP_AXPY_I16_ROWS + 4)) /* bytes from a head's weights to the next's */

struct u8_scaled {
	unsigned bits, m, gsize, ng, n;
	const struct kvp_row_runs *rows;
	uint8_t (*w8)[U8_SCALED_GROUPS][KVP_AXPY_I16_ROWS + 4]; /* [head][group][row], four zeros past the last row */
	float f[4], e[4]; /* (top - lo) / 510 and lo / 2, per head */
	int8_t centred[64]; /* 2 (b mod 2^bits) - L for every byte b */
};

/* The weights of u8_scaled_weights from each head's largest and least u in top and least (hn <= 4 of them; the
 * four reduced together, the least as minus the largest of the negated), a group's scales converted once for
 * all heads. */
INLINE void u8_scaled_round(unsigned hn, unsigned ng, struct u8_scaled *k, const float *w, size_t ws,
			    const uint16_t *sh, __m512 *top, __m512 *least)
{
	const unsigned n = k->n;
	const __m512 zero = _mm512_setzero_ps();
	float tops[16], lows[16];
	__m512 lov[4], inv[4];

	for (unsigned h = hn; h < 4; h++)
		top[h] = least[h] = zero;
	_mm512_storeu_ps(tops, max_of4(top[0], top[1], top[2], top[3]));
	_mm512_storeu_ps(lows, max_of4(_mm512_sub_ps(zero, least[0]), _mm512_sub_ps(zero, least[1]),
				       _mm512_sub_ps(zero, least[2]), _mm512_sub_ps(zero, least[3])));
#pragma GCC unroll 4
	for (unsigned h = 0; h < hn; h++) {
		const float t = tops[4 * h], lo = n ? 0.0f - lows[4 * h] : 0.0f;

		lov[h] = _mm512_set1_ps(lo), inv[h] = _mm512_set1_ps(kvp_weight_inv_u8(t - lo));
		k->f[h] = (t - lo) / (2.0f * KVP_WEIGHT_MAX_U8), k->e[h] = lo * 0.5f;
	}
#pragma GCC unroll 4
	for (unsigned c = 0; c < ng; c++) {
		for (unsigned i = 0; i < n; i += 16) {
			const __mmask16 in = tail16(n - i < 16 ? n - i : 16);
			const __m512 sv = f16_at(in, (const uint8_t *)(sh + c * n), i);

#pragma GCC unroll 4
			for (unsigned h = 0; h < hn; h++)
				store_weights_u8(k->w8[h][c] + i, in, weight_u8_in(_mm512_maskz_loadu_ps(in, w + h * ws + i), sv),
						 lov[h], inv[h]);
		}
		for (unsigned h = 0; h < hn; h++)
			memset(k->w8[h][c] + n, 0, 4);
	}
}

/* Every head's z sums into acc (as axpy_i16_scaled's pass, the same bits), the largest and least u, then the
 * weights. zh: planar fp16, z(i, c) at zh[c * n + i] and s(i, c) at zh[(ng + c) * n + i]. Returns 0, having
 * written nothing, when a weight has its sign bit set. */
INLINE int u8_scaled_weights(unsigned hn, unsigned ng, struct u8_scaled *k, const float *w, size_t ws,
			      const uint16_t *zh, float *acc, size_t as)
{
	const unsigned n = k->n;
	const uint16_t *sh = zh + (size_t)ng * n;
	const __m512 half_levels = _mm512_set1_ps((float)((1u << k->bits) - 1) * 0.5f);
	const __m512 zero = _mm512_setzero_ps(), inf = _mm512_set1_ps(INFINITY);
	__m512 zsum[16], top[4], least[4];
	__m512i signs = _mm512_setzero_si512();
	float sums[16];

#pragma GCC unroll 16
	for (unsigned c = 0; c < 16; c++)
		zsum[c] = zero;
#pragma GCC unroll 4
	for (unsigned h = 0; h < hn; h++)
		top[h] = zero, least[h] = inf;
	for (unsigned i = 0; i < n; i += 16) {
		const __mmask16 in = tail16(n - i < 16 ? n - i : 16);
		__m512 wv[4];
#pragma GCC unroll 4
		for (unsigned h = 0; h < hn; h++) {
			wv[h] = _mm512_maskz_loadu_ps(in, w + h * ws + i);
			signs = _mm512_or_si512(signs, _mm512_castps_si512(wv[h]));
		}
#pragma GCC unroll 4
		for (unsigned c = 0; c < ng; c++) {
			const __m512 sv = f16_at(in, (const uint8_t *)(sh + c * n), i);
			/* z + s * L / 2: the codes' centre (kernels.h) */
			const __m512 zc = _mm512_add_ps(f16_at(in, (const uint8_t *)(zh + c * n), i), _mm512_mul_ps(sv, half_levels));
#pragma GCC unroll 4
			for (unsigned h = 0; h < hn; h++) {
				const __m512 u = weight_u8_in(wv[h], sv);

				zsum[h * ng + c] = _mm512_add_ps(zsum[h * ng + c], _mm512_mul_ps(wv[h], zc));
				top[h] = _mm512_max_ps(u, top[h]);
				least[h] = _mm512_mask_min_ps(least[h], in, u, least[h]);
			}
		}
	}
	if (_mm512_test_epi32_mask(signs, _mm512_set1_epi32(INT32_MIN)))
		return 0;
	_mm512_storeu_ps(sums, hsum16(zsum));
	for (unsigned l = 0; l < 16; l++)
		if (hsum16_lane[l] < (int)(hn * ng))
			acc[hsum16_lane[l] / ng * as + k->m + hsum16_lane[l] % ng] += sums[l];
	u8_scaled_round(hn, ng, k, w, ws, sh, top, least);
	return 1;
}

/* Four rows' centred codes of 16 columns (register q of a chunk): the lookup's selection and shift, then the
 * table of 2 code - L (its period the codes' range, so the bits above a code need no mask). */
#define U8_CODES(q) _mm512_permutexvar_epi8(_mm512_multishift_epi64_epi8(shf##q, _mm512_permutexvar_epi8(sel##q, src)), tab)

/* Register q's codes v into the column sums c(q) and into each head's sums a(h)q, against the four rows'
 * weights of its group. */
#define U8_SCALED_HEADS(q, v)                                                                  \
	do {                                                                                   \
		c##q = _mm512_dpbusd_epi32(c##q, ones, v);                                     \
		a0##q = _mm512_dpbusd_epi32(a0##q, _mm512_set1_epi32(quad_at(wq##q + i)), v);     \
		if (hn > 1)                                                            \
			a1##q = _mm512_dpbusd_epi32(a1##q, _mm512_set1_epi32(quad_at(wq##q + U8_HEAD + i)), v); \
		if (hn > 2)                                                            \
			a2##q = _mm512_dpbusd_epi32(a2##q, _mm512_set1_epi32(quad_at(wq##q + 2 * U8_HEAD + i)), v); \
		if (hn > 3)                                                            \
			a3##q = _mm512_dpbusd_epi32(a3##q, _mm512_set1_epi32(quad_at(wq##q + 3 * U8_HEAD + i)), v); \
	} while (0)

#define U8_SCALED_STEP(src_expr, ones_expr)                      \
	do {                                                     \
		const __m512i src = (src_expr), ones = (ones_expr); \
		const __m512i v0 = U8_CODES(0), v1 = U8_CODES(1); \
                                                                 \
		U8_SCALED_HEADS(0, v0);                          \
		U8_SCALED_HEADS(1, v1);                          \
		if (nq > 2) {                                    \
			const __m512i v2 = U8_CODES(2), v3 = U8_CODES(3); \
			U8_SCALED_HEADS(2, v2);                  \
			U8_SCALED_HEADS(3, v3);                  \
		}                                                \
	} while (0)

/* hn <= 4 heads and the width (bits) constants once inlined: the chunks of columns, the runs inside them. */
INLINE void u8_scaled_heads(unsigned hn, unsigned bits, const struct u8_scaled *k, float *acc, size_t as,
			    const struct kvp_ahead *ahead)
{
	const unsigned cols = bits == 2 ? 64 : 32, nq = cols / 16, n = k->n, runs = (n + k->rows->run - 1) / k->rows->run;
	const unsigned steps = k->m / cols * runs;
	const size_t stride = k->rows->stride;
	const __m512i all4 = _mm512_set1_epi32(0x01010101), tab = _mm512_loadu_si512(k->centred);
	const __m512i sel0 = _mm512_loadu_si512(quad_select[bits][0]), shf0 = _mm512_loadu_si512(quad_shift[bits][0]);
	const __m512i sel1 = _mm512_loadu_si512(quad_select[bits][1]), shf1 = _mm512_loadu_si512(quad_shift[bits][1]);
	const __m512i sel2 = _mm512_loadu_si512(quad_select[bits][2]), shf2 = _mm512_loadu_si512(quad_shift[bits][2]);
	const __m512i sel3 = _mm512_loadu_si512(quad_select[bits][3]), shf3 = _mm512_loadu_si512(quad_shift[bits][3]);
	unsigned step = 0;

	for (unsigned j = 0; j < k->m; j += cols) {
		/* register q's columns j + 16q.. lie in one group: its weights' row for head 0, the others U8_HEAD on */
		const uint8_t *const wq0 = k->w8[0][j / k->gsize], *const wq1 = k->w8[0][(j + 16) / k->gsize];
		const uint8_t *const wq2 = nq > 2 ? k->w8[0][(j + 32) / k->gsize] : wq0;
		const uint8_t *const wq3 = nq > 2 ? k->w8[0][(j + 48) / k->gsize] : wq0;
		__m512i a00 = _mm512_setzero_si512(), a01 = a00, a02 = a00, a03 = a00;
		__m512i a10 = a00, a11 = a00, a12 = a00, a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00;
		__m512i a30 = a00, a31 = a00, a32 = a00, a33 = a00, c0 = a00, c1 = a00, c2 = a00, c3 = a00;

		for (unsigned r = 0, i0 = 0; i0 < n; r++, i0 += k->rows->run) {
			const uint8_t *codes = k->rows->code[r] + 4 * (size_t)k->ng;
			const unsigned end = n - i0 < k->rows->run ? n : i0 + k->rows->run, at = j * bits / 8;
			unsigned i = i0;

			kvp_ahead_share(ahead, step++, steps);
			for (; i + 4 <= end; i += 4)
				U8_SCALED_STEP(four_whole_rows(codes, stride, i - i0, at), all4);
			for (; i < end; i += 4)
				U8_SCALED_STEP(four_rows(codes, stride, i - i0, end - i0, at, 16),
					       _mm512_set1_epi32((int)(0x01010101u >> 8 * (4 - (end - i)))));
		}
		{
			const __m512i c[4] = { c0, c1, c2, c3 };

			add_quads(acc + j, cols, nq, k->f[0], k->e[0], a00, a01, a02, a03, c);
			if (hn > 1)
				add_quads(acc + as + j, cols, nq, k->f[1], k->e[1], a10, a11, a12, a13, c);
			if (hn > 2)
				add_quads(acc + 2 * as + j, cols, nq, k->f[2], k->e[2], a20, a21, a22, a23, c);
			if (hn > 3)
				add_quads(acc + 3 * as + j, cols, nq, k->f[3], k->e[3], a30, a31, a32, a33, c);
		}
	}
}

#undef U8_SCALED_STEP
#undef U8_SCALED_HEADS
#undef U8_CODES
#undef U8_HEAD

static int axpy_u8_scaled(unsigned bits, unsigned m, unsigned gsize, const struct kvp_row_runs *rows, unsigned g,
			  const float *w, size_t w_stride, float *acc, size_t acc_stride, const struct kvp_ahead *ahead)
{
	const unsigned ng = gsize ? (m + gsize - 1) / gsize : 0, n = rows->n;
	uint8_t w8[4][U8_SCALED_GROUPS][KVP_AXPY_I16_ROWS + 4] __attribute__((aligned(4)));
	uint16_t zh[2 * U8_SCALED_GROUPS * KVP_AXPY_I16_ROWS]; /* fp16: the frame stays small (tests/test_stack.c) */
	struct u8_scaled k = { bits, m, gsize, ng, n, rows, w8, { 0 }, { 0 }, { 0 } };
	int took = 1;

	if ((bits != 2 && bits != 4) || !gsize || gsize % 16 || m % 64 || ng > U8_SCALED_GROUPS || n > KVP_AXPY_I16_ROWS ||
	    rows->run % KVP_RUN_ROWS || signed_past_four(g, n, w, w_stride))
		return 0;
	for (unsigned b = 0; b < 64; b++)
		k.centred[b] = (int8_t)kvp_centred_code(b & ((1u << bits) - 1), bits);
	for (unsigned r = 0, i0 = 0; i0 < n; r++, i0 += rows->run)
		gather_scalars(2 * ng, n - i0 < rows->run ? n - i0 : rows->run, rows->code[r], rows->stride, NULL, zh + i0, n);
	for (unsigned h0 = 0; took && h0 < g; h0 += 4) {
		const unsigned hn = g - h0 < 4 ? g - h0 : 4;
		const float *wh = w + h0 * w_stride;
		float *ah = acc + h0 * acc_stride;

		/* both counts constants in each case: the sums, maxima and least stay in registers */
#define U8_WEIGHTS(hn, ng) took = u8_scaled_weights(hn, ng, &k, wh, w_stride, zh, ah, acc_stride)
#define U8_WEIGHTS_NG(hn) \
	switch (ng) { \
	case 4: U8_WEIGHTS(hn, 4); break; \
	case 3: U8_WEIGHTS(hn, 3); break; \
	case 2: U8_WEIGHTS(hn, 2); break; \
	default: U8_WEIGHTS(hn, 1); break; \
	}
#define U8_HEADS(hn) \
	if (took && bits == 2) \
		u8_scaled_heads(hn, 2, &k, ah, acc_stride, h0 ? NULL : ahead); \
	else if (took) \
		u8_scaled_heads(hn, 4, &k, ah, acc_stride, h0 ? NULL : ahead);
		switch (hn) {
		case 4: U8_WEIGHTS_NG(4); U8_HEADS(4); break;
		case 3: U8_WEIGHTS_NG(3); U8_HEADS(3); break;
		case 2: U8_WEIGHTS_NG(2); U8_HEADS(2); break;
		default: U8_WEIGHTS_NG(1); U8_HEADS(1); break;
		}
#undef U8_HEADS
#undef U8_WEIGHTS_NG
#undef U8_WEIGHTS
	}
	return took;
}

/*
 * fwht's stages within 16 values, in one register: each lane meets its partner (lane ^ h) by a permute,
 * a lane with bit h clear keeps self + partner, one with it set partner - self: the sums of the definition.
 */
INLINE __m512 fwht_step(__m512 x, __m512 partner, __mmask16 high)
{
	return _mm512_mask_sub_ps(_mm512_add_ps(x, partner), high, partner, x);
}

static void fwht_blocks16(unsigned p, float *v)
{
	for (unsigned i = 0; i < p; i += 16) {
		__m512 x = _mm512_loadu_ps(v + i);

		x = fwht_step(x, _mm512_permute_ps(x, 0xb1), 0xaaaa);
		x = fwht_step(x, _mm512_permute_ps(x, 0x4e), 0xcccc);
		x = fwht_step(x, _mm512_shuffle_f32x4(x, x, 0xb1), 0xf0f0);
		x = fwht_step(x, _mm512_shuffle_f32x4(x, x, 0x4e), 0xff00);
		_mm512_storeu_ps(v + i, x);
	}
}

#define KVP_ISA_FWHT
#define KVP_ISA_SOFTMAX_GROUP

/*
 * TurboQuant's encoder. sym_codes: sixteen values per step, each threshold one compare and one masked
 * increment; a value <= 0 counts thresholds at or below |y|, and its code mirrors. Codes go to bytes, and BMI2 pext gathers the low `bits` of eight bytes at a time.
 */
INLINE void sym_codes_width(unsigned bits, unsigned m, const float *y, const int32_t *t, uint8_t *out)
{
	const int32_t half = 1 << (bits - 1);
	const uint64_t low = 0x0101010101010101ull * ((1u << bits) - 1);
	const __m512i magnitude = _mm512_set1_epi32(0x7fffffff), one = _mm512_set1_epi32(1);
	const __m512i below_max = _mm512_set1_epi32(0x7ffffffe);
	__m512i th[7];

	for (int32_t k = 0; k + 1 < half; k++)
		th[k] = _mm512_set1_epi32(t[k]);
	for (unsigned j = 0; j < m; j += 16, out += 2 * bits) {
		const __m512i u = _mm512_loadu_si512(y + j), a = _mm512_and_si512(u, magnitude);
		const __mmask16 pos = _mm512_cmpgt_epi32_mask(u, _mm512_setzero_si512());
		/* at or below zero a >= t is min(a, 2^31 - 2) + 1 > t: one compare per threshold for both */
		const __m512i b = _mm512_mask_add_epi32(a, (__mmask16)~pos, _mm512_min_epi32(a, below_max), one);
		__m512i cnt = _mm512_setzero_si512(), code;
		uint64_t w[2];

		for (int32_t k = 0; k + 1 < half; k++)
			cnt = _mm512_mask_add_epi32(cnt, _mm512_cmpgt_epi32_mask(b, th[k]), cnt, one);
		/* half + cnt above zero, half - 1 - cnt at or below */
		code = _mm512_mask_sub_epi32(_mm512_sub_epi32(_mm512_set1_epi32(half - 1), cnt), pos,
					     _mm512_set1_epi32(half), _mm512_sub_epi32(_mm512_setzero_si512(), cnt));
		_mm_storeu_si128((__m128i *)w, _mm512_cvtepi32_epi8(code));
		w[0] = _pext_u64(w[0], low), w[1] = _pext_u64(w[1], low);
		memcpy(out, &w[0], bits);
		memcpy(out + bits, &w[1], bits);
	}
}

/* Eight double lanes are the definition's eight running sums: each square is exact in double. */
static double sum_squares(unsigned m, const float *y)
{
	__m512d acc = _mm512_setzero_pd();
	double a[8];
	unsigned j = 0;

	for (; j + 8 <= m; j += 8) {
		const __m512d v = _mm512_cvtps_pd(_mm256_loadu_ps(y + j));
		acc = _mm512_add_pd(acc, _mm512_mul_pd(v, v));
	}
	_mm512_storeu_pd(a, acc);
	return kvp_sum_squares_end(a, j, m, y);
}

/*
 * spark_dot_i16_group (contract in kernels.h), sixteen rows at a time in three passes, each reading back from
 * memory only what a pass before it stored (a load that waits on a store just made, wider than itself,
 * stalls: that and the per-head sums cost about a quarter of the time before).
 * 1. z, two rows at a time (spark_z_pair): per 32 ranks, both rows' codes become bytes by the lookup above
 *    (in an order of its own), four vpdpbusd with +-1 patterns do two Hadamard stages while they widen,
 *    and vpackssdw gives two int16 registers (ranks 0..15 and 16..31, a row per 256-bit half). The other
 *    stages pair each lane with its partner through a rotation (port 0) or a shuffle (lanes with bit h set
 *    take partner - own, the others own + partner); at T = 64 the last is an add and a subtract across
 *    the halves' registers. Lanes of ranks >= T only ever meet each other. One multiply by sgn << shift
 *    per register; z is stored. Measured against the version before it (one row per register, the
 *    lookups widened and all stages done in int16): about 6% less time per row at d=128 and 9% at d=64.
 *    Tried and slower: the x pass's masks loaded from memory into mask registers instead of moved from
 *    general registers (+3-16%), ell broadcast as a dword from memory (+1.5%), the kept values by a plain
 *    load and a register expand instead of the expanding load (+1-3% at 32K tokens, 5 interleaved rounds).
 * 2. x: per 32 channels the pruned values (rho * ell by vpmulhrsw, which rounds as the contract does,
 *    negated where the pruned signs, placed by pdep, are set) take the kept values in the kept lanes by an
 *    expanding load from z (VBMI2), which reads as many ranks as the chunk keeps from the one it starts at.
 * 3. the products, with the heads in the lanes: each chunk of 8 channels of x is loaded broadcast to the
 *    four 128-bit lanes, and one vpdpwssd against the query's chunk (lane h: head h) adds four channel
 *    pairs to every head's sums; sixteen rows' sums become one vector per head at the end.
 * Rows with d a multiple of 32 up to 128 and at most 64 pruned channels; the rest go through loops.h's.
 */
static void loops_spark_dot_i16_group(const struct kvp_masked_codes *rc, unsigned n, const uint8_t *base,
				      const int16_t *ell, const float *row_scale, unsigned g, const int16_t *q,
				      size_t q_stride, const float *head_scale, float *out, size_t out_stride)
	__attribute__((noinline));

INLINE __m512i fwht_stage_i16(__m512i x, unsigned h)
{
	__m512i p;
	__mmask32 upper;

	switch (h) {
	case 1: p = _mm512_rol_epi32(x, 16), upper = 0xaaaaaaaau; break;
	case 2: p = _mm512_rol_epi64(x, 32), upper = 0xccccccccu; break;
	case 4: p = _mm512_shuffle_epi32(x, _MM_PERM_BADC), upper = 0xf0f0f0f0u; break;
	case 8: p = _mm512_shuffle_i64x2(x, x, _MM_SHUFFLE(2, 3, 0, 1)), upper = 0xff00ff00u; break;
	default: p = _mm512_shuffle_i64x2(x, x, _MM_SHUFFLE(1, 0, 3, 2)), upper = 0xffff0000u; break;
	}
	return _mm512_mask_sub_epi16(_mm512_add_epi16(x, p), upper, p, x);
}

/*
 * z two rows at a time, by vpdpbusd: per 32 ranks of both rows (one register of bytes), two Hadamard stages
 * (ranks' bits 2 and 4) are four dot products of four code bytes with +-1 each, which also widen, and the
 * other three within 32 ranks (bits 0, 1, 3) run in int16 on lanes, two of them by rotations (port 0); at
 * T = 64 the stage of bit 5 is one add and one subtract across the two halves' registers. The codes are
 * unpacked in an order of their own: byte i holds row i / 32's rank w + 4 (e & 1) + 8 (L & 1) + 16 (e >> 1)
 * of the 32 (dword 4L + w, byte e), so that vpackssdw of the two patterns of bit 2 gives lane 16 row + rank
 * (its lane L, then source, then dword w). Each qword of those bytes takes two runs of six codes of one row,
 * from four bytes each: the spread (vpermt2b over both rows' bytes, row b's from 64 on) and shift tables
 * below, as the shared ones above for this order. The bytes are the lookups + 128 (vpdpbusd multiplies
 * unsigned bytes), which the all-plus pattern's start value takes back out.
 */
#define SPARK_RANK(i) ((i) / 4 % 4 + 4 * ((i) % 2) + 8 * ((i) / 16 % 2) + 16 * ((i) % 4 / 2))
#define SPARK_FROM(b, Q, run) (64 * ((Q) / 4) + (2 * ((Q) % 2) + 8 * ((Q) / 2 % 2) + 16 * (run)) * (b) / 8)
#define SPARK_SPREAD(b, i) (char)(SPARK_FROM(b, (i) / 8, (i) % 8 / 4) + (i) % 4)
#define SPARK_SHIFT(b, i) \
	(char)(32 * ((i) % 4 / 2) + SPARK_RANK(i) * (b) - 8 * (SPARK_FROM(b, (i) / 8, (i) % 4 / 2) - 64 * ((i) / 32)))

static const char spark_spread_of[5][64] = { { 0 }, BYTES64(SPARK_SPREAD, 1), BYTES64(SPARK_SPREAD, 2),
					      BYTES64(SPARK_SPREAD, 3), BYTES64(SPARK_SPREAD, 4) };
static const char spark_shift_of[5][64] = { { 0 }, BYTES64(SPARK_SHIFT, 1), BYTES64(SPARK_SHIFT, 2),
					     BYTES64(SPARK_SHIFT, 3), BYTES64(SPARK_SHIFT, 4) };

/* pat[2R + s]: the +-1 of output bits 2 (s) and 4 (R) for byte e of a dword, 0 for a rank bit past T; start:
 * the all-plus pattern's bias, -128 per byte it adds. sgs[k]: sgn << shift of ranks 16k..16k+15 in both
 * halves (0 past T). */
struct spark_regs {
	__m512i spread, shifts, tab8, pat[4], start, sgs[4];
};

INLINE struct spark_regs spark_regs(unsigned T, const struct kvp_masked_codes *rc)
{
	const __m512i sg8 = _mm512_maskz_loadu_epi8(tail64(T), rc->sgn);
	const __m128i sh = _mm_cvtsi32_si128((int)rc->shift);
	const __m512i lo = _mm512_sll_epi16(_mm512_cvtepi8_epi16(_mm512_castsi512_si256(sg8)), sh);
	const __m512i hi = _mm512_sll_epi16(_mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(sg8, 1)), sh);
	struct spark_regs r;
	int used = 0;

	r.spread = _mm512_loadu_si512(spark_spread_of[rc->bits]);
	r.shifts = _mm512_loadu_si512(spark_shift_of[rc->bits]);
	r.tab8 = int_regs(rc->bits, rc->lut, NULL, 128).tab8;
	for (unsigned p = 0; p < 4; p++) {
		uint32_t w = 0;

		for (unsigned e = 0; e < 4; e++) {
			const int live = (!(e & 1) || T > 4) && (!(e >> 1) || T > 16);
			const int minus = ((e & 1) & p) ^ ((e >> 1) & (p >> 1));

			w |= (uint32_t)(uint8_t)(live ? (minus ? -1 : 1) : 0) << (8 * e);
			used += p == 0 && live;
		}
		r.pat[p] = _mm512_set1_epi32((int)w);
	}
	r.start = _mm512_set1_epi32(-128 * used);
	r.sgs[0] = _mm512_shuffle_i64x2(lo, lo, 0x44), r.sgs[1] = _mm512_shuffle_i64x2(lo, lo, 0xee);
	r.sgs[2] = _mm512_shuffle_i64x2(hi, hi, 0x44), r.sgs[3] = _mm512_shuffle_i64x2(hi, hi, 0xee);
	return r;
}

/* The 32-point transforms (T <= 32 points of them) of the codes of rows a and b from rank j on: lane 16 row +
 * rank of h[0] (ranks 0..15) and h[1] (ranks 16..31), unsigned and unshifted. */
INLINE void spark_h32_pair(unsigned T, const struct kvp_masked_codes *rc, const struct spark_regs *r,
			   __m512i ra, __m512i rb, unsigned j, __m512i h[2])
{
	static const unsigned lane_bits[3] = { 1, 2, 8 };
	/* the codes from rank j on start j * bits / 8 bytes into the rows' */
	const __m512i spread = j ? _mm512_add_epi8(r->spread, _mm512_set1_epi8((char)(j * rc->bits / 8))) : r->spread;
	const __m512i raw = _mm512_permutex2var_epi8(ra, spread, rb);
	const __m512i c8 = _mm512_permutexvar_epi8(_mm512_multishift_epi64_epi8(r->shifts, raw), r->tab8);
	const __m512i zero = _mm512_setzero_si512();

	h[0] = _mm512_packs_epi32(_mm512_dpbusd_epi32(r->start, c8, r->pat[0]), _mm512_dpbusd_epi32(zero, c8, r->pat[1]));
	h[1] = zero;
	if (T > 16)
		h[1] = _mm512_packs_epi32(_mm512_dpbusd_epi32(zero, c8, r->pat[2]), _mm512_dpbusd_epi32(zero, c8, r->pat[3]));
#pragma GCC unroll 3
	for (unsigned i = 0; i < 3; i++)
		if (lane_bits[i] < T) {
			h[0] = fwht_stage_i16(h[0], lane_bits[i]);
			if (T > 16)
				h[1] = fwht_stage_i16(h[1], lane_bits[i]);
		}
}

/* Ranks 16k..16k+15 of rows a and b (v's halves) to za and zb, sgn and shift applied. */
INLINE void spark_z_store(const struct spark_regs *r, unsigned k, __m512i v, int16_t *za, int16_t *zb)
{
	v = _mm512_mullo_epi16(v, r->sgs[k]);
	_mm256_store_si256((__m256i *)(void *)(za + 16 * k), _mm512_castsi512_si256(v));
	_mm256_store_si256((__m256i *)(void *)(zb + 16 * k), _mm512_extracti64x4_epi64(v, 1));
}

/* Rows a and b's z (their kept values by rank) to za and zb. */
INLINE void spark_z_pair(unsigned T, const struct kvp_masked_codes *rc, const struct spark_regs *r,
			 const uint8_t *a, const uint8_t *b, int16_t *za, int16_t *zb)
{
	const __mmask64 bytes = tail64((T * rc->bits + 7) / 8);
	const __m512i ra = _mm512_maskz_loadu_epi8(bytes, a + rc->code_at), rb = _mm512_maskz_loadu_epi8(bytes, b + rc->code_at);
	__m512i h[2], g[2];

	spark_h32_pair(T < 32 ? T : 32, rc, r, ra, rb, 0, h);
	if (T > 32) {
		spark_h32_pair(32, rc, r, ra, rb, 32, g);
		spark_z_store(r, 2, _mm512_sub_epi16(h[0], g[0]), za, zb);
		spark_z_store(r, 3, _mm512_sub_epi16(h[1], g[1]), za, zb);
		h[0] = _mm512_add_epi16(h[0], g[0]), h[1] = _mm512_add_epi16(h[1], g[1]);
	}
	spark_z_store(r, 0, h[0], za, zb);
	if (T > 16)
		spark_z_store(r, 1, h[1], za, zb);
}

/* n <= 8 bytes at p, zeros above them: plain loads for the shapes of their own (n a constant 4 or 8), where
 * a vector load and its moves to general registers took the two vector ports; a masked load otherwise. */
INLINE uint64_t spark_word(const uint8_t *p, unsigned n)
{
	uint64_t w = 0;

	if (__builtin_constant_p(n) && (n == 4 || n == 8)) {
		memcpy(&w, p, n);
		return w;
	}
	return (uint64_t)_mm_cvtsi128_si64(_mm_maskz_loadu_epi8((__mmask16)((1u << n) - 1), p));
}

/* A row's int16 x into x[0..D) (D and T constants once inlined, so every loop unrolls): per 32 channels the
 * pruned values, then the kept values from z in memory by an expanding load, which reads only as many as
 * the chunk keeps, from the rank the chunk starts at. z was stored rows earlier, not just before. */
INLINE void spark_x_chunks(unsigned D, unsigned T, const struct kvp_masked_codes *rc, const uint8_t *row, int16_t ell,
			const int16_t *z, int16_t *x)
{
	const __m512i zero = _mm512_setzero_si512(), ellv = _mm512_set1_epi16(ell);
	const unsigned P = D - T;
	uint64_t m[2], neg[2], sw;
	unsigned at = 0;

	{
		const uint64_t valid0 = D >= 64 ? ~(uint64_t)0 : ((uint64_t)1 << (D % 64)) - 1;
		const uint64_t valid1 = D >= 128 ? ~(uint64_t)0 : D > 64 ? ((uint64_t)1 << (D - 64)) - 1 : 0;
		unsigned p0;

		m[0] = spark_word(row + rc->mask_at, D / 8 < 8 ? D / 8 : 8);
		m[1] = D > 64 ? spark_word(row + rc->mask_at + 8, D / 8 - 8) : 0;
		sw = spark_word(row + rc->sign_at, (P + 7) / 8);
		p0 = (unsigned)__builtin_popcountll(~m[0] & valid0);
		neg[0] = _pdep_u64(sw, ~m[0] & valid0);
		neg[1] = D > 64 ? _pdep_u64(p0 < 64 ? sw >> p0 : 0, ~m[1] & valid1) : 0;
	}
	if ((unsigned)__builtin_popcountll(m[0] & (D >= 64 ? ~(uint64_t)0 : ((uint64_t)1 << (D % 64)) - 1)) +
		    (unsigned)__builtin_popcountll(D > 64 ? m[1] & (D >= 128 ? ~(uint64_t)0 : ((uint64_t)1 << (D - 64)) - 1) : 0) !=
	    T) {
		/* bytes the encoder never wrote: the row scores 0 */
		for (unsigned k = 0; k < D / 32; k++)
			_mm512_store_si512(x + 32 * k, zero);
		return;
	}
#pragma GCC unroll 4
	for (unsigned k = 0; k < D / 32; k++) {
		const __mmask32 keep = (__mmask32)(m[k / 2] >> (32 * (k & 1)));
		const __mmask32 minus = (__mmask32)(neg[k / 2] >> (32 * (k & 1)));
		__m512i v = _mm512_mulhrs_epi16(_mm512_loadu_si512(rc->rho + 32 * k), ellv);

		v = _mm512_mask_sub_epi16(v, minus, zero, v);
		_mm512_store_si512(x + 32 * k, _mm512_mask_expandloadu_epi16(v, keep, z + at));
		at += (unsigned)__builtin_popcount(keep);
	}
}

/*
 * The query of hn <= 4 heads with the heads in the lanes: chunk c (channels 8c..8c+7) is one register whose
 * 128-bit lane h holds head h's four channel pairs of the chunk (zeros for heads past hn), so that one
 * vpdpwssd against the row's chunk broadcast to every lane adds four pairs to each head's sums.
 */
INLINE void spark_query_lanes(unsigned hn, unsigned D, const int16_t *q, size_t qs, int16_t *qa)
{
	for (unsigned c = 0; c < D / 8; c++) {
		__m512i v = _mm512_setzero_si512();
		for (unsigned h = 0; h < hn; h++)
			v = _mm512_mask_broadcast_i32x4(v, (__mmask16)(0xfu << (4 * h)),
							_mm_loadu_si128((const __m128i *)(q + h * qs + 8 * c)));
		_mm512_store_si512(qa + 32 * c, v);
	}
}

/*
 * Sixteen rows' sums, A[t] holding row t's four partial sums per head (128-bit lane h: head h), become one
 * vector per head (lane t: row t): the partial sums are added pairwise while rows are interleaved (unpacks
 * of dwords, then of qwords), then the 128-bit lanes are transposed. 44 instructions for sixteen rows,
 * where one reduction per row and head took as many for four rows.
 */
INLINE void spark_sums_to_heads(const __m512i A[16], __m512i H[4])
{
	__m512i C[8], Dq[4], E[4];

	for (unsigned m = 0; m < 8; m++)
		C[m] = _mm512_add_epi32(_mm512_unpacklo_epi32(A[2 * m], A[2 * m + 1]),
					_mm512_unpackhi_epi32(A[2 * m], A[2 * m + 1]));
	for (unsigned m = 0; m < 4; m++)
		Dq[m] = _mm512_add_epi32(_mm512_unpacklo_epi64(C[2 * m], C[2 * m + 1]),
					 _mm512_unpackhi_epi64(C[2 * m], C[2 * m + 1]));
	E[0] = _mm512_shuffle_i32x4(Dq[0], Dq[1], 0x44), E[1] = _mm512_shuffle_i32x4(Dq[0], Dq[1], 0xee);
	E[2] = _mm512_shuffle_i32x4(Dq[2], Dq[3], 0x44), E[3] = _mm512_shuffle_i32x4(Dq[2], Dq[3], 0xee);
	H[0] = _mm512_shuffle_i32x4(E[0], E[2], 0x88), H[1] = _mm512_shuffle_i32x4(E[0], E[2], 0xdd);
	H[2] = _mm512_shuffle_i32x4(E[1], E[3], 0x88), H[3] = _mm512_shuffle_i32x4(E[1], E[3], 0xdd);
}

/* Eight int16 channels at p (16-byte aligned) in each of the four 128-bit lanes: a load, no shuffle. */
INLINE __m512i chunk_in_every_lane(const int16_t *p)
{
	return _mm512_broadcast_i32x4(_mm_load_si128((const __m128i *)(const void *)p));
}

/* Sixteen rows' sums per head (A[t], 128-bit lane h: head h): chunks outside, rows inside, so that a chunk's
 * four query registers are loaded once for the sixteen rows and every row's sums stay in a register. */
INLINE void spark_products(unsigned D, const int16_t *qa, const int16_t *xs, __m512i A[16])
{
#pragma GCC unroll 16
	for (unsigned t = 0; t < 16; t++)
		A[t] = _mm512_setzero_si512();
	for (unsigned k = 0; k < D / 32; k++) {
		const __m512i q0 = _mm512_load_si512(qa + 128 * k), q1 = _mm512_load_si512(qa + 128 * k + 32);
		const __m512i q2 = _mm512_load_si512(qa + 128 * k + 64), q3 = _mm512_load_si512(qa + 128 * k + 96);

#pragma GCC unroll 16
		for (unsigned t = 0; t < 16; t++) {
			const int16_t *x = xs + D * t + 32 * k;

			A[t] = _mm512_dpwssd_epi32(A[t], chunk_in_every_lane(x), q0);
			A[t] = _mm512_dpwssd_epi32(A[t], chunk_in_every_lane(x + 8), q1);
			A[t] = _mm512_dpwssd_epi32(A[t], chunk_in_every_lane(x + 16), q2);
			A[t] = _mm512_dpwssd_epi32(A[t], chunk_in_every_lane(x + 24), q3);
		}
	}
}

/* hn <= 4 heads; D and T constants once inlined; rows sixteen at a time, in the three passes above. */
INLINE void spark_heads(unsigned hn, unsigned D, unsigned T, const struct kvp_masked_codes *rc, unsigned n,
			const uint8_t *base, const int16_t *ell, const float *row_scale, const int16_t *q, size_t qs,
			const float *head_scale, float *out, size_t os)
{
	const struct spark_regs r = spark_regs(T, rc);
	int16_t qa[16 * 32] __attribute__((aligned(64))), xs[16 * 128] __attribute__((aligned(64)));
	int16_t zs[16 * 64] __attribute__((aligned(64)));

	spark_query_lanes(hn, D, q, qs, qa);
	for (unsigned i0 = 0; i0 < n; i0 += 16) {
		const unsigned rows = n - i0 < 16 ? n - i0 : 16;
		__m512i A[16], H[4];

		/* every row's z, then every row's x, then the products: what a step reads back from memory was
		 * stored rows earlier, never just before (a load waiting on a recent wider store stalls) */
		for (unsigned t = 0; t < rows; t += 2) {
			const uint8_t *a = base + (size_t)(i0 + t) * rc->stride;

			/* an odd last row pairs with itself */
			spark_z_pair(T, rc, &r, a, t + 1 < rows ? a + rc->stride : a, zs + 64 * t, zs + 64 * (t + 1));
		}
		for (unsigned t = 0; t < rows; t++)
			spark_x_chunks(D, T, rc, base + (size_t)(i0 + t) * rc->stride, ell[i0 + t], zs + 64 * t, xs + D * t);
		if (rows < 16) /* the missing rows' sums are never stored; zeros keep them defined */
			memset(xs + D * rows, 0, sizeof(int16_t) * D * (16 - rows));
		spark_products(D, qa, xs, A);
		spark_sums_to_heads(A, H);
		for (unsigned h = 0; h < hn; h++) {
			const __mmask16 keep = tail16(rows);
			__m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(H[h]), _mm512_set1_ps(head_scale[h])),
						 _mm512_maskz_loadu_ps(keep, row_scale + i0));
			_mm512_mask_storeu_ps(out + h * os + i0, keep, v);
		}
	}
}

/* The heads of a group four at a time (the last ones fewer: their lanes multiply zeros), for one shape. */
INLINE void spark_shape(unsigned D, unsigned T, const struct kvp_masked_codes *rc, unsigned n, const uint8_t *base,
			const int16_t *ell, const float *row_scale, unsigned g, const int16_t *q, size_t q_stride,
			const float *head_scale, float *out, size_t out_stride)
{
	for (unsigned h = 0; h < g; h += 4)
		spark_heads(g - h < 4 ? g - h : 4, D, T, rc, n, base, ell, row_scale, q + h * q_stride, q_stride,
			    head_scale + h, out + h * out_stride, out_stride);
}

/* The two shapes of SparK at keep=0.5 (d=128 and d=64) get loops of their own; other shapes in reach of the
 * registers take the same code with the sizes at run time. */
static void spark_dot_i16_group(const struct kvp_masked_codes *rc, unsigned n, const uint8_t *base,
				const int16_t *ell, const float *row_scale, unsigned g, const int16_t *q,
				size_t q_stride, const float *head_scale, float *out, size_t out_stride)
{
	if (rc->d % 32 || rc->d > 128 || rc->d - rc->kept > 64)
		loops_spark_dot_i16_group(rc, n, base, ell, row_scale, g, q, q_stride, head_scale, out, out_stride);
	else if (rc->d == 128 && rc->kept == 64)
		spark_shape(128, 64, rc, n, base, ell, row_scale, g, q, q_stride, head_scale, out, out_stride);
	else if (rc->d == 64 && rc->kept == 32)
		spark_shape(64, 32, rc, n, base, ell, row_scale, g, q, q_stride, head_scale, out, out_stride);
	else
		spark_shape(rc->d, rc->kept, rc, n, base, ell, row_scale, g, q, q_stride, head_scale, out, out_stride);
}

/*
 * spark_choose (contract in kernels.h) for d <= 256, the plain code beyond: the keys stay in up to sixteen
 * registers through the bit-by-bit search (a compare and a popcount per sixteen keys and bit, where the plain
 * loop took a pass over memory), and the masks it leaves give the rest: ties dropped from the top by clearing
 * mask bits, the pruned signs by pext of the sign bits, the kept values by vcompressps, and the pruned
 * scores summed in eight double lanes in the plain code's order.
 */
#define CHOOSE_VECTORS 16

INLINE unsigned count_at_least16(unsigned nv, const __m512i *k, int32_t cand)
{
	const __m512i c = _mm512_set1_epi32(cand);
	unsigned n = 0;

#pragma GCC unroll 16
	for (unsigned v = 0; v < CHOOSE_VECTORS; v++)
		if (v < nv)
			n += (unsigned)__builtin_popcount(_mm512_cmpge_epi32_mask(k[v], c));
	return n;
}

static double spark_choose(unsigned d, unsigned kept, const int32_t *key, const float *x, uint8_t *mask,
			   uint8_t *signs, float *y)
{
	const unsigned nv = (d + 15) / 16;
	__m512i k[CHOOSE_VECTORS];
	__mmask16 keep[CHOOSE_VECTORS];
	__m512d acc = _mm512_setzero_pd();
	uint8_t sign_bytes[CHOOSE_VECTORS * 2 + 4] = { 0 };
	double a[8];
	unsigned above = 0, ties, r = 0, n = 0;
	int32_t t = 0;

	if (d > 16 * CHOOSE_VECTORS)
		return kvp_spark_choose_plain(d, kept, key, x, mask, signs, y);
	/* lanes past d load as 0, which no candidate (>= 1) counts */
	for (unsigned v = 0; v < nv; v++)
		k[v] = _mm512_maskz_loadu_epi32(tail16(d - 16 * v < 16 ? d - 16 * v : 16), key + 16 * v);
	for (int b = 30; b >= 0; b--) {
		const int32_t cand = t | (int32_t)1 << b;
		const unsigned c = count_at_least16(nv, k, cand);

		if (c >= kept) {
			t = cand;
			if (c == kept)
				break;
		}
	}
	for (unsigned v = 0; v < nv; v++) {
		const __mmask16 in = tail16(d - 16 * v < 16 ? d - 16 * v : 16);

		keep[v] = _mm512_mask_cmpge_epi32_mask(in, k[v], _mm512_set1_epi32(t));
		above += (unsigned)__builtin_popcount(_mm512_mask_cmpgt_epi32_mask(in, k[v], _mm512_set1_epi32(t)));
	}
	/* of the keys equal to t, the lowest channels' stay: the others' bits are cleared from the top */
	ties = kept - above;
	for (unsigned v = 0; v < nv; v++) {
		const __mmask16 in = tail16(d - 16 * v < 16 ? d - 16 * v : 16);
		unsigned eq = _mm512_mask_cmpeq_epi32_mask(in, k[v], _mm512_set1_epi32(t));

		while (eq) {
			const unsigned low = eq & -eq;

			if (ties)
				ties--;
			else
				keep[v] = (__mmask16)(keep[v] & ~low);
			eq &= eq - 1;
		}
	}
	for (unsigned v = 0; v < nv; v++) {
		const unsigned live = d - 16 * v < 16 ? d - 16 * v : 16;
		const __mmask16 in = tail16(live), pruned = (__mmask16)(~keep[v] & in);
		const __m512 xv = _mm512_maskz_loadu_ps(in, x + 16 * v);
		const __m512 sv = _mm512_maskz_mov_ps(pruned, _mm512_castsi512_ps(k[v]));
		const unsigned np = (unsigned)__builtin_popcount(pruned), nk = live - np;
		const uint32_t sb = (uint32_t)_pext_u32(_mm512_movepi32_mask(_mm512_castps_si512(xv)), pruned);
		uint32_t w;

		/* mask bytes: two per vector, one for a last vector of at most eight channels */
		mask[2 * v] = (uint8_t)keep[v];
		if (live > 8)
			mask[2 * v + 1] = (uint8_t)(keep[v] >> 8);
		memcpy(&w, sign_bytes + r / 8, sizeof w);
		w |= sb << (r % 8);
		memcpy(sign_bytes + r / 8, &w, sizeof w);
		r += np;
		_mm512_mask_storeu_ps(y + n, tail16(nk), _mm512_mask_compress_ps(_mm512_castsi512_ps(opaque_zero()), keep[v], xv));
		n += nk;
		/* whole groups of eight in their lanes; a last group shorter than eight, channel by channel into a0 */
		if (16 * v + 8 <= (d & ~7u))
			acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_castps512_ps256(sv)));
		if (16 * v + 16 <= (d & ~7u))
			acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_extractf32x8_ps(sv, 1)));
	}
	if (signs)
		memcpy(signs, sign_bytes, (d - kept + 7) / 8);
	_mm512_storeu_pd(a, acc);
	return kvp_spark_pruned_sum(d, key, mask, a);
}

#undef CHOOSE_VECTORS

/*
 * mask_codes (contract in kernels.h) for d a multiple of 64, the plain code otherwise. Per 64 channels: the
 * magnitudes of the block's kept channels spread one to a byte (a vpermb gives qword Q the bytes of fields
 * 8Q..8Q+7, vpmultishiftqb brings each field to its byte's low bits), vpexpandb places them in the kept
 * lanes, two masked adds make the codes, and a shift, an or and vpmovwb pack them two to a byte. Hot rows
 * cost (Zen 5 VM) 1.25 ns at d=64 and 2.55 ns at d=128 (keep=0.5, 2-bit magnitudes): 2.47 and 5.1 before
 * vpexpandb merged into opaque_zero and d=128 had a loop of its own. Fusing the codes into the lookups
 * instead (each row's looked-up bytes in registers, a 16 x 16 transpose, vpdpbusd: dot_i8_tiles' shape)
 * was slower than these rows and dot_i8_rows16 together: 6.1 against 3.5 ns a row at d=64, four heads.
 */
#define MAG_BYTE(mb, i) (char)((i) / 8 * (mb) + (i) % 8)
#define MAG_SHIFT(mb, i) (char)((i) % 8 * (mb))
#define MAG_BYTES8(f, mb, i) f(mb, i), f(mb, i + 1), f(mb, i + 2), f(mb, i + 3), f(mb, i + 4), f(mb, i + 5), \
	f(mb, i + 6), f(mb, i + 7)
#define MAG_BYTES64(f, mb) { MAG_BYTES8(f, mb, 0), MAG_BYTES8(f, mb, 8), MAG_BYTES8(f, mb, 16), MAG_BYTES8(f, mb, 24), \
	MAG_BYTES8(f, mb, 32), MAG_BYTES8(f, mb, 40), MAG_BYTES8(f, mb, 48), MAG_BYTES8(f, mb, 56) }
static const char mag_pick[3][64] = { { 0 }, MAG_BYTES64(MAG_BYTE, 1), MAG_BYTES64(MAG_BYTE, 2) };
static const char mag_shift[3][64] = { { 0 }, MAG_BYTES64(MAG_SHIFT, 1), MAG_BYTES64(MAG_SHIFT, 2) };
/* byte e takes field e of one qword (fields past the qword's 64 bits wrap, and are never expanded) */
#define MAG_FLAT(mb, i) (char)((i) * (mb) % 64)
static const char mag_flat[3][64] = { { 0 }, MAG_BYTES64(MAG_FLAT, 1), MAG_BYTES64(MAG_FLAT, 2) };

/* Magnitudes r..r+63 (mb of 1 or 2 bits) a byte each; fields past the row's `bytes` magnitude bytes read 0. */
INLINE __m512i mag_spread(unsigned mb, const uint8_t *mag, unsigned r, unsigned bytes)
{
	const unsigned at = r * mb / 8, sh = r * mb % 8, left = bytes > at ? bytes - at : 0;
	const unsigned nb = left < 8 * mb + 1 ? left : 8 * mb + 1;
	__m512i v = _mm512_maskz_loadu_epi8(tail64(nb), mag + at);

	v = _mm512_permutexvar_epi8(_mm512_loadu_si512(mag_pick[mb]), v);
	v = _mm512_multishift_epi64_epi8(_mm512_add_epi8(_mm512_loadu_si512(mag_shift[mb]), _mm512_set1_epi8((char)sh)), v);
	return _mm512_and_si512(v, _mm512_set1_epi8((char)((1u << mb) - 1)));
}

INLINE uint64_t load_u64(const uint8_t *p)
{
	uint64_t v;

	memcpy(&v, p, sizeof v);
	return v;
}

/* The codes of 64 channels with keep mask `keep` and signs `neg`, whose kept magnitudes are the bytes of v
 * in order, packed two to a byte into out. */
INLINE void codes64(__mmask64 keep, __mmask64 neg, __m512i v, uint8_t *out)
{
	__m512i c = _mm512_mask_expand_epi8(opaque_zero(), keep, v);

	c = _mm512_mask_add_epi8(c, keep, c, _mm512_set1_epi8(1));
	c = _mm512_mask_add_epi8(c, neg, c, _mm512_set1_epi8(8));
	c = _mm512_or_si512(c, _mm512_srli_epi16(c, 4));
	_mm256_storeu_si256((__m256i *)(void *)out, _mm512_cvtepi16_epi8(c));
}

/* One block of 64 channels with at most 64 bits of magnitudes (d = 64, kept * mb <= 64, the shape of keep=0.5
 * at d=64): one broadcast of them and one vpmultishiftqb spread every field. */
static __attribute__((noinline)) void mask_codes64(const struct kvp_mask_rows *rows, unsigned n, const uint8_t *base,
						   uint8_t *codes)
{
	/* the shape in locals: the stores to codes could alias *rows, which would be read again per row */
	const struct kvp_mask_rows r = *rows;
	const unsigned bytes = (r.kept * r.mb + 7) / 8;
	const __m512i shift = _mm512_loadu_si512(mag_flat[r.mb]), low = _mm512_set1_epi8((char)((1u << r.mb) - 1));
	const __mmask16 live = (__mmask16)((1u << bytes) - 1);

	for (unsigned i = 0; i < n; i++, base += r.stride, codes += 32) {
		const uint64_t keep = load_u64(base + r.mask_at);
		const __m512i mag = _mm512_broadcastq_epi64(_mm_maskz_loadu_epi8(live, base + r.mag_at));

		if ((unsigned)__builtin_popcountll(keep) != r.kept)
			memset(codes, 0xff, 32);
		else
			codes64(keep, load_u64(base + r.sign_at), _mm512_and_si512(_mm512_multishift_epi64_epi8(shift, mag), low),
				codes);
	}
}

/* d a multiple of 64: rows of at most 64 kept channels (keep=0.5 at d=64 and d=128) spread their magnitudes
 * once and each block takes them from its first field on (one more vpermb); longer rows spread each block's
 * from memory. */
static __attribute__((noinline)) void mask_codes_blocks(const struct kvp_mask_rows *rows, unsigned n,
							const uint8_t *base, uint8_t *codes)
{
	const struct kvp_mask_rows rs = *rows; /* the stores to codes could alias *rows */
	const unsigned d = rs.d, mb = rs.mb, bytes = (rs.kept * mb + 7) / 8, once = rs.kept <= 64;
	const __m512i from = _mm512_loadu_si512(iota);

	for (unsigned i = 0; i < n; i++) {
		const uint8_t *row = base + (size_t)i * rs.stride;
		uint8_t *out = codes + (size_t)i * (d / 2);
		const __m512i spread = mb && once ? mag_spread(mb, row + rs.mag_at, 0, bytes) : _mm512_setzero_si512();
		unsigned kept = 0, r = 0;

		for (unsigned b = 0; b < d / 64; b++)
			kept += (unsigned)__builtin_popcountll(load_u64(row + rs.mask_at + 8 * b));
		if (kept != rs.kept) {
			/* code 15 as codes64 writes it, not by memset: a call in the loop has its vectors spilled
			 * around it (5.3 against 3.0 ns a row at d=128) */
			for (unsigned b = 0; b < d / 64; b++)
				codes64(~0ull, ~0ull, _mm512_set1_epi8(6), out + 32 * b);
			continue;
		}
		for (unsigned b = 0; b < d / 64; b++) {
			const uint64_t keep = load_u64(row + rs.mask_at + 8 * b);
			__m512i v = spread;

			if (mb && !once)
				v = mag_spread(mb, row + rs.mag_at, r, bytes);
			else if (b)
				v = _mm512_permutexvar_epi8(_mm512_add_epi8(from, _mm512_set1_epi8((char)r)), spread);
			codes64(keep, load_u64(row + rs.sign_at + 8 * b), v, out + 32 * b);
			r += (unsigned)__builtin_popcountll(keep);
		}
	}
}

/* Two blocks of 64 channels keeping at most 64 (d = 128, keep=0.5's shape): mask_codes_blocks' once path
 * written out, its constants in registers (the general loop kept them on the stack: 5.1 against 2.55 ns a
 * row). */
static __attribute__((noinline)) void mask_codes128(const struct kvp_mask_rows *rows, unsigned n, const uint8_t *base,
						    uint8_t *codes)
{
	const struct kvp_mask_rows r = *rows; /* the stores to codes could alias *rows */
	const unsigned bytes = (r.kept * r.mb + 7) / 8;
	const __mmask64 live = tail64(bytes);
	const __m512i pick = _mm512_loadu_si512(mag_pick[r.mb]), shift = _mm512_loadu_si512(mag_shift[r.mb]);
	const __m512i low = _mm512_set1_epi8((char)((1u << r.mb) - 1)), from = _mm512_loadu_si512(iota);

	for (unsigned i = 0; i < n; i++, base += r.stride, codes += 64) {
		const uint64_t keep0 = load_u64(base + r.mask_at), keep1 = load_u64(base + r.mask_at + 8);
		const unsigned k0 = (unsigned)__builtin_popcountll(keep0);
		__m512i v = _mm512_permutexvar_epi8(pick, _mm512_maskz_loadu_epi8(live, base + r.mag_at));

		v = _mm512_and_si512(_mm512_multishift_epi64_epi8(shift, v), low);
		if (k0 + (unsigned)__builtin_popcountll(keep1) != r.kept) {
			codes64(~0ull, ~0ull, _mm512_set1_epi8(6), codes);
			codes64(~0ull, ~0ull, _mm512_set1_epi8(6), codes + 32);
			continue;
		}
		codes64(keep0, load_u64(base + r.sign_at), v, codes);
		codes64(keep1, load_u64(base + r.sign_at + 8),
			_mm512_permutexvar_epi8(_mm512_add_epi8(from, _mm512_set1_epi8((char)k0)), v), codes + 32);
	}
}

static void mask_codes(const struct kvp_mask_rows *rows, unsigned n, const uint8_t *base, uint8_t *codes)
{
	if (rows->mb > 2 || rows->d % 64)
		kvp_mask_codes_plain(rows, n, base, codes);
	else if (rows->d == 64 && rows->kept * rows->mb <= 64)
		mask_codes64(rows, n, base, codes);
	else if (rows->d == 128 && rows->kept <= 64)
		mask_codes128(rows, n, base, codes);
	else
		mask_codes_blocks(rows, n, base, codes);
}

#undef MAG_FLAT
#undef MAG_SHIFT
#undef MAG_BYTE

/* loops.h's integer lanes: sixteen int32 in a zmm register, and sixteen bytes widened into them */
#define LOOPS_LANES 16
typedef int32_t loops_i32v __attribute__((vector_size(64)));

INLINE loops_i32v loops_bytes(const uint8_t *p)
{
	return (loops_i32v)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(const void *)p));
}

#define KVP_ISA_SPARK
#define KVP_ISA_SPARK_CHOOSE
#define KVP_ISA_MASK_CODES
#define KVP_ISA_ENCODE
#define KVP_ISA_FUSED_LOOKUPS
#define KVP_ISA_AXPY_U8
#define KVP_ISA_NAME "avx512"
#define KVP_ISA_TABLE kvp_kernels_avx512
#include "kernels/loops.h"
