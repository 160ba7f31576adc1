/*
 * kvp_append: all-or-nothing. Every block, copy and table an append needs is charged and allocated
 * first (plan); only when all of them exist are tokens written and pointers swapped (commit). A failed
 * plan is unwound and the sequence is exactly as it was.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "pager.h"

struct stream_plan {
	uint32_t sink_take, tail_take, n_fresh;
	struct kvp_block *sink;  /* new or copied sink block; NULL when the old one is written in place */
	struct kvp_block *tail;  /* private copy of a shared tail block */
	struct kvp_block **table; /* grown block table */
	uint32_t table_cap;
	struct kvp_block **fresh;
	/* the positions of the sink, the tail and each fresh block once written, made in advance */
	struct kvp_positions_plan sink_pos, tail_pos, *fresh_pos;
	struct kvp_cold_plan cold;
};

static size_t table_bytes(uint32_t cap)
{
	return (size_t)cap * sizeof(struct kvp_block *);
}

static void plan_unwind(struct kvp_tenant_obj *t, struct stream_plan *p)
{
	kvp_cold_unwind(t, &p->cold);
	kvp_block_put(t, p->sink);
	kvp_block_put(t, p->tail);
	for (uint32_t i = 0; i < p->n_fresh && p->fresh; i++)
		kvp_block_put(t, p->fresh[i]);
	kvp_positions_plan_unwind(t, &p->sink_pos);
	kvp_positions_plan_unwind(t, &p->tail_pos);
	for (uint32_t i = 0; i < p->n_fresh && p->fresh_pos; i++)
		kvp_positions_plan_unwind(t, &p->fresh_pos[i]);
	free(p->fresh);
	free(p->fresh_pos);
	if (p->table)
		kvp_free(t, p->table, table_bytes(p->table_cap), KVP_BYTES_META);
	memset(p, 0, sizeof *p);
}

static int shared(struct kvp_block *b)
{
	return atomic_load_explicit(&b->refs, memory_order_acquire) > 1;
}

/* The positions every block written by the append holds afterwards. */
static kvp_status plan_positions(struct kvp_tenant_obj *t, const struct kvp_stream *s, uint32_t n, const int32_t *pos,
				 struct stream_plan *p, struct kvp_call *call)
{
	uint32_t at = p->sink_take + p->tail_take, block = t->cfg.block;
	kvp_status st = KVP_OK;

	if (p->sink_take)
		st = kvp_block_positions_plan(t, s->sink, pos, p->sink_take, call, &p->sink_pos);
	if (st == KVP_OK && p->tail_take)
		st = kvp_block_positions_plan(t, s->blocks[s->n_blocks - 1], pos + p->sink_take, p->tail_take, call,
					      &p->tail_pos);
	if (st != KVP_OK || !p->n_fresh)
		return st;
	if (!(p->fresh_pos = calloc(p->n_fresh, sizeof *p->fresh_pos)))
		return kvp_fail(KVP_ENOMEM, "out of memory planning an append");
	for (uint32_t f = 0; st == KVP_OK && f < p->n_fresh; f++, at += block)
		st = kvp_block_positions_plan(t, NULL, pos + at, n - at < block ? n - at : block, call, &p->fresh_pos[f]);
	return st;
}

static kvp_status plan_blocks(struct kvp_tenant_obj *t, const struct kvp_stream *s, uint32_t n, uint32_t dim,
			      struct stream_plan *p, struct kvp_call *call)
{
	const struct kvp_tenant_config *cfg = &t->cfg;
	uint32_t sink_n = s->sink ? s->sink->n : 0, rest;
	struct kvp_block *tail = s->n_blocks ? s->blocks[s->n_blocks - 1] : NULL;

	memset(p, 0, sizeof *p);
	p->sink_take = sink_n < cfg->sinks ? (n < cfg->sinks - sink_n ? n : cfg->sinks - sink_n) : 0;
	if (p->sink_take && (!s->sink || shared(s->sink))) {
		p->sink = s->sink ? kvp_block_copy(t, s->sink, dim, call) :
				  kvp_block_new(t, cfg->sinks, dim, cfg->store, call);
		if (!p->sink)
			return KVP_ENOMEM;
	}
	rest = n - p->sink_take;
	if (tail && tail->store != KVP_STORE_CODEC && tail->n < tail->cap) {
		uint32_t room = (uint32_t)tail->cap - tail->n;
		p->tail_take = rest < room ? rest : room;
		if (p->tail_take && shared(tail) && !(p->tail = kvp_block_copy(t, tail, dim, call)))
			return KVP_ENOMEM;
	}
	rest -= p->tail_take;
	p->n_fresh = rest / cfg->block + (rest % cfg->block != 0);
	if (!p->n_fresh)
		return KVP_OK;
	if ((uint64_t)s->n_blocks + p->n_fresh > s->cap_blocks) {
		uint64_t cap = s->cap_blocks ? s->cap_blocks : 4;
		while (cap < (uint64_t)s->n_blocks + p->n_fresh)
			cap *= 2;
		if (cap > UINT32_MAX || cap > SIZE_MAX / sizeof(struct kvp_block *))
			return kvp_fail(KVP_ENOMEM, "a table of %llu blocks does not fit this machine",
					(unsigned long long)cap);
		p->table = kvp_alloc(t, table_bytes((uint32_t)cap), KVP_BYTES_META, call);
		if (!p->table)
			return KVP_ENOMEM;
		p->table_cap = (uint32_t)cap;
	}
	p->fresh = calloc(p->n_fresh, sizeof *p->fresh);
	if (!p->fresh)
		return kvp_fail(KVP_ENOMEM, "out of memory planning an append");
	for (uint32_t i = 0; i < p->n_fresh; i++)
		if (!(p->fresh[i] = kvp_block_new(t, cfg->block, dim, cfg->store, call)))
			return KVP_ENOMEM;
	return KVP_OK;
}

static kvp_status plan_stream(struct kvp_tenant_obj *t, const struct kvp_seq_obj *seq, const struct kvp_stream *s,
			      uint32_t n, const int32_t *pos, struct stream_plan *p)
{
	kvp_status st = plan_blocks(t, s, n, seq->shape.head_dim, p, seq->call);

	if (st == KVP_OK)
		st = plan_positions(t, s, n, pos, p, seq->call);
	if (st == KVP_OK)
		st = kvp_cold_plan(t, seq, s, n - p->sink_take, &p->cold);
	return st;
}

static void commit_stream(struct kvp_tenant_obj *t, const struct kvp_seq_obj *seq, struct kvp_stream *s,
			  struct stream_plan *p, uint32_t n, const float *k, const float *v, size_t stride)
{
	const uint32_t dim = seq->shape.head_dim;
	uint32_t i = 0;
	if (p->sink) {
		kvp_block_put(t, s->sink);
		s->sink = p->sink;
	}
	if (p->sink_take) {
		kvp_block_positions_commit(t, s->sink, &p->sink_pos);
		kvp_block_write(s->sink, s->sink->n, p->sink_take, dim, k, v, stride);
		i += p->sink_take;
	}
	if (p->tail) {
		kvp_block_put(t, s->blocks[s->n_blocks - 1]);
		s->blocks[s->n_blocks - 1] = p->tail;
	}
	if (p->tail_take) {
		struct kvp_block *tail = s->blocks[s->n_blocks - 1];
		kvp_block_positions_commit(t, tail, &p->tail_pos);
		kvp_block_write(tail, tail->n, p->tail_take, dim, k + i * stride, v + i * stride, stride);
		i += p->tail_take;
	}
	if (p->table) {
		if (s->n_blocks)
			memcpy(p->table, s->blocks, table_bytes(s->n_blocks));
		if (s->blocks)
			kvp_free(t, s->blocks, table_bytes(s->cap_blocks), KVP_BYTES_META);
		s->blocks = p->table;
		s->cap_blocks = p->table_cap;
	}
	for (uint32_t f = 0; f < p->n_fresh; f++) {
		uint32_t take = n - i < t->cfg.block ? n - i : t->cfg.block;
		kvp_block_positions_commit(t, p->fresh[f], &p->fresh_pos[f]);
		kvp_block_write(p->fresh[f], 0, take, dim, k + i * stride, v + i * stride, stride);
		s->blocks[s->n_blocks++] = p->fresh[f];
		i += take;
	}
	free(p->fresh);
	free(p->fresh_pos);
	s->n_tokens += n;
	kvp_prefix_capture(seq, s); /* the prompt's full blocks, before cold conversion replaces them */
	kvp_cold_commit(t, seq, s, &p->cold);
}

/* The highest position a layer's streams hold (-1 when empty). Streams are ragged: a policy without a
 * window may have dropped one head's newest token and kept another's. */
static int64_t last_position(const struct kvp_seq_obj *s, uint32_t layer)
{
	int64_t last = -1;

	for (uint32_t g = 0; g < s->shape.n_kv_heads; g++) {
		const struct kvp_stream *st = kvp_seq_stream(s, layer, g);
		const struct kvp_block *b = st->n_blocks ? st->blocks[st->n_blocks - 1] : st->sink;
		if (b && b->n && kvp_block_last(b) > last)
			last = kvp_block_last(b);
	}
	return last;
}

/*
 * n is the caller's: refused before anything reads n tokens of pos, k or v, or counts them, when the
 * rows are more than the machine can address or a stream of the layer would pass KVP_STREAM_TOKENS_MAX.
 */
static kvp_status count_check(const struct kvp_seq_obj *s, uint32_t layer, uint32_t n)
{
	uint64_t most = 0;

	if ((uint64_t)n * s->shape.n_kv_heads * s->shape.head_dim > SIZE_MAX / sizeof(float))
		return kvp_fail(KVP_EINVAL, "kvp_append: n=%u tokens of %u x %u floats are more than this machine "
				"can address", n, s->shape.n_kv_heads, s->shape.head_dim);
	for (uint32_t g = 0; g < s->shape.n_kv_heads; g++) {
		uint32_t held = kvp_seq_stream(s, layer, g)->n_tokens;
		most = held > most ? held : most;
	}
	if (most + n > KVP_STREAM_TOKENS_MAX)
		return kvp_fail(KVP_EINVAL, "kvp_append: n=%u tokens would take a stream of layer %u holding %llu "
				"past %d tokens", n, layer, (unsigned long long)most, KVP_STREAM_TOKENS_MAX);
	return KVP_OK;
}

/*
 * A policy ranks tokens by absolute position: within a stream they must increase. Checked here once for
 * good, so rounds and the pager's observations take the positions as they are.
 */
static kvp_status positions_check(const struct kvp_seq_obj *s, uint32_t layer, uint32_t n, const int32_t *pos)
{
	int64_t prev = last_position(s, layer);

	for (uint32_t i = 0; i < n; i++) {
		if (pos[i] <= prev)
			return kvp_fail(KVP_EINVAL, "kvp_append: position %d at index %u does not follow %lld; with "
					"a policy, positions must increase", pos[i], i, (long long)prev);
		prev = pos[i];
	}
	return KVP_OK;
}

/* A key or value that is not finite, or that store=fp16 would hold as an infinity, would make every later
 * score of its head NaN (or stay exact unseen, refused by its codec when its block turns cold): refused
 * here, naming where it is. */
static kvp_status rows_check(const struct kvp_seq_obj *s, uint32_t n, const int32_t *pos, const float *k,
			     const float *v)
{
	const size_t row = (size_t)s->shape.n_kv_heads * s->shape.head_dim, all = (size_t)n * row;
	const int half = s->tenant->cfg.store == KVP_STORE_FP16;
	const float bound = half ? KVP_F16_OVERFLOW : INFINITY;
	const size_t bad_k = kvp_first_outside(k, all, bound);
	const size_t bad_v = bad_k < all ? all : kvp_first_outside(v, all, bound);
	const size_t at = bad_k < all ? bad_k : bad_v;
	const float x = bad_k < all ? k[at] : bad_v < all ? v[at] : 0.0f;

	if (at == all)
		return KVP_OK;
	return kvp_fail(KVP_EINVAL, "kvp_append: %s of token %zu (position %d), KV head %zu, channel %zu is %g: keys "
			"and values must be finite%s", bad_k < all ? "k" : "v", at / row, pos[at / row],
			at % row / s->shape.head_dim, at % s->shape.head_dim, (double)x,
			half ? ", and within +-65504 with store=fp16" : "");
}

kvp_status kvp_append_resident(struct kvp_seq_obj *s, uint32_t layer, uint32_t n, const int32_t *pos, const float *k,
			       const float *v)
{
	struct stream_plan plans[64], *plan = plans;
	kvp_status st = KVP_OK;
	uint32_t nkv, dim, g;

	if (!s || s->magic != KVP_SEQ_MAGIC)
		return kvp_fail(KVP_EINVAL, "kvp_append: not an open sequence");
	if (layer >= s->shape.n_layers)
		return kvp_fail(KVP_EINVAL, "kvp_append: layer %u of a %u-layer sequence", layer, s->shape.n_layers);
	if (n == 0)
		return KVP_OK;
	if (!pos || !k || !v)
		return kvp_fail(KVP_EINVAL, "kvp_append: pos, k and v must not be NULL");
	if ((st = count_check(s, layer, n)) != KVP_OK)
		return st;
	if (s->policy && (st = positions_check(s, layer, n, pos)) != KVP_OK)
		return st;
	nkv = s->shape.n_kv_heads;
	dim = s->shape.head_dim;
	if (nkv > sizeof plans / sizeof plans[0] && !(plan = calloc(nkv, sizeof *plan)))
		return kvp_fail(KVP_ENOMEM, "kvp_append: out of memory");
	for (g = 0; g < nkv && st == KVP_OK; g++)
		st = plan_stream(s->tenant, s, kvp_seq_stream(s, layer, g), n, pos, &plan[g]);
	if (st != KVP_OK)
		st = kvp_fail_context(st, "kvp_append: %u tokens to layer %u not appended", n, layer);
	else /* the rows are read once the plans say memory holds them: a count it cannot is refused unread */
		st = rows_check(s, n, pos, k, v);
	if (st != KVP_OK) {
		for (uint32_t u = 0; u < g; u++)
			plan_unwind(s->tenant, &plan[u]);
	} else {
		for (g = 0; g < nkv; g++)
			commit_stream(s->tenant, s, kvp_seq_stream(s, layer, g), &plan[g], n,
				      k + (size_t)g * dim, v + (size_t)g * dim, (size_t)nkv * dim);
		s->tokens_appended += (uint64_t)n * nkv;
		if ((int64_t)pos[n - 1] + 1 > s->t0)
			s->t0 = (int64_t)pos[n - 1] + 1;
		atomic_fetch_add(&s->tenant->tokens_appended, (uint64_t)n * nkv);
		atomic_fetch_add(&s->tenant->tokens_retained, (uint64_t)n * nkv);
		atomic_fetch_add(&s->tenant->bytes_dense_fp16, (uint64_t)n * nkv * dim * 4);
		kvp_prefix_register(s);
	}
	if (plan != plans)
		free(plan);
	return st;
}
