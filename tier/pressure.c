/*
 * Calls on a sequence, and memory pressure.
 *
 * Every public call on a sequence starts here: its handle is looked up (handle.c), then the sequence is
 * entered: `calls` counts the calls in progress. Memory pressure on a tenant (a charge that would pass
 * its quota or the pool's limit) relieves itself on the tenant's least recently used sequence that no
 * call is in: it claims it by swapping `calls` from 0 to KVP_SEQ_CLAIMED, so the owner's next call waits
 * until the pressure is done with it. Only the same tenant's sequences are ever touched for a tenant's
 * pressure, so one tenant never pays for another.
 *
 * What goes, in order, one relief at a time until the charge fits:
 *   1. blocks of the idle sequence with the oldest last call, its oldest block positions first (block 0
 *      of every stream, then block 1, ...), only as many as the charge is short of (restore.c). The
 *      sequence stays resident: its next call reads back what it needs, attend with prefetch of the
 *      next layer. LRU by sequence first because a conversation nobody called for longest is the least
 *      likely to be called next; by block position within it because its oldest tokens are the ones
 *      its attention weighs least with every policy that keeps recent tokens exact.
 *   2. when that sequence has no block left that can be spilled alone (sinks, tails, blocks shared with
 *      a fork), the sequence is parked whole and marked pressure_parked; its next call that needs its
 *      tokens unparks it. Then the next oldest idle sequence.
 *   3. when no idle sequence is left, the caller's own oldest cold blocks outside the layers it is using.
 * Only then does the charge fail with KVP_ENOMEM, naming what was spilled on the way: those blocks are
 * on the device, not lost, and come back when used. Sequences in a call on another thread are never
 * touched: their blocks are in use.
 */
#include <stdio.h>
#include <stdlib.h>

#include "pager/pager.h"

#define KVP_SEQ_CLAIMED 0x80000000u

static pthread_mutex_t claim_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t claim_released = PTHREAD_COND_INITIALIZER;

static void enter_wait(struct kvp_seq *s)
{
	uint32_t c = atomic_load(&s->calls);
	for (;;) {
		if (c & KVP_SEQ_CLAIMED) {
			pthread_mutex_lock(&claim_lock);
			while (atomic_load(&s->calls) & KVP_SEQ_CLAIMED)
				pthread_cond_wait(&claim_released, &claim_lock);
			pthread_mutex_unlock(&claim_lock);
			c = atomic_load(&s->calls);
		} else if (atomic_compare_exchange_weak(&s->calls, &c, c + 1)) {
			break;
		}
	}
	atomic_store(&s->last_use, atomic_fetch_add(&s->tenant->clock, 1) + 1);
}

_Thread_local struct kvp_seq *kvp_calling_seq;

_Thread_local struct kvp_pressure_tally kvp_pressure_tally;

static void leave(struct kvp_seq *s)
{
	s->pin_from = s->pin_to = 0;
	kvp_calling_seq = NULL;
	kvp_pressure_tally = (struct kvp_pressure_tally){ 0 };
	atomic_fetch_sub(&s->calls, 1);
}

/* Enters the sequence handle h names; a call that needs the tokens gets a pressure-parked sequence
 * back, and a host-parked one refused. On failure nothing is entered. */
static kvp_status enter(const kvp_seq *h, const char *call, int needs_tokens, struct kvp_seq **out)
{
	struct kvp_seq *s;
	kvp_status st;
	if ((st = kvp_seq_handle_get(h, call, &s)) != KVP_OK)
		return st;
	*out = s;
	enter_wait(s);
	kvp_calling_seq = s;
	kvp_pressure_tally = (struct kvp_pressure_tally){ 0 };
	if (!needs_tokens || !s->parked)
		return KVP_OK;
	if (!s->pressure_parked)
		st = kvp_seq_parked_error(s, call);
	else if ((st = kvp_unpark_sequence(s)) != KVP_OK)
		st = kvp_fail_context(st, "%s: bringing back the sequence memory pressure parked", call);
	if (st != KVP_OK)
		leave(s);
	return st;
}

/* ---- relief ---- */

/* Under t->lock: claims the idle, resident sequence with the oldest last call, or returns NULL. */
static struct kvp_seq *victim_claim(struct kvp_tenant *t)
{
	for (;;) {
		struct kvp_seq *best = NULL;
		uint32_t idle = 0;
		for (struct kvp_seq *s = t->seqs; s; s = s->next)
			if (!atomic_load(&s->parked_flag) && atomic_load(&s->calls) == 0 &&
			    (!best || atomic_load(&s->last_use) < atomic_load(&best->last_use)))
				best = s;
		if (!best)
			return NULL;
		if (atomic_compare_exchange_strong(&best->calls, &idle, KVP_SEQ_CLAIMED))
			return best;
		/* its owner called it meanwhile: look again */
	}
}

static void victim_release(struct kvp_seq *s)
{
	pthread_mutex_lock(&claim_lock);
	atomic_store(&s->calls, 0);
	pthread_cond_broadcast(&claim_released);
	pthread_mutex_unlock(&claim_lock);
}

/* How many bytes the charge is short of: past the quota or past the pool's limit, whichever is more. */
static uint64_t shortfall(const struct kvp_tenant *t, uint64_t bytes)
{
	uint64_t used = atomic_load(&t->used), pool = atomic_load(&t->pool->used), need = 1;
	if (used + bytes > t->quota)
		need = used + bytes - t->quota;
	if (pool + bytes > t->pool->limit && pool + bytes - t->pool->limit > need)
		need = pool + bytes - t->pool->limit;
	return need;
}

/* Resorts 1 and 2 on a claimed idle sequence: some of its blocks, or when none can go alone, all of it. */
static kvp_status relieve_on(struct kvp_seq *victim, uint64_t need)
{
	kvp_status st;
	if (kvp_spill_blocks(victim, need, KVP_SPILL_IDLE))
		return KVP_OK;
	if ((st = kvp_park_sequence(victim)) != KVP_OK)
		return st;
	victim->pressure_parked = 1;
	kvp_pressure_tally.parked++;
	return KVP_OK;
}

/* The failed charge's message `why`, what the last resort tried, and what pressure spilled on the way
 * (on the device, not lost). */
static void relief_failed(const char *why, const char *tried)
{
	const struct kvp_pressure_tally *y = &kvp_pressure_tally;
	char spilled[320] = "";
	if (y->blocks[KVP_SPILL_IDLE] || y->blocks[KVP_SPILL_OWN_COLD] || y->parked)
		snprintf(spilled, sizeof spilled, "; to make room memory pressure first spilled %u blocks of idle "
			 "sequences and %u of the caller's cold blocks (%llu bytes of records) and parked %u idle "
			 "sequences whole: they are on the spill device and come back when used",
			 y->blocks[KVP_SPILL_IDLE], y->blocks[KVP_SPILL_OWN_COLD], (unsigned long long)y->bytes, y->parked);
	kvp_fail(KVP_ENOMEM, "%s%s%s%s", why, spilled, tried, tried[0] ? ")" : "");
}

int kvp_pressure_relieve(struct kvp_tenant *t, uint64_t bytes)
{
	struct kvp_seq *victim, *caller = kvp_calling_seq;
	uint64_t need = shortfall(t, bytes);
	unsigned mode = kvp_charge_mode;
	char why[256], tried[300] = "";
	kvp_status st;
	if (!t->pool->spill)
		return 0;
	snprintf(why, sizeof why, "%s", kvp_last_error()); /* the charge's message, which the caller reports */
	pthread_mutex_lock(&t->lock);
	victim = victim_claim(t);
	pthread_mutex_unlock(&t->lock);
	if (!victim) { /* the last resort: the caller's own oldest cold blocks */
		if (caller && caller->tenant == t && kvp_spill_blocks(caller, need, KVP_SPILL_OWN_COLD))
			return 1;
		relief_failed(why, tried);
		return 0;
	}
	kvp_charge_mode |= KVP_CHARGE_NO_RELIEF;
	st = relieve_on(victim, need);
	kvp_charge_mode = mode;
	victim_release(victim);
	if (st == KVP_OK)
		return 1;
	snprintf(tried, sizeof tried, " (spilling an idle sequence to make room failed: %s", kvp_last_error());
	relief_failed(why, tried);
	return 0;
}

/* ---- the public calls on a sequence ---- */

kvp_status kvp_append(kvp_seq *h, uint32_t layer, uint32_t n, const int32_t *pos, const float *k,
		      const float *v)
{
	struct kvp_seq *s;
	kvp_status st = enter(h, "kvp_append", 1, &s);
	if (st == KVP_OK) {
		kvp_restore_settle(s); /* appends never read cold rows; reads in flight are only waited for */
		/* but the exact blocks they encode into cold ones may have been spilled while it was idle */
		if (s->n_spilled && s->cold.k && layer < s->shape.n_layers && (st = kvp_restore_exact(s, layer)) != KVP_OK)
			st = kvp_fail_context(st, "kvp_append: %u tokens to layer %u not appended", n, layer);
		else
			st = kvp_append_resident(s, layer, n, pos, k, v);
		leave(s);
	}
	return st;
}

kvp_status kvp_attend(kvp_seq *h, uint32_t layer, const float *q, float *out)
{
	struct kvp_seq *s;
	kvp_status st = enter(h, "kvp_attend", 1, &s);
	if (st == KVP_OK) {
		s->pin_from = layer; /* what attend's own allocations may spill: not the layer it reads */
		s->pin_to = layer + 1;
		st = kvp_attend_resident(s, layer, q, out);
		leave(s);
	}
	return st;
}

kvp_status kvp_gather(kvp_seq *h, uint32_t layer, uint32_t kv_head, uint32_t cap, int32_t *pos, float *k,
		      float *v, uint32_t *n_out)
{
	struct kvp_seq *s;
	kvp_status st = enter(h, "kvp_gather", 1, &s);
	if (st == KVP_OK) {
		if (s->n_spilled && layer < s->shape.n_layers)
			st = kvp_restore_layer(s, layer);
		if (st == KVP_OK)
			st = kvp_gather_resident(s, layer, kv_head, cap, pos, k, v, n_out);
		else
			st = kvp_fail_context(st, "kvp_gather");
		leave(s);
	}
	return st;
}

kvp_status kvp_seq_fork(kvp_seq *h, kvp_seq **out)
{
	struct kvp_seq *s;
	kvp_status st = enter(h, "kvp_seq_fork", 1, &s);
	if (st == KVP_OK) {
		/* a fork shares blocks, and spilled blocks are private: all of them come back first */
		if ((st = kvp_restore_all(s)) != KVP_OK)
			st = kvp_fail_context(st, "kvp_seq_fork: nothing was forked");
		else
			st = kvp_seq_fork_resident(s, out);
		leave(s);
	}
	return st;
}

kvp_status kvp_seq_stats(const kvp_seq *h, kvp_stats *out)
{
	struct kvp_seq *s;
	kvp_status st = enter(h, "kvp_seq_stats", 0, &s);
	if (st == KVP_OK) {
		kvp_restore_settle(s);
		st = kvp_seq_stats_entered(s, out);
		leave(s);
	}
	return st;
}

kvp_status kvp_seq_step(kvp_seq *h)
{
	struct kvp_seq *s;
	kvp_status st = enter(h, "kvp_seq_step", 0, &s);
	if (st == KVP_OK) {
		kvp_restore_settle(s);
		/* Rounds read every layer's blocks: the step's own allocations must not spill them (its last
		 * resort, the caller's cold blocks, fails instead, and the round with it, whole). */
		s->pin_from = 0;
		s->pin_to = s->shape.n_layers;
		/* a policy's round moves the bytes of the cold blocks it compacts; a parked sequence's rounds
		 * wait until it is back (kvp_evict_step) */
		if (s->policy && s->n_spilled && (st = kvp_restore_all(s)) != KVP_OK)
			st = kvp_fail_context(st, "kvp_seq_step: no round ran");
		else
			st = kvp_seq_step_entered(s);
		leave(s);
	}
	return st;
}

void kvp_seq_close(kvp_seq *h)
{
	struct kvp_seq *s;
	if (enter(h, "kvp_seq_close", 0, &s) == KVP_OK) {
		kvp_calling_seq = NULL;
		kvp_seq_close_entered(s); /* the count goes with the sequence; it waits for reads in flight */
	}
}

kvp_status kvp_seq_park(kvp_seq *h)
{
	struct kvp_seq *s;
	kvp_status st = enter(h, "kvp_seq_park", 0, &s);
	if (st != KVP_OK)
		return st;
	kvp_restore_settle(s);
	if (s->parked)
		s->pressure_parked = 0; /* the host's now: it stays parked until the host unparks it */
	else
		st = kvp_park_sequence(s);
	leave(s);
	return st;
}

kvp_status kvp_seq_unpark(kvp_seq *h)
{
	struct kvp_seq *s;
	kvp_status st = enter(h, "kvp_seq_unpark", 0, &s);
	if (st == KVP_OK) {
		kvp_restore_settle(s);
		st = kvp_unpark_sequence(s);
		leave(s);
	}
	return st;
}

kvp_status kvp_seq_head_level(kvp_seq *h, uint32_t layer, uint32_t kv_head, kvp_head_level *out)
{
	struct kvp_seq *s;
	kvp_status st = enter(h, "kvp_seq_head_level", 0, &s);
	if (st == KVP_OK) {
		st = kvp_seq_head_level_entered(s, layer, kv_head, out);
		leave(s);
	}
	return st;
}

kvp_status kvp_seq_set_head_level(kvp_seq *h, uint32_t layer, uint32_t kv_head, float aggressiveness)
{
	struct kvp_seq *s;
	kvp_status st = enter(h, "kvp_seq_set_head_level", 0, &s);
	if (st == KVP_OK) {
		st = kvp_seq_set_head_level_entered(s, layer, kv_head, aggressiveness);
		leave(s);
	}
	return st;
}
