/*
 * kvp_seq_park / kvp_seq_unpark: a whole sequence to the spill device and back, all or nothing.
 *
 * Park: plan (under the device lock: reuse the record of any block that already has one, reserve slots
 * and stubs for the rest), write (ring lock only), then commit: the stream tables drop their blocks and
 * the sequence keeps one stub per table position. A failure before the commit gives back every slot and
 * stub; the blocks were never touched, so the sequence is exactly as it was.
 * Unpark: allocate every block, read and check every record, then commit; a failure frees the new blocks
 * and leaves the sequence parked with its records.
 *
 * Forks: a block shared by two sequences is written once. The first park writes it and keeps it as the
 * record's twin (one more block reference, so nobody writes it in place); the sibling's park finds the
 * twin and only takes a reference on the record. Twins that only the device still holds are released at
 * the end of every park, so parking frees memory unless a running sequence still uses the block. An
 * unpark reads a shared record once: the first reader keeps the block as the twin, later ones share it.
 * Concurrent parks of two siblings may each write a shared block; both records are valid.
 *
 * A sequence the host parked refuses append, attend, gather and fork with KVP_EINVAL
 * (kvp_seq_parked_error): the host parked it, so the host decides when to pay for bringing it back, and
 * a call that needs its tokens by mistake is reported, not silently slowed down by I/O. A sequence that
 * memory pressure parked (pressure.c) is brought back by the next call that needs its tokens instead:
 * the host never asked for it to go.
 */
#include <stdlib.h>
#include <string.h>

#include "pager/pager.h"

struct kvp_parked {
	size_t n;
	struct kvp_spilled *stubs[]; /* per table position; NULL where there was no block */
};

/* A table position: each stream's sink, then its blocks, streams in layer-major order. */
struct position {
	struct kvp_block **where;
	uint32_t layer, kv_head, block_no;
};

static size_t parked_bytes(size_t n)
{
	return sizeof(struct kvp_parked) + n * sizeof(struct kvp_spilled *);
}

static size_t positions_count(const struct kvp_seq *s)
{
	size_t n = 0;
	for (size_t i = 0; i < (size_t)s->shape.n_layers * s->shape.n_kv_heads; i++)
		n += 1 + s->streams[i].n_blocks;
	return n;
}

static void positions_list(struct kvp_seq *s, struct position *p)
{
	size_t at = 0;
	for (uint32_t l = 0; l < s->shape.n_layers; l++)
		for (uint32_t g = 0; g < s->shape.n_kv_heads; g++) {
			struct kvp_stream *st = kvp_seq_stream(s, l, g);
			p[at++] = (struct position){ &st->sink, l, g, KVP_SLOT_SINK };
			for (uint32_t b = 0; b < st->n_blocks; b++)
				p[at++] = (struct position){ &st->blocks[b], l, g, b };
		}
}

/* ---- twins ---- */

static size_t twin_hash(const struct kvp_block *b, size_t cap)
{
	return (size_t)(((uintptr_t)b >> 6) * 0x9e3779b97f4a7c15ull) & (cap - 1);
}

static struct kvp_spilled *twin_find(struct kvp_twin_map *m, const struct kvp_block *b)
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
static void twin_set(struct kvp_twin_map *m, struct kvp_spilled *stub, struct kvp_block *b)
{
	size_t i;
	if (stub->twin || twin_find(m, b) || ((m->n + 1) * 2 > m->cap && !twin_grow(m)))
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

static void twin_drop(struct kvp_twin_map *m, struct kvp_spilled *stub)
{
	struct kvp_block *b = stub->twin;
	for (size_t i = twin_hash(b, m->cap); m->keys[i]; i = (i + 1) & (m->cap - 1))
		if (m->keys[i] == b) {
			twin_remove_at(m, i);
			break;
		}
	stub->twin = NULL;
	kvp_block_put(stub->tenant, b);
}

/* Twins no sequence holds any more are memory the device keeps for nothing: free them. */
static void twins_trim(struct kvp_twin_map *m)
{
	for (size_t i = 0; i < m->cap;) {
		struct kvp_block *b = m->keys[i];
		if (b && atomic_load_explicit(&b->refs, memory_order_acquire) == 1)
			twin_drop(m, m->vals[i]); /* may shift another member into i: look again */
		else
			i++;
	}
}

/* ---- stubs ---- */

static void stub_drop(struct kvp_spill *d, struct kvp_spilled *stub)
{
	if (!stub || --stub->refs)
		return;
	if (stub->twin)
		twin_drop(kvp_spill_twins(d), stub);
	kvp_spill_slot_free(d, stub->first_page, stub->pages);
	atomic_fetch_sub(&stub->tenant->bytes_spilled, stub->pages * KVP_SPILL_PAGE);
	kvp_free(stub->tenant, stub, sizeof *stub, KVP_BYTES_META, 0);
}

static void parked_drop(struct kvp_spill *d, struct kvp_parked *p)
{
	for (size_t i = 0; i < p->n; i++)
		stub_drop(d, p->stubs[i]);
}

static kvp_status stub_new(struct kvp_spill *d, struct kvp_seq *s, const struct position *pos,
			   const struct kvp_block *b, struct kvp_spilled **out)
{
	struct kvp_tenant *t = s->tenant;
	struct kvp_block_image im;
	struct kvp_spilled *stub;
	uint64_t first, payload;
	kvp_status st;
	kvp_spill_block_image(b, s->shape.head_dim, &im);
	payload = im.bytes[0] + im.bytes[1];
	if ((st = kvp_spill_slot_alloc(d, kvp_spill_record_pages(payload), &first)) != KVP_OK)
		return st;
	if (!(stub = kvp_alloc(t, sizeof *stub, KVP_BYTES_META, 0))) {
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
			    .layer = pos->layer, .kv_head = pos->kv_head, .block_no = pos->block_no,
			    .n = b->n, .cap = b->cap, .store = (uint32_t)b->store,
			    .generation = kvp_spill_next_id(d), .payload = payload },
		/* a block's V starts where its K room ends; the rest of the allocation is V */
		.v_bytes = b->data_size - (size_t)((const char *)b->v - (const char *)b->k),
		.level = b->level,
	};
	stub->k_bytes = b->payload - stub->v_bytes;
	atomic_fetch_add(&t->bytes_spilled, stub->pages * KVP_SPILL_PAGE);
	*out = stub;
	return KVP_OK;
}

kvp_status kvp_spill_stub_new(struct kvp_spill *d, struct kvp_seq *s, uint32_t layer, uint32_t kv_head,
			      uint32_t block_no, const struct kvp_block *b, struct kvp_spilled **out)
{
	struct position pos = { NULL, layer, kv_head, block_no };
	return stub_new(d, s, &pos, b, out);
}

void kvp_spill_stub_drop(struct kvp_spill *d, struct kvp_spilled *stub)
{
	stub_drop(d, stub);
}

/* ---- park ---- */

static kvp_status park_plan(struct kvp_spill *d, struct kvp_seq *s, const struct position *pos,
			    struct kvp_parked *parked, struct kvp_spill_io *io, size_t *n_io)
{
	for (size_t i = 0; i < parked->n; i++) {
		struct kvp_block *b = *pos[i].where;
		struct kvp_spilled *stub;
		kvp_status st;
		if (!b)
			continue;
		if (b->spilled) { /* spilled alone under pressure: its record joins the table as it is */
			b->spilled->refs++;
			parked->stubs[i] = b->spilled;
			continue;
		}
		if ((stub = twin_find(kvp_spill_twins(d), b))) {
			stub->refs++; /* written by a sibling that parked first */
			parked->stubs[i] = stub;
			continue;
		}
		if ((st = stub_new(d, s, &pos[i], b, &stub)) != KVP_OK)
			return st;
		parked->stubs[i] = stub;
		io[(*n_io)++] = (struct kvp_spill_io){ stub, b };
	}
	return KVP_OK;
}

/* What a park's commit surely frees: the blocks only this sequence holds (the claim or the call keeps
 * forks out). A block a sibling shares may live on in it. */
static uint64_t private_bytes(const struct kvp_seq *s, const struct position *pos, size_t n)
{
	uint64_t bytes = 0;
	for (size_t i = 0; i < n; i++) {
		const struct kvp_block *b = *pos[i].where;
		if (b && atomic_load_explicit(&b->refs, memory_order_acquire) == 1)
			bytes += kvp_block_bytes(s->tenant, b);
	}
	return bytes;
}

static kvp_status seq_check(const struct kvp_seq *s, const char *call)
{
	if (!s || s->magic != KVP_SEQ_MAGIC)
		return kvp_fail(KVP_EINVAL, "%s: not an open sequence", call);
	if (!s->tenant->pool->spill)
		return kvp_fail(KVP_EUNSUPPORTED, "%s: the pool has no spill device (open it with "
				"spill=PATH,spill_max=SIZE)", call);
	return KVP_OK;
}

static void park_commit(struct kvp_spill *d, struct kvp_seq *s, struct position *pos,
			struct kvp_parked *parked, struct kvp_spill_io *io, size_t n_io)
{
	kvp_spill_lock(d);
	for (size_t i = 0; i < n_io; i++)
		twin_set(kvp_spill_twins(d), io[i].stub, io[i].block);
	kvp_spill_unlock(d);
	for (size_t i = 0; i < parked->n; i++) {
		kvp_block_put(s->tenant, *pos[i].where);
		*pos[i].where = NULL;
	}
	s->parked = parked;
	s->n_spilled = 0; /* their records belong to the table now */
	atomic_store(&s->parked_flag, 1);
	kvp_spill_lock(d);
	twins_trim(kvp_spill_twins(d));
	kvp_spill_unlock(d);
}

kvp_status kvp_park_sequence(struct kvp_seq *s)
{
	struct kvp_spill *d;
	struct kvp_parked *parked;
	struct position *pos;
	struct kvp_spill_io *io;
	size_t n, n_io = 0;
	unsigned mode = kvp_charge_mode;
	kvp_status st = seq_check(s, "kvp_seq_park");
	if (st != KVP_OK || s->parked)
		return st;
	kvp_restore_settle(s);
	d = s->tenant->pool->spill;
	n = positions_count(s);
	pos = calloc(n, sizeof *pos);
	io = calloc(n, sizeof *io);
	if (pos)
		positions_list(s, pos);
	/* The table and the stubs are paid from the blocks the commit frees; past that they are charged as
	 * anything else, and a park the quota has no room for fails whole. */
	kvp_charge_mode |= KVP_CHARGE_NO_RELIEF;
	kvp_prepay_begin(s->tenant, pos ? private_bytes(s, pos, n) : 0);
	parked = kvp_alloc(s->tenant, parked_bytes(n), KVP_BYTES_META, 0);
	if (!pos || !io || !parked) {
		st = kvp_fail(KVP_ENOMEM, "kvp_seq_park: out of memory for the table of %zu records", n);
		goto out;
	}
	memset(parked, 0, parked_bytes(n));
	parked->n = n;
	kvp_spill_lock(d);
	st = park_plan(d, s, pos, parked, io, &n_io);
	kvp_spill_unlock(d);
	kvp_charge_mode = mode;
	if (st == KVP_OK)
		st = kvp_spill_write(d, io, n_io, s->shape.head_dim);
	if (st == KVP_OK) {
		park_commit(d, s, pos, parked, io, n_io);
		parked = NULL;
	} else {
		st = kvp_fail_context(st, "kvp_seq_park: nothing was parked");
		kvp_spill_lock(d);
		parked_drop(d, parked);
		kvp_spill_unlock(d);
	}
out:
	if (parked)
		kvp_free(s->tenant, parked, parked_bytes(n), KVP_BYTES_META, 0);
	kvp_prepay_end(s->tenant);
	kvp_charge_mode = mode;
	free(pos);
	free(io);
	return st;
}

/* ---- unpark ---- */

/* Every position gets its block: the record's twin where it has one, else a fresh block to read into. */
static kvp_status unpark_plan(struct kvp_spill *d, struct kvp_seq *s, struct kvp_block **blocks,
			      struct kvp_spill_io *io, size_t *n_io)
{
	struct kvp_parked *p = s->parked;
	kvp_spill_lock(d);
	for (size_t i = 0; i < p->n; i++)
		if (p->stubs[i] && (blocks[i] = p->stubs[i]->twin))
			kvp_block_get(blocks[i]);
	kvp_spill_unlock(d);
	for (size_t i = 0; i < p->n; i++) {
		const struct kvp_slot_header *h;
		if (!p->stubs[i] || blocks[i])
			continue;
		h = &p->stubs[i]->header;
		if (h->store == KVP_STORE_CODEC) {
			blocks[i] = kvp_block_new_cold(s->tenant, h->cap, p->stubs[i]->k_bytes, p->stubs[i]->v_bytes);
			if (blocks[i])
				blocks[i]->level = p->stubs[i]->level;
		} else
			blocks[i] = kvp_block_new(s->tenant, h->cap, s->shape.head_dim, (enum kvp_store)h->store);
		if (!blocks[i])
			return KVP_ENOMEM;
		io[(*n_io)++] = (struct kvp_spill_io){ p->stubs[i], blocks[i] };
	}
	return KVP_OK;
}

static void unpark_commit(struct kvp_spill *d, struct kvp_seq *s, struct position *pos,
			  struct kvp_block **blocks, struct kvp_spill_io *io, size_t n_io)
{
	struct kvp_parked *p = s->parked;
	kvp_spill_lock(d);
	/* Siblings still parked on a record will share what was just read instead of reading it again. */
	for (size_t i = 0; i < n_io; i++)
		if (io[i].stub->refs > 1)
			twin_set(kvp_spill_twins(d), io[i].stub, io[i].block);
	parked_drop(d, p);
	kvp_spill_unlock(d);
	for (size_t i = 0; i < p->n; i++)
		*pos[i].where = blocks[i];
	s->parked = NULL;
	atomic_store(&s->parked_flag, 0);
	s->pressure_parked = 0;
	kvp_free(s->tenant, p, parked_bytes(p->n), KVP_BYTES_META, 0);
}

kvp_status kvp_unpark_sequence(struct kvp_seq *s)
{
	struct kvp_spill *d;
	struct kvp_block **blocks;
	struct position *pos;
	struct kvp_spill_io *io;
	size_t n, n_io = 0;
	kvp_status st = seq_check(s, "kvp_seq_unpark");
	if (st != KVP_OK || !s->parked)
		return st;
	d = s->tenant->pool->spill;
	n = s->parked->n;
	pos = calloc(n, sizeof *pos);
	io = calloc(n, sizeof *io);
	blocks = calloc(n, sizeof *blocks);
	if (!pos || !io || !blocks) {
		st = kvp_fail(KVP_ENOMEM, "kvp_seq_unpark: out of memory for the table of %zu records", n);
		goto out;
	}
	positions_list(s, pos);
	st = unpark_plan(d, s, blocks, io, &n_io);
	if (st == KVP_OK)
		st = kvp_spill_read(d, io, n_io, s->shape.head_dim);
	if (st == KVP_OK) {
		unpark_commit(d, s, pos, blocks, io, n_io);
	} else {
		st = kvp_fail_context(st, "kvp_seq_unpark: the sequence stays parked");
		for (size_t i = 0; i < n; i++)
			kvp_block_put(s->tenant, blocks[i]);
	}
out:
	free(pos);
	free(io);
	free(blocks);
	return st;
}

/* ---- the rest of the sequence's life ---- */

kvp_status kvp_seq_parked_error(const struct kvp_seq *s, const char *call)
{
	(void)s;
	return kvp_fail(KVP_EINVAL, "%s: the sequence is parked; call kvp_seq_unpark first", call);
}

void kvp_seq_parked_release(struct kvp_seq *s)
{
	struct kvp_spill *d = s->tenant->pool->spill;
	if (!s->parked)
		return;
	kvp_spill_lock(d);
	parked_drop(d, s->parked);
	kvp_spill_unlock(d);
	kvp_free(s->tenant, s->parked, parked_bytes(s->parked->n), KVP_BYTES_META, 0);
	s->parked = NULL;
}

uint64_t kvp_seq_parked_meta(const struct kvp_seq *s)
{
	uint64_t bytes;
	if (!s->parked)
		return 0;
	bytes = kvp_alloc_size(s->tenant, parked_bytes(s->parked->n));
	for (size_t i = 0; i < s->parked->n; i++)
		if (s->parked->stubs[i])
			bytes += kvp_alloc_size(s->tenant, sizeof(struct kvp_spilled));
	return bytes;
}

uint64_t kvp_seq_parked_bytes(const struct kvp_seq *s)
{
	uint64_t bytes = 0;
	for (size_t i = 0; s->parked && i < s->parked->n; i++)
		if (s->parked->stubs[i])
			bytes += s->parked->stubs[i]->pages * KVP_SPILL_PAGE;
	return bytes;
}
