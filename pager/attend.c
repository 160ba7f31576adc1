/*
 * kvp_attend: softmax(q K^T / sqrt(d)) V over every tier of a stream, one block at a time with online
 * softmax. The query heads of one GQA group take turns on each block while its K and V rows are still
 * in cache, so K and V are read from memory once per step, not once per query head. Cold blocks are
 * read through their codecs: keys scored from the codes with a query prepared once per call, values
 * accumulated in the codec's own space and mapped back once at the end.
 *
 * With a policy that observes (H2O, TriAttention's online statistics), every score is also kept and
 * turned into the final softmax weights, which the policy receives with the group's queries.
 */
#include <math.h>
#include <string.h>

#include "codecs/codec.h"
#include "kernels/kernels.h"
#include "pager.h"
#include "policies/policy.h"

/* a GQA group's heads go to the codecs' group paths in one call */
_Static_assert(KVP_GROUP_MAX <= KVP_CODEC_GROUP_MAX, "a GQA group larger than the codecs' group paths take");

/* One stream's attention in progress. */
struct stream_attention {
	const struct kvp_kernels *kern;
	uint32_t dim, group;
	float scale;
	const float *q;  /* [group][dim] */
	float *out;      /* [group][dim]: the exact tiers' accumulator, then the result */
	float *scores;   /* scores_cap floats of the sequence's scratch (cold.c) */
	uint32_t scores_cap;
	float m[KVP_GROUP_MAX], l[KVP_GROUP_MAX]; /* each head's running maximum and sum */
	/* cold blocks: the codecs with the stream's contexts, prepared queries, value accumulators */
	const struct kvp_codec *k, *v;
	const void *k_ctx, *v_ctx;
	const struct kvp_cold *cold; /* with a ladder, blocks name the level whose codecs read them */
	const struct kvp_stream_ctx *ctx;
	uint32_t level;
	char *qprep;     /* [group][k->qprep_bytes] */
	float *cold_acc; /* [group][v->acc_dim], NULL when the stream has no cold block */
	/* observation: raw scores of every token, [group][cap], filled up to `seen` */
	float *raw;
	uint32_t cap, seen;
};

/* A new running maximum shrinks everything accumulated so far, in both spaces. */
static void rescale(const struct stream_attention *a, uint32_t h, float f)
{
	a->kern->scale(a->dim, f, a->out + (size_t)h * a->dim);
	if (a->cold_acc)
		a->kern->scale(a->v->acc_dim, f, a->cold_acc + (size_t)h * a->v->acc_dim);
}

/*
 * Heads [h, h + g)'s scores s[0..g*n) of the tokens from `seen` on, times scale (1 where the dot kernel
 * applied it): kept for the observer as scaled, then folded in, in one kernel call for the g heads.
 */
static void fold_scores(struct stream_attention *a, uint32_t h, uint32_t g, uint32_t n, float scale, float *s)
{
	float corr[KVP_GROUP_MAX];
	float *raw = a->raw ? a->raw + (size_t)h * a->cap + a->seen : NULL;

	a->kern->softmax_group(n, g, scale, s, raw, a->cap, a->m + h, a->l + h, corr);
	for (uint32_t i = 0; i < g; i++)
		if (corr[i] != 1.0f)
			rescale(a, h + i, corr[i]);
}

static void block_f32(struct stream_attention *a, const struct kvp_block *b)
{
	for (uint32_t h = 0; h < a->group; h++) {
		a->kern->dot_f32(a->dim, b->n, b->k, a->q + (size_t)h * a->dim, a->scale, a->scores);
		fold_scores(a, h, 1, b->n, 1.0f, a->scores);
		a->kern->axpy_f32(a->dim, b->n, b->v, a->scores, a->out + (size_t)h * a->dim);
	}
	a->seen += b->n;
}

/*
 * fp16 goes through the group kernels, which widen each row once for all heads of the group; the
 * group's scores share one buffer of at most KVP_BLOCK_MAX, so long blocks are taken in slices. Blocks are
 * separate allocations, which the hardware prefetcher does not follow from one to the next, so the
 * kernels are handed what is read after this slice (the next slice, or the next fp16 block) and ask
 * for it while they compute: at 32K tokens that overlap is the difference between the sum of the
 * memory and the arithmetic time and the larger of the two.
 */
static void block_f16(struct stream_attention *a, const struct kvp_block *b, const struct kvp_block *next)
{
	const uint32_t slice = a->scores_cap / a->group;
	const int next_f16 = next && next->store == KVP_STORE_FP16;

	for (uint32_t t = 0; t < b->n; t += slice) {
		uint32_t n = b->n - t < slice ? b->n - t : slice;
		const uint16_t *k = (const uint16_t *)b->k + (size_t)t * a->dim;
		const uint16_t *v = (const uint16_t *)b->v + (size_t)t * a->dim;
		const uint16_t *k_ahead = next_f16 ? next->k : NULL, *v_ahead = next_f16 ? next->v : NULL;

		if (t + n < b->n)
			k_ahead = k + (size_t)n * a->dim, v_ahead = v + (size_t)n * a->dim;
		a->kern->dot_f16_group(a->dim, n, k, a->group, a->q, a->scale, a->scores, k_ahead);
		fold_scores(a, 0, a->group, n, 1.0f, a->scores);
		a->kern->axpy_f16_group(a->dim, n, v, a->group, a->scores, a->out, v_ahead);
		a->seen += n;
	}
}

/* Codecs with group paths unpack each code once for the whole GQA group, as block_f16 widens rows once. */
static int cold_group_fits(const struct stream_attention *a, const struct kvp_block *b)
{
	return a->k->ops->dot_group && a->v->ops->axpy_group && (size_t)a->group * b->n <= a->scores_cap;
}

/* A block of another ladder level: what the old codecs accumulated is mapped back into out (it shares
 * out's running maximum, so this is exact), and the queries are prepared for the new codecs. */
static void use_level(struct stream_attention *a, uint32_t level, int flush)
{
	for (uint32_t h = 0; flush && h < a->group; h++) {
		float *acc = a->cold_acc + (size_t)h * a->v->acc_dim;
		a->v->ops->finish(a->v, a->v_ctx, acc, a->out + (size_t)h * a->dim);
		memset(acc, 0, a->v->acc_dim * sizeof *acc);
	}
	a->level = level;
	a->k = a->cold->k_level[level];
	a->v = a->cold->v_level[level];
	a->k_ctx = a->ctx->k_level[level];
	a->v_ctx = a->ctx->v_level[level];
	for (uint32_t h = 0; h < a->group; h++)
		a->k->ops->prepare_query(a->k, a->k_ctx, a->q + (size_t)h * a->dim, a->qprep + h * a->k->qprep_bytes);
	memset(a->cold_acc, 0, (size_t)a->group * a->v->acc_dim * sizeof *a->cold_acc);
}

/*
 * Cold blocks that follow each other in a stream are read as one span of up to KVP_CODEC_SPAN_BLOCKS: keys
 * scored block by block into one row of scores per head, one softmax step over the span, and the values
 * summed by the codec's axpy_span in one call (or axpy_group per block). Every block costs fixed work in
 * each call (the softmax's reductions, the value kernel's weight step and its flush of the sums into
 * acc); at 64 tokens a block, that was 12-15% of TurboQuant's time at 32K tokens (block=256 against
 * block=64). A span is blocks of one ladder level, all but the last holding `run` tokens (a multiple of
 * KVP_CODEC_SPAN_RUN), within KVP_CODEC_SPAN_TOKENS and the scores' room.
 */
static uint32_t span_length(const struct stream_attention *a, const struct kvp_block *const *b, uint32_t left)
{
	const uint32_t run = b[0]->n, room = a->scores_cap / a->group;
	uint32_t m = 1, n = run;

	if (run % KVP_CODEC_SPAN_RUN)
		return 1;
	/* a policy's rounds leave blocks of any length: a span ends before a longer one */
	while (m < left && m < KVP_CODEC_SPAN_BLOCKS && b[m - 1]->n == run && b[m]->store == KVP_STORE_CODEC &&
	       b[m]->level == a->level && b[m]->n && b[m]->n <= run && n + b[m]->n <= KVP_CODEC_SPAN_TOKENS &&
	       n + b[m]->n <= room)
		n += b[m++]->n;
	return m;
}

/* The keys of up to KVP_CODEC_SPAN_BLOCKS cold blocks of this level from b on (left of them, then after):
 * what the next span will score first. */
static struct kvp_ahead keys_ahead(const struct stream_attention *a, const struct kvp_block *const *b,
				   uint32_t left, const struct kvp_block *after)
{
	struct kvp_ahead k = { .n = 0 };

	_Static_assert(KVP_CODEC_SPAN_BLOCKS <= KVP_RUNS_MAX, "a span's keys are one ahead");
	for (; k.n < KVP_CODEC_SPAN_BLOCKS; k.n++) {
		const struct kvp_block *x = k.n < left ? b[k.n] : k.n == left ? after : NULL;

		if (!x || x->store != KVP_STORE_CODEC || x->level != a->level || !x->n)
			break;
		k.base[k.n] = x->k, k.bytes[k.n] = a->k->ops->bytes(a->k, x->n);
	}
	return k;
}

/*
 * A block is a separate allocation, where the hardware prefetcher starts over: without help every block
 * would begin with a wait on memory. So a block's values are asked for while its keys are scored, and the
 * next keys while values are summed; each has at least the other step's arithmetic to arrive in (at 32K
 * tokens this took TurboQuant 3-bit from 7.7 to 6.3 ms, best of five). In a span, block j's values go
 * while block j's keys are scored, and the next span's keys (keys_ahead) while this span's values are
 * summed: the value kernels take them as their ahead and ask for a share per step of their loops, or,
 * block by block, a share goes before and after each block's call. Asking for this span's next keys
 * beside its values instead left the memory idle through the values' one call: 5-15% slower than blocks
 * one at a time at d=128 (32K tokens, interleaved runs).
 *
 * The requests go in halves, between the steps, rather than as one burst per range: a prefetch holds a
 * line fill buffer until its line arrives, and a burst of a whole range fills them all, so the core
 * stalled on the burst's last instructions (7-11% of the time at 32K). In halves each burst drains
 * while the next step computes: at 32K, d=64, 2-4% off tq3 and 3-6% off spark|tq3, 1-2% at d=128, none
 * lost at 4K (thread CPU time, best of 100, both versions interleaved in one process, four runs). The
 * lines go to L1, not L2 (a block's keys or values are a few KiB, read within a microsecond): the loads
 * that read them then need no fill buffer of their own (tq3 at d=128: 2-10% off in four runs; at d=64
 * within the +-3% noise of this shared machine).
 * Measured and left: only the first lines of each range, to start the hardware streamer (20% slower);
 * every other line, for the adjacent-line prefetcher (12% slower); each range one block further ahead,
 * or the next keys in one burst (no better). The values spread over the keys' own work, for
 * spark|turboquant: a share per sixteen rows inside spark_dot_i16_group (in its loop, or out of line
 * between its steps of sixteen rows) or the kernel called per sixteen rows with a share before each, all
 * slower at 32K tokens: 6-25% at d=128, 2-10% at d=64; with blocks one at a time, the next block's keys'
 * second half spread over lut_axpy_u8_group's column chunks, 2-4% slower at d=128 (spark|tq3 and tq3),
 * none at d=64 (thread CPU time, best of 150, both builds interleaved, several runs). A span's value call
 * is four blocks long, and there the shares inside it are what measured best (above).
 *
 * Block headers are allocations of their own too, and keys_ahead reads the next span's as soon as a span
 * starts: a wait on memory at the start of every span, with nothing yet in flight to cover it (1.6% of
 * all samples for kivi 2-bit at 32K tokens, d=64, on one load of the header's store). So each span asks
 * for the headers of the span after next, into L2. bench_attend, 32K tokens, d=64, four interleaved runs
 * each: against the bandwidth floor, kivi 2-bit 2.61-2.74 -> 2.49-2.60, turboquant 2-bit 2.41-2.54 ->
 * 2.29-2.44, 3-bit 2.11-2.21 -> 1.99-2.05; d=128 within the runs' spread. (The loop is written out here,
 * not in a function of its own, which gcc would drop: kernels.h, kvp_prefetch_lines.)
 *
 * Measured again with the caches emptied by reading 256 MiB (kivi 2-bit, 32K tokens, d=64, best of 40 calls,
 * builds interleaved; a memset leaves the layer in L3 on this EPYC, bench/harness.c): without any of these
 * requests a layer took 4.36 ms against 2.02; the next span's keys and values together as the values' ahead
 * (nothing asked around the keys), 2.11 against 2.12; those lines a few per four rows of the value kernel's
 * loop rather than a share per run, into L1, into L2 or non-temporal, 2.06-2.18 against 2.09-2.15; the next
 * span's blocks into L2 around this span's keys, 2.16 against 2.09; the pool's arenas on transparent huge
 * pages, no faster. In cache a layer takes 1.68-1.79 ms.
 * The bench's blocks already lie one after another within a stream (kivi at d=64: 3 KB apart, sixteen to an
 * append of 1024 tokens), and block=256, where a span's keys and its values are each one run, was no faster
 * (32K tokens, d=64, cold: kivi 2.20 against 2.12 ms, turboquant 2-bit 1.75 against 1.69). A plain read of
 * 13 MB runs at 32 GB/s on this machine (twice the memcpy rate the bench's floor divides by); the same
 * addresses read in runs of 1.5 KB (a block's keys) with a loop between runs, 14-15 GB/s; in runs of 6-12 KB,
 * 20; of 24 KB, 23.
 */
static void span_cold_group(struct stream_attention *a, const struct kvp_block *const *b, uint32_t m,
			    uint32_t left, const struct kvp_block *after)
{
	const struct kvp_ahead next = keys_ahead(a, b + m, left - m, after);
	struct kvp_code_span span = { .n = 0, .run = b[0]->n };

	for (uint32_t j = 2 * m; j < left && j < 3 * m; j++)
		kvp_prefetch_lines(b[j], 0, sizeof *b[j], 0);
	for (uint32_t j = 0; j < m; j++)
		span.src[j] = b[j]->v, span.n += b[j]->n;
	for (uint32_t j = 0, at = 0; j < m; at += b[j++]->n) {
		const size_t v_bytes = a->v->ops->bytes(a->v, b[j]->n);

		kvp_prefetch_lines(b[j]->v, 0, v_bytes / 2, 1);
		a->k->ops->dot_group(a->k, a->k_ctx, b[j]->n, b[j]->k, a->group, a->qprep, a->scores + at, span.n);
		kvp_prefetch_lines(b[j]->v, v_bytes / 2, v_bytes, 1);
	}
	fold_scores(a, 0, a->group, span.n, a->scale, a->scores);
	if (a->v->ops->axpy_span && m > 1) {
		a->v->ops->axpy_span(a->v, a->v_ctx, &span, a->group, a->scores, span.n, a->cold_acc, &next);
	} else {
		for (uint32_t j = 0, at = 0; j < m; at += b[j++]->n) {
			kvp_ahead_share(&next, 2 * j, 2 * m);
			a->v->ops->axpy_group(a->v, a->v_ctx, b[j]->n, b[j]->v, a->group, a->scores + at, span.n,
					      a->cold_acc);
			kvp_ahead_share(&next, 2 * j + 1, 2 * m);
		}
	}
	a->seen += span.n;
}

/* The cold block b[0], or the span that starts with it; returns how many blocks it read. */
static uint32_t block_cold(struct stream_attention *a, const struct kvp_block *const *b, uint32_t left,
			   const struct kvp_block *after)
{
	uint32_t m;

	if (b[0]->level != a->level)
		use_level(a, b[0]->level, 1);
	if (cold_group_fits(a, b[0])) {
		m = span_length(a, b, left);
		span_cold_group(a, b, m, left, after);
		return m;
	}
	for (uint32_t h = 0; h < a->group; h++) {
		a->k->ops->dot(a->k, a->k_ctx, b[0]->n, b[0]->k, a->qprep + h * a->k->qprep_bytes, a->scores);
		fold_scores(a, h, 1, b[0]->n, a->scale, a->scores);
		a->v->ops->axpy(a->v, a->v_ctx, b[0]->n, b[0]->v, a->scores, a->cold_acc + (size_t)h * a->v->acc_dim);
	}
	a->seen += b[0]->n;
	return 1;
}

/* Block b[0] (a cold one with those after it as a span); returns how many of the left blocks it read. after:
 * the block that follows the left ones, if any. */
static uint32_t blocks(struct stream_attention *a, const struct kvp_block *const *b, uint32_t left,
		       const struct kvp_block *after)
{
	const struct kvp_block *next = left > 1 ? b[1] : after;

	if (!b[0]->n)
		return 1;
	if (b[0]->store == KVP_STORE_CODEC)
		return block_cold(a, b, left, after);
	if (b[0]->store == KVP_STORE_FP16)
		block_f16(a, b[0], next);
	else
		block_f32(a, b[0]);
	return 1;
}

static void begin(struct stream_attention *a, const struct kvp_seq_obj *s, const struct kvp_stream *st,
		  const float *q, float *out, int observing)
{
	const struct kvp_cold *c = &s->cold;

	a->kern = kvp_kernels();
	a->dim = s->shape.head_dim;
	a->group = s->group;
	a->scale = 1.0f / sqrtf((float)a->dim);
	a->q = q;
	a->out = out;
	a->scores = c->scratch;
	a->scores_cap = c->scores_cap;
	memset(out, 0, (size_t)a->group * a->dim * sizeof *out);
	for (uint32_t h = 0; h < a->group; h++)
		a->m[h] = -INFINITY, a->l[h] = 0.0f;
	a->raw = observing ? s->observe.weights : NULL;
	a->cap = s->observe.cap;
	a->seen = 0;
	a->cold_acc = NULL;
	if (!st->n_cold)
		return;
	a->cold = c;
	a->ctx = st->ctx;
	a->qprep = (char *)(a->scores + a->scores_cap);
	a->cold_acc = (float *)(a->qprep + a->group * c->qprep_max);
	use_level(a, st->blocks[0]->level, 0);
}

static void finish(struct stream_attention *a)
{
	for (uint32_t h = 0; h < a->group; h++) {
		float *out_h = a->out + (size_t)h * a->dim;
		if (a->cold_acc)
			a->v->ops->finish(a->v, a->v_ctx, a->cold_acc + (size_t)h * a->v->acc_dim, out_h);
		if (a->l[h] > 0.0f)
			a->kern->scale(a->dim, 1.0f / a->l[h], out_h);
	}
}

static void attend_stream(struct stream_attention *a, const struct kvp_stream *st)
{
	const struct kvp_block *const *b = (const struct kvp_block *const *)st->blocks;

	if (st->sink)
		blocks(a, (const struct kvp_block *const *)&st->sink, 1, st->n_blocks ? b[0] : NULL);
	for (uint32_t i = 0; i < st->n_blocks;)
		i += blocks(a, b + i, st->n_blocks - i, NULL);
	finish(a);
}

/* The raw scores become each head's final softmax weights; the policy learns them with the queries. */
static kvp_status observe(struct stream_attention *a, struct kvp_seq_obj *s, const struct kvp_stream *st,
			  uint32_t layer, uint32_t kv_head)
{
	struct kvp_observation o;

	for (uint32_t h = 0; h < a->group; h++) {
		float *w = a->raw + (size_t)h * a->cap;
		float m = a->m[h], inv = a->l[h] > 0.0f ? 1.0f / a->l[h] : 0.0f;
		for (uint32_t i = 0; i < a->seen; i++)
			w[i] = expf(w[i] - m) * inv;
	}
	/* weights are [group][cap]: pack them to [group][n] as the policy reads them */
	for (uint32_t h = 1; h < a->group; h++)
		memmove(a->raw + (size_t)h * a->seen, a->raw + (size_t)h * a->cap, a->seen * sizeof *a->raw);
	if (kvp_gating_wants_weights(s->gating))
		kvp_gating_observe(s->gating, layer, kv_head, a->seen, a->raw);
	if (!s->policy->ops->observe)
		return KVP_OK;
	kvp_stream_gather(s, st, s->observe.pos, NULL, NULL);
	o = (struct kvp_observation){
		.layer = layer, .kv_head = kv_head, .t = s->t0 - 1, .q = a->q,
		.n = a->seen, .pos = s->observe.pos, .weights = a->raw,
	};
	return kvp_policy_learn(s->policy, &o);
}

static kvp_status observe_reserve(struct kvp_seq_obj *s, uint32_t layer)
{
	uint32_t most = 0;

	for (uint32_t g = 0; g < s->shape.n_kv_heads; g++) {
		uint32_t n = kvp_seq_stream(s, layer, g)->n_tokens;
		most = n > most ? n : most;
	}
	return kvp_observe_reserve(s, most);
}

/* A query that is not finite makes NaN scores, which an observing policy or the gate would keep. */
static kvp_status query_check(const struct kvp_seq_obj *s, const float *q)
{
	const size_t all = (size_t)s->shape.n_heads * s->shape.head_dim, at = kvp_first_outside(q, all, INFINITY);

	if (at == all)
		return KVP_OK;
	return kvp_fail(KVP_EINVAL, "kvp_attend: q of head %zu, channel %zu is %g: queries must be finite",
			at / s->shape.head_dim, at % s->shape.head_dim, (double)q[at]);
}

kvp_status kvp_attend_resident(struct kvp_seq_obj *s, uint32_t layer, const float *q, float *out)
{
	struct stream_attention a;
	int observing;
	kvp_status st = KVP_OK;

	if (!s || s->magic != KVP_SEQ_MAGIC)
		return kvp_fail(KVP_EINVAL, "kvp_attend: not an open sequence");
	if (layer >= s->shape.n_layers)
		return kvp_fail(KVP_EINVAL, "kvp_attend: layer %u of a %u-layer sequence", layer, s->shape.n_layers);
	if (!q || !out)
		return kvp_fail(KVP_EINVAL, "kvp_attend: q and out must not be NULL");
	if (kvp_overlap(q, sizeof *q * s->shape.n_heads * s->shape.head_dim, out,
			sizeof *out * s->shape.n_heads * s->shape.head_dim))
		return kvp_fail(KVP_EINVAL, "kvp_attend: q and out overlap (every KV head's query heads are read after "
				"the ones before are written): give out memory of its own");
	if ((st = query_check(s, q)) != KVP_OK)
		return st;
	observing = (s->policy && s->policy->ops->observe) || kvp_gating_wants_weights(s->gating);
	if (observing && (st = observe_reserve(s, layer)) != KVP_OK)
		return st;
	/* cold blocks pressure spilled come back, and the next layer's start coming (tier/restore.c) */
	if (s->n_spilled && (st = kvp_restore_layer(s, layer, s->call)) != KVP_OK) {
		kvp_observe_release(s);
		return kvp_fail_context(st, "kvp_attend");
	}
	for (uint32_t g = 0; st == KVP_OK && g < s->shape.n_kv_heads; g++) {
		size_t at = (size_t)g * s->group * s->shape.head_dim;
		const struct kvp_stream *stream = kvp_seq_stream(s, layer, g);
		kvp_cold_note_queries(s, kvp_seq_stream(s, layer, g), q + at);
		begin(&a, s, stream, q + at, out + at, observing);
		attend_stream(&a, stream);
		/* a stream without tokens gave zeros and weighed nothing: there is nothing to observe, and before
		 * the first append there is no query position either */
		if (observing && a.seen && (st = observe(&a, s, stream, layer, g)) != KVP_OK)
			st = kvp_fail_context(st, "kvp_attend: the policy could not observe layer %u", layer);
	}
	kvp_observe_release(s);
	return st;
}
