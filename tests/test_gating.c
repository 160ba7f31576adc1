/*
 * Suite gating: coherence gating in the pager (gate=, ladder=, kvp_seq_levels / kvp_seq_set_level).
 * KV head 0 attends sharply (one key points along the query), KV head 1 diffusely (all keys zero, so
 * its softmax is uniform). Gating moves budget from head 0 to head 1 with the total conserved; with a
 * ladder head 0's cold blocks take fewer bits, and every block still decodes with its own codecs.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvpager.h"
#include "pager/pager.h"
#include "pager_fixture.h"

#define D 32
#define NKV 2
#define NH 4
#define GROUP (NH / NKV)
#define ROW (NKV * D)
#define MAXT 512
#define BUDGET 64
#define SHARP 40 /* the position head 0's queries find */

#define POLICY "policy=triattention(budget=64,every=16,stats=online,select=per_layer_head,pin_prompt=0)"

struct cache {
	kvp_pool *pool;
	kvp_tenant *tenant;
	kvp_seq *seq;
	uint32_t t;
};

static float k_all[MAXT * ROW], v_all[MAXT * ROW], q[NH * D];

/* Head 0: small random keys and one large key along the query; head 1: zero keys (uniform softmax). */
static void tokens(void)
{
	fixture_fill(k_all, MAXT * ROW, 1, 0.1f);
	fixture_fill(v_all, MAXT * ROW, 2, 1.0f);
	fixture_fill(q, NH * D, 3, 1.0f);
	for (uint32_t t = 0; t < MAXT; t++)
		memset(k_all + (size_t)t * ROW + D, 0, D * sizeof(float));
	for (uint32_t j = 0; j < D; j++) /* both query heads of group 0 share q[0]'s direction */
		q[D + j] = q[j];
	for (uint32_t j = 0; j < D; j++)
		k_all[(size_t)SHARP * ROW + j] = 8.0f * q[j];
}

static void cache_open(struct cache *c, const char *spec)
{
	const kvp_shape sh = { 1, NH, NKV, D, 1e4f, KVP_ROPE_HALF };

	memset(c, 0, sizeof *c);
	cr_assert_eq(kvp_pool_open("mem=256MiB", &c->pool), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(c->pool, "gating", spec, &c->tenant), KVP_OK, "%s: %s", spec, kvp_last_error());
	cr_assert_eq(kvp_seq_open(c->tenant, &sh, &c->seq), KVP_OK, "%s", kvp_last_error());
}

static void append(struct cache *c, uint32_t n)
{
	int32_t pos[MAXT];

	for (uint32_t i = 0; i < n; i++)
		pos[i] = (int32_t)(c->t + i);
	cr_assert_eq(kvp_append(c->seq, 0, n, pos, k_all + (size_t)c->t * ROW, v_all + (size_t)c->t * ROW), KVP_OK,
		     "%s", kvp_last_error());
	c->t += n;
}

static void attend(struct cache *c, int times)
{
	float out[NH * D];

	for (int i = 0; i < times; i++)
		cr_assert_eq(kvp_attend(c->seq, 0, q, out), KVP_OK, "%s", kvp_last_error());
}

static uint32_t held(struct cache *c, uint32_t kv_head)
{
	uint32_t n = 0;

	cr_assert_eq(kvp_gather(c->seq, 0, kv_head, MAXT, NULL, NULL, NULL, &n), KVP_OK, "%s", kvp_last_error());
	return n;
}

static kvp_level level_of(struct cache *c, uint32_t kv_head)
{
	kvp_level l = { .size = sizeof l };

	cr_assert_eq(kvp_seq_levels(c->seq, 0, kv_head, &l), KVP_OK, "%s", kvp_last_error());
	return l;
}

Test(gating, entropy_moves_budget_to_the_diffuse_head_and_conserves_the_total)
{
	struct cache c;
	kvp_level l0, l1;

	tokens();
	cache_open(&c, "block=8,sinks=4,window=16,gate=entropy," POLICY);
	append(&c, 200);
	attend(&c, 3);
	cr_assert_eq(kvp_seq_step(c.seq), KVP_OK, "%s", kvp_last_error());
	l0 = level_of(&c, 0), l1 = level_of(&c, 1);
	cr_assert_gt(l0.coherence, 0.5, "head 0 attends one token: coherence %g", l0.coherence);
	cr_assert_float_eq(l1.coherence, 0.0, 1e-6, "head 1 attends uniformly: coherence %g", l1.coherence);
	cr_assert_eq(l0.budget + l1.budget, 2 * BUDGET, "the total is conserved: %u + %u", l0.budget, l1.budget);
	cr_assert_gt(l1.budget, l0.budget, "the higher-entropy head gets more: %u vs %u", l1.budget, l0.budget);
	/* shares 1 - a/2 with a = coherence; above the floors of 20 protected tokens each, head 0 gets
	 * 88 (1 - c0/2) / (2 - c0/2), rounded by largest remainder */
	cr_assert_leq(fabs(l0.budget - 20 - 88.0 * (1 - l0.coherence / 2) / (2 - l0.coherence / 2)), 1.0);
	cr_assert_float_eq(l0.aggressiveness, l0.coherence, 1e-12);
	cr_assert_eq(held(&c, 0), l0.budget, "a round keeps the head's own budget");
	cr_assert_eq(held(&c, 1), l1.budget);
	cr_assert_eq(l0.n_levels, 1);
	cr_assert_eq(l0.bits, 0);
	kvp_pool_close(c.pool);
}

Test(gating, an_override_sticks_and_changes_what_a_round_keeps)
{
	struct cache c, plain;
	kvp_level set = { .size = sizeof set, .overridden = 1, .aggressiveness = 1.0 }, l0, l1;

	tokens();
	cache_open(&c, "block=8,sinks=4,window=16,gate=entropy," POLICY);
	cache_open(&plain, "block=8,sinks=4,window=16,gate=entropy," POLICY);
	append(&c, 200);
	append(&plain, 200);
	/* no attention observed: both heads look diffuse (coherence 0) and would split evenly */
	cr_assert_eq(kvp_seq_set_level(c.seq, 0, 1, &set), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_step(c.seq), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_step(plain.seq), KVP_OK, "%s", kvp_last_error());
	l0 = level_of(&c, 0), l1 = level_of(&c, 1);
	cr_assert_eq(l1.overridden, 1);
	cr_assert_float_eq(l1.aggressiveness, 1.0, 0);
	/* shares 1 and 0.5: the 128 - 2 x 20 protected above the floors split 88 x (2/3, 1/3) */
	cr_assert_eq(l0.budget, 20 + 59);
	cr_assert_eq(l1.budget, 20 + 29);
	cr_assert_eq(held(&c, 0), 79);
	cr_assert_eq(held(&c, 1), 49);
	cr_assert_eq(held(&plain, 0), BUDGET);
	cr_assert_eq(held(&plain, 1), BUDGET, "without the override the head keeps the plain budget");
	/* it holds through further rounds, until released */
	append(&c, 40);
	cr_assert_eq(kvp_seq_step(c.seq), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(level_of(&c, 1).overridden, 1);
	cr_assert_eq(held(&c, 1), 49);
	set.overridden = 0;
	cr_assert_eq(kvp_seq_set_level(c.seq, 0, 1, &set), KVP_OK, "%s", kvp_last_error());
	l1 = level_of(&c, 1);
	cr_assert_eq(l1.overridden, 0);
	cr_assert_float_eq(l1.aggressiveness, 0.0, 0);
	kvp_pool_close(c.pool);
	kvp_pool_close(plain.pool);
}

Test(gating, bad_levels_and_gate_off_are_refused_and_change_nothing)
{
	struct cache c, off;
	kvp_level set = { .size = sizeof set, .overridden = 1, .aggressiveness = 1.5 }, small = { .size = 4 };

	tokens();
	cache_open(&c, "block=8,sinks=4,window=16,gate=entropy," POLICY);
	cache_open(&off, "block=8,sinks=4,window=16," POLICY);
	cr_assert_eq(kvp_seq_set_level(c.seq, 0, 1, &set), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "1.5"), "%s", kvp_last_error());
	cr_assert_eq(level_of(&c, 1).overridden, 0, "nothing half-applied");
	set.aggressiveness = 0.5;
	cr_assert_eq(kvp_seq_set_level(c.seq, 0, 2, &set), KVP_EINVAL);
	cr_assert_eq(kvp_seq_set_level(c.seq, 1, 0, &set), KVP_EINVAL);
	cr_assert_eq(kvp_seq_levels(c.seq, 0, 0, &small), KVP_EABI);
	cr_assert_eq(kvp_seq_levels(off.seq, 0, 0, &set), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "gate=off"), "%s", kvp_last_error());
	kvp_pool_close(c.pool);
	kvp_pool_close(off.pool);
}

/* kvp_attend against attention over what kvp_gather decodes, per query head (relative error). */
static double attend_vs_gather(struct cache *c)
{
	static int32_t pos[MAXT];
	static float k[MAXT * D], v[MAXT * D];
	float out[NH * D];
	double ref[D], worst = 0;

	cr_assert_eq(kvp_attend(c->seq, 0, q, out), KVP_OK, "%s", kvp_last_error());
	for (uint32_t g = 0; g < NKV; g++) {
		uint32_t n;
		cr_assert_eq(kvp_gather(c->seq, 0, g, MAXT, pos, k, v, &n), KVP_OK, "%s", kvp_last_error());
		for (uint32_t h = g * GROUP; h < (g + 1) * GROUP; h++) {
			fixture_attend(D, n, k, v, q + h * D, ref);
			double e = fixture_rel_error(D, out + h * D, ref);
			worst = e > worst ? e : worst;
		}
	}
	return worst;
}

/* Largest relative error of a decoded value row against the appended one, over one stream. */
static double value_error(struct cache *c, uint32_t kv_head)
{
	static int32_t pos[MAXT];
	static float v[MAXT * D];
	double worst = 0;
	uint32_t n;

	cr_assert_eq(kvp_gather(c->seq, 0, kv_head, MAXT, pos, NULL, v, &n), KVP_OK, "%s", kvp_last_error());
	for (uint32_t i = 0; i < n; i++) {
		const float *x = v_all + (size_t)pos[i] * ROW + kv_head * D;
		double num = 0, den = 0;
		for (uint32_t j = 0; j < D; j++) {
			num += (v[(size_t)i * D + j] - x[j]) * (v[(size_t)i * D + j] - x[j]);
			den += (double)x[j] * x[j];
		}
		worst = sqrt(num / den) > worst ? sqrt(num / den) : worst;
	}
	return worst;
}

/* Cold blocks of one stream at each level, and their value bytes per token. */
static void cold_blocks(struct cache *c, uint32_t kv_head, uint32_t count[2], size_t bytes[2])
{
	const struct kvp_seq *s = kvp_seq_from_handle(c->seq);
	const struct kvp_stream *st = kvp_seq_stream(s, 0, kv_head);

	count[0] = count[1] = 0;
	for (uint32_t i = 0; i < st->n_cold; i++) {
		const struct kvp_block *b = st->blocks[i];
		cr_assert(b->level < 2);
		count[b->level]++;
		bytes[b->level] = b->payload / b->cap;
		cr_assert_eq(b->payload, kvp_codec_bytes(s->cold.k_level[b->level], b->cap) +
					 kvp_codec_bytes(s->cold.v_level[b->level], b->cap),
			     "a block's bytes are its own level's codecs'");
	}
}

Test(gating, a_ladder_gives_coherent_heads_fewer_bits_and_every_block_decodes)
{
	struct cache c;
	uint32_t n0[2], n1[2];
	size_t b0[2] = { 0 }, b1[2] = { 0 };
	kvp_stats stats = { .size = sizeof stats };
	kvp_level set = { .size = sizeof set, .overridden = 1, .level = 1 };

	tokens();
	cache_open(&c, "block=8,sinks=4,window=16,gate=entropy,ladder=(4:1.0,2:1.0),k=turboquant(bits=4),"
		       "v=turboquant(bits=4)," POLICY);
	append(&c, 200);
	attend(&c, 3);
	cr_assert_eq(kvp_seq_step(c.seq), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(level_of(&c, 0).level, 1, "the sharp head takes the aggressive level");
	cr_assert_eq(level_of(&c, 0).bits, 2);
	cr_assert_eq(level_of(&c, 1).level, 0);
	cr_assert_eq(level_of(&c, 1).bits, 4);
	cr_assert_eq(level_of(&c, 0).budget, BUDGET, "keep 1.0 at both levels: the budget does not move");
	cold_blocks(&c, 0, n0, b0);
	cold_blocks(&c, 1, n1, b1);
	cr_assert(n0[1] > 0 && n0[0] == 0, "head 0's cold blocks are 2-bit: %u, %u", n0[0], n0[1]);
	cr_assert(n1[0] > 0 && n1[1] == 0, "head 1's cold blocks are 4-bit: %u, %u", n1[0], n1[1]);
	cr_assert_lt(b0[1], b1[0], "fewer bytes per token at 2 bits: %zu vs %zu", b0[1], b1[0]);
	cr_assert_eq(kvp_seq_stats(c.seq, &stats), KVP_OK);
	cr_assert_eq(stats.bytes_compressed, (n0[1] * b0[1] + n1[0] * b1[0]) * 8);
	cr_assert_lt(attend_vs_gather(&c), 1e-4);
	cr_assert_lt(value_error(&c, 0), 0.45, "2-bit values decode with their own codec");
	cr_assert_lt(value_error(&c, 1), 0.15, "4-bit values decode with their own codec");

	/* head 1 switches to 2 bits: its new blocks are 2-bit, the old stay 4-bit; rounds compact each
	 * level apart, and attention still reads every block with its own codecs */
	cr_assert_eq(kvp_seq_set_level(c.seq, 0, 1, &set), KVP_OK, "%s", kvp_last_error());
	for (int i = 0; i < 2; i++) { /* ties evict the oldest first: two rounds leave some 4-bit blocks */
		append(&c, 16);
		cr_assert_eq(kvp_seq_step(c.seq), KVP_OK, "%s", kvp_last_error());
	}
	cold_blocks(&c, 1, n1, b1);
	cr_assert(n1[0] > 0 && n1[1] > 0, "head 1 holds both levels: %u, %u", n1[0], n1[1]);
	cr_assert_lt(b1[1], b1[0]);
	cr_assert_eq(held(&c, 1), BUDGET);
	cr_assert_lt(attend_vs_gather(&c), 1e-4);
	cr_assert_lt(value_error(&c, 1), 0.45);
	kvp_pool_close(c.pool);
}

Test(gating, bad_specs_are_refused_quoting_the_text)
{
	static const struct {
		const char *spec, *quote;
	} bad[] = {
		{ "gate=foo," POLICY, "gate=foo" },
		{ "gate=mrl", "gate=mrl" }, /* no policy: no budget to move */
		{ "gate=entropy,policy=streaming(sinks=4,window=16)", "gate=entropy" },
		{ "gate=mrl,policy=h2o(heavy=0.1,recent=0.1)", "gate=mrl" },
		{ "gate=entropy,ladder=5:1.0,k=turboquant(bits=4)," POLICY, "ladder=5:1.0" },
		{ "gate=entropy,ladder=(4:1.0,3:0.5,2:0.25)," POLICY, "ladder=(4:1.0,3:0.5,2:0.25)" }, /* no codec */
		{ "ladder=4:1.0,k=turboquant(bits=4)," POLICY, "ladder=4:1.0" },                  /* no gate */
		{ "gate=entropy,ladder=(2:0.5,4:1.0),k=kivi(bits=2)," POLICY, "ladder=(2:0.5,4:1.0)" },
		{ "gate=entropy,ladder=4:1.0,3:0.5,k=kivi(bits=2)," POLICY, "3:0.5" }, /* levels need ( ) */
	};
	kvp_pool *p;
	kvp_tenant *t = NULL;

	cr_assert_eq(kvp_pool_open("", &p), KVP_OK);
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		cr_assert_eq(kvp_tenant_open(p, "bad", bad[i].spec, &t), KVP_EINVAL, "'%s' accepted", bad[i].spec);
		cr_assert(strstr(kvp_last_error(), bad[i].quote), "'%s': %s", bad[i].spec, kvp_last_error());
		cr_assert_null(t);
	}
	cr_assert_eq(kvp_tenant_open(p, "good", "gate=mrl,ladder=(4:1.0,2:0.5),k=spark(keep=0.5)|turboquant(bits=3),"
				     "v=fp16," POLICY, &t), KVP_OK, "%s", kvp_last_error());
	kvp_pool_close(p);
}

Test(gating, ladder_bits_reach_every_codec_that_takes_them)
{
	char out[KVP_CODEC_SPEC_MAX];
	unsigned n;

	cr_assert_eq(kvp_gate_spec_bits("spark(keep=0.5)|turboquant(bits=3,qjl=1)", 2, out, sizeof out, &n), KVP_OK);
	cr_assert_str_eq(out, "spark(keep=0.5)|turboquant(bits=2,qjl=1)");
	cr_assert_eq(n, 1);
	cr_assert_eq(kvp_gate_spec_bits("kivi", 4, out, sizeof out, &n), KVP_OK);
	cr_assert_str_eq(out, "kivi(bits=4)");
	cr_assert_eq(kvp_gate_spec_bits("fp16", 4, out, sizeof out, &n), KVP_OK);
	cr_assert_str_eq(out, "fp16");
	cr_assert_eq(n, 0);
	cr_assert_eq(kvp_gate_spec_bits("turboquant(qjl=1,bits=3)", 1, out, 12, &n), KVP_EINVAL);
}

Test(gating, mrl_reads_the_online_statistics)
{
	struct cache c;
	float qa[NH * D], out[NH * D];

	tokens();
	cache_open(&c, "block=8,sinks=4,window=16,gate=mrl," POLICY);
	append(&c, 100);
	/* group 0's queries are the same vector every time (R = 1); group 1's change sign in every band
	 * from one call to the next, so their means cancel (R = 0) */
	for (int i = 0; i < 4; i++) {
		memcpy(qa, q, sizeof qa);
		for (uint32_t j = 2 * D; j < NH * D; j++)
			qa[j] = (i & 1) ? -q[j] : q[j];
		cr_assert_eq(kvp_attend(c.seq, 0, qa, out), KVP_OK, "%s", kvp_last_error());
	}
	cr_assert_gt(level_of(&c, 0).coherence, level_of(&c, 1).coherence + 0.3, "%g vs %g",
		     level_of(&c, 0).coherence, level_of(&c, 1).coherence);
	kvp_pool_close(c.pool);
}
