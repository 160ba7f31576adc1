/*
 * StreamingLLM (Xiao et al., 2023): keep the attention sinks (the first tokens) and a window of the most
 * recent ones, nothing else. Everything is decided by protection; the score only orders the rest by
 * recency, so a budget larger than sinks + window would keep the newest tokens.
 *   streaming(sinks=4, window=1024, every=1)     a round fires when the stream holds sinks + window + every
 */
#include "policies/policy.h"

static kvp_status open_streaming(struct kvp_policy *p, struct kvp_args *args)
{
	uint32_t sinks = 4, window = 1024, every = 1;
	kvp_status st = kvp_args_u32(args, "sinks", 0, INT32_MAX, &sinks);

	if (st == KVP_OK)
		st = kvp_args_u32(args, "window", 1, INT32_MAX, &window);
	if (st == KVP_OK)
		st = kvp_args_u32(args, "every", 1, 1u << 20, &every);
	if (st != KVP_OK)
		return st;
	p->plan.sinks = sinks;
	p->plan.window = window;
	p->plan.budget = sinks + window;
	p->plan.every = every;
	return KVP_OK;
}

static kvp_status score(struct kvp_policy *p, uint32_t layer, uint32_t kv_head, int64_t t0, uint32_t n,
			const int32_t *pos, const float *k, float *scores)
{
	(void)p, (void)layer, (void)kv_head, (void)t0, (void)k;
	for (uint32_t i = 0; i < n; i++)
		scores[i] = (float)pos[i];
	return KVP_OK;
}

const struct kvp_policy_ops kvp_policy_streaming = {
	.name = "streaming",
	.open = open_streaming,
	.score = score,
	.keeps_newest = 1,
};
