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

static const char *side_name(unsigned role)
{
	return role == KVP_CODEC_KEYS ? "k" : "v";
}

/* One side's spec, parsed once: what a side without k= or v= is stored as when the other has one. */
static kvp_status spec_parse(const struct kvp_tenant_config *cfg, const char *spec, unsigned role,
			     struct kvp_codec_spec **out)
{
	const char *text = side_spec(cfg, spec);
	kvp_status st = kvp_codec_spec_parse(text, strlen(text), out);

	return st == KVP_OK ? st : kvp_fail_context(st, "tenant: %s=%s", side_name(role), text);
}

/* One side's codecs at a ladder level's bits (0: as written). mem: the sequence's (its codecs' tables are
 * charged to its tenant), or the heap for a check. */
static kvp_status open_side(const struct kvp_tenant_config *cfg, const struct kvp_codec_spec *spec, unsigned bits,
			    unsigned role, unsigned dim, const struct kvp_allocator *mem, struct kvp_codec **out)
{
	char text[KVP_CODEC_SPEC_MAX + 64];
	kvp_status st = kvp_codec_spec_open(spec, bits, dim, role, mem, out);

	/* messages quote the spec as this level reads it (writing it records no message) */
	if (!bits || kvp_codec_spec_write(spec, bits, text, sizeof text) != KVP_OK)
		snprintf(text, sizeof text, "%s", kvp_codec_spec_text(spec));
	if (st != KVP_OK)
		return kvp_fail_context(st, "tenant: %s=%s", side_name(role), text);
	for (const struct kvp_codec *c = *out; c; c = c->inner)
		if (cfg->block % c->group) {
			st = kvp_fail(KVP_EINVAL, "tenant: block=%u is not a multiple of the %u-token groups of "
				      "%s=%s", cfg->block, c->group, side_name(role), text);
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

/* Both sides' codecs of one level; on failure neither is left allocated. */
static kvp_status open_level(const struct kvp_tenant_config *cfg, const struct kvp_codec_spec *ks,
			     const struct kvp_codec_spec *vs, unsigned level, unsigned dim,
			     const struct kvp_allocator *mem, struct kvp_codec **k, struct kvp_codec **v)
{
	unsigned bits = kvp_gating_level_bits(&cfg->gating, level);
	kvp_status st;

	*k = *v = NULL;
	st = open_side(cfg, ks, bits, KVP_CODEC_KEYS, dim, mem, k);
	if (st == KVP_OK)
		st = open_side(cfg, vs, bits, KVP_CODEC_VALUES, dim, mem, v);
	if (st != KVP_OK) {
		kvp_gating_level_fail(&cfg->gating, level, st);
		kvp_codec_free(*k);
		*k = NULL;
	}
	return st;
}

/* Both sides' specs; on failure neither is left allocated. */
static kvp_status specs_parse(const struct kvp_tenant_config *cfg, struct kvp_codec_spec **k,
			      struct kvp_codec_spec **v)
{
	kvp_status st = spec_parse(cfg, cfg->k_spec, KVP_CODEC_KEYS, k);

	*v = NULL;
	if (st == KVP_OK && (st = spec_parse(cfg, cfg->v_spec, KVP_CODEC_VALUES, v)) != KVP_OK) {
		kvp_codec_spec_free(*k);
		*k = NULL;
	}
	return st;
}

kvp_status kvp_cold_check(const struct kvp_tenant_config *cfg)
{
	struct kvp_codec_spec *ks, *vs;
	kvp_status st;

	if (!has_cold_tier(cfg))
		return KVP_OK;
	if ((st = specs_parse(cfg, &ks, &vs)) != KVP_OK)
		return st;
	for (unsigned l = 0; st == KVP_OK && l < kvp_gating_levels(&cfg->gating); l++) {
		struct kvp_codec *k, *v;
		st = open_level(cfg, ks, vs, l, PROBE_DIM, &kvp_heap, &k, &v);
		kvp_codec_free(k);
		kvp_codec_free(v);
	}
	kvp_codec_spec_free(ks);
	kvp_codec_spec_free(vs);
	return st;
}

kvp_status kvp_cold_prepare(struct kvp_tenant_obj *t)
{
	t->k_codec = t->v_codec = NULL;
	return has_cold_tier(&t->cfg) ? specs_parse(&t->cfg, &t->k_codec, &t->v_codec) : KVP_OK;
}

void kvp_cold_unprepare(struct kvp_tenant_obj *t)
{
	kvp_codec_spec_free(t->k_codec);
	kvp_codec_spec_free(t->v_codec);
	t->k_codec = t->v_codec = NULL;
}

/* Attend's scores: one block's tokens, or with a cold tier a span's of cold blocks (up to
 * KVP_CODEC_SPAN_BLOCKS blocks of a multiple of KVP_CODEC_SPAN_RUN tokens, KVP_CODEC_SPAN_TOKENS in all), for
 * each query head of a GQA group, at most KVP_BLOCK_MAX (attend.c takes longer fp16 blocks in slices, and
 * shorter spans). A block holds at most block= (or, the sink block, sinks=) tokens. */
static uint32_t scores_cap(const struct kvp_tenant_config *cfg, int cold, uint32_t group)
{
	uint64_t most = cfg->block > cfg->sinks ? cfg->block : cfg->sinks;
	uint64_t span = (uint64_t)cfg->block * KVP_CODEC_SPAN_BLOCKS;

	if (span > KVP_CODEC_SPAN_TOKENS)
		span = KVP_CODEC_SPAN_TOKENS;
	if (cold && cfg->block % KVP_CODEC_SPAN_RUN == 0 && most < span)
		most = span;
	most *= group;

	return most < KVP_BLOCK_MAX ? (uint32_t)most : KVP_BLOCK_MAX;
}

kvp_status kvp_cold_open(struct kvp_tenant_obj *t, struct kvp_seq_obj *s)
{
	struct kvp_cold *c = &s->cold;
	struct kvp_allocator mem = kvp_seq_allocator(s);
	uint32_t dim = s->shape.head_dim;
	kvp_status st = KVP_OK;

	memset(c, 0, sizeof *c);
	for (unsigned l = 0; t->k_codec && st == KVP_OK && l < kvp_gating_levels(&t->cfg.gating); l++) {
		if ((st = open_level(&t->cfg, t->k_codec, t->v_codec, l, dim, &mem, &c->k_level[l], &c->v_level[l])) !=
		    KVP_OK)
			break;
		c->n_levels = l + 1;
		c->qprep_max = c->k_level[l]->qprep_bytes > c->qprep_max ? c->k_level[l]->qprep_bytes : c->qprep_max;
		c->acc_max = c->v_level[l]->acc_dim > c->acc_max ? c->v_level[l]->acc_dim : c->acc_max;
	}
	c->k = c->k_level[0];
	c->v = c->v_level[0];
	if (st == KVP_OK) {
		c->scores_cap = scores_cap(&t->cfg, c->n_levels > 0, s->group);
		c->scratch_bytes = c->scores_cap * sizeof(float) +
				   s->group * (c->qprep_max + c->acc_max * sizeof(float));
		c->scratch = kvp_alloc(t, c->scratch_bytes, KVP_BYTES_META, s->call);
		if (!c->scratch)
			st = kvp_fail_context(KVP_ENOMEM, "kvp_seq_open: attention scratch");
	}
	if (st != KVP_OK)
		kvp_cold_close(t, s);
	return st;
}

void kvp_cold_close(struct kvp_tenant_obj *t, struct kvp_seq_obj *s)
{
	struct kvp_cold *c = &s->cold;

	if (c->scratch)
		kvp_free(t, c->scratch, c->scratch_bytes, KVP_BYTES_META);
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
static struct kvp_stream_ctx *ctx_new(struct kvp_tenant_obj *t, const struct kvp_cold *c, struct kvp_call *call)
{
	size_t size = room(sizeof(struct kvp_stream_ctx)), at = size;
	struct kvp_stream_ctx *x;

	for (unsigned l = 0; l < c->n_levels; l++)
		size += room(c->k_level[l]->ctx_bytes) + room(c->v_level[l]->ctx_bytes);
	if (!(x = kvp_alloc(t, size, KVP_BYTES_META, call)))
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

void kvp_stream_ctx_put(struct kvp_tenant_obj *t, struct kvp_stream_ctx *x)
{
	if (x && atomic_fetch_sub_explicit(&x->refs, 1, memory_order_acq_rel) == 1)
		kvp_free(t, x, x->size, KVP_BYTES_META);
}

/*
 * How many exact blocks, from blocks[n_cold] on, turn cold once `add` more tokens arrive: the exact
 * region is full blocks and at most one partial last block, and a block turns cold when `window` tokens
 * follow it. With a policy only blocks a round has scored qualify: tokens are scored while exact.
 */
static uint32_t cold_count(const struct kvp_tenant_config *cfg, const struct kvp_seq_obj *s,
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
		if (b->n != cfg->block || kvp_block_last(b) >= st->scored_upto)
			break;
	}
	return ok;
}

/* The ladder level new cold blocks of st are encoded at (0 without a ladder). */
static uint32_t stream_level(const struct kvp_seq_obj *s, const struct kvp_stream *st)
{
	size_t i = (size_t)(st - s->streams);

	return kvp_gating_level(s->gating, (uint32_t)(i / s->shape.n_kv_heads), (uint32_t)(i % s->shape.n_kv_heads));
}

kvp_status kvp_cold_plan(struct kvp_tenant_obj *t, const struct kvp_seq_obj *s, const struct kvp_stream *st,
			 uint32_t add, struct kvp_cold_plan *p)
{
	const struct kvp_cold *c = &s->cold;
	uint32_t B = t->cfg.block, dim = s->shape.head_dim, level = stream_level(s, st);

	memset(p, 0, sizeof *p);
	if (!c->k || !(p->n = cold_count(&t->cfg, s, st, add)))
		return KVP_OK;
	if (!(p->blocks = calloc(p->n, sizeof *p->blocks)) ||
	    !(p->rows = malloc((size_t)2 * B * dim * sizeof *p->rows)))
		return kvp_fail(KVP_ENOMEM, "out of memory planning the cold tier");
	for (uint32_t i = 0; i < p->n; i++) {
		/* the level is fixed from here to the commit: the block records the codecs that encode it */
		const struct kvp_codec *k = c->k_level[level], *v = c->v_level[level];
		p->blocks[i] = kvp_block_new_cold(t, B, k->ops->bytes(k, B), v->ops->bytes(v, B), s->call);
		if (!p->blocks[i])
			return KVP_ENOMEM;
		p->blocks[i]->level = level;
	}
	if (!st->ctx && !(p->ctx = ctx_new(t, c, s->call)))
		return KVP_ENOMEM;
	return KVP_OK;
}

void kvp_cold_unwind(struct kvp_tenant_obj *t, struct kvp_cold_plan *p)
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
void kvp_cold_note_queries(struct kvp_seq_obj *s, struct kvp_stream *st, const float *q)
{
	const struct kvp_codec *k = s->cold.k;
	uint32_t dim = s->shape.head_dim, cap;
	struct kvp_recent_queries *r = st->recent;

	if (!k || !k->fit_steps || st->ctx)
		return;
	if (!r) {
		cap = k->fit_steps * s->group;
		size_t bytes = sizeof *r + (size_t)cap * dim * sizeof(float);
		if (!(r = kvp_alloc(s->tenant, bytes, KVP_BYTES_META, s->call)))
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

void kvp_cold_forget_queries(struct kvp_tenant_obj *t, struct kvp_stream *st)
{
	if (st->recent)
		kvp_free(t, st->recent, st->recent->bytes, KVP_BYTES_META);
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

static kvp_status encode(struct kvp_tenant_obj *t, const struct kvp_seq_obj *s, struct kvp_stream *st,
			 struct kvp_cold_plan *p, const struct kvp_block *exact, struct kvp_block *cold)
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
	/* the same tokens: the exact block's positions, shared */
	kvp_block_set_positions(t, cold, exact->pos_base, kvp_positions_get(exact->positions));
	cold->n = (uint16_t)n;
	return KVP_OK;
}

void kvp_cold_commit(struct kvp_tenant_obj *t, const struct kvp_seq_obj *s, struct kvp_stream *st,
		     struct kvp_cold_plan *p)
{
	uint32_t done = 0;

	while (done < p->n) {
		struct kvp_block *exact = st->blocks[st->n_cold];
		if (exact->store == KVP_STORE_CODEC || exact->n != t->cfg.block ||
		    encode(t, s, st, p, exact, p->blocks[done]) != KVP_OK)
			break;
		st->blocks[st->n_cold++] = p->blocks[done];
		p->blocks[done++] = NULL;
		kvp_block_put(t, exact);
	}
	if (st->ctx)
		kvp_cold_forget_queries(t, st);
	kvp_cold_unwind(t, p);
}

/* A full exact block's level-0 codes, the bytes kvp_cold_commit writes when the block turns cold, for codecs
 * with no per-stream context (their encoding depends on the rows alone): what the prefix cache publishes
 * for other pools. rows: scratch for 2 x n x head_dim floats. */
kvp_status kvp_cold_encode_block(const struct kvp_seq_obj *s, const struct kvp_block *exact, float *rows,
				 void *k_codes, void *v_codes)
{
	const struct kvp_cold *c = &s->cold;
	uint32_t dim = s->shape.head_dim, n = exact->n;
	const float *k, *v;
	kvp_status rc;

	if (!c->k || c->k->ctx_bytes || c->v->ctx_bytes || exact->store == KVP_STORE_CODEC)
		return kvp_fail(KVP_EINVAL, "cold tier: this block cannot be encoded without its stream");
	k = exact_rows(exact, exact->k, dim, rows);
	v = exact_rows(exact, exact->v, dim, rows + (size_t)n * dim);
	rc = c->k->ops->encode(c->k, NULL, n, k, k_codes);
	return rc == KVP_OK ? c->v->ops->encode(c->v, NULL, n, v, v_codes) : rc;
}

kvp_status kvp_cold_stream_ctx(struct kvp_tenant_obj *t, const struct kvp_seq_obj *s, struct kvp_stream *st)
{
	if (st->ctx || !s->cold.k)
		return KVP_OK;
	return (st->ctx = ctx_new(t, &s->cold, s->call)) ? KVP_OK : KVP_ENOMEM;
}

void kvp_cold_gather(const struct kvp_seq_obj *s, const struct kvp_stream *st, const struct kvp_block *b,
		     float *k, float *v)
{
	const struct kvp_cold *c = &s->cold;

	const struct kvp_codec *kc = c->k_level[b->level], *vc = c->v_level[b->level];

	if (k)
		kc->ops->decode(kc, st->ctx->k_level[b->level], b->n, b->k, k);
	if (v)
		vc->ops->decode(vc, st->ctx->v_level[b->level], b->n, b->v, v);
}
