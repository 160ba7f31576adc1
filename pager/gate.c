/*
 * Coherence gating (gate=mrl|entropy): how predictable a head's attention is decides how hard its
 * stream is pruned. Each (layer, KV head) has a coherence c in [0, 1]: the mean resultant length of its
 * queries from TriAttention's statistics (gate=mrl), or the running mean of 1 - H/log n of the softmax
 * weights kvp_attend computes (gate=entropy). At every kvp_seq_step the layer's budget, budget(t0) per
 * stream, is redistributed over its KV heads in proportion to 1 - STRENGTH * a, with a = c or the
 * host's override: coherent heads give tokens to diffuse ones and the layer's total is conserved
 * exactly (policies/gate.c). No head gets less than its protected tiers (sinks + window) while the
 * total allows it. Rounds of select=per_layer_head, H2O and StreamingLLM use each stream's budget;
 * select=per_head and union share one verdict over several streams and keep the policy's budget.
 * With ladder= (ladder.c) a head's share is its level's keep fraction instead of 1 - STRENGTH * a, and
 * its level also picks the bits of its cold blocks (per stream, whatever select= is).
 */
#include <stdlib.h>
#include <string.h>

#include "pager.h"
#include "policies/policy.h"

/* How far budget moves: a fully coherent head keeps 1 - STRENGTH of the share of a diffuse one. */
#define STRENGTH 0.75

kvp_status kvp_gate_check(const struct kvp_tenant_config *cfg)
{
	if (cfg->gate == KVP_GATE_OFF)
		return KVP_OK;
	if (!cfg->policy_spec[0])
		return kvp_fail(KVP_EINVAL, "tenant: gate=%s moves a policy's budget between heads, and no policy= "
				"is set", cfg->gate == KVP_GATE_MRL ? "mrl" : "entropy");
	if (cfg->gate == KVP_GATE_MRL && strncmp(cfg->policy_spec, "triattention", 12) != 0)
		return kvp_fail(KVP_EINVAL, "tenant: gate=mrl reads TriAttention's query statistics; policy=%s has "
				"none (gate=entropy works with any policy)", cfg->policy_spec);
	return KVP_OK;
}

kvp_status kvp_gate_open(struct kvp_tenant *t, struct kvp_seq *s)
{
	size_t n = (size_t)s->shape.n_layers * s->shape.n_kv_heads;
	size_t bytes = sizeof(struct kvp_gating) + n * (sizeof(double) + 2 * sizeof(uint32_t) + sizeof(float));
	struct kvp_gating *g;

	if (t->cfg.gate == KVP_GATE_OFF)
		return KVP_OK;
	if (!(g = kvp_alloc(t, bytes, KVP_BYTES_META, 0, s->call)))
		return kvp_fail_context(KVP_ENOMEM, "kvp_seq_open: gating state");
	memset(g, 0, bytes);
	g->bytes = bytes;
	g->coherence = (double *)(g + 1);
	g->samples = (uint32_t *)(g->coherence + n);
	g->budget = g->samples + n;
	g->override = (float *)(g->budget + n);
	for (size_t i = 0; i < n; i++)
		g->override[i] = -1.0f;
	s->gating = g;
	return KVP_OK;
}

/* A fork continues from its source's measurements and overrides. */
kvp_status kvp_gate_fork(struct kvp_tenant *t, const struct kvp_seq *src, struct kvp_seq *s)
{
	kvp_status st = kvp_gate_open(t, s);

	if (st == KVP_OK && src->gating)
		memcpy(s->gating + 1, src->gating + 1, src->gating->bytes - sizeof *src->gating);
	return st;
}

void kvp_gate_close(struct kvp_tenant *t, struct kvp_seq *s)
{
	if (s->gating)
		kvp_free(t, s->gating, s->gating->bytes, KVP_BYTES_META, 0);
	s->gating = NULL;
}

int kvp_gate_wants_weights(const struct kvp_seq *s)
{
	return s->gating && s->tenant->cfg.gate == KVP_GATE_ENTROPY;
}

static size_t at(const struct kvp_seq *s, uint32_t layer, uint32_t kv_head)
{
	return (size_t)layer * s->shape.n_kv_heads + kv_head;
}

void kvp_gate_observe(struct kvp_seq *s, uint32_t layer, uint32_t kv_head, uint32_t n, const float *weights)
{
	struct kvp_gating *g = s->gating;
	size_t i = at(s, layer, kv_head);
	double c = 0;

	for (uint32_t h = 0; h < s->group; h++)
		c += kvp_gate_entropy_coherence(n, weights + (size_t)h * n);
	c /= s->group;
	/* a running mean that keeps adapting: the last 256 observations weigh the most */
	if (g->samples[i] < 256)
		g->samples[i]++;
	g->coherence[i] += (c - g->coherence[i]) / g->samples[i];
}

static kvp_status measure_mrl(struct kvp_seq *s)
{
	for (uint32_t l = 0; l < s->shape.n_layers; l++)
		for (uint32_t h = 0; h < s->shape.n_kv_heads; h++) {
			kvp_status st = kvp_tria_coherence(s->policy, l, h, &s->gating->coherence[at(s, l, h)]);
			if (st != KVP_OK)
				return st;
		}
	return KVP_OK;
}

/*
 * With a ladder a head's share is its level's keep fraction. kvp_gate_distribute splits in proportion to
 * 1 - strength x c; keeps in (0, 1] are that with strength = 1 - the smallest keep of the layer and
 * c = (1 - keep) / strength.
 */
static void ladder_shares(const struct kvp_seq *s, uint32_t layer, double *a, double *strength)
{
	const struct kvp_ladder *l = &s->tenant->cfg.ladder;
	double least = 1.0;

	for (uint32_t h = 0; h < s->shape.n_kv_heads; h++) {
		a[h] = l->keep[kvp_ladder_head_level(s, layer, h)];
		least = a[h] < least ? a[h] : least;
	}
	*strength = 1.0 - least;
	for (uint32_t h = 0; h < s->shape.n_kv_heads; h++) {
		double c = *strength > 0 ? (1.0 - a[h]) / *strength : 0.0;
		a[h] = c < 0 ? 0 : c > 1 ? 1 : c;
	}
}

kvp_status kvp_gate_step(struct kvp_seq *s)
{
	const uint32_t H = s->shape.n_kv_heads;
	const struct kvp_tenant_config *cfg = &s->tenant->cfg;
	struct kvp_gating *g = s->gating;
	double *a;
	uint64_t *out;
	kvp_status st = KVP_OK;

	if (!g)
		return KVP_OK;
	if (cfg->gate == KVP_GATE_MRL && (st = measure_mrl(s)) != KVP_OK)
		return st;
	a = malloc(H * sizeof *a);
	out = malloc(H * sizeof *out);
	if (!a || !out) {
		free(a), free(out);
		return kvp_fail(KVP_ENOMEM, "kvp_seq_step: gating %u heads", H);
	}
	for (uint32_t l = 0; l < s->shape.n_layers; l++) {
		uint64_t total = (uint64_t)kvp_policy_budget(s->policy, s->t0) * H;
		uint64_t floor = (uint64_t)cfg->sinks + cfg->window;
		double strength = STRENGTH;
		for (uint32_t h = 0; h < H; h++) {
			size_t i = at(s, l, h);
			a[h] = g->override[i] >= 0 ? g->override[i] : g->coherence[i];
		}
		if (cfg->ladder.n)
			ladder_shares(s, l, a, &strength);
		if (floor > total / H)
			floor = total / H;
		if ((st = kvp_gate_distribute(H, a, strength, total, floor, out)) != KVP_OK) {
			st = kvp_fail_context(st, "kvp_seq_step: gating layer %u", l);
			break;
		}
		for (uint32_t h = 0; h < H; h++)
			g->budget[at(s, l, h)] = out[h] > UINT32_MAX ? UINT32_MAX : (uint32_t)out[h];
	}
	free(a), free(out);
	return st;
}

uint32_t kvp_gate_budget(const struct kvp_seq *s, uint32_t layer, uint32_t kv_head)
{
	return s->gating ? s->gating->budget[at(s, layer, kv_head)] : 0;
}

/* ---- the public calls (entered through calls.c like every sequence call) ---- */

static kvp_status check_head(const struct kvp_seq *s, uint32_t layer, uint32_t kv_head, const char *call)
{
	if (layer >= s->shape.n_layers || kv_head >= s->shape.n_kv_heads)
		return kvp_fail(KVP_EINVAL, "%s: layer %u, KV head %u outside %u x %u", call, layer, kv_head,
				s->shape.n_layers, s->shape.n_kv_heads);
	if (!s->gating)
		return kvp_fail(KVP_EINVAL, "%s: the tenant has gate=off, so heads have no levels", call);
	return KVP_OK;
}

kvp_status kvp_seq_head_level_entered(struct kvp_seq *s, uint32_t layer, uint32_t kv_head, kvp_head_level *out)
{
	kvp_head_level full = { .size = sizeof full };
	kvp_status st = check_head(s, layer, kv_head, "kvp_seq_head_level");
	size_t i;

	if (st != KVP_OK)
		return st;
	if (!out || out->size < sizeof(uint32_t) + sizeof(float))
		return kvp_fail(KVP_EABI, "kvp_seq_head_level: out->size must be set to sizeof(kvp_head_level)");
	i = at(s, layer, kv_head);
	full.coherence = (float)s->gating->coherence[i];
	full.overridden = s->gating->override[i] >= 0;
	full.aggressiveness = full.overridden ? s->gating->override[i] : full.coherence;
	full.budget = s->gating->budget[i];
	full.level = kvp_ladder_head_level(s, layer, kv_head);
	full.bits = s->tenant->cfg.ladder.n ? s->tenant->cfg.ladder.bits[full.level] : 0;
	memcpy((char *)out + sizeof out->size, (const char *)&full + sizeof full.size,
	       (out->size < sizeof full ? out->size : sizeof full) - sizeof out->size);
	return KVP_OK;
}

kvp_status kvp_seq_set_head_level_entered(struct kvp_seq *s, uint32_t layer, uint32_t kv_head, float aggressiveness)
{
	kvp_status st = check_head(s, layer, kv_head, "kvp_seq_set_head_level");

	if (st != KVP_OK)
		return st;
	if (!(aggressiveness <= 1.0f) || (aggressiveness < 0 && aggressiveness != -1.0f))
		return kvp_fail(KVP_EINVAL, "kvp_seq_set_head_level: aggressiveness %g is outside [0, 1] (or -1 to "
				"return the head to its measured coherence)", (double)aggressiveness);
	s->gating->override[at(s, layer, kv_head)] = aggressiveness;
	return KVP_OK;
}
