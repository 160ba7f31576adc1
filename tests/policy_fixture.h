/* Shared set-up of the policy suites: shapes, RoPE in both layouts, stats files in a scratch directory. */
#ifndef KVP_TESTS_POLICY_FIXTURE_H
#define KVP_TESTS_POLICY_FIXTURE_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "policies/policy.h"

static inline kvp_shape fixture_shape(uint32_t layers, uint32_t heads, uint32_t kv_heads, uint32_t dim,
				      float theta, kvp_rope_layout layout)
{
	kvp_shape s = { .n_layers = layers, .n_heads = heads, .n_kv_heads = kv_heads, .head_dim = dim,
			.rope_theta = theta, .rope_layout = layout };
	return s;
}

/* Index of band f's real and imaginary parts in a head vector. */
static inline void fixture_band_index(kvp_rope_layout layout, unsigned dim, unsigned f, unsigned *re, unsigned *im)
{
	*re = layout == KVP_ROPE_HALF ? f : 2 * f;
	*im = layout == KVP_ROPE_HALF ? f + dim / 2 : 2 * f + 1;
}

/* Rotates each band of x (one head, pre-RoPE) by omega_f * pos, in double, in place. */
static inline void fixture_rope(float *x, unsigned dim, double theta, kvp_rope_layout layout, int64_t pos)
{
	for (unsigned f = 0; f < dim / 2; f++) {
		unsigned r, i;
		double w = pow(theta, -2.0 * f / dim), a = w * (double)pos, c = cos(a), s = sin(a), xr, xi;
		fixture_band_index(layout, dim, f, &r, &i);
		xr = x[r], xi = x[i];
		x[r] = (float)(xr * c - xi * s);
		x[i] = (float)(xr * s + xi * c);
	}
}

/* A unique scratch path for this process. */
static inline const char *fixture_path(const char *name)
{
	static char buf[8][256];
	static int next;
	char *p = buf[next++ % 8];
	snprintf(p, sizeof buf[0], "/tmp/kvp-test-%ld-%s", (long)getpid(), name);
	return p;
}

#endif
