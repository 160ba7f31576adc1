/*
 * A TriAttention policy round against one exact attention step measured in the same run, per layer.
 * First the policy alone (scoring + survivor selection), then the pager's whole round through
 * kvp_seq_step (gathering the keys, scoring, selection and compaction) against kvp_attend on the same
 * fp16 cache:
 *   shape d=128, 8 KV heads, 32 query heads (GQA 4), 32K tokens per stream + the 128 of one round;
 *   a round runs every 128 decode tokens, so its cost per decode token is round / 128.
 * Both scale with the layer count the same way, so the per-layer ratio is the 32-layer ratio.
 * Last, StreamingLLM's round at its default every=1 (one per decode token) on a 32K-token stream.
 * The target: round per decode token under 5% of one exact attention step.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "policies/policy.h"

enum { D = 128, NKV = 8, NH = 32, GROUP = NH / NKV, EVERY = 128, BUDGET = 32768, N = BUDGET + EVERY };

struct layer {
	float *k, *v;       /* [NKV][N][D] */
	int32_t *pos;       /* [N] */
	float *q, *out, *scores;
	uint8_t *keep;
	struct kvp_policy *policy;
	struct kvp_policy *h2o;
};

/* The exact step: per query head, scores, softmax, weighted sum over every token. */
static void exact_attention(void *arg)
{
	struct layer *a = arg;
	const float scale = 1.0f / sqrtf((float)D);

	for (uint32_t h = 0; h < NH; h++) {
		const float *k = a->k + (size_t)(h / GROUP) * N * D, *v = a->v + (size_t)(h / GROUP) * N * D;
		const float *q = a->q + h * D;
		float *out = a->out + h * D, m = -INFINITY, l = 0;
		for (uint32_t i = 0; i < N; i++) {
			float s = 0;
			for (uint32_t j = 0; j < D; j++)
				s += q[j] * k[(size_t)i * D + j];
			a->scores[i] = s * scale;
			m = a->scores[i] > m ? a->scores[i] : m;
		}
		memset(out, 0, D * sizeof *out);
		for (uint32_t i = 0; i < N; i++) {
			float p = expf(a->scores[i] - m);
			l += p;
			for (uint32_t j = 0; j < D; j++)
				out[j] += p * v[(size_t)i * D + j];
		}
		for (uint32_t j = 0; j < D; j++)
			out[j] /= l;
	}
}

static void round_with(struct layer *a, struct kvp_policy *p)
{
	for (uint32_t g = 0; g < NKV; g++) {
		struct kvp_round r = { .t0 = N, .n = N, .pos = a->pos, .k = a->k + (size_t)g * N * D, .sinks = 4 };
		uint32_t kept;
		if (kvp_policy_round(p, 0, g, &r, a->keep, &kept) != KVP_OK || kept != kvp_policy_budget(p, N)) {
			fprintf(stderr, "bench_policy: round failed: %s (kept %u)\n", kvp_last_error(), kept);
			exit(1);
		}
	}
}

static void tria_round(void *arg)
{
	struct layer *a = arg;
	round_with(a, a->policy);
}

static void h2o_round(void *arg)
{
	struct layer *a = arg;
	round_with(a, a->h2o);
}

/* In [-0.5, 0.5], in steps of 1/1000. */
static float uniform(unsigned *seed)
{
	return (float)(rand_r(seed) % 1001) / 1000.0f - 0.5f;
}

/* The pager's round: a sequence of N tokens per stream (fp16, the policy due at budget + every), one
 * kvp_attend timed on it, then its kvp_seq_step timed once (a round changes the sequence). */
struct pager_round {
	double attend, step;
};

/* A pool with one sequence under `spec` holding the layer's N tokens per stream, appended 1024 tokens at
 * a time as [n][NKV][D]; NULL on failure (the error printed). */
static kvp_seq *pager_fill(const struct layer *a, const char *spec, kvp_pool **pool)
{
	kvp_shape shape = { 1, NH, NKV, D, 1e6f, KVP_ROPE_HALF };
	float *kv_k = malloc(sizeof(float) * NKV * D * 1024), *kv_v = malloc(sizeof(float) * NKV * D * 1024);
	int32_t pos[1024];
	kvp_tenant *t;
	kvp_seq *s = NULL;
	int ok = kv_k && kv_v && kvp_pool_open("", pool) == KVP_OK;

	if (ok && (kvp_tenant_open(*pool, "round", spec, &t) != KVP_OK || kvp_seq_open(t, &shape, &s) != KVP_OK))
		s = NULL;
	for (uint32_t i0 = 0; s && i0 < N; i0 += 1024) {
		uint32_t n = N - i0 < 1024 ? N - i0 : 1024;
		for (uint32_t i = 0; i < n; i++) {
			pos[i] = (int32_t)(i0 + i);
			for (uint32_t g = 0; g < NKV; g++) {
				memcpy(kv_k + ((size_t)i * NKV + g) * D, a->k + ((size_t)g * N + i0 + i) * D, D * sizeof(float));
				memcpy(kv_v + ((size_t)i * NKV + g) * D, a->v + ((size_t)g * N + i0 + i) * D, D * sizeof(float));
			}
		}
		if (kvp_append(s, 0, n, pos, kv_k, kv_v) != KVP_OK)
			s = NULL;
	}
	if (!s) {
		fprintf(stderr, "bench_policy: %s\n", kvp_last_error());
		if (ok)
			kvp_pool_close(*pool);
	}
	free(kv_k), free(kv_v);
	return s;
}

/* Best of reps + 1 kvp_attend calls on s. */
static int attend_time(const struct layer *a, kvp_seq *s, int reps, double *best)
{
	for (int i = 0; i < reps + 1; i++) {
		double t0 = bench_now();
		if (kvp_attend(s, 0, a->q, a->out) != KVP_OK)
			return 1;
		t0 = bench_now() - t0;
		*best = i == 0 || t0 < *best ? t0 : *best;
	}
	return 0;
}

/* gate: "" or ",gate=entropy" (kvp_attend then measures every stream's entropy, and the round splits the
 * budget by it). */
static int pager_round(const struct layer *a, struct pager_round *r, int reps, const char *gate)
{
	char spec[256];
	kvp_pool *pool;
	kvp_seq *s;
	double t0;
	int rc = 1;

	snprintf(spec, sizeof spec, "block=64,sinks=4,window=128,store=fp16%s,policy=triattention(budget=%d,every=%d,"
		 "stats=online,select=per_layer_head)", gate, BUDGET, EVERY);
	if (!(s = pager_fill(a, spec, &pool)))
		return 1;
	if (attend_time(a, s, reps, &r->attend) == 0) {
		t0 = bench_now();
		rc = kvp_seq_step(s) != KVP_OK;
		r->step = bench_now() - t0;
	}
	if (rc)
		fprintf(stderr, "bench_policy: %s\n", kvp_last_error());
	kvp_pool_close(pool);
	return rc;
}

/*
 * StreamingLLM in the pager at its default every=1: the stream holds sinks + window = BUDGET tokens, and
 * every decode token appends one token per stream and runs a round that drops the oldest non-sink one.
 * The first step (which drops the EVERY extra tokens of the fill) is not timed; then the best of
 * 4 * reps single-token steps.
 */
static int streaming_step(const struct layer *a, struct pager_round *r, int reps)
{
	char spec[256];
	kvp_pool *pool;
	kvp_seq *s;
	int32_t pos = N;
	int rc = 1;

	snprintf(spec, sizeof spec, "block=64,sinks=4,window=128,store=fp16,policy=streaming(sinks=4,window=%d)",
		 BUDGET - 4);
	if (!(s = pager_fill(a, spec, &pool)))
		return 1;
	if (attend_time(a, s, reps, &r->attend) == 0 && kvp_seq_step(s) == KVP_OK) {
		rc = 0;
		for (int i = 0; !rc && i < 4 * reps; i++, pos++) {
			double t0;
			/* the new token's rows: any of the layer's, [1][NKV][D] */
			float k1[NKV * D], v1[NKV * D];
			for (uint32_t g = 0; g < NKV; g++) {
				memcpy(k1 + g * D, a->k + ((size_t)g * N + (uint32_t)i) * D, D * sizeof(float));
				memcpy(v1 + g * D, a->v + ((size_t)g * N + (uint32_t)i) * D, D * sizeof(float));
			}
			rc = kvp_append(s, 0, 1, &pos, k1, v1) != KVP_OK;
			t0 = bench_now();
			rc = rc || kvp_seq_step(s) != KVP_OK;
			t0 = bench_now() - t0;
			r->step = i == 0 || t0 < r->step ? t0 : r->step;
		}
	}
	if (rc)
		fprintf(stderr, "bench_policy: %s\n", kvp_last_error());
	kvp_pool_close(pool);
	return rc;
}

int main(void)
{
	kvp_shape shape = { .n_layers = 1, .n_heads = NH, .n_kv_heads = NKV, .head_dim = D, .rope_theta = 1e6f,
			    .rope_layout = KVP_ROPE_HALF };
	struct layer a;
	unsigned seed = 1;
	int reps = bench_reps(3);
	double exact, tria, h2o;
	char spec[128];

	a.k = malloc(sizeof(float) * NKV * N * D);
	a.v = malloc(sizeof(float) * NKV * N * D);
	a.pos = malloc(sizeof(int32_t) * N);
	a.q = malloc(sizeof(float) * NH * D);
	a.out = malloc(sizeof(float) * NH * D);
	a.scores = malloc(sizeof(float) * N);
	a.keep = malloc(N);
	if (!a.k || !a.v || !a.pos || !a.q || !a.out || !a.scores || !a.keep)
		return 1;
	for (size_t i = 0; i < (size_t)NKV * N * D; i++) {
		a.k[i] = uniform(&seed);
		a.v[i] = uniform(&seed);
	}
	for (uint32_t i = 0; i < NH * D; i++)
		a.q[i] = uniform(&seed);
	for (uint32_t i = 0; i < N; i++)
		a.pos[i] = (int32_t)i;
	snprintf(spec, sizeof spec, "triattention(budget=%d,every=%d,stats=online,pin_prompt=0)", BUDGET, EVERY);
	if (kvp_policy_open(spec, &shape, &a.policy) != KVP_OK ||
	    kvp_policy_open("h2o(heavy=0.5,recent=0.49,every=128)", &shape, &a.h2o) != KVP_OK) {
		fprintf(stderr, "bench_policy: %s\n", kvp_last_error());
		return 1;
	}
	for (uint32_t g = 0; g < NKV; g++) /* some statistics, so the scores are not all equal */
		kvp_policy_observe(a.policy, 0, g, N, a.q + g * GROUP * D, 0, NULL, NULL);
	exact = bench_time(exact_attention, &a, reps);
	tria = bench_time(tria_round, &a, reps);
	h2o = bench_time(h2o_round, &a, reps);
	bench_header("policy round per decode token (round / 128) vs one exact attention step, per layer, "
		     "32K tokens x 8 KV heads x 32 query heads, d=128");
	bench_row("exact attention", "step", exact, exact, 1e3, "ms", "exact attention");
	bench_row("triattention round", "per round", tria, exact, 1e3, "ms", "exact attention");
	bench_row("triattention round", "per decode token", tria / EVERY, exact, 1e3, "ms", "exact attention");
	bench_row("h2o round (selection only)", "per decode token", h2o / EVERY, exact, 1e3, "ms", "exact attention");
	struct pager_round pr, gated, streaming;
	if (pager_round(&a, &pr, reps, "") || pager_round(&a, &gated, reps, ",gate=entropy") ||
	    streaming_step(&a, &streaming, reps))
		return 1;
	bench_row("kvp_attend fp16", "step", pr.attend, pr.attend, 1e3, "ms", "itself");
	bench_row("pager round (with compaction)", "per round", pr.step, pr.attend, 1e3, "ms", "kvp_attend fp16");
	bench_row("pager round (with compaction)", "per decode token", pr.step / EVERY, pr.attend, 1e3, "ms",
		  "kvp_attend fp16");
	bench_row("kvp_attend fp16, gate=entropy", "step", gated.attend, pr.attend, 1e3, "ms", "kvp_attend fp16");
	bench_row("gated pager round", "per decode token", gated.step / EVERY, gated.attend, 1e3, "ms",
		  "kvp_attend fp16, gate=entropy");
	bench_row("kvp_attend fp16, streaming", "step", streaming.attend, pr.attend, 1e3, "ms", "kvp_attend fp16");
	bench_row("streaming round (every=1)", "per decode token", streaming.step, streaming.attend, 1e3, "ms",
		  "kvp_attend fp16, streaming");
	kvp_policy_close(a.policy);
	kvp_policy_close(a.h2o);
	free(a.k), free(a.v), free(a.pos), free(a.q), free(a.out), free(a.scores), free(a.keep);
	return 0;
}
