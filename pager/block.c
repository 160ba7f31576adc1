/*
 * Blocks: one allocation each — header, positions, then K rows and V rows in the block's store.
 * Reference counted so forks share them; the last put frees.
 */
#include <string.h>

#include "kernels/kernels.h"
#include "pager.h"

static size_t store_size(enum kvp_store store)
{
	return store == KVP_STORE_FP16 ? sizeof(uint16_t) : sizeof(float);
}

static size_t align_up(size_t n, size_t a)
{
	return (n + a - 1) / a * a;
}

static size_t header_bytes(uint32_t cap)
{
	/* 64-byte aligned rows keep the vector loads on whole cache lines. */
	return align_up(sizeof(struct kvp_block) + (size_t)cap * sizeof(int32_t), 64);
}

static size_t rows_bytes(uint32_t cap, uint32_t dim, enum kvp_store store)
{
	return align_up((size_t)cap * dim * store_size(store), 64);
}

size_t kvp_block_size(const struct kvp_tenant *t, uint32_t cap, uint32_t dim, enum kvp_store store)
{
	return kvp_alloc_size(t, header_bytes(cap) + 2 * rows_bytes(cap, dim, store));
}

size_t kvp_block_token_bytes(const struct kvp_block *b, uint32_t dim)
{
	(void)dim;
	return b->payload;
}

static enum kvp_bytes_kind block_kind(const struct kvp_block *b)
{
	return b->store == KVP_STORE_CODEC ? KVP_BYTES_COMPRESSED : KVP_BYTES_EXACT;
}

struct kvp_block *kvp_block_new(struct kvp_tenant *t, uint32_t cap, uint32_t dim, enum kvp_store store)
{
	size_t head = header_bytes(cap), rows = rows_bytes(cap, dim, store);
	size_t bytes = head + 2 * rows;
	struct kvp_block *b = kvp_alloc(t, bytes, KVP_BYTES_EXACT, 2 * rows);
	if (!b)
		return NULL;
	atomic_init(&b->refs, 1);
	b->n = 0;
	b->cap = cap;
	b->store = store;
	b->size = bytes;
	b->payload = 2 * rows;
	b->pos = (int32_t *)(b + 1);
	b->k = (char *)b + head;
	b->v = (char *)b + head + rows;
	return b;
}

struct kvp_block *kvp_block_new_cold(struct kvp_tenant *t, uint32_t n, size_t k_bytes, size_t v_bytes)
{
	size_t head = header_bytes(n), k_room = align_up(k_bytes, 64);
	size_t bytes = head + k_room + v_bytes;
	struct kvp_block *b = kvp_alloc(t, bytes, KVP_BYTES_COMPRESSED, k_bytes + v_bytes);
	if (!b)
		return NULL;
	atomic_init(&b->refs, 1);
	b->n = 0;
	b->cap = n;
	b->store = KVP_STORE_CODEC;
	b->size = bytes;
	b->payload = k_bytes + v_bytes;
	b->pos = (int32_t *)(b + 1);
	b->k = (char *)b + head;
	b->v = (char *)b + head + k_room;
	return b;
}

struct kvp_block *kvp_block_copy(struct kvp_tenant *t, const struct kvp_block *b, uint32_t dim)
{
	struct kvp_block *c = kvp_block_new(t, b->cap, dim, b->store);
	size_t row = (size_t)dim * store_size(b->store);
	if (!c)
		return NULL;
	c->n = b->n;
	memcpy(c->pos, b->pos, b->n * sizeof(int32_t));
	memcpy(c->k, b->k, b->n * row);
	memcpy(c->v, b->v, b->n * row);
	return c;
}

void kvp_block_get(struct kvp_block *b)
{
	atomic_fetch_add_explicit(&b->refs, 1, memory_order_relaxed);
}

void kvp_block_put(struct kvp_tenant *t, struct kvp_block *b, uint32_t dim)
{
	if (!b || atomic_fetch_sub_explicit(&b->refs, 1, memory_order_acq_rel) != 1)
		return;
	(void)dim;
	kvp_free(t, b, b->size, block_kind(b), b->payload);
}

void kvp_block_write(struct kvp_block *b, uint32_t at, uint32_t n, uint32_t dim, const int32_t *pos,
		     const float *k, const float *v, size_t stride)
{
	const struct kvp_kernels *kern = kvp_kernels();
	for (uint32_t i = 0; i < n; i++) {
		size_t row = (size_t)(at + i) * dim;
		b->pos[at + i] = pos[i];
		if (b->store == KVP_STORE_FP16) {
			kern->f32_to_f16(dim, k + i * stride, (uint16_t *)b->k + row);
			kern->f32_to_f16(dim, v + i * stride, (uint16_t *)b->v + row);
		} else {
			memcpy((float *)b->k + row, k + i * stride, dim * sizeof(float));
			memcpy((float *)b->v + row, v + i * stride, dim * sizeof(float));
		}
	}
	if (at + n > b->n)
		b->n = at + n;
}
