/*
 * policies/ — token scorers behind one vtable (DESIGN.md, "Vtables"), the survivor selection the pager
 * runs around them, and the .kvtria statistics file. What a policy offers beyond scoring (a coherence signal
 * for gate=mrl, the scope of its rounds, shared state loaded once) is in its ops row and plan, so the
 * pager and the gating module never ask for a policy by name: adding one is its file and a registry row.
 *
 * A policy scores the tokens of one stream (layer, KV head); the pager protects, selects and evicts.
 * Higher score = more worth keeping. What the pager must hand a policy:
 *   - keys after RoPE, exact (scored before their codec group is encoded), [n][head_dim] fp32;
 *   - every key's absolute position (never its slot in the cache: after eviction they differ);
 *   - t0 = the absolute position of the next token (tokens processed so far), for TriAttention's phase;
 *   - for observe: the query token's absolute position, the queries of the KV head's GQA group after
 *     RoPE ([group][head_dim], query heads kv_head*group .. kv_head*group+group-1), and the softmax
 *     weights of each of those query heads over the stream's n tokens ([group][n]) with their positions.
 *
 * One kvp_policy belongs to one sequence: H2O's accumulated weights and TriAttention's online statistics
 * are that sequence's history. Calls on one policy must not overlap (the sequence's caller serializes).
 * Every byte a policy keeps (the struct, its state, its scoring buffers) comes from p->mem, the allocator
 * it was opened with: the pager's charges the sequence's tenant, so a policy that cannot get memory fails
 * its call with KVP_ENOMEM and leaves its state as it was.
 */
#ifndef KVP_POLICY_H
#define KVP_POLICY_H

#include <stdint.h>

#include "base/base.h"

struct kvp_policy;

/* What one attention call of one query token saw on one stream. */
struct kvp_observation {
	uint32_t layer, kv_head;
	int64_t t;            /* absolute position of the query token */
	const float *q;       /* [group][head_dim] after RoPE at position t, or NULL */
	uint32_t n;           /* tokens the weights cover */
	const int32_t *pos;   /* [n] their absolute positions (NULL when n == 0) */
	const float *weights; /* [group][n] softmax weights of each query head of the group, or NULL */
};

/* Which streams one verdict of a round covers. */
enum kvp_round_scope {
	KVP_ROUND_STREAM, /* each (layer, KV head) on its own: kvp_policy_round */
	KVP_ROUND_HEAD,   /* one kept set per KV head for every layer: kvp_policy_round_layers */
	KVP_ROUND_LAYER,  /* one kept set per layer for every KV head: kvp_policy_round_union */
};

struct kvp_policy_ops {
	const char *name;
	/* Parse args (look up every key; the registry calls kvp_args_finish), set p->state and p->plan.
	 * p->shape is set on entry; p->plan holds the generic defaults (see struct kvp_policy_plan). */
	kvp_status (*open)(struct kvp_policy *p, struct kvp_args *args);
	/* Load what every policy opened from these args may share read-only, before any shape is known
	 * (TriAttention: its .kvtria file): *shared, or NULL when there is nothing to share. open finds it in
	 * p->shared and holds its own reference; release drops one. Both NULL for policies without. Reads
	 * only the keys it needs: open checks the rest. */
	kvp_status (*prepare)(struct kvp_args *args, const struct kvp_allocator *mem, void **shared);
	void (*release)(void *shared);
	/* Learn from one attention call. o->pos are every token the stream holds (a token left out has
	 * been evicted). Fails only on memory; on failure the policy's state is as before the call. NULL:
	 * the policy learns nothing. */
	kvp_status (*observe)(struct kvp_policy *p, const struct kvp_observation *o);
	/* scores[i] for the stream's tokens i < n (pos[i], k[i] post-RoPE); n >= 1, arguments checked. */
	kvp_status (*score)(struct kvp_policy *p, uint32_t layer, uint32_t kv_head, int64_t t0, uint32_t n,
			    const int32_t *pos, const float *k_post_rope, float *scores);
	/* 1 when score reads k_post_rope; 0 lets rounds skip loading (and decoding) a stream's keys, and
	 * score then receives NULL */
	int scores_keys;
	/* 1 when score is non-decreasing in position whatever the keys and the history (StreamingLLM: the
	 * position itself). Ties rank the newer token first, so a round then keeps exactly the newest
	 * candidates: its verdict follows from positions alone, and the pager takes it from kvp_policy_cut
	 * instead of scoring and selecting every token. */
	int keeps_newest;
	/* Fill dst->state with a copy of src's history (dst has src's ops, shape and plan, its own mem, state
	 * NULL), so a forked sequence's policy starts where its parent's was. NULL for policies without state. */
	kvp_status (*clone)(struct kvp_policy *dst, const struct kvp_policy *src);
	/* Policies that yield a coherence signal (gate=mrl moves budget by it): how predictable the
	 * attention of (layer, kv_head) is, in [0, 1], from what the policy knows now (arguments checked).
	 * NULL for policies without one. */
	kvp_status (*coherence)(const struct kvp_policy *p, uint32_t layer, uint32_t kv_head, double *out);
	/* The scope of the rounds a spec's args ask for, read from them alone (no shape, no file), so a tenant
	 * knows it before any sequence opens; open sets p->plan.scope through it too. NULL: KVP_ROUND_STREAM. */
	kvp_status (*scope)(struct kvp_args *args, enum kvp_round_scope *out);
	void (*close)(struct kvp_policy *p);
};

/*
 * How many tokens a stream keeps and when a round runs. At t0 tokens processed:
 *   budget(t0) = budget, or ceil(ratio * t0) when ratio > 0 (at least 1)
 *   window(t0) = window + ceil(window_ratio * t0)     protected newest tokens, counted in the budget
 *   a round is due when the stream holds >= budget(t0) + every tokens; it cuts back to budget(t0).
 */
struct kvp_policy_plan {
	uint32_t budget;
	double ratio;
	uint32_t every;
	uint32_t sinks;       /* first tokens of the stream, protected */
	uint32_t window;
	double window_ratio;
	int pin_prompt;       /* the prompt is kept (TriAttention's reference behaviour) */
	enum kvp_round_scope scope; /* KVP_ROUND_STREAM unless the policy's open says otherwise */
};

struct kvp_policy {
	const struct kvp_policy_ops *ops;
	kvp_shape shape;
	struct kvp_policy_plan plan;
	struct kvp_allocator mem; /* where this struct and everything the policy keeps come from */
	void *state;
	void *shared; /* during open: what prepare loaded for this spec, or NULL */
};

/* The registry's policies (policies/registry.c). */
extern const struct kvp_policy_ops kvp_policy_streaming;
extern const struct kvp_policy_ops kvp_policy_h2o;
extern const struct kvp_policy_ops kvp_policy_triattention;

/* What the policies of one spec share, loaded once by the spec's prepare op (see struct kvp_policy_spec). */
struct kvp_policy_shared;
/* Parses spec[0..len) ("h2o(heavy=0.1,recent=0.1)") for shape, in memory from mem or the C heap
 * (kvp_policy_parse); kvp_policy_free releases it. The policy loads what it needs itself (a stats file);
 * the pager opens its sequences' policies from a struct kvp_policy_spec instead, parsed and prepared
 * once. */
kvp_status kvp_policy_parse(const char *spec, size_t len, const kvp_shape *shape, struct kvp_policy **out);
kvp_status kvp_policy_parse_in(const char *spec, size_t len, const kvp_shape *shape, const struct kvp_allocator *mem,
			       struct kvp_policy **out);
void kvp_policy_free(struct kvp_policy *p);

/*
 * A policy= spec parsed once (the pager's tenant parses its spec when it opens) into the policy's ops and
 * arguments, with what its prepare op loads (TriAttention: its .kvtria file, read once). Opening it for a
 * sequence repeats no lookup and no load. The spec owns a copy of its text; kvp_policy_spec_free releases
 * it. parse checks the name and the argument syntax and reads nothing; prepare loads the shared state,
 * in memory from mem (the pager's tenant: charged to it, counted in its bytes_meta);
 * check opens the policy for a small shape, unless prepare loaded something (made for a shape known only
 * when a sequence opens). Failures name the spec's fault as kvp_policy_parse would.
 */
struct kvp_policy_spec;
kvp_status kvp_policy_spec_parse(const char *text, size_t len, struct kvp_policy_spec **out);
kvp_status kvp_policy_spec_prepare(struct kvp_policy_spec *spec, const struct kvp_allocator *mem);
kvp_status kvp_policy_spec_check(const struct kvp_policy_spec *spec);
void kvp_policy_spec_free(struct kvp_policy_spec *spec);
const struct kvp_policy_ops *kvp_policy_spec_ops(const struct kvp_policy_spec *spec);
kvp_status kvp_policy_spec_open(const struct kvp_policy_spec *spec, const kvp_shape *shape,
				const struct kvp_allocator *mem, struct kvp_policy **out);
/* The scope of the rounds of the spec's policies (its ops' scope on its args). */
kvp_status kvp_policy_spec_scope(const struct kvp_policy_spec *spec, enum kvp_round_scope *out);
/* The registry's policy names, joined by ", "; with coherence set, only those that offer a coherence op. */
void kvp_policy_names(int coherence, char *out, size_t cap);
/* The policy's coherence for (layer, kv_head); KVP_EINVAL for a policy that offers none. */
kvp_status kvp_policy_coherence(const struct kvp_policy *p, uint32_t layer, uint32_t kv_head, double *out);
/* An independent copy of p with its history (for kvp_seq_fork), in p's memory or mem's. On failure *out
 * is NULL. */
kvp_status kvp_policy_clone(const struct kvp_policy *p, struct kvp_policy **out);
kvp_status kvp_policy_clone_in(const struct kvp_policy *p, const struct kvp_allocator *mem, struct kvp_policy **out);
/* The checked vtable call behind the public kvp_policy_observe (pager-facing). It checks the stream and
 * the arguments but not that o->pos increases: the pager's positions were checked at append, and the
 * public call checks a host's before it gets here. */
kvp_status kvp_policy_learn(struct kvp_policy *p, const struct kvp_observation *o);

/* budget(t0), window(t0) and "is a round due for a stream of n tokens" from the plan. */
uint32_t kvp_policy_budget(const struct kvp_policy *p, int64_t t0);
uint32_t kvp_policy_window(const struct kvp_policy *p, int64_t t0);
/* Tokens a round of a stream keeps whatever its budget: the larger of the pager's sinks and the plan's,
 * plus the larger of the pager's window and window(t0) (the protection a round applies). */
uint64_t kvp_policy_protected(const struct kvp_policy *p, int64_t t0, uint32_t sinks, uint32_t window);
int kvp_policy_due(const struct kvp_policy *p, int64_t t0, uint32_t n);

/* ---- Survivor selection (policies/select.c) ---- */

/* Tokens that never compete. Counts are per stream; positions absolute. */
struct kvp_protect {
	uint32_t sinks;      /* the first sinks tokens of the stream (in position order) */
	uint32_t window;     /* the last window tokens */
	int32_t prompt_end;  /* with pin_prompt: tokens at positions < prompt_end are the prompt */
	int pin_prompt;
};

/*
 * Picks the survivors of one stream: keep[i] = 1 for kept tokens, *n_kept their count. pos is in
 * increasing order. Scores of protected tokens are not read; NaN scores rank lowest; ties keep the newer
 * token. Rules, in order:
 *   1. sinks and window are always kept, even when they alone exceed the budget (then nothing else is).
 *   2. a pinned prompt is kept when it fits in what the budget leaves. When it does not (the prompt is
 *      longer than the budget), the prompt keeps at most half of the free slots, by score, and the newer
 *      tokens compete for the rest, so a round never drops every generated token as long as two slots
 *      are free; slots one side cannot use go to the other.
 *   3. the remaining slots go to the highest-scored unprotected tokens.
 * The result has exactly min(n, max(budget, protected)) tokens. KVP_ENOMEM is the only failure.
 */
kvp_status kvp_select_survivors(uint32_t n, const int32_t *pos, const float *scores,
				const struct kvp_protect *protect, uint32_t budget, uint8_t *keep,
				uint32_t *n_kept);
/*
 * Rule 2's arithmetic: how many of n_prompt pinned-prompt candidates and n_decode newer ones a budget
 * keeps when `held` tokens are protected (the two takes may exceed what their side holds: cap them).
 */
void kvp_select_split(uint32_t held, uint32_t n_prompt, uint32_t n_decode, uint32_t budget,
		      uint32_t *prompt_take, uint32_t *decode_take);

/*
 * One policy round on one stream, what the pager calls when kvp_policy_due says so: scores the tokens
 * that compete (unprotected ones; a pinned prompt apart from the newer tokens, so TriAttention's z-scores
 * are taken over the decode candidates as in the reference), then kvp_select_survivors with budget(t0)
 * and the union of the pager's protection and the policy's own (sinks, window(t0), pin_prompt).
 * k: [n][head_dim] post-RoPE, exact. keep: [n] out. Nothing is evicted here: the pager applies keep.
 * Positions are taken as the pager hands them (nonnegative and increasing, checked when they were
 * appended) and not checked again: that would cost a pass over the stream at every round. The public
 * kvp_policy_score and kvp_policy_observe do check theirs.
 */
struct kvp_round {
	int64_t t0;
	uint32_t n;
	const int32_t *pos;
	const float *k;
	uint32_t sinks, window; /* the pager's protected tiers */
	int32_t prompt_end;     /* first position after the prompt (0 when unknown) */
	uint32_t budget;        /* this stream's budget when gating moved it; 0: the policy's budget(t0) */
};
kvp_status kvp_policy_round(struct kvp_policy *p, uint32_t layer, uint32_t kv_head, const struct kvp_round *r,
			    uint8_t *keep, uint32_t *n_kept);
/*
 * The verdict of a round of a keeps_newest policy, without positions, keys or scores: what
 * kvp_policy_round would select, as the runs of stream indices it drops, [from[i], from[i] + count[i])
 * for i < 2 (the oldest candidates of a pinned prompt, then the oldest of the newer tokens; either
 * may be empty). r->pos and r->k are not read; prompt_tokens is how many of the stream's tokens have
 * positions below r->prompt_end (read only with pin_prompt). KVP_EINVAL for other policies.
 */
struct kvp_cut {
	uint32_t from[2], count[2];
	uint32_t n_kept;
};
kvp_status kvp_policy_cut(const struct kvp_policy *p, const struct kvp_round *r, uint32_t prompt_tokens,
			  struct kvp_cut *cut);
/*
 * KVP_ROUND_HEAD (TriAttention's select=per_head, its reference): one kept set for KV head kv_head in
 * every layer. rounds[l] is the stream of layer l; all must hold the same positions (they do when every round
 * applied the same set), and their keys differ. Candidates' scores are averaged over layers, then selected.
 */
kvp_status kvp_policy_round_layers(struct kvp_policy *p, uint32_t kv_head, const struct kvp_round *rounds,
				   uint8_t *keep, uint32_t *n_kept);
/*
 * KVP_ROUND_LAYER (select=union, TensorRT-LLM's mode): one kept set for every KV head of a layer.
 * rounds[h] for KV head h, same positions. Each head proposes its best (budget - protected) candidates;
 * the proposals are ranked by their best score over all heads and the selection rules apply.
 */
kvp_status kvp_policy_round_union(struct kvp_policy *p, uint32_t layer, const struct kvp_round *rounds,
				  uint8_t *keep, uint32_t *n_kept);

/* Argument checks shared by the registry and the rounds (messages name `what`). */
kvp_status kvp_policy_check_stream(const char *what, const struct kvp_policy *p, uint32_t layer,
				   uint32_t kv_head);
kvp_status kvp_policy_check_positions(const char *what, uint32_t n, const int32_t *pos);

/* TriAttention's raw S for one query head (before z-normalization and the group max): tests, experiments. */
kvp_status kvp_tria_raw_scores(struct kvp_policy *p, uint32_t layer, uint32_t head, int64_t t0, uint32_t n,
			       const float *k_post_rope, float *out);

/* ---- TriAttention statistics (policies/kvtria.c) ---- */

/* Per (layer, query head, band): q_mean_re, q_mean_im, q_abs_mean, each [n_layers][n_heads][head_dim/2]. */
struct kvp_tria_stats {
	uint32_t n_layers, n_heads, head_dim;
	kvp_rope_layout rope_layout; /* the layout the calibration read its bands from */
	float rope_theta;
	float *mean_re, *mean_im, *abs_mean;
	struct kvp_allocator mem; /* where the three arrays came from (the C heap unless read with _in) */
};

#define KVP_KVTRIA_MAGIC "KVTRIA01"
#define KVP_KVTRIA_HEADER 40u

/* Allocates zeroed stats for a shape (its n_heads, not n_kv_heads). */
kvp_status kvp_tria_stats_alloc(struct kvp_tria_stats *s, uint32_t n_layers, uint32_t n_heads,
				uint32_t head_dim, kvp_rope_layout layout, float theta);
void kvp_tria_stats_free(struct kvp_tria_stats *s);
/* Offset of (layer, head)'s band 0 in the three arrays. */
size_t kvp_tria_stats_at(const struct kvp_tria_stats *s, uint32_t layer, uint32_t head);
/*
 * Reads a .kvtria file. Only a regular file is read (a directory, FIFO, socket or device is KVP_EINVAL,
 * and a FIFO is never waited on). Rejected with KVP_ECORRUPT and a message naming the file and the
 * fault: wrong magic, a size other than the header implies (truncated or trailing bytes; checked
 * before the body is read), odd or zero head_dim, unknown layout, non-finite or negative values,
 * |q_mean| > q_abs_mean. With shape non-NULL, a file for another shape is KVP_EINVAL (see
 * kvp_tria_stats_check). On failure *out is zeroed.
 */
kvp_status kvp_tria_stats_read(const char *path, const kvp_shape *shape, struct kvp_tria_stats *out);
/* The same, with the arrays from mem (kvp_tria_stats_free gives them back there). */
kvp_status kvp_tria_stats_read_in(const char *path, const kvp_shape *shape, const struct kvp_allocator *mem,
				  struct kvp_tria_stats *out);
/* KVP_EINVAL, naming path, when s was made for another shape: layers, query heads, head_dim, rope_theta
 * (relative 1e-5) or rope_layout (the bands the calibration read). */
kvp_status kvp_tria_stats_check(const char *path, const struct kvp_tria_stats *s, const kvp_shape *shape);
kvp_status kvp_tria_stats_write(const char *path, const struct kvp_tria_stats *s);

/* The mean resultant length of a KV head's query group in one layer from calibrated statistics (TriAttention's
 * coherence signal with a stats file): sum over the group's heads and bands of |q_mean| / sum of
 * q_abs_mean, in [0, 1]; 0 when there is no energy. */
double kvp_gate_mrl(const struct kvp_tria_stats *s, uint32_t layer, uint32_t kv_head, uint32_t n_kv_heads);

#endif /* KVP_POLICY_H */
