/* StreamingLLM: attention sinks plus a recent window, exactly. */
#include <criterion/criterion.h>

#include "policy_fixture.h"

static kvp_policy *open_streaming(const char *spec)
{
	kvp_shape s = fixture_shape(2, 4, 2, 8, 1e4f, KVP_ROPE_HALF);
	kvp_policy *p = NULL;

	cr_assert_eq(kvp_policy_open(spec, &s, &p), KVP_OK, "%s: %s", spec, kvp_last_error());
	return p;
}

Test(streaming, a_round_keeps_exactly_the_sinks_and_the_window)
{
	enum { N = 300 };
	kvp_policy *p = open_streaming("streaming(sinks=4,window=64)");
	static int32_t pos[N];
	static float k[N][8];
	static uint8_t keep[N];
	struct kvp_round r = { .t0 = 1000, .n = N, .pos = pos, .k = &k[0][0] };
	uint32_t kept = 0;

	for (int i = 0; i < N; i++)
		pos[i] = 3 * i; /* gapped: a stream that has been pruned before */
	cr_assert(kvp_policy_due(p, 1000, 69));
	cr_assert(!kvp_policy_due(p, 1000, 68));
	cr_assert_eq(kvp_policy_round(p, 1, 1, &r, keep, &kept), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kept, 68);
	for (int i = 0; i < N; i++)
		cr_assert_eq(keep[i], i < 4 || i >= N - 64, "token %d (position %d): keep=%d", i, pos[i], keep[i]);
	kvp_policy_close(p);
}

Test(streaming, scores_rank_by_recency_and_defaults_are_4_sinks)
{
	kvp_policy *p = open_streaming("streaming");
	int32_t pos[3] = { 2, 7, 40 };
	float k[3][8] = { { 0 } }, s[3];

	cr_assert_eq(kvp_policy_score(p, 0, 0, 41, 3, pos, &k[0][0], s), KVP_OK);
	cr_assert(s[0] < s[1] && s[1] < s[2]);
	cr_assert_eq(kvp_policy_budget(p, 5000), 4 + 1024);
	kvp_policy_close(p);
}

Test(streaming, the_pagers_larger_window_wins_over_the_policys)
{
	enum { N = 50 };
	kvp_policy *p = open_streaming("streaming(sinks=2,window=8)");
	int32_t pos[N];
	float k[N][8] = { { 0 } };
	uint8_t keep[N];
	struct kvp_round r = { .t0 = N, .n = N, .pos = pos, .k = &k[0][0], .window = 16 };
	uint32_t kept = 0;

	for (int i = 0; i < N; i++)
		pos[i] = i;
	cr_assert_eq(kvp_policy_round(p, 0, 0, &r, keep, &kept), KVP_OK);
	cr_assert_eq(kept, 2 + 16, "protection beats the budget of 10: kept %u", kept);
	kvp_policy_close(p);
}

Test(streaming, bad_arguments_are_refused)
{
	kvp_shape s = fixture_shape(1, 1, 1, 8, 1e4f, KVP_ROPE_HALF);
	kvp_policy *p = NULL;

	cr_assert_eq(kvp_policy_open("streaming(window=0)", &s, &p), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "window=0"), "%s", kvp_last_error());
	cr_assert_eq(kvp_policy_open("streaming(sinks=x)", &s, &p), KVP_EINVAL);
	cr_assert_eq(kvp_policy_open("streaming(sinks=4", &s, &p), KVP_EINVAL);
	s.n_heads = 3, s.n_kv_heads = 2;
	cr_assert_eq(kvp_policy_open("streaming", &s, &p), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "multiple"), "%s", kvp_last_error());
	cr_assert_null(p);
}
