/*
 * H2O, heavy-hitter oracle (Zhang et al., 2023): a token's importance is the attention it has received so
 * far, summed over every query that saw it. Keeps the heavy hitters (a fraction `heavy` of the tokens
 * processed) plus the most recent ones (a fraction `recent`, protected).
 *   h2o(heavy=0.1, recent=0.1, every=1)     every: a round when the stream exceeds the budget by this much
 * Weights arrive through observe (the pager passes each step's softmax rows, or a host running its own
 * attention calls kvp_policy_observe). GQA: a KV head's token accumulates the weights of every query head
 * of its group.
 *
 * Each stream keeps one (position, sum) pair per token of its latest observation, in position order, so
 * its memory follows the tokens the stream holds, never the values of their positions. An observation
 * names every token the stream holds: a token missing from it has been evicted, and its sum is dropped
 * then (the pager's compaction shows up in the next observation). The pairs come from the policy's
 * allocator: the pager's charges them to the sequence's tenant.
 */
#include <string.h>

#include "policies/policy.h"

#define H2O_MIN_CAP 16u

struct accumulator {
	int32_t *pos; /* [cap], increasing; the first n are the tokens of the latest observation */
	float *sum;   /* [cap] their accumulated weights */
	uint32_t n, cap;
};

struct h2o {
	struct accumulator *streams; /* [n_layers][n_kv_heads] */
	size_t n_streams;
};

static size_t pair_bytes(uint32_t cap)
{
	return (size_t)cap * (sizeof(int32_t) + sizeof(float));
}

/* Pairs for cap tokens in one allocation, positions first. */
static kvp_status accumulator_alloc(const struct kvp_allocator *mem, uint32_t cap, struct accumulator *a)
{
	char *m = kvp_allocate(mem, pair_bytes(cap), "room for the accumulated weights");

	if (!m)
		return KVP_ENOMEM;
	a->pos = (int32_t *)m;
	a->sum = (float *)(m + (size_t)cap * sizeof(int32_t));
	a->n = 0;
	a->cap = cap;
	return KVP_OK;
}

static void accumulator_release(const struct kvp_allocator *mem, struct accumulator *a)
{
	if (a->cap)
		kvp_release(mem, a->pos, pair_bytes(a->cap));
	memset(a, 0, sizeof *a);
}

static void close_h2o(struct kvp_policy *p);

static kvp_status h2o_state(struct kvp_policy *p)
{
	size_t n = (size_t)p->shape.n_layers * p->shape.n_kv_heads;
	struct h2o *h = kvp_allocate(&p->mem, sizeof *h, "h2o: its state");

	if (!h)
		return KVP_ENOMEM;
	p->state = h;
	if (!(h->streams = kvp_allocate_array(&p->mem, n, sizeof *h->streams, "h2o: its stream table"))) {
		close_h2o(p);
		return KVP_ENOMEM;
	}
	h->n_streams = n;
	return KVP_OK;
}

static kvp_status open_h2o(struct kvp_policy *p, struct kvp_args *args)
{
	double heavy = 0.1, recent = 0.1;
	uint32_t every = 1;
	kvp_status st = kvp_args_double(args, "heavy", 0.0, 1.0, &heavy);

	if (st == KVP_OK)
		st = kvp_args_double(args, "recent", 0.0, 1.0, &recent);
	if (st == KVP_OK)
		st = kvp_args_u32(args, "every", 1, 1u << 20, &every);
	if (st == KVP_OK && !(heavy + recent > 0))
		st = kvp_fail(KVP_EINVAL, "h2o: heavy=%g and recent=%g leave no budget", heavy, recent);
	if (st == KVP_OK)
		st = h2o_state(p);
	if (st != KVP_OK)
		return st;
	p->plan.ratio = heavy + recent > 1.0 ? 1.0 : heavy + recent;
	p->plan.window_ratio = recent;
	p->plan.every = every;
	return KVP_OK;
}

static struct accumulator *stream(struct kvp_policy *p, uint32_t layer, uint32_t kv_head)
{
	struct h2o *h = p->state;
	return &h->streams[(size_t)layer * p->shape.n_kv_heads + kv_head];
}

/*
 * The sums of the old pairs (pos, sum)[0..m) for the n positions `at`, written to out_pos/out_sum; a
 * position the old pairs lack starts at 0. The outputs may be the old arrays when fits_in_place says so.
 */
static void carry(const int32_t *pos, const float *sum, uint32_t m, uint32_t n, const int32_t *at,
		  int32_t *out_pos, float *out_sum)
{
	uint32_t i = 0;

	for (uint32_t j = 0; j < n; j++) {
		float s = 0.0f;
		while (i < m && pos[i] < at[j])
			i++;
		if (i < m && pos[i] == at[j])
			s = sum[i++];
		out_pos[j] = at[j];
		out_sum[j] = s;
	}
}

/* Whether carry can write over the old pairs: slot j is written only once every old pair at an index
 * <= j has been read or passed. Holds when tokens were only evicted and appended (the pager's case). */
static int fits_in_place(const struct accumulator *a, uint32_t n, const int32_t *at)
{
	uint32_t i = 0;

	for (uint32_t j = 0; j < n; j++) {
		while (i < a->n && a->pos[i] < at[j])
			i++;
		i += i < a->n && a->pos[i] == at[j];
		if (i <= j && j < a->n)
			return 0;
	}
	return 1;
}

/* Capacity for n tokens: an eighth more, so a stream that grows by a token a step reallocates every n/8
 * steps (O(log n) times to reach n), while its pairs stay within an eighth of the tokens it holds (a
 * power of two would leave up to half of them unused: bookkeeping paid per token). */
static uint32_t capacity_for(uint32_t n)
{
	uint32_t cap = n + n / 8 > n ? n + n / 8 : n;

	return cap < H2O_MIN_CAP ? H2O_MIN_CAP : cap;
}

/* Re-keys the stream's pairs to the observed positions; the only step of observe that can fail. */
static kvp_status rekey(const struct kvp_allocator *mem, struct accumulator *a, uint32_t n, const int32_t *at)
{
	struct accumulator fresh;

	/* shrink too once a round has evicted a good part of what the stream held */
	if (n <= a->cap && !(a->cap > H2O_MIN_CAP && n < a->cap / 2) && fits_in_place(a, n, at)) {
		carry(a->pos, a->sum, a->n, n, at, a->pos, a->sum);
		a->n = n;
		return KVP_OK;
	}
	if (accumulator_alloc(mem, capacity_for(n), &fresh) != KVP_OK)
		return kvp_fail_context(KVP_ENOMEM, "h2o: weights of %u tokens", n);
	carry(a->pos, a->sum, a->n, n, at, fresh.pos, fresh.sum);
	fresh.n = n;
	accumulator_release(mem, a);
	*a = fresh;
	return KVP_OK;
}

static kvp_status observe(struct kvp_policy *p, const struct kvp_observation *o)
{
	struct accumulator *a = stream(p, o->layer, o->kv_head);
	unsigned group = p->shape.n_heads / p->shape.n_kv_heads;
	kvp_status st;

	if (!o->weights || o->n == 0)
		return KVP_OK;
	if ((st = rekey(&p->mem, a, o->n, o->pos)) != KVP_OK)
		return st;
	for (unsigned g = 0; g < group; g++)
		for (uint32_t i = 0; i < o->n; i++)
			a->sum[i] += o->weights[(size_t)g * o->n + i];
	return KVP_OK;
}

static kvp_status score(struct kvp_policy *p, uint32_t layer, uint32_t kv_head, int64_t t0, uint32_t n,
			const int32_t *pos, const float *k, float *scores)
{
	const struct accumulator *a = stream(p, layer, kv_head);
	uint32_t j = 0;

	(void)t0, (void)k;
	/* both in position order: one pass; a token never observed scores 0 */
	for (uint32_t i = 0; i < n; i++) {
		while (j < a->n && a->pos[j] < pos[i])
			j++;
		scores[i] = j < a->n && a->pos[j] == pos[i] ? a->sum[j] : 0.0f;
	}
	return KVP_OK;
}

/* A forked sequence inherits the weights its tokens accumulated so far, in its own memory. */
static kvp_status clone_h2o(struct kvp_policy *dst, const struct kvp_policy *src)
{
	const struct h2o *from = src->state;
	struct h2o *h;
	kvp_status st = h2o_state(dst);

	for (size_t i = 0; st == KVP_OK && i < from->n_streams; i++) {
		const struct accumulator *f = &from->streams[i];
		h = dst->state;
		if (!f->n)
			continue;
		if ((st = accumulator_alloc(&dst->mem, capacity_for(f->n), &h->streams[i])) != KVP_OK)
			break;
		memcpy(h->streams[i].pos, f->pos, f->n * sizeof *f->pos);
		memcpy(h->streams[i].sum, f->sum, f->n * sizeof *f->sum);
		h->streams[i].n = f->n;
	}
	if (st != KVP_OK) {
		close_h2o(dst);
		return kvp_fail_context(st, "h2o: copying the accumulated weights");
	}
	return KVP_OK;
}

static void close_h2o(struct kvp_policy *p)
{
	struct h2o *h = p->state;

	if (!h)
		return;
	for (size_t i = 0; h->streams && i < h->n_streams; i++)
		accumulator_release(&p->mem, &h->streams[i]);
	kvp_release(&p->mem, h->streams, h->n_streams * sizeof *h->streams);
	kvp_release(&p->mem, h, sizeof *h);
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
