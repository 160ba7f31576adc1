/*
 * TurboQuant against the paper's numbers (specs/codecs.md section 1, the tolerances): the MSE of
 * unit vectors, the QJL estimator's bias and variance, the documented byte layout, and the fused dot and
 * axpy against decode.
 */
#include <stdio.h>

#include "codec_fixture.h"

enum { N_VEC = 10000 };

/*
 * The test's own Lloyd-Max, independent of the codec's: the density of one coordinate of a uniform point
 * on S^(m-1), f(x) ~ (1-x^2)^((m-3)/2), on a grid of 400,000 cells of [-1, 1] with prefix sums of f, x f
 * and x^2 f, so one Lloyd iteration costs O(levels). Returns m * E[(x - Q(x))^2], the unit-vector MSE.
 */
static double lloyd_max_mse(unsigned m, unsigned bits)
{
	enum { GRID = 400000 };
	const unsigned levels = 1u << bits;
	double *f0 = xcalloc(GRID + 1, sizeof(double)), *f1 = xcalloc(GRID + 1, sizeof(double));
	double *f2 = xcalloc(GRID + 1, sizeof(double)), c[16], mse = 0;
	const double h = 2.0 / GRID;

	for (unsigned i = 0; i < GRID; i++) {
		double x = -1.0 + (i + 0.5) * h, w = pow(1.0 - x * x, (m - 3.0) / 2.0) * h;
		f0[i + 1] = f0[i] + w;
		f1[i + 1] = f1[i] + w * x;
		f2[i + 1] = f2[i] + w * x * x;
	}
	for (unsigned k = 0; k < levels; k++)
		c[k] = (3.0 / sqrt((double)m)) * (2.0 * k + 1.0 - levels) / levels;
	for (unsigned it = 0; it < 20000; it++) {
		unsigned lo = 0;
		for (unsigned k = 0; k < levels; k++) {
			unsigned hi = k + 1 < levels ? (unsigned)(((c[k] + c[k + 1]) / 2 + 1.0) / h) : GRID;
			if (f0[hi] > f0[lo])
				c[k] = (f1[hi] - f1[lo]) / (f0[hi] - f0[lo]);
			lo = hi;
		}
	}
	for (unsigned k = 0, lo = 0; k < levels; k++) {
		unsigned hi = k + 1 < levels ? (unsigned)(((c[k] + c[k + 1]) / 2 + 1.0) / h) : GRID;
		mse += (f2[hi] - f2[lo]) - 2 * c[k] * (f1[hi] - f1[lo]) + c[k] * c[k] * (f0[hi] - f0[lo]);
		lo = hi;
	}
	mse = m * mse / f0[GRID];
	free(f0);
	free(f1);
	free(f2);
	return mse;
}

static double unit_mse(const char *spec, unsigned d, uint64_t seed)
{
	struct rng r = { seed };
	float *x = xcalloc((size_t)N_VEC * d, sizeof *x);
	kvp_codec *c = codec_open(spec, d);
	double mse;

	for (unsigned i = 0; i < N_VEC; i++)
		rng_unit(&r, x + (size_t)i * d, d);
	mse = codec_mse(c, N_VEC, x);
	kvp_codec_close(c);
	free(x);
	return mse;
}

static void expect_within(double got, double want, double tol, const char *what)
{
	cr_assert(fabs(got - want) <= tol * want, "%s: %.5g is not within %.0f%% of %.5g", what, got, tol * 100,
		  want);
}

Test(turboquant, reference_lloyd_max_reproduces_the_spec_table_at_d128)
{
	static const double want[] = { 0.3609, 0.1160, 0.0340, 0.0093 };

	for (unsigned b = 1; b <= 4; b++)
		expect_within(lloyd_max_mse(128, b), want[b - 1], 0.01, "test's own Lloyd-Max at d=128");
}

Test(turboquant, mse_of_unit_vectors_at_d128_is_within_6_percent_of_the_paper_for_bits_1_to_4)
{
	static const double want[] = { 0.361, 0.116, 0.0340, 0.0093 };
	char spec[64];

	for (unsigned b = 1; b <= 4; b++) {
		snprintf(spec, sizeof spec, "turboquant(bits=%u)", b);
		expect_within(unit_mse(spec, 128, 11 + b), want[b - 1], 0.06, spec);
	}
}

/* 48, 80 and 96 are not powers of two: the three-pass rotation and the codebook of that dimension. */
Test(turboquant, mse_at_d64_d48_d80_d96_is_within_10_percent_of_lloyd_max_for_that_dimension)
{
	static const unsigned dims[] = { 64, 48, 80, 96 };
	char spec[64], what[96];

	for (size_t a = 0; a < sizeof dims / sizeof dims[0]; a++)
		for (unsigned b = 1; b <= 4; b++) {
			snprintf(spec, sizeof spec, "turboquant(bits=%u)", b);
			snprintf(what, sizeof what, "%s d=%u", spec, dims[a]);
			expect_within(unit_mse(spec, dims[a], 100 + b), lloyd_max_mse(dims[a], b), 0.10, what);
		}
}

/* A rotation that did not mix would leave a one-hot vector on one coordinate: MSE near that of 1 level. */
Test(turboquant, rotation_spreads_one_hot_vectors_at_d48_and_d128)
{
	static const unsigned dims[] = { 48, 128 };

	for (size_t a = 0; a < 2; a++) {
		unsigned d = dims[a];
		float *x = xcalloc((size_t)d * d, sizeof *x);
		kvp_codec *c = codec_open("turboquant(bits=3)", d);
		double mse;

		for (unsigned i = 0; i < d; i++)
			x[(size_t)i * d + i] = 1.0f;
		mse = codec_mse(c, d, x);
		cr_assert(mse < 2.0 * lloyd_max_mse(d, 3), "d=%u one-hot MSE %.4g, Lloyd-Max %.4g", d, mse,
			  lloyd_max_mse(d, 3));
		kvp_codec_close(c);
		free(x);
	}
}

/*
 * QJL, over 10,000 pairs (x, y) of unit vectors: err = <y, x~> - <y, x> through the fused dot. For the bias
 * y leans on x (<y, x> ~ 0.7), where an MSE quantizer's multiplicative bias shows; for the variance y is
 * independent of x, as in the paper's d * Var = pi/2 * D_mse(b-1).
 */
struct err_stats {
	double mean, se, dvar;
};

static struct err_stats inner_product_errors(const char *spec, unsigned d, int correlated, uint64_t seed)
{
	struct rng r = { seed };
	kvp_codec *c = codec_open(spec, d);
	float *x = xcalloc((size_t)N_VEC * d, sizeof *x), *y = xcalloc(d, sizeof *y), *z = xcalloc(d, sizeof *z);
	void *bytes = xcalloc(1, kvp_codec_bytes(c, N_VEC));
	double sum = 0, sum2 = 0;
	struct err_stats e;

	for (unsigned i = 0; i < N_VEC; i++)
		rng_unit(&r, x + (size_t)i * d, d);
	cr_assert_eq(kvp_codec_encode(c, N_VEC, x, bytes), KVP_OK, "%s", kvp_last_error());
	for (unsigned i = 0; i < N_VEC; i++) {
		const float *xi = x + (size_t)i * d;
		float got;
		double err;

		rng_unit(&r, y, d);
		if (correlated) {
			for (unsigned j = 0; j < d; j++)
				z[j] = xi[j] + y[j];
			for (unsigned j = 0; j < d; j++)
				y[j] = (float)(z[j] / sqrt(dot_d(z, z, d)));
		}
		codec_fused_dot(c, 1, (const unsigned char *)bytes + i * kvp_codec_bytes(c, 1), y, &got);
		err = got - dot_d(y, xi, d);
		sum += err;
		sum2 += err * err;
	}
	e.mean = sum / N_VEC;
	e.se = sqrt((sum2 / N_VEC - e.mean * e.mean) / N_VEC);
	e.dvar = d * (sum2 / N_VEC - e.mean * e.mean);
	kvp_codec_close(c);
	free(x);
	free(y);
	free(z);
	free(bytes);
	return e;
}

Test(turboquant, qjl_inner_product_estimator_is_unbiased_for_bits_1_to_4)
{
	char spec[64];

	for (unsigned b = 1; b <= 4; b++) {
		snprintf(spec, sizeof spec, "turboquant(bits=%u,qjl=1)", b);
		struct err_stats e = inner_product_errors(spec, 128, 1, 200 + b);
		cr_assert(fabs(e.mean) <= 3 * e.se, "%s: mean error %.3g is beyond 3 standard errors (%.3g)", spec,
			  e.mean, e.se);
	}
}

/* The same check fails for the MSE quantizer, whose bias at 1 bit is the factor 2/pi (spec 1.1). */
Test(turboquant, mse_only_inner_product_at_1_bit_is_biased_by_2_over_pi)
{
	struct err_stats e = inner_product_errors("turboquant(bits=1)", 128, 1, 300);

	cr_assert(fabs(e.mean) > 10 * e.se, "bias %.3g is within 10 standard errors (%.3g)", e.mean, e.se);
	/* <y, x> averages 1/sqrt(2) here; the estimate is (2/pi) of it */
	expect_within(-e.mean, (1 - 2 / M_PI) * sqrt(0.5), 0.05, "bias of turboquant(bits=1)");
}

Test(turboquant, qjl_d_times_variance_is_within_15_percent_of_the_paper_for_bits_1_to_4)
{
	static const double want[] = { 1.57, 0.57, 0.18, 0.053 };
	char spec[64];

	for (unsigned b = 1; b <= 4; b++) {
		snprintf(spec, sizeof spec, "turboquant(bits=%u,qjl=1)", b);
		expect_within(inner_product_errors(spec, 128, 0, 400 + b).dvar, want[b - 1], 0.15, spec);
	}
}

/* ---- layout ---- */

Test(turboquant, bytes_follow_the_documented_layout)
{
	static const struct {
		const char *spec;
		unsigned d;
		size_t bytes;
	} cases[] = {
		{ "turboquant(bits=1)", 128, 4 + 16 },
		{ "turboquant(bits=2)", 128, 4 + 32 },
		{ "turboquant(bits=3)", 128, 4 + 48 },
		{ "turboquant(bits=4)", 128, 4 + 64 },
		{ "turboquant(bits=1,qjl=1)", 128, 8 + 0 + 16 },
		{ "turboquant(bits=3,qjl=1)", 128, 8 + 32 + 16 },
		{ "turboquant(bits=2,outliers=32,outlier_bits=3)", 128, 8 + 24 + 12 },
		{ "turboquant(bits=2,outliers=32,outlier_bits=3,qjl=1)", 128, 16 + 12 + 8 + 12 + 4 },
		{ "turboquant(bits=3)", 48, 4 + 18 },
		{ "turboquant(bits=3)", 65, 4 + 25 },          /* ceil(195 / 8) */
		{ "turboquant(bits=3,qjl=1)", 65, 8 + 17 + 9 }, /* codes and signs each padded to a byte */
	};

	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		kvp_codec *c = codec_open(cases[i].spec, cases[i].d);
		cr_assert_eq(kvp_codec_bytes(c, 1), cases[i].bytes, "%s d=%u: %zu bytes, want %zu", cases[i].spec,
			     cases[i].d, kvp_codec_bytes(c, 1), cases[i].bytes);
		cr_assert_eq(kvp_codec_bytes(c, 64), 64 * cases[i].bytes);
		cr_assert_eq(kvp_codec_group(c), 1);
		cr_assert(c->flags & KVP_CODEC_SEPARABLE);
		if (cases[i].d == 128)
			printf("bits/value at d=128: %-52s %.4g\n", cases[i].spec, cases[i].bytes * 8.0 / 128);
		kvp_codec_close(c);
	}
}

/* ---- fused paths against decode ---- */

static void fused_matches_decode(const char *spec, unsigned d, unsigned n)
{
	struct rng r = { 77 };
	kvp_codec *c = codec_open(spec, d);
	float *x = xcalloc((size_t)n * d, sizeof *x), *y = xcalloc((size_t)n * d, sizeof *y);
	float *q = xcalloc(d, sizeof *q), *w = xcalloc(n, sizeof *w), *dots = xcalloc(n, sizeof *dots);
	float *sum = xcalloc(d, sizeof *sum);
	void *bytes = xcalloc(1, kvp_codec_bytes(c, n));

	rng_gaussians(&r, x, (size_t)n * d);
	for (unsigned i = 0; i < n; i++) /* a few loud channels, as real keys have, for the outlier split */
		x[(size_t)i * d + 5] *= 8.0f;
	rng_gaussians(&r, q, d);
	rng_gaussians(&r, w, n);
	cr_assert_eq(kvp_codec_encode(c, n, x, bytes), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_codec_decode(c, n, bytes, y), KVP_OK, "%s", kvp_last_error());
	codec_fused_dot(c, n, bytes, q, dots);
	for (unsigned i = 0; i < n; i++) {
		double want = dot_d(q, y + (size_t)i * d, d);
		cr_assert(fabs(dots[i] - want) <= 1e-4 * sqrt(dot_d(q, q, d) * dot_d(y + (size_t)i * d, y + (size_t)i * d, d)),
			  "%s d=%u token %u: dot %.7g, decoded %.7g", spec, d, i, dots[i], want);
	}
	codec_fused_axpy(c, n, bytes, w, sum);
	for (unsigned j = 0; j < d; j++) {
		double want = 0, mag = 0;
		for (unsigned i = 0; i < n; i++) {
			want += (double)w[i] * y[(size_t)i * d + j];
			mag += fabs(w[i] * y[(size_t)i * d + j]);
		}
		cr_assert(fabs(sum[j] - want) <= 1e-4 * mag + 1e-6, "%s d=%u channel %u: axpy %.7g, decoded %.7g",
			  spec, d, j, sum[j], want);
	}
	kvp_codec_close(c);
	free(x);
	free(y);
	free(q);
	free(w);
	free(dots);
	free(sum);
	free(bytes);
}

Test(turboquant, fused_dot_and_axpy_equal_decode_at_every_width_with_and_without_qjl)
{
	static const unsigned dims[] = { 128, 64, 48, 80, 96, 65 };
	char spec[96];

	for (size_t a = 0; a < sizeof dims / sizeof dims[0]; a++)
		for (unsigned b = 1; b <= 4; b++)
			for (unsigned qjl = 0; qjl < 2; qjl++) {
				snprintf(spec, sizeof spec, "turboquant(bits=%u,qjl=%u)", b, qjl);
				fused_matches_decode(spec, dims[a], 300); /* 300 > one pass of 256 tokens */
			}
}

Test(turboquant, fused_dot_and_axpy_equal_decode_with_outlier_channels)
{
	fused_matches_decode("turboquant(bits=2,outliers=32,outlier_bits=3)", 128, 70);
	fused_matches_decode("turboquant(bits=2,outliers=32,outlier_bits=4,qjl=1)", 128, 70);
	fused_matches_decode("turboquant(bits=1,outliers=7,outlier_bits=2)", 48, 70);
}

/* ---- outliers ---- */

/* 32 of 128 channels ten times louder: the outlier split gives them their own norm and more bits. */
Test(turboquant, outlier_split_lowers_the_error_on_loud_channels)
{
	struct rng r = { 5 };
	const unsigned d = 128, n = 2000;
	float *x = xcalloc((size_t)n * d, sizeof *x);
	kvp_codec *plain = codec_open("turboquant(bits=2)", d);
	kvp_codec *split = codec_open("turboquant(bits=2,outliers=32,outlier_bits=3)", d);
	double e_plain, e_split;

	rng_gaussians(&r, x, (size_t)n * d);
	for (unsigned i = 0; i < n; i++)
		for (unsigned j = 3; j < d; j += 4)
			x[(size_t)i * d + j] *= 10.0f;
	e_plain = codec_mse(plain, n, x);
	e_split = codec_mse(split, n, x);
	cr_assert(e_split < 0.8 * e_plain, "split %.4g, plain %.4g", e_split, e_plain);
	/* the loud channels were chosen: their 3 bits on their own norm approach the 3-bit unit MSE */
	cr_assert(e_split < 0.05, "split MSE %.4g", e_split);
	kvp_codec_close(plain);
	kvp_codec_close(split);
	free(x);
}

/* ---- edges ---- */

Test(turboquant, zero_vector_decodes_to_zero_and_non_finite_input_is_rejected)
{
	kvp_codec *c = codec_open("turboquant(bits=3,qjl=1)", 64);
	float x[64] = { 0 }, y[64];
	unsigned char bytes[256];

	cr_assert_eq(kvp_codec_encode(c, 1, x, bytes), KVP_OK);
	cr_assert_eq(kvp_codec_decode(c, 1, bytes, y), KVP_OK);
	for (unsigned j = 0; j < 64; j++)
		cr_assert_eq(y[j], 0.0f);
	x[7] = NAN;
	cr_assert_eq(kvp_codec_encode(c, 1, x, bytes), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "non-finite"), "%s", kvp_last_error());
	x[7] = INFINITY;
	cr_assert_eq(kvp_codec_encode(c, 1, x, bytes), KVP_EINVAL);
	kvp_codec_close(c);
}

/* Bytes from outside the process (the remote tier) are checked before use: every code pattern decodes, but
 * a norm is finite and >= 0 as encode writes it. */
Test(turboquant, check_passes_encoded_tokens_and_names_a_norm_encode_never_writes)
{
	kvp_codec *c = codec_open("turboquant(bits=3,qjl=1)", 64);
	const size_t stride = kvp_codec_bytes(c, 1);
	static const float bad[] = { NAN, INFINITY, -1.0f };
	struct rng r = { 41 };
	float x[4 * 64];
	unsigned char bytes[4 * 64], copy[4 * 64];

	cr_assert_leq(4 * stride, sizeof bytes);
	rng_gaussians(&r, x, 4 * 64);
	cr_assert_eq(kvp_codec_encode(c, 4, x, bytes), KVP_OK);
	cr_assert_eq(c->ops->check(c, 4, bytes), KVP_OK, "%s", kvp_last_error());
	for (unsigned i = 0; i < 3; i++)
		for (unsigned field = 0; field < 2; field++) { /* the norm, then the residual's */
			memcpy(copy, bytes, sizeof copy);
			memcpy(copy + 2 * stride + 4 * field, &bad[i], 4);
			cr_assert_eq(c->ops->check(c, 4, copy), KVP_ECORRUPT, "%g in field %u", (double)bad[i], field);
			cr_assert(strstr(kvp_last_error(), field ? "token 2's residual norm" : "token 2's norm"), "%s",
				  kvp_last_error());
		}
	memset(copy, 0xff, sizeof copy); /* codes alone may be anything */
	memcpy(copy, bytes, 8);
	cr_assert_eq(c->ops->check(c, 1, copy), KVP_OK, "%s", kvp_last_error());
	kvp_codec_close(c);
}

Test(turboquant, seed_fixes_the_bytes)
{
	struct rng r = { 9 };
	float x[128];
	unsigned char a[68], b[68], e[68];
	kvp_codec *c1 = codec_open("turboquant(bits=4,seed=1)", 128), *c2 = codec_open("turboquant(bits=4,seed=1)", 128);
	kvp_codec *c3 = codec_open("turboquant(bits=4,seed=2)", 128);

	rng_gaussians(&r, x, 128);
	cr_assert_eq(kvp_codec_encode(c1, 1, x, a), KVP_OK);
	cr_assert_eq(kvp_codec_encode(c2, 1, x, b), KVP_OK);
	cr_assert_eq(kvp_codec_encode(c3, 1, x, e), KVP_OK);
	cr_assert(!memcmp(a, b, sizeof a));
	cr_assert(memcmp(a + 4, e + 4, sizeof a - 4));
	kvp_codec_close(c1);
	kvp_codec_close(c2);
	kvp_codec_close(c3);
}

Test(turboquant, bad_arguments_are_rejected_with_a_message_quoting_them)
{
	expect_rejected("turboquant(bits=7)", 128, "7");
	expect_rejected("turboquant(bits=0)", 128, "0");
	expect_rejected("turboquant(qjl=2)", 128, "2");
	expect_rejected("turboquant(bits=3,colour=blue)", 128, "colour");
	expect_rejected("turboquant(outliers=127)", 128, "outliers=127");
	expect_rejected("turboquant(outlier_bits=5)", 128, "5");
	expect_rejected("turboquant(bits=x)", 128, "x");
	expect_rejected("turboquant(bits=3", 128, "turboquant(bits=3");
}

/* ---- real keys, values and queries: kjv-64 (../shared/models) ---- */

#include "tool_fixture.h"
#include "tools/llama.h"

enum { KJV_TOKENS = 64, KJV_LAYER = 2 };

struct taps {
	int hs, n_heads, n_kv;
	float *k, *v, *q; /* [pos][heads][hs] of layer KJV_LAYER */
};

static void record(void *ctx, enum llama_tap tap, int layer, int pos, const float *x, int n)
{
	struct taps *t = ctx;
	float *dst = tap == LLAMA_TAP_K ? t->k : tap == LLAMA_TAP_V ? t->v : tap == LLAMA_TAP_Q ? t->q : NULL;

	if (layer != KJV_LAYER || !dst || pos >= KJV_TOKENS)
		return;
	memcpy(dst + (size_t)pos * n, x, sizeof(float) * (size_t)n);
}

/* 64 tokens of greedy decoding from a KJV prompt with the exact cache, recording one layer. */
static void kjv_taps(struct taps *t)
{
	char err[LLAMA_ERROR_MAX] = "";
	struct llama_model m;
	struct llama_tokenizer tok;
	struct llama_state s;
	struct llama_dense_cache cache;
	struct llama_attention att;
	struct llama_observer obs = { t, record };
	int ids[256], n_ids, token;

	cr_assert_eq(llama_model_load(&m, model_path("kjv-64.bin"), err), LLAMA_OK, "%s", err);
	cr_assert_eq(llama_tokenizer_load(&tok, model_path("tok512.bin"), m.config.vocab_size, err), LLAMA_OK, "%s",
		     err);
	cr_assert_eq(llama_state_init(&s, &m.config), LLAMA_OK);
	cr_assert_eq(llama_dense_cache_init(&cache, &m.config), LLAMA_OK);
	att = llama_dense_attention(&cache);
	t->hs = m.config.head_size;
	t->n_heads = m.config.n_heads;
	t->n_kv = m.config.n_kv_heads;
	t->k = xcalloc((size_t)KJV_TOKENS * t->n_kv * t->hs, sizeof(float));
	t->v = xcalloc((size_t)KJV_TOKENS * t->n_kv * t->hs, sizeof(float));
	t->q = xcalloc((size_t)KJV_TOKENS * t->n_heads * t->hs, sizeof(float));
	n_ids = llama_encode(&tok, "And the LORD said unto Moses,", 1, 0, ids);
	token = ids[0];
	for (int pos = 0; pos < KJV_TOKENS; pos++) {
		cr_assert_eq(llama_forward(&m, &s, &att, &obs, token, pos), LLAMA_OK);
		token = pos + 1 < n_ids ? ids[pos + 1] : llama_argmax(s.logits, m.config.vocab_size);
	}
	llama_dense_cache_free(&cache);
	llama_state_free(&s);
	llama_tokenizer_free(&tok);
	llama_model_free(&m);
}

/* Softmax attention of q over n rows given their scores; out = sum p_i v_i through the codec or exactly. */
static void softmax(float *s, unsigned n)
{
	float mx = s[0], sum = 0;

	for (unsigned i = 1; i < n; i++)
		mx = fmaxf(mx, s[i]);
	for (unsigned i = 0; i < n; i++)
		sum += s[i] = expf(s[i] - mx);
	for (unsigned i = 0; i < n; i++)
		s[i] /= sum;
}

/*
 * For every query head and every position from 16 on: exact attention over that head's keys and values
 * so far against attention whose scores come from the codec's fused dot on encoded keys and whose output
 * comes from its fused axpy on encoded values. Returns the largest ||out - exact|| / ||exact||; *mean gets
 * the mean.
 */
static double kjv_attention_error(const struct taps *t, const char *spec, double *mean)
{
	const unsigned d = (unsigned)t->hs, group = (unsigned)(t->n_heads / t->n_kv);
	const float scale = 1.0f / sqrtf((float)d);
	double worst = 0, sum = 0;
	unsigned count = 0;

	for (int kv = 0; kv < t->n_kv; kv++) {
		kvp_codec *kc = codec_open(spec, d), *vc = codec_open(spec, d);
		float *keys = xcalloc((size_t)KJV_TOKENS * d, sizeof(float)), *vals = xcalloc((size_t)KJV_TOKENS * d, sizeof(float));
		void *kb = xcalloc(1, kvp_codec_bytes(kc, KJV_TOKENS)), *vb = xcalloc(1, kvp_codec_bytes(vc, KJV_TOKENS));
		float exact_s[KJV_TOKENS], codec_s[KJV_TOKENS], exact[256], approx[256];

		for (unsigned i = 0; i < KJV_TOKENS; i++) {
			memcpy(keys + i * d, t->k + ((size_t)i * t->n_kv + kv) * d, sizeof(float) * d);
			memcpy(vals + i * d, t->v + ((size_t)i * t->n_kv + kv) * d, sizeof(float) * d);
		}
		cr_assert_eq(kvp_codec_encode(kc, KJV_TOKENS, keys, kb), KVP_OK, "%s", kvp_last_error());
		cr_assert_eq(kvp_codec_encode(vc, KJV_TOKENS, vals, vb), KVP_OK, "%s", kvp_last_error());
		for (unsigned h = kv * group; h < (kv + 1) * group; h++)
			for (unsigned p = 16; p < KJV_TOKENS; p++) {
				const float *q = t->q + ((size_t)p * t->n_heads + h) * d;
				double e2 = 0, n2 = 0;

				codec_fused_dot(kc, p + 1, kb, q, codec_s);
				for (unsigned i = 0; i <= p; i++) {
					exact_s[i] = (float)dot_d(q, keys + i * d, d) * scale;
					codec_s[i] *= scale;
				}
				softmax(exact_s, p + 1);
				softmax(codec_s, p + 1);
				codec_fused_axpy(vc, p + 1, vb, codec_s, approx);
				for (unsigned j = 0; j < d; j++) {
					exact[j] = 0;
					for (unsigned i = 0; i <= p; i++)
						exact[j] += exact_s[i] * vals[i * d + j];
					e2 += (double)(approx[j] - exact[j]) * (approx[j] - exact[j]);
					n2 += (double)exact[j] * exact[j];
				}
				worst = fmax(worst, sqrt(e2 / n2));
				sum += sqrt(e2 / n2);
				count++;
			}
		kvp_codec_close(kc);
		kvp_codec_close(vc);
		free(keys);
		free(vals);
		free(kb);
		free(vb);
	}
	*mean = sum / count;
	return worst;
}

/*
 * Measured on this model and layer (x86-64, AVX2 and scalar kernels alike): with turboquant(bits=4) on
 * both keys and values, the relative error ||out - exact|| / ||exact|| of the attention output over
 * 2 KV heads x 2 query heads x 48 positions has mean 0.113 and worst 0.462. The keys' own MSE is 0.009,
 * as on random unit vectors; the output error is larger because |q||k| ~ 90 turns it into ~0.13 of logit
 * noise and because a diffuse softmax averages values into an output much shorter than they are.
 * For comparison: bits=3 mean 0.216 worst 0.697; bits=4,qjl=1 mean 0.257 (QJL's variance hurts through
 * softmax, as the spec reports from vLLM and others). Bounds: mean < 0.16 and worst < 0.65, ~1.4x margin;
 * bits=3 would fail the mean bound.
 */
Test(turboquant, attention_on_kjv64_layer2_at_4_bits_stays_within_16_percent_mean_error_of_exact)
{
	struct taps t;
	double mean, worst;
	static const char *const info[] = { "turboquant(bits=3)", "turboquant(bits=4,qjl=1)",
					    "turboquant(bits=4,outliers=16,outlier_bits=4)" };

	kjv_taps(&t);
	worst = kjv_attention_error(&t, "turboquant(bits=4)", &mean);
	printf("kjv-64 layer %d attention, turboquant(bits=4): relative error mean %.4f, worst %.4f\n", KJV_LAYER, mean,
	       worst);
	for (size_t i = 0; i < sizeof info / sizeof info[0]; i++) {
		double m, w = kjv_attention_error(&t, info[i], &m);
		printf("kjv-64 layer %d attention, %s: relative error mean %.4f, worst %.4f\n", KJV_LAYER, info[i], m, w);
	}
	cr_assert(worst < 0.65, "worst relative error %.4f", worst);
	cr_assert(mean < 0.16, "mean relative error %.4f", mean);
	free(t.k);
	free(t.v);
	free(t.q);
}

/*
 * dot_group and axpy_group run on integers (kernels.h): the query in int8 against an int8 codebook, each
 * head's weights in 12 bits against an 11-bit codebook. Against the float per-head calls, with x^ the
 * decoded vectors:
 *   keys:   every token within 6% of |q| |x^_i| (the int8 roundings' worst case, sqrt(d)/254 + 3/254 at
 *           d=128), and the root mean square within 0.3% of |q| rms |x^|;
 *   values: the output (after finish) within 0.3% of sum_i |w_i| |x^_i|.
 * Weights that are all at least 0 (attention's; `attention`) take 2-bit codes' values through 8-bit weights
 * above their least, against the int8 codebook (lut_axpy_u8_group), under the same bound.
 */
static void group_near_per_head(const char *spec, unsigned d, unsigned g, int attention)
{
	enum { N = 300 };
	struct rng r = { 77 };
	kvp_codec *c = codec_open(spec, d);
	float *x = xcalloc((size_t)N * d, sizeof *x), *y = xcalloc((size_t)N * d, sizeof *y);
	float *q = xcalloc((size_t)g * d, sizeof *q), *w = xcalloc((size_t)g * N, sizeof *w);
	float *one = xcalloc(N, sizeof *one), *out = xcalloc((size_t)g * N, sizeof *out);
	float *acc = xcalloc((size_t)g * c->acc_dim, sizeof *acc), *acc1 = xcalloc(c->acc_dim, sizeof *acc1);
	float *o = xcalloc(d, sizeof *o), *o1 = xcalloc(d, sizeof *o1);
	double norm[N], sum_sq = 0;
	char *qprep = xcalloc(g, c->qprep_bytes);
	void *bytes = xcalloc(1, kvp_codec_bytes(c, N));

	rng_gaussians(&r, x, (size_t)N * d);
	rng_gaussians(&r, q, (size_t)g * d);
	rng_gaussians(&r, w, (size_t)g * N);
	for (size_t i = 0; attention && i < (size_t)g * N; i++)
		w[i] = fabsf(w[i]);
	cr_assert_eq(kvp_codec_encode(c, N, x, bytes), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_codec_decode(c, N, bytes, y), KVP_OK, "%s", kvp_last_error());
	for (unsigned i = 0; i < N; i++)
		norm[i] = sqrt(dot_d(y + (size_t)i * d, y + (size_t)i * d, d)), sum_sq += norm[i] * norm[i];
	for (unsigned h = 0; h < g; h++)
		c->ops->prepare_query(c, c->own_ctx, q + (size_t)h * d, qprep + h * c->qprep_bytes);
	for (size_t i = 0; i < (size_t)g * N; i++) /* dot_group writes every score: none may stay NaN */
		out[i] = NAN;
	c->ops->dot_group(c, c->own_ctx, N, bytes, g, qprep, out, N);
	c->ops->axpy_group(c, c->own_ctx, N, bytes, g, w, N, acc);
	for (unsigned h = 0; h < g; h++) {
		const double qn = sqrt(dot_d(q + (size_t)h * d, q + (size_t)h * d, d));
		double err2 = 0, err = 0, mag = 0;

		c->ops->dot(c, c->own_ctx, N, bytes, qprep + h * c->qprep_bytes, one);
		for (unsigned i = 0; i < N; i++) {
			double e = out[(size_t)h * N + i] - one[i];
			err2 += e * e;
			cr_assert(fabs(e) <= 0.06 * qn * norm[i], "%s d=%u g=%u head %u token %u: %g vs %g", spec, d, g, h,
				  i, out[(size_t)h * N + i], one[i]);
		}
		cr_assert(sqrt(err2 / N) <= 3e-3 * qn * sqrt(sum_sq / N), "%s d=%u g=%u head %u: rms error %g of %g",
			  spec, d, g, h, sqrt(err2 / N), qn * sqrt(sum_sq / N));
		memset(acc1, 0, sizeof(float) * c->acc_dim);
		c->ops->axpy(c, c->own_ctx, N, bytes, w + (size_t)h * N, acc1);
		memset(o, 0, sizeof(float) * d);
		memset(o1, 0, sizeof(float) * d);
		c->ops->finish(c, c->own_ctx, acc + (size_t)h * c->acc_dim, o);
		c->ops->finish(c, c->own_ctx, acc1, o1);
		for (unsigned j = 0; j < d; j++)
			err += ((double)o[j] - o1[j]) * ((double)o[j] - o1[j]);
		for (unsigned i = 0; i < N; i++)
			mag += fabs(w[(size_t)h * N + i]) * norm[i];
		cr_assert(sqrt(err) <= 3e-3 * mag, "%s d=%u g=%u head %u: axpy error %g of %g", spec, d, g, h, sqrt(err),
			  mag);
	}
	free(x), free(y), free(q), free(w), free(one), free(out), free(acc), free(acc1), free(o), free(o1);
	free(qprep), free(bytes);
	kvp_codec_close(c);
}

Test(turboquant, group_dot_and_axpy_stay_within_the_integer_bounds_of_the_per_head_calls)
{
	static const char *const specs[] = { "turboquant(bits=1)", "turboquant(bits=2)", "turboquant(bits=3)",
					     "turboquant(bits=4)", "turboquant(bits=3,qjl=1)",
					     "turboquant(bits=2,outliers=32,outlier_bits=3)" };
	static const unsigned groups[] = { 1, 3, 4, 5, 8 };

	for (size_t s = 0; s < sizeof specs / sizeof *specs; s++)
		for (size_t g = 0; g < sizeof groups / sizeof *groups; g++) {
			group_near_per_head(specs[s], 128, groups[g], 0);
			group_near_per_head(specs[s], 80, groups[g], 0);
		}
}

Test(turboquant, group_paths_with_weights_not_negative_stay_within_the_same_bounds)
{
	static const char *const specs[] = { "turboquant(bits=1)", "turboquant(bits=2)", "turboquant(bits=3)",
					     "turboquant(bits=4)", "turboquant(bits=2,qjl=1)",
					     "turboquant(bits=2,outliers=32,outlier_bits=3)" };
	static const unsigned groups[] = { 1, 3, 4, 5, 8 };

	for (size_t s = 0; s < sizeof specs / sizeof *specs; s++)
		for (size_t g = 0; g < sizeof groups / sizeof *groups; g++) {
			group_near_per_head(specs[s], 128, groups[g], 1);
			group_near_per_head(specs[s], 64, groups[g], 1);
			group_near_per_head(specs[s], 80, groups[g], 1);
		}
}

/*
 * Head h's weights pick one token each, +1 or -1 (-1 takes the 12-bit path, +1 the 8-bit one where the
 * table has it): the group axpy then returns that token's decode to float rounding, because the codec
 * decodes to its integer codebook itself (on a Lloyd-Max codebook apart from the int8 and int16 grids, a
 * 3-bit token moved by about 3e-4 of its norm on the int16 grid and by 2e-3 on the int8 one).
 */
static void group_axpy_of_one_token_is_its_decode(const char *spec, unsigned d, float sign)
{
	enum { N = 64, G = 4 };
	struct rng r = { 91 + d };
	kvp_codec *c = codec_open(spec, d);
	float *x = xcalloc((size_t)N * d, sizeof *x), *y = xcalloc((size_t)N * d, sizeof *y);
	float *w = xcalloc((size_t)G * N, sizeof *w), *acc = xcalloc((size_t)G * c->acc_dim, sizeof *acc);
	float *o = xcalloc(d, sizeof *o);
	void *bytes = xcalloc(1, kvp_codec_bytes(c, N));

	rng_gaussians(&r, x, (size_t)N * d);
	cr_assert_eq(kvp_codec_encode(c, N, x, bytes), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_codec_decode(c, N, bytes, y), KVP_OK, "%s", kvp_last_error());
	for (unsigned h = 0; h < G; h++)
		w[(size_t)h * N + 5 + 17 * h] = sign;
	c->ops->axpy_group(c, c->own_ctx, N, bytes, G, w, N, acc);
	for (unsigned h = 0; h < G; h++) {
		const float *want = y + (size_t)(5 + 17 * h) * d;
		double err = 0;

		memset(o, 0, sizeof(float) * d);
		c->ops->finish(c, c->own_ctx, acc + (size_t)h * c->acc_dim, o);
		for (unsigned j = 0; j < d; j++)
			err += ((double)o[j] - sign * want[j]) * ((double)o[j] - sign * want[j]);
		cr_assert(sqrt(err) <= 1e-5 * sqrt(dot_d(want, want, d)), "%s d=%u weight %g head %u: %g off a norm of %g",
			  spec, d, sign, h, sqrt(err), sqrt(dot_d(want, want, d)));
	}
	free(x), free(y), free(w), free(acc), free(o), free(bytes);
	kvp_codec_close(c);
}

Test(turboquant, group_axpy_of_one_token_gives_its_decode_at_every_width_and_sign)
{
	static const char *const specs[] = { "turboquant(bits=1)", "turboquant(bits=2)", "turboquant(bits=3)",
					     "turboquant(bits=4)", "turboquant(bits=3,qjl=1)",
					     "turboquant(bits=2,outliers=32,outlier_bits=3)" };
	static const unsigned dims[] = { 128, 64, 80 };

	for (size_t s = 0; s < sizeof specs / sizeof *specs; s++)
		for (size_t k = 0; k < sizeof dims / sizeof *dims; k++) {
			group_axpy_of_one_token_is_its_decode(specs[s], dims[k], 1.0f);
			group_axpy_of_one_token_is_its_decode(specs[s], dims[k], -1.0f);
		}
}

/* ---- the fast encoder and decoder against the scalar reference (codecs/turboquant.c) ---- */

/*
 * Inputs that reach every branch: Gaussian rows, a loud channel (for the outlier split), zero rows, one-hot
 * rows, rows of tiny and of huge values, and rows whose norm's square root lies within 2^-47 of the
 * midpoint between two floats (1 and 1 + 2^-23: x = (1, 2^-11.5, 0, ...)), where the fast norm defers to
 * the reference's sum.
 */
static void awkward_rows(struct rng *r, float *x, unsigned n, unsigned d)
{
	rng_gaussians(r, x, (size_t)n * d);
	for (unsigned i = 0; i < n; i++) {
		float *row = x + (size_t)i * d;
		switch (i % 8) {
		case 1:
			row[d / 3] *= 8.0f;
			break;
		case 2:
			memset(row, 0, sizeof(float) * d);
			break;
		case 3:
			memset(row, 0, sizeof(float) * d);
			row[(i / 8) % d] = (i & 8) ? -1.0f : 1.0f;
			break;
		case 4:
			for (unsigned j = 0; j < d; j++)
				row[j] *= 1e-30f;
			break;
		case 5:
			for (unsigned j = 0; j < d; j++)
				row[j] *= 1e30f;
			break;
		case 6:
			memset(row, 0, sizeof(float) * d);
			row[0] = 1.0f;
			row[1 + (i / 8) % (d - 1)] = (float)sqrt(0x1p-23) * (1.0f + (float)(i / 8) * 0x1p-20f);
			break;
		}
	}
}

static void fast_matches_reference(const char *spec, unsigned d, unsigned n)
{
	struct rng r = { 1234 + d };
	kvp_codec *c = codec_open(spec, d);
	size_t bytes = kvp_codec_bytes(c, n);
	float *x = xcalloc((size_t)n * d, sizeof *x), *y = xcalloc((size_t)n * d, sizeof *y);
	float *yr = xcalloc((size_t)n * d, sizeof *yr);
	unsigned char *fast = xcalloc(1, bytes), *ref = xcalloc(1, bytes);

	awkward_rows(&r, x, n, d);
	cr_assert_eq(kvp_codec_encode(c, n, x, fast), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_turboquant_encode_reference(c, c->own_ctx, n, x, ref), KVP_OK, "%s", kvp_last_error());
	for (size_t i = 0; i < bytes; i++)
		cr_assert_eq(fast[i], ref[i], "%s d=%u: token %zu byte %zu is %#x, the reference wrote %#x", spec, d,
			     i / kvp_codec_bytes(c, 1), i % kvp_codec_bytes(c, 1), fast[i], ref[i]);
	cr_assert_eq(kvp_codec_decode(c, n, fast, y), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_turboquant_decode_reference(c, c->own_ctx, n, fast, yr), KVP_OK);
	cr_assert(!memcmp(y, yr, sizeof(float) * n * d), "%s d=%u: decode differs from the reference", spec, d);
	kvp_codec_close(c);
	free(x), free(y), free(yr), free(fast), free(ref);
}

Test(turboquant, fast_encode_and_decode_give_the_reference_bytes_and_floats_at_every_layout)
{
	static const unsigned dims[] = { 128, 64, 256, 48, 80, 96, 65, 2, 3, 7, 8, 9, 16, 17, 24, 33 };
	char spec[96];

	for (size_t a = 0; a < sizeof dims / sizeof dims[0]; a++)
		for (unsigned b = 1; b <= 4; b++)
			for (unsigned qjl = 0; qjl < 2; qjl++) {
				snprintf(spec, sizeof spec, "turboquant(bits=%u,qjl=%u)", b, qjl);
				fast_matches_reference(spec, dims[a], dims[a] >= 128 ? 2000 : 600);
			}
	fast_matches_reference("turboquant(bits=2,outliers=32,outlier_bits=3)", 128, 600);
	fast_matches_reference("turboquant(bits=3,outliers=16,outlier_bits=4,qjl=1)", 128, 600);
	fast_matches_reference("turboquant(bits=1,outliers=7,outlier_bits=2)", 48, 600);
}

/* 2^16 unit vectors per width at d=128, the shape the cache encodes, byte for byte. */
Test(turboquant, fast_encode_gives_the_reference_bytes_on_many_unit_vectors_at_d128)
{
	for (unsigned b = 2; b <= 4; b++) {
		enum { N = 1 << 16, D = 128 };
		struct rng r = { 99 + b };
		char spec[64];
		kvp_codec *c;
		float *x = xcalloc((size_t)N * D, sizeof *x);
		unsigned char *fast, *ref;

		snprintf(spec, sizeof spec, "turboquant(bits=%u)", b);
		c = codec_open(spec, D);
		fast = xcalloc(1, kvp_codec_bytes(c, N));
		ref = xcalloc(1, kvp_codec_bytes(c, N));
		for (unsigned i = 0; i < N; i++)
			rng_unit(&r, x + (size_t)i * D, D);
		cr_assert_eq(kvp_codec_encode(c, N, x, fast), KVP_OK);
		cr_assert_eq(kvp_turboquant_encode_reference(c, NULL, N, x, ref), KVP_OK);
		cr_assert(!memcmp(fast, ref, kvp_codec_bytes(c, N)), "%s: bytes differ from the reference", spec);
		kvp_codec_close(c);
		free(x), free(fast), free(ref);
	}
}
