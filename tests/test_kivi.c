/*
 * KIVI against specs/codecs.md section 2: min-max group quantization of N(0,1) data, zero-range groups,
 * per-channel keys (not separable, group = tokens) and per-token values, the documented byte layout, and
 * the fused dot and axpy against decode.
 */
#include <stdio.h>

#include "codec_fixture.h"

static kvp_codec *open_role(const char *spec, unsigned d, unsigned role)
{
	struct kvp_codec *c = NULL;
	kvp_status st = kvp_codec_parse_role(spec, strlen(spec), d, role, &c);

	cr_assert_eq(st, KVP_OK, "%s: %s", spec, kvp_last_error());
	return c;
}

/* Mean squared error over all values divided by their mean square (N(0,1): ~ the plain MSE). */
static double normalized_mse(struct kvp_codec *c, unsigned n, const float *x)
{
	unsigned d = c->dim;
	void *bytes = xcalloc(1, c->ops->bytes(c, n));
	float *y = xcalloc((size_t)n * d, sizeof *y);
	double e = 0, p = 0;

	cr_assert_eq(c->ops->encode(c, NULL, n, x, bytes), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(c->ops->decode(c, NULL, n, bytes, y), KVP_OK, "%s", kvp_last_error());
	for (size_t i = 0; i < (size_t)n * d; i++) {
		e += (double)(x[i] - y[i]) * (x[i] - y[i]);
		p += (double)x[i] * x[i];
	}
	free(bytes);
	free(y);
	return e / p;
}

static void gaussian_mse(const char *spec, unsigned role, double want)
{
	struct rng r = { 31 };
	const unsigned d = 128, n = 1024;
	float *x = xcalloc((size_t)n * d, sizeof *x);
	struct kvp_codec *c = open_role(spec, d, role);
	double got;

	rng_gaussians(&r, x, (size_t)n * d);
	got = normalized_mse(c, n, x);
	cr_assert(fabs(got - want) <= 0.10 * want, "%s role %u: normalized MSE %.4g, want %.4g +-10%%", spec, role,
		  got, want);
	kvp_codec_free(c);
	free(x);
}

Test(kivi, normalized_mse_of_gaussian_data_at_2_bits_group_32_is_within_10_percent_of_0_155)
{
	gaussian_mse("kivi(bits=2,group=32)", KVP_CODEC_KEYS, 0.155);
	gaussian_mse("kivi(bits=2,group=32)", KVP_CODEC_VALUES, 0.155);
}

Test(kivi, normalized_mse_of_gaussian_data_at_4_bits_group_32_is_within_10_percent_of_0_0061)
{
	gaussian_mse("kivi(bits=4,group=32)", KVP_CODEC_KEYS, 0.0061);
	gaussian_mse("kivi(bits=4,group=32)", KVP_CODEC_VALUES, 0.0061);
}

/* Every group constant (a different fp16 number per group): s = 0, codes 0, decode gives z exactly. */
Test(kivi, zero_range_groups_decode_exactly)
{
	static const unsigned roles[] = { KVP_CODEC_KEYS, KVP_CODEC_VALUES };
	const unsigned d = 64, n = 64;
	float *x = xcalloc((size_t)n * d, sizeof *x), *y = xcalloc((size_t)n * d, sizeof *y);

	for (size_t r = 0; r < 2; r++) {
		struct kvp_codec *c = open_role("kivi(bits=2)", d, roles[r]);
		void *bytes = xcalloc(1, c->ops->bytes(c, n));

		/* constant along tokens per channel (keys' groups) and along 32 channels per token (values') */
		for (unsigned i = 0; i < n; i++)
			for (unsigned j = 0; j < d; j++)
				x[(size_t)i * d + j] = roles[r] == KVP_CODEC_KEYS ? (float)j * 0.25f - 3.0f
										  : (float)(i * 2 + j / 32) * -0.125f;
		cr_assert_eq(c->ops->encode(c, NULL, n, x, bytes), KVP_OK, "%s", kvp_last_error());
		cr_assert_eq(c->ops->decode(c, NULL, n, bytes, y), KVP_OK);
		for (size_t i = 0; i < (size_t)n * d; i++) /* == : -0 may come back as +0 */
			cr_assert_eq(x[i], y[i], "role %zu value %zu: %.9g decoded as %.9g", r, i, x[i], y[i]);
		kvp_codec_free(c);
		free(bytes);
	}
	free(x);
	free(y);
}

Test(kivi, keys_are_grouped_over_tokens_and_values_are_separable)
{
	struct kvp_codec *k = open_role("kivi(bits=2,group=32)", 128, KVP_CODEC_KEYS);
	struct kvp_codec *v = open_role("kivi(bits=2,group=32)", 128, KVP_CODEC_VALUES);
	struct kvp_codec *kt = open_role("kivi(bits=2,group=32,axis=token)", 128, KVP_CODEC_KEYS);

	cr_assert_eq(k->group, 32);
	cr_assert_not(k->flags & KVP_CODEC_SEPARABLE);
	cr_assert_eq(v->group, 1);
	cr_assert(v->flags & KVP_CODEC_SEPARABLE);
	cr_assert_eq(kt->group, 1, "an explicit axis wins over the role");
	kvp_codec_free(k);
	kvp_codec_free(v);
	kvp_codec_free(kt);
}

Test(kivi, bytes_follow_the_documented_layout)
{
	static const struct {
		const char *spec;
		unsigned role, d, n;
		size_t bytes;
	} cases[] = {
		{ "kivi(bits=2,group=32)", KVP_CODEC_KEYS, 128, 32, 4 * 128 + 128 * 32 * 2 / 8 },
		{ "kivi(bits=4,group=32)", KVP_CODEC_KEYS, 128, 64, 2 * (4 * 128 + 128 * 32 * 4 / 8) },
		{ "kivi(bits=2,group=32)", KVP_CODEC_VALUES, 128, 1, 4 * 4 + 128 * 2 / 8 },
		{ "kivi(bits=4,group=32)", KVP_CODEC_VALUES, 128, 3, 3 * (4 * 4 + 128 * 4 / 8) },
		{ "kivi(bits=2,group=32)", KVP_CODEC_VALUES, 80, 1, 4 * 3 + 80 * 2 / 8 }, /* last group of 16 */
	};

	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		struct kvp_codec *c = open_role(cases[i].spec, cases[i].d, cases[i].role);
		size_t got = c->ops->bytes(c, cases[i].n);

		cr_assert_eq(got, cases[i].bytes, "%s role %u d=%u n=%u: %zu bytes, want %zu", cases[i].spec,
			     cases[i].role, cases[i].d, cases[i].n, got, cases[i].bytes);
		if (cases[i].d == 128)
			printf("bits/value at d=128: %-24s %-6s %.4g\n", cases[i].spec,
			       cases[i].role == KVP_CODEC_KEYS ? "keys" : "values",
			       got * 8.0 / (128.0 * cases[i].n));
		kvp_codec_free(c);
	}
}

static void fused_matches_decode(const char *spec, unsigned role, unsigned d, unsigned n)
{
	struct rng r = { 78 };
	struct kvp_codec *c = open_role(spec, d, role);
	float *x = xcalloc((size_t)n * d, sizeof *x), *y = xcalloc((size_t)n * d, sizeof *y);
	float *q = xcalloc(d, sizeof *q), *w = xcalloc(n, sizeof *w), *dots = xcalloc(n, sizeof *dots);
	float *sum = xcalloc(d, sizeof *sum), *acc = xcalloc(c->acc_dim, sizeof *acc);
	void *bytes = xcalloc(1, c->ops->bytes(c, n)), *qprep = xcalloc(1, c->qprep_bytes);

	rng_gaussians(&r, x, (size_t)n * d);
	rng_gaussians(&r, q, d);
	rng_gaussians(&r, w, n);
	cr_assert_eq(c->ops->encode(c, NULL, n, x, bytes), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(c->ops->decode(c, NULL, n, bytes, y), KVP_OK);
	c->ops->prepare_query(c, NULL, q, qprep);
	c->ops->dot(c, NULL, n, bytes, qprep, dots);
	for (unsigned i = 0; i < n; i++) {
		double want = dot_d(q, y + (size_t)i * d, d), mag = 0;
		for (unsigned j = 0; j < d; j++)
			mag += fabs(q[j] * y[(size_t)i * d + j]);
		cr_assert(fabs(dots[i] - want) <= 1e-5 * mag + 1e-6, "%s role %u d=%u token %u: dot %.7g, decoded %.7g",
			  spec, role, d, i, dots[i], want);
	}
	c->ops->axpy(c, NULL, n, bytes, w, acc);
	c->ops->finish(c, NULL, acc, sum);
	for (unsigned j = 0; j < d; j++) {
		double want = 0, mag = 0;
		for (unsigned i = 0; i < n; i++) {
			want += (double)w[i] * y[(size_t)i * d + j];
			mag += fabs(w[i] * y[(size_t)i * d + j]);
		}
		cr_assert(fabs(sum[j] - want) <= 1e-5 * mag + 1e-6, "%s role %u d=%u channel %u: axpy %.7g, decoded %.7g",
			  spec, role, d, j, sum[j], want);
	}
	kvp_codec_free(c);
	free(x);
	free(y);
	free(q);
	free(w);
	free(dots);
	free(sum);
	free(acc);
	free(bytes);
	free(qprep);
}

Test(kivi, fused_dot_and_axpy_equal_decode_for_keys_and_values_at_every_width)
{
	char spec[64];

	for (unsigned b = 1; b <= 4; b++) {
		snprintf(spec, sizeof spec, "kivi(bits=%u,group=32)", b);
		fused_matches_decode(spec, KVP_CODEC_KEYS, 128, 96);
		fused_matches_decode(spec, KVP_CODEC_VALUES, 128, 300);
		fused_matches_decode(spec, KVP_CODEC_VALUES, 80, 7);
		snprintf(spec, sizeof spec, "kivi(bits=%u,group=8)", b);
		fused_matches_decode(spec, KVP_CODEC_KEYS, 48, 16);
		fused_matches_decode(spec, KVP_CODEC_VALUES, 44, 5);
	}
}

Test(kivi, non_finite_values_and_ranges_beyond_fp16_are_rejected)
{
	struct kvp_codec *c = open_role("kivi(bits=2)", 32, KVP_CODEC_VALUES);
	float x[32] = { 0 };
	unsigned char bytes[64];

	x[3] = NAN;
	cr_assert_eq(c->ops->encode(c, NULL, 1, x, bytes), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "non-finite"), "%s", kvp_last_error());
	x[3] = 1e6f;
	cr_assert_eq(c->ops->encode(c, NULL, 1, x, bytes), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "fp16"), "%s", kvp_last_error());
	kvp_codec_free(c);
}

Test(kivi, bad_arguments_are_rejected_with_a_message_quoting_them)
{
	expect_rejected("kivi(bits=8)", 128, "8");
	expect_rejected("kivi(bits=7)", 128, "7");
	expect_rejected("kivi(group=12)", 128, "group=12");
	expect_rejected("kivi(group=0)", 128, "0");
	expect_rejected("kivi(axis=diagonal)", 128, "diagonal");
	expect_rejected("kivi(bits=2,residual=128)", 128, "residual");
}

Test(kivi, public_calls_need_whole_groups_of_tokens_for_keys)
{
	kvp_codec *c = codec_open("kivi(bits=2,group=32)", 64);
	float x[64 * 32] = { 0 };
	unsigned char bytes[4096];

	cr_assert_eq(kvp_codec_group(c), 32);
	cr_assert_eq(kvp_codec_bytes(c, 1), kvp_codec_bytes(c, 32), "bytes round up to whole groups");
	cr_assert_eq(kvp_codec_encode(c, 31, x, bytes), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "n=31"), "%s", kvp_last_error());
	cr_assert_eq(kvp_codec_encode(c, 32, x, bytes), KVP_OK, "%s", kvp_last_error());
	kvp_codec_close(c);
}
