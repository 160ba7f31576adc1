/*
 * KIVI against specs/codecs.md section 2: min-max group quantization of N(0,1) data, zero-range groups,
 * per-channel keys (not separable, group = tokens) and per-token values, the documented byte layout, and
 * the fused dot and axpy against decode.
 */
#include <stdio.h>

#include "codec_fixture.h"
#include "kernels/kernels.h"

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
		{ "kivi(bits=2,group=32)", KVP_CODEC_KEYS, 128, 32, 4 * 128 + 32 * (128 * 2 / 8) },
		{ "kivi(bits=4,group=32)", KVP_CODEC_KEYS, 128, 64, 2 * (4 * 128 + 32 * (128 * 4 / 8)) },
		{ "kivi(bits=2,group=8)", KVP_CODEC_KEYS, 44, 16, 2 * (4 * 44 + 8 * 11) }, /* rows of 88 bits */
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

/* Bytes from outside the process are checked before use: z finite, s finite and >= 0 in every group, on
 * either axis (keys: a record is a group of 32 tokens). */
Test(kivi, check_passes_encoded_groups_and_names_a_scale_encode_never_writes)
{
	static const char *const specs[] = { "kivi(bits=2)", "kivi(bits=2,axis=token)" };
	static const uint16_t bad[] = { 0x7e00 /* NaN */, 0x7c00 /* inf */, 0xbc00 /* -1 */ };

	for (unsigned a = 0; a < 2; a++) {
		struct kvp_codec *c = open_role(specs[a], 64, KVP_CODEC_KEYS);
		const size_t n = 64, bytes = c->ops->bytes(c, n);
		unsigned char *enc = xcalloc(bytes, 1), *copy = xcalloc(bytes, 1);
		/* the second record's scale of channel (group) 1: past its z[per] and s[0] */
		const unsigned per = a ? 2 : 64;
		const size_t at = c->ops->bytes(c, a ? 1 : 32) + 2 * (per + 1);
		struct rng r = { 43 };
		float *x = xcalloc(n * 64, sizeof *x);

		rng_gaussians(&r, x, n * 64);
		cr_assert_eq(c->ops->encode(c, NULL, n, x, enc), KVP_OK, "%s", kvp_last_error());
		cr_assert_eq(c->ops->check(c, n, enc), KVP_OK, "%s: %s", specs[a], kvp_last_error());
		for (unsigned i = 0; i < 3; i++) {
			memcpy(copy, enc, bytes);
			memcpy(copy + at, &bad[i], 2);
			cr_assert_eq(c->ops->check(c, n, copy), KVP_ECORRUPT, "%s: %#x", specs[a], bad[i]);
			cr_assert(strstr(kvp_last_error(), a ? "token 1, channel group 1" : "group of tokens 1, channel 1"),
				  "%s", kvp_last_error());
		}
		memcpy(copy, enc, bytes);
		memcpy(copy + at - 2 * per, &bad[0], 2); /* a z */
		cr_assert_eq(c->ops->check(c, n, copy), KVP_ECORRUPT, "%s: a NaN z", specs[a]);
		free(x), free(enc), free(copy);
		kvp_codec_free(c);
	}
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

/* ---- the fast encoder and decoder against the scalar reference (codecs/kivi.c) ---- */

/*
 * Gaussian data with the groups the fast paths must not get wrong: constant ones (s = 0), ranges that end
 * on zeros of both signs, ranges below fp16's resolution at a large offset (z rounds past the values, codes
 * clamp), and a range whose s is an fp16 subnormal.
 */
static void awkward_data(struct rng *r, float *x, unsigned n, unsigned d)
{
	rng_gaussians(r, x, (size_t)n * d);
	for (unsigned i = 0; i < n; i++)
		for (unsigned j = 0; j < d; j++) {
			float *v = &x[(size_t)i * d + j];
			switch ((i / 8 + j) % 11) {
			case 0: *v = 0.75f; break;
			case 1: *v = (i + j) % 2 ? -0.0f : 0.0f; break;
			case 2: *v = 1000.4f + (float)((i * 7 + j) % 5) * 0.01f; break;
			case 3: *v = (float)((i + j) % 3) * 1e-6f; break;
			default: break;
			}
		}
}

static void fast_matches_reference(const char *spec, unsigned role, unsigned d, unsigned n)
{
	struct rng r = { 5 + d + n };
	struct kvp_codec *c = open_role(spec, d, role);
	size_t bytes = c->ops->bytes(c, n);
	float *x = xcalloc((size_t)n * d, sizeof *x), *y = xcalloc((size_t)n * d, sizeof *y);
	float *yr = xcalloc((size_t)n * d, sizeof *yr);
	unsigned char *fast = xcalloc(1, bytes), *ref = xcalloc(1, bytes);

	awkward_data(&r, x, n, d);
	memset(fast, 0xa5, bytes); /* every byte must be written */
	cr_assert_eq(c->ops->encode(c, NULL, n, x, fast), KVP_OK, "%s: %s", spec, kvp_last_error());
	cr_assert_eq(kvp_kivi_encode_reference(c, NULL, n, x, ref), KVP_OK, "%s: %s", spec, kvp_last_error());
	for (size_t i = 0; i < bytes; i++)
		cr_assert_eq(fast[i], ref[i], "%s role %u d=%u: byte %zu is %#x, the reference wrote %#x", spec, role, d,
			     i, fast[i], ref[i]);
	cr_assert_eq(c->ops->decode(c, NULL, n, fast, y), KVP_OK);
	cr_assert_eq(kvp_kivi_decode_reference(c, NULL, n, fast, yr), KVP_OK);
	cr_assert(!memcmp(y, yr, sizeof(float) * n * d), "%s role %u d=%u: decode differs from the reference", spec,
		  role, d);
	kvp_codec_free(c);
	free(x), free(y), free(yr), free(fast), free(ref);
}

Test(kivi, fast_encode_and_decode_give_the_reference_bytes_and_floats)
{
	static const unsigned dims[] = { 128, 64, 80, 44, 9, 1 };
	char spec[64];

	for (unsigned b = 1; b <= 4; b++)
		for (unsigned a = 0; a < sizeof dims / sizeof dims[0]; a++) {
			snprintf(spec, sizeof spec, "kivi(bits=%u,group=32)", b);
			fast_matches_reference(spec, KVP_CODEC_KEYS, dims[a], 96);
			fast_matches_reference(spec, KVP_CODEC_VALUES, dims[a], 37);
			snprintf(spec, sizeof spec, "kivi(bits=%u,group=8)", b);
			fast_matches_reference(spec, KVP_CODEC_KEYS, dims[a], 24);
			fast_matches_reference(spec, KVP_CODEC_VALUES, dims[a], 37);
			snprintf(spec, sizeof spec, "kivi(bits=%u,group=40)", b);
			fast_matches_reference(spec, KVP_CODEC_VALUES, dims[a], 5);
		}
}

/* A fault in a key group: the fast encoder reports what the reference reports, for the first faulty group. */
Test(kivi, a_key_group_with_a_fault_is_reported_as_the_reference_reports_it)
{
	static const struct {
		float value;
		const char *says;
	} faults[] = { { INFINITY, "non-finite" }, { NAN, "non-finite" }, { 1e6f, "fp16" } };
	struct kvp_codec *c = open_role("kivi(bits=2,group=8)", 16, KVP_CODEC_KEYS);
	float x[16 * 16] = { 0 };
	unsigned char bytes[1024];

	for (size_t f = 0; f < sizeof faults / sizeof faults[0]; f++) {
		x[8 * 16 + 5] = faults[f].value; /* second group, channel 5 */
		cr_assert_eq(c->ops->encode(c, NULL, 16, x, bytes), KVP_EINVAL);
		cr_assert(strstr(kvp_last_error(), faults[f].says), "%s", kvp_last_error());
		cr_assert_eq(kvp_kivi_encode_reference(c, NULL, 16, x, bytes), KVP_EINVAL);
		cr_assert(strstr(kvp_last_error(), faults[f].says), "%s", kvp_last_error());
	}
	kvp_codec_free(c);
}

/* ---- the group paths against dot and axpy head by head ---- */

/*
 * dot_group and axpy_group for g heads give what dot and axpy give one head at a time, within float
 * rounding (the kernels sum in other orders): 1e-5 of the sum of the terms' magnitudes. Keys per channel
 * take the integer kernel (an int8 query q * s per group on the step max_j |q_j s_j| / 127): their scores
 * may move by half a step per unit of code, step / 2 * sum_j code_jt, more. Values per token take
 * axpy_i16_scaled (each head's w_t s_tg in 12 bits of their largest, step = max / 4095): a channel's sum may
 * move by step / 2 * sum_t code_tj; or, where the kernel table takes them in 8 bits above their least
 * (axpy_u8_scaled, step = (max - least) / 510 on the centred codes 2 code - L), by step / 2 * sum_t |2 code_tj - L|.
 */
static double int8_query_bound(const struct kvp_codec *c, const void *bytes, const float *q, unsigned i)
{
	const unsigned d = c->dim, g = c->group;
	const size_t stride = c->ops->bytes(c, g), row = (stride - 4 * (size_t)d) / g;
	const uint8_t *p = (const uint8_t *)bytes + i / g * stride;
	const unsigned bits = (unsigned)(row * 8 / d);
	double top = 0, codes = 0;

	if (g == 1)
		return 0;
	for (unsigned j = 0; j < d; j++) {
		uint16_t h;
		memcpy(&h, p + 2 * (d + j), sizeof h);
		top = fmax(top, fabs((double)q[j] * kvp_f16_to_f32(h)));
		codes += kvp_column_code(p + 4 * (size_t)d, g, i % g, j, bits);
	}
	return top / 127 / 2 * codes;
}

/* The group= of a kivi spec (32 when it has none). */
static unsigned spec_group(const char *spec)
{
	const char *at = strstr(spec, "group=");

	return at ? (unsigned)atoi(at + 6) : 32;
}

/* Whether the kernel table takes these rows' weights in 8 bits (axpy_u8_scaled), as axpy_group then does (the
 * shape decides, and the weights' signs: the first call's rows stand for all). */
static int weights_take_u8(const struct kvp_codec *c, unsigned gsize, unsigned bits, const void *bytes, unsigned n,
			   const float *w)
{
	const struct kvp_row_runs rows = kvp_one_run(n < KVP_AXPY_I16_ROWS ? n : KVP_AXPY_I16_ROWS, bytes,
						     c->ops->bytes(c, 1), NULL, 0);
	float *scratch = xcalloc(c->acc_dim, sizeof *scratch);
	int took = kvp_kernels()->axpy_u8_scaled(bits, c->dim, gsize, &rows, 1, w, n, scratch, c->acc_dim, NULL);

	free(scratch);
	return took;
}

/* The rounding of one head's weights w_t s_tg by the kernel axpy_group takes: 12 bits of their largest
 * (axpy_i16_scaled, against the codes themselves) or 8 bits above their least (axpy_u8_scaled, against the
 * centred codes 2 code - L). half_step is 0 where there is no such rounding (keys per channel). */
struct weights_rounding {
	unsigned bits, ng;
	int centred;
	double half_step;
};

static struct weights_rounding weights_rounding(const struct kvp_codec *c, unsigned gsize, const void *bytes,
						unsigned n, const float *w)
{
	const unsigned d = c->dim, ng = c->acc_dim - d;
	const size_t stride = c->ops->bytes(c, 1);
	struct weights_rounding r = { .ng = ng };
	double top = 0, lo = INFINITY;

	if (c->group != 1 || ng == 0)
		return r;
	r.bits = (unsigned)((stride - 4 * (size_t)ng) * 8 / d);
	r.centred = weights_take_u8(c, gsize, r.bits, bytes, n, w);
	for (unsigned i = 0; i < n; i++)
		for (unsigned g = 0; g < ng; g++) {
			uint16_t h;
			memcpy(&h, (const uint8_t *)bytes + i * stride + 2 * (ng + g), sizeof h);
			top = fmax(top, fabs((double)w[i] * kvp_f16_to_f32(h)));
			lo = fmin(lo, fabs((double)w[i] * kvp_f16_to_f32(h)));
		}
	r.half_step = r.centred ? (top - lo) / 510 / 2 : top / 4095 / 2;
	return r;
}

/* How far that rounding may move channel j's sum: half a step per unit of each token's integer code. */
static double weights_bound(const struct kvp_codec *c, const struct weights_rounding *r, const void *bytes,
			    unsigned n, unsigned j)
{
	const size_t stride = c->ops->bytes(c, 1);
	double codes = 0;

	if (r->half_step == 0)
		return 0;
	for (unsigned i = 0; i < n; i++) {
		const unsigned code = kvp_row_code((const uint8_t *)bytes + i * stride + 4 * (size_t)r->ng, j, r->bits);

		codes += r->centred ? fabs(2.0 * code - ((1u << r->bits) - 1)) : code;
	}
	return r->half_step * codes;
}

static void group_matches_heads(const char *spec, unsigned role, unsigned d, unsigned n, unsigned g)
{
	struct rng r = { 17 + g };
	struct kvp_codec *c = open_role(spec, d, role);
	const size_t qs = c->qprep_bytes, ad = c->acc_dim;
	float *x = xcalloc((size_t)n * d, sizeof *x), *y = xcalloc((size_t)n * d, sizeof *y);
	float *q = xcalloc((size_t)g * d, sizeof *q), *w = xcalloc((size_t)g * n, sizeof *w);
	float *out = xcalloc((size_t)g * n, sizeof *out), *one = xcalloc(n, sizeof *one);
	float *acc = xcalloc(g * ad, sizeof *acc), *acc1 = xcalloc(ad, sizeof *acc1);
	float *sum = xcalloc(d, sizeof *sum), *sum1 = xcalloc(d, sizeof *sum1);
	char *qprep = xcalloc(g, qs);
	void *bytes = xcalloc(1, c->ops->bytes(c, n));
	struct weights_rounding rounding;

	cr_assert(c->ops->dot_group && c->ops->axpy_group, "kivi offers the group paths");
	rng_gaussians(&r, x, (size_t)n * d);
	rng_gaussians(&r, q, (size_t)g * d);
	for (size_t i = 0; i < (size_t)g * n; i++) /* softmax weights are positive */
		w[i] = (float)rng_uniform(&r);
	cr_assert_eq(c->ops->encode(c, NULL, n, x, bytes), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(c->ops->decode(c, NULL, n, bytes, y), KVP_OK);
	for (unsigned h = 0; h < g; h++)
		c->ops->prepare_query(c, NULL, q + (size_t)h * d, qprep + h * qs);
	c->ops->dot_group(c, NULL, n, bytes, g, qprep, out, n);
	c->ops->axpy_group(c, NULL, n, bytes, g, w, n, acc);
	for (unsigned h = 0; h < g; h++) {
		c->ops->dot(c, NULL, n, bytes, qprep + h * qs, one);
		for (unsigned i = 0; i < n; i++) {
			double mag = 0;
			for (unsigned j = 0; j < d; j++)
				mag += fabs(q[(size_t)h * d + j] * y[(size_t)i * d + j]);
			cr_assert(fabs(out[(size_t)h * n + i] - one[i]) <=
					  1e-5 * mag + 1e-6 + int8_query_bound(c, bytes, q + (size_t)h * d, i),
				  "%s role %u d=%u g=%u head %u token %u: dot_group %.7g, dot %.7g", spec, role, d, g, h, i,
				  out[(size_t)h * n + i], one[i]);
		}
		memset(acc1, 0, ad * sizeof *acc1);
		memset(sum, 0, d * sizeof *sum);
		memset(sum1, 0, d * sizeof *sum1);
		c->ops->axpy(c, NULL, n, bytes, w + (size_t)h * n, acc1);
		c->ops->finish(c, NULL, acc + h * ad, sum);
		c->ops->finish(c, NULL, acc1, sum1);
		rounding = weights_rounding(c, spec_group(spec), bytes, n, w + (size_t)h * n);
		for (unsigned j = 0; j < d; j++) {
			double mag = 0;
			for (unsigned i = 0; i < n; i++)
				mag += fabs(w[(size_t)h * n + i] * y[(size_t)i * d + j]);
			cr_assert(fabs(sum[j] - sum1[j]) <=
					  1e-5 * mag + 1e-6 + weights_bound(c, &rounding, bytes, n, j),
				  "%s role %u d=%u g=%u head %u channel %u: axpy_group %.7g, axpy %.7g", spec, role, d, g, h,
				  j, sum[j], sum1[j]);
		}
	}
	kvp_codec_free(c);
	free(x), free(y), free(q), free(w), free(out), free(one), free(acc), free(acc1), free(sum), free(sum1);
	free(qprep), free(bytes);
}

Test(kivi, group_paths_equal_dot_and_axpy_head_by_head_on_either_axis)
{
	static const unsigned heads[] = { 1, 3, 4, 5, 9 };
	char spec[64];

	for (unsigned b = 1; b <= 4; b++)
		for (size_t a = 0; a < sizeof heads / sizeof heads[0]; a++) {
			snprintf(spec, sizeof spec, "kivi(bits=%u)", b);
			group_matches_heads(spec, KVP_CODEC_KEYS, 128, 160, heads[a]);
			group_matches_heads(spec, KVP_CODEC_VALUES, 128, 200, heads[a]);
			group_matches_heads(spec, KVP_CODEC_VALUES, 80, 7, heads[a]);
			snprintf(spec, sizeof spec, "kivi(bits=%u,group=8,axis=token)", b);
			group_matches_heads(spec, KVP_CODEC_KEYS, 44, 300, heads[a]);
			snprintf(spec, sizeof spec, "kivi(bits=%u,group=16,axis=channel)", b);
			group_matches_heads(spec, KVP_CODEC_VALUES, 48, 48, heads[a]);
		}
}
