/*
 * The arithmetic of coherence gating (DESIGN.md): how predictable a head's attention is decides how hard
 * it is pruned. Coherence c in [0, 1] comes from the policy's coherence op (TriAttention: the mean resultant
 * length of the head's queries: a head whose queries point one way attends predictably) or from the
 * normalized entropy of its attention (1 - H/log n).
 * The budget is moved between heads, never created: kvp_gate_distribute conserves the total exactly.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gating/gating.h"

double kvp_gate_entropy_coherence(uint32_t n, const float *weights)
{
	double total = 0, h = 0;

	if (n <= 1)
		return 1.0;
	for (uint32_t i = 0; i < n; i++)
		total += weights[i] > 0 ? weights[i] : 0;
	if (!(total > 0))
		return 0.0; /* no information: treat as diffuse, the safe side */
	for (uint32_t i = 0; i < n; i++) {
		double p = weights[i] > 0 ? weights[i] / total : 0;
		if (p > 0)
			h -= p * log(p);
	}
	h = 1.0 - h / log((double)n);
	return h < 0 ? 0 : h > 1 ? 1 : h;
}

/* Largest-remainder rounding of share[i] * extra, so the integer parts sum to extra exactly. */
static void round_shares(uint32_t n, const double *share, uint64_t extra, double *frac, uint64_t *out)
{
	uint64_t given = 0;

	for (uint32_t i = 0; i < n; i++) {
		double exact = share[i] * (double)extra;
		uint64_t whole = (uint64_t)floor(exact);
		if (given + whole > extra)
			whole = extra - given; /* floating point slack, never more than the total */
		out[i] += whole;
		given += whole;
		frac[i] = exact - floor(exact);
	}
	/* the floors leave fewer than n units; they go to the largest remainders, lower index first */
	while (given < extra) {
		uint32_t best = 0;
		for (uint32_t i = 1; i < n; i++)
			if (frac[i] > frac[best])
				best = i;
		if (frac[best] < 0) /* every head took one (only with rounding slack): start another pass */
			for (uint32_t i = 0; i < n; i++)
				frac[i] = share[i];
		else
			frac[best] = -1;
		out[best]++;
		given++;
	}
}

kvp_status kvp_gate_distribute(uint32_t n, const double *coherence, double strength, uint64_t total,
			       uint64_t floor_each, uint64_t *out)
{
	double *share, *frac, sum = 0;

	if (n == 0 || !coherence || !out)
		return kvp_fail(KVP_EINVAL, "gate: no heads to distribute over");
	if (!(strength >= 0 && strength < 1))
		return kvp_fail(KVP_EINVAL, "gate: strength %g is outside [0, 1)", strength);
	if (floor_each > total / n)
		return kvp_fail(KVP_EINVAL, "gate: %u heads x floor %llu exceed the total %llu", n,
				(unsigned long long)floor_each, (unsigned long long)total);
	for (uint32_t i = 0; i < n; i++)
		if (!(coherence[i] >= 0 && coherence[i] <= 1))
			return kvp_fail(KVP_EINVAL, "gate: coherence %g of head %u is outside [0, 1]", coherence[i], i);
	share = malloc(sizeof *share * n);
	frac = malloc(sizeof *frac * n);
	if (!share || !frac) {
		free(share), free(frac);
		return kvp_fail(KVP_ENOMEM, "gate: out of memory for %u heads", n);
	}
	for (uint32_t i = 0; i < n; i++)
		sum += share[i] = 1.0 - strength * coherence[i]; /* > 0 since strength < 1 */
	for (uint32_t i = 0; i < n; i++) {
		share[i] /= sum;
		out[i] = floor_each;
	}
	round_shares(n, share, total - floor_each * n, frac, out);
	free(share), free(frac);
	return KVP_OK;
}

kvp_status kvp_gate_distribute_blocks(uint32_t n, const double *coherence, double strength, uint64_t each,
				      uint64_t floor_each, uint32_t block, uint64_t *out)
{
	/* each = q blocks + r tokens: every head keeps the r tokens, and the n q blocks move */
	uint64_t unit = block ? block : 1, q = each / unit, r = each % unit, floor_units = 0;
	kvp_status st;

	if (floor_each > r)
		floor_units = (floor_each - r + unit - 1) / unit;
	if (!floor_units && !r)
		floor_units = 1; /* a budget of 0 would read as "the policy's own" */
	if (floor_units > q)
		floor_units = q; /* the protected tiers outgrow the budget: every head keeps the policy's */
	st = kvp_gate_distribute(n, coherence, strength, q * n, floor_units, out);
	for (uint32_t i = 0; st == KVP_OK && i < n; i++)
		out[i] = r + out[i] * unit;
	return st;
}
