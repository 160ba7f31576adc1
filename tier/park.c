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
#include "tier/tier.h"

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

static size_t positions_count(const struct kvp_seq_obj *s)
{
	size_t n = 0;
	for (size_t i = 0; i < (size_t)s->shape.n_layers * s->shape.n_kv_heads; i++)
		n += 1 + s->streams[i].n_blocks;
	return n;
}

static void positions_list(struct kvp_seq_obj *s, struct position *p)
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

/* ---- the table ---- */

static void parked_drop(struct kvp_spill *d, struct kvp_parked *p, struct kvp_call *call)
{
	for (size_t i = 0; i < p->n; i++)
		kvp_spill_stub_drop(d, p->stubs[i], call);
}

/* ---- park ---- */

static kvp_status park_plan(struct kvp_spill *d, struct kvp_seq_obj *s, const struct position *pos,
			    struct kvp_parked *parked, struct kvp_spill_io *io, size_t *n_io, struct kvp_call *call)
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
		if ((stub = kvp_twin_find(kvp_spill_twins(d), b))) {
			stub->refs++; /* written by a sibling that parked first */
			parked->stubs[i] = stub;
			continue;
		}
		if ((st = kvp_spill_stub_new(d, s, pos[i].layer, pos[i].kv_head, pos[i].block_no, b, &stub, call)) != KVP_OK)
			return st;
		parked->stubs[i] = stub;
		io[(*n_io)++] = (struct kvp_spill_io){ stub, b };
	}
	return KVP_OK;
}

/* What a park's commit surely frees: the blocks only this sequence holds (the claim or the call keeps
 * forks out), less their positions, which their records keep in memory. A block a sibling shares may
 * live on in it. */
static uint64_t private_bytes(const struct kvp_seq_obj *s, const struct position *pos, size_t n)
{
	uint64_t bytes = 0;
	for (size_t i = 0; i < n; i++) {
		const struct kvp_block *b = *pos[i].where;
		if (b && atomic_load_explicit(&b->refs, memory_order_acquire) == 1)
			bytes += kvp_block_bytes(s->tenant, b) - kvp_block_positions_bytes(s->tenant, b);
	}
	return bytes;
}

static kvp_status seq_check(const struct kvp_seq_obj *s, const char *call)
{
	if (!s || s->magic != KVP_SEQ_MAGIC)
		return kvp_fail(KVP_EINVAL, "%s: not an open sequence", call);
	if (!s->tenant->pool->spill)
		return kvp_fail(KVP_EUNSUPPORTED, "%s: the pool has no spill device (open it with "
				"spill=PATH,spill_max=SIZE)", call);
	return KVP_OK;
}

static void park_commit(struct kvp_spill *d, struct kvp_seq_obj *s, struct position *pos,
			struct kvp_parked *parked, struct kvp_spill_io *io, size_t n_io, struct kvp_call *call)
{
	kvp_spill_lock(d);
	for (size_t i = 0; i < n_io; i++)
		kvp_twin_set(kvp_spill_twins(d), io[i].stub, io[i].block);
	kvp_spill_unlock(d);
	for (size_t i = 0; i < parked->n; i++) {
		kvp_block_put_during(s->tenant, *pos[i].where, call);
		*pos[i].where = NULL;
	}
	s->parked = parked;
	s->n_spilled = 0; /* their records belong to the table now */
	atomic_store(&s->parked_flag, 1);
	kvp_spill_lock(d);
	kvp_twins_trim(kvp_spill_twins(d), call);
	kvp_spill_unlock(d);
}

kvp_status kvp_park_sequence(struct kvp_seq_obj *s, struct kvp_call *call)
{
	struct kvp_call none = { 0 };
	struct kvp_spill *d;
	struct kvp_parked *parked;
	struct position *pos;
	struct kvp_spill_io *io;
	size_t n, n_io = 0;
	int mode;
	kvp_status st = seq_check(s, "kvp_seq_park");
	if (st != KVP_OK || s->parked)
		return st;
	kvp_restore_settle(s);
	if (!call)
		call = &none;
	mode = call->no_relief;
	d = s->tenant->pool->spill;
	n = positions_count(s);
	pos = calloc(n, sizeof *pos);
	io = calloc(n, sizeof *io);
	if (pos)
		positions_list(s, pos);
	/* The table and the stubs are paid from the blocks the commit frees; past that they are charged as
	 * anything else, and a park the quota has no room for fails whole. */
	call->no_relief = 1;
	kvp_prepay_begin(call, s->tenant, pos ? private_bytes(s, pos, n) : 0);
	parked = kvp_alloc(s->tenant, parked_bytes(n), KVP_BYTES_META, call);
	if (!pos || !io || !parked) {
		st = kvp_fail(KVP_ENOMEM, "kvp_seq_park: out of memory for the table of %zu records", n);
		goto out;
	}
	memset(parked, 0, parked_bytes(n));
	parked->n = n;
	kvp_spill_lock(d);
	st = park_plan(d, s, pos, parked, io, &n_io, call);
	kvp_spill_unlock(d);
	call->no_relief = mode;
	if (st == KVP_OK)
		st = kvp_spill_write(d, io, n_io, s->shape.head_dim);
	if (st == KVP_OK) {
		park_commit(d, s, pos, parked, io, n_io, call);
		parked = NULL;
	} else {
		st = kvp_fail_context(st, "kvp_seq_park: nothing was parked");
		kvp_spill_lock(d);
		parked_drop(d, parked, call);
		kvp_spill_unlock(d);
	}
out:
	if (parked)
		kvp_free_during(s->tenant, parked, parked_bytes(n), KVP_BYTES_META, call);
	kvp_prepay_end(call, s->tenant);
	call->no_relief = mode;
	free(pos);
	free(io);
	return st;
}

/* ---- unpark ---- */

/* Every position gets its block: the record's twin where it has one, else a fresh block to read into. */
static kvp_status unpark_plan(struct kvp_spill *d, struct kvp_seq_obj *s, struct kvp_block **blocks,
			      struct kvp_spill_io *io, size_t *n_io, struct kvp_call *call)
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
			blocks[i] = kvp_block_new_cold(s->tenant, h->cap, p->stubs[i]->k_bytes, p->stubs[i]->v_bytes,
						       call);
			if (blocks[i])
				blocks[i]->level = p->stubs[i]->level;
		} else
			blocks[i] = kvp_block_new(s->tenant, h->cap, s->shape.head_dim, (enum kvp_store)h->store, call);
		if (!blocks[i])
			return KVP_ENOMEM;
		kvp_block_set_positions(s->tenant, blocks[i], h->n ? p->stubs[i]->pos_base : 0,
					kvp_positions_get(p->stubs[i]->positions));
		io[(*n_io)++] = (struct kvp_spill_io){ p->stubs[i], blocks[i] };
	}
	return KVP_OK;
}

static void unpark_commit(struct kvp_spill *d, struct kvp_seq_obj *s, struct position *pos,
			  struct kvp_block **blocks, struct kvp_spill_io *io, size_t n_io)
{
	struct kvp_parked *p = s->parked;
	kvp_spill_lock(d);
	/* Siblings still parked on a record will share what was just read instead of reading it again. */
	for (size_t i = 0; i < n_io; i++)
		if (io[i].stub->refs > 1)
			kvp_twin_set(kvp_spill_twins(d), io[i].stub, io[i].block);
	parked_drop(d, p, NULL);
	kvp_spill_unlock(d);
	for (size_t i = 0; i < p->n; i++)
		*pos[i].where = blocks[i];
	s->parked = NULL;
	atomic_store(&s->parked_flag, 0);
	s->pressure_parked = 0;
	kvp_free(s->tenant, p, parked_bytes(p->n), KVP_BYTES_META);
}

kvp_status kvp_unpark_sequence(struct kvp_seq_obj *s, struct kvp_call *call)
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
	st = unpark_plan(d, s, blocks, io, &n_io, call);
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

kvp_status kvp_seq_parked_error(const struct kvp_seq_obj *s, const char *call)
{
	(void)s;
	return kvp_fail(KVP_EINVAL, "%s: the sequence is parked; call kvp_seq_unpark first", call);
}

void kvp_seq_parked_release(struct kvp_seq_obj *s)
{
	struct kvp_spill *d = s->tenant->pool->spill;
	if (!s->parked)
		return;
	kvp_spill_lock(d);
	parked_drop(d, s->parked, NULL);
	kvp_spill_unlock(d);
	kvp_free(s->tenant, s->parked, parked_bytes(s->parked->n), KVP_BYTES_META);
	s->parked = NULL;
}

uint64_t kvp_seq_parked_meta(const struct kvp_seq_obj *s)
{
	uint64_t bytes;
	if (!s->parked)
		return 0;
	bytes = kvp_alloc_size(s->tenant, parked_bytes(s->parked->n));
	for (size_t i = 0; i < s->parked->n; i++)
		if (s->parked->stubs[i])
			bytes += kvp_alloc_size(s->tenant, sizeof(struct kvp_spilled)) +
				 (s->parked->stubs[i]->positions ?
					  kvp_alloc_size(s->tenant, s->parked->stubs[i]->positions->bytes) : 0);
	return bytes;
}

uint64_t kvp_seq_parked_bytes(const struct kvp_seq_obj *s)
{
	uint64_t bytes = 0;
	for (size_t i = 0; s->parked && i < s->parked->n; i++)
		if (s->parked->stubs[i])
			bytes += s->parked->stubs[i]->pages * KVP_SPILL_PAGE;
	return bytes;
}
