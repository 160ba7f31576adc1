/*
 * H2O, heavy-hitter oracle (Zhang et al., 2023): a token's importance is the attention it has received so
 * far, summed over every query that saw it. Keeps the heavy hitters (a fraction `heavy` of the tokens
 * processed) plus the most recent ones (a fraction `recent`, protected).
 *   h2o(heavy=0.1, recent=0.1, every=1)     every: a round when the stream exceeds the budget by this much
 * Weights arrive through observe (the pager passes each step's softmax rows, or a host running its own
 * attention calls kvp_policy_observe). GQA: a KV head's token accumulates the weights of every query head
 * of its group. The accumulator is indexed by absolute position, so eviction never shifts it.
 */
#include <stdlib.h>
#include <string.h>

#include "policies/policy.h"

/* Positions beyond this are refused rather than turned into a huge allocation. */
#define H2O_MAX_POSITION (1 << 28)

struct accumulator {
	float *sum; /* [cap], indexed by absolute position */
	uint32_t cap;
};

struct h2o {
	struct accumulator *streams; /* [n_layers][n_kv_heads] */
};

static void close_h2o(struct kvp_policy *p);

static kvp_status open_h2o(struct kvp_policy *p, struct kvp_args *args)
{
	double heavy = 0.1, recent = 0.1;
	uint32_t every = 1;
	struct h2o *h;
	kvp_status st = kvp_args_double(args, "heavy", 0.0, 1.0, &heavy);

	if (st == KVP_OK)
		st = kvp_args_double(args, "recent", 0.0, 1.0, &recent);
	if (st == KVP_OK)
		st = kvp_args_u32(args, "every", 1, 1u << 20, &every);
	if (st == KVP_OK && !(heavy + recent > 0))
		st = kvp_fail(KVP_EINVAL, "h2o: heavy=%g and recent=%g leave no budget", heavy, recent);
	if (st != KVP_OK)
		return st;
	h = calloc(1, sizeof *h);
	if (h)
		h->streams = calloc((size_t)p->shape.n_layers * p->shape.n_kv_heads, sizeof *h->streams);
	if (!h || !h->streams) {
		free(h);
		return kvp_fail(KVP_ENOMEM, "h2o: out of memory");
	}
	p->plan.ratio = heavy + recent > 1.0 ? 1.0 : heavy + recent;
	p->plan.window_ratio = recent;
	p->plan.every = every;
	p->state = h;
	return KVP_OK;
}

static struct accumulator *stream(struct kvp_policy *p, uint32_t layer, uint32_t kv_head)
{
	struct h2o *h = p->state;
	return &h->streams[(size_t)layer * p->shape.n_kv_heads + kv_head];
}

/* Makes room for position last; the only step of observe that can fail, so it runs first. */
static kvp_status reserve(struct accumulator *a, int32_t last)
{
	uint32_t cap = a->cap ? a->cap : 256;
	float *grown;

	if (last >= H2O_MAX_POSITION)
		return kvp_fail(KVP_EINVAL, "h2o: position %d is beyond the %d positions it tracks", last,
				H2O_MAX_POSITION);
	if ((uint32_t)last < a->cap)
		return KVP_OK;
	while (cap <= (uint32_t)last)
		cap *= 2;
	grown = realloc(a->sum, sizeof *grown * cap);
	if (!grown)
		return kvp_fail(KVP_ENOMEM, "h2o: out of memory for %u positions", cap);
	memset(grown + a->cap, 0, sizeof *grown * (cap - a->cap));
	a->sum = grown;
	a->cap = cap;
	return KVP_OK;
}

static kvp_status observe(struct kvp_policy *p, const struct kvp_observation *o)
{
	struct accumulator *a = stream(p, o->layer, o->kv_head);
	unsigned group = p->shape.n_heads / p->shape.n_kv_heads;
	kvp_status st;

	if (!o->weights || o->n == 0)
		return KVP_OK;
	st = reserve(a, o->pos[o->n - 1]);
	if (st != KVP_OK)
		return st;
	for (unsigned g = 0; g < group; g++)
		for (uint32_t i = 0; i < o->n; i++)
			a->sum[o->pos[i]] += o->weights[(size_t)g * o->n + i];
	return KVP_OK;
}

static kvp_status score(struct kvp_policy *p, uint32_t layer, uint32_t kv_head, int64_t t0, uint32_t n,
			const int32_t *pos, const float *k, float *scores)
{
	const struct accumulator *a = stream(p, layer, kv_head);

	(void)t0, (void)k;
	for (uint32_t i = 0; i < n; i++)
		scores[i] = (uint32_t)pos[i] < a->cap ? a->sum[pos[i]] : 0.0f;
	return KVP_OK;
}

/* A forked sequence inherits the weights its tokens accumulated so far. */
static kvp_status clone_h2o(struct kvp_policy *dst, const struct kvp_policy *src)
{
	const struct h2o *from = src->state;
	size_t n = (size_t)src->shape.n_layers * src->shape.n_kv_heads;
	struct h2o *h = calloc(1, sizeof *h);

	dst->state = h;
	if (!h || !(h->streams = calloc(n, sizeof *h->streams)))
		goto out_of_memory;
	for (size_t i = 0; i < n; i++) {
		const struct accumulator *f = &from->streams[i];
		if (!f->cap)
			continue;
		h->streams[i].sum = malloc(sizeof *f->sum * f->cap);
		if (!h->streams[i].sum)
			goto out_of_memory;
		h->streams[i].cap = f->cap;
		memcpy(h->streams[i].sum, f->sum, sizeof *f->sum * f->cap);
	}
	return KVP_OK;
out_of_memory:
	close_h2o(dst);
	return kvp_fail(KVP_ENOMEM, "h2o: out of memory copying the accumulated weights");
}

static void close_h2o(struct kvp_policy *p)
{
	struct h2o *h = p->state;
	size_t n = (size_t)p->shape.n_layers * p->shape.n_kv_heads;

	if (!h)
		return;
	for (size_t i = 0; h->streams && i < n; i++)
		free(h->streams[i].sum);
	free(h->streams);
	free(h);
	p->state = NULL;
}

const struct kvp_policy_ops kvp_policy_h2o = {
	.name = "h2o",
	.open = open_h2o,
	.observe = observe,
	.score = score,
	.clone = clone_h2o,
	.close = close_h2o,
};
