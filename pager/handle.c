/*
 * Sequence handles. kvp_seq_open and kvp_seq_fork hand out an index into a process-wide table and the
 * slot's generation, not the sequence's address, so a closed handle, a handle whose slot now holds a
 * newer sequence, or a value that was never a handle is recognized without touching the memory it
 * might once have named, and refused with KVP_EPERM.
 *
 * Encoding: (generation << 32) | (index << 1) | 1. Odd, so no real object address ever equals one;
 * hosts only store, compare and pass handles, so they see no difference. A slot's generation is odd
 * while a sequence holds it and is bumped on both allocation and release.
 * The table grows in chunks that never move, so lookups need no lock.
 */
#include <stdlib.h>

#include "pager.h"

#define CHUNK_SLOTS 1024u
#define CHUNKS 4096u /* 4M sequences alive at once */

struct slot {
	_Atomic uint32_t gen;
	struct kvp_seq *_Atomic seq;
	uint32_t next_free;
};

static struct slot *_Atomic chunks[CHUNKS];
static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;
static uint32_t free_head; /* 0: none; slot 0 is never used, so 0 never names a sequence */
static uint32_t high;      /* slots ever handed out, slot 0 included */

static struct slot *slot_at(uint32_t index)
{
	struct slot *c;
	if (index >= CHUNK_SLOTS * CHUNKS)
		return NULL;
	c = atomic_load_explicit(&chunks[index / CHUNK_SLOTS], memory_order_acquire);
	return c ? &c[index % CHUNK_SLOTS] : NULL;
}

/* Under table_lock. */
static uint32_t slot_take(void)
{
	uint32_t index;
	if (free_head) {
		index = free_head;
		free_head = slot_at(index)->next_free;
		return index;
	}
	if (high == 0)
		high = 1;
	if (high >= CHUNK_SLOTS * CHUNKS)
		return 0;
	if (!slot_at(high)) {
		struct slot *c = calloc(CHUNK_SLOTS, sizeof *c);
		if (!c)
			return 0;
		atomic_store_explicit(&chunks[high / CHUNK_SLOTS], c, memory_order_release);
	}
	return high++;
}

int kvp_seq_handle_new(struct kvp_seq *s)
{
	uint32_t index;
	pthread_mutex_lock(&table_lock);
	index = slot_take();
	if (index) {
		struct slot *sl = slot_at(index);
		atomic_store(&sl->seq, s);
		atomic_fetch_add(&sl->gen, 1); /* odd: alive */
		s->handle_index = index;
		s->handle = (kvp_seq *)(uintptr_t)((uint64_t)atomic_load(&sl->gen) << 32 | (uint64_t)index << 1 | 1);
	}
	pthread_mutex_unlock(&table_lock);
	if (!index)
		kvp_fail(KVP_ENOMEM, "no room for another sequence handle");
	return index != 0;
}

void kvp_seq_handle_free(struct kvp_seq *s)
{
	struct slot *sl;
	if (!s->handle_index)
		return;
	pthread_mutex_lock(&table_lock);
	if ((sl = slot_at(s->handle_index))) { /* NULL only after table_free, at unload */
		atomic_fetch_add(&sl->gen, 1); /* even: every copy of the handle is dead from here */
		atomic_store(&sl->seq, NULL);
		sl->next_free = free_head;
		free_head = s->handle_index;
	}
	pthread_mutex_unlock(&table_lock);
	s->handle_index = 0;
}

kvp_status kvp_seq_handle_get(const kvp_seq *h, const char *call, struct kvp_seq **out)
{
	uintptr_t v = (uintptr_t)h;
	uint32_t index = (uint32_t)(v >> 1) & 0x7fffffffu, gen = (uint32_t)((uint64_t)v >> 32);
	struct slot *sl;
	struct kvp_seq *s;
	if (!h)
		return kvp_fail(KVP_EINVAL, "%s: the sequence is NULL", call);
	sl = (v & 1) && index ? slot_at(index) : NULL;
	if (!sl || atomic_load_explicit(&sl->gen, memory_order_acquire) != gen ||
	    !(s = atomic_load_explicit(&sl->seq, memory_order_acquire)))
		return kvp_fail(KVP_EPERM, "%s: %p is not an open sequence (closed, or never one)", call, (const void *)h);
	*out = s;
	return KVP_OK;
}

struct kvp_seq *kvp_seq_from_handle(const kvp_seq *h)
{
	struct kvp_seq *s = NULL;
	return kvp_seq_handle_get(h, "kvp_seq_from_handle", &s) == KVP_OK ? s : NULL;
}

/* The table lives as long as the library: freed when it is unloaded (a dlopen host's dlclose, or exit),
 * after which no call can look a handle up. */
__attribute__((destructor)) static void table_free(void)
{
	for (uint32_t c = 0; c < CHUNKS; c++)
		free(atomic_exchange(&chunks[c], NULL));
	free_head = 0;
	high = 0;
}
