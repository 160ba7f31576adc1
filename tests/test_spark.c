/*
 * SparK against specs/codecs.md section 3: keep=1.0 is its inner codec, less kept is more error, average
 * recovery beats zeros, observed queries steer which channels are kept, the documented layout, stacking
 * rules, and the query paths against decode.
 */
#include <stdio.h>

#include "codec_fixture.h"

static void *encode_all(kvp_codec *c, unsigned n, const float *x)
{
	void *bytes = xcalloc(1, kvp_codec_bytes(c, n));

	cr_assert_eq(kvp_codec_encode(c, n, x, bytes), KVP_OK, "%s", kvp_last_error());
	return bytes;
}

static float *gaussian_rows(unsigned n, unsigned d, uint64_t seed)
{
	struct rng r = { seed };
	float *x = xcalloc((size_t)n * d, sizeof *x);

	rng_gaussians(&r, x, (size_t)n * d);
	return x;
}

Test(spark, keep_1_equals_its_inner_codec_exactly)
{
	static const char *const inner[] = { "turboquant(bits=3)", "turboquant(bits=2,qjl=1)", "fp16", "kivi(bits=4,axis=token)" };
	const unsigned d = 128, n = 200;
	float *x = gaussian_rows(n, d, 1), *a = xcalloc((size_t)n * d, sizeof *a), *b = xcalloc((size_t)n * d, sizeof *b);
	float *q = gaussian_rows(1, d, 2), *da = xcalloc(n, sizeof *da), *db = xcalloc(n, sizeof *db);
	char spec[96];

	for (size_t k = 0; k < sizeof inner / sizeof inner[0]; k++) {
		kvp_codec *plain = codec_open(inner[k], d);
		snprintf(spec, sizeof spec, "spark(keep=1.0)|%s", inner[k]);
		kvp_codec *stacked = codec_open(spec, d);
		void *pb = encode_all(plain, n, x), *sb = encode_all(stacked, n, x);

		cr_assert_eq(kvp_codec_decode(plain, n, pb, a), KVP_OK);
		cr_assert_eq(kvp_codec_decode(stacked, n, sb, b), KVP_OK);
		cr_assert(!memcmp(a, b, sizeof(float) * n * d), "%s does not decode as %s", spec, inner[k]);
		cr_assert_eq(kvp_codec_dot(plain, n, pb, q, da), KVP_OK);
		cr_assert_eq(kvp_codec_dot(stacked, n, sb, q, db), KVP_OK);
		for (unsigned i = 0; i < n; i++)
			cr_assert(fabsf(da[i] - db[i]) <= 1e-5f * (1 + fabsf(da[i])), "%s token %u: dot %g, inner %g", spec,
				  i, db[i], da[i]);
		kvp_codec_close(plain);
		kvp_codec_close(stacked);
		free(pb);
		free(sb);
	}
	free(x);
	free(a);
	free(b);
	free(q);
	free(da);
	free(db);
}

Test(spark, keeping_half_the_channels_errs_less_than_keeping_a_quarter)
{
	const unsigned d = 128, n = 2000;
	float *x = gaussian_rows(n, d, 3);
	double e[3];
	const char *specs[] = { "spark(keep=0.5)", "spark(keep=0.25)", "spark(keep=0.5)|turboquant(bits=4)" };

	for (int i = 0; i < 3; i++) {
		kvp_codec *c = codec_open(specs[i], d);
		e[i] = codec_mse(c, n, x);
		kvp_codec_close(c);
	}
	cr_assert(e[0] < e[1], "keep=0.5 MSE %.4g, keep=0.25 MSE %.4g", e[0], e[1]);
	/* half of N(0,1) pruned, the smallest half, rebuilt at their RMS: ~0.05 of the energy */
	cr_assert(e[0] > 0.01 && e[0] < 0.1, "keep=0.5 MSE %.4g", e[0]);
	cr_assert(e[2] > e[0] && e[2] < e[0] + 0.02, "with 4-bit TurboQuant on the kept half: %.4g", e[2]);
	free(x);
}

Test(spark, average_recovery_errs_less_than_zeros)
{
	const unsigned d = 64, n = 2000;
	float *x = gaussian_rows(n, d, 4);
	kvp_codec *avg = codec_open("spark(keep=0.5,recover=avg)", d), *zero = codec_open("spark(keep=0.5,recover=zero)", d);
	double ea = codec_mse(avg, n, x), ez = codec_mse(zero, n, x);

	cr_assert(ea < 0.7 * ez, "avg %.4g, zero %.4g", ea, ez);
	kvp_codec_close(avg);
	kvp_codec_close(zero);
	free(x);
}

/* Queries that only ever read channels 0..15 make SparK keep those, whatever the key magnitudes. */
Test(spark, observed_queries_steer_the_kept_channels)
{
	const unsigned d = 64, n = 256, nq = 32;
	float *x = gaussian_rows(n, d, 5), *q = xcalloc((size_t)nq * d, sizeof *q), *probe = gaussian_rows(1, d, 6);
	struct kvp_codec *c;
	void *ctx, *bytes, *qprep;
	float *dots = xcalloc(n, sizeof *dots);
	struct rng r = { 7 };

	for (unsigned i = 0; i < nq; i++)
		for (unsigned j = 0; j < 16; j++)
			q[(size_t)i * d + j] = (float)rng_gaussian(&r);
	for (unsigned j = 16; j < d; j++)
		probe[j] = 0.0f;
	cr_assert_eq(kvp_codec_parse("spark(keep=0.25)", 16, d, &c), KVP_OK, "%s", kvp_last_error());
	ctx = xcalloc(1, c->ctx_bytes);
	bytes = xcalloc(1, c->ops->bytes(c, n));
	qprep = xcalloc(1, c->qprep_bytes);
	cr_assert_eq(c->ops->fit(c, ctx, n, x, nq, q), KVP_OK);
	cr_assert_eq(c->ops->encode(c, ctx, n, x, bytes), KVP_OK);
	c->ops->prepare_query(c, ctx, probe, qprep);
	c->ops->dot(c, ctx, n, bytes, qprep, dots);
	for (unsigned i = 0; i < n; i++) {
		double want = dot_d(probe, x + (size_t)i * d, d);
		/* the 16 queried channels are kept in fp16 */
		cr_assert(fabs(dots[i] - want) <= 1e-2 * (1 + fabs(want)), "token %u: %g, exact %g", i, dots[i], want);
	}
	kvp_codec_free(c);
	free(x);
	free(q);
	free(probe);
	free(ctx);
	free(bytes);
	free(qprep);
	free(dots);
}

Test(spark, bytes_follow_the_documented_layout)
{
	static const struct {
		const char *spec;
		unsigned d;
		size_t bytes;
	} cases[] = {
		{ "spark(keep=0.5)", 128, 4 + 16 + 8 + 128 },
		{ "spark(keep=0.5,recover=zero)", 128, 16 + 128 },
		{ "spark(keep=0.75)", 128, 4 + 16 + 4 + 192 },
		{ "spark(keep=0.5,quantize=kept)|turboquant(bits=3)", 128, 4 + 16 + 8 + 4 + 24 },
		{ "spark(keep=0.75)|turboquant(bits=4)", 128, 4 + 16 + 4 + 4 + 48 },
		{ "spark(keep=0.5)|turboquant(bits=3)", 80, 4 + 10 + 5 + 4 + 15 },
		{ "spark(keep=1.0)|turboquant(bits=3)", 128, 4 + 16 + 0 + 52 },
		/* quantize=all: the inner codec's bytes for the whole vector, nothing else */
		{ "spark(keep=0.5,quantize=all)|turboquant(bits=3)", 128, 4 + 48 },
		/* fp16 values start on an even byte: one byte of padding after 4 + 2 + 1 */
		{ "spark(keep=0.5)", 9, 4 + 2 + 1 + 1 + 10 },
		{ "spark(keep=0.5)|turboquant(bits=3)", 9, 4 + 2 + 1 + 4 + 2 },
		/* quantize=rotated: the norm, mask and signs of every coordinate, bits-1 magnitude bits per kept one */
		{ "spark(keep=0.5,quantize=rotated)|turboquant(bits=3)", 128, 4 + 16 + 16 + 16 },
		{ "spark(keep=0.5,quantize=rotated)|turboquant(bits=3)", 64, 4 + 8 + 8 + 8 },
		{ "spark(keep=0.5,quantize=rotated)|turboquant(bits=2)", 128, 4 + 16 + 16 + 8 },
		{ "spark(keep=0.25,quantize=rotated)|turboquant(bits=1)", 128, 4 + 16 + 16 },
		{ "spark(keep=0.3,quantize=rotated)|turboquant(bits=3)", 8, 4 + 1 + 1 + 1 },
	};

	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		kvp_codec *c = codec_open(cases[i].spec, cases[i].d);
		cr_assert_eq(kvp_codec_bytes(c, 3), 3 * cases[i].bytes, "%s d=%u: %zu bytes, want 3 * %zu", cases[i].spec,
			     cases[i].d, kvp_codec_bytes(c, 3), cases[i].bytes);
		if (cases[i].d == 128)
			printf("bits/value at d=128: %-40s %.4g\n", cases[i].spec, cases[i].bytes * 8.0 / 128);
		kvp_codec_close(c);
	}
}

/* Whether two specs open as the same codec at d channels: the same bytes a token, the same fitting, the same
 * bytes for the same keys. */
static int same_codec(const char *a, const char *b, unsigned d)
{
	const unsigned n = 20;
	kvp_codec *ca = codec_open(a, d), *cb = codec_open(b, d);
	float *x = gaussian_rows(n, d, 31);
	void *ea = NULL, *eb = NULL;
	int same = kvp_codec_bytes(ca, 1) == kvp_codec_bytes(cb, 1) && ca->fit_steps == cb->fit_steps;

	if (same) {
		ea = encode_all(ca, n, x);
		eb = encode_all(cb, n, x);
		same = !memcmp(ea, eb, kvp_codec_bytes(ca, n));
	}
	kvp_codec_close(ca), kvp_codec_close(cb);
	free(x), free(ea), free(eb);
	return same;
}

/* quantize=auto, the default: the rotated basis where the codec right of '|' is one Hadamard pass over at most
 * 3-bit codes at the full width and a channel is pruned; the channels' own basis (and query statistics)
 * otherwise. */
Test(spark, quantize_auto_is_rotated_where_the_inner_codec_takes_it_and_kept_otherwise)
{
	static const struct {
		const char *spec, *means;
		unsigned d;
	} cases[] = {
		{ "spark(keep=0.5)|turboquant(bits=3)", "spark(keep=0.5,quantize=rotated)|turboquant(bits=3)", 128 },
		{ "spark(keep=0.5,quantize=auto)|turboquant(bits=3)",
		  "spark(keep=0.5,quantize=rotated)|turboquant(bits=3)", 64 },
		{ "spark(keep=0.25,recover=zero)|turboquant(bits=2)",
		  "spark(keep=0.25,recover=zero,quantize=rotated)|turboquant(bits=2)", 32 },
		{ "spark(keep=0.5)|turboquant(bits=1)", "spark(keep=0.5,quantize=rotated)|turboquant(bits=1)", 8 },
		{ "spark(keep=0.5)|turboquant(bits=4)", "spark(keep=0.5,quantize=kept)|turboquant(bits=4)", 128 },
		{ "spark(keep=0.5)|turboquant(bits=3,qjl=1)",
		  "spark(keep=0.5,quantize=kept)|turboquant(bits=3,qjl=1)", 128 },
		{ "spark(keep=0.5)|turboquant(bits=3,outliers=8)",
		  "spark(keep=0.5,quantize=kept)|turboquant(bits=3,outliers=8)", 64 },
		{ "spark(keep=0.5)|turboquant(bits=3)", "spark(keep=0.5,quantize=kept)|turboquant(bits=3)", 96 },
		/* 64 of 96 kept: the kept width is a power of two, but rotated needs the full one */
		{ "spark(keep=0.666666666)|turboquant(bits=3)",
		  "spark(keep=0.666666666,quantize=kept)|turboquant(bits=3)", 96 },
		{ "spark(keep=1.0)|turboquant(bits=3)", "spark(keep=1.0,quantize=kept)|turboquant(bits=3)", 128 },
		{ "spark(keep=0.5)|fp16", "spark(keep=0.5,quantize=kept)|fp16", 128 },
		{ "spark(keep=0.5)", "spark(keep=0.5,quantize=kept)", 64 },
	};

	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
		cr_assert(same_codec(cases[i].spec, cases[i].means, cases[i].d), "%s at d=%u is not %s", cases[i].spec,
			  cases[i].d, cases[i].means);
	cr_assert(!same_codec("spark(keep=0.5)|turboquant(bits=3)", "spark(keep=0.5,quantize=kept)|turboquant(bits=3)",
			      128));
}

static void query_paths_match_decode(const char *spec, unsigned d, unsigned n)
{
	kvp_codec *c = codec_open(spec, d);
	float *x = gaussian_rows(n, d, 8), *y = xcalloc((size_t)n * d, sizeof *y), *q = gaussian_rows(1, d, 9);
	float *w = gaussian_rows(1, n, 10), *dots = xcalloc(n, sizeof *dots), *sum = xcalloc(d, sizeof *sum);
	void *bytes = encode_all(c, n, x);

	cr_assert_eq(kvp_codec_decode(c, n, bytes, y), KVP_OK);
	codec_fused_dot(c, n, bytes, q, dots);
	for (unsigned i = 0; i < n; i++) {
		double want = dot_d(q, y + (size_t)i * d, d);
		cr_assert(fabs(dots[i] - want) <= 1e-4 * (1 + fabs(want)), "%s token %u: dot %g, decoded %g", spec, i,
			  dots[i], want);
	}
	codec_fused_axpy(c, n, bytes, w, sum);
	for (unsigned j = 0; j < d; j++) {
		double want = 0;
		for (unsigned i = 0; i < n; i++)
			want += (double)w[i] * y[(size_t)i * d + j];
		cr_assert(fabs(sum[j] - want) <= 1e-4 * (1 + fabs(want)), "%s channel %u: axpy %g, decoded %g", spec, j,
			  sum[j], want);
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

Test(spark, dot_and_axpy_equal_decode_alone_and_stacked)
{
	query_paths_match_decode("spark(keep=0.5)", 128, 50);
	query_paths_match_decode("spark(keep=0.5,recover=zero)", 96, 50);
	query_paths_match_decode("spark(keep=0.5,quantize=kept)|turboquant(bits=3)", 128, 50);
	query_paths_match_decode("spark(keep=0.7)|turboquant(bits=2,qjl=1)", 80, 50);
	query_paths_match_decode("spark(keep=0.5)|turboquant(bits=2,outliers=8,outlier_bits=4)", 64, 50);
	query_paths_match_decode("spark(keep=0.6)|kivi(bits=4,group=8,axis=token)", 48, 50);
	query_paths_match_decode("spark(keep=0.5,quantize=all)|turboquant(bits=3)", 128, 50);
	query_paths_match_decode("spark(keep=0.5,quantize=all,recover=zero)|turboquant(bits=2,outliers=8,outlier_bits=4)",
				 64, 50);
	query_paths_match_decode("spark(keep=0.5,quantize=rotated)|turboquant(bits=3)", 128, 300);
	query_paths_match_decode("spark(keep=0.5,quantize=rotated)|turboquant(bits=3)", 64, 50);
	query_paths_match_decode("spark(keep=0.3,quantize=rotated,recover=zero)|turboquant(bits=2)", 32, 50);
	query_paths_match_decode("spark(keep=0.7,quantize=rotated)|turboquant(bits=1)", 8, 50);
	query_paths_match_decode("spark(keep=0.5,quantize=rotated)|turboquant(bits=3)", 4, 50);
	query_paths_match_decode("spark(keep=0.6,quantize=rotated)|turboquant(bits=2)", 16, 50);
}

Test(spark, bad_specs_are_rejected_with_a_message_quoting_them)
{
	expect_rejected("spark(keep=2)", 128, "keep=2");
	expect_rejected("spark(keep=0)", 128, "keep=0");
	expect_rejected("spark(keep=0.5,recover=mean)", 128, "mean");
	expect_rejected("spark(keep=0.5,ratio=3)", 128, "ratio");
	/* keys: kivi groups tokens per channel, which a per-token channel mask cannot feed */
	expect_rejected("spark(keep=0.5)|kivi(bits=2)", 128, "spark(keep=0.5)|kivi(bits=2)");
	expect_rejected("spark(keep=2)|turboquant(bits=3)", 128, "keep=2");
	expect_rejected("spark(keep=0.5)|turboquant(bits=7)", 128, "bits=7");
	expect_rejected("turboquant(bits=3)|spark(keep=0.5)", 128, "turboquant(bits=3)");
	expect_rejected("spark(keep=0.5,quantize=some)|turboquant(bits=3)", 128, "some");
	/* alone there is no codec to take the whole vector */
	expect_rejected("spark(keep=0.5,quantize=all)", 128, "quantize=all");
	expect_rejected("spark(keep=0.5,quantize=rotated)", 128, "quantize=rotated");
	/* rotated: one Hadamard pass over codes to take the rotation from, and 16 codes at most */
	expect_rejected("spark(keep=0.5,quantize=rotated)|turboquant(bits=4)", 128, "bits=4");
	expect_rejected("spark(keep=0.5,quantize=rotated)|turboquant(bits=3,qjl=1)", 128, "qjl=1");
	expect_rejected("spark(keep=0.5,quantize=rotated)|turboquant(bits=3)", 96, "turboquant(bits=3)");
	expect_rejected("spark(keep=0.5,quantize=rotated)|fp16", 128, "fp16");
}

Test(spark, non_finite_keys_are_rejected)
{
	kvp_codec *c = codec_open("spark(keep=0.5)", 16);
	float x[16] = { 0 };
	unsigned char bytes[256];

	x[2] = NAN;
	cr_assert_eq(kvp_codec_encode(c, 1, x, bytes), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "non-finite"), "%s", kvp_last_error());
	kvp_codec_close(c);
}

/* Bytes from outside the process are checked before use: a scale encode writes, a mask of the kept count,
 * and kept values the inner codec's check passes. */
Test(spark, check_passes_encoded_tokens_and_names_a_mask_or_scale_encode_never_writes)
{
	kvp_codec *alone = codec_open("spark(keep=0.5)", 16);
	kvp_codec *stacked = codec_open("spark(keep=0.5,quantize=kept)|turboquant(bits=3)", 16);
	kvp_codec *all = codec_open("spark(keep=0.5,quantize=all)|turboquant(bits=3)", 16);
	const float nan = NAN;
	struct rng r = { 47 };
	float x[3 * 16];
	unsigned char bytes[3 * 64], copy[3 * 64];
	size_t stride;

	rng_gaussians(&r, x, 3 * 16);
	cr_assert_eq(kvp_codec_encode(alone, 3, x, bytes), KVP_OK);
	cr_assert_eq(alone->ops->check(alone, 3, bytes), KVP_OK, "%s", kvp_last_error());
	stride = kvp_codec_bytes(alone, 1);
	memcpy(copy, bytes, sizeof copy);
	memcpy(copy + stride, &nan, 4);
	cr_assert_eq(alone->ops->check(alone, 3, copy), KVP_ECORRUPT);
	cr_assert(strstr(kvp_last_error(), "token 1's pruned scale"), "%s", kvp_last_error());
	memcpy(copy, bytes, sizeof copy);
	copy[2 * stride + 4] ^= 0x01; /* token 2's mask: one channel more or less */
	cr_assert_eq(alone->ops->check(alone, 3, copy), KVP_ECORRUPT);
	cr_assert(strstr(kvp_last_error(), "token 2's keep mask does not keep 8 channels"), "%s", kvp_last_error());

	cr_assert_eq(kvp_codec_encode(stacked, 3, x, bytes), KVP_OK);
	cr_assert_eq(stacked->ops->check(stacked, 3, bytes), KVP_OK, "%s", kvp_last_error());
	stride = kvp_codec_bytes(stacked, 1);
	memcpy(copy, bytes, sizeof copy);
	memcpy(copy + stride + stride - kvp_codec_bytes(stacked->inner, 1), &nan, 4); /* token 1's inner norm */
	cr_assert_eq(stacked->ops->check(stacked, 3, copy), KVP_ECORRUPT);
	cr_assert(strstr(kvp_last_error(), "token 1's kept values: turboquant: token 0's norm"), "%s", kvp_last_error());

	cr_assert_eq(kvp_codec_encode(all, 3, x, bytes), KVP_OK);
	cr_assert_eq(all->ops->check(all, 3, bytes), KVP_OK, "%s", kvp_last_error());
	memcpy(copy, bytes, sizeof copy);
	memcpy(copy + 2 * kvp_codec_bytes(all, 1), &nan, 4);
	cr_assert_eq(all->ops->check(all, 3, copy), KVP_ECORRUPT);
	cr_assert(strstr(kvp_last_error(), "turboquant: token 2's norm"), "%s", kvp_last_error());
	kvp_codec_close(alone), kvp_codec_close(stacked), kvp_codec_close(all);
}

/* Small integers, so many ties: the kept set is the top T by |x|, ties to the lower channel index. */
Test(spark, keeps_the_largest_channels_with_ties_to_the_lower_index)
{
	static const unsigned dims[] = { 7, 16, 33, 128 };
	static const double keeps[] = { 0.25, 0.5, 0.7, 1.0 };
	struct rng r = { 21 };
	float x[128], y[128];
	unsigned char bytes[1024];
	char spec[64];

	for (size_t a = 0; a < 4; a++)
		for (size_t k = 0; k < 4; k++) {
			unsigned d = dims[a];
			snprintf(spec, sizeof spec, "spark(keep=%g,recover=zero)", keeps[k]);
			kvp_codec *c = codec_open(spec, d);
			unsigned kept = d - (unsigned)floor((1.0 - keeps[k]) * d + 1e-9);

			for (int trial = 0; trial < 50; trial++) {
				for (unsigned j = 0; j < d; j++)
					x[j] = (float)((int)(rng_next(&r) % 7) - 3);
				cr_assert_eq(kvp_codec_encode(c, 1, x, bytes), KVP_OK);
				cr_assert_eq(kvp_codec_decode(c, 1, bytes, y), KVP_OK);
				for (unsigned j = 0; j < d; j++) {
					unsigned above = 0; /* channels ranked before j */
					for (unsigned i = 0; i < d; i++)
						above += fabsf(x[i]) > fabsf(x[j]) || (fabsf(x[i]) == fabsf(x[j]) && i < j);
					cr_assert_eq(y[j], above < kept ? x[j] : 0.0f, "%s d=%u channel %u: %g from %g", spec, d,
						     j, y[j], x[j]);
				}
			}
			kvp_codec_close(c);
		}
}

/* The bytes of one token of spark alone (fp16 kept values), written from the documented layout by plain
 * loops: a sort-free rank per channel, a branch per field. */
static void reference_token(unsigned d, unsigned kept, int avg, const float *x, unsigned char *p)
{
	size_t mask_at = avg ? 4 : 0, sign_at = mask_at + (d + 7) / 8, kept_at;
	unsigned r = 0, t = 0;
	double sum = 0.0;

	kept_at = sign_at + (avg ? (d - kept + 7) / 8 : 0);
	kept_at += kept_at & 1;
	memset(p, 0, kept_at + 2 * kept);
	for (unsigned j = 0; j < d; j++) {
		unsigned above = 0;
		for (unsigned i = 0; i < d; i++)
			above += x[i] * x[i] > x[j] * x[j] || (x[i] * x[i] == x[j] * x[j] && i < j);
		if (above < kept) {
			uint16_t h = kvp_f32_to_f16(x[j]);
			p[mask_at + j / 8] |= (unsigned char)(1u << (j % 8));
			memcpy(p + kept_at + 2 * t++, &h, 2);
			continue;
		}
		sum += (double)(x[j] * x[j]); /* the score, a float (||Q_j|| = 1 without observed queries) */
		if (avg && signbit(x[j]))
			p[sign_at + r / 8] |= (unsigned char)(1u << (r % 8));
		r++;
	}
	if (avg) {
		float s = d > kept ? (float)(sum / (d - kept)) : 0.0f, root = sqrtf(s);
		memcpy(p, &root, 4);
	}
}

/* Odd widths, many ties (small integers) and Gaussians: every byte as the plain loops write it. */
Test(spark, encode_writes_the_bytes_of_the_plain_reference)
{
	static const unsigned dims[] = { 7, 13, 33, 64, 128 };
	static const double keeps[] = { 0.25, 0.5, 0.7, 1.0 };
	static const char *const modes[] = { "avg", "zero" };
	struct rng r = { 31 };
	float x[128];
	unsigned char got[1024], want[1024];
	char spec[64];

	for (size_t a = 0; a < 5; a++)
		for (size_t k = 0; k < 4; k++)
			for (int m = 0; m < 2; m++) {
				unsigned d = dims[a], kept = d - (unsigned)floor((1.0 - keeps[k]) * d + 1e-9);
				snprintf(spec, sizeof spec, "spark(keep=%g,recover=%s)", keeps[k], modes[m]);
				kvp_codec *c = codec_open(spec, d);
				size_t bytes = kvp_codec_bytes(c, 1);

				for (int trial = 0; trial < 40; trial++) {
					for (unsigned j = 0; j < d; j++)
						x[j] = trial & 1 ? (float)((int)(rng_next(&r) % 7) - 3) : (float)rng_gaussian(&r);
					cr_assert_eq(kvp_codec_encode(c, 1, x, got), KVP_OK);
					reference_token(d, kept, m == 0, x, want);
					cr_assert(!memcmp(got, want, bytes), "%s d=%u trial %d: the bytes differ", spec, d, trial);
				}
				kvp_codec_close(c);
			}
}

/* dot_group and axpy_group over 4 heads give each head what dot and axpy give it, within 1e-5 relative:
 * the same rows expanded once for the group instead of once per head. (With quantize=all both are the
 * inner codec's: TurboQuant's group paths run on integers and have their bound in test_turboquant.)
 * With TurboQuant under SparK, dot_group runs on integers (spark_dot_i16_group): its scores are within
 * `spread` of the RMS of the head's scores of dot's. */
static void group_paths_match(const char *spec, float spread)
{
	const unsigned d = 128, n = 70, g = 4;
	kvp_codec *c = codec_open(spec, d);
	float *x = gaussian_rows(n, d, 41), *q = gaussian_rows(g, d, 42), *w = gaussian_rows(g, n, 43);
	float *one = xcalloc(n, sizeof *one), *all = xcalloc((size_t)g * n, sizeof *all);
	float *acc1 = xcalloc(c->acc_dim, sizeof *acc1), *accg = xcalloc((size_t)g * c->acc_dim, sizeof *accg);
	char *qprep = xcalloc(g, c->qprep_bytes);
	void *bytes = encode_all(c, n, x);

	for (unsigned h = 0; h < g; h++)
		c->ops->prepare_query(c, c->own_ctx, q + (size_t)h * d, qprep + h * c->qprep_bytes);
	c->ops->dot_group(c, c->own_ctx, n, bytes, g, qprep, all, n);
	c->ops->axpy_group(c, c->own_ctx, n, bytes, g, w, n, accg);
	for (unsigned h = 0; h < g; h++) {
		double rms = 0.0;

		c->ops->dot(c, c->own_ctx, n, bytes, qprep + h * c->qprep_bytes, one);
		for (unsigned i = 0; i < n; i++)
			rms += (double)one[i] * one[i] / n;
		rms = sqrt(rms);
		for (unsigned i = 0; i < n; i++)
			cr_assert(fabsf(one[i] - all[(size_t)h * n + i]) <= 1e-5f * (1 + fabsf(one[i])) + spread * rms,
				  "%s head %u token %u: dot_group %g, dot %g", spec, h, i, all[(size_t)h * n + i], one[i]);
		memset(acc1, 0, sizeof *acc1 * c->acc_dim);
		c->ops->axpy(c, c->own_ctx, n, bytes, w + (size_t)h * n, acc1);
		for (unsigned j = 0; j < c->acc_dim; j++)
			cr_assert(fabsf(acc1[j] - accg[(size_t)h * c->acc_dim + j]) <= 1e-5f * (1 + fabsf(acc1[j])),
				  "%s head %u channel %u: axpy_group %g, axpy %g", spec, h, j,
				  accg[(size_t)h * c->acc_dim + j], acc1[j]);
	}
	kvp_codec_close(c);
	free(x);
	free(q);
	free(w);
	free(one);
	free(all);
	free(acc1);
	free(accg);
	free(qprep);
	free(bytes);
}

Test(spark, group_paths_equal_the_per_head_paths)
{
	group_paths_match("spark(keep=0.5,quantize=kept)|turboquant(bits=3)", 0.02f);
	group_paths_match("spark(keep=0.5,recover=zero,quantize=kept)|turboquant(bits=3)", 0.0f); /* the float path */
	group_paths_match("spark(keep=0.5)", 0.0f);
	/* the query in int8, as TurboQuant's group path takes it: about 0.75% of the RMS per score, 5 sigma */
	group_paths_match("spark(keep=0.5,quantize=rotated)|turboquant(bits=3)", 0.04f);
}

/*
 * dot_group's integer path and the float path it falls back on, over tokens fitted with queries that leave
 * channels 0..15 nearly unqueried (||Q_j|| at `weak` of the others'): their recovered values are large,
 * so beside the kept values they may not fit int16 (ell above 32767), and such a chunk is scored in floats.
 * Returns the worst |dot_group - dot| over the RMS of dot's scores; *unsound_scores is dot_group's score of a
 * token whose mask was corrupted (dot gives 0 for it: it decodes to zeros).
 */
static double integer_path_error(float weak, float *unsound_score)
{
	const unsigned d = 128, n = 300, nq = 32, g = 4, bad = 77;
	const char *spec = "spark(keep=0.5,quantize=kept)|turboquant(bits=3)";
	float *x = gaussian_rows(n, d, 61), *q = gaussian_rows(nq, d, 62), *probe = gaussian_rows(g, d, 63);
	float *one = xcalloc(n, sizeof *one), *all = xcalloc((size_t)g * n, sizeof *all);
	struct kvp_codec *c;
	unsigned char *bytes;
	char *qprep;
	void *ctx;
	double worst = 0.0;

	for (unsigned i = 0; i < nq; i++)
		for (unsigned j = 0; j < 16; j++)
			q[(size_t)i * d + j] *= weak;
	cr_assert_eq(kvp_codec_parse(spec, strlen(spec), d, &c), KVP_OK, "%s", kvp_last_error());
	ctx = xcalloc(1, c->ctx_bytes);
	bytes = xcalloc(1, c->ops->bytes(c, n));
	qprep = xcalloc(g, c->qprep_bytes);
	cr_assert_eq(c->ops->fit(c, ctx, n, x, nq, q), KVP_OK);
	cr_assert_eq(c->ops->encode(c, ctx, n, x, bytes), KVP_OK);
	bytes[(size_t)bad * c->ops->bytes(c, 1) + 4] ^= 1; /* channel 0's keep bit: one channel more or fewer */
	for (unsigned h = 0; h < g; h++)
		c->ops->prepare_query(c, ctx, probe + (size_t)h * d, qprep + h * c->qprep_bytes);
	c->ops->dot_group(c, ctx, n, bytes, g, qprep, all, n);
	for (unsigned h = 0; h < g; h++) {
		double rms = 0.0;

		c->ops->dot(c, ctx, n, bytes, qprep + h * c->qprep_bytes, one);
		cr_assert_eq(one[bad], 0.0f, "a corrupted mask decodes to zeros");
		for (unsigned i = 0; i < n; i++)
			rms += (double)one[i] * one[i] / n;
		for (unsigned i = 0; i < n; i++)
			worst = fmax(worst, fabs(one[i] - all[(size_t)h * n + i]) / sqrt(rms));
	}
	*unsound_score = all[bad];
	kvp_codec_free(c);
	free(x), free(q), free(probe), free(one), free(all), free(ctx), free(bytes), free(qprep);
	return worst;
}

Test(spark, integer_group_path_stays_within_its_bound_and_scores_a_corrupted_mask_0)
{
	float unsound;
	double e = integer_path_error(1.0f, &unsound);

	cr_assert(e > 1e-6 && e < 0.02, "the integer path: worst error %g of the scores' RMS", e);
	cr_assert_eq(unsound, 0.0f);
}

Test(spark, recoveries_too_large_for_int16_take_the_float_path)
{
	float unsound;
	double e = integer_path_error(1e-5f, &unsound);

	cr_assert(e < 1e-5, "the float path: worst error %g of the scores' RMS", e);
	cr_assert_eq(unsound, 0.0f);
}

/* quantize=all hands the inner codec SparK's own decode of the token (kept values, recovered pruned ones):
 * it decodes as that codec on what spark|fp32 decodes to, bit for bit. */
static void quantize_all_matches(const char *recover, unsigned d)
{
	const unsigned n = 100;
	char exact_spec[64], all_spec[96];
	float *x = gaussian_rows(n, d, 51), *z = xcalloc((size_t)n * d, sizeof *z);
	float *a = xcalloc((size_t)n * d, sizeof *a), *b = xcalloc((size_t)n * d, sizeof *b);
	kvp_codec *exact, *tq = codec_open("turboquant(bits=3)", d), *all;

	snprintf(exact_spec, sizeof exact_spec, "spark(keep=0.5,recover=%s)|fp32", recover);
	snprintf(all_spec, sizeof all_spec, "spark(keep=0.5,recover=%s,quantize=all)|turboquant(bits=3)", recover);
	exact = codec_open(exact_spec, d);
	all = codec_open(all_spec, d);
	void *eb = encode_all(exact, n, x), *ab = encode_all(all, n, x), *tb;

	cr_assert_eq(kvp_codec_decode(exact, n, eb, z), KVP_OK);
	tb = encode_all(tq, n, z);
	cr_assert_eq(kvp_codec_decode(tq, n, tb, a), KVP_OK);
	cr_assert_eq(kvp_codec_decode(all, n, ab, b), KVP_OK);
	cr_assert(!memcmp(a, b, sizeof(float) * n * d), "%s does not decode as turboquant of %s's decode", all_spec,
		  exact_spec);
	kvp_codec_close(exact);
	kvp_codec_close(tq);
	kvp_codec_close(all);
	free(x);
	free(z);
	free(a);
	free(b);
	free(eb);
	free(ab);
	free(tb);
}

Test(spark, quantize_all_is_its_inner_codec_on_the_recovered_vector)
{
	quantize_all_matches("avg", 128);
	quantize_all_matches("zero", 128);
	quantize_all_matches("avg", 52); /* runs of 16 channels and a tail of 4 */
}

/* ---- quantize=rotated ---- */

/* The inner codec's signs and y = H (sgn .* x) in double, as the codec rotates. */
static void rotated_reference(kvp_codec *c, const float *x, double *y)
{
	struct kvp_hadamard_codes hc;
	const unsigned d = c->dim;

	cr_assert(c->inner->ops->hadamard_codes(c->inner, &hc));
	for (unsigned i = 0; i < d; i++) {
		y[i] = 0.0;
		for (unsigned j = 0; j < d; j++)
			y[i] += (__builtin_popcount(i & j) & 1 ? -1.0 : 1.0) * hc.sign[j] * x[j];
	}
}

/* Of y's coordinates the largest |y_j| are kept (ties to the lower index; Gaussian data has none), every
 * sign is y's, the norm is x's, and a kept coordinate's magnitude is larger for larger |y_j|. */
Test(spark, quantize_rotated_keeps_the_largest_rotated_coordinates_with_their_signs)
{
	const unsigned d = 64, n = 40, kept = 32;
	kvp_codec *c = codec_open("spark(keep=0.5,quantize=rotated)|turboquant(bits=3)", d);
	float *x = gaussian_rows(n, d, 71);
	unsigned char *bytes = encode_all(c, n, x);
	const size_t stride = kvp_codec_bytes(c, 1);
	double y[64];

	for (unsigned i = 0; i < n; i++) {
		const unsigned char *p = bytes + i * stride, *mask = p + 4, *sign = p + 12, *mag = p + 20;
		double n2 = 0.0, last = 0.0;
		unsigned r = 0, last_m = 0;

		rotated_reference(c, x + (size_t)i * d, y);
		for (unsigned j = 0; j < d; j++)
			n2 += (double)x[(size_t)i * d + j] * x[(size_t)i * d + j];
		cr_assert(fabs(kvp_load_f32(p) - sqrt(n2)) <= 1e-5 * sqrt(n2), "token %u: norm %g, want %g", i,
			  kvp_load_f32(p), sqrt(n2));
		for (unsigned j = 0; j < d; j++) {
			unsigned above = 0, keep = mask[j / 8] >> (j % 8) & 1;

			for (unsigned k = 0; k < d; k++)
				above += fabs(y[k]) > fabs(y[j]);
			cr_assert_eq(keep, above < kept, "token %u coordinate %u: %u larger, kept %u", i, j, above, keep);
			cr_assert_eq(sign[j / 8] >> (j % 8) & 1, y[j] < 0, "token %u coordinate %u: sign", i, j);
		}
		/* magnitudes grow with |y_j|: sort-free check over the kept ones in order of |y| */
		for (unsigned pass = 0; pass < kept; pass++) {
			double best = INFINITY;
			unsigned at = 0;
			r = 0;
			for (unsigned j = 0; j < d; j++) {
				if (!(mask[j / 8] >> (j % 8) & 1))
					continue;
				if (fabs(y[j]) > last && fabs(y[j]) < best)
					best = fabs(y[j]), at = r;
				r++;
			}
			const unsigned m = mag[at * 2 / 8] >> (at * 2 % 8) & 3;
			cr_assert(m >= last_m, "token %u: magnitude %u after %u for a larger coordinate", i, m, last_m);
			last = best, last_m = m;
		}
	}
	kvp_codec_close(c);
	free(x);
	free(bytes);
}

/* Relative squared error of decode against x over n Gaussian tokens. */
static double decode_error(const char *spec, unsigned d)
{
	const unsigned n = 400;
	kvp_codec *c = codec_open(spec, d);
	float *x = gaussian_rows(n, d, 73), *y = xcalloc((size_t)n * d, sizeof *y);
	void *bytes = encode_all(c, n, x);
	double e = 0.0, s = 0.0;

	cr_assert_eq(kvp_codec_decode(c, n, bytes, y), KVP_OK);
	for (size_t k = 0; k < (size_t)n * d; k++)
		e += ((double)y[k] - x[k]) * ((double)y[k] - x[k]), s += (double)x[k] * x[k];
	kvp_codec_close(c);
	free(x), free(y), free(bytes);
	return e / s;
}

/* On Gaussian keys (which the rotation leaves Gaussian) the fixed levels do about as well as TurboQuant's at
 * the same width, and better than pruning in the channels' own basis at more bytes. */
Test(spark, quantize_rotated_errs_about_as_turboquant_at_its_width)
{
	const double rot3 = decode_error("spark(keep=0.5,quantize=rotated)|turboquant(bits=3)", 128);
	const double tq3 = decode_error("turboquant(bits=3)", 128);
	const double kept3 = decode_error("spark(keep=0.5,quantize=kept)|turboquant(bits=3)", 128);
	const double rot2 = decode_error("spark(keep=0.5,quantize=rotated)|turboquant(bits=2)", 128);
	const double zero3 = decode_error("spark(keep=0.5,quantize=rotated,recover=zero)|turboquant(bits=3)", 128);

	printf("relative squared error, d=128: rotated|tq3 %.4f, tq3 %.4f, spark|tq3 %.4f, rotated|tq2 %.4f, "
	       "rotated(recover=zero)|tq3 %.4f\n", rot3, tq3, kept3, rot2, zero3);
	cr_assert(rot3 < 1.5 * tq3, "rotated %g against turboquant(bits=3) %g", rot3, tq3);
	cr_assert(rot3 < kept3, "rotated %g against spark(quantize=kept) %g", rot3, kept3);
	cr_assert(rot3 < rot2 && rot3 < zero3, "rotated bits=3 %g, bits=2 %g, recover=zero %g", rot3, rot2, zero3);
}

/* Bytes from outside: a norm encode never writes or a mask of the wrong count is named; such a mask decodes
 * to zeros and scores 0 on every path. */
Test(spark, quantize_rotated_checks_its_bytes_and_zeroes_a_corrupted_mask)
{
	const unsigned d = 64, n = 3, g = 4;
	kvp_codec *c = codec_open("spark(keep=0.5,quantize=rotated)|turboquant(bits=3)", d);
	float *x = gaussian_rows(n, d, 75), *q = gaussian_rows(g, d, 76), *y = xcalloc((size_t)n * d, sizeof *y);
	float *all = xcalloc((size_t)g * n, sizeof *all), one[3];
	unsigned char *bytes = encode_all(c, n, x), copy[3 * 28];
	char *qprep = xcalloc(g, c->qprep_bytes);
	const float nan = NAN;

	cr_assert_eq(kvp_codec_bytes(c, 1), 28);
	cr_assert_eq(c->ops->check(c, n, bytes), KVP_OK, "%s", kvp_last_error());
	memcpy(copy, bytes, sizeof copy);
	memcpy(copy + 28, &nan, 4);
	cr_assert_eq(c->ops->check(c, n, copy), KVP_ECORRUPT);
	cr_assert(strstr(kvp_last_error(), "token 1's norm"), "%s", kvp_last_error());
	memcpy(copy, bytes, sizeof copy);
	copy[2 * 28 + 4] ^= 0x01;
	cr_assert_eq(c->ops->check(c, n, copy), KVP_ECORRUPT);
	cr_assert(strstr(kvp_last_error(), "token 2's keep mask does not keep 32"), "%s", kvp_last_error());
	cr_assert_eq(c->ops->decode(c, NULL, n, copy, y), KVP_OK);
	for (unsigned j = 0; j < d; j++)
		cr_assert_eq(y[2 * d + j], 0.0f, "coordinate %u of the corrupted token", j);
	for (unsigned h = 0; h < g; h++)
		c->ops->prepare_query(c, NULL, q + (size_t)h * d, qprep + h * c->qprep_bytes);
	c->ops->dot_group(c, NULL, n, copy, g, qprep, all, n);
	c->ops->dot(c, NULL, n, copy, qprep, one);
	cr_assert(all[2] == 0.0f && one[2] == 0.0f && one[0] != 0.0f, "scores %g %g", all[2], one[2]);
	kvp_codec_close(c);
	free(x), free(q), free(y), free(all), free(bytes), free(qprep);
}
