/*
 * Suite gating: coherence gating in the pager (gate=entropy|mrl). Budget moves between the KV heads of a
 * layer with the total conserved, diffuse heads get more of it, the host can read and override every
 * head's level, and bad specs are refused by name.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "kvpager.h"
#include "pager_fixture.h"

#define D 32
#define NKV 2
#define NH 4
#define ROW (NKV * D)

static const kvp_shape shape = { 1, NH, NKV, D, 1e4f, KVP_ROPE_HALF };

struct cache {
	kvp_pool *pool;
	kvp_tenant *tenant;
	kvp_seq *seq;
	int32_t t;
};

static void cache_open(struct cache *c, const char *spec)
{
	memset(c, 0, sizeof *c);
	cr_assert_eq(kvp_pool_open("", &c->pool), KVP_OK);
	cr_assert_eq(kvp_tenant_open(c->pool, "g", spec, &c->tenant), KVP_OK, "%s: %s", spec, kvp_last_error());
	cr_assert_eq(kvp_seq_open(c->tenant, &shape, &c->seq), KVP_OK, "%s", kvp_last_error());
}

/*
 * KV head 0 is sharp: one key points along every query and the rest are orthogonal noise, so its
 * attention sits on one token (coherent). KV head 1's keys are all zero: uniform attention (diffuse).
 */
static void step_with(struct cache *c, int n, int rope)
{
	float k[64 * ROW], v[64 * ROW], q[NH * D], out[NH * D];
	int32_t pos[64];

	fixture_fill(k, (size_t)n * ROW, 100 + c->t, 0.05f);
	fixture_fill(v, (size_t)n * ROW, 200 + c->t, 1.0f);
	for (int i = 0; i < n; i++) {
		pos[i] = c->t + i;
		for (int j = 0; j < D; j++)
			k[i * ROW + D + j] = 0.0f;
		if (c->t + i == 3)
			k[i * ROW + 0] = 40.0f;
	}
	/* rope: one pre-RoPE direction, band 0 (channels 0 and D/2 in the half layout, frequency 1), turned
	 * by RoPE to the query's position; otherwise one fixed vector. rope 2: KV head 1's query heads point
	 * somewhere new at every step (their mean resultant length is low). */
	memset(q, 0, sizeof q);
	for (int h = 0; h < NH; h++) {
		q[h * D] = rope ? cosf((float)(c->t - 1)) : 1.0f;
		q[h * D + D / 2] = rope ? sinf((float)(c->t - 1)) : 0.0f;
	}
	if (rope == 2)
		fixture_fill(q + (NH / NKV) * D, (size_t)(NH / NKV) * D, 900 + c->t, 1.0f);
	cr_assert_eq(kvp_append(c->seq, 0, (uint32_t)n, pos, k, v), KVP_OK, "%s", kvp_last_error());
	c->t += n;
	cr_assert_eq(kvp_attend(c->seq, 0, q, out), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_step(c->seq), KVP_OK, "%s", kvp_last_error());
}

static void step(struct cache *c, int n)
{
	step_with(c, n, 0);
}

static kvp_head_level level(struct cache *c, uint32_t kv_head)
{
	kvp_head_level l = { .size = sizeof l };

	cr_assert_eq(kvp_seq_head_level(c->seq, 0, kv_head, &l), KVP_OK, "%s", kvp_last_error());
	return l;
}

static uint32_t tokens(struct cache *c, uint32_t kv_head)
{
	uint32_t n = 0;

	cr_assert_eq(kvp_gather(c->seq, 0, kv_head, 4096, NULL, NULL, NULL, &n), KVP_OK);
	return n;
}

/* TriAttention protects nothing of its own here, so the budget alone decides a stream's size */
#define SPEC "block=8,sinks=4,window=8,gate=entropy,policy=triattention(budget=64,every=8,stats=online,select=per_layer_head)"

Test(gating, entropy_gives_the_diffuse_head_more_budget_and_conserves_the_total)
{
	struct cache c;

	cache_open(&c, SPEC);
	step(&c, 40);
	for (int i = 0; i < 100; i++)
		step(&c, 1);
	kvp_head_level sharp = level(&c, 0), diffuse = level(&c, 1);
	cr_log_info("coherence sharp %.3f diffuse %.3f; budgets %u and %u", sharp.coherence, diffuse.coherence,
		    sharp.budget, diffuse.budget);
	cr_assert_gt(sharp.coherence, 0.5f);
	cr_assert_lt(diffuse.coherence, 0.05f);
	cr_assert_eq(sharp.budget + diffuse.budget, 2 * 64, "the layer keeps 2 x 64 tokens in all");
	cr_assert_lt(sharp.budget, diffuse.budget);
	cr_assert_lt(tokens(&c, 0), sharp.budget + 8, "a round is due at budget + every");
	cr_assert_lt(tokens(&c, 1), diffuse.budget + 8);
	cr_assert_gt(tokens(&c, 1), tokens(&c, 0), "the streams follow their budgets");
	kvp_pool_close(c.pool);
}

Test(gating, an_override_sticks_and_changes_what_rounds_keep)
{
	struct cache c;

	cache_open(&c, SPEC);
	step(&c, 40);
	cr_assert_eq(kvp_seq_set_head_level(c.seq, 0, 0, 0.0f), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_set_head_level(c.seq, 0, 1, 1.0f), KVP_OK);
	for (int i = 0; i < 60; i++)
		step(&c, 1);
	kvp_head_level a = level(&c, 0), b = level(&c, 1);
	cr_assert(a.overridden && b.overridden);
	cr_assert_float_eq(a.aggressiveness, 0.0f, 0);
	cr_assert_float_eq(b.aggressiveness, 1.0f, 0);
	cr_assert_gt(a.budget, b.budget, "the sharp head now gets the larger share");
	cr_assert_eq(a.budget + b.budget, 128);
	cr_assert_gt(tokens(&c, 0), tokens(&c, 1), "%u vs %u tokens, budgets %u and %u", tokens(&c, 0),
		     tokens(&c, 1), a.budget, b.budget);
	/* -1 hands the head back to its measured coherence */
	cr_assert_eq(kvp_seq_set_head_level(c.seq, 0, 0, -1.0f), KVP_OK);
	cr_assert(!level(&c, 0).overridden);
	cr_assert_eq(kvp_seq_set_head_level(c.seq, 0, 0, 1.5f), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "1.5"), "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_set_head_level(c.seq, 0, 7, 0.5f), KVP_EINVAL);
	kvp_pool_close(c.pool);
}

Test(gating, mrl_reads_triattention_statistics)
{
	struct cache c;

	cache_open(&c, "block=8,sinks=4,window=8,gate=mrl,policy=triattention(budget=48,every=8,stats=online,"
		       "select=per_layer_head)");
	step_with(&c, 40, 1);
	for (int i = 0; i < 40; i++)
		step_with(&c, 1, 1);
	for (uint32_t h = 0; h < NKV; h++) {
		kvp_head_level l = level(&c, h);
		cr_assert(l.coherence >= 0 && l.coherence <= 1, "%g", l.coherence);
		/* every query is one pre-RoPE vector: concentrated (not exactly 1: fp32 rotations) */
		cr_assert_gt(l.coherence, 0.95f, "head %u: %g", h, l.coherence);
	}
	cr_assert_eq(level(&c, 0).budget + level(&c, 1).budget, 2 * 48);
	kvp_pool_close(c.pool);
}

Test(gating, bad_specs_and_calls_are_refused_by_name)
{
	kvp_pool *p;
	kvp_tenant *t;
	kvp_seq *s;
	kvp_head_level l = { .size = sizeof l };

	cr_assert_eq(kvp_pool_open("", &p), KVP_OK);
	cr_assert_eq(kvp_tenant_open(p, "a", "gate=foo,policy=streaming(sinks=4,window=8)", &t), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "gate=foo"), "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(p, "a", "gate=entropy", &t), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "policy="), "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(p, "a", "gate=mrl,policy=h2o(heavy=0.1,recent=0.1)", &t), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "gate=mrl"), "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(p, "a", "gate=entropy,policy=h2o(heavy=0.1,recent=0.1),ladder=4:1.0", &t),
		     KVP_EINVAL); /* a ladder picks codec bits, and there is no codec */
	cr_assert(strstr(kvp_last_error(), "ladder="), "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(p, "a", "policy=h2o(heavy=0.1,recent=0.1)", &t), KVP_OK);
	cr_assert_eq(kvp_seq_open(t, &shape, &s), KVP_OK);
	cr_assert_eq(kvp_seq_head_level(s, 0, 0, &l), KVP_EINVAL, "gate=off has no levels");
	cr_assert(strstr(kvp_last_error(), "gate=off"), "%s", kvp_last_error());
	kvp_pool_close(p);
}

/* ---- combinations: each refused one names itself and why; each accepted one changes something ---- */

static void refused(const char *spec, const char *quote, const char *why)
{
	kvp_pool *p;
	kvp_tenant *t = NULL;

	cr_assert_eq(kvp_pool_open("", &p), KVP_OK);
	cr_assert_eq(kvp_tenant_open(p, "a", spec, &t), KVP_EINVAL, "'%s' accepted", spec);
	cr_assert_null(t);
	cr_assert(strstr(kvp_last_error(), quote) && strstr(kvp_last_error(), why), "'%s': %s", spec,
		  kvp_last_error());
	kvp_pool_close(p);
}

Test(gating, gate_with_streaming_is_refused_as_it_protects_its_whole_budget)
{
	refused("gate=entropy,policy=streaming(sinks=4,window=20)", "policy=streaming(sinks=4,window=20)",
		"no budget to move");
}

Test(gating, gate_with_select_per_head_is_refused_without_a_bits_ladder)
{
	refused("gate=entropy,policy=triattention(budget=64,stats=online)", "gate=entropy",
		"every layer of a KV head, so per-head budgets would change nothing");
}

Test(gating, gate_with_select_union_is_refused_without_a_bits_ladder)
{
	refused("gate=mrl,policy=triattention(budget=64,stats=online,select=union)", "select=union",
		"every KV head of a layer, so per-head budgets would change nothing");
}

Test(gating, a_ladder_with_budget_shares_is_refused_with_select_per_head)
{
	refused("gate=entropy,ladder=(4:1.0,2:0.5),k=turboquant(bits=4),policy=triattention(budget=64,stats=online)",
		"ladder=(4:1.0,2:0.5)", "budget shares (keeps) cannot apply");
}

Test(gating, a_ladder_of_one_level_is_refused)
{
	refused("gate=entropy,ladder=3:1.0,k=turboquant(bits=4),policy=h2o(heavy=0.1,recent=0.1)", "ladder=3:1.0",
		"one level");
}

static kvp_stats seq_stats(struct cache *c)
{
	kvp_stats st = { .size = sizeof st };

	cr_assert_eq(kvp_seq_stats(c->seq, &st), KVP_OK);
	return st;
}

/* select=per_head keeps one set per KV head, so only a ladder's bits act: the coherent head's cold blocks
 * take fewer bits, the tokens kept are the ungated cache's. */
Test(gating, a_bits_ladder_with_select_per_head_lowers_the_coherent_heads_bits)
{
	const char *tail = "k=turboquant(bits=4),v=turboquant(bits=4),"
			   "policy=triattention(budget=64,every=8,stats=online,pin_prompt=0)";
	char spec[2][256];
	struct cache c[2];

	snprintf(spec[0], sizeof spec[0], "block=8,sinks=4,window=8,%s", tail);
	snprintf(spec[1], sizeof spec[1], "block=8,sinks=4,window=8,gate=entropy,ladder=(4:1,2:1),%s", tail);
	for (int i = 0; i < 2; i++) {
		cache_open(&c[i], spec[i]);
		step(&c[i], 40);
		for (int j = 0; j < 100; j++)
			step(&c[i], 1);
	}
	cr_assert_eq(level(&c[1], 0).level, 1, "the sharp head takes the aggressive level");
	cr_assert_eq(level(&c[1], 0).bits, 2);
	cr_assert_eq(level(&c[1], 1).level, 0);
	for (uint32_t h = 0; h < NKV; h++)
		cr_assert_eq(tokens(&c[1], h), tokens(&c[0], h), "head %u keeps what the ungated cache keeps", h);
	cr_assert_lt(seq_stats(&c[1]).bytes_compressed, seq_stats(&c[0]).bytes_compressed, "%llu vs %llu bytes",
		     (unsigned long long)seq_stats(&c[1]).bytes_compressed,
		     (unsigned long long)seq_stats(&c[0]).bytes_compressed);
	kvp_pool_close(c[0].pool);
	kvp_pool_close(c[1].pool);
}

/* H2O protects its recent share: gating moves only the heavy hitters' slots, so no head is given a budget
 * below what its rounds keep anyway, and the layer holds what the ungated cache would. */
Test(gating, gate_with_h2o_moves_only_what_its_rounds_do_not_protect)
{
	struct cache c;
	uint32_t t0, protected;

	cache_open(&c, "block=8,sinks=4,window=8,gate=entropy,policy=h2o(heavy=0.1,recent=0.4)");
	step(&c, 40);
	for (int i = 0; i < 100; i++)
		step(&c, 1);
	t0 = (uint32_t)c.t;
	protected = 4 + (uint32_t)ceil(0.4 * t0);
	kvp_head_level sharp = level(&c, 0), diffuse = level(&c, 1);
	cr_log_info("budgets %u and %u, protected %u, tokens %u and %u", sharp.budget, diffuse.budget, protected,
		    tokens(&c, 0), tokens(&c, 1));
	cr_assert_lt(sharp.budget, diffuse.budget, "the budget moved");
	cr_assert_geq(sharp.budget, protected, "no head below what its rounds protect");
	cr_assert_eq(sharp.budget + diffuse.budget, 2 * (uint32_t)ceil(0.5 * t0));
	cr_assert_leq(tokens(&c, 0) + tokens(&c, 1), sharp.budget + diffuse.budget + 2, "the layer's total holds");
	cr_assert_gt(tokens(&c, 1), tokens(&c, 0));
	kvp_pool_close(c.pool);
}

/* Budgets move in whole blocks, so a gated stream ends on the same partial block as an ungated one. */
Test(gating, budgets_move_in_whole_blocks)
{
	struct cache c;

	cache_open(&c, "block=8,sinks=4,window=8,gate=entropy,"
		       "policy=triattention(budget=61,every=8,stats=online,select=per_layer_head)");
	step(&c, 40);
	for (int i = 0; i < 100; i++)
		step(&c, 1);
	kvp_head_level sharp = level(&c, 0), diffuse = level(&c, 1);
	cr_assert_lt(sharp.budget, diffuse.budget);
	cr_assert_eq(sharp.budget + diffuse.budget, 2 * 61);
	cr_assert_eq((61 - sharp.budget) % 8, 0, "budget %u", sharp.budget);
	cr_assert_eq((diffuse.budget - 61) % 8, 0, "budget %u", diffuse.budget);
	kvp_pool_close(c.pool);
}

/* gate=mrl moves budget by how concentrated each KV head's queries are: KV head 1's scatter. */
Test(gating, mrl_moves_budget_to_the_head_whose_queries_scatter)
{
	struct cache c;

	cache_open(&c, "block=8,sinks=4,window=8,gate=mrl,policy=triattention(budget=48,every=8,stats=online,"
		       "select=per_layer_head)");
	step_with(&c, 40, 2);
	for (int i = 0; i < 60; i++)
		step_with(&c, 1, 2);
	kvp_head_level sharp = level(&c, 0), scattered = level(&c, 1);
	cr_log_info("coherence %.3f and %.3f, budgets %u and %u", sharp.coherence, scattered.coherence, sharp.budget,
		    scattered.budget);
	cr_assert_gt(sharp.coherence, scattered.coherence + 0.3f);
	cr_assert_lt(sharp.budget, scattered.budget);
	cr_assert_eq(sharp.budget + scattered.budget, 2 * 48);
	cr_assert_gt(tokens(&c, 1), tokens(&c, 0), "the streams follow their budgets");
	kvp_pool_close(c.pool);
}
