/*
 * The public calls on a sequence, in one place.
 *
 * Each looks its handle up (handle.c), enters the sequence (tier/pressure.c: waiting while memory pressure
 * holds it), brings back what the call reads from the spill device (tier/restore.c, tier/park.c), runs the
 * pager's own work (append.c, attend.c, seq.c, evict.c, gate.c) and leaves. The call's context (struct
 * kvp_call: who is calling, what its allocations may do, what pressure spilled on its behalf) lives on
 * this stack frame; the tier functions get it as a parameter, and the allocations below the call find it
 * in the entered sequence (its `call` field) until the call leaves.
 */
#include "pager.h"

/* Enters the sequence handle h names; a call that needs the tokens gets a pressure-parked sequence
 * back, and a host-parked one refused, and a call while another is in the sequence KVP_EBUSY. On failure
 * nothing is entered. */
static kvp_status enter(const kvp_seq *h, const char *name, int needs_tokens, struct kvp_call *call,
			struct kvp_seq_obj **out)
{
	struct kvp_seq_obj *s;
	kvp_status st;
	if ((st = kvp_seq_handle_get(h, name, &s)) != KVP_OK)
		return st;
	*out = s;
	if (kvp_seq_enter(s, call))
		return kvp_fail(KVP_EBUSY, "%s: another call on this sequence is in progress (calls on one sequence must "
				"not overlap; this one did nothing)", name);
	if (!needs_tokens || !s->parked)
		return KVP_OK;
	if (!s->pressure_parked)
		st = kvp_seq_parked_error(s, name);
	else if ((st = kvp_unpark_sequence(s, call)) != KVP_OK)
		st = kvp_fail_context(st, "%s: bringing back the sequence memory pressure parked", name);
	if (st != KVP_OK)
		kvp_seq_leave(s);
	return st;
}

/* ---- the public calls on a sequence ---- */

kvp_status kvp_seq_open(kvp_tenant *h, const kvp_shape *shape, kvp_seq **out)
{
	struct kvp_seq_obj *s;
	void *t;
	kvp_status st;
	if (out)
		*out = NULL;
	if ((st = kvp_handle_get(KVP_HANDLE_TENANT, h, "kvp_seq_open", &t)) != KVP_OK)
		return st;
	if (!out)
		return kvp_fail(KVP_EINVAL, "kvp_seq_open: out is NULL");
	if ((st = kvp_seq_create(t, shape, &s)) == KVP_OK)
		*out = s->handle;
	return st;
}

kvp_status kvp_seq_open_prefix(kvp_tenant *h, const kvp_shape *shape, uint32_t n, const int32_t *tokens,
			       kvp_seq **out, uint32_t *n_cached)
{
	struct kvp_seq_obj *s;
	void *t;
	kvp_status st;
	if (out)
		*out = NULL;
	if (n_cached)
		*n_cached = 0;
	if ((st = kvp_handle_get(KVP_HANDLE_TENANT, h, "kvp_seq_open_prefix", &t)) != KVP_OK)
		return st;
	if ((st = kvp_prefix_open_check(n, tokens, out, n_cached)) != KVP_OK)
		return st;
	if (!((struct kvp_tenant_obj *)t)->cfg.prefix)
		st = kvp_seq_create(t, shape, &s);
	else if ((st = kvp_seq_create_unlinked(t, shape, &s)) == KVP_OK) {
		if ((st = kvp_prefix_seq_fill(t, s, n, tokens, n_cached)) != KVP_OK) {
			kvp_seq_destroy(s);
			return kvp_fail_context(st, "kvp_seq_open_prefix: no sequence was opened");
		}
		kvp_seq_link(t, s);
	}
	if (st == KVP_OK)
		*out = s->handle;
	return st;
}

kvp_status kvp_append(kvp_seq *h, uint32_t layer, uint32_t n, const int32_t *pos, const float *k,
		      const float *v)
{
	struct kvp_call call;
	struct kvp_seq_obj *s;
	kvp_status st = enter(h, "kvp_append", 1, &call, &s);
	if (st == KVP_OK) {
		kvp_restore_settle(s); /* appends never read cold rows; reads in flight are only waited for */
		/* but the exact blocks they encode into cold ones may have been spilled while it was idle */
		if (s->n_spilled && s->cold.k && layer < s->shape.n_layers &&
		    (st = kvp_restore_exact(s, layer, &call)) != KVP_OK)
			st = kvp_fail_context(st, "kvp_append: %u tokens to layer %u not appended", n, layer);
		else
			st = kvp_append_resident(s, layer, n, pos, k, v);
		kvp_seq_leave(s);
	}
	return st;
}

kvp_status kvp_attend(kvp_seq *h, uint32_t layer, const float *q, float *out)
{
	struct kvp_call call;
	struct kvp_seq_obj *s;
	kvp_status st = enter(h, "kvp_attend", 1, &call, &s);
	if (st == KVP_OK) {
		s->pin_from = layer; /* what attend's own allocations may spill: not the layer it reads */
		s->pin_to = layer + 1;
		st = kvp_attend_resident(s, layer, q, out);
		kvp_seq_leave(s);
	}
	return st;
}

kvp_status kvp_gather(kvp_seq *h, uint32_t layer, uint32_t kv_head, uint32_t cap, int32_t *pos, float *k,
		      float *v, uint32_t *n_out)
{
	struct kvp_call call;
	struct kvp_seq_obj *s;
	kvp_status st = enter(h, "kvp_gather", 1, &call, &s);
	if (st == KVP_OK) {
		if (s->n_spilled && layer < s->shape.n_layers)
			st = kvp_restore_layer(s, layer, &call);
		if (st == KVP_OK)
			st = kvp_gather_resident(s, layer, kv_head, cap, pos, k, v, n_out);
		else
			st = kvp_fail_context(st, "kvp_gather");
		kvp_seq_leave(s);
	}
	return st;
}

kvp_status kvp_seq_fork(kvp_seq *h, kvp_seq **out)
{
	struct kvp_call call;
	struct kvp_seq_obj *s;
	kvp_status st = enter(h, "kvp_seq_fork", 1, &call, &s);
	if (st == KVP_OK) {
		/* a fork shares blocks, and spilled blocks are private: all of them come back first */
		if ((st = kvp_restore_all(s, &call)) != KVP_OK)
			st = kvp_fail_context(st, "kvp_seq_fork: nothing was forked");
		else
			st = kvp_seq_fork_resident(s, out);
		kvp_seq_leave(s);
	}
	return st;
}

kvp_status kvp_seq_stats(const kvp_seq *h, kvp_stats *out)
{
	struct kvp_call call;
	struct kvp_seq_obj *s;
	kvp_status st = enter(h, "kvp_seq_stats", 0, &call, &s);
	if (st == KVP_OK) {
		kvp_restore_settle(s);
		st = kvp_seq_stats_entered(s, out);
		kvp_seq_leave(s);
	}
	return st;
}

kvp_status kvp_seq_step(kvp_seq *h)
{
	struct kvp_call call;
	struct kvp_seq_obj *s;
	kvp_status st = enter(h, "kvp_seq_step", 0, &call, &s);
	if (st == KVP_OK) {
		kvp_restore_settle(s);
		/* Rounds read every layer's blocks: the step's own allocations must not spill them (its last
		 * resort, the caller's cold blocks, fails instead, and the round with it, whole). */
		s->pin_from = 0;
		s->pin_to = s->shape.n_layers;
		/* a policy's round moves the bytes of the cold blocks it compacts; a parked sequence's rounds
		 * wait until it is back (kvp_evict_step) */
		if (s->policy && s->n_spilled && (st = kvp_restore_all(s, &call)) != KVP_OK)
			st = kvp_fail_context(st, "kvp_seq_step: no round ran");
		else
			st = kvp_seq_step_entered(s);
		kvp_seq_leave(s);
	}
	return st;
}

/* A close while another call is in the sequence leaves it open (KVP_EBUSY in kvp_last_error). */
void kvp_seq_close(kvp_seq *h)
{
	struct kvp_call call;
	struct kvp_seq_obj *s;
	kvp_status st = enter(h, "kvp_seq_close", 0, &call, &s);
	if (st == KVP_OK) {
		s->call = NULL;
		kvp_seq_close_entered(s); /* the count goes with the sequence; it waits for reads in flight */
	} else if (st != KVP_EBUSY) {
		kvp_handle_retire_inherited(KVP_HANDLE_SEQ, h); /* a fork's child: the parent's sequence stays */
	}
}

kvp_status kvp_seq_park(kvp_seq *h)
{
	struct kvp_call call;
	struct kvp_seq_obj *s;
	kvp_status st = enter(h, "kvp_seq_park", 0, &call, &s);
	if (st != KVP_OK)
		return st;
	kvp_restore_settle(s);
	if (s->parked)
		s->pressure_parked = 0; /* the host's now: it stays parked until the host unparks it */
	else
		st = kvp_park_sequence(s, &call);
	kvp_seq_leave(s);
	return st;
}

kvp_status kvp_seq_unpark(kvp_seq *h)
{
	struct kvp_call call;
	struct kvp_seq_obj *s;
	kvp_status st = enter(h, "kvp_seq_unpark", 0, &call, &s);
	if (st == KVP_OK) {
		kvp_restore_settle(s);
		st = kvp_unpark_sequence(s, &call);
		kvp_seq_leave(s);
	}
	return st;
}

kvp_status kvp_seq_head_level(kvp_seq *h, uint32_t layer, uint32_t kv_head, kvp_head_level *out)
{
	struct kvp_call call;
	struct kvp_seq_obj *s;
	kvp_status st = enter(h, "kvp_seq_head_level", 0, &call, &s);
	if (st == KVP_OK) {
		st = kvp_seq_head_level_entered(s, layer, kv_head, out);
		kvp_seq_leave(s);
	}
	return st;
}

kvp_status kvp_seq_set_head_level(kvp_seq *h, uint32_t layer, uint32_t kv_head, float aggressiveness)
{
	struct kvp_call call;
	struct kvp_seq_obj *s;
	kvp_status st = enter(h, "kvp_seq_set_head_level", 0, &call, &s);
	if (st == KVP_OK) {
		st = kvp_seq_set_head_level_entered(s, layer, kv_head, aggressiveness);
		kvp_seq_leave(s);
	}
	return st;
}
