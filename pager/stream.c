/* Streams: one (layer, KV head) of a sequence, its block table shared with forks, read back in order. */
#include <string.h>

#include "kernels/kernels.h"
#include "pager.h"

kvp_status kvp_stream_share(struct kvp_tenant_obj *t, struct kvp_stream *dst, const struct kvp_stream *src,
			    struct kvp_call *call)
{
	*dst = *src;
	dst->blocks = NULL;
	dst->cap_blocks = 0;
	if (src->n_blocks) {
		dst->blocks = kvp_alloc(t, src->n_blocks * sizeof *dst->blocks, KVP_BYTES_META, call);
		if (!dst->blocks) {
			memset(dst, 0, sizeof *dst);
			return KVP_ENOMEM;
		}
		dst->cap_blocks = src->n_blocks;
		memcpy(dst->blocks, src->blocks, src->n_blocks * sizeof *dst->blocks);
		for (uint32_t i = 0; i < src->n_blocks; i++)
			kvp_block_get(dst->blocks[i]);
	}
	if (dst->sink)
		kvp_block_get(dst->sink);
	if (dst->ctx)
		atomic_fetch_add_explicit(&dst->ctx->refs, 1, memory_order_relaxed);
	dst->recent = NULL; /* the fork observes its own queries */
	return KVP_OK;
}

void kvp_stream_release(struct kvp_tenant_obj *t, struct kvp_stream *s)
{
	kvp_block_put(t, s->sink);
	for (uint32_t i = 0; i < s->n_blocks; i++)
		kvp_block_put(t, s->blocks[i]);
	if (s->blocks)
		kvp_free(t, s->blocks, s->cap_blocks * sizeof *s->blocks, KVP_BYTES_META);
	kvp_stream_ctx_put(t, s->ctx);
	kvp_cold_forget_queries(t, s);
	memset(s, 0, sizeof *s);
}

static void gather_block(const struct kvp_seq_obj *s, const struct kvp_stream *st, const struct kvp_block *b,
			 uint32_t at, int32_t *pos, float *k, float *v)
{
	const struct kvp_kernels *kern = kvp_kernels();
	const uint32_t dim = s->shape.head_dim;
	size_t off = (size_t)at * dim, rows = (size_t)b->n * dim;
	if (pos)
		kvp_block_positions(b, pos + at);
	if (b->store == KVP_STORE_CODEC) {
		kvp_cold_gather(s, st, b, k ? k + off : NULL, v ? v + off : NULL);
	} else if (b->store == KVP_STORE_FP16) {
		if (k)
			kern->f16_to_f32(rows, b->k, k + off);
		if (v)
			kern->f16_to_f32(rows, b->v, v + off);
	} else {
		if (k)
			memcpy(k + off, b->k, rows * sizeof *k);
		if (v)
			memcpy(v + off, b->v, rows * sizeof *v);
	}
}

void kvp_stream_gather(const struct kvp_seq_obj *s, const struct kvp_stream *st, int32_t *pos, float *k, float *v)
{
	uint32_t at = 0;

	if (st->sink) {
		gather_block(s, st, st->sink, at, pos, k, v);
		at += st->sink->n;
	}
	for (uint32_t i = 0; i < st->n_blocks; i++) {
		gather_block(s, st, st->blocks[i], at, pos, k, v);
		at += st->blocks[i]->n;
	}
}

