/* Shared by the pager suites: random tokens and a double-precision attention reference. */
#ifndef KVP_TEST_PAGER_FIXTURE_H
#define KVP_TEST_PAGER_FIXTURE_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "kvpager.h"

static inline float fixture_uniform(uint64_t *state)
{
	*state ^= *state << 13;
	*state ^= *state >> 7;
	*state ^= *state << 17;
	return (float)((*state >> 11) * 0x1p-53) * 2.0f - 1.0f;
}

static inline void fixture_fill(float *x, size_t n, uint64_t seed, float amplitude)
{
	uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
	for (size_t i = 0; i < n; i++)
		x[i] = amplitude * fixture_uniform(&s);
}

/*
 * out[h] = softmax(q_h K^T / sqrt(d)) V for one stream's tokens k, v: [n][d], in double precision.
 */
static inline void fixture_attend(unsigned d, unsigned n, const float *k, const float *v, const float *q,
				  double *out)
{
	double *s = malloc(n * sizeof *s), m = -INFINITY, l = 0;
	for (unsigned i = 0; i < n; i++) {
		double dot = 0;
		for (unsigned j = 0; j < d; j++)
			dot += (double)q[j] * k[(size_t)i * d + j];
		s[i] = dot / sqrt((double)d);
		if (s[i] > m)
			m = s[i];
	}
	for (unsigned j = 0; j < d; j++)
		out[j] = 0;
	for (unsigned i = 0; i < n; i++) {
		double p = exp(s[i] - m);
		l += p;
		for (unsigned j = 0; j < d; j++)
			out[j] += p * v[(size_t)i * d + j];
	}
	for (unsigned j = 0; j < d; j++)
		out[j] = n ? out[j] / l : 0;
	free(s);
}

/* ||a - b|| / ||b|| */
static inline double fixture_rel_error(unsigned d, const float *a, const double *b)
{
	double num = 0, den = 0;
	for (unsigned j = 0; j < d; j++) {
		num += (a[j] - b[j]) * (a[j] - b[j]);
		den += b[j] * b[j];
	}
	return den > 0 ? sqrt(num / den) : sqrt(num);
}

#endif
