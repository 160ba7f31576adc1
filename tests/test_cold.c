/*
 * Suite cold: the cold tier of the pager. Full blocks that leave the hot window are encoded by the
 * tenant's k= and v= codecs; sinks and the hot window stay exact; attention, gather, fork and stats
 * see the encoded blocks; the real kjv-64 model runs with a TurboQuant cold tier.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvpager.h"
#include "pager_fixture.h"
#include "model_fixture.h"

#define D 64
#define NKV 2
#define ROW (NKV * D)

struct cache {
	kvp_pool *pool;
	kvp_tenant *tenant;
	kvp_seq *seq;
};

static void cache_open(struct cache *c, const char *spec, uint32_t n_heads)
{
	const kvp_shape sh = { 1, n_heads, NKV, D, 1e4f, KVP_ROPE_HALF };

	cr_assert_eq(kvp_pool_open("mem=256MiB", &c->pool), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(c->pool, "cold", spec, &c->tenant), KVP_OK, "%s: %s", spec, kvp_last_error());
	cr_assert_eq(kvp_seq_open(c->tenant, &sh, &c->seq), KVP_OK, "%s", kvp_last_error());
}

static void cache_close(struct cache *c)
{
	kvp_pool_close(c->pool);
}

static void append_tokens(kvp_seq *s, uint32_t from, uint32_t n, const float *k, const float *v)
{
	int32_t *pos = malloc(n * sizeof *pos);

	for (uint32_t i = 0; i < n; i++)
		pos[i] = (int32_t)(from + i);
	cr_assert_eq(kvp_append(s, 0, n, pos, k + (size_t)from * ROW, v + (size_t)from * ROW), KVP_OK, "%s",
		     kvp_last_error());
	free(pos);
}

/* Relative L2 error of stream kv_head's gathered rows [from, to) against the input rows. */
static double gathered_error(const float *got, const float *want, uint32_t kv_head, uint32_t from, uint32_t to)
{
	double num = 0, den = 0;

	for (uint32_t t = from; t < to; t++)
		for (uint32_t j = 0; j < D; j++) {
			double w = want[(size_t)t * ROW + kv_head * D + j], e = got[(size_t)t * D + j] - w;
			num += e * e;
			den += w * w;
		}
	return sqrt(num / den);
}

static void gather_all(kvp_seq *s, uint32_t kv_head, uint32_t n, int32_t *pos, float *k, float *v)
{
	uint32_t got = 0;

	cr_assert_eq(kvp_gather(s, 0, kv_head, n, pos, k, v, &got), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(got, n);
}

Test(cold, fp32_codec_cold_blocks_gather_bit_identical)
{
	enum { N = 300 };
	static float k[N * ROW], v[N * ROW], gk[N * D], gv[N * D];
	static int32_t pos[N];
	struct cache c;
	kvp_stats st = { .size = sizeof st };

	fixture_fill(k, N * ROW, 1, 1.0f);
	fixture_fill(v, N * ROW, 2, 1.0f);
	cache_open(&c, "block=16,sinks=4,window=32,k=fp32,v=fp32", 4);
	append_tokens(c.seq, 0, 100, k, v);
	for (uint32_t t = 100; t < N; t++)
		append_tokens(c.seq, t, 1, k, v);
	for (uint32_t h = 0; h < NKV; h++) {
		gather_all(c.seq, h, N, pos, gk, gv);
		for (uint32_t t = 0; t < N; t++) {
			cr_assert_eq(pos[t], (int32_t)t);
			cr_assert_eq(memcmp(gk + (size_t)t * D, k + (size_t)t * ROW + h * D, D * sizeof(float)), 0);
			cr_assert_eq(memcmp(gv + (size_t)t * D, v + (size_t)t * ROW + h * D, D * sizeof(float)), 0);
		}
	}
	cr_assert_eq(kvp_seq_stats(c.seq, &st), KVP_OK);
	/* 296 non-sink tokens, window 32: (296 - 32) / 16 = 16 full blocks are cold in each stream */
	cr_assert_eq(st.bytes_compressed, (uint64_t)NKV * 16 * 16 * D * 4 * 2, "%llu",
		     (unsigned long long)st.bytes_compressed);
	cache_close(&c);
}

/* Cold rows come back within the codec's error; sinks and the hot window come back exactly. */
static void round_trip(const char *spec, double bound)
{
	enum { N = 256 };
	static float k[N * ROW], v[N * ROW], gk[N * D], gv[N * D];
	static int32_t pos[N];
	struct cache c;
	uint32_t sinks = 4, window = 32, block = 32, cold = (N - sinks - window) / block * block;

	fixture_fill(k, N * ROW, 3, 1.0f);
	fixture_fill(v, N * ROW, 4, 1.0f);
	char tenant[320];
	snprintf(tenant, sizeof tenant, "block=%u,sinks=%u,window=%u,%s", block, sinks, window, spec);
	cache_open(&c, tenant, 4);
	append_tokens(c.seq, 0, N, k, v);
	for (uint32_t h = 0; h < NKV; h++) {
		gather_all(c.seq, h, N, pos, gk, gv);
		double ek = gathered_error(gk, k, h, sinks, sinks + cold);
		double ev = gathered_error(gv, v, h, sinks, sinks + cold);
		cr_log_info("%s: cold keys %.4g, values %.4g relative error", spec, ek, ev);
		cr_assert(ek > 0 || bound == 0, "%s: keys were not encoded", spec);
		cr_assert_leq(ek, bound, "%s keys: %g", spec, ek);
		cr_assert_leq(ev, bound, "%s values: %g", spec, ev);
		cr_assert_eq(gathered_error(gk, k, h, 0, sinks), 0.0, "%s: sinks must stay exact", spec);
		cr_assert_eq(gathered_error(gk, k, h, sinks + cold, N), 0.0, "%s: the hot window must stay exact", spec);
		cr_assert_eq(gathered_error(gv, v, h, sinks + cold, N), 0.0, "%s", spec);
	}
	cache_close(&c);
}

Test(cold, fp16_cold_blocks_round_trip)
{
	round_trip("k=fp16,v=fp16", 1e-3);
}

/* MSE 0.0093 per unit vector at 4 bits: about 0.1 relative L2 error */
Test(cold, turboquant_4bit_cold_blocks_round_trip)
{
	round_trip("k=turboquant(bits=4),v=turboquant(bits=4)", 0.12);
}

Test(cold, turboquant_2bit_cold_blocks_round_trip)
{
	round_trip("k=turboquant(bits=2),v=turboquant(bits=2)", 0.4);
}

Test(cold, kivi_4bit_cold_blocks_round_trip)
{
	round_trip("k=kivi(bits=4),v=kivi(bits=4)", 0.12);
}

/* The pager's cold keys are exactly what the codec on its own makes of the same blocks, in order. */
static void keys_match_the_codec(const char *codec)
{
	enum { N = 256, B = 32, SINKS = 4, WINDOW = 32 };
	static float k[N * ROW], v[N * ROW], gk[N * D], rows[B * D], want[B * D];
	static int32_t pos[N];
	char tenant[320];
	struct cache c;
	kvp_codec *alone;
	uint32_t cold_blocks = (N - SINKS - WINDOW) / B;

	fixture_fill(k, N * ROW, 21, 1.0f);
	fixture_fill(v, N * ROW, 22, 1.0f);
	snprintf(tenant, sizeof tenant, "block=%d,sinks=%d,window=%d,k=%s", B, SINKS, WINDOW, codec);
	cache_open(&c, tenant, 4);
	append_tokens(c.seq, 0, N, k, v);
	gather_all(c.seq, 1, N, pos, gk, NULL);
	cr_assert_eq(kvp_codec_open(codec, D, &alone), KVP_OK, "%s", kvp_last_error());
	void *bytes = malloc(kvp_codec_bytes(alone, B));
	for (uint32_t b = 0; b < cold_blocks; b++) {
		for (uint32_t t = 0; t < B; t++)
			memcpy(rows + t * D, k + (size_t)(SINKS + b * B + t) * ROW + 1 * D, D * sizeof(float));
		cr_assert_eq(kvp_codec_encode(alone, B, rows, bytes), KVP_OK, "%s", kvp_last_error());
		cr_assert_eq(kvp_codec_decode(alone, B, bytes, want), KVP_OK, "%s", kvp_last_error());
		cr_assert_eq(memcmp(gk + (size_t)(SINKS + b * B) * D, want, sizeof want), 0,
			     "%s: cold block %u differs from the codec's own round trip", codec, b);
	}
	cr_assert_neq(memcmp(gk + SINKS * D, k + SINKS * ROW + D, D * sizeof(float)), 0, "%s: encoded", codec);
	free(bytes);
	kvp_codec_close(alone);
	cache_close(&c);
}

Test(cold, every_codec_round_trips_through_cold_blocks_as_it_does_alone)
{
	keys_match_the_codec("fp16");
	keys_match_the_codec("turboquant(bits=3)");
	keys_match_the_codec("turboquant(bits=3,qjl=1)");
	keys_match_the_codec("turboquant(bits=2,outliers=16,outlier_bits=3)");
	keys_match_the_codec("kivi(bits=2)");
	keys_match_the_codec("spark(keep=0.5)|turboquant(bits=4)");
	keys_match_the_codec("spark(keep=0.75)");
	keys_match_the_codec("spark(keep=0.5,quantize=all)|turboquant(bits=4)");
}

/* Relative error of the cold tokens' keys over channels [0, channels) of KV head 0. */
static double spark_error_on_channels(int observe_first, uint32_t channels)
{
	enum { N = 96, NH = 4 };
	static float k[N * ROW], v[N * ROW], q[NH * D], out[NH * D], gk[N * D];
	static int32_t pos[N];
	struct cache c;
	double num = 0, den = 0;
	kvp_stats st = { .size = sizeof st };

	fixture_fill(k, N * ROW, 31, 1.0f);
	fixture_fill(v, N * ROW, 32, 1.0f);
	/* every query lives on the first channels only */
	memset(q, 0, sizeof q);
	for (uint32_t h = 0; h < NH; h++)
		for (uint32_t j = 0; j < channels; j++)
			q[h * D + j] = 1.0f + 0.1f * (float)j;
	cache_open(&c, "block=16,sinks=0,window=16,k=spark(keep=0.25)", NH);
	append_tokens(c.seq, 0, 16, k, v);
	if (observe_first)
		cr_assert_eq(kvp_attend(c.seq, 0, q, out), KVP_OK, "%s", kvp_last_error());
	for (uint32_t t = 16; t < N; t++)
		append_tokens(c.seq, t, 1, k, v);
	gather_all(c.seq, 0, N, pos, gk, NULL);
	for (uint32_t t = 0; t < N - 16; t++)
		for (uint32_t j = 0; j < channels; j++) {
			double w = k[(size_t)t * ROW + j], e = gk[(size_t)t * D + j] - w;
			num += e * e;
			den += w * w;
		}
	cr_assert_eq(kvp_seq_stats(c.seq, &st), KVP_OK);
	cr_assert_gt(st.bytes_compressed, 0);
	kvp_seq_close(c.seq);
	cr_assert_eq(kvp_tenant_stats(c.tenant, &st), KVP_OK);
	cr_assert_eq(st.bytes_exact + st.bytes_compressed + st.bytes_meta, 0, "the query ring is freed too");
	cache_close(&c);
	return sqrt(num / den);
}

Test(cold, spark_keeps_the_channels_the_observed_queries_use)
{
	/* keep=0.25 of 64 channels is 16: exactly the channels the queries live on */
	double seen = spark_error_on_channels(1, 16), blind = spark_error_on_channels(0, 16);

	cr_log_info("SparK keys on the queried channels: error %.4f with queries observed, %.4f without", seen, blind);
	cr_assert_lt(seen, 1e-3, "the queried channels are kept (fp16): %g", seen);
	cr_assert_gt(blind, 0.3, "without queries, k^2 alone drops many of them: %g", blind);
}

Test(cold, block_not_a_multiple_of_the_codec_group_is_rejected)
{
	kvp_pool *pool;
	kvp_tenant *t;

	cr_assert_eq(kvp_pool_open("mem=16MiB", &pool), KVP_OK);
	cr_assert_eq(kvp_tenant_open(pool, "a", "block=48,k=kivi(bits=2)", &t), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "block=48") && strstr(kvp_last_error(), "kivi"), "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(pool, "a", "block=64,k=turboquant(bits=7)", &t), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "turboquant"), "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(pool, "a", "k=nosuchcodec", &t), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "nosuchcodec"), "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(pool, "a", "block=64,k=kivi(bits=2),v=turboquant(bits=3)", &t), KVP_OK,
		     "%s", kvp_last_error());
	kvp_pool_close(pool);
}

Test(cold, append_that_cannot_pay_for_its_cold_blocks_changes_nothing)
{
	enum { N = 200 };
	static float k[N * ROW], v[N * ROW], gk[N * D];
	static int32_t pos[N];
	kvp_stats before = { .size = sizeof before }, after = { .size = sizeof after };
	struct cache c;
	uint32_t got = 0;
	kvp_status st;

	fixture_fill(k, N * ROW, 5, 1.0f);
	fixture_fill(v, N * ROW, 6, 1.0f);
	cache_open(&c, "block=16,sinks=0,window=16,quota=64KiB,k=turboquant(bits=4),v=turboquant(bits=4)", 2);
	append_tokens(c.seq, 0, 40, k, v);
	cr_assert_eq(kvp_seq_stats(c.seq, &before), KVP_OK);
	for (int i = 0; i < N; i++)
		pos[i] = 40 + i;
	/* 160 tokens need 10 exact blocks per stream plus the cold blocks they turn into: past 64 KiB */
	st = kvp_append(c.seq, 0, 160, pos, k + 40 * ROW, v + 40 * ROW);
	cr_assert_eq(st, KVP_ENOMEM, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_stats(c.seq, &after), KVP_OK);
	cr_assert_eq(memcmp(&before, &after, sizeof before), 0, "a failed append must leave the stats alone");
	cr_assert_eq(kvp_gather(c.seq, 0, 0, N, NULL, gk, NULL, &got), KVP_OK);
	cr_assert_eq(got, 40);
	cache_close(&c);
}

Test(cold, fork_shares_cold_blocks_and_both_sides_attend_the_same)
{
	enum { N = 160, NH = 4 };
	static float k[(N + 1) * ROW], v[(N + 1) * ROW], q[NH * D], a[NH * D], b[NH * D];
	kvp_stats s1 = { .size = sizeof s1 }, t1 = { .size = sizeof t1 }, t2 = { .size = sizeof t2 };
	struct cache c;
	kvp_seq *fork;

	fixture_fill(k, (N + 1) * ROW, 7, 1.0f);
	fixture_fill(v, (N + 1) * ROW, 8, 1.0f);
	fixture_fill(q, NH * D, 9, 1.0f);
	cache_open(&c, "block=16,sinks=4,window=16,k=turboquant(bits=3),v=turboquant(bits=3)", NH);
	append_tokens(c.seq, 0, N, k, v);
	cr_assert_eq(kvp_tenant_stats(c.tenant, &t1), KVP_OK);
	cr_assert_eq(kvp_seq_fork(c.seq, &fork), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_stats(c.tenant, &t2), KVP_OK);
	cr_assert_eq(t2.bytes_compressed, t1.bytes_compressed, "a fork shares the cold blocks");
	cr_assert_eq(kvp_attend(c.seq, 0, q, a), KVP_OK);
	cr_assert_eq(kvp_attend(fork, 0, q, b), KVP_OK);
	cr_assert_eq(memcmp(a, b, sizeof a), 0);
	/* the fork grows on its own; the original still attends as before */
	append_tokens(fork, N, 1, k, v);
	kvp_seq_close(c.seq);
	cr_assert_eq(kvp_seq_stats(fork, &s1), KVP_OK);
	cr_assert_gt(s1.bytes_compressed, 0);
	cr_assert_eq(kvp_attend(fork, 0, q, b), KVP_OK);
	kvp_seq_close(fork);
	cr_assert_eq(kvp_tenant_stats(c.tenant, &t2), KVP_OK);
	cr_assert_eq(t2.bytes_compressed + t2.bytes_exact + t2.bytes_meta, 0, "everything freed");
	cache_close(&c);
}

/* Attention over a cache whose cold tier is encoded, against exact softmax attention in double. */
static double attention_error(const char *spec)
{
	enum { N = 400, NH = 8 };
	static float k[N * ROW], v[N * ROW], q[NH * D], out[NH * D];
	struct cache c;
	double worst = 0;

	fixture_fill(k, N * ROW, 10, 1.0f);
	fixture_fill(v, N * ROW, 11, 1.0f);
	fixture_fill(q, NH * D, 12, 2.0f);
	cache_open(&c, spec, NH);
	append_tokens(c.seq, 0, N, k, v);
	cr_assert_eq(kvp_attend(c.seq, 0, q, out), KVP_OK, "%s", kvp_last_error());
	for (uint32_t h = 0; h < NH; h++) {
		uint32_t g = h / (NH / NKV);
		double ref[D] = { 0 }, w[N], m = -INFINITY, l = 0, num = 0, den = 0;
		for (uint32_t t = 0; t < N; t++) {
			double s = 0;
			for (uint32_t j = 0; j < D; j++)
				s += (double)q[h * D + j] * k[(size_t)t * ROW + g * D + j];
			w[t] = s / sqrt(D);
			m = w[t] > m ? w[t] : m;
		}
		for (uint32_t t = 0; t < N; t++) {
			w[t] = exp(w[t] - m);
			l += w[t];
			for (uint32_t j = 0; j < D; j++)
				ref[j] += w[t] * v[(size_t)t * ROW + g * D + j];
		}
		for (uint32_t j = 0; j < D; j++) {
			double e = out[h * D + j] - ref[j] / l;
			num += e * e;
			den += ref[j] / l * (ref[j] / l);
		}
		worst = fmax(worst, sqrt(num / den));
	}
	cache_close(&c);
	return worst;
}

Test(cold, attention_over_an_exact_codec_cold_tier_matches_the_reference)
{
	double e = attention_error("block=16,sinks=4,window=32,k=fp32,v=fp32");
	cr_assert_lt(e, 1e-5, "%g", e);
}

Test(cold, attention_error_shrinks_as_turboquant_bits_grow)
{
	double e2 = attention_error("block=32,sinks=4,window=32,k=turboquant(bits=2),v=turboquant(bits=2)");
	double e4 = attention_error("block=32,sinks=4,window=32,k=turboquant(bits=4),v=turboquant(bits=4)");
	cr_log_info("synthetic attention error: 2 bits %.4g, 4 bits %.4g", e2, e4);
	cr_assert_lt(e4, e2);
	/* random keys spread attention almost evenly, so the output is a short average of random values
	 * and per-token errors weigh more than on a real head (see the kjv-64 test): measured 0.14 */
	cr_assert_lt(e4, 0.2, "%g", e4);
}

/* ---- the real model ---- */

Test(cold, kjv64_with_a_turboquant_4bit_cold_tier_stays_close_to_the_exact_cache, .timeout = 120)
{
	enum { STEPS = 320 };
	static int tokens[STEPS], exact_top[STEPS], cold_top[STEPS];
	char err[LLAMA_ERROR_MAX] = "";
	kvp_stats st = { .size = sizeof st };
	struct llama_model m;
	struct attention_tap ta, tb;
	double mean, worst;
	int agree = 0;

	cr_assert_eq(llama_model_load(&m, model_path("kjv-64.bin"), err), LLAMA_OK, "%s", err);
	tap_open(&ta, &m, STEPS);
	tap_open(&tb, &m, STEPS);
	greedy_tokens(&m, tokens, STEPS);
	run_exact(&m, tokens, STEPS, &ta, exact_top);
	run_spec(&m, "block=32,sinks=4,window=64,k=turboquant(bits=4),v=turboquant(bits=4)", tokens, STEPS, &tb,
		 cold_top, &st);
	cr_assert_gt(st.bytes_compressed, 0, "the cold tier was used");
	/* every layer's attention output once the cold tier exists (past sinks + window) */
	attention_errors(&m, &ta, &tb, 100, STEPS, &mean, &worst);
	for (int pos = 0; pos < STEPS; pos++)
		agree += exact_top[pos] == cold_top[pos];
	cr_log_info("kjv-64, 4-bit cold tier: attention output relative error mean %.4f, worst %.4f; "
		    "next-token argmax agrees on %d of %d steps", mean, worst, agree, STEPS);
	/* measured: mean 0.016, worst 0.057, argmax 320 of 320 */
	cr_assert_lt(mean, 0.04, "mean relative error %g", mean);
	cr_assert_lt(worst, 0.15, "worst relative error %g", worst);
	cr_assert_geq(agree, STEPS * 9 / 10, "argmax agreement %d / %d", agree, STEPS);
	free(ta.out);
	free(tb.out);
	llama_model_free(&m);
}

/* ---- observed queries for SparK's fit ---- */

enum { QN = 64, QNH = 4 * NKV, QHOT = 8 };

/* Relative error of stream kv_head's gathered keys [0, to) on channels [0, QHOT). */
static double hot_channel_error(const float *got, const float *want, uint32_t kv_head, uint32_t to)
{
	double num = 0, den = 0;

	for (uint32_t t = 0; t < to; t++)
		for (uint32_t j = 0; j < QHOT; j++) {
			double w = want[(size_t)t * ROW + kv_head * D + j], e = got[(size_t)t * D + j] - w;
			num += e * e;
			den += w * w;
		}
	return sqrt(num / den);
}

/*
 * 8 tokens arrive (nothing is cold yet), `attends` decode steps run with queries that only read channels
 * 0..7, then the rest arrive and 3 blocks turn cold. Returns the cold keys' error on channels 0..7, and
 * the sequence's metadata bytes before and after the attends.
 */
static double spark_hot_error(const char *spec, unsigned attends, uint64_t *meta_before, uint64_t *meta_after)
{
	static float k[QN * ROW], v[QN * ROW], q[QNH * D], out[QNH * D], gk[QN * D], gv[QN * D];
	static int32_t pos[QN];
	kvp_stats st = { .size = sizeof st };
	struct cache c;
	double worst = 0;

	fixture_fill(k, QN * ROW, 31, 1.0f);
	fixture_fill(v, QN * ROW, 32, 1.0f);
	cache_open(&c, spec, QNH);
	append_tokens(c.seq, 0, 8, k, v);
	cr_assert_eq(kvp_seq_stats(c.seq, &st), KVP_OK);
	*meta_before = st.bytes_meta;
	for (unsigned a = 0; a < attends; a++) {
		fixture_fill(q, QNH * D, 40 + a, 1.0f);
		for (uint32_t h = 0; h < QNH; h++)
			memset(q + (size_t)h * D + QHOT, 0, (D - QHOT) * sizeof *q);
		cr_assert_eq(kvp_attend(c.seq, 0, q, out), KVP_OK, "%s", kvp_last_error());
	}
	cr_assert_eq(kvp_seq_stats(c.seq, &st), KVP_OK);
	*meta_after = st.bytes_meta;
	append_tokens(c.seq, 8, QN - 8, k, v);
	for (uint32_t h = 0; h < NKV; h++) {
		double e;
		gather_all(c.seq, h, QN, pos, gk, gv);
		e = hot_channel_error(gk, k, h, 48);
		worst = e > worst ? e : worst;
	}
	kvp_seq_close(c.seq);
	cr_assert_eq(kvp_tenant_stats(c.tenant, &st), KVP_OK);
	cr_assert_eq(st.bytes_compressed + st.bytes_exact + st.bytes_meta, 0, "%s: everything freed", spec);
	cache_close(&c);
	return worst;
}

/* Queries drawn at random on 8 channels over 20 steps (the suite's other SparK test uses one step). */
Test(cold, spark_query_ring_is_charged_as_metadata_and_steers_the_kept_channels)
{
	const char *spec = "block=16,sinks=0,window=16,k=spark(keep=0.25)";
	const size_t window = sizeof(float) * 32 * D; /* at least 32 queries of D floats, per stream */
	uint64_t b0, a0, b1, a1;
	double blind = spark_hot_error(spec, 0, &b0, &a0);
	double seen = spark_hot_error(spec, 20, &b1, &a1);

	cr_log_info("keys' error on the queried channels: %.4g without queries, %.4g with", blind, seen);
	/* with queries the 8 queried channels rank first and stay fp16; without, most are pruned */
	cr_assert_lt(seen, 0.01, "with queries: %g", seen);
	cr_assert_gt(blind, 0.2, "without queries: %g", blind);
	cr_assert_eq(a0, b0, "no attend, no window");
	cr_assert_geq(a1 - b1, NKV * window, "each stream's ring is charged as metadata: %llu more bytes",
		      (unsigned long long)(a1 - b1));
}

Test(cold, codecs_that_ignore_queries_keep_no_query_ring)
{
	uint64_t before, after;

	spark_hot_error("block=16,sinks=0,window=16,k=turboquant(bits=3)", 20, &before, &after);
	cr_assert_eq(after, before, "turboquant's fit takes no queries: %llu bytes more",
		     (unsigned long long)(after - before));
}

/*
 * A sequence's codecs are its own (parsed for its head_dim): TurboQuant's QJL matrices take D x D floats
 * per side. They come from the tenant's arena, so bytes_meta shows them and the quota holds them.
 */
Test(cold, codec_tables_are_charged_and_shown_in_bytes_meta)
{
	static const char *const specs[2] = { "k=fp16,v=fp16", "k=turboquant(bits=3,qjl=1),v=turboquant(bits=3,qjl=1)" };
	kvp_stats seq[2], tenant[2];

	for (int i = 0; i < 2; i++) {
		struct cache c;
		cache_open(&c, specs[i], NKV);
		seq[i] = (kvp_stats){ .size = sizeof seq[i] };
		tenant[i] = (kvp_stats){ .size = sizeof tenant[i] };
		cr_assert_eq(kvp_seq_stats(c.seq, &seq[i]), KVP_OK);
		cr_assert_eq(kvp_tenant_stats(c.tenant, &tenant[i]), KVP_OK);
		cr_assert_eq(seq[i].bytes_meta, tenant[i].bytes_meta, "%s: the sequence shows what the tenant is charged",
			     specs[i]);
		cache_close(&c);
	}
	cr_log_info("bytes_meta of a fresh sequence: %llu with fp16, %llu with QJL TurboQuant",
		    (unsigned long long)seq[0].bytes_meta, (unsigned long long)seq[1].bytes_meta);
	cr_assert_geq(seq[1].bytes_meta - seq[0].bytes_meta, 2u * D * D * sizeof(float));
}
