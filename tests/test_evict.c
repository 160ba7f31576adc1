/*
 * Suite evict: token policies inside the pager. Rounds at kvp_seq_step keep what the policy selects,
 * sinks and the hot window always; cold blocks are compacted by moving bytes (bit-identical decode) or,
 * for codecs whose groups span tokens, kept or dropped whole; a round that cannot be paid for changes
 * nothing; on kjv-64 TriAttention beats StreamingLLM at the same budget and stacks with TurboQuant.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvpager.h"
#include "model_fixture.h"
#include "pager/pager.h"
#include "pager_fixture.h"

#define D 32
#define NKV 2
#define NH 4
#define ROW (NKV * D)
#define MAXT 1024

struct cache {
	kvp_pool *pool;
	kvp_tenant *tenant;
	kvp_seq *seq;
	uint32_t t; /* next position */
};

static void cache_open(struct cache *c, const char *spec)
{
	const kvp_shape sh = { 1, NH, NKV, D, 1e4f, KVP_ROPE_HALF };

	memset(c, 0, sizeof *c);
	cr_assert_eq(kvp_pool_open("mem=256MiB", &c->pool), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(c->pool, "evict", spec, &c->tenant), KVP_OK, "%s: %s", spec, kvp_last_error());
	cr_assert_eq(kvp_seq_open(c->tenant, &sh, &c->seq), KVP_OK, "%s", kvp_last_error());
}

static kvp_status append(struct cache *c, uint32_t n, const float *k, const float *v)
{
	int32_t pos[MAXT];
	kvp_status st;

	for (uint32_t i = 0; i < n; i++)
		pos[i] = (int32_t)(c->t + i);
	st = kvp_append(c->seq, 0, n, pos, k + (size_t)c->t * ROW, v + (size_t)c->t * ROW);
	if (st == KVP_OK)
		c->t += n;
	return st;
}

static uint32_t positions(struct cache *c, uint32_t kv_head, int32_t *pos)
{
	uint32_t n = 0;

	cr_assert_eq(kvp_gather(c->seq, 0, kv_head, MAXT, pos, NULL, NULL, &n), KVP_OK, "%s", kvp_last_error());
	return n;
}

Test(evict, streaming_keeps_exactly_sinks_and_window)
{
	static float k[MAXT * ROW], v[MAXT * ROW], q[NH * D], out[NH * D];
	int32_t pos[MAXT];
	struct cache c;

	fixture_fill(k, MAXT * ROW, 1, 1.0f);
	fixture_fill(v, MAXT * ROW, 2, 1.0f);
	fixture_fill(q, NH * D, 3, 1.0f);
	cache_open(&c, "block=8,sinks=4,window=16,policy=streaming(sinks=4,window=16)");
	cr_assert_eq(append(&c, 100, k, v), KVP_OK);
	cr_assert_eq(kvp_seq_step(c.seq), KVP_OK, "%s", kvp_last_error());
	for (int step = 0; step < 37; step++) {
		cr_assert_eq(append(&c, 1, k, v), KVP_OK);
		cr_assert_eq(kvp_attend(c.seq, 0, q, out), KVP_OK);
		cr_assert_eq(kvp_seq_step(c.seq), KVP_OK, "%s", kvp_last_error());
	}
	for (uint32_t h = 0; h < NKV; h++) {
		cr_assert_eq(positions(&c, h, pos), 20);
		for (int i = 0; i < 4; i++)
			cr_assert_eq(pos[i], i);
		for (int i = 0; i < 16; i++)
			cr_assert_eq(pos[4 + i], (int32_t)c.t - 16 + i, "window slot %d holds %d", i, pos[4 + i]);
	}
	kvp_stats st = { .size = sizeof st };
	cr_assert_eq(kvp_seq_stats(c.seq, &st), KVP_OK);
	cr_assert_eq(st.tokens_retained, 2 * 20);
	cr_assert_eq(st.tokens_appended, 2 * 137);
	kvp_pool_close(c.pool);
}

/* Keys of a few "heavy" tokens point along the query; everyone else is orthogonal noise. */
static void heavy_pattern(float *k, float *q, const int *heavy, int n_heavy)
{
	for (size_t i = 0; i < (size_t)MAXT * ROW; i++)
		k[i] *= 0.05f;
	for (int j = 0; j < NH * D; j++)
		q[j] = (j % D) == 0 ? 4.0f : 0.0f;
	for (int i = 0; i < n_heavy; i++)
		for (int g = 0; g < NKV; g++)
			k[(size_t)heavy[i] * ROW + g * D] = 3.0f;
}

Test(evict, h2o_keeps_the_tokens_with_the_largest_accumulated_attention)
{
	static float k[MAXT * ROW], v[MAXT * ROW], q[NH * D], out[NH * D];
	static const int heavy[] = { 17, 42, 77, 120, 133, 150 };
	int32_t pos[MAXT];
	struct cache c;

	fixture_fill(k, MAXT * ROW, 4, 1.0f);
	fixture_fill(v, MAXT * ROW, 5, 1.0f);
	heavy_pattern(k, q, heavy, 6);
	/* at t0 = 200: 10% heavy = 20 slots, 5% recent = 10 protected */
	cache_open(&c, "block=8,sinks=0,window=0,policy=h2o(heavy=0.1,recent=0.05)");
	cr_assert_eq(append(&c, 199, k, v), KVP_OK);
	cr_assert_eq(append(&c, 1, k, v), KVP_OK);
	cr_assert_eq(kvp_attend(c.seq, 0, q, out), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_step(c.seq), KVP_OK, "%s", kvp_last_error());
	for (uint32_t h = 0; h < NKV; h++) {
		uint32_t n = positions(&c, h, pos), found = 0, recent = 0;
		cr_assert_eq(n, 30, "budget ceil(0.15 * 200) = 30, got %u", n);
		for (uint32_t i = 0; i < n; i++) {
			for (int j = 0; j < 6; j++)
				found += pos[i] == heavy[j];
			recent += pos[i] >= 190;
		}
		cr_assert_eq(found, 6, "every heavy hitter survives (%u of 6)", found);
		cr_assert_eq(recent, 10, "the recent 5%% are protected");
	}
	kvp_pool_close(c.pool);
}

/* Decoded keys by position, to compare across rounds. */
static void keys_by_position(struct cache *c, uint32_t kv_head, float *by_pos, uint8_t *present)
{
	static float k[MAXT * D];
	int32_t pos[MAXT];
	uint32_t n = 0;

	memset(present, 0, MAXT);
	cr_assert_eq(kvp_gather(c->seq, 0, kv_head, MAXT, pos, k, NULL, &n), KVP_OK);
	for (uint32_t i = 0; i < n; i++) {
		memcpy(by_pos + (size_t)pos[i] * D, k + (size_t)i * D, D * sizeof *k);
		present[pos[i]] = 1;
	}
}

Test(evict, compacted_cold_tokens_decode_bit_identically)
{
	static float k[MAXT * ROW], v[MAXT * ROW], q[NH * D], out[NH * D];
	static float before[MAXT * D], after[MAXT * D];
	static uint8_t was[MAXT], is[MAXT];
	struct cache c;
	uint32_t compared = 0, dropped_cold = 0;

	fixture_fill(k, MAXT * ROW, 6, 1.0f);
	fixture_fill(v, MAXT * ROW, 7, 1.0f);
	fixture_fill(q, NH * D, 8, 1.0f);
	cache_open(&c, "block=8,sinks=4,window=8,k=turboquant(bits=3),v=turboquant(bits=3),"
		       "policy=h2o(heavy=0.5,recent=0.05)");
	cr_assert_eq(append(&c, 64, k, v), KVP_OK);
	cr_assert_eq(kvp_attend(c.seq, 0, q, out), KVP_OK);
	cr_assert_eq(kvp_seq_step(c.seq), KVP_OK, "%s", kvp_last_error());
	int32_t cold_before = -1;
	for (int step = 0; step < 200; step++) {
		keys_by_position(&c, 0, before, was);
		cr_assert_eq(append(&c, 1, k, v), KVP_OK);
		fixture_fill(q, NH * D, 100 + step, 1.0f);
		cr_assert_eq(kvp_attend(c.seq, 0, q, out), KVP_OK);
		cr_assert_eq(kvp_seq_step(c.seq), KVP_OK, "%s", kvp_last_error());
		keys_by_position(&c, 0, after, is);
		const struct kvp_stream *st = kvp_seq_stream(kvp_seq_from_handle(c.seq), 0, 0);
		int32_t cold_end = st->n_cold ? kvp_block_last(st->blocks[st->n_cold - 1]) : -1;
		for (int32_t p = 0; p <= (cold_end < cold_before ? cold_end : cold_before); p++) {
			if (was[p] && !is[p] && p > 3)
				dropped_cold++;
			if (!was[p] || !is[p])
				continue;
			cr_assert_eq(memcmp(before + (size_t)p * D, after + (size_t)p * D, D * sizeof(float)), 0,
				     "step %d: cold token %d changed while its block was compacted", step, p);
			compared++;
		}
		cold_before = cold_end;
	}
	cr_log_info("compaction: %u cold tokens compared, %u dropped from cold blocks", compared, dropped_cold);
	cr_assert_gt(dropped_cold, 0, "rounds must have dropped cold tokens for the test to mean anything");
	cr_assert_gt(compared, 1000);
	kvp_stats st = { .size = sizeof st };
	cr_assert_eq(kvp_seq_stats(c.seq, &st), KVP_OK);
	cr_assert_gt(st.bytes_compressed, 0);
	kvp_pool_close(c.pool);
}

/*
 * H2O keeps its heavy hitters round after round, so the cold blocks that hold them stay fully kept while
 * later cold blocks lose tokens. Their survivors must be packed together: a cold tier whose codecs take
 * the bytes of the exact store (fp16 both ways) holds the same tokens in as many bytes, give or take one
 * partly filled block per stream, and not a block per round's few survivors.
 */
Test(evict, h2o_cold_bytes_follow_the_retained_tokens)
{
	static float k[MAXT * ROW], v[MAXT * ROW], q[NH * D], out[NH * D];
	static const char *const specs[2] = {
		"block=8,sinks=4,window=8,store=fp16,policy=h2o(heavy=0.0625,recent=0.0625,every=8)",
		"block=8,sinks=4,window=8,store=fp16,policy=h2o(heavy=0.0625,recent=0.0625,every=8),k=fp16,v=fp16",
	};
	kvp_stats st[2];

	fixture_fill(k, MAXT * ROW, 31, 1.0f);
	fixture_fill(v, MAXT * ROW, 32, 1.0f);
	for (int i = 0; i < 2; i++) {
		struct cache c;
		cache_open(&c, specs[i]);
		cr_assert_eq(append(&c, 16, k, v), KVP_OK);
		for (int step = 0; step < 600; step++) {
			fixture_fill(q, NH * D, 300 + step, 1.0f);
			cr_assert_eq(append(&c, 1, k, v), KVP_OK);
			cr_assert_eq(kvp_attend(c.seq, 0, q, out), KVP_OK, "%s", kvp_last_error());
			cr_assert_eq(kvp_seq_step(c.seq), KVP_OK, "%s", kvp_last_error());
		}
		st[i] = (kvp_stats){ .size = sizeof st[i] };
		cr_assert_eq(kvp_seq_stats(c.seq, &st[i]), KVP_OK);
		kvp_pool_close(c.pool);
	}
	uint64_t exact = st[0].bytes_exact, tiered = st[1].bytes_exact + st[1].bytes_compressed;
	cr_log_info("h2o: %llu retained tokens in %llu bytes exact, %llu with a cold tier (%llu cold)",
		    (unsigned long long)st[0].tokens_retained, (unsigned long long)exact, (unsigned long long)tiered,
		    (unsigned long long)st[1].bytes_compressed);
	cr_assert_eq(st[0].tokens_retained, st[1].tokens_retained, "the same tokens are kept either way");
	cr_assert_gt(st[1].bytes_compressed, 0, "the cold tier must hold tokens for the test to mean anything");
	/* one block of 8 fp16 tokens per stream: 8 x 2 x 32 x 2 bytes */
	cr_assert_leq(tiered, exact + NKV * 8 * 2 * D * 2, "%llu token bytes with a cold tier against %llu without",
		      (unsigned long long)tiered, (unsigned long long)exact);
}

/* Resident memory of this process, from /proc/self/statm. */
static uint64_t resident_bytes(void)
{
	unsigned long long size = 0, pages = 0;
	FILE *f = fopen("/proc/self/statm", "r");

	cr_assert(f);
	cr_assert_eq(fscanf(f, "%llu %llu", &size, &pages), 2);
	fclose(f);
	return (uint64_t)pages * (uint64_t)sysconf(_SC_PAGESIZE);
}

/*
 * H2O's weights are the sequence's memory, sized by the tokens it holds: under quota=1MiB two tokens at
 * positions 0 and 2^28 - 2 cost a few pairs (the accumulator once grew to 2^28 floats, a GiB outside
 * every quota), charged to the tenant and shown in the sequence's bytes_meta.
 */
Test(evict, h2o_weights_of_far_positions_are_small_and_charged)
{
	const kvp_shape sh = { 1, 2, 1, D, 1e4f, KVP_ROPE_HALF };
	static float k[2 * D], v[2 * D], q[2 * D], out[2 * D];
	const int32_t far[2] = { 0, (1 << 28) - 2 };
	kvp_stats before = { .size = sizeof before }, after = { .size = sizeof after }, tenant = { .size = sizeof tenant };
	kvp_pool *pool;
	kvp_tenant *t;
	kvp_seq *seq;

	fixture_fill(k, 2 * D, 41, 1.0f);
	fixture_fill(v, 2 * D, 42, 1.0f);
	fixture_fill(q, 2 * D, 43, 1.0f);
	cr_assert_eq(kvp_pool_open("mem=2MiB", &pool), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(pool, "far", "quota=1MiB,block=8,sinks=0,window=0,policy=h2o(heavy=0.5,recent=0.5)",
				     &t), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_open(t, &sh, &seq), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_append(seq, 0, 1, &far[0], k, v), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_append(seq, 0, 1, &far[1], k + D, v + D), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_stats(seq, &before), KVP_OK);
	uint64_t rss = resident_bytes();
	cr_assert_eq(kvp_attend(seq, 0, q, out), KVP_OK, "%s", kvp_last_error());
	uint64_t grown = resident_bytes() - rss;
	cr_assert_eq(kvp_seq_stats(seq, &after), KVP_OK);
	cr_assert_eq(kvp_tenant_stats(t, &tenant), KVP_OK);
	const struct kvp_seq_obj *s = kvp_seq_from_handle(seq);
	uint64_t observe = kvp_alloc_size(s->tenant, s->observe.bytes);
	cr_log_info("h2o at positions 0 and 2^28-2: resident +%llu bytes, bytes_meta +%llu (observation buffer %llu)",
		    (unsigned long long)grown, (unsigned long long)(after.bytes_meta - before.bytes_meta),
		    (unsigned long long)observe);
	cr_assert_lt(grown, 16u << 20, "attend took %llu resident bytes", (unsigned long long)grown);
	cr_assert_gt(after.bytes_meta - before.bytes_meta, observe, "the weights must be charged as metadata");
	cr_assert_eq(tenant.bytes_meta, after.bytes_meta, "the sequence's bytes_meta is what the tenant was charged");
	cr_assert_eq(kvp_seq_step(seq), KVP_OK, "%s", kvp_last_error());
	kvp_pool_close(pool);
}

/* bytes_meta of a fresh sequence of shape sh under a tenant with spec (its own pool each). */
static kvp_status fresh_meta(const char *spec, const kvp_shape *sh, uint64_t *meta, uint64_t *tenant_used)
{
	kvp_stats st = { .size = sizeof st };
	kvp_pool *pool;
	kvp_tenant *t;
	kvp_seq *seq;
	kvp_status rc;

	cr_assert_eq(kvp_pool_open("", &pool), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(pool, "meta", spec, &t), KVP_OK, "%s: %s", spec, kvp_last_error());
	rc = kvp_seq_open(t, sh, &seq);
	if (rc == KVP_OK) {
		cr_assert_eq(kvp_seq_stats(seq, &st), KVP_OK);
		*meta = st.bytes_meta;
	}
	cr_assert_eq(kvp_tenant_stats(t, &st), KVP_OK);
	*tenant_used = st.bytes_meta;
	kvp_pool_close(pool);
	return rc;
}

/*
 * TriAttention's online statistics are three doubles per (layer, query head, band): 3 x 8 x 32 x 64 x 8
 * = 384 KiB for this shape, the sequence's own history. They are charged to the tenant and shown in the
 * sequence's bytes_meta, which a sequence whose policy keeps nothing (StreamingLLM) does not have.
 */
Test(evict, a_policy_state_is_charged_and_shown_in_bytes_meta)
{
	const kvp_shape sh = { 8, 32, 8, 128, 1e4f, KVP_ROPE_HALF };
	uint64_t tria = 0, streaming = 0, tria_tenant = 0, streaming_tenant = 0;

	cr_assert_eq(fresh_meta("policy=triattention(stats=online,budget=256)", &sh, &tria, &tria_tenant), KVP_OK,
		     "%s", kvp_last_error());
	cr_assert_eq(fresh_meta("policy=streaming(sinks=4,window=256)", &sh, &streaming, &streaming_tenant), KVP_OK,
		     "%s", kvp_last_error());
	cr_log_info("bytes_meta of a fresh sequence: triattention %llu, streaming %llu",
		    (unsigned long long)tria, (unsigned long long)streaming);
	cr_assert_geq(tria - streaming, 3ull * 8 * 32 * 64 * 8, "the online statistics must count in bytes_meta");
	cr_assert_eq(tria, tria_tenant, "and be charged to the tenant");
	cr_assert_eq(streaming, streaming_tenant);
}

/* A quota that cannot hold a policy's state refuses the sequence, with nothing left charged. */
Test(evict, a_policy_state_over_the_quota_refuses_the_sequence)
{
	const kvp_shape sh = { 8, 32, 8, 128, 1e4f, KVP_ROPE_HALF };
	uint64_t meta = 0, used = 1;

	cr_assert_eq(fresh_meta("quota=256KiB,policy=triattention(stats=online,budget=256)", &sh, &meta, &used),
		     KVP_ENOMEM);
	cr_assert(strstr(kvp_last_error(), "triattention"), "%s", kvp_last_error());
	cr_assert(strstr(kvp_last_error(), "quota"), "%s", kvp_last_error());
	cr_assert_eq(used, 0, "a refused sequence leaves nothing charged");
	cr_assert_eq(fresh_meta("quota=1MiB,policy=triattention(stats=online,budget=256)", &sh, &meta, &used), KVP_OK,
		     "%s", kvp_last_error());
}

/* A TriAttention whose score notes the tenant's bytes_meta while the round runs. */
static kvp_tenant *watched;
static uint64_t meta_while_scoring;
static struct kvp_policy_ops watching_tria;

static kvp_status watching_score(struct kvp_policy *p, uint32_t layer, uint32_t kv_head, int64_t t0, uint32_t n,
				 const int32_t *pos, const float *k, float *scores)
{
	kvp_stats st = { .size = sizeof st };

	cr_assert_eq(kvp_tenant_stats(watched, &st), KVP_OK);
	meta_while_scoring = st.bytes_meta > meta_while_scoring ? st.bytes_meta : meta_while_scoring;
	return kvp_policy_triattention.score(p, layer, kv_head, t0, n, pos, k, scores);
}

/*
 * A round loads its streams' positions and keys into buffers: with select=per_head they are the round's
 * own (not the sequence's round space). They are charged to the tenant while the round runs, like the
 * policy's candidates and score rows, so the quota sees them.
 */
Test(evict, a_rounds_buffers_are_charged_while_it_runs)
{
	static float k[MAXT * ROW], v[MAXT * ROW];
	kvp_stats before = { .size = sizeof before };
	struct cache c;

	fixture_fill(k, MAXT * ROW, 51, 1.0f);
	fixture_fill(v, MAXT * ROW, 52, 1.0f);
	cache_open(&c, "block=8,sinks=4,window=8,policy=triattention(stats=online,budget=32,every=16,select=per_head)");
	watching_tria = kvp_policy_triattention;
	watching_tria.score = watching_score;
	kvp_seq_from_handle(c.seq)->policy->ops = &watching_tria;
	watched = c.tenant;
	meta_while_scoring = 0;
	cr_assert_eq(append(&c, 64, k, v), KVP_OK);
	cr_assert_eq(kvp_tenant_stats(c.tenant, &before), KVP_OK);
	cr_assert_eq(kvp_seq_step(c.seq), KVP_OK, "%s", kvp_last_error());
	cr_assert_gt(meta_while_scoring, 0, "the round must have scored for the test to mean anything");
	cr_log_info("bytes_meta %llu before the step, %llu while scoring", (unsigned long long)before.bytes_meta,
		    (unsigned long long)meta_while_scoring);
	/* 64 tokens' positions, fp32 keys and verdicts */
	cr_assert_geq(meta_while_scoring - before.bytes_meta, 64u * (D * sizeof(float) + sizeof(int32_t) + 1));
	kvp_pool_close(c.pool);
}

/*
 * A round reads and moves the blocks of every layer. When its memory (buffers, fresh blocks) passes the
 * quota and no other sequence is idle, relief must not spill the stepping sequence's own cold blocks
 * under it: the round either gets its memory or fails with KVP_ENOMEM, and the sequence reads back as
 * it was.
 */
Test(evict, a_round_over_the_quota_does_not_spill_the_blocks_it_reads)
{
	static float k[MAXT * ROW], v[MAXT * ROW], q[NH * D], out[NH * D];
	static char dir[] = "/tmp/kvpager-evict-XXXXXX";
	static int32_t pos[MAXT];
	static float gk[MAXT * D];
	const kvp_shape sh = { 2, NH, NKV, D, 1e4f, KVP_ROPE_HALF };
	char spec[256];
	kvp_pool *pool;
	kvp_tenant *t;
	kvp_seq *seq;
	uint32_t n = 0;

	cr_assert_not_null(mkdtemp(dir));
	snprintf(spec, sizeof spec, "spill=%s/spill,spill_max=16MiB", dir);
	fixture_fill(k, MAXT * ROW, 61, 1.0f);
	fixture_fill(v, MAXT * ROW, 62, 1.0f);
	fixture_fill(q, NH * D, 63, 1.0f);
	cr_assert_eq(kvp_pool_open(spec, &pool), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(pool, "a", "block=8,sinks=4,window=8,k=fp16,v=fp16,"
				     "policy=triattention(stats=online,budget=48,every=16,select=per_layer_head)", &t), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_open(t, &sh, &seq), KVP_OK, "%s", kvp_last_error());
	for (int32_t i = 0; i < 200; i++)
		pos[i] = i;
	for (uint32_t l = 0; l < 2; l++) {
		cr_assert_eq(kvp_append(seq, l, 100, pos, k, v), KVP_OK, "%s", kvp_last_error());
		cr_assert_eq(kvp_attend(seq, l, q, out), KVP_OK, "%s", kvp_last_error());
	}
	cr_assert_eq(kvp_seq_step(seq), KVP_OK, "%s", kvp_last_error()); /* the first round: blocks turn cold */
	for (uint32_t l = 0; l < 2; l++) {
		cr_assert_eq(kvp_append(seq, l, 100, pos + 100, k + 100 * ROW, v + 100 * ROW), KVP_OK, "%s",
			     kvp_last_error());
		cr_assert_eq(kvp_attend(seq, l, q, out), KVP_OK, "%s", kvp_last_error());
	}
	/* the quota now ends a few bytes above what the tenant holds (white box) */
	struct kvp_seq_obj *s = kvp_seq_from_handle(seq);
	cr_assert_gt(s->streams[0].n_cold, 0, "cold blocks are what relief would spill");
	cr_assert_eq(s->n_spilled, 0);
	kvp_stats before = { .size = sizeof before }, after = { .size = sizeof after };
	cr_assert_eq(kvp_seq_stats(seq, &before), KVP_OK);
	s->tenant->quota = atomic_load(&s->tenant->used) + 8192; /* less than the round's buffers */
	kvp_status st = kvp_seq_step(seq);
	cr_assert(st == KVP_OK || st == KVP_ENOMEM, "%d: %s", st, kvp_last_error());
	cr_log_info("a round at the quota: %s", st == KVP_OK ? "ran" : kvp_last_error());
	cr_assert_eq(kvp_seq_stats(seq, &after), KVP_OK);
	if (st != KVP_OK)
		cr_assert_eq(after.tokens_retained, before.tokens_retained, "a refused round changes nothing");
	s->tenant->quota = UINT64_MAX;
	for (uint32_t l = 0; l < 2; l++)
		for (uint32_t h = 0; h < NKV; h++)
			cr_assert_eq(kvp_gather(seq, l, h, MAXT, pos, gk, NULL, &n), KVP_OK, "%s", kvp_last_error());
	kvp_pool_close(pool);
	rmdir(dir);
}

Test(evict, kivi_key_blocks_are_kept_or_dropped_whole)
{
	static float k[MAXT * ROW], v[MAXT * ROW], q[NH * D], out[NH * D];
	struct cache c;
	uint32_t rounds_with_cold = 0;

	fixture_fill(k, MAXT * ROW, 9, 1.0f);
	fixture_fill(v, MAXT * ROW, 10, 1.0f);
	cache_open(&c, "block=32,sinks=4,window=32,k=kivi(bits=2),v=kivi(bits=2),policy=h2o(heavy=0.5,recent=0.1)");
	cr_assert_eq(append(&c, 128, k, v), KVP_OK);
	for (int step = 0; step < 300; step++) {
		fixture_fill(q, NH * D, 200 + step, 1.0f);
		cr_assert_eq(append(&c, 1, k, v), KVP_OK);
		cr_assert_eq(kvp_attend(c.seq, 0, q, out), KVP_OK);
		cr_assert_eq(kvp_seq_step(c.seq), KVP_OK, "%s", kvp_last_error());
		for (uint32_t h = 0; h < NKV; h++) {
			const struct kvp_stream *st = kvp_seq_stream(kvp_seq_from_handle(c.seq), 0, h);
			for (uint32_t i = 0; i < st->n_cold; i++)
				cr_assert_eq(st->blocks[i]->n, 32, "a KIVI key block lost tokens");
			rounds_with_cold += st->n_cold > 0;
		}
	}
	cr_assert_gt(rounds_with_cold, 100);
	kvp_pool_close(c.pool);
}

/*
 * StreamingLLM drops the oldest tokens: the blocks that lose them are a prefix of the stream, so a round
 * on a stream of eight blocks or more repacks only those and reuses every later block as it is (at most
 * one partly filled block besides the last), instead of repacking the whole stream at every step; the
 * kept set is still sinks + window.
 */
Test(evict, streaming_rounds_reuse_the_blocks_after_the_oldest)
{
	static float k[MAXT * ROW], v[MAXT * ROW];
	int32_t pos[MAXT];
	struct cache c;

	fixture_fill(k, MAXT * ROW, 21, 1.0f);
	fixture_fill(v, MAXT * ROW, 22, 1.0f);
	cache_open(&c, "block=8,sinks=4,window=77,policy=streaming(sinks=4,window=77)");
	cr_assert_eq(append(&c, 120, k, v), KVP_OK);
	cr_assert_eq(kvp_seq_step(c.seq), KVP_OK, "%s", kvp_last_error());
	for (int step = 0; step < 100; step++) {
		const struct kvp_stream *st = kvp_seq_stream(kvp_seq_from_handle(c.seq), 0, 0);
		struct kvp_block *before[MAXT / 8];
		uint32_t n_before = st->n_blocks, partial = 0, reused = 0;

		memcpy(before, st->blocks, n_before * sizeof *before);
		cr_assert_eq(append(&c, 1 + step % 3, k, v), KVP_OK);
		cr_assert_eq(kvp_seq_step(c.seq), KVP_OK, "%s", kvp_last_error());
		for (uint32_t i = 0; i < st->n_blocks; i++) {
			partial += i + 1 < st->n_blocks && st->blocks[i]->n != 8;
			for (uint32_t j = 1; j + 1 < n_before; j++)
				reused += st->blocks[i] == before[j];
		}
		cr_assert_leq(partial, 1, "step %d: %u partly filled blocks before the last", step, partial);
		cr_assert_geq(reused + 3, n_before, "step %d: only %u of %u blocks reused", step, reused, n_before);
		for (uint32_t h = 0; h < NKV; h++) {
			cr_assert_eq(positions(&c, h, pos), 81);
			for (int i = 0; i < 4; i++)
				cr_assert_eq(pos[i], i);
			for (int i = 4; i < 81; i++)
				cr_assert_eq(pos[i], (int32_t)c.t - 81 + i);
		}
	}
	kvp_pool_close(c.pool);
}

/*
 * On a short stream a reused run would keep a partly filled block beside the partly filled newest one,
 * a block of memory for a few copies saved: rounds there pack the survivors into as few blocks as they
 * fill, whatever they keep.
 */
Test(evict, streaming_rounds_on_a_short_stream_take_no_more_blocks_than_the_tokens_fill)
{
	static float k[MAXT * ROW], v[MAXT * ROW];
	struct cache c;

	fixture_fill(k, MAXT * ROW, 23, 1.0f);
	fixture_fill(v, MAXT * ROW, 24, 1.0f);
	cache_open(&c, "block=8,sinks=4,window=45,policy=streaming(sinks=4,window=45)");
	cr_assert_eq(append(&c, 80, k, v), KVP_OK);
	for (int step = 0; step < 100; step++) {
		cr_assert_eq(append(&c, 1 + step % 3, k, v), KVP_OK);
		cr_assert_eq(kvp_seq_step(c.seq), KVP_OK, "%s", kvp_last_error());
		for (uint32_t h = 0; h < NKV; h++) {
			const struct kvp_stream *st = kvp_seq_stream(kvp_seq_from_handle(c.seq), 0, h);
			uint32_t tokens = 0;

			for (uint32_t i = 0; i < st->n_blocks; i++)
				tokens += st->blocks[i]->n;
			cr_assert_eq(st->n_blocks, (tokens + 7) / 8, "step %d, head %u: %u blocks for %u tokens", step,
				     h, st->n_blocks, tokens);
		}
	}
	kvp_pool_close(c.pool);
}

/* ---- StreamingLLM's positional round against the general one ---- */

/* StreamingLLM's vtable without keeps_newest: the same scores through gathering, scoring and selection. */
static struct kvp_policy_ops scored_streaming;

static void force_general_path(kvp_seq *seq)
{
	scored_streaming = kvp_policy_streaming;
	scored_streaming.keeps_newest = 0;
	kvp_seq_from_handle(seq)->policy->ops = &scored_streaming;
}

/* The same sequence twice: positional rounds in fast, scored rounds in general. */
struct twin {
	struct cache fast, general;
};

static void twin_fork(const struct twin *parent, struct twin *child)
{
	*child = *parent;
	cr_assert_eq(kvp_seq_fork(parent->fast.seq, &child->fast.seq), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_fork(parent->general.seq, &child->general.seq), KVP_OK, "%s", kvp_last_error());
}

/* Appends n tokens of k, v to both, attends with q, steps, and compares outputs and every stream. */
static void twin_step(struct twin *w, uint32_t n, const float *k, const float *v, const float *q, const char *what)
{
	static float out_fast[NH * D], out_general[NH * D], k_fast[MAXT * D], k_general[MAXT * D];
	static float v_fast[MAXT * D], v_general[MAXT * D];
	int32_t pos_fast[MAXT], pos_general[MAXT];
	uint32_t n_fast, n_general;

	cr_assert_eq(append(&w->fast, n, k, v), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(append(&w->general, n, k, v), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_step(w->fast.seq), KVP_OK, "%s: %s", what, kvp_last_error());
	cr_assert_eq(kvp_seq_step(w->general.seq), KVP_OK, "%s: %s", what, kvp_last_error());
	cr_assert_eq(kvp_attend(w->fast.seq, 0, q, out_fast), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_attend(w->general.seq, 0, q, out_general), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(memcmp(out_fast, out_general, sizeof out_fast), 0, "%s at t=%u: attention differs", what, w->fast.t);
	for (uint32_t h = 0; h < NKV; h++) {
		cr_assert_eq(kvp_gather(w->fast.seq, 0, h, MAXT, pos_fast, k_fast, v_fast, &n_fast), KVP_OK);
		cr_assert_eq(kvp_gather(w->general.seq, 0, h, MAXT, pos_general, k_general, v_general, &n_general), KVP_OK);
		cr_assert_eq(n_fast, n_general, "%s at t=%u, head %u: %u tokens kept against %u", what, w->fast.t, h,
			     n_fast, n_general);
		cr_assert_eq(memcmp(pos_fast, pos_general, n_fast * sizeof *pos_fast), 0, "%s at t=%u: kept positions",
			     what, w->fast.t);
		cr_assert_eq(memcmp(k_fast, k_general, (size_t)n_fast * D * sizeof *k_fast), 0, "%s: keys", what);
		cr_assert_eq(memcmp(v_fast, v_general, (size_t)n_fast * D * sizeof *v_fast), 0, "%s: values", what);
	}
}

/*
 * Sinks and window of the pager and of the policy, every > 1, a pinned prompt (a prompt longer than the
 * free slots competes with the newer tokens), a TurboQuant cold tier and KIVI keys (blocks dropped whole);
 * from step 60 a fork of each runs on other tokens, sharing the parents' blocks. (Gating is refused with
 * StreamingLLM: it protects its whole budget, so no head's budget moves.)
 */
Test(evict, streaming_fast_path_keeps_what_the_general_path_keeps)
{
	static const struct { const char *spec; uint32_t prompt; } cases[] = {
		{ "block=8,sinks=4,window=13,policy=streaming(sinks=4,window=29)", 50 },
		{ "block=8,sinks=2,window=8,policy=streaming(sinks=6,window=21,every=5)", 3 },
		{ "block=8,sinks=4,window=8,pin_prompt=1,policy=streaming(sinks=4,window=40)", 30 },
		{ "block=8,sinks=4,window=8,policy=streaming(sinks=4,window=24,pin_prompt=1)", 70 },
		{ "block=8,sinks=4,window=16,policy=streaming(sinks=4,window=37,every=3)", 64 },
		{ "block=8,sinks=4,window=16,k=turboquant(bits=4),v=turboquant(bits=4),policy=streaming(sinks=4,window=37)",
		  64 },
		{ "block=32,sinks=4,window=32,k=kivi(bits=2),v=kivi(bits=2),policy=streaming(sinks=4,window=70)", 100 },
	};
	static float k[MAXT * ROW], v[MAXT * ROW], k2[MAXT * ROW], v2[MAXT * ROW], q[NH * D];

	fixture_fill(k, MAXT * ROW, 31, 1.0f);
	fixture_fill(v, MAXT * ROW, 32, 1.0f);
	fixture_fill(k2, MAXT * ROW, 33, 1.0f);
	fixture_fill(v2, MAXT * ROW, 34, 1.0f);
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		struct twin w, fork;
		cache_open(&w.fast, cases[i].spec);
		cache_open(&w.general, cases[i].spec);
		force_general_path(w.general.seq);
		fixture_fill(q, NH * D, 35, 1.0f);
		twin_step(&w, cases[i].prompt, k, v, q, cases[i].spec);
		for (uint32_t step = 0; step < 200; step++) {
			fixture_fill(q, NH * D, 400 + step, 1.0f);
			if (step == 60)
				twin_fork(&w, &fork);
			twin_step(&w, 1 + step % 3, k, v, q, cases[i].spec);
			if (step >= 60)
				twin_step(&fork, 1 + step % 2, k2, v2, q, cases[i].spec);
		}
		cr_assert_eq(kvp_seq_from_handle(w.fast.seq)->round_space.bytes, 0, "%s: the fast path loaded a stream",
			     cases[i].spec);
		kvp_pool_close(w.fast.pool);
		kvp_pool_close(w.general.pool);
	}
}

Test(evict, round_that_cannot_be_paid_for_changes_nothing)
{
	static float k[MAXT * ROW], v[MAXT * ROW];
	kvp_stats before = { .size = sizeof before }, after = { .size = sizeof after };
	int32_t p0[MAXT], p1[MAXT];
	struct cache c;
	uint32_t n0, n1;

	fixture_fill(k, MAXT * ROW, 11, 1.0f);
	fixture_fill(v, MAXT * ROW, 12, 1.0f);
	/* window=13 is not a multiple of block=8: survivors must be repacked into fresh blocks */
	cache_open(&c, "block=8,sinks=4,window=13,quota=48KiB,policy=streaming(sinks=4,window=13)");
	while (append(&c, 1, k, v) == KVP_OK)
		cr_assert_lt(c.t, MAXT);
	/* a second sequence takes what the failed append gave back, so nothing is left for fresh blocks */
	const kvp_shape sh = { 1, NH, NKV, D, 1e4f, KVP_ROPE_HALF };
	kvp_seq *other;
	int32_t p = 0;
	cr_assert_eq(kvp_seq_open(c.tenant, &sh, &other), KVP_OK);
	while (kvp_append(other, 0, 1, &p, k, v) == KVP_OK)
		p++;
	cr_assert_eq(kvp_seq_stats(c.seq, &before), KVP_OK);
	n0 = positions(&c, 0, p0);
	kvp_status rc = kvp_seq_step(c.seq);
	cr_assert_eq(rc, KVP_ENOMEM, "t=%u rc=%d %s", c.t, rc, kvp_last_error());
	cr_assert(strstr(kvp_last_error(), "policy round"), "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_stats(c.seq, &after), KVP_OK);
	cr_assert_eq(memcmp(&before, &after, sizeof before), 0);
	n1 = positions(&c, 0, p1);
	cr_assert_eq(n1, n0);
	cr_assert_eq(memcmp(p0, p1, n0 * sizeof *p0), 0);
	kvp_pool_close(c.pool);
}

Test(evict, triattention_keeps_every_stream_within_budget_plus_every)
{
	static float k[MAXT * ROW], v[MAXT * ROW], q[NH * D], out[NH * D];
	struct cache c;

	fixture_fill(k, MAXT * ROW, 13, 1.0f);
	fixture_fill(v, MAXT * ROW, 14, 1.0f);
	cache_open(&c, "block=16,sinks=4,window=16,policy=triattention(budget=64,every=16,stats=online)");
	cr_assert_eq(append(&c, 100, k, v), KVP_OK);
	cr_assert_eq(kvp_attend(c.seq, 0, q, out), KVP_OK);
	cr_assert_eq(kvp_seq_step(c.seq), KVP_OK, "%s", kvp_last_error());
	for (int step = 0; step < 300; step++) {
		fixture_fill(q, NH * D, 300 + step, 1.0f);
		cr_assert_eq(append(&c, 1, k, v), KVP_OK);
		cr_assert_eq(kvp_attend(c.seq, 0, q, out), KVP_OK);
		cr_assert_eq(kvp_seq_step(c.seq), KVP_OK, "%s", kvp_last_error());
		for (uint32_t h = 0; h < NKV; h++)
			cr_assert_leq(kvp_seq_stream(kvp_seq_from_handle(c.seq), 0, h)->n_tokens, 64 + 16 - 1, "step %d", step);
	}
	kvp_pool_close(c.pool);
}

Test(evict, positions_must_increase_with_a_policy)
{
	static float k[4 * ROW], v[4 * ROW];
	int32_t pos[2] = { 5, 5 };
	struct cache c;

	cache_open(&c, "policy=streaming(sinks=4,window=16)");
	cr_assert_eq(kvp_append(c.seq, 0, 2, pos, k, v), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "increase"), "%s", kvp_last_error());
	kvp_pool_close(c.pool);
}

/* ---- the real model ---- */

/*
 * offsets=10: the spec's 17 offsets reach 65536 positions, far past kjv-64's 512, and the far offsets
 * then dominate the score (measured: 0.090 with 17 offsets, worse than StreamingLLM's 0.086). With
 * offsets up to the model's length: TriAttention 0.081, StreamingLLM 0.086, stacked with TurboQuant
 * 4-bit 0.085, argmax 320/320. Calibrated statistics (kvpager-calibrate on other kjv-64 text) give 0.076.
 */
Test(evict, kjv64_at_half_the_tokens_triattention_beats_streaming_and_stacks_with_turboquant,
     .timeout = 300)
{
	enum { STEPS = 320, BUDGET = 160 };
	static int tokens[STEPS], exact_top[STEPS], top[STEPS];
	char err[LLAMA_ERROR_MAX] = "", spec[256];
	struct llama_model m;
	struct attention_tap exact, tri, stream, stacked;
	double tri_mean, stream_mean, stacked_mean, worst;
	int agree = 0;

	cr_assert_eq(llama_model_load(&m, model_path("kjv-64.bin"), err), LLAMA_OK, "%s", err);
	tap_open(&exact, &m, STEPS);
	tap_open(&tri, &m, STEPS);
	tap_open(&stream, &m, STEPS);
	tap_open(&stacked, &m, STEPS);
	greedy_tokens(&m, tokens, STEPS);
	run_exact(&m, tokens, STEPS, &exact, exact_top);
	snprintf(spec, sizeof spec, "block=16,sinks=4,window=16,policy=streaming(sinks=4,window=%d)", BUDGET - 4);
	run_spec(&m, spec, tokens, STEPS, &stream, top, NULL);
	snprintf(spec, sizeof spec, "block=16,sinks=4,window=16,policy=triattention(budget=%d,every=16,stats=online,offsets=10)",
		 BUDGET);
	run_spec(&m, spec, tokens, STEPS, &tri, top, NULL);
	snprintf(spec, sizeof spec, "block=16,sinks=4,window=16,policy=triattention(budget=%d,every=16,stats=online,offsets=10),"
		 "k=turboquant(bits=4),v=turboquant(bits=4)", BUDGET);
	kvp_stats st = { .size = sizeof st };
	run_spec(&m, spec, tokens, STEPS, &stacked, top, &st);
	/* the metric: mean relative L2 error of every layer's attention output over the steps after the
	 * first eviction (position BUDGET on), against the exact cache */
	attention_errors(&m, &exact, &stream, BUDGET, STEPS, &stream_mean, &worst);
	attention_errors(&m, &exact, &tri, BUDGET, STEPS, &tri_mean, &worst);
	attention_errors(&m, &exact, &stacked, BUDGET, STEPS, &stacked_mean, &worst);
	for (int pos = 0; pos < STEPS; pos++)
		agree += exact_top[pos] == top[pos];
	cr_log_info("kjv-64 at %d of %d tokens: attention error StreamingLLM %.4f, TriAttention %.4f, "
		    "TriAttention+TurboQuant4 %.4f (argmax agreement %d/%d, %llu compressed bytes)", BUDGET, STEPS,
		    stream_mean, tri_mean, stacked_mean, agree, STEPS, (unsigned long long)st.bytes_compressed);
	cr_assert_lt(tri_mean, stream_mean, "TriAttention %g against StreamingLLM %g", tri_mean, stream_mean);
	cr_assert_lt(stacked_mean, tri_mean * 1.25, "TurboQuant 4-bit on top adds little: %g vs %g", stacked_mean,
		     tri_mean);
	cr_assert_gt(st.bytes_compressed, 0);
	cr_assert_geq(agree, STEPS * 9 / 10, "argmax agreement %d / %d", agree, STEPS);
	free(exact.out), free(tri.out), free(stream.out), free(stacked.out);
	llama_model_free(&m);
}

/*
 * A block's positions: a run of appended tokens stores none; gaps make a survivor bitmap when that is
 * smaller than an int32 each, else int32s; a tail whose run a later append breaks gets them made whole.
 * kvp_gather reads back every position exactly, and bytes_meta counts what is stored.
 */
Test(evict, block_positions_are_a_run_a_bitmap_or_int32s_and_read_back_exactly)
{
	static float k[MAXT * ROW], v[MAXT * ROW];
	int32_t want[64], got[MAXT];
	struct cache c;
	uint32_t n = 0, got_n;
	kvp_stats before = { .size = sizeof before }, after = { .size = sizeof after };

	fixture_fill(k, MAXT * ROW, 1, 1.0f);
	fixture_fill(v, MAXT * ROW, 2, 1.0f);
	cache_open(&c, "block=16,sinks=0,window=0,store=fp16");
	for (int32_t i = 0; i < 16; i++)
		want[n++] = i;             /* block 0: a run */
	for (int32_t i = 0; i < 16; i++)
		want[n++] = 100 + 2 * i;   /* block 1: every other position, a bitmap of 31 bits */
	for (int32_t i = 0; i < 16; i++)
		want[n++] = 1000 + 4000 * i; /* block 2: far apart, int32s */
	for (int32_t i = 0; i < 8; i++)
		want[n++] = 70000 + i;     /* block 3: a run, then broken by the next append */
	cr_assert_eq(kvp_append(c.seq, 0, n, want, k, v), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_stats(c.seq, &before), KVP_OK);
	for (int32_t i = 0; i < 8; i++)
		want[n++] = 70010 + i;
	cr_assert_eq(kvp_append(c.seq, 0, 8, want + 56, k, v), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_stats(c.seq, &after), KVP_OK);
	for (uint32_t h = 0; h < NKV; h++) {
		const struct kvp_stream *st = kvp_seq_stream(kvp_seq_from_handle(c.seq), 0, h);
		cr_assert_eq(kvp_gather(c.seq, 0, h, MAXT, got, NULL, NULL, &got_n), KVP_OK, "%s", kvp_last_error());
		cr_assert_eq(got_n, n);
		cr_assert_eq(memcmp(got, want, n * sizeof *got), 0, "KV head %u reads back its positions", h);
		cr_assert_eq(st->n_blocks, 4);
		cr_assert_null(st->blocks[0]->positions, "a run stores no positions");
		cr_assert_eq(st->blocks[1]->positions->kind, KVP_POSITIONS_BITMAP);
		cr_assert_eq(st->blocks[2]->positions->kind, KVP_POSITIONS_INT32);
		cr_assert_eq(st->blocks[3]->positions->kind, KVP_POSITIONS_BITMAP, "the broken run is a bitmap now");
		for (uint32_t i = 0; i < 16; i++)
			cr_assert_eq(kvp_block_pos(st->blocks[3], i), want[48 + i], "token %u of the last block", i);
	}
	/* the last block's bitmap (18 bits: one word) is what the second append added to the metadata */
	cr_assert_eq(after.bytes_meta - before.bytes_meta, (uint64_t)NKV * 32, "%llu",
		     (unsigned long long)(after.bytes_meta - before.bytes_meta));
	kvp_seq_close(c.seq);
	kvp_tenant_close(c.tenant);
	kvp_pool_close(c.pool);
}

/* What attend hands the policy (the weights of a stream's tokens) lives for one kvp_attend: sized by the
 * longest stream, it would otherwise be metadata every token pays for between calls. */
Test(evict, the_observation_buffer_is_not_held_between_attends)
{
	static float k[MAXT * ROW], v[MAXT * ROW], q[NH * D], out[NH * D];
	struct cache c;

	fixture_fill(k, MAXT * ROW, 3, 1.0f);
	fixture_fill(v, MAXT * ROW, 4, 1.0f);
	fixture_fill(q, NH * D, 5, 1.0f);
	cache_open(&c, "block=16,sinks=4,window=16,policy=h2o(heavy=0.25,recent=0.25)");
	cr_assert_eq(append(&c, 300, k, v), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_attend(c.seq, 0, q, out), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_from_handle(c.seq)->observe.bytes, 0, "the observation outlived its attend");
	cr_assert_eq(kvp_seq_step(c.seq), KVP_OK, "%s", kvp_last_error());
	cr_assert_lt(kvp_seq_stream(kvp_seq_from_handle(c.seq), 0, 0)->n_tokens, 300, "H2O saw the weights and ran");
	kvp_seq_close(c.seq);
	kvp_tenant_close(c.tenant);
	kvp_pool_close(c.pool);
}

/* A sequence of few streams does not keep its round space between rounds: sized by its longest stream,
 * an fp32 key per token, it would be most of the sequence's metadata (TriAttention per layer and head). */
Test(evict, the_round_space_of_a_sequence_of_few_streams_is_not_kept)
{
	static float k[MAXT * ROW], v[MAXT * ROW];
	struct cache c;

	fixture_fill(k, MAXT * ROW, 6, 1.0f);
	fixture_fill(v, MAXT * ROW, 7, 1.0f);
	cache_open(&c, "block=16,sinks=4,window=16,policy=triattention(budget=64,every=16,select=per_layer_head)");
	cr_assert_eq(append(&c, 200, k, v), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_step(c.seq), KVP_OK, "%s", kvp_last_error());
	cr_assert_leq(kvp_seq_stream(kvp_seq_from_handle(c.seq), 0, 0)->n_tokens, 64, "a round ran");
	cr_assert_eq(kvp_seq_from_handle(c.seq)->round_space.bytes, 0, "the round space outlived the step");
	kvp_seq_close(c.seq);
	kvp_tenant_close(c.tenant);
	kvp_pool_close(c.pool);
}
