/* Sequences: made, forked (copy-on-write), destroyed; their gather and stats. */
#include <math.h>
#include <string.h>

#include "pager.h"


kvp_status kvp_shape_check(const kvp_shape *sh)
{
	if (!sh)
		return kvp_fail(KVP_EINVAL, "shape: NULL");
	if (!sh->n_layers || !sh->n_heads || !sh->n_kv_heads || !sh->head_dim)
		return kvp_fail(KVP_EINVAL, "shape: layers %u, heads %u, kv heads %u, head_dim %u: none may be 0",
				sh->n_layers, sh->n_heads, sh->n_kv_heads, sh->head_dim);
	if (sh->n_heads % sh->n_kv_heads)
		return kvp_fail(KVP_EINVAL, "shape: %u query heads are not a multiple of %u KV heads", sh->n_heads,
				sh->n_kv_heads);
	if (sh->n_heads / sh->n_kv_heads > KVP_GROUP_MAX)
		return kvp_fail(KVP_EINVAL, "shape: %u query heads per KV head (at most %d)",
				sh->n_heads / sh->n_kv_heads, KVP_GROUP_MAX);
	if (sh->head_dim > KVP_HEAD_DIM_MAX || (sh->head_dim & 1))
		return kvp_fail(KVP_EINVAL, "shape: head_dim %u must be even and at most %d", sh->head_dim,
				KVP_HEAD_DIM_MAX);
	if (sh->n_layers > 4096 || sh->n_kv_heads > 4096)
		return kvp_fail(KVP_EINVAL, "shape: %u layers x %u KV heads is more than this build allows",
				sh->n_layers, sh->n_kv_heads);
	if (!(sh->rope_theta > 0) || !isfinite(sh->rope_theta))
		return kvp_fail(KVP_EINVAL, "shape: rope_theta %g must be positive", (double)sh->rope_theta);
	if (sh->rope_layout != KVP_ROPE_HALF && sh->rope_layout != KVP_ROPE_INTERLEAVED)
		return kvp_fail(KVP_EINVAL, "shape: unknown rope_layout %d", (int)sh->rope_layout);
	return KVP_OK;
}

static size_t streams_bytes(const kvp_shape *sh)
{
	return (size_t)sh->n_layers * sh->n_kv_heads * sizeof(struct kvp_stream);
}

static void link_seq(struct kvp_tenant_obj *t, struct kvp_seq_obj *s)
{
	pthread_mutex_lock(&t->lock);
	s->next = t->seqs;
	t->seqs = s;
	pthread_mutex_unlock(&t->lock);
}

/* call: the context of the call that makes it (a fork's), or NULL; the new sequence's own allocations
 * use it until the call is done with it. */
static struct kvp_seq_obj *seq_alloc(struct kvp_tenant_obj *t, const kvp_shape *shape, struct kvp_call *call)
{
	struct kvp_seq_obj *s = kvp_alloc(t, sizeof *s, KVP_BYTES_META, call);
	if (!s)
		return NULL;
	memset(s, 0, sizeof *s);
	s->streams = kvp_alloc(t, streams_bytes(shape), KVP_BYTES_META, call);
	if (!s->streams) {
		kvp_free(t, s, sizeof *s, KVP_BYTES_META);
		return NULL;
	}
	memset(s->streams, 0, streams_bytes(shape));
	if (!kvp_seq_handle_new(s)) {
		kvp_free(t, s->streams, streams_bytes(shape), KVP_BYTES_META);
		kvp_free(t, s, sizeof *s, KVP_BYTES_META);
		return NULL;
	}
	s->magic = KVP_SEQ_MAGIC;
	s->tenant = t;
	s->call = call;
	s->shape = *shape;
	s->group = shape->n_heads / shape->n_kv_heads;
	return s;
}

/* A new sequence of tenant t, open: its cold tier, policy and gating ready. */
kvp_status kvp_seq_create_unlinked(struct kvp_tenant_obj *t, const kvp_shape *shape, struct kvp_seq_obj **out)
{
	struct kvp_seq_obj *s;
	kvp_status st;
	if ((st = kvp_shape_check(shape)) != KVP_OK)
		return st;
	if (!(s = seq_alloc(t, shape, NULL)))
		return kvp_fail_context(KVP_ENOMEM, "kvp_seq_open");
	if ((st = kvp_cold_open(t, s)) != KVP_OK || (st = kvp_evict_open(t, s)) != KVP_OK ||
	    (st = kvp_gate_open(t, s)) != KVP_OK) {
		kvp_seq_destroy(s);
		return st;
	}
	*out = s;
	return KVP_OK;
}

void kvp_seq_link(struct kvp_tenant_obj *t, struct kvp_seq_obj *s)
{
	link_seq(t, s);
}

kvp_status kvp_seq_create(struct kvp_tenant_obj *t, const kvp_shape *shape, struct kvp_seq_obj **out)
{
	kvp_status st = kvp_seq_create_unlinked(t, shape, out);
	if (st == KVP_OK)
		link_seq(t, *out);
	return st;
}

static uint64_t seq_retained(const struct kvp_seq_obj *s)
{
	uint64_t n = 0;
	for (size_t i = 0; i < (size_t)s->shape.n_layers * s->shape.n_kv_heads; i++)
		n += s->streams[i].n_tokens;
	return n;
}

kvp_status kvp_seq_fork_resident(struct kvp_seq_obj *src, kvp_seq **out)
{
	struct kvp_tenant_obj *t;
	struct kvp_seq_obj *s;
	size_t i, n;
	if (!src || src->magic != KVP_SEQ_MAGIC || !out)
		return kvp_fail(KVP_EINVAL, "kvp_seq_fork: not an open sequence, or out is NULL");
	t = src->tenant;
	if (!(s = seq_alloc(t, &src->shape, src->call)))
		return kvp_fail_context(KVP_ENOMEM, "kvp_seq_fork");
	/* the fork's policy continues from a copy of the source's history (H2O weights, online stats) */
	if (kvp_cold_open(t, s) != KVP_OK || kvp_evict_fork(t, src, s) != KVP_OK || kvp_gate_fork(t, src, s) != KVP_OK) {
		kvp_seq_destroy(s);
		return kvp_fail_context(KVP_ENOMEM, "kvp_seq_fork");
	}
	n = (size_t)src->shape.n_layers * src->shape.n_kv_heads;
	for (i = 0; i < n; i++)
		if (kvp_stream_share(t, &s->streams[i], &src->streams[i], src->call) != KVP_OK)
			break;
	if (i < n) {
		/* the tenant has not counted the fork's tokens yet: give back its streams before destroy,
		 * which would uncount them */
		for (size_t j = 0; j < i; j++)
			kvp_stream_release(t, &s->streams[j]);
		kvp_seq_destroy(s);
		return kvp_fail_context(KVP_ENOMEM, "kvp_seq_fork");
	}
	s->tokens_appended = src->tokens_appended;
	s->t0 = src->t0;
	atomic_fetch_add(&t->tokens_appended, s->tokens_appended);
	atomic_fetch_add(&t->tokens_retained, seq_retained(s));
	atomic_fetch_add(&t->bytes_dense_fp16, s->tokens_appended * s->shape.head_dim * 4);
	s->call = NULL; /* the fork call is the source's, not the new sequence's */
	link_seq(t, s);
	*out = s->handle;
	return KVP_OK;
}

void kvp_seq_destroy(struct kvp_seq_obj *s)
{
	struct kvp_tenant_obj *t = s->tenant;
	size_t n = (size_t)s->shape.n_layers * s->shape.n_kv_heads;
	kvp_restore_settle(s); /* the device must be done with blocks before they are freed */
	kvp_seq_parked_release(s);
	kvp_seq_handle_free(s);
	atomic_fetch_sub(&t->tokens_appended, s->tokens_appended);
	atomic_fetch_sub(&t->tokens_retained, seq_retained(s));
	atomic_fetch_sub(&t->bytes_dense_fp16, s->tokens_appended * s->shape.head_dim * 4);
	kvp_prefix_prompt_free(s); /* before the streams: it holds references to their blocks */
	for (size_t i = 0; i < n; i++)
		kvp_stream_release(t, &s->streams[i]);
	kvp_cold_close(t, s);
	kvp_evict_close(t, s);
	kvp_gate_close(t, s);
	kvp_free(t, s->streams, streams_bytes(&s->shape), KVP_BYTES_META);
	s->magic = 0;
	kvp_free(t, s, sizeof *s, KVP_BYTES_META);
}

void kvp_seq_close_entered(struct kvp_seq_obj *s)
{
	struct kvp_tenant_obj *t;
	if (!s || s->magic != KVP_SEQ_MAGIC)
		return;
	t = s->tenant;
	pthread_mutex_lock(&t->lock);
	for (struct kvp_seq_obj **p = &t->seqs; *p; p = &(*p)->next)
		if (*p == s) {
			*p = s->next;
			break;
		}
	pthread_mutex_unlock(&t->lock);
	kvp_seq_destroy(s);
}

kvp_status kvp_seq_step_entered(struct kvp_seq_obj *s)
{
	if (!s || s->magic != KVP_SEQ_MAGIC)
		return kvp_fail(KVP_EINVAL, "kvp_seq_step: not an open sequence");
	return kvp_evict_step(s);
}

/* Whether two of the buffers gather writes n tokens into share a byte (NULL ones take none). */
static int gather_overlap(const struct kvp_seq_obj *s, uint32_t n, const int32_t *pos, const float *k, const float *v)
{
	const size_t p = pos ? sizeof *pos * n : 0, r = sizeof(float) * n * s->shape.head_dim;
	const size_t kr = k ? r : 0, vr = v ? r : 0;
	return kvp_overlap(pos, p, k, kr) || kvp_overlap(pos, p, v, vr) || kvp_overlap(k, kr, v, vr);
}

kvp_status kvp_gather_resident(struct kvp_seq_obj *s, uint32_t layer, uint32_t kv_head, uint32_t cap, int32_t *pos,
			       float *k, float *v, uint32_t *n_out)
{
	const struct kvp_stream *st;
	if (!s || s->magic != KVP_SEQ_MAGIC)
		return kvp_fail(KVP_EINVAL, "kvp_gather: not an open sequence");
	if (layer >= s->shape.n_layers || kv_head >= s->shape.n_kv_heads)
		return kvp_fail(KVP_EINVAL, "kvp_gather: layer %u, KV head %u outside %u x %u", layer, kv_head,
				s->shape.n_layers, s->shape.n_kv_heads);
	st = kvp_seq_stream(s, layer, kv_head);
	if (n_out)
		*n_out = st->n_tokens;
	if (st->n_tokens > cap)
		return kvp_fail(KVP_EINVAL, "kvp_gather: the stream holds %u tokens, more than cap %u", st->n_tokens,
				cap);
	if (gather_overlap(s, st->n_tokens, pos, k, v))
		return kvp_fail(KVP_EINVAL, "kvp_gather: two of pos, k and v overlap: each needs memory of its own");
	kvp_stream_gather(s, st, pos, k, v);
	return KVP_OK;
}

static void stats_stream(const struct kvp_tenant_obj *t, const struct kvp_stream *st, kvp_stats *o)
{
	const struct kvp_block *b;
	o->tokens_retained += st->n_tokens;
	for (uint32_t i = 0; i <= st->n_blocks; i++) {
		b = i == 0 ? st->sink : st->blocks[i - 1];
		if (!b)
			continue;
		if (b->store == KVP_STORE_CODEC)
			o->bytes_compressed += kvp_block_token_bytes(t, b);
		else
			o->bytes_exact += kvp_block_token_bytes(t, b);
		o->bytes_meta += kvp_block_bytes(t, b) - kvp_block_token_bytes(t, b);
		if (b->spilled) { /* its rows are a record on the device, described by a stub in memory */
			o->bytes_spilled += b->spilled->pages * KVP_SPILL_PAGE;
			o->bytes_meta += kvp_alloc_size(t, sizeof *b->spilled);
		}
	}
	if (st->blocks)
		o->bytes_meta += kvp_alloc_size(t, st->cap_blocks * sizeof *st->blocks);
	if (st->ctx)
		o->bytes_meta += kvp_alloc_size(t, st->ctx->size);
	if (st->recent)
		o->bytes_meta += kvp_alloc_size(t, st->recent->bytes);
}

static kvp_status stats_check(const void *h, uint32_t magic, const kvp_stats *out, const char *call)
{
	if (!h || *(const uint32_t *)h != magic)
		return kvp_fail(KVP_EINVAL, "%s: not an open handle", call);
	if (!out || out->size < sizeof(uint32_t) + sizeof(uint64_t))
		return kvp_fail(KVP_EABI, "%s: stats->size must be set to sizeof(kvp_stats)", call);
	return KVP_OK;
}

kvp_status kvp_seq_stats_entered(const struct kvp_seq_obj *s, kvp_stats *out)
{
	kvp_stats full = { .size = sizeof full };
	kvp_status st = stats_check(s, KVP_SEQ_MAGIC, out, "kvp_seq_stats");
	if (st != KVP_OK)
		return st;
	for (size_t i = 0; i < (size_t)s->shape.n_layers * s->shape.n_kv_heads; i++)
		stats_stream(s->tenant, &s->streams[i], &full);
	full.bytes_meta += kvp_alloc_size(s->tenant, sizeof *s) + kvp_alloc_size(s->tenant, streams_bytes(&s->shape));
	if (s->cold.scratch)
		full.bytes_meta += kvp_alloc_size(s->tenant, s->cold.scratch_bytes);
	if (s->observe.bytes)
		full.bytes_meta += kvp_alloc_size(s->tenant, s->observe.bytes);
	if (s->round_space.bytes)
		full.bytes_meta += kvp_alloc_size(s->tenant, s->round_space.bytes);
	full.bytes_meta += s->state_bytes; /* the policy's and the codecs' */
	full.tokens_appended = s->tokens_appended;
	full.bytes_dense_fp16 = s->tokens_appended * s->shape.head_dim * 4;
	full.bytes_spilled += kvp_seq_parked_bytes(s);
	full.bytes_meta += kvp_seq_parked_meta(s);
	if (s->prompt)
		full.bytes_meta += kvp_prefix_prompt_bytes(s);
	full.prefix_hit_tokens = s->prefix_hit_tokens;
	full.prefix_miss_tokens = s->prefix_miss_tokens;
	full.remote_hit_tokens = s->remote_hit_tokens;
	full.remote_faults = s->remote_faults;
	full.remote_rejected = s->remote_rejected;
	kvp_sized_copy(out, &full, sizeof full);
	return KVP_OK;
}

kvp_status kvp_tenant_stats(const kvp_tenant *h, kvp_stats *out)
{
	kvp_stats full = { .size = sizeof full };
	const struct kvp_tenant_obj *t;
	void *found;
	kvp_status st = kvp_handle_get(KVP_HANDLE_TENANT, h, "kvp_tenant_stats", &found);
	if (st != KVP_OK)
		return st;
	t = found;
	if ((st = stats_check(t, KVP_TENANT_MAGIC, out, "kvp_tenant_stats")) != KVP_OK)
		return st;
	full.tokens_appended = atomic_load(&t->tokens_appended);
	full.tokens_retained = atomic_load(&t->tokens_retained);
	full.bytes_exact = atomic_load(&t->bytes[KVP_BYTES_EXACT]);
	full.bytes_compressed = atomic_load(&t->bytes[KVP_BYTES_COMPRESSED]);
	full.bytes_meta = atomic_load(&t->bytes[KVP_BYTES_META]);
	full.bytes_dense_fp16 = atomic_load(&t->bytes_dense_fp16);
	full.bytes_spilled = atomic_load(&t->bytes_spilled);
	full.bytes_cached = kvp_prefix_bytes_cached(t);
	full.prefix_hit_tokens = atomic_load(&t->prefix_hit_tokens);
	full.prefix_miss_tokens = atomic_load(&t->prefix_miss_tokens);
	full.remote_hit_tokens = atomic_load(&t->remote_hit_tokens);
	full.remote_faults = atomic_load(&t->remote_faults);
	full.remote_rejected = atomic_load(&t->remote_rejected);
	kvp_sized_copy(out, &full, sizeof full);
	return KVP_OK;
}
