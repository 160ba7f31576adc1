/* The allocator interface of base.h: the C heap for standalone objects, and the checked entry points. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "base.h"

static void *heap_alloc(void *ctx, size_t bytes)
{
	void *p = malloc(bytes);

	(void)ctx;
	if (!p)
		kvp_fail(KVP_ENOMEM, "the system is out of memory (%zu bytes)", bytes);
	return p;
}

static void heap_free(void *ctx, void *p, size_t bytes)
{
	(void)ctx, (void)bytes;
	free(p);
}

const struct kvp_allocator kvp_heap = { .alloc = heap_alloc, .free = heap_free, .ctx = NULL };

/* Zero bytes is one: the size is handed back to free, and jemalloc has no zero-sized class. */
static size_t at_least_one(size_t bytes)
{
	return bytes ? bytes : 1;
}

void *kvp_allocate(const struct kvp_allocator *a, size_t bytes, const char *what)
{
	void *p = a->alloc(a->ctx, at_least_one(bytes));

	if (!p) {
		kvp_fail_context(KVP_ENOMEM, "%s", what);
		return NULL;
	}
	memset(p, 0, at_least_one(bytes));
	return p;
}

void *kvp_allocate_array(const struct kvp_allocator *a, size_t count, size_t size, const char *what)
{
	if (size && count > SIZE_MAX / size) {
		kvp_fail(KVP_ENOMEM, "%s: %zu x %zu bytes is too large", what, count, size);
		return NULL;
	}
	return kvp_allocate(a, count * size, what);
}

void kvp_release(const struct kvp_allocator *a, void *p, size_t bytes)
{
	if (p)
		a->free(a->ctx, p, at_least_one(bytes));
}
