/*
 * The codec registry and the public kvp_codec_* calls: lookup and parsing of specs and stacks, the rules
 * for bad specs (KVP_EINVAL and a message quoting the text), fp32 and fp16 as codecs, and every codec's
 * public dot against its own decode.
 */
#include <stdio.h>

#include "codec_fixture.h"
#include "memory_fixture.h"

static const char *const every_codec[] = {
	"fp32", "fp16", "turboquant(bits=1)", "turboquant(bits=2)", "turboquant(bits=3)", "turboquant(bits=4)",
	"turboquant(bits=3,qjl=1)", "turboquant(bits=2,outliers=32,outlier_bits=3)", "kivi(bits=2)", "kivi(bits=4)",
	"spark(keep=0.5)", "spark(keep=0.75)|turboquant(bits=3)",
};
#define N_CODECS (sizeof every_codec / sizeof every_codec[0])

Test(codec, every_registered_codec_opens_with_its_name_and_group)
{
	for (size_t i = 0; i < N_CODECS; i++) {
		kvp_codec *c = codec_open(every_codec[i], 128);
		size_t nlen = strcspn(every_codec[i], "(|");

		cr_assert(!strncmp(c->ops->name, every_codec[i], nlen) && c->ops->name[nlen] == '\0', "%s opened %s",
			  every_codec[i], c->ops->name);
		cr_assert_eq(kvp_codec_group(c), strncmp(every_codec[i], "kivi", 4) ? 1u : 32u, "%s", every_codec[i]);
		kvp_codec_close(c);
	}
}

Test(codec, public_dot_equals_the_inner_product_with_decoded_vectors_for_every_codec)
{
	const unsigned d = 128, n = 64;
	struct rng r = { 12 };
	float *x = xcalloc((size_t)n * d, sizeof *x), *y = xcalloc((size_t)n * d, sizeof *y), q[128], out[64];

	rng_gaussians(&r, x, (size_t)n * d);
	rng_gaussians(&r, q, d);
	for (size_t k = 0; k < N_CODECS; k++) {
		kvp_codec *c = codec_open(every_codec[k], d);
		void *bytes = xcalloc(1, kvp_codec_bytes(c, n));

		cr_assert_eq(kvp_codec_encode(c, n, x, bytes), KVP_OK, "%s: %s", every_codec[k], kvp_last_error());
		cr_assert_eq(kvp_codec_decode(c, n, bytes, y), KVP_OK);
		cr_assert_eq(kvp_codec_dot(c, n, bytes, q, out), KVP_OK);
		for (unsigned i = 0; i < n; i++) {
			double want = dot_d(q, y + (size_t)i * d, d);
			cr_assert(fabs(out[i] - want) <= 1e-4 * (1 + fabs(want)), "%s token %u: %g, decoded %g",
				  every_codec[k], i, out[i], want);
		}
		kvp_codec_close(c);
		free(bytes);
	}
	free(x);
	free(y);
}

Test(codec, fp32_is_exact_and_fp16_rounds_each_value_to_nearest_even)
{
	const unsigned d = 37, n = 5;
	struct rng r = { 13 };
	float x[37 * 5], y[37 * 5];
	unsigned char bytes[4 * 37 * 5];
	kvp_codec *f32 = codec_open("fp32", d), *f16 = codec_open("fp16", d);

	rng_gaussians(&r, x, (size_t)n * d);
	cr_assert_eq(kvp_codec_bytes(f32, n), 4u * d * n);
	cr_assert_eq(kvp_codec_bytes(f16, n), 2u * d * n);
	cr_assert_eq(kvp_codec_encode(f32, n, x, bytes), KVP_OK);
	cr_assert_eq(kvp_codec_decode(f32, n, bytes, y), KVP_OK);
	cr_assert(!memcmp(x, y, sizeof x));
	cr_assert_eq(kvp_codec_encode(f16, n, x, bytes), KVP_OK);
	cr_assert_eq(kvp_codec_decode(f16, n, bytes, y), KVP_OK);
	for (unsigned i = 0; i < n * d; i++)
		cr_assert_eq(y[i], kvp_f16_to_f32(kvp_f32_to_f16(x[i])));
	kvp_codec_close(f32);
	kvp_codec_close(f16);
}

/* The dense kernels need aligned rows; a block at an odd address takes the byte-wise path, same result. */
Test(codec, fp32_and_fp16_dot_agree_on_aligned_and_unaligned_bytes)
{
	static const char *const specs[] = { "fp32", "fp16" };
	const unsigned d = 40, n = 9;
	struct rng r = { 14 };
	float x[40 * 9], q[40], a[9], b[9];
	unsigned char *buf = xcalloc(1, 4 * 40 * 9 + 8);

	rng_gaussians(&r, x, (size_t)n * d);
	rng_gaussians(&r, q, d);
	for (int k = 0; k < 2; k++) {
		kvp_codec *c = codec_open(specs[k], d);
		size_t len = kvp_codec_bytes(c, n);

		cr_assert_eq(kvp_codec_encode(c, n, x, buf + 4), KVP_OK);
		cr_assert_eq(kvp_codec_dot(c, n, buf + 4, q, a), KVP_OK);
		memmove(buf + 1, buf + 4, len);
		cr_assert_eq(kvp_codec_dot(c, n, buf + 1, q, b), KVP_OK);
		for (unsigned i = 0; i < n; i++)
			cr_assert(fabsf(a[i] - b[i]) <= 1e-5f * (1 + fabsf(a[i])), "%s token %u: %g vs %g", specs[k], i,
				  a[i], b[i]);
		kvp_codec_close(c);
	}
	free(buf);
}

Test(codec, bad_specs_are_einval_with_a_message_quoting_the_text)
{
	expect_rejected("zstd", 128, "zstd");
	expect_rejected("turboquant(bits=7)", 128, "bits=7");
	expect_rejected("spark(keep=2)", 128, "keep=2");
	expect_rejected("turboquant(bits=3,flavour=x)", 128, "flavour");
	expect_rejected("fp16(bits=3)", 128, "bits");
	expect_rejected("fp16|turboquant(bits=3)", 128, "fp16");
	expect_rejected("spark(keep=0.5)|kivi(bits=2)", 128, "kivi");
	expect_rejected("turboquant(bits=3", 128, "turboquant(bits=3");
	expect_rejected("turboquant(bits=3))", 128, "turboquant(bits=3))");
	expect_rejected("spark(keep=0.5)|", 128, "spark(keep=0.5)|");
	expect_rejected("", 128, "empty");
	expect_rejected("spark|spark|spark|spark|fp16", 128, "more than");
}

/* Rounding n up to whole groups happens in 64 bits: UINT32_MAX tokens of kivi's 32-token groups are 2^27
 * groups, not the 0 bytes a 32-bit round-up wrapped to. */
Test(codec, bytes_of_the_largest_n_are_whole_groups_without_wrapping)
{
	for (size_t i = 0; i < N_CODECS; i++) {
		kvp_codec *c = codec_open(every_codec[i], 128);
		uint64_t group = kvp_codec_group(c), one = kvp_codec_bytes(c, (uint32_t)group);
		uint64_t want = ((uint64_t)UINT32_MAX + group - 1) / group * one;

		cr_assert_gt(one, 0, "%s", every_codec[i]);
		cr_assert_eq(kvp_codec_bytes(c, UINT32_MAX), want > SIZE_MAX ? SIZE_MAX : (size_t)want, "%s",
			     every_codec[i]);
		cr_assert_eq(kvp_codec_bytes(c, 1), (size_t)one, "%s: one token takes a whole group", every_codec[i]);
		kvp_codec_close(c);
	}
}

Test(codec, bad_calls_are_einval_not_crashes)
{
	kvp_codec *c = NULL;
	float x[64] = { 0 }, out[1];
	unsigned char bytes[512];

	cr_assert_eq(kvp_codec_open(NULL, 64, &c), KVP_EINVAL);
	cr_assert_eq(kvp_codec_open("fp16", 64, NULL), KVP_EINVAL);
	cr_assert_eq(kvp_codec_open("fp16", 0, &c), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "dim=0"), "%s", kvp_last_error());
	cr_assert_eq(kvp_codec_open("fp16", KVP_CODEC_DIM_MAX + 1, &c), KVP_EINVAL);
	cr_assert_eq(kvp_codec_open("turboquant(bits=3)", 1, &c), KVP_EINVAL);
	cr_assert_null(c);
	c = codec_open("turboquant(bits=3,outliers=8)", 64);
	cr_assert_eq(kvp_codec_decode(c, 1, bytes, x), KVP_EINVAL, "decode before the context is fitted");
	cr_assert_eq(kvp_codec_dot(c, 1, bytes, x, out), KVP_EINVAL);
	cr_assert_eq(kvp_codec_encode(c, 1, NULL, bytes), KVP_EINVAL);
	cr_assert_eq(kvp_codec_encode(c, 1, x, NULL), KVP_EINVAL);
	cr_assert_eq(kvp_codec_encode(NULL, 1, x, bytes), KVP_EINVAL);
	cr_assert_eq(kvp_codec_encode(c, 0, NULL, NULL), KVP_OK, "nothing to do is not an error");
	cr_assert_eq(kvp_codec_bytes(NULL, 3), 0);
	cr_assert_eq(kvp_codec_group(NULL), 0);
	kvp_codec_close(c);
	kvp_codec_close(NULL);
}

/* Bytes no encoder writes (here all 0xff: NaN norms and scales, full masks) are refused by the public
 * decode and dot of every codec that has a check, with nothing written to the output (SparK's context is
 * fitted by a first encode). */
Test(codec, public_decode_and_dot_refuse_bytes_no_encoder_writes)
{
	static const char *const specs[] = { "turboquant(bits=3)", "kivi(bits=2)", "spark(keep=0.5)",
					     "spark(keep=0.5)|turboquant(bits=3)" };
	float x[32 * 64], q[64] = { 0 }, out[32];
	unsigned char bytes[32 * 256];

	for (unsigned i = 0; i < sizeof specs / sizeof specs[0]; i++) {
		kvp_codec *c = codec_open(specs[i], 64);
		cr_assert_leq(kvp_codec_bytes(c, 32), sizeof bytes);
		for (unsigned j = 0; j < 32 * 64; j++)
			x[j] = sinf((float)j);
		cr_assert_eq(kvp_codec_encode(c, 32, x, bytes), KVP_OK, "%s fits its context", specs[i]);
		memset(bytes, 0xff, sizeof bytes);
		x[0] = out[0] = 7.0f;
		cr_assert_eq(kvp_codec_decode(c, 32, bytes, x), KVP_ECORRUPT, "%s", specs[i]);
		cr_assert(strstr(kvp_last_error(), "kvp_codec_decode: ") && strstr(kvp_last_error(), "nan"), "%s",
			  kvp_last_error());
		cr_assert_eq(kvp_codec_dot(c, 32, bytes, q, out), KVP_ECORRUPT, "%s", specs[i]);
		cr_assert(x[0] == 7.0f && out[0] == 7.0f, "%s: nothing written", specs[i]);
		kvp_codec_close(c);
	}
	kvp_codec *fp16 = codec_open("fp16", 64);
	cr_assert_eq(kvp_codec_decode(fp16, 32, bytes, x), KVP_OK, "fp16 holds any bits (infinities, NaN) as stored");
	kvp_codec_close(fp16);
}

/* fp16 and fp32 refuse what they could not hold as a finite number, naming the token and channel, and write
 * nothing; 65504, fp16's largest, and what rounds to it are held. */
Test(codec, the_dense_codecs_refuse_values_they_cannot_hold_finite)
{
	static const struct {
		const char *spec;
		float bad;
	} cases[] = { { "fp16", INFINITY }, { "fp16", NAN }, { "fp16", 65520.0f }, { "fp16", -1e6f },
		      { "fp32", INFINITY }, { "fp32", -INFINITY }, { "fp32", NAN } };
	float x[4 * 8];
	unsigned char bytes[4 * 8 * 4];

	for (unsigned i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		kvp_codec *c = codec_open(cases[i].spec, 8);

		for (unsigned j = 0; j < 4 * 8; j++)
			x[j] = (float)j - 16.0f;
		x[3] = 65504.0f, x[4] = -65519.0f; /* the largest, and what rounds to it */
		cr_assert_eq(kvp_codec_encode(c, 4, x, bytes), KVP_OK, "%s: %s", cases[i].spec, kvp_last_error());
		x[2 * 8 + 5] = cases[i].bad;
		memset(bytes, 0xa5, sizeof bytes);
		cr_assert_eq(kvp_codec_encode(c, 4, x, bytes), KVP_EINVAL, "%s takes %g", cases[i].spec, (double)cases[i].bad);
		cr_assert(strstr(kvp_last_error(), "token 2, channel 5"), "%s", kvp_last_error());
		for (unsigned j = 0; j < sizeof bytes; j++)
			cr_assert_eq(bytes[j], 0xa5, "%s: byte %u written", cases[i].spec, j);
		kvp_codec_close(c);
	}
}

/* The codes and the floats of a call must not overlap (decoding in place would read codes already
 * overwritten by floats). */
Test(codec, codes_and_floats_that_overlap_are_refused)
{
	kvp_codec *c = codec_open("turboquant(bits=4)", 64);
	float x[4 * 64], out[4];
	unsigned char *codes = (unsigned char *)x;

	for (unsigned j = 0; j < 4 * 64; j++)
		x[j] = sinf((float)j);
	cr_assert_eq(kvp_codec_encode(c, 2, x, codes), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "kvp_codec_encode: the codes and the floats overlap"), "%s", kvp_last_error());
	cr_assert_eq(kvp_codec_encode(c, 2, x, codes + 2 * 64 * sizeof(float)), KVP_OK, "adjacent: %s", kvp_last_error());
	cr_assert_eq(kvp_codec_decode(c, 2, codes + 2 * 64 * sizeof(float), x + 2 * 64 + 1), KVP_EINVAL);
	cr_assert_eq(kvp_codec_dot(c, 2, codes + 2 * 64 * sizeof(float), x, x + 2 * 64 + 3), KVP_EINVAL);
	cr_assert_eq(kvp_codec_dot(c, 2, codes + 2 * 64 * sizeof(float), x, out), KVP_OK, "%s", kvp_last_error());
	kvp_codec_close(c);
}

/* kvp_codec_parse_role: the pager parses v= for values, so kivi quantizes them per token there. */
Test(codec, role_picks_kivi_axis_and_stacks_carry_it_inward)
{
	struct kvp_codec *k = NULL, *v = NULL;

	cr_assert_eq(kvp_codec_parse_role("spark(keep=0.5)|kivi(bits=2)", 28, 64, KVP_CODEC_VALUES, &v), KVP_OK, "%s",
		     kvp_last_error());
	cr_assert_eq(v->inner->group, 1);
	cr_assert_eq(v->inner->dim, 32);
	cr_assert_eq(kvp_codec_parse_role("kivi(bits=2)", 12, 64, KVP_CODEC_KEYS, &k), KVP_OK);
	cr_assert_eq(k->group, 32);
	kvp_codec_free(k);
	cr_assert_eq(kvp_codec_parse_role("fp16", 4, 64, 7, &k), KVP_EINVAL);
	kvp_codec_free(v);
}

/*
 * A codec's struct, configuration and tables come from the allocator it is parsed with (the pager's
 * charges the sequence's tenant). Every byte comes back at free, and a budget too small for them refuses
 * the parse with KVP_ENOMEM and leaves nothing held.
 */
Test(codec, tables_come_from_the_allocator_and_all_of_them_come_back)
{
	static const char *const specs[] = {
		"fp16", "kivi(bits=2)", "turboquant(bits=3,qjl=1,outliers=8)", "spark(keep=0.5)|turboquant(bits=3,qjl=1)",
	};

	for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++) {
		struct fixture_memory mem;
		struct kvp_codec *c = NULL;
		size_t held;

		fixture_memory_init(&mem, 1 << 20);
		cr_assert_eq(kvp_codec_parse_in(specs[i], strlen(specs[i]), 64, KVP_CODEC_VALUES, &mem.ops, &c), KVP_OK,
			     "%s: %s", specs[i], kvp_last_error());
		held = mem.held;
		cr_assert_gt(held, 0, "%s", specs[i]);
		kvp_codec_free(c);
		cr_assert_eq(mem.held, 0, "%s: %zu bytes not given back", specs[i], mem.held);
		fixture_memory_init(&mem, held - 1);
		cr_assert_eq(kvp_codec_parse_in(specs[i], strlen(specs[i]), 64, KVP_CODEC_VALUES, &mem.ops, &c),
			     KVP_ENOMEM, "%s", specs[i]);
		cr_assert_eq(mem.held, 0, "%s: a refused parse left %zu bytes held", specs[i], mem.held);
	}
}

/* Capabilities are in the ops rows: every codec that says it takes bits offers with_bits, and the
 * messages' lists are written from the table. */
Test(codec, the_registry_lists_codecs_by_what_their_ops_rows_say)
{
	const struct kvp_codec_ops *const all[] = {
		&kvp_codec_fp32, &kvp_codec_fp16, &kvp_codec_turboquant, &kvp_codec_kivi, &kvp_codec_spark,
	};
	char names[128];
	struct kvp_codec *c = NULL;

	for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
		cr_assert_eq(!!(all[i]->flags & KVP_CODEC_BITS), all[i]->with_bits != NULL, "%s", all[i]->name);
	kvp_codec_names(KVP_CODEC_BITS, names, sizeof names);
	cr_assert_str_eq(names, "turboquant, kivi");
	kvp_codec_names(KVP_CODEC_STACKS, names, sizeof names);
	cr_assert_str_eq(names, "spark");
	cr_assert_eq(kvp_codec_parse("fp8", 3, 64, &c), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "(known: fp32, fp16, turboquant, kivi, spark)"), "%s", kvp_last_error());
	cr_assert_eq(kvp_codec_parse("fp16|fp32", 9, 64, &c), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "codecs that stack: spark"), "%s", kvp_last_error());
}

/* Encodes n vectors with a context of its own, fitted on them. */
static void encode_fitted(const struct kvp_codec *c, unsigned n, const float *x, uint8_t *dst)
{
	void *ctx = c->ctx_bytes ? calloc(1, c->ctx_bytes) : NULL;

	memset(dst, 0, c->ops->bytes(c, n));
	if (c->ops->fit)
		cr_assert_eq(c->ops->fit(c, ctx, n, x, 0, NULL), KVP_OK);
	cr_assert_eq(c->ops->encode(c, ctx, n, x, dst), KVP_OK);
	free(ctx);
}

/* A spec parsed once opens as often as needed, and at a bit width: the members that take bits get it
 * through with_bits, the others stay as written, and the result is the codec of the rewritten text. */
Test(codec, a_parsed_spec_opens_at_any_width_as_its_rewritten_text_would)
{
	const char *text = "spark(keep=0.5)|turboquant(qjl=1,bits=3)";
	struct kvp_codec_spec *spec;
	struct kvp_codec *a = NULL, *b = NULL, *same = NULL;
	char written[128];
	float x[32 * 64];
	uint8_t ea[4096], eb[4096];

	for (size_t i = 0; i < sizeof x / sizeof x[0]; i++)
		x[i] = sinf(0.37f * (float)i) + 0.01f * (float)(i % 7);
	cr_assert_eq(kvp_codec_spec_parse(text, strlen(text), &spec), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_codec_spec_bits_members(spec), 1);
	cr_assert_eq(kvp_codec_spec_write(spec, 2, written, sizeof written), KVP_OK);
	cr_assert_str_eq(written, "spark(keep=0.5)|turboquant(bits=2,qjl=1)");
	cr_assert_eq(kvp_codec_spec_write(spec, 2, written, 20), KVP_EINVAL);
	cr_assert_eq(kvp_codec_spec_open(spec, 2, 64, KVP_CODEC_KEYS, &kvp_heap, &a), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_codec_parse("spark(keep=0.5)|turboquant(bits=2,qjl=1)", 40, 64, &b), KVP_OK);
	cr_assert_eq(a->ops->bytes(a, 32), b->ops->bytes(b, 32));
	cr_assert_lt(a->ops->bytes(a, 32), sizeof ea);
	cr_assert_eq(kvp_codec_spec_open(spec, 0, 64, KVP_CODEC_KEYS, &kvp_heap, &same), KVP_OK);
	cr_assert_gt(same->ops->bytes(same, 32), a->ops->bytes(a, 32), "bits=3 as written takes more room than 2");
	encode_fitted(a, 32, x, ea);
	encode_fitted(b, 32, x, eb);
	cr_assert_eq(memcmp(ea, eb, a->ops->bytes(a, 32)), 0);
	kvp_codec_free(a);
	kvp_codec_free(b);
	kvp_codec_free(same);
	cr_assert_eq(kvp_codec_spec_open(spec, 7, 64, KVP_CODEC_KEYS, &kvp_heap, &a), KVP_EINVAL);
	cr_assert_null(a);
	cr_assert(strstr(kvp_last_error(), "codec 'spark(keep=0.5)|turboquant(bits=7,qjl=1)'") &&
		  strstr(kvp_last_error(), "bits=7 is outside 1..4"), "%s", kvp_last_error());
	kvp_codec_spec_free(spec);
	cr_assert_eq(kvp_codec_spec_parse("nosuch(bits=2)", 14, &spec), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "nosuch"), "%s", kvp_last_error());
}
