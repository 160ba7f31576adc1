/*
 * kvp_attend: exact softmax(q K^T / sqrt(d)) V over every tier of a stream, one block at a time with
 * online softmax. The query heads of one GQA group take turns on each block while its K and V rows are
 * still in cache, so K and V are read from memory once per step, not once per query head.
 */
#include <math.h>
#include <string.h>

#include "codecs/codec.h"
#include "kernels/kernels.h"
#include "pager.h"

struct head_state {
	float m, l;
};

/* What attention over a stream's cold blocks needs: the codecs with the stream's contexts, each head's
 * prepared query, and each head's value accumulator in the value codec's space. */
struct cold_view {
	const struct kvp_codec *k, *v;
	const void *k_ctx, *v_ctx;
	char *qprep; /* group x k->qprep_bytes */
	float *acc;  /* group x v->acc_dim */
};

/* A new running maximum shrinks everything accumulated so far, in both spaces. */
static void rescale(const struct kvp_kernels *kern, uint32_t dim, float f, float *acc_h,
		    const struct cold_view *cv, uint32_t h)
{
	kern->scale(dim, f, acc_h);
	if (cv)
		kern->scale(cv->v->acc_dim, f, cv->acc + (size_t)h * cv->v->acc_dim);
}

/*
 * Blocks are separate allocations, so the hardware prefetcher restarts at each one. While rows
 * [t, t+n) of a block are computed, the same rows of the next block are requested: the requests are
 * spread over the computation instead of queued in one burst that stalls it.
 */
#define SLICE_ROWS 64

static void prefetch_rows(const void *rows, const struct kvp_block *b, uint32_t dim, uint32_t t, uint32_t n)
{
	size_t row = (size_t)dim * (b->store == KVP_STORE_FP16 ? 2 : 4);
	size_t from = t * row, to = (t + n < b->n ? t + n : b->n) * row;

	for (size_t at = from; at < to; at += 64)
		__builtin_prefetch((const char *)rows + at);
}

static void attend_block_f32(const struct kvp_kernels *kern, const struct kvp_block *b, uint32_t dim,
			     uint32_t group, const float *q, float scale, struct head_state *hs, float *acc,
			     float *scores, const struct cold_view *cv)
{
	for (uint32_t h = 0; h < group; h++) {
		float *acc_h = acc + (size_t)h * dim;
		kern->dot_f32(dim, b->n, b->k, q + (size_t)h * dim, scale, scores);
		float f = kern->softmax_step(b->n, scores, &hs[h].m, &hs[h].l);
		if (f != 1.0f)
			rescale(kern, dim, f, acc_h, cv, h);
		kern->axpy_f32(dim, b->n, b->v, scores, acc_h);
	}
}

/* fp16 goes through the group kernels, which widen each row once for all heads of the group; the
 * group's scores share one KVP_BLOCK_MAX buffer, so long blocks are taken in slices. */
static void attend_block_f16(const struct kvp_kernels *kern, const struct kvp_block *b, uint32_t dim,
			     uint32_t group, const float *q, float scale, struct head_state *hs, float *acc,
			     float *scores, const struct kvp_block *next, const struct cold_view *cv)
{
	const uint32_t slice = SLICE_ROWS < KVP_BLOCK_MAX / group ? SLICE_ROWS : KVP_BLOCK_MAX / group;

	for (uint32_t t = 0; t < b->n; t += slice) {
		uint32_t n = b->n - t < slice ? b->n - t : slice;
		const uint16_t *k = (const uint16_t *)b->k + (size_t)t * dim;
		const uint16_t *v = (const uint16_t *)b->v + (size_t)t * dim;

		if (next)
			prefetch_rows(next->k, next, dim, t, n);
		kern->dot_f16_group(dim, n, k, group, q, scale, scores);
		for (uint32_t h = 0; h < group; h++) {
			float f = kern->softmax_step(n, scores + (size_t)h * n, &hs[h].m, &hs[h].l);
			if (f != 1.0f)
				rescale(kern, dim, f, acc + (size_t)h * dim, cv, h);
		}
		if (next)
			prefetch_rows(next->v, next, dim, t, n);
		kern->axpy_f16_group(dim, n, v, group, scores, acc);
	}
}

/* Scores straight from the key codes; values accumulate in the value codec's space (finish maps back). */
static void attend_block_cold(const struct kvp_kernels *kern, const struct kvp_block *b, uint32_t dim,
			      uint32_t group, float scale, struct head_state *hs, float *acc, float *scores,
			      const struct cold_view *cv)
{
	for (uint32_t h = 0; h < group; h++) {
		cv->k->ops->dot(cv->k, cv->k_ctx, b->n, b->k, cv->qprep + h * cv->k->qprep_bytes, scores);
		kern->scale(b->n, scale, scores);
		float f = kern->softmax_step(b->n, scores, &hs[h].m, &hs[h].l);
		if (f != 1.0f)
			rescale(kern, dim, f, acc + (size_t)h * dim, cv, h);
		cv->v->ops->axpy(cv->v, cv->v_ctx, b->n, b->v, scores, cv->acc + (size_t)h * cv->v->acc_dim);
	}
}

static void attend_block(const struct kvp_kernels *kern, const struct kvp_block *b, uint32_t dim,
			 uint32_t group, const float *q, float scale, struct head_state *hs, float *acc,
			 float *scores, const struct kvp_block *next, const struct cold_view *cv)
{
	if (b->store == KVP_STORE_CODEC)
		attend_block_cold(kern, b, dim, group, scale, hs, acc, scores, cv);
	else if (b->store == KVP_STORE_FP16)
		attend_block_f16(kern, b, dim, group, q, scale, hs, acc, scores, next, cv);
	else
		attend_block_f32(kern, b, dim, group, q, scale, hs, acc, scores, cv);
}

static const struct cold_view *cold_begin(const struct kvp_seq *s, const struct kvp_stream *st,
					  const float *q, struct cold_view *cv)
{
	const struct kvp_cold *c = &s->cold;

	if (!st->n_cold)
		return NULL;
	cv->k = c->k;
	cv->v = c->v;
	cv->k_ctx = st->ctx->k;
	cv->v_ctx = st->ctx->v;
	cv->qprep = c->scratch;
	cv->acc = (float *)((char *)c->scratch + s->group * c->k->qprep_bytes);
	for (uint32_t h = 0; h < s->group; h++)
		c->k->ops->prepare_query(c->k, st->ctx->k, q + (size_t)h * s->shape.head_dim,
					 cv->qprep + h * c->k->qprep_bytes);
	memset(cv->acc, 0, (size_t)s->group * c->v->acc_dim * sizeof *cv->acc);
	return cv;
}

static void attend_stream(const struct kvp_kernels *kern, const struct kvp_seq *s, const struct kvp_stream *st,
			  const float *q, float *out, float *scores)
{
	struct head_state hs[KVP_GROUP_MAX];
	struct cold_view view;
	const uint32_t dim = s->shape.head_dim, group = s->group;
	const float scale = 1.0f / sqrtf((float)dim);
	const struct cold_view *cv = cold_begin(s, st, q, &view);

	memset(out, 0, (size_t)group * dim * sizeof *out);
	for (uint32_t h = 0; h < group; h++) {
		hs[h].m = -INFINITY;
		hs[h].l = 0.0f;
	}
	if (st->sink && st->sink->n)
		attend_block(kern, st->sink, dim, group, q, scale, hs, out, scores,
			     st->n_blocks ? st->blocks[0] : NULL, cv);
	for (uint32_t i = 0; i < st->n_blocks; i++)
		if (st->blocks[i]->n)
			attend_block(kern, st->blocks[i], dim, group, q, scale, hs, out, scores,
				     i + 1 < st->n_blocks ? st->blocks[i + 1] : NULL, cv);
	for (uint32_t h = 0; h < group; h++) {
		float *out_h = out + (size_t)h * dim;
		if (cv)
			cv->v->ops->finish(cv->v, cv->v_ctx, cv->acc + (size_t)h * cv->v->acc_dim, out_h);
		if (hs[h].l > 0.0f)
			kern->scale(dim, 1.0f / hs[h].l, out_h);
	}
}

kvp_status kvp_attend(kvp_seq *s, uint32_t layer, const float *q, float *out)
{
	const struct kvp_kernels *kern = kvp_kernels();
	float scores[KVP_BLOCK_MAX];
	uint32_t dim, group;

	if (!s || s->magic != KVP_SEQ_MAGIC)
		return kvp_fail(KVP_EINVAL, "kvp_attend: not an open sequence");
	if (layer >= s->shape.n_layers)
		return kvp_fail(KVP_EINVAL, "kvp_attend: layer %u of a %u-layer sequence", layer, s->shape.n_layers);
	if (!q || !out)
		return kvp_fail(KVP_EINVAL, "kvp_attend: q and out must not be NULL");
	dim = s->shape.head_dim;
	group = s->group;
	for (uint32_t g = 0; g < s->shape.n_kv_heads; g++) {
		size_t at = (size_t)g * group * dim;
		attend_stream(kern, s, kvp_seq_stream(s, layer, g), q + at, out + at, scores);
	}
	return KVP_OK;
}
