/*
 * fp16: IEEE binary16 storage, rounded to nearest even (kvp_f32_to_f16). Separable, group 1, no
 * per-stream context. encode refuses (KVP_EINVAL, naming the value) what binary16 cannot hold as a finite
 * number: infinities, NaNs and magnitudes that round to an infinity (65520 and above), as TurboQuant and
 * KIVI refuse values that are not finite and kvp_append with store=fp16 refuses the same ones; decode
 * takes any bits as they are.
 *
 * Layout of one token: dim binary16 values, little endian (2*dim bytes). bytes(n) = 2 * dim * n.
 * Every path is a dense kernel (f32_to_f16, f16_to_f32, dot_f16, axpy_f16; bit-identical conversions
 * across kernel tables) when the bytes are 2-byte aligned, as the pager's blocks are; otherwise values are
 * converted one by one.
 */
#include <string.h>

#include "codecs/codec.h"
#include "kernels/kernels.h"

static kvp_status fp16_open(struct kvp_codec *c, struct kvp_args *args, unsigned dim, struct kvp_codec *inner)
{
	(void)args;
	(void)inner;
	c->qprep_bytes = sizeof(float) * dim;
	c->acc_dim = dim;
	return KVP_OK;
}

static size_t fp16_bytes(const struct kvp_codec *c, unsigned n)
{
	return 2 * (size_t)c->dim * n;
}

static uint16_t load16(const unsigned char *p)
{
	return (uint16_t)(p[0] | p[1] << 8);
}

static int aligned(const void *p)
{
	return ((uintptr_t)p & 1) == 0;
}

static kvp_status fp16_encode(const struct kvp_codec *c, const void *ctx, unsigned n, const float *x, void *dst)
{
	unsigned char *p = dst;
	const size_t all = (size_t)n * c->dim, bad = kvp_first_outside(x, all, KVP_F16_OVERFLOW);

	(void)ctx;
	if (bad < all)
		return kvp_fail(KVP_EINVAL, "fp16: token %zu, channel %zu is %g: values must be finite and within +-65504",
				bad / c->dim, bad % c->dim, (double)x[bad]);
	if (aligned(dst)) {
		kvp_kernels()->f32_to_f16(all, x, dst);
		return KVP_OK;
	}
	for (size_t i = 0; i < all; i++) {
		uint16_t h = kvp_f32_to_f16(x[i]);
		p[2 * i] = (unsigned char)h;
		p[2 * i + 1] = (unsigned char)(h >> 8);
	}
	return KVP_OK;
}

static kvp_status fp16_decode(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, float *x)
{
	const unsigned char *p = src;

	(void)ctx;
	if (aligned(src)) {
		kvp_kernels()->f16_to_f32((size_t)n * c->dim, src, x);
		return KVP_OK;
	}
	for (size_t i = 0; i < (size_t)n * c->dim; i++)
		x[i] = kvp_f16_to_f32(load16(p + 2 * i));
	return KVP_OK;
}

static void fp16_prepare_query(const struct kvp_codec *c, const void *ctx, const float *q, void *qprep)
{
	(void)ctx;
	memcpy(qprep, q, sizeof(float) * c->dim);
}

static void fp16_dot(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, const void *qprep,
		     float *out)
{
	const unsigned char *p = src;
	const float *q = qprep;

	(void)ctx;
	if (aligned(src)) {
		kvp_kernels()->dot_f16(c->dim, n, src, q, 1.0f, out);
		return;
	}
	for (unsigned i = 0; i < n; i++) {
		float s = 0.0f;
		for (unsigned j = 0; j < c->dim; j++, p += 2)
			s += q[j] * kvp_f16_to_f32(load16(p));
		out[i] = s;
	}
}

static void fp16_axpy(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, const float *w,
		      float *acc)
{
	const unsigned char *p = src;

	(void)ctx;
	if (aligned(src)) {
		kvp_kernels()->axpy_f16(c->dim, n, src, w, acc);
		return;
	}
	for (unsigned i = 0; i < n; i++)
		for (unsigned j = 0; j < c->dim; j++, p += 2)
			acc[j] += w[i] * kvp_f16_to_f32(load16(p));
}

static void fp16_finish(const struct kvp_codec *c, const void *ctx, const float *acc, float *out)
{
	(void)ctx;
	for (unsigned j = 0; j < c->dim; j++)
		out[j] += acc[j];
}

const struct kvp_codec_ops kvp_codec_fp16 = {
	.name = "fp16",
	.flags = KVP_CODEC_SEPARABLE,
	.open = fp16_open,
	.bytes = fp16_bytes,
	.encode = fp16_encode,
	.decode = fp16_decode,
	.prepare_query = fp16_prepare_query,
	.dot = fp16_dot,
	.axpy = fp16_axpy,
	.finish = fp16_finish,
};
