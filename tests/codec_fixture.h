/*
 * Shared by the codec suites: a seeded generator, random unit and Gaussian vectors, and the codec calls
 * the suites make through the internal vtable (fused dot and axpy, which the public API does not expose).
 */
#ifndef KVP_TESTS_CODEC_FIXTURE_H
#define KVP_TESTS_CODEC_FIXTURE_H

#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "codecs/codec.h"

struct rng {
	uint64_t s;
};

static inline uint64_t rng_next(struct rng *r)
{
	uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static inline double rng_uniform(struct rng *r) /* in (0, 1] */
{
	return ((double)(rng_next(r) >> 11) + 1.0) * 0x1p-53;
}

static inline double rng_gaussian(struct rng *r)
{
	return sqrt(-2.0 * log(rng_uniform(r))) * cos(6.283185307179586 * rng_uniform(r));
}

static inline void rng_gaussians(struct rng *r, float *x, size_t n)
{
	for (size_t i = 0; i < n; i++)
		x[i] = (float)rng_gaussian(r);
}

/* A point uniform on the unit sphere of R^d. */
static inline void rng_unit(struct rng *r, float *x, unsigned d)
{
	double n2 = 0;

	rng_gaussians(r, x, d);
	for (unsigned j = 0; j < d; j++)
		n2 += (double)x[j] * x[j];
	for (unsigned j = 0; j < d; j++)
		x[j] = (float)(x[j] / sqrt(n2));
}

static inline void *xcalloc(size_t n, size_t size)
{
	void *p = calloc(n ? n : 1, size ? size : 1);

	cr_assert_not_null(p);
	return p;
}

static inline kvp_codec *codec_open(const char *spec, unsigned dim)
{
	kvp_codec *c = NULL;
	kvp_status st = kvp_codec_open(spec, dim, &c);

	cr_assert_eq(st, KVP_OK, "kvp_codec_open(\"%s\", %u): %s", spec, dim, kvp_last_error());
	return c;
}

static inline double dot_d(const float *a, const float *b, unsigned d)
{
	double s = 0;

	for (unsigned j = 0; j < d; j++)
		s += (double)a[j] * b[j];
	return s;
}

/* Mean over n vectors of ||x - decode(encode(x))||^2 / ||x||^2. */
static inline double codec_mse(kvp_codec *c, unsigned n, const float *x)
{
	unsigned d = c->dim;
	void *bytes = xcalloc(1, kvp_codec_bytes(c, n));
	float *y = xcalloc((size_t)n * d, sizeof *y);
	double sum = 0;

	cr_assert_eq(kvp_codec_encode(c, n, x, bytes), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_codec_decode(c, n, bytes, y), KVP_OK, "%s", kvp_last_error());
	for (size_t i = 0; i < n; i++) {
		double e = 0, n2 = 0;
		for (unsigned j = 0; j < d; j++) {
			double t = x[i * d + j] - y[i * d + j];
			e += t * t;
			n2 += (double)x[i * d + j] * x[i * d + j];
		}
		sum += n2 > 0 ? e / n2 : e;
	}
	free(bytes);
	free(y);
	return sum / n;
}

/* The fused paths of an opened codec with its standalone context (fitted by the first encode). */
static inline void codec_fused_dot(kvp_codec *c, unsigned n, const void *bytes, const float *q, float *out)
{
	void *qprep = xcalloc(1, c->qprep_bytes);

	c->ops->prepare_query(c, c->own_ctx, q, qprep);
	c->ops->dot(c, c->own_ctx, n, bytes, qprep, out);
	free(qprep);
}

/* out[0..dim) = sum_i w[i] * x_i through axpy and finish. */
static inline void codec_fused_axpy(kvp_codec *c, unsigned n, const void *bytes, const float *w, float *out)
{
	float *acc = xcalloc(c->acc_dim, sizeof *acc);

	memset(out, 0, sizeof(float) * c->dim);
	c->ops->axpy(c, c->own_ctx, n, bytes, w, acc);
	c->ops->finish(c, c->own_ctx, acc, out);
	free(acc);
}

/* The status and message of a spec that must be rejected. */
static inline void expect_rejected(const char *spec, unsigned dim, const char *quoted)
{
	kvp_codec *c = NULL;
	kvp_status st = kvp_codec_open(spec, dim, &c);

	cr_assert_eq(st, KVP_EINVAL, "\"%s\" gave %d, not KVP_EINVAL", spec, st);
	cr_assert_null(c);
	cr_assert(strstr(kvp_last_error(), quoted), "message for \"%s\" does not quote '%s': %s", spec, quoted,
		  kvp_last_error());
}

#endif /* KVP_TESTS_CODEC_FIXTURE_H */
