/*
 * One sequence's gating: per (layer, KV head) the coherence measured so far, the host's override, and the
 * budget they yield at each kvp_seq_step (see gating.h). Rounds of a KVP_ROUND_STREAM policy use each
 * stream's budget; rounds whose verdict covers several streams (select=per_head, union) keep the policy's
 * (the tenant's check lets gating there only pick a ladder's bits).
 * Budgets move in whole blocks: every head's budget differs from the policy's by a multiple of the tenant's
 * block, so gating leaves no more partly filled blocks than the ungated cache has.
 * With a ladder a head's share is its level's keep fraction instead of 1 - STRENGTH * a, and its level also
 * picks the bits of its cold blocks (per stream, whatever the round scope is). Levels go by rank: at each
 * step the sequence's heads are ranked by coherence and split into equal shares, one per level, so the
 * levels are used whatever range the coherence spans (a fixed threshold put every head of kjv-64 on the
 * middle of three levels). A head moves to another level once its rank has asked for it HOLD steps in a
 * row.
 */
#include <stdlib.h>
#include <string.h>

#include "gating/gating.h"

/* How far budget moves: a fully coherent head keeps 1 - STRENGTH of the share of a diffuse one. */
#define STRENGTH 0.75

struct kvp_gating {
	const struct kvp_gating_config *cfg;
	struct kvp_allocator mem;
	size_t bytes;
	uint32_t n_layers, n_kv_heads, group;
	/* the arrays follow the struct in the same allocation: a fork copies them in one go */
	double *coherence;   /* [layers][kv_heads] in [0, 1] */
	uint32_t *samples;   /* entropy observations folded into coherence */
	uint32_t *budget;    /* the stream's budget at the last step, 0 before */
	uint32_t *level;     /* with a ladder: the head's level by rank of coherence at the last step */
	uint32_t *want, *streak; /* the level its rank asks for that differs from level, and for how many steps */
	uint64_t steps;
	float *override;     /* aggressiveness set through kvp_seq_set_head_level, or -1 */
	struct ranked { double c; uint32_t i; } *ranked; /* scratch of a step's ranking */
};

kvp_status kvp_gating_open(const struct kvp_gating_config *cfg, const kvp_shape *shape,
			   const struct kvp_allocator *mem, struct kvp_gating **out)
{
	size_t n = (size_t)shape->n_layers * shape->n_kv_heads;
	size_t bytes = sizeof(struct kvp_gating) + n * (sizeof(struct ranked) + sizeof(double) + 5 * sizeof(uint32_t) +
							 sizeof(float));
	struct kvp_gating *g;

	*out = NULL;
	if (cfg->gate == KVP_GATE_OFF)
		return KVP_OK;
	if (!(g = kvp_allocate(mem, bytes, "gating state")))
		return KVP_ENOMEM;
	g->cfg = cfg;
	g->mem = *mem;
	g->bytes = bytes;
	g->n_layers = shape->n_layers;
	g->n_kv_heads = shape->n_kv_heads;
	g->group = shape->n_heads / shape->n_kv_heads;
	g->ranked = (struct ranked *)(g + 1);
	g->coherence = (double *)(g->ranked + n);
	g->samples = (uint32_t *)(g->coherence + n);
	g->budget = g->samples + n;
	g->level = g->budget + n;
	g->want = g->level + n;
	g->streak = g->want + n;
	g->override = (float *)(g->streak + n);
	for (size_t i = 0; i < n; i++)
		g->override[i] = -1.0f;
	*out = g;
	return KVP_OK;
}

kvp_status kvp_gating_fork(const struct kvp_gating *src, const struct kvp_allocator *mem, struct kvp_gating **out)
{
	kvp_shape shape = { .n_layers = 0 };
	kvp_status st;

	*out = NULL;
	if (!src)
		return KVP_OK;
	shape.n_layers = src->n_layers;
	shape.n_kv_heads = src->n_kv_heads;
	shape.n_heads = src->n_kv_heads * src->group;
	if ((st = kvp_gating_open(src->cfg, &shape, mem, out)) == KVP_OK) {
		memcpy(*out + 1, src + 1, src->bytes - sizeof *src);
		(*out)->steps = src->steps;
	}
	return st;
}

void kvp_gating_close(struct kvp_gating *g)
{
	if (g) {
		struct kvp_allocator mem = g->mem;
		kvp_release(&mem, g, g->bytes);
	}
}

int kvp_gating_wants_weights(const struct kvp_gating *g)
{
	return g && g->cfg->gate == KVP_GATE_ENTROPY;
}

static size_t at(const struct kvp_gating *g, uint32_t layer, uint32_t kv_head)
{
	return (size_t)layer * g->n_kv_heads + kv_head;
}

void kvp_gating_observe(struct kvp_gating *g, uint32_t layer, uint32_t kv_head, uint32_t n, const float *weights)
{
	size_t i = at(g, layer, kv_head);
	double c = 0;

	for (uint32_t h = 0; h < g->group; h++)
		c += kvp_gate_entropy_coherence(n, weights + (size_t)h * n);
	c /= g->group;
	/* a running mean that keeps adapting: the last 256 observations weigh the most */
	if (g->samples[i] < 256)
		g->samples[i]++;
	g->coherence[i] += (c - g->coherence[i]) / g->samples[i];
}

/* gate=mrl: the policy's coherence signal, read afresh at every step. */
static kvp_status measure(struct kvp_gating *g, const struct kvp_policy *policy)
{
	for (uint32_t l = 0; l < g->n_layers; l++)
		for (uint32_t h = 0; h < g->n_kv_heads; h++) {
			kvp_status st = kvp_policy_coherence(policy, l, h, &g->coherence[at(g, l, h)]);
			if (st != KVP_OK)
				return st;
		}
	return KVP_OK;
}

static double aggressiveness(const struct kvp_gating *g, size_t i)
{
	return g->override[i] >= 0 ? g->override[i] : g->coherence[i];
}

uint32_t kvp_gating_level(const struct kvp_gating *g, uint32_t layer, uint32_t kv_head)
{
	size_t i;

	if (!g || !g->cfg->ladder.n)
		return 0;
	i = at(g, layer, kv_head);
	return g->override[i] >= 0 ? kvp_ladder_level(&g->cfg->ladder, g->override[i]) : g->level[i];
}

static int by_coherence(const void *a, const void *b)
{
	const struct ranked *x = a, *y = b;

	return x->c < y->c ? -1 : x->c > y->c ? 1 : (x->i > y->i) - (x->i < y->i);
}

/* A head takes the level its rank asks for once it has asked for HOLD steps in a row (at once at the
 * first step): heads of nearly equal coherence swap ranks often, and each change of level leaves a partly
 * filled cold block at the old one (compaction packs blocks of one level only). */
#define HOLD 32
static void settle(struct kvp_gating *g, uint32_t i, uint32_t level)
{
	if (!g->steps || level == g->level[i]) {
		g->level[i] = level;
		g->streak[i] = 0;
	} else if (level != g->want[i] || !g->streak[i]) {
		g->want[i] = level;
		g->streak[i] = 1;
	} else if (++g->streak[i] >= HOLD) {
		g->level[i] = level;
		g->streak[i] = 0;
	}
}

/* Every head's level by the rank of its coherence among the sequence's heads; equal coherences share one. */
static void rank_levels(struct kvp_gating *g)
{
	const uint32_t n = g->n_layers * g->n_kv_heads;

	for (uint32_t i = 0; i < n; i++)
		g->ranked[i] = (struct ranked){ g->coherence[i], i };
	qsort(g->ranked, n, sizeof *g->ranked, by_coherence);
	for (uint32_t from = 0, to; from < n; from = to) {
		for (to = from + 1; to < n && g->ranked[to].c == g->ranked[from].c;)
			to++;
		for (uint32_t j = from; j < to; j++)
			settle(g, g->ranked[j].i, kvp_ladder_rank_level(g->cfg->ladder.n, from, to - from, n));
	}
	g->steps++;
}

/*
 * With a ladder a head's share is its level's keep fraction. kvp_gate_distribute splits in proportion to
 * 1 - strength x c; keeps in (0, 1] are that with strength = 1 - the smallest keep of the layer and
 * c = (1 - keep) / strength.
 */
static void ladder_shares(const struct kvp_gating *g, uint32_t layer, double *a, double *strength)
{
	const struct kvp_ladder *l = &g->cfg->ladder;
	double least = 1.0;

	for (uint32_t h = 0; h < g->n_kv_heads; h++) {
		a[h] = l->keep[kvp_gating_level(g, layer, h)];
		least = a[h] < least ? a[h] : least;
	}
	*strength = 1.0 - least;
	for (uint32_t h = 0; h < g->n_kv_heads; h++) {
		double c = *strength > 0 ? (1.0 - a[h]) / *strength : 0.0;
		a[h] = c < 0 ? 0 : c > 1 ? 1 : c;
	}
}

kvp_status kvp_gating_step(struct kvp_gating *g, const struct kvp_policy *policy, int64_t t0, uint64_t floor_each,
			   uint32_t block)
{
	const uint32_t H = g ? g->n_kv_heads : 0;
	double *a;
	uint64_t *out;
	kvp_status st = KVP_OK;

	if (!g)
		return KVP_OK;
	if (g->cfg->gate == KVP_GATE_MRL && (st = measure(g, policy)) != KVP_OK)
		return st;
	if (g->cfg->ladder.n)
		rank_levels(g);
	a = malloc(H * sizeof *a);
	out = malloc(H * sizeof *out);
	if (!a || !out) {
		free(a), free(out);
		return kvp_fail(KVP_ENOMEM, "kvp_seq_step: gating %u heads", H);
	}
	for (uint32_t l = 0; l < g->n_layers; l++) {
		double strength = STRENGTH;
		for (uint32_t h = 0; h < H; h++)
			a[h] = aggressiveness(g, at(g, l, h));
		if (g->cfg->ladder.n)
			ladder_shares(g, l, a, &strength);
		st = kvp_gate_distribute_blocks(H, a, strength, kvp_policy_budget(policy, t0), floor_each, block, out);
		if (st != KVP_OK) {
			st = kvp_fail_context(st, "kvp_seq_step: gating layer %u", l);
			break;
		}
		for (uint32_t h = 0; h < H; h++)
			g->budget[at(g, l, h)] = out[h] > UINT32_MAX ? UINT32_MAX : (uint32_t)out[h];
	}
	free(a), free(out);
	return st;
}

uint32_t kvp_gating_budget(const struct kvp_gating *g, uint32_t layer, uint32_t kv_head)
{
	return g ? g->budget[at(g, layer, kv_head)] : 0;
}

/* ---- what the host reads and sets (the pager checks the head against the shape first) ---- */

kvp_status kvp_gating_head_level(const struct kvp_gating *g, uint32_t layer, uint32_t kv_head, kvp_head_level *out)
{
	kvp_head_level full = { .size = sizeof full };
	size_t i;

	if (!g)
		return kvp_fail(KVP_EINVAL, "kvp_seq_head_level: the tenant has gate=off, so heads have no levels");
	if (!out || out->size < sizeof(uint32_t) + sizeof(float))
		return kvp_fail(KVP_EABI, "kvp_seq_head_level: out->size must be set to sizeof(kvp_head_level)");
	i = at(g, layer, kv_head);
	full.coherence = (float)g->coherence[i];
	full.overridden = g->override[i] >= 0;
	full.aggressiveness = full.overridden ? g->override[i] : full.coherence;
	full.budget = g->budget[i];
	full.level = kvp_gating_level(g, layer, kv_head);
	full.bits = g->cfg->ladder.n ? g->cfg->ladder.bits[full.level] : 0;
	kvp_sized_copy(out, &full, sizeof full);
	return KVP_OK;
}

kvp_status kvp_gating_set_head_level(struct kvp_gating *g, uint32_t layer, uint32_t kv_head, float aggressiveness)
{
	if (!g)
		return kvp_fail(KVP_EINVAL, "kvp_seq_set_head_level: the tenant has gate=off, so heads have no levels");
	if (!(aggressiveness <= 1.0f) || (aggressiveness < 0 && aggressiveness != -1.0f))
		return kvp_fail(KVP_EINVAL, "kvp_seq_set_head_level: aggressiveness %g is outside [0, 1] (or -1 to "
				"return the head to its measured coherence)", (double)aggressiveness);
	g->override[at(g, layer, kv_head)] = aggressiveness;
	return KVP_OK;
}
