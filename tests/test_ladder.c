/*
 * Suite ladder: per-head codec bits (tenant ladder= with gate=). KV head 0 attends sharply (one key
 * points along the query), KV head 1 diffusely (all keys zero, so its softmax is uniform): head 0 takes
 * the aggressive level and its cold blocks fewer bits; a block keeps the level it was encoded at, so
 * every block decodes with its own codecs through level changes, compaction and attention.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvpager.h"
#include "pager/pager.h"
#include "pager_fixture.h"
#include "spill_fixture.h"

#define D 32
#define NKV 2
#define NH 4
#define GROUP (NH / NKV)
#define ROW (NKV * D)
#define MAXT 512
#define BUDGET 64
#define SHARP 40 /* the position head 0's queries find */

#define LADDER "block=8,sinks=4,window=16,gate=entropy,ladder=(4:1.0,2:1.0),k=turboquant(bits=4)," \
	"v=turboquant(bits=4)," POLICY
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

static void cache_open_in(struct cache *c, const char *pool, const char *spec)
{
	const kvp_shape sh = { 1, NH, NKV, D, 1e4f, KVP_ROPE_HALF };

	memset(c, 0, sizeof *c);
	cr_assert_eq(kvp_pool_open(pool, &c->pool), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(c->pool, "ladder", spec, &c->tenant), KVP_OK, "%s: %s", spec, kvp_last_error());
	cr_assert_eq(kvp_seq_open(c->tenant, &sh, &c->seq), KVP_OK, "%s", kvp_last_error());
}

static void cache_open(struct cache *c, const char *spec)
{
	cache_open_in(c, "mem=256MiB", spec);
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

static kvp_head_level level_of(struct cache *c, uint32_t kv_head)
{
	kvp_head_level l = { .size = sizeof l };

	cr_assert_eq(kvp_seq_head_level(c->seq, 0, kv_head, &l), KVP_OK, "%s", kvp_last_error());
	return l;
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
	const struct kvp_seq_obj *s = kvp_seq_from_handle(c->seq);
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

/* The cold blocks' token storage of every KV head of layer 0, as allocated (jemalloc's size classes). */
static uint64_t cold_allocated(struct cache *c, uint32_t kv_heads)
{
	const struct kvp_seq_obj *s = kvp_seq_from_handle(c->seq);
	uint64_t sum = 0;

	for (uint32_t h = 0; h < kv_heads; h++) {
		const struct kvp_stream *st = kvp_seq_stream(s, 0, h);
		for (uint32_t i = 0; i < st->n_cold; i++)
			sum += kvp_block_token_bytes(s->tenant, st->blocks[i]);
	}
	return sum;
}

Test(ladder, a_ladder_gives_coherent_heads_fewer_bits_and_every_block_decodes)
{
	struct cache c;
	uint32_t n0[2], n1[2];
	size_t b0[2] = { 0 }, b1[2] = { 0 };
	kvp_stats stats = { .size = sizeof stats };

	tokens();
	cache_open(&c, LADDER);
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
	cr_assert_eq(stats.bytes_compressed, cold_allocated(&c, NKV), "counted as allocated");
	cr_assert_geq(stats.bytes_compressed, (n0[1] * b0[1] + n1[0] * b1[0]) * 8, "the codecs' bytes and the slack");
	/* cold blocks are read by the integer group paths: within 3e-3 of attention over the decoded vectors */
	cr_assert_lt(attend_vs_gather(&c), 3e-3);
	cr_assert_lt(value_error(&c, 0), 0.45, "2-bit values decode with their own codec");
	cr_assert_lt(value_error(&c, 1), 0.15, "4-bit values decode with their own codec");

	/* head 1 switches to 2 bits: its new blocks are 2-bit, the old stay 4-bit; rounds compact each
	 * level apart, and attention still reads every block with its own codecs */
	cr_assert_eq(kvp_seq_set_head_level(c.seq, 0, 1, 1.0f), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(level_of(&c, 1).level, 1);
	for (int i = 0; i < 2; i++) { /* ties evict the oldest first: two rounds leave some 4-bit blocks */
		append(&c, 16);
		cr_assert_eq(kvp_seq_step(c.seq), KVP_OK, "%s", kvp_last_error());
	}
	cold_blocks(&c, 1, n1, b1);
	cr_assert(n1[0] > 0 && n1[1] > 0, "head 1 holds both levels: %u, %u", n1[0], n1[1]);
	cr_assert_lt(b1[1], b1[0]);
	cr_assert_eq(held(&c, 1), BUDGET);
	/* cold blocks are read by the integer group paths: within 3e-3 of attention over the decoded vectors */
	cr_assert_lt(attend_vs_gather(&c), 3e-3);
	cr_assert_lt(value_error(&c, 1), 0.45);
	kvp_pool_close(c.pool);
}

Test(ladder, bad_specs_are_refused_quoting_the_text)
{
	static const struct {
		const char *spec, *quote;
	} bad[] = {
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

Test(ladder, ladder_bits_reach_every_codec_that_takes_them)
{
	char out[KVP_CODEC_SPEC_MAX];
	unsigned n;

	cr_assert_eq(kvp_ladder_spec_bits("spark(keep=0.5)|turboquant(bits=3,qjl=1)", 2, out, sizeof out, &n), KVP_OK);
	cr_assert_str_eq(out, "spark(keep=0.5)|turboquant(bits=2,qjl=1)");
	cr_assert_eq(n, 1);
	cr_assert_eq(kvp_ladder_spec_bits("kivi", 4, out, sizeof out, &n), KVP_OK);
	cr_assert_str_eq(out, "kivi(bits=4)");
	cr_assert_eq(kvp_ladder_spec_bits("fp16", 4, out, sizeof out, &n), KVP_OK);
	cr_assert_str_eq(out, "fp16");
	cr_assert_eq(n, 0);
	cr_assert_eq(kvp_ladder_spec_bits("turboquant(qjl=1,bits=3)", 1, out, 12, &n), KVP_EINVAL);
}


Test(ladder, parked_blocks_come_back_at_their_level, .fini = spill_fixture_fini)
{
	const struct kvp_stream *st;
	struct cache c;
	float before[NH * D], after[NH * D];
	uint32_t levels[64], n;

	tokens();
	spill_fixture_open("64MiB", NULL);
	cache_open_in(&c, spill_spec, LADDER);
	append(&c, 200);
	attend(&c, 3);
	cr_assert_eq(kvp_seq_step(c.seq), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_set_head_level(c.seq, 0, 1, 1.0f), KVP_OK, "%s", kvp_last_error());
	append(&c, 16);
	cr_assert_eq(kvp_seq_step(c.seq), KVP_OK, "%s", kvp_last_error());
	st = kvp_seq_stream(kvp_seq_from_handle(c.seq), 0, 1);
	n = st->n_cold;
	cr_assert(n > 1 && n <= 64 && st->blocks[0]->level == 0 && st->blocks[n - 1]->level == 1,
		  "head 1 holds both levels (%u cold blocks)", n);
	for (uint32_t i = 0; i < n; i++)
		levels[i] = st->blocks[i]->level;
	cr_assert_eq(kvp_attend(c.seq, 0, q, before), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_park(c.seq), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_unpark(c.seq), KVP_OK, "%s", kvp_last_error());
	st = kvp_seq_stream(kvp_seq_from_handle(c.seq), 0, 1);
	cr_assert_eq(st->n_cold, n);
	for (uint32_t i = 0; i < n; i++)
		cr_assert_eq(st->blocks[i]->level, levels[i], "block %u came back at level %u", i, st->blocks[i]->level);
	cr_assert_eq(kvp_attend(c.seq, 0, q, after), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(memcmp(before, after, sizeof before), 0, "attention after unpark is bit-identical");
	kvp_pool_close(c.pool);
	cr_assert_eq(spill_fixture_close(), 0, "the pool removed its spill file");
}
