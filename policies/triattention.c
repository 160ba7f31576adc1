/*
 * TriAttention (../shared/specs/triattention.md, section 1): a key's importance is the attention it is
 * expected to receive from future queries, predicted from per-band query statistics.
 *
 * For query head h, band f (complex x_f, half or interleaved layout), post-RoPE key k_f, q̄_f = E[q_f]
 * (pre-RoPE) and A_f = E|q_f|:
 *   a + ib   = q̄_f conj(k_f)
 *   S(k)     = mean over δ in D of Σ_f (a_f cos ω_f(t0+δ) − b_f sin ω_f(t0+δ))  +  Σ_f (A_f − |q̄_f|) |k_f|
 * with D = {1, 2, 4, ..., 2^(offsets-1)}. Working on post-RoPE keys with t0 needs no key positions (the
 * spec's recommended form). C_f = mean cos, S_f = mean sin are computed once per t0, so a key costs
 * about 3F multiply-adds and one square root per band, and no trigonometry:
 *   S(k) = Σ_f kr_f (mr C − mi S) + ki_f (mi C + mr S) + w_f |k_f|,   q̄_f = mr + i mi, w_f = A_f − |q̄_f|.
 * aggregate=max keeps one (cos, sin) row per offset and takes the largest offset sum instead of the mean.
 *
 * Each query head's row is z-normalized over the n scored tokens (population std, floored at 1e-6), then
 * the GQA group's rows are combined by max. The reference breaks ties with 1e-6 noise from a seeded
 * generator; here the selection breaks ties by recency instead (deterministic, no noise).
 *
 * Statistics: a .kvtria file (stats=FILE), or online (stats=online): running means of the queries seen
 * by observe. Observed queries arrive post-RoPE (what kvp_attend has); they are rotated back by their
 * own absolute position to pre-RoPE before averaging, because the statistics must not depend on where a
 * query sits: averaged post-RoPE, a band's phasor turns with the position and its mean shrinks towards
 * zero, which would read as "no concentration" (R = 0) for every fast band. Online means keep updating
 * with every observed query. Until a head has seen a query its scores are all zero (ties: recency).
 *
 * Memory: the tables, online statistics and fixed scratch are one allocation from the policy's allocator
 * (the pager's charges the sequence's tenant), laid out by tria_layout; score's rows, sized by the stream,
 * live for one call.
 * A stats file's statistics are read once and shared read-only (struct tria_file).
 */
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kernels.h"
#include "policies/policy.h"

#define OFFSETS_MAX 31
#define Z_STD_FLOOR 1e-6

enum aggregate { AGG_MEAN, AGG_MAX };
enum select_mode { SELECT_PER_HEAD, SELECT_PER_LAYER_HEAD, SELECT_UNION };

struct online_sums {
	double *re, *im, *abs; /* [n_layers][n_heads][F] */
	double *count;         /* [n_layers][n_heads] */
};

/*
 * What score works in: the GQA group's coefficients and one tile of band magnitudes, fixed and kept
 * between calls, and one raw row per query head, sized for the stream and released after each call.
 */
struct tria_scratch {
	uint32_t cap;        /* tokens the rows hold */
	float *rows;         /* [group][cap], its own allocation */
	float *coef;         /* [group][table rows][head_dim], in the keys' layout */
	float *weights;      /* [group][F] */
	float *kabs, *tmp;   /* [TILE][F], [TILE] */
};

/* A .kvtria file's statistics, read once and then only read: shared by the policies of a tenant's
 * sequences (prepared at tenant open) and by a policy and its forks; freed with the last reference. */
struct tria_file {
	_Atomic uint32_t refs;
	struct kvp_allocator mem; /* where this and the statistics came from */
	struct kvp_tria_stats stats;
};

struct tria {
	unsigned n_bands, n_offsets, aggregate, online;
	double *omega;              /* [F] */
	struct tria_file *file;     /* stats=FILE: shared, read only */
	struct online_sums sums;    /* stats=online */
	/* the per-t0 phase table: [1 or n_offsets][F] cos and sin (the mean row for AGG_MEAN) */
	int64_t table_t0;
	float *cos_t, *sin_t;
	/* one head's coefficients, loaded per head */
	float *alpha, *beta, *weight;
	struct tria_scratch scratch; /* score's buffers, kept between calls */
	void *block;                 /* the fixed arrays above, block_bytes long (tria_layout) */
	size_t block_bytes;
};

/* ---- band access ---- */

static inline void band(const float *x, unsigned f, unsigned n_bands, kvp_rope_layout layout, float *re, float *im)
{
	if (layout == KVP_ROPE_HALF) {
		*re = x[f];
		*im = x[f + n_bands];
	} else {
		*re = x[2 * f];
		*im = x[2 * f + 1];
	}
}

/* ---- statistics ---- */

/* Band f of (layer, head): pre-RoPE mean (mr, mi) and mean magnitude a. */
static void head_band(const struct tria *t, const kvp_shape *s, uint32_t layer, uint32_t head, unsigned f,
		      float *mr, float *mi, float *a)
{
	size_t at = ((size_t)layer * s->n_heads + head) * t->n_bands + f;

	if (!t->online) {
		*mr = t->file->stats.mean_re[at];
		*mi = t->file->stats.mean_im[at];
		*a = t->file->stats.abs_mean[at];
		return;
	}
	double c = t->sums.count[(size_t)layer * s->n_heads + head];
	*mr = c > 0 ? (float)(t->sums.re[at] / c) : 0.0f;
	*mi = c > 0 ? (float)(t->sums.im[at] / c) : 0.0f;
	*a = c > 0 ? (float)(t->sums.abs[at] / c) : 0.0f;
}

/* Builds the phase table for t0 once; later calls at the same t0 reuse it. */
static void phase_table(struct tria *t, int64_t t0)
{
	unsigned F = t->n_bands, rows = t->aggregate == AGG_MEAN ? 1 : t->n_offsets;

	if (t->table_t0 == t0)
		return;
	memset(t->cos_t, 0, sizeof(float) * F * rows);
	memset(t->sin_t, 0, sizeof(float) * F * rows);
	for (unsigned f = 0; f < F; f++) {
		double cm = 0, sm = 0;
		for (unsigned d = 0; d < t->n_offsets; d++) {
			double angle = t->omega[f] * (double)(t0 + ((int64_t)1 << d));
			double c = cos(angle), s = sin(angle);
			if (t->aggregate == AGG_MAX) {
				t->cos_t[d * F + f] = (float)c;
				t->sin_t[d * F + f] = (float)s;
			}
			cm += c;
			sm += s;
		}
		if (t->aggregate == AGG_MEAN) {
			t->cos_t[f] = (float)(cm / t->n_offsets);
			t->sin_t[f] = (float)(sm / t->n_offsets);
		}
	}
	t->table_t0 = t0;
}

/* alpha/beta rows (one per table row) and the norm weights of one query head. */
static void head_coefficients(struct tria *t, const kvp_shape *s, uint32_t layer, uint32_t head)
{
	unsigned F = t->n_bands, rows = t->aggregate == AGG_MEAN ? 1 : t->n_offsets;

	for (unsigned f = 0; f < F; f++) {
		float mr, mi, a;
		head_band(t, s, layer, head, f, &mr, &mi, &a);
		t->weight[f] = a - sqrtf(mr * mr + mi * mi);
		for (unsigned r = 0; r < rows; r++) {
			float c = t->cos_t[r * F + f], sn = t->sin_t[r * F + f];
			t->alpha[r * F + f] = mr * c - mi * sn;
			t->beta[r * F + f] = mi * c + mr * sn;
		}
	}
}

/* |k_f| of every band of n keys into kabs[n][F]: shared by every query head of the group. */
static void band_magnitudes(unsigned F, kvp_rope_layout layout, unsigned head_dim, uint32_t n, const float *k,
			    float *kabs)
{
	for (uint32_t i = 0; i < n; i++)
		for (unsigned f = 0; f < F; f++) {
			float kr, ki;
			band(k + (size_t)i * head_dim, f, F, layout, &kr, &ki);
			kabs[(size_t)i * F + f] = sqrtf(kr * kr + ki * ki);
		}
}

/* Raw score S of one post-RoPE key for the head whose coefficients are loaded; kabs: its |k_f|. */
static float key_score(const struct tria *t, const float *k, const float *kabs, kvp_rope_layout layout)
{
	unsigned F = t->n_bands, rows = t->aggregate == AGG_MEAN ? 1 : t->n_offsets;
	float norm = 0, best = -INFINITY;

	for (unsigned f = 0; f < F; f++)
		norm += t->weight[f] * kabs[f];
	for (unsigned r = 0; r < rows; r++) {
		const float *al = t->alpha + r * F, *be = t->beta + r * F;
		float sum = 0;
		for (unsigned f = 0; f < F; f++) {
			float kr, ki;
			band(k, f, F, layout, &kr, &ki);
			sum += kr * al[f] + ki * be[f];
		}
		best = sum > best ? sum : best;
	}
	return best + norm;
}

/* (x - mean) / max(std, floor) over the row, population std. */
static void z_normalize(float *row, uint32_t n)
{
	double mean = 0, var = 0, sd;

	for (uint32_t i = 0; i < n; i++)
		mean += row[i];
	mean /= n;
	for (uint32_t i = 0; i < n; i++)
		var += (row[i] - mean) * (row[i] - mean);
	sd = sqrt(var / n);
	if (sd < Z_STD_FLOOR)
		sd = Z_STD_FLOOR;
	for (uint32_t i = 0; i < n; i++)
		row[i] = (float)((row[i] - mean) / sd);
}

/*
 * The band sums of key_score are one dot product over the key's own layout: sum_f kr*alpha_f + ki*beta_f
 * is <k, c> with c holding alpha and beta where the layout keeps each band's real and imaginary parts.
 * So a head scores all n keys with the dot kernels (vectorized, checked against scalar in kernels/), and
 * key_score stays the reference the tests compare with.
 */
static void layout_coefficients(const struct tria *t, const kvp_shape *s, unsigned r, float *c)
{
	unsigned F = t->n_bands;

	for (unsigned f = 0; f < F; f++) {
		unsigned re = s->rope_layout == KVP_ROPE_HALF ? f : 2 * f;
		unsigned im = s->rope_layout == KVP_ROPE_HALF ? f + F : 2 * f + 1;
		c[re] = t->alpha[r * F + f];
		c[im] = t->beta[r * F + f];
	}
}

/*
 * Keys are scored a tile at a time for every query head of the group, so a tile's keys and band
 * magnitudes are read from cache by all of them instead of streaming the whole stream once per head.
 * TILE is a multiple of 4: the dot kernels take keys four at a time from the start of each call, so
 * tiling leaves every key's sum exactly as one call over all n keys would give it.
 */
#define TILE 256

/* The rows go back after each call: they grow with the stream, and a policy's memory between rounds is
 * bookkeeping every token pays for (rounds are every `every` steps, so this costs little). */
static void scratch_release(struct kvp_policy *p, struct tria *t)
{
	unsigned group = p->shape.n_heads / p->shape.n_kv_heads;

	if (t->scratch.rows)
		kvp_release(&p->mem, t->scratch.rows, (size_t)group * t->scratch.cap * sizeof(float));
	t->scratch.rows = NULL;
	t->scratch.cap = 0;
}

/* Rows for n tokens; the only step of score that can fail, so it runs first. */
static kvp_status scratch_reserve(struct kvp_policy *p, struct tria *t, uint32_t n)
{
	struct tria_scratch *w = &t->scratch;
	unsigned group = p->shape.n_heads / p->shape.n_kv_heads;
	/* an eighth more than n, so a growing stream reallocates rarely, without a power of two's slack */
	uint64_t cap = ((uint64_t)n + n / 8 + 15) / 16 * 16;
	float *grown;

	if (w->rows && n <= w->cap)
		return KVP_OK;
	if (cap > UINT32_MAX)
		cap = n;
	if (!(grown = kvp_allocate_array(&p->mem, (size_t)group * cap, sizeof(float), "score rows")))
		return kvp_fail_context(KVP_ENOMEM, "triattention: scoring %u tokens", n);
	if (w->rows)
		kvp_release(&p->mem, w->rows, (size_t)group * w->cap * sizeof(float));
	w->rows = grown;
	w->cap = (uint32_t)cap;
	return KVP_OK;
}

/* Every group head's coefficients in the keys' layout, and its norm weights. */
static void group_coefficients(struct tria *t, const kvp_shape *s, uint32_t layer, uint32_t kv_head)
{
	struct tria_scratch *w = &t->scratch;
	unsigned group = s->n_heads / s->n_kv_heads, rows = t->aggregate == AGG_MEAN ? 1 : t->n_offsets;

	for (unsigned g = 0; g < group; g++) {
		head_coefficients(t, s, layer, kv_head * group + g);
		for (unsigned r = 0; r < rows; r++)
			layout_coefficients(t, s, r, w->coef + ((size_t)g * rows + r) * s->head_dim);
		memcpy(w->weights + (size_t)g * t->n_bands, t->weight, sizeof(float) * t->n_bands);
	}
}

/* Raw rows of the group's heads for keys [at, at + m) (m <= TILE): w->rows[g][at + i]. */
static void tile_scores(const struct tria *t, const kvp_shape *s, uint32_t n, uint32_t at, uint32_t m,
			const float *k)
{
	const struct kvp_kernels *kern = kvp_kernels();
	const struct tria_scratch *w = &t->scratch;
	unsigned group = s->n_heads / s->n_kv_heads, rows = t->aggregate == AGG_MEAN ? 1 : t->n_offsets;
	const float *keys = k + (size_t)at * s->head_dim;

	kern->band_norms(s->head_dim, m, s->rope_layout == KVP_ROPE_INTERLEAVED, keys, w->kabs);
	for (unsigned g = 0; g < group; g++) {
		float *row = w->rows + (size_t)g * n + at;
		for (unsigned r = 0; r < rows; r++) {
			kern->dot_f32(s->head_dim, m, keys, w->coef + ((size_t)g * rows + r) * s->head_dim, 1.0f,
				      r ? w->tmp : row);
			for (uint32_t i = 0; r && i < m; i++)
				row[i] = w->tmp[i] > row[i] ? w->tmp[i] : row[i];
		}
		kern->dot_f32(t->n_bands, m, w->kabs, w->weights + (size_t)g * t->n_bands, 1.0f, w->tmp);
		for (uint32_t i = 0; i < m; i++)
			row[i] += w->tmp[i];
	}
}

static kvp_status score(struct kvp_policy *p, uint32_t layer, uint32_t kv_head, int64_t t0, uint32_t n,
			const int32_t *pos, const float *k, float *scores)
{
	struct tria *t = p->state;
	const kvp_shape *s = &p->shape;
	unsigned group = s->n_heads / s->n_kv_heads;
	kvp_status st = scratch_reserve(p, t, n);

	(void)pos; /* the post-RoPE form needs only t0 */
	if (st != KVP_OK)
		return st;
	phase_table(t, t0);
	group_coefficients(t, s, layer, kv_head);
	for (uint32_t at = 0; at < n; at += TILE)
		tile_scores(t, s, n, at, n - at < TILE ? n - at : TILE, k);
	for (uint32_t i = 0; i < n; i++)
		scores[i] = -INFINITY;
	for (unsigned g = 0; g < group; g++) {
		float *row = t->scratch.rows + (size_t)g * n;
		z_normalize(row, n);
		for (uint32_t i = 0; i < n; i++)
			scores[i] = row[i] > scores[i] ? row[i] : scores[i];
	}
	scratch_release(p, t);
	return KVP_OK;
}

/* Raw S of one query head, for tests and experiments: the unnormalized row before z and max. */
kvp_status kvp_tria_raw_scores(struct kvp_policy *p, uint32_t layer, uint32_t head, int64_t t0, uint32_t n,
			       const float *k, float *out)
{
	struct tria *t;
	float *kabs;

	if (!p || p->ops != &kvp_policy_triattention || layer >= p->shape.n_layers || head >= p->shape.n_heads)
		return kvp_fail(KVP_EINVAL, "kvp_tria_raw_scores: not a triattention policy or head out of range");
	t = p->state;
	kabs = kvp_allocate_array(&p->mem, (size_t)t->n_bands * n, sizeof *kabs, "triattention: band magnitudes");
	if (!kabs)
		return KVP_ENOMEM;
	phase_table(t, t0);
	head_coefficients(t, &p->shape, layer, head);
	band_magnitudes(t->n_bands, p->shape.rope_layout, p->shape.head_dim, n, k, kabs);
	for (uint32_t i = 0; i < n; i++)
		out[i] = key_score(t, k + (size_t)i * p->shape.head_dim, kabs + (size_t)i * t->n_bands,
				   p->shape.rope_layout);
	kvp_release(&p->mem, kabs, (size_t)t->n_bands * n * sizeof *kabs);
	return KVP_OK;
}

/* Online statistics: rotate each observed query back to pre-RoPE at its position, then add it. */
static kvp_status observe(struct kvp_policy *p, const struct kvp_observation *o)
{
	struct tria *t = p->state;
	const kvp_shape *s = &p->shape;
	unsigned group = s->n_heads / s->n_kv_heads, F = t->n_bands;

	if (!t->online || !o->q)
		return KVP_OK;
	for (unsigned g = 0; g < group; g++) {
		uint32_t head = o->kv_head * group + g;
		size_t hi = (size_t)o->layer * s->n_heads + head, at = hi * F;
		const float *q = o->q + (size_t)g * s->head_dim;
		for (unsigned f = 0; f < F; f++) {
			float qr, qi;
			double angle = t->omega[f] * (double)o->t, c = cos(angle), sn = sin(angle), pr, pi;
			band(q, f, F, s->rope_layout, &qr, &qi);
			pr = qr * c + qi * sn; /* q_rot * e^{-i omega t} */
			pi = qi * c - qr * sn;
			t->sums.re[at + f] += pr;
			t->sums.im[at + f] += pi;
			t->sums.abs[at + f] += sqrt(pr * pr + pi * pi);
		}
		t->sums.count[hi] += 1;
	}
	return KVP_OK;
}

/* ---- the statistics file ---- */

static kvp_status file_load(const char *path, const kvp_shape *shape, const struct kvp_allocator *mem,
			    struct tria_file **out)
{
	struct tria_file *f = kvp_allocate(mem, sizeof *f, "triattention: statistics");
	kvp_status st;

	*out = NULL;
	if (!f)
		return KVP_ENOMEM;
	st = kvp_tria_stats_read_in(path, shape, mem, &f->stats);
	if (st != KVP_OK) {
		kvp_release(mem, f, sizeof *f);
		return st;
	}
	f->mem = *mem;
	atomic_init(&f->refs, 1);
	*out = f;
	return KVP_OK;
}

static struct tria_file *file_get(struct tria_file *f)
{
	atomic_fetch_add_explicit(&f->refs, 1, memory_order_relaxed);
	return f;
}

static void file_put(struct tria_file *f)
{
	struct kvp_allocator mem;

	if (!f || atomic_fetch_sub_explicit(&f->refs, 1, memory_order_acq_rel) != 1)
		return;
	mem = f->mem;
	kvp_tria_stats_free(&f->stats);
	kvp_release(&mem, f, sizeof *f);
}

/* stats=: path[0] == '\0' for online (the default), else the file's name. */
static kvp_status stats_path(struct kvp_args *args, char *path, size_t cap)
{
	const char *v = "online";
	unsigned vl = 6;
	kvp_status st = kvp_args_text(args, "stats", &v, &vl);

	path[0] = '\0';
	if (st != KVP_OK || kvp_name_is(v, vl, "online"))
		return st;
	if (vl == 0 || vl >= cap)
		return kvp_fail(KVP_EINVAL, "triattention: stats= needs a file name or 'online'");
	memcpy(path, v, vl);
	path[vl] = '\0';
	return KVP_OK;
}

/* Reads stats=FILE once, into mem, for every policy of this spec; the shape is checked when each opens. */
static kvp_status prepare_tria(struct kvp_args *args, const struct kvp_allocator *mem, void **shared)
{
	char path[4096];
	kvp_status st = stats_path(args, path, sizeof path);
	struct tria_file *f = NULL;

	if (st == KVP_OK && path[0])
		st = file_load(path, NULL, mem, &f);
	*shared = f;
	return st;
}

static void release_tria(void *shared)
{
	file_put(shared);
}

/* ---- open / close ---- */

/* The next array of a layout: 64-byte aligned from the block's start (NULL while only measuring). */
static void *carve(char *block, size_t *at, size_t bytes)
{
	void *p = block ? block + *at : NULL;

	*at += (bytes + 63) / 64 * 64;
	return p;
}

/* Points t's fixed arrays into block, or with block NULL only measures them; returns their bytes. */
static size_t tria_layout(struct tria *t, const kvp_shape *s, char *block)
{
	unsigned F = s->head_dim / 2, rows = t->aggregate == AGG_MEAN ? 1 : t->n_offsets;
	unsigned group = s->n_heads / s->n_kv_heads;
	size_t heads = (size_t)s->n_layers * s->n_heads, at = 0;

	t->omega = carve(block, &at, sizeof(double) * F);
	t->cos_t = carve(block, &at, sizeof(float) * F * rows);
	t->sin_t = carve(block, &at, sizeof(float) * F * rows);
	t->alpha = carve(block, &at, sizeof(float) * F * rows);
	t->beta = carve(block, &at, sizeof(float) * F * rows);
	t->weight = carve(block, &at, sizeof(float) * F);
	if (t->online) {
		t->sums.re = carve(block, &at, sizeof(double) * heads * F);
		t->sums.im = carve(block, &at, sizeof(double) * heads * F);
		t->sums.abs = carve(block, &at, sizeof(double) * heads * F);
		t->sums.count = carve(block, &at, sizeof(double) * heads);
	}
	t->scratch.coef = carve(block, &at, sizeof(float) * group * rows * s->head_dim);
	t->scratch.weights = carve(block, &at, sizeof(float) * group * F);
	t->scratch.kabs = carve(block, &at, sizeof(float) * TILE * F);
	t->scratch.tmp = carve(block, &at, sizeof(float) * TILE);
	return at;
}

static void tria_free(struct kvp_policy *p, struct tria *t)
{
	unsigned group = p->shape.n_heads / p->shape.n_kv_heads;

	if (!t)
		return;
	file_put(t->file);
	kvp_release(&p->mem, t->block, t->block_bytes);
	if (t->scratch.rows)
		kvp_release(&p->mem, t->scratch.rows, (size_t)group * t->scratch.cap * sizeof(float));
	kvp_release(&p->mem, t, sizeof *t);
}

/* The fixed arrays of t (online, aggregate and n_offsets set), zeroed. */
static kvp_status tria_alloc(struct kvp_policy *p, struct tria *t)
{
	const kvp_shape *s = &p->shape;
	unsigned F = s->head_dim / 2;

	t->n_bands = F;
	t->table_t0 = -1;
	t->block_bytes = tria_layout(t, s, NULL);
	if (!(t->block = kvp_allocate(&p->mem, t->block_bytes, "triattention: tables and statistics")))
		return KVP_ENOMEM;
	tria_layout(t, s, t->block);
	/* plain RoPE: omega_f = theta^(-2f/d) */
	for (unsigned f = 0; f < F; f++)
		t->omega[f] = pow((double)s->rope_theta, -2.0 * f / (double)s->head_dim);
	return KVP_OK;
}

static kvp_status parse_budget(struct kvp_policy *p, struct kvp_args *args)
{
	const char *v;
	unsigned vl = 0;
	double ratio = 0;
	uint32_t budget = 2048; /* the reference default */
	kvp_status st = kvp_args_u32(args, "budget", 1, INT32_MAX, &budget);

	if (st == KVP_OK)
		st = kvp_args_double(args, "ratio", 1e-6, 1.0, &ratio);
	if (st != KVP_OK)
		return st;
	if (ratio > 0 && kvp_args_text(args, "budget", &v, &vl) == KVP_OK && vl)
		return kvp_fail(KVP_EINVAL, "triattention: give budget= or ratio=, not both");
	p->plan.budget = budget;
	p->plan.ratio = ratio;
	return KVP_OK;
}

/* stats=FILE: the prepared statistics when the opener has them (checked against this shape), else read now. */
static kvp_status parse_stats(struct tria *t, struct kvp_policy *p, struct kvp_args *args)
{
	char path[4096];
	kvp_status st = stats_path(args, path, sizeof path);

	if (st != KVP_OK)
		return st;
	t->online = !path[0];
	if (t->online)
		return KVP_OK;
	if (!p->shared)
		return file_load(path, &p->shape, &p->mem, &t->file);
	st = kvp_tria_stats_check(path, &((struct tria_file *)p->shared)->stats, &p->shape);
	if (st == KVP_OK)
		t->file = file_get(p->shared);
	return st;
}

/* select=per_head (the reference: one kept set per KV head for every layer), per_layer_head or union. */
static kvp_status scope(struct kvp_args *args, enum kvp_round_scope *out)
{
	static const char *const selects[] = { "per_head", "per_layer_head", "union", NULL };
	unsigned select = SELECT_PER_HEAD;
	kvp_status st = kvp_args_choice(args, "select", selects, &select);

	*out = select == SELECT_PER_HEAD ? KVP_ROUND_HEAD : select == SELECT_UNION ? KVP_ROUND_LAYER : KVP_ROUND_STREAM;
	return st;
}

static kvp_status open_tria(struct kvp_policy *p, struct kvp_args *args)
{
	static const char *const aggregates[] = { "mean", "max", NULL };
	struct tria *t = kvp_allocate(&p->mem, sizeof *t, "triattention: its state");
	uint32_t offsets = 17, every = 128;
	kvp_status st;

	if (!t)
		return KVP_ENOMEM;
	st = parse_budget(p, args);
	if (st == KVP_OK)
		st = kvp_args_u32(args, "every", 1, 1u << 20, &every);
	if (st == KVP_OK)
		st = kvp_args_u32(args, "offsets", 1, OFFSETS_MAX, &offsets);
	if (st == KVP_OK)
		st = kvp_args_choice(args, "aggregate", aggregates, &t->aggregate);
	if (st == KVP_OK)
		st = scope(args, &p->plan.scope);
	t->n_offsets = offsets;
	if (st == KVP_OK)
		st = parse_stats(t, p, args);
	if (st == KVP_OK)
		st = tria_alloc(p, t);
	if (st != KVP_OK) {
		tria_free(p, t);
		return st;
	}
	p->plan.every = every;
	p->plan.pin_prompt = 1; /* the reference keeps the prompt */
	p->state = t;
	return KVP_OK;
}

/* A forked sequence keeps the statistics: shares the file's, copies the online sums observed so far. */
static kvp_status clone_tria(struct kvp_policy *dst, const struct kvp_policy *src)
{
	const struct tria *from = src->state;
	const kvp_shape *s = &src->shape;
	size_t heads = (size_t)s->n_layers * s->n_heads, bands = heads * from->n_bands;
	struct tria *t = kvp_allocate(&dst->mem, sizeof *t, "triattention: its state");

	if (!t)
		return KVP_ENOMEM;
	t->n_offsets = from->n_offsets;
	t->aggregate = from->aggregate;
	t->online = from->online;
	if (tria_alloc(dst, t) != KVP_OK) {
		tria_free(dst, t);
		return KVP_ENOMEM;
	}
	if (t->online) {
		memcpy(t->sums.re, from->sums.re, sizeof(double) * bands);
		memcpy(t->sums.im, from->sums.im, sizeof(double) * bands);
		memcpy(t->sums.abs, from->sums.abs, sizeof(double) * bands);
		memcpy(t->sums.count, from->sums.count, sizeof(double) * heads);
	} else {
		t->file = file_get(from->file);
	}
	dst->state = t;
	return KVP_OK;
}

static void close_tria(struct kvp_policy *p)
{
	tria_free(p, p->state);
	p->state = NULL;
}

/* The coherence signal: the mean resultant length of the KV head's query group, from the file's
 * statistics or the online sums (0 before any query was seen). */
static kvp_status coherence(const struct kvp_policy *p, uint32_t layer, uint32_t kv_head, double *out)
{
	const struct tria *t = p->state;
	unsigned group, F;
	double resultant = 0, energy = 0;

	if (!t->online) {
		*out = kvp_gate_mrl(&t->file->stats, layer, kv_head, p->shape.n_kv_heads);
		return KVP_OK;
	}
	group = p->shape.n_heads / p->shape.n_kv_heads;
	F = t->n_bands;
	for (unsigned g = 0; g < group; g++) {
		size_t head = (size_t)layer * p->shape.n_heads + kv_head * group + g, at = head * F;
		for (unsigned f = 0; f < F; f++) {
			resultant += hypot(t->sums.re[at + f], t->sums.im[at + f]);
			energy += t->sums.abs[at + f];
		}
	}
	/* sums over the same count: the means' ratio is the sums' ratio */
	*out = energy > 0 ? (resultant > energy ? 1.0 : resultant / energy) : 0.0;
	return KVP_OK;
}

const struct kvp_policy_ops kvp_policy_triattention = {
	.name = "triattention",
	.open = open_tria,
	.prepare = prepare_tria,
	.release = release_tria,
	.scores_keys = 1,
	.observe = observe,
	.score = score,
	.clone = clone_tria,
	.coherence = coherence,
	.scope = scope,
	.close = close_tria,
};
