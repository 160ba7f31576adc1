/*
 * turboquant(bits=1..4, qjl=0|1, seed=N, outliers=N, outlier_bits=1..4): TurboQuant (Zandieh et al.,
 * arXiv 2504.19874), the data-oblivious vector quantizer. Separable, group 1.
 *
 * Per token and per part (see outliers below), for the m channels x of the part:
 *   n = ||x||; y = R(x / n) with R a randomized Hadamard rotation; idx_j = the Lloyd-Max cell of y_j;
 *   decode x~ = n * R^T c[idx].
 * qjl=1 is TurboQuant_prod: bits-1 MSE bits plus one QJL sign per coordinate. With r = y - c[idx] the
 * residual of the unit vector in the rotated domain, gamma = ||r|| and sigma = sign(S r), where S is an
 * i.i.d. N(0,1) m x m matrix. The paper applies S to the residual in the original domain; S R is again
 * i.i.d. N(0,1) because R is orthogonal, so drawing S in the rotated domain is the same estimator and
 * needs no extra rotation. Decode adds n * R^T (sqrt(pi/2)/m * gamma * S^T sigma); sign(0) is +1.
 *
 * Rotation R for m channels: with p the largest power of two <= m, one pass is "multiply the window
 * [w, w+p) by random signs, then the orthonormal Walsh-Hadamard transform H/sqrt(p)". A power of two
 * takes one pass on [0, m). Other m (48, 80, 96, ...) take three passes, on [0, p), [m-p, m), [0, p):
 * the two windows overlap and cover every channel, and after the third pass every output depends on
 * every input. Each pass is orthogonal, so R is, and no padding changes the bytes.
 *
 * Codebook: the Lloyd-Max quantizer of the exact density of one coordinate of a uniform point on
 * S^(m-1), f(x) ~ (1-x^2)^((m-3)/2) on [-1,1], computed at open time. In x = cos(t) the density is
 * sin(t)^(m-2) on [0, pi], smooth for every m >= 2. The mass of a cell comes from a table of the
 * cumulative integral (composite Simpson, 4096 steps on [0, pi/2]) plus one Simpson panel to the
 * threshold; the first moment is exact, sin(t)^(m-1)/(m-1). Lloyd iterations (thresholds at midpoints,
 * centroids at the cell means) on the positive half run until the centroids move less than 1e-13. The
 * centroids then move onto an int8 grid (integer_codebook), which is what the codes decode to.
 *
 * Outliers (paper section 4.3, fractional rates): outliers=K splits the channels into K outlier channels
 * quantized at outlier_bits (default bits+1, at most 4) and dim-K regular channels at bits, by two
 * independent TurboQuant instances, each with its own dimension, rotation, codebook and norm. The
 * outlier channels are chosen per stream by fit(): the K channels of largest L2 norm over the vectors
 * given to it (ties to the lower index). The context holds the channel order: dim uint32 indices, the
 * regular channels ascending, then the outlier channels ascending. Note: 32 channels at 3 bits and 96
 * at 2 bits cost (32*3 + 96*2)/128 = 2.25 bits of codes per coordinate (the paper prints 2.5);
 * 2.5 bits is outliers=64,outlier_bits=3,bits=2 or outliers=32,outlier_bits=4,bits=2.
 *
 * Layout of one token (P = 1 part, or 2 with outliers; part 0 = regular channels, part 1 = outliers):
 *   float32 norm[P]                       the part's L2 norm (fp32: fp16 would add a relative error of
 *                                         up to 2^-11 to every coordinate and can overflow)
 *   float32 gamma[P]                      qjl=1 only: ||r|| of the part's unit vector
 *   codes of part 0 (m0 * b0 bits), codes of part 1 (m1 * b1 bits), b = bits - qjl per coordinate,
 *   then with qjl=1: signs of part 0 (m0 bits), signs of part 1 (m1 bits); bit 1 means +1.
 *   Each of these sections is packed LSB first and zero padded to a whole byte, so the fused kernels
 *   start every section on a byte (no padding at all when the part sizes are multiples of 8).
 *   bytes(n) = n * (4*P*(1+qjl) + sum over parts of ceil(m*b/8) + qjl * ceil(m/8))
 * d=128: bits=1..4 take 20/36/52/68 bytes (1.25/2.25/3.25/4.25 bits per value); qjl=1 the same sizes
 * plus 4 bytes for gamma; outliers=32,outlier_bits=3,bits=2 takes 8 + 36 = 44 bytes (2.75 bits per value).
 *
 * dot works in the rotated domain: prepare_query stores R q (and S R q) per part, and a token costs one
 * codebook lookup per coordinate plus one signed sum (kernels lut_dot, with the codebook and {-1, +1} as
 * tables). axpy accumulates in the same domain (acc_dim = dim * (1 + qjl)) through lut_axpy, with the
 * norm and gamma folded into the weights; finish applies S^T and R^T once per query.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "codecs/codec.h"
#include "kernels/kernels.h"

#define TQ_PARTS 2
#define TQ_LEVELS_MAX 16
#define GRID 4096 /* Simpson steps of the cumulative table on [0, pi/2] */

struct tq_part {
	unsigned m;                  /* channels of the part */
	unsigned bits;               /* MSE bits per coordinate; 0 for qjl=1 at bits=1 */
	unsigned p, npass;           /* Hadamard size and number of passes */
	unsigned win[3];             /* first channel of each pass's window */
	float *sign[3];              /* p random signs per pass */
	float *s;                    /* qjl=1: m x m N(0,1), row-major */
	float centroid[TQ_LEVELS_MAX];
	float threshold[TQ_LEVELS_MAX - 1];
	/* the codebook for the integer kernels: centroid[v] = lut8[v] * unit8 = lut16[v] * unit16 */
	int8_t lut8[TQ_LEVELS_MAX];
	int16_t lut16[TQ_LEVELS_MAX];
	float unit8, unit16;
	size_t code_at, sign_at;     /* byte offsets of the part's codes and signs in a token */
	unsigned first;              /* index of the part's first channel in the context's order */
};

struct tq {
	unsigned nparts, qjl, outliers;
	struct tq_part part[TQ_PARTS];
	size_t head, stride;         /* bytes of scalars per token, bytes per token */
};

/* ---- Random numbers: splitmix64, one independent stream per (seed, part, purpose). ---- */

static uint64_t splitmix64(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static uint64_t stream(uint64_t seed, unsigned part, unsigned purpose)
{
	uint64_t s = seed ^ ((uint64_t)(part * 8 + purpose + 1) * 0xd1342543de82ef95ull);
	splitmix64(&s);
	return s;
}

/* Box-Muller; u1 lies in (0, 1] so the log is finite. */
static double gaussian(uint64_t *s)
{
	double u1 = ((double)(splitmix64(s) >> 11) + 1.0) * 0x1p-53;
	double u2 = (double)(splitmix64(s) >> 11) * 0x1p-53;
	return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* ---- Lloyd-Max codebook for one coordinate of a uniform point on S^(m-1). ---- */

struct beta_table {
	unsigned m;
	double h;
	double cum[GRID + 1]; /* cum[i] = integral of sin^(m-2) over [0, i*h] */
};

static double beta_w(unsigned m, double t)
{
	return pow(sin(t), (double)(m - 2));
}

static void beta_table_init(struct beta_table *b, unsigned m)
{
	b->m = m;
	b->h = 1.5707963267948966 / GRID;
	b->cum[0] = 0.0;
	for (unsigned i = 0; i < GRID; i++) {
		double t = i * b->h;
		b->cum[i + 1] = b->cum[i] + b->h / 6.0 * (beta_w(m, t) + 4.0 * beta_w(m, t + b->h / 2) +
							   beta_w(m, t + b->h));
	}
}

/* Integral of sin^(m-2) over [0, t], t in [0, pi/2]. */
static double beta_mass(const struct beta_table *b, double t)
{
	unsigned i = (unsigned)(t / b->h);
	double t0, dt;

	if (i >= GRID)
		i = GRID - 1;
	t0 = i * b->h;
	dt = t - t0;
	return b->cum[i] + dt / 6.0 * (beta_w(b->m, t0) + 4.0 * beta_w(b->m, t0 + dt / 2) + beta_w(b->m, t));
}

/* Integral of cos * sin^(m-2) over [0, t]. */
static double beta_moment(const struct beta_table *b, double t)
{
	return pow(sin(t), (double)(b->m - 1)) / (b->m - 1);
}

/* Positive-half centroids c[0..half) for 2*half levels; thresholds are the midpoints and 0. */
static void lloyd_max(const struct beta_table *b, unsigned half, double *c)
{
	double top = fmin(1.0, 3.0 / sqrt((double)b->m));
	double mass[TQ_LEVELS_MAX / 2 + 1], mom[TQ_LEVELS_MAX / 2 + 1];

	for (unsigned i = 0; i < half; i++)
		c[i] = top * (i + 0.5) / half;
	for (unsigned it = 0; it < 100000; it++) {
		double moved = 0.0;
		/* cell i is x in [t_i, t_i+1]: t_0 = 0, t_half = 1; x = cos(theta) runs backwards */
		for (unsigned i = 0; i <= half; i++) {
			double x = i == 0 ? 0.0 : i == half ? 1.0 : (c[i - 1] + c[i]) / 2;
			double th = acos(x);
			mass[i] = beta_mass(b, th);
			mom[i] = beta_moment(b, th);
		}
		for (unsigned i = 0; i < half; i++) {
			double w = mass[i] - mass[i + 1], next;
			if (!(w > 0.0))
				continue; /* a cell beyond the representable mass keeps its place */
			next = (mom[i] - mom[i + 1]) / w;
			moved = fmax(moved, fabs(next - c[i]));
			c[i] = next;
		}
		if (moved < 1e-13)
			break;
	}
}

/*
 * Keys are scored with an int8 codebook and values summed with it too (8-bit weights above the block's
 * least, lut_axpy_u8_group) or with an int16 one (12-bit weights, lut_axpy_i16_group: weights of either
 * sign, and the tables without a vector u8 kernel). The codebook the codec decodes with is the int8 one
 * itself (see integer_codebook), and the int16 one is it times 16 (at most 2032 in magnitude, which leaves
 * room in int32 for 256 tokens of 12-bit weights), so that neither integer path moves a value away from
 * what the codes decode to.
 */
#define TQ_LUT16_SCALE 16

/* Squared error of the codebook held as round(c * k) / k. */
static double grid_error(const struct tq_part *pt, unsigned levels, double k)
{
	double e = 0;

	for (unsigned v = 0; v < levels; v++) {
		double c = pt->centroid[v], d = nearbyint(c * k) / k - c;
		e += d * d;
	}
	return e;
}

/*
 * The int8 grid's step is chosen, among steps that keep every centroid within 127, as the one that puts
 * the Lloyd-Max centroids nearest to grid points (a 4-bit codebook on a step of top / 127 moves by 0.36%,
 * on the best step by 0.28%), and the centroids then move onto the grid: the codec decodes to
 * lut8[v] * unit8 exactly, so the integer kernels add no codebook rounding of their own (on an int8 grid
 * apart from the decode, 3- and 4-bit values moved bench_attend's output from its decode by 2.0e-3 and
 * 4.5e-3). The thresholds stay the Lloyd-Max ones, so the codes do not change; the cells' centroids move
 * by at most half a step of the grid.
 */
static void integer_codebook(struct tq_part *pt, float top)
{
	unsigned levels = 1u << pt->bits;
	double best = 127.0 / top, least = grid_error(pt, levels, best);

	for (unsigned i = 1; i <= 4096; i++) {
		double k = 127.0 / top * (1.0 - 0.5 * i / 4096), e = grid_error(pt, levels, k);
		if (e < least)
			least = e, best = k;
	}
	pt->unit8 = (float)(1.0 / best);
	pt->unit16 = pt->unit8 / TQ_LUT16_SCALE;
	for (unsigned v = 0; v < levels; v++) {
		pt->lut8[v] = (int8_t)lrint(pt->centroid[v] * best);
		pt->lut16[v] = (int16_t)(pt->lut8[v] * TQ_LUT16_SCALE);
		pt->centroid[v] = (float)pt->lut8[v] * pt->unit8;
	}
}

static void codebook(struct tq_part *pt, const struct beta_table *b)
{
	unsigned half = (1u << pt->bits) / 2;
	double c[TQ_LEVELS_MAX / 2];

	if (pt->bits == 0) {
		pt->centroid[0] = 0.0f;
		pt->lut8[0] = 0, pt->lut16[0] = 0;
		pt->unit8 = pt->unit16 = 0.0f;
		return;
	}
	lloyd_max(b, half, c);
	for (unsigned i = 0; i < half; i++) {
		pt->centroid[half + i] = (float)c[i];
		pt->centroid[half - 1 - i] = (float)-c[i];
	}
	pt->threshold[half - 1] = 0.0f;
	for (unsigned i = 0; i + 1 < half; i++) {
		pt->threshold[half + i] = (float)((c[i] + c[i + 1]) / 2);
		pt->threshold[half - 2 - i] = -pt->threshold[half + i];
	}
	integer_codebook(pt, (float)c[half - 1]);
}

/* ---- Randomized Hadamard rotation. ---- */

static void fwht(float *v, unsigned p)
{
	for (unsigned h = 1; h < p; h *= 2)
		for (unsigned i = 0; i < p; i += 2 * h)
			for (unsigned j = i; j < i + h; j++) {
				float a = v[j], b = v[j + h];
				v[j] = a + b;
				v[j + h] = a - b;
			}
}

static void rotate(const struct tq_part *pt, float *v)
{
	float scale = 1.0f / sqrtf((float)pt->p);

	for (unsigned k = 0; k < pt->npass; k++) {
		float *w = v + pt->win[k];
		for (unsigned j = 0; j < pt->p; j++)
			w[j] *= pt->sign[k][j];
		fwht(w, pt->p);
		for (unsigned j = 0; j < pt->p; j++)
			w[j] *= scale;
	}
}

static void unrotate(const struct tq_part *pt, float *v)
{
	float scale = 1.0f / sqrtf((float)pt->p);

	for (unsigned k = pt->npass; k-- > 0;) {
		float *w = v + pt->win[k];
		fwht(w, pt->p);
		for (unsigned j = 0; j < pt->p; j++)
			w[j] *= scale * pt->sign[k][j];
	}
}

/* ---- Open and close. ---- */

/* A part's sign vectors (p floats each) and QJL matrix (m x m floats) come from the codec's allocator. */
static void part_free(const struct kvp_allocator *mem, struct tq_part *pt)
{
	for (unsigned k = 0; k < 3; k++)
		kvp_release(mem, pt->sign[k], sizeof(float) * pt->p);
	kvp_release(mem, pt->s, sizeof(float) * pt->m * pt->m);
}

static kvp_status part_init(const struct kvp_allocator *mem, struct tq_part *pt, unsigned m, unsigned bits,
			    unsigned qjl, uint64_t seed, unsigned index)
{
	struct beta_table *b;
	uint64_t s;

	pt->m = m;
	pt->bits = bits;
	for (pt->p = 1; pt->p * 2 <= m; pt->p *= 2)
		;
	pt->npass = pt->p == m ? 1 : 3;
	pt->win[0] = 0;
	pt->win[1] = m - pt->p;
	pt->win[2] = 0;
	for (unsigned k = 0; k < pt->npass; k++) {
		pt->sign[k] = kvp_allocate(mem, sizeof(float) * pt->p, "turboquant: rotation signs");
		if (!pt->sign[k])
			return KVP_ENOMEM;
		s = stream(seed, index, k);
		for (unsigned j = 0; j < pt->p; j++)
			pt->sign[k][j] = (splitmix64(&s) >> 63) ? -1.0f : 1.0f;
	}
	if (qjl) {
		pt->s = kvp_allocate(mem, sizeof(float) * m * m, "turboquant: QJL matrix");
		if (!pt->s)
			return KVP_ENOMEM;
		s = stream(seed, index, 3);
		for (size_t i = 0; i < (size_t)m * m; i++)
			pt->s[i] = (float)gaussian(&s);
	}
	b = kvp_allocate(mem, sizeof *b, "turboquant: codebook table");
	if (!b)
		return KVP_ENOMEM;
	beta_table_init(b, m);
	codebook(pt, b);
	kvp_release(mem, b, sizeof *b);
	return KVP_OK;
}

static void tq_close(struct kvp_codec *c)
{
	struct tq *t = c->state;

	if (!t)
		return;
	for (unsigned k = 0; k < TQ_PARTS; k++)
		part_free(&c->mem, &t->part[k]);
	kvp_release(&c->mem, t, sizeof *t);
	c->state = NULL;
}

static kvp_status tq_layout(struct kvp_codec *c, struct tq *t, unsigned bits, unsigned obits, uint64_t seed)
{
	unsigned m[TQ_PARTS] = { c->dim - t->outliers, t->outliers };
	unsigned b[TQ_PARTS] = { bits - t->qjl, obits - t->qjl };
	size_t at;

	t->head = sizeof(float) * t->nparts * (1 + t->qjl);
	at = t->head;
	for (unsigned k = 0; k < t->nparts; k++) {
		kvp_status st = part_init(&c->mem, &t->part[k], m[k], b[k], t->qjl, seed, k);
		if (st != KVP_OK)
			return st;
		t->part[k].first = k ? m[0] : 0;
		t->part[k].code_at = at;
		at += ((size_t)m[k] * b[k] + 7) / 8;
	}
	for (unsigned k = 0; k < t->nparts && t->qjl; k++) {
		t->part[k].sign_at = at;
		at += (m[k] + 7) / 8;
	}
	t->stride = at;
	return KVP_OK;
}

static size_t query_values(unsigned dim, unsigned qjl)
{
	return (size_t)dim * (1 + qjl);
}

static size_t query_bytes(unsigned dim, unsigned qjl)
{
	size_t a = query_values(dim, qjl), bytes = sizeof(float) * a + (a + 3) / 4 * 4 + sizeof(float) * 2 * TQ_PARTS;

	return (bytes + 15) / 16 * 16; /* each head's query in a group stays 16-byte aligned */
}

/* fit: a norm and an outlier flag per channel; encode: a part's vector and its residual; decode and
 * finish: one vector. */
static size_t tq_scratch_bytes(unsigned dim)
{
	size_t fit = (sizeof(double) + 1) * dim, encode = 2 * sizeof(float) * dim;

	return fit > encode ? fit : encode;
}

static kvp_status tq_open(struct kvp_codec *c, struct kvp_args *args, unsigned dim, struct kvp_codec *inner)
{
	uint32_t bits = 3, qjl = 0, outliers = 0, obits = 0;
	uint64_t seed = 0x6b7670616765ull;
	struct tq *t;
	kvp_status st;

	(void)inner;
	if ((st = kvp_args_u32(args, "bits", 1, 4, &bits)) != KVP_OK ||
	    (st = kvp_args_u32(args, "qjl", 0, 1, &qjl)) != KVP_OK ||
	    (st = kvp_args_u64(args, "seed", 0, UINT64_MAX, &seed)) != KVP_OK ||
	    (st = kvp_args_u32(args, "outliers", 0, dim, &outliers)) != KVP_OK)
		return st;
	obits = bits < 4 ? bits + 1 : 4;
	if ((st = kvp_args_u32(args, "outlier_bits", 1, 4, &obits)) != KVP_OK)
		return st;
	if (dim < 2)
		return kvp_fail(KVP_EINVAL, "turboquant: dim=%u is too small (at least 2)", dim);
	if (outliers && (outliers < 2 || dim - outliers < 2))
		return kvp_fail(KVP_EINVAL, "turboquant: outliers=%u on dim=%u leaves a part below 2 channels",
				outliers, dim);
	t = kvp_allocate(&c->mem, sizeof *t, "turboquant: its configuration");
	if (!t)
		return KVP_ENOMEM;
	t->qjl = qjl;
	t->outliers = outliers;
	t->nparts = outliers ? 2 : 1;
	c->state = t;
	st = tq_layout(c, t, bits, obits, seed);
	if (st != KVP_OK) {
		tq_close(c);
		return st;
	}
	c->ctx_bytes = outliers ? sizeof(uint32_t) * dim : 0;
	c->qprep_bytes = query_bytes(dim, qjl);
	c->scratch_bytes = tq_scratch_bytes(dim);
	c->acc_dim = dim * (1 + qjl);
	return KVP_OK;
}

static size_t tq_bytes(const struct kvp_codec *c, unsigned n)
{
	const struct tq *t = c->state;
	return t->stride * n;
}

/* ---- Per-stream context: the outlier channels. ---- */

static kvp_status tq_fit(const struct kvp_codec *c, void *ctx, unsigned n, const float *x, unsigned nq,
			 const float *q)
{
	const struct tq *t = c->state;
	uint32_t *chan = ctx;
	double *norm2 = c->scratch;                           /* [dim] */
	unsigned char *outlier = (unsigned char *)(norm2 + c->dim); /* [dim] */
	unsigned at = 0;

	(void)nq;
	(void)q;
	if (!t->outliers)
		return KVP_OK;
	for (unsigned j = 0; j < c->dim; j++) {
		norm2[j] = 0.0;
		outlier[j] = 0;
	}
	for (size_t i = 0; i < n; i++)
		for (unsigned j = 0; j < c->dim; j++)
			norm2[j] += (double)x[i * c->dim + j] * x[i * c->dim + j];
	/* K passes of "largest unmarked": K * dim work once per stream, and ties go to the lower index. */
	for (unsigned k = 0; k < t->outliers; k++) {
		unsigned best = c->dim;
		for (unsigned j = 0; j < c->dim; j++)
			if (!outlier[j] && (best == c->dim || norm2[j] > norm2[best]))
				best = j;
		outlier[best] = 1;
	}
	for (unsigned j = 0; j < c->dim; j++)
		if (!outlier[j])
			chan[at++] = j;
	for (unsigned j = 0; j < c->dim; j++)
		if (outlier[j])
			chan[at++] = j;
	return KVP_OK;
}

/* The part's channels in x, in the part's order. */
static void gather(const struct tq_part *pt, const uint32_t *chan, const float *x, float *y)
{
	if (!chan) {
		memcpy(y, x, sizeof(float) * pt->m);
		return;
	}
	for (unsigned j = 0; j < pt->m; j++)
		y[j] = x[chan[pt->first + j]];
}

/* A block of fixed size on restrict pointers, which the vectorizer takes (scatter_add's loop on j + l in
 * unsigned could wrap, for all it knows). */
static void add8(float *restrict x, const float *restrict y)
{
	for (unsigned l = 0; l < 8; l++)
		x[l] += y[l];
}

static void scatter_add(const struct tq_part *pt, const uint32_t *chan, const float *y, float *x)
{
	unsigned j = 0;

	if (chan) {
		for (; j < pt->m; j++)
			x[chan[pt->first + j]] += y[j];
		return;
	}
	for (; j + 8 <= pt->m; j += 8)
		add8(x + j, y + j);
	for (; j < pt->m; j++)
		x[j] += y[j];
}

static float load_f32(const unsigned char *p)
{
	float v;
	memcpy(&v, p, sizeof v);
	return v;
}

/* ---- Encode and decode: the scalar reference. ---- */

/*
 * The codec's first encoder and decoder, kept as they were: the fast paths below give the same bytes and
 * the same floats, and tests/test_turboquant.c compares the two on every layout. Not in the vtable
 * (declared in codec.h; hidden in the shared library, linked from the static one).
 */

static unsigned cell(const struct tq_part *pt, float y)
{
	unsigned idx = 0, levels = 1u << pt->bits;
	for (unsigned k = 0; k + 1 < levels; k++)
		idx += y > pt->threshold[k];
	return idx;
}

/* Quantizes the unit vector y (rotated in place) of one part, r being room for its residual; returns
 * gamma for qjl. */
static float encode_part(const struct tq_part *pt, unsigned qjl, float *y, float *r, unsigned char *tok)
{
	double g2 = 0.0;

	for (unsigned j = 0; j < pt->m; j++) {
		unsigned idx = pt->bits ? cell(pt, y[j]) : 0;
		if (pt->bits)
			kvp_bits_put(tok + pt->code_at, (size_t)j * pt->bits, pt->bits, idx);
		r[j] = y[j] - pt->centroid[idx];
		g2 += (double)r[j] * r[j];
	}
	if (!qjl)
		return 0.0f;
	for (unsigned i = 0; i < pt->m; i++) {
		const float *row = pt->s + (size_t)i * pt->m;
		float s = 0.0f;
		for (unsigned j = 0; j < pt->m; j++)
			s += row[j] * r[j];
		if (s >= 0.0f)
			kvp_bits_put(tok + pt->sign_at, i, 1, 1);
	}
	return (float)sqrt(g2);
}

static float norm_reference(const float *y, unsigned m)
{
	double n2 = 0.0;

	for (unsigned j = 0; j < m; j++)
		n2 += (double)y[j] * y[j];
	return (float)sqrt(n2);
}

kvp_status kvp_turboquant_encode_reference(const struct kvp_codec *c, const void *ctx, unsigned n, const float *x,
					   void *dst)
{
	const struct tq *t = c->state;
	unsigned char *p = dst;
	float *y = c->scratch, *r = y + c->dim; /* [dim] each */

	for (unsigned i = 0; i < n; i++, p += t->stride, x += c->dim) {
		memset(p, 0, t->stride);
		for (unsigned k = 0; k < t->nparts; k++) {
			const struct tq_part *pt = &t->part[k];
			float norm, gamma = 0.0f;

			gather(pt, ctx, x, y);
			norm = norm_reference(y, pt->m);
			if (!isfinite(norm))
				return kvp_fail(KVP_EINVAL, "turboquant: token %u has a non-finite value", i);
			for (unsigned j = 0; j < pt->m; j++)
				y[j] = norm > 0.0f ? y[j] / norm : 0.0f;
			rotate(pt, y);
			gamma = encode_part(pt, t->qjl, y, r, p);
			memcpy(p + sizeof(float) * k, &norm, sizeof norm);
			if (t->qjl)
				memcpy(p + sizeof(float) * (t->nparts + k), &gamma, sizeof gamma);
		}
	}
	return KVP_OK;
}

/* Every code pattern decodes; the scalars (each part's norm, then with qjl=1 its residual's) must be what
 * encode writes. */
static kvp_status tq_check(const struct kvp_codec *c, unsigned n, const void *src)
{
	const struct tq *t = c->state;
	const unsigned char *p = src;

	for (unsigned i = 0; i < n; i++, p += t->stride)
		for (unsigned k = 0; k < t->head / sizeof(float); k++) {
			const float v = load_f32(p + sizeof(float) * k);

			if (!kvp_codec_scale_ok(v))
				return kvp_fail(KVP_ECORRUPT, "turboquant: token %u's %s of part %u is %g, not a finite number >= 0",
						i, k < t->nparts ? "norm" : "residual norm", k % t->nparts, (double)v);
		}
	return KVP_OK;
}

static float qjl_scale(const struct tq_part *pt)
{
	return 1.2533141373155003f / (float)pt->m; /* sqrt(pi/2) / m */
}

/* The part's decoded unit vector in the rotated domain, times the norm: v = norm * (c[idx] + qjl term). */
static void decode_rotated(const struct tq *t, const struct tq_part *pt, unsigned k, const unsigned char *p,
			   float *v)
{
	float norm = load_f32(p + sizeof(float) * k);

	for (unsigned j = 0; j < pt->m; j++)
		v[j] = pt->bits ? pt->centroid[kvp_bits_get(p + pt->code_at, (size_t)j * pt->bits, pt->bits)]
				: 0.0f;
	if (t->qjl) {
		float a = qjl_scale(pt) * load_f32(p + sizeof(float) * (t->nparts + k));
		for (unsigned i = 0; i < pt->m; i++) {
			const float *row = pt->s + (size_t)i * pt->m;
			float s = kvp_bits_get(p + pt->sign_at, i, 1) ? a : -a;
			for (unsigned j = 0; j < pt->m; j++)
				v[j] += s * row[j];
		}
	}
	for (unsigned j = 0; j < pt->m; j++)
		v[j] *= norm;
}

static void scatter_add_reference(const struct tq_part *pt, const uint32_t *chan, const float *y, float *x)
{
	for (unsigned j = 0; j < pt->m; j++)
		x[chan ? chan[pt->first + j] : j] += y[j];
}

kvp_status kvp_turboquant_decode_reference(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src,
					   float *x)
{
	const struct tq *t = c->state;
	const unsigned char *p = src;
	float *v = c->scratch; /* [dim] */

	for (unsigned i = 0; i < n; i++, p += t->stride, x += c->dim) {
		memset(x, 0, sizeof(float) * c->dim);
		for (unsigned k = 0; k < t->nparts; k++) {
			decode_rotated(t, &t->part[k], k, p, v);
			unrotate(&t->part[k], v);
			scatter_add_reference(&t->part[k], ctx, v, x);
		}
	}
	return KVP_OK;
}

/* ---- Encode and decode: the fast paths. ---- */

/*
 * Every loop below runs in blocks of a fixed size (LANES, or 16) with a fixed trip count, which gcc (its -O2
 * "very cheap" cost model takes no loop that needs a remainder) and clang vectorize for SSE2, AVX2 or NEON
 * alike, and ends with the scalar remainder. Each computes the reference's float operations on the same
 * operands (only independent operations change their order), so the results are the same bits; the norm is
 * the one sum whose order changes, and part_norm says why its result does not.
 */
#define LANES 8

static float part_norm(const float *y, unsigned m)
{
	double e = (m + 4) * 0x1p-52, s = sqrt(kvp_kernels()->sum_squares(m, y));

	if ((float)(s * (1.0 - e)) == (float)(s * (1.0 + e)))
		return (float)s;
	return norm_reference(y, m);
}

/* The blocks of the loops below, on pointers: an index j + l in unsigned could wrap, which the
 * vectorizer cannot rule out. */
static void multiply8(float *restrict v, const float *restrict by)
{
	for (unsigned l = 0; l < LANES; l++)
		v[l] *= by[l];
}

static void scale8(float *restrict v, float k)
{
	for (unsigned l = 0; l < LANES; l++)
		v[l] *= k;
}

static void divide8(const float *restrict from, float *restrict v, const float *restrict sign, float norm)
{
	for (unsigned l = 0; l < LANES; l++)
		v[l] = from[l] / norm * sign[l];
}

static void unsign8(float *restrict v, const float *restrict sign, float scale)
{
	for (unsigned l = 0; l < LANES; l++)
		v[l] *= scale * sign[l];
}

/* v[j] *= by[j] (by NULL: v[j] *= k) for j < n. */
static void multiply(float *restrict v, const float *restrict by, float k, unsigned n)
{
	unsigned j = 0;

	if (by) {
		for (; j + LANES <= n; j += LANES)
			multiply8(v + j, by + j);
		for (; j < n; j++)
			v[j] *= by[j];
		return;
	}
	for (; j + LANES <= n; j += LANES)
		scale8(v + j, k);
	for (; j < n; j++)
		v[j] *= k;
}

/* v[j] = from[j] / norm, times sign[j] for j < p, as the reference divides and then rotates. */
static void divide(const float *restrict from, float *restrict v, const float *restrict sign, float norm,
		   unsigned p, unsigned m)
{
	unsigned j = 0;

	for (; j + LANES <= p; j += LANES)
		divide8(from + j, v + j, sign + j, norm);
	for (; j < p; j++)
		v[j] = from[j] / norm * sign[j];
	for (; j < m; j++)
		v[j] = from[j] / norm;
}

/* y = R(x / norm), the reference's divisions and rotation; a zero vector stays zero. */
static void rotate_unit(const struct tq_part *pt, const float *x, float *y, float norm)
{
	float scale = 1.0f / sqrtf((float)pt->p);

	if (!(norm > 0.0f)) {
		memset(y, 0, sizeof(float) * pt->m); /* R maps it to zeros, some negative: the same cells */
		return;
	}
	divide(x, y, pt->sign[0], norm, pt->p, pt->m);
	for (unsigned k = 0; k < pt->npass; k++) {
		float *w = y + pt->win[k];
		if (k)
			multiply(w, pt->sign[k], 0.0f, pt->p);
		kvp_kernels()->fwht(pt->p, w);
		multiply(w, NULL, scale, pt->p);
	}
}

static void rotate_fast(const struct tq_part *pt, float *v)
{
	float scale = 1.0f / sqrtf((float)pt->p);

	for (unsigned k = 0; k < pt->npass; k++) {
		float *w = v + pt->win[k];
		multiply(w, pt->sign[k], 0.0f, pt->p);
		kvp_kernels()->fwht(pt->p, w);
		multiply(w, NULL, scale, pt->p);
	}
}

static void unrotate_fast(const struct tq_part *pt, float *v)
{
	float scale = 1.0f / sqrtf((float)pt->p);

	for (unsigned k = pt->npass; k-- > 0;) {
		float *w = v + pt->win[k];
		unsigned j = 0;
		kvp_kernels()->fwht(pt->p, w);
		for (; j + LANES <= pt->p; j += LANES)
			unsign8(w + j, pt->sign[k] + j, scale);
		for (; j < pt->p; j++)
			w[j] *= scale * pt->sign[k][j];
	}
}

/*
 * The codes of the unit vector y (rotated) into a zeroed token, as encode_part writes them. The kernels'
 * sym_codes is cell() without a search, on the bit patterns of the floats (for finite floats y > t is a
 * comparison of integers once the signs are split off; the thresholds are symmetric: t[half - 1] = 0,
 * t[half - 1 - i] = -t[half - 1 + i]), so it takes the positive thresholds' bits; the last m % 16 codes
 * go through cell().
 */
static void quantize(const struct tq_part *pt, const float *y, unsigned char *tok)
{
	const unsigned bits = pt->bits, half = (1u << bits) / 2, whole = pt->m / 16 * 16;
	int32_t tb[TQ_LEVELS_MAX / 2];

	for (unsigned i = 0; i + 1 < half; i++)
		memcpy(&tb[i], &pt->threshold[half + i], sizeof tb[i]);
	kvp_kernels()->sym_codes(bits, whole, y, tb, tok + pt->code_at);
	for (unsigned j = whole; j < pt->m; j++)
		kvp_bits_put(tok + pt->code_at, (size_t)j * bits, bits, cell(pt, y[j]));
}

static kvp_status tq_encode(const struct kvp_codec *c, const void *ctx, unsigned n, const float *x, void *dst)
{
	const struct tq *t = c->state;
	unsigned char *p = dst;
	float *y = c->scratch, *r = y + c->dim; /* [dim] each */

	for (unsigned i = 0; i < n; i++, p += t->stride, x += c->dim) {
		memset(p, 0, t->stride);
		for (unsigned k = 0; k < t->nparts; k++) {
			const struct tq_part *pt = &t->part[k];
			float norm, gamma;

			const float *from = x; /* the part's channels: x itself without an outlier split */

			if (ctx) {
				gather(pt, ctx, x, r); /* r is free until encode_part */
				from = r;
			}
			norm = part_norm(from, pt->m);
			if (!isfinite(norm))
				return kvp_fail(KVP_EINVAL, "turboquant: token %u has a non-finite value", i);
			rotate_unit(pt, from, y, norm);
			memcpy(p + sizeof(float) * k, &norm, sizeof norm);
			if (!t->qjl) {
				quantize(pt, y, p);
				continue;
			}
			gamma = encode_part(pt, 1, y, r, p); /* the m x m product S r dominates: left as it was */
			memcpy(p + sizeof(float) * (t->nparts + k), &gamma, sizeof gamma);
		}
	}
	return KVP_OK;
}

/* 8 codes of `bits` bits from `bits` bytes, each looked up in lut; each width its own constant shifts. */
static inline void unpack8_width(const unsigned char *restrict in, unsigned bits, const float *restrict lut,
				 float *restrict v)
{
	uint64_t word = 0;

#pragma GCC unroll 4
	for (unsigned q = 0; q < bits; q++)
		word |= (uint64_t)in[q] << (8 * q);
#pragma GCC unroll 8
	for (unsigned l = 0; l < 8; l++)
		v[l] = lut[(word >> (bits * l)) & ((1u << bits) - 1)];
}

static void unpack8(const unsigned char *in, unsigned bits, const float *lut, float *v)
{
	switch (bits) {
	case 1:
		unpack8_width(in, 1, lut, v);
		break;
	case 2:
		unpack8_width(in, 2, lut, v);
		break;
	case 3:
		unpack8_width(in, 3, lut, v);
		break;
	default:
		unpack8_width(in, 4, lut, v);
		break;
	}
}

/* qjl=0: v = norm * c[idx], as decode_rotated computes it (c[idx] * norm is one product either way). */
static void decode_codes(const struct tq_part *pt, unsigned k, const unsigned char *p, float *v)
{
	const unsigned char *in = p + pt->code_at;
	const unsigned b = pt->bits, mask = (1u << b) - 1;
	float norm = load_f32(p + sizeof(float) * k), lut[TQ_LEVELS_MAX];
	unsigned j = 0;

	for (unsigned c = 0; c <= mask; c++)
		lut[c] = pt->centroid[c] * norm;
	for (; j + 8 <= pt->m; j += 8, in += b)
		unpack8(in, b, lut, v + j);
	for (; j < pt->m; j++)
		v[j] = lut[kvp_bits_get(p + pt->code_at, (size_t)j * b, b)];
}

static void unsign_into8(const float *restrict w, const float *restrict sign, float scale, float *restrict x)
{
	for (unsigned l = 0; l < LANES; l++)
		x[l] = 0.0f + w[l] * (scale * sign[l]);
}

/*
 * One part of all the channels, one pass (m a power of two): x = 0 + R^T v, the reference's unrotate and
 * scatter_add into zeros in one sweep (0 + t keeps the reference's +0 for -0).
 */
static void unrotate_into(const struct tq_part *pt, float *v, float *x)
{
	float scale = 1.0f / sqrtf((float)pt->p);
	unsigned j = 0;

	kvp_kernels()->fwht(pt->p, v);
	for (; j + LANES <= pt->p; j += LANES)
		unsign_into8(v + j, pt->sign[0] + j, scale, x + j);
	for (; j < pt->p; j++)
		x[j] = 0.0f + v[j] * (scale * pt->sign[0][j]);
}

static kvp_status tq_decode(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, float *x)
{
	const struct tq *t = c->state;
	const unsigned char *p = src;
	float *v = c->scratch; /* [dim] */

	for (unsigned i = 0; i < n; i++, p += t->stride, x += c->dim) {
		if (t->nparts == 1 && !t->qjl && t->part[0].npass == 1) {
			decode_codes(&t->part[0], 0, p, v);
			unrotate_into(&t->part[0], v, x);
			continue;
		}
		memset(x, 0, sizeof(float) * c->dim);
		for (unsigned k = 0; k < t->nparts; k++) {
			const struct tq_part *pt = &t->part[k];
			if (t->qjl)
				decode_rotated(t, pt, k, p, v);
			else
				decode_codes(pt, k, p, v);
			unrotate_fast(pt, v);
			scatter_add(pt, ctx, v, x);
		}
	}
	return KVP_OK;
}


/* ---- Fused paths in the rotated domain. ---- */

/* qprep and the accumulator: per part, m floats of the MSE domain, then (qjl) m floats of the S domain. */
static size_t part_offset(const struct tq *t, unsigned k)
{
	return k ? (size_t)t->part[0].m * (1 + t->qjl) : 0;
}

/*
 * A prepared query: R q per part (and S R q with qjl=1) in floats, at part_offset, then the same values
 * as int8 for the integer kernels, then the step of each int8 section (q ~ q8 * step). One step per
 * section: the kernels add integers across the whole section.
 */
struct tq_query {
	float *f;
	int8_t *q8;
	float *step; /* [part * 2 + (0 codes, 1 signs)] */
};

static struct tq_query query_at(const struct kvp_codec *c, const void *qprep)
{
	const struct tq *t = c->state;
	size_t a = query_values(c->dim, t->qjl);
	struct tq_query q;

	q.f = (float *)qprep;
	q.q8 = (int8_t *)(q.f + a);
	q.step = (float *)(q.q8 + (a + 3) / 4 * 4);
	return q;
}

static void tq_prepare_query(const struct kvp_codec *c, const void *ctx, const float *q, void *qprep)
{
	const struct tq *t = c->state;
	struct tq_query out = query_at(c, qprep);

	for (unsigned k = 0; k < t->nparts; k++) {
		const struct tq_part *pt = &t->part[k];
		size_t at = part_offset(t, k);
		float *qr = out.f + at, *sq = qr + pt->m;

		gather(pt, ctx, q, qr);
		rotate_fast(pt, qr);
		out.step[2 * k] = kvp_codec_query_i8(qr, pt->m, out.q8 + at);
		for (unsigned i = 0; i < pt->m && t->qjl; i++) {
			const float *row = pt->s + (size_t)i * pt->m;
			float s = 0.0f;
			for (unsigned j = 0; j < pt->m; j++)
				s += row[j] * qr[j];
			sq[i] = s;
		}
		if (t->qjl)
			out.step[2 * k + 1] = kvp_codec_query_i8(sq, pt->m, out.q8 + at + pt->m);
	}
}

/* The scalar slot (0 = norm, 1 = gamma) of part k for tokens [0, n), times w[i] (or 1 when w is NULL). */
static void scalars(const struct tq *t, unsigned k, unsigned slot, unsigned n, const unsigned char *p,
		    const float *w, float *out)
{
	size_t at = sizeof(float) * (slot * t->nparts + k);

	for (unsigned i = 0; i < n; i++, p += t->stride)
		out[i] = load_f32(p + at) * (w ? w[i] : 1.0f);
}

/* Tokens per pass of the fused paths: their per-token scalars live on the stack. */
#define CHUNK 256

static const float plus_minus_one[2] = { -1.0f, 1.0f };

/*
 * dot and axpy, one head at a time, in floats: the reference the group paths are measured against, and
 * what kvp_codec_dot gives (the inner product with the decoded vector, to float rounding).
 */
static void tq_dot(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, const void *qprep,
		   float *out)
{
	const struct kvp_kernels *kern = kvp_kernels();
	const struct tq *t = c->state;
	const unsigned char *p = src;
	float s[CHUNK], scale[CHUNK];

	(void)ctx;
	for (unsigned i0 = 0; i0 < n; i0 += CHUNK, p += t->stride * CHUNK) {
		unsigned cn = n - i0 < CHUNK ? n - i0 : CHUNK;

		for (unsigned i = 0; i < cn; i++)
			out[i0 + i] = 0.0f;
		for (unsigned k = 0; k < t->nparts; k++) {
			const struct tq_part *pt = &t->part[k];
			const float *qr = (const float *)qprep + part_offset(t, k), *sq = qr + pt->m;

			scalars(t, k, 0, cn, p, NULL, scale);
			if (pt->bits) {
				kern->lut_dot(pt->bits, pt->m, cn, p + pt->code_at, t->stride, pt->centroid, qr, s);
				for (unsigned i = 0; i < cn; i++)
					out[i0 + i] += scale[i] * s[i];
			}
			if (!t->qjl)
				continue;
			kern->lut_dot(1, pt->m, cn, p + pt->sign_at, t->stride, plus_minus_one, sq, s);
			scalars(t, k, 1, cn, p, scale, scale); /* norm * gamma */
			for (unsigned i = 0; i < cn; i++)
				out[i0 + i] += qjl_scale(pt) * scale[i] * s[i];
		}
	}
}

static void tq_axpy(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, const float *w,
		    float *acc)
{
	const struct kvp_kernels *kern = kvp_kernels();
	const struct tq *t = c->state;
	const unsigned char *p = src;
	float wn[CHUNK], wg[CHUNK];

	(void)ctx;
	for (unsigned i0 = 0; i0 < n; i0 += CHUNK, p += t->stride * CHUNK) {
		unsigned cn = n - i0 < CHUNK ? n - i0 : CHUNK;

		for (unsigned k = 0; k < t->nparts; k++) {
			const struct tq_part *pt = &t->part[k];
			float *a = acc + part_offset(t, k), *as = a + pt->m;

			scalars(t, k, 0, cn, p, w + i0, wn);
			if (pt->bits)
				kern->lut_axpy(pt->bits, pt->m, cn, p + pt->code_at, t->stride, pt->centroid, wn, a);
			if (!t->qjl)
				continue;
			scalars(t, k, 1, cn, p, wn, wg);
			kern->lut_axpy(1, pt->m, cn, p + pt->sign_at, t->stride, plus_minus_one, wg, as);
		}
	}
}

/*
 * The group paths, which attention uses: the kernels' integer lookups (kernels.h), with the query in int8
 * and each head's weights in 12-bit integers. Keys: one kernel call per section looks every code up once for
 * the whole group; the kernel reads each token's norm from the token itself. Signs (qjl=1) scale by
 * norm * gamma, gathered first. Tokens go in slices of KVP_AXPY_I16_ROWS, the most one values call takes.
 */
static const int8_t sign8[2] = { -1, 1 };
static const int16_t sign16[2] = { -1, 1 };

#define SLICE KVP_AXPY_I16_ROWS

/* Each head's step of a query section (0 codes, 1 signs) times the section's unit. */
static void head_scales(const struct kvp_codec *c, const struct tq_query *q, unsigned g, unsigned section,
			float unit, float *out)
{
	for (unsigned h = 0; h < g; h++)
		out[h] = unit * *(const float *)((const char *)(q->step + section) + (size_t)h * c->qprep_bytes);
}

static void tq_dot_group(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, unsigned g,
			 const void *qprep, float *out, size_t out_stride)
{
	const struct kvp_kernels *kern = kvp_kernels();
	const struct tq *t = c->state;
	const struct tq_query q = query_at(c, qprep);
	float hs[KVP_CODEC_GROUP_MAX], both[SLICE];

	(void)ctx;
	for (unsigned i0 = 0; i0 < n; i0 += SLICE) {
		const unsigned char *p = (const unsigned char *)src + (size_t)i0 * t->stride;
		const unsigned cn = n - i0 < SLICE ? n - i0 : SLICE;
		/* the slice's first kernel call writes its scores, the others add to them; part 0 always makes one
		 * (a part has bits - qjl bits: without codes it has signs) */
		int add = 0;

		for (unsigned k = 0; k < t->nparts; k++) {
			const struct tq_part *pt = &t->part[k];
			const size_t at = part_offset(t, k);
			const uint8_t *norm = p + sizeof(float) * k;

			if (pt->bits) {
				head_scales(c, &q, g, 2 * k, pt->unit8, hs);
				kern->lut_dot_i8_group(pt->bits, pt->m, cn, p + pt->code_at, t->stride, pt->lut8, g, q.q8 + at,
						       c->qprep_bytes, hs, norm, t->stride, out + i0, out_stride, add);
				add = 1;
			}
			if (!t->qjl)
				continue;
			scalars(t, k, 1, cn, p, NULL, both);
			for (unsigned i = 0; i < cn; i++)
				both[i] *= load_f32(norm + (size_t)i * t->stride);
			head_scales(c, &q, g, 2 * k + 1, qjl_scale(pt), hs);
			kern->lut_dot_i8_group(1, pt->m, cn, p + pt->sign_at, t->stride, sign8, g, q.q8 + at + pt->m,
					       c->qprep_bytes, hs, (const uint8_t *)both, sizeof(float), out + i0,
					       out_stride, add);
			add = 1;
		}
	}
}

/* The signs (qjl=1) of a slice of cn tokens from p, weighted by norm * gamma. */
static void axpy_signs(const struct kvp_codec *c, unsigned k, unsigned cn, const unsigned char *p, unsigned g,
		       const float *w, size_t w_stride, float *acc)
{
	const struct tq *t = c->state;
	const struct tq_part *pt = &t->part[k];
	const uint8_t *norm = p + sizeof(float) * k;
	float both[SLICE];

	scalars(t, k, 1, cn, p, NULL, both);
	for (unsigned i = 0; i < cn; i++)
		both[i] *= load_f32(norm + (size_t)i * t->stride);
	/* finish applies sqrt(pi/2) / m, as for the float axpy */
	kvp_kernels()->lut_axpy_i16_group(1, pt->m, cn, p + pt->sign_at, t->stride, sign16, 1.0f, g, w, w_stride,
					  (const uint8_t *)both, sizeof(float), acc + part_offset(t, k) + pt->m,
					  c->acc_dim, NULL);
}

/* Part k's codes of the tokens in rows (runs of one block each, or one slice): 8-bit weights when the
 * kernel takes them, else 12-bit ones run by run, each asking for its part of ahead. */
static void axpy_codes(const struct kvp_codec *c, unsigned k, const struct kvp_row_runs *rows, unsigned g,
		       const float *w, size_t w_stride, float *acc, const struct kvp_ahead *ahead)
{
	const unsigned runs = (rows->n + rows->run - 1) / rows->run;
	const struct kvp_kernels *kern = kvp_kernels();
	const struct tq *t = c->state;
	const struct tq_part *pt = &t->part[k];
	float *a = acc + part_offset(t, k);

	if (kern->lut_axpy_u8_group(pt->bits, pt->m, rows, pt->lut8, pt->unit8, g, w, w_stride, a, c->acc_dim, ahead))
		return;
	for (unsigned r = 0, i0 = 0; i0 < rows->n; r++, i0 += rows->run) {
		const struct kvp_ahead part = kvp_ahead_part(ahead, r, runs);

		kern->lut_axpy_i16_group(pt->bits, pt->m, rows->n - i0 < rows->run ? rows->n - i0 : rows->run,
					 rows->code[r], t->stride, pt->lut16, pt->unit16, g, w + i0, w_stride,
					 rows->scale[r], t->stride, a, c->acc_dim, &part);
	}
}

/*
 * Values: the kernel rounds each head's weights times the tokens' norms (or norm * gamma) itself. Weights
 * that are not negative (attention's) take 8 bits above the call's least weight (a block's, or a span's) against the int8
 * codebook (lut_axpy_u8_group: four tokens per int32 lane, one byte lookup per code where the int16
 * codebook takes two and an interleave); on bench_attend's data that moved the output from its decode by
 * 0.85e-3 at 2 bits. The kernel refuses any other weights, and tables without a vector version of it refuse
 * every call: those take 12 bits against the int16 codebook, the same values times 16.
 */
static void tq_axpy_group(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, unsigned g,
			  const float *w, size_t w_stride, float *acc)
{
	const struct tq *t = c->state;

	(void)ctx;
	for (unsigned i0 = 0; i0 < n; i0 += SLICE) {
		const unsigned char *p = (const unsigned char *)src + (size_t)i0 * t->stride;
		const unsigned cn = n - i0 < SLICE ? n - i0 : SLICE;

		for (unsigned k = 0; k < t->nparts; k++) {
			const struct tq_part *pt = &t->part[k];
			const struct kvp_row_runs rows = kvp_one_run(cn, p + pt->code_at, t->stride, p + sizeof(float) * k,
								     t->stride);

			if (pt->bits)
				axpy_codes(c, k, &rows, g, w + i0, w_stride, acc, NULL);
			if (t->qjl)
				axpy_signs(c, k, cn, p, g, w + i0, w_stride, acc);
		}
	}
}

/* A span's blocks as the runs of one call per part (KVP_CODEC_SPAN_TOKENS <= SLICE): one weight step and one
 * flush of the sums per part for the span, where a block at a time pays for both on each block. */
_Static_assert(KVP_CODEC_SPAN_BLOCKS <= KVP_RUNS_MAX && KVP_CODEC_SPAN_RUN % KVP_RUN_ROWS == 0 &&
		       KVP_CODEC_SPAN_TOKENS <= SLICE,
	       "a span is one call of the kernel");

static void tq_axpy_span(const struct kvp_codec *c, const void *ctx, const struct kvp_code_span *span, unsigned g,
			 const float *w, size_t w_stride, float *acc, const struct kvp_ahead *ahead)
{
	const struct tq *t = c->state;

	(void)ctx;
	for (unsigned k = 0; k < t->nparts; k++) {
		const struct tq_part *pt = &t->part[k];
		struct kvp_row_runs rows = { .n = span->n, .run = span->run, .stride = t->stride,
					     .scale_stride = t->stride };

		for (unsigned b = 0, i0 = 0; i0 < span->n; b++, i0 += span->run) {
			const unsigned char *p = span->src[b];

			rows.code[b] = p + pt->code_at, rows.scale[b] = p + sizeof(float) * k;
			if (t->qjl)
				axpy_signs(c, k, span->n - i0 < span->run ? span->n - i0 : span->run, p, g, w + i0,
					   w_stride, acc);
		}
		/* the last part's call asks for ahead */
		if (pt->bits)
			axpy_codes(c, k, &rows, g, w, w_stride, acc, k + 1 == t->nparts ? ahead : NULL);
	}
}

static void tq_finish(const struct kvp_codec *c, const void *ctx, const float *acc, float *out)
{
	const struct tq *t = c->state;
	float *v = c->scratch; /* [dim] */

	for (unsigned k = 0; k < t->nparts; k++) {
		const struct tq_part *pt = &t->part[k];
		const float *a = acc + part_offset(t, k), *as = a + pt->m;

		memcpy(v, a, sizeof(float) * pt->m);
		for (unsigned i = 0; i < pt->m && t->qjl; i++) {
			const float *row = pt->s + (size_t)i * pt->m;
			float s = qjl_scale(pt) * as[i];
			for (unsigned j = 0; j < pt->m; j++)
				v[j] += s * row[j];
		}
		unrotate_fast(pt, v);
		scatter_add(pt, ctx, v, out);
	}
}

static int tq_hadamard_codes(const struct kvp_codec *c, struct kvp_hadamard_codes *out)
{
	const struct tq *t = c->state;
	const struct tq_part *pt = &t->part[0];

	if (t->nparts != 1 || t->qjl || pt->npass != 1 || !pt->bits)
		return 0;
	*out = (struct kvp_hadamard_codes){ pt->bits, 0, pt->code_at, pt->lut8, pt->unit8, pt->sign[0] };
	return 1;
}

const struct kvp_codec_ops kvp_codec_turboquant = {
	.name = "turboquant",
	.flags = KVP_CODEC_SEPARABLE | KVP_CODEC_BITS,
	.with_bits = kvp_codec_bits_arg,
	.open = tq_open,
	.bytes = tq_bytes,
	.fit = tq_fit,
	.encode = tq_encode,
	.decode = tq_decode,
	.check = tq_check,
	.prepare_query = tq_prepare_query,
	.dot = tq_dot,
	.axpy = tq_axpy,
	.dot_group = tq_dot_group,
	.axpy_group = tq_axpy_group,
	.axpy_span = tq_axpy_span,
	.hadamard_codes = tq_hadamard_codes,
	.finish = tq_finish,
	.close = tq_close,
};
