/*
 * spark(keep=K, quantize=rotated)|turboquant(bits=B), B = 1..3: SparK's per-token pruning done in TurboQuant's
 * rotated basis instead of the channels' own. spark.c parses the arguments and hands the codec here; its ops
 * are this file's from then on (named "spark" still).
 *
 * Per token x of D channels (D a power of two, the inner codec's one Hadamard pass): n = ||x||, y = H (sgn .* x)
 * with sgn the inner codec's random signs and H the unnormalized Walsh-Hadamard transform, so that
 * g_j = y_j / n has about a unit Gaussian's spread whatever x is. The T = D - floor((1 - K) * D) coordinates of
 * largest |y_j| are kept (ties to the lower index) and stored as a sign and one of 2^(B-1) magnitudes; the
 * pruned ones as a sign alone. The levels are fixed, not fitted: the Lloyd-Max quantizer of a unit Gaussian's
 * magnitude beyond t, where P(|g| > t) = T / D, and for the pruned coordinates the Gaussian's mean magnitude
 * below t (recover=avg) or 0 (recover=zero); keep=0.5 at B=3 gives +-{0.8584, 1.2699, 1.7696, 2.4876} and
 * +-0.3247. The levels are then moved onto an int8 grid (the largest at 127), which is what the codes decode
 * to: a token decodes as (n / D) * sgn .* H level[code].
 *
 * Why: pruning in the rotated basis chooses among coordinates that all carry the same share of the query
 * (the rotation spreads its channels), so no per-channel query statistics are needed, and a token needs no
 * transform of its own at query time: with the query rotated once per step (as TurboQuant's keys are
 * scored), a token is a dense row of 4-bit codes over a 16-entry table (the kernel mask_codes builds it) that
 * the lut kernels score like TurboQuant's codes. On keys of kjv-2k (a numpy simulation of this format and
 * the library's own spark|tq3 and tq3 on the same trace) its attention error was 30-40% below
 * spark(quantize=kept)|turboquant(bits=3)'s and a little below turboquant(bits=3)'s.
 *
 * Layout of one token (mb = B - 1 magnitude bits):
 *   float32 n                 the token's norm
 *   keep mask, D bits         bit j set when coordinate j of y is kept, LSB first
 *   signs, D bits             bit j set when y_j < 0
 *   magnitudes, T * mb bits   the kept coordinates' levels in coordinate order, LSB first (none at B=1)
 *   bytes(n) = n * (4 + 2 * ceil(D/8) + ceil(T * mb / 8))
 * d=128, keep=0.5, B=3: 4 + 16 + 16 + 16 = 52 bytes (3.25 bits per value, turboquant(bits=3)'s); d=64: 28
 * bytes (spark(quantize=kept)|turboquant(bits=3): 32).
 *
 * Query paths: tokens in chunks, each chunk's code rows built once by mask_codes (code = sign << 3 | L, L = 0
 * pruned, 1 + magnitude kept, 15 for a token whose mask the encoder did not write: level 0). dot and axpy
 * are the float lookups (lut_dot, lut_axpy) against the query rotated once, and accumulate in the rotated
 * basis (acc_dim = D; finish rotates back once per query): the float reference. dot_group, attention's path,
 * is lut_dot_i8_group with the rotated query in int8, as TurboQuant's own group path; axpy_group runs
 * lut_axpy per head over the chunk's rows.
 */
#include <math.h>
#include <string.h>

#include "codecs/codec.h"
#include "kernels/kernels.h"

#define LEVELS_MAX 4 /* kept magnitudes at B = 3 */

/*
 * The encoder's loops run over channels in runs of RUN: a loop of a constant count is one gcc vectorizes at -O2
 * (its cheap cost model takes no loop of unknown count). d is a power of two; below RUN the runs pass its end
 * in the scratch, whose arrays are rounded up to RUN.
 */
#define RUN 16
_Static_assert(RUN == 16, "a run's sign bits are written as two bytes");

struct rotated {
	struct kvp_mask_rows rows;
	const float *sgn;           /* the inner codec's D random signs, +-1 */
	float inv_sqrt_d;
	float unit8;                /* lut8's step in g units */
	float thr[LEVELS_MAX - 1];  /* between consecutive kept levels, in g units; +inf past the levels */
	int8_t lut8[16];            /* code -> level on the int8 grid */
	float lut[16];              /* code -> lut8 * unit8 / sqrt(D): a coordinate of the rotated unit vector */
};

/* ---- Levels: a unit Gaussian's magnitude, in closed forms. ---- */

static double tail_mass(double a, double b)
{
	return 0.5 * (erfc(a / sqrt(2.0)) - (isinf(b) ? 0.0 : erfc(b / sqrt(2.0))));
}

static double tail_moment(double a, double b)
{
	const double k = 0.398942280401432678; /* 1 / sqrt(2 pi) */

	return k * exp(-0.5 * a * a) - (isinf(b) ? 0.0 : k * exp(-0.5 * b * b));
}

/* t with P(|g| > t) = p, 0 < p <= 1. */
static double tail_start(double p)
{
	double lo = 0.0, hi = 40.0;

	for (int i = 0; i < 200; i++) {
		double mid = 0.5 * (lo + hi);
		if (erfc(mid / sqrt(2.0)) > p)
			lo = mid;
		else
			hi = mid;
	}
	return lo;
}

/* The Lloyd-Max levels of |g| on (t, inf): thresholds at midpoints, levels at their cells' means. */
static void tail_levels(double t, unsigned k, double *c)
{
	for (unsigned i = 0; i < k; i++)
		c[i] = t + 0.5 * (i + 0.5);
	for (int it = 0; it < 1000; it++) {
		for (unsigned i = 0; i < k; i++) {
			double a = i ? 0.5 * (c[i - 1] + c[i]) : t, b = i + 1 < k ? 0.5 * (c[i] + c[i + 1]) : INFINITY;
			double m = tail_mass(a, b);

			if (m > 0.0)
				c[i] = tail_moment(a, b) / m;
		}
	}
}

/* The codebook: kept levels 1..2^mb and the pruned level 0, each signed, on the int8 grid. */
static void open_levels(struct rotated *r, unsigned d, unsigned kept, unsigned avg)
{
	const unsigned k = 1u << r->rows.mb;
	const double t = kept < d ? tail_start((double)kept / d) : 0.0;
	double c[LEVELS_MAX + 1];

	tail_levels(t, k, c + 1);
	c[0] = kept < d && avg ? tail_moment(0.0, t) / (0.5 * erf(t / sqrt(2.0))) : 0.0;
	r->unit8 = (float)(c[k] / 127.0);
	memset(r->lut8, 0, sizeof r->lut8);
	for (unsigned l = 0; l <= k; l++) {
		const int8_t v = (int8_t)kvp_nearest((float)(c[l] / r->unit8));

		r->lut8[l] = v;
		r->lut8[8 | l] = (int8_t)-v;
	}
	for (unsigned l = 0; l + 1 < LEVELS_MAX; l++)
		r->thr[l] = l + 1 < k ? 0.5f * (float)(r->lut8[l + 1] + r->lut8[l + 2]) * r->unit8 : INFINITY;
	for (unsigned code = 0; code < 16; code++)
		r->lut[code] = (float)r->lut8[code] * r->unit8 * r->inv_sqrt_d;
}

/* ---- Open. ---- */

/* Tokens per pass of the query paths: their code rows (d / 2 bytes each) about 4 KiB, a multiple of 16 (the
 * scratch is charged to the tenant with every sequence's codec, and a call is mostly one block's tokens). */
static unsigned chunk_tokens(unsigned d)
{
	unsigned n = 8192u / d;

	n = n < 16 ? 16 : n > 256 ? 256 : n;
	return n / 16 * 16;
}

/* The prepared query: the rotated query (D floats), the same in int8, then its step. */
struct rotated_query {
	float *f;
	int8_t *q8;
	float *step;
};

static struct rotated_query query_at(const struct kvp_codec *c, const void *qprep)
{
	struct rotated_query q;

	q.f = (float *)qprep;
	q.q8 = (int8_t *)(q.f + c->dim);
	q.step = (float *)(q.q8 + (c->dim + 3) / 4 * 4);
	return q;
}

/* The scratch: a chunk's code rows, then the floats of one token (encode: y, its kept values and their keys). */
static uint8_t *codes_of(const struct kvp_codec *c)
{
	return c->scratch;
}

static float *floats_of(const struct kvp_codec *c)
{
	return (float *)((uint8_t *)c->scratch + (size_t)chunk_tokens(c->dim) * (c->dim / 2));
}

int kvp_spark_rotated_takes(const struct kvp_codec *inner, unsigned dim)
{
	struct kvp_hadamard_codes hc;

	return dim >= 2 && inner->dim == dim && inner->ops->hadamard_codes && inner->ops->hadamard_codes(inner, &hc) &&
	       hc.bits <= 3;
}

kvp_status kvp_spark_rotated_open(struct kvp_codec *c, unsigned kept, unsigned avg, struct kvp_codec *inner)
{
	const unsigned d = c->dim, mbytes = (d + 7) / 8;
	struct kvp_hadamard_codes hc;
	struct rotated *r;

	if (!inner->ops->hadamard_codes || !inner->ops->hadamard_codes(inner, &hc))
		return kvp_fail(KVP_EINVAL, "spark: quantize=rotated needs a codec right of '|' whose tokens are one "
				"Hadamard pass over codes (turboquant at a power-of-two width, without qjl or outliers), "
				"not %s at %u channels", inner->ops->name, d);
	if (hc.bits > 3)
		return kvp_fail(KVP_EINVAL, "spark: quantize=rotated takes bits=1..3 right of '|' (a kept coordinate "
				"is a sign and bits-1 magnitude bits, 16 codes at most); got bits=%u", hc.bits);
	if (d < 2)
		return kvp_fail(KVP_EINVAL, "spark: quantize=rotated needs at least 2 channels, not %u", d);
	r = kvp_allocate(&c->mem, sizeof *r, "spark: its configuration");
	if (!r)
		return KVP_ENOMEM;
	r->rows = (struct kvp_mask_rows){ .d = d, .kept = kept, .mb = hc.bits - 1, .mask_at = sizeof(float),
					  .sign_at = sizeof(float) + mbytes, .mag_at = sizeof(float) + 2 * mbytes };
	r->rows.stride = r->rows.mag_at + ((size_t)kept * r->rows.mb + 7) / 8;
	r->sgn = hc.sign;
	r->inv_sqrt_d = 1.0f / sqrtf((float)d);
	open_levels(r, d, kept, avg);
	c->ops = &kvp_spark_rotated_ops;
	c->state = r;
	c->ctx_bytes = 0;
	c->fit_steps = 0;
	c->acc_dim = d;
	c->qprep_bytes = (sizeof(float) * (d + 1) + (d + 3) / 4 * 4 + 15) / 16 * 16;
	c->scratch_bytes = (size_t)chunk_tokens(d) * (d / 2) + 3 * sizeof(float) * (d > RUN ? d : RUN);
	return KVP_OK;
}

static void rotated_close(struct kvp_codec *c)
{
	kvp_release(&c->mem, c->state, sizeof(struct rotated));
	c->state = NULL;
}

static size_t rotated_bytes(const struct kvp_codec *c, unsigned n)
{
	const struct rotated *r = c->state;

	return r->rows.stride * n;
}

/* ---- Encode. ---- */

static void multiply_run(const float *restrict x, const float *restrict by, float *restrict v)
{
	for (unsigned j = 0; j < RUN; j++)
		v[j] = x[j] * by[j];
}

/* Keys: the bits of y_j^2, which order as |y_j| does (see spark.c's score keys). */
static void square_run(const float *restrict y, int32_t *restrict key)
{
	for (unsigned j = 0; j < RUN; j++) {
		float s = y[j] * y[j];
		memcpy(key + j, &s, sizeof s);
	}
}

/* Eight bytes of 0 or 1, byte i of x, as bits 0..7: the product puts byte i's bit at bit 56 + i, and its other
 * terms land on distinct bits, so nothing carries into them. */
static unsigned bytes_to_bits(uint64_t x)
{
	return (unsigned)((x * 0x0102040810204080ull) >> 56);
}

/* Bytes b[0..8) as x's bytes 0..7 (least significant first), whatever the byte order: one load. */
static uint64_t eight_bytes(const uint8_t *b)
{
	uint64_t x;

	memcpy(&x, b, sizeof x);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	x = __builtin_bswap64(x);
#endif
	return x;
}

/* Sign bits of a run, 1 = negative, channel j at bit j: a byte per channel (a loop gcc vectorizes), then eight
 * to a byte (a bit at a time took a compare, a shift and an or per channel). */
static unsigned sign_run(const float *restrict y)
{
	uint8_t neg[RUN];

	for (unsigned j = 0; j < RUN; j++)
		neg[j] = y[j] < 0.0f;
	return bytes_to_bits(eight_bytes(neg)) | bytes_to_bits(eight_bytes(neg + 8)) << 8;
}

/* Magnitudes of a run of kept values (|y| / norm, in g units): how many thresholds each passes (the unused
 * ones are +inf). */
static void magnitude_run(const float *restrict thr, const float *restrict kept, float inv, uint8_t *restrict m)
{
	for (unsigned t = 0; t < RUN; t++) {
		const float a = fabsf(kept[t]) * inv;
		m[t] = (uint8_t)((a > thr[0]) + (a > thr[1]) + (a > thr[2]));
	}
}

/* Eight 2-bit levels, byte i of x, as 16 bits LSB first: pairs of bytes into nibbles, then nibbles into bytes. */
static unsigned levels2_to_bits(uint64_t x)
{
	x = (x | x >> 6) & 0x000f000f000f000full;
	x = (x | x >> 12) & 0x000000ff000000ffull;
	return (unsigned)(x | x >> 24) & 0xffffu;
}

/* kept fields of mb bits (1 or 2) from m, LSB first, into out's (kept * mb + 7) / 8 bytes, eight fields at a
 * time; m has room for eight bytes past kept, which this zeroes. */
static void pack_magnitudes(uint8_t *m, unsigned kept, unsigned mb, uint8_t *out)
{
	const unsigned bytes = (kept * mb + 7) / 8;

	memset(m + kept, 0, 8);
	for (unsigned t = 0, at = 0; t < kept; t += 8) {
		const unsigned v = mb == 2 ? levels2_to_bits(eight_bytes(m + t)) : bytes_to_bits(eight_bytes(m + t));

		out[at++] = (uint8_t)v;
		if (mb == 2 && at < bytes)
			out[at++] = (uint8_t)(v >> 8);
	}
}

/* v = H (sgn .* x), unnormalized; d below RUN (head dimensions of 2, 4 and 8) channel by channel. */
static void rotate(const struct rotated *r, unsigned d, const float *x, float *v)
{
	for (unsigned j = 0; d < RUN && j < d; j++)
		v[j] = x[j] * r->sgn[j];
	for (unsigned j = 0; d >= RUN && j < d; j += RUN)
		multiply_run(x + j, r->sgn + j, v + j);
	kvp_kernels()->fwht(d, v);
}

/* v rotated and its keys. The scratch holds both rounded up to RUN. */
static void rotate_keys(const struct rotated *r, unsigned d, const float *x, float *v, int32_t *key)
{
	rotate(r, d, x, v);
	for (unsigned j = 0; j < d; j += RUN)
		square_run(v + j, key + j);
}

static void encode_one(const struct kvp_codec *c, float norm, const float *x, unsigned char *p)
{
	const struct rotated *r = c->state;
	const unsigned d = c->dim, kept = r->rows.kept, mb = r->rows.mb;
	const unsigned w = d > RUN ? d : RUN; /* the runs may pass d by less than RUN */
	float *y = floats_of(c), *kv = y + w;
	int32_t *key = (int32_t *)(kv + w);
	uint8_t m[KVP_CODEC_DIM_MAX + 8];
	const float inv = norm > 0.0f ? 1.0f / norm : 0.0f;

	rotate_keys(r, d, x, y, key);
	memset(p, 0, r->rows.stride);
	memcpy(p, &norm, sizeof norm);
	kvp_kernels()->spark_choose(d, kept, key, y, p + r->rows.mask_at, NULL, kv);
	for (unsigned j = 0; d >= RUN && j < d; j += RUN) {
		const unsigned v = sign_run(y + j);

		p[r->rows.sign_at + j / 8] = (uint8_t)v;
		p[r->rows.sign_at + j / 8 + 1] = (uint8_t)(v >> 8);
	}
	for (unsigned j = 0; d < RUN && j < d; j++)
		p[r->rows.sign_at] |= (uint8_t)((y[j] < 0.0f) << j);
	if (!mb)
		return;
	for (unsigned t = 0; t < kept; t += RUN)
		magnitude_run(r->thr, kv + t, inv, m + t);
	pack_magnitudes(m, kept, mb, p + r->rows.mag_at);
}

static kvp_status rotated_encode(const struct kvp_codec *c, const void *ctx, unsigned n, const float *x, void *dst)
{
	const struct rotated *r = c->state;
	unsigned char *p = dst;

	(void)ctx;
	for (unsigned i = 0; i < n; i++, p += r->rows.stride, x += c->dim) {
		float norm;

		if (kvp_first_outside(x, c->dim, INFINITY) < c->dim)
			return kvp_fail(KVP_EINVAL, "spark: token %u has a non-finite value", i);
		norm = (float)sqrt(kvp_kernels()->sum_squares(c->dim, x));
		if (!kvp_codec_scale_ok(norm))
			return kvp_fail(KVP_EINVAL, "spark: token %u's norm does not fit a float", i);
		encode_one(c, norm, x, p);
	}
	return KVP_OK;
}

/* ---- Check and decode. ---- */

static kvp_status rotated_check(const struct kvp_codec *c, unsigned n, const void *src)
{
	const struct rotated *r = c->state;
	const unsigned char *p = src;

	for (unsigned i = 0; i < n; i++, p += r->rows.stride) {
		if (!kvp_codec_scale_ok(kvp_load_f32(p)))
			return kvp_fail(KVP_ECORRUPT, "spark: token %u's norm is %g, not a finite number >= 0", i,
					(double)kvp_load_f32(p));
		if (kvp_mask_count(r->rows.d, p + r->rows.mask_at) != r->rows.kept)
			return kvp_fail(KVP_ECORRUPT, "spark: token %u's keep mask does not keep %u coordinates", i,
					r->rows.kept);
	}
	return KVP_OK;
}

/* Code rows of tokens [i, i + cn) of src into the scratch. */
static const uint8_t *code_rows(const struct kvp_codec *c, const void *src, unsigned i, unsigned cn)
{
	const struct rotated *r = c->state;

	kvp_kernels()->mask_codes(&r->rows, cn, (const uint8_t *)src + (size_t)i * r->rows.stride, codes_of(c));
	return codes_of(c);
}

/* out[0..d) (+)= (1/sqrt(d)) sgn .* H v, v rotated in place. */
static void unrotate(const struct rotated *r, unsigned d, float *v, float *out, int add)
{
	kvp_kernels()->fwht(d, v);
	for (unsigned j = 0; j < d; j++) {
		const float x = v[j] * r->sgn[j] * r->inv_sqrt_d;
		out[j] = add ? out[j] + x : x;
	}
}

static kvp_status rotated_decode(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, float *x)
{
	const struct rotated *r = c->state;
	const unsigned d = c->dim, step = chunk_tokens(d);
	float *v = floats_of(c);

	(void)ctx;
	for (unsigned i = 0; i < n; i += step) {
		const unsigned cn = n - i < step ? n - i : step;
		const uint8_t *rows = code_rows(c, src, i, cn);

		for (unsigned t = 0; t < cn; t++) {
			const float norm = kvp_load_f32((const uint8_t *)src + (size_t)(i + t) * r->rows.stride);

			memset(v, 0, sizeof(float) * d);
			kvp_kernels()->lut_axpy(4, d, 1, rows + (size_t)t * (d / 2), d / 2, r->lut, &norm, v);
			unrotate(r, d, v, x + (size_t)(i + t) * d, 0);
		}
	}
	return KVP_OK;
}

/* ---- Query paths, in the rotated basis. ---- */

static void rotated_prepare_query(const struct kvp_codec *c, const void *ctx, const float *q, void *qprep)
{
	const struct rotated *r = c->state;
	const struct rotated_query out = query_at(c, qprep);

	(void)ctx;
	rotate(r, c->dim, q, out.f);
	for (unsigned j = 0; j < c->dim; j++)
		out.f[j] *= r->inv_sqrt_d;
	*out.step = kvp_codec_query_i8(out.f, c->dim, out.q8);
}

/* The norms of tokens [i, i + cn), times w (NULL: 1). */
static void norms(const struct kvp_codec *c, const void *src, unsigned i, unsigned cn, const float *w, float *out)
{
	const struct rotated *r = c->state;
	const uint8_t *p = (const uint8_t *)src + (size_t)i * r->rows.stride;

	for (unsigned t = 0; t < cn; t++, p += r->rows.stride)
		out[t] = kvp_load_f32(p) * (w ? w[t] : 1.0f);
}

#define CHUNK_MAX 256

static void rotated_dot(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, const void *qprep,
			float *out)
{
	const struct rotated *r = c->state;
	const unsigned step = chunk_tokens(c->dim);
	float scale[CHUNK_MAX];

	(void)ctx;
	for (unsigned i = 0; i < n; i += step) {
		const unsigned cn = n - i < step ? n - i : step;

		kvp_kernels()->lut_dot(4, c->dim, cn, code_rows(c, src, i, cn), c->dim / 2, r->lut, qprep, out + i);
		norms(c, src, i, cn, NULL, scale);
		for (unsigned t = 0; t < cn; t++)
			out[i + t] *= scale[t];
	}
}

/* Attention's path: the integer lookups, the query in int8 (within the bound tests/test_spark.c states). */
static void rotated_dot_group(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, unsigned g,
			      const void *qprep, float *out, size_t out_stride)
{
	const struct rotated *r = c->state;
	const unsigned step = chunk_tokens(c->dim);
	float hs[KVP_CODEC_GROUP_MAX];

	(void)ctx;
	for (unsigned h = 0; h < g; h++)
		hs[h] = *query_at(c, (const char *)qprep + (size_t)h * c->qprep_bytes).step * r->unit8 * r->inv_sqrt_d;
	for (unsigned i = 0; i < n; i += step) {
		const unsigned cn = n - i < step ? n - i : step;

		kvp_kernels()->lut_dot_i8_group(4, c->dim, cn, code_rows(c, src, i, cn), c->dim / 2, r->lut8, g,
						query_at(c, qprep).q8, c->qprep_bytes, hs,
						(const uint8_t *)src + (size_t)i * r->rows.stride, r->rows.stride, out + i,
						out_stride, 0);
	}
}

static void rotated_axpy_group(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, unsigned g,
			       const float *w, size_t w_stride, float *acc)
{
	const struct rotated *r = c->state;
	const unsigned step = chunk_tokens(c->dim);
	float wn[CHUNK_MAX];

	(void)ctx;
	for (unsigned i = 0; i < n; i += step) {
		const unsigned cn = n - i < step ? n - i : step;
		const uint8_t *rows = code_rows(c, src, i, cn);

		for (unsigned h = 0; h < g; h++) {
			norms(c, src, i, cn, w + h * w_stride + i, wn);
			kvp_kernels()->lut_axpy(4, c->dim, cn, rows, c->dim / 2, r->lut, wn, acc + (size_t)h * c->acc_dim);
		}
	}
}

static void rotated_axpy(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, const float *w,
			 float *acc)
{
	rotated_axpy_group(c, ctx, n, src, 1, w, n, acc);
}

static void rotated_finish(const struct kvp_codec *c, const void *ctx, const float *acc, float *out)
{
	float *v = floats_of(c);

	(void)ctx;
	memcpy(v, acc, sizeof(float) * c->dim);
	unrotate(c->state, c->dim, v, out, 1);
}

const struct kvp_codec_ops kvp_spark_rotated_ops = {
	.name = "spark",
	.flags = KVP_CODEC_SEPARABLE | KVP_CODEC_STACKS,
	.bytes = rotated_bytes,
	.encode = rotated_encode,
	.decode = rotated_decode,
	.check = rotated_check,
	.prepare_query = rotated_prepare_query,
	.dot = rotated_dot,
	.axpy = rotated_axpy,
	.dot_group = rotated_dot_group,
	.axpy_group = rotated_axpy_group,
	.finish = rotated_finish,
	.close = rotated_close,
};
