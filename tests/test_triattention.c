/*
 * TriAttention against ../shared/specs/triattention.md: the worked example's numbers, the nine checks of
 * section 5, and an independent double-precision reference of the pre-RoPE formula (the phase form with
 * per-key trigonometry) that the policy's post-RoPE mean-cos/sin form must reproduce.
 */
#include <criterion/criterion.h>

#include "memory_fixture.h"
#include "policy_fixture.h"

#define EPS 1e-5

/* The worked example: d = 4, theta = 1e4 (omega = 1, 0.01), two query heads sharing one KV head. */
static const float ex_mean_re[2][2] = { { 1, 0 }, { 0, 1 } };
static const float ex_mean_im[2][2] = { { 0, 2 }, { 1, 0 } };
static const float ex_abs[2][2] = { { 1.25f, 2.0f }, { 1.0f, 3.0f } };
static const int32_t ex_pos[3] = { 5, 9, 11 };
static const float ex_keys_half[3][4] = { { 2, 0, 0, 1 }, { 0, 1, 1, 0 }, { 1, 1, 1, -1 } };

/* Writes a one-layer stats file for `heads` query heads of head_dim dim; values [head][band]. */
static const char *write_stats(const char *name, kvp_shape s, const float *re, const float *im, const float *a,
			       float scale)
{
	struct kvp_tria_stats st;
	const char *path = fixture_path(name);
	size_t n = (size_t)s.n_layers * s.n_heads * s.head_dim / 2;

	cr_assert_eq(kvp_tria_stats_alloc(&st, s.n_layers, s.n_heads, s.head_dim, s.rope_layout, s.rope_theta),
		     KVP_OK);
	for (size_t i = 0; i < n; i++) {
		st.mean_re[i] = re[i] * scale;
		st.mean_im[i] = im[i] * scale;
		st.abs_mean[i] = a[i] * scale;
	}
	cr_assert_eq(kvp_tria_stats_write(path, &st), KVP_OK, "%s", kvp_last_error());
	kvp_tria_stats_free(&st);
	return path;
}

static kvp_policy *open_policy(const char *args, const char *stats, kvp_shape s)
{
	char spec[512];
	kvp_policy *p = NULL;

	snprintf(spec, sizeof spec, "triattention(stats=%s%s%s)", stats, args[0] ? "," : "", args);
	cr_assert_eq(kvp_policy_open(spec, &s, &p), KVP_OK, "%s: %s", spec, kvp_last_error());
	unlink(stats); /* read at open */
	return p;
}

static kvp_shape example_shape(kvp_rope_layout layout)
{
	return fixture_shape(1, 2, 1, 4, 1e4f, layout);
}

static kvp_policy *example_policy(const char *args, kvp_rope_layout layout, float scale)
{
	kvp_shape s = example_shape(layout);
	const char *path = write_stats(layout == KVP_ROPE_HALF ? "ex-half.kvtria" : "ex-inter.kvtria", s,
				       &ex_mean_re[0][0], &ex_mean_im[0][0], &ex_abs[0][0], scale);
	return open_policy(args, path, s);
}

/* Example keys after RoPE at their positions + shift, in the given layout. */
static void example_keys(float k[3][4], kvp_rope_layout layout, int64_t shift)
{
	for (int i = 0; i < 3; i++) {
		for (unsigned f = 0; f < 2; f++) {
			unsigned r, im;
			fixture_band_index(layout, 4, f, &r, &im);
			k[i][r] = ex_keys_half[i][f];
			k[i][im] = ex_keys_half[i][f + 2];
		}
		fixture_rope(k[i], 4, 1e4, layout, ex_pos[i] + shift);
	}
}

/* The spec's formula on pre-RoPE bands, per key, with trigonometry: the independent reference. */
static double reference_score(const float *mr, const float *mi, const float *a, const float *kre, const float *kim,
			      unsigned F, double theta, int64_t p, int64_t t0, unsigned n_offsets, int disable_norm)
{
	double trig = 0, norm = 0;

	for (unsigned d = 0; d < n_offsets; d++)
		for (unsigned f = 0; f < F; f++) {
			double w = pow(theta, -2.0 * f / (2 * F)), qa = hypot(mr[f], mi[f]), ka = hypot(kre[f], kim[f]);
			double phi = atan2(mi[f], mr[f]) - atan2(kim[f], kre[f]);
			trig += qa * ka * cos(w * (double)(t0 - p + ((int64_t)1 << d)) + phi);
		}
	for (unsigned f = 0; f < F; f++)
		norm += (a[f] - hypot(mr[f], mi[f])) * hypot(kre[f], kim[f]);
	return trig / n_offsets + (disable_norm ? 0 : norm);
}

Test(triattention, worked_example_raw_scores_match_the_spec_table)
{
	static const double want[2][3] = { { 1.099490, -0.413023, -1.044896 }, { 2.131470, 2.400493, 2.812689 } };
	kvp_policy *p = example_policy("", KVP_ROPE_HALF, 1.0f);
	float k[3][4], s[3];

	example_keys(k, KVP_ROPE_HALF, 0);
	for (uint32_t h = 0; h < 2; h++) {
		cr_assert_eq(kvp_tria_raw_scores(p, 0, h, 12, 3, &k[0][0], s), KVP_OK);
		for (int i = 0; i < 3; i++)
			cr_assert_float_eq(s[i], want[h][i], EPS, "h%u p=%d: %.6f, want %.6f", h, ex_pos[i], s[i],
					   want[h][i]);
	}
	kvp_policy_close(p);
}

Test(triattention, worked_example_z_scores_take_the_max_over_the_group)
{
	static const double want[3] = { 1.354839, -0.170357, 1.301005 };
	kvp_policy *p = example_policy("", KVP_ROPE_HALF, 1.0f);
	float k[3][4], s[3];

	example_keys(k, KVP_ROPE_HALF, 0);
	cr_assert_eq(kvp_policy_score(p, 0, 0, 12, 3, ex_pos, &k[0][0], s), KVP_OK, "%s", kvp_last_error());
	for (int i = 0; i < 3; i++)
		cr_assert_float_eq(s[i], want[i], EPS, "p=%d: %.6f, want %.6f", ex_pos[i], s[i], want[i]);
	kvp_policy_close(p);
}

Test(triattention, worked_example_top2_keeps_positions_5_and_11)
{
	kvp_policy *p = example_policy("budget=2,pin_prompt=0", KVP_ROPE_HALF, 1.0f);
	struct kvp_round r = { .t0 = 12, .n = 3, .pos = ex_pos };
	float k[3][4];
	uint8_t keep[3];
	uint32_t kept;

	example_keys(k, KVP_ROPE_HALF, 0);
	r.k = &k[0][0];
	cr_assert_eq(kvp_policy_round(p, 0, 0, &r, keep, &kept), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kept, 2);
	cr_assert(keep[0] && !keep[1] && keep[2], "kept %d %d %d", keep[0], keep[1], keep[2]);
	kvp_policy_close(p);
}

Test(triattention, hand_check_with_three_offsets_gives_1_789671)
{
	kvp_policy *p = example_policy("offsets=3", KVP_ROPE_HALF, 1.0f);
	float k[3][4], s[3];

	example_keys(k, KVP_ROPE_HALF, 0);
	cr_assert_eq(kvp_tria_raw_scores(p, 0, 0, 12, 1, &k[0][0], s), KVP_OK);
	cr_assert_float_eq(s[0], 1.789671, EPS, "%.6f", s[0]);
	kvp_policy_close(p);
}

/* T1 */
Test(triattention, shifting_every_position_and_t0_leaves_scores_unchanged)
{
	kvp_policy *p = example_policy("", KVP_ROPE_HALF, 1.0f);
	float k[3][4], ks[3][4], a[3], b[3];
	int32_t shifted[3] = { 1005, 1009, 1011 };

	example_keys(k, KVP_ROPE_HALF, 0);
	example_keys(ks, KVP_ROPE_HALF, 1000);
	for (uint32_t h = 0; h < 2; h++) {
		cr_assert_eq(kvp_tria_raw_scores(p, 0, h, 12, 3, &k[0][0], a), KVP_OK);
		cr_assert_eq(kvp_tria_raw_scores(p, 0, h, 1012, 3, &ks[0][0], b), KVP_OK);
		for (int i = 0; i < 3; i++)
			cr_assert_float_eq(a[i], b[i], EPS, "h%u key %d: %.6f vs %.6f", h, i, a[i], b[i]);
	}
	cr_assert_eq(kvp_policy_score(p, 0, 0, 1012, 3, shifted, &ks[0][0], b), KVP_OK);
	cr_assert_float_eq(b[0], 1.354839, EPS);
	kvp_policy_close(p);
}

/* T2 (with random statistics and keys, 17 offsets, d = 16) */
Test(triattention, post_rope_scores_equal_the_pre_rope_phase_formula)
{
	enum { D = 16, F = 8, N = 20 };
	kvp_shape s = fixture_shape(1, 1, 1, D, 1e4f, KVP_ROPE_HALF);
	float re[F], im[F], a[F], k[N][D], kre[N][F], kim[N][F], got[N];
	int64_t t0 = 4000;
	unsigned seed = 7;
	kvp_policy *p;

	for (unsigned f = 0; f < F; f++) {
		re[f] = (float)(rand_r(&seed) % 200 - 100) / 50.0f;
		im[f] = (float)(rand_r(&seed) % 200 - 100) / 50.0f;
		a[f] = hypotf(re[f], im[f]) * 1.5f + 0.1f;
	}
	p = open_policy("", write_stats("t2.kvtria", s, re, im, a, 1.0f), s);
	for (int i = 0; i < N; i++) {
		for (unsigned f = 0; f < F; f++) {
			kre[i][f] = k[i][f] = (float)(rand_r(&seed) % 200 - 100) / 40.0f;
			kim[i][f] = k[i][f + F] = (float)(rand_r(&seed) % 200 - 100) / 40.0f;
		}
		fixture_rope(k[i], D, 1e4, KVP_ROPE_HALF, 3000 + 37 * i);
	}
	cr_assert_eq(kvp_tria_raw_scores(p, 0, 0, t0, N, &k[0][0], got), KVP_OK);
	for (int i = 0; i < N; i++) {
		double want = reference_score(re, im, a, kre[i], kim[i], F, 1e4, 3000 + 37 * i, t0, 17, 0);
		cr_assert_float_eq(got[i], want, 1e-4 * (1 + fabs(want)), "key %d: %.6f, reference %.6f", i, got[i],
				   want);
	}
	kvp_policy_close(p);
}

/* T3 */
Test(triattention, half_and_interleaved_layouts_give_identical_scores)
{
	kvp_policy *half = example_policy("", KVP_ROPE_HALF, 1.0f), *inter = example_policy("", KVP_ROPE_INTERLEAVED, 1.0f);
	float kh[3][4], ki[3][4], a[3], b[3];

	example_keys(kh, KVP_ROPE_HALF, 0);
	example_keys(ki, KVP_ROPE_INTERLEAVED, 0);
	cr_assert(memcmp(kh, ki, sizeof kh), "the layouts must store the keys differently");
	cr_assert_eq(kvp_policy_score(half, 0, 0, 12, 3, ex_pos, &kh[0][0], a), KVP_OK);
	cr_assert_eq(kvp_policy_score(inter, 0, 0, 12, 3, ex_pos, &ki[0][0], b), KVP_OK);
	for (int i = 0; i < 3; i++)
		cr_assert_float_eq(a[i], b[i], 1e-6, "key %d: half %.7f, interleaved %.7f", i, a[i], b[i]);
	kvp_policy_close(half);
	kvp_policy_close(inter);
}

/* T4 */
Test(triattention, fully_concentrated_queries_have_no_norm_term)
{
	kvp_shape s = fixture_shape(1, 1, 1, 4, 1e4f, KVP_ROPE_HALF);
	float re[2] = { 1, 0 }, im[2] = { 0, 2 }, a[2] = { 1, 2 }; /* A = |q_mean|: R = 1 */
	kvp_policy *p = open_policy("", write_stats("t4.kvtria", s, re, im, a, 1.0f), s);
	float k[3][4], got[3];

	example_keys(k, KVP_ROPE_HALF, 0);
	cr_assert_eq(kvp_tria_raw_scores(p, 0, 0, 12, 3, &k[0][0], got), KVP_OK);
	for (int i = 0; i < 3; i++) {
		float kre[2] = { ex_keys_half[i][0], ex_keys_half[i][1] }, kim[2] = { ex_keys_half[i][2], ex_keys_half[i][3] };
		double trig = reference_score(re, im, a, kre, kim, 2, 1e4, ex_pos[i], 12, 17, 1);
		cr_assert_float_eq(got[i], trig, EPS, "key %d: %.6f, trig part alone %.6f", i, got[i], trig);
	}
	cr_assert_float_eq(got[0], 1.099490 - 0.25 * 2, EPS); /* the example's h0 minus its S_norm of 0.5 */
	kvp_policy_close(p);
}

/* T5 */
Test(triattention, unconcentrated_queries_rank_by_weighted_key_norm)
{
	kvp_shape s = fixture_shape(1, 1, 1, 4, 1e4f, KVP_ROPE_HALF);
	float re[2] = { 0, 0 }, im[2] = { 0, 0 }, a[2] = { 1.5f, 0.5f }; /* q_mean = 0: R = 0 */
	kvp_policy *p = open_policy("", write_stats("t5.kvtria", s, re, im, a, 1.0f), s);
	float k[3][4], got[3];

	example_keys(k, KVP_ROPE_HALF, 0);
	cr_assert_eq(kvp_tria_raw_scores(p, 0, 0, 12, 3, &k[0][0], got), KVP_OK);
	for (int i = 0; i < 3; i++) {
		double want = 1.5 * hypot(ex_keys_half[i][0], ex_keys_half[i][2]) +
			      0.5 * hypot(ex_keys_half[i][1], ex_keys_half[i][3]);
		cr_assert_float_eq(got[i], want, EPS, "key %d: %.6f, want %.6f", i, got[i], want);
	}
	kvp_policy_close(p);
}

/* T6 */
Test(triattention, scaling_the_statistics_scales_raw_scores_and_keeps_z_scores)
{
	kvp_policy *p1 = example_policy("", KVP_ROPE_HALF, 1.0f), *p3 = example_policy("", KVP_ROPE_HALF, 3.5f);
	float k[3][4], a[3], b[3];

	example_keys(k, KVP_ROPE_HALF, 0);
	for (uint32_t h = 0; h < 2; h++) {
		cr_assert_eq(kvp_tria_raw_scores(p1, 0, h, 12, 3, &k[0][0], a), KVP_OK);
		cr_assert_eq(kvp_tria_raw_scores(p3, 0, h, 12, 3, &k[0][0], b), KVP_OK);
		for (int i = 0; i < 3; i++)
			cr_assert_float_eq(b[i], 3.5f * a[i], 1e-4, "h%u key %d: %.6f vs 3.5 x %.6f", h, i, b[i], a[i]);
	}
	cr_assert_eq(kvp_policy_score(p1, 0, 0, 12, 3, ex_pos, &k[0][0], a), KVP_OK);
	cr_assert_eq(kvp_policy_score(p3, 0, 0, 12, 3, ex_pos, &k[0][0], b), KVP_OK);
	for (int i = 0; i < 3; i++)
		cr_assert_float_eq(a[i], b[i], EPS, "z of key %d: %.6f vs %.6f", i, a[i], b[i]);
	kvp_policy_close(p1);
	kvp_policy_close(p3);
}

/* T7 */
Test(triattention, default_is_17_offsets_up_to_65536_combined_by_mean)
{
	kvp_policy *dflt = example_policy("", KVP_ROPE_HALF, 1.0f), *o17 = example_policy("offsets=17", KVP_ROPE_HALF, 1.0f),
		   *o16 = example_policy("offsets=16", KVP_ROPE_HALF, 1.0f),
		   *mx = example_policy("aggregate=max", KVP_ROPE_HALF, 1.0f);
	float k[3][4], a[3], b[3], c[3], m[3];
	float kre[2] = { 2, 0 }, kim[2] = { 0, 1 };

	example_keys(k, KVP_ROPE_HALF, 0);
	cr_assert_eq(kvp_tria_raw_scores(dflt, 0, 0, 12, 3, &k[0][0], a), KVP_OK);
	cr_assert_eq(kvp_tria_raw_scores(o17, 0, 0, 12, 3, &k[0][0], b), KVP_OK);
	cr_assert_eq(kvp_tria_raw_scores(o16, 0, 0, 12, 3, &k[0][0], c), KVP_OK);
	cr_assert_eq(kvp_tria_raw_scores(mx, 0, 0, 12, 3, &k[0][0], m), KVP_OK);
	cr_assert_float_eq(a[0], b[0], 1e-7);
	cr_assert_float_eq(a[0], reference_score(ex_mean_re[0], ex_mean_im[0], ex_abs[0], kre, kim, 2, 1e4, 5, 12, 17, 0),
			   EPS);
	cr_assert(fabsf(c[0] - a[0]) > 1e-3f, "16 offsets must differ from 17: %.6f vs %.6f", c[0], a[0]);
	/* max over the 17 offsets: the best single offset, at least the mean */
	{
		double best = -1e30;
		for (unsigned d = 0; d < 17; d++) {
			double one = reference_score(ex_mean_re[0], ex_mean_im[0], ex_abs[0], kre, kim, 2, 1e4,
						     5 - ((int64_t)1 << d) + 1, 12, 1, 0);
			best = one > best ? one : best;
		}
		cr_assert_float_eq(m[0], best, EPS, "max: %.6f, want %.6f", m[0], best);
		cr_assert_geq(m[0], a[0]);
	}
	kvp_policy_close(dflt), kvp_policy_close(o17), kvp_policy_close(o16), kvp_policy_close(mx);
}

/* ---- T8 and T9-style checks on a simulated decode ---- */

enum { SIM_D = 8, SIM_F = 4, SIM_KV = 2, SIM_HEADS = 4, SIM_CAP = 1024 };

struct sim_stream {
	uint32_t n;
	int32_t pos[SIM_CAP];
	float k[SIM_CAP][SIM_D];
};

static kvp_policy *sim_policy(const char *args, uint32_t layers)
{
	kvp_shape s = fixture_shape(layers, SIM_HEADS, SIM_KV, SIM_D, 1e4f, KVP_ROPE_HALF);
	size_t n = (size_t)layers * SIM_HEADS * SIM_F;
	float *re = malloc(n * sizeof *re), *im = malloc(n * sizeof *im), *a = malloc(n * sizeof *a);
	unsigned seed = 11;
	kvp_policy *p;

	for (size_t i = 0; i < n; i++) {
		re[i] = (float)(rand_r(&seed) % 100) / 50.0f - 1.0f;
		im[i] = (float)(rand_r(&seed) % 100) / 50.0f - 1.0f;
		a[i] = hypotf(re[i], im[i]) + 0.3f;
	}
	p = open_policy(args, write_stats("sim.kvtria", s, re, im, a, 1.0f), s);
	free(re), free(im), free(a);
	return p;
}

/* Appends the token at absolute position t to a stream, its key rotated at t. */
static void sim_append(struct sim_stream *st, int64_t t, unsigned *seed)
{
	float *k = st->k[st->n];

	cr_assert_lt(st->n, SIM_CAP);
	for (unsigned i = 0; i < SIM_D; i++)
		k[i] = (float)(rand_r(seed) % 200) / 100.0f - 1.0f;
	fixture_rope(k, SIM_D, 1e4, KVP_ROPE_HALF, t);
	st->pos[st->n++] = (int32_t)t;
}

static void sim_compact(struct sim_stream *st, const uint8_t *keep)
{
	uint32_t out = 0;

	for (uint32_t i = 0; i < st->n; i++)
		if (keep[i]) {
			st->pos[out] = st->pos[i];
			memcpy(st->k[out], st->k[i], sizeof st->k[0]);
			out++;
		}
	st->n = out;
}

/* T8: budget 64, every 128, prompt of 20 pinned; 600 decode steps on 2 KV heads (per_layer_head rounds). */
Test(triattention, rounds_fire_every_128_steps_and_cut_each_head_to_the_budget_keeping_the_prompt)
{
	enum { PROMPT = 20, STEPS = 600, BUDGET = 64 };
	kvp_policy *p = sim_policy("budget=64,every=128,select=per_layer_head", 1);
	static struct sim_stream st[SIM_KV];
	int64_t rounds_at[8];
	unsigned seed = 3, n_rounds = 0;
	uint8_t keep[SIM_CAP];

	memset(st, 0, sizeof st);
	for (int64_t t = 0; t < PROMPT + STEPS; t++) {
		for (int h = 0; h < SIM_KV; h++)
			sim_append(&st[h], t, &seed);
		if (!kvp_policy_due(p, t + 1, st[0].n)) {
			cr_assert(st[0].n < BUDGET + 128, "a stream of %u tokens must be due", st[0].n);
			continue;
		}
		cr_assert_eq(st[0].n, BUDGET + 128, "due exactly at budget + every, not at %u", st[0].n);
		cr_assert_lt(n_rounds, 8);
		rounds_at[n_rounds++] = t;
		for (uint32_t h = 0; h < SIM_KV; h++) {
			struct kvp_round r = { .t0 = t + 1, .n = st[h].n, .pos = st[h].pos, .k = &st[h].k[0][0],
					       .prompt_end = PROMPT };
			uint32_t kept = 0;
			cr_assert_eq(kvp_policy_round(p, 0, h, &r, keep, &kept), KVP_OK, "%s", kvp_last_error());
			cr_assert_eq(kept, BUDGET, "head %u kept %u", h, kept);
			for (int i = 0; i < PROMPT; i++)
				cr_assert(keep[i], "prompt token %d dropped by head %u", i, h);
			sim_compact(&st[h], keep);
			cr_assert_eq(st[h].n, BUDGET);
		}
	}
	/* first round when 192 tokens are held (position 191), then every 128 decode steps */
	cr_assert_eq(n_rounds, 4, "rounds: %u", n_rounds);
	for (unsigned i = 0; i < n_rounds; i++)
		cr_assert_eq(rounds_at[i], 191 + 128 * (int64_t)i, "round %u at position %lld", i, (long long)rounds_at[i]);
	/* positions stay absolute after eviction: the newest token sits at the last position processed */
	cr_assert_eq(st[0].pos[st[0].n - 1], PROMPT + STEPS - 1);
	cr_assert(memcmp(st[0].pos, st[1].pos, sizeof(int32_t) * st[0].n), "heads choose independently (ragged)");
	kvp_policy_close(p);
}

/* T9-style: a key's raw score depends on its own absolute position and t0, not on its slot or company. */
Test(triattention, a_key_scores_the_same_alone_or_among_others_after_eviction)
{
	kvp_policy *p = example_policy("", KVP_ROPE_HALF, 1.0f);
	float k[3][4], all[3], alone[1];

	example_keys(k, KVP_ROPE_HALF, 0);
	cr_assert_eq(kvp_tria_raw_scores(p, 0, 1, 12, 3, &k[0][0], all), KVP_OK);
	cr_assert_eq(kvp_tria_raw_scores(p, 0, 1, 12, 1, k[2], alone), KVP_OK);
	cr_assert_float_eq(alone[0], all[2], 1e-7);
	cr_assert_float_eq(alone[0], 2.812689, EPS);
	/* t0 must follow every key: a cache-length t0 after eviction (here 2 < 11) is refused */
	cr_assert_eq(kvp_policy_score(p, 0, 0, 2, 3, ex_pos, &k[0][0], all), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "t0=2"), "%s", kvp_last_error());
	kvp_policy_close(p);
}

Test(triattention, per_head_select_keeps_one_set_for_every_layer)
{
	enum { L = 3, N = 120, BUDGET = 40 };
	kvp_policy *p = sim_policy("budget=40,every=8,select=per_head,pin_prompt=0", L);
	static struct sim_stream st[L];
	struct kvp_round r[L];
	uint8_t keep[SIM_CAP], one[SIM_CAP];
	uint32_t kept = 0, kept1 = 0;
	unsigned seed = 5;
	float mean[N] = { 0 }, s[N];

	memset(st, 0, sizeof st);
	for (int64_t t = 0; t < N; t++)
		for (int l = 0; l < L; l++)
			sim_append(&st[l], t, &seed);
	for (int l = 0; l < L; l++)
		r[l] = (struct kvp_round){ .t0 = N, .n = N, .pos = st[l].pos, .k = &st[l].k[0][0] };
	cr_assert_eq(kvp_policy_round_layers(p, 1, r, keep, &kept), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kept, BUDGET);
	/* the same set as ranking the layer mean of kvp_policy_score by hand */
	for (int l = 0; l < L; l++) {
		cr_assert_eq(kvp_policy_score(p, l, 1, N, N, st[l].pos, &st[l].k[0][0], s), KVP_OK);
		for (int i = 0; i < N; i++)
			mean[i] += s[i] / L;
	}
	{
		struct kvp_protect none = { 0 };
		cr_assert_eq(kvp_select_survivors(N, st[0].pos, mean, &none, BUDGET, one, &kept1), KVP_OK);
		cr_assert_eq(memcmp(keep, one, N), 0, "per_head set differs from the layer-mean ranking");
	}
	/* rounds over different positions are refused */
	st[2].pos[5] = 1000;
	cr_assert_eq(kvp_policy_round_layers(p, 1, r, keep, &kept), KVP_EINVAL);
	kvp_policy_close(p);
}

Test(triattention, union_select_keeps_one_set_for_every_kv_head_of_a_layer)
{
	enum { N = 100, BUDGET = 30 };
	kvp_policy *p = sim_policy("budget=30,select=union,pin_prompt=0", 1);
	static struct sim_stream st[SIM_KV];
	struct kvp_round r[SIM_KV];
	uint8_t keep[SIM_CAP];
	uint32_t kept = 0;
	unsigned seed = 9;
	float s0[N], s1[N];

	memset(st, 0, sizeof st);
	for (int64_t t = 0; t < N; t++)
		for (int h = 0; h < SIM_KV; h++)
			sim_append(&st[h], t, &seed);
	for (int h = 0; h < SIM_KV; h++)
		r[h] = (struct kvp_round){ .t0 = N, .n = N, .pos = st[h].pos, .k = &st[h].k[0][0] };
	cr_assert_eq(kvp_policy_round_union(p, 0, r, keep, &kept), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kept, BUDGET);
	cr_assert_eq(kvp_policy_score(p, 0, 0, N, N, st[0].pos, &st[0].k[0][0], s0), KVP_OK);
	cr_assert_eq(kvp_policy_score(p, 0, 1, N, N, st[1].pos, &st[1].k[0][0], s1), KVP_OK);
	/* every kept token is at least as good, by its best head, as every dropped one */
	{
		float worst_kept = INFINITY, best_dropped = -INFINITY;
		for (int i = 0; i < N; i++) {
			float m = s0[i] > s1[i] ? s0[i] : s1[i];
			if (keep[i])
				worst_kept = m < worst_kept ? m : worst_kept;
			else
				best_dropped = m > best_dropped ? m : best_dropped;
		}
		cr_assert_geq(worst_kept, best_dropped);
	}
	kvp_policy_close(p);
}

/* Online statistics: queries observed after RoPE average to the pre-RoPE statistics of a file. */
Test(triattention, online_stats_from_post_rope_queries_match_the_file_stats_of_the_same_queries)
{
	kvp_shape s = fixture_shape(1, 2, 1, 4, 1e4f, KVP_ROPE_INTERLEAVED);
	float re[2][2] = { { 0 } }, im[2][2] = { { 0 } }, ab[2][2] = { { 0 } }, q[2][4], k[3][4], a[3], b[3];
	kvp_policy *online, *file;
	unsigned seed = 21;
	enum { T = 50 };

	cr_assert_eq(kvp_policy_open("triattention(stats=online)", &s, &online), KVP_OK, "%s", kvp_last_error());
	for (int t = 0; t < T; t++) {
		for (int h = 0; h < 2; h++) {
			for (int f = 0; f < 2; f++) {
				float x = 1.0f + (float)(rand_r(&seed) % 100) / 100.0f, y = 0.5f - (float)(rand_r(&seed) % 100) / 100.0f;
				q[h][2 * f] = x, q[h][2 * f + 1] = y;
				re[h][f] += x / T, im[h][f] += y / T, ab[h][f] += hypotf(x, y) / T;
			}
			fixture_rope(q[h], 4, 1e4, KVP_ROPE_INTERLEAVED, t);
		}
		cr_assert_eq(kvp_policy_observe(online, 0, 0, t, &q[0][0], 0, NULL, NULL), KVP_OK, "%s", kvp_last_error());
	}
	file = open_policy("", write_stats("online.kvtria", s, &re[0][0], &im[0][0], &ab[0][0], 1.0f), s);
	example_keys(k, KVP_ROPE_INTERLEAVED, 40);
	for (uint32_t h = 0; h < 2; h++) {
		cr_assert_eq(kvp_tria_raw_scores(online, 0, h, 60, 3, &k[0][0], a), KVP_OK);
		cr_assert_eq(kvp_tria_raw_scores(file, 0, h, 60, 3, &k[0][0], b), KVP_OK);
		for (int i = 0; i < 3; i++)
			cr_assert_float_eq(a[i], b[i], 1e-4, "h%u key %d: online %.6f, file %.6f", h, i, a[i], b[i]);
	}
	kvp_policy_close(online);
	kvp_policy_close(file);
}

Test(triattention, bad_specs_and_stats_are_refused_with_a_reason)
{
	kvp_shape s = example_shape(KVP_ROPE_HALF);
	kvp_policy *p = (kvp_policy *)&s;

	cr_assert_eq(kvp_policy_open("triattention(budget=10,ratio=0.5)", &s, &p), KVP_EINVAL);
	cr_assert_null(p);
	cr_assert(strstr(kvp_last_error(), "not both"), "%s", kvp_last_error());
	cr_assert_eq(kvp_policy_open("triattention(offsets=40)", &s, &p), KVP_EINVAL);
	cr_assert_eq(kvp_policy_open("triattention(select=everything)", &s, &p), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "per_head|per_layer_head|union"), "%s", kvp_last_error());
	cr_assert_eq(kvp_policy_open("triattention(stats=/nonexistent/x.kvtria)", &s, &p), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "/nonexistent/x.kvtria"), "%s", kvp_last_error());
	cr_assert_eq(kvp_policy_open("triattention(budget=10,colour=red)", &s, &p), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "colour"), "%s", kvp_last_error());
	cr_assert_eq(kvp_policy_open("lru(size=3)", &s, &p), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "unknown policy 'lru'"), "%s", kvp_last_error());
}

Test(triattention, ratio_budget_follows_the_tokens_processed)
{
	kvp_shape s = example_shape(KVP_ROPE_HALF);
	struct kvp_policy *p = NULL;

	cr_assert_eq(kvp_policy_open("triattention(ratio=0.25,every=16)", &s, &p), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_policy_budget(p, 400), 100);
	cr_assert_eq(kvp_policy_budget(p, 401), 101);
	cr_assert(!kvp_policy_due(p, 400, 115));
	cr_assert(kvp_policy_due(p, 400, 116));
	kvp_policy_close(p);
}

Test(triattention, a_clone_keeps_the_online_statistics_and_then_goes_its_own_way)
{
	kvp_shape s = example_shape(KVP_ROPE_HALF);
	kvp_policy *p = NULL, *c = NULL, *f = NULL;
	float q[2][4] = { { 1, 0, 0, 2 }, { 0, 1, 1, 0 } }, other[2][4] = { { -3, 1, 0, 0 }, { 0, 0, 2, 2 } };
	float k[3][4], a[3], b[3];

	cr_assert_eq(kvp_policy_open("triattention(stats=online)", &s, &p), KVP_OK);
	cr_assert_eq(kvp_policy_observe(p, 0, 0, 0, &q[0][0], 0, NULL, NULL), KVP_OK); /* at t = 0: pre = post */
	cr_assert_eq(kvp_policy_clone(p, &c), KVP_OK, "%s", kvp_last_error());
	example_keys(k, KVP_ROPE_HALF, 0);
	cr_assert_eq(kvp_tria_raw_scores(p, 0, 1, 12, 3, &k[0][0], a), KVP_OK);
	cr_assert_eq(kvp_tria_raw_scores(c, 0, 1, 12, 3, &k[0][0], b), KVP_OK);
	for (int i = 0; i < 3; i++)
		cr_assert_float_eq(a[i], b[i], 0, "key %d", i);
	cr_assert_eq(kvp_policy_observe(c, 0, 0, 0, &other[0][0], 0, NULL, NULL), KVP_OK);
	cr_assert_eq(kvp_tria_raw_scores(p, 0, 1, 12, 3, &k[0][0], b), KVP_OK);
	for (int i = 0; i < 3; i++)
		cr_assert_float_eq(a[i], b[i], 0, "the original moved with the clone at key %d", i);
	cr_assert_eq(kvp_tria_raw_scores(c, 0, 1, 12, 3, &k[0][0], b), KVP_OK);
	cr_assert(fabsf(a[0] - b[0]) > 1e-3f, "the clone learned from its own query");
	f = example_policy("", KVP_ROPE_HALF, 1.0f);
	kvp_policy_close(c);
	cr_assert_eq(kvp_policy_clone(f, &c), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_tria_raw_scores(c, 0, 0, 12, 3, &k[0][0], b), KVP_OK);
	cr_assert_float_eq(b[0], 1.099490, EPS, "a clone of file statistics scores as the file does");
	kvp_policy_close(f), kvp_policy_close(c), kvp_policy_close(p);
}

/* The reference z-normalizes over the decode tokens only: a pinned prompt must not shift their ranking. */
Test(triattention, a_pinned_prompt_does_not_enter_the_decode_tokens_z_scores)
{
	enum { N = 100, PROMPT = 30, BUDGET = 60 };
	kvp_policy *p = sim_policy("budget=60,select=per_layer_head", 1);
	static struct sim_stream st;
	struct kvp_protect none = { 0 };
	uint8_t keep[N], want[N - PROMPT];
	uint32_t kept = 0, kept_want = 0;
	unsigned seed = 13;
	float s[N - PROMPT];

	memset(&st, 0, sizeof st);
	for (int64_t t = 0; t < N; t++)
		sim_append(&st, t, &seed);
	for (int i = 0; i < PROMPT; i++) /* loud prompt keys: they would dominate each head's mean and std */
		for (int j = 0; j < SIM_D; j++)
			st.k[i][j] *= (float)(1 + (i % 3) * 20);
	{
		struct kvp_round r = { .t0 = N, .n = N, .pos = st.pos, .k = &st.k[0][0], .prompt_end = PROMPT };
		cr_assert_eq(kvp_policy_round(p, 0, 1, &r, keep, &kept), KVP_OK, "%s", kvp_last_error());
	}
	cr_assert_eq(kept, BUDGET);
	cr_assert_eq(kvp_policy_score(p, 0, 1, N, N - PROMPT, st.pos + PROMPT, &st.k[PROMPT][0], s), KVP_OK);
	cr_assert_eq(kvp_select_survivors(N - PROMPT, st.pos + PROMPT, s, &none, BUDGET - PROMPT, want, &kept_want),
		     KVP_OK);
	for (int i = 0; i < PROMPT; i++)
		cr_assert(keep[i], "prompt token %d dropped", i);
	cr_assert_eq(memcmp(keep + PROMPT, want, N - PROMPT), 0, "decode tokens ranked with the prompt in their rows");
	kvp_policy_close(p);
}

/*
 * Tables, statistics and score rows come from the policy's allocator: a score that needs rows it refuses
 * fails with KVP_ENOMEM and a message, and the policy scores as before afterwards; the rows, sized by the
 * stream, are not held between calls (bookkeeping every token would pay); a clone takes its own memory
 * from its own allocator; every byte comes back at close.
 */
Test(triattention, memory_comes_from_its_allocator_and_all_of_it_comes_back)
{
	enum { N = 1000 };
	kvp_shape sh = fixture_shape(2, 4, 2, 16, 1e4f, KVP_ROPE_HALF);
	static const char spec[] = "triattention(stats=online,budget=64)";
	struct fixture_memory mem, other;
	kvp_policy *p = NULL, *c = NULL;
	static float k[N][16], q[2][16];
	static int32_t pos[N];
	static float a[N], b[N];

	fixture_memory_init(&mem, 1 << 20);
	fixture_memory_init(&other, 1 << 20);
	for (int i = 0; i < N; i++) {
		pos[i] = i;
		for (int j = 0; j < 16; j++)
			k[i][j] = sinf(0.37f * (float)(i * 16 + j));
	}
	for (int j = 0; j < 16; j++)
		q[0][j] = cosf(0.11f * j), q[1][j] = sinf(0.23f * j);
	cr_assert_eq(kvp_policy_parse_in(spec, strlen(spec), &sh, &mem.ops, &p), KVP_OK, "%s", kvp_last_error());
	cr_assert_gt(mem.held, 0, "the statistics come from the allocator");
	cr_assert_eq(kvp_policy_observe(p, 1, 1, 5, &q[0][0], 0, NULL, NULL), KVP_OK);
	size_t between_calls = mem.held;
	cr_assert_eq(kvp_policy_score(p, 1, 1, N, 100, pos, &k[0][0], a), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(mem.held, between_calls, "a score keeps %zu bytes after it returns", mem.held - between_calls);
	mem.left = 0;
	cr_assert_eq(kvp_policy_score(p, 1, 1, N, N, pos, &k[0][0], b), KVP_ENOMEM);
	cr_assert(strstr(kvp_last_error(), "triattention"), "%s", kvp_last_error());
	mem.left = 1 << 20;
	cr_assert_eq(kvp_policy_score(p, 1, 1, N, 100, pos, &k[0][0], b), KVP_OK, "%s", kvp_last_error());
	for (int i = 0; i < 100; i++)
		cr_assert_float_eq(a[i], b[i], 0, "token %d scores differently after a refused call", i);
	mem.left = 1 << 20;
	cr_assert_eq(kvp_policy_score(p, 1, 1, N, N, pos, &k[0][0], b), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_policy_clone_in(p, &other.ops, &c), KVP_OK, "%s", kvp_last_error());
	cr_assert_gt(other.held, 0, "the clone's memory is its own allocator's");
	cr_assert_eq(kvp_policy_score(c, 1, 1, N, 100, pos, &k[0][0], b), KVP_OK, "%s", kvp_last_error());
	for (int i = 0; i < 100; i++)
		cr_assert_float_eq(a[i], b[i], 0, "the clone scores token %d as its parent", i);
	kvp_policy_free(p);
	kvp_policy_free(c);
	cr_assert_eq(mem.held, 0, "%zu bytes not given back", mem.held);
	cr_assert_eq(other.held, 0, "%zu bytes of the clone not given back", other.held);
}
