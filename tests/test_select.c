/* Survivor selection: protection, the pinned prompt, and what happens when the prompt outgrows the budget. */
#include <criterion/criterion.h>

#include "policy_fixture.h"

enum { N = 12 };

static void positions(int32_t *pos, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++)
		pos[i] = (int32_t)(10 + 2 * i);
}

Test(select, keeps_the_highest_scores_when_nothing_is_protected)
{
	int32_t pos[N];
	float s[N] = { 5, 1, 9, 3, 7, 0, 2, 8, 4, 6, 1, 1 };
	uint8_t keep[N];
	uint32_t kept = 0;
	struct kvp_protect none = { 0 };

	positions(pos, N);
	cr_assert_eq(kvp_select_survivors(N, pos, s, &none, 4, keep, &kept), KVP_OK);
	cr_assert_eq(kept, 4);
	for (int i = 0; i < N; i++)
		cr_assert_eq(keep[i], s[i] >= 5.5f, "token %d (score %g): keep=%d", i, s[i], keep[i]);
}

Test(select, ties_keep_the_newer_token_and_nan_ranks_last)
{
	int32_t pos[4] = { 1, 2, 3, 4 };
	float s[4] = { 1, NAN, 1, 0 };
	uint8_t keep[4];
	uint32_t kept = 0;
	struct kvp_protect none = { 0 };

	cr_assert_eq(kvp_select_survivors(4, pos, s, &none, 1, keep, &kept), KVP_OK);
	cr_assert(!keep[0] && !keep[1] && keep[2] && !keep[3]);
	cr_assert_eq(kvp_select_survivors(4, pos, s, &none, 3, keep, &kept), KVP_OK);
	cr_assert(keep[0] && !keep[1] && keep[2] && keep[3], "NaN must rank below 0");
}

Test(select, sinks_and_window_survive_even_beyond_the_budget)
{
	int32_t pos[N];
	float s[N] = { 0 };
	uint8_t keep[N];
	uint32_t kept = 0;
	struct kvp_protect pr = { .sinks = 2, .window = 5 };

	positions(pos, N);
	s[4] = 100; /* the best score, but the budget is used up by protection */
	cr_assert_eq(kvp_select_survivors(N, pos, s, &pr, 3, keep, &kept), KVP_OK);
	cr_assert_eq(kept, 7);
	for (int i = 0; i < N; i++)
		cr_assert_eq(keep[i], i < 2 || i >= N - 5, "token %d", i);
}

Test(select, a_pinned_prompt_that_fits_is_kept_whole)
{
	int32_t pos[N];
	float s[N] = { -9, -9, -9, -9, 1, 2, 3, 4, 5, 6, 7, 8 };
	uint8_t keep[N];
	uint32_t kept = 0;
	struct kvp_protect pr = { .window = 1, .pin_prompt = 1, .prompt_end = 18 }; /* tokens 0..3 */

	positions(pos, N);
	cr_assert_eq(kvp_select_survivors(N, pos, s, &pr, 8, keep, &kept), KVP_OK);
	cr_assert_eq(kept, 8);
	for (int i = 0; i < N; i++)
		cr_assert_eq(keep[i], i < 4 || i >= 8, "token %d: keep=%d", i, keep[i]); /* 8..10: best 3 */
}

/* The documented choice: the prompt keeps half of the free slots (its best), the rest goes to new tokens. */
Test(select, a_prompt_longer_than_the_budget_leaves_half_the_free_slots_to_new_tokens)
{
	int32_t pos[N];
	float s[N] = { 9, 1, 8, 2, 7, 3, 6, 4, 0, 0, -5, -6 }; /* prompt 0..9 scores higher than new 10, 11 */
	uint8_t keep[N];
	uint32_t kept = 0;
	struct kvp_protect pr = { .pin_prompt = 1, .prompt_end = 30 }; /* tokens 0..9 (positions 10..28) */

	positions(pos, N);
	cr_assert_eq(kvp_select_survivors(N, pos, s, &pr, 4, keep, &kept), KVP_OK);
	cr_assert_eq(kept, 4);
	cr_assert(keep[0] && keep[2], "the prompt's two best");
	cr_assert(keep[10] && keep[11], "new tokens survive although every prompt token outscores them");
	/* five free slots: the prompt gets three */
	cr_assert_eq(kvp_select_survivors(N, pos, s, &pr, 5, keep, &kept), KVP_OK);
	cr_assert(keep[0] && keep[2] && keep[4] && keep[10] && keep[11] && kept == 5);
	/* with only one new token, the prompt takes what the new side cannot use */
	cr_assert_eq(kvp_select_survivors(11, pos, s, &pr, 6, keep, &kept), KVP_OK);
	cr_assert_eq(kept, 6);
	cr_assert(keep[10] && keep[0] && keep[2] && keep[4] && keep[6] && keep[7]);
}

Test(select, an_unpinned_prompt_competes_by_score)
{
	int32_t pos[N];
	float s[N] = { 9, 1, 8, 2, 7, 3, 6, 4, 0, 0, -5, -6 };
	uint8_t keep[N];
	uint32_t kept = 0;
	struct kvp_protect pr = { .pin_prompt = 0, .prompt_end = 30 };

	positions(pos, N);
	cr_assert_eq(kvp_select_survivors(N, pos, s, &pr, 4, keep, &kept), KVP_OK);
	cr_assert(keep[0] && keep[2] && keep[4] && keep[6] && !keep[10] && !keep[11]);
}

/* The reference: a full sort by (score, NaN lowest, then newer position), best `take` kept. */
static int by_rank_reference(const void *a, const void *b, void *arg)
{
	const float *s = arg;
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	float sx = isnan(s[x]) ? -INFINITY : s[x], sy = isnan(s[y]) ? -INFINITY : s[y];

	if (sx != sy)
		return sx > sy ? -1 : 1;
	return x > y ? -1 : x < y; /* positions increase with the index */
}

Test(select, selection_keeps_the_set_a_full_sort_keeps)
{
	enum { M = 3000 };
	static const float values[] = { 1.0f, -1.0f, 0.0f, -0.0f, NAN, INFINITY, -INFINITY, 0.5f, 2.0f };
	static float s[M];
	static int32_t pos[M];
	static uint32_t order[M];
	static uint8_t keep[M], want[M];
	struct kvp_protect none = { 0 };
	unsigned seed = 5;

	for (int trial = 0; trial < 200; trial++) {
		uint32_t n = 1 + (uint32_t)rand_r(&seed) % M, take = (uint32_t)rand_r(&seed) % (n + 2), kept = 0;
		int few = trial % 2; /* half the trials: scores from a few values, so most of them tie */
		for (uint32_t i = 0; i < n; i++) {
			s[i] = few ? values[rand_r(&seed) % (sizeof values / sizeof *values)] :
				     (float)rand_r(&seed) / (float)RAND_MAX - 0.5f;
			pos[i] = (int32_t)(3 * i) - 1000;
			order[i] = i;
		}
		if (trial % 7 == 0) /* sorted input, the classic quicksort worst case */
			for (uint32_t i = 0; i < n; i++)
				s[i] = (float)i;
		qsort_r(order, n, sizeof *order, by_rank_reference, s);
		memset(want, 0, n);
		for (uint32_t i = 0; i < take && i < n; i++)
			want[order[i]] = 1;
		cr_assert_eq(kvp_select_survivors(n, pos, s, &none, take, keep, &kept), KVP_OK);
		cr_assert_eq(kept, take < n ? take : n);
		cr_assert_eq(memcmp(keep, want, n), 0, "trial %d: n=%u take=%u", trial, n, take);
	}
}
