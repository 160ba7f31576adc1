/*
 * base/ — the ground layer every other folder may use: the thread-local error message behind
 * kvp_last_error(), the configuration grammar, IEEE half-precision conversion, and the allocator
 * interface that lets the pager hand its tenants' memory down to policies and codecs.
 */
#ifndef KVP_BASE_H
#define KVP_BASE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kvpager.h"

#define KVP_HIDDEN __attribute__((visibility("hidden")))

/* Records a printf-style message for kvp_last_error() and returns s, so callers write
 * `return kvp_fail(KVP_EINVAL, "block=%u is not a multiple of 32", b);`. */
kvp_status kvp_fail(kvp_status s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Prefixes the current message with context ("tenant 'a': ..."). Returns s. */
kvp_status kvp_fail_context(kvp_status s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void kvp_clear_error(void);

/*
 * Configuration grammar:
 *   list  := item (',' item)*            (an empty string is an empty list)
 *   item  := key '=' value
 *   value := text up to the next ',' or ')' at depth 0; may contain name(list) and '|'
 * Spaces and newlines around items are ignored. Parsing never allocates: keys and values point into the
 * caller's string, which must outlive the kvp_args.
 */
#define KVP_ARGS_MAX 32

struct kvp_arg {
	const char *key, *val;
	unsigned klen, vlen;
	unsigned used;
};

struct kvp_args {
	const char *what; /* "pool", "tenant", "turboquant": names the spec in messages */
	unsigned n;
	struct kvp_arg a[KVP_ARGS_MAX];
};

/* Splits text[0..len) into key=value items. Duplicate keys are errors. */
kvp_status kvp_args_parse(struct kvp_args *args, const char *what, const char *text, size_t len);

/*
 * Typed lookups. A missing key leaves *out untouched and returns KVP_OK, so defaults are set first.
 * A present key is marked used; a value that does not parse or lies outside [lo, hi] is KVP_EINVAL with
 * a message quoting it.
 */
kvp_status kvp_args_u64(struct kvp_args *args, const char *key, uint64_t lo, uint64_t hi, uint64_t *out);
kvp_status kvp_args_u32(struct kvp_args *args, const char *key, uint32_t lo, uint32_t hi, uint32_t *out);
kvp_status kvp_args_size(struct kvp_args *args, const char *key, uint64_t *out); /* 4GiB, 512MiB, 100 */
kvp_status kvp_args_double(struct kvp_args *args, const char *key, double lo, double hi, double *out);
/* One of choices (NULL-terminated); *out is its index. */
kvp_status kvp_args_choice(struct kvp_args *args, const char *key, const char *const *choices,
			   unsigned *out);
/* The raw value text (not NUL-terminated). */
kvp_status kvp_args_text(struct kvp_args *args, const char *key, const char **val, unsigned *vlen);
/* Puts key=val first, in place of any item with that key (a ladder sets a codec's bits= this way). key and
 * val must outlive args, as the parsed text must. KVP_EINVAL when args are full. */
kvp_status kvp_args_put(struct kvp_args *args, const char *key, const char *val);
/* KVP_EINVAL naming the first key nobody asked for. Call after all lookups. */
kvp_status kvp_args_finish(const struct kvp_args *args);

/*
 * Splits a value of the form name(list) or name into the name and the inner list text.
 * "turboquant(bits=3)" -> name "turboquant", inner "bits=3". Unbalanced parentheses are KVP_EINVAL.
 */
kvp_status kvp_call_split(const char *val, unsigned vlen, const char **name, unsigned *nlen,
			  const char **inner, unsigned *ilen);
/* Does name[0..nlen) equal the NUL-terminated s? */
int kvp_name_is(const char *name, unsigned nlen, const char *s);

/*
 * Memory a policy or codec keeps for its owner. Policies and codecs sit below the pager and must not call
 * up into it, so the pager passes one of these down: its alloc charges the sequence's tenant and allocates
 * from the tenant's arena (counted in the sequence's bytes_meta). Objects opened on their own get
 * kvp_heap (the C heap). alloc returns NULL after kvp_fail(KVP_ENOMEM, ...) naming what refused; free
 * takes the size alloc was given.
 */
struct kvp_allocator {
	void *(*alloc)(void *ctx, size_t bytes);
	void (*free)(void *ctx, void *p, size_t bytes);
	void *ctx;
};
extern const struct kvp_allocator kvp_heap;
/* Zeroed memory for bytes (at least one), or NULL with KVP_ENOMEM set; `what` names it in the message. */
void *kvp_allocate(const struct kvp_allocator *a, size_t bytes, const char *what);
/* count x size bytes, refusing a product that overflows. */
void *kvp_allocate_array(const struct kvp_allocator *a, size_t count, size_t size, const char *what);
/* Gives back what kvp_allocate(a, bytes) or kvp_allocate_array(a, count, size) returned; NULL is a no-op. */
void kvp_release(const struct kvp_allocator *a, void *p, size_t bytes);

/* The index of the first of x[0..n) whose magnitude is not below bound (a NaN never is); n when there is
 * none. bound INFINITY: the first that is not finite. */
size_t kvp_first_outside(const float *x, size_t n, float bound);

/* Where a value rounds to an infinity in binary16 (round to nearest even: 65504 is the largest finite). */
#define KVP_F16_OVERFLOW 65520.0f

/* Whether bytes [a, a + a_bytes) and [b, b + b_bytes) share one (a caller's buffers that a call reads
 * and writes must not). */
static inline int kvp_overlap(const void *a, size_t a_bytes, const void *b, size_t b_bytes)
{
	const uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
	return a_bytes && b_bytes && x < y + b_bytes && y < x + a_bytes;
}

/* Fills a versioned public struct (kvp_stats and the like: a uint32_t size first, set by the caller, at
 * least that size and one member) from full, a whole one of full_bytes: the members the caller's size
 * covers, so an older, smaller struct gets what it knows; the caller's size is left as it is. */
static inline void kvp_sized_copy(void *out, const void *full, size_t full_bytes)
{
	uint32_t size;
	memcpy(&size, out, sizeof size);
	if (size > full_bytes)
		size = (uint32_t)full_bytes;
	memcpy((char *)out + sizeof size, (const char *)full + sizeof size, size - sizeof size);
}

/* IEEE 754 binary16, round to nearest even; NaN and infinity preserved. */
uint16_t kvp_f32_to_f16(float x);
float kvp_f16_to_f32(uint16_t h);

#endif /* KVP_BASE_H */
