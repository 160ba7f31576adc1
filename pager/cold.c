/*
 * The cold tier: full blocks whose tokens have all left the hot window are encoded by the sequence's
 * key and value codecs (k=, v= of the tenant spec). Blocks are encoded whole, so a codec whose groups
 * span tokens (KIVI keys) always sees complete groups; block= must be a multiple of every group size.
 *
 * Encoding happens inside kvp_append: the plan allocates the encoded blocks (and the stream's codec
 * context) together with everything else the append needs, so the quota decides before anything
 * changes; the commit encodes after the exact rows are written. A block the codec refuses to encode
 * stays exact: nothing is lost, it is only not compressed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codecs/codec.h"
#include "kernels/kernels.h"
#include "pager.h"

/* The dimension the spec is checked with at tenant open; the real one comes with each sequence. */
#define PROBE_DIM 128

static const char *side_spec(const struct kvp_tenant_config *cfg, const char *spec)
{
	if (spec[0])
		return spec;
	return cfg->store == KVP_STORE_FP16 ? "fp16" : "fp32";
}

/* mem: the sequence's (its codecs' tables are charged to its tenant), or the heap for a check. */
static kvp_status parse_side(const struct kvp_tenant_config *cfg, const char *spec, unsigned role,
			     unsigned dim, const struct kvp_allocator *mem, struct kvp_codec **out)
{
	const char *text = side_spec(cfg, spec);
	kvp_status st = kvp_codec_parse_in(text, strlen(text), dim, role, mem, out);

	if (st != KVP_OK)
		return kvp_fail_context(st, "tenant: %s=%s", role == KVP_CODEC_KEYS ? "k" : "v", text);
	for (const struct kvp_codec *c = *out; c; c = c->inner)
		if (cfg->block % c->group) {
			st = kvp_fail(KVP_EINVAL, "tenant: block=%u is not a multiple of the %u-token groups of "
				      "%s=%s", cfg->block, c->group, role == KVP_CODEC_KEYS ? "k" : "v", text);
			kvp_codec_free(*out);
			*out = NULL;
			return st;
		}
	return KVP_OK;
}

static int has_cold_tier(const struct kvp_tenant_config *cfg)
{
	return cfg->k_spec[0] || cfg->v_spec[0];
}

/* One side's spec at ladder level `level` (the spec itself without a ladder) into out. */
static kvp_status level_spec(const struct kvp_tenant_config *cfg, const char *spec, unsigned level, char *out)
{
	unsigned changed;

	snprintf(out, KVP_CODEC_SPEC_MAX, "%s", spec);
	if (!cfg->ladder.n || !spec[0])
		return KVP_OK;
	return kvp_ladder_spec_bits(spec, cfg->ladder.bits[level], out, KVP_CODEC_SPEC_MAX, &changed);
}

/* Both sides' codecs of one level; on failure neither is left allocated. */
static kvp_status parse_level(const struct kvp_tenant_config *cfg, unsigned level, unsigned dim,
			      const struct kvp_allocator *mem, struct kvp_codec **k, struct kvp_codec **v)
{
	char spec[KVP_CODEC_SPEC_MAX];
	kvp_status st = level_spec(cfg, cfg->k_spec, level, spec);

	*k = *v = NULL;
	if (st == KVP_OK)
		st = parse_side(cfg, spec, KVP_CODEC_KEYS, dim, mem, k);
	if (st == KVP_OK)
		st = level_spec(cfg, cfg->v_spec, level, spec);
	if (st == KVP_OK)
		st = parse_side(cfg, spec, KVP_CODEC_VALUES, dim, mem, v);
	if (st != KVP_OK) {
		if (cfg->ladder.n)
			kvp_fail_context(st, "tenant: ladder=%s, level %u (%u:%g)", cfg->ladder_spec, level + 1,
					 cfg->ladder.bits[level], cfg->ladder.keep[level]);
		kvp_codec_free(*k);
		*k = NULL;
	}
	return st;
}

static unsigned level_count(const struct kvp_tenant_config *cfg)
{
	return cfg->ladder.n ? cfg->ladder.n : 1;
}

kvp_status kvp_cold_check(const struct kvp_tenant_config *cfg)
{
	kvp_status st = KVP_OK;

	if (!has_cold_tier(cfg))
		return KVP_OK;
	for (unsigned l = 0; st == KVP_OK && l < level_count(cfg); l++) {
		struct kvp_codec *k, *v;
		st = parse_level(cfg, l, PROBE_DIM, &kvp_heap, &k, &v);
		kvp_codec_free(k);
		kvp_codec_free(v);
	}
	return st;
}

/* Attend's scores: one block's tokens for each query head of a GQA group, at most KVP_BLOCK_MAX (attend.c
 * takes longer fp16 blocks in slices). A block holds at most block= (or, the sink block, sinks=) tokens. */
static uint32_t scores_cap(const struct kvp_tenant_config *cfg, uint32_t group)
{
	uint64_t most = (uint64_t)(cfg->block > cfg->sinks ? cfg->block : cfg->sinks) * group;

	return most < KVP_BLOCK_MAX ? (uint32_t)most : KVP_BLOCK_MAX;
}

kvp_status kvp_cold_open(struct kvp_tenant *t, struct kvp_seq *s)
{
	struct kvp_cold *c = &s->cold;
	struct kvp_allocator mem = kvp_seq_allocator(s);
	uint32_t dim = s->shape.head_dim;
	kvp_status st = KVP_OK;

	memset(c, 0, sizeof *c);
	for (unsigned l = 0; has_cold_tier(&t->cfg) && st == KVP_OK && l < level_count(&t->cfg); l++) {
		if ((st = parse_level(&t->cfg, l, dim, &mem, &c->k_level[l], &c->v_level[l])) != KVP_OK)
			break;
		c->n_levels = l + 1;
		c->qprep_max = c->k_level[l]->qprep_bytes > c->qprep_max ? c->k_level[l]->qprep_bytes : c->qprep_max;
		c->acc_max = c->v_level[l]->acc_dim > c->acc_max ? c->v_level[l]->acc_dim : c->acc_max;
	}
	c->k = c->k_level[0];
	c->v = c->v_level[0];
	if (st == KVP_OK) {
		c->scores_cap = scores_cap(&t->cfg, s->group);
		c->scratch_bytes = c->scores_cap * sizeof(float) +
				   s->group * (c->qprep_max + c->acc_max * sizeof(float));
		c->scratch = kvp_alloc(t, c->scratch_bytes, KVP_BYTES_META, 0);
		if (!c->scratch)
			st = kvp_fail_context(KVP_ENOMEM, "kvp_seq_open: attention scratch");
	}
	if (st != KVP_OK)
		kvp_cold_close(t, s);
	return st;
}

void kvp_cold_close(struct kvp_tenant *t, struct kvp_seq *s)
{
	struct kvp_cold *c = &s->cold;

	if (c->scratch)
		kvp_free(t, c->scratch, c->scratch_bytes, KVP_BYTES_META, 0);
	for (unsigned l = 0; l < KVP_LADDER_MAX; l++) {
		kvp_codec_free(c->k_level[l]);
		kvp_codec_free(c->v_level[l]);
	}
	memset(c, 0, sizeof *c);
}

static size_t room(size_t bytes)
{
	return (bytes + 63) / 64 * 64;
}

/* One allocation for the contexts of every level, each 64-byte aligned after the header. */
static struct kvp_stream_ctx *ctx_new(struct kvp_tenant *t, const struct kvp_cold *c)
{
	size_t size = room(sizeof(struct kvp_stream_ctx)), at = size;
	struct kvp_stream_ctx *x;

	for (unsigned l = 0; l < c->n_levels; l++)
		size += room(c->k_level[l]->ctx_bytes) + room(c->v_level[l]->ctx_bytes);
	if (!(x = kvp_alloc(t, size, KVP_BYTES_META, 0)))
		return NULL;
	memset(x, 0, sizeof *x);
	atomic_init(&x->refs, 1);
	x->size = size;
	/* a codec without a context is handed NULL, as the standalone calls do */
	for (unsigned l = 0; l < c->n_levels; l++) {
		x->k_level[l] = c->k_level[l]->ctx_bytes ? (char *)x + at : NULL;
		at += room(c->k_level[l]->ctx_bytes);
		x->v_level[l] = c->v_level[l]->ctx_bytes ? (char *)x + at : NULL;
		at += room(c->v_level[l]->ctx_bytes);
	}
	x->k = x->k_level[0];
	x->v = x->v_level[0];
	return x;
}

void kvp_stream_ctx_put(struct kvp_tenant *t, struct kvp_stream_ctx *x)
{
	if (x && atomic_fetch_sub_explicit(&x->refs, 1, memory_order_acq_rel) == 1)
		kvp_free(t, x, x->size, KVP_BYTES_META, 0);
}

/*
 * How many exact blocks, from blocks[n_cold] on, turn cold once `add` more tokens arrive: the exact
 * region is full blocks and at most one partial last block, and a block turns cold when `window` tokens
 * follow it. With a policy only blocks a round has scored qualify: tokens are scored while exact.
 */
static uint32_t cold_count(const struct kvp_tenant_config *cfg, const struct kvp_seq *s,
			   const struct kvp_stream *st, uint32_t add)
{
	uint32_t exact = add, want, ok = 0;

	for (uint32_t i = st->n_cold; i < st->n_blocks; i++)
		exact += st->blocks[i]->n;
	want = exact >= cfg->window ? (exact - cfg->window) / cfg->block : 0;
	if (!s->policy)
		return want;
	for (uint32_t i = st->n_cold; i < st->n_blocks && ok < want; i++, ok++) {
		const struct kvp_block *b = st->blocks[i];
		if (b->n != cfg->block || b->pos[b->n - 1] >= st->scored_upto)
			break;
	}
	return ok;
}

kvp_status kvp_cold_plan(struct kvp_tenant *t, const struct kvp_seq *s, const struct kvp_stream *st,
			 uint32_t add, struct kvp_cold_plan *p)
{
	const struct kvp_cold *c = &s->cold;
	uint32_t B = t->cfg.block, dim = s->shape.head_dim, level = kvp_ladder_stream_level(s, st);

	memset(p, 0, sizeof *p);
	if (!c->k || !(p->n = cold_count(&t->cfg, s, st, add)))
		return KVP_OK;
	if (!(p->blocks = calloc(p->n, sizeof *p->blocks)) ||
	    !(p->rows = malloc((size_t)2 * B * dim * sizeof *p->rows)))
		return kvp_fail(KVP_ENOMEM, "out of memory planning the cold tier");
	for (uint32_t i = 0; i < p->n; i++) {
		/* the level is fixed from here to the commit: the block records the codecs that encode it */
		const struct kvp_codec *k = c->k_level[level], *v = c->v_level[level];
		p->blocks[i] = kvp_block_new_cold(t, B, k->ops->bytes(k, B), v->ops->bytes(v, B));
		if (!p->blocks[i])
			return KVP_ENOMEM;
		p->blocks[i]->level = level;
	}
	if (!st->ctx && !(p->ctx = ctx_new(t, c)))
		return KVP_ENOMEM;
	return KVP_OK;
}

void kvp_cold_unwind(struct kvp_tenant *t, struct kvp_cold_plan *p)
{
	for (uint32_t i = 0; i < p->n && p->blocks; i++)
		kvp_block_put(t, p->blocks[i]);
	free(p->blocks);
	free(p->rows);
	kvp_stream_ctx_put(t, p->ctx);
	memset(p, 0, sizeof *p);
}

/* fp32 rows of an exact block: in place for fp32, widened into rows for fp16. */
static const float *exact_rows(const struct kvp_block *b, const void *src, uint32_t dim, float *rows)
{
	if (b->store == KVP_STORE_FP32)
		return src;
	kvp_kernels()->f16_to_f32((size_t)b->n * dim, src, rows);
	return rows;
}

/*
 * SparK ranks key channels by k_j^2 * ||Q_j|| over the queries seen before its first group is encoded
 * (the prefill's last queries in the reference). kvp_attend hands each stream's group queries here until
 * the stream's context is fitted; a ring keeps the last fit_steps steps. Without it (no attend before the
 * first cold block, or no memory for the ring) the codec fits with no queries, as it does standalone.
 */
void kvp_cold_note_queries(struct kvp_seq *s, struct kvp_stream *st, const float *q)
{
	const struct kvp_codec *k = s->cold.k;
	uint32_t dim = s->shape.head_dim, cap;
	struct kvp_recent_queries *r = st->recent;

	if (!k || !k->fit_steps || st->ctx)
		return;
	if (!r) {
		cap = k->fit_steps * s->group;
		size_t bytes = sizeof *r + (size_t)cap * dim * sizeof(float);
		if (!(r = kvp_alloc(s->tenant, bytes, KVP_BYTES_META, 0)))
			return;
		r->bytes = bytes;
		r->cap = cap;
		r->n = r->next = 0;
		st->recent = r;
	}
	for (uint32_t h = 0; h < s->group; h++) {
		memcpy(r->q + (size_t)r->next * dim, q + (size_t)h * dim, dim * sizeof(float));
		r->next = (r->next + 1) % r->cap;
		r->n += r->n < r->cap;
	}
}

void kvp_cold_forget_queries(struct kvp_tenant *t, struct kvp_stream *st)
{
	if (st->recent)
		kvp_free(t, st->recent, st->recent->bytes, KVP_BYTES_META, 0);
	st->recent = NULL;
}

static kvp_status fit(const struct kvp_cold *c, const struct kvp_stream *st, struct kvp_stream_ctx *x,
		      uint32_t n, const float *k, const float *v)
{
	const struct kvp_recent_queries *r = st->recent;
	kvp_status st_ = KVP_OK;

	/* the ring's order does not matter: the codec takes per-channel norms over the queries. Every
	 * level is fitted now, so a later level change finds its contexts */
	for (unsigned l = 0; st_ == KVP_OK && l < c->n_levels; l++) {
		const struct kvp_codec *kc = c->k_level[l], *vc = c->v_level[l];
		if (kc->ops->fit)
			st_ = kc->ops->fit(kc, x->k_level[l], n, k, r ? r->n : 0, r ? r->q : NULL);
		if (st_ == KVP_OK && vc->ops->fit)
			st_ = vc->ops->fit(vc, x->v_level[l], n, v, 0, NULL);
	}
	return st_;
}

static kvp_status encode(const struct kvp_seq *s, struct kvp_stream *st, struct kvp_cold_plan *p,
			 const struct kvp_block *exact, struct kvp_block *cold)
{
	const struct kvp_cold *c = &s->cold;
	uint32_t dim = s->shape.head_dim, n = exact->n;
	float *kr = p->rows, *vr = p->rows + (size_t)n * dim;
	const float *k = exact_rows(exact, exact->k, dim, kr), *v = exact_rows(exact, exact->v, dim, vr);
	kvp_status rc;

	if (!st->ctx) {
		if ((rc = fit(c, st, p->ctx, n, k, v)) != KVP_OK)
			return rc;
		st->ctx = p->ctx;
		p->ctx = NULL;
	}
	rc = c->k_level[cold->level]->ops->encode(c->k_level[cold->level], st->ctx->k_level[cold->level], n, k,
						    cold->k);
	if (rc == KVP_OK)
		rc = c->v_level[cold->level]->ops->encode(c->v_level[cold->level], st->ctx->v_level[cold->level], n,
							    v, cold->v);
	if (rc != KVP_OK)
		return rc;
	memcpy(cold->pos, exact->pos, n * sizeof *cold->pos);
	cold->n = n;
	return KVP_OK;
}

void kvp_cold_commit(struct kvp_tenant *t, const struct kvp_seq *s, struct kvp_stream *st,
		     struct kvp_cold_plan *p)
{
	uint32_t done = 0;

	while (done < p->n) {
		struct kvp_block *exact = st->blocks[st->n_cold];
		if (exact->store == KVP_STORE_CODEC || exact->n != t->cfg.block ||
		    encode(s, st, p, exact, p->blocks[done]) != KVP_OK)
			break;
		st->blocks[st->n_cold++] = p->blocks[done];
		p->blocks[done++] = NULL;
		kvp_block_put(t, exact);
	}
	if (st->ctx)
		kvp_cold_forget_queries(t, st);
	kvp_cold_unwind(t, p);
}

void kvp_cold_gather(const struct kvp_seq *s, const struct kvp_stream *st, const struct kvp_block *b,
		     float *k, float *v)
{
	const struct kvp_cold *c = &s->cold;

	const struct kvp_codec *kc = c->k_level[b->level], *vc = c->v_level[b->level];

	if (k)
		kc->ops->decode(kc, st->ctx->k_level[b->level], b->n, b->k, k);
	if (v)
		vc->ops->decode(vc, st->ctx->v_level[b->level], b->n, b->v, v);
}
