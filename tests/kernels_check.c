/*
 * Every runnable vector kernel table against the scalar reference, without Criterion, so the same checks
 * run natively and, statically linked, under qemu-aarch64. Prints one line per failed check and ends with
 * "N passed, M failed"; exits 0 iff M == 0.
 *
 * Tolerances: dots and axpy agree within 1e-5 relative to the sum of absolute products (summation order
 * and FMA differ, and a plain relative bound is meaningless when terms cancel); conversions and scale are
 * bit-identical, except that an f16 NaN widened to f32 only has to stay a NaN of the same sign (F16C quiets
 * signalling NaNs, base/half.c keeps them); softmax weights, sums and factors agree within 1e-6 relative
 * (plus 1e-30 absolute for results that underflow); band norms are bit-identical.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/base.h"
#include "kernels/crc32c.h"
#include "kernels/kernels.h"

#define DOT_TOL 1e-5
#define SOFTMAX_TOL 1e-6
#define UNDERFLOW_TOL 1e-30

static const unsigned dims[] = { 1, 3, 7, 8, 9, 31, 64, 65, 127, 128 };
static const unsigned counts[] = { 1, 2, 5, 64, 67 };
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

static unsigned passed, failed;

static void check(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void check(int ok, const char *fmt, ...)
{
	va_list ap;

	if (ok) {
		passed++;
		return;
	}
	failed++;
	printf("FAIL ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
}

static uint64_t rng_state = 0x9e3779b97f4a7c15u;

static uint32_t rnd32(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return (uint32_t)(rng_state >> 32);
}

/* uniform in [-1, 1) */
static float rndf(void)
{
	return (float)((double)rnd32() / 2147483648.0 - 1.0);
}

static uint32_t bits_of(float x)
{
	uint32_t u;

	memcpy(&u, &x, sizeof u);
	return u;
}

static float float_of(uint32_t u)
{
	float x;

	memcpy(&x, &u, sizeof x);
	return x;
}

static void *xmalloc(size_t n)
{
	void *p = malloc(n ? n : 1);

	if (!p) {
		perror("malloc");
		exit(2);
	}
	return p;
}

/* Buffers are sized exactly (plus the offset), so a kernel reading past its end trips ASan. */
static float *rand_f32(size_t n, unsigned off)
{
	float *p = xmalloc((n + off) * sizeof *p);

	for (size_t i = 0; i < n + off; i++)
		p[i] = rndf();
	return p;
}

static uint16_t *rand_f16(size_t n, unsigned off)
{
	uint16_t *p = xmalloc((n + off) * sizeof *p);

	for (size_t i = 0; i < n + off; i++)
		p[i] = kvp_f32_to_f16(4.0f * rndf());
	return p;
}

static int close_to(double got, double want, double bound)
{
	return fabs(got - want) <= bound;
}

static void check_dot(const struct kvp_kernels *k, int half, unsigned d, unsigned n, unsigned off)
{
	const float scale = 0.125f;
	float *q = rand_f32(d, off), *want = xmalloc((n + off) * sizeof *want);
	float *got = xmalloc((n + off) * sizeof *got);
	float *rows = half ? NULL : rand_f32((size_t)n * d, off);
	uint16_t *hrows = half ? rand_f16((size_t)n * d, off) : NULL;

	if (half) {
		kvp_kernels_scalar.dot_f16(d, n, hrows + off, q + off, scale, want + off);
		k->dot_f16(d, n, hrows + off, q + off, scale, got + off);
	} else {
		kvp_kernels_scalar.dot_f32(d, n, rows + off, q + off, scale, want + off);
		k->dot_f32(d, n, rows + off, q + off, scale, got + off);
	}

	int ok = 1;
	unsigned bad = 0;

	for (unsigned i = 0; i < n && ok; i++) {
		double mag = 0;

		for (unsigned j = 0; j < d; j++) {
			size_t at = off + (size_t)i * d + j;
			double r = half ? kvp_f16_to_f32(hrows[at]) : rows[at];

			mag += fabs(r * q[off + j]);
		}
		ok = close_to(got[off + i], want[off + i], DOT_TOL * scale * mag + 1e-30);
		bad = i;
	}
	check(ok, "%s dot_%s d=%u n=%u off=%u: row %u got %.9g want %.9g", k->name,
	      half ? "f16" : "f32", d, n, off, bad, got[off + bad], want[off + bad]);
	free(q);
	free(want);
	free(got);
	free(rows);
	free(hrows);
}

static void check_axpy(const struct kvp_kernels *k, int half, unsigned d, unsigned n, unsigned off)
{
	float *w = rand_f32(n, off), *acc0 = rand_f32(d, off);
	float *want = xmalloc((d + off) * sizeof *want), *got = xmalloc((d + off) * sizeof *got);
	float *rows = half ? NULL : rand_f32((size_t)n * d, off);
	uint16_t *hrows = half ? rand_f16((size_t)n * d, off) : NULL;

	memcpy(want, acc0, (d + off) * sizeof *want);
	memcpy(got, acc0, (d + off) * sizeof *got);
	if (half) {
		kvp_kernels_scalar.axpy_f16(d, n, hrows + off, w + off, want + off);
		k->axpy_f16(d, n, hrows + off, w + off, got + off);
	} else {
		kvp_kernels_scalar.axpy_f32(d, n, rows + off, w + off, want + off);
		k->axpy_f32(d, n, rows + off, w + off, got + off);
	}

	int ok = 1;
	unsigned bad = 0;

	for (unsigned j = 0; j < d && ok; j++) {
		double mag = fabs(acc0[off + j]);

		for (unsigned i = 0; i < n; i++) {
			size_t at = off + (size_t)i * d + j;
			double r = half ? kvp_f16_to_f32(hrows[at]) : rows[at];

			mag += fabs(w[off + i] * r);
		}
		ok = close_to(got[off + j], want[off + j], DOT_TOL * mag + 1e-30);
		bad = j;
	}
	check(ok, "%s axpy_%s d=%u n=%u off=%u: column %u got %.9g want %.9g", k->name,
	      half ? "f16" : "f32", d, n, off, bad, got[off + bad], want[off + bad]);
	free(w);
	free(acc0);
	free(want);
	free(got);
	free(rows);
	free(hrows);
}

/* The group kernels against the scalar group kernels, head by head (see test_kernels.c). */
static void check_group(const struct kvp_kernels *k, unsigned d, unsigned n, unsigned g, unsigned off)
{
	const float scale = 0.125f;
	uint16_t *rows = rand_f16((size_t)n * d, off);
	/* what the kernels prefetch: other rows, which must change nothing */
	uint16_t *ahead = rand_f16((size_t)n * d, off + 1);
	float *q = rand_f32((size_t)g * d, off), *w = rand_f32((size_t)g * n, off);
	float *want = xmalloc(((size_t)g * n + off) * sizeof *want), *got = xmalloc(((size_t)g * n + off) * sizeof *got);
	float *acc0 = rand_f32((size_t)g * d, off);
	float *acc_want = xmalloc(((size_t)g * d + off) * sizeof *acc_want);
	float *acc_got = xmalloc(((size_t)g * d + off) * sizeof *acc_got);
	int ok = 1;

	memcpy(acc_want, acc0, ((size_t)g * d + off) * sizeof *acc0);
	memcpy(acc_got, acc0, ((size_t)g * d + off) * sizeof *acc0);
	kvp_kernels_scalar.dot_f16_group(d, n, rows + off, g, q + off, scale, want + off, NULL);
	k->dot_f16_group(d, n, rows + off, g, q + off, scale, got + off, ahead + off);
	kvp_kernels_scalar.axpy_f16_group(d, n, rows + off, g, w + off, acc_want + off, NULL);
	k->axpy_f16_group(d, n, rows + off, g, w + off, acc_got + off, ahead + off);
	for (unsigned h = 0; h < g && ok; h++) {
		for (unsigned i = 0; i < n && ok; i++) {
			size_t at = off + (size_t)h * n + i;
			double mag = 0;
			for (unsigned j = 0; j < d; j++)
				mag += fabs(kvp_f16_to_f32(rows[off + (size_t)i * d + j]) * q[off + (size_t)h * d + j]);
			ok = close_to(got[at], want[at], DOT_TOL * scale * mag + 1e-30);
		}
		for (unsigned j = 0; j < d && ok; j++) {
			size_t at = off + (size_t)h * d + j;
			double mag = fabs(acc0[at]);
			for (unsigned i = 0; i < n; i++)
				mag += fabs(w[off + (size_t)h * n + i] * kvp_f16_to_f32(rows[off + (size_t)i * d + j]));
			ok = close_to(acc_got[at], acc_want[at], DOT_TOL * mag + 1e-30);
		}
	}
	check(ok, "%s f16 group kernels d=%u n=%u g=%u off=%u differ from scalar", k->name, d, n, g, off);
	/* without the prefetch hint, the same bits */
	memcpy(acc_want, acc0, ((size_t)g * d + off) * sizeof *acc0);
	k->dot_f16_group(d, n, rows + off, g, q + off, scale, want + off, NULL);
	k->axpy_f16_group(d, n, rows + off, g, w + off, acc_want + off, NULL);
	check(!memcmp(want + off, got + off, (size_t)g * n * sizeof *got) &&
		      !memcmp(acc_want + off, acc_got + off, (size_t)g * d * sizeof *acc_got),
	      "%s f16 group kernels d=%u n=%u g=%u off=%u: ahead changed the result", k->name, d, n, g, off);
	free(rows);
	free(ahead);
	free(q);
	free(w);
	free(want);
	free(got);
	free(acc0);
	free(acc_want);
	free(acc_got);
}

static void check_scale(const struct kvp_kernels *k, unsigned d, unsigned off)
{
	float *want = rand_f32(d, off), *got = xmalloc((d + off) * sizeof *got);

	memcpy(got, want, (d + off) * sizeof *got);
	kvp_kernels_scalar.scale(d, 0.37f, want + off);
	k->scale(d, 0.37f, got + off);
	check(!memcmp(want + off, got + off, d * sizeof *got), "%s scale d=%u off=%u: not bit-identical",
	      k->name, d, off);
	free(want);
	free(got);
}

/*
 * Inputs that exercise every rounding path: zeros, the subnormal and normal boundaries, ties between
 * adjacent halves, the overflow threshold 65520, infinities and NaNs with payloads.
 */
static const uint32_t special_bits[] = {
	0x00000000, 0x80000000, 0x00000001, 0x33000000, 0x33000001, 0x337fffff, 0x33800000, 0x33c00000,
	0x387fc000, 0x387fe000, 0x387fffff, 0x38800000, 0x3f800000, 0x3f801000, 0x3f803000, 0x3f801001,
	0x477fe000, 0x477fefff, 0x477ff000, 0x477ff001, 0x47800000, 0x7f7fffff, 0x7f800000, 0xff800000,
	0x7f800001, 0x7fa00000, 0x7fc00000, 0xffc00001, 0x7f802000, 0x7fbfffff, 0xfffffff0, 0x00800000,
	0xb3000000, 0x80000001, 0xc77ff000, 0xc77fefff, 0x387fefff, 0x38000000, 0x37ffffff, 0x3f7ff000,
};

static size_t special_floats(float *x, size_t cap)
{
	size_t n = 0;

	for (size_t i = 0; i < COUNT(special_bits) && n < cap; i++)
		x[n++] = float_of(special_bits[i]);
	/* the exact midpoint above every finite half, both signs: all ties, half of them rounding up */
	for (uint32_t h = 0; h < 0x7c00 && n + 2 <= cap; h++) {
		double lo = kvp_f16_to_f32((uint16_t)h), hi = kvp_f16_to_f32((uint16_t)(h + 1));
		float mid = (float)((lo + hi) / 2);

		x[n++] = mid;
		x[n++] = -mid;
	}
	return n;
}

static void check_f32_to_f16(const struct kvp_kernels *k)
{
	enum { CAP = 2 * 0x7c00 + COUNT(special_bits) };
	float *base = xmalloc(CAP * sizeof *base);
	size_t n = special_floats(base, CAP);
	float *x = xmalloc((n + 1) * sizeof *x);
	uint16_t *want = xmalloc(n * sizeof *want), *got = xmalloc((n + 1) * sizeof *got);

	for (unsigned off = 0; off < 2; off++) {
		memcpy(x + off, base, n * sizeof *x);
		/* lengths 1..17 cover every tail; then the whole set */
		for (size_t len = 1; len <= 18; len++) {
			size_t m = len == 18 ? n : len, i = 0;

			kvp_kernels_scalar.f32_to_f16(m, x + off, want);
			k->f32_to_f16(m, x + off, got + off);
			while (i < m && want[i] == got[off + i])
				i++;
			check(i == m, "%s f32_to_f16 len=%zu off=%u: %08x -> %04x, scalar %04x",
			      k->name, m, off, i < m ? bits_of(x[off + i]) : 0, i < m ? got[off + i] : 0,
			      i < m ? want[i] : 0);
		}
	}
	free(base);
	free(x);
	free(want);
	free(got);
}

/* A stride through all 2^32 bit patterns: every exponent, with varied low mantissa bits. */
static void check_f32_to_f16_sweep(const struct kvp_kernels *k)
{
	enum { CHUNK = 4096 };
	float x[CHUNK];
	uint16_t want[CHUNK], got[CHUNK];
	uint32_t u = 0, bad = 0;
	int ok = 1;

	for (uint64_t done = 0; done < (1ull << 32) && ok; done += (uint64_t)CHUNK * 4093) {
		for (unsigned i = 0; i < CHUNK; i++, u += 4093)
			x[i] = float_of(u);
		kvp_kernels_scalar.f32_to_f16(CHUNK, x, want);
		k->f32_to_f16(CHUNK, x, got);
		for (unsigned i = 0; i < CHUNK && ok; i++)
			if (want[i] != got[i]) {
				ok = 0;
				bad = bits_of(x[i]);
			}
	}
	check(ok, "%s f32_to_f16 sweep: %08x differs", k->name, bad);
}

static int same_f32(float a, float b)
{
	if (isnan(a) || isnan(b))
		return isnan(a) && isnan(b) && signbit(a) == signbit(b);
	return bits_of(a) == bits_of(b);
}

static void check_f16_to_f32(const struct kvp_kernels *k)
{
	uint16_t *h = xmalloc((65536 + 1) * sizeof *h);
	float *want = xmalloc(65536 * sizeof *want), *got = xmalloc((65536 + 1) * sizeof *got);

	for (unsigned off = 0; off < 2; off++) {
		for (uint32_t i = 0; i < 65536; i++)
			h[off + i] = (uint16_t)i;
		/* short runs ending past 0x7c00 give every tail length across max-normal, inf and NaN */
		for (size_t len = 1; len <= 18; len++) {
			size_t m = len == 18 ? 65536 : len, i = 0;
			const uint16_t *src = h + off + (len == 18 ? 0 : 0x7bf0);

			kvp_kernels_scalar.f16_to_f32(m, src, want);
			k->f16_to_f32(m, src, got + off);
			while (i < m && same_f32(got[off + i], want[i]))
				i++;
			check(i == m, "%s f16_to_f32 len=%zu off=%u: %04x -> %08x, scalar %08x",
			      k->name, m, off, i < m ? src[i] : 0, i < m ? bits_of(got[off + i]) : 0,
			      i < m ? bits_of(want[i]) : 0);
		}
	}
	free(h);
	free(want);
	free(got);
}

/* band_norms: bit-identical to scalar in both layouts, on even dims around the vector widths. */
static void check_band_norms(const struct kvp_kernels *k)
{
	static const unsigned band_dims[] = { 2, 6, 8, 14, 16, 18, 30, 64, 128, 130 };

	for (size_t a = 0; a < COUNT(band_dims); a++)
		for (size_t b = 0; b < COUNT(counts); b++)
			for (unsigned off = 0; off < 2; off++)
				for (int il = 0; il < 2; il++) {
					unsigned d = band_dims[a], n = counts[b], m = n * (d / 2), i = 0;
					float *rows = rand_f32((size_t)n * d, off), *want = xmalloc(m * sizeof *want);
					float *got = xmalloc((m + off) * sizeof *got);

					kvp_kernels_scalar.band_norms(d, n, il, rows + off, want);
					k->band_norms(d, n, il, rows + off, got + off);
					while (i < m && bits_of(got[off + i]) == bits_of(want[i]))
						i++;
					check(i == m, "%s band_norms d=%u n=%u interleaved=%d off=%u: band %u %08x, scalar %08x",
					      k->name, d, n, il, off, i, i < m ? bits_of(got[off + i]) : 0,
					      i < m ? bits_of(want[i]) : 0);
					free(rows), free(want), free(got);
				}
}

static int softmax_close(float got, float want)
{
	if (isinf(want) || isnan(want))
		return same_f32(got, want);
	return close_to(got, want, SOFTMAX_TOL * fabs(want) + UNDERFLOW_TOL);
}

/* Scores spread over [-spread, spread]; every fifth one masked to -inf when masked is set. */
static void fill_scores(float *s, unsigned n, float spread, int masked)
{
	for (unsigned i = 0; i < n; i++)
		s[i] = masked && i % 5 == 2 ? -INFINITY : spread * rndf();
}

/* Three consecutive blocks, as attention walks a sequence, compared step by step. */
static void check_softmax(const struct kvp_kernels *k, unsigned n, unsigned off, float spread, int masked)
{
	float *want = xmalloc((n + off) * sizeof *want), *got = xmalloc((n + off) * sizeof *got);
	float wm = -INFINITY, wl = 0, gm = -INFINITY, gl = 0;

	for (unsigned step = 0; step < 3; step++) {
		fill_scores(want + off, n, spread, masked);
		memcpy(got + off, want + off, n * sizeof *got);

		float wc = kvp_kernels_scalar.softmax_step(n, want + off, &wm, &wl);
		float gc = k->softmax_step(n, got + off, &gm, &gl);
		unsigned i = 0;

		while (i < n && softmax_close(got[off + i], want[off + i]))
			i++;
		check(i == n && softmax_close(gc, wc) && same_f32(gm, wm) && softmax_close(gl, wl),
		      "%s softmax_step n=%u off=%u spread=%g masked=%d step %u: "
		      "s[%u] %.9g/%.9g factor %.9g/%.9g m %.9g/%.9g l %.9g/%.9g",
		      k->name, n, off, (double)spread, masked, step, i,
		      i < n ? got[off + i] : 0.0, i < n ? want[off + i] : 0.0, gc, wc, gm, wm, gl, wl);
	}
	free(want);
	free(got);
}

/* A block with nothing but masked scores at the start leaves the state empty and the weights zero. */
static void check_softmax_all_masked(const struct kvp_kernels *k, unsigned n)
{
	float *s = xmalloc(n * sizeof *s), m = -INFINITY, l = 0;

	for (unsigned i = 0; i < n; i++)
		s[i] = -INFINITY;

	float c = k->softmax_step(n, s, &m, &l);
	unsigned i = 0;

	while (i < n && bits_of(s[i]) == 0)
		i++;
	check(i == n && c == 0 && l == 0 && m == -INFINITY,
	      "%s softmax_step all masked n=%u: factor %g l %g m %g", k->name, n, c, l, m);
	free(s);
}

/* Packed codes: n rows of m codes of bits bits, random bytes (padding too), sized exactly. */
static void check_lut(const struct kvp_kernels *k, unsigned bits, unsigned m, unsigned n, unsigned off,
		      unsigned pad)
{
	const size_t rowbytes = ((size_t)m * bits + 7) / 8, stride = rowbytes + pad;
	const size_t len = (size_t)(n - 1) * stride + rowbytes + off;
	uint8_t *codes = xmalloc(len);
	float *lut = rand_f32(1u << bits, off), *q = rand_f32(m, off), *w = rand_f32(n, off);
	float *want = xmalloc((n + m + off) * sizeof *want), *got = xmalloc((n + m + off) * sizeof *got);
	int ok = 1;
	unsigned bad = 0;

	for (size_t i = 0; i < len; i++)
		codes[i] = (uint8_t)rnd32();
	kvp_kernels_scalar.lut_dot(bits, m, n, codes + off, stride, lut + off, q + off, want + off);
	k->lut_dot(bits, m, n, codes + off, stride, lut + off, q + off, got + off);
	/* every |lut| and |q| is below 1, so m bounds the sum of absolute products */
	for (unsigned i = 0; i < n && ok; i++, bad = i)
		ok = close_to(got[off + i], want[off + i], DOT_TOL * m);
	check(ok, "%s lut_dot bits=%u m=%u n=%u off=%u pad=%u: row %u", k->name, bits, m, n, off, pad, bad);
	memcpy(want + off, q + off, m * sizeof *q);
	memcpy(got + off, q + off, m * sizeof *q);
	kvp_kernels_scalar.lut_axpy(bits, m, n, codes + off, stride, lut + off, w + off, want + off);
	k->lut_axpy(bits, m, n, codes + off, stride, lut + off, w + off, got + off);
	ok = 1;
	for (unsigned j = 0; j < m && ok; j++, bad = j)
		ok = close_to(got[off + j], want[off + j], DOT_TOL * (n + 1));
	check(ok, "%s lut_axpy bits=%u m=%u n=%u off=%u pad=%u: column %u", k->name, bits, m, n, off, pad,
	      bad);
	free(codes);
	free(lut);
	free(q);
	free(w);
	free(want);
	free(got);
}

/* The group versions against the scalar single-head kernels, head by head (see test_kernels.c). */
static void check_lut_group(const struct kvp_kernels *k, unsigned bits, unsigned m, unsigned n, unsigned g,
			    unsigned off)
{
	const size_t rowbytes = ((size_t)m * bits + 7) / 8, stride = rowbytes + 1, qs = m + 3;
	const size_t len = (size_t)(n - 1) * stride + rowbytes + off;
	uint8_t *codes = xmalloc(len);
	float *lut = rand_f32(1u << bits, off), *q = rand_f32(g * qs, off), *w = rand_f32((size_t)g * n, off);
	float *got = xmalloc(((size_t)g * n + off) * sizeof *got), *want = xmalloc(((size_t)g * n + off) * sizeof *want);
	float *acc = rand_f32(g * qs, off), *acc_want = xmalloc((g * qs + off) * sizeof *acc_want);
	int ok = 1;

	for (size_t i = 0; i < len; i++)
		codes[i] = (uint8_t)rnd32();
	memcpy(acc_want, acc, (g * qs + off) * sizeof *acc);
	k->lut_dot_group(bits, m, n, codes + off, stride, lut + off, g, q + off, qs, got + off);
	k->lut_axpy_group(bits, m, n, codes + off, stride, lut + off, g, w + off, acc + off, qs);
	for (unsigned h = 0; h < g; h++) {
		kvp_kernels_scalar.lut_dot(bits, m, n, codes + off, stride, lut + off, q + off + h * qs,
					   want + off + (size_t)h * n);
		kvp_kernels_scalar.lut_axpy(bits, m, n, codes + off, stride, lut + off, w + off + (size_t)h * n,
					    acc_want + off + h * qs);
	}
	for (size_t i = 0; i < (size_t)g * n && ok; i++)
		ok = close_to(got[off + i], want[off + i], DOT_TOL * m);
	for (size_t j = 0; j < g * qs && ok; j++)
		ok = close_to(acc[off + j], acc_want[off + j], DOT_TOL * (n + 1));
	check(ok, "%s lut group kernels bits=%u m=%u n=%u g=%u off=%u differ from scalar", k->name, bits, m, n, g,
	      off);
	free(codes), free(lut), free(q), free(w), free(got), free(want), free(acc), free(acc_want);
}

static void check_luts(const struct kvp_kernels *k)
{
	static const unsigned lut_dims[] = { 1, 3, 7, 8, 9, 16, 31, 48, 64, 65, 80, 127, 128 };

	for (unsigned bits = 1; bits <= 4; bits++)
		for (size_t a = 0; a < COUNT(lut_dims); a++)
			for (size_t b = 0; b < COUNT(counts); b++)
				for (unsigned off = 0; off < 2; off++)
					for (unsigned pad = 0; pad < 4; pad += 3)
						check_lut(k, bits, lut_dims[a], counts[b], off, pad);
	for (unsigned bits = 1; bits <= 4; bits++)
		for (size_t a = 0; a < COUNT(lut_dims); a++)
			for (unsigned g = 1; g <= 8; g++)
				for (unsigned off = 0; off < 2; off++)
					check_lut_group(k, bits, lut_dims[a], 67, g, off);
}

/* Masked rows (mask_expand) against scalar, bit for bit; the layout is test_kernels.c's mask_case. */
static void check_mask(const struct kvp_kernels *k, unsigned d, unsigned n, unsigned off, int with_signs)
{
	const size_t mbytes = (d + 7) / 8, stride = 2 * mbytes + 1, kept_stride = d + 2;
	unsigned last_kept = 0, bad = 0;
	size_t len;
	uint8_t *rows;
	float *scale = rand_f32(n, off), *mag = rand_f32(d, off), *kept, *got, *want;
	int ok = 1;

	/* the random rows are drawn first, so the last row's kept count sizes the exact buffers */
	uint8_t *draft = xmalloc(n * stride + off);
	for (size_t i = 0; i < n * stride + off; i++)
		draft[i] = (uint8_t)rnd32();
	for (unsigned i = 0; i < n; i++) {
		uint8_t *mask = draft + off + i * stride;
		if (i % 4 == 1 || i % 4 == 3)
			memset(mask, i % 4 == 1 ? 0xff : 0x00, mbytes);
		last_kept = 0;
		for (unsigned j = 0; j < d; j++)
			last_kept += mask[j >> 3] >> (j & 7) & 1;
	}
	len = off + (n - 1) * stride + mbytes + (d - last_kept + 7) / 8;
	rows = xmalloc(len);
	memcpy(rows, draft, len);
	free(draft);
	kept = rand_f32((n - 1) * kept_stride + last_kept, off);
	got = xmalloc(((size_t)n * d + off) * sizeof *got);
	want = xmalloc(((size_t)n * d + off) * sizeof *want);
	kvp_kernels_scalar.mask_expand(d, n, rows + off, with_signs ? rows + off + mbytes : NULL, stride,
				       kept + off, kept_stride, scale + off, mag + off, want + off);
	k->mask_expand(d, n, rows + off, with_signs ? rows + off + mbytes : NULL, stride, kept + off, kept_stride,
		       scale + off, mag + off, got + off);
	for (size_t at = 0; at < (size_t)n * d && ok; at++, bad = (unsigned)at)
		ok = bits_of(got[off + at]) == bits_of(want[off + at]);
	check(ok, "%s mask_expand d=%u n=%u off=%u signs=%d: value %u", k->name, d, n, off, with_signs, bad);
	free(rows), free(scale), free(mag), free(kept), free(got), free(want);
}

static void check_masks(const struct kvp_kernels *k)
{
	static const unsigned mask_dims[] = { 1, 3, 7, 8, 9, 16, 31, 48, 64, 65, 80, 127, 128 };

	for (size_t a = 0; a < COUNT(mask_dims); a++)
		for (size_t b = 0; b < COUNT(counts); b++)
			for (unsigned off = 0; off < 3; off += 1)
				for (int signs = 0; signs < 2; signs++)
					check_mask(k, mask_dims[a], counts[b], off, signs);
}

static void check_against_scalar(const struct kvp_kernels *k)
{
	check_masks(k);
	check_luts(k);
	for (size_t a = 0; a < COUNT(dims); a++) {
		for (size_t b = 0; b < COUNT(counts); b++) {
			for (unsigned off = 0; off < 2; off++) {
				check_dot(k, 0, dims[a], counts[b], off);
				check_dot(k, 1, dims[a], counts[b], off);
				check_axpy(k, 0, dims[a], counts[b], off);
				check_axpy(k, 1, dims[a], counts[b], off);
				for (unsigned g = 1; g <= 8; g++)
					check_group(k, dims[a], counts[b], g, off);
			}
		}
		for (unsigned off = 0; off < 2; off++) {
			check_scale(k, dims[a], off);
			for (int masked = 0; masked < 2; masked++) {
				check_softmax(k, dims[a], off, 8.0f, masked);
				check_softmax(k, dims[a], off, 120.0f, masked);
			}
		}
		check_softmax_all_masked(k, dims[a]);
	}
	check_f32_to_f16(k);
	check_f32_to_f16_sweep(k);
	check_f16_to_f32(k);
	check_band_norms(k);
}

/* The reference itself: every half survives the trip through f32 (NaNs as some NaN). */
static void check_scalar_round_trip(void)
{
	uint16_t *h = xmalloc(65536 * sizeof *h), *back = xmalloc(65536 * sizeof *back);
	float *f = xmalloc(65536 * sizeof *f);
	uint32_t i;

	for (i = 0; i < 65536; i++)
		h[i] = (uint16_t)i;
	kvp_kernels_scalar.f16_to_f32(65536, h, f);
	kvp_kernels_scalar.f32_to_f16(65536, f, back);
	for (i = 0; i < 65536; i++) {
		int nan = (h[i] & 0x7c00) == 0x7c00 && (h[i] & 0x3ff);

		if (nan ? !((back[i] & 0x7c00) == 0x7c00 && (back[i] & 0x3ff)) : back[i] != h[i])
			break;
	}
	check(i == 65536, "scalar f16 round trip: %04x came back as %04x", i < 65536 ? h[i] : 0,
	      i < 65536 ? back[i] : 0);
	free(h);
	free(back);
	free(f);
}

/* CRC32C: the reference against the published check value, then every hardware version against the
 * reference over lengths around the 8-byte stride and the three-lane split, unaligned starts, and
 * continuation piece by piece. */
static void check_crc32c(void)
{
	static const char *const hw[] = { "sse42", "armv8" };
	static const size_t lanes[] = { 6143, 6144, 6145, 6151, 12288 + 5, 20000, 49999 };
	static unsigned char buf[50100];
	unsigned ran = 0;

	check(kvp_crc32c_scalar(0, "123456789", 9) == 0xe3069283u, "scalar crc32c check value: %08x",
	      kvp_crc32c_scalar(0, "123456789", 9));
	check(kvp_crc32c_scalar(0, "", 0) == 0, "scalar crc32c of nothing");
	for (size_t i = 0; i < sizeof buf; i++)
		buf[i] = (unsigned char)rnd32();
	for (size_t i = 0; i < COUNT(hw); i++) {
		kvp_crc32c_fn f = kvp_crc32c_named(hw[i]);

		if (!f)
			continue;
		printf("checking crc32c %s against scalar\n", hw[i]);
		ran++;
		check(f(0, "123456789", 9) == 0xe3069283u, "crc32c %s check value", hw[i]);
		for (size_t off = 0; off < 8; off++)
			for (size_t n = 0; n + off <= 1030; n += (n < 40 ? 1 : 61)) {
				uint32_t want = kvp_crc32c_scalar(0, buf + off, n);
				uint32_t split = f(f(0, buf + off, n / 3), buf + off + n / 3, n - n / 3);

				check(f(0, buf + off, n) == want, "crc32c %s: %zu bytes at +%zu", hw[i], n, off);
				check(split == want, "crc32c %s continued: %zu bytes at +%zu", hw[i], n, off);
			}
		/* three-lane inputs */
		for (size_t off = 0; off < 8; off += 3)
			for (size_t j = 0; j < COUNT(lanes); j++)
				check(f(0, buf + off, lanes[j]) == kvp_crc32c_scalar(0, buf + off, lanes[j]),
				      "crc32c %s: %zu bytes at +%zu", hw[i], lanes[j], off);
	}
	if (!ran)
		printf("no hardware crc32c runnable here; checked the reference only\n");
}

int main(void)
{
	static const char *const vector[] = { "avx2", "neon" };
	unsigned ran = 0;

	check_scalar_round_trip();
	check_crc32c();
	for (size_t i = 0; i < COUNT(vector); i++) {
		const struct kvp_kernels *k = kvp_kernels_named(vector[i]);

		if (!k)
			continue;
		printf("checking %s against scalar\n", k->name);
		check_against_scalar(k);
		ran++;
	}
	if (!ran)
		printf("no vector kernels runnable here; checked the scalar reference only\n");
	printf("%u passed, %u failed\n", passed, failed);
	return failed != 0;
}
