/*
 * The kernels suite: the scalar reference against double-precision arithmetic and exact fp16 rules, every
 * vector table runnable here against the scalar one, CRC32C's versions against its reference, and the
 * dispatch rules. A plain program, not Criterion, so the same source runs natively (make suites) and,
 * cross-built and statically linked, under qemu-aarch64 (make neon).
 *
 * Each test is a function; each value it compares is one comparison. The output names every failed
 * comparison (the first few of each test), then two counts for tests/run.sh:
 *   "K comparisons: N passed, M failed"   values compared
 *   "N passed, M failed"                  tests (a test passes when all its comparisons do)
 * and the exit status is 0 iff no test failed. The vector tests run once per vector table runnable here
 * (named "avx2_...", "avx2-vnni_...", "avx512_...", "neon_...", "neon-dotprod_..."); those of a table this build
 * or CPU cannot
 * run are counted as skipped.
 *
 * Tolerances:
 *   dot, axpy   |vector - scalar| <= 1e-5 * sum of |products| (summation order and FMA differ; a plain
 *               relative bound means nothing when the terms cancel); lut_dot, lut_axpy the same; avx512 sums
 *               in 16 lanes where avx2 sums in 8, under the same bound
 *   f32_to_f16  bit-identical, NaN payloads included
 *   f16_to_f32  bit-identical, except a NaN need only stay a NaN of the same sign (F16C quiets signalling
 *               NaNs, base/half.c keeps them signalling)
 *   scale       bit-identical
 *   band_norms  bit-identical (products, sum and square root each rounded, never fused)
 *   mask_expand bit-identical
 *   lut_dot_i8_group, lut_axpy_i16_group,
 *   lut_axpy_u8_group                      equal (exact integers)
 *   dot_i8_scaled, axpy_i16_scaled,
 *   axpy_u8_scaled                         equal (exact integers, the same float steps)
 *   softmax     weights, running sum and factor within 1e-6 relative (+1e-30 absolute for underflow);
 *               the running maximum exact; softmax_group's scaled scores (raw) bit-identical, and its
 *               results bit-identical to the same table's scale then softmax_step
 *   crc32c      equal
 *
 * The dispatch tests call setenv before the first kvp_kernels() of their process, so each runs in a
 * forked child of its own: the process's cached choice would otherwise leak between them.
 */
#include <math.h>
#if defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__aarch64__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "base/base.h"
#include "kernels/crc32c.h"
#include "kernels/kernels.h"

#define DOT_TOL 1e-5
#define SOFTMAX_TOL 1e-6
#define UNDERFLOW_TOL 1e-30
/* failed comparisons printed per test; the rest are only counted */
#define SHOWN_FAILURES 10

static const unsigned dims[] = { 1, 3, 7, 8, 9, 31, 64, 65, 127, 128 };
static const unsigned counts[] = { 1, 2, 5, 64, 67 };
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

/* Counts of comparisons, in shared memory so that a dispatch test's forked child adds to them too. */
struct tally {
	unsigned long passed, failed;
	unsigned long failed_in_test; /* failed comparisons of the running test */
	char test[160];               /* its name, for the failure lines */
};

static struct tally *tally;

static void check(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void check(int ok, const char *fmt, ...)
{
	va_list ap;

	if (ok) {
		tally->passed++;
		return;
	}
	tally->failed++;
	if (tally->failed_in_test++ >= SHOWN_FAILURES)
		return;
	printf("FAIL %s: ", tally->test);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
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

static uint64_t rng_state = 0x2545f4914f6cdd1du;

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

/* Sized exactly (plus the offset) so that a kernel reading past the end shows up under ASan. */
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

static float *copy_f32(const float *x, size_t n)
{
	float *p = xmalloc(n * sizeof *p);

	memcpy(p, x, n * sizeof *p);
	return p;
}

static int same_f32(float a, float b)
{
	if (isnan(a) || isnan(b))
		return isnan(a) && isnan(b) && signbit(a) == signbit(b);
	return bits_of(a) == bits_of(b);
}

static int is_nan_f16(uint16_t h)
{
	return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu);
}

/* ---- dot and axpy against the scalar reference ---- */

static double row_value(const float *rows, const uint16_t *hrows, size_t at)
{
	return hrows ? kvp_f16_to_f32(hrows[at]) : rows[at];
}

static void dot_case(const struct kvp_kernels *k, int half, unsigned d, unsigned n, unsigned off)
{
	const float scale = 0.125f;
	float *q = rand_f32(d, off), *rows = half ? NULL : rand_f32((size_t)n * d, off);
	uint16_t *hrows = half ? rand_f16((size_t)n * d, off) : NULL;
	float *want = rand_f32(n, off), *got = copy_f32(want, n + off);

	if (half) {
		kvp_kernels_scalar.dot_f16(d, n, hrows + off, q + off, scale, want + off);
		k->dot_f16(d, n, hrows + off, q + off, scale, got + off);
	} else {
		kvp_kernels_scalar.dot_f32(d, n, rows + off, q + off, scale, want + off);
		k->dot_f32(d, n, rows + off, q + off, scale, got + off);
	}
	for (unsigned i = 0; i < n; i++) {
		double mag = 0;

		for (unsigned j = 0; j < d; j++)
			mag += fabs(row_value(rows, hrows, off + (size_t)i * d + j) * q[off + j]);
		check(fabs(got[off + i] - want[off + i]) <= DOT_TOL * scale * mag + 1e-30,
			  "%s dot_%s d=%u n=%u off=%u row %u: %.9g, scalar %.9g", k->name,
			  half ? "f16" : "f32", d, n, off, i, got[off + i], want[off + i]);
	}
	free(q);
	free(rows);
	free(hrows);
	free(want);
	free(got);
}

static void axpy_case(const struct kvp_kernels *k, int half, unsigned d, unsigned n, unsigned off)
{
	float *w = rand_f32(n, off), *rows = half ? NULL : rand_f32((size_t)n * d, off);
	uint16_t *hrows = half ? rand_f16((size_t)n * d, off) : NULL;
	float *want = rand_f32(d, off), *got = copy_f32(want, d + off), *acc0 = copy_f32(want, d + off);

	if (half) {
		kvp_kernels_scalar.axpy_f16(d, n, hrows + off, w + off, want + off);
		k->axpy_f16(d, n, hrows + off, w + off, got + off);
	} else {
		kvp_kernels_scalar.axpy_f32(d, n, rows + off, w + off, want + off);
		k->axpy_f32(d, n, rows + off, w + off, got + off);
	}
	for (unsigned j = 0; j < d; j++) {
		double mag = fabs(acc0[off + j]);

		for (unsigned i = 0; i < n; i++)
			mag += fabs(w[off + i] * row_value(rows, hrows, off + (size_t)i * d + j));
		check(fabs(got[off + j] - want[off + j]) <= DOT_TOL * mag + 1e-30,
			  "%s axpy_%s d=%u n=%u off=%u column %u: %.9g, scalar %.9g", k->name,
			  half ? "f16" : "f32", d, n, off, j, got[off + j], want[off + j]);
	}
	free(w);
	free(rows);
	free(hrows);
	free(want);
	free(got);
	free(acc0);
}

typedef void (*case_fn)(const struct kvp_kernels *k, int half, unsigned d, unsigned n, unsigned off);

static void every_shape(const struct kvp_kernels *k, case_fn fn, int half, unsigned off)
{
	for (size_t a = 0; a < COUNT(dims); a++)
		for (size_t b = 0; b < COUNT(counts); b++)
			fn(k, half, dims[a], counts[b], off);
}

/* The group kernels against the scalar group kernels, head by head, for group sizes around the
 * vector versions' four-head blocks. */
static void group_case(const struct kvp_kernels *k, unsigned d, unsigned n, unsigned g, unsigned off)
{
	const float scale = 0.125f;
	uint16_t *rows = rand_f16((size_t)n * d, off);
	/* what the kernels prefetch: other rows, which must change nothing */
	uint16_t *ahead = rand_f16((size_t)n * d, off + 1);
	float *q = rand_f32((size_t)g * d, off), *w = rand_f32((size_t)g * n, off);
	float *want = rand_f32((size_t)g * n, off), *got = copy_f32(want, (size_t)g * n + off);
	float *acc_want = rand_f32((size_t)g * d, off), *acc_got = copy_f32(acc_want, (size_t)g * d + off);
	float *acc0 = copy_f32(acc_want, (size_t)g * d + off);

	kvp_kernels_scalar.dot_f16_group(d, n, rows + off, g, q + off, scale, want + off, NULL);
	k->dot_f16_group(d, n, rows + off, g, q + off, scale, got + off, ahead + off);
	kvp_kernels_scalar.axpy_f16_group(d, n, rows + off, g, w + off, acc_want + off, NULL);
	k->axpy_f16_group(d, n, rows + off, g, w + off, acc_got + off, ahead + off);
	for (unsigned h = 0; h < g; h++) {
		for (unsigned i = 0; i < n; i++) {
			size_t at = off + (size_t)h * n + i;
			double mag = 0;
			for (unsigned j = 0; j < d; j++)
				mag += fabs(kvp_f16_to_f32(rows[off + (size_t)i * d + j]) * q[off + (size_t)h * d + j]);
			check(fabs(got[at] - want[at]) <= DOT_TOL * scale * mag + 1e-30,
				  "%s dot_f16_group d=%u n=%u g=%u off=%u head %u row %u: %.9g, scalar %.9g",
				  k->name, d, n, g, off, h, i, got[at], want[at]);
		}
		for (unsigned j = 0; j < d; j++) {
			size_t at = off + (size_t)h * d + j;
			double mag = fabs(acc0[at]);
			for (unsigned i = 0; i < n; i++)
				mag += fabs(w[off + (size_t)h * n + i] * kvp_f16_to_f32(rows[off + (size_t)i * d + j]));
			check(fabs(acc_got[at] - acc_want[at]) <= DOT_TOL * mag + 1e-30,
				  "%s axpy_f16_group d=%u n=%u g=%u off=%u head %u column %u: %.9g, scalar %.9g",
				  k->name, d, n, g, off, h, j, acc_got[at], acc_want[at]);
		}
	}
	free(rows);
	free(ahead);
	free(q);
	free(w);
	free(want);
	free(got);
	free(acc_want);
	free(acc_got);
	free(acc0);
}

static void every_group(const struct kvp_kernels *k, unsigned off)
{
	for (size_t a = 0; a < COUNT(dims); a++)
		for (size_t b = 0; b < COUNT(counts); b++)
			for (unsigned g = 1; g <= 8; g++)
				group_case(k, dims[a], counts[b], g, off);
}

/* The prefetch hint changes when bytes arrive, never what is computed: the same kernel with and
 * without ahead gives the same bits. */
static void ahead_case(const struct kvp_kernels *k, unsigned d, unsigned n, unsigned g)
{
	uint16_t *rows = rand_f16((size_t)n * d, 0), *ahead = rand_f16((size_t)n * d, 0);
	float *q = rand_f32((size_t)g * d, 0), *w = rand_f32((size_t)g * n, 0);
	float *plain = rand_f32((size_t)g * n, 0), *hinted = copy_f32(plain, (size_t)g * n);
	float *acc_plain = rand_f32((size_t)g * d, 0), *acc_hinted = copy_f32(acc_plain, (size_t)g * d);

	k->dot_f16_group(d, n, rows, g, q, 0.125f, plain, NULL);
	k->dot_f16_group(d, n, rows, g, q, 0.125f, hinted, ahead);
	k->axpy_f16_group(d, n, rows, g, w, acc_plain, NULL);
	k->axpy_f16_group(d, n, rows, g, w, acc_hinted, ahead);
	check(!memcmp(plain, hinted, (size_t)g * n * sizeof *plain),
		  "%s dot_f16_group d=%u n=%u g=%u: ahead changed the scores", k->name, d, n, g);
	check(!memcmp(acc_plain, acc_hinted, (size_t)g * d * sizeof *acc_plain),
		  "%s axpy_f16_group d=%u n=%u g=%u: ahead changed the sums", k->name, d, n, g);
	free(rows), free(ahead), free(q), free(w), free(plain), free(hinted), free(acc_plain), free(acc_hinted);
}

static void every_ahead(const struct kvp_kernels *k)
{
	static const unsigned groups[] = { 1, 2, 4, 8 };

	for (size_t a = 0; a < COUNT(dims); a++)
		for (size_t b = 0; b < COUNT(counts); b++)
			for (size_t c = 0; c < COUNT(groups); c++)
				ahead_case(k, dims[a], counts[b], groups[c]);
}

static void scale_case(const struct kvp_kernels *k, unsigned d, unsigned off)
{
	float *want = rand_f32(d, off), *got = copy_f32(want, d + off);

	kvp_kernels_scalar.scale(d, -0.37f, want + off);
	k->scale(d, -0.37f, got + off);
	check(!memcmp(want + off, got + off, d * sizeof *got), "%s scale d=%u off=%u: not bit-identical",
		  k->name, d, off);
	free(want);
	free(got);
}

/* ---- fp16 conversion ---- */

/* zeros, subnormal and normal edges, ties, the overflow threshold 65520, infinities, NaN payloads */
static const uint32_t special_bits[] = {
	0x00000000, 0x80000000, 0x00000001, 0x33000000, 0x33000001, 0x337fffff, 0x33800000, 0x33c00000,
	0x387fc000, 0x387fe000, 0x387fffff, 0x38800000, 0x3f800000, 0x3f801000, 0x3f803000, 0x3f801001,
	0x477fe000, 0x477fefff, 0x477ff000, 0x477ff001, 0x47800000, 0x7f7fffff, 0x7f800000, 0xff800000,
	0x7f800001, 0x7fa00000, 0x7fc00000, 0xffc00001, 0x7f802000, 0x7fbfffff, 0xfffffff0, 0x00800000,
	0xb3000000, 0x80000001, 0xc77ff000, 0xc77fefff, 0x387fefff, 0x38000000, 0x37ffffff, 0x3f7ff000,
};

static void f32_to_f16_case(const struct kvp_kernels *k, const float *x, size_t n, unsigned off)
{
	float *xs = xmalloc((n + off) * sizeof *xs);
	uint16_t *want = xmalloc(n * sizeof *want), *got = xmalloc((n + off) * sizeof *got);

	memcpy(xs + off, x, n * sizeof *x);
	kvp_kernels_scalar.f32_to_f16(n, xs + off, want);
	k->f32_to_f16(n, xs + off, got + off);
	for (size_t i = 0; i < n; i++)
		check(got[off + i] == want[i], "%s f32_to_f16 n=%zu off=%u: %08x -> %04x, scalar %04x",
			  k->name, n, off, bits_of(x[i]), got[off + i], want[i]);
	free(xs);
	free(want);
	free(got);
}

static void f32_to_f16_special(const struct kvp_kernels *k)
{
	float x[COUNT(special_bits)];

	for (size_t i = 0; i < COUNT(x); i++)
		x[i] = float_of(special_bits[i]);
	for (unsigned off = 0; off < 2; off++)
		f32_to_f16_case(k, x, COUNT(x), off);
}

/* The exact midpoint above every finite half, both signs: all ties, half of them to round up. */
static void f32_to_f16_ties(const struct kvp_kernels *k)
{
	enum { N = 2 * 0x7c00 };
	float *x = xmalloc(N * sizeof *x);

	for (uint32_t h = 0; h < 0x7c00; h++) {
		double lo = kvp_f16_to_f32((uint16_t)h), hi = kvp_f16_to_f32((uint16_t)(h + 1));

		x[2 * h] = (float)((lo + hi) / 2);
		x[2 * h + 1] = -x[2 * h];
	}
	f32_to_f16_case(k, x, N, 0);
	f32_to_f16_case(k, x, N - 3, 1);
	free(x);
}

/* A stride through all 2^32 bit patterns, so every exponent meets varied low mantissa bits. */
static void f32_to_f16_sweep(const struct kvp_kernels *k)
{
	enum { CHUNK = 4096, STRIDE = 4093 };
	float x[CHUNK];
	uint16_t want[CHUNK], got[CHUNK];
	uint32_t u = 0;

	for (uint64_t done = 0; done < (1ull << 32); done += (uint64_t)CHUNK * STRIDE) {
		for (unsigned i = 0; i < CHUNK; i++, u += STRIDE)
			x[i] = float_of(u);
		kvp_kernels_scalar.f32_to_f16(CHUNK, x, want);
		k->f32_to_f16(CHUNK, x, got);
		for (unsigned i = 0; i < CHUNK; i++)
			check(got[i] == want[i], "%s f32_to_f16: %08x -> %04x, scalar %04x", k->name,
				  bits_of(x[i]), got[i], want[i]);
	}
}

static void f32_to_f16_tails(const struct kvp_kernels *k)
{
	float x[40];

	for (size_t i = 0; i < COUNT(x); i++)
		x[i] = i % 4 ? 1000.0f * rndf() : float_of(special_bits[i]);
	for (size_t n = 1; n <= COUNT(x); n++)
		for (unsigned off = 0; off < 2; off++)
			f32_to_f16_case(k, x, n, off);
}

static void f16_to_f32_case(const struct kvp_kernels *k, uint32_t first, size_t n, unsigned off)
{
	uint16_t *h = xmalloc((n + off) * sizeof *h);
	float *want = xmalloc(n * sizeof *want), *got = xmalloc((n + off) * sizeof *got);

	for (size_t i = 0; i < n; i++)
		h[off + i] = (uint16_t)(first + i);
	kvp_kernels_scalar.f16_to_f32(n, h + off, want);
	k->f16_to_f32(n, h + off, got + off);
	for (size_t i = 0; i < n; i++)
		check(same_f32(got[off + i], want[i]),
			  "%s f16_to_f32 n=%zu off=%u: %04x -> %08x, scalar %08x", k->name, n, off,
			  h[off + i], bits_of(got[off + i]), bits_of(want[i]));
	free(h);
	free(want);
	free(got);
}

/* ---- online softmax ---- */

static int softmax_close(float got, float want)
{
	if (isinf(want) || isnan(want))
		return same_f32(got, want);
	return fabs(got - want) <= SOFTMAX_TOL * fabs(want) + UNDERFLOW_TOL;
}

/* Scores in [-spread, spread]; with masked set, every fifth is -inf as a causal or padding mask gives. */
static void fill_scores(float *s, unsigned n, float spread, int masked)
{
	for (unsigned i = 0; i < n; i++)
		s[i] = masked && i % 5 == 2 ? -INFINITY : spread * rndf();
}

/* Three consecutive blocks, as attention walks a sequence, compared with scalar after every step. */
static void softmax_case(const struct kvp_kernels *k, unsigned n, unsigned off, float spread, int masked)
{
	float *want = xmalloc((n + off) * sizeof *want), *got = xmalloc((n + off) * sizeof *got);
	float wm = -INFINITY, wl = 0, gm = -INFINITY, gl = 0;

	for (unsigned step = 0; step < 3; step++) {
		fill_scores(want + off, n, spread, masked);
		memcpy(got + off, want + off, n * sizeof *got);

		float wc = kvp_kernels_scalar.softmax_step(n, want + off, &wm, &wl);
		float gc = k->softmax_step(n, got + off, &gm, &gl);

		for (unsigned i = 0; i < n; i++)
			check(softmax_close(got[off + i], want[off + i]),
				  "%s softmax n=%u off=%u spread=%g step %u: s[%u] = %.9g, scalar %.9g",
				  k->name, n, off, (double)spread, step, i, got[off + i], want[off + i]);
		check(softmax_close(gc, wc), "%s softmax n=%u step %u: factor %.9g, scalar %.9g",
			  k->name, n, step, gc, wc);
		check(same_f32(gm, wm), "%s softmax n=%u step %u: max %.9g, scalar %.9g",
			  k->name, n, step, gm, wm);
		check(softmax_close(gl, wl), "%s softmax n=%u step %u: sum %.9g, scalar %.9g",
			  k->name, n, step, gl, wl);
	}
	free(want);
	free(got);
}

static void softmax_shapes(const struct kvp_kernels *k, unsigned off)
{
	for (size_t a = 0; a < COUNT(dims); a++)
		for (int masked = 0; masked < 2; masked++)
			softmax_case(k, dims[a], off, 8.0f, masked);
}

/* Spreads of +-120 push exp far into underflow; masked scores must come out exactly 0. */
static void softmax_extremes(const struct kvp_kernels *k)
{
	for (size_t a = 0; a < COUNT(dims); a++)
		for (unsigned off = 0; off < 2; off++)
			for (int masked = 0; masked < 2; masked++)
				softmax_case(k, dims[a], off, 120.0f, masked);
}

static void softmax_first_block(const struct kvp_kernels *k)
{
	for (size_t a = 0; a < COUNT(dims); a++) {
		unsigned n = dims[a];
		float s[128] = { 0 }, m = -INFINITY, l = 0;

		fill_scores(s, n, 8.0f, 0);

		float top = s[0];

		for (unsigned i = 1; i < n; i++)
			top = fmaxf(top, s[i]);
		float c = k->softmax_step(n, s, &m, &l);

		check(c == 0.0f, "%s n=%u: first block factor %g, not 0", k->name, n, c);
		check(m == top, "%s n=%u: max %g, want %g", k->name, n, m, top);
	}
}

static void softmax_all_masked(const struct kvp_kernels *k)
{
	for (size_t a = 0; a < COUNT(dims); a++) {
		unsigned n = dims[a];
		float s[128], m = -INFINITY, l = 0;

		for (unsigned i = 0; i < n; i++)
			s[i] = -INFINITY;

		float c = k->softmax_step(n, s, &m, &l);

		check(c == 0.0f && l == 0.0f && m == -INFINITY, "%s n=%u: factor %g sum %g max %g",
			  k->name, n, c, l, m);
		for (unsigned i = 0; i < n; i++)
			check(bits_of(s[i]) == 0, "%s n=%u: weight %u is %g, not +0",
				  k->name, n, i, s[i]);
	}
}

/*
 * Blocks of uneven sizes composed as the pager does: earlier weights rescaled by each returned factor,
 * divided by the final sum at the end, against softmax over all scores in double precision.
 */
static void softmax_composed(const struct kvp_kernels *k)
{
	static const unsigned blocks[] = { 64, 5, 67, 1, 64, 31 };
	float s[400], p[400], m = -INFINITY, l = 0;
	unsigned total = 0;

	for (size_t b = 0; b < COUNT(blocks); b++) {
		unsigned n = blocks[b];

		/* later blocks drift upwards so the running maximum moves */
		for (unsigned i = 0; i < n; i++)
			s[total + i] = 6.0f * rndf() + (float)b;
		memcpy(p + total, s + total, n * sizeof *p);

		float c = k->softmax_step(n, p + total, &m, &l);

		for (unsigned i = 0; i < total; i++)
			p[i] *= c;
		total += n;
	}

	double top = -INFINITY, sum = 0, psum = 0;

	for (unsigned i = 0; i < total; i++)
		top = fmax(top, s[i]);
	for (unsigned i = 0; i < total; i++)
		sum += exp((double)s[i] - top);
	for (unsigned i = 0; i < total; i++) {
		double want = exp((double)s[i] - top) / sum, got = (double)p[i] / l;

		check(fabs(got - want) <= SOFTMAX_TOL * want, "%s p[%u] = %.9g, reference %.9g",
			  k->name, i, got, want);
		psum += got;
	}
	check(fabs(psum - 1.0) <= SOFTMAX_TOL, "%s probabilities sum to %.9g", k->name, psum);
	check(m == (float)top, "%s max %g, reference %g", k->name, m, top);
}

/*
 * softmax_group over three consecutive blocks of g heads, scaled by scale_by, against the scalar table's
 * softmax_group (close; the scaled scores written to raw exact, and nothing past each head's n written)
 * and, when own_bits, against the same table's scale then softmax_step on each head (the same bits).
 */
enum { GROUP_MOST = 5, RAW_PAD = 3 };

static void softmax_group_case(const struct kvp_kernels *k, unsigned n, unsigned g, unsigned off, float scale_by,
			       int masked, int own_bits)
{
	const size_t len = (size_t)g * n + off, raw_stride = n + RAW_PAD;
	float *want = xmalloc(len * sizeof *want), *got = xmalloc(len * sizeof *got), *own = xmalloc(len * sizeof *own);
	float *wraw = xmalloc(g * raw_stride * sizeof *wraw), *graw = xmalloc(g * raw_stride * sizeof *graw);
	float wm[GROUP_MOST], wl[GROUP_MOST], gm[GROUP_MOST], gl[GROUP_MOST], om[GROUP_MOST], ol[GROUP_MOST];
	float wc[GROUP_MOST], gc[GROUP_MOST], oc[GROUP_MOST];

	for (unsigned h = 0; h < g; h++)
		wm[h] = gm[h] = om[h] = -INFINITY, wl[h] = gl[h] = ol[h] = 0.0f;
	for (unsigned step = 0; step < 3; step++) {
		fill_scores(want + off, g * n, 8.0f / scale_by, masked);
		memcpy(got + off, want + off, g * n * sizeof *got);
		memcpy(own + off, want + off, g * n * sizeof *own);
		for (size_t i = 0; i < g * raw_stride; i++)
			wraw[i] = graw[i] = 12345.0f;

		kvp_kernels_scalar.softmax_group(n, g, scale_by, want + off, wraw, raw_stride, wm, wl, wc);
		k->softmax_group(n, g, scale_by, got + off, graw, raw_stride, gm, gl, gc);
		k->scale(g * n, scale_by, own + off);
		for (unsigned h = 0; h < g; h++)
			oc[h] = k->softmax_step(n, own + off + (size_t)h * n, &om[h], &ol[h]);

		for (size_t i = 0; i < g * raw_stride; i++)
			check(same_f32(graw[i], wraw[i]), "%s softmax_group n=%u g=%u off=%u step %u: raw[%zu] = %.9g, scalar %.9g",
			      k->name, n, g, off, step, i, graw[i], wraw[i]);
		for (size_t i = 0; i < (size_t)g * n; i++) {
			check(softmax_close(got[off + i], want[off + i]),
			      "%s softmax_group n=%u g=%u off=%u step %u: s[%zu] = %.9g, scalar %.9g",
			      k->name, n, g, off, step, i, got[off + i], want[off + i]);
			check(!own_bits || same_f32(got[off + i], own[off + i]),
			      "%s softmax_group n=%u g=%u off=%u step %u: s[%zu] = %.9g, scale then softmax_step %.9g",
			      k->name, n, g, off, step, i, got[off + i], own[off + i]);
		}
		for (unsigned h = 0; h < g; h++) {
			check(same_f32(gm[h], wm[h]) && softmax_close(gl[h], wl[h]) && softmax_close(gc[h], wc[h]),
			      "%s softmax_group n=%u g=%u step %u head %u: max %.9g sum %.9g factor %.9g, scalar %.9g %.9g %.9g",
			      k->name, n, g, step, h, gm[h], gl[h], gc[h], wm[h], wl[h], wc[h]);
			check(!own_bits || (same_f32(gm[h], om[h]) && same_f32(gl[h], ol[h]) && same_f32(gc[h], oc[h])),
			      "%s softmax_group n=%u g=%u step %u head %u: max %.9g sum %.9g factor %.9g, scale then softmax_step %.9g %.9g %.9g",
			      k->name, n, g, step, h, gm[h], gl[h], gc[h], om[h], ol[h], oc[h]);
		}
	}
	free(want);
	free(got);
	free(own);
	free(wraw);
	free(graw);
}

static void softmax_group_shapes(const struct kvp_kernels *k, int own_bits)
{
	static const float scales[] = { 1.0f, 0.125f, 0.08838835f };

	for (size_t a = 0; a < COUNT(dims); a++)
		for (unsigned g = 1; g <= GROUP_MOST; g++)
			for (unsigned off = 0; off < 2; off++)
				for (int masked = 0; masked < 2; masked++)
					softmax_group_case(k, dims[a], g, off, scales[(a + g) % COUNT(scales)], masked, own_bits);
}

/* Without raw, nothing is written but the weights, which are those of a call with raw. */
static void softmax_group_without_raw(const struct kvp_kernels *k)
{
	enum { N = 65, G = 4 };
	float s[G * N], t[G * N], raw[G * N], m1[G], l1[G], c1[G], m2[G], l2[G], c2[G];

	fill_scores(s, G * N, 64.0f, 1);
	memcpy(t, s, sizeof s);
	for (unsigned h = 0; h < G; h++)
		m1[h] = m2[h] = -INFINITY, l1[h] = l2[h] = 0.0f;
	k->softmax_group(N, G, 0.125f, s, NULL, 0, m1, l1, c1);
	k->softmax_group(N, G, 0.125f, t, raw, N, m2, l2, c2);
	for (unsigned i = 0; i < G * N; i++)
		check(same_f32(s[i], t[i]), "%s softmax_group without raw: s[%u] = %.9g, with raw %.9g", k->name, i, s[i], t[i]);
	for (unsigned h = 0; h < G; h++)
		check(same_f32(m1[h], m2[h]) && same_f32(l1[h], l2[h]) && same_f32(c1[h], c2[h]),
		      "%s softmax_group without raw: head %u differs", k->name, h);
}

/* ---- the scalar reference on its own ---- */

static void scalar_f16_round_trips_every_half(void)
{
	static uint16_t h[65536], back[65536];
	static float f[65536];

	for (uint32_t i = 0; i < 65536; i++)
		h[i] = (uint16_t)i;
	kvp_kernels_scalar.f16_to_f32(65536, h, f);
	kvp_kernels_scalar.f32_to_f16(65536, f, back);
	for (uint32_t i = 0; i < 65536; i++) {
		if (is_nan_f16(h[i]))
			check(is_nan_f16(back[i]) && isnan(f[i]), "NaN %04x came back as %04x",
				  h[i], back[i]);
		else
			check(back[i] == h[i], "%04x -> %a -> %04x", h[i], (double)f[i], back[i]);
	}
}

static void scalar_f32_to_f16_rounds_ties_to_even(void)
{
	static const struct { float x; uint16_t h; } cases[] = {
		{ 1.0f + 0x1p-11f, 0x3c00 },	    /* tie between 1 and 1+2^-10: even is 1 */
		{ 1.0f + 3 * 0x1p-11f, 0x3c02 },    /* tie between 1+2^-10 and 1+2^-9: even is up */
		{ 1.0f + 0x1p-11f + 0x1p-23f, 0x3c01 },
		{ -(1.0f + 0x1p-11f), 0xbc00 },
		{ 0x1p-25f, 0x0000 },		    /* half the smallest subnormal: ties to 0 */
		{ 3 * 0x1p-25f, 0x0002 },	    /* between subnormals 1 and 2: to 2 */
		{ 0x1p-25f + 0x1p-40f, 0x0001 },
		{ 2047 * 0x1p-25f, 0x0400 },	    /* largest subnormal tie rounds up into the normals */
		{ 65504.0f, 0x7bff },
		{ 65519.99f, 0x7bff },
		{ 65520.0f, 0x7c00 },		    /* the tie above the largest half overflows */
		{ -65520.0f, 0xfc00 },
		{ 1e10f, 0x7c00 },
		{ 0x1p-14f, 0x0400 },
	};

	for (size_t i = 0; i < COUNT(cases); i++) {
		uint16_t h;

		kvp_kernels_scalar.f32_to_f16(1, &cases[i].x, &h);
		check(h == cases[i].h, "%a -> %04x, want %04x", (double)cases[i].x, h, cases[i].h);
	}
}

static void scalar_f32_to_f16_keeps_signed_zeros_infinities_and_nans(void)
{
	static const float x[] = { 0.0f, -0.0f, INFINITY, -INFINITY, NAN, -NAN };
	uint16_t h[COUNT(x)];

	kvp_kernels_scalar.f32_to_f16(COUNT(x), x, h);
	check(h[0] == 0x0000 && h[1] == 0x8000, "zeros: %04x %04x", h[0], h[1]);
	check(h[2] == 0x7c00 && h[3] == 0xfc00, "infinities: %04x %04x", h[2], h[3]);
	check(is_nan_f16(h[4]) && is_nan_f16(h[5]) && !(h[4] & 0x8000) && (h[5] & 0x8000),
		  "NaNs: %04x %04x", h[4], h[5]);
}

static void scalar_dot_and_axpy_match_double_precision(void)
{
	const unsigned d = 65, n = 67;
	float *rows = rand_f32((size_t)n * d, 0), *q = rand_f32(d, 0), *w = rand_f32(n, 0);
	float *acc = rand_f32(d, 0), *acc0 = copy_f32(acc, d), out[67];

	kvp_kernels_scalar.dot_f32(d, n, rows, q, 0.5f, out);
	kvp_kernels_scalar.axpy_f32(d, n, rows, w, acc);
	for (unsigned i = 0; i < n; i++) {
		double want = 0, mag = 0;

		for (unsigned j = 0; j < d; j++) {
			want += (double)rows[i * d + j] * q[j];
			mag += fabs((double)rows[i * d + j] * q[j]);
		}
		check(fabs(out[i] - 0.5 * want) <= DOT_TOL * 0.5 * mag, "dot row %u: %.9g, want %.9g", i,
			  out[i], 0.5 * want);
	}
	for (unsigned j = 0; j < d; j++) {
		double want = acc0[j], mag = fabs(acc0[j]);

		for (unsigned i = 0; i < n; i++) {
			want += (double)w[i] * rows[i * d + j];
			mag += fabs((double)w[i] * rows[i * d + j]);
		}
		check(fabs(acc[j] - want) <= DOT_TOL * mag, "axpy column %u: %.9g, want %.9g",
			  j, acc[j], want);
	}
	free(rows);
	free(q);
	free(w);
	free(acc);
	free(acc0);
}

static void scalar_softmax_step_on_first_block_returns_zero(void)
{
	softmax_first_block(&kvp_kernels_scalar);
}

static void scalar_softmax_step_on_all_masked_block_gives_zero_weights(void)
{
	softmax_all_masked(&kvp_kernels_scalar);
}

static void scalar_softmax_step_composed_over_blocks_matches_double_reference(void)
{
	softmax_composed(&kvp_kernels_scalar);
}

/* The scores an observer is shown are the products s * scale, each head's at its own stride. */
static void scalar_softmax_group_shows_the_scaled_scores_and_weighs_them_per_head(void)
{
	enum { N = 9, G = 3, STRIDE = 11 };
	float s[G * N], in[G * N], raw[G * STRIDE], m[G], l[G], c[G];

	fill_scores(in, G * N, 30.0f, 1);
	memcpy(s, in, sizeof s);
	for (unsigned h = 0; h < G; h++)
		m[h] = -INFINITY, l[h] = 0.0f;
	kvp_kernels_scalar.softmax_group(N, G, 0.25f, s, raw, STRIDE, m, l, c);
	for (unsigned h = 0; h < G; h++) {
		float top = -INFINITY, sum = 0.0f;

		for (unsigned i = 0; i < N; i++) {
			check(same_f32(raw[h * STRIDE + i], in[h * N + i] * 0.25f), "head %u raw[%u] = %g, want %g", h, i,
			      raw[h * STRIDE + i], in[h * N + i] * 0.25f);
			top = fmaxf(top, in[h * N + i] * 0.25f);
		}
		for (unsigned i = 0; i < N; i++)
			sum += expf(in[h * N + i] * 0.25f - top);
		check(m[h] == top && c[h] == 0.0f, "head %u: max %g factor %g, want %g and 0", h, m[h], c[h], top);
		check(fabsf(l[h] - sum) <= 1e-6f * sum, "head %u: sum %.9g, want %.9g", h, l[h], sum);
	}
}

/* ---- each vector table against the scalar one ---- */

static void dot_f32_matches_scalar_on_odd_lengths(const struct kvp_kernels *k)
{
	every_shape(k, dot_case, 0, 0);
}
static void dot_f32_matches_scalar_on_unaligned_pointers(const struct kvp_kernels *k)
{
	every_shape(k, dot_case, 0, 1);
}
static void dot_f16_matches_scalar_on_odd_lengths(const struct kvp_kernels *k)
{
	every_shape(k, dot_case, 1, 0);
}
static void dot_f16_matches_scalar_on_unaligned_pointers(const struct kvp_kernels *k)
{
	every_shape(k, dot_case, 1, 1);
}
static void axpy_f32_matches_scalar_on_odd_lengths(const struct kvp_kernels *k)
{
	every_shape(k, axpy_case, 0, 0);
}
static void axpy_f32_matches_scalar_on_unaligned_pointers(const struct kvp_kernels *k)
{
	every_shape(k, axpy_case, 0, 1);
}
static void axpy_f16_matches_scalar_on_odd_lengths(const struct kvp_kernels *k)
{
	every_shape(k, axpy_case, 1, 0);
}
static void axpy_f16_matches_scalar_on_unaligned_pointers(const struct kvp_kernels *k)
{
	every_shape(k, axpy_case, 1, 1);
}
static void f16_group_kernels_match_scalar_for_every_group_size(const struct kvp_kernels *k)
{
	every_group(k, 0);
}
static void f16_group_kernels_match_scalar_on_unaligned_pointers(const struct kvp_kernels *k)
{
	every_group(k, 1);
}
static void f16_group_kernels_give_the_same_bits_whatever_they_prefetch(const struct kvp_kernels *k)
{
	every_ahead(k);
}
static void scale_is_bit_identical_to_scalar_on_odd_and_unaligned_lengths(const struct kvp_kernels *k)
{
	for (size_t a = 0; a < COUNT(dims); a++)
		for (unsigned off = 0; off < 2; off++)
			scale_case(k, dims[a], off);
}
static void f32_to_f16_is_bit_identical_on_zeros_subnormals_inf_nan_and_overflow(const struct kvp_kernels *k)
{
	f32_to_f16_special(k);
}
static void f32_to_f16_is_bit_identical_on_every_tie(const struct kvp_kernels *k)
{
	f32_to_f16_ties(k);
}
static void f32_to_f16_is_bit_identical_across_a_sweep_of_all_floats(const struct kvp_kernels *k)
{
	f32_to_f16_sweep(k);
}
static void f32_to_f16_is_bit_identical_on_odd_lengths_and_unaligned_pointers(const struct kvp_kernels *k)
{
	f32_to_f16_tails(k);
}
static void f16_to_f32_matches_scalar_on_every_half(const struct kvp_kernels *k)
{
	f16_to_f32_case(k, 0, 65536, 0);
	f16_to_f32_case(k, 0, 65536, 1);
}
static void f16_to_f32_matches_scalar_on_odd_lengths_and_unaligned_pointers(const struct kvp_kernels *k)
{
	/* runs ending past 0x7c00 put max-normal, inf and NaN in every tail position */
	for (size_t n = 1; n <= 20; n++)
		for (unsigned off = 0; off < 2; off++)
			f16_to_f32_case(k, 0x7bf0, n, off);
}
static void softmax_group_matches_scalar_for_every_group_size_scale_and_odd_length(const struct kvp_kernels *k)
{
	softmax_group_shapes(k, 0);
}
static void softmax_group_gives_the_bits_of_scale_then_softmax_step_per_head(const struct kvp_kernels *k)
{
	softmax_group_shapes(k, 1);
}
static void softmax_group_without_raw_gives_the_same_weights(const struct kvp_kernels *k)
{
	softmax_group_without_raw(k);
}
static void softmax_step_matches_scalar_on_odd_lengths(const struct kvp_kernels *k)
{
	softmax_shapes(k, 0);
}
static void softmax_step_matches_scalar_on_unaligned_pointers(const struct kvp_kernels *k)
{
	softmax_shapes(k, 1);
}
static void softmax_step_matches_scalar_with_masked_scores_and_underflow(const struct kvp_kernels *k)
{
	softmax_extremes(k);
}
static void softmax_step_on_first_block_returns_zero(const struct kvp_kernels *k)
{
	softmax_first_block(k);
}
static void softmax_step_on_all_masked_block_gives_zero_weights(const struct kvp_kernels *k)
{
	softmax_all_masked(k);
}
static void softmax_step_composed_over_blocks_matches_double_reference(const struct kvp_kernels *k)
{
	softmax_composed(k);
}


/* ---- packed codes (lut_dot, lut_axpy) against the scalar reference ---- */

static const unsigned lut_dims[] = { 1, 3, 7, 8, 9, 16, 31, 48, 64, 65, 80, 127, 128 };

/* n rows of m codes: random bytes (padding included, so stray bits would show), sized exactly. */
static uint8_t *rand_codes(unsigned n, size_t stride, size_t rowbytes, unsigned off)
{
	size_t len = (n ? (size_t)(n - 1) * stride + rowbytes : 0) + off;
	uint8_t *p = xmalloc(len ? len : 1);

	for (size_t i = 0; i < len; i++)
		p[i] = (uint8_t)rnd32();
	return p;
}

static unsigned code_of(const uint8_t *row, unsigned bits, unsigned j)
{
	unsigned v = 0;

	for (unsigned b = 0; b < bits; b++) {
		size_t o = (size_t)j * bits + b;
		v |= (unsigned)((row[o >> 3] >> (o & 7)) & 1) << b;
	}
	return v;
}

static void lut_case(const struct kvp_kernels *k, unsigned bits, unsigned m, unsigned n, unsigned off,
		     unsigned pad)
{
	const size_t rowbytes = ((size_t)m * bits + 7) / 8, stride = rowbytes + pad;
	uint8_t *codes = rand_codes(n, stride, rowbytes, off);
	float *lut = rand_f32(1u << bits, off), *q = rand_f32(m, off), *w = rand_f32(n, off);
	float *want = rand_f32(n > m ? n : m, off), *got = copy_f32(want, (n > m ? n : m) + off);

	k->lut_dot(bits, m, n, codes + off, stride, lut + off, q + off, got + off);
	kvp_kernels_scalar.lut_dot(bits, m, n, codes + off, stride, lut + off, q + off, want + off);
	for (unsigned i = 0; i < n; i++) {
		double mag = 0;
		for (unsigned j = 0; j < m; j++)
			mag += fabs(lut[off + code_of(codes + off + i * stride, bits, j)] * q[off + j]);
		check(fabs(got[off + i] - want[off + i]) <= DOT_TOL * mag + 1e-30,
			  "%s lut_dot bits=%u m=%u n=%u off=%u pad=%u row %u: %.9g, scalar %.9g", k->name, bits,
			  m, n, off, pad, i, got[off + i], want[off + i]);
	}
	for (unsigned j = 0; j < m; j++)
		got[off + j] = want[off + j] = q[off + j];
	k->lut_axpy(bits, m, n, codes + off, stride, lut + off, w + off, got + off);
	kvp_kernels_scalar.lut_axpy(bits, m, n, codes + off, stride, lut + off, w + off, want + off);
	for (unsigned j = 0; j < m; j++) {
		double mag = fabs(q[off + j]);
		for (unsigned i = 0; i < n; i++)
			mag += fabs(w[off + i] * lut[off + code_of(codes + off + i * stride, bits, j)]);
		check(fabs(got[off + j] - want[off + j]) <= DOT_TOL * mag + 1e-30,
			  "%s lut_axpy bits=%u m=%u n=%u off=%u pad=%u column %u: %.9g, scalar %.9g", k->name,
			  bits, m, n, off, pad, j, got[off + j], want[off + j]);
	}
	free(codes);
	free(lut);
	free(q);
	free(w);
	free(want);
	free(got);
}

static void lut_shapes(const struct kvp_kernels *k, unsigned off)
{
	for (unsigned bits = 1; bits <= 4; bits++)
		for (size_t a = 0; a < COUNT(lut_dims); a++)
			for (size_t b = 0; b < COUNT(counts); b++)
				for (unsigned pad = 0; pad < 4; pad += 3)
					lut_case(k, bits, lut_dims[a], counts[b], off, pad);
}

/* The group versions against the scalar single-head kernels, head by head, with q and acc rows apart
 * by a stride wider than m (as the codecs lay them out). */
static void lut_group_case(const struct kvp_kernels *k, unsigned bits, unsigned m, unsigned n, unsigned g,
			   unsigned off)
{
	const size_t rowbytes = ((size_t)m * bits + 7) / 8, stride = rowbytes + 1, qs = m + 3;
	uint8_t *codes = rand_codes(n, stride, rowbytes, off);
	float *lut = rand_f32(1u << bits, off), *q = rand_f32(g * qs, off), *w = rand_f32((size_t)g * n, off);
	float *got = rand_f32((size_t)g * n, off), *want = copy_f32(got, (size_t)g * n + off);
	float *acc = rand_f32(g * qs, off), *acc_want = copy_f32(acc, g * qs + off);

	k->lut_dot_group(bits, m, n, codes + off, stride, lut + off, g, q + off, qs, got + off);
	k->lut_axpy_group(bits, m, n, codes + off, stride, lut + off, g, w + off, acc + off, qs);
	for (unsigned h = 0; h < g; h++) {
		kvp_kernels_scalar.lut_dot(bits, m, n, codes + off, stride, lut + off, q + off + h * qs,
					   want + off + (size_t)h * n);
		kvp_kernels_scalar.lut_axpy(bits, m, n, codes + off, stride, lut + off, w + off + (size_t)h * n,
					    acc_want + off + h * qs);
		for (unsigned i = 0; i < n; i++) {
			size_t at = off + (size_t)h * n + i;
			check(fabs(got[at] - want[at]) <= DOT_TOL * m + 1e-30,
				  "%s lut_dot_group bits=%u m=%u n=%u g=%u off=%u head %u row %u: %.9g, scalar %.9g",
				  k->name, bits, m, n, g, off, h, i, got[at], want[at]);
		}
		for (unsigned j = 0; j < qs; j++) {
			size_t at = off + h * qs + j;
			/* columns past m are the stride's gap: nothing may write there */
			check(fabs(acc[at] - acc_want[at]) <= DOT_TOL * (n + 1) + 1e-30,
				  "%s lut_axpy_group bits=%u m=%u n=%u g=%u off=%u head %u column %u: %.9g, scalar %.9g",
				  k->name, bits, m, n, g, off, h, j, acc[at], acc_want[at]);
		}
	}
	free(codes), free(lut), free(q), free(w), free(got), free(want), free(acc), free(acc_want);
}

static void lut_group_shapes(const struct kvp_kernels *k, unsigned off)
{
	for (unsigned bits = 1; bits <= 4; bits++)
		for (size_t a = 0; a < COUNT(lut_dims); a++)
			for (unsigned g = 1; g <= 8; g++)
				lut_group_case(k, bits, lut_dims[a], 67, g, off);
}

static void scalar_lut_dot_and_axpy_match_double_precision_at_every_width(void)
{
	for (unsigned bits = 1; bits <= 4; bits++) {
		const unsigned m = 37, n = 5;
		const size_t stride = (m * bits + 7) / 8 + 1;
		uint8_t *codes = rand_codes(n, stride, stride - 1, 0);
		float *lut = rand_f32(1u << bits, 0), *q = rand_f32(m, 0), *w = rand_f32(n, 0);
		float out[5], acc[37] = { 0 };

		kvp_kernels_scalar.lut_dot(bits, m, n, codes, stride, lut, q, out);
		kvp_kernels_scalar.lut_axpy(bits, m, n, codes, stride, lut, w, acc);
		for (unsigned i = 0; i < n; i++) {
			double s = 0;
			for (unsigned j = 0; j < m; j++)
				s += (double)lut[code_of(codes + i * stride, bits, j)] * q[j];
			check(fabs(out[i] - s) <= 1e-5 * (1 + fabs(s)), "bits=%u row %u: %g, want %g", bits,
				  i, out[i], s);
		}
		for (unsigned j = 0; j < m; j++) {
			double s = 0;
			for (unsigned i = 0; i < n; i++)
				s += (double)w[i] * lut[code_of(codes + i * stride, bits, j)];
			check(fabs(acc[j] - s) <= 1e-5 * (1 + fabs(s)), "bits=%u column %u: %g, want %g",
				  bits, j, acc[j], s);
		}
		free(codes);
		free(lut);
		free(q);
		free(w);
	}
}

static void lut_dot_and_axpy_match_scalar_at_every_width_and_odd_length(const struct kvp_kernels *k)
{
	lut_shapes(k, 0);
}
static void lut_dot_and_axpy_match_scalar_on_unaligned_pointers(const struct kvp_kernels *k)
{
	lut_shapes(k, 1);
}
static void lut_group_kernels_match_scalar_head_by_head(const struct kvp_kernels *k)
{
	lut_group_shapes(k, 0);
	lut_group_shapes(k, 1);
}


/* ---- integer lookups (lut_dot_i8_group, lut_axpy_i16_group, lut_axpy_u8_group): equal to the scalar integers ---- */

static int32_t rand_int(int32_t lo, int32_t hi)
{
	return lo + (int32_t)(rnd32() % (uint32_t)(hi - lo + 1));
}

/* n floats at stride bytes from off bytes into a buffer: the rows' scales as the kernels read them. */
static uint8_t *rand_scales(unsigned n, size_t stride, unsigned off)
{
	uint8_t *p = xmalloc(off + (size_t)n * stride + 4);

	for (unsigned i = 0; i < n; i++) {
		float v = 0.25f + (float)(rnd32() % 1000) / 250.0f;
		memcpy(p + off + (size_t)i * stride, &v, sizeof v);
	}
	return p;
}

static int same_bits(float a, float b)
{
	return !memcmp(&a, &b, sizeof a);
}

/* lo or hi when `ends`, else anything between */
static int32_t rand_in(int ends, int32_t lo, int32_t hi)
{
	return ends ? (rnd32() & 1 ? hi : lo) : rand_int(lo, hi);
}

/* Whether table k has a vector lut_axpy_u8_group (kernels.h: the others decline every call). */
static int u8_lookups_vector(const struct kvp_kernels *k)
{
	return !strcmp(k->name, "avx512") || !strcmp(k->name, "avx2-vnni");
}

/*
 * g heads over n rows of m codes starting `off` bytes into their allocation, q and acc rows a stride wider
 * than m apart, the rows' scales at an odd stride. Outputs must equal the scalar reference bit for bit,
 * and the acc gap past m of each row must stay as it was.
 */
static void lut_int_case(const struct kvp_kernels *k, unsigned bits, unsigned m, unsigned n, unsigned g,
			 unsigned off, int ends)
{
	const size_t rowbytes = ((size_t)m * bits + 7) / 8, stride = rowbytes + (m & 1), qs = m + 5, ws = n + 3;
	uint8_t *codes = rand_codes(n, stride, rowbytes, off), *scales = rand_scales(n, 7, off);
	int8_t lut8[16], *q = xmalloc(g * qs);
	int16_t lut16[16];
	float *hs = rand_f32(g, 0), *w = rand_f32(g * ws, 0), unit = 1e-3f * (1 + rnd32() % 100);
	float *got = rand_f32((size_t)g * n, 0), *want = copy_f32(got, (size_t)g * n);
	float *acc = rand_f32(g * qs, 0), *acc_want = copy_f32(acc, g * qs);
	float *acc8 = copy_f32(acc, g * qs), *acc8_want = copy_f32(acc, g * qs);
	int8_t lutu[16];

	for (unsigned v = 0; v < 16; v++) {
		lut8[v] = (int8_t)rand_in(ends, -127, 127), lut16[v] = (int16_t)rand_in(ends, -2047, 2047);
		lutu[v] = (int8_t)rand_in(ends, -128, 127);
	}
	for (size_t j = 0; j < g * qs; j++)
		q[j] = (int8_t)rand_in(ends, -128, 127);
	for (size_t i = 0; ends && i < g * ws; i++) /* the u8 weights' largest products: every weight 0 or 255 */
		w[i] = rnd32() & 1 ? 1.0f : -1.0f;
	/* u8: the weights' magnitudes (a sign bit makes it refuse: below); ends, 0 or 1 */
	float *wa = copy_f32(w, g * ws);
	for (size_t i = 0; i < g * ws; i++)
		wa[i] = ends ? (w[i] > 0 ? 1.0f : 0.0f) : fabsf(w[i]);
	/* only AVX-512 and avx2-vnni have a vector version: the other tables decline every call, leaving acc8 as it
	 * was (compared
	 * below), so that callers keep their vector lut_axpy_i16_group */
	const struct kvp_row_runs rows = kvp_one_run(n, codes + off, stride, scales + off, 7);
	const int took = k->lut_axpy_u8_group(bits, m, &rows, lutu, unit, g, wa, ws, acc8, qs, NULL);
	check(took == u8_lookups_vector(k), "%s lut_axpy_u8_group bits=%u m=%u n=%u g=%u: %s weights of no sign",
	      k->name, bits, m, n, g, took ? "took (only AVX-512 and avx2-vnni have a vector version)" : "refused");
	if (took)
		kvp_kernels_scalar.lut_axpy_u8_group(bits, m, &rows, lutu, unit, g, wa, ws, acc8_want, qs, NULL);
	wa[(size_t)(g - 1) * ws + n - 1] = -0.0f; /* the last weight read: one sign bit, and nothing is changed */
	check(k->lut_axpy_u8_group(bits, m, &rows, lutu, unit, g, wa, ws, acc8, qs, NULL) == 0,
	      "%s lut_axpy_u8_group bits=%u m=%u n=%u g=%u: took a weight of -0", k->name, bits, m, n, g);
	free(wa);
	k->lut_dot_i8_group(bits, m, n, codes + off, stride, lut8, g, q, qs, hs, scales + off, 7, got, n, 1);
	/* i16 asked to prefetch meanwhile (the codes themselves): the same bits */
	const struct kvp_ahead ahead = { .n = 1, .base = { codes }, .bytes = { off + (size_t)(n - 1) * stride + rowbytes } };
	k->lut_axpy_i16_group(bits, m, n, codes + off, stride, lut16, unit, g, w, ws, scales + off, 7, acc, qs, &ahead);
	kvp_kernels_scalar.lut_dot_i8_group(bits, m, n, codes + off, stride, lut8, g, q, qs, hs, scales + off, 7, want,
					    n, 1);
	kvp_kernels_scalar.lut_axpy_i16_group(bits, m, n, codes + off, stride, lut16, unit, g, w, ws, scales + off, 7,
					      acc_want, qs, NULL);
	for (size_t i = 0; i < (size_t)g * n; i++)
		check(same_bits(got[i], want[i]),
		      "%s lut_dot_i8_group bits=%u m=%u n=%u g=%u off=%u head %zu row %zu: %.9g, scalar %.9g", k->name,
		      bits, m, n, g, off, i / n, i % n, got[i], want[i]);
	/* add 0 writes the scores over whatever out held: NaN here */
	for (size_t i = 0; i < (size_t)g * n; i++)
		got[i] = want[i] = NAN;
	k->lut_dot_i8_group(bits, m, n, codes + off, stride, lut8, g, q, qs, hs, scales + off, 7, got, n, 0);
	kvp_kernels_scalar.lut_dot_i8_group(bits, m, n, codes + off, stride, lut8, g, q, qs, hs, scales + off, 7, want,
					    n, 0);
	for (size_t i = 0; i < (size_t)g * n; i++)
		check(same_bits(got[i], want[i]) && !isnan(got[i]),
		      "%s lut_dot_i8_group (add 0) bits=%u m=%u n=%u g=%u off=%u head %zu row %zu: %.9g, scalar %.9g",
		      k->name, bits, m, n, g, off, i / n, i % n, got[i], want[i]);
	for (size_t j = 0; j < g * qs; j++)
		check(same_bits(acc[j], acc_want[j]),
		      "%s lut_axpy_i16_group bits=%u m=%u n=%u g=%u off=%u head %zu column %zu: %.9g, scalar %.9g",
		      k->name, bits, m, n, g, off, j / qs, j % qs, acc[j], acc_want[j]);
	for (size_t j = 0; j < g * qs; j++)
		check(same_bits(acc8[j], acc8_want[j]),
		      "%s lut_axpy_u8_group bits=%u m=%u n=%u g=%u off=%u head %zu column %zu: %.9g, scalar %.9g",
		      k->name, bits, m, n, g, off, j / qs, j % qs, acc8[j], acc8_want[j]);
	free(codes), free(scales), free(q), free(hs), free(w), free(got), free(want), free(acc), free(acc_want);
	free(acc8), free(acc8_want);
}

/* The contract of kernels.h written out once more, in the test's own words. */
static void scalar_integer_lookups_match_their_definition(void)
{
	for (unsigned bits = 1; bits <= 4; bits++) {
		const unsigned m = 37, n = 5, g = 2;
		const size_t stride = (m * bits + 7) / 8 + 1;
		uint8_t *codes = rand_codes(n, stride, stride - 1, 0), *scales = rand_scales(n, 5, 1);
		int8_t lut8[16], q[2 * 37];
		int16_t lut16[16];
		float hs[2] = { 0.37f, -1.5f }, w[2 * 5], wa[2 * 5], out[2 * 5], acc[2 * 37] = { 0 };
		float acc8[2 * 37] = { 0 };
		float unit = 0.01f;

		for (unsigned v = 0; v < 16; v++)
			lut8[v] = (int8_t)rand_int(-127, 127), lut16[v] = (int16_t)rand_int(-2047, 2047);
		for (unsigned j = 0; j < g * m; j++)
			q[j] = (int8_t)rand_int(-128, 127);
		for (unsigned i = 0; i < g * n; i++)
			w[i] = (float)rand_int(-1000, 1000) / 999.0f;
		for (unsigned i = 0; i < g * n; i++)
			out[i] = NAN; /* add 0: written over */
		kvp_kernels_scalar.lut_dot_i8_group(bits, m, n, codes, stride, lut8, g, q, m, hs, scales + 1, 5, out, n, 0);
		kvp_kernels_scalar.lut_axpy_i16_group(bits, m, n, codes, stride, lut16, unit, g, w, n, scales + 1, 5, acc, m, NULL);
		for (unsigned i = 0; i < g * n; i++)
			wa[i] = fabsf(w[i]);
		const struct kvp_row_runs rows = kvp_one_run(n, codes, stride, scales + 1, 5);

		kvp_kernels_scalar.lut_axpy_u8_group(bits, m, &rows, lut8, unit, g, wa, n, acc8, m, NULL);
		for (unsigned h = 0; h < g; h++) {
			float top = 0, u[5], f;
			int32_t wq[5];

			for (unsigned i = 0; i < n; i++) {
				int32_t s = 0;
				float sc;
				memcpy(&sc, scales + 1 + i * 5, sizeof sc);
				for (unsigned j = 0; j < m; j++)
					s += lut8[code_of(codes + i * stride, bits, j)] * q[h * m + j];
				check(same_bits(out[h * n + i], ((float)s * hs[h]) * sc), "bits=%u head %u row %u: %.9g", bits,
				      h, i, out[h * n + i]);
				u[i] = w[h * n + i] * sc;
				top = fabsf(u[i]) > top ? fabsf(u[i]) : top;
			}
			for (unsigned i = 0; i < n; i++) {
				float x = u[i] * (4095.0f / top);
				wq[i] = (int32_t)(x < 0 ? x - 0.5f : x + 0.5f);
				check(wq[i] >= -4095 && wq[i] <= 4095, "bits=%u head %u weight %u: %d", bits, h, i, wq[i]);
			}
			f = unit * (top / 4095.0f);
			for (unsigned j = 0; j < m; j++) {
				int32_t s = 0;
				for (unsigned i = 0; i < n; i++)
					s += wq[i] * lut16[code_of(codes + i * stride, bits, j)];
				check(same_bits(acc[h * m + j], f * (float)s), "bits=%u head %u column %u: %.9g, want %.9g",
				      bits, h, j, acc[h * m + j], f * (float)s);
			}
			/* u8, on |w|: 255 steps from the least to the largest, and the least times the column sums */
			float lo = 0, e;
			top = 0;
			for (unsigned i = 0; i < n; i++) {
				float sc;
				memcpy(&sc, scales + 1 + i * 5, sizeof sc);
				u[i] = wa[h * n + i] * sc;
				top = u[i] > top ? u[i] : top;
				lo = i == 0 || u[i] < lo ? u[i] : lo;
			}
			for (unsigned i = 0; i < n; i++) {
				float x = (u[i] - lo) * (255.0f / (top - lo));
				wq[i] = x > 0 ? (int32_t)(x + 0.5f) : 0;
				check(wq[i] >= 0 && wq[i] <= 255, "bits=%u head %u u8 weight %u: %d", bits, h, i, wq[i]);
			}
			f = unit * ((top - lo) / 255.0f);
			e = unit * lo;
			for (unsigned j = 0; j < m; j++) {
				int32_t s = 0, c = 0;
				for (unsigned i = 0; i < n; i++) {
					s += wq[i] * lut8[code_of(codes + i * stride, bits, j)];
					c += lut8[code_of(codes + i * stride, bits, j)];
				}
				check(same_bits(acc8[h * m + j], 0.0f + (f * (float)s + e * (float)c)),
				      "bits=%u head %u u8 column %u: %.9g, want %.9g", bits, h, j, acc8[h * m + j],
				      f * (float)s + e * (float)c);
			}
		}
		free(codes);
		free(scales);
	}
}

static void integer_lookups_equal_scalar_for_every_width_group_and_length(const struct kvp_kernels *k)
{
	static const unsigned rows[] = { 1, 3, 4, 5, 64, 67 }, heads[] = { 1, 2, 3, 4, 5, 8 };

	for (unsigned bits = 1; bits <= 4; bits++) {
		for (size_t a = 0; a < COUNT(lut_dims); a++)
			for (size_t b = 0; b < COUNT(rows); b++)
				for (size_t c = 0; c < COUNT(heads); c++)
					lut_int_case(k, bits, lut_dims[a], rows[b], heads[c], 0, 0);
		/* a multiple of 64 past 128: AVX-512 takes such rows sixteen at a time in 64-channel chunks */
		for (size_t c = 0; c < COUNT(heads); c++)
			lut_int_case(k, bits, 192, 67, heads[c], 0, 0);
	}
}

/*
 * lut_axpy_u8_group's rows in runs (a cache's consecutive blocks): n rows copied into runs of `run` rows, each
 * its own allocation `off` bytes in, give the bits of the same rows in one array, on the scalar table and
 * on this one (which may decline, as it does every call without a vector version), whatever it prefetches.
 */
static void u8_runs_case(const struct kvp_kernels *k, unsigned bits, unsigned m, unsigned n, unsigned run,
			 unsigned g, unsigned off)
{
	const size_t rowbytes = ((size_t)m * bits + 7) / 8, stride = rowbytes + 3, qs = m + 2, ws = n + 1;
	uint8_t *codes = rand_codes(n, stride, rowbytes, 0), *scales = rand_scales(n, 6, 0);
	uint8_t *code_runs[KVP_RUNS_MAX], *scale_runs[KVP_RUNS_MAX];
	struct kvp_row_runs runs = { .n = n, .run = run, .stride = stride, .scale_stride = 6 };
	const struct kvp_row_runs one = kvp_one_run(n, codes, stride, scales, 6);
	float *w = rand_f32(g * ws, 0), *want = rand_f32(g * qs, 0), *got = copy_f32(want, g * qs);
	float *ref = copy_f32(want, g * qs);
	const float unit = 1e-3f * (1 + rnd32() % 100);
	int8_t lut[16];
	unsigned r = 0;

	for (unsigned v = 0; v < 16; v++)
		lut[v] = (int8_t)rand_int(-128, 127);
	for (size_t i = 0; i < g * ws; i++)
		w[i] = fabsf(w[i]);
	for (unsigned i0 = 0; i0 < n; i0 += run, r++) {
		const unsigned rows = n - i0 < run ? n - i0 : run;

		code_runs[r] = xmalloc(off + (size_t)rows * stride), scale_runs[r] = xmalloc(off + (size_t)rows * 6);
		memcpy(code_runs[r] + off, codes + (size_t)i0 * stride, (size_t)rows * stride - (stride - rowbytes));
		memcpy(scale_runs[r] + off, scales + (size_t)i0 * 6, (size_t)rows * 6);
		runs.code[r] = code_runs[r] + off, runs.scale[r] = scale_runs[r] + off;
	}
	check(kvp_kernels_scalar.lut_axpy_u8_group(bits, m, &one, lut, unit, g, w, ws, want, qs, NULL) == 1,
	      "scalar lut_axpy_u8_group: declined weights of no sign");
	kvp_kernels_scalar.lut_axpy_u8_group(bits, m, &runs, lut, unit, g, w, ws, ref, qs, NULL);
	for (size_t j = 0; j < g * qs; j++)
		check(same_bits(ref[j], want[j]),
		      "scalar lut_axpy_u8_group bits=%u m=%u n=%u run=%u g=%u column %zu: %.9g in runs, %.9g in one array",
		      bits, m, n, run, g, j, ref[j], want[j]);
	/* and whatever it is asked to prefetch meanwhile: here the one array's rows and scales */
	const struct kvp_ahead ahead = { .n = 2, .base = { codes, scales }, .bytes = { (size_t)(n - 1) * stride + rowbytes, (size_t)n * 6 } };

	if (k->lut_axpy_u8_group(bits, m, &runs, lut, unit, g, w, ws, got, qs, &ahead))
		for (size_t j = 0; j < g * qs; j++)
			check(same_bits(got[j], want[j]),
			      "%s lut_axpy_u8_group bits=%u m=%u n=%u run=%u g=%u off=%u column %zu: %.9g, %.9g in one array",
			      k->name, bits, m, n, run, g, off, j, got[j], want[j]);
	while (r--)
		free(code_runs[r]), free(scale_runs[r]);
	free(codes), free(scales), free(w), free(want), free(got), free(ref);
}

static void u8_lookups_read_rows_in_runs_as_one_array(const struct kvp_kernels *k)
{
	static const unsigned shapes[][2] = { { 256, 64 }, { 250, 64 }, { 64, 16 }, { 61, 16 }, { 200, 112 }, { 17, 16 } };

	for (unsigned bits = 1; bits <= 4; bits++)
		for (size_t a = 0; a < COUNT(lut_dims); a++)
			for (size_t b = 0; b < COUNT(shapes); b++)
				u8_runs_case(k, bits, lut_dims[a], shapes[b][0], shapes[b][1], 1 + (unsigned)(a + b) % 5,
					     (unsigned)b % 3);
}

static void integer_lookups_equal_scalar_on_unaligned_pointers(const struct kvp_kernels *k)
{
	for (unsigned bits = 1; bits <= 4; bits++)
		for (size_t a = 0; a < COUNT(lut_dims); a++)
			for (unsigned g = 1; g <= 8; g++)
				lut_int_case(k, bits, lut_dims[a], 67, g, 1 + (g & 2), 0);
}

/* The largest products and sums the contract allows are still exact. */
static void integer_lookups_equal_scalar_at_the_ends_of_their_ranges(const struct kvp_kernels *k)
{
	for (unsigned bits = 1; bits <= 4; bits++)
		for (size_t a = 0; a < COUNT(lut_dims); a++)
			for (unsigned g = 1; g <= 5; g += 4)
				lut_int_case(k, bits, lut_dims[a], 67, g, 0, 1);
}


/* Runs cases(k) in a child process, so that a read past a guarded input (a fault) fails this test rather
 * than the whole program. */
static void in_child(const struct kvp_kernels *k, void (*cases)(const struct kvp_kernels *))
{
	int status = 0;
	pid_t pid;

	fflush(stdout);
	pid = fork();
	if (pid == 0) {
		cases(k);
		fflush(stdout);
		_exit(0);
	}
	if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
		check(0, "%s: its process %s", k->name, pid < 0 ? "could not start" : "died (a read past an input?)");
}

/* `bytes` bytes that end where an unreadable page begins, so a read past them faults; free with unguard. */
static void *guarded(size_t bytes)
{
	const size_t page = 4096 * 16, body = (bytes + page - 1) / page * page; /* 64 KiB: any aarch64 page */
	char *map = mmap(NULL, body + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (map == MAP_FAILED || mprotect(map + body, page, PROT_NONE)) {
		perror("mmap");
		exit(2);
	}
	return map + body - bytes;
}

static void unguard(void *p, size_t bytes)
{
	const size_t page = 4096 * 16, body = (bytes + page - 1) / page * page;

	munmap((char *)p + bytes - body, body + page);
}

/*
 * The last code row, the last head's query, weights, accumulator row and outputs each end where an
 * unreadable page begins (rows packed with no gap: stride = ceil(m*bits/8)), and the results still equal
 * the scalar ones (four rows: a whole quad of rows ends on the last one). In a child process, so a read past
 * any of them fails this test rather than the suite.
 */
static void integer_lookups_read_nothing_past_their_inputs_cases(const struct kvp_kernels *k)
{
	static const unsigned rows[] = { 1, 4, 5 }, heads[] = { 1, 3, 4, 5 };

	for (unsigned bits = 1; bits <= 4; bits++)
		for (size_t a = 0; a < COUNT(lut_dims); a++)
			for (size_t b = 0; b < COUNT(rows); b++)
				for (size_t c = 0; c < COUNT(heads); c++) {
					const unsigned m = lut_dims[a], n = rows[b], g = heads[c];
					const size_t stride = ((size_t)m * bits + 7) / 8, cb = n * stride;
					uint8_t *codes = guarded(cb);
					float *sc = guarded(sizeof(float) * n);
					int8_t lut8[16], *q = guarded((size_t)g * m);
					int16_t lut16[16];
					float *hs = guarded(sizeof *hs * g), *w = guarded(sizeof *w * g * n);
					float *out = guarded(sizeof *out * g * n), *acc = guarded(sizeof *acc * g * m);
					float want[8 * 5] = { 0 }, acc_want[8 * 128] = { 0 };

					for (size_t i = 0; i < cb; i++)
						codes[i] = (uint8_t)rnd32();
					for (unsigned v = 0; v < 16; v++)
						lut8[v] = (int8_t)rand_int(-127, 127), lut16[v] = (int16_t)rand_int(-2047, 2047);
					for (size_t j = 0; j < (size_t)g * m; j++)
						q[j] = (int8_t)rand_int(-128, 127), acc[j] = 0;
					for (size_t i = 0; i < (size_t)g * n; i++)
						w[i] = (float)rand_int(-511, 511), out[i] = 0;
					for (unsigned i = 0; i < n; i++)
						sc[i] = (float)rand_int(1, 9);
					for (unsigned h = 0; h < g; h++)
						hs[h] = (float)rand_int(1, 9);
					k->lut_dot_i8_group(bits, m, n, codes, stride, lut8, g, q, m, hs, (const uint8_t *)sc,
							    sizeof(float), out, n, 1);
					k->lut_axpy_i16_group(bits, m, n, codes, stride, lut16, 0.5f, g, w, n,
							      (const uint8_t *)sc, sizeof(float), acc, m, NULL);
					kvp_kernels_scalar.lut_dot_i8_group(bits, m, n, codes, stride, lut8, g, q, m, hs,
									    (const uint8_t *)sc, sizeof(float), want, n, 1);
					kvp_kernels_scalar.lut_axpy_i16_group(bits, m, n, codes, stride, lut16, 0.5f, g, w, n,
									      (const uint8_t *)sc, sizeof(float), acc_want, m, NULL);
					for (size_t i = 0; i < (size_t)g * n; i++)
						w[i] = fabsf(w[i]);
					const struct kvp_row_runs run = kvp_one_run(n, codes, stride, (const uint8_t *)sc,
										    sizeof(float));

					if (k->lut_axpy_u8_group(bits, m, &run, lut8, 0.5f, g, w, n, acc, m, NULL))
						kvp_kernels_scalar.lut_axpy_u8_group(bits, m, &run, lut8, 0.5f, g, w, n, acc_want, m, NULL);
					check(!memcmp(out, want, sizeof *out * g * n),
					      "%s lut_dot_i8_group bits=%u m=%u n=%u g=%u: differs from scalar", k->name, bits, m, n, g);
					check(!memcmp(acc, acc_want, sizeof *acc * g * m),
					      "%s lut_axpy_i16_group bits=%u m=%u n=%u g=%u: differs from scalar", k->name, bits, m, n, g);
					unguard(codes, cb), unguard(sc, sizeof(float) * n), unguard(q, (size_t)g * m);
					unguard(hs, sizeof *hs * g), unguard(w, sizeof *w * g * n);
					unguard(out, sizeof *out * g * n), unguard(acc, sizeof *acc * g * m);
				}
}

static void integer_lookups_read_nothing_past_their_inputs(const struct kvp_kernels *k)
{
	in_child(k, integer_lookups_read_nothing_past_their_inputs_cases);
}

/* Rows past a few hundred codes, which a vector version may work through in passes (AVX2 widens the
 * queries 256 columns at a time), with their ends on both sides of a pass. */
static void integer_lookups_equal_scalar_on_long_rows(const struct kvp_kernels *k)
{
	static const unsigned lengths[] = { 255, 256, 257, 300, 543, 1000 };

	for (unsigned bits = 1; bits <= 4; bits++)
		for (size_t a = 0; a < COUNT(lengths); a++)
			lut_int_case(k, bits, lengths[a], 5, 5, 1, 0);
}

/* ---- dot_i8_scaled: the scalar reference's bits ---- */

/* A key group at p: m fp16 z (either sign), m fp16 s (at least 0, a few 0), then rows' codes as they come. */
static void fill_key_group(uint8_t *p, unsigned m)
{
	for (unsigned j = 0; j < m; j++) {
		uint16_t z = kvp_f32_to_f16((float)rand_int(-1000, 1000) / 300.0f);
		uint16_t s = j % 7 == 3 ? 0 : kvp_f32_to_f16((float)rand_int(0, 1000) / 333.0f);
		memcpy(p + 2 * j, &z, sizeof z);
		memcpy(p + 2 * (m + j), &s, sizeof s);
	}
}

/*
 * g heads over `groups` groups in a row of n rows of m codes stored by columns, `off` bytes into their
 * allocations (groups, query), query rows m + 3 apart, out rows groups * n + 2 apart with random contents to
 * overwrite. Equal bit for bit to the scalar table's call for each group alone.
 */
static void scaled_case(const struct kvp_kernels *k, unsigned bits, unsigned m, unsigned n, unsigned groups,
			unsigned g, unsigned off)
{
	const size_t bytes = kvp_scaled_group_bytes(bits, m, n), qs = m + 3, os = (size_t)groups * n + 2;
	uint8_t *group = rand_codes(1, groups * bytes, groups * bytes, off);
	float *q = rand_f32(g * qs + off, 0);
	float *got = rand_f32(g * os, 0), *want = copy_f32(got, g * os);

	for (unsigned x = 0; x < groups; x++) {
		fill_key_group(group + off + x * bytes, m);
		kvp_kernels_scalar.dot_i8_scaled(bits, m, n, 1, group + off + x * bytes, g, q + off, qs, want + (size_t)x * n, os);
	}
	k->dot_i8_scaled(bits, m, n, groups, group + off, g, q + off, qs, got, os);
	for (size_t i = 0; i < g * os; i++)
		check(same_bits(got[i], want[i]),
		      "%s dot_i8_scaled bits=%u m=%u n=%u groups=%u g=%u off=%u head %zu row %zu: %.9g, scalar %.9g",
		      k->name, bits, m, n, groups, g, off, i / os, i % os, got[i], want[i]);
	free(group), free(q), free(got), free(want);
}

/* The contract of kernels.h in the test's own words: <q, z> over sixteen lanes folded by halves, plus the int8
 * query on the step max |q s| / 127 against the codes, exactly. */
static void scalar_dot_i8_scaled_matches_its_definition(void)
{
	for (unsigned bits = 1; bits <= 4; bits++) {
		enum { M = 37, N = 5 };
		const size_t rb = (M * bits + 7) / 8;
		uint8_t *group = rand_codes(1, 4 * M + rb * N, 4 * M + rb * N, 0);
		const uint8_t *codes = group + 4 * M;
		float q[M], out[N], top = 0, lane[16] = { 0 };

		fill_key_group(group, M);
		for (unsigned j = 0; j < M; j++) {
			uint16_t z, s;
			memcpy(&z, group + 2 * j, sizeof z);
			memcpy(&s, group + 2 * (M + j), sizeof s);
			q[j] = (float)rand_int(-1000, 1000) / 999.0f;
			top = fabsf(q[j] * kvp_f16_to_f32(s)) > top ? fabsf(q[j] * kvp_f16_to_f32(s)) : top;
			lane[j % 16] += q[j] * kvp_f16_to_f32(z);
		}
		for (unsigned half = 8; half; half /= 2)
			for (unsigned l = 0; l < half; l++)
				lane[l] += lane[l + half];
		kvp_kernels_scalar.dot_i8_scaled(bits, M, N, 1, group, 1, q, M, out, N);
		for (unsigned i = 0; i < N; i++) {
			int64_t sum = 0;
			for (unsigned j = 0; j < M; j++) {
				unsigned at = j * bits, code = 0;
				uint16_t s;
				memcpy(&s, group + 2 * (M + j), sizeof s);
				for (unsigned b = 0; b < bits; b++, at++) /* bit b of the code: bit at of the row */
					code |= (unsigned)(codes[(at / 8) * N + i] >> (at % 8) & 1) << b;
				float x = (q[j] * kvp_f16_to_f32(s)) * (127.0f / top);
				sum += (int64_t)code * (int32_t)nearbyintf(x) /* ties to even */;
			}
			float want = lane[0] + (float)sum * (top / 127.0f);
			check(same_bits(out[i], want), "scalar dot_i8_scaled bits=%u row %u: %.9g, defined %.9g", bits, i, out[i], want);
		}
		free(group);
	}
}

static void dot_i8_scaled_equals_scalar_on_odd_lengths_and_unaligned_pointers(const struct kvp_kernels *k)
{
	/* 100 rows: past the 64 the plain tables' loops sum at once; wide: past those loops' 256-channel chunks
	 * and their 512 channels, and past AVX-512's 1024 */
	static const unsigned rows[] = { 1, 5, 16, 17, 32, 33, 64, 100 }, heads[] = { 1, 3, 4, 5, 9 };
	static const unsigned wide[] = { 255, 256, 257, 300, 511, 512, 513, 1023, 1024, 1025 };

	for (unsigned bits = 1; bits <= 4; bits++)
		for (size_t a = 0; a < COUNT(lut_dims); a++)
			for (size_t b = 0; b < COUNT(rows); b++)
				for (size_t c = 0; c < COUNT(heads); c++)
					scaled_case(k, bits, lut_dims[a], rows[b], 1, heads[c], (unsigned)(a + b) % 3);
	for (unsigned bits = 1; bits <= 4; bits++)
		for (size_t a = 0; a < COUNT(wide); a++)
			scaled_case(k, bits, wide[a], 17, 1, 4, 1);
}

/* A block's groups in one call (the AVX-512 table makes each group's queries while it scores the one before):
 * every group scored as alone, for one group to several, each head count, and widths on both sides of the
 * 256 channels that way takes. */
static void dot_i8_scaled_scores_groups_in_a_row_as_each_alone(const struct kvp_kernels *k)
{
	static const unsigned groups[] = { 1, 2, 3, 8 }, heads[] = { 1, 2, 3, 4, 5, 8 }, widths[] = { 36, 64, 128, 256, 260 };

	for (unsigned bits = 1; bits <= 4; bits++)
		for (size_t a = 0; a < COUNT(groups); a++)
			for (size_t b = 0; b < COUNT(heads); b++)
				for (size_t c = 0; c < COUNT(widths); c++)
					scaled_case(k, bits, widths[c], c % 2 ? 32 : 17, groups[a], heads[b], (unsigned)(a + c) % 3);
}

/*
 * Every code at its largest and every channel's int8 query at +127 or -127 (q_j s_j all of one size): the
 * sums as far from zero as the contract lets them go, where a kernel that adds products in narrower integers
 * on the way would overflow. Bit for bit with the scalar table.
 */
static void dot_i8_scaled_sums_the_largest_codes_exactly(const struct kvp_kernels *k)
{
	static const unsigned widths[] = { 64, 128, 252, 256, 1024 };

	for (unsigned bits = 1; bits <= 4; bits++)
		for (size_t a = 0; a < COUNT(widths); a++)
			for (int sign = -1; sign <= 1; sign += 2) {
				const unsigned m = widths[a], n = 9, g = 4;
				const size_t bytes = 4 * (size_t)m + ((size_t)m * bits + 7) / 8 * n;
				uint8_t *group = xmalloc(bytes);
				float *q = xmalloc(sizeof *q * g * m), got[4 * 9], want[4 * 9];
				const uint16_t one = kvp_f32_to_f16(1.0f), zero = 0;

				memset(group + 4 * (size_t)m, 0xff, bytes - 4 * (size_t)m);
				for (unsigned j = 0; j < m; j++)
					memcpy(group + 2 * j, &zero, 2), memcpy(group + 2 * ((size_t)m + j), &one, 2);
				for (size_t i = 0; i < (size_t)g * m; i++)
					q[i] = (float)sign * 2.0f;
				k->dot_i8_scaled(bits, m, n, 1, group, g, q, m, got, n);
				kvp_kernels_scalar.dot_i8_scaled(bits, m, n, 1, group, g, q, m, want, n);
				for (unsigned i = 0; i < g * n; i++)
					check(same_bits(got[i], want[i]) &&
						      fabs(got[i] - sign * 2.0 * ((1u << bits) - 1) * m) <= 1e-5 * 2.0 * ((1u << bits) - 1) * m,
					      "%s dot_i8_scaled bits=%u m=%u sign %d head %u row %u: %.9g, scalar %.9g", k->name, bits, m,
					      sign, i / n, i % n, got[i], want[i]);
				free(group), free(q);
			}
}

/* The codes, the query, the scales and out each end where an unreadable page begins. In a child process. */
static void dot_i8_scaled_reads_nothing_past_its_inputs_cases(const struct kvp_kernels *k)
{
	/* 12 and 29: a last block of sixteen rows with more than half of them missing, and with fewer */
	static const unsigned rows[] = { 1, 5, 12, 17, 29 }, heads[] = { 1, 4, 5 };

	for (unsigned bits = 1; bits <= 4; bits++)
		for (size_t a = 0; a < COUNT(lut_dims); a++)
			for (size_t b = 0; b < COUNT(rows); b++)
				for (size_t c = 0; c < COUNT(heads); c++) {
					const unsigned m = lut_dims[a], n = rows[b], g = heads[c];
					const size_t cb = 4 * (size_t)m + ((size_t)m * bits + 7) / 8 * n;
					uint8_t *group = guarded(cb);
					float *q = guarded(sizeof(float) * g * m);
					float *out = guarded(sizeof(float) * g * n), want[5 * 29] = { 0 };

					for (size_t i = 0; i < cb; i++)
						group[i] = (uint8_t)rnd32();
					fill_key_group(group, m);
					for (size_t j = 0; j < (size_t)g * m; j++)
						q[j] = (float)rand_int(-99, 99);
					memset(out, 0, sizeof(float) * g * n);
					k->dot_i8_scaled(bits, m, n, 1, group, g, q, m, out, n);
					kvp_kernels_scalar.dot_i8_scaled(bits, m, n, 1, group, g, q, m, want, n);
					check(!memcmp(out, want, sizeof(float) * g * n),
					      "%s dot_i8_scaled bits=%u m=%u n=%u g=%u: differs from scalar", k->name, bits, m, n, g);
					unguard(group, cb), unguard(q, sizeof(float) * g * m), unguard(out, sizeof(float) * g * n);
				}
}

static void dot_i8_scaled_reads_nothing_past_its_inputs(const struct kvp_kernels *k)
{
	in_child(k, dot_i8_scaled_reads_nothing_past_its_inputs_cases);
}

/* ---- axpy_i16_scaled: the scalar reference's bits ---- */

/* n records at `stride` (ceil(m/gsize) fp16 z, as many fp16 s, then m codes), `off` bytes into the allocation;
 * g heads' weights at w_stride n + 3, accumulators (m columns, then the z sums) at m + ng + 5. Equal bit for bit. */
static void scaled_axpy_case(const struct kvp_kernels *k, unsigned bits, unsigned m, unsigned gsize, unsigned n,
			     unsigned g, unsigned off)
{
	const unsigned ng = (m + gsize - 1) / gsize;
	const size_t rowbytes = ((size_t)m * bits + 7) / 8, stride = 4 * ng + rowbytes + (m & 1), ws = n + 3;
	const size_t as = m + ng + 5;
	uint8_t *p = rand_codes(n, stride, stride, off);
	float *w = rand_f32(g * ws, 0), *acc = rand_f32(g * as, 0), *want = copy_f32(acc, g * as);

	for (unsigned i = 0; i < n; i++) /* z: fp16 numbers of either sign; s: positive, a few zeros */
		for (unsigned c = 0; c < ng; c++) {
			uint16_t z = kvp_f32_to_f16((float)((int)(rnd32() % 2001) - 1000) / 700.0f);
			uint16_t h = (i + c) % 5 == 2 ? 0 : kvp_f32_to_f16(0.01f + (float)(rnd32() % 1000) / 300.0f);
			memcpy(p + off + i * stride + 2 * c, &z, sizeof z);
			memcpy(p + off + i * stride + 2 * (ng + c), &h, sizeof h);
		}
	for (size_t i = 0; i < g * ws; i++) /* softmax weights are at least 0 */
		w[i] = fabsf(w[i]);
	k->axpy_i16_scaled(bits, m, gsize, n, p + off, stride, g, w, ws, acc, as);
	kvp_kernels_scalar.axpy_i16_scaled(bits, m, gsize, n, p + off, stride, g, w, ws, want, as);
	for (size_t j = 0; j < g * as; j++)
		check(same_bits(acc[j], want[j]),
		      "%s axpy_i16_scaled bits=%u m=%u gsize=%u n=%u g=%u off=%u head %zu column %zu: %.9g, scalar %.9g",
		      k->name, bits, m, gsize, n, g, off, j / as, j % as, acc[j], want[j]);
	free(p), free(w), free(acc), free(want);
}

/* Sixteen running sums added by halves (lane l + lane l + 8, then + 4, + 2, + 1): lane[0] is the total. */
static float fold_halves(float lane[16])
{
	for (unsigned half = 8; half; half /= 2)
		for (unsigned l = 0; l < half; l++)
			lane[l] += lane[l + half];
	return lane[0];
}

/* The contract of kernels.h in the test's own words, for one head: the codes' sums, then the z sums. */
static void scalar_axpy_i16_scaled_matches_its_definition(void)
{
	for (unsigned bits = 1; bits <= 4; bits++) {
		enum { M = 37, G = 8, NG = 5, N = 21 };
		const size_t stride = 4 * NG + (M * bits + 7) / 8;
		uint8_t *p = rand_codes(N, stride, stride, 0);
		float w[N], acc[M + NG] = { 0 }, top = 0;

		for (unsigned i = 0; i < N; i++) {
			w[i] = (float)rand_int(0, 1000) / 999.0f;
			for (unsigned c = 0; c < NG; c++) {
				uint16_t z = kvp_f32_to_f16((float)rand_int(-99, 99) / 7.0f);
				uint16_t h = kvp_f32_to_f16((float)rand_int(1, 99) / 8.0f);
				memcpy(p + i * stride + 2 * c, &z, sizeof z);
				memcpy(p + i * stride + 2 * (NG + c), &h, sizeof h);
				top = fmaxf(top, fabsf(w[i] * kvp_f16_to_f32(h)));
			}
		}
		kvp_kernels_scalar.axpy_i16_scaled(bits, M, G, N, p, stride, 1, w, N, acc, M + NG);
		for (unsigned j = 0; j < M; j++) {
			int64_t sum = 0;
			for (unsigned i = 0; i < N; i++) {
				uint16_t h;
				unsigned code = 0;
				memcpy(&h, p + i * stride + 2 * (NG + j / G), sizeof h);
				for (unsigned b = 0; b < bits; b++) /* bit b of the code: bit j * bits + b of the row */
					code |= (unsigned)(p[i * stride + 4 * NG + (j * bits + b) / 8] >> ((j * bits + b) % 8) & 1) << b;
				float x = (w[i] * kvp_f16_to_f32(h)) * (4095.0f / top);
				sum += (int64_t)code * (int32_t)nearbyintf(x) /* ties to even */;
			}
			check(same_bits(acc[j], (top / 4095.0f) * (float)sum), "scalar axpy_i16_scaled bits=%u column %u: %.9g, defined %.9g",
			      bits, j, acc[j], (top / 4095.0f) * (float)sum);
		}
		for (unsigned c = 0; c < NG; c++) { /* sixteen lanes by i % 16 (rows 16-20 on lanes 0-4), then halves */
			float lane[16] = { 0 };
			uint16_t z;
			for (unsigned i = 0; i < N; i++) {
				memcpy(&z, p + i * stride + 2 * c, sizeof z);
				lane[i % 16] += w[i] * kvp_f16_to_f32(z);
			}
			check(same_bits(acc[M + c], fold_halves(lane)), "scalar axpy_i16_scaled bits=%u z sum %u: %.9g, defined %.9g",
			      bits, c, acc[M + c], lane[0]);
		}
		free(p);
	}
}

static void axpy_i16_scaled_equals_scalar_on_odd_lengths_and_unaligned_pointers(const struct kvp_kernels *k)
{
	static const unsigned widths[] = { 1, 31, 48, 64, 65, 128, 192, 256 }, gsizes[] = { 8, 16, 32, 48, 64 };
	static const unsigned rows[] = { 1, 2, 5, 17, 64, 127, 128, 256 }, heads[] = { 1, 3, 4, 5 };

	for (unsigned bits = 1; bits <= 4; bits++)
		for (size_t a = 0; a < COUNT(widths); a++)
			for (size_t b = 0; b < COUNT(gsizes); b++)
				for (size_t r = 0; r < COUNT(rows); r++)
					for (size_t c = 0; c < COUNT(heads); c++)
						scaled_axpy_case(k, bits, widths[a], gsizes[b], rows[r], heads[c], (unsigned)(a + r) % 3);
}

/*
 * The last record ends where an unreadable page begins, and so do the weights and accumulators (n records of
 * m codes of `bits` bits in groups of 32, g heads): axpy_i16_scaled, or axpy_u8_scaled (u8) where table k
 * takes the call, equals the scalar table. Run in a child.
 */
static void scaled_axpy_guarded_case(const struct kvp_kernels *k, int u8, unsigned bits, unsigned m, unsigned n,
				     unsigned g)
{
	const unsigned gs = 32, ng = (m + gs - 1) / gs;
	const size_t stride = 4 * ng + ((size_t)m * bits + 7) / 8, cb = n * stride, as = m + ng;
	uint8_t *p = guarded(cb);
	float *w = guarded(sizeof(float) * g * n), *acc = guarded(sizeof(float) * g * as);
	float want[5 * 132] = { 0 };
	const struct kvp_row_runs one = kvp_one_run(n, p, stride, NULL, 0);
	int took = 1;

	for (size_t i = 0; i < cb; i++)
		p[i] = (uint8_t)rnd32();
	for (unsigned i = 0; i < n; i++)
		for (unsigned e = 0; e < 2 * ng; e++) {
			uint16_t h = kvp_f32_to_f16((float)rand_int(1, 9));
			memcpy(p + i * stride + 2 * e, &h, sizeof h);
		}
	for (size_t i = 0; i < (size_t)g * n; i++)
		w[i] = (float)rand_int(0, 99);
	memset(acc, 0, sizeof(float) * g * as);
	if (u8 && (took = k->axpy_u8_scaled(bits, m, gs, &one, g, w, n, acc, as, NULL)))
		kvp_kernels_scalar.axpy_u8_scaled(bits, m, gs, &one, g, w, n, want, as, NULL);
	if (!u8) {
		k->axpy_i16_scaled(bits, m, gs, n, p, stride, g, w, n, acc, as);
		kvp_kernels_scalar.axpy_i16_scaled(bits, m, gs, n, p, stride, g, w, n, want, as);
	}
	check(!took || !memcmp(acc, want, sizeof(float) * g * as), "%s %s bits=%u m=%u n=%u g=%u: differs from scalar",
	      k->name, u8 ? "axpy_u8_scaled" : "axpy_i16_scaled", bits, m, n, g);
	unguard(p, cb), unguard(w, sizeof(float) * g * n), unguard(acc, sizeof(float) * g * as);
}

static void axpy_i16_scaled_reads_nothing_past_its_inputs_cases(const struct kvp_kernels *k)
{
	static const unsigned widths[] = { 64, 128, 65 }, rows[] = { 1, 5, 64 }, heads[] = { 1, 4, 5 };

	for (unsigned bits = 1; bits <= 4; bits++)
		for (size_t a = 0; a < COUNT(widths); a++)
			for (size_t b = 0; b < COUNT(rows); b++)
				for (size_t c = 0; c < COUNT(heads); c++)
					scaled_axpy_guarded_case(k, 0, bits, widths[a], rows[b], heads[c]);
}

static void axpy_i16_scaled_reads_nothing_past_its_inputs(const struct kvp_kernels *k)
{
	in_child(k, axpy_i16_scaled_reads_nothing_past_its_inputs_cases);
}

/* ---- axpy_u8_scaled: the scalar reference's bits, in runs as in one array ---- */

/* n records (ng fp16 z of either sign, ng fp16 s >= 0 with a few zeros, then m codes) at `stride`, `off` bytes
 * into an allocation. */
static uint8_t *scaled_records(unsigned bits, unsigned m, unsigned ng, unsigned n, size_t stride, unsigned off)
{
	uint8_t *p = rand_codes(n, stride, stride, off);

	(void)bits;
	for (unsigned i = 0; i < n; i++)
		for (unsigned c = 0; c < ng; c++) {
			uint16_t z = kvp_f32_to_f16((float)((int)(rnd32() % 2001) - 1000) / 700.0f);
			uint16_t h = (i + c) % 5 == 2 ? 0 : kvp_f32_to_f16(0.01f + (float)(rnd32() % 1000) / 300.0f);
			memcpy(p + off + i * stride + 2 * c, &z, sizeof z);
			memcpy(p + off + i * stride + 2 * (ng + c), &h, sizeof h);
		}
	(void)m;
	return p;
}

/* Whether table k's vector axpy_u8_scaled takes this shape (kernels.h: the scalar table takes every one). */
static int u8_scaled_covers(const struct kvp_kernels *k, unsigned bits, unsigned m, unsigned gsize)
{
	if (k == &kvp_kernels_scalar)
		return 1;
	if (!strcmp(k->name, "avx2") || !strcmp(k->name, "avx2-vnni") || !strcmp(k->name, "neon") ||
	    !strcmp(k->name, "neon-dotprod"))
		return (bits == 2 || bits == 4) && gsize % 8 == 0 && m % 8 == 0 && (m + gsize - 1) / gsize <= 4;
	return !strcmp(k->name, "avx512") && (bits == 2 || bits == 4) && gsize % 16 == 0 && m % 64 == 0 &&
	       (m + gsize - 1) / gsize <= 4;
}

/*
 * n records copied into runs of `run` rows, each its own allocation `off` bytes in, give the bits of the same
 * rows in one array on the scalar table; table k gives those bits where it takes the call, leaves acc as it
 * was where it declines, and declines only the shapes kernels.h lets it, and weights with a sign bit (-0).
 */
static void u8_scaled_case(const struct kvp_kernels *k, unsigned bits, unsigned m, unsigned gsize, unsigned n,
			   unsigned run, unsigned g, unsigned off)
{
	const unsigned ng = (m + gsize - 1) / gsize;
	const size_t stride = 4 * ng + ((size_t)m * bits + 7) / 8 + (m & 1), ws = n + 3, as = m + ng + 5;
	uint8_t *p = scaled_records(bits, m, ng, n, stride, off), *blocks[KVP_RUNS_MAX];
	const struct kvp_row_runs one = kvp_one_run(n, p + off, stride, NULL, 0);
	struct kvp_row_runs runs = { .n = n, .run = run, .stride = stride };
	float *w = rand_f32(g * ws, 0), *want = rand_f32(g * as, 0), *got = copy_f32(want, g * as);
	float *ref = copy_f32(want, g * as), *before = copy_f32(want, g * as);
	const struct kvp_ahead ahead = { .n = 1, .base = { p }, .bytes = { off + (size_t)n * stride } };
	unsigned r = 0;
	int took;

	for (size_t i = 0; i < g * ws; i++) /* softmax weights are at least 0 */
		w[i] = fabsf(w[i]);
	for (unsigned i0 = 0; i0 < n; i0 += run, r++) {
		const unsigned rows = n - i0 < run ? n - i0 : run;

		blocks[r] = xmalloc(off + (size_t)rows * stride);
		memcpy(blocks[r] + off, p + off + (size_t)i0 * stride, (size_t)rows * stride);
		runs.code[r] = blocks[r] + off;
	}
	check(kvp_kernels_scalar.axpy_u8_scaled(bits, m, gsize, &one, g, w, ws, want, as, NULL) == 1,
	      "scalar axpy_u8_scaled: declined weights of no sign");
	kvp_kernels_scalar.axpy_u8_scaled(bits, m, gsize, &runs, g, w, ws, ref, as, NULL);
	for (size_t j = 0; j < g * as; j++)
		check(same_bits(ref[j], want[j]),
		      "scalar axpy_u8_scaled bits=%u m=%u gsize=%u n=%u run=%u g=%u column %zu: %.9g in runs, %.9g in one array",
		      bits, m, gsize, n, run, g, j, ref[j], want[j]);
	took = k->axpy_u8_scaled(bits, m, gsize, &runs, g, w, ws, got, as, &ahead);
	check(took == u8_scaled_covers(k, bits, m, gsize), "%s axpy_u8_scaled bits=%u m=%u gsize=%u n=%u g=%u: took %d",
	      k->name, bits, m, gsize, n, g, took);
	for (size_t j = 0; j < g * as; j++)
		check(same_bits(got[j], took ? want[j] : before[j]),
		      "%s axpy_u8_scaled bits=%u m=%u gsize=%u n=%u run=%u g=%u off=%u head %zu column %zu: %.9g, %.9g",
		      k->name, bits, m, gsize, n, run, g, off, j / as, j % as, got[j], took ? want[j] : before[j]);
	w[(g - 1) * ws + n - 1] = -0.0f;
	memcpy(got, before, sizeof(float) * g * as);
	check(k->axpy_u8_scaled(bits, m, gsize, &runs, g, w, ws, got, as, NULL) == 0 &&
		      !memcmp(got, before, sizeof(float) * g * as),
	      "%s axpy_u8_scaled bits=%u m=%u n=%u g=%u: took a weight of -0, or changed acc", k->name, bits, m, n, g);
	while (r--)
		free(blocks[r]);
	free(p), free(w), free(want), free(got), free(ref), free(before);
}

static void axpy_u8_scaled_equals_scalar_in_runs_on_odd_lengths_and_unaligned_pointers(const struct kvp_kernels *k)
{
	static const unsigned widths[] = { 31, 64, 65, 128, 192, 256 }, gsizes[] = { 8, 16, 32, 48, 64 };
	static const unsigned shapes[][2] = { { 1, 16 }, { 17, 16 }, { 64, 64 }, { 61, 16 }, { 250, 64 }, { 256, 64 },
					      { 200, 112 } };

	for (unsigned bits = 1; bits <= 4; bits++)
		for (size_t a = 0; a < COUNT(widths); a++)
			for (size_t b = 0; b < COUNT(gsizes); b++)
				for (size_t c = 0; c < COUNT(shapes); c++)
					u8_scaled_case(k, bits, widths[a], gsizes[b], shapes[c][0], shapes[c][1],
						       1 + (unsigned)(a + b + c) % 5, (unsigned)(a + c) % 3);
}

/*
 * Every code at its largest (or least), the weights 0 for the first row and equal for the rest (all of them
 * 255 above the least), over 256 rows: the sums as far from zero as the contract lets them go, where a kernel
 * that adds products in narrower integers on the way would overflow. Bit for bit with the scalar table, where
 * the table takes the call.
 */
static void axpy_u8_scaled_sums_the_largest_codes_exactly(const struct kvp_kernels *k)
{
	enum { M = 128, G = 32, NG = M / G, N = 256, H = 4 };
	const size_t stride = 4 * NG + M / 2, as = M + NG;
	uint8_t *p = xmalloc(stride * N);
	float *w = xmalloc(sizeof *w * H * N), *got = xmalloc(sizeof *got * H * as), *want = xmalloc(sizeof *want * H * as);
	const struct kvp_row_runs one = kvp_one_run(N, p, stride, NULL, 0);
	const uint16_t unit = kvp_f32_to_f16(1.0f), zero = 0;

	for (size_t i = 0; i < (size_t)H * N; i++)
		w[i] = i % N ? 1.0f : 0.0f;
	for (unsigned bits = 2; bits <= 4; bits += 2)
		for (int fill = 0; fill <= 0xff; fill += 0xff) {
			for (unsigned i = 0; i < N; i++) {
				memset(p + i * stride + 4 * NG, fill, M * bits / 8);
				for (unsigned c = 0; c < NG; c++)
					memcpy(p + i * stride + 2 * c, &zero, 2), memcpy(p + i * stride + 2 * (NG + c), &unit, 2);
			}
			memset(got, 0, sizeof *got * H * as), memset(want, 0, sizeof *want * H * as);
			if (!k->axpy_u8_scaled(bits, M, G, &one, H, w, N, got, as, NULL))
				continue;
			kvp_kernels_scalar.axpy_u8_scaled(bits, M, G, &one, H, w, N, want, as, NULL);
			for (size_t j = 0; j < (size_t)H * as; j++)
				check(same_bits(got[j], want[j]), "%s axpy_u8_scaled bits=%u codes 0x%02x head %zu column %zu: %.9g, scalar %.9g",
				      k->name, bits, fill, j / as, j % as, got[j], want[j]);
		}
	free(p), free(w), free(got), free(want);
}

/* The contract of kernels.h in the test's own words, for one head and one run: the centred codes' sums on
 * 8-bit weights above the least, then the z sums with the codes' centre. */
static void scalar_axpy_u8_scaled_matches_its_definition(void)
{
	for (unsigned bits = 1; bits <= 4; bits++) {
		enum { M = 37, G = 8, NG = 5, N = 21 };
		const size_t stride = 4 * NG + (M * bits + 7) / 8;
		const float L = (float)((1u << bits) - 1);
		uint8_t *p = rand_codes(N, stride, stride, 0);
		const struct kvp_row_runs rows = kvp_one_run(N, p, stride, NULL, 0);
		float w[N], acc[M + NG] = { 0 }, top = 0, lo = INFINITY;

		for (unsigned i = 0; i < N; i++) {
			w[i] = (float)rand_int(0, 1000) / 999.0f;
			for (unsigned c = 0; c < NG; c++) {
				uint16_t z = kvp_f32_to_f16((float)rand_int(-99, 99) / 7.0f);
				uint16_t h = kvp_f32_to_f16((float)rand_int(1, 99) / 8.0f);
				memcpy(p + i * stride + 2 * c, &z, sizeof z);
				memcpy(p + i * stride + 2 * (NG + c), &h, sizeof h);
				top = fmaxf(top, w[i] * kvp_f16_to_f32(h));
				lo = fminf(lo, w[i] * kvp_f16_to_f32(h));
			}
		}
		check(kvp_kernels_scalar.axpy_u8_scaled(bits, M, G, &rows, 1, w, N, acc, M + NG, NULL) == 1,
		      "scalar axpy_u8_scaled bits=%u: declined", bits);
		for (unsigned j = 0; j < M; j++) {
			int64_t sum = 0, cols = 0;
			for (unsigned i = 0; i < N; i++) {
				uint16_t h;
				unsigned code = 0;
				memcpy(&h, p + i * stride + 2 * (NG + j / G), sizeof h);
				for (unsigned b = 0; b < bits; b++) /* bit b of the code: bit j * bits + b of the row */
					code |= (unsigned)(p[i * stride + 4 * NG + (j * bits + b) / 8] >> ((j * bits + b) % 8) & 1) << b;
				float x = (w[i] * kvp_f16_to_f32(h) - lo) * (255.0f / (top - lo));
				int32_t wq = (int32_t)(x + 0.5f); /* x >= 0: halves away from zero */
				sum += (int64_t)(2 * (int)code - (int)L) * (wq < 255 ? wq : 255);
				cols += 2 * (int)code - (int)L;
			}
			const float defined = (top - lo) / 510.0f * (float)sum + lo * 0.5f * (float)cols;
			check(same_bits(acc[j], defined), "scalar axpy_u8_scaled bits=%u column %u: %.9g, defined %.9g", bits, j,
			      acc[j], defined);
		}
		for (unsigned c = 0; c < NG; c++) { /* sixteen lanes by i % 16, then halves */
			float lane[16] = { 0 };
			uint16_t z, h;
			for (unsigned i = 0; i < N; i++) {
				memcpy(&z, p + i * stride + 2 * c, sizeof z);
				memcpy(&h, p + i * stride + 2 * (NG + c), sizeof h);
				lane[i % 16] += w[i] * (kvp_f16_to_f32(z) + kvp_f16_to_f32(h) * (L * 0.5f));
			}
			check(same_bits(acc[M + c], fold_halves(lane)), "scalar axpy_u8_scaled bits=%u z sum %u: %.9g, defined %.9g",
			      bits, c, acc[M + c], lane[0]);
		}
		free(p);
	}
}

static void axpy_u8_scaled_reads_nothing_past_its_inputs_cases(const struct kvp_kernels *k)
{
	static const unsigned widths[] = { 64, 128 }, rows[] = { 1, 5, 64, 256 }, heads[] = { 1, 4, 5 };

	for (unsigned bits = 2; bits <= 4; bits += 2)
		for (size_t a = 0; a < COUNT(widths); a++)
			for (size_t b = 0; b < COUNT(rows); b++)
				for (size_t c = 0; c < COUNT(heads); c++)
					scaled_axpy_guarded_case(k, 1, bits, widths[a], rows[b], heads[c]);
}

static void axpy_u8_scaled_reads_nothing_past_its_inputs(const struct kvp_kernels *k)
{
	in_child(k, axpy_u8_scaled_reads_nothing_past_its_inputs_cases);
}

/* ---- KIVI's kernels round halves to even ---- */

/* dot_i8_scaled with s = 1 and top 127 (so that the query's x_j = q_j) on exact halves, every code 1: each
 * row's score is the sum of the rounded query. Halves away from zero would give 127 + 1 + 2 + 3 - 3 + ...;
 * ties to even give the sum of `even`. The scalar table and table k alike. */
static void dot_i8_scaled_rounds_halves_to_even(const struct kvp_kernels *k)
{
	enum { M = 16, N = 16 };
	static const float q[M] = { 127, 0.5f, 1.5f, 2.5f, -2.5f, 3.5f, -0.5f, 4.5f, -3.5f, 5.5f, -5.5f, 6.5f, 7.5f, -7.5f, 8.5f, 9.5f };
	static const int even[M] = { 127, 0, 2, 2, -2, 4, 0, 4, -4, 6, -6, 6, 8, -8, 8, 10 };
	const struct kvp_kernels *tables[2] = { &kvp_kernels_scalar, k };
	uint8_t group[4 * M + M / 4 * N];
	int want = 0;

	for (unsigned j = 0; j < M; j++) {
		const uint16_t z = 0, one = kvp_f32_to_f16(1.0f);
		memcpy(group + 2 * j, &z, sizeof z);
		memcpy(group + 2 * (M + j), &one, sizeof one);
		want += even[j];
	}
	memset(group + 4 * M, 0x55, M / 4 * N); /* every code 1 */
	for (unsigned t = 0; t < 2; t++) {
		float out[N];
		tables[t]->dot_i8_scaled(2, M, N, 1, group, 1, q, M, out, N);
		for (unsigned i = 0; i < N; i++)
			check(out[i] == (float)want, "%s dot_i8_scaled row %u: %.9g, ties to even give %d", tables[t]->name, i, out[i],
			      want);
	}
}

/* axpy_i16_scaled with s = 1 and top 4095 (W(i) = w_i) on exact halves, every code 1, z = 0: each column's sum
 * is the sum of the rounded weights, the z sums 0. */
static void axpy_i16_scaled_rounds_halves_to_even(const struct kvp_kernels *k)
{
	enum { M = 64, G = 32, NG = 2, N = 16, STRIDE = 4 * NG + M / 4 };
	static const float w[N] = { 4095, 0.5f, 1.5f, 2.5f, 3.5f, 4.5f, 5.5f, 6.5f, 7.5f, 8.5f, 9.5f, 10.5f, 11.5f, 12.5f, 13.5f, 14.5f };
	static const int even[N] = { 4095, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14 };
	const struct kvp_kernels *tables[2] = { &kvp_kernels_scalar, k };
	uint8_t rows[N * STRIDE];
	int want = 0;

	memset(rows, 0x55, sizeof rows); /* every code 1 */
	for (unsigned i = 0; i < N; i++) {
		const uint16_t z = 0, one = kvp_f32_to_f16(1.0f);
		for (unsigned c = 0; c < NG; c++) {
			memcpy(rows + i * STRIDE + 2 * c, &z, sizeof z);
			memcpy(rows + i * STRIDE + 2 * (NG + c), &one, sizeof one);
		}
		want += even[i];
	}
	for (unsigned t = 0; t < 2; t++) {
		float acc[M + NG] = { 0 };
		tables[t]->axpy_i16_scaled(2, M, G, N, rows, STRIDE, 1, w, N, acc, M + NG);
		for (unsigned j = 0; j < M + NG; j++)
			check(acc[j] == (j < M ? (float)want : 0.0f), "%s axpy_i16_scaled column %u: %.9g, ties to even give %d",
			      tables[t]->name, j, acc[j], j < M ? want : 0);
	}
}

/* ---- fwht: the same bits as the scalar reference, at every power of two up to 4096 ---- */

static void fwht_is_bit_identical_to_scalar_at_every_power_of_two(const struct kvp_kernels *k)
{
	for (unsigned p = 1; p <= 4096; p *= 2)
		for (unsigned off = 0; off < 2; off++) {
			float *want = rand_f32(p, off), *got = copy_f32(want, p + off);

			k->fwht(p, got + off);
			kvp_kernels_scalar.fwht(p, want + off);
			for (unsigned j = 0; j < p; j++)
				check(same_bits(got[off + j], want[off + j]), "%s fwht p=%u off=%u value %u: %.9g, scalar %.9g",
				      k->name, p, off, j, got[off + j], want[off + j]);
			free(want);
			free(got);
		}
}

static void scalar_fwht_matches_the_hadamard_matrix(void)
{
	enum { P = 32 };
	float v[P];
	double x[P];

	for (unsigned j = 0; j < P; j++)
		x[j] = v[j] = (float)rand_int(-50, 50);
	kvp_kernels_scalar.fwht(P, v);
	for (unsigned i = 0; i < P; i++) {
		double want = 0;
		for (unsigned j = 0; j < P; j++)
			want += (__builtin_popcount(i & j) & 1 ? -1 : 1) * x[j];
		check(v[i] == want, "row %u: %g, want %g", i, v[i], want);
	}
}

/* ---- TurboQuant's encoder steps (sym_codes, sum_squares): the scalar reference's bytes and bits ---- */

/* Symmetric thresholds 0 < t[0] < ... as floats, and values that hit them exactly, their negatives, +-0. */
static void encoder_inputs(unsigned bits, unsigned m, float *t, float *y)
{
	const unsigned half = 1u << (bits - 1);

	for (unsigned k = 0; k + 1 < half; k++)
		t[k] = 0.1f * (float)(k + 1) + 0.01f * (float)(rnd32() % 7);
	for (unsigned j = 0; j < m; j++) {
		unsigned pick = rnd32() % 6;
		float v = pick == 0 && half > 1 ? t[rnd32() % (half - 1)] : pick == 1 ? 0.0f : (float)rand_int(-1000, 1000) / 1000.0f;
		y[j] = (pick == 2 || rnd32() % 2) ? -v : v;
	}
}

static void sym_codes_equal_scalar_at_every_width_with_ties_and_zeros(const struct kvp_kernels *k)
{
	for (unsigned bits = 1; bits <= 4; bits++)
		for (unsigned m = 16; m <= 256; m += 48) {
			float t[7], *y = rand_f32(m, 0);
			int32_t tb[7];
			uint8_t got[129], want[128];

			encoder_inputs(bits, m, t, y);
			memcpy(tb, t, sizeof t);
			memset(got, 0xa5, sizeof got);
			k->sym_codes(bits, m, y, tb, got);
			kvp_kernels_scalar.sym_codes(bits, m, y, tb, want);
			check(!memcmp(got, want, m * bits / 8), "%s sym_codes bits=%u m=%u: the bytes differ", k->name, bits, m);
			check(got[m * bits / 8] == 0xa5, "%s sym_codes bits=%u m=%u: wrote past its bytes", k->name, bits, m);
			free(y);
		}
}

static void sum_squares_equals_scalar_bit_for_bit(const struct kvp_kernels *k)
{
	for (unsigned m = 0; m <= 300; m += 7) {
		float *y = rand_f32(m + 1, 1);
		double got = k->sum_squares(m, y + 1), want = kvp_kernels_scalar.sum_squares(m, y + 1);

		check(!memcmp(&got, &want, sizeof got), "%s sum_squares m=%u: %.17g, scalar %.17g", k->name, m, got, want);
		free(y);
	}
}

/* The scalar sym_codes is the nearest cell: the count of all 2^bits - 1 thresholds (-t, 0, t) below y. */
static void scalar_sym_codes_count_the_thresholds_below(void)
{
	for (unsigned bits = 1; bits <= 4; bits++) {
		const unsigned m = 64, half = 1u << (bits - 1);
		float t[7], y[64], all[15];
		int32_t tb[7];
		uint8_t out[32];
		unsigned n = 0;

		encoder_inputs(bits, m, t, y);
		memcpy(tb, t, sizeof t);
		for (unsigned k = half - 1; k-- > 0;)
			all[n++] = -t[k];
		all[n++] = 0.0f;
		for (unsigned k = 0; k + 1 < half; k++)
			all[n++] = t[k];
		kvp_kernels_scalar.sym_codes(bits, m, y, tb, out);
		for (unsigned j = 0; j < m; j++) {
			unsigned want = 0;
			for (unsigned k = 0; k < n; k++)
				want += y[j] > all[k];
			check(code_of(out, bits, j) == want, "bits=%u value %u (%g): code %u, want %u", bits, j, y[j],
			      code_of(out, bits, j), want);
		}
	}
}

/* ---- masked rows (mask_expand) against the scalar reference, bit for bit ---- */

/* Kept channels of a mask of d bits (bits past d do not count). */
static unsigned kept_count(const uint8_t *mask, unsigned d)
{
	unsigned c = 0;

	for (unsigned j = 0; j < d; j++)
		c += mask[j >> 3] >> (j & 7) & 1;
	return c;
}

/* ---- SparK's choice of channels (spark_choose) against the scalar reference, bit for bit ---- */

/*
 * One token of d channels: keys drawn from `spread` values (few values: many ties at the threshold), x of
 * random signs; every array starts `off` elements into its buffer, and signs end exactly at their
 * allocation's end, so a byte written past them is caught under ASan.
 */
static void choose_case(const struct kvp_kernels *k, unsigned d, unsigned kept, unsigned spread, unsigned off)
{
	const size_t mb = (d + 7) / 8, sb = (d - kept + 7) / 8;
	int32_t *key = xmalloc(sizeof(int32_t) * (d + off)), *kv = key + off;
	float *x = rand_f32(d, off), *yg = rand_f32(d, off), *yw = rand_f32(d, off);
	uint8_t *mg = xmalloc(mb + off), *mw = xmalloc(mb + off), *sg = xmalloc(sb + off), *sw = xmalloc(sb + off);
	double got, want;

	for (unsigned j = 0; j < d; j++) {
		const float score = (float)(rnd32() % spread) * 0.375f;
		memcpy(kv + j, &score, sizeof score);
	}
	memset(mg, 0xa5, mb + off), memset(mw, 0x5a, mb + off), memset(sg, 0xa5, sb + off), memset(sw, 0x5a, sb + off);
	got = k->spark_choose(d, kept, kv, x + off, mg + off, sb ? sg + off : NULL, yg + off);
	want = kvp_kernels_scalar.spark_choose(d, kept, kv, x + off, mw + off, sb ? sw + off : NULL, yw + off);
	check(!memcmp(&got, &want, sizeof got), "%s spark_choose d=%u kept=%u spread=%u off=%u: sum %.17g, scalar %.17g",
	      k->name, d, kept, spread, off, got, want);
	check(!memcmp(mg + off, mw + off, mb), "%s spark_choose d=%u kept=%u spread=%u off=%u: masks differ", k->name, d,
	      kept, spread, off);
	check(!memcmp(sg + off, sw + off, sb), "%s spark_choose d=%u kept=%u spread=%u off=%u: signs differ", k->name, d,
	      kept, spread, off);
	check(kept_count(mw + off, d) == kept, "scalar spark_choose d=%u kept=%u: the mask keeps %u", d, kept,
	      kept_count(mw + off, d));
	for (unsigned i = 0; i < kept; i++)
		check(bits_of(yg[off + i]) == bits_of(yw[off + i]), "%s spark_choose d=%u kept=%u off=%u: y[%u] %.9g, scalar %.9g",
		      k->name, d, kept, off, i, yg[off + i], yw[off + i]);
	free(key), free(x), free(yg), free(yw), free(mg), free(mw), free(sg), free(sw);
}

static void choose_shapes(const struct kvp_kernels *k, unsigned off)
{
	static const unsigned widths[] = { 1, 7, 8, 9, 15, 16, 17, 64, 100, 128, 129, 255, 256, 257, 300 };
	static const unsigned spreads[] = { 1, 3, 50, 1u << 20 };

	for (size_t a = 0; a < COUNT(widths); a++) {
		const unsigned d = widths[a], kepts[] = { 1, d / 2 ? d / 2 : 1, d > 1 ? d - 1 : 1, d };

		for (size_t b = 0; b < COUNT(kepts); b++)
			for (size_t c = 0; c < COUNT(spreads); c++)
				for (int rep = 0; rep < 4; rep++)
					choose_case(k, d, kepts[b], spreads[c], off);
	}
}

/* The reference's own meaning on one hand-made token: d=10, kept 4, scores 5 at channels 1, 4, 6 and 8 (a
 * tie at the threshold: the lowest three of them stay with channel 2's 7), x negative at channels 0 and 9. */
static void scalar_spark_choose_keeps_the_largest_and_the_lowest_ties(void)
{
	const float score[10] = { 1, 5, 7, 0, 5, 2, 5, 3, 5, 4 };
	const float x[10] = { -1, 2, 3, 4, 5, 6, 7, 8, 9, -10 };
	int32_t key[10];
	uint8_t mask[2], signs[1];
	float y[10];
	double pruned;

	memcpy(key, score, sizeof key);
	pruned = kvp_kernels_scalar.spark_choose(10, 4, key, x, mask, signs, y);
	/* kept: 1, 2, 4, 6 (8 goes); pruned 0, 3, 5, 7, 8, 9 with signs - + + + + -: bits 0 and 5 */
	check(mask[0] == 0x56 && mask[1] == 0x00, "mask %02x %02x, want 56 00", mask[0], mask[1]);
	check(signs[0] == 0x21, "signs %02x, want 21", signs[0]);
	check(y[0] == 2 && y[1] == 3 && y[2] == 5 && y[3] == 7, "kept values %g %g %g %g", y[0], y[1], y[2], y[3]);
	check(pruned == 1 + 0 + 2 + 3 + 5 + 4, "pruned sum %g, want 15", pruned);
}

static void spark_choose_equals_scalar_on_odd_lengths_and_ties(const struct kvp_kernels *k)
{
	choose_shapes(k, 0);
}

static void spark_choose_equals_scalar_on_unaligned_pointers(const struct kvp_kernels *k)
{
	choose_shapes(k, 1);
	choose_shapes(k, 3);
}


/* ---- spark(quantize=rotated)'s code rows (mask_codes) against the scalar reference, byte for byte ---- */

/*
 * n rows of [4 bytes][mask][signs][magnitudes] at their stride, starting `off` bytes into the buffer, the last
 * row ending exactly at the allocation's end (a read past it is caught under ASan). Every fifth row has a
 * random mask (it seldom keeps exactly `kept`: code 15 throughout); the others keep `kept` channels chosen
 * at random. Signs and magnitudes are random bytes.
 */
static void mask_codes_case(const struct kvp_kernels *k, unsigned d, unsigned kept, unsigned mb, unsigned n,
			    unsigned off)
{
	const size_t mbytes = (d + 7) / 8, magb = ((size_t)kept * mb + 7) / 8;
	const struct kvp_mask_rows rows = { .d = d, .kept = kept, .mb = mb, .stride = 4 + 2 * mbytes + magb,
					    .mask_at = 4, .sign_at = 4 + mbytes, .mag_at = 4 + 2 * mbytes };
	const size_t len = off + n * rows.stride;
	uint8_t *base = xmalloc(len), *got = xmalloc(n * d / 2 + off), *want = xmalloc(n * d / 2 + off);

	for (size_t i = 0; i < len; i++)
		base[i] = (uint8_t)rnd32();
	for (unsigned i = 0; i < n; i++) {
		uint8_t *mask = base + off + i * rows.stride + rows.mask_at;
		unsigned left = kept;

		if (i % 5 == 4)
			continue;
		memset(mask, 0, mbytes);
		while (left) {
			const unsigned j = rnd32() % d;
			if (!(mask[j >> 3] >> (j & 7) & 1))
				mask[j >> 3] |= (uint8_t)(1u << (j & 7)), left--;
		}
	}
	memset(got, 0x5a, n * d / 2 + off), memset(want, 0xa5, n * d / 2 + off);
	k->mask_codes(&rows, n, base + off, got + off);
	kvp_kernels_scalar.mask_codes(&rows, n, base + off, want + off);
	for (size_t at = 0; at < (size_t)n * d / 2; at++)
		check(got[off + at] == want[off + at], "%s mask_codes d=%u kept=%u mb=%u n=%u off=%u row %zu byte %zu: %02x, scalar %02x",
		      k->name, d, kept, mb, n, off, at / (d / 2), at % (d / 2), got[off + at], want[off + at]);
	free(base), free(got), free(want);
}

static void mask_codes_shapes(const struct kvp_kernels *k, unsigned off)
{
	static const unsigned widths[] = { 2, 8, 16, 64, 128, 192, 256 }, ns[] = { 1, 5, 17 };

	for (size_t a = 0; a < COUNT(widths); a++) {
		const unsigned d = widths[a], kepts[] = { 1, d / 2, d - 1, d };

		for (size_t b = 0; b < COUNT(kepts); b++)
			for (unsigned mb = 0; mb <= 2; mb++)
				for (size_t c = 0; c < COUNT(ns); c++)
					mask_codes_case(k, d, kepts[b], mb, ns[c], off);
	}
}

/* The reference's own meaning on one hand-made row: d=8, channels 1, 2, 5 and 7 kept with magnitudes 3, 0,
 * 2, 1 (2 bits each), channels 0, 2 and 7 negative. */
static void scalar_mask_codes_places_magnitudes_signs_and_the_pruned_level(void)
{
	const uint8_t row[4] = { 0xa6, 0x85, 0x63, 0x00 }; /* mask 1010'0110, signs 1000'0101, mags 01 10 00 11 */
	const struct kvp_mask_rows rows = { .d = 8, .kept = 4, .mb = 2, .stride = 3, .mask_at = 0, .sign_at = 1,
					    .mag_at = 2 };
	const unsigned want[8] = { 8, 4, 9, 0, 0, 3, 0, 10 };
	uint8_t codes[8];

	kvp_kernels_scalar.mask_codes(&rows, 1, row, codes);
	for (unsigned j = 0; j < 8; j++)
		check((codes[j / 2] >> 4 * (j & 1) & 15) == want[j], "channel %u: code %u, want %u", j,
		      codes[j / 2] >> 4 * (j & 1) & 15, want[j]);
	/* a mask that keeps three channels, not four: code 15 throughout */
	{
		uint8_t bad[4] = { 0x26, 0x85, 0x63, 0x00 };

		kvp_kernels_scalar.mask_codes(&rows, 1, bad, codes);
		for (unsigned b = 0; b < 4; b++)
			check(codes[b] == 0xff, "unsound row: byte %u is %02x, want ff", b, codes[b]);
	}
}

static void mask_codes_equals_scalar_on_odd_lengths(const struct kvp_kernels *k)
{
	mask_codes_shapes(k, 0);
}

static void mask_codes_equals_scalar_on_unaligned_pointers(const struct kvp_kernels *k)
{
	mask_codes_shapes(k, 1);
	mask_codes_shapes(k, 3);
}

/*
 * n rows of [mask][signs] at stride bytes, and their kept values kept_stride floats apart; the last row
 * and its kept values end exactly at the end of their allocations, so a read past them is caught under
 * ASan. Every fourth row keeps all channels or none; the others keep each channel with chance 1/2, and
 * the mask's padding bits are random.
 */
static void mask_case(const struct kvp_kernels *k, unsigned d, unsigned n, unsigned off, int with_signs)
{
	const size_t mbytes = (d + 7) / 8, stride = 2 * mbytes + 1, kept_stride = d + 2;
	uint8_t *rows = xmalloc(n * stride + off);
	float *scale = rand_f32(n, off), *mag = rand_f32(d, off), *kept, *got, *want;
	unsigned last_kept = 0;
	size_t len;

	for (size_t i = 0; i < n * stride + off; i++)
		rows[i] = (uint8_t)rnd32();
	for (unsigned i = 0; i < n; i++) {
		uint8_t *mask = rows + off + i * stride;
		if (i % 4 == 1 || i % 4 == 3)
			memset(mask, i % 4 == 1 ? 0xff : 0x00, mbytes);
		last_kept = kept_count(mask, d);
	}
	/* the last row's signs end at its last pruned channel's byte */
	len = off + (n - 1) * stride + mbytes + (d - last_kept + 7) / 8;
	kept = rand_f32((n - 1) * kept_stride + last_kept, off);
	got = rand_f32((size_t)n * d, off);
	want = copy_f32(got, (size_t)n * d + off);
	{
		uint8_t *exact = xmalloc(len);
		memcpy(exact, rows, len);
		free(rows);
		rows = exact;
	}
	k->mask_expand(d, n, rows + off, with_signs ? rows + off + mbytes : NULL, stride, kept + off, kept_stride,
		       scale + off, mag + off, got + off);
	kvp_kernels_scalar.mask_expand(d, n, rows + off, with_signs ? rows + off + mbytes : NULL, stride,
				       kept + off, kept_stride, scale + off, mag + off, want + off);
	for (size_t at = 0; at < (size_t)n * d; at++)
		check(bits_of(got[off + at]) == bits_of(want[off + at]),
			  "%s mask_expand d=%u n=%u off=%u signs=%d row %zu channel %zu: %.9g, scalar %.9g", k->name,
			  d, n, off, with_signs, at / d, at % d, got[off + at], want[off + at]);
	free(rows), free(scale), free(mag), free(kept), free(got), free(want);
}

static void mask_shapes(const struct kvp_kernels *k, unsigned off)
{
	for (size_t a = 0; a < COUNT(lut_dims); a++)
		for (size_t b = 0; b < COUNT(counts); b++)
			for (int signs = 0; signs < 2; signs++)
				mask_case(k, lut_dims[a], counts[b], off, signs);
}

/* The reference's own meaning on one hand-made row: d=11, kept channels 0, 3, 4 and 10. */
static void scalar_mask_expand_places_kept_values_and_signed_recoveries(void)
{
	const uint8_t row[4] = { 0x19, 0x04, 0x05, 0x00 }; /* mask 0b100'0001'1001; signs of 1,2,5,6,7,8,9 */
	const float kept[4] = { 10, 13, 14, 20 }, scale = 2.0f;
	float mag[11], x[11];
	const float want[11] = { 10, -2, 4, 13, 14, -10, 12, 14, 16, 18, 20 };

	for (unsigned j = 0; j < 11; j++)
		mag[j] = (float)j;
	/* signs bits: pruned #0 (ch1) = 1, #2 (ch5) = 1: byte 0x05 */
	kvp_kernels_scalar.mask_expand(11, 1, row, row + 2, 4, kept, 4, &scale, mag, x);
	for (unsigned j = 0; j < 11; j++)
		check((x[j]) == (want[j]), "channel %u: %g, want %g", j, x[j], want[j]);
	kvp_kernels_scalar.mask_expand(11, 1, row, NULL, 4, kept, 4, NULL, NULL, x);
	for (unsigned j = 0; j < 11; j++)
		check((x[j]) == (row[j >> 3] >> (j & 7) & 1 ? want[j] : 0.0f), "channel %u", j);
}

static void mask_expand_matches_scalar_bit_for_bit_on_odd_lengths(const struct kvp_kernels *k)
{
	mask_shapes(k, 0);
}
static void mask_expand_matches_scalar_on_unaligned_pointers(const struct kvp_kernels *k)
{
	mask_shapes(k, 1);
	mask_shapes(k, 2);
	mask_shapes(k, 3);
}


/* ---- SparK keys over Hadamard codes (spark_dot_i16_group): equal to the scalar integers ---- */

/* A row layout of d channels, T kept, `bits`-bit codes: mask, signs, codes, then `pad` bytes. */
static struct kvp_masked_codes spark_rows(unsigned d, unsigned T, unsigned bits, unsigned pad, int8_t *lut, int8_t *sgn,
					  int16_t *rho, int ends)
{
	struct kvp_masked_codes rc = { .d = d, .kept = T, .bits = bits, .lut = lut, .sgn = sgn, .rho = rho };

	rc.mask_at = 0;
	rc.sign_at = (d + 7) / 8;
	rc.code_at = rc.sign_at + (d - T + 7) / 8;
	rc.stride = rc.code_at + (T * bits + 7) / 8 + pad;
	while ((127u * T) << (rc.shift + 1) <= 32767u)
		rc.shift++;
	for (unsigned v = 0; v < 16; v++)
		lut[v] = (int8_t)rand_in(ends, -127, 127);
	for (unsigned r = 0; r < T; r++)
		sgn[r] = rnd32() & 1 ? -1 : 1;
	for (unsigned j = 0; j < d; j++)
		rho[j] = (int16_t)rand_in(ends, 0, 32767);
	return rc;
}

/* n rows of random bytes, each row's mask then rewritten to keep exactly T channels at random; rows 3 and 5
 * of every 7 keep one more and one fewer (bytes no encoder wrote, which score 0). */
static uint8_t *spark_bytes(const struct kvp_masked_codes *rc, unsigned n, unsigned off)
{
	uint8_t *p = rand_codes(n, rc->stride, rc->code_at + (rc->kept * rc->bits + 7) / 8, off);

	for (unsigned i = 0; i < n; i++) {
		uint8_t *mask = p + off + (size_t)i * rc->stride + rc->mask_at;
		unsigned have = 0, want = rc->kept + (i % 7 == 3 && rc->kept < rc->d) - (i % 7 == 5);

		memset(mask, 0, (rc->d + 7) / 8);
		while (have < want) {
			unsigned j = rnd32() % rc->d;
			if (!(mask[j >> 3] >> (j & 7) & 1))
				mask[j >> 3] |= (uint8_t)(1u << (j & 7)), have++;
		}
	}
	return p;
}

static void spark_case(const struct kvp_kernels *k, unsigned d, unsigned T, unsigned bits, unsigned n, unsigned g,
		       unsigned off, int ends)
{
	const int32_t top = (int32_t)(2147483647u / (d * 32767u));
	const size_t qs = d + 3;
	int8_t lut[16], sgn[64];
	int16_t *rho = xmalloc(sizeof *rho * (d + off)), *ell = xmalloc(sizeof *ell * (n + off));
	int16_t *q = xmalloc(sizeof *q * (g * qs + off));
	const struct kvp_masked_codes rc = spark_rows(d, T, bits, 1 + (d & 1), lut, sgn, rho + off, ends);
	uint8_t *rows = spark_bytes(&rc, n, off);
	float *rs = rand_f32(n, off), *hs = rand_f32(g, 0);
	float *got = rand_f32((size_t)g * n + off, 0), *want = copy_f32(got, (size_t)g * n + off);

	for (unsigned i = 0; i < n; i++)
		ell[off + i] = (int16_t)rand_in(ends, 0, 32767);
	for (size_t j = 0; j < g * qs; j++)
		q[off + j] = (int16_t)rand_in(ends, -top, top);
	k->spark_dot_i16_group(&rc, n, rows + off, ell + off, rs + off, g, q + off, qs, hs, got + off, n);
	kvp_kernels_scalar.spark_dot_i16_group(&rc, n, rows + off, ell + off, rs + off, g, q + off, qs, hs, want + off,
					       n);
	for (size_t i = 0; i < (size_t)g * n + off; i++)
		check(same_bits(got[i], want[i]),
		      "%s spark_dot_i16_group d=%u T=%u bits=%u n=%u g=%u off=%u ends=%d: out[%zu] %.9g, scalar %.9g",
		      k->name, d, T, bits, n, g, off, ends, i, got[i], want[i]);
	free(rho), free(ell), free(q), free(rows), free(rs), free(hs), free(got), free(want);
}

/* The shapes of a table's own version (d a multiple of 32 up to 128, at most 64 pruned; T below 32 leaves
 * lanes of the register unused) and the plain loop's (odd d, 96 pruned). */
static void spark_shapes(const struct kvp_kernels *k, unsigned off, int ends)
{
	static const unsigned shapes[][2] = { { 128, 64 }, { 64, 32 }, { 96, 32 }, { 32, 16 }, { 64, 2 }, { 128, 32 },
					      { 37, 16 }, { 8, 4 }, { 130, 64 } };
	static const unsigned ns[] = { 1, 15, 16, 17, 70 }, gs[] = { 1, 3, 4, 5, 8 };

	for (size_t s = 0; s < COUNT(shapes); s++)
		for (unsigned bits = 1; bits <= 4; bits++)
			for (size_t a = 0; a < COUNT(ns); a++)
				spark_case(k, shapes[s][0], shapes[s][1], bits, ns[a], gs[(s + bits + a) % COUNT(gs)], off,
					   ends);
}

static void spark_dot_i16_equals_scalar_on_odd_lengths(const struct kvp_kernels *k)
{
	spark_shapes(k, 0, 0);
}

static void spark_dot_i16_equals_scalar_on_unaligned_pointers(const struct kvp_kernels *k)
{
	spark_shapes(k, 1, 0);
	spark_shapes(k, 3, 0);
}

static void spark_dot_i16_equals_scalar_at_the_ends_of_its_ranges(const struct kvp_kernels *k)
{
	spark_shapes(k, 0, 1);
}

/* The contract of kernels.h in the test's own words: H[k][r] = (-1)^popcount(k & r). */
static void scalar_spark_dot_i16_matches_its_definition(void)
{
	const unsigned d = 12, T = 4, bits = 3, n = 6, g = 2;
	int8_t lut[16], sgn[64];
	int16_t rho[12], ell[6], q[2 * 12];
	const struct kvp_masked_codes rc = spark_rows(d, T, bits, 2, lut, sgn, rho, 0);
	uint8_t *rows = spark_bytes(&rc, n, 0);
	float rs[6], hs[2] = { 0.5f, -1.25f }, out[2 * 6];

	for (unsigned i = 0; i < n; i++)
		ell[i] = (int16_t)rand_int(0, 32767), rs[i] = 0.25f + (float)i;
	for (unsigned j = 0; j < g * d; j++)
		q[j] = (int16_t)rand_int(-5000, 5000);
	kvp_kernels_scalar.spark_dot_i16_group(&rc, n, rows, ell, rs, g, q, d, hs, out, n);
	for (unsigned i = 0; i < n; i++) {
		const uint8_t *row = rows + i * rc.stride;
		int32_t z[4], x[12];
		unsigned t = 0, p = 0;

		for (unsigned r = 0; r < T; r++) {
			z[r] = 0;
			for (unsigned c = 0; c < T; c++)
				z[r] += (__builtin_popcount(r & c) & 1 ? -1 : 1) * lut[code_of(row + rc.code_at, bits, c)];
			z[r] = sgn[r] * z[r] * (1 << rc.shift);
		}
		for (unsigned j = 0; j < d; j++) {
			if (row[j / 8] >> (j % 8) & 1) {
				x[j] = t < T ? z[t] : 0;
				t++;
			} else {
				int32_t v = (int32_t)floor(((double)rho[j] * ell[i]) / 32768.0 + 0.5);
				x[j] = row[rc.sign_at + p / 8] >> (p % 8) & 1 ? -v : v;
				p++;
			}
		}
		for (unsigned h = 0; h < g; h++) {
			int32_t s = 0;
			for (unsigned j = 0; j < d && t == T; j++)
				s += x[j] * q[h * d + j];
			check(same_bits(out[h * n + i], ((float)s * hs[h]) * rs[i]), "row %u head %u: %.9g", i, h,
			      out[h * n + i]);
		}
	}
	free(rows);
}

/* ---- band_norms ---- */

static void scalar_band_norms_reads_both_layouts(void)
{
	const float rows[8] = { 3, 0, 4, 1, /* half: bands (3,4) and (0,1) */ 6, 8, 0, -2 /* interleaved */ };
	float out[2];

	kvp_kernels_scalar.band_norms(4, 1, 0, rows, out);
	check(out[0] == 5.0f && out[1] == 1.0f, "half: %g %g", out[0], out[1]);
	kvp_kernels_scalar.band_norms(4, 1, 1, rows + 4, out);
	check(out[0] == 10.0f && out[1] == 2.0f, "interleaved: %g %g", out[0], out[1]);
}

static void band_norms_case(const struct kvp_kernels *k, unsigned d, unsigned n, int interleaved, unsigned off)
{
	unsigned m = n * (d / 2);
	float *rows = rand_f32((size_t)n * d, off), *want = rand_f32(m, 0), *got = rand_f32(m, off);

	kvp_kernels_scalar.band_norms(d, n, interleaved, rows + off, want);
	k->band_norms(d, n, interleaved, rows + off, got + off);
	for (unsigned i = 0; i < m; i++)
		check(bits_of(got[off + i]) == bits_of(want[i]), "%s d=%u n=%u interleaved=%d off=%u band %u: %a vs %a",
			     k->name, d, n, interleaved, off, i, got[off + i], want[i]);
	free(rows), free(want), free(got);
}

static void band_norms_is_bit_identical_to_scalar_in_both_layouts(const struct kvp_kernels *k)
{
	static const unsigned band_dims[] = { 2, 6, 8, 14, 16, 18, 30, 64, 128, 130 };
	for (size_t a = 0; a < COUNT(band_dims); a++)
		for (size_t b = 0; b < COUNT(counts); b++)
			for (unsigned off = 0; off < 2; off++)
				for (int il = 0; il < 2; il++)
					band_norms_case(k, band_dims[a], counts[b], il, off);
}


/* ---- dispatch ---- */

static const struct kvp_kernels *best_here(void)
{
	static const char *const order[] = { "avx512", "avx2-vnni", "avx2", "neon-dotprod", "neon", "scalar" };
	const struct kvp_kernels *k = NULL;

	for (size_t i = 0; !k && i < COUNT(order); i++)
		k = kvp_kernels_named(order[i]);
	return k;
}

static void dispatch_names_scalar_everywhere(void)
{
	check(kvp_kernels_named("scalar") == &kvp_kernels_scalar, "scalar is not the scalar table");
}

static void dispatch_returns_null_for_unknown_or_foreign_names(void)
{
	check(kvp_kernels_named("sse9") == NULL, "kvp_kernels_named(\"sse9\") is not NULL");
	check(kvp_kernels_named("") == NULL, "kvp_kernels_named(\"\") is not NULL");
	check(kvp_kernels_named(NULL) == NULL, "kvp_kernels_named(NULL) is not NULL");
	check(kvp_kernels_named("AVX2") == NULL, "kvp_kernels_named(\"AVX2\") is not NULL");
#if defined(__x86_64__)
	check(kvp_kernels_named("neon") == NULL, "kvp_kernels_named(\"neon\") is not NULL");
	check(kvp_kernels_named("neon-dotprod") == NULL, "kvp_kernels_named(\"neon-dotprod\") is not NULL");
	check(kvp_kernels_named("AVX512") == NULL, "kvp_kernels_named(\"AVX512\") is not NULL");
	check(kvp_kernels_named("avx512f") == NULL, "kvp_kernels_named(\"avx512f\") is not NULL");
#elif defined(__aarch64__)
	check(kvp_kernels_named("avx2") == NULL, "kvp_kernels_named(\"avx2\") is not NULL");
	check(kvp_kernels_named("avx2-vnni") == NULL, "kvp_kernels_named(\"avx2-vnni\") is not NULL");
	check(kvp_kernels_named("avx512") == NULL, "kvp_kernels_named(\"avx512\") is not NULL");
#endif
}

static void dispatch_tables_are_complete_and_named_for_their_name(void)
{
	static const char *const names[] = { "scalar", "avx2", "avx2-vnni", "avx512", "neon", "neon-dotprod" };

	for (size_t i = 0; i < COUNT(names); i++) {
		const struct kvp_kernels *k = kvp_kernels_named(names[i]);

		if (!k)
			continue;
		check(!strcmp(k->name, names[i]), "%s is named %s", names[i], k->name);
		check(k->dot_f32 && k->dot_f16 && k->axpy_f32 && k->axpy_f16 && k->f32_to_f16 &&
			  k->f16_to_f32 && k->softmax_step && k->softmax_group && k->scale && k->lut_dot && k->lut_axpy &&
			  k->lut_dot_group && k->lut_axpy_group && k->lut_dot_i8_group && k->lut_axpy_i16_group && k->lut_axpy_u8_group && k->dot_i8_scaled && k->axpy_i16_scaled && k->fwht &&
			  k->sym_codes && k->sum_squares &&
			  k->dot_f16_group && k->axpy_f16_group && k->mask_expand && k->band_norms &&
			  k->spark_dot_i16_group && k->spark_choose,
		      "%s has an empty slot", names[i]);
	}
}

static void dispatch_honours_kvp_kernels_scalar(void)
{
	check(setenv("KVP_KERNELS", "scalar", 1) == 0, "setenv");
	check(kvp_kernels() == &kvp_kernels_scalar, "chose %s", kvp_kernels()->name);
}

static void dispatch_honours_kvp_kernels_naming_a_vector_table(void)
{
	const struct kvp_kernels *k = kvp_kernels_named("avx2") ? kvp_kernels_named("avx2")
								 : kvp_kernels_named("neon");

	if (!k) {
		printf("no vector kernels run here: nothing to name\n");
		return;
	}
	check(setenv("KVP_KERNELS", k->name, 1) == 0, "setenv");
	check(kvp_kernels() == k, "chose %s, not %s", kvp_kernels()->name, k->name);
}

static void dispatch_falls_back_to_the_best_for_an_unknown_kvp_kernels(void)
{
	check(setenv("KVP_KERNELS", "sse9", 1) == 0, "setenv");
	check(kvp_kernels() == best_here(), "chose %s, best is %s",
		  kvp_kernels()->name, best_here()->name);
}

#if defined(__aarch64__)
/* The dot product (sdot), asked of the kernel directly rather than through dispatch.c's own probe. */
static int dotprod_here(void)
{
	return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
}
#endif

/* KVP_KERNELS=neon picks the plain NEON table even where the CPU has the dot product (neon-dotprod would
 * be the best); where NEON does not run, it falls back to the best that does. */
static void dispatch_honours_kvp_kernels_neon_where_neon_dotprod_runs_too(void)
{
	check(setenv("KVP_KERNELS", "neon", 1) == 0, "setenv");
#if defined(__aarch64__)
	check(kvp_kernels() == &kvp_kernels_neon, "chose %s, not neon", kvp_kernels()->name);
#else
	check(kvp_kernels() == best_here(), "chose %s, best is %s", kvp_kernels()->name, best_here()->name);
#endif
}

/* KVP_KERNELS=neon-dotprod picks that table where the CPU has the dot product, and anywhere else falls back
 * to the best table that runs (neon on an ARM CPU without it). */
static void dispatch_honours_kvp_kernels_neon_dotprod_where_the_cpu_has_the_dot_product(void)
{
	check(setenv("KVP_KERNELS", "neon-dotprod", 1) == 0, "setenv");
#if defined(__aarch64__)
	if (dotprod_here()) {
		check(kvp_kernels() == &kvp_kernels_neon_dotprod, "chose %s, not neon-dotprod", kvp_kernels()->name);
		check(!strcmp(kvp_kernels()->name, "neon-dotprod"), "the table is named %s", kvp_kernels()->name);
		return;
	}
	check(kvp_kernels_named("neon-dotprod") == NULL, "neon-dotprod is named although the CPU cannot run it");
	check(kvp_kernels() == &kvp_kernels_neon, "chose %s, not neon", kvp_kernels()->name);
#endif
	check(kvp_kernels() == best_here(), "chose %s, best is %s", kvp_kernels()->name, best_here()->name);
}

#if defined(__x86_64__)
/* AVX-512 F, BW, VL and DQ, and XCR0 saying the OS saves the opmask and zmm registers, asked of the CPU
 * directly rather than through dispatch.c's own probe. */
static int avx512_here(void)
{
	unsigned a, b, c, d, lo, hi;

	if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_OSXSAVE) || !(c & bit_F16C))
		return 0;
	__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
	(void)hi;
	if ((lo & 0xe6u) != 0xe6u || !__get_cpuid_count(7, 0, &a, &b, &c, &d))
		return 0;
	return (b & bit_AVX512F) && (b & bit_AVX512BW) && (b & bit_AVX512VL) && (b & bit_AVX512DQ);
}

/* AVX-VNNI (CPUID leaf 7, subleaf 1, EAX bit 4), asked of the CPU directly. */
static int avx_vnni_here(void)
{
	unsigned a, b, c, d;

	return __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 4));
}
#endif

/* KVP_KERNELS=avx2 picks the plain AVX2 table even where avx2-vnni (or avx512) would be the best; where AVX2
 * does not run, it falls back to the best that does. */
static void dispatch_honours_kvp_kernels_avx2_where_avx2_vnni_runs_too(void)
{
	check(setenv("KVP_KERNELS", "avx2", 1) == 0, "setenv");
#if defined(__x86_64__)
	if (kvp_kernels_named("avx2")) {
		check(kvp_kernels() == &kvp_kernels_avx2, "chose %s, not avx2", kvp_kernels()->name);
		return;
	}
#endif
	check(kvp_kernels() == best_here(), "chose %s, best is %s", kvp_kernels()->name, best_here()->name);
}

/* KVP_KERNELS=avx2-vnni picks that table where the CPU has AVX2 and AVX-VNNI, and anywhere else falls back to
 * the best table that runs (avx2 on an AVX2 CPU without AVX-VNNI). */
static void dispatch_honours_kvp_kernels_avx2_vnni_where_the_cpu_has_avx_vnni(void)
{
	check(setenv("KVP_KERNELS", "avx2-vnni", 1) == 0, "setenv");
#if defined(__x86_64__)
	if (kvp_kernels_named("avx2") && avx_vnni_here()) {
		check(kvp_kernels() == &kvp_kernels_avx2_vnni, "chose %s, not avx2-vnni", kvp_kernels()->name);
		check(!strcmp(kvp_kernels()->name, "avx2-vnni"), "the table is named %s", kvp_kernels()->name);
		return;
	}
	check(kvp_kernels_named("avx2-vnni") == NULL, "avx2-vnni is named although the CPU cannot run it");
#endif
	check(kvp_kernels() == best_here(), "chose %s, best is %s", kvp_kernels()->name, best_here()->name);
}

/* KVP_KERNELS=avx512 picks the AVX-512 table where the CPU runs it, and anywhere else falls back to
 * the best table that does run, as for any name this build or CPU cannot run. */
static void dispatch_honours_kvp_kernels_avx512(void)
{
	check(setenv("KVP_KERNELS", "avx512", 1) == 0, "setenv");
#if defined(__x86_64__)
	if (avx512_here()) {
		check(kvp_kernels() == &kvp_kernels_avx512, "chose %s, not avx512", kvp_kernels()->name);
		check(!strcmp(kvp_kernels()->name, "avx512"), "the avx512 table is named %s", kvp_kernels()->name);
		return;
	}
	check(kvp_kernels_named("avx512") == NULL, "avx512 is named although the CPU cannot run it");
#endif
	check(kvp_kernels() == best_here(), "chose %s, best is %s", kvp_kernels()->name, best_here()->name);
}

static void dispatch_picks_the_best_the_cpu_runs_without_kvp_kernels(void)
{
	check(unsetenv("KVP_KERNELS") == 0, "unsetenv");
	check(kvp_kernels() == best_here(), "chose %s, best is %s",
		  kvp_kernels()->name, best_here()->name);
#if defined(__x86_64__)
	/* asked of the CPU directly rather than through dispatch.c's own probe */
	unsigned a, b, c, d;
	int f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);

	int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;

	if (avx2 && avx512_here())
		check(!strcmp(kvp_kernels()->name, "avx512"), "chose %s, not avx512", kvp_kernels()->name);
	else if (avx2 && avx_vnni_here())
		check(!strcmp(kvp_kernels()->name, "avx2-vnni"), "chose %s, not avx2-vnni", kvp_kernels()->name);
	else if (avx2)
		check(!strcmp(kvp_kernels()->name, "avx2"), "chose %s, not avx2", kvp_kernels()->name);
#elif defined(__aarch64__)
	const char *want = dotprod_here() ? "neon-dotprod" : "neon";

	check(!strcmp(kvp_kernels()->name, want), "chose %s, not %s", kvp_kernels()->name, want);
#endif
}

static void dispatch_chooses_once_per_process(void)
{
	check(setenv("KVP_KERNELS", "scalar", 1) == 0, "setenv");

	const struct kvp_kernels *first = kvp_kernels();

	check(unsetenv("KVP_KERNELS") == 0, "unsetenv");
	check(kvp_kernels() == first, "chose %s, then %s", first->name, kvp_kernels()->name);
}

/* ---- CRC32C ---- */

static void crc32c_reference_gives_the_published_check_values(void)
{
	check(kvp_crc32c_scalar(0, "123456789", 9) == 0xe3069283u, "check value: %08x",
	      kvp_crc32c_scalar(0, "123456789", 9));
	check(kvp_crc32c_scalar(0, "", 0) == 0, "crc32c of nothing: %08x", kvp_crc32c_scalar(0, "", 0));
}

/* Every hardware version runnable here against the reference: lengths around the 8-byte stride and the
 * three-lane split, unaligned starts, and continuation piece by piece. */
static void crc32c_hardware_versions_match_the_reference(void)
{
	static const char *const hw[] = { "sse42", "armv8" };
	static const size_t lanes[] = { 6143, 6144, 6145, 6151, 12288 + 5, 20000, 49999 };
	static unsigned char buf[50100];
	unsigned ran = 0;

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
		for (size_t off = 0; off < 8; off += 3)
			for (size_t j = 0; j < COUNT(lanes); j++)
				check(f(0, buf + off, lanes[j]) == kvp_crc32c_scalar(0, buf + off, lanes[j]),
				      "crc32c %s: %zu bytes at +%zu", hw[i], lanes[j], off);
	}
	if (!ran)
		printf("no hardware crc32c runnable here; checked the reference only\n");
}

static void dispatch_kvp_kernels_scalar_also_chooses_the_crc32c_reference(void)
{
	check(setenv("KVP_KERNELS", "scalar", 1) == 0, "setenv");
	check(!strcmp(kvp_crc32c_name(), "scalar"), "chose crc32c %s", kvp_crc32c_name());
	check(kvp_crc32c(0, "123456789", 9) == 0xe3069283u, "check value");
}

static void dispatch_picks_the_best_crc32c_the_cpu_runs(void)
{
	const char *best = kvp_crc32c_named("sse42") ? "sse42" : kvp_crc32c_named("armv8") ? "armv8" : "scalar";

	check(setenv("KVP_KERNELS", "sse9", 1) == 0, "setenv");
	check(!strcmp(kvp_crc32c_name(), best), "chose crc32c %s, best is %s", kvp_crc32c_name(), best);
	check(kvp_crc32c(0, "123456789", 9) == 0xe3069283u, "check value");
}

/* ---- running them ---- */

struct test {
	const char *name;
	void (*run)(void);
};

struct vector_test {
	const char *name;
	void (*run)(const struct kvp_kernels *k);
};

#define TEST(fn) { #fn, fn }

static const struct test reference_tests[] = {
	TEST(scalar_f16_round_trips_every_half),
	TEST(scalar_f32_to_f16_rounds_ties_to_even),
	TEST(scalar_f32_to_f16_keeps_signed_zeros_infinities_and_nans),
	TEST(scalar_dot_and_axpy_match_double_precision),
	TEST(scalar_softmax_step_on_first_block_returns_zero),
	TEST(scalar_softmax_step_on_all_masked_block_gives_zero_weights),
	TEST(scalar_softmax_step_composed_over_blocks_matches_double_reference),
	TEST(scalar_softmax_group_shows_the_scaled_scores_and_weighs_them_per_head),
	TEST(scalar_lut_dot_and_axpy_match_double_precision_at_every_width),
	TEST(scalar_integer_lookups_match_their_definition),
	TEST(scalar_dot_i8_scaled_matches_its_definition),
	TEST(scalar_axpy_i16_scaled_matches_its_definition),
	TEST(scalar_axpy_u8_scaled_matches_its_definition),
	TEST(scalar_fwht_matches_the_hadamard_matrix),
	TEST(scalar_sym_codes_count_the_thresholds_below),
	TEST(scalar_mask_expand_places_kept_values_and_signed_recoveries),
	TEST(scalar_spark_choose_keeps_the_largest_and_the_lowest_ties),
	TEST(scalar_mask_codes_places_magnitudes_signs_and_the_pruned_level),
	TEST(scalar_spark_dot_i16_matches_its_definition),
	TEST(scalar_band_norms_reads_both_layouts),
	TEST(crc32c_reference_gives_the_published_check_values),
	TEST(crc32c_hardware_versions_match_the_reference),
	TEST(dispatch_names_scalar_everywhere),
	TEST(dispatch_returns_null_for_unknown_or_foreign_names),
	TEST(dispatch_tables_are_complete_and_named_for_their_name),
};

/* Each in a process of its own: they set KVP_KERNELS before the process's one choice. */
static const struct test own_process_tests[] = {
	TEST(dispatch_honours_kvp_kernels_scalar),
	TEST(dispatch_honours_kvp_kernels_naming_a_vector_table),
	TEST(dispatch_honours_kvp_kernels_avx512),
	TEST(dispatch_honours_kvp_kernels_avx2_where_avx2_vnni_runs_too),
	TEST(dispatch_honours_kvp_kernels_avx2_vnni_where_the_cpu_has_avx_vnni),
	TEST(dispatch_honours_kvp_kernels_neon_where_neon_dotprod_runs_too),
	TEST(dispatch_honours_kvp_kernels_neon_dotprod_where_the_cpu_has_the_dot_product),
	TEST(dispatch_falls_back_to_the_best_for_an_unknown_kvp_kernels),
	TEST(dispatch_picks_the_best_the_cpu_runs_without_kvp_kernels),
	TEST(dispatch_chooses_once_per_process),
	TEST(dispatch_kvp_kernels_scalar_also_chooses_the_crc32c_reference),
	TEST(dispatch_picks_the_best_crc32c_the_cpu_runs),
};

/* Run once per vector table runnable here, each against the scalar table. */
static const struct vector_test vector_tests[] = {
	TEST(dot_f32_matches_scalar_on_odd_lengths),
	TEST(dot_f32_matches_scalar_on_unaligned_pointers),
	TEST(dot_f16_matches_scalar_on_odd_lengths),
	TEST(dot_f16_matches_scalar_on_unaligned_pointers),
	TEST(axpy_f32_matches_scalar_on_odd_lengths),
	TEST(axpy_f32_matches_scalar_on_unaligned_pointers),
	TEST(axpy_f16_matches_scalar_on_odd_lengths),
	TEST(axpy_f16_matches_scalar_on_unaligned_pointers),
	TEST(f16_group_kernels_match_scalar_for_every_group_size),
	TEST(f16_group_kernels_match_scalar_on_unaligned_pointers),
	TEST(f16_group_kernels_give_the_same_bits_whatever_they_prefetch),
	TEST(scale_is_bit_identical_to_scalar_on_odd_and_unaligned_lengths),
	TEST(f32_to_f16_is_bit_identical_on_zeros_subnormals_inf_nan_and_overflow),
	TEST(f32_to_f16_is_bit_identical_on_every_tie),
	TEST(f32_to_f16_is_bit_identical_across_a_sweep_of_all_floats),
	TEST(f32_to_f16_is_bit_identical_on_odd_lengths_and_unaligned_pointers),
	TEST(f16_to_f32_matches_scalar_on_every_half),
	TEST(f16_to_f32_matches_scalar_on_odd_lengths_and_unaligned_pointers),
	TEST(softmax_step_matches_scalar_on_odd_lengths),
	TEST(softmax_step_matches_scalar_on_unaligned_pointers),
	TEST(softmax_step_matches_scalar_with_masked_scores_and_underflow),
	TEST(softmax_step_on_first_block_returns_zero),
	TEST(softmax_step_on_all_masked_block_gives_zero_weights),
	TEST(softmax_step_composed_over_blocks_matches_double_reference),
	TEST(softmax_group_matches_scalar_for_every_group_size_scale_and_odd_length),
	TEST(softmax_group_gives_the_bits_of_scale_then_softmax_step_per_head),
	TEST(softmax_group_without_raw_gives_the_same_weights),
	TEST(lut_dot_and_axpy_match_scalar_at_every_width_and_odd_length),
	TEST(lut_dot_and_axpy_match_scalar_on_unaligned_pointers),
	TEST(lut_group_kernels_match_scalar_head_by_head),
	TEST(integer_lookups_equal_scalar_for_every_width_group_and_length),
	TEST(integer_lookups_equal_scalar_on_unaligned_pointers),
	TEST(integer_lookups_equal_scalar_on_long_rows),
	TEST(u8_lookups_read_rows_in_runs_as_one_array),
	TEST(fwht_is_bit_identical_to_scalar_at_every_power_of_two),
	TEST(sym_codes_equal_scalar_at_every_width_with_ties_and_zeros),
	TEST(sum_squares_equals_scalar_bit_for_bit),
	TEST(integer_lookups_equal_scalar_at_the_ends_of_their_ranges),
	TEST(integer_lookups_read_nothing_past_their_inputs),
	TEST(dot_i8_scaled_equals_scalar_on_odd_lengths_and_unaligned_pointers),
	TEST(dot_i8_scaled_scores_groups_in_a_row_as_each_alone),
	TEST(dot_i8_scaled_sums_the_largest_codes_exactly),
	TEST(dot_i8_scaled_reads_nothing_past_its_inputs),
	TEST(axpy_i16_scaled_equals_scalar_on_odd_lengths_and_unaligned_pointers),
	TEST(axpy_i16_scaled_reads_nothing_past_its_inputs),
	TEST(axpy_u8_scaled_equals_scalar_in_runs_on_odd_lengths_and_unaligned_pointers),
	TEST(axpy_u8_scaled_sums_the_largest_codes_exactly),
	TEST(axpy_u8_scaled_reads_nothing_past_its_inputs),
	TEST(dot_i8_scaled_rounds_halves_to_even),
	TEST(axpy_i16_scaled_rounds_halves_to_even),
	TEST(mask_expand_matches_scalar_bit_for_bit_on_odd_lengths),
	TEST(mask_expand_matches_scalar_on_unaligned_pointers),
	TEST(spark_dot_i16_equals_scalar_on_odd_lengths),
	TEST(spark_dot_i16_equals_scalar_on_unaligned_pointers),
	TEST(spark_dot_i16_equals_scalar_at_the_ends_of_its_ranges),
	TEST(spark_choose_equals_scalar_on_odd_lengths_and_ties),
	TEST(spark_choose_equals_scalar_on_unaligned_pointers),
	TEST(mask_codes_equals_scalar_on_odd_lengths),
	TEST(mask_codes_equals_scalar_on_unaligned_pointers),
	TEST(band_norms_is_bit_identical_to_scalar_in_both_layouts),
};

static unsigned tests_passed, tests_failed;

static void begin(const char *prefix, const char *name)
{
	snprintf(tally->test, sizeof tally->test, "%s%s", prefix, name);
	tally->failed_in_test = 0;
}

static void end(void)
{
	if (tally->failed_in_test > SHOWN_FAILURES)
		printf("FAIL %s: %lu failed comparisons in all\n", tally->test, tally->failed_in_test);
	if (tally->failed_in_test)
		tests_failed++;
	else
		tests_passed++;
}

/* A child that dies, or cannot start, fails the test. */
static void run_in_own_process(const struct test *t)
{
	int status = 0;
	pid_t pid;

	begin("", t->name);
	fflush(stdout);
	pid = fork();
	if (pid == 0) {
		t->run();
		fflush(stdout);
		_exit(0);
	}
	if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
		check(0, "its process %s", pid < 0 ? "could not start" : "died");
	end();
}

static void run_vector_tests(const char *table)
{
	const struct kvp_kernels *k = kvp_kernels_named(table);
	char prefix[16];

	if (!k) {
		printf("the %s kernels cannot run on this build or CPU: %zu tests skipped\n", table,
		       COUNT(vector_tests));
		return;
	}
	printf("checking %s against scalar\n", k->name);
	snprintf(prefix, sizeof prefix, "%s_", k->name);
	for (size_t i = 0; i < COUNT(vector_tests); i++) {
		begin(prefix, vector_tests[i].name);
		vector_tests[i].run(k);
		end();
	}
}

int main(void)
{
	static const char *const vector_tables[] = { "avx2", "avx2-vnni", "avx512", "neon", "neon-dotprod" };

	tally = mmap(NULL, sizeof *tally, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (tally == MAP_FAILED) {
		perror("mmap");
		return 2;
	}
	for (size_t i = 0; i < COUNT(reference_tests); i++) {
		begin("", reference_tests[i].name);
		reference_tests[i].run();
		end();
	}
	for (size_t i = 0; i < COUNT(own_process_tests); i++)
		run_in_own_process(&own_process_tests[i]);
	for (size_t i = 0; i < COUNT(vector_tables); i++)
		run_vector_tests(vector_tables[i]);
	printf("%lu comparisons: %lu passed, %lu failed\n", tally->passed + tally->failed, tally->passed,
	       tally->failed);
	printf("%u passed, %u failed\n", tests_passed, tests_failed);
	return tests_failed != 0;
}
