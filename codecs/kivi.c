/*
 * kivi(bits=1..4, group=G, axis=channel|token): KIVI (Liu et al., arXiv 2402.02750), asymmetric
 * round-to-nearest group quantization: z = min, s = (max - min) / (2^bits - 1),
 * q = clamp(round((x - z) / s), 0, 2^bits - 1), x' = z + s q. The reference uses bits 2 and 4 (its
 * packing also allows 8; not served here, the fused kernels take codes of up to 4 bits). G is a multiple
 * of 8 (default 32, as in the paper), so every group's codes start on a byte.
 *
 * axis=channel (keys): one group is G consecutive tokens of one channel. Not separable: c->group = G,
 * and n must be a multiple of G. axis=token (values): one group is G consecutive channels of one token
 * (the last group of a token may be shorter when G does not divide dim). Separable, c->group = 1.
 * The default axis comes from the side of the cache the codec was parsed for: keys (kvp_codec_parse,
 * kvp_codec_open) take axis=channel, values (kvp_codec_parse_role(..., KVP_CODEC_VALUES, ...), which
 * the pager uses for v=) take axis=token. An explicit axis= wins.
 *
 * z and s are stored as fp16 (as in the reference, whose cache dtype is fp16), and the codes are computed
 * against the rounded z and s, so decode matches what encode measured. A group whose values are all equal
 * has s = 0 and every code 0: it decodes to z exactly (to the value itself when that is an fp16 number).
 * Groups whose z or s overflow fp16, or with non-finite values, are rejected with KVP_EINVAL.
 *
 * The fused paths use integer codes as the table 0, 1, 2, ... of the kernels' lut_dot/lut_axpy:
 *   values (per token): <q, x> = sum_g z_g * sum(q over g) + s_g * sum_{j in g} q_j code_j
 *   keys (per channel): a group's codes are d rows (channels) of G codes, so dot is one lut_axpy over
 *   the channels with weights q_j s_j, and axpy is one lut_dot of the weights against each channel.
 *
 * Layout, codes packed LSB first into one bit stream zero padded to a byte:
 *   axis=channel, per group of G tokens:  fp16 z[dim], fp16 s[dim], codes channel by channel, each channel's
 *     G codes consecutive (packed along tokens, as the reference packs keys).
 *     bytes(n) = n/G * (4*dim + ceil(dim*G*bits / 8))
 *   axis=token, per token (ng = ceil(dim/G)): fp16 z[ng], fp16 s[ng], codes of the dim channels in order.
 *     bytes(n) = n * (4*ng + ceil(dim*bits / 8))
 * d=128, G=32, bits=2: 3.0 bits per value on either axis; bits=4: 5.0 (bits=1: 2.0, bits=3: 4.0).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "codecs/codec.h"
#include "kernels/kernels.h"

struct kivi {
	unsigned bits, g, per_token, ng;
	size_t stride; /* bytes of one group of G tokens (channel) or of one token (token) */
};

static kvp_status kivi_open(struct kvp_codec *c, struct kvp_args *args, unsigned dim, struct kvp_codec *inner)
{
	static const char *const axes[] = { "channel", "token", NULL };
	uint32_t bits = 2, g = 32;
	unsigned axis = c->role == KVP_CODEC_VALUES;
	struct kivi *k;
	kvp_status st;

	(void)inner;
	if ((st = kvp_args_u32(args, "bits", 1, 4, &bits)) != KVP_OK ||
	    (st = kvp_args_u32(args, "group", 8, 4096, &g)) != KVP_OK ||
	    (st = kvp_args_choice(args, "axis", axes, &axis)) != KVP_OK)
		return st;
	if (g % 8)
		return kvp_fail(KVP_EINVAL, "kivi: group=%u is not a multiple of 8", g);
	k = kvp_allocate(&c->mem, sizeof *k, "kivi: its configuration");
	if (!k)
		return KVP_ENOMEM;
	k->bits = bits;
	k->g = g;
	k->per_token = axis == 1;
	if (k->per_token) {
		k->ng = (dim + g - 1) / g;
		k->stride = 4 * (size_t)k->ng + ((size_t)dim * bits + 7) / 8;
		c->qprep_bytes = sizeof(float) * (dim + k->ng);
	} else {
		k->stride = 4 * (size_t)dim + ((size_t)dim * g * bits + 7) / 8;
		c->group = g;
		c->flags &= ~KVP_CODEC_SEPARABLE;
		c->qprep_bytes = sizeof(float) * dim;
	}
	c->acc_dim = dim;
	c->scratch_bytes = sizeof(float) * dim; /* kivi_dot's and kivi_axpy's per-channel products */
	c->state = k;
	return KVP_OK;
}

static void kivi_close(struct kvp_codec *c)
{
	kvp_release(&c->mem, c->state, sizeof(struct kivi));
	c->state = NULL;
}

static size_t kivi_bytes(const struct kvp_codec *c, unsigned n)
{
	const struct kivi *k = c->state;
	return k->stride * (k->per_token ? n : n / k->g);
}

static void store16(unsigned char *p, float v)
{
	uint16_t h = kvp_f32_to_f16(v);
	p[0] = (unsigned char)h;
	p[1] = (unsigned char)(h >> 8);
}

static float load16(const unsigned char *p)
{
	return kvp_f16_to_f32((uint16_t)(p[0] | p[1] << 8));
}

/*
 * Quantizes the m values x[0], x[step], ... into codes at bit offset o, storing z at zp and s at sp.
 * The scale is rounded to fp16 first and the codes measured against it.
 */
static kvp_status quantize(unsigned bits, unsigned m, const float *x, size_t step, unsigned char *zp,
			   unsigned char *sp, unsigned char *codes, size_t o)
{
	float lo = x[0], hi = x[0], z, s;
	unsigned top = (1u << bits) - 1;

	/* fminf skips NaNs, so every value is checked on its own */
	for (unsigned i = 0; i < m; i++) {
		if (!isfinite(x[i * step]))
			return kvp_fail(KVP_EINVAL, "kivi: a group has a non-finite value");
		lo = fminf(lo, x[i * step]);
		hi = fmaxf(hi, x[i * step]);
	}
	if (!isfinite(hi - lo))
		return kvp_fail(KVP_EINVAL, "kivi: group range %g..%g is beyond float", (double)lo, (double)hi);
	store16(zp, lo);
	z = load16(zp);
	store16(sp, (hi - z) / (float)top);
	s = load16(sp);
	if (!isfinite(z) || !isfinite(s))
		return kvp_fail(KVP_EINVAL, "kivi: group range %g..%g is beyond fp16", (double)lo, (double)hi);
	if (s <= 0.0f) /* all values equal (or a range below fp16's resolution): every code is 0 */
		return KVP_OK;
	for (unsigned i = 0; i < m; i++) {
		float q = rintf((x[i * step] - z) / s);
		unsigned v = q <= 0.0f ? 0 : q >= (float)top ? top : (unsigned)q;
		kvp_bits_put(codes, o + (size_t)i * bits, bits, v);
	}
	return KVP_OK;
}

static kvp_status kivi_encode(const struct kvp_codec *c, const void *ctx, unsigned n, const float *x, void *dst)
{
	const struct kivi *k = c->state;
	unsigned char *p = dst;
	unsigned d = c->dim;
	kvp_status st;

	(void)ctx;
	if (k->per_token) {
		for (unsigned i = 0; i < n; i++, p += k->stride, x += d) {
			memset(p, 0, k->stride);
			for (unsigned g = 0; g < k->ng; g++) {
				unsigned j0 = g * k->g, m = d - j0 < k->g ? d - j0 : k->g;
				st = quantize(k->bits, m, x + j0, 1, p + 2 * g, p + 2 * (k->ng + g), p + 4 * k->ng,
					      (size_t)j0 * k->bits);
				if (st != KVP_OK)
					return st;
			}
		}
		return KVP_OK;
	}
	for (unsigned i = 0; i < n; i += k->g, p += k->stride, x += (size_t)k->g * d) {
		memset(p, 0, k->stride);
		for (unsigned j = 0; j < d; j++) {
			st = quantize(k->bits, k->g, x + j, d, p + 2 * j, p + 2 * (d + j), p + 4 * d,
				      (size_t)j * k->g * k->bits);
			if (st != KVP_OK)
				return st;
		}
	}
	return KVP_OK;
}

static float code_at(const struct kivi *k, const unsigned char *codes, size_t index)
{
	return (float)kvp_bits_get(codes, index * k->bits, k->bits);
}

static kvp_status kivi_decode(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, float *x)
{
	const struct kivi *k = c->state;
	const unsigned char *p = src;
	unsigned d = c->dim;

	(void)ctx;
	if (k->per_token) {
		for (unsigned i = 0; i < n; i++, p += k->stride, x += d)
			for (unsigned j = 0; j < d; j++) {
				unsigned g = j / k->g;
				x[j] = load16(p + 2 * g) + load16(p + 2 * (k->ng + g)) * code_at(k, p + 4 * k->ng, j);
			}
		return KVP_OK;
	}
	for (unsigned i = 0; i < n; i += k->g, p += k->stride, x += (size_t)k->g * d)
		for (unsigned j = 0; j < d; j++) {
			float z = load16(p + 2 * j), s = load16(p + 2 * (d + j));
			for (unsigned t = 0; t < k->g; t++)
				x[(size_t)t * d + j] = z + s * code_at(k, p + 4 * d, (size_t)j * k->g + t);
		}
	return KVP_OK;
}

/* qprep: q, then (axis=token) the sum of q over each channel group, which multiplies that group's z. */
static void kivi_prepare_query(const struct kvp_codec *c, const void *ctx, const float *q, void *qprep)
{
	const struct kivi *k = c->state;
	float *qp = qprep;

	(void)ctx;
	memcpy(qp, q, sizeof(float) * c->dim);
	if (!k->per_token)
		return;
	for (unsigned g = 0; g < k->ng; g++)
		qp[c->dim + g] = 0.0f;
	for (unsigned j = 0; j < c->dim; j++)
		qp[c->dim + j / k->g] += q[j];
}

static const float integers[16] = { 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15 };

/* Tokens per pass of the per-token paths: their per-token scalars live on the stack. */
#define CHUNK 256

static void dot_per_token(const struct kvp_codec *c, unsigned n, const unsigned char *p, const float *q,
			  float *out)
{
	const struct kvp_kernels *kern = kvp_kernels();
	const struct kivi *k = c->state;
	unsigned d = c->dim;
	float s[CHUNK];

	for (unsigned i0 = 0; i0 < n; i0 += CHUNK, p += k->stride * CHUNK, out += CHUNK) {
		unsigned cn = n - i0 < CHUNK ? n - i0 : CHUNK;

		for (unsigned i = 0; i < cn; i++)
			out[i] = 0.0f;
		for (unsigned g = 0; g < k->ng; g++) {
			unsigned j0 = g * k->g, m = d - j0 < k->g ? d - j0 : k->g;
			const unsigned char *tok = p;

			kern->lut_dot(k->bits, m, cn, p + 4 * k->ng + (size_t)j0 * k->bits / 8, k->stride, integers,
				      q + j0, s);
			for (unsigned i = 0; i < cn; i++, tok += k->stride)
				out[i] += load16(tok + 2 * g) * q[d + g] + load16(tok + 2 * (k->ng + g)) * s[i];
		}
	}
}

static void kivi_dot(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, const void *qprep,
		     float *out)
{
	const struct kvp_kernels *kern = kvp_kernels();
	const struct kivi *k = c->state;
	const unsigned char *p = src;
	const float *q = qprep;
	unsigned d = c->dim;
	float *qs = c->scratch; /* [dim] */

	(void)ctx;
	if (k->per_token) {
		dot_per_token(c, n, p, q, out);
		return;
	}
	for (unsigned i = 0; i < n; i += k->g, p += k->stride, out += k->g) {
		float zq = 0.0f;
		for (unsigned j = 0; j < d; j++) {
			zq += q[j] * load16(p + 2 * j);
			qs[j] = q[j] * load16(p + 2 * (d + j));
		}
		for (unsigned t = 0; t < k->g; t++)
			out[t] = zq;
		kern->lut_axpy(k->bits, k->g, d, p + 4 * d, (size_t)k->g * k->bits / 8, integers, qs, out);
	}
}

static void axpy_per_token(const struct kvp_codec *c, unsigned n, const unsigned char *p, const float *w,
			   float *acc)
{
	const struct kvp_kernels *kern = kvp_kernels();
	const struct kivi *k = c->state;
	unsigned d = c->dim;
	float ws[CHUNK];

	for (unsigned i0 = 0; i0 < n; i0 += CHUNK, p += k->stride * CHUNK, w += CHUNK) {
		unsigned cn = n - i0 < CHUNK ? n - i0 : CHUNK;

		for (unsigned g = 0; g < k->ng; g++) {
			unsigned j0 = g * k->g, m = d - j0 < k->g ? d - j0 : k->g;
			const unsigned char *tok = p;
			float wz = 0.0f;

			for (unsigned i = 0; i < cn; i++, tok += k->stride) {
				wz += w[i] * load16(tok + 2 * g);
				ws[i] = w[i] * load16(tok + 2 * (k->ng + g));
			}
			kern->lut_axpy(k->bits, m, cn, p + 4 * k->ng + (size_t)j0 * k->bits / 8, k->stride, integers,
				       ws, acc + j0);
			for (unsigned j = j0; j < j0 + m; j++)
				acc[j] += wz;
		}
	}
}

static void kivi_axpy(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, const float *w,
		      float *acc)
{
	const struct kvp_kernels *kern = kvp_kernels();
	const struct kivi *k = c->state;
	const unsigned char *p = src;
	unsigned d = c->dim;
	float *s = c->scratch; /* [dim] */

	(void)ctx;
	if (k->per_token) {
		axpy_per_token(c, n, p, w, acc);
		return;
	}
	for (unsigned i = 0; i < n; i += k->g, p += k->stride, w += k->g) {
		float wsum = 0.0f;
		for (unsigned t = 0; t < k->g; t++)
			wsum += w[t];
		kern->lut_dot(k->bits, k->g, d, p + 4 * d, (size_t)k->g * k->bits / 8, integers, w, s);
		for (unsigned j = 0; j < d; j++)
			acc[j] += load16(p + 2 * j) * wsum + load16(p + 2 * (d + j)) * s[j];
	}
}

static void kivi_finish(const struct kvp_codec *c, const void *ctx, const float *acc, float *out)
{
	(void)ctx;
	for (unsigned j = 0; j < c->dim; j++)
		out[j] += acc[j];
}

const struct kvp_codec_ops kvp_codec_kivi = {
	.name = "kivi",
	.flags = KVP_CODEC_SEPARABLE | KVP_CODEC_BITS, /* axis=channel clears SEPARABLE in open */
	.with_bits = kvp_codec_bits_arg,
	.open = kivi_open,
	.bytes = kivi_bytes,
	.encode = kivi_encode,
	.decode = kivi_decode,
	.prepare_query = kivi_prepare_query,
	.dot = kivi_dot,
	.axpy = kivi_axpy,
	.finish = kivi_finish,
	.close = kivi_close,
};
