/*
 * Handles of pools, tenants and sequences. The open calls hand out an index into a process-wide table
 * and the slot's generation, not the object's address, so a closed handle, a handle whose slot now holds
 * a newer object, a handle of another kind or a value that was never a handle is recognized without
 * touching the memory it might once have named, and refused with KVP_EPERM.
 *
 * Encoding, in a uintptr_t of W bits: (generation << (1 + INDEX_BITS)) | (index << 1) | 1. Odd, so no
 * real object address ever equals one; hosts only store, compare and pass handles, so they see no
 * difference. With 64-bit pointers that is a 31-bit index and a 32-bit generation; with 32-bit pointers
 * a 16-bit index (65535 objects alive at once) and a 15-bit generation. A slot's generation is bumped
 * when its object is closed; freed slots are reused oldest first, so a stale handle could only match
 * again after its slot has served 2^15 (32-bit) or 2^32 newer objects.
 * The table grows in chunks that never move, so lookups need no lock.
 *
 * fork(): the child inherits the handles but not what stands behind them as the parent runs it: no thread
 * of the parent (the remote tier's writer, the host's threads inside a call, holding a sequence's or a
 * pool's locks), and the spill device's io_uring ring and the remote tier's sockets are shared with the
 * parent, so a request from the child would be answered to, or corrupt, the parent. So a handle names its
 * object only in the process that opened it: every slot records the process's epoch, which the child
 * handler bumps, and a child's call on an inherited handle is refused with KVP_EPERM. A close of one
 * only retires the handle in the child: the copy of the memory behind it goes when the child exits or
 * execs, and the parent's objects are untouched. The library's process-wide locks are held across the
 * fork, so the child can open pools of its own.
 */
#include <limits.h>
#include <stdlib.h>

#include "pager.h"
#include "tier/tier.h"

#ifndef KVP_HANDLE_BITS /* defined only to check the 32-bit layout on a 64-bit build */
#define KVP_HANDLE_BITS (sizeof(uintptr_t) * CHAR_BIT)
#endif
#define HANDLE_BITS KVP_HANDLE_BITS
#define INDEX_BITS (HANDLE_BITS >= 64 ? 31u : 16u)
#define GEN_BITS (HANDLE_BITS - 1 - INDEX_BITS)
#define INDEX_MASK ((1u << INDEX_BITS) - 1)
#define GEN_MASK ((uint32_t)(((uint64_t)1 << GEN_BITS) - 1))

#define CHUNK_SLOTS 1024u
#define CHUNKS 4096u /* 4M objects alive at once */
/* slots the encoding can name: index 0 is never used, so 0 never names an object */
#define SLOTS_MAX (INDEX_MASK < CHUNK_SLOTS * CHUNKS ? INDEX_MASK + 1 : CHUNK_SLOTS * CHUNKS)

struct slot {
	_Atomic uint32_t gen;
	_Atomic uint32_t kind; /* enum kvp_handle_kind while alive */
	void *_Atomic obj;     /* NULL while free */
	_Atomic uint32_t epoch; /* the process epoch obj was opened in */
	uint32_t next_free;
};

static struct slot *_Atomic chunks[CHUNKS];
static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;
static uint32_t free_head, free_tail; /* 0: none */
static uint32_t high;                 /* slots ever handed out, slot 0 included */

static const char *const kind_names[] = { "", "pool", "tenant", "sequence" };

/* Bumped in every child of fork(): the handles of an older epoch are the parent's. */
static _Atomic uint32_t process_epoch;
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

static void fork_prepare(void)
{
	kvp_arena_fork_lock();
	kvp_pressure_fork_prepare();
	pthread_mutex_lock(&table_lock);
}

static void fork_parent(void)
{
	pthread_mutex_unlock(&table_lock);
	kvp_pressure_fork_parent();
	kvp_arena_fork_unlock();
}

static void fork_child(void)
{
	atomic_fetch_add(&process_epoch, 1);
	pthread_mutex_unlock(&table_lock);
	kvp_pressure_fork_child();
	kvp_arena_fork_unlock();
}

static void fork_handlers_register(void)
{
	kvp_arena_start();
	pthread_atfork(fork_prepare, fork_parent, fork_child);
}

/* Registered with the first pool, after jemalloc has started: handlers registered later run their
 * prepare first, so these take the library's locks before jemalloc takes its own, the order in which a
 * thread holding the NUMA lock takes them (it calls jemalloc). The library is linked -z nodelete, so
 * after a host's dlclose the handlers' code is still there when the host forks. */
void kvp_handle_fork_guard(void)
{
	pthread_once(&fork_once, fork_handlers_register);
}

static struct slot *slot_at(uint32_t index)
{
	struct slot *c;
	if (index >= SLOTS_MAX)
		return NULL;
	c = atomic_load_explicit(&chunks[index / CHUNK_SLOTS], memory_order_acquire);
	return c ? &c[index % CHUNK_SLOTS] : NULL;
}

/* Under table_lock. The oldest free slot, so a slot's generations go round as slowly as they can. */
static uint32_t slot_take(void)
{
	uint32_t index;
	if (free_head) {
		index = free_head;
		free_head = slot_at(index)->next_free;
		if (!free_head)
			free_tail = 0;
		return index;
	}
	if (high == 0)
		high = 1;
	if (high >= SLOTS_MAX)
		return 0;
	if (!slot_at(high)) {
		struct slot *c = calloc(CHUNK_SLOTS, sizeof *c);
		if (!c)
			return 0;
		for (uint32_t i = 0; i < CHUNK_SLOTS; i++) /* generation 0 would make small integers handles */
			atomic_init(&c[i].gen, 1);
		atomic_store_explicit(&chunks[high / CHUNK_SLOTS], c, memory_order_release);
	}
	return high++;
}

/* Under table_lock: every copy of the slot's handle is dead from here. */
static void slot_release(uint32_t index)
{
	struct slot *sl = slot_at(index);
	if (!sl) /* only after table_free, at unload */
		return;
	atomic_store(&sl->obj, NULL);
	atomic_fetch_add(&sl->gen, 1);
	sl->next_free = 0;
	if (free_tail)
		slot_at(free_tail)->next_free = index;
	else
		free_head = index;
	free_tail = index;
}

uintptr_t kvp_handle_new(enum kvp_handle_kind kind, void *obj, uint32_t *index_out)
{
	uintptr_t h = 0;
	uint32_t index;
	pthread_mutex_lock(&table_lock);
	index = slot_take();
	if (index) {
		struct slot *sl = slot_at(index);
		uint32_t gen = atomic_load(&sl->gen) & GEN_MASK;
		atomic_store(&sl->kind, (uint32_t)kind);
		atomic_store(&sl->epoch, atomic_load(&process_epoch));
		atomic_store_explicit(&sl->obj, obj, memory_order_release);
		h = (uintptr_t)gen << (1 + INDEX_BITS) | (uintptr_t)index << 1 | 1;
	}
	pthread_mutex_unlock(&table_lock);
	*index_out = index;
	if (!index)
		kvp_fail(KVP_ENOMEM, "no room for another %s handle", kind_names[kind]);
	return h;
}

void kvp_handle_free(uint32_t index)
{
	if (!index)
		return;
	pthread_mutex_lock(&table_lock);
	slot_release(index);
	pthread_mutex_unlock(&table_lock);
}

/* The object h names when it is an open handle of this kind, else NULL. The generation is read on both
 * sides of the object: when it did not move, the object is the one that generation named. *inherited is
 * set when the object is the parent's (opened before this process forked from it). */
static void *lookup(enum kvp_handle_kind kind, const void *h, uint32_t *index_out, int *inherited)
{
	uintptr_t v = (uintptr_t)h;
	uint32_t index = (uint32_t)(v >> 1) & INDEX_MASK, gen = (uint32_t)(v >> (1 + INDEX_BITS)) & GEN_MASK;
	struct slot *sl = (v & 1) && index ? slot_at(index) : NULL;
	uint32_t before, after, k, epoch;
	void *obj;
	if (!sl)
		return NULL;
	before = atomic_load(&sl->gen);
	obj = atomic_load_explicit(&sl->obj, memory_order_acquire);
	k = atomic_load(&sl->kind);
	epoch = atomic_load(&sl->epoch);
	after = atomic_load(&sl->gen);
	if (before != after || (before & GEN_MASK) != gen || !obj || k != (uint32_t)kind)
		return NULL;
	*index_out = index;
	*inherited = epoch != atomic_load(&process_epoch);
	return obj;
}

static kvp_status refuse(enum kvp_handle_kind kind, const void *h, const char *call, int inherited)
{
	if (!h)
		return kvp_fail(KVP_EINVAL, "%s: the %s is NULL", call, kind_names[kind]);
	if (inherited)
		return kvp_fail(KVP_EPERM,
				"%s: the %s %p was opened before this process forked; a child process opens its own "
				"pools (the parent's threads, spill ring and remote links are the parent's)",
				call, kind_names[kind], h);
	return kvp_fail(KVP_EPERM, "%s: %p is not an open %s (closed, or never one)", call, h, kind_names[kind]);
}

kvp_status kvp_handle_get(enum kvp_handle_kind kind, const void *h, const char *call, void **out)
{
	uint32_t index = 0;
	int inherited = 0;
	void *obj = h ? lookup(kind, h, &index, &inherited) : NULL;
	if (!obj || inherited)
		return refuse(kind, h, call, inherited);
	*out = obj;
	return KVP_OK;
}

/* The object h names, its handle closed at once (only when inherited, with only_inherited); NULL when h
 * names none. */
static void *retire(enum kvp_handle_kind kind, const void *h, int only_inherited, int *inherited)
{
	uint32_t index = 0;
	void *obj = NULL;
	if (h) {
		pthread_mutex_lock(&table_lock);
		if ((obj = lookup(kind, h, &index, inherited)) && (*inherited || !only_inherited))
			slot_release(index);
		pthread_mutex_unlock(&table_lock);
	}
	return obj;
}

/* An inherited handle is retired here too, but its object is not handed out: the caller closes nothing. */
kvp_status kvp_handle_take(enum kvp_handle_kind kind, const void *h, const char *call, void **out)
{
	int inherited = 0;
	void *obj = retire(kind, h, 0, &inherited);
	if (!obj || inherited)
		return refuse(kind, h, call, inherited);
	*out = obj;
	return KVP_OK;
}

void kvp_handle_retire_inherited(enum kvp_handle_kind kind, const void *h)
{
	int inherited = 0;
	retire(kind, h, 1, &inherited);
}

/* ---- sequences ---- */

int kvp_seq_handle_new(struct kvp_seq_obj *s)
{
	s->handle = (kvp_seq *)kvp_handle_new(KVP_HANDLE_SEQ, s, &s->handle_index);
	return s->handle_index != 0;
}

void kvp_seq_handle_free(struct kvp_seq_obj *s)
{
	kvp_handle_free(s->handle_index);
	s->handle_index = 0;
}

kvp_status kvp_seq_handle_get(const kvp_seq *h, const char *call, struct kvp_seq_obj **out)
{
	void *s = NULL;
	kvp_status st = kvp_handle_get(KVP_HANDLE_SEQ, h, call, &s);
	if (st == KVP_OK)
		*out = s;
	return st;
}

struct kvp_seq_obj *kvp_seq_from_handle(const kvp_seq *h)
{
	struct kvp_seq_obj *s = NULL;
	return kvp_seq_handle_get(h, "kvp_seq_from_handle", &s) == KVP_OK ? s : NULL;
}

/* ---- pools and tenants: for white-box tests that look inside ---- */

struct kvp_pool_obj *kvp_pool_from_handle(const kvp_pool *h)
{
	void *p = NULL;
	return kvp_handle_get(KVP_HANDLE_POOL, h, "kvp_pool_from_handle", &p) == KVP_OK ? p : NULL;
}

struct kvp_tenant_obj *kvp_tenant_from_handle(const kvp_tenant *h)
{
	void *t = NULL;
	return kvp_handle_get(KVP_HANDLE_TENANT, h, "kvp_tenant_from_handle", &t) == KVP_OK ? t : NULL;
}

/* The table lives as long as the library: freed when it is unloaded (a dlopen host's dlclose, or exit),
 * after which no call can look a handle up. */
__attribute__((destructor)) static void table_free(void)
{
	for (uint32_t c = 0; c < CHUNKS; c++)
		free(atomic_exchange(&chunks[c], NULL));
	free_head = free_tail = 0;
	high = 0;
}
