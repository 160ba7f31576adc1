/*
 * fp32: the identity codec. Separable, group 1, no per-stream context.
 *
 * Layout of one token: dim IEEE binary32 values, little endian as in memory (4*dim bytes).
 * bytes(n) = 4 * dim * n. dot and axpy are the dense kernels (dot_f32, axpy_f32) when the bytes are
 * 4-byte aligned, as the pager's blocks are; otherwise rows are read through memcpy.
 */
#include <string.h>

#include "codecs/codec.h"
#include "kernels/kernels.h"

static kvp_status fp32_open(struct kvp_codec *c, struct kvp_args *args, unsigned dim, struct kvp_codec *inner)
{
	(void)args;
	(void)inner;
	c->qprep_bytes = sizeof(float) * dim;
	c->acc_dim = dim;
	return KVP_OK;
}

static size_t fp32_bytes(const struct kvp_codec *c, unsigned n)
{
	return sizeof(float) * (size_t)c->dim * n;
}

/* Values that are not finite are refused (KVP_EINVAL, naming the first), as every other codec refuses them. */
static kvp_status fp32_encode(const struct kvp_codec *c, const void *ctx, unsigned n, const float *x, void *dst)
{
	const size_t all = (size_t)n * c->dim, bad = kvp_first_outside(x, all, INFINITY);

	(void)ctx;
	if (bad < all)
		return kvp_fail(KVP_EINVAL, "fp32: token %zu, channel %zu is %g: values must be finite", bad / c->dim,
				bad % c->dim, (double)x[bad]);
	memcpy(dst, x, fp32_bytes(c, n));
	return KVP_OK;
}

static kvp_status fp32_decode(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, float *x)
{
	(void)ctx;
	memcpy(x, src, fp32_bytes(c, n));
	return KVP_OK;
}

static void fp32_prepare_query(const struct kvp_codec *c, const void *ctx, const float *q, void *qprep)
{
	(void)ctx;
	memcpy(qprep, q, sizeof(float) * c->dim);
}

static int aligned(const void *p, size_t a)
{
	return ((uintptr_t)p & (a - 1)) == 0;
}

static void fp32_dot(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, const void *qprep,
		     float *out)
{
	const unsigned char *p = src;
	const float *q = qprep;

	(void)ctx;
	if (aligned(src, sizeof(float))) {
		kvp_kernels()->dot_f32(c->dim, n, src, q, 1.0f, out);
		return;
	}
	for (unsigned i = 0; i < n; i++) {
		float s = 0.0f, v;
		for (unsigned j = 0; j < c->dim; j++, p += sizeof v) {
			memcpy(&v, p, sizeof v);
			s += q[j] * v;
		}
		out[i] = s;
	}
}

static void fp32_axpy(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, const float *w,
		      float *acc)
{
	const unsigned char *p = src;

	(void)ctx;
	if (aligned(src, sizeof(float))) {
		kvp_kernels()->axpy_f32(c->dim, n, src, w, acc);
		return;
	}
	for (unsigned i = 0; i < n; i++) {
		float v;
		for (unsigned j = 0; j < c->dim; j++, p += sizeof v) {
			memcpy(&v, p, sizeof v);
			acc[j] += w[i] * v;
		}
	}
}

static void fp32_finish(const struct kvp_codec *c, const void *ctx, const float *acc, float *out)
{
	(void)ctx;
	for (unsigned j = 0; j < c->dim; j++)
		out[j] += acc[j];
}

const struct kvp_codec_ops kvp_codec_fp32 = {
	.name = "fp32",
	.flags = KVP_CODEC_SEPARABLE,
	.open = fp32_open,
	.bytes = fp32_bytes,
	.encode = fp32_encode,
	.decode = fp32_decode,
	.prepare_query = fp32_prepare_query,
	.dot = fp32_dot,
	.axpy = fp32_axpy,
	.finish = fp32_finish,
};
