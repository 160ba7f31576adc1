/*
 * Tenant memory: jemalloc arenas, NUMA placement, and the allocator a sequence hands its policy and
 * codecs. The charge-before-allocate accounting is the tier's (tier/memory.c).
 *
 * jemalloc is a private copy linked into the library (tools/jemalloc.sh builds it), not the system's
 * libjemalloc.so.2: that one uses initial-exec TLS (2.6 KiB), more than glibc keeps spare for libraries
 * opened after start-up, so a host that had not started with it could not open a pool. The copy is built
 * with global-dynamic TLS, and with the kvp_je_ prefix and no exports: it never replaces the host's
 * malloc, and the host's allocator (glibc's, or its own jemalloc) never sees a block pointer. Block memory
 * goes through kvp_je_* only; everything else the library allocates uses the host's malloc.
 */
#include <jemalloc/jemalloc.h>
#include <numa.h>
#include <numaif.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pager.h"

/*
 * NUMA placement: an arena whose extents are bound to one node. Every hook forwards to jemalloc's
 * defaults; alloc additionally binds the fresh range, before first touch, to the node.
 */
struct numa_hooks {
	extent_hooks_t hooks; /* first: jemalloc passes this pointer back to us */
	extent_hooks_t *base;
	int node;
};

static void *node_alloc(extent_hooks_t *h, void *addr, size_t size, size_t align, bool *zero, bool *commit,
			unsigned arena)
{
	struct numa_hooks *nh = (struct numa_hooks *)h;
	void *p = nh->base->alloc(nh->base, addr, size, align, zero, commit, arena);
	if (p) {
		unsigned long mask[(sizeof(unsigned long) * 8 > 1024) ? 1 : 1024 / (sizeof(unsigned long) * 8)];
		memset(mask, 0, sizeof mask);
		mask[nh->node / (int)(sizeof(unsigned long) * 8)] |= 1ul << (nh->node % (int)(sizeof(unsigned long) * 8));
		/* Preferred, not bound: a full node should slow us down, not fail the allocation. */
		mbind(p, size, MPOL_PREFERRED, mask, sizeof mask * 8, 0);
	}
	return p;
}

#define FORWARD(ret, name, params, args) \
	static ret node_##name params { struct numa_hooks *nh = (struct numa_hooks *)h; return nh->base->name args; }
FORWARD(bool, dalloc, (extent_hooks_t *h, void *a, size_t s, bool c, unsigned i), (nh->base, a, s, c, i))
FORWARD(bool, commit, (extent_hooks_t *h, void *a, size_t s, size_t o, size_t l, unsigned i),
	(nh->base, a, s, o, l, i))
FORWARD(bool, decommit, (extent_hooks_t *h, void *a, size_t s, size_t o, size_t l, unsigned i),
	(nh->base, a, s, o, l, i))
FORWARD(bool, split, (extent_hooks_t *h, void *a, size_t s, size_t sa, size_t sb, bool c, unsigned i),
	(nh->base, a, s, sa, sb, c, i))
FORWARD(bool, merge, (extent_hooks_t *h, void *a, size_t sa, void *b, size_t sb, bool c, unsigned i),
	(nh->base, a, sa, b, sb, c, i))
#undef FORWARD

static void node_destroy(extent_hooks_t *h, void *a, size_t s, bool c, unsigned i)
{
	struct numa_hooks *nh = (struct numa_hooks *)h;
	nh->base->destroy(nh->base, a, s, c, i);
}

static bool node_purge_lazy(extent_hooks_t *h, void *a, size_t s, size_t o, size_t l, unsigned i)
{
	struct numa_hooks *nh = (struct numa_hooks *)h;
	return nh->base->purge_lazy ? nh->base->purge_lazy(nh->base, a, s, o, l, i) : true;
}

static bool node_purge_forced(extent_hooks_t *h, void *a, size_t s, size_t o, size_t l, unsigned i)
{
	struct numa_hooks *nh = (struct numa_hooks *)h;
	return nh->base->purge_forced ? nh->base->purge_forced(nh->base, a, s, o, l, i) : true;
}

/* One set of hooks per node, made on first use and kept for the process: arenas outlive nothing here,
 * but jemalloc may call hooks of a destroyed arena's retained extents, so the table must not go away. */
static struct numa_hooks numa_table[64];
static pthread_mutex_t numa_lock = PTHREAD_MUTEX_INITIALIZER;

/* jemalloc starts on its first call, and registers its own fork handlers then (handle.c's must come after). */
void kvp_arena_start(void)
{
	const char *version;
	size_t sz = sizeof version;
	kvp_je_mallctl("version", &version, &sz, NULL, 0);
}

/* Held across fork() (handle.c), so neither process gets a copy a vanished thread held. */
void kvp_arena_fork_lock(void)
{
	pthread_mutex_lock(&numa_lock);
}

void kvp_arena_fork_unlock(void)
{
	pthread_mutex_unlock(&numa_lock);
}

static kvp_status numa_hooks_for(int node, extent_hooks_t **out)
{
	kvp_status st = KVP_OK;
	if (node < 0 || node >= (int)(sizeof numa_table / sizeof numa_table[0]))
		return kvp_fail(KVP_EINVAL, "numa=%d: node out of range", node);
	pthread_mutex_lock(&numa_lock);
	struct numa_hooks *nh = &numa_table[node];
	if (!nh->base) {
		extent_hooks_t *base;
		size_t sz = sizeof base;
		if (kvp_je_mallctl("arena.0.extent_hooks", &base, &sz, NULL, 0) != 0) {
			st = kvp_fail(KVP_EUNSUPPORTED, "jemalloc refused to report its extent hooks");
		} else {
			nh->hooks = (extent_hooks_t){
				.alloc = node_alloc,
				.dalloc = node_dalloc,
				.destroy = node_destroy,
				.commit = node_commit,
				.decommit = node_decommit,
				.purge_lazy = node_purge_lazy,
				.purge_forced = node_purge_forced,
				.split = node_split,
				.merge = node_merge,
			};
			nh->node = node;
			nh->base = base;
		}
	}
	pthread_mutex_unlock(&numa_lock);
	*out = &nh->hooks;
	return st;
}

kvp_status kvp_arena_create(const struct kvp_pool_obj *pool, unsigned *arena)
{
	extent_hooks_t *hooks = NULL;
	size_t sz = sizeof *arena;
	if (pool->numa_node >= 0) {
		kvp_status st = numa_hooks_for(pool->numa_node, &hooks);
		if (st != KVP_OK)
			return st;
	}
	if (kvp_je_mallctl("arenas.create", arena, &sz, hooks ? &hooks : NULL, hooks ? sizeof hooks : 0))
		return kvp_fail(KVP_ENOMEM, "jemalloc could not create an arena");
	return KVP_OK;
}

int kvp_arena_flags(unsigned arena)
{
	/* No thread cache: a freed block goes straight back to its own tenant's arena. */
	return MALLOCX_ARENA(arena) | MALLOCX_TCACHE_NONE;
}

void kvp_arena_destroy(unsigned arena)
{
	char name[64];
	snprintf(name, sizeof name, "arena.%u.destroy", arena);
	kvp_je_mallctl(name, NULL, NULL, NULL, 0);
}

kvp_status kvp_numa_check(int node)
{
	if (numa_available() < 0)
		return KVP_EUNSUPPORTED;
	if (node > numa_max_node())
		return kvp_fail(KVP_EINVAL, "pool: numa=%d: this machine's highest node is %d", node, numa_max_node());
	return KVP_OK;
}

/* Memory a sequence's policy and codecs keep: charged and allocated like the pager's own metadata (a
 * charge over the quota may relieve pressure first, as every other charge does), and counted in the
 * sequence's state_bytes so its stats show it. Calls on one sequence are serialized, stats included. */
static void *state_alloc(void *ctx, size_t bytes)
{
	struct kvp_seq_obj *s = ctx;
	void *p = kvp_alloc(s->tenant, bytes, KVP_BYTES_META, s->call);

	if (p)
		s->state_bytes += kvp_alloc_size(s->tenant, bytes);
	return p;
}

static void state_free(void *ctx, void *p, size_t bytes)
{
	struct kvp_seq_obj *s = ctx;

	kvp_free(s->tenant, p, bytes, KVP_BYTES_META);
	s->state_bytes -= kvp_alloc_size(s->tenant, bytes);
}

struct kvp_allocator kvp_seq_allocator(struct kvp_seq_obj *s)
{
	return (struct kvp_allocator){ .alloc = state_alloc, .free = state_free, .ctx = s };
}

/* Memory a tenant keeps for all its sequences (its policy's statistics file, read once): charged to the
 * tenant as metadata, so it shows in kvp_tenant_stats and counts against the quota. It is taken at
 * kvp_tenant_open, when the tenant has no sequence to relieve, so a charge over the quota just fails. */
static void *tenant_alloc(void *ctx, size_t bytes)
{
	struct kvp_call call = { .no_relief = 1 };

	return kvp_alloc(ctx, bytes, KVP_BYTES_META, &call);
}

static void tenant_free(void *ctx, void *p, size_t bytes)
{
	kvp_free(ctx, p, bytes, KVP_BYTES_META);
}

struct kvp_allocator kvp_tenant_allocator(struct kvp_tenant_obj *t)
{
	return (struct kvp_allocator){ .alloc = tenant_alloc, .free = tenant_free, .ctx = t };
}
