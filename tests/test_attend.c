/*
 * Exact attention against a double-precision reference. The error metric is the relative L2 error of
 * each query head's output, ||out - ref|| / ||ref||, and the bound applies to the worst head.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

#include "base/base.h"
#include "kvpager.h"
#include "pager_fixture.h"

struct case_ {
	const char *spec;
	kvp_shape shape;
	uint32_t prefill, decode;
	float q_amplitude;
};

/* Runs prefill + decode appends, then one attend on the last layer, and returns the worst head error. */
static double run_case(const struct case_ *c, int round_inputs_to_fp16)
{
	const kvp_shape *sh = &c->shape;
	uint32_t n = c->prefill + c->decode, d = sh->head_dim, nkv = sh->n_kv_heads, group = sh->n_heads / nkv;
	size_t row = (size_t)nkv * d;
	float *k = malloc(n * row * sizeof *k), *v = malloc(n * row * sizeof *v);
	float *q = malloc(sh->n_heads * d * sizeof *q), *out = malloc(sh->n_heads * d * sizeof *out);
	float *sk = malloc((size_t)n * d * sizeof *sk), *sv = malloc((size_t)n * d * sizeof *sv);
	double *ref = malloc(d * sizeof *ref), worst = 0;
	int32_t *pos = malloc(n * sizeof *pos);
	kvp_pool *p;
	kvp_tenant *t;
	kvp_seq *s;
	uint32_t layer = sh->n_layers - 1;

	fixture_fill(k, n * row, 11, 1);
	fixture_fill(v, n * row, 12, 1);
	fixture_fill(q, sh->n_heads * d, 13, c->q_amplitude);
	for (uint32_t i = 0; i < n; i++)
		pos[i] = (int32_t)i;
	cr_assert_eq(kvp_pool_open("", &p), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(p, "t", c->spec, &t), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_open(t, sh, &s), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_append(s, layer, c->prefill, pos, k, v), KVP_OK, "%s", kvp_last_error());
	for (uint32_t i = c->prefill; i < n; i++)
		cr_assert_eq(kvp_append(s, layer, 1, pos + i, k + i * row, v + i * row), KVP_OK);
	cr_assert_eq(kvp_attend(s, layer, q, out), KVP_OK, "%s", kvp_last_error());

	for (uint32_t g = 0; g < nkv; g++) {
		for (uint32_t i = 0; i < n; i++)
			for (uint32_t j = 0; j < d; j++) {
				float kk = k[i * row + g * d + j], vv = v[i * row + g * d + j];
				if (round_inputs_to_fp16) {
					kk = kvp_f16_to_f32(kvp_f32_to_f16(kk));
					vv = kvp_f16_to_f32(kvp_f32_to_f16(vv));
				}
				sk[(size_t)i * d + j] = kk;
				sv[(size_t)i * d + j] = vv;
			}
		for (uint32_t h = g * group; h < (g + 1) * group; h++) {
			fixture_attend(d, n, sk, sv, q + (size_t)h * d, ref);
			double e = fixture_rel_error(d, out + (size_t)h * d, ref);
			if (e > worst)
				worst = e;
		}
	}
	kvp_pool_close(p);
	free(k), free(v), free(q), free(out), free(sk), free(sv), free(ref), free(pos);
	return worst;
}

Test(attend, fp32_store_matches_double_reference)
{
	struct case_ c = { "block=64,sinks=4", { 2, 8, 2, 64, 1e4f, KVP_ROPE_HALF }, 300, 45, 1.0f };
	double e = run_case(&c, 0);
	cr_log_info("fp32 store, d=64, 345 tokens: worst head relative error %.3g", e);
	cr_assert_lt(e, 1e-5);
}

Test(attend, fp32_store_matches_at_d128_with_gqa_4)
{
	struct case_ c = { "block=32,sinks=0", { 1, 32, 8, 128, 1e4f, KVP_ROPE_HALF }, 1000, 3, 1.0f };
	cr_assert_lt(run_case(&c, 0), 1e-5);
}

Test(attend, fp16_store_matches_reference_on_fp16_inputs)
{
	struct case_ c = { "block=16,sinks=4,store=fp16", { 1, 4, 2, 64, 1e4f, KVP_ROPE_HALF }, 100, 70, 1.0f };
	double e = run_case(&c, 1);
	cr_log_info("fp16 store: worst head relative error %.3g against fp16-rounded inputs", e);
	cr_assert_lt(e, 1e-5);
}

Test(attend, fp16_store_with_wide_groups_matches_reference)
{
	/* six query heads per KV head: one four-head pass of the group kernels plus two single heads;
	 * block=4096 with six heads makes attend take the block in slices */
	struct case_ c = { "block=4096,sinks=4,window=8,store=fp16", { 1, 12, 2, 72, 1e4f, KVP_ROPE_HALF }, 800, 5, 1.0f };
	cr_assert_lt(run_case(&c, 1), 1e-5);
}

Test(attend, large_scores_do_not_overflow)
{
	/* |q.k| / sqrt(d) reaches the hundreds: exp() of raw scores would overflow fp32 */
	struct case_ c = { "block=8,sinks=1", { 1, 2, 1, 32, 1e4f, KVP_ROPE_HALF }, 50, 10, 400.0f };
	cr_assert_lt(run_case(&c, 0), 1e-5);
}

Test(attend, odd_block_sizes_and_single_tokens)
{
	struct case_ c = { "block=7,sinks=3,window=5", { 1, 6, 3, 16, 1e4f, KVP_ROPE_HALF }, 1, 40, 1.0f };
	cr_assert_lt(run_case(&c, 0), 1e-5);
}

Test(attend, each_query_head_reads_its_own_kv_head)
{
	/* KV head g holds value vectors all equal to g+1, so every head of group g must output g+1. */
	kvp_shape sh = { 1, 6, 3, 8, 1e4f, KVP_ROPE_HALF };
	float k[5 * 3 * 8], v[5 * 3 * 8], q[6 * 8], out[6 * 8];
	int32_t pos[5] = { 0, 1, 2, 3, 4 };
	kvp_pool *p;
	kvp_tenant *t;
	kvp_seq *s;
	fixture_fill(k, sizeof k / sizeof *k, 1, 1);
	fixture_fill(q, sizeof q / sizeof *q, 2, 1);
	for (int i = 0; i < 5; i++)
		for (int g = 0; g < 3; g++)
			for (int j = 0; j < 8; j++)
				v[(i * 3 + g) * 8 + j] = (float)(g + 1);
	cr_assert_eq(kvp_pool_open("", &p), KVP_OK);
	cr_assert_eq(kvp_tenant_open(p, "t", "", &t), KVP_OK);
	cr_assert_eq(kvp_seq_open(t, &sh, &s), KVP_OK);
	cr_assert_eq(kvp_append(s, 0, 5, pos, k, v), KVP_OK);
	cr_assert_eq(kvp_attend(s, 0, q, out), KVP_OK);
	for (int h = 0; h < 6; h++)
		for (int j = 0; j < 8; j++)
			cr_assert_float_eq(out[h * 8 + j], (float)(h / 2 + 1), 1e-6, "head %d", h);
	kvp_pool_close(p);
}

Test(attend, an_empty_layer_gives_zeros)
{
	kvp_shape sh = { 2, 2, 1, 8, 1e4f, KVP_ROPE_HALF };
	float q[16], out[16];
	kvp_pool *p;
	kvp_tenant *t;
	kvp_seq *s;
	fixture_fill(q, 16, 1, 1);
	memset(out, 0x7f, sizeof out);
	cr_assert_eq(kvp_pool_open("", &p), KVP_OK);
	cr_assert_eq(kvp_tenant_open(p, "t", "", &t), KVP_OK);
	cr_assert_eq(kvp_seq_open(t, &sh, &s), KVP_OK);
	cr_assert_eq(kvp_attend(s, 1, q, out), KVP_OK);
	for (int j = 0; j < 16; j++)
		cr_assert_eq(out[j], 0.0f);
	kvp_pool_close(p);
}

/* A policy that observes attention has nothing to observe before the first token: zeros, as without one,
 * and the sequence goes on as usual afterwards. */
Test(attend, an_empty_sequence_with_an_observing_policy_gives_zeros)
{
	static const char *const specs[] = {
		"policy=h2o(heavy=0.1,recent=0.1)",
		"policy=triattention(budget=64,stats=online)",
		"gate=entropy,policy=triattention(budget=64,stats=online,select=per_layer_head)",
	};
	kvp_shape sh = { 2, 4, 2, 8, 1e4f, KVP_ROPE_HALF };
	float q[32], out[32], k[3 * 16], v[3 * 16];
	int32_t pos[3] = { 0, 1, 2 };
	fixture_fill(q, 32, 1, 1);
	fixture_fill(k, 3 * 16, 2, 1);
	fixture_fill(v, 3 * 16, 3, 1);
	for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++) {
		kvp_pool *p;
		kvp_tenant *t;
		kvp_seq *s;
		cr_assert_eq(kvp_pool_open("", &p), KVP_OK);
		cr_assert_eq(kvp_tenant_open(p, "t", specs[i], &t), KVP_OK, "%s: %s", specs[i], kvp_last_error());
		cr_assert_eq(kvp_seq_open(t, &sh, &s), KVP_OK);
		for (uint32_t layer = 0; layer < 2; layer++) {
			memset(out, 0x7f, sizeof out);
			cr_assert_eq(kvp_attend(s, layer, q, out), KVP_OK, "%s: %s", specs[i], kvp_last_error());
			for (int j = 0; j < 32; j++)
				cr_assert_eq(out[j], 0.0f, "%s: layer %u", specs[i], layer);
		}
		cr_assert_eq(kvp_seq_step(s), KVP_OK, "%s: %s", specs[i], kvp_last_error());
		cr_assert_eq(kvp_append(s, 0, 3, pos, k, v), KVP_OK, "%s: %s", specs[i], kvp_last_error());
		cr_assert_eq(kvp_attend(s, 0, q, out), KVP_OK, "%s: %s", specs[i], kvp_last_error());
		cr_assert_eq(kvp_attend(s, 1, q, out), KVP_OK, "%s: an empty layer after the first token: %s",
			     specs[i], kvp_last_error());
		for (int j = 0; j < 32; j++)
			cr_assert_eq(out[j], 0.0f, "%s: the empty layer", specs[i]);
		cr_assert_eq(kvp_seq_step(s), KVP_OK, "%s: %s", specs[i], kvp_last_error());
		kvp_pool_close(p);
	}
}

Test(attend, every_kernel_set_gives_the_same_answer)
{
	/* The pager must be right whichever kernels the CPU selects; scalar is the reference. */
	struct case_ c = { "block=64,sinks=4,store=fp16", { 1, 8, 2, 128, 1e4f, KVP_ROPE_HALF }, 200, 1, 1.0f };
	setenv("KVP_KERNELS", "scalar", 1);
	cr_assert_lt(run_case(&c, 1), 1e-5);
}

/* kvp_attend's output on the last of n tokens of fixture data appended to a new sequence under spec. */
static void attend_output(const char *spec, const kvp_shape *sh, uint32_t n, float *out)
{
	const size_t row = (size_t)sh->n_kv_heads * sh->head_dim;
	float *k = malloc(sizeof *k * n * row), *v = malloc(sizeof *v * n * row), *q = malloc(sizeof *q * sh->n_heads * sh->head_dim);
	int32_t *pos = malloc(sizeof *pos * n);
	kvp_pool *p;
	kvp_tenant *t;
	kvp_seq *s;

	fixture_fill(k, n * row, 21, 1);
	fixture_fill(v, n * row, 22, 1);
	fixture_fill(q, sh->n_heads * sh->head_dim, 23, 1);
	for (uint32_t i = 0; i < n; i++)
		pos[i] = (int32_t)i;
	cr_assert_eq(kvp_pool_open("", &p), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(p, "t", spec, &t), KVP_OK, "%s: %s", spec, kvp_last_error());
	cr_assert_eq(kvp_seq_open(t, sh, &s), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_append(s, 0, n, pos, k, v), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_attend(s, 0, q, out), KVP_OK, "%s", kvp_last_error());
	kvp_pool_close(p);
	free(k), free(v), free(q), free(pos);
}

/*
 * Cold blocks that follow each other are read as spans of up to four (one softmax step, one call of the
 * values' kernel with the blocks as runs of rows): sixteen cold blocks of 64 tokens give the very bits of
 * four cold blocks of 256, which are read one at a time. On the scalar table, whose value kernel takes
 * every call (a vector table without one takes 12-bit weights a block at a time instead).
 */
Test(attend, cold_blocks_read_as_spans_give_the_bits_of_blocks_as_long_as_the_span)
{
	static const char *const codecs[] = { "turboquant(bits=2)", "turboquant(bits=3)", "turboquant(bits=4)",
					      "kivi(bits=2)", "kivi(bits=4)" };
	const kvp_shape sh = { 1, 8, 2, 64, 1e4f, KVP_ROPE_HALF };
	float by64[8 * 64], by256[8 * 64];

	setenv("KVP_KERNELS", "scalar", 1);
	for (size_t c = 0; c < sizeof codecs / sizeof codecs[0]; c++) {
		char a[160], b[160];

		snprintf(a, sizeof a, "block=64,sinks=0,window=1,store=fp16,k=%s,v=%s", codecs[c], codecs[c]);
		snprintf(b, sizeof b, "block=256,sinks=0,window=1,store=fp16,k=%s,v=%s", codecs[c], codecs[c]);
		attend_output(a, &sh, 1025, by64);
		attend_output(b, &sh, 1025, by256);
		for (unsigned j = 0; j < 8 * 64; j++)
			cr_assert(!memcmp(by64 + j, by256 + j, sizeof(float)), "%s, output %u: %.9g in spans, %.9g", codecs[c],
				  j, by64[j], by256[j]);
	}
}

/* The worst query head's relative error of out (kvp_attend's on layer 0 for queries q) against exact
 * attention over the vectors the cache holds for its KV head, as kvp_gather returns them (up to cap tokens);
 * *held: the fewest tokens a KV head holds. */
static double worst_head_error(kvp_seq *s, const kvp_shape *sh, uint32_t cap, const float *q, const float *out,
			       uint32_t *held)
{
	const uint32_t d = sh->head_dim, group = sh->n_heads / sh->n_kv_heads;
	float *gk = malloc(sizeof *gk * cap * d), *gv = malloc(sizeof *gv * cap * d);
	double *ref = malloc(sizeof *ref * d), worst = 0;
	int32_t *pos = malloc(sizeof *pos * cap);
	uint32_t n;

	*held = cap;
	for (uint32_t g = 0; g < sh->n_kv_heads; g++) {
		cr_assert_eq(kvp_gather(s, 0, g, cap, pos, gk, gv, &n), KVP_OK, "%s", kvp_last_error());
		*held = n < *held ? n : *held;
		for (uint32_t h = g * group; h < (g + 1) * group; h++) {
			double e;

			fixture_attend(d, n, gk, gv, q + (size_t)h * d, ref);
			e = fixture_rel_error(d, out + (size_t)h * d, ref);
			worst = e > worst ? e : worst;
		}
	}
	free(gk), free(gv), free(ref), free(pos);
	return worst;
}

/*
 * A token policy's rounds leave cold blocks of uneven lengths, which end spans where they grow: attention over
 * them stays within 2e-3 of exact attention over the tokens the cache holds (kvp_gather), on the default
 * kernels. (A span once took a block longer than its first: the values' kernel then read rows past its runs.)
 */
Test(attend, cold_blocks_left_uneven_by_a_policy_are_read_as_shorter_spans)
{
	enum { NKV = 2, NH = 8, D = 64, STEP = 64, STEPS = 40, N = STEP * STEPS };
	static const char spec[] = "block=64,window=64,store=fp16,policy=triattention(budget=640,select=per_layer_head),"
				   "k=turboquant(bits=3),v=turboquant(bits=3)";
	const kvp_shape sh = { 1, NH, NKV, D, 1e4f, KVP_ROPE_HALF };
	float *k = malloc(sizeof *k * N * NKV * D), *v = malloc(sizeof *v * N * NKV * D), q[NH * D], out[NH * D];
	int32_t *pos = malloc(sizeof *pos * N);
	double worst;
	kvp_pool *p;
	kvp_tenant *t;
	kvp_seq *s;
	uint32_t n;

	fixture_fill(k, (size_t)N * NKV * D, 31, 0.5f);
	fixture_fill(v, (size_t)N * NKV * D, 32, 0.5f);
	for (uint32_t i = 0; i < N; i++)
		pos[i] = (int32_t)i;
	cr_assert_eq(kvp_pool_open("", &p), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(p, "t", spec, &t), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_open(t, &sh, &s), KVP_OK, "%s", kvp_last_error());
	for (uint32_t step = 0; step < STEPS; step++) {
		const size_t at = (size_t)step * STEP;

		fixture_fill(q, NH * D, 100 + step, 0.5f);
		cr_assert_eq(kvp_append(s, 0, STEP, pos + at, k + at * NKV * D, v + at * NKV * D), KVP_OK, "%s",
			     kvp_last_error());
		cr_assert_eq(kvp_attend(s, 0, q, out), KVP_OK, "%s", kvp_last_error());
		cr_assert_eq(kvp_seq_step(s), KVP_OK, "%s", kvp_last_error());
	}
	cr_assert_eq(kvp_attend(s, 0, q, out), KVP_OK, "%s", kvp_last_error());
	worst = worst_head_error(s, &sh, N, q, out, &n);
	cr_assert_lt(n, N, "the policy dropped tokens");
	printf("%s, %u of %u tokens held: worst head's relative error %.3g\n", spec, n, N, worst);
	cr_assert_lt(worst, 2e-3, "%s: %.3g", spec, worst);
	kvp_pool_close(p);
	free(k), free(v), free(pos);
}

/* The worst head's relative error of kvp_attend at 32K tokens of the benchmark's data (uniform keys and
 * values, GQA 4) against exact attention over the very vectors the codes decode to, which kvp_gather returns. */
static double error_at_32k(const char *spec, unsigned d)
{
	enum { N = 32768, DMAX = 128, NKV = 8, NH = 32, CHUNK = 1024 };
	const kvp_shape sh = { 1, NH, NKV, d, 10000.0f, KVP_ROPE_HALF };
	float *k = malloc(sizeof *k * CHUNK * NKV * d), *v = malloc(sizeof *v * CHUNK * NKV * d);
	float q[NH * DMAX], out[NH * DMAX];
	int32_t pos[CHUNK];
	double worst;
	kvp_pool *p;
	kvp_tenant *t;
	kvp_seq *s;
	uint32_t n;

	cr_assert_eq(kvp_pool_open("", &p), KVP_OK, "%s", kvp_last_error());
	fixture_fill(q, NH * d, 3, 0.5f);
	cr_assert_eq(kvp_tenant_open(p, "t", spec, &t), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_open(t, &sh, &s), KVP_OK, "%s", kvp_last_error());
	for (uint32_t at = 0; at < N; at += CHUNK) {
		fixture_fill(k, (size_t)CHUNK * NKV * d, 1000 + at, 0.5f);
		fixture_fill(v, (size_t)CHUNK * NKV * d, 2000 + at, 0.5f);
		for (uint32_t i = 0; i < CHUNK; i++)
			pos[i] = (int32_t)(at + i);
		cr_assert_eq(kvp_append(s, 0, CHUNK, pos, k, v), KVP_OK, "%s", kvp_last_error());
	}
	cr_assert_eq(kvp_attend(s, 0, q, out), KVP_OK, "%s", kvp_last_error());
	worst = worst_head_error(s, &sh, N, q, out, &n);
	cr_assert_eq(n, N);
	printf("%s, d=%u, at %u tokens: worst head's relative error %.3g against its decoded codes\n", spec, d, N,
	       worst);
	kvp_tenant_close(t);
	kvp_pool_close(p);
	free(k), free(v);
	return worst;
}

/*
 * Cold blocks are read by the codecs' integer group paths (kernels.h: an int8 query, 12-bit weights): at
 * 32K tokens of the benchmark's data (d=128, GQA 4) TurboQuant's attention stays within 2e-3 of exact
 * attention over the very vectors its codes decode to.
 */
Test(attend, turboquant_at_32k_tokens_is_within_2e_3_of_attention_over_its_decoded_codes)
{
	for (unsigned bits = 2; bits <= 4; bits++) {
		char spec[128];
		double worst;

		snprintf(spec, sizeof spec, "block=64,window=64,store=fp16,k=turboquant(bits=%u),v=turboquant(bits=%u)",
			 bits, bits);
		worst = error_at_32k(spec, 128);
		cr_assert_lt(worst, 2e-3, "turboquant(bits=%u): %.3g", bits, worst);
	}
}

/* SparK keys over TurboQuant codes are scored by spark_dot_i16_group with quantize=kept (an int16 query, the
 * pruned values on the kept values' integer grid), and in the default, rotated, by lut_dot_i8_group over
 * their code rows (an int8 query, as TurboQuant's): the same bound, at d=128 and d=64. */
Test(attend, spark_at_32k_tokens_is_within_2e_3_of_attention_over_its_decoded_codes)
{
	static const char *const specs[] = {
		"block=64,window=64,store=fp16,k=spark(keep=0.5,quantize=kept)|turboquant(bits=3),v=turboquant(bits=3)",
		"block=64,window=64,store=fp16,k=spark(keep=0.5)|turboquant(bits=3),v=turboquant(bits=3)", /* rotated */
	};

	for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++)
		for (unsigned d = 128; d >= 64; d /= 2) {
			double worst = error_at_32k(specs[i], d);
			cr_assert_lt(worst, 2e-3, "%s, d=%u: %.3g", specs[i], d, worst);
		}
}

/*
 * KIVI's keys are scored by dot_i8_scaled (an int8 query q * s per group of 32 tokens): at 32K tokens of the
 * benchmark's data its attention stays within 2e-3 of exact attention over its decoded codes too.
 */
Test(attend, kivi_at_32k_tokens_is_within_2e_3_of_attention_over_its_decoded_codes)
{
	for (unsigned bits = 2; bits <= 4; bits += 2) {
		char spec[128];
		double worst;

		snprintf(spec, sizeof spec, "block=64,window=64,store=fp16,k=kivi(bits=%u),v=kivi(bits=%u)", bits, bits);
		worst = error_at_32k(spec, 128);
		cr_assert_lt(worst, 2e-3, "kivi(bits=%u): %.3g", bits, worst);
	}
}
