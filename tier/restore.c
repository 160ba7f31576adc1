/*
 * Spilled blocks of resident sequences on the spill device, one block at a time.
 *
 * Memory pressure (pressure.c) spills blocks of two kinds of sequence:
 *   - an idle one (no call in it, claimed by the pressure): any private block but its streams' sinks and
 *     tails (the tail is where its next append writes), oldest block position first. Exact blocks go
 *     too, so a tenant without a cold tier is relieved block by block as well;
 *   - the calling one, as the last resort: only its oldest cold blocks (codec-encoded,
 *     blocks[0..n_cold) of its streams) outside the layers its call uses. Its exact blocks are the hot
 *     window and what the append in progress encodes.
 * The rows are written to the device and freed; the block headers (n, positions) stay, so appends,
 * positions and policies never notice. Only private blocks (one reference) are spilled: a block shared
 * with a fork would be read by another sequence on another thread.
 *
 * Who needs rows brings them back first: kvp_attend restores its layer and starts the reads of the next
 * layer's spilled blocks (prefetch one layer ahead), which stay in flight while the host computes the
 * rest of the layer; an append restores the layer's spilled exact blocks (the ones it may encode), fork,
 * gather and a policy's step restore what they read; every other call (and a park, a close) waits for
 * the reads in flight first, so nothing frees a block the device is writing.
 * A restore is checked like an unpark (CRC32C, then the record's identity), and a failed one leaves
 * the block spilled with its record: the call reports KVP_EIO or KVP_ECORRUPT and the next one tries
 * again.
 */
#include <stdio.h>
#include <stdlib.h>

#include "pager/pager.h"
#include "tier/tier.h"

/* Spilled blocks brought back or prefetched in one go: one layer's. */
struct kvp_restore {
	uint32_t layer;
	size_t n;
	struct kvp_spill_pending reads[];
};

/* ---- spilling ---- */

struct victim {
	struct kvp_block *block;
	uint32_t layer, kv_head, block_no;
};

static int pinned(const struct kvp_seq_obj *s, uint32_t layer)
{
	return layer >= s->pin_from && layer < s->pin_to;
}

static int spillable(const struct kvp_seq_obj *s, const struct kvp_stream *st, uint32_t layer, uint32_t i,
		     enum kvp_spill_reach reach)
{
	const struct kvp_block *b = st->blocks[i];
	if (b->spilled || atomic_load_explicit(&b->refs, memory_order_acquire) != 1)
		return 0;
	if (reach == KVP_SPILL_IDLE)
		return i + 1 < st->n_blocks; /* the tail takes the next append */
	return i < st->n_cold && b->store == KVP_STORE_CODEC && !pinned(s, layer);
}

/* How far into its streams' tables a spill may reach. */
static uint32_t reach_end(const struct kvp_stream *st, enum kvp_spill_reach reach)
{
	return reach == KVP_SPILL_IDLE ? st->n_blocks : st->n_cold;
}

/* Oldest first: block 0 of every stream, then block 1, ... until `bytes` of memory are freed (rows, less
 * the stub each record needs) or `cap` blocks are taken. Blocks whose rows take no more memory than a
 * stub would free nothing. *rows_out: the memory of the rows taken, what pays for their stubs. */
static size_t victims_pick(const struct kvp_seq_obj *s, uint64_t bytes, enum kvp_spill_reach reach, struct victim *v,
			   size_t cap, uint64_t *rows_out)
{
	const uint64_t stub = kvp_alloc_size(s->tenant, sizeof(struct kvp_spilled));
	uint32_t most = 0;
	uint64_t freed = 0;
	size_t n = 0;
	for (size_t i = 0; i < (size_t)s->shape.n_layers * s->shape.n_kv_heads; i++)
		most = reach_end(&s->streams[i], reach) > most ? reach_end(&s->streams[i], reach) : most;
	for (uint32_t b = 0; b < most && freed < bytes && n < cap; b++)
		for (uint32_t l = 0; l < s->shape.n_layers && freed < bytes && n < cap; l++)
			for (uint32_t g = 0; g < s->shape.n_kv_heads && freed < bytes && n < cap; g++) {
				const struct kvp_stream *st = kvp_seq_stream(s, l, g);
				uint64_t rows;
				if (b >= reach_end(st, reach) || !spillable(s, st, l, b, reach))
					continue;
				rows = kvp_alloc_size(s->tenant, st->blocks[b]->data_size);
				if (rows <= stub)
					continue;
				v[n++] = (struct victim){ st->blocks[b], l, g, b };
				freed += rows - stub;
				*rows_out += rows;
			}
	return n;
}

#define SPILL_BATCH 256 /* blocks per relief: enough for large appends, bounded memory for the lists */

/* Stubs (slots) for the victims; on failure the ones made so far are kept and counted in *made. */
static kvp_status stubs_make(struct kvp_spill *d, struct kvp_seq_obj *s, const struct victim *v, size_t n,
			     struct kvp_spill_io *io, size_t *made, struct kvp_call *call)
{
	kvp_status st = KVP_OK;
	kvp_spill_lock(d);
	for (*made = 0; *made < n; ++*made) {
		st = kvp_spill_stub_new(d, s, v[*made].layer, v[*made].kv_head, v[*made].block_no, v[*made].block,
					&io[*made].stub, call);
		if (st != KVP_OK)
			break;
		io[*made].block = v[*made].block;
	}
	kvp_spill_unlock(d);
	return st;
}

size_t kvp_spill_blocks(struct kvp_seq_obj *s, uint64_t bytes, enum kvp_spill_reach reach, struct kvp_call *call)
{
	struct kvp_spill *d = s->tenant->pool->spill;
	struct kvp_call none = { 0 };
	struct victim *v;
	struct kvp_spill_io *io;
	size_t n, made = 0;
	uint64_t rows = 0;
	kvp_status st;
	int mode;
	if (!d || s->parked || (reach == KVP_SPILL_OWN_COLD && !s->cold.k))
		return 0;
	if (!call)
		call = &none;
	mode = call->no_relief;
	v = calloc(SPILL_BATCH, sizeof *v);
	io = calloc(SPILL_BATCH, sizeof *io);
	n = v && io ? victims_pick(s, bytes, reach, v, SPILL_BATCH, &rows) : 0;
	call->no_relief = 1;
	kvp_prepay_begin(call, s->tenant, rows); /* the stubs are paid from the rows they replace */
	st = stubs_make(d, s, v, n, io, &made, call);
	if (made && (st = kvp_spill_write(d, io, made, s->shape.head_dim)) == KVP_OK) {
		for (size_t i = 0; i < made; i++) {
			call->tally.bytes += io[i].stub->pages * KVP_SPILL_PAGE;
			kvp_block_spill_out(s->tenant, io[i].block, io[i].stub, call);
		}
		s->n_spilled += (uint32_t)made;
		call->tally.blocks[reach] += (uint32_t)made;
	} else if (made) {
		kvp_spill_lock(d); /* the blocks stay as they were; their slots go back */
		for (size_t i = 0; i < made; i++)
			kvp_spill_stub_drop(d, io[i].stub, call);
		kvp_spill_unlock(d);
	}
	kvp_prepay_end(call, s->tenant);
	call->no_relief = mode;
	free(v);
	free(io);
	return st == KVP_OK ? made : 0;
}

/* ---- restoring ---- */

/* Which spilled blocks of a layer a restore brings back. */
enum restore_scope { RESTORE_EVERY, RESTORE_EXACT };

/* A spilled block in scope that is not being read yet. */
static int restore_wanted(const struct kvp_block *b, enum restore_scope scope)
{
	return b->spilled && !b->k && (scope == RESTORE_EVERY || b->store != KVP_STORE_CODEC);
}

/* Room for all the rows a restore takes at once: a charge given back at once, so that pressure spills
 * what they need in one batch of writes instead of one small synchronous spill per block's rows. What
 * it cannot make room for, the blocks' own allocations report. */
static void room_make(struct kvp_tenant_obj *t, uint64_t bytes, struct kvp_call *call)
{
	char why[512];
	snprintf(why, sizeof why, "%s", kvp_last_error());
	if (kvp_charge(t, bytes, call) == KVP_OK)
		kvp_uncharge(t, bytes, call);
	kvp_fail(KVP_OK, "%s", why);
}

/* Rows for every spilled block of the layer in scope that is not being read yet, and their reads
 * submitted. KVP_ENOMEM when rows ran out: the reads of the blocks that got rows are submitted all the
 * same. */
static kvp_status restore_start(struct kvp_seq_obj *s, uint32_t layer, enum restore_scope scope,
				struct kvp_restore **out, struct kvp_call *call)
{
	struct kvp_restore *r;
	size_t n = 0;
	uint64_t bytes = 0;
	kvp_status st = KVP_OK;
	*out = NULL;
	for (uint32_t g = 0; g < s->shape.n_kv_heads; g++) {
		const struct kvp_stream *stream = kvp_seq_stream(s, layer, g);
		for (uint32_t b = 0; b < stream->n_blocks; b++)
			if (restore_wanted(stream->blocks[b], scope)) {
				n++;
				bytes += kvp_alloc_size(s->tenant, stream->blocks[b]->data_size);
			}
	}
	if (!n)
		return KVP_OK;
	room_make(s->tenant, bytes, call);
	if (!(r = malloc(sizeof *r + n * sizeof r->reads[0])))
		return kvp_fail(KVP_ENOMEM, "out of memory for %zu block reads", n);
	r->layer = layer;
	r->n = 0;
	for (uint32_t g = 0; g < s->shape.n_kv_heads && st == KVP_OK; g++) {
		const struct kvp_stream *stream = kvp_seq_stream(s, layer, g);
		for (uint32_t i = 0; i < stream->n_blocks && st == KVP_OK; i++) {
			struct kvp_block *b = stream->blocks[i];
			if (!restore_wanted(b, scope))
				continue;
			if ((st = kvp_block_rows_alloc(s->tenant, b, call)) == KVP_OK)
				r->reads[r->n++] = (struct kvp_spill_pending){ .stub = b->spilled, .block = b };
		}
	}
	kvp_spill_read_submit(s->tenant->pool->spill, r->reads, r->n);
	*out = r;
	return st;
}

/* Waits for the reads; each block that checked out is resident again and its record freed, each that
 * did not gives its rows back and stays spilled. */
static kvp_status restore_finish(struct kvp_seq_obj *s, struct kvp_restore *r)
{
	struct kvp_spill *d = s->tenant->pool->spill;
	kvp_status st = kvp_spill_read_wait(d, r->reads, r->n, s->shape.head_dim);
	kvp_spill_lock(d);
	for (size_t i = 0; i < r->n; i++) {
		struct kvp_block *b = r->reads[i].block;
		if (r->reads[i].st != KVP_OK)
			continue;
		kvp_spill_stub_drop(d, b->spilled, NULL);
		b->spilled = NULL;
		s->n_spilled--;
	}
	kvp_spill_unlock(d);
	for (size_t i = 0; i < r->n; i++)
		if (r->reads[i].st != KVP_OK)
			kvp_block_rows_free(s->tenant, r->reads[i].block, NULL);
	free(r);
	return st;
}

void kvp_restore_settle(struct kvp_seq_obj *s)
{
	struct kvp_restore *r = s->restore;
	char why[512];
	if (!r)
		return;
	s->restore = NULL;
	snprintf(why, sizeof why, "%s", kvp_last_error());
	restore_finish(s, r); /* a failed prefetch is reported by the call that needs the block */
	kvp_fail(KVP_OK, "%s", why);
}

/* The layer's spilled blocks in scope, read now. */
static kvp_status restore_now(struct kvp_seq_obj *s, uint32_t layer, enum restore_scope scope,
			      struct kvp_call *call)
{
	struct kvp_restore *r;
	kvp_status st = restore_start(s, layer, scope, &r, call), done = r ? restore_finish(s, r) : KVP_OK;
	return st != KVP_OK ? st : done;
}

kvp_status kvp_restore_layer(struct kvp_seq_obj *s, uint32_t layer, struct kvp_call *call)
{
	struct kvp_restore *ahead;
	kvp_status st = KVP_OK;
	s->pin_from = layer; /* until the call leaves: its restores must not spill what it reads */
	s->pin_to = layer + 1;
	if (s->restore && s->restore->layer == layer) { /* the prefetch: its errors are this call's */
		struct kvp_restore *r = s->restore;
		s->restore = NULL;
		st = restore_finish(s, r);
	} else {
		kvp_restore_settle(s);
	}
	if (st == KVP_OK)
		st = restore_now(s, layer, RESTORE_EVERY, call);
	if (st != KVP_OK)
		return kvp_fail_context(st, "layer %u: its spilled blocks stay on the device", layer);
	/* A failed or partial prefetch costs nothing now: attending that layer reads what is missing. */
	if (layer + 1 < s->shape.n_layers && s->n_spilled) {
		char why[512];
		snprintf(why, sizeof why, "%s", kvp_last_error());
		s->pin_to = layer + 2; /* nor what it reads ahead */
		restore_start(s, layer + 1, RESTORE_EVERY, &ahead, call);
		s->restore = ahead;
		kvp_fail(KVP_OK, "%s", why);
	}
	return KVP_OK;
}

kvp_status kvp_restore_all(struct kvp_seq_obj *s, struct kvp_call *call)
{
	kvp_status st = KVP_OK;
	kvp_restore_settle(s);
	s->pin_from = 0;
	s->pin_to = s->shape.n_layers;
	for (uint32_t l = 0; l < s->shape.n_layers && st == KVP_OK && s->n_spilled; l++)
		st = restore_now(s, l, RESTORE_EVERY, call);
	return st;
}

kvp_status kvp_restore_exact(struct kvp_seq_obj *s, uint32_t layer, struct kvp_call *call)
{
	kvp_status st;
	kvp_restore_settle(s);
	if ((st = restore_now(s, layer, RESTORE_EXACT, call)) != KVP_OK)
		return kvp_fail_context(st, "layer %u: its spilled exact blocks stay on the device", layer);
	return KVP_OK;
}
