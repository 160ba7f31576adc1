/* H2O: accumulated attention weights decide, summed over each KV head's query group. */
#include <criterion/criterion.h>

#include "memory_fixture.h"
#include "policy_fixture.h"

/* 2 KV heads, 4 query heads: group of 2. */
static kvp_policy *open_h2o(const char *spec)
{
	kvp_shape s = fixture_shape(2, 4, 2, 8, 1e4f, KVP_ROPE_HALF);
	kvp_policy *p = NULL;

	cr_assert_eq(kvp_policy_open(spec, &s, &p), KVP_OK, "%s: %s", spec, kvp_last_error());
	return p;
}

/*
 * 40 tokens; 40 query steps. Step t attends over tokens 0..t with a constructed pattern: token 3 and token
 * 17 draw most of one query head each, token 25 a little from both, the rest is spread evenly.
 */
Test(h2o, keeps_the_tokens_with_the_largest_accumulated_weights)
{
	enum { N = 40 };
	kvp_policy *p = open_h2o("h2o(heavy=0.1,recent=0.1)");
	int32_t pos[N];
	float w[2 * N], k[N][8] = { { 0 } }, s[N];
	double want[N] = { 0 };
	uint8_t keep[N];
	uint32_t kept = 0;

	for (int i = 0; i < N; i++)
		pos[i] = i;
	for (int t = 0; t < N; t++) {
		uint32_t n = (uint32_t)t + 1; /* w is [group][n] for this step */
		for (uint32_t i = 0; i < 2 * n; i++)
			w[i] = 0.1f / (float)n;
		if (n > 3)
			w[3] += 0.6f;
		if (n > 17)
			w[n + 17] += 0.7f;
		if (n > 25)
			w[25] += 0.2f, w[n + 25] += 0.2f;
		for (uint32_t i = 0; i < n; i++)
			want[i] += (double)w[i] + w[n + i];
		cr_assert_eq(kvp_policy_observe(p, 1, 1, t, NULL, n, pos, w), KVP_OK, "%s", kvp_last_error());
	}
	cr_assert_eq(kvp_policy_score(p, 1, 1, N, N, pos, &k[0][0], s), KVP_OK);
	for (int i = 0; i < N; i++)
		cr_assert_float_eq(s[i], want[i], 1e-4, "token %d: %f, want %f", i, s[i], want[i]);
	/* token 3: 0.6 x 37 steps; 17: 0.7 x 23; 25: 0.4 x 15 (plus the even shares) */
	cr_assert_gt(s[3], s[17]);
	cr_assert_gt(s[17], s[25]);
	{
		struct kvp_round r = { .t0 = N, .n = N, .pos = pos, .k = &k[0][0] };
		cr_assert_eq(kvp_policy_round(p, 1, 1, &r, keep, &kept), KVP_OK, "%s", kvp_last_error());
	}
	/* budget ceil(0.2 x 40) = 8: the 4 newest (recent ceil(0.1 x 40)) plus the 4 heaviest others:
	 * 3, 17, 25 and token 0, which collects the largest even share (it is seen by all 40 steps) */
	cr_assert_eq(kept, 8);
	for (int i = 0; i < N; i++)
		cr_assert_eq(keep[i], i >= N - 4 || i == 0 || i == 3 || i == 17 || i == 25, "token %d: keep=%d", i,
			     keep[i]);
	kvp_policy_close(p);
}

Test(h2o, weights_of_the_group_are_summed_and_streams_stay_apart)
{
	kvp_policy *p = open_h2o("h2o");
	int32_t pos[3] = { 10, 20, 30 };
	float w[2][3] = { { 0.5f, 0.25f, 0.25f }, { 0.1f, 0.8f, 0.1f } }, k[3][8] = { { 0 } }, s[3];

	cr_assert_eq(kvp_policy_observe(p, 0, 1, 31, NULL, 3, pos, &w[0][0]), KVP_OK);
	cr_assert_eq(kvp_policy_observe(p, 0, 1, 32, NULL, 3, pos, &w[0][0]), KVP_OK);
	cr_assert_eq(kvp_policy_score(p, 0, 1, 33, 3, pos, &k[0][0], s), KVP_OK);
	cr_assert_float_eq(s[0], 1.2f, 1e-6);
	cr_assert_float_eq(s[1], 2.1f, 1e-6);
	cr_assert_float_eq(s[2], 0.7f, 1e-6);
	cr_assert_eq(kvp_policy_score(p, 0, 0, 33, 3, pos, &k[0][0], s), KVP_OK);
	cr_assert_float_eq(s[1], 0.0f, 0, "another KV head's stream saw nothing");
	cr_assert_eq(kvp_policy_score(p, 1, 1, 33, 3, pos, &k[0][0], s), KVP_OK);
	cr_assert_float_eq(s[1], 0.0f, 0, "another layer's stream saw nothing");
	kvp_policy_close(p);
}

Test(h2o, bad_observations_record_nothing)
{
	kvp_policy *p = open_h2o("h2o");
	int32_t pos[2] = { 5, 4 }, negative[1] = { -1 }, ok[2] = { 4, 5 };
	float w[2][2] = { { 1, 1 }, { 1, 1 } }, k[2][8] = { { 0 } }, s[2];

	cr_assert_eq(kvp_policy_observe(p, 0, 0, 6, NULL, 2, pos, &w[0][0]), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "not increasing"), "%s", kvp_last_error());
	cr_assert_eq(kvp_policy_observe(p, 0, 0, 6, NULL, 1, negative, &w[0][0]), KVP_EINVAL);
	cr_assert_eq(kvp_policy_observe(p, 9, 0, 6, NULL, 2, ok, &w[0][0]), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "layer 9"), "%s", kvp_last_error());
	cr_assert_eq(kvp_policy_observe(p, 0, 0, 6, NULL, 2, NULL, &w[0][0]), KVP_EINVAL);
	cr_assert_eq(kvp_policy_score(p, 0, 0, 6, 2, ok, &k[0][0], s), KVP_OK);
	cr_assert(s[0] == 0 && s[1] == 0, "a refused observation must leave no trace");
	kvp_policy_close(p);
}

Test(h2o, no_budget_is_refused)
{
	kvp_shape s = fixture_shape(1, 1, 1, 8, 1e4f, KVP_ROPE_HALF);
	kvp_policy *p = NULL;

	cr_assert_eq(kvp_policy_open("h2o(heavy=0,recent=0)", &s, &p), KVP_EINVAL);
	cr_assert_eq(kvp_policy_open("h2o(heavy=1.5)", &s, &p), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "heavy=1.5"), "%s", kvp_last_error());
}

Test(h2o, a_clone_inherits_the_weights_and_then_goes_its_own_way)
{
	kvp_policy *p = open_h2o("h2o"), *c = NULL;
	int32_t pos[3] = { 10, 20, 30 };
	float w[2][3] = { { 0.5f, 0.25f, 0.25f }, { 0.1f, 0.8f, 0.1f } }, k[3][8] = { { 0 } }, s[3];

	cr_assert_eq(kvp_policy_observe(p, 1, 0, 31, NULL, 3, pos, &w[0][0]), KVP_OK);
	cr_assert_eq(kvp_policy_clone(p, &c), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_policy_observe(c, 1, 0, 32, NULL, 3, pos, &w[0][0]), KVP_OK);
	cr_assert_eq(kvp_policy_score(c, 1, 0, 33, 3, pos, &k[0][0], s), KVP_OK);
	cr_assert_float_eq(s[1], 2.1f, 1e-6, "clone: inherited 1.05 plus its own 1.05");
	cr_assert_eq(kvp_policy_score(p, 1, 0, 33, 3, pos, &k[0][0], s), KVP_OK);
	cr_assert_float_eq(s[1], 1.05f, 1e-6, "the original does not see the clone's observation");
	kvp_policy_close(p);
	kvp_policy_close(c);
}

/* The weights are kept per observed token, not per position value: positions 2^28 apart cost two pairs. */
Test(h2o, far_positions_are_kept_by_token_not_by_value)
{
	kvp_policy *p = open_h2o("h2o");
	int32_t pos[2] = { 0, (1 << 28) - 2 }, later[3] = { 0, (1 << 28) - 2, INT32_MAX - 1 };
	float w[2][2] = { { 0.25f, 0.75f }, { 0.5f, 0.5f } }, w3[2][3] = { { 0, 0, 1 }, { 0, 0, 1 } };
	float k[3][8] = { { 0 } }, s[3];

	cr_assert_eq(kvp_policy_observe(p, 0, 0, (1 << 28) - 1, NULL, 2, pos, &w[0][0]), KVP_OK, "%s",
		     kvp_last_error());
	cr_assert_eq(kvp_policy_observe(p, 0, 0, INT32_MAX, NULL, 3, later, &w3[0][0]), KVP_OK, "%s",
		     kvp_last_error());
	cr_assert_eq(kvp_policy_score(p, 0, 0, INT32_MAX, 3, later, &k[0][0], s), KVP_OK, "%s", kvp_last_error());
	cr_assert_float_eq(s[0], 0.75f, 1e-6);
	cr_assert_float_eq(s[1], 1.25f, 1e-6);
	cr_assert_float_eq(s[2], 2.0f, 1e-6);
	kvp_policy_close(p);
}

/* An observation names every token the stream holds: one it leaves out was evicted, and its weight goes
 * with it, so a token that comes back at that position (a new stream after a reset) starts from zero. */
Test(h2o, a_token_left_out_of_an_observation_is_forgotten)
{
	kvp_policy *p = open_h2o("h2o");
	int32_t all[3] = { 10, 20, 30 }, kept[2] = { 10, 30 };
	float w[2][3] = { { 0.2f, 0.3f, 0.5f }, { 0.2f, 0.3f, 0.5f } }, w2[2][2] = { { 0.5f, 0.5f }, { 0.5f, 0.5f } };
	float k[3][8] = { { 0 } }, s[3];

	cr_assert_eq(kvp_policy_observe(p, 0, 0, 31, NULL, 3, all, &w[0][0]), KVP_OK);
	cr_assert_eq(kvp_policy_observe(p, 0, 0, 32, NULL, 2, kept, &w2[0][0]), KVP_OK);
	cr_assert_eq(kvp_policy_score(p, 0, 0, 33, 3, all, &k[0][0], s), KVP_OK);
	cr_assert_float_eq(s[0], 1.4f, 1e-6);
	cr_assert_float_eq(s[1], 0.0f, 0, "token 20 was evicted: its 0.6 is gone");
	cr_assert_float_eq(s[2], 2.0f, 1e-6);
	kvp_policy_close(p);
}

/*
 * The weights come from the policy's allocator. An observation that needs more than it grants fails with
 * KVP_ENOMEM, a message and nothing recorded; every byte comes back at close.
 */
Test(h2o, an_observation_refused_memory_records_nothing)
{
	kvp_shape sh = fixture_shape(1, 2, 1, 8, 1e4f, KVP_ROPE_HALF);
	struct fixture_memory mem;
	kvp_policy *p = NULL;
	int32_t pos[40];
	float w[2 * 40], k[40][8] = { { 0 } }, s[40];

	fixture_memory_init(&mem, 1 << 20);
	for (int i = 0; i < 40; i++)
		pos[i] = 1000 * i, w[i] = w[40 + i] = 0.5f;
	cr_assert_eq(kvp_policy_parse_in("h2o", 3, &sh, &mem.ops, &p), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_policy_observe(p, 0, 0, 40000, NULL, 3, pos, w), KVP_OK, "%s", kvp_last_error());
	mem.left = 0;
	cr_assert_eq(kvp_policy_observe(p, 0, 0, 40000, NULL, 40, pos, w), KVP_ENOMEM);
	cr_assert(strstr(kvp_last_error(), "h2o"), "%s", kvp_last_error());
	cr_assert_eq(kvp_policy_score(p, 0, 0, 40000, 40, pos, &k[0][0], s), KVP_OK);
	for (int i = 0; i < 40; i++)
		cr_assert_float_eq(s[i], i < 3 ? 1.0f : 0.0f, 0, "token %d: %f after a refused observation", i, s[i]);
	mem.left = 1 << 20;
	cr_assert_eq(kvp_policy_observe(p, 0, 0, 40000, NULL, 40, pos, w), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_policy_score(p, 0, 0, 40000, 40, pos, &k[0][0], s), KVP_OK);
	cr_assert_float_eq(s[0], 2.0f, 0);
	cr_assert_float_eq(s[39], 1.0f, 0);
	/* a round evicts most tokens: the next observation gives their pairs back */
	size_t before = mem.held;
	cr_assert_eq(kvp_policy_observe(p, 0, 0, 40001, NULL, 2, pos + 38, w), KVP_OK, "%s", kvp_last_error());
	cr_assert_lt(mem.held, before, "the weights shrink with the tokens the stream holds");
	kvp_policy_free(p);
	cr_assert_eq(mem.held, 0, "%zu bytes not given back", mem.held);
}
