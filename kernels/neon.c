/*
 * NEON (AdvSIMD) kernels for aarch64, where AdvSIMD is architectural, so dispatch.c only double-checks
 * HWCAP. Conversions use fcvt, which rounds to nearest even and keeps NaN payloads under Linux's default
 * FPCR, matching base/half.c and F16C bit for bit. Tails shorter than a vector go through zero-padded
 * copies so no load runs past the caller's buffers. The loops that do not depend on the instruction set
 * (over heads, bit widths and rows) are in loops.h, included at the end. Two tables come out: neon (KIVI's
 * keys and values on int16 multiply-adds by lane), and neon-dotprod, the same but for the integer kernels
 * of TurboQuant's keys and KIVI's keys and values, which use sdot (Armv8.2 dot product).
 */
#if defined(__aarch64__)

#include <arm_neon.h>
#include <math.h>
#include <string.h>

#include "kernels/kernels.h"

static float32x4_t load_f16x4(const uint16_t *p)
{
	return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
}

/* k < 4 floats, zeros above */
static float32x4_t load_f32_tail(const float *p, unsigned k)
{
	float tmp[4] = { 0 };

	memcpy(tmp, p, k * sizeof *p);
	return vld1q_f32(tmp);
}

static float32x4_t load_f16_tail(const uint16_t *p, unsigned k)
{
	uint16_t tmp[4] = { 0 };

	memcpy(tmp, p, k * sizeof *p);
	return load_f16x4(tmp);
}

static void store_f32_tail(float *p, float32x4_t v, unsigned k)
{
	float tmp[4];

	vst1q_f32(tmp, v);
	memcpy(p, tmp, k * sizeof *p);
}

/* The four horizontal sums of a..d, in order, in one vector. */
static float32x4_t hsum4(float32x4_t a, float32x4_t b, float32x4_t c, float32x4_t d)
{
	return vpaddq_f32(vpaddq_f32(a, b), vpaddq_f32(c, d));
}

/*
 * Four rows per pass, two accumulators each: eight independent FMA chains cover the FMA latency of
 * current cores for the usual d = 64 or 128.
 */
static void dot_f32(unsigned d, unsigned n, const float *rows, const float *q, float scale, float *out)
{
	const unsigned d4 = d & ~3u, k = d & 3u;
	unsigned i = 0;

	for (; i + 4 <= n; i += 4) {
		const float *r0 = rows + (size_t)i * d, *r1 = r0 + d, *r2 = r1 + d, *r3 = r2 + d;
		float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0;
		float32x4_t b0 = a0, b1 = a0, b2 = a0, b3 = a0;
		unsigned j = 0;

		for (; j + 8 <= d; j += 8) {
			float32x4_t qa = vld1q_f32(q + j), qb = vld1q_f32(q + j + 4);

			a0 = vfmaq_f32(a0, vld1q_f32(r0 + j), qa);
			a1 = vfmaq_f32(a1, vld1q_f32(r1 + j), qa);
			a2 = vfmaq_f32(a2, vld1q_f32(r2 + j), qa);
			a3 = vfmaq_f32(a3, vld1q_f32(r3 + j), qa);
			b0 = vfmaq_f32(b0, vld1q_f32(r0 + j + 4), qb);
			b1 = vfmaq_f32(b1, vld1q_f32(r1 + j + 4), qb);
			b2 = vfmaq_f32(b2, vld1q_f32(r2 + j + 4), qb);
			b3 = vfmaq_f32(b3, vld1q_f32(r3 + j + 4), qb);
		}
		for (; j < d4; j += 4) {
			float32x4_t qa = vld1q_f32(q + j);

			a0 = vfmaq_f32(a0, vld1q_f32(r0 + j), qa);
			a1 = vfmaq_f32(a1, vld1q_f32(r1 + j), qa);
			a2 = vfmaq_f32(a2, vld1q_f32(r2 + j), qa);
			a3 = vfmaq_f32(a3, vld1q_f32(r3 + j), qa);
		}
		if (k) {
			float32x4_t qa = load_f32_tail(q + d4, k);

			a0 = vfmaq_f32(a0, load_f32_tail(r0 + d4, k), qa);
			a1 = vfmaq_f32(a1, load_f32_tail(r1 + d4, k), qa);
			a2 = vfmaq_f32(a2, load_f32_tail(r2 + d4, k), qa);
			a3 = vfmaq_f32(a3, load_f32_tail(r3 + d4, k), qa);
		}
		float32x4_t s = hsum4(vaddq_f32(a0, b0), vaddq_f32(a1, b1), vaddq_f32(a2, b2),
				      vaddq_f32(a3, b3));

		vst1q_f32(out + i, vmulq_n_f32(s, scale));
	}
	for (; i < n; i++) {
		const float *r = rows + (size_t)i * d;
		float32x4_t a = vdupq_n_f32(0.0f);

		for (unsigned j = 0; j < d4; j += 4)
			a = vfmaq_f32(a, vld1q_f32(r + j), vld1q_f32(q + j));
		if (k)
			a = vfmaq_f32(a, load_f32_tail(r + d4, k), load_f32_tail(q + d4, k));
		out[i] = scale * vaddvq_f32(a);
	}
}

/* ahead: see dot_f16_group in kernels.h */
static void dot_f16_ahead(unsigned d, unsigned n, const uint16_t *rows, const float *q, float scale,
			  float *out, const uint16_t *ahead)
{
	const unsigned d4 = d & ~3u, k = d & 3u;
	unsigned i = 0;

	for (; i + 4 <= n; i += 4) {
		const uint16_t *r0 = rows + (size_t)i * d, *r1 = r0 + d, *r2 = r1 + d, *r3 = r2 + d;
		float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0;
		float32x4_t b0 = a0, b1 = a0, b2 = a0, b3 = a0;
		unsigned j = 0;

		kvp_prefetch_span(ahead, (size_t)i * d * 2, (size_t)(i + 4) * d * 2);
		for (; j + 8 <= d; j += 8) {
			float32x4_t qa = vld1q_f32(q + j), qb = vld1q_f32(q + j + 4);

			a0 = vfmaq_f32(a0, load_f16x4(r0 + j), qa);
			a1 = vfmaq_f32(a1, load_f16x4(r1 + j), qa);
			a2 = vfmaq_f32(a2, load_f16x4(r2 + j), qa);
			a3 = vfmaq_f32(a3, load_f16x4(r3 + j), qa);
			b0 = vfmaq_f32(b0, load_f16x4(r0 + j + 4), qb);
			b1 = vfmaq_f32(b1, load_f16x4(r1 + j + 4), qb);
			b2 = vfmaq_f32(b2, load_f16x4(r2 + j + 4), qb);
			b3 = vfmaq_f32(b3, load_f16x4(r3 + j + 4), qb);
		}
		for (; j < d4; j += 4) {
			float32x4_t qa = vld1q_f32(q + j);

			a0 = vfmaq_f32(a0, load_f16x4(r0 + j), qa);
			a1 = vfmaq_f32(a1, load_f16x4(r1 + j), qa);
			a2 = vfmaq_f32(a2, load_f16x4(r2 + j), qa);
			a3 = vfmaq_f32(a3, load_f16x4(r3 + j), qa);
		}
		if (k) {
			float32x4_t qa = load_f32_tail(q + d4, k);

			a0 = vfmaq_f32(a0, load_f16_tail(r0 + d4, k), qa);
			a1 = vfmaq_f32(a1, load_f16_tail(r1 + d4, k), qa);
			a2 = vfmaq_f32(a2, load_f16_tail(r2 + d4, k), qa);
			a3 = vfmaq_f32(a3, load_f16_tail(r3 + d4, k), qa);
		}
		float32x4_t s = hsum4(vaddq_f32(a0, b0), vaddq_f32(a1, b1), vaddq_f32(a2, b2),
				      vaddq_f32(a3, b3));

		vst1q_f32(out + i, vmulq_n_f32(s, scale));
	}
	for (; i < n; i++) {
		const uint16_t *r = rows + (size_t)i * d;
		float32x4_t a = vdupq_n_f32(0.0f);

		for (unsigned j = 0; j < d4; j += 4)
			a = vfmaq_f32(a, load_f16x4(r + j), vld1q_f32(q + j));
		if (k)
			a = vfmaq_f32(a, load_f16_tail(r + d4, k), load_f32_tail(q + d4, k));
		out[i] = scale * vaddvq_f32(a);
	}
}

/* Columns outer, rows inner: a strip of 16 accumulators stays in registers across all n rows. */
static void axpy_f32(unsigned d, unsigned n, const float *rows, const float *w, float *acc)
{
	unsigned j = 0;

	for (; j + 16 <= d; j += 16) {
		float32x4_t a0 = vld1q_f32(acc + j), a1 = vld1q_f32(acc + j + 4);
		float32x4_t a2 = vld1q_f32(acc + j + 8), a3 = vld1q_f32(acc + j + 12);

		for (unsigned i = 0; i < n; i++) {
			const float *r = rows + (size_t)i * d + j;

			a0 = vfmaq_n_f32(a0, vld1q_f32(r), w[i]);
			a1 = vfmaq_n_f32(a1, vld1q_f32(r + 4), w[i]);
			a2 = vfmaq_n_f32(a2, vld1q_f32(r + 8), w[i]);
			a3 = vfmaq_n_f32(a3, vld1q_f32(r + 12), w[i]);
		}
		vst1q_f32(acc + j, a0);
		vst1q_f32(acc + j + 4, a1);
		vst1q_f32(acc + j + 8, a2);
		vst1q_f32(acc + j + 12, a3);
	}
	for (; j + 4 <= d; j += 4) {
		float32x4_t a = vld1q_f32(acc + j);

		for (unsigned i = 0; i < n; i++)
			a = vfmaq_n_f32(a, vld1q_f32(rows + (size_t)i * d + j), w[i]);
		vst1q_f32(acc + j, a);
	}
	if (j < d) {
		const unsigned k = d - j;
		float32x4_t a = load_f32_tail(acc + j, k);

		for (unsigned i = 0; i < n; i++)
			a = vfmaq_n_f32(a, load_f32_tail(rows + (size_t)i * d + j, k), w[i]);
		store_f32_tail(acc + j, a, k);
	}
}

/* Columns outer, rows inner, so ahead's bytes are spread over the strip loop's steps: step `it` asks
 * for bytes [it * share, (it + 1) * share) of the n * d halves. */
static void axpy_f16_ahead(unsigned d, unsigned n, const uint16_t *rows, const float *w, float *acc,
			   const uint16_t *ahead)
{
	const size_t steps = (size_t)(d / 16) * n, share = kvp_prefetch_share((size_t)n * d * 2, steps);
	unsigned j = 0;

	for (; j + 16 <= d; j += 16) {
		float32x4_t a0 = vld1q_f32(acc + j), a1 = vld1q_f32(acc + j + 4);
		float32x4_t a2 = vld1q_f32(acc + j + 8), a3 = vld1q_f32(acc + j + 12);

		for (unsigned i = 0; i < n; i++) {
			const uint16_t *r = rows + (size_t)i * d + j;
			const size_t it = (size_t)(j / 16) * n + i;

			kvp_prefetch_span(ahead, it * share, (it + 1) * share);
			a0 = vfmaq_n_f32(a0, load_f16x4(r), w[i]);
			a1 = vfmaq_n_f32(a1, load_f16x4(r + 4), w[i]);
			a2 = vfmaq_n_f32(a2, load_f16x4(r + 8), w[i]);
			a3 = vfmaq_n_f32(a3, load_f16x4(r + 12), w[i]);
		}
		vst1q_f32(acc + j, a0);
		vst1q_f32(acc + j + 4, a1);
		vst1q_f32(acc + j + 8, a2);
		vst1q_f32(acc + j + 12, a3);
	}
	for (; j + 4 <= d; j += 4) {
		float32x4_t a = vld1q_f32(acc + j);

		for (unsigned i = 0; i < n; i++)
			a = vfmaq_n_f32(a, load_f16x4(rows + (size_t)i * d + j), w[i]);
		vst1q_f32(acc + j, a);
	}
	if (j < d) {
		const unsigned k = d - j;
		float32x4_t a = load_f32_tail(acc + j, k);

		for (unsigned i = 0; i < n; i++)
			a = vfmaq_n_f32(a, load_f16_tail(rows + (size_t)i * d + j, k), w[i]);
		store_f32_tail(acc + j, a, k);
	}
}

/* Four heads per widened row chunk: the conversion is shared by the whole group (see kernels.h). */
static void dot_f16_heads4(unsigned d, unsigned n, const uint16_t *rows, const float *q, float scale,
			   float *out, const uint16_t *ahead)
{
	const unsigned d4 = d & ~3u, k = d & 3u;
	const float *q0 = q, *q1 = q + d, *q2 = q1 + d, *q3 = q2 + d;

	for (unsigned i = 0; i < n; i++) {
		const uint16_t *r = rows + (size_t)i * d;
		float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0, x, s;

		kvp_prefetch_span(ahead, (size_t)i * d * 2, (size_t)(i + 1) * d * 2);
		for (unsigned j = 0; j < d4; j += 4) {
			x = load_f16x4(r + j);
			a0 = vfmaq_f32(a0, x, vld1q_f32(q0 + j));
			a1 = vfmaq_f32(a1, x, vld1q_f32(q1 + j));
			a2 = vfmaq_f32(a2, x, vld1q_f32(q2 + j));
			a3 = vfmaq_f32(a3, x, vld1q_f32(q3 + j));
		}
		if (k) {
			x = load_f16_tail(r + d4, k);
			a0 = vfmaq_f32(a0, x, load_f32_tail(q0 + d4, k));
			a1 = vfmaq_f32(a1, x, load_f32_tail(q1 + d4, k));
			a2 = vfmaq_f32(a2, x, load_f32_tail(q2 + d4, k));
			a3 = vfmaq_f32(a3, x, load_f32_tail(q3 + d4, k));
		}
		s = vmulq_n_f32(hsum4(a0, a1, a2, a3), scale);
		out[i] = vgetq_lane_f32(s, 0);
		out[n + i] = vgetq_lane_f32(s, 1);
		out[2 * (size_t)n + i] = vgetq_lane_f32(s, 2);
		out[3 * (size_t)n + i] = vgetq_lane_f32(s, 3);
	}
}

/* ahead is spread over the strip loop's steps as in axpy_f16_ahead. */
static void axpy_f16_heads4(unsigned d, unsigned n, const uint16_t *rows, const float *w, float *acc,
			    const uint16_t *ahead)
{
	const unsigned d4 = d & ~3u, k = d & 3u;
	const float *w0 = w, *w1 = w + n, *w2 = w1 + n, *w3 = w2 + n;
	float *c0 = acc, *c1 = acc + d, *c2 = c1 + d, *c3 = c2 + d;
	const size_t steps = (size_t)(d / 4) * n, share = kvp_prefetch_share((size_t)n * d * 2, steps);

	for (unsigned j = 0; j < d4; j += 4) {
		float32x4_t a0 = vld1q_f32(c0 + j), a1 = vld1q_f32(c1 + j);
		float32x4_t a2 = vld1q_f32(c2 + j), a3 = vld1q_f32(c3 + j);

		for (unsigned i = 0; i < n; i++) {
			const size_t it = (size_t)(j / 4) * n + i;
			float32x4_t x = load_f16x4(rows + (size_t)i * d + j);

			kvp_prefetch_span(ahead, it * share, (it + 1) * share);
			a0 = vfmaq_n_f32(a0, x, w0[i]);
			a1 = vfmaq_n_f32(a1, x, w1[i]);
			a2 = vfmaq_n_f32(a2, x, w2[i]);
			a3 = vfmaq_n_f32(a3, x, w3[i]);
		}
		vst1q_f32(c0 + j, a0), vst1q_f32(c1 + j, a1), vst1q_f32(c2 + j, a2), vst1q_f32(c3 + j, a3);
	}
	if (k) {
		float32x4_t a0 = load_f32_tail(c0 + d4, k), a1 = load_f32_tail(c1 + d4, k);
		float32x4_t a2 = load_f32_tail(c2 + d4, k), a3 = load_f32_tail(c3 + d4, k);

		for (unsigned i = 0; i < n; i++) {
			float32x4_t x = load_f16_tail(rows + (size_t)i * d + d4, k);
			a0 = vfmaq_n_f32(a0, x, w0[i]);
			a1 = vfmaq_n_f32(a1, x, w1[i]);
			a2 = vfmaq_n_f32(a2, x, w2[i]);
			a3 = vfmaq_n_f32(a3, x, w3[i]);
		}
		store_f32_tail(c0 + d4, a0, k), store_f32_tail(c1 + d4, a1, k);
		store_f32_tail(c2 + d4, a2, k), store_f32_tail(c3 + d4, a3, k);
	}
}

static void f32_to_f16(size_t n, const float *x, uint16_t *y)
{
	size_t i = 0;

	for (; i + 4 <= n; i += 4)
		vst1_u16(y + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(x + i))));
	if (i < n) {
		const unsigned k = (unsigned)(n - i);
		uint16_t tmp[4];

		vst1_u16(tmp, vreinterpret_u16_f16(vcvt_f16_f32(load_f32_tail(x + i, k))));
		memcpy(y + i, tmp, k * sizeof *y);
	}
}

static void f16_to_f32(size_t n, const uint16_t *x, float *y)
{
	size_t i = 0;

	for (; i + 4 <= n; i += 4)
		vst1q_f32(y + i, load_f16x4(x + i));
	if (i < n) {
		const unsigned k = (unsigned)(n - i);

		store_f32_tail(y + i, load_f16_tail(x + i, k), k);
	}
}

/*
 * e^x for a vector; the same reduction and polynomial as avx2.c: x = n ln2 + r with |r| <= ln2/2,
 * e^r = 1 + r + r^2 p(r) with p a degree-4 least-squares fit (relative error 4e-9 before rounding),
 * times 2^n applied as two halves so subnormal results round once. x is clamped to [-104, 89]; vminq and
 * vmaxq return NaN for a NaN x, so NaN propagates.
 */
static float32x4_t exp_f32x4(float32x4_t x)
{
	x = vminq_f32(x, vdupq_n_f32(89.0f));
	x = vmaxq_f32(x, vdupq_n_f32(-104.0f));

	float32x4_t n = vrndnq_f32(vmulq_n_f32(x, 0x1.715476p+0f));
	float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0x1.62e4p-1f));   /* n * ln2_hi is exact */

	r = vfmsq_f32(r, n, vdupq_n_f32(0x1.7f7d1cp-20f));

	float32x4_t p = vdupq_n_f32(1.374882297e-03f);

	p = vfmaq_f32(vdupq_n_f32(8.369628340e-03f), p, r);
	p = vfmaq_f32(vdupq_n_f32(4.166964442e-02f), p, r);
	p = vfmaq_f32(vdupq_n_f32(1.666651219e-01f), p, r);
	p = vfmaq_f32(vdupq_n_f32(4.999998808e-01f), p, r);
	p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), vmulq_f32(r, r), p);

	int32x4_t ni = vcvtq_s32_f32(n);
	int32x4_t n1 = vshrq_n_s32(ni, 1);
	int32x4_t n2 = vsubq_s32(ni, n1);
	int32x4_t bias = vdupq_n_s32(127);
	float32x4_t s1 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(n1, bias), 23));
	float32x4_t s2 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(n2, bias), 23));

	return vmulq_f32(vmulq_f32(p, s1), s2);
}

/* fmaxf(a, b) for a that is not NaN: fmaxnm, which ignores a NaN operand */
static inline float max_keeping(float a, float b)
{
	return fmaxf(a, b);
}

/* The largest of a head's n scores times scale_by, written back scaled (and to raw unless NULL): loops.h's
 * softmax_step and softmax_group (KVP_ISA_SOFTMAX_GROUP) run it before exp_sum below. maxnm, like fmaxf,
 * ignores a NaN score. */
static inline float scaled_max(unsigned n, float scale_by, float *s, float *raw)
{
	const unsigned n4 = n & ~3u;
	float32x4_t vmax = vdupq_n_f32(-INFINITY);
	float mx;

	for (unsigned i = 0; i < n4; i += 4) {
		const float32x4_t x = vmulq_n_f32(vld1q_f32(s + i), scale_by);

		vst1q_f32(s + i, x);
		if (raw)
			vst1q_f32(raw + i, x);
		vmax = vmaxnmq_f32(vmax, x);
	}
	mx = vmaxnmvq_f32(vmax);
	for (unsigned i = n4; i < n; i++) {
		s[i] *= scale_by;
		if (raw)
			raw[i] = s[i];
		mx = fmaxf(mx, s[i]);
	}
	return mx;
}

/* s[i] = e^(s[i] - mx), returning their sum (four running sums, then across them). */
static inline float exp_sum(unsigned n, float mx, float *s)
{
	const unsigned n4 = n & ~3u, k = n & 3u;
	const float32x4_t vmx = vdupq_n_f32(mx);
	float32x4_t sum = vdupq_n_f32(0.0f);

	for (unsigned i = 0; i < n4; i += 4) {
		float32x4_t e = exp_f32x4(vsubq_f32(vld1q_f32(s + i), vmx));

		vst1q_f32(s + i, e);
		sum = vaddq_f32(sum, e);
	}
	if (k) {
		/* padding lanes are 0 - mx, not -inf: keep them out of the sum */
		float32x4_t e = exp_f32x4(vsubq_f32(load_f32_tail(s + n4, k), vmx));
		static const uint32_t keep[4][4] = {
			{ 0, 0, 0, 0 }, { ~0u, 0, 0, 0 }, { ~0u, ~0u, 0, 0 }, { ~0u, ~0u, ~0u, 0 },
		};

		e = vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(e), vld1q_u32(keep[k])));
		store_f32_tail(s + n4, e, k);
		sum = vaddq_f32(sum, e);
	}
	return vaddvq_f32(sum);
}

static void scale(unsigned d, float a, float *y)
{
	unsigned j = 0;

	for (; j + 4 <= d; j += 4)
		vst1q_f32(y + j, vmulq_n_f32(vld1q_f32(y + j), a));
	if (j < d) {
		const unsigned k = d - j;

		store_f32_tail(y + j, vmulq_n_f32(load_f32_tail(y + j, k), a), k);
	}
}

/*
 * Packed codes. Eight codes of b bits fill exactly b bytes, so the block of codes j..j+7 (j a multiple of
 * 8) is one little-endian word of b <= 4 bytes at byte j*b/8. The word is duplicated into two vectors of
 * four lanes, each lane shifted right by its own multiple of b (vshl by a negative count) and masked.
 * The lookup is a byte table lookup: the 16-entry float table is 64 bytes, and index i becomes the four
 * byte indices 4i..4i+3 of its lane (i * 0x04040404 + 0x03020100), so vqtbl4q gathers whole floats.
 * Always inlined into loops.h's switch on bits, so every width gets its own loop with constant shifts.
 */
#define INLINE static inline __attribute__((always_inline))

struct lut_regs {
	uint8x16x4_t tab;
	int32x4_t shift_lo, shift_hi;
	uint32x4_t mask;
};

INLINE struct lut_regs lut_regs(unsigned bits, const float *lut)
{
	float tab[16] = { 0 };
	struct lut_regs r;
	int b = (int)bits;
	const int32_t lo[4] = { 0, -b, -2 * b, -3 * b }, hi[4] = { -4 * b, -5 * b, -6 * b, -7 * b };

	memcpy(tab, lut, sizeof(float) << bits);
	for (unsigned k = 0; k < 4; k++)
		r.tab.val[k] = vld1q_u8((const uint8_t *)(tab + 4 * k));
	r.shift_lo = vld1q_s32(lo);
	r.shift_hi = vld1q_s32(hi);
	r.mask = vdupq_n_u32((1u << bits) - 1);
	return r;
}

INLINE float32x4_t lookup4(uint32x4_t idx, const struct lut_regs *r)
{
	uint32x4_t bytes = vmlaq_u32(vdupq_n_u32(0x03020100u), idx, vdupq_n_u32(0x04040404u));

	return vreinterpretq_f32_u8(vqtbl4q_u8(r->tab, vreinterpretq_u8_u32(bytes)));
}

/* The eight values of one block: lanes 0..3 in *lo, 4..7 in *hi. */
INLINE void lookup8(uint32_t word, const struct lut_regs *r, float32x4_t *lo, float32x4_t *hi)
{
	uint32x4_t v = vdupq_n_u32(word);

	*lo = lookup4(vandq_u32(vshlq_u32(v, r->shift_lo), r->mask), r);
	*hi = lookup4(vandq_u32(vshlq_u32(v, r->shift_hi), r->mask), r);
}

INLINE void lut_dot_bits(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			 const float *lut, const float *q, float *out)
{
	const struct lut_regs r = lut_regs(bits, lut);
	const unsigned m8 = m & ~7u, k = m & 7u, kbytes = (k * bits + 7) / 8;
	float qt[8] = { 0 };

	memcpy(qt, q + m8, k * sizeof *q); /* lanes past the tail may hold the next field's bits: q is 0 */
	for (unsigned i = 0; i < n; i++) {
		const uint8_t *row = codes + (size_t)i * stride;
		float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, lo, hi;

		for (unsigned j = 0; j < m8; j += 8) {
			lookup8(kvp_code_block(row, j, bits, m), &r, &lo, &hi);
			a0 = vfmaq_f32(a0, lo, vld1q_f32(q + j));
			a1 = vfmaq_f32(a1, hi, vld1q_f32(q + j + 4));
		}
		if (k) {
			lookup8(kvp_code_word(row + m8 * bits / 8, kbytes), &r, &lo, &hi);
			a0 = vfmaq_f32(a0, lo, vld1q_f32(qt));
			a1 = vfmaq_f32(a1, hi, vld1q_f32(qt + 4));
		}
		out[i] = vaddvq_f32(vaddq_f32(a0, a1));
	}
}

/* Columns outer in strips of 8, rows inner: the strip's sums stay in two registers. */
INLINE void lut_axpy_bits(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			  const float *lut, const float *w, float *acc)
{
	const struct lut_regs r = lut_regs(bits, lut);

	for (unsigned j = 0; j < m; j += 8) {
		const unsigned k = m - j < 8 ? m - j : 8, nbytes = (k * bits + 7) / 8;
		const uint8_t *col = codes + j * bits / 8;
		float tmp[8] = { 0 };
		float32x4_t a0, a1, lo, hi;

		memcpy(tmp, acc + j, k * sizeof *acc);
		a0 = vld1q_f32(tmp);
		a1 = vld1q_f32(tmp + 4);
		for (unsigned i = 0; i < n; i++) {
			if (k == 8)
				lookup8(kvp_code_block(codes + (size_t)i * stride, j, bits, m), &r, &lo, &hi);
			else
				lookup8(kvp_code_word(col + (size_t)i * stride, nbytes), &r, &lo, &hi);
			a0 = vfmaq_n_f32(a0, lo, w[i]);
			a1 = vfmaq_n_f32(a1, hi, w[i]);
		}
		vst1q_f32(tmp, a0);
		vst1q_f32(tmp + 4, a1);
		memcpy(acc + j, tmp, k * sizeof *acc);
	}
}

/* Four heads per looked-up block, as in avx2.c. */
INLINE void lut_dot_heads4(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			   const float *lut, const float *q, size_t qs, float *out)
{
	const struct lut_regs r = lut_regs(bits, lut);
	const unsigned m8 = m & ~7u, k = m & 7u, kbytes = (k * bits + 7) / 8;
	float qt[4][8] = { { 0 } };

	for (unsigned h = 0; h < 4; h++)
		memcpy(qt[h], q + h * qs + m8, k * sizeof *q); /* lanes past the tail: q is 0 */
	for (unsigned i = 0; i < n; i++) {
		const uint8_t *row = codes + (size_t)i * stride;
		float32x4_t a[4][2], lo, hi;

		for (unsigned h = 0; h < 4; h++)
			a[h][0] = a[h][1] = vdupq_n_f32(0.0f);
		for (unsigned j = 0; j < m8; j += 8) {
			lookup8(kvp_code_block(row, j, bits, m), &r, &lo, &hi);
			for (unsigned h = 0; h < 4; h++) {
				a[h][0] = vfmaq_f32(a[h][0], lo, vld1q_f32(q + h * qs + j));
				a[h][1] = vfmaq_f32(a[h][1], hi, vld1q_f32(q + h * qs + j + 4));
			}
		}
		if (k) {
			lookup8(kvp_code_word(row + m8 * bits / 8, kbytes), &r, &lo, &hi);
			for (unsigned h = 0; h < 4; h++) {
				a[h][0] = vfmaq_f32(a[h][0], lo, vld1q_f32(qt[h]));
				a[h][1] = vfmaq_f32(a[h][1], hi, vld1q_f32(qt[h] + 4));
			}
		}
		for (unsigned h = 0; h < 4; h++)
			out[h * (size_t)n + i] = vaddvq_f32(vaddq_f32(a[h][0], a[h][1]));
	}
}

INLINE void lut_axpy_heads4(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			    const float *lut, const float *w, float *acc, size_t as)
{
	const struct lut_regs r = lut_regs(bits, lut);

	for (unsigned j = 0; j < m; j += 8) {
		const unsigned k = m - j < 8 ? m - j : 8, nbytes = (k * bits + 7) / 8;
		const uint8_t *col = codes + j * bits / 8;
		float tmp[4][8] = { { 0 } };
		float32x4_t a[4][2], lo, hi;

		for (unsigned h = 0; h < 4; h++) {
			memcpy(tmp[h], acc + h * as + j, k * sizeof *acc);
			a[h][0] = vld1q_f32(tmp[h]);
			a[h][1] = vld1q_f32(tmp[h] + 4);
		}
		for (unsigned i = 0; i < n; i++) {
			if (k == 8)
				lookup8(kvp_code_block(codes + (size_t)i * stride, j, bits, m), &r, &lo, &hi);
			else
				lookup8(kvp_code_word(col + (size_t)i * stride, nbytes), &r, &lo, &hi);
			for (unsigned h = 0; h < 4; h++) {
				a[h][0] = vfmaq_n_f32(a[h][0], lo, w[h * (size_t)n + i]);
				a[h][1] = vfmaq_n_f32(a[h][1], hi, w[h * (size_t)n + i]);
			}
		}
		for (unsigned h = 0; h < 4; h++) {
			vst1q_f32(tmp[h], a[h][0]);
			vst1q_f32(tmp[h] + 4, a[h][1]);
			memcpy(acc + h * as + j, tmp[h], k * sizeof *acc);
		}
	}
}

/*
 * Masked rows, four channels (half a mask byte) per step. The nibble's entry of kvp_kernels_mask_below gives
 * each lane its place among the nibble's kept values; a table lookup over the bytes of the next four kept
 * values moves them into their lanes. A pruned lane's place among the pruned ones is its lane minus that,
 * which shifts its sign bit down. A bit select picks per lane.
 */
static void mask_expand_row(unsigned d, const uint8_t *mask, const uint8_t *sign, const float *v, float scale,
			    const float *mag, float *x)
{
	static const uint32_t lanes[4] = { 0, 1, 2, 3 }, bits[4] = { 1, 2, 4, 8 };
	const uint32x4_t lane = vld1q_u32(lanes), bit = vld1q_u32(bits);
	unsigned t = 0, r = 0, total = 0, sbytes;

	for (unsigned j = 0; j < d; j += 8)
		total += (unsigned)__builtin_popcount(mask[j >> 3] & ((1u << (d - j < 8 ? d - j : 8)) - 1));
	sbytes = (d - total + 7) / 8;
	for (unsigned j = 0; j < d; j += 4) {
		const unsigned k = d - j < 4 ? d - j : 4, m = (mask[j >> 3] >> (j & 4)) & ((1u << k) - 1);
		const unsigned nk = (unsigned)__builtin_popcount(m), np = k - nk;
		const uint32x4_t below = vmovl_u16(vget_low_u16(vmovl_u8(vcreate_u8(kvp_kernels_mask_below[m]))));
		const uint32x4_t keep = vtstq_u32(vdupq_n_u32(m), bit);
		/* byte b of lane l picks byte 4*below[l] + b of the kept values */
		const uint8x16_t pick = vreinterpretq_u8_u32(vmlaq_n_u32(vdupq_n_u32(0x03020100u), below, 0x04040404u));
		float32x4_t kv = t + 4 <= total ? vld1q_f32(v + t) : load_f32_tail(v + t, total - t);
		float32x4_t pv = vdupq_n_f32(0.0f);

		kv = vreinterpretq_f32_u8(vqtbl1q_u8(vreinterpretq_u8_f32(kv), pick));
		if (sign && np) {
			/* both bytes always, the second clamped into the field: no branch to mispredict */
			const unsigned b = r >> 3, b1 = b + 1 < sbytes ? b + 1 : b;
			unsigned w = (sign[b] | (unsigned)sign[b1] << 8) >> (r & 7);
			uint32x4_t s;

			s = vshlq_u32(vdupq_n_u32(w), vnegq_s32(vreinterpretq_s32_u32(vsubq_u32(lane, below))));
			s = vshlq_n_u32(s, 31);
			pv = vmulq_n_f32(k == 4 ? vld1q_f32(mag + j) : load_f32_tail(mag + j, k), scale);
			pv = vreinterpretq_f32_u32(veorq_u32(vreinterpretq_u32_f32(pv), s));
		}
		kv = vbslq_f32(keep, kv, pv);
		if (k == 4)
			vst1q_f32(x + j, kv);
		else
			store_f32_tail(x + j, kv, k);
		t += nk;
		r += np;
	}
}

/* Bands [0, returned) of one row, four at a time; vmulq, vaddq and vsqrtq round each step, as the scalar
 * reference does. */
INLINE unsigned band_norms_vector(unsigned F, int interleaved, const float *r, float *o)
{
	const unsigned F4 = F & ~3u;

	for (unsigned f = 0; f < F4; f += 4) {
		float32x4_t re, im;
		if (interleaved) {
			float32x4x2_t pair = vld2q_f32(r + 2 * f);
			re = pair.val[0];
			im = pair.val[1];
		} else {
			re = vld1q_f32(r + f);
			im = vld1q_f32(r + f + F);
		}
		vst1q_f32(o + f, vsqrtq_f32(vaddq_f32(vmulq_f32(re, re), vmulq_f32(im, im))));
	}
	return F4;
}

/*
 * Integer lookups. Sixteen codes (2 * bits bytes, one word) become one byte each: a byte table lookup
 * gives lane r the byte holding bit r*bits of the word, a per-lane shift (ushl by a negative count) brings
 * the code to bit 0, and a mask drops the next codes' bits. A 3-bit code may straddle two bytes, so at
 * that width the following byte, shifted left, supplies its top bits. The bytes then index a 16-byte
 * table by tbl: the int8 table for keys, and for values the low and the high bytes of the int16 table,
 * zipped back into int16. Always inlined into one function per width, so bits is a constant.
 */
struct int_regs {
	uint8x16_t pick, pick_next, mask;
	int8x16_t shift, shift_next;
	int8x16_t tab8;
	uint8x16_t tab16_lo, tab16_hi;
};

INLINE struct int_regs int_regs(unsigned bits, const int8_t *lut8, const int16_t *lut16)
{
	uint8_t pick[16], pick_next[16], tab16_lo[16] = { 0 }, tab16_hi[16] = { 0 };
	int8_t shift[16], shift_next[16], tab8[16] = { 0 };
	struct int_regs r;

	for (unsigned i = 0; i < 16; i++) {
		const unsigned bit = i * bits;

		pick[i] = (uint8_t)(bit / 8);
		pick_next[i] = (uint8_t)(bit / 8 + 1);
		shift[i] = (int8_t)-(int)(bit % 8);
		shift_next[i] = (int8_t)(8 - bit % 8); /* 8 (nothing straddles) shifts everything out */
	}
	for (unsigned v = 0; v < (1u << bits); v++) {
		tab8[v] = lut8 ? lut8[v] : 0;
		tab16_lo[v] = lut16 ? (uint8_t)((uint16_t)lut16[v] & 0xff) : 0;
		tab16_hi[v] = lut16 ? (uint8_t)((uint16_t)lut16[v] >> 8) : 0;
	}
	r.pick = vld1q_u8(pick);
	r.pick_next = vld1q_u8(pick_next);
	r.shift = vld1q_s8(shift);
	r.shift_next = vld1q_s8(shift_next);
	r.mask = vdupq_n_u8((uint8_t)((1u << bits) - 1));
	r.tab8 = vld1q_s8(tab8);
	r.tab16_lo = vld1q_u8(tab16_lo);
	r.tab16_hi = vld1q_u8(tab16_hi);
	return r;
}

/*
 * The word of the sixteen codes at p: 2 * bits bytes, little-endian like the vector lanes. At 3 bits, when
 * another whole chunk follows (more), one 8-byte load replaces a 4- and a 2-byte one; the two extra bytes
 * only ever reach pick_next lanes whose shift moves them above the mask.
 */
INLINE uint64_t chunk_word(const uint8_t *p, unsigned bits, int more)
{
	uint64_t w = 0;
	uint32_t lo;
	uint16_t hi;

	if (bits == 3 && more) {
		memcpy(&w, p, sizeof w);
	} else if (bits == 3) {
		/* two loads: gcc builds a 6-byte memcpy into a word through the stack */
		memcpy(&lo, p, sizeof lo);
		memcpy(&hi, p + 4, sizeof hi);
		w = lo | (uint64_t)hi << 32;
	} else {
		memcpy(&w, p, 2 * bits);
	}
	return w;
}

/* The last nbytes < 2 * bits bytes of a row, zeros above: nothing past the row's last byte is read. */
INLINE uint64_t tail_word(const uint8_t *p, unsigned nbytes)
{
	uint64_t w = 0;

	for (unsigned t = 0; t < nbytes; t++)
		w |= (uint64_t)p[t] << (8 * t);
	return w;
}

/* The sixteen codes of a word, one per byte (pick only names bytes 0-7 of x). */
INLINE uint8x16_t code_bytes(unsigned bits, uint64_t word, const struct int_regs *r)
{
	const uint8x16_t x = vcombine_u8(vcreate_u8(word), vdup_n_u8(0));
	uint8x16_t v = vshlq_u8(vqtbl1q_u8(x, r->pick), r->shift);

	if (bits == 3)
		v = vorrq_u8(v, vshlq_u8(vqtbl1q_u8(x, r->pick_next), r->shift_next));
	return vandq_u8(v, r->mask);
}

INLINE int8x16_t keys16(unsigned bits, uint64_t word, const struct int_regs *r)
{
	return vqtbl1q_s8(r->tab8, code_bytes(bits, word, r));
}

/* Built for the dot product; only the neon-dotprod table calls it, and dispatch.c only chooses that table
 * where HWCAP says the CPU has sdot. */
#if defined(__clang__)
#define DOTPROD_TARGET __attribute__((target("dotprod")))
#else
#define DOTPROD_TARGET __attribute__((target("arch=armv8.2-a+dotprod")))
#endif

/*
 * acc += the 16 products x*q, spread over acc's lanes (only the lanes' total is used), in one sdot. Not
 * always_inline: it is called from the loops shared with the plain version, whose plain instance has no
 * dotprod and may not inline it (nor, unoptimized, drop the call); dot_i8_core_dotprod is flatten
 * instead, which inlines it there. clang before 16 declares vdotq_s32 only when the whole file is built
 * for dotprod, hence asm there.
 */
DOTPROD_TARGET static inline int32x4_t sdot16(int32x4_t acc, int8x16_t x, int8x16_t q)
{
#if defined(__clang__) && !defined(__ARM_FEATURE_DOTPROD)
	__asm__("sdot %0.4s, %1.16b, %2.16b" : "+w"(acc) : "w"(x), "w"(q));
	return acc;
#else
	return vdotq_s32(acc, x, q);
#endif
}

/* The plain version sums two products in int16, exact because table entries lie in [-127, 127]:
 * |2 * 127 * -128| < 32768. */
INLINE int32x4_t mac16(int dotprod, int32x4_t acc, int8x16_t x, int8x16_t q)
{
	if (dotprod)
		return sdot16(acc, x, q);
	return vpadalq_s16(acc, vmlal_high_s8(vmull_s8(vget_low_s8(x), vget_low_s8(q)), x, q));
}

/*
 * hn <= 4 heads: each row's codes are looked up once, 32 per step, and multiplied into every head's two
 * sums (two, so consecutive sdots of one head do not wait on each other). The last m % 16 codes are
 * read with tail_word and met by a copy of the queries' tail, zero past m, so their stray lanes add 0.
 * The loops over heads are unrolled, or gcc keeps a[][] in memory: a load and a store per sdot.
 */
INLINE void dot_i8_heads(int dotprod, unsigned hn, unsigned bits, unsigned m, unsigned n, const uint8_t *codes,
			 size_t stride, const struct int_regs *r, const int8_t *q, size_t qs, int32_t *out)
{
	const unsigned m16 = m & ~15u, k = m & 15u, kbytes = (k * bits + 7) / 8;
	int8_t qt[4][16] = { { 0 } };

	for (unsigned h = 0; h < hn; h++)
		memcpy(qt[h], q + h * qs + m16, k);
	for (unsigned i = 0; i < n; i++) {
		const uint8_t *row = codes + (size_t)i * stride;
		int32x4_t a[4][2];
		size_t j = 0; /* not unsigned: a 32-bit index that may wrap keeps gcc from stepping pointers */

#pragma GCC unroll 4
		for (unsigned h = 0; h < hn; h++)
			a[h][0] = a[h][1] = vdupq_n_s32(0);
		for (; j + 32 <= m; j += 32) {
			const uint8_t *p = row + j / 8 * bits;
			const int8x16_t x0 = keys16(bits, chunk_word(p, bits, 1), r);
			const int8x16_t x1 = keys16(bits, chunk_word(p + 2 * bits, bits, j + 48 <= m), r);

#pragma GCC unroll 4
			for (unsigned h = 0; h < hn; h++) {
				a[h][0] = mac16(dotprod, a[h][0], x0, vld1q_s8(q + h * qs + j));
				a[h][1] = mac16(dotprod, a[h][1], x1, vld1q_s8(q + h * qs + j + 16));
			}
		}
		if (j < m16) {
			const int8x16_t x0 = keys16(bits, chunk_word(row + j / 8 * bits, bits, 0), r);

#pragma GCC unroll 4
			for (unsigned h = 0; h < hn; h++)
				a[h][0] = mac16(dotprod, a[h][0], x0, vld1q_s8(q + h * qs + j));
		}
		if (k) {
			const int8x16_t x1 = keys16(bits, tail_word(row + m16 / 8 * bits, kbytes), r);

#pragma GCC unroll 4
			for (unsigned h = 0; h < hn; h++)
				a[h][1] = mac16(dotprod, a[h][1], x1, vld1q_s8(qt[h]));
		}
#pragma GCC unroll 4
		for (unsigned h = 0; h < hn; h++)
			out[(size_t)h * n + i] = vaddvq_s32(vaddq_s32(a[h][0], a[h][1]));
	}
}

INLINE void dot_i8_width(int dotprod, unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			 const int8_t *lut, unsigned g, const int8_t *q, size_t qs, int32_t *out)
{
	const struct int_regs r = int_regs(bits, lut, NULL);
	unsigned h = 0;

	for (; h + 4 <= g; h += 4)
		dot_i8_heads(dotprod, 4, bits, m, n, codes, stride, &r, q + h * qs, qs, out + (size_t)h * n);
	switch (g - h) {
	case 3: dot_i8_heads(dotprod, 3, bits, m, n, codes, stride, &r, q + h * qs, qs, out + (size_t)h * n); break;
	case 2: dot_i8_heads(dotprod, 2, bits, m, n, codes, stride, &r, q + h * qs, qs, out + (size_t)h * n); break;
	case 1: dot_i8_heads(dotprod, 1, bits, m, n, codes, stride, &r, q + h * qs, qs, out + (size_t)h * n); break;
	default: break;
	}
}

INLINE void dot_i8_any(int dotprod, unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
		       const int8_t *lut, unsigned g, const int8_t *q, size_t qs, int32_t *out)
{
	switch (bits) {
	case 1: dot_i8_width(dotprod, 1, m, n, codes, stride, lut, g, q, qs, out); break;
	case 2: dot_i8_width(dotprod, 2, m, n, codes, stride, lut, g, q, qs, out); break;
	case 3: dot_i8_width(dotprod, 3, m, n, codes, stride, lut, g, q, qs, out); break;
	default: dot_i8_width(dotprod, 4, m, n, codes, stride, lut, g, q, qs, out); break;
	}
}

static void dot_i8_core(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			const int8_t *lut, unsigned g, const int8_t *q, size_t q_stride, int32_t *out)
{
	dot_i8_any(0, bits, m, n, codes, stride, lut, g, q, q_stride, out);
}

DOTPROD_TARGET __attribute__((flatten)) static void dot_i8_core_dotprod(unsigned bits, unsigned m, unsigned n,
									       const uint8_t *codes, size_t stride,
									       const int8_t *lut, unsigned g, const int8_t *q,
									       size_t q_stride, int32_t *out)
{
	dot_i8_any(1, bits, m, n, codes, stride, lut, g, q, q_stride, out);
}

/* The int16 values of the sixteen codes of a word: codes 0-7 in *lo, 8-15 in *hi. */
INLINE void values16(unsigned bits, uint64_t word, const struct int_regs *r, int16x8_t *lo, int16x8_t *hi)
{
	const uint8x16_t c = code_bytes(bits, word, r);
	const uint8x16_t low = vqtbl1q_u8(r->tab16_lo, c), high = vqtbl1q_u8(r->tab16_hi, c);

	*lo = vreinterpretq_s16_u8(vzip1q_u8(low, high));
	*hi = vreinterpretq_s16_u8(vzip2q_u8(low, high));
}

/*
 * Sixteen columns j..j+15 (k <= 16 of them real) of hn <= 4 heads, over all n rows: the 4 * hn sums stay
 * in registers, each row adding its weight times the row's values by widening multiply-accumulate (the
 * products of int16 by int16 are exact in int32). With k < 16 (the row's last columns: `tail`, a
 * constant once inlined) codes are read with tail_word and acc goes through a copy, so neither is read
 * or written past column m.
 */
INLINE void axpy_i16_columns(int tail, unsigned hn, unsigned bits, unsigned j, unsigned k, unsigned m, unsigned n,
			     const uint8_t *codes, size_t stride, const struct int_regs *r, const int16_t *w,
			     int32_t *acc, size_t as)
{
	const unsigned kbytes = (k * bits + 7) / 8;
	const int more = j + 32 <= m;
	const uint8_t *p = codes + j / 8 * bits;
	int32_t part[4][16] = { { 0 } };
	int32x4_t a[4][4];
	int16x8_t lo, hi;

	/* unrolled, or gcc keeps a[][] in memory and the sums go through the stack at every row */
#pragma GCC unroll 4
	for (unsigned h = 0; h < hn; h++) {
		if (tail)
			memcpy(part[h], acc + h * as + j, k * sizeof *acc);
		for (unsigned e = 0; e < 4; e++)
			a[h][e] = vld1q_s32(tail ? part[h] + 4 * e : acc + h * as + j + 4 * e);
	}
	for (size_t i = 0; i < n; i++, p += stride) {
		values16(bits, tail ? tail_word(p, kbytes) : chunk_word(p, bits, more), r, &lo, &hi);
#pragma GCC unroll 4
		for (unsigned h = 0; h < hn; h++) {
			const int16_t wi = w[h * (size_t)n + i];

			a[h][0] = vmlal_n_s16(a[h][0], vget_low_s16(lo), wi);
			a[h][1] = vmlal_high_n_s16(a[h][1], lo, wi);
			a[h][2] = vmlal_n_s16(a[h][2], vget_low_s16(hi), wi);
			a[h][3] = vmlal_high_n_s16(a[h][3], hi, wi);
		}
	}
#pragma GCC unroll 4
	for (unsigned h = 0; h < hn; h++) {
		for (unsigned e = 0; e < 4; e++)
			vst1q_s32(tail ? part[h] + 4 * e : acc + h * as + j + 4 * e, a[h][e]);
		if (tail)
			memcpy(acc + h * as + j, part[h], k * sizeof *acc);
	}
}

INLINE void axpy_i16_heads(unsigned hn, unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			   const struct int_regs *r, const int16_t *w, int32_t *acc, size_t as)
{
	unsigned j = 0;

	for (; j + 16 <= m; j += 16)
		axpy_i16_columns(0, hn, bits, j, 16, m, n, codes, stride, r, w, acc, as);
	if (j < m)
		axpy_i16_columns(1, hn, bits, j, m - j, m, n, codes, stride, r, w, acc, as);
}

INLINE void axpy_i16_width(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			   const int16_t *lut, unsigned g, const int16_t *w, int32_t *acc, size_t as)
{
	const struct int_regs r = int_regs(bits, NULL, lut);
	unsigned h = 0;

	for (; h + 4 <= g; h += 4)
		axpy_i16_heads(4, bits, m, n, codes, stride, &r, w + (size_t)h * n, acc + h * as, as);
	switch (g - h) {
	case 3: axpy_i16_heads(3, bits, m, n, codes, stride, &r, w + (size_t)h * n, acc + h * as, as); break;
	case 2: axpy_i16_heads(2, bits, m, n, codes, stride, &r, w + (size_t)h * n, acc + h * as, as); break;
	case 1: axpy_i16_heads(1, bits, m, n, codes, stride, &r, w + (size_t)h * n, acc + h * as, as); break;
	default: break;
	}
}

/* loops.h's integer lanes: four int32 in a q register, and four bytes widened into them */
#define LOOPS_LANES 4
typedef int32_t loops_i32v __attribute__((vector_size(16)));

INLINE loops_i32v loops_bytes(const uint8_t *p)
{
	uint32_t w;

	memcpy(&w, p, sizeof w);
	return (loops_i32v)vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(vmovl_u8(vreinterpret_u8_u32(vdup_n_u32(w))))));
}

/*
 * mask_codes' two steps (loops.h builds mask_codes from them, KVP_ISA_MASK_LEVELS), avx2.c's with tbl for
 * vpshufb. A row's kept levels (1 + magnitude) go to
 * a byte array in rank order (each magnitude byte repeated by tbl and shifted by lane: ushl by minus the
 * field's offset); then per 16 channels one tbl over the 16 levels from the first one they keep places
 * them, its indices the ranks below each kept channel (kvp_kernels_mask_below) and 0xff (zero) where pruned;
 * the signs add 8, and uzp and sli pack two codes to a byte. The plain code took about 0.4 us a row, which
 * made spark(quantize=rotated) some twenty times slower than the fp16 cache on x86 without AVX-512 (avx2.c).
 */
static const uint8_t neon_eight_each[16] = { 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1 };
static const uint8_t neon_four_each[16] = { 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3 };
static const int8_t neon_field_shift[16] = { 0, -2, -4, -6, 0, -2, -4, -6, 0, -2, -4, -6, 0, -2, -4, -6 };
static const uint8_t neon_bit_of[16] = { 1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128 };

/* Bit j of the 16 bits of w as byte j: 0xff where set. */
INLINE uint8x16_t neon_bits_to_bytes(unsigned w)
{
	const uint8x16_t v = vqtbl1q_u8(vreinterpretq_u8_u16(vdupq_n_u16((uint16_t)w)), vld1q_u8(neon_eight_each));

	return vtstq_u8(v, vld1q_u8(neon_bit_of));
}

/* The levels of 16 kept ranks from the magnitude bytes at mag (4 at 2 bits, 2 at 1 bit), a byte each. */
INLINE uint8x16_t neon_levels16(unsigned mb, const uint8_t *mag, unsigned nb)
{
	uint32_t w = 0;

	memcpy(&w, mag, nb);
	if (mb == 1)
		return vsubq_u8(vdupq_n_u8(1), neon_bits_to_bytes(w));
	return vaddq_u8(vandq_u8(vshlq_u8(vqtbl1q_u8(vreinterpretq_u8_u32(vdupq_n_u32(w)), vld1q_u8(neon_four_each)),
					  vld1q_s8(neon_field_shift)),
				 vdupq_n_u8(3)),
			vdupq_n_u8(1));
}

/* The kept channels' levels of one row into lv[0..kept), 16 at a time (bytes past them are scratch). */
INLINE void mask_levels(const struct kvp_mask_rows *rs, const uint8_t *mag, uint8_t *lv)
{
	const unsigned bytes = (rs->kept * rs->mb + 7) / 8;

	for (unsigned r = 0; r < rs->kept; r += 16) {
		const unsigned at = r * rs->mb / 8, nb = bytes - at < 2 * rs->mb ? bytes - at : 2 * rs->mb;

		vst1q_u8(lv + r, rs->mb ? neon_levels16(rs->mb, mag + at, nb) : vdupq_n_u8(1));
	}
}

/* The codes of 16 channels (mask and sign bits w and s, the first kept one at lv[0]); returns how many are kept. */
INLINE uint8x16_t neon_codes16(unsigned w, unsigned s, const uint8_t *lv, unsigned *kept)
{
	const uint64_t b0 = kvp_kernels_mask_below[w & 0xff], b1 = kvp_kernels_mask_below[w >> 8 & 0xff];
	const unsigned c0 = kvp_mask_below_count(b0, w), c1 = kvp_mask_below_count(b1, w >> 8);
	const uint8x16_t ctl = vorrq_u8(vcombine_u8(vcreate_u8(b0), vcreate_u8(b1 + c0 * 0x0101010101010101ull)),
					vmvnq_u8(neon_bits_to_bytes(w)));

	*kept = c0 + c1;
	return vorrq_u8(vqtbl1q_u8(vld1q_u8(lv), ctl), vandq_u8(neon_bits_to_bytes(s), vdupq_n_u8(8)));
}

/* 32 channels' codes, packed two to a byte (code 2i low in byte i); returns how many of them are kept. */
INLINE unsigned mask_codes32(uint32_t w, uint32_t s, const uint8_t *lv, uint8_t *out)
{
	unsigned k0, k1;
	const uint8x16_t a = neon_codes16(w & 0xffff, s & 0xffff, lv, &k0);
	const uint8x16_t b = neon_codes16(w >> 16, s >> 16, lv + k0, &k1);

	vst1q_u8(out, vsliq_n_u8(vuzp1q_u8(a, b), vuzp2q_u8(a, b), 4));
	return k0 + k1;
}

#define KVP_ISA_MASK_LEVELS
#define KVP_ISA_NAME "neon"
#define KVP_ISA_TABLE kvp_kernels_neon
#define KVP_ISA_SOFTMAX_GROUP
#define KVP_ISA_DOT_I8_SCALED
static int axpy_u8_scaled(unsigned bits, unsigned m, unsigned gsize, const struct kvp_row_runs *rows, unsigned g,
			  const float *w, size_t w_stride, float *acc, size_t acc_stride, const struct kvp_ahead *ahead);
static void dot_i8_scaled(unsigned bits, unsigned m, unsigned n, const uint8_t *group, unsigned g, const float *q,
			  size_t q_stride, float *out, size_t out_stride);
/* the fallback of both tables' versions stays out of their flattened frames (its own is 8 KiB) */
static void loops_dot_i8_scaled(unsigned bits, unsigned m, unsigned n, const uint8_t *group, unsigned g,
				const float *q, size_t q_stride, float *out, size_t out_stride) __attribute__((noinline));
#include "kernels/loops.h"

/* The same table but for the keys' integer lookups, which use sdot (Armv8.2 dot product). */
KVP_DOT_I8_GROUP(lut_dot_i8_group_dotprod, dot_i8_core_dotprod)

/*
 * dot_i8_scaled on sdot (KIVI's keys; 2- and 4-bit codes, m <= 512, and m a multiple of 4 at 4 bits; the rest
 * take loops.h's): each head's int8 query as loops.h's scaled_query makes it, then eight rows at a time, a row
 * per int32 lane of two registers. A key group stores its rows by columns, so a column byte of eight rows is
 * one load (at 4 bits, the two bytes of a quad of channels are zipped); a table lookup repeats each row's byte
 * over its lane's four bytes, a shift per byte and a mask leave the codes of channels 4k..4k+3 one per byte,
 * and one sdot per head multiplies them with the head's query of those channels, duplicated to every lane.
 * The sums are the plain code's integers (at most 512 * 15 * 127), so the rows' scores are its bits. Eight
 * rows, not sixteen: sixteen rows' sums of four heads, their codes, queries and tables outnumber the 32
 * registers, and gcc kept the sums in memory. loops.h's version takes a multiply and an add per code, for
 * four rows and one head.
 */
struct scaled_spread {
	uint8x16_t pick[2];
	int8x16_t shift;
	uint8x16_t mask;
};

static struct scaled_spread scaled_spread(unsigned bits)
{
	struct scaled_spread r;
	uint8_t pick[16];
	int8_t shift[16];

	for (unsigned reg = 0; reg < 2; reg++) {
		/* byte b: row 4 reg + b / 4's byte; at 4 bits its zipped pair's byte b % 4 / 2 */
		for (unsigned b = 0; b < 16; b++)
			pick[b] = (uint8_t)(bits == 2 ? 4 * reg + b / 4 : 8 * reg + 2 * (b / 4) + b % 4 / 2);
		r.pick[reg] = vld1q_u8(pick);
	}
	for (unsigned b = 0; b < 16; b++)
		shift[b] = (int8_t)(bits == 2 ? -2 * (int)(b % 4) : -4 * (int)(b % 2));
	r.shift = vld1q_s8(shift);
	r.mask = vdupq_n_u8((uint8_t)((1u << bits) - 1));
	return r;
}

/* Column byte b of rows i..i+7; in the last block (tail, a constant once inlined) rows past n read as 0
 * (tail_word), so that nothing past the group is read. */
INLINE uint8x8_t scaled_column(int tail, const uint8_t *codes, unsigned n, unsigned b, unsigned i)
{
	if (!tail)
		return vld1_u8(codes + (size_t)b * n + i);
	return vcreate_u8(tail_word(codes + (size_t)b * n + i, n - i));
}

/* The codes of channels 4k..4k+3 of rows i..i+7, in two registers (rows 4 reg + lane). */
INLINE void scaled_codes(int tail, unsigned bits, const uint8_t *codes, unsigned n, unsigned k, unsigned i,
			 const struct scaled_spread *r, int8x16_t c[2])
{
	uint8x16_t src;

	if (bits == 2) {
		src = vcombine_u8(scaled_column(tail, codes, n, k, i), vdup_n_u8(0));
	} else {
		const uint8x8_t x = scaled_column(tail, codes, n, 2 * k, i), y = scaled_column(tail, codes, n, 2 * k + 1, i);

		src = vcombine_u8(vzip1_u8(x, y), vzip2_u8(x, y));
	}
	for (unsigned reg = 0; reg < 2; reg++)
		c[reg] = vreinterpretq_s8_u8(vandq_u8(vshlq_u8(vqtbl1q_u8(src, r->pick[reg]), r->shift), r->mask));
}

/* out[h][i..i+8) = z + step * the sums of rows i..i+7 (a[h][reg]: rows i + 4 reg + lane), rows past n not stored */
INLINE void scaled_out8(unsigned hn, unsigned n, unsigned i, int32x4_t (*a)[2], const float *step, const float *z,
			float *out, size_t os)
{
#pragma GCC unroll 4
	for (unsigned h = 0; h < hn; h++)
#pragma GCC unroll 2
		for (unsigned reg = 0; reg < 2; reg++) {
			const float32x4_t v = vaddq_f32(vdupq_n_f32(z[h]),
							vmulq_f32(vcvtq_f32_s32(a[h][reg]), vdupq_n_f32(step[h])));
			float *o = out + h * os + i + 4 * reg;

			if (i + 4 * reg + 4 <= n) {
				vst1q_f32(o, v);
			} else if (i + 4 * reg < n) {
				float part[4];

				vst1q_f32(part, v);
				memcpy(o, part, (n - i - 4 * reg) * sizeof *o);
			}
		}
}

DOTPROD_TARGET INLINE void scaled_rows8(int tail, unsigned hn, unsigned bits, unsigned nquads, unsigned n,
					const uint8_t *codes, unsigned i, const int8_t (*q8)[SCALED_DIM],
					const struct scaled_spread *r, const float *step, const float *z, float *out,
					size_t os)
{
	int32x4_t a[4][2];

	/* every loop over a[][] unrolled, or gcc keeps it in memory */
#pragma GCC unroll 4
	for (unsigned h = 0; h < 4; h++)
		a[h][0] = a[h][1] = vdupq_n_s32(0);
	for (unsigned k = 0; k < nquads; k++) {
		int8x16_t c[2];

		scaled_codes(tail, bits, codes, n, k, i, r, c);
#pragma GCC unroll 4
		for (unsigned h = 0; h < hn; h++) {
			uint32_t quad;
			int8x16_t qk;

			memcpy(&quad, q8[h] + 4 * k, sizeof quad);
			qk = vreinterpretq_s8_u32(vdupq_n_u32(quad));

			a[h][0] = sdot16(a[h][0], c[0], qk);
			a[h][1] = sdot16(a[h][1], c[1], qk);
		}
	}
	scaled_out8(hn, n, i, a, step, z, out, os);
}

DOTPROD_TARGET INLINE void scaled_heads(unsigned hn, unsigned bits, unsigned m, unsigned n, const uint8_t *codes,
					const int8_t (*q8)[SCALED_DIM], const float *step, const float *z,
					float *out, size_t os)
{
	const struct scaled_spread r = scaled_spread(bits);
	const unsigned nquads = (m + 3) / 4;
	unsigned i = 0;

	for (; i + 8 <= n; i += 8)
		scaled_rows8(0, hn, bits, nquads, n, codes, i, q8, &r, step, z, out, os);
	if (i < n)
		scaled_rows8(1, hn, bits, nquads, n, codes, i, q8, &r, step, z, out, os);
}

/* CALL(hn, bits) with both counts constants, for the hn <= 4 heads and the width (2 or 4) at hand */
#define BY_HEADS_AND_WIDTH(CALL)                        \
	switch (hn * 8 + bits) {                        \
	case 34: CALL(4, 2); break;                     \
	case 36: CALL(4, 4); break;                     \
	case 26: CALL(3, 2); break;                     \
	case 28: CALL(3, 4); break;                     \
	case 18: CALL(2, 2); break;                     \
	case 20: CALL(2, 4); break;                     \
	case 10: CALL(1, 2); break;                     \
	default: CALL(1, 4); break;                     \
	}

/* Each of hn heads' int8 query (loops.h's scaled_query) into q8[h], eight zeros past m, its step and its Z. */
static void scaled_queries(unsigned hn, unsigned m, const float *q, size_t qs, const uint8_t *group,
			   int8_t (*q8)[SCALED_DIM], float *step, float *z)
{
	int32_t q32[SCALED_DIM];

	for (unsigned h = 0; h < hn; h++) {
		step[h] = scaled_query(m, q + h * qs, group, q32, &z[h]);
		for (unsigned j = 0; j < m; j++)
			q8[h][j] = (int8_t)q32[j];
		/* the codes past m in a last byte or chunk weigh 0 */
		memset(q8[h] + m, 0, 8);
	}
}

/* Both tables' dot_i8_scaled (2- and 4-bit codes, m <= 512, a multiple of 4 at 4 bits; loops.h's takes the
 * rest): every four heads' queries, then their rows by HEADS(hn, bits). */
#define SCALED_DOT(HEADS)                                                                               \
	const uint8_t *codes = group + 4 * (size_t)m;                                                   \
	int8_t q8[4][SCALED_DIM];                                                                       \
	float step[4], z[4];                                                                            \
                                                                                                        \
	if ((bits != 2 && (bits != 4 || m % 4)) || m + 8 > SCALED_DIM) {                                \
		loops_dot_i8_scaled(bits, m, n, group, g, q, q_stride, out, out_stride);                \
		return;                                                                                 \
	}                                                                                               \
	for (unsigned h0 = 0; h0 < g; h0 += 4) {                                                        \
		const unsigned hn = g - h0 < 4 ? g - h0 : 4;                                            \
		float *o = out + h0 * out_stride;                                                       \
                                                                                                        \
		scaled_queries(hn, m, q + h0 * q_stride, q_stride, group, q8, step, z);                 \
		BY_HEADS_AND_WIDTH(HEADS)                                                               \
	}

DOTPROD_TARGET __attribute__((flatten)) static void dot_i8_scaled_dotprod(unsigned bits, unsigned m, unsigned n,
									    const uint8_t *group, unsigned g,
									    const float *q, size_t q_stride,
									    float *out, size_t out_stride)
{
#define DOTPROD_HEADS(hn, bits) \
	scaled_heads(hn, bits, m, n, codes, (const int8_t (*)[SCALED_DIM])q8, step, z, o, out_stride)
	SCALED_DOT(DOTPROD_HEADS)
#undef DOTPROD_HEADS
}

/*
 * dot_i8_scaled for the plain table (KIVI's keys, same shapes as the sdot version above): eight rows at a
 * time, a row per int16 lane. A column byte of eight rows is one load, widened to int16; a shift and a mask
 * per code leave the codes of one channel, and one multiply-add by lane per code and head adds the head's
 * query of that channel (its int8, widened once per eight channels). The int16 sums are exact for a run of
 * channels (64 at 2 bits: 64 * 3 * 127 < 32767; 16 at 4 bits: 16 * 15 * 127 < 32767), then widened into
 * int32: the plain code's integers, so its bits. Per eight rows and eight channels for four heads: 32
 * multiply-adds, 4 query loads and widenings, and 2 column bytes at 2 bits (4 at 4 bits) loaded, widened,
 * shifted and masked; loops.h's take 18 instructions per four rows and one channel, 288 for the same work
 * (64 multiply-adds on int32).
 */
/* Products of a code (at most 3 or 15 in size, centred or not) and an int8 factor (at most 128 in size, the
 * query or W - 128) that an int16 sum holds exactly: 64 * 3 * 128 and 16 * 15 * 128 stay under 32768. */
#define I16_RUN(bits) ((bits) == 2 ? 64u : 16u)

/* The codes of channels j..j+7 of rows i..i+7, a row per int16 lane. Unless whole (the chunk inside the rows'
 * bytes; a constant once inlined), column bytes from nb on read as 0: nothing past the group is read. */
INLINE void scaled_codes8(int whole, int tail, unsigned bits, const uint8_t *codes, unsigned n, unsigned nb,
			  unsigned j, unsigned i, int16x8_t c[8])
{
	const unsigned per = 8 / bits, b0 = j / per;
	const uint16x8_t mask = vdupq_n_u16((uint16_t)((1u << bits) - 1));

#pragma GCC unroll 4
	for (unsigned b = 0; b < 8 / per; b++) {
		const uint16x8_t x =
			whole || b0 + b < nb ? vmovl_u8(scaled_column(tail, codes, n, b0 + b, i)) : vdupq_n_u16(0);

#pragma GCC unroll 4
		for (unsigned t = 0; t < per; t++) {
			const int16x8_t right = vdupq_n_s16((int16_t)-(int)(t * bits));

			c[b * per + t] = vreinterpretq_s16_u16(vandq_u16(vshlq_u16(x, right), mask));
		}
	}
}

/* Each head's int16 sums s[h] of rows i..i+7 plus channels j..j+7 (whole: as in scaled_codes8) */
INLINE void scaled_chunk8(int whole, int tail, unsigned hn, unsigned bits, const uint8_t *codes, unsigned n,
			  unsigned nb, unsigned j, unsigned i, const int8_t (*q8)[SCALED_DIM], int16x8_t s[4])
{
	int16x8_t c[8];

	scaled_codes8(whole, tail, bits, codes, n, nb, j, i, c);
#pragma GCC unroll 4
	for (unsigned h = 0; h < hn; h++) {
		const int16x8_t qv = vmovl_s8(vld1_s8(q8[h] + j));

		s[h] = vmlaq_laneq_s16(s[h], c[0], qv, 0), s[h] = vmlaq_laneq_s16(s[h], c[1], qv, 1);
		s[h] = vmlaq_laneq_s16(s[h], c[2], qv, 2), s[h] = vmlaq_laneq_s16(s[h], c[3], qv, 3);
		s[h] = vmlaq_laneq_s16(s[h], c[4], qv, 4), s[h] = vmlaq_laneq_s16(s[h], c[5], qv, 5);
		s[h] = vmlaq_laneq_s16(s[h], c[6], qv, 6), s[h] = vmlaq_laneq_s16(s[h], c[7], qv, 7);
	}
}

INLINE void scaled_rows8_mla(int tail, unsigned hn, unsigned bits, unsigned m, unsigned n, const uint8_t *codes,
			     unsigned i, const int8_t (*q8)[SCALED_DIM], const float *step, const float *z, float *out,
			     size_t os)
{
	const unsigned nb = (m * bits + 7) / 8;
	int32x4_t a[4][2];

#pragma GCC unroll 4
	for (unsigned h = 0; h < 4; h++)
		a[h][0] = a[h][1] = vdupq_n_s32(0);
	for (unsigned j0 = 0; j0 < m; j0 += I16_RUN(bits)) {
		const unsigned end = m - j0 < I16_RUN(bits) ? m : j0 + I16_RUN(bits);
		int16x8_t s[4];

#pragma GCC unroll 4
		for (unsigned h = 0; h < 4; h++)
			s[h] = vdupq_n_s16(0);
		/* q8 is zero past m, up to the last chunk's eight channels */
		for (unsigned j = j0; j < end; j += 8)
			if (j + 8 <= m)
				scaled_chunk8(1, tail, hn, bits, codes, n, nb, j, i, q8, s);
			else
				scaled_chunk8(0, tail, hn, bits, codes, n, nb, j, i, q8, s);
#pragma GCC unroll 4
		for (unsigned h = 0; h < hn; h++)
			a[h][0] = vaddw_s16(a[h][0], vget_low_s16(s[h])), a[h][1] = vaddw_high_s16(a[h][1], s[h]);
	}
	scaled_out8(hn, n, i, a, step, z, out, os);
}

INLINE void scaled_heads_mla(unsigned hn, unsigned bits, unsigned m, unsigned n, const uint8_t *codes,
			     const int8_t (*q8)[SCALED_DIM], const float *step, const float *z, float *out, size_t os)
{
	unsigned i = 0;

	for (; i + 8 <= n; i += 8)
		scaled_rows8_mla(0, hn, bits, m, n, codes, i, q8, step, z, out, os);
	if (i < n)
		scaled_rows8_mla(1, hn, bits, m, n, codes, i, q8, step, z, out, os);
}

__attribute__((flatten)) static void dot_i8_scaled(unsigned bits, unsigned m, unsigned n, const uint8_t *group,
						     unsigned g, const float *q, size_t q_stride, float *out,
						     size_t out_stride)
{
#define MLA_HEADS(hn, bits) \
	scaled_heads_mla(hn, bits, m, n, codes, (const int8_t (*)[SCALED_DIM])q8, step, z, o, out_stride)
	SCALED_DOT(MLA_HEADS)
#undef MLA_HEADS
}

#undef SCALED_DOT

/*
 * axpy_u8_scaled on sdot (KIVI's values; 2- and 4-bit codes, column groups of a multiple of 8, at most
 * U8_GROUPS of them, m a multiple of 8; the rest are declined, and take axpy_i16_scaled). Each head's z sums,
 * least and largest u and 8-bit weights as the plain code makes them; then eight columns at a time over every
 * row, four rows a step: a column per int32 lane of two registers, a row per byte (the four rows' code bytes
 * are one register, a table lookup puts each column's bytes in its lane, a shift and a mask leave the codes,
 * a second lookup their centred values 2 code - L). sdot multiplies signed bytes, so the weights go in as
 * W - 128, and the column sums (sdot with ones), which the least weight's term needs anyway, add the 128 W
 * back: sum_i W v = sum_i (W - 128) v + 128 sum_i v, exact in int32. Rows past a run's end are zeroed values.
 */
#define U8_GROUPS 4
#define U8_ROWS (KVP_AXPY_I16_ROWS + 8) /* a head's weights of a group, with room for a last step of eight */

/* neon-dotprod's lookups (pick, shift, mask: four rows' bytes to a column's lane), plain NEON's (lane_*: a row's
 * bytes to each column's lane), and both tables' centred values */
struct u8_spread {
	uint8x16_t pick[2], mask;
	int8x16_t shift, centred;
	uint8x8_t lane_pick, lane_mask;
	int8x8_t lane_shift;
};

static struct u8_spread u8_spread(unsigned bits)
{
	struct u8_spread r;
	uint8_t pick[16];
	int8_t shift[16], centred[16];

	/* lane t of register R: column 4R + t; byte e: row e, whose code bytes are at 2e (2 bits) or 4e (4 bits) */
	for (unsigned R = 0; R < 2; R++) {
		for (unsigned b = 0; b < 16; b++)
			pick[b] = (uint8_t)(bits == 2 ? 2 * (b % 4) + R : 4 * (b % 4) + 2 * R + b / 4 / 2);
		r.pick[R] = vld1q_u8(pick);
	}
	for (unsigned b = 0; b < 16; b++) {
		shift[b] = (int8_t)(bits == 2 ? -2 * (int)(b / 4) : -4 * (int)(b / 4 % 2));
		centred[b] = (int8_t)kvp_centred_code(b & ((1u << bits) - 1), bits);
	}
	r.shift = vld1q_s8(shift);
	r.centred = vld1q_s8(centred);
	r.mask = vdupq_n_u8((uint8_t)((1u << bits) - 1));
	/* lane t: column t's byte and its place in it */
	for (unsigned t = 0; t < 8; t++) {
		pick[t] = (uint8_t)(t * bits / 8);
		shift[t] = (int8_t)-(int)(t * bits % 8);
	}
	r.lane_pick = vld1_u8(pick), r.lane_shift = vld1_s8(shift);
	r.lane_mask = vdup_n_u8((uint8_t)((1u << bits) - 1));
	return r;
}

/* Head h's z sums into acc[m..m+ng), and its weights W - 128 into w8[c][0..n) (eight zeros past n); returns f and e,
 * the factors of the sums and the column sums: the plain code's steps on zc = z + s L / 2 and s. */
static void u8_weights(unsigned n, unsigned m, unsigned ng, const float *w, const float (*zc)[KVP_AXPY_I16_ROWS],
		       const float (*sf)[KVP_AXPY_I16_ROWS], int8_t (*w8)[U8_ROWS], float *acc, float *f, float *e)
{
	float top = 0.0f, lo = 0.0f, inv;

	for (unsigned c = 0; c < ng; c++) {
		float p[16] = { 0 };

		for (unsigned i = 0; i < n; i++)
			p[i % 16] += w[i] * zc[c][i];
		acc[m + c] += kvp_fold16(p);
	}
	for (unsigned i = 0; i < n; i++)
		for (unsigned c = 0; c < ng; c++) {
			const float u = kvp_weight_u8_in(w[i], sf[c][i]);

			top = u > top ? u : top;
			lo = (i == 0 && c == 0) || u < lo ? u : lo;
		}
	inv = kvp_weight_inv_u8(top - lo);
	for (unsigned c = 0; c < ng; c++) {
		for (unsigned i = 0; i < n; i++)
			w8[c][i] = (int8_t)(kvp_weight_u8(kvp_weight_u8_in(w[i], sf[c][i]), lo, inv) - 128);
		memset(w8[c] + n, 0, 8);
	}
	*f = (top - lo) / (2.0f * KVP_WEIGHT_MAX_U8);
	*e = lo * 0.5f;
}

/* The centred values of eight columns of four rows (rows e < live), whose code bytes start at row[e]. */
INLINE void u8_values(unsigned bits, const uint8_t *const row[4], unsigned live, const struct u8_spread *r,
		      int8x16_t v[2])
{
	uint8x16_t src;

	/* lane e of x: row e's code bytes (clang wants each lane number a constant) */
#define U8_LANE(e, set)                                           \
	do {                                                      \
		if ((e) < live)                                   \
			memcpy(&b, row[e], sizeof b), x = set(b, x, e);      \
	} while (0)
	if (bits == 2) {
		uint16x8_t x = vdupq_n_u16(0);
		uint16_t b;

		U8_LANE(0, vsetq_lane_u16);
		U8_LANE(1, vsetq_lane_u16);
		U8_LANE(2, vsetq_lane_u16);
		U8_LANE(3, vsetq_lane_u16);
		src = vreinterpretq_u8_u16(x);
	} else {
		uint32x4_t x = vdupq_n_u32(0);
		uint32_t b;

		U8_LANE(0, vsetq_lane_u32);
		U8_LANE(1, vsetq_lane_u32);
		U8_LANE(2, vsetq_lane_u32);
		U8_LANE(3, vsetq_lane_u32);
		src = vreinterpretq_u8_u32(x);
	}
#undef U8_LANE
	for (unsigned R = 0; R < 2; R++) {
		const uint8x16_t code = vandq_u8(vshlq_u8(vqtbl1q_u8(src, r->pick[R]), r->shift), r->mask);

		v[R] = vqtbl1q_s8(r->centred, code);
	}
	if (live < 4) {
		/* byte e of every lane is row e: the missing rows' values are 0 */
		const uint32x4_t keep = vdupq_n_u32(0xffffffffu >> (8 * (4 - live)));

		v[0] = vandq_s8(v[0], vreinterpretq_s8_u32(keep)), v[1] = vandq_s8(v[1], vreinterpretq_s8_u32(keep));
	}
}

/* Eight columns' sums into each head's acc (from its column j on): a[h][R] of its W - 128 times the values,
 * col[R] of the values (R: columns 4R..4R+3), so that sum W v = a + 128 col, and the least weight's term
 * e * col. */
INLINE void u8_add_sums(unsigned hn, int32x4_t (*a)[2], const int32x4_t col[2], const float *f, const float *e,
			float *acc, size_t as)
{
#pragma GCC unroll 4
	for (unsigned h = 0; h < hn; h++)
#pragma GCC unroll 2
		for (unsigned R = 0; R < 2; R++) {
			const int32x4_t sums = vaddq_s32(a[h][R], vshlq_n_s32(col[R], 7));
			const float32x4_t add = vaddq_f32(vmulq_n_f32(vcvtq_f32_s32(sums), f[h]),
							  vmulq_n_f32(vcvtq_f32_s32(col[R]), e[h]));
			float *o = acc + h * as + 4 * R;

			vst1q_f32(o, vaddq_f32(vld1q_f32(o), add));
		}
}

DOTPROD_TARGET INLINE void u8_columns(unsigned hn, unsigned bits, unsigned j, const struct kvp_row_runs *rows,
				      unsigned ng, int8_t (*const w8[4])[U8_ROWS], unsigned c, const float *f,
				      const float *e, const struct u8_spread *r, float *acc, size_t as)
{
	const int8x16_t ones = vdupq_n_s8(1);
	const size_t at = 4 * (size_t)ng + j * bits / 8;
	int32x4_t a[4][2], col[2] = { vdupq_n_s32(0), vdupq_n_s32(0) };

#pragma GCC unroll 4
	for (unsigned h = 0; h < 4; h++)
		a[h][0] = a[h][1] = vdupq_n_s32(0);
	/* runs are multiples of KVP_RUN_ROWS rows: a step's four rows lie in one */
	for (unsigned k = 0, i0 = 0; i0 < rows->n; k++, i0 += rows->run) {
		const unsigned end = rows->n - i0 < rows->run ? rows->n : i0 + rows->run;
		const uint8_t *p = rows->code[k] + at;

		for (unsigned i = i0; i < end; i += 4, p += 4 * rows->stride) {
			const uint8_t *const row[4] = { p, p + rows->stride, p + 2 * rows->stride, p + 3 * rows->stride };
			int8x16_t v[2];

			/* whole steps with a constant count: no test per row */
			if (end - i >= 4)
				u8_values(bits, row, 4, r, v);
			else
				u8_values(bits, row, end - i, r, v);
			col[0] = sdot16(col[0], v[0], ones), col[1] = sdot16(col[1], v[1], ones);
#pragma GCC unroll 4
			for (unsigned h = 0; h < hn; h++) {
				int32_t word;
				int8x16_t wq;

				memcpy(&word, w8[h][c] + i, 4);
				wq = vreinterpretq_s8_s32(vdupq_n_s32(word));
				a[h][0] = sdot16(a[h][0], v[0], wq), a[h][1] = sdot16(a[h][1], v[1], wq);
			}
		}
	}
	u8_add_sums(hn, a, col, f, e, acc + j, as);
}

/*
 * Plain NEON's columns (the neon table's axpy_u8_scaled; neon-dotprod's shapes and bits): eight columns j..j+7
 * of group c, a column per int16 lane, over every row, eight rows a step. A row's code bytes of the eight
 * columns (2 or 4) are one load, a lookup gives each lane its byte, a shift and a mask its code, a second
 * lookup its centred value; then one multiply-add by lane per row and head against the eight rows' weights
 * W - 128, widened once. The int16 sums are exact for I16_RUN rows, then widened into int32, and 128 times
 * the column sums added back as neon-dotprod does. Per eight rows and eight columns for four heads, gcc 12's
 * loop is 113 instructions, 32 of them multiply-adds (each row's values take a load, a dup, two lookups, a
 * shift, a mask, a widening and the column sum's add); axpy_i16_scaled's loops, which this table took
 * before, take 21 per row and four columns (336).
 */

/* The centred values of a row's eight columns whose code bytes start at p (2 or 4 of them). */
INLINE int16x8_t u8_row_values(unsigned bits, const uint8_t *p, const struct u8_spread *r)
{
	uint8x16_t src;
	uint8x8_t x;

	/* the bytes repeated over a whole register, for a lookup with no upper half to clear */
	if (bits == 2) {
		uint16_t b;

		memcpy(&b, p, sizeof b);
		src = vreinterpretq_u8_u16(vdupq_n_u16(b));
	} else {
		uint32_t b;

		memcpy(&b, p, sizeof b);
		src = vreinterpretq_u8_u32(vdupq_n_u32(b));
	}
	x = vand_u8(vshl_u8(vqtbl1_u8(src, r->lane_pick), r->lane_shift), r->lane_mask);
	return vmovl_s8(vqtbl1_s8(r->centred, x));
}

/* Rows i..i+live-1 (live <= 8, a constant once inlined; the rest weigh nothing) into each head's int16 sums s and
 * the int16 column sums col. */
INLINE void u8_rows8(unsigned hn, unsigned bits, unsigned live, const uint8_t *p, size_t stride,
		     int8_t (*const w8[4])[U8_ROWS], unsigned c, unsigned i, const struct u8_spread *r, int16x8_t s[4],
		     int16x8_t *col)
{
	int16x8_t v[8];

#pragma GCC unroll 8
	for (unsigned e = 0; e < 8; e++) {
		v[e] = e < live ? u8_row_values(bits, p + e * stride, r) : vdupq_n_s16(0);
		*col = vaddq_s16(*col, v[e]);
	}
#pragma GCC unroll 4
	for (unsigned h = 0; h < hn; h++) {
		const int16x8_t wv = vmovl_s8(vld1_s8(w8[h][c] + i));

		s[h] = vmlaq_laneq_s16(s[h], v[0], wv, 0), s[h] = vmlaq_laneq_s16(s[h], v[1], wv, 1);
		s[h] = vmlaq_laneq_s16(s[h], v[2], wv, 2), s[h] = vmlaq_laneq_s16(s[h], v[3], wv, 3);
		s[h] = vmlaq_laneq_s16(s[h], v[4], wv, 4), s[h] = vmlaq_laneq_s16(s[h], v[5], wv, 5);
		s[h] = vmlaq_laneq_s16(s[h], v[6], wv, 6), s[h] = vmlaq_laneq_s16(s[h], v[7], wv, 7);
	}
}

/* The int16 sums widened into the int32 ones (a[h][0]: columns 0-3, a[h][1]: 4-7), and cleared. */
INLINE void u8_widen(unsigned hn, int16x8_t s[4], int16x8_t *col, int32x4_t (*a)[2], int32x4_t cs[2])
{
#pragma GCC unroll 4
	for (unsigned h = 0; h < hn; h++) {
		a[h][0] = vaddw_s16(a[h][0], vget_low_s16(s[h])), a[h][1] = vaddw_high_s16(a[h][1], s[h]);
		s[h] = vdupq_n_s16(0);
	}
	cs[0] = vaddw_s16(cs[0], vget_low_s16(*col)), cs[1] = vaddw_high_s16(cs[1], *col);
	*col = vdupq_n_s16(0);
}

INLINE void u8_columns_mla(unsigned hn, unsigned bits, unsigned j, const struct kvp_row_runs *rows, unsigned ng,
			   int8_t (*const w8[4])[U8_ROWS], unsigned c, const float *f, const float *e,
			   const struct u8_spread *r, float *acc, size_t as)
{
	const size_t at = 4 * (size_t)ng + j * bits / 8;
	int32x4_t a[4][2], col[2] = { vdupq_n_s32(0), vdupq_n_s32(0) };
	int16x8_t s[4], cs = vdupq_n_s16(0);
	unsigned since = 0;

#pragma GCC unroll 4
	for (unsigned h = 0; h < 4; h++)
		a[h][0] = a[h][1] = vdupq_n_s32(0), s[h] = vdupq_n_s16(0);
	for (unsigned k = 0, i0 = 0; i0 < rows->n; k++, i0 += rows->run) {
		const unsigned end = rows->n - i0 < rows->run ? rows->n : i0 + rows->run;
		const uint8_t *p = rows->code[k] + at;
		unsigned i = i0;

		/* runs are multiples of KVP_RUN_ROWS rows: whole steps of eight lie in one, and only the last run ends
		 * in a part of one */
		for (; i + 8 <= end; i += 8, p += 8 * rows->stride) {
			u8_rows8(hn, bits, 8, p, rows->stride, w8, c, i, r, s, &cs);
			if ((since += 8) == I16_RUN(bits))
				u8_widen(hn, s, &cs, a, col), since = 0;
		}
		if (i < end)
			u8_rows8(hn, bits, end - i, p, rows->stride, w8, c, i, r, s, &cs);
	}
	u8_widen(hn, s, &cs, a, col);
	u8_add_sums(hn, a, col, f, e, acc + j, as);
}

/* What both tables' axpy_u8_scaled need before their columns: whether they take the call (kernels.h), then
 * every row's s and z + s L / 2 as planar floats. */
static int u8_scalars(unsigned bits, unsigned m, unsigned gsize, const struct kvp_row_runs *rows, unsigned g,
		      const float *w, size_t w_stride, float (*zc)[KVP_AXPY_I16_ROWS], float (*sf)[KVP_AXPY_I16_ROWS])
{
	const unsigned ng = gsize ? (m + gsize - 1) / gsize : 0, n = rows->n;
	const float half_levels = (float)((1u << bits) - 1) * 0.5f;

	if ((bits != 2 && bits != 4) || !gsize || gsize % 8 || m % 8 || ng > U8_GROUPS || n > KVP_AXPY_I16_ROWS ||
	    rows->run % KVP_RUN_ROWS || kvp_any_sign_bit(g, n, w, w_stride))
		return 0;
	for (unsigned i = 0; i < n; i++) {
		const uint8_t *rec = kvp_run_codes(rows, i);

		for (unsigned c = 0; c < ng; c++) {
			sf[c][i] = kvp_row_scalar(rec, 0, 0, ng + c);
			zc[c][i] = kvp_row_scalar(rec, 0, 0, c) + sf[c][i] * half_levels;
		}
	}
	return 1;
}

/* The hn heads from h0 on: their z sums into acc, their weights into w8, their factors into f and e. */
static void u8_heads_weights(unsigned hn, unsigned m, unsigned ng, unsigned n, const float *w, size_t w_stride,
			     const float (*zc)[KVP_AXPY_I16_ROWS], const float (*sf)[KVP_AXPY_I16_ROWS],
			     int8_t (*w8)[U8_GROUPS][U8_ROWS], float *acc, size_t acc_stride, float *f, float *e)
{
	for (unsigned h = 0; h < hn; h++)
		u8_weights(n, m, ng, w + h * w_stride, zc, sf, w8[h], acc + h * acc_stride, &f[h], &e[h]);
}

/* The frame of an axpy_u8_scaled: scalars, weights and factors. */
struct u8_frame {
	float zc[U8_GROUPS][KVP_AXPY_I16_ROWS], sf[U8_GROUPS][KVP_AXPY_I16_ROWS], f[4], e[4];
	int8_t w8[4][U8_GROUPS][U8_ROWS];
};

/* Both tables' axpy_u8_scaled: the columns eight at a time by COLUMNS(hn, bits), for every four heads. */
#define U8_SCALED(COLUMNS)                                                                                      \
	const unsigned ng = gsize ? (m + gsize - 1) / gsize : 0, n = rows->n;                                   \
	struct u8_frame t;                                                                                      \
	int8_t (*const w8h[4])[U8_ROWS] = { t.w8[0], t.w8[1], t.w8[2], t.w8[3] };                             \
	const struct u8_spread r = u8_spread(bits);                                                             \
                                                                                                                \
	(void)ahead; /* the hardware's own prefetcher, as the loops have */                                     \
	if (!u8_scalars(bits, m, gsize, rows, g, w, w_stride, t.zc, t.sf))                                      \
		return 0;                                                                                       \
	for (unsigned h0 = 0; h0 < g; h0 += 4) {                                                                \
		const unsigned hn = g - h0 < 4 ? g - h0 : 4;                                                    \
		float *ah = acc + h0 * acc_stride;                                                              \
                                                                                                                \
		u8_heads_weights(hn, m, ng, n, w + h0 * w_stride, w_stride, (const float (*)[KVP_AXPY_I16_ROWS])t.zc, \
				 (const float (*)[KVP_AXPY_I16_ROWS])t.sf, t.w8, ah, acc_stride, t.f, t.e);       \
		for (unsigned j = 0; j < m; j += 8)                                                             \
			BY_HEADS_AND_WIDTH(COLUMNS)                                                             \
	}                                                                                                       \
	return 1

DOTPROD_TARGET __attribute__((flatten)) static int axpy_u8_scaled_dotprod(unsigned bits, unsigned m, unsigned gsize,
									    const struct kvp_row_runs *rows, unsigned g,
									    const float *w, size_t w_stride, float *acc,
									    size_t acc_stride, const struct kvp_ahead *ahead)
{
#define DOTPROD_COLUMNS(hn, bits) u8_columns(hn, bits, j, rows, ng, w8h, j / gsize, t.f, t.e, &r, ah, acc_stride)
	U8_SCALED(DOTPROD_COLUMNS);
#undef DOTPROD_COLUMNS
}

__attribute__((flatten)) static int axpy_u8_scaled(unsigned bits, unsigned m, unsigned gsize,
						     const struct kvp_row_runs *rows, unsigned g, const float *w,
						     size_t w_stride, float *acc, size_t acc_stride,
						     const struct kvp_ahead *ahead)
{
#define MLA_COLUMNS(hn, bits) u8_columns_mla(hn, bits, j, rows, ng, w8h, j / gsize, t.f, t.e, &r, ah, acc_stride)
	U8_SCALED(MLA_COLUMNS);
#undef MLA_COLUMNS
}

#undef U8_SCALED
#undef BY_HEADS_AND_WIDTH

KVP_SCALED_GROUPS(dot_i8_scaled_groups_dotprod, dot_i8_scaled_dotprod)

const struct kvp_kernels kvp_kernels_neon_dotprod = {
	.name = "neon-dotprod",
	KVP_ISA_ENTRIES(lut_dot_i8_group_dotprod, lut_axpy_u8_group, dot_i8_scaled_groups_dotprod, axpy_u8_scaled_dotprod)
};

#else
/* ISO C wants a declaration in every translation unit */
typedef int kvp_neon_not_built;
#endif /* __aarch64__ */
