/* Coherence gating: entropy and mean resultant length, budget distribution, the bits ladder. */
#include <criterion/criterion.h>

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
