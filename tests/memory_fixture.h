/* An allocator for policies and codecs with a byte budget, on the C heap: it refuses what would pass the
 * budget (as the pager's does at a quota) and counts what is held, so a test sees every byte come back. */
#ifndef KVP_TESTS_MEMORY_FIXTURE_H
#define KVP_TESTS_MEMORY_FIXTURE_H

#include <stdlib.h>

#include "base/base.h"

struct fixture_memory {
	struct kvp_allocator ops;
	size_t left;   /* bytes it still grants */
	size_t held;   /* bytes allocated and not freed */
	unsigned refused;
};

static void *fixture_memory_alloc(void *ctx, size_t bytes)
{
	struct fixture_memory *m = ctx;
	void *p;

	if (bytes > m->left) {
		m->refused++;
		kvp_fail(KVP_ENOMEM, "test budget: %zu bytes asked, %zu left", bytes, m->left);
		return NULL;
	}
	if (!(p = malloc(bytes)))
		return NULL;
	m->left -= bytes;
	m->held += bytes;
	return p;
}

static void fixture_memory_free(void *ctx, void *p, size_t bytes)
{
	struct fixture_memory *m = ctx;

	free(p);
	m->left += bytes;
	m->held -= bytes;
}

static inline void fixture_memory_init(struct fixture_memory *m, size_t budget)
{
	m->ops = (struct kvp_allocator){ .alloc = fixture_memory_alloc, .free = fixture_memory_free, .ctx = m };
	m->left = budget;
	m->held = 0;
	m->refused = 0;
}

#endif
