/*
 * Blocks: two allocations each — the header, and the K and V rows (or codes). Rows
 * of 64 tokens x 128 dims are exactly 64 KiB, a jemalloc size class; a header in the same allocation
 * would push it into the 80 KiB class and waste a fifth of the cache. Reference counted so forks share
 * them; the last put frees.
 *
 * Positions: a block of appended tokens holds the run pos_base, pos_base + 1, ... and stores nothing more;
 * only blocks whose positions have gaps (a policy's survivors packed together, a host's own positions)
 * hold a struct kvp_positions, the smaller of a survivor bitmap over their span and an int32 each. It is
 * made whole before it is installed (kvp_positions_make, a plan step that may fail) and never changed
 * afterwards, so copies, cold encodings and parked records share it.
 *
 * Freed memory is not cleared; it is unreachable instead. A tenant's blocks come from its own jemalloc
 * arena (no thread cache), so a freed block is only reused by the same tenant, and a closed tenant's
 * arena is destroyed, its pages returned to the system, which gives them out again zeroed. Within a
 * tenant no call reads a block past the n rows written into it. tests/test_isolation.c checks both.
 */
#include <stdlib.h>
#include <string.h>

#include "kernels/kernels.h"
#include "pager/pager.h"
#include "tier/tier.h"

static size_t store_size(enum kvp_store store)
{
	return store == KVP_STORE_FP16 ? sizeof(uint16_t) : sizeof(float);
}

static size_t align_up(size_t n, size_t a)
{
	return (n + a - 1) / a * a;
}

_Static_assert(sizeof(struct kvp_block) == 64, "a block header is one 64-byte size class");
_Static_assert(KVP_BLOCK_MAX <= UINT16_MAX, "a block's n and cap fit 16 bits");

static size_t header_bytes(void)
{
	return sizeof(struct kvp_block);
}

/* ---- positions ---- */

static int increasing(const int32_t *pos, uint32_t n)
{
	for (uint32_t i = 1; i < n; i++)
		if (pos[i] <= pos[i - 1])
			return 0;
	return 1;
}

static int is_run(const int32_t *pos, uint32_t n)
{
	for (uint32_t i = 1; i < n; i++)
		if (pos[i] != pos[0] + (int32_t)i)
			return 0;
	return 1;
}

static size_t positions_bytes(enum kvp_positions_kind kind, const int32_t *pos, uint32_t n)
{
	size_t words = kind == KVP_POSITIONS_BITMAP ? ((size_t)(uint32_t)(pos[n - 1] - pos[0]) + 64) / 64 :
						      ((size_t)n + 1) / 2;
	return sizeof(struct kvp_positions) + words * sizeof(uint64_t);
}

kvp_status kvp_positions_make(struct kvp_tenant_obj *t, const int32_t *pos, uint32_t n, struct kvp_call *call,
			      struct kvp_positions **out)
{
	enum kvp_positions_kind kind = KVP_POSITIONS_BITMAP;
	struct kvp_positions *p;
	size_t bytes;

	*out = NULL;
	if (n < 2 || is_run(pos, n))
		return KVP_OK;
	/* without a policy a host's positions need not increase: those are kept as they are */
	if (!increasing(pos, n) ||
	    positions_bytes(KVP_POSITIONS_INT32, pos, n) < positions_bytes(KVP_POSITIONS_BITMAP, pos, n))
		kind = KVP_POSITIONS_INT32;
	bytes = positions_bytes(kind, pos, n);
	if (!(p = kvp_alloc(t, bytes, KVP_BYTES_META, call)))
		return KVP_ENOMEM;
	atomic_init(&p->refs, 1);
	p->kind = kind;
	p->n = n;
	p->bytes = (uint32_t)bytes;
	memset(p->word, 0, bytes - sizeof *p);
	for (uint32_t i = 0; i < n; i++) {
		if (kind == KVP_POSITIONS_INT32) {
			((int32_t *)p->word)[i] = pos[i];
		} else {
			uint32_t bit = (uint32_t)(pos[i] - pos[0]);
			p->word[bit / 64] |= 1ull << (bit % 64);
		}
	}
	*out = p;
	return KVP_OK;
}

void kvp_positions_put(struct kvp_tenant_obj *t, struct kvp_positions *p, struct kvp_call *call)
{
	if (p && atomic_fetch_sub_explicit(&p->refs, 1, memory_order_acq_rel) == 1)
		kvp_free_during(t, p, p->bytes, KVP_BYTES_META, call);
}

struct kvp_positions *kvp_positions_get(struct kvp_positions *p)
{
	if (p)
		atomic_fetch_add_explicit(&p->refs, 1, memory_order_relaxed);
	return p;
}

void kvp_block_set_positions(struct kvp_tenant_obj *t, struct kvp_block *b, int32_t base, struct kvp_positions *p)
{
	kvp_positions_put(t, b->positions, NULL);
	b->pos_base = base;
	b->positions = p;
}

size_t kvp_block_positions_bytes(const struct kvp_tenant_obj *t, const struct kvp_block *b)
{
	return b->positions ? kvp_alloc_size(t, b->positions->bytes) : 0;
}

void kvp_block_positions(const struct kvp_block *b, int32_t *out)
{
	const struct kvp_positions *p = b->positions;
	uint32_t i = 0;

	if (!p) {
		for (; i < b->n; i++)
			out[i] = b->pos_base + (int32_t)i;
	} else if (p->kind == KVP_POSITIONS_INT32) {
		memcpy(out, p->word, b->n * sizeof *out);
	} else {
		for (uint32_t w = 0; i < b->n; w++)
			for (uint64_t bits = p->word[w]; bits && i < b->n; bits &= bits - 1)
				out[i++] = b->pos_base + (int32_t)(w * 64 + (uint32_t)__builtin_ctzll(bits));
	}
}

int32_t kvp_block_pos(const struct kvp_block *b, uint32_t i)
{
	const struct kvp_positions *p = b->positions;
	uint32_t w = 0, c;
	uint64_t bits;

	if (!p)
		return b->pos_base + (int32_t)i;
	if (p->kind == KVP_POSITIONS_INT32)
		return ((const int32_t *)p->word)[i];
	while ((c = (uint32_t)__builtin_popcountll(p->word[w])) <= i) {
		i -= c;
		w++;
	}
	for (bits = p->word[w]; i; i--)
		bits &= bits - 1;
	return b->pos_base + (int32_t)(w * 64 + (uint32_t)__builtin_ctzll(bits));
}

int32_t kvp_block_last(const struct kvp_block *b)
{
	return kvp_block_pos(b, b->n - 1u);
}

kvp_status kvp_block_positions_plan(struct kvp_tenant_obj *t, const struct kvp_block *b, const int32_t *pos,
				    uint32_t n, struct kvp_call *call, struct kvp_positions_plan *out)
{
	uint32_t had = b ? b->n : 0;
	int32_t *all;
	kvp_status st;

	memset(out, 0, sizeof *out);
	out->base = had ? b->pos_base : pos[0];
	/* appending to a run what continues it (the usual case) needs nothing */
	if ((!had || !b->positions) && is_run(pos, n) && (!had || pos[0] == b->pos_base + (int32_t)had))
		return KVP_OK;
	if (!(all = malloc(((size_t)had + n) * sizeof *all)))
		return kvp_fail(KVP_ENOMEM, "out of memory planning a block's positions");
	if (had)
		kvp_block_positions(b, all);
	memcpy(all + had, pos, n * sizeof *all);
	st = kvp_positions_make(t, all, had + n, call, &out->positions);
	free(all);
	out->changed = 1;
	return st;
}

void kvp_block_positions_commit(struct kvp_tenant_obj *t, struct kvp_block *b, struct kvp_positions_plan *p)
{
	if (p->changed || !b->n)
		kvp_block_set_positions(t, b, p->base, p->positions);
	memset(p, 0, sizeof *p);
}

void kvp_positions_plan_unwind(struct kvp_tenant_obj *t, struct kvp_positions_plan *p)
{
	kvp_positions_put(t, p->positions, NULL);
	memset(p, 0, sizeof *p);
}

static size_t rows_bytes(uint32_t cap, uint32_t dim, enum kvp_store store)
{
	return align_up((size_t)cap * dim * store_size(store), 64);
}

size_t kvp_block_bytes(const struct kvp_tenant_obj *t, const struct kvp_block *b)
{
	return kvp_alloc_size(t, header_bytes()) + kvp_block_positions_bytes(t, b) +
	       (b->spilled ? 0 : kvp_alloc_size(t, b->data_size));
}

size_t kvp_block_token_bytes(const struct kvp_tenant_obj *t, const struct kvp_block *b)
{
	return b->spilled ? 0 : kvp_alloc_size(t, b->data_size); /* a spilled block's tokens are counted by its record */
}

static enum kvp_bytes_kind block_kind(const struct kvp_block *b)
{
	return b->store == KVP_STORE_CODEC ? KVP_BYTES_COMPRESSED : KVP_BYTES_EXACT;
}

/* A block of cap tokens whose k and v take k_bytes and v_bytes, counted as kind. */
static struct kvp_block *block_new(struct kvp_tenant_obj *t, uint32_t cap, enum kvp_store store, size_t k_bytes,
				   size_t v_bytes, struct kvp_call *call)
{
	enum kvp_bytes_kind kind = store == KVP_STORE_CODEC ? KVP_BYTES_COMPRESSED : KVP_BYTES_EXACT;
	size_t k_room = align_up(k_bytes, 64), data = k_room + v_bytes;
	struct kvp_block *b;
	char *rows;

	if (cap > KVP_BLOCK_MAX || data > UINT32_MAX) {
		kvp_fail(KVP_ENOMEM, "a block of %u tokens and %zu bytes is larger than the pager serves", cap, data);
		return NULL;
	}
	if (!(b = kvp_alloc(t, header_bytes(), KVP_BYTES_META, call)))
		return NULL;
	if (!(rows = kvp_alloc(t, data, kind, call))) {
		kvp_free(t, b, header_bytes(), KVP_BYTES_META);
		return NULL;
	}
	memset(b, 0, sizeof *b);
	atomic_init(&b->refs, 1);
	b->cap = (uint16_t)cap;
	b->store = (uint8_t)store;
	b->data_size = (uint32_t)data;
	b->payload = (uint32_t)(k_bytes + v_bytes);
	b->k = rows;
	b->v = rows + k_room;
	b->v_offset = (uint32_t)k_room;
	return b;
}

struct kvp_block *kvp_block_new(struct kvp_tenant_obj *t, uint32_t cap, uint32_t dim, enum kvp_store store,
				struct kvp_call *call)
{
	size_t rows = rows_bytes(cap, dim, store);

	return block_new(t, cap, store, rows, rows, call);
}

struct kvp_block *kvp_block_new_cold(struct kvp_tenant_obj *t, uint32_t n, size_t k_bytes, size_t v_bytes,
				     struct kvp_call *call)
{
	return block_new(t, n, KVP_STORE_CODEC, k_bytes, v_bytes, call);
}

struct kvp_block *kvp_block_copy(struct kvp_tenant_obj *t, const struct kvp_block *b, uint32_t dim,
				 struct kvp_call *call)
{
	struct kvp_block *c = kvp_block_new(t, b->cap, dim, b->store, call);
	size_t row = (size_t)dim * store_size(b->store);
	if (!c)
		return NULL;
	c->n = b->n;
	kvp_block_set_positions(t, c, b->pos_base, kvp_positions_get(b->positions));
	memcpy(c->k, b->k, b->n * row);
	memcpy(c->v, b->v, b->n * row);
	return c;
}

void kvp_block_get(struct kvp_block *b)
{
	atomic_fetch_add_explicit(&b->refs, 1, memory_order_relaxed);
}

void kvp_block_put_during(struct kvp_tenant_obj *t, struct kvp_block *b, struct kvp_call *call)
{
	if (!b || atomic_fetch_sub_explicit(&b->refs, 1, memory_order_acq_rel) != 1)
		return;
	if (b->spilled) {
		/* never under the device lock: spilled blocks are private, never a twin (park.c) */
		kvp_spill_lock(t->pool->spill);
		kvp_spill_stub_drop(t->pool->spill, b->spilled, call);
		kvp_spill_unlock(t->pool->spill);
	}
	kvp_block_rows_free(t, b, call);
	kvp_positions_put(t, b->positions, call);
	kvp_free_during(t, b, header_bytes(), KVP_BYTES_META, call);
}

void kvp_block_put(struct kvp_tenant_obj *t, struct kvp_block *b)
{
	kvp_block_put_during(t, b, NULL);
}

void kvp_block_rows_free(struct kvp_tenant_obj *t, struct kvp_block *b, struct kvp_call *call)
{
	kvp_free_during(t, b->k, b->data_size, block_kind(b), call);
	b->k = b->v = NULL;
}

/* The record holds the rows now; the header stays, so positions and n are still there to read. */
void kvp_block_spill_out(struct kvp_tenant_obj *t, struct kvp_block *b, struct kvp_spilled *stub,
			 struct kvp_call *call)
{
	kvp_block_rows_free(t, b, call);
	b->spilled = stub;
}

/* Rows for a spilled block to be read into: the same size class, charged again. */
kvp_status kvp_block_rows_alloc(struct kvp_tenant_obj *t, struct kvp_block *b, struct kvp_call *call)
{
	char *rows = kvp_alloc(t, b->data_size, block_kind(b), call);

	if (!rows)
		return KVP_ENOMEM;
	b->k = rows;
	b->v = rows + b->v_offset;
	return KVP_OK;
}

void kvp_block_write(struct kvp_block *b, uint32_t at, uint32_t n, uint32_t dim, const float *k, const float *v,
		     size_t stride)
{
	const struct kvp_kernels *kern = kvp_kernels();
	for (uint32_t i = 0; i < n; i++) {
		size_t row = (size_t)(at + i) * dim;
		if (b->store == KVP_STORE_FP16) {
			kern->f32_to_f16(dim, k + i * stride, (uint16_t *)b->k + row);
			kern->f32_to_f16(dim, v + i * stride, (uint16_t *)b->v + row);
		} else {
			memcpy((float *)b->k + row, k + i * stride, dim * sizeof(float));
			memcpy((float *)b->v + row, v + i * stride, dim * sizeof(float));
		}
	}
	if (at + n > b->n)
		b->n = (uint16_t)(at + n);
}

/* ---- records on the spill device: stubs, and the twins that let forks share one ----
 * Here, with the blocks, because each may own the other: a spilled block holds its record's stub, and a
 * record holds its twin block. */

static size_t twin_hash(const struct kvp_block *b, size_t cap)
{
	return (size_t)(((uintptr_t)b >> 6) * 0x9e3779b97f4a7c15ull) & (cap - 1);
}

struct kvp_spilled *kvp_twin_find(struct kvp_twin_map *m, const struct kvp_block *b)
{
	if (!m->cap)
		return NULL;
	for (size_t i = twin_hash(b, m->cap); m->keys[i]; i = (i + 1) & (m->cap - 1))
		if (m->keys[i] == b)
			return m->vals[i];
	return NULL;
}

static int twin_grow(struct kvp_twin_map *m)
{
	struct kvp_twin_map big = { .cap = m->cap ? m->cap * 2 : 64 };
	big.keys = calloc(big.cap, sizeof *big.keys);
	big.vals = calloc(big.cap, sizeof *big.vals);
	if (!big.keys || !big.vals) {
		free(big.keys);
		free(big.vals);
		return 0;
	}
	for (size_t i = 0; i < m->cap; i++)
		if (m->keys[i]) {
			size_t j = twin_hash(m->keys[i], big.cap);
			while (big.keys[j])
				j = (j + 1) & (big.cap - 1);
			big.keys[j] = m->keys[i];
			big.vals[j] = m->vals[i];
		}
	big.n = m->n;
	free(m->keys);
	free(m->vals);
	*m = big;
	return 1;
}

/* Makes b the stub's twin, taking a block reference. Without memory for the map the block simply gets
 * no twin: a later park writes it again, which costs I/O, not correctness. */
void kvp_twin_set(struct kvp_twin_map *m, struct kvp_spilled *stub, struct kvp_block *b)
{
	size_t i;
	if (stub->twin || kvp_twin_find(m, b) || ((m->n + 1) * 2 > m->cap && !twin_grow(m)))
		return;
	for (i = twin_hash(b, m->cap); m->keys[i]; i = (i + 1) & (m->cap - 1))
		;
	m->keys[i] = b;
	m->vals[i] = stub;
	m->n++;
	kvp_block_get(b);
	stub->twin = b;
}

static void twin_remove_at(struct kvp_twin_map *m, size_t i)
{
	size_t mask = m->cap - 1, j = i;
	m->keys[i] = NULL;
	m->n--;
	/* Backward shift: move later members of the probe run into the hole so lookups need no tombstones. */
	for (;;) {
		j = (j + 1) & mask;
		if (!m->keys[j])
			return;
		size_t home = twin_hash(m->keys[j], m->cap);
		if (((j - home) & mask) >= ((j - i) & mask)) {
			m->keys[i] = m->keys[j];
			m->vals[i] = m->vals[j];
			m->keys[j] = NULL;
			i = j;
		}
	}
}

static void twin_drop(struct kvp_twin_map *m, struct kvp_spilled *stub, struct kvp_call *call)
{
	struct kvp_block *b = stub->twin;
	for (size_t i = twin_hash(b, m->cap); m->keys[i]; i = (i + 1) & (m->cap - 1))
		if (m->keys[i] == b) {
			twin_remove_at(m, i);
			break;
		}
	stub->twin = NULL;
	kvp_block_put_during(stub->tenant, b, call);
}

/* Twins no sequence holds any more are memory the device keeps for nothing: free them. */
void kvp_twins_trim(struct kvp_twin_map *m, struct kvp_call *call)
{
	for (size_t i = 0; i < m->cap;) {
		struct kvp_block *b = m->keys[i];
		if (b && atomic_load_explicit(&b->refs, memory_order_acquire) == 1)
			twin_drop(m, m->vals[i], call); /* may shift another member into i: look again */
		else
			i++;
	}
}

/* ---- stubs ---- */

static void stub_drop(struct kvp_spill *d, struct kvp_spilled *stub, struct kvp_call *call)
{
	if (!stub || --stub->refs)
		return;
	if (stub->twin)
		twin_drop(kvp_spill_twins(d), stub, call);
	kvp_spill_slot_free(d, stub->first_page, stub->pages);
	kvp_positions_put(stub->tenant, stub->positions, call);
	atomic_fetch_sub(&stub->tenant->bytes_spilled, stub->pages * KVP_SPILL_PAGE);
	kvp_free_during(stub->tenant, stub, sizeof *stub, KVP_BYTES_META, call);
}

kvp_status kvp_spill_stub_new(struct kvp_spill *d, struct kvp_seq_obj *s, uint32_t layer, uint32_t kv_head,
			      uint32_t block_no, const struct kvp_block *b, struct kvp_spilled **out,
			      struct kvp_call *call)
{
	struct kvp_tenant_obj *t = s->tenant;
	struct kvp_block_image im;
	struct kvp_spilled *stub;
	uint64_t first, payload;
	kvp_status st;
	kvp_spill_block_image(b, s->shape.head_dim, &im);
	payload = im.bytes[0] + im.bytes[1];
	if ((st = kvp_spill_slot_alloc(d, kvp_spill_record_pages(payload), &first)) != KVP_OK)
		return st;
	if (!(stub = kvp_alloc(t, sizeof *stub, KVP_BYTES_META, call))) {
		kvp_spill_slot_free(d, first, kvp_spill_record_pages(payload));
		return KVP_ENOMEM;
	}
	if (!t->spill_id)
		t->spill_id = kvp_spill_next_id(d);
	if (!s->spill_id)
		s->spill_id = kvp_spill_next_id(d);
	*stub = (struct kvp_spilled){
		.tenant = t, .refs = 1, .first_page = first, .pages = kvp_spill_record_pages(payload),
		.dim = s->shape.head_dim,
		.header = { .magic = KVP_SLOT_MAGIC, .tenant = t->spill_id, .seq = s->spill_id,
			    .layer = layer, .kv_head = kv_head, .block_no = block_no,
			    .n = b->n, .cap = b->cap, .store = (uint32_t)b->store,
			    .generation = kvp_spill_next_id(d), .payload = payload },
		/* a block's V starts where its K room ends; the rest of the allocation is V */
		.v_bytes = b->data_size - (size_t)((const char *)b->v - (const char *)b->k),
		.level = b->level,
		.pos_base = b->pos_base, .positions = kvp_positions_get(b->positions),
	};
	stub->k_bytes = b->payload - stub->v_bytes;
	atomic_fetch_add(&t->bytes_spilled, stub->pages * KVP_SPILL_PAGE);
	*out = stub;
	return KVP_OK;
}

void kvp_spill_stub_drop(struct kvp_spill *d, struct kvp_spilled *stub, struct kvp_call *call)
{
	stub_drop(d, stub, call);
}
