/*
 * Blocks: two allocations each — the header with the positions, and the K and V rows (or codes). Rows
 * of 64 tokens x 128 dims are exactly 64 KiB, a jemalloc size class; a header in the same allocation
 * would push it into the 80 KiB class and waste a fifth of the cache. Reference counted so forks share
 * them; the last put frees.
 *
 * Freed memory is not cleared; it is unreachable instead. A tenant's blocks come from its own jemalloc
 * arena (no thread cache), so a freed block is only reused by the same tenant, and a closed tenant's
 * arena is destroyed, its pages returned to the system, which gives them out again zeroed. Within a
 * tenant no call reads a block past the n rows written into it. tests/test_isolation.c checks both.
 */
#include <string.h>

#include "kernels/kernels.h"
#include "pager/pager.h"

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
	return sizeof(struct kvp_block) + (size_t)cap * sizeof(int32_t);
}

static size_t rows_bytes(uint32_t cap, uint32_t dim, enum kvp_store store)
{
	return align_up((size_t)cap * dim * store_size(store), 64);
}

size_t kvp_block_bytes(const struct kvp_tenant *t, const struct kvp_block *b)
{
	return kvp_alloc_size(t, b->size) + (b->spilled ? 0 : kvp_alloc_size(t, b->data_size));
}

size_t kvp_block_token_bytes(const struct kvp_block *b)
{
	return b->spilled ? 0 : b->payload; /* a spilled block's tokens are counted by its record */
}

static enum kvp_bytes_kind block_kind(const struct kvp_block *b)
{
	return b->store == KVP_STORE_CODEC ? KVP_BYTES_COMPRESSED : KVP_BYTES_EXACT;
}

/* A block of cap tokens whose k and v take k_bytes and v_bytes, counted as kind. */
static struct kvp_block *block_new(struct kvp_tenant *t, uint32_t cap, enum kvp_store store, size_t k_bytes,
				   size_t v_bytes)
{
	enum kvp_bytes_kind kind = store == KVP_STORE_CODEC ? KVP_BYTES_COMPRESSED : KVP_BYTES_EXACT;
	size_t k_room = align_up(k_bytes, 64), data = k_room + v_bytes;
	struct kvp_block *b = kvp_alloc(t, header_bytes(cap), KVP_BYTES_META, 0);
	char *rows;

	if (!b)
		return NULL;
	if (!(rows = kvp_alloc(t, data, kind, k_bytes + v_bytes))) {
		kvp_free(t, b, header_bytes(cap), KVP_BYTES_META, 0);
		return NULL;
	}
	atomic_init(&b->refs, 1);
	b->n = 0;
	b->cap = cap;
	b->store = store;
	b->size = header_bytes(cap);
	b->data_size = data;
	b->payload = k_bytes + v_bytes;
	b->pos = (int32_t *)(b + 1);
	b->k = rows;
	b->v = rows + k_room;
	b->spilled = NULL;
	b->v_offset = k_room;
	return b;
}

struct kvp_block *kvp_block_new(struct kvp_tenant *t, uint32_t cap, uint32_t dim, enum kvp_store store)
{
	size_t rows = rows_bytes(cap, dim, store);

	return block_new(t, cap, store, rows, rows);
}

struct kvp_block *kvp_block_new_cold(struct kvp_tenant *t, uint32_t n, size_t k_bytes, size_t v_bytes)
{
	return block_new(t, n, KVP_STORE_CODEC, k_bytes, v_bytes);
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

void kvp_block_put(struct kvp_tenant *t, struct kvp_block *b)
{
	if (!b || atomic_fetch_sub_explicit(&b->refs, 1, memory_order_acq_rel) != 1)
		return;
	if (b->spilled) {
		/* never under the device lock: spilled blocks are private, never a twin (park.c) */
		kvp_spill_lock(t->pool->spill);
		kvp_spill_stub_drop(t->pool->spill, b->spilled);
		kvp_spill_unlock(t->pool->spill);
	}
	kvp_block_rows_free(t, b);
	kvp_free(t, b, b->size, KVP_BYTES_META, 0);
}

void kvp_block_rows_free(struct kvp_tenant *t, struct kvp_block *b)
{
	kvp_free(t, b->k, b->data_size, block_kind(b), b->payload);
	b->k = b->v = NULL;
}

/* The record holds the rows now; the header stays, so positions and n are still there to read. */
void kvp_block_spill_out(struct kvp_tenant *t, struct kvp_block *b, struct kvp_spilled *stub)
{
	kvp_block_rows_free(t, b);
	b->spilled = stub;
}

/* Rows for a spilled block to be read into: the same size class, charged again. */
kvp_status kvp_block_rows_alloc(struct kvp_tenant *t, struct kvp_block *b)
{
	char *rows = kvp_alloc(t, b->data_size, block_kind(b), b->payload);

	if (!rows)
		return KVP_ENOMEM;
	b->k = rows;
	b->v = rows + b->v_offset;
	return KVP_OK;
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
