/*
 * A TriAttention policy round against one exact attention step measured in the same run, per layer.
 * Two measurements:
 *   - the policy alone (kvp_policy_round: scoring + survivor selection) against a plain C attention step;
 *   - the pager's round through kvp_seq_step on a 32K-token sequence (scoring + selection + compaction of
 *     the block table), plain and with gate=entropy, against one kvp_attend step of the same sequence.
 *   shape d=128, 8 KV heads, 32 query heads (GQA 4), 32K tokens per stream + the 128 of one round;
 *   a round runs every 128 decode tokens, so its cost per decode token is round / 128.
 * Both scale with the layer count the same way, so the per-layer ratio is the 32-layer ratio.
 * The target: round per decode token under 5% of one exact attention step.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "kvpager.h"
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

/* ---- the pager's round: kvp_seq_step on a sequence of BUDGET + EVERY tokens ---- */

struct pager_run {
	kvp_pool *pool;
	kvp_tenant *tenant;
	kvp_seq *seq;
	const struct layer *a;
	int32_t t; /* next position */
	float *k, *v; /* [EVERY][NKV][D] staging for appends */
};

static void pager_append(struct pager_run *r, uint32_t n)
{
	int32_t pos[EVERY];

	for (uint32_t i = 0; i < n; i++) {
		uint32_t src = (uint32_t)(r->t + (int32_t)i) % N;
		pos[i] = r->t + (int32_t)i;
		for (uint32_t g = 0; g < NKV; g++) {
			memcpy(r->k + ((size_t)i * NKV + g) * D, r->a->k + ((size_t)g * N + src) * D, D * sizeof(float));
			memcpy(r->v + ((size_t)i * NKV + g) * D, r->a->v + ((size_t)g * N + src) * D, D * sizeof(float));
		}
	}
	if (kvp_append(r->seq, 0, n, pos, r->k, r->v) != KVP_OK) {
		fprintf(stderr, "bench_policy: append: %s\n", kvp_last_error());
		exit(1);
	}
	r->t += (int32_t)n;
}

static void pager_open(struct pager_run *r, const struct layer *a, const kvp_shape *shape, const char *gate)
{
	char spec[256];

	memset(r, 0, sizeof *r);
	r->a = a;
	r->k = malloc(sizeof(float) * EVERY * NKV * D);
	r->v = malloc(sizeof(float) * EVERY * NKV * D);
	snprintf(spec, sizeof spec, "block=64,sinks=4,window=128,store=fp16%s,policy=triattention(budget=%d,every=%d,"
		 "stats=online,select=per_layer_head,pin_prompt=0)", gate, BUDGET, EVERY);
	if (!r->k || !r->v || kvp_pool_open("", &r->pool) != KVP_OK ||
	    kvp_tenant_open(r->pool, "bench", spec, &r->tenant) != KVP_OK ||
	    kvp_seq_open(r->tenant, shape, &r->seq) != KVP_OK) {
		fprintf(stderr, "bench_policy: %s: %s\n", spec, kvp_last_error());
		exit(1);
	}
	for (uint32_t done = 0; done < N; done += EVERY)
		pager_append(r, EVERY);
}

static void pager_attend(void *arg)
{
	struct pager_run *r = arg;

	if (kvp_attend(r->seq, 0, r->a->q, r->a->out) != KVP_OK) {
		fprintf(stderr, "bench_policy: attend: %s\n", kvp_last_error());
		exit(1);
	}
}

/* Best of reps rounds: each time EVERY more tokens arrive (untimed) and the timed kvp_seq_step cuts the
 * streams back to the budget and compacts their blocks. */
static double pager_round(struct pager_run *r, int reps)
{
	double best = 1e30;

	for (int i = 0; i <= reps; i++) {
		double t;
		if (i)
			pager_append(r, EVERY);
		t = bench_now();
		if (kvp_seq_step(r->seq) != KVP_OK) {
			fprintf(stderr, "bench_policy: step: %s\n", kvp_last_error());
			exit(1);
		}
		t = bench_now() - t;
		best = i && t < best ? t : best; /* the first step is a warm-up */
	}
	return best;
}

static void pager_close(struct pager_run *r)
{
	kvp_pool_close(r->pool);
	free(r->k), free(r->v);
}

/* One row pair: a kvp_attend step of the sequence, and its round per round and per decode token. */
static void pager_rows(const struct layer *a, const kvp_shape *shape, const char *gate, const char *name, int reps)
{
	struct pager_run r;
	double attend, round;

	pager_open(&r, a, shape, gate);
	pager_attend(&r); /* gate=entropy measures something before the first round */
	round = pager_round(&r, reps);
	attend = bench_time(pager_attend, &r, reps);
	bench_row(name, "kvp_attend step", attend, attend, 1e3, "ms", "kvp_attend");
	bench_row(name, "kvp_seq_step round", round, attend, 1e3, "ms", "kvp_attend");
	bench_row(name, "round per decode token", round / EVERY, attend, 1e3, "ms", "kvp_attend");
	pager_close(&r);
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
	bench_header("the pager's round (kvp_seq_step: scoring + selection + compaction) vs one kvp_attend step of "
		     "the same sequence, 32K + 128 tokens x 8 KV heads, fp16 store, block=64");
	pager_rows(&a, &shape, "", "triattention", reps);
	pager_rows(&a, &shape, ",gate=entropy", "triattention, gate=entropy", reps);
	kvp_policy_close(a.policy);
	kvp_policy_close(a.h2o);
	free(a.k), free(a.v), free(a.pos), free(a.q), free(a.out), free(a.scores), free(a.keep);
	return 0;
}
