/*
 * Token policies in the pager (policy= of the tenant spec). At kvp_seq_step every stream that holds
 * budget + every tokens goes through a policy round (policies/round.c scores and selects), and its
 * survivors are compacted. A policy whose scores follow position (keeps_newest: StreamingLLM) is not
 * scored: kvp_policy_cut gives its verdict as runs of the oldest unprotected tokens, so nothing is
 * gathered and only the blocks holding those runs are read token by token. Compaction:
 *   - the sink block and the hot window are protected: the round always keeps them;
 *   - cold blocks of separable codecs lose tokens by moving the survivors' bytes into fresh blocks,
 *     never by re-encoding them, so a compacted token decodes bit-identically;
 *   - cold blocks of a codec whose groups span tokens (KIVI keys) are kept or dropped whole, by the
 *     share of their tokens the round selected (at least half: kept);
 *   - exact blocks are repacked the same way.
 * A full block every one of whose tokens survives is kept as it is (shared with forks, nothing copied)
 * until a block before it has lost tokens (a partly filled one only as its region's last: H2O keeps its
 * heavy hitters, and a partly filled cold block in the middle would hold a block's bytes for their few
 * tokens round after round); from then on survivors are packed into full blocks, except when the losses
 * are a prefix of the region (StreamingLLM drops the oldest): then the blocks after it are kept as they
 * are, and the prefix's last packed block may stay partly filled.
 * Single-stream rounds load into the sequence's round space (kept between rounds while it is small beside
 * the sequence's tokens, charged as metadata).
 * Cold tokens are scored from their decoded keys; a block is encoded only after a round has scored
 * it (cold.c), so every token's first decision is made while it is exact. Until a stream's first round
 * (it holds fewer than budget + every tokens) its blocks therefore stay exact.
 *
 * A round is all-or-nothing: the fresh blocks and the new table are allocated first; on KVP_ENOMEM
 * the stream is as it was and kvp_seq_step reports it.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "codecs/codec.h"
#include "pager.h"
#include "policies/policy.h"

/* At tenant open, the name and argument syntax; the arguments' values at kvp_evict_prepare, which checks
 * them once what the policy loads once (its statistics file) is loaded. */
kvp_status kvp_evict_check(const struct kvp_tenant_config *cfg)
{
	struct kvp_policy_spec *spec;
	kvp_status st;

	if (!cfg->policy_spec[0])
		return KVP_OK;
	st = kvp_policy_spec_parse(cfg->policy_spec, strlen(cfg->policy_spec), &spec);
	if (st != KVP_OK)
		return kvp_fail_context(st, "tenant: policy=%s", cfg->policy_spec);
	kvp_policy_spec_free(spec);
	return KVP_OK;
}

kvp_status kvp_evict_prepare(struct kvp_tenant_obj *t)
{
	/* what the policy loads once is the tenant's: charged to it, counted in its bytes_meta */
	struct kvp_allocator mem = kvp_tenant_allocator(t);
	const char *text = t->cfg.policy_spec;
	kvp_status st;

	t->policy_spec = NULL;
	if (!text[0])
		return KVP_OK;
	st = kvp_policy_spec_parse(text, strlen(text), &t->policy_spec);
	if (st == KVP_OK)
		st = kvp_policy_spec_prepare(t->policy_spec, &mem);
	if (st == KVP_OK)
		st = kvp_policy_spec_check(t->policy_spec);
	if (st != KVP_OK) {
		kvp_evict_unprepare(t);
		return kvp_fail_context(st, "tenant: policy=%s", text);
	}
	return KVP_OK;
}

void kvp_evict_unprepare(struct kvp_tenant_obj *t)
{
	kvp_policy_spec_free(t->policy_spec);
	t->policy_spec = NULL;
}

kvp_status kvp_evict_open(struct kvp_tenant_obj *t, struct kvp_seq_obj *s)
{
	/* the policy's state is the sequence's: charged to the tenant, counted in its bytes_meta */
	struct kvp_allocator mem = kvp_seq_allocator(s);
	kvp_status st;

	s->prompt_end = -1;
	if (!t->policy_spec)
		return KVP_OK;
	st = kvp_policy_spec_open(t->policy_spec, &s->shape, &mem, &s->policy);
	if (st != KVP_OK)
		return kvp_fail_context(st, "kvp_seq_open: policy=%s", t->cfg.policy_spec);
	if (t->cfg.pin_prompt)
		s->policy->plan.pin_prompt = 1;
	return KVP_OK;
}

kvp_status kvp_evict_fork(struct kvp_tenant_obj *t, const struct kvp_seq_obj *src, struct kvp_seq_obj *s)
{
	struct kvp_allocator mem = kvp_seq_allocator(s);

	(void)t;
	s->prompt_end = src->prompt_end;
	if (!src->policy)
		return KVP_OK;
	return kvp_policy_clone_in(src->policy, &mem, &s->policy);
}

static void round_space_release(struct kvp_tenant_obj *t, struct kvp_round_space *r)
{
	if (r->bytes) /* one allocation: the keys first when there are any */
		kvp_free(t, r->k ? (void *)r->k : (void *)r->pos, r->bytes, KVP_BYTES_META);
	memset(r, 0, sizeof *r);
}

void kvp_evict_close(struct kvp_tenant_obj *t, struct kvp_seq_obj *s)
{
	round_space_release(t, &s->round_space);
	kvp_policy_free(s->policy);
	s->policy = NULL;
	kvp_observe_release(s);
}

void kvp_observe_release(struct kvp_seq_obj *s)
{
	if (s->observe.bytes)
		kvp_free(s->tenant, s->observe.weights, s->observe.bytes, KVP_BYTES_META);
	memset(&s->observe, 0, sizeof s->observe);
}

/* Room for n tokens, in multiples of 16. */
kvp_status kvp_observe_reserve(struct kvp_seq_obj *s, uint32_t n)
{
	struct kvp_observe_buf *o = &s->observe;
	uint64_t cap = ((uint64_t)n + 15) / 16 * 16;
	size_t bytes;
	void *mem;

	if (n <= o->cap)
		return KVP_OK;
	if (cap > UINT32_MAX)
		cap = n;
	bytes = (size_t)cap * (s->group * sizeof(float) + sizeof(int32_t));
	if (!(mem = kvp_alloc(s->tenant, bytes, KVP_BYTES_META, s->call)))
		return kvp_fail_context(KVP_ENOMEM, "kvp_attend: room to observe %u tokens for the policy", n);
	if (o->bytes)
		kvp_free(s->tenant, o->weights, o->bytes, KVP_BYTES_META);
	o->weights = mem;
	o->pos = (int32_t *)(o->weights + (size_t)s->group * cap);
	o->cap = (uint32_t)cap;
	o->bytes = bytes;
	return KVP_OK;
}

/* ---- compaction ---- */

/* How the tokens of one region of blocks (cold, then exact) are moved. */
struct region {
	uint32_t from, to;      /* blocks[from, to) of the stream */
	int whole;              /* blocks are kept or dropped whole */
	size_t k_stride, v_stride; /* bytes per token */
	int cold;
};

struct compaction {
	struct kvp_block **table; /* the new block table */
	uint32_t cap, n, n_cold;
	struct kvp_block **fresh; /* allocated blocks, used in order */
	uint32_t n_fresh, used;
	/* [the old table's n_blocks]: 1 when the new table holds the block as it is. Its reference moves
	 * there rather than being taken and dropped, which would touch every block at every round. */
	uint8_t *reused;
	uint32_t dropped;
};

static int separable(const struct kvp_codec *c, uint32_t block)
{
	return (c->flags & KVP_CODEC_SEPARABLE) && c->group == 1 &&
	       c->ops->bytes(c, block) == (size_t)block * c->ops->bytes(c, 1);
}

/* Cold blocks [from, to) of one ladder level: their codecs decide whether bytes can be moved. */
static struct region cold_region(const struct kvp_seq_obj *s, uint32_t level, uint32_t from, uint32_t to)
{
	const struct kvp_codec *k = s->cold.k_level[level], *v = s->cold.v_level[level];
	struct region r = { from, to, 0, 0, 0, 1 };
	uint32_t B = s->tenant->cfg.block;

	r.whole = !separable(k, B) || !separable(v, B);
	if (!r.whole) {
		r.k_stride = k->ops->bytes(k, 1);
		r.v_stride = v->ops->bytes(v, 1);
	}
	return r;
}

/* One past the last cold block from `from` on with the same level: survivors are packed only among
 * blocks of one level, so every block stays readable by the codecs it records. */
static uint32_t level_run_end(const struct kvp_stream *st, uint32_t from)
{
	uint32_t to = from + 1;

	while (to < st->n_cold && st->blocks[to]->level == st->blocks[from]->level)
		to++;
	return to;
}

static struct region exact_region(const struct kvp_seq_obj *s, const struct kvp_stream *st)
{
	struct region r = { st->n_cold, st->n_blocks, 0, 0, 0, 0 };

	r.k_stride = r.v_stride = (size_t)s->shape.head_dim * (s->tenant->cfg.store == KVP_STORE_FP16 ? 2 : 4);
	return r;
}

/*
 * What a round keeps of one stream, by stream index (the sink block's tokens first): a flag per token
 * from a scored round, or, from a keeps_newest policy's cut, everything but two runs, so that a block's
 * count is arithmetic and only the blocks that lose tokens are read token by token.
 */
struct verdict {
	const uint8_t *keep; /* [n_tokens], 1 = kept; NULL: cut says what is dropped */
	struct kvp_cut cut;
};

static int kept_at(const struct verdict *v, uint32_t i)
{
	if (v->keep)
		return v->keep[i] != 0;
	/* unsigned: an index before a run wraps past its count */
	return !(i - v->cut.from[0] < v->cut.count[0] || i - v->cut.from[1] < v->cut.count[1]);
}

/* How many of the tokens [at, at + n) lie in [from, from + count). */
static uint32_t overlap(uint32_t at, uint32_t n, uint32_t from, uint32_t count)
{
	uint32_t lo = at > from ? at : from, hi = at + n < from + count ? at + n : from + count;

	return hi > lo ? hi - lo : 0;
}

/* How many of the tokens [at, at + n) the verdict keeps. */
static uint32_t kept_in(const struct verdict *v, uint32_t at, uint32_t n)
{
	uint32_t k = 0;

	if (!v->keep)
		return n - overlap(at, n, v->cut.from[0], v->cut.count[0]) - overlap(at, n, v->cut.from[1], v->cut.count[1]);
	for (uint32_t i = 0; i < n; i++)
		k += v->keep[at + i] != 0;
	return k;
}

/*
 * Where packing may stop: when the blocks that lose tokens are the region's first ones (a prefix: what
 * StreamingLLM's oldest-first eviction always gives), returns the first block after them, and the
 * blocks from there on are reused as they are, leaving the prefix's last packed block partly filled.
 * Otherwise (or when that could leave a second partly filled block, or stall the cold tier) returns
 * r->to: everything after the first block that loses a token is repacked.
 *
 * The partly filled block can cost a block of memory for as long as it lives (packing everything would
 * have merged it with the partly filled newest block), so reuse is only taken when it costs no block or
 * when the region holds at least eight blocks' worth: a long stream saves the copying for an eighth of
 * its memory at most, and a short one, where copying is cheap anyway, is repacked full.
 */
static uint32_t reuse_from(const struct kvp_seq_obj *s, const struct kvp_stream *st, const struct region *r,
			   const struct verdict *v, uint32_t at)
{
	const uint32_t B = s->tenant->cfg.block;
	uint32_t i = r->from, prefix_end = r->from, prefix_kept = 0;
	uint64_t tokens = 0, after = 0, reused_blocks, packed_blocks;

	/* cold_count turns exact blocks cold only while they are full: a partial one would stall it */
	if (r->whole || (!r->cold && s->cold.k))
		return r->to;
	for (; i < r->to; at += st->blocks[i]->n, i++) {
		uint32_t n = st->blocks[i]->n, kept = kept_in(v, at, n);
		tokens += n;
		if (kept == n) {
			/* a partial block would be left in the middle of a reused run */
			if (n != B && i + 1 < r->to)
				return r->to;
			after += n;
		} else if (prefix_end != i) {
			return r->to; /* a loss after a kept block: not a prefix */
		} else {
			prefix_end = i + 1;
			prefix_kept += kept;
		}
	}
	reused_blocks = (prefix_kept + B - 1) / B + (r->to - prefix_end);
	packed_blocks = (prefix_kept + after + B - 1) / B;
	return reused_blocks <= packed_blocks || tokens >= 8 * (uint64_t)B ? prefix_end : r->to;
}

/* Planning a compaction: the survivors' positions, packed, and where each fresh block's begin, so every
 * fresh block gets its positions made (and charged) before anything is committed. */
struct packing {
	int32_t *pos;       /* [stream tokens] */
	uint32_t n;
	uint32_t *starts;   /* [stream blocks + 1]: the index in pos of each fresh block's first token */
	uint32_t n_starts, assigned; /* fresh blocks begun; fresh blocks given their positions */
	int32_t *block_pos; /* [KVP_BLOCK_MAX]: one old block's positions */
};

/*
 * Walks one region: fully kept blocks are reused while nothing is pending (and from reuse_from on in
 * any case), survivors of the others are packed into fresh blocks. With c == NULL it only counts the
 * fresh blocks needed (*fresh) and packs the survivors' positions into pk. *at, the stream index of the
 * region's first token, is advanced past it.
 */
static void walk_region(const struct kvp_seq_obj *s, const struct kvp_stream *st, const struct region *r,
			const struct verdict *v, uint32_t *at, struct compaction *c, uint32_t *fresh, struct packing *pk)
{
	const uint32_t B = s->tenant->cfg.block, reuse = reuse_from(s, st, r, v, *at);
	struct kvp_block *cur = NULL;
	uint32_t pending = 0;

	for (uint32_t i = r->from; i < r->to; i++) {
		struct kvp_block *b = st->blocks[i];
		uint32_t kept = kept_in(v, *at, b->n);

		if (i == reuse)
			pending = 0;
		/* a partly filled block is reused only as the region's last: one in the middle would hold a
		 * block's bytes for its few tokens at every round to come (H2O keeps its heavy hitters) */
		if (r->whole || (kept == b->n && !pending && (b->n == B || i + 1 == r->to))) {
			if (c && (r->whole ? 2 * kept >= b->n : 1)) {
				c->reused[i] = 1;
				c->table[c->n++] = b;
				c->n_cold += r->cold;
			} else if (c) {
				c->dropped += b->n;
			}
			*at += b->n;
			continue;
		}
		if (pk)
			kvp_block_positions(b, pk->block_pos);
		for (uint32_t j = 0; j < b->n; j++) {
			if (!kept_at(v, *at + j)) {
				if (c)
					c->dropped++;
				continue;
			}
			if (!pending)
				*fresh += 1;
			if (pk) {
				if (!pending)
					pk->starts[pk->n_starts++] = pk->n;
				pk->pos[pk->n++] = pk->block_pos[j];
			}
			if (c) {
				if (!pending) {
					cur = c->fresh[c->used++];
					c->table[c->n++] = cur;
					c->n_cold += r->cold;
				}
				memcpy((char *)cur->k + pending * r->k_stride, (const char *)b->k + j * r->k_stride,
				       r->k_stride);
				memcpy((char *)cur->v + pending * r->v_stride, (const char *)b->v + j * r->v_stride,
				       r->v_stride);
				cur->n = (uint16_t)(pending + 1);
			}
			pending = pending + 1 == B ? 0 : pending + 1;
		}
		*at += b->n;
	}
}

static void compaction_free(struct kvp_tenant_obj *t, struct compaction *c)
{
	for (uint32_t i = c->used; i < c->n_fresh; i++)
		kvp_block_put(t, c->fresh[i]);
	free(c->fresh);
	free(c->reused);
	if (c->table)
		kvp_free(t, c->table, (size_t)c->cap * sizeof *c->table, KVP_BYTES_META);
	memset(c, 0, sizeof *c);
}

/* Fresh blocks for `n` survivors' blocks of a region, appended to c->fresh, each with the positions it
 * will hold (pk's next n). */
static kvp_status fresh_blocks(struct kvp_tenant_obj *t, const struct kvp_seq_obj *s, const struct region *r,
			       uint32_t level, uint32_t n, struct compaction *c, struct packing *pk)
{
	const struct kvp_codec *k = s->cold.k_level[level], *v = s->cold.v_level[level];
	uint32_t B = t->cfg.block;

	for (uint32_t i = 0; i < n; i++, pk->assigned++) {
		uint32_t from = pk->starts[pk->assigned];
		uint32_t to = pk->assigned + 1 < pk->n_starts ? pk->starts[pk->assigned + 1] : pk->n;
		struct kvp_positions *positions;
		struct kvp_block *b = r->cold ?
			kvp_block_new_cold(t, B, k->ops->bytes(k, B), v->ops->bytes(v, B), s->call) :
			kvp_block_new(t, B, s->shape.head_dim, t->cfg.store, s->call);
		if (!b)
			return KVP_ENOMEM;
		b->level = (uint8_t)(r->cold ? level : 0);
		c->fresh[c->n_fresh++] = b;
		if (kvp_positions_make(t, pk->pos + from, to - from, s->call, &positions) != KVP_OK)
			return KVP_ENOMEM;
		kvp_block_set_positions(t, b, pk->pos[from], positions);
	}
	return KVP_OK;
}

/*
 * Walks the stream's regions in block order: cold blocks in runs of one level, then the exact blocks.
 * Planning (plan != 0) allocates each region's fresh blocks; committing packs survivors into them.
 */
static kvp_status walk_stream(struct kvp_tenant_obj *t, const struct kvp_seq_obj *s, const struct kvp_stream *st,
			      const struct verdict *v, struct compaction *c, struct packing *plan)
{
	uint32_t at = st->sink ? st->sink->n : 0;
	kvp_status rc = KVP_OK;
	uint32_t n = 0;

	for (uint32_t from = 0; rc == KVP_OK && from < st->n_cold;) {
		uint32_t to = level_run_end(st, from), level = st->blocks[from]->level;
		struct region r = cold_region(s, level, from, to);
		walk_region(s, st, &r, v, &at, plan ? NULL : c, &n, plan);
		if (plan)
			rc = fresh_blocks(t, s, &r, level, n, c, plan);
		n = 0;
		from = to;
	}
	if (rc == KVP_OK) {
		struct region r = exact_region(s, st);
		walk_region(s, st, &r, v, &at, plan ? NULL : c, &n, plan);
		if (plan)
			rc = fresh_blocks(t, s, &r, 0, n, c, plan);
	}
	return rc;
}

static kvp_status compaction_plan(struct kvp_tenant_obj *t, const struct kvp_seq_obj *s, const struct kvp_stream *st,
				  const struct verdict *v, struct compaction *c)
{
	kvp_status rc;

	struct packing pk = { 0 };

	memset(c, 0, sizeof *c);
	/* a region of m blocks needs at most m fresh ones */
	if (st->n_blocks && (!(c->fresh = calloc(st->n_blocks, sizeof *c->fresh)) ||
			     !(c->reused = calloc(st->n_blocks, sizeof *c->reused)) ||
			     !(pk.pos = malloc(((size_t)st->n_tokens + 1) * sizeof *pk.pos)) ||
			     !(pk.starts = malloc(((size_t)st->n_blocks + 1) * sizeof *pk.starts)) ||
			     !(pk.block_pos = malloc(KVP_BLOCK_MAX * sizeof *pk.block_pos)))) {
		rc = kvp_fail(KVP_ENOMEM, "policy round: out of memory");
	} else {
		rc = walk_stream(t, s, st, v, c, &pk);
	}
	free(pk.pos);
	free(pk.starts);
	free(pk.block_pos);
	if (rc != KVP_OK)
		return rc;
	c->cap = st->n_blocks + c->n_fresh;
	c->table = kvp_alloc(t, (size_t)(c->cap ? c->cap : 1) * sizeof *c->table, KVP_BYTES_META, s->call);
	if (!c->table)
		return KVP_ENOMEM;
	return KVP_OK;
}

static void compaction_commit(struct kvp_tenant_obj *t, struct kvp_seq_obj *s, struct kvp_stream *st,
			      const struct verdict *v, struct compaction *c)
{
	walk_stream(t, s, st, v, c, NULL);
	for (uint32_t i = 0; i < st->n_blocks; i++)
		if (!c->reused[i])
			kvp_block_put(t, st->blocks[i]);
	if (st->blocks)
		kvp_free(t, st->blocks, (size_t)st->cap_blocks * sizeof *st->blocks, KVP_BYTES_META);
	st->blocks = c->table;
	st->cap_blocks = c->cap;
	st->n_blocks = c->n;
	st->n_cold = c->n_cold;
	st->n_tokens -= c->dropped;
	st->scored_upto = s->t0;
	atomic_fetch_sub(&t->tokens_retained, c->dropped);
	c->table = NULL;
	compaction_free(t, c);
}

/* ---- rounds ---- */

/* One stream loaded for a round: every token's position and fp32 key, and the round's verdict. */
struct loaded {
	struct kvp_stream *st;
	struct kvp_round round;
	int32_t *pos;
	float *k;
	uint8_t *keep;
	uint32_t n_kept;
	struct verdict verdict; /* keep, or a cut for a stream that was not loaded (round_newest) */
	struct kvp_round_space own; /* the round's own buffers, when not the sequence's round space */
};

static void loaded_free(struct kvp_tenant_obj *t, struct loaded *l)
{
	round_space_release(t, &l->own);
	memset(l, 0, sizeof *l);
}

/*
 * A round space for n tokens, n plus an eighth so a stream that grows by `every` between rounds does not
 * reallocate at each. The sequence's is charged without relief (`relief` 0): parking other sequences to
 * make room for kept scratch would cost more than it saves, so when the quota says no (0 returned) the
 * round takes buffers of its own, for itself only, charged like any other memory.
 */
static int round_space_alloc(struct kvp_seq_obj *s, uint32_t n, int keys, int relief, struct kvp_round_space *r)
{
	const size_t dim = s->shape.head_dim;
	struct kvp_call quiet = { .no_relief = 1 }; /* a charge that never relieves */
	uint32_t cap = n + n / 8 > n ? n + n / 8 : n;
	size_t bytes = (size_t)cap * ((keys ? dim * sizeof(float) : 0) + sizeof(int32_t) + 1);
	char *mem;

	mem = kvp_alloc(s->tenant, bytes, KVP_BYTES_META, relief ? s->call : &quiet);
	if (!mem)
		return 0;
	r->k = keys ? (float *)mem : NULL;
	r->pos = (int32_t *)(mem + (keys ? (size_t)cap * dim * sizeof(float) : 0));
	r->keep = (uint8_t *)(r->pos + cap);
	r->cap = cap;
	r->bytes = bytes;
	return 1;
}

/*
 * Buffers for n tokens. With grown != NULL (a single-stream round) they are the sequence's round space
 * when it holds n, else a larger one made into *grown, which the round installs only when it succeeds
 * (round_space_settle), so a failed round leaves the sequence's memory as it was. Otherwise, and when
 * the quota refuses, the round's own (l->own, charged too: no round buffer escapes the quota).
 */
static kvp_status load_buffers(struct kvp_seq_obj *s, uint32_t n, int keys, struct kvp_round_space *grown,
			       struct loaded *l)
{
	const struct kvp_round_space *r = &s->round_space;

	if (grown && !(n <= r->cap && (!keys || r->k)) && round_space_alloc(s, n, keys, 0, grown))
		r = grown;
	if (!grown || !(n <= r->cap && (!keys || r->k))) {
		if (!round_space_alloc(s, n, keys, 1, &l->own))
			return kvp_fail_context(KVP_ENOMEM, "policy round: buffers for %u tokens", n);
		r = &l->own;
	}
	l->pos = r->pos;
	l->k = keys ? r->k : NULL;
	l->keep = r->keep;
	return KVP_OK;
}

/* After a single-stream round: a grown round space replaces the old one if the round succeeded. */
static void round_space_settle(struct kvp_seq_obj *s, struct kvp_round_space *grown, kvp_status st)
{
	if (!grown->bytes)
		return;
	if (st == KVP_OK) {
		round_space_release(s->tenant, &s->round_space);
		s->round_space = *grown;
	} else {
		round_space_release(s->tenant, grown);
	}
}

/* grown: see load_buffers; NULL when several streams are loaded at once. */
static kvp_status load(struct kvp_seq_obj *s, struct kvp_stream *st, struct loaded *l, struct kvp_round_space *grown)
{
	uint32_t n = st->n_tokens ? st->n_tokens : 1;
	int keys = s->policy->ops->scores_keys; /* StreamingLLM and H2O rank without reading keys */
	kvp_status rc;

	memset(l, 0, sizeof *l);
	if ((rc = load_buffers(s, n, keys, grown, l)) != KVP_OK)
		return rc;
	l->st = st;
	l->verdict.keep = l->keep;
	kvp_stream_gather(s, st, l->pos, l->k, NULL);
	l->round = (struct kvp_round){
		.t0 = s->t0, .n = st->n_tokens, .pos = l->pos, .k = l->k,
		.sinks = s->tenant->cfg.sinks, .window = s->tenant->cfg.window,
		.prompt_end = s->policy->plan.pin_prompt ? s->prompt_end : 0,
	};
	return KVP_OK;
}

/* Applies every loaded stream's verdict, all or nothing. */
static kvp_status apply(struct kvp_seq_obj *s, struct loaded *l, uint32_t n)
{
	struct compaction *c = calloc(n, sizeof *c);
	kvp_status st = c ? KVP_OK : kvp_fail(KVP_ENOMEM, "policy round: out of memory");
	uint32_t i;

	for (i = 0; st == KVP_OK && i < n; i++)
		st = compaction_plan(s->tenant, s, l[i].st, &l[i].verdict, &c[i]);
	if (st != KVP_OK) {
		for (uint32_t u = 0; c && u < i; u++)
			compaction_free(s->tenant, &c[u]);
		free(c);
		return kvp_fail_context(st, "kvp_seq_step: policy round not applied");
	}
	for (i = 0; i < n; i++)
		compaction_commit(s->tenant, s, l[i].st, &l[i].verdict, &c[i]);
	free(c);
	return KVP_OK;
}

/* Rounds over `n` streams that share one verdict (KVP_ROUND_HEAD: every layer; KVP_ROUND_LAYER: every KV
 * head). */
static kvp_status round_shared(struct kvp_seq_obj *s, struct kvp_stream **streams, uint32_t n, uint32_t layer,
			       uint32_t kv_head, int layers)
{
	struct loaded *l = calloc(n, sizeof *l);
	struct kvp_round *rounds = calloc(n, sizeof *rounds);
	kvp_status st = l && rounds ? KVP_OK : kvp_fail(KVP_ENOMEM, "policy round: out of memory");
	uint32_t i;

	for (i = 0; st == KVP_OK && i < n; i++)
		if ((st = load(s, streams[i], &l[i], NULL)) == KVP_OK)
			rounds[i] = l[i].round;
	if (st == KVP_OK)
		st = layers ? kvp_policy_round_layers(s->policy, kv_head, rounds, l[0].keep, &l[0].n_kept) :
			      kvp_policy_round_union(s->policy, layer, rounds, l[0].keep, &l[0].n_kept);
	for (i = 1; st == KVP_OK && i < n; i++)
		memcpy(l[i].keep, l[0].keep, streams[i]->n_tokens);
	if (st == KVP_OK)
		st = apply(s, l, n);
	for (i = 0; l && i < n; i++)
		loaded_free(s->tenant, &l[i]);
	free(l);
	free(rounds);
	return st;
}

/* How many of a block's tokens have positions below `end`. */
static uint32_t block_tokens_before(const struct kvp_block *b, int32_t end)
{
	uint32_t n = 0;

	if (!b->n || kvp_block_last(b) < end)
		return b->n;
	while (kvp_block_pos(b, n) < end)
		n++;
	return n;
}

/* How many of the stream's tokens have positions below `end`: whole blocks, then part of one. */
static uint32_t tokens_before(const struct kvp_stream *st, int32_t end)
{
	uint32_t n = st->sink ? block_tokens_before(st->sink, end) : 0;

	if (st->sink && n < st->sink->n)
		return n;
	for (uint32_t i = 0; i < st->n_blocks; i++) {
		uint32_t m = block_tokens_before(st->blocks[i], end);
		n += m;
		if (m < st->blocks[i]->n)
			break;
	}
	return n;
}

/*
 * A round of a keeps_newest policy (StreamingLLM): the verdict is positional, so nothing is loaded,
 * scored or selected; kvp_policy_cut names the runs to drop and the compaction reads only the blocks
 * that lose tokens, so the round costs what it evicts plus a pass over the block table.
 */
static kvp_status round_newest(struct kvp_seq_obj *s, uint32_t layer, uint32_t kv_head)
{
	struct kvp_stream *st = kvp_seq_stream(s, layer, kv_head);
	const int pin = s->policy->plan.pin_prompt;
	struct kvp_round r = {
		.t0 = s->t0, .n = st->n_tokens,
		.sinks = s->tenant->cfg.sinks, .window = s->tenant->cfg.window,
		.prompt_end = pin ? s->prompt_end : 0,
		.budget = kvp_gating_budget(s->gating, layer, kv_head),
	};
	struct loaded l = { .st = st };
	kvp_status rc = kvp_policy_cut(s->policy, &r, pin ? tokens_before(st, r.prompt_end) : 0, &l.verdict.cut);

	if (rc == KVP_OK)
		rc = apply(s, &l, 1);
	return rc;
}

static kvp_status round_one(struct kvp_seq_obj *s, uint32_t layer, uint32_t kv_head)
{
	struct kvp_round_space grown = { 0 };
	struct loaded l;
	kvp_status st;

	if (s->policy->ops->keeps_newest)
		return round_newest(s, layer, kv_head);
	st = load(s, kvp_seq_stream(s, layer, kv_head), &l, &grown);

	l.round.budget = kvp_gating_budget(s->gating, layer, kv_head);
	if (st == KVP_OK)
		st = kvp_policy_round(s->policy, layer, kv_head, &l.round, l.keep, &l.n_kept);
	if (st == KVP_OK)
		st = apply(s, &l, 1);
	loaded_free(s->tenant, &l);
	round_space_settle(s, &grown, st);
	return st;
}

/* A stream is due at its own budget (gated) + every; without gating, the policy's budget. */
static int due(const struct kvp_seq_obj *s, uint32_t layer, uint32_t kv_head, uint32_t n)
{
	uint32_t budget = kvp_gating_budget(s->gating, layer, kv_head);

	if (!budget)
		return kvp_policy_due(s->policy, s->t0, n);
	return (uint64_t)n >= (uint64_t)budget + s->policy->plan.every;
}

static kvp_status rounds(struct kvp_seq_obj *s)
{
	const uint32_t L = s->shape.n_layers, H = s->shape.n_kv_heads;
	const enum kvp_round_scope scope = s->policy->plan.scope;
	const int per_head = scope == KVP_ROUND_HEAD, shared = scope != KVP_ROUND_STREAM;
	struct kvp_stream **set = calloc(L > H ? L : H, sizeof *set);
	kvp_status st = set ? KVP_OK : kvp_fail(KVP_ENOMEM, "policy round: out of memory");

	for (uint32_t a = 0; st == KVP_OK && a < (per_head ? H : L); a++) {
		for (uint32_t b = 0; st == KVP_OK && b < (per_head ? L : H); b++) {
			uint32_t layer = per_head ? b : a, kv_head = per_head ? a : b;
			struct kvp_stream *stream = kvp_seq_stream(s, layer, kv_head);
			if (shared)
				set[b] = stream;
			else if (due(s, layer, kv_head, stream->n_tokens))
				st = round_one(s, layer, kv_head);
		}
		if (st != KVP_OK || !shared || !kvp_policy_due(s->policy, s->t0, set[0]->n_tokens))
			continue;
		st = round_shared(s, set, per_head ? L : H, a, a, per_head);
	}
	free(set);
	return st;
}

static kvp_status encode_scored(struct kvp_seq_obj *s)
{
	struct kvp_cold_plan p;

	for (size_t i = 0; i < (size_t)s->shape.n_layers * s->shape.n_kv_heads; i++) {
		kvp_status st = kvp_cold_plan(s->tenant, s, &s->streams[i], 0, &p);
		if (st != KVP_OK) {
			kvp_cold_unwind(s->tenant, &p);
			return kvp_fail_context(st, "kvp_seq_step: encoding scored blocks");
		}
		kvp_cold_commit(s->tenant, s, &s->streams[i], &p);
	}
	return KVP_OK;
}

/*
 * The round space saves a long stream's rounds from faulting in fresh pages, but it is sized by the
 * longest stream: in a sequence of few streams it is bookkeeping every token pays for (an fp32 key per
 * token of one stream, shared by all). It is kept only while it is at most 1/128 of the sequence's
 * retained tokens as dense fp16 K and V, at most head_dim / 64 bytes per token per stream: with streams
 * of equal length, a sequence of more than about 150 (layer, KV head) streams keeps it (32 layers x 8 KV
 * heads do), one of fewer allocates it per round.
 */
static void round_space_trim(struct kvp_seq_obj *s)
{
	uint64_t retained = 0;

	if (!s->round_space.bytes)
		return;
	for (size_t i = 0; i < (size_t)s->shape.n_layers * s->shape.n_kv_heads; i++)
		retained += s->streams[i].n_tokens;
	if ((uint64_t)s->round_space.bytes * 128 > retained * s->shape.head_dim * 4)
		round_space_release(s->tenant, &s->round_space);
}

kvp_status kvp_evict_step(struct kvp_seq_obj *s)
{
	uint64_t floor;
	kvp_status st;

	if (!s->policy)
		return KVP_OK;
	if (s->prompt_end < 0)
		s->prompt_end = (int32_t)s->t0;
	/* A parked sequence's blocks are on the spill device and its table holds no block: its rounds wait
	 * for the first step after it is back. Nothing is skipped by waiting: a round is due by a stream's
	 * size, which does not change while the sequence is parked. */
	if (s->parked)
		return KVP_OK;
	/* a head never gives away what its rounds protect, so the layer's total holds */
	floor = kvp_policy_protected(s->policy, s->t0, s->tenant->cfg.sinks, s->tenant->cfg.window);
	if ((st = kvp_gating_step(s->gating, s->policy, s->t0, floor, s->tenant->cfg.block)) != KVP_OK)
		return st;
	st = rounds(s);
	round_space_trim(s);
	if (st != KVP_OK)
		return st;
	return encode_scored(s);
}

/* ---- gating: the budgets rounds use ---- */

kvp_status kvp_gate_open(struct kvp_tenant_obj *t, struct kvp_seq_obj *s)
{
	struct kvp_allocator mem = kvp_seq_allocator(s);
	kvp_status st = kvp_gating_open(&t->cfg.gating, &s->shape, &mem, &s->gating);

	return st == KVP_OK ? st : kvp_fail_context(st, "kvp_seq_open");
}

kvp_status kvp_gate_fork(struct kvp_tenant_obj *t, const struct kvp_seq_obj *src, struct kvp_seq_obj *s)
{
	struct kvp_allocator mem = kvp_seq_allocator(s);

	(void)t;
	return kvp_gating_fork(src->gating, &mem, &s->gating);
}

void kvp_gate_close(struct kvp_tenant_obj *t, struct kvp_seq_obj *s)
{
	(void)t;
	kvp_gating_close(s->gating);
	s->gating = NULL;
}

/* ---- the public calls on a head's gating (entered through pressure.c like every sequence call) ---- */

static kvp_status check_head(const struct kvp_seq_obj *s, uint32_t layer, uint32_t kv_head, const char *call)
{
	if (layer >= s->shape.n_layers || kv_head >= s->shape.n_kv_heads)
		return kvp_fail(KVP_EINVAL, "%s: layer %u, KV head %u outside %u x %u", call, layer, kv_head,
				s->shape.n_layers, s->shape.n_kv_heads);
	return KVP_OK;
}

kvp_status kvp_seq_head_level_entered(struct kvp_seq_obj *s, uint32_t layer, uint32_t kv_head, kvp_head_level *out)
{
	kvp_status st = check_head(s, layer, kv_head, "kvp_seq_head_level");

	return st == KVP_OK ? kvp_gating_head_level(s->gating, layer, kv_head, out) : st;
}

kvp_status kvp_seq_set_head_level_entered(struct kvp_seq_obj *s, uint32_t layer, uint32_t kv_head, float aggressiveness)
{
	kvp_status st = check_head(s, layer, kv_head, "kvp_seq_set_head_level");

	return st == KVP_OK ? kvp_gating_set_head_level(s->gating, layer, kv_head, aggressiveness) : st;
}
