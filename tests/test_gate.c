/* Coherence gating (gating/): entropy and mean resultant length, budget distribution, the bits ladder, a
 * tenant's gate= and ladder= checks, and one sequence's gating state on its own. */
#include <criterion/criterion.h>

#include "gating/gating.h"
#include "memory_fixture.h"
#include "policy_fixture.h"

Test(gate, entropy_coherence_is_one_for_a_spike_and_zero_for_uniform)
{
	float spike[8] = { 0, 0, 1, 0, 0, 0, 0, 0 }, flat[8] = { 1, 1, 1, 1, 1, 1, 1, 1 };
	float half[4] = { 0.5f, 0.5f, 0, 0 };

	cr_assert_float_eq(kvp_gate_entropy_coherence(8, spike), 1.0, 1e-12);
	cr_assert_float_eq(kvp_gate_entropy_coherence(8, flat), 0.0, 1e-12);
	cr_assert_float_eq(kvp_gate_entropy_coherence(4, half), 0.5, 1e-12); /* 1 - log 2 / log 4 */
	cr_assert_float_eq(kvp_gate_entropy_coherence(1, spike), 1.0, 0);
}

Test(gate, distribution_conserves_the_total_and_favours_the_diffuse_head)
{
	float sharp[16] = { 0 }, diffuse[16];
	double c[2];
	uint64_t out[2];

	sharp[3] = 0.9f, sharp[4] = 0.1f;
	for (int i = 0; i < 16; i++)
		diffuse[i] = 1.0f / 16;
	c[0] = kvp_gate_entropy_coherence(16, sharp);
	c[1] = kvp_gate_entropy_coherence(16, diffuse);
	cr_assert_gt(c[0], c[1]);
	cr_assert_eq(kvp_gate_distribute(2, c, 0.5, 1001, 16, out), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(out[0] + out[1], 1001);
	cr_assert_gt(out[1], out[0], "the higher-entropy head gets more: %llu vs %llu", (unsigned long long)out[1],
		     (unsigned long long)out[0]);
	/* c0 = 1 - H(0.9, 0.1)/log 16 = 0.882751, c1 = 0; weights 1 - 0.5c = 0.558624 and 1; the 969 above
	 * the floors split 347.298 / 621.702, and the one left over goes to the larger remainder */
	cr_assert_float_eq(c[0], 0.8827511, 1e-6);
	cr_assert_eq(out[0], 16 + 347);
	cr_assert_eq(out[1], 16 + 622);
}

Test(gate, many_heads_sum_exactly_for_awkward_totals)
{
	double c[7] = { 0.1, 0.9, 0.33, 0.5, 0.77, 0.0, 1.0 };
	uint64_t out[7];

	for (uint64_t total = 7; total < 2000; total += 97) {
		uint64_t sum = 0;
		cr_assert_eq(kvp_gate_distribute(7, c, 0.9, total, 1, out), KVP_OK);
		for (int i = 0; i < 7; i++) {
			sum += out[i];
			cr_assert_geq(out[i], 1);
		}
		cr_assert_eq(sum, total, "total %llu split into %llu", (unsigned long long)total, (unsigned long long)sum);
		cr_assert_geq(out[5], out[6], "coherence 0 never gets less than coherence 1");
	}
}

Test(gate, impossible_distributions_are_refused)
{
	double c[2] = { 0.5, 1.5 }, ok[2] = { 0.5, 0.5 };
	uint64_t out[2] = { 7, 7 };

	cr_assert_eq(kvp_gate_distribute(2, c, 0.5, 100, 0, out), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "head 1"), "%s", kvp_last_error());
	cr_assert_eq(kvp_gate_distribute(2, ok, 1.0, 100, 0, out), KVP_EINVAL);
	cr_assert_eq(kvp_gate_distribute(2, ok, 0.5, 100, 60, out), KVP_EINVAL);
	cr_assert(out[0] == 7 && out[1] == 7, "nothing half-applied");
}

Test(gate, mrl_weights_bands_by_their_energy)
{
	struct kvp_tria_stats s;

	/* 2 query heads, 1 KV head, 2 bands: |q_mean| = (1, 0) and (0.5, 0.5), abs = (1, 1) and (1, 1) */
	cr_assert_eq(kvp_tria_stats_alloc(&s, 1, 2, 4, KVP_ROPE_HALF, 1e4f), KVP_OK);
	s.mean_re[0] = 1, s.abs_mean[0] = 1, s.abs_mean[1] = 1;
	s.mean_im[2] = 0.5f, s.abs_mean[2] = 1, s.mean_re[3] = 0.5f, s.abs_mean[3] = 1;
	cr_assert_float_eq(kvp_gate_mrl(&s, 0, 0, 1), 2.0 / 4.0, 1e-7);
	cr_assert_float_eq(kvp_gate_mrl(&s, 0, 0, 2), 1.0 / 2.0, 1e-7); /* KV head 0 = query head 0 only */
	cr_assert_float_eq(kvp_gate_mrl(&s, 0, 1, 2), 1.0 / 2.0, 1e-7);
	s.abs_mean[0] = 0, s.mean_re[0] = 0, s.abs_mean[1] = 0;
	cr_assert_float_eq(kvp_gate_mrl(&s, 0, 0, 2), 0.0, 0, "no energy: no coherence");
	kvp_tria_stats_free(&s);
}

Test(gate, ladder_parses_levels_and_maps_coherence_to_them)
{
	struct kvp_ladder l;
	const char *text = "4:1.0,3:0.5,2:0.25";

	cr_assert_eq(kvp_ladder_parse(text, strlen(text), &l), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(l.n, 3);
	cr_assert(l.bits[0] == 4 && l.bits[1] == 3 && l.bits[2] == 2);
	cr_assert_float_eq(l.keep[2], 0.25, 0);
	cr_assert_eq(kvp_ladder_level(&l, 0.0), 0);
	cr_assert_eq(kvp_ladder_level(&l, 0.5), 1);
	cr_assert_eq(kvp_ladder_level(&l, 0.8), 2);
	cr_assert_eq(kvp_ladder_level(&l, 7.0), 2);
}

Test(gate, malformed_ladders_are_refused_with_the_item)
{
	static const char *bad[] = { "", "4", "4:", "0:1", "17:1", "4:0", "4:1.5", "x:1", "4:1,,3:0.5",
				     "2:0.25,4:1.0", "4:1,4:1,4:1,4:1,4:1,4:1,4:1,4:1,4:1" };
	struct kvp_ladder l = { .n = 99 };

	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		cr_assert_eq(kvp_ladder_parse(bad[i], strlen(bad[i]), &l), KVP_EINVAL, "'%s' accepted", bad[i]);
		cr_assert(strstr(kvp_last_error(), "ladder"), "%s", kvp_last_error());
	}
	cr_assert_eq(l.n, 99, "a refused ladder leaves the output alone");
}

static struct kvp_gating_config gating_config(enum kvp_gate gate, const char *ladder)
{
	struct kvp_gating_config cfg = { .gate = gate };

	if (ladder) {
		cr_assert_eq(kvp_ladder_parse(ladder, strlen(ladder), &cfg.ladder), KVP_OK, "%s", kvp_last_error());
		snprintf(cfg.ladder_spec, sizeof cfg.ladder_spec, "%s", ladder);
	}
	return cfg;
}

/* The checks ask the policy and codec registries what they offer, never for a name, and list what does. */
Test(gate, checks_ask_policies_and_codecs_what_they_offer)
{
	struct kvp_gating_config mrl = gating_config(KVP_GATE_MRL, NULL);
	struct kvp_gating_config ladder = gating_config(KVP_GATE_ENTROPY, "4:1.0,2:0.5");

	cr_assert_eq(kvp_gating_check(&mrl, "h2o(heavy=0.1,recent=0.1)", "", ""), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "gate=mrl") && strstr(kvp_last_error(), "(triattention)"), "%s",
		  kvp_last_error());
	cr_assert_eq(kvp_gating_check(&mrl, "triattention(stats=online,select=per_layer_head)", "", ""), KVP_OK, "%s",
		     kvp_last_error());
	cr_assert_eq(kvp_gating_check(&mrl, "", "", ""), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "no policy="), "%s", kvp_last_error());
	cr_assert_eq(kvp_gating_check(&ladder, "h2o", "spark(keep=0.5)|fp16", "fp16"), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "takes bits= (turboquant, kivi)"), "%s", kvp_last_error());
	cr_assert_eq(kvp_gating_check(&ladder, "h2o", "fp16", "spark(keep=0.5)|kivi"), KVP_OK, "%s",
		     kvp_last_error());
	cr_assert_eq(kvp_gating_levels(&ladder), 2);
	cr_assert_eq(kvp_gating_level_bits(&ladder, 1), 2);
	cr_assert_eq(kvp_gating_levels(&mrl), 1);
	cr_assert_eq(kvp_gating_level_bits(&mrl, 0), 0, "without a ladder codecs open as written");
}

/*
 * One sequence's gating, without a pager: gate=entropy folds attention weights into coherence, a step
 * moves the layer's budget to the diffuse head and conserves it, a fork continues from its source, an
 * override sticks, and every byte comes from and goes back to the allocator it was opened with.
 */
Test(gate, a_sequences_gating_moves_budget_to_the_diffuse_head)
{
	struct kvp_gating_config cfg = gating_config(KVP_GATE_ENTROPY, "4:1.0,3:0.5"), off = { .gate = KVP_GATE_OFF };
	kvp_shape s = fixture_shape(2, 4, 2, 8, 1e4f, KVP_ROPE_HALF);
	float sharp[2][8] = { { 0, 0, 0, 0, 0, 0, 0, 1 }, { 0, 0, 0, 0, 0, 0, 1, 0 } };
	float flat[2][8] = { { 1, 1, 1, 1, 1, 1, 1, 1 }, { 1, 1, 1, 1, 1, 1, 1, 1 } };
	struct fixture_memory mem;
	struct kvp_gating *g, *fork;
	kvp_policy *p;
	kvp_head_level level = { .size = sizeof level };

	fixture_memory_init(&mem, 1 << 20);
	cr_assert_eq(kvp_gating_open(&off, &s, &mem.ops, &g), KVP_OK);
	cr_assert_null(g, "gate=off keeps no state");
	cr_assert_eq(kvp_gating_head_level(NULL, 0, 0, &level), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "gate=off"), "%s", kvp_last_error());
	cr_assert_eq(kvp_policy_open("streaming(sinks=4,window=60)", &s, &p), KVP_OK);
	cr_assert_eq(kvp_gating_open(&cfg, &s, &mem.ops, &g), KVP_OK, "%s", kvp_last_error());
	cr_assert_gt(mem.held, 0);
	cr_assert(kvp_gating_wants_weights(g));
	for (uint32_t l = 0; l < 2; l++) {
		kvp_gating_observe(g, l, 0, 8, &sharp[0][0]);
		kvp_gating_observe(g, l, 1, 8, &flat[0][0]);
	}
	cr_assert_eq(kvp_gating_step(g, p, 100, 8, 1), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_gating_budget(g, 1, 0) + kvp_gating_budget(g, 1, 1), 2 * 64, "the total is conserved");
	cr_assert_gt(kvp_gating_budget(g, 1, 1), kvp_gating_budget(g, 1, 0));
	cr_assert_eq(kvp_gating_level(g, 0, 0), 1, "the sharp head takes the aggressive level");
	cr_assert_eq(kvp_gating_level(g, 0, 1), 0);
	cr_assert_eq(kvp_gating_fork(g, &mem.ops, &fork), KVP_OK);
	cr_assert_eq(kvp_gating_budget(fork, 1, 1), kvp_gating_budget(g, 1, 1));
	cr_assert_eq(kvp_gating_set_head_level(fork, 0, 0, 0.0f), KVP_OK);
	cr_assert_eq(kvp_gating_head_level(fork, 0, 0, &level), KVP_OK);
	cr_assert(level.overridden && level.level == 0 && level.bits == 4);
	cr_assert_eq(kvp_gating_head_level(g, 0, 0, &level), KVP_OK);
	cr_assert(!level.overridden && level.level == 1 && level.bits == 3, "the source keeps its own");
	cr_assert_eq(kvp_gating_set_head_level(g, 0, 0, 1.5f), KVP_EINVAL);
	kvp_gating_close(fork);
	kvp_gating_close(g);
	kvp_policy_close(p);
	cr_assert_eq(mem.held, 0, "%zu bytes not given back", mem.held);
}

/* Budgets move in whole blocks: every head's differs from the policy's by blocks, the total holds, and
 * the floor is met in blocks. */
Test(gate, distribution_in_blocks_moves_whole_blocks)
{
	double c[3] = { 0.9, 0.1, 0.5 };
	uint64_t out[3];

	cr_assert_eq(kvp_gate_distribute_blocks(3, c, 0.75, 100, 20, 16, out), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(out[0] + out[1] + out[2], 300);
	for (int i = 0; i < 3; i++) {
		cr_assert_eq(out[i] % 16, 100 % 16, "head %d: %llu", i, (unsigned long long)out[i]);
		cr_assert_geq(out[i], 20);
	}
	cr_assert_lt(out[0], out[2]);
	cr_assert_lt(out[2], out[1]);
	/* a floor above the budget leaves every head at the budget */
	cr_assert_eq(kvp_gate_distribute_blocks(3, c, 0.75, 100, 120, 16, out), KVP_OK);
	cr_assert(out[0] == 100 && out[1] == 100 && out[2] == 100);
	/* no head is given 0 tokens (the policy's own budget to a round), even without a floor */
	double sharp[2] = { 1.0, 0.0 };
	cr_assert_eq(kvp_gate_distribute_blocks(2, sharp, 0.9, 64, 0, 64, out), KVP_OK);
	cr_assert(out[0] == 64 && out[1] == 64, "%llu and %llu", (unsigned long long)out[0], (unsigned long long)out[1]);
	cr_assert_eq(kvp_gate_distribute_blocks(2, sharp, 0.9, 128, 0, 32, out), KVP_OK);
	cr_assert(out[0] == 64 && out[1] == 192, "%llu and %llu", (unsigned long long)out[0], (unsigned long long)out[1]);
	/* block 1 is kvp_gate_distribute itself */
	uint64_t tokens[3];
	cr_assert_eq(kvp_gate_distribute_blocks(3, c, 0.75, 100, 20, 1, out), KVP_OK);
	cr_assert_eq(kvp_gate_distribute(3, c, 0.75, 300, 20, tokens), KVP_OK);
	cr_assert_arr_eq(out, tokens, sizeof out);
}

Test(gate, rank_levels_split_heads_into_equal_shares)
{
	unsigned got[12];

	for (uint32_t r = 0; r < 12; r++)
		got[r] = kvp_ladder_rank_level(3, r, 1, 12);
	for (uint32_t r = 0; r < 12; r++)
		cr_assert_eq(got[r], r / 4, "rank %u of 12 on 3 levels: %u", r, got[r]);
	cr_assert_eq(kvp_ladder_rank_level(3, 0, 12, 12), 1, "all tied: the middle level");
	cr_assert_eq(kvp_ladder_rank_level(2, 0, 8, 8), 0, "all tied on 2 levels: the boundary takes the gentler");
	cr_assert_eq(kvp_ladder_rank_level(2, 0, 1, 2), 0);
	cr_assert_eq(kvp_ladder_rank_level(2, 1, 1, 2), 1);
}

/*
 * A 3-level ladder over heads whose coherences lie close together (0.40 .. 0.60: round(c x 2) is 1 for
 * every one of them) still uses every level: two heads each, by rank.
 */
Test(gate, a_ladders_levels_spread_heads_whose_coherence_is_close)
{
	struct kvp_gating_config cfg = gating_config(KVP_GATE_ENTROPY, "4:1.0,3:0.6,2:0.3");
	kvp_shape s = fixture_shape(3, 6, 3, 8, 1e4f, KVP_ROPE_HALF);
	struct fixture_memory mem;
	struct kvp_gating *g;
	kvp_policy *p;
	unsigned count[3] = { 0 };

	fixture_memory_init(&mem, 1 << 20);
	cr_assert_eq(kvp_policy_open("h2o(heavy=0.2,recent=0.2)", &s, &p), KVP_OK);
	cr_assert_eq(kvp_gating_open(&cfg, &s, &mem.ops, &g), KVP_OK, "%s", kvp_last_error());
	for (uint32_t l = 0; l < 3; l++)
		for (uint32_t h = 0; h < 3; h++) {
			/* weights 1 and x on 2 tokens: coherence from 0.42 to 0.57 over the 9 heads */
			float x = 0.16f - 0.008f * (float)(l * 3 + h), w[2][2] = { { 1, x }, { 1, x } };
			kvp_gating_observe(g, l, h, 2, &w[0][0]);
		}
	cr_assert_eq(kvp_gating_step(g, p, 1000, 8, 16), KVP_OK, "%s", kvp_last_error());
	for (uint32_t l = 0; l < 3; l++)
		for (uint32_t h = 0; h < 3; h++) {
			kvp_head_level lv = { .size = sizeof lv };
			cr_assert_eq(kvp_gating_head_level(g, l, h, &lv), KVP_OK);
			cr_assert(lv.coherence > 0.35f && lv.coherence < 0.65f, "%g", lv.coherence);
			cr_assert_eq(kvp_ladder_level(&cfg.ladder, lv.coherence), 1, "a fixed threshold: the middle");
			count[lv.level]++;
			cr_assert_eq(lv.bits, cfg.ladder.bits[lv.level]);
		}
	cr_assert(count[0] == 3 && count[1] == 3 && count[2] == 3, "levels %u/%u/%u", count[0], count[1], count[2]);
	kvp_gating_close(g);
	kvp_policy_close(p);
}

/*
 * Heads whose ranks swap at every step keep their levels: a head moves once its rank has asked for the
 * other level 32 steps in a row (each change leaves a partly filled cold block behind). Observations of
 * one token give coherence 1, of two zero weights 0, so the running means are fractions of ones.
 */
Test(gate, a_level_changes_only_after_its_rank_holds)
{
	struct kvp_gating_config cfg = gating_config(KVP_GATE_ENTROPY, "4:1,2:1");
	kvp_shape s = fixture_shape(1, 2, 2, 8, 1e4f, KVP_ROPE_HALF);
	float one[1] = { 1 }, zeros[2] = { 0, 0 };
	struct fixture_memory mem;
	struct kvp_gating *g;
	kvp_policy *p;
	int step;

	fixture_memory_init(&mem, 1 << 20);
	cr_assert_eq(kvp_policy_open("h2o(heavy=0.2,recent=0.2)", &s, &p), KVP_OK);
	cr_assert_eq(kvp_gating_open(&cfg, &s, &mem.ops, &g), KVP_OK, "%s", kvp_last_error());
	for (step = 0; step < 21; step++) { /* means 1 and 0, then 1/2 and 1/2 (tied: both on level 0), ... */
		kvp_gating_observe(g, 0, 0, step % 2 ? 2 : 1, step % 2 ? zeros : one);
		kvp_gating_observe(g, 0, 1, step % 2 ? 1 : 2, step % 2 ? one : zeros);
		cr_assert_eq(kvp_gating_step(g, p, 1000, 8, 16), KVP_OK, "%s", kvp_last_error());
		cr_assert_eq(kvp_gating_level(g, 0, 0), 1, "step %d: head 0 keeps the aggressive level", step);
		cr_assert_eq(kvp_gating_level(g, 0, 1), 0, "step %d", step);
	}
	int moved[2] = { 0, 0 };
	for (step = 1; step <= 40; step++) { /* head 1 turns coherent: tied at the first step, then above */
		kvp_gating_observe(g, 0, 0, 2, zeros);
		kvp_gating_observe(g, 0, 1, 1, one);
		cr_assert_eq(kvp_gating_step(g, p, 1000, 8, 16), KVP_OK);
		for (uint32_t h = 0; h < 2; h++)
			if (!moved[h] && kvp_gating_level(g, 0, h) != 1 - h)
				moved[h] = step;
	}
	cr_assert_eq(moved[0], 32, "head 0 leaves the aggressive level after 32 steps asking, not %d", moved[0]);
	cr_assert_eq(moved[1], 33, "head 1 asks from the second step on: %d", moved[1]);
	cr_assert_eq(kvp_gating_level(g, 0, 0), 0);
	cr_assert_eq(kvp_gating_level(g, 0, 1), 1);
	kvp_gating_close(g);
	kvp_policy_close(p);
}
