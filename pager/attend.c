/*
 * kvp_attend: exact softmax(q K^T / sqrt(d)) V over every tier of a stream, one block at a time with
 * online softmax. The query heads of one GQA group take turns on each block while its K and V rows are
 * still in cache, so K and V are read from memory once per step, not once per query head.
 */
#include <math.h>
#include <string.h>

#include "kernels/kernels.h"
#include "pager.h"

struct head_state {
	float m, l;
};

static void attend_block(const struct kvp_kernels *kern, const struct kvp_block *b, uint32_t dim,
			 uint32_t group, const float *q, float scale, struct head_state *hs, float *acc,
			 float *scores)
{
	for (uint32_t h = 0; h < group; h++) {
		const float *qh = q + (size_t)h * dim;
		float *acc_h = acc + (size_t)h * dim;
		if (b->store == KVP_STORE_FP16)
			kern->dot_f16(dim, b->n, b->k, qh, scale, scores);
		else
			kern->dot_f32(dim, b->n, b->k, qh, scale, scores);
		float f = kern->softmax_step(b->n, scores, &hs[h].m, &hs[h].l);
		if (f != 1.0f)
			kern->scale(dim, f, acc_h);
		if (b->store == KVP_STORE_FP16)
			kern->axpy_f16(dim, b->n, b->v, scores, acc_h);
		else
			kern->axpy_f32(dim, b->n, b->v, scores, acc_h);
	}
}

static void attend_stream(const struct kvp_kernels *kern, const struct kvp_stream *st, uint32_t dim,
			  uint32_t group, const float *q, float *out, float *scores)
{
	struct head_state hs[KVP_GROUP_MAX];
	float scale = 1.0f / sqrtf((float)dim);

	memset(out, 0, (size_t)group * dim * sizeof *out);
	for (uint32_t h = 0; h < group; h++) {
		hs[h].m = -INFINITY;
		hs[h].l = 0.0f;
	}
	if (st->sink && st->sink->n)
		attend_block(kern, st->sink, dim, group, q, scale, hs, out, scores);
	for (uint32_t i = 0; i < st->n_blocks; i++)
		if (st->blocks[i]->n)
			attend_block(kern, st->blocks[i], dim, group, q, scale, hs, out, scores);
	for (uint32_t h = 0; h < group; h++)
		if (hs[h].l > 0.0f)
			kern->scale(dim, 1.0f / hs[h].l, out + (size_t)h * dim);
}

kvp_status kvp_attend_resident(kvp_seq *s, uint32_t layer, const float *q, float *out)
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
		attend_stream(kern, kvp_seq_stream(s, layer, g), dim, group, q + at, out + at, scores);
	}
	return KVP_OK;
}
