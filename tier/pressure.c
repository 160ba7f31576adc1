/*
 * Memory pressure, and the claims that keep it off sequences in use.
 *
 * Every public call on a sequence (pager/calls.c) enters the sequence here: `calls` counts the calls in
 * progress. Memory pressure on a tenant (a charge that would pass
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
#include "tier/tier.h"

#define KVP_SEQ_CLAIMED 0x80000000u

static pthread_mutex_t claim_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t claim_released = PTHREAD_COND_INITIALIZER;

/* Around fork() (pager/handle.c): the lock is held across it, so the child's copy is not one a thread of
 * the parent held; the child, whose waiters stayed behind in the parent, starts the condition anew. */
void kvp_pressure_fork_prepare(void)
{
	pthread_mutex_lock(&claim_lock);
}

void kvp_pressure_fork_parent(void)
{
	pthread_mutex_unlock(&claim_lock);
}

void kvp_pressure_fork_child(void)
{
	pthread_cond_init(&claim_released, NULL);
	pthread_mutex_unlock(&claim_lock);
}

int kvp_seq_enter(struct kvp_seq_obj *s, struct kvp_call *call)
{
	uint32_t c = atomic_load(&s->calls);
	for (;;) {
		if (c & KVP_SEQ_CLAIMED) {
			pthread_mutex_lock(&claim_lock);
			while (atomic_load(&s->calls) & KVP_SEQ_CLAIMED)
				pthread_cond_wait(&claim_released, &claim_lock);
			pthread_mutex_unlock(&claim_lock);
			c = atomic_load(&s->calls);
		} else if (c) {
			return -1;
		} else if (atomic_compare_exchange_weak(&s->calls, &c, 1)) {
			break;
		}
	}
	atomic_store(&s->last_use, atomic_fetch_add(&s->tenant->clock, 1) + 1);
	*call = (struct kvp_call){ .seq = s };
	s->call = call;
	return 0;
}

void kvp_seq_leave(struct kvp_seq_obj *s)
{
	s->pin_from = s->pin_to = 0;
	s->call = NULL;
	atomic_fetch_sub(&s->calls, 1);
}

/* ---- relief ---- */

/* Under t->lock: claims the idle, resident sequence with the oldest last call, or returns NULL. */
static struct kvp_seq_obj *victim_claim(struct kvp_tenant_obj *t)
{
	for (;;) {
		struct kvp_seq_obj *best = NULL;
		uint32_t idle = 0;
		for (struct kvp_seq_obj *s = t->seqs; s; s = s->next)
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

static void victim_release(struct kvp_seq_obj *s)
{
	pthread_mutex_lock(&claim_lock);
	atomic_store(&s->calls, 0);
	pthread_cond_broadcast(&claim_released);
	pthread_mutex_unlock(&claim_lock);
}

/* How many bytes the charge is short of: past the quota or past the pool's limit, whichever is more. */
static uint64_t shortfall(const struct kvp_tenant_obj *t, uint64_t bytes)
{
	uint64_t used = atomic_load(&t->used), pool = atomic_load(&t->pool->used), need = 1;
	if (used + bytes > t->quota)
		need = used + bytes - t->quota;
	if (pool + bytes > t->pool->limit && pool + bytes - t->pool->limit > need)
		need = pool + bytes - t->pool->limit;
	return need;
}

/* Resorts 1 and 2 on a claimed idle sequence: some of its blocks, or when none can go alone, all of it. */
static kvp_status relieve_on(struct kvp_seq_obj *victim, uint64_t need, struct kvp_call *call)
{
	kvp_status st;
	if (kvp_spill_blocks(victim, need, KVP_SPILL_IDLE, call))
		return KVP_OK;
	if ((st = kvp_park_sequence(victim, call)) != KVP_OK)
		return st;
	victim->pressure_parked = 1;
	call->tally.parked++;
	return KVP_OK;
}

/* The failed charge's message `why`, what the last resort tried, and what pressure spilled on the way
 * (on the device, not lost). */
static void relief_failed(const char *why, const char *tried, const struct kvp_pressure_tally *y)
{
	char spilled[320] = "";
	if (y->blocks[KVP_SPILL_IDLE] || y->blocks[KVP_SPILL_OWN_COLD] || y->parked)
		snprintf(spilled, sizeof spilled, "; to make room memory pressure first spilled %u blocks of idle "
			 "sequences and %u of the caller's cold blocks (%llu bytes of records) and parked %u idle "
			 "sequences whole: they are on the spill device and come back when used",
			 y->blocks[KVP_SPILL_IDLE], y->blocks[KVP_SPILL_OWN_COLD], (unsigned long long)y->bytes, y->parked);
	kvp_fail(KVP_ENOMEM, "%s%s%s%s", why, spilled, tried, tried[0] ? ")" : "");
}

int kvp_pressure_relieve(struct kvp_tenant_obj *t, uint64_t bytes, struct kvp_call *call)
{
	struct kvp_call none = { 0 };
	struct kvp_seq_obj *victim, *caller;
	uint64_t need = shortfall(t, bytes);
	char why[256], tried[300] = "";
	kvp_status st;
	int mode;
	if (!t->pool->spill)
		return 0;
	if (!call)
		call = &none; /* a charge outside a call on a sequence: no caller, and a tally of its own */
	caller = call->seq;
	mode = call->no_relief;
	snprintf(why, sizeof why, "%s", kvp_last_error()); /* the charge's message, which the caller reports */
	pthread_mutex_lock(&t->lock);
	victim = victim_claim(t);
	pthread_mutex_unlock(&t->lock);
	if (!victim) { /* the last resort: the caller's own oldest cold blocks */
		if (caller && caller->tenant == t && kvp_spill_blocks(caller, need, KVP_SPILL_OWN_COLD, call))
			return 1;
		relief_failed(why, tried, &call->tally);
		return 0;
	}
	call->no_relief = 1;
	st = relieve_on(victim, need, call);
	call->no_relief = mode;
	victim_release(victim);
	if (st == KVP_OK)
		return 1;
	snprintf(tried, sizeof tried, " (spilling an idle sequence to make room failed: %s", kvp_last_error());
	relief_failed(why, tried, &call->tally);
	return 0;
}
