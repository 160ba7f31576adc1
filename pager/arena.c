/*
 * Tenant memory: jemalloc arenas, NUMA placement, and the allocator a sequence hands its policy and
 * codecs. The charge-before-allocate accounting is the tier's (tier/memory.c).
 *
 * Why jemalloc is loaded with dlopen instead of linked: libjemalloc.so.2 uses initial-exec TLS (2.6 KiB),
 * more than glibc keeps spare for libraries opened after start-up. A libkvpager.so that named it as
 * DT_NEEDED could not itself be dlopen'ed by a host that did not already have jemalloc, and the host
 * would see only "cannot allocate memory in static TLS block". Loading it here lets codecs and policies
 * work in any host, and lets kvp_pool_open say exactly what the host must do.
 */
#include <dlfcn.h>
#include <jemalloc/jemalloc.h>
#include <numa.h>
#include <numaif.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pager.h"

static struct kvp_jemalloc jemalloc;
static kvp_status jemalloc_status = KVP_EUNSUPPORTED;
static char jemalloc_error[256];
static pthread_once_t jemalloc_once = PTHREAD_ONCE_INIT;

static void jemalloc_open(void)
{
	void *h = dlopen("libjemalloc.so.2", RTLD_NOW | RTLD_LOCAL);
	if (!h) {
		snprintf(jemalloc_error, sizeof jemalloc_error,
			 "jemalloc could not be loaded (%s); start the host with jemalloc already loaded: link it "
			 "with -ljemalloc or run it with LD_PRELOAD=libjemalloc.so.2", dlerror());
		return;
	}
	*(void **)&jemalloc.mallocx = dlsym(h, "mallocx");
	*(void **)&jemalloc.dallocx = dlsym(h, "dallocx");
	*(void **)&jemalloc.nallocx = dlsym(h, "nallocx");
	*(void **)&jemalloc.mallctl = dlsym(h, "mallctl");
	if (!jemalloc.mallocx || !jemalloc.dallocx || !jemalloc.nallocx || !jemalloc.mallctl) {
		snprintf(jemalloc_error, sizeof jemalloc_error, "libjemalloc.so.2 lacks the mallocx API");
		return;
	}
	jemalloc_status = KVP_OK;
}

kvp_status kvp_jemalloc_load(const struct kvp_jemalloc **out)
{
	pthread_once(&jemalloc_once, jemalloc_open);
	if (jemalloc_status != KVP_OK)
		return kvp_fail(jemalloc_status, "%s", jemalloc_error);
	*out = &jemalloc;
	return KVP_OK;
}

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

static kvp_status numa_hooks_for(const struct kvp_jemalloc *je, int node, extent_hooks_t **out)
{
	kvp_status st = KVP_OK;
	if (node < 0 || node >= (int)(sizeof numa_table / sizeof numa_table[0]))
		return kvp_fail(KVP_EINVAL, "numa=%d: node out of range", node);
	pthread_mutex_lock(&numa_lock);
	struct numa_hooks *nh = &numa_table[node];
	if (!nh->base) {
		extent_hooks_t *base;
		size_t sz = sizeof base;
		if (je->mallctl("arena.0.extent_hooks", &base, &sz, NULL, 0) != 0) {
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

kvp_status kvp_arena_create(const struct kvp_pool *pool, unsigned *arena)
{
	extent_hooks_t *hooks = NULL;
	size_t sz = sizeof *arena;
	if (pool->numa_node >= 0) {
		kvp_status st = numa_hooks_for(pool->je, pool->numa_node, &hooks);
		if (st != KVP_OK)
			return st;
	}
	if (pool->je->mallctl("arenas.create", arena, &sz, hooks ? &hooks : NULL, hooks ? sizeof hooks : 0))
		return kvp_fail(KVP_ENOMEM, "jemalloc could not create an arena");
	return KVP_OK;
}

int kvp_arena_flags(unsigned arena)
{
	/* No thread cache: a freed block goes straight back to its own tenant's arena. */
	return MALLOCX_ARENA(arena) | MALLOCX_TCACHE_NONE;
}

void kvp_arena_destroy(const struct kvp_pool *pool, unsigned arena)
{
	char name[64];
	snprintf(name, sizeof name, "arena.%u.destroy", arena);
	pool->je->mallctl(name, NULL, NULL, NULL, 0);
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
	struct kvp_seq *s = ctx;
	void *p = kvp_alloc(s->tenant, bytes, KVP_BYTES_META, 0, s->call);

	if (p)
		s->state_bytes += kvp_alloc_size(s->tenant, bytes);
	return p;
}

static void state_free(void *ctx, void *p, size_t bytes)
{
	struct kvp_seq *s = ctx;

	kvp_free(s->tenant, p, bytes, KVP_BYTES_META, 0);
	s->state_bytes -= kvp_alloc_size(s->tenant, bytes);
}

struct kvp_allocator kvp_seq_allocator(struct kvp_seq *s)
{
	return (struct kvp_allocator){ .alloc = state_alloc, .free = state_free, .ctx = s };
}
