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
 * A range that ends on a zero ends on +0, whatever the signs of the zeros and their order.
 * Groups whose z or s overflow fp16, or with non-finite values, are rejected with KVP_EINVAL.
 *
 * Layout, codes packed LSB first into rows (code i of a row at bits [i*bits, (i+1)*bits)), zero padded
 * to a byte:
 *   axis=channel, per group of G tokens:  fp16 z[dim], fp16 s[dim], then each token's row of its dim codes
 *     (row = ceil(dim*bits/8) bytes), stored by columns: byte b of token t's row at b*G + t, so that the
 *     G tokens' bytes b are contiguous (kernels.h, dot_i8_scaled: the kernel's lanes are tokens).
 *     bytes(n) = n/G * (4*dim + G*ceil(dim*bits/8)); the same as the reference's n/G * (4*dim + dim*G*bits/8)
 *     whenever dim*bits is a multiple of 8 (every dim that is a multiple of 8), else < 1 byte per token more.
 *   axis=token, per token (ng = ceil(dim/G)): fp16 z[ng], fp16 s[ng], one row of the dim channels' codes.
 *     bytes(n) = n * (4*ng + ceil(dim*bits / 8))
 * d=128, G=32, bits=2: 3.0 bits per value on either axis; bits=4: 5.0 (bits=1: 2.0, bits=3: 4.0).
 *
 * Attention works on the codes with the integers 0, 1, 2, ... as the table.
 *   keys (per channel): <q, x_t> = sum_j q_j z_j + sum_j (q_j s_j) code_jt. dot_group (attention's path),
 *     per block's groups of G tokens and for all the heads of a GQA group: one dot_i8_scaled, which reads each
 *     group's fp16 z and s itself, sums <q, z> in floats and makes each head's q * s an int8 query on the step
 *     max_j |q_j s_j| / 127, summed against the codes exactly (AVX-512: the heads' queries in one pass,
 *     then vpdpbusd with tokens as lanes, no horizontal sums; AVX2: vpmaddubsw with a token per dword lane,
 *     the int16 sums widened before they could overflow). A score moves by at most step / 2 *
 *     sum_j code_jt (tests/test_kivi.c checks this; tests/test_attend.c the attention's error at 32K tokens).
 *     dot, the float reference, gathers each token's row and runs lut_dot on q * s.
 *   values (per token): sum_t w_t x_tj = sum_t (w_t s_tg) code_tj + sum_t w_t z_tg over each channel
 *     group g. axpy_group (attention's path) reads each token's fp16 z and s in the kernel and adds each
 *     head's sums of w_t z_tg to acc[dim + g] (ng more floats, acc_dim = dim + ng, which finish adds to the
 *     group's channels once per step). Weights that are not negative (attention's) take axpy_u8_scaled: 8
 *     bits above the call's least w_t s_tg, against the centred codes 2 code - L (z + s L / 2 joins the z
 *     sums), four tokens per vpdpbusd lane (AVX2: per vpmaddubsw dword); a span's blocks are its runs of
 *     rows (axpy_span), so that the weight step and the flush of the sums come once per span. Centring
 *     matters: with the codes 0..L themselves every token's rounding error adds up in the sums' common
 *     part, and at 32K tokens attention moved 1.8e-3 (2 bits) and 2.3e-3 (4 bits) from the decode, 1.1e-3
 *     and 1.0e-3 centred (0.76e-3 and 0.78e-3 on 12-bit weights); kvpager-ab's KL on kjv-64 is 1.09e-3
 *     either way. At 32K tokens, d=128, a layer took 12% less time than with axpy_i16_scaled (interleaved
 *     runs); with the AVX2 table, where loops.h's loops ran keys and values before, 24.5 ms, now 10.1 ms
 *     (with the keys' AVX2 kernel). Other weights, shapes the kernel's vector version leaves and tables
 *     without one (NEON) take axpy_i16_scaled per pass of tokens: 12 bits of the largest (step = max /
 *     4095; a channel's sum moves by at most step / 2 * sum_t code_tj, tested). Its AVX-512 version, groups
 *     of 32: channels are the lanes of vpdpwssd, two tokens' codes of a lane's byte placed by one vpermb
 *     and masked plane by plane (code * 4^j), against a qword of the two tokens' weights of the chunk's two
 *     groups. axpy, the float reference: one lut_axpy per channel group with weights w_t s_tg, the z sums
 *     by the fp16 dot kernels.
 *   The other two combinations (explicit axis=): keys per token one lut_dot per channel group, values per
 *   channel one lut_axpy per token's row (gathered from the columns).
 * Tried at G=32 (pager attention, d=128, GQA 4) and not kept: key rows of tokens with lut_dot_group (no
 * faster; about 40% of its time goes to the per-row horizontal sums), and lut_dot_i8_group with the query
 * times the scales in int8 per group, from plain C (slower: the quantization, 4 heads x dim values per 32
 * tokens in SSE2, took 2.4x the kernel's time, and the kernel's per-call setup and per-row horizontal sums
 * come once per 32 tokens). Values through lut_axpy_i16_group per channel group (weights w_t s_tg) were
 * slower than the float lut_axpy_group: its AVX-512 version works on 64-column chunks, half idle at
 * G = 32, and rounds every head's weights again for each channel group of each 64-token block; hence the
 * two kernels of KIVI's own shape (dot_i8_scaled, axpy_i16_scaled). Their per-call work was most of their
 * time at first (in cache, d=128, GQA 4, per token: keys 9.8 ns, values 17.6 ns): the fp16 scalars gathered
 * two bytes at a time into planar rows, the int8 queries stored byte-masked (the kernel's loads then waited
 * on them), gcc copying vpdpwssd's accumulators around every product; folding the scalars into the kernels
 * and the fixes above took that to about 6.5 and 7-9 ns. Tried and dropped: keys by the values' plane trick
 * (sixteen rows' four column bytes per lane by one vpermt2b, four masks): no faster than the byte columns.
 *
 * Encode and decode run in blocks of fixed size that the compiler vectorizes (ranges over rows of
 * channels, fp16 rounding by the kernels' converters, rounding by adding 1.5 * 2^23, a token's codes
 * packed eight at a time by shifts within a 64-bit word, a key token's row then put into its group's
 * columns byte by byte; the host is little-endian, as kernels.h's code words take it), and give the same bytes
 * and floats as the scalar reference kept below (kvp_kivi_encode_reference, kvp_kivi_decode_reference),
 * which tests/test_kivi.c compares them with.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "codecs/codec.h"
#include "kernels/kernels.h"

struct kivi {
	unsigned bits, g, per_token, ng;
	size_t row;    /* bytes of a token's row of dim codes (either axis) */
	size_t stride; /* bytes of one group of G tokens (channel) or of one token (token) */
};

/* Heads of a GQA group whose weights the group paths prepare at once (the kernels take them four at a time). */
#define HEADS 4
/* Key groups whose scalars dot converts at once. */
#define GROUPS 2
/* Tokens per pass of the per-token paths: their per-token weights live on the stack. */
#define SLICE 128
/* fp16 scalars of one pass of the per-token paths (z and s of each channel group of each token). */
#define SLICE_SCALARS 1024

/*
 * c->scratch, in rows of dim floats; regions that no call uses together overlap:
 *   0 zf, 1 sf              z and s per channel (encode, decode, axpy per channel)
 *   2-4 lo, hi, bad         encode's ranges (encode per token: every group's lo, hi, bad, z, s in 2-4)
 *   2-5 ws                  HEADS rows: queries or weights times the scales (dot, axpy)
 *   6-9 zs                  2 GROUPS rows: dot's z and s of GROUPS key groups
 *   6 codes, 7 row          encode and decode: a token's codes, one per byte, and its packed row
 *   10-11 h16               2 GROUPS rows of fp16 scalars
 */
#define SCRATCH_ROWS 12

struct kivi_scratch {
	float *zf, *sf, *lo, *hi, *bad, *ws, *zs;
	uint16_t *h16;
	uint8_t *codes, *row;
};

static struct kivi_scratch scratch_of(const struct kvp_codec *c)
{
	const size_t d = c->dim;
	float *f = c->scratch;
	struct kivi_scratch s;

	s.zf = f, s.sf = f + d, s.lo = f + 2 * d, s.hi = f + 3 * d, s.bad = f + 4 * d;
	s.ws = f + 2 * d, s.zs = f + (2 + HEADS) * d;
	s.codes = (uint8_t *)s.zs;
	s.row = (uint8_t *)(s.zs + d);
	s.h16 = (uint16_t *)(s.zs + 2 * GROUPS * d);
	return s;
}

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
		k->row = ((size_t)dim * bits + 7) / 8;
		k->stride = 4 * (size_t)k->ng + k->row;
		c->qprep_bytes = sizeof(float) * (dim + k->ng);
		c->acc_dim = dim + k->ng; /* then the sums of w z per channel group, added to its channels by finish */
	} else {
		k->ng = dim;
		k->row = ((size_t)dim * bits + 7) / 8;
		k->stride = 4 * (size_t)dim + g * k->row;
		c->group = g;
		c->flags &= ~KVP_CODEC_SEPARABLE;
		c->qprep_bytes = sizeof(float) * dim;
		c->acc_dim = dim;
	}
	c->scratch_bytes = SCRATCH_ROWS * sizeof(float) * dim;
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

/* ---- The scalar reference ---- */

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
 * Quantizes the m values x[0], x[step], ... into codes (one per byte, all 0 when the range is 0), storing z
 * at zp and s at sp. The scale is rounded to fp16 first and the codes measured against it.
 */
static kvp_status quantize(unsigned bits, unsigned m, const float *x, size_t step, unsigned char *zp,
			   unsigned char *sp, uint8_t *codes)
{
	float lo = x[0], hi = x[0], z, s;
	unsigned top = (1u << bits) - 1;

	memset(codes, 0, m);
	/* comparisons skip NaNs, so every value is checked on its own */
	for (unsigned i = 0; i < m; i++) {
		if (!isfinite(x[i * step]))
			return kvp_fail(KVP_EINVAL, "kivi: a group has a non-finite value");
		lo = x[i * step] < lo ? x[i * step] : lo;
		hi = x[i * step] > hi ? x[i * step] : hi;
	}
	if (!isfinite(hi - lo))
		return kvp_fail(KVP_EINVAL, "kivi: group range %g..%g is beyond float", (double)lo, (double)hi);
	lo += 0.0f, hi += 0.0f; /* -0 as +0: which zero a range ends on does not depend on the order of values */
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
		codes[i] = (uint8_t)(q <= 0.0f ? 0 : q >= (float)top ? top : (unsigned)q);
	}
	return KVP_OK;
}

/* Key groups store their tokens' rows by columns: byte b of token t's row at cols[b * G + t]. */
static void column_put(uint8_t *cols, unsigned g, unsigned t, size_t o, unsigned bits, unsigned v)
{
	const size_t b = o >> 3;
	const unsigned shift = (unsigned)(o & 7);

	cols[b * g + t] |= (uint8_t)(v << shift);
	if (shift + bits > 8)
		cols[(b + 1) * g + t] |= (uint8_t)(v >> (8 - shift));
}

static unsigned column_get(const uint8_t *cols, unsigned g, unsigned t, size_t o, unsigned bits)
{
	const size_t b = o >> 3;
	const unsigned shift = (unsigned)(o & 7);
	unsigned v = (unsigned)cols[b * g + t] >> shift;

	if (shift + bits > 8)
		v |= (unsigned)cols[(b + 1) * g + t] << (8 - shift);
	return v & ((1u << bits) - 1);
}

/* One group of G key tokens (channel) into p. */
static kvp_status encode_group_reference(const struct kivi *k, unsigned d, const float *x, unsigned char *p)
{
	uint8_t codes[4096]; /* G <= 4096 */
	kvp_status st;

	memset(p, 0, k->stride);
	for (unsigned j = 0; j < d; j++) {
		if ((st = quantize(k->bits, k->g, x + j, d, p + 2 * j, p + 2 * (d + j), codes)) != KVP_OK)
			return st;
		for (unsigned t = 0; t < k->g; t++)
			column_put(p + 4 * (size_t)d, k->g, t, (size_t)j * k->bits, k->bits, codes[t]);
	}
	return KVP_OK;
}

/* One value token (token) into p. */
static kvp_status encode_token_reference(const struct kivi *k, unsigned d, const float *x, unsigned char *p)
{
	uint8_t codes[4096]; /* G <= 4096 */
	kvp_status st;

	memset(p, 0, k->stride);
	for (unsigned g = 0; g < k->ng; g++) {
		unsigned j0 = g * k->g, m = d - j0 < k->g ? d - j0 : k->g;
		if ((st = quantize(k->bits, m, x + j0, 1, p + 2 * g, p + 2 * (k->ng + g), codes)) != KVP_OK)
			return st;
		for (unsigned i = 0; i < m; i++)
			kvp_bits_put(p + 4 * k->ng, (size_t)(j0 + i) * k->bits, k->bits, codes[i]);
	}
	return KVP_OK;
}

kvp_status kvp_kivi_encode_reference(const struct kvp_codec *c, const void *ctx, unsigned n, const float *x,
				     void *dst)
{
	const struct kivi *k = c->state;
	const unsigned d = c->dim, step = k->per_token ? 1 : k->g;
	unsigned char *p = dst;
	kvp_status st;

	(void)ctx;
	for (unsigned i = 0; i < n; i += step, p += k->stride, x += (size_t)step * d) {
		st = k->per_token ? encode_token_reference(k, d, x, p) : encode_group_reference(k, d, x, p);
		if (st != KVP_OK)
			return st;
	}
	return KVP_OK;
}

static float code_at(const struct kivi *k, const unsigned char *codes, size_t index)
{
	return (float)kvp_bits_get(codes, index * k->bits, k->bits);
}

kvp_status kvp_kivi_decode_reference(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src,
				     float *x)
{
	const struct kivi *k = c->state;
	const unsigned char *p = src;
	const unsigned d = c->dim;

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
				x[(size_t)t * d + j] =
					z + s * (float)column_get(p + 4 * (size_t)d, k->g, t, (size_t)j * k->bits, k->bits);
		}
	return KVP_OK;
}

/* ---- Blocks the vectorizer takes ---- */

/*
 * Every loop below runs in blocks of BLOCK on restrict pointers with a fixed trip count, which gcc's -O2
 * vectorizer (its "very cheap" cost model takes no loop that needs a remainder) and clang's take for SSE2,
 * AVX2 or NEON alike, and ends with the scalar remainder. Each computes the reference's float operations
 * on the same operands, so encode and decode give the reference's bits.
 */
#define BLOCK 16

/* rintf for |v| < 2^22 (ties to even): v + 1.5 * 2^23 lies in [2^23, 2^24), where the floats are the
 * integers. A larger |v| comes back near v, so clamping it to [0, top] gives what clamping rintf(v) does. */
#define ROUNDER 12582912.0f

/* The reference's code of x against z and s, as a float in [0, top]. Where s <= 0 the quotient by +inf is a
 * zero and so the code 0, as the reference has it, without a second branch (which gcc would not vectorize). */
static inline float code_of(float x, float z, float s, float top)
{
	float v = (x - z) / (s > 0.0f ? s : INFINITY), r = (v + ROUNDER) - ROUNDER;

	r = r < 0.0f ? 0.0f : r;
	return r > top ? top : r;
}

static void codes16(uint8_t *restrict c, const float *restrict x, const float *restrict z, const float *restrict s,
		    float top)
{
	for (unsigned l = 0; l < BLOCK; l++)
		c[l] = (uint8_t)(int)code_of(x[l], z[l], s[l], top);
}

/* codes[j] = the code of x[j] against z[j] and s[j], m of them */
static void codes_of(unsigned bits, unsigned m, const float *x, const float *z, const float *s, uint8_t *codes)
{
	const float top = (float)((1u << bits) - 1);
	unsigned j = 0;

	for (; j + BLOCK <= m; j += BLOCK)
		codes16(codes + j, x + j, z + j, s + j, top);
	for (; j < m; j++)
		codes[j] = (uint8_t)(int)code_of(x[j], z[j], s[j], top);
}

/* The running range of a row, NaN in bad from the first value that is not finite (v * 0 is NaN then). */
static void range16(float *restrict lo, float *restrict hi, float *restrict bad, const float *restrict x)
{
	for (unsigned l = 0; l < BLOCK; l++) {
		float v = x[l];
		lo[l] = v < lo[l] ? v : lo[l];
		hi[l] = v > hi[l] ? v : hi[l];
		bad[l] += v * 0.0f;
	}
}

static void range_row(unsigned m, float *lo, float *hi, float *bad, const float *x)
{
	unsigned j = 0;

	for (; j + BLOCK <= m; j += BLOCK)
		range16(lo + j, hi + j, bad + j, x + j);
	for (; j < m; j++) {
		lo[j] = x[j] < lo[j] ? x[j] : lo[j];
		hi[j] = x[j] > hi[j] ? x[j] : hi[j];
		bad[j] += x[j] * 0.0f;
	}
}

static void scale16(float *restrict s, const float *restrict hi, const float *restrict z, float top)
{
	for (unsigned l = 0; l < BLOCK; l++)
		s[l] = (hi[l] - z[l]) / top;
}

/* s = (hi - z) / top, m of them */
static void scales_of(unsigned m, float *s, const float *hi, const float *z, float top)
{
	unsigned j = 0;

	for (; j + BLOCK <= m; j += BLOCK)
		scale16(s + j, hi + j, z + j, top);
	for (; j < m; j++)
		s[j] = (hi[j] - z[j]) / top;
}

/* x = z + s * code: product, then sum, as the reference (the same floats). */
static void decode16(float *restrict x, const float *restrict z, const float *restrict s, const uint8_t *restrict c)
{
	for (unsigned l = 0; l < BLOCK; l++)
		x[l] = z[l] + s[l] * (float)c[l];
}

static void decode_row(unsigned m, const float *z, const float *s, const uint8_t *codes, float *x)
{
	unsigned j = 0;

	for (; j + BLOCK <= m; j += BLOCK)
		decode16(x + j, z + j, s + j, codes + j);
	for (; j < m; j++)
		x[j] = z[j] + s[j] * (float)codes[j];
}

static void mul16(float *restrict out, const float *restrict a, const float *restrict b)
{
	for (unsigned l = 0; l < BLOCK; l++)
		out[l] = a[l] * b[l];
}

/* out = a * b, n of them */
static inline __attribute__((always_inline)) void mul_rows(unsigned n, float *out, const float *a, const float *b)
{
	unsigned i = 0;

	for (; i + BLOCK <= n; i += BLOCK)
		mul16(out + i, a + i, b + i);
	for (; i < n; i++)
		out[i] = a[i] * b[i];
}

static void fill16(float *restrict x, float a)
{
	for (unsigned l = 0; l < BLOCK; l++)
		x[l] = a;
}

static void fill(unsigned n, float *x, float a)
{
	unsigned i = 0;

	for (; i + BLOCK <= n; i += BLOCK)
		fill16(x + i, a);
	for (; i < n; i++)
		x[i] = a;
}

static void add16(float *restrict x, float a)
{
	for (unsigned l = 0; l < BLOCK; l++)
		x[l] += a;
}

/* x += a, n of them */
static void add_scalar(unsigned n, float *x, float a)
{
	unsigned i = 0;

	for (; i + BLOCK <= n; i += BLOCK)
		add16(x + i, a);
	for (; i < n; i++)
		x[i] += a;
}

/* lo and hi += 0: -0 becomes +0, as in the reference */
static void canonical_zeros(unsigned m, float *lo, float *hi)
{
	add_scalar(m, lo, 0.0f);
	add_scalar(m, hi, 0.0f);
}

static void axpby16(float *restrict acc, const float *restrict z, float a, const float *restrict s,
		    const float *restrict b)
{
	for (unsigned l = 0; l < BLOCK; l++)
		acc[l] += z[l] * a + s[l] * b[l];
}

/* acc += z * a + s * b, n of them */
static void axpby(unsigned n, float *acc, const float *z, float a, const float *s, const float *b)
{
	unsigned i = 0;

	for (; i + BLOCK <= n; i += BLOCK)
		axpby16(acc + i, z + i, a, s + i, b + i);
	for (; i < n; i++)
		acc[i] += z[i] * a + s[i] * b[i];
}

/* ---- Rows of codes and of fp16 scalars ---- */

/*
 * Eight codes of b bits are b whole bytes, one little-endian word (kernels.h). Always inlined, so that
 * bits is a constant in each width's loop: constant shifts, and b single-byte stores.
 */
static inline __attribute__((always_inline)) void put_word(uint8_t *p, uint32_t w, unsigned bits)
{
	for (unsigned b = 0; b < bits; b++)
		p[b] = (uint8_t)(w >> (8 * b));
}

/*
 * Eight code bytes (a little-endian word of 64 bits, code r in byte r) to the word of 8 b bits that packs
 * them, and back: three steps that each join (or split) neighbours, pairs of bytes, then of 16-bit lanes,
 * then of 32-bit halves.
 */
static inline __attribute__((always_inline)) uint64_t join8(uint64_t x, unsigned b)
{
	x = (x | x >> (8 - b)) & (((1ull << 2 * b) - 1) * 0x0001000100010001ull);
	x = (x | x >> (16 - 2 * b)) & (((1ull << 4 * b) - 1) * 0x0000000100000001ull);
	return (x | x >> (32 - 4 * b)) & ((1ull << 8 * b) - 1);
}

static inline __attribute__((always_inline)) uint64_t split8(uint64_t x, unsigned b)
{
	x = (x | x << (32 - 4 * b)) & (((1ull << 4 * b) - 1) * 0x0000000100000001ull);
	x = (x | x << (16 - 2 * b)) & (((1ull << 2 * b) - 1) * 0x0001000100010001ull);
	return (x | x << (8 - b)) & (((1ull << b) - 1) * 0x0101010101010101ull);
}

/* m codes (bytes) into a row, LSB first: blocks of eight as words, the tail code by code. */
static inline __attribute__((always_inline)) void pack_bits(unsigned bits, unsigned m, const uint8_t *codes,
							     uint8_t *row)
{
	unsigned j = 0;

	for (; j + 8 <= m; j += 8) {
		uint64_t x;
		memcpy(&x, codes + j, sizeof x);
		put_word(row + j / 8 * bits, (uint32_t)join8(x, bits), bits);
	}
	if (j < m) {
		memset(row + j / 8 * bits, 0, ((m - j) * bits + 7) / 8);
		for (; j < m; j++)
			kvp_bits_put(row, (size_t)j * bits, bits, codes[j]);
	}
}

static inline __attribute__((always_inline)) void unpack_bits(unsigned bits, unsigned m, const uint8_t *row,
							       uint8_t *codes)
{
	unsigned j = 0;

	for (; j + 8 <= m; j += 8) {
		uint64_t x = split8(kvp_code_word(row + j / 8 * bits, bits), bits);
		memcpy(codes + j, &x, sizeof x);
	}
	for (; j < m; j++)
		codes[j] = (uint8_t)kvp_bits_get(row, (size_t)j * bits, bits);
}

/* One case per width: the *_bits functions inline into each with bits a constant. */
#define BY_WIDTH(bits, call) \
	switch (bits) { \
	case 1: call(1); break; \
	case 2: call(2); break; \
	case 3: call(3); break; \
	default: call(4); break; \
	}

static void pack(unsigned bits, unsigned m, const uint8_t *codes, uint8_t *row)
{
#define PACK(b) pack_bits(b, m, codes, row)
	BY_WIDTH(bits, PACK)
#undef PACK
}

static void unpack(unsigned bits, unsigned m, const uint8_t *row, uint8_t *codes)
{
#define UNPACK(b) unpack_bits(b, m, row, codes)
	BY_WIDTH(bits, UNPACK)
#undef UNPACK
}

/* Token t's row of `row` bytes into the columns of a key group of g tokens, and back. */
static void row_to_columns(size_t row, unsigned g, unsigned t, const uint8_t *bytes, uint8_t *cols)
{
	for (size_t b = 0; b < row; b++)
		cols[b * g + t] = bytes[b];
}

static void row_of_columns(size_t row, unsigned g, unsigned t, const uint8_t *cols, uint8_t *bytes)
{
	for (size_t b = 0; b < row; b++)
		bytes[b] = cols[b * g + t];
}

/* m little-endian fp16 numbers at p as floats (copied to h16 first: p need not be aligned; the host is
 * little-endian, as kernels.h's code words take it). */
static void load16_row(const struct kvp_kernels *kern, unsigned m, const unsigned char *p, uint16_t *h16,
		       float *out)
{
	memcpy(h16, p, sizeof(uint16_t) * m);
	kern->f16_to_f32(m, h16, out);
}

/* x rounded to fp16, stored little-endian at p, and read back into x: m of them. */
static void store16_row(const struct kvp_kernels *kern, unsigned m, float *x, uint16_t *h16, unsigned char *p)
{
	kern->f32_to_f16(m, x, h16);
	memcpy(p, h16, sizeof(uint16_t) * m);
	kern->f16_to_f32(m, h16, x);
}

/* A range and its fp16 scalars are fine: finite values, a float range, z and s within fp16. */
static int scalars_fine(float lo, float hi, float bad, float z, float s)
{
	return bad == 0.0f && isfinite(hi - lo) && isfinite(z) && isfinite(s);
}

/* ---- Encode and decode ---- */

/*
 * One group of G key tokens: every channel's range over the tokens (row by row, along the channels), z
 * and s rounded to fp16 in one pass each, then each token's codes, packed into its row and put into the
 * group's columns. A group with a fault goes to the reference, which finds the first and says what it was.
 */
static kvp_status encode_group(const struct kvp_codec *c, const struct kivi_scratch *w, const float *x,
			       unsigned char *p)
{
	const struct kvp_kernels *kern = kvp_kernels();
	const struct kivi *k = c->state;
	const unsigned d = c->dim;

	memcpy(w->lo, x, sizeof(float) * d);
	memcpy(w->hi, x, sizeof(float) * d);
	memset(w->bad, 0, sizeof(float) * d);
	for (unsigned t = 0; t < k->g; t++)
		range_row(d, w->lo, w->hi, w->bad, x + (size_t)t * d);
	canonical_zeros(d, w->lo, w->hi);
	memcpy(w->zf, w->lo, sizeof(float) * d);
	store16_row(kern, d, w->zf, w->h16, p);
	scales_of(d, w->sf, w->hi, w->zf, (float)((1u << k->bits) - 1));
	store16_row(kern, d, w->sf, w->h16, p + 2 * (size_t)d);
	for (unsigned j = 0; j < d; j++)
		if (!scalars_fine(w->lo[j], w->hi[j], w->bad[j], w->zf[j], w->sf[j]))
			return encode_group_reference(k, d, x, p);
	for (unsigned t = 0; t < k->g; t++) {
		codes_of(k->bits, d, x + (size_t)t * d, w->zf, w->sf, w->codes);
		pack(k->bits, d, w->codes, w->row);
		row_to_columns(k->row, k->g, t, w->row, p + 4 * (size_t)d);
	}
	return KVP_OK;
}

/* Lanes [0, w) take the range of lanes [w, 2w) too. */
static inline __attribute__((always_inline)) void fold(unsigned w, float *restrict lo, float *restrict hi,
						       float *restrict bad)
{
	for (unsigned l = 0; l < w; l++) {
		lo[l] = lo[l + w] < lo[l] ? lo[l + w] : lo[l];
		hi[l] = hi[l + w] > hi[l] ? hi[l + w] : hi[l];
		bad[l] += bad[l + w];
	}
}

/* The range of m values: BLOCK lanes, folded to one (the same min and max as in any order: zeros are made
 * +0 afterwards), NaN in *bad when a value is not finite. */
static void range_of(unsigned m, const float *x, float *lo, float *hi, float *bad)
{
	float l16[BLOCK], h16[BLOCK], b16[BLOCK] = { 0 };
	unsigned j = BLOCK;

	if (m < BLOCK) {
		float l = x[0], h = x[0], b = 0.0f;
		for (j = 0; j < m; j++) {
			l = x[j] < l ? x[j] : l;
			h = x[j] > h ? x[j] : h;
			b += x[j] * 0.0f;
		}
		*lo = l, *hi = h, *bad = b;
		return;
	}
	memcpy(l16, x, sizeof l16);
	memcpy(h16, x, sizeof h16);
	range16(l16, h16, b16, x); /* the first block's values against themselves: only bad changes */
	for (; j + BLOCK <= m; j += BLOCK)
		range16(l16, h16, b16, x + j);
	fold(8, l16, h16, b16), fold(4, l16, h16, b16), fold(2, l16, h16, b16), fold(1, l16, h16, b16);
	for (; j < m; j++) {
		l16[0] = x[j] < l16[0] ? x[j] : l16[0];
		h16[0] = x[j] > h16[0] ? x[j] : h16[0];
		b16[0] += x[j] * 0.0f;
	}
	*lo = l16[0], *hi = h16[0], *bad = b16[0];
}

static void codes16_of(uint8_t *restrict c, const float *restrict x, float z, float s, float top)
{
	for (unsigned l = 0; l < BLOCK; l++)
		c[l] = (uint8_t)(int)code_of(x[l], z, s, top);
}

/* codes_of for m values against one z and s */
static void codes_against(unsigned bits, unsigned m, const float *x, float z, float s, uint8_t *codes)
{
	const float top = (float)((1u << bits) - 1);
	unsigned j = 0;

	for (; j + BLOCK <= m; j += BLOCK)
		codes16_of(codes + j, x + j, z, s, top);
	for (; j < m; j++)
		codes[j] = (uint8_t)(int)code_of(x[j], z, s, top);
}

/* One value token: each channel group's range, the token's z and s rounded to fp16 together, then the
 * token's codes, group by group, and its row. */
static kvp_status encode_token(const struct kvp_codec *c, const struct kivi_scratch *w, const float *x,
			       unsigned char *p)
{
	const struct kvp_kernels *kern = kvp_kernels();
	const struct kivi *k = c->state;
	const unsigned d = c->dim, ng = k->ng;
	/* per channel group (ng <= dim of them): five rows of ng in scratch rows 2-4 */
	float *lo = w->lo, *hi = lo + ng, *bad = hi + ng, *zg = bad + ng, *sg = zg + ng;

	for (unsigned g = 0; g < ng; g++) {
		const unsigned j0 = g * k->g;
		range_of(d - j0 < k->g ? d - j0 : k->g, x + j0, &lo[g], &hi[g], &bad[g]);
	}
	canonical_zeros(ng, lo, hi);
	memcpy(zg, lo, sizeof(float) * ng);
	store16_row(kern, ng, zg, w->h16, p);
	scales_of(ng, sg, hi, zg, (float)((1u << k->bits) - 1));
	store16_row(kern, ng, sg, w->h16, p + 2 * ng);
	for (unsigned g = 0; g < ng; g++)
		if (!scalars_fine(lo[g], hi[g], bad[g], zg[g], sg[g]))
			return encode_token_reference(k, d, x, p);
	for (unsigned g = 0; g < ng; g++) {
		const unsigned j0 = g * k->g;
		codes_against(k->bits, d - j0 < k->g ? d - j0 : k->g, x + j0, zg[g], sg[g], w->codes + j0);
	}
	pack(k->bits, d, w->codes, p + 4 * ng);
	return KVP_OK;
}

static kvp_status kivi_encode(const struct kvp_codec *c, const void *ctx, unsigned n, const float *x, void *dst)
{
	const struct kivi *k = c->state;
	const struct kivi_scratch w = scratch_of(c);
	const unsigned step = k->per_token ? 1 : k->g;
	unsigned char *p = dst;
	kvp_status st;

	(void)ctx;
	for (unsigned i = 0; i < n; i += step, p += k->stride, x += (size_t)step * c->dim) {
		st = k->per_token ? encode_token(c, &w, x, p) : encode_group(c, &w, x, p);
		if (st != KVP_OK)
			return st;
	}
	return KVP_OK;
}

/* The per-channel z and s of one value token at p, from its groups' fp16 scalars. */
static void token_scalars(const struct kvp_kernels *kern, const struct kivi *k, unsigned d,
			  const struct kivi_scratch *w, const unsigned char *p)
{
	float *zs = w->lo; /* z[ng] then s[ng] */

	load16_row(kern, 2 * k->ng, p, w->h16, zs);
	for (unsigned g = 0; g < k->ng; g++) {
		const unsigned j0 = g * k->g, m = d - j0 < k->g ? d - j0 : k->g;
		fill(m, w->zf + j0, zs[g]);
		fill(m, w->sf + j0, zs[k->ng + g]);
	}
}

/* Every code pattern decodes; each group's z must be finite and its s finite and >= 0, as encode writes
 * them (a record: a token, or a group of G tokens with axis=channel). */
static kvp_status kivi_check(const struct kvp_codec *c, unsigned n, const void *src)
{
	const struct kivi *k = c->state;
	const unsigned per = k->per_token ? k->ng : c->dim, records = k->per_token ? n : n / k->g;
	const unsigned char *p = src;

	for (unsigned r = 0; r < records; r++, p += k->stride)
		for (unsigned j = 0; j < per; j++) {
			const float z = load16(p + 2 * j), s = load16(p + 2 * (per + j));

			if (!isfinite(z) || !kvp_codec_scale_ok(s))
				return kvp_fail(KVP_ECORRUPT, "kivi: %s %u, %s %u: z %g and s %g (encode writes a finite z and "
						"s >= 0)", k->per_token ? "token" : "group of tokens", r,
						k->per_token ? "channel group" : "channel", j, (double)z, (double)s);
		}
	return KVP_OK;
}

static kvp_status kivi_decode(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, float *x)
{
	const struct kvp_kernels *kern = kvp_kernels();
	const struct kivi *k = c->state;
	const struct kivi_scratch w = scratch_of(c);
	const unsigned char *p = src;
	const unsigned d = c->dim;

	(void)ctx;
	if (k->per_token) {
		for (unsigned i = 0; i < n; i++, p += k->stride, x += d) {
			token_scalars(kern, k, d, &w, p);
			unpack(k->bits, d, p + 4 * k->ng, w.codes);
			decode_row(d, w.zf, w.sf, w.codes, x);
		}
		return KVP_OK;
	}
	for (unsigned i = 0; i < n; i += k->g, p += k->stride) {
		load16_row(kern, d, p, w.h16, w.zf);
		load16_row(kern, d, p + 2 * (size_t)d, w.h16, w.sf);
		for (unsigned t = 0; t < k->g; t++, x += d) {
			row_of_columns(k->row, k->g, t, p + 4 * (size_t)d, w.row);
			unpack(k->bits, d, w.row, w.codes);
			decode_row(d, w.zf, w.sf, w.codes, x);
		}
	}
	return KVP_OK;
}

/* ---- Attention ---- */

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

/*
 * Key groups (axis=channel) GROUPS at a time, for g heads (queries qprep + h * dim): their z and s
 * converted in one pass, every head's <q, z> of every group by one dot straight from the fp16 z (zq: g rows
 * of an), the s rows as floats in w->zs. Returns how many groups (an) it took.
 */
static unsigned channel_scalars(const struct kvp_codec *c, const struct kivi_scratch *w, unsigned groups,
				const unsigned char *p, unsigned g, const float *qprep, float *zq)
{
	const struct kvp_kernels *kern = kvp_kernels();
	const struct kivi *k = c->state;
	const unsigned d = c->dim, an = groups < GROUPS ? groups : GROUPS;

	for (unsigned e = 0; e < an; e++) {
		memcpy(w->h16 + (size_t)e * d, p + e * k->stride, sizeof(uint16_t) * d);
		memcpy(w->h16 + (size_t)(an + e) * d, p + e * k->stride + 2 * (size_t)d, sizeof(uint16_t) * d);
	}
	kern->dot_f16_group(d, an, w->h16, g, qprep, 1.0f, zq, NULL);
	kern->f16_to_f32((size_t)an * d, w->h16 + (size_t)an * d, w->zs);
	return an;
}

/*
 * axis=channel, one head, in floats (dot's reference): per group the query times the scales, then for
 * eight tokens at a time their rows, gathered from the columns, and one lut_dot over them; <q, z> added.
 */
static void dot_channel(const struct kvp_codec *c, unsigned n, const unsigned char *p, const float *q, float *out)
{
	const struct kvp_kernels *kern = kvp_kernels();
	const struct kivi *k = c->state;
	const struct kivi_scratch w = scratch_of(c);
	const unsigned d = c->dim, groups = n / k->g;
	/* 8 rows of at most dim/2 bytes in scratch rows 3-5 (w.row is in the s rows' way here) */
	uint8_t *rows = (uint8_t *)(w.ws + d);
	float zq[GROUPS];

	for (unsigned a = 0, an; a < groups; a += an, p += k->stride * an) {
		an = channel_scalars(c, &w, groups - a, p, 1, q, zq);
		for (unsigned e = 0; e < an; e++) {
			float *o = out + (size_t)(a + e) * k->g;

			mul_rows(d, w.ws, q, w.zs + (size_t)e * d);
			for (unsigned t = 0; t < k->g; t += 8) {
				for (unsigned r = 0; r < 8; r++)
					row_of_columns(k->row, k->g, t + r, p + e * k->stride + 4 * (size_t)d, rows + r * k->row);
				kern->lut_dot(k->bits, d, 8, rows, k->row, integers, w.ws, o + t);
			}
			add_scalar(k->g, o, zq[e]);
		}
	}
}

/*
 * dot_channel for the g heads of a GQA group on the integer kernel (attention's path): one dot_i8_scaled for
 * the block's groups, which reads each group's fp16 z and s itself, sums <q, z> in floats and adds each head's
 * sum_j (q_j s_j) code_jt with q * s in int8 on the step max_j |q_j s_j| / 127: a score moves by at most
 * step / 2 * sum_j code_jt (tests/test_kivi.c checks it).
 */
static void dot_channel_i8(const struct kvp_codec *c, unsigned n, const unsigned char *p, unsigned g,
			   const float *qprep, float *out, size_t out_stride)
{
	const struct kvp_kernels *kern = kvp_kernels();
	const struct kivi *k = c->state;

	kern->dot_i8_scaled(k->bits, c->dim, k->g, n / k->g, p, g, qprep, c->dim, out, out_stride);
}

/* The z and s of a pass of cn value tokens from p on, as fp16 in h16, planar: h16[g * cn + i] is z of token i's
 * channel group g, h16[(ng + g) * cn + i] its s, so that the loops over tokens below run on contiguous rows.
 * The first `rows` rows are gathered (ng: the z alone), and rows [from, rows) converted to floats in zs. */
static void slice_scalars(const struct kvp_kernels *kern, const struct kivi *k, unsigned cn, const unsigned char *p,
			  uint16_t *h16, unsigned rows, unsigned from, float *zs)
{
	for (unsigned i = 0; i < cn; i++, p += k->stride)
		for (unsigned e = 0; e < rows; e++)
			memcpy(h16 + (size_t)e * cn + i, p + 2 * e, sizeof(uint16_t));
	if (from < rows)
		kern->f16_to_f32((size_t)cn * (rows - from), h16 + (size_t)from * cn, zs);
}

/* Tokens per pass of the per-token paths: as many as SLICE_SCALARS and SLICE allow, at least one. */
static unsigned token_slice(const struct kivi *k)
{
	unsigned s = SLICE_SCALARS / (2 * k->ng);
	return s < 1 ? 1 : s > SLICE ? SLICE : s;
}

/* axis=token, one head: out[i] = sum_g z_ig * (sum of q over g) + s_ig * <q_g, codes_ig>. */
static void dot_token(const struct kvp_codec *c, unsigned n, const unsigned char *p, const float *q, float *out)
{
	const struct kvp_kernels *kern = kvp_kernels();
	const struct kivi *k = c->state;
	const unsigned d = c->dim, slice = token_slice(k);
	float s[SLICE], zs[SLICE_SCALARS];
	uint16_t h16[SLICE_SCALARS];

	for (unsigned i0 = 0; i0 < n; i0 += slice, p += k->stride * slice, out += slice) {
		const unsigned cn = n - i0 < slice ? n - i0 : slice;

		slice_scalars(kern, k, cn, p, h16, 2 * k->ng, 0, zs);
		fill(cn, out, 0.0f);
		for (unsigned g = 0; g < k->ng; g++) {
			const unsigned j0 = g * k->g, m = d - j0 < k->g ? d - j0 : k->g;

			kern->lut_dot(k->bits, m, cn, p + 4 * k->ng + (size_t)j0 * k->bits / 8, k->stride, integers,
				      q + j0, s);
			axpby(cn, out, zs + (size_t)g * cn, q[d + g], zs + (size_t)(k->ng + g) * cn, s);
		}
	}
}

static void kivi_dot(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, const void *qprep,
		     float *out)
{
	const struct kivi *k = c->state;

	(void)ctx;
	if (k->per_token)
		dot_token(c, n, src, qprep, out);
	else
		dot_channel(c, n, src, qprep, out);
}

static void kivi_dot_group(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, unsigned g,
			   const void *qprep, float *out, size_t out_stride)
{
	const struct kivi *k = c->state;
	const size_t qs = c->qprep_bytes / sizeof(float);
	const float *q = qprep;

	(void)ctx;
	if (!k->per_token) {
		dot_channel_i8(c, n, src, g, q, out, out_stride);
		return;
	}
	for (unsigned h = 0; h < g; h++)
		dot_token(c, n, src, q + h * qs, out + h * out_stride);
}

/*
 * axis=token, hn <= HEADS heads (weights w + h * w_stride, accumulators acc + h * acc_dim), in floats (axpy's
 * reference): per pass of tokens, each head's sums of w_i z_ig (a dot straight from the fp16 z, rows: the
 * channel groups) go to acc[dim + g], which finish adds to the group's channels; then sum_i (w_i s_ig) code_ij
 * by one lut_axpy_group per channel group. axpy_token_i16 below is attention's path.
 */
/* Each head's sums of w_i z_ig over cn tokens (z rows of cn in h16), added to acc[dim + g]. */
static void add_weighted_z(const struct kvp_codec *c, unsigned cn, const uint16_t *h16, unsigned hn, const float *w,
			   size_t w_stride, float *acc)
{
	const struct kvp_kernels *kern = kvp_kernels();
	const struct kivi *k = c->state;
	float *wz = scratch_of(c).ws; /* hn rows of ng */

	if (w_stride == cn) /* the heads' weights are hn rows of cn */
		kern->dot_f16_group(cn, k->ng, h16, hn, w, 1.0f, wz, NULL);
	else
		for (unsigned h = 0; h < hn; h++)
			kern->dot_f16(cn, k->ng, h16, w + h * w_stride, 1.0f, wz + h * k->ng);
	for (unsigned h = 0; h < hn; h++) {
		float *a = acc + (size_t)h * c->acc_dim + c->dim;
		for (unsigned g = 0; g < k->ng; g++)
			a[g] += wz[h * k->ng + g];
	}
}

static void axpy_token(const struct kvp_codec *c, unsigned n, const unsigned char *p, unsigned hn, const float *w,
		       size_t w_stride, float *acc)
{
	const struct kvp_kernels *kern = kvp_kernels();
	const struct kivi *k = c->state;
	const unsigned d = c->dim, slice = token_slice(k), ng = k->ng;
	float sc[SLICE_SCALARS / 2], ws[HEADS * SLICE];
	uint16_t h16[SLICE_SCALARS];

	for (unsigned i0 = 0; i0 < n; i0 += slice, p += k->stride * slice, w += slice) {
		const unsigned cn = n - i0 < slice ? n - i0 : slice;

		slice_scalars(kern, k, cn, p, h16, 2 * ng, ng, sc);
		add_weighted_z(c, cn, h16, hn, w, w_stride, acc);
		for (unsigned g = 0; g < ng; g++) {
			const unsigned j0 = g * k->g, m = d - j0 < k->g ? d - j0 : k->g;

			for (unsigned h = 0; h < hn; h++)
				mul_rows(cn, ws + h * cn, w + h * w_stride, sc + (size_t)g * cn);
			kern->lut_axpy_group(k->bits, m, cn, p + 4 * ng + (size_t)j0 * k->bits / 8, k->stride, integers, hn,
					     ws, acc + j0, c->acc_dim);
		}
	}
}

/* axpy_token on the integer kernel (axpy_group, attention's path): one axpy_i16_scaled per pass of tokens, which
 * reads each token's z and s itself, adds the heads' sums of w_i z_ig to acc[dim + g], and rounds each head's
 * w_i s_ig to 12 bits of their largest (kernels.h: within about 1e-4 of the float sum). */
static void axpy_token_i16(const struct kvp_codec *c, unsigned n, const unsigned char *p, unsigned hn,
			   const float *w, size_t w_stride, float *acc)
{
	const struct kvp_kernels *kern = kvp_kernels();
	const struct kivi *k = c->state;
	const unsigned slice = token_slice(k);

	for (unsigned i0 = 0; i0 < n; i0 += slice, p += k->stride * slice, w += slice) {
		const unsigned cn = n - i0 < slice ? n - i0 : slice;

		kern->axpy_i16_scaled(k->bits, c->dim, k->g, cn, p, k->stride, hn, w, w_stride, acc, c->acc_dim);
	}
}

/* axis=channel, hn <= HEADS heads: per group of tokens, acc_j += z_j * sum(w) + s_j * sum_t w_t code_tj,
 * the sums over tokens by one lut_axpy per token's row (gathered from the columns) and head. */
static void axpy_channel(const struct kvp_codec *c, unsigned n, const unsigned char *p, unsigned hn,
			 const float *w, size_t w_stride, float *acc)
{
	const struct kvp_kernels *kern = kvp_kernels();
	const struct kivi *k = c->state;
	const struct kivi_scratch s = scratch_of(c);
	const unsigned d = c->dim;
	float *sums = s.ws; /* hn rows of d */

	for (unsigned i = 0; i < n; i += k->g, p += k->stride) {
		load16_row(kern, d, p, s.h16, s.zf);
		load16_row(kern, d, p + 2 * (size_t)d, s.h16, s.sf);
		fill(hn * d, sums, 0.0f);
		for (unsigned t = 0; t < k->g; t++) {
			row_of_columns(k->row, k->g, t, p + 4 * (size_t)d, s.row);
			for (unsigned h = 0; h < hn; h++)
				kern->lut_axpy(k->bits, d, 1, s.row, k->row, integers, w + h * w_stride + i + t,
					       sums + (size_t)h * d);
		}
		for (unsigned h = 0; h < hn; h++) {
			const float *wh = w + h * w_stride + i;
			float wsum = 0.0f;

			for (unsigned t = 0; t < k->g; t++)
				wsum += wh[t];
			axpby(d, acc + (size_t)h * c->acc_dim, s.zf, wsum, s.sf, sums + (size_t)h * d);
		}
	}
}

static void kivi_axpy(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, const float *w,
		      float *acc)
{
	const struct kivi *k = c->state;

	(void)ctx;
	if (k->per_token)
		axpy_token(c, n, src, 1, w, n, acc);
	else
		axpy_channel(c, n, src, 1, w, n, acc);
}

/* The heads' sums on the 12-bit kernel (axis=token) or per token's row (axis=channel), HEADS at a time. */
static void axpy_heads(const struct kvp_codec *c, unsigned n, const void *src, unsigned g, const float *w,
		       size_t w_stride, float *acc)
{
	const struct kivi *k = c->state;

	for (unsigned h = 0; h < g; h += HEADS) {
		const unsigned hn = g - h < HEADS ? g - h : HEADS;
		const float *wh = w + h * w_stride;
		float *ah = acc + (size_t)h * c->acc_dim;

		if (k->per_token)
			axpy_token_i16(c, n, src, hn, wh, w_stride, ah);
		else
			axpy_channel(c, n, src, hn, wh, w_stride, ah);
	}
}

/* Whether the 8-bit kernel (axpy_u8_scaled) took every head's sums over rows (a block's, or a span's blocks as
 * its runs): axis=token only. */
static int axpy_token_u8(const struct kvp_codec *c, const struct kvp_row_runs *rows, unsigned g, const float *w,
			 size_t w_stride, float *acc, const struct kvp_ahead *ahead)
{
	const struct kivi *k = c->state;

	return k->per_token &&
	       kvp_kernels()->axpy_u8_scaled(k->bits, c->dim, k->g, rows, g, w, w_stride, acc, c->acc_dim, ahead);
}

/*
 * Values per token: weights that are not negative (attention's) take 8 bits above the call's least w_t s_tg
 * (axpy_u8_scaled: four tokens per int32 lane, the codes themselves the table); the kernel refuses other
 * weights and shapes its vector version leaves, and tables without one refuse every call: those take 12 bits
 * on the largest (axpy_i16_scaled).
 */
static void kivi_axpy_group(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, unsigned g,
			    const float *w, size_t w_stride, float *acc)
{
	const struct kivi *k = c->state;
	const unsigned char *p = src;

	(void)ctx;
	if (!k->per_token) {
		axpy_heads(c, n, src, g, w, w_stride, acc);
		return;
	}
	for (unsigned i0 = 0; i0 < n; i0 += KVP_AXPY_I16_ROWS) {
		const unsigned cn = n - i0 < KVP_AXPY_I16_ROWS ? n - i0 : KVP_AXPY_I16_ROWS;
		const struct kvp_row_runs rows = kvp_one_run(cn, p + (size_t)i0 * k->stride, k->stride, NULL, 0);

		if (!axpy_token_u8(c, &rows, g, w + i0, w_stride, acc, NULL))
			axpy_heads(c, cn, p + (size_t)i0 * k->stride, g, w + i0, w_stride, acc);
	}
}

/* A span's blocks as the runs of one call of the 8-bit kernel: one weight step and one flush of the sums for
 * the span; block by block where it is refused, asking for a share of ahead around each. */
_Static_assert(KVP_CODEC_SPAN_BLOCKS <= KVP_RUNS_MAX && KVP_CODEC_SPAN_RUN % KVP_RUN_ROWS == 0 &&
		       KVP_CODEC_SPAN_TOKENS <= KVP_AXPY_I16_ROWS,
	       "a span is one call of the kernel");

static void kivi_axpy_span(const struct kvp_codec *c, const void *ctx, const struct kvp_code_span *span, unsigned g,
			   const float *w, size_t w_stride, float *acc, const struct kvp_ahead *ahead)
{
	const struct kivi *k = c->state;
	struct kvp_row_runs rows = { .n = span->n, .run = span->run, .stride = k->stride };
	const unsigned blocks = (span->n + span->run - 1) / span->run;

	for (unsigned b = 0; b < blocks; b++)
		rows.code[b] = span->src[b];
	if (axpy_token_u8(c, &rows, g, w, w_stride, acc, ahead))
		return;
	for (unsigned b = 0, i0 = 0; b < blocks; b++, i0 += span->run) {
		kvp_ahead_share(ahead, 2 * b, 2 * blocks);
		kivi_axpy_group(c, ctx, span->n - i0 < span->run ? span->n - i0 : span->run, span->src[b], g, w + i0,
				w_stride, acc);
		kvp_ahead_share(ahead, 2 * b + 1, 2 * blocks);
	}
}

static void kivi_finish(const struct kvp_codec *c, const void *ctx, const float *acc, float *out)
{
	const struct kivi *k = c->state;

	(void)ctx;
	if (!k->per_token) {
		for (unsigned j = 0; j < c->dim; j++)
			out[j] += acc[j];
		return;
	}
	for (unsigned j = 0; j < c->dim; j++)
		out[j] += acc[j] + acc[c->dim + j / k->g];
}

const struct kvp_codec_ops kvp_codec_kivi = {
	.name = "kivi",
	.flags = KVP_CODEC_SEPARABLE | KVP_CODEC_BITS, /* axis=channel clears SEPARABLE in open */
	.with_bits = kvp_codec_bits_arg,
	.open = kivi_open,
	.bytes = kivi_bytes,
	.encode = kivi_encode,
	.decode = kivi_decode,
	.check = kivi_check,
	.prepare_query = kivi_prepare_query,
	.dot = kivi_dot,
	.axpy = kivi_axpy,
	.dot_group = kivi_dot_group,
	.axpy_group = kivi_axpy_group,
	.axpy_span = kivi_axpy_span,
	.finish = kivi_finish,
	.close = kivi_close,
};
