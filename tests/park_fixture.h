/* Shared by the park and fault suites: a spill-enabled pool with one tenant, sequences filled with
 * random tokens, and attention snapshots to compare bit for bit. */
#ifndef KVP_TEST_PARK_FIXTURE_H
#define KVP_TEST_PARK_FIXTURE_H

#include <criterion/criterion.h>
#include <string.h>

#include "kvpager.h"
#include "pager_fixture.h"
#include "spill_fixture.h"

#define PARK_LAYERS 2
#define PARK_HEADS 4
#define PARK_KV 2
#define PARK_DIM 32
#define PARK_ROW (PARK_KV * PARK_DIM)
#define PARK_OUT (PARK_HEADS * PARK_DIM)

static const kvp_shape park_shape = { PARK_LAYERS, PARK_HEADS, PARK_KV, PARK_DIM, 10000.0f, KVP_ROPE_HALF };
static kvp_pool *pool;
static kvp_tenant *tenant;

static inline void park_open(const char *spill_max, const char *tenant_spec)
{
	spill_fixture_open(spill_max, NULL);
	cr_assert_eq(kvp_pool_open(spill_spec, &pool), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(pool, "t", tenant_spec, &tenant), KVP_OK, "%s", kvp_last_error());
}

/* Closes the pool and checks that the device gave everything back and the file is gone. */
static inline void park_close(void)
{
	kvp_pool_close(pool);
	cr_assert_eq(spill_fixture_close(), 0, "the pool removed its spill file");
}

/* Appends n tokens at positions first.. to every layer, values from seed. */
static inline void park_fill(kvp_seq *s, int32_t first, uint32_t n, uint64_t seed)
{
	float *k = malloc((size_t)n * PARK_ROW * sizeof *k), *v = malloc((size_t)n * PARK_ROW * sizeof *v);
	int32_t *pos = malloc(n * sizeof *pos);
	for (uint32_t i = 0; i < n; i++)
		pos[i] = first + (int32_t)i;
	for (uint32_t l = 0; l < PARK_LAYERS; l++) {
		fixture_fill(k, (size_t)n * PARK_ROW, seed + 2 * l, 2);
		fixture_fill(v, (size_t)n * PARK_ROW, seed + 2 * l + 1, 2);
		cr_assert_eq(kvp_append(s, l, n, pos, k, v), KVP_OK, "%s", kvp_last_error());
	}
	free(k);
	free(v);
	free(pos);
}

/* Attention of a fixed query on every layer: [PARK_LAYERS][PARK_OUT]. */
static inline void park_attend(kvp_seq *s, float *out)
{
	float q[PARK_OUT];
	fixture_fill(q, PARK_OUT, 4242, 1);
	for (uint32_t l = 0; l < PARK_LAYERS; l++)
		cr_assert_eq(kvp_attend(s, l, q, out + l * PARK_OUT), KVP_OK, "%s", kvp_last_error());
}

static inline kvp_stats park_tenant_stats(void)
{
	kvp_stats st = { .size = sizeof st };
	cr_assert_eq(kvp_tenant_stats(tenant, &st), KVP_OK);
	return st;
}

#endif
