/* The public policy calls. No scorer is registered yet, so every open is refused with a reason. */
#include "policy.h"

kvp_status kvp_policy_open(const char *spec, const kvp_shape *shape, kvp_policy **out)
{
	(void)shape;
	if (out)
		*out = NULL;
	return kvp_fail(KVP_EUNSUPPORTED, "policy '%s': no token policy is built into this version yet "
			"(triattention, h2o and streaming arrive with the policies work)", spec ? spec : "");
}

kvp_status kvp_policy_score(kvp_policy *p, uint32_t layer, uint32_t kv_head, int64_t t0, uint32_t n,
			    const int32_t *pos, const float *k_post_rope, float *scores)
{
	(void)p, (void)layer, (void)kv_head, (void)t0, (void)n, (void)pos, (void)k_post_rope, (void)scores;
	return kvp_fail(KVP_EUNSUPPORTED, "kvp_policy_score: no token policy is built into this version yet");
}

void kvp_policy_close(kvp_policy *p)
{
	(void)p;
}
