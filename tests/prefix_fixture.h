/*
 * What the prefix cache's suites share: a small shape, prompts whose K and V are a deterministic function
 * of (token id, position, layer, head), as a model's are of the prefix (two sequences given the same prompt
 * append the same rows), and checks that two sequences attend alike.
 */
#ifndef KVP_TEST_PREFIX_FIXTURE_H
#define KVP_TEST_PREFIX_FIXTURE_H

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvpager.h"
#include "pager_fixture.h"

#define L 2
#define NH 4
#define NKV 2
#define D 16
#define ROW (NKV * D)
#define MAXT 512

static const kvp_shape shape = { L, NH, NKV, D, 10000.0f, KVP_ROPE_HALF };
static kvp_pool *pool;

/* One token's rows of one layer: [NKV][D], from its id and position. */
static inline void token_rows(int32_t token, int32_t pos, uint32_t layer, float *k, float *v)
{
	uint64_t seed = ((uint64_t)(uint32_t)token * 1000003u + (uint64_t)pos) * 31u + layer;
	fixture_fill(k, ROW, seed, 1.5f);
	fixture_fill(v, ROW, seed ^ 0x5555u, 1.5f);
}

/* Appends tokens[from..to) at positions from..to-1 to the given layers. */
static inline kvp_status append_layers(kvp_seq *s, const int32_t *tokens, uint32_t from, uint32_t to, uint32_t l0, uint32_t l1)
{
	float *k = malloc((size_t)(to - from) * ROW * sizeof *k), *v = malloc((size_t)(to - from) * ROW * sizeof *v);
	int32_t *pos = malloc((to - from) * sizeof *pos);
	kvp_status st = KVP_OK;
	cr_assert(k && v && pos);
	for (uint32_t l = l0; l < l1 && st == KVP_OK; l++) {
		for (uint32_t i = from; i < to; i++) {
			pos[i - from] = (int32_t)i;
			token_rows(tokens[i], (int32_t)i, l, k + (size_t)(i - from) * ROW, v + (size_t)(i - from) * ROW);
		}
		st = kvp_append(s, l, to - from, pos, k, v);
	}
	free(k);
	free(v);
	free(pos);
	return st;
}

static inline void append_tokens(kvp_seq *s, const int32_t *tokens, uint32_t from, uint32_t to)
{
	cr_assert_eq(append_layers(s, tokens, from, to, 0, L), KVP_OK, "%s", kvp_last_error());
}

static inline void prompt_fill(int32_t *tokens, uint32_t n, int32_t base)
{
	for (uint32_t i = 0; i < n; i++)
		tokens[i] = base + (int32_t)(i * 7 % 101);
}

static inline kvp_tenant *tenant_open(const char *name, const char *spec)
{
	kvp_tenant *t;
	cr_assert_eq(kvp_tenant_open(pool, name, spec, &t), KVP_OK, "%s: %s", spec, kvp_last_error());
	return t;
}

static inline kvp_seq *open_prompt(kvp_tenant *t, const int32_t *tokens, uint32_t n, uint32_t *n_cached)
{
	kvp_seq *s;
	cr_assert_eq(kvp_seq_open_prefix(t, &shape, n, tokens, &s, n_cached), KVP_OK, "%s", kvp_last_error());
	return s;
}

/* A sequence of the prompt whose tokens are all appended: what registers it. */
static inline kvp_seq *run_prompt(kvp_tenant *t, const int32_t *tokens, uint32_t n)
{
	uint32_t cached;
	kvp_seq *s = open_prompt(t, tokens, n, &cached);
	append_tokens(s, tokens, cached, n);
	return s;
}

static inline kvp_stats tenant_stats(kvp_tenant *t)
{
	kvp_stats st = { .size = sizeof st };
	cr_assert_eq(kvp_tenant_stats(t, &st), KVP_OK);
	return st;
}

static inline kvp_stats seq_stats(kvp_seq *s)
{
	kvp_stats st = { .size = sizeof st };
	cr_assert_eq(kvp_seq_stats(s, &st), KVP_OK);
	return st;
}

static inline void pool_open(const char *spec)
{
	cr_assert_eq(kvp_pool_open(spec, &pool), KVP_OK, "%s", kvp_last_error());
}

static inline void assert_same_attention(kvp_seq *a, kvp_seq *b, const char *what)
{
	float q[NH * D], oa[NH * D], ob[NH * D];
	for (uint32_t r = 0; r < 3; r++)
		for (uint32_t l = 0; l < L; l++) {
			fixture_fill(q, NH * D, 100 + r * 7 + l, 1.0f);
			cr_assert_eq(kvp_attend(a, l, q, oa), KVP_OK, "%s", kvp_last_error());
			cr_assert_eq(kvp_attend(b, l, q, ob), KVP_OK, "%s", kvp_last_error());
			cr_assert_eq(memcmp(oa, ob, sizeof oa), 0, "%s: layer %u differs", what, l);
		}
}

/*
 * Racers: threads of one tenant open sequences of three prompts that share their first units (race_prompts),
 * append the rest, check attention against sequences that appended everything, and close. A quota refusal
 * (KVP_ENOMEM, the other racers' sequences hold it all) is counted, not a failure.
 */
#define RACE_PROMPT 120

struct racer {
	kvp_tenant *t;
	const int32_t (*prompts)[RACE_PROMPT];
	const float (*expected)[L][NH * D];
	uint32_t seed, rounds, opened, hits, refused;
	char failure[512];
};

/* Three prompts of RACE_PROMPT tokens, prompt p sharing its first 20 + 30p with the others, and the
 * attention a plain sequence of plain's gives after each: expected[p][layer]. */
static inline void race_prompts(kvp_tenant *plain, int32_t prompts[3][RACE_PROMPT], float expected[3][L][NH * D])
{
	float q[NH * D];
	for (uint32_t p = 0; p < 3; p++) {
		prompt_fill(prompts[p], RACE_PROMPT, 40);
		for (uint32_t i = 20 + 30 * p; i < RACE_PROMPT; i++)
			prompts[p][i] += (int32_t)(p + 1) * 1000; /* shared up to token 20 + 30p */
		kvp_seq *ref = run_prompt(plain, prompts[p], RACE_PROMPT);
		for (uint32_t l = 0; l < L; l++) {
			fixture_fill(q, NH * D, 500 + l, 1.0f);
			cr_assert_eq(kvp_attend(ref, l, q, expected[p][l]), KVP_OK);
		}
	}
}

/* A racer's thread. No Criterion assertion off the main thread: it records its first failure and stops. */
static inline void *race(void *arg)
{
	struct racer *r = arg;
	float q[NH * D], out[NH * D];
	for (uint32_t i = 0; i < r->rounds && !r->failure[0]; i++) {
		uint32_t which = (r->seed + i * 7) % 3, cached;
		kvp_seq *s;
		kvp_status st = kvp_seq_open_prefix(r->t, &shape, RACE_PROMPT, r->prompts[which], &s, &cached);
		if (st == KVP_ENOMEM) {
			r->refused++;
			continue;
		}
		if (st != KVP_OK) {
			snprintf(r->failure, sizeof r->failure, "open: %s", kvp_last_error());
			break;
		}
		r->opened++;
		r->hits += cached > 0;
		st = append_layers(s, r->prompts[which], cached, RACE_PROMPT, 0, L);
		if (st == KVP_ENOMEM) {
			r->refused++;
			kvp_seq_close(s);
			continue;
		}
		if (st != KVP_OK)
			snprintf(r->failure, sizeof r->failure, "append after %u cached: %s", cached, kvp_last_error());
		for (uint32_t l = 0; l < L && !r->failure[0]; l++) {
			fixture_fill(q, NH * D, 500 + l, 1.0f);
			if (kvp_attend(s, l, q, out) != KVP_OK)
				snprintf(r->failure, sizeof r->failure, "attend: %s", kvp_last_error());
			else if (memcmp(out, r->expected[which][l], sizeof out))
				snprintf(r->failure, sizeof r->failure, "prompt %u layer %u: attention differs after %u "
					 "cached", which, l, cached);
		}
		kvp_seq_close(s);
	}
	return NULL;
}

#endif
