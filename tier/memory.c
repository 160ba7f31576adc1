/*
 * Tenant memory: charge first, then allocate from the tenant's jemalloc arena.
 *
 * Every byte is charged to its tenant and to the pool before it is allocated, so an allocation that would
 * pass the quota or the pool's limit fails before anything changes. Over a limit, the charge calls the
 * relief hook the pool installed on the tenant (tier/pressure.c's kvp_pressure_relieve when the pool has a
 * spill device): the allocator never calls up into pressure itself, and what relief may do and who is
 * asking comes from the call context the caller hands in (struct kvp_call, tier.h).
 */
#include <jemalloc/jemalloc.h>
#include <stdio.h>

#include "pager/pager.h"

static kvp_status charge_one(_Atomic uint64_t *used, uint64_t limit, uint64_t bytes)
{
	uint64_t cur = atomic_load_explicit(used, memory_order_relaxed);
	do {
		if (cur + bytes > limit || cur + bytes < cur)
			return KVP_ENOMEM;
	} while (!atomic_compare_exchange_weak_explicit(used, &cur, cur + bytes, memory_order_relaxed,
						       memory_order_relaxed));
	return KVP_OK;
}

static kvp_status charge_limits(struct kvp_tenant_obj *t, uint64_t bytes)
{
	if (charge_one(&t->used, t->quota, bytes) != KVP_OK)
		return kvp_fail(KVP_ENOMEM, "tenant '%s': %llu more bytes would pass its quota of %llu (%llu in use)",
				t->name, (unsigned long long)bytes, (unsigned long long)t->quota,
				(unsigned long long)atomic_load(&t->used));
	if (charge_one(&t->pool->used, t->pool->limit, bytes) != KVP_OK) {
		atomic_fetch_sub(&t->used, bytes);
		return kvp_fail(KVP_ENOMEM, "pool: %llu more bytes would pass its limit of %llu (%llu in use)",
				(unsigned long long)bytes, (unsigned long long)t->pool->limit,
				(unsigned long long)atomic_load(&t->pool->used));
	}
	return KVP_OK;
}

/*
 * Prepaid charges. A spill allocates the stubs of its records (a park also its table) before it can free
 * the blocks they replace: charged as usual, they would pass the quota just when it is full, and a
 * quota full to the byte could not be relieved at all. Instead, between kvp_prepay_begin and
 * kvp_prepay_end, the call's charges to the tenant are paid from the memory the spill is about to free,
 * up to `cap` bytes: they leave the counters as they are, and the spill's frees that follow (of those
 * blocks, or of the metadata itself when the spill fails) settle them before they lower the counters.
 * Charges past the cap are ordinary, checked ones (a park of blocks a running fork shares frees little).
 * So the counters never rise above what the limits allow, and no byte is charged twice.
 */
void kvp_prepay_begin(struct kvp_call *call, const struct kvp_tenant_obj *t, uint64_t cap)
{
	call->prepaid = (struct kvp_prepaid){ .t = t, .cap = cap };
}

void kvp_prepay_end(struct kvp_call *call, struct kvp_tenant_obj *t)
{
	uint64_t held = call->prepaid.held;
	call->prepaid = (struct kvp_prepaid){ 0 };
	/* Only a spill that freed less than it said it would leaves some: the charge becomes an ordinary one,
	 * so the counters stay true. The callers' caps count only blocks whose last reference they drop. */
	if (held) {
		atomic_fetch_add(&t->used, held);
		atomic_fetch_add(&t->pool->used, held);
	}
}

kvp_status kvp_charge(struct kvp_tenant_obj *t, uint64_t bytes, struct kvp_call *call)
{
	kvp_status st;
	if (call && call->prepaid.t == t && bytes <= call->prepaid.cap - call->prepaid.held) {
		call->prepaid.held += bytes;
		return KVP_OK;
	}
	/* Over a limit, relief (spilling this tenant's idle sequences) comes before failing. */
	while ((st = charge_limits(t, bytes)) == KVP_ENOMEM && t->relieve && !(call && call->no_relief) &&
	       t->relieve(t, bytes, call))
		;
	return st;
}

void kvp_uncharge(struct kvp_tenant_obj *t, uint64_t bytes, struct kvp_call *call)
{
	if (call && call->prepaid.t == t) {
		uint64_t settle = bytes < call->prepaid.held ? bytes : call->prepaid.held;
		call->prepaid.held -= settle;
		bytes -= settle;
	}
	atomic_fetch_sub(&t->used, bytes);
	atomic_fetch_sub(&t->pool->used, bytes);
}

size_t kvp_alloc_size(const struct kvp_tenant_obj *t, size_t bytes)
{
	return kvp_je_nallocx(bytes, t->flags);
}

/* An allocation counts under its kind whole: jemalloc's size-class slack is the storage's own. */
static void count(struct kvp_tenant_obj *t, size_t real, enum kvp_bytes_kind kind, int sign)
{
	if (sign > 0)
		atomic_fetch_add(&t->bytes[kind], real);
	else
		atomic_fetch_sub(&t->bytes[kind], real);
}

void *kvp_alloc(struct kvp_tenant_obj *t, size_t bytes, enum kvp_bytes_kind kind, struct kvp_call *call)
{
	size_t real = kvp_alloc_size(t, bytes);
	void *p;
	if (real == 0) {
		kvp_fail(KVP_ENOMEM, "tenant '%s': %zu bytes is too large an allocation", t->name, bytes);
		return NULL;
	}
	if (kvp_charge(t, real, call) != KVP_OK)
		return NULL;
	p = kvp_je_mallocx(bytes, t->flags);
	if (!p) {
		kvp_uncharge(t, real, call);
		kvp_fail(KVP_ENOMEM, "tenant '%s': the system is out of memory (%zu bytes)", t->name, bytes);
		return NULL;
	}
	count(t, real, kind, +1);
	return p;
}

void kvp_free_during(struct kvp_tenant_obj *t, void *p, size_t bytes, enum kvp_bytes_kind kind,
		     struct kvp_call *call)
{
	size_t real;
	if (!p)
		return;
	real = kvp_alloc_size(t, bytes);
	kvp_je_dallocx(p, t->flags);
	count(t, real, kind, -1);
	kvp_uncharge(t, real, call);
}

void kvp_free(struct kvp_tenant_obj *t, void *p, size_t bytes, enum kvp_bytes_kind kind)
{
	kvp_free_during(t, p, bytes, kind, NULL);
}
