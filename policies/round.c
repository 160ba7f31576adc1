/*
 * Policy rounds: what the pager runs when kvp_policy_due says a stream is over budget + every. Protected
 * tokens (sinks, the hot window) are not candidates: only the candidates are scored, so TriAttention's
 * z-scores are taken over the tokens that compete, as in the reference. Three granularities:
 *   kvp_policy_round         one stream (layer, KV head): select=per_layer_head, H2O, StreamingLLM
 *   kvp_policy_round_layers  one KV head over every layer, scores averaged over layers: select=per_head
 *   kvp_policy_round_union   every KV head of one layer, one shared set: select=union
 * A round's buffers come from the policy's allocator, so the pager charges them to the sequence's tenant
 * for as long as the round runs.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "policies/policy.h"

/*
 * The candidates of one round. Positions increase, so the unprotected tokens are one run of the stream
 * and a pinned prompt is a prefix of it: the candidates are at most two runs, the newer tokens
 * [decode_from, decode_to) first, then the prompt's [prompt_from, prompt_to). The policy scores the
 * stream's own positions and keys in place; nothing is copied.
 */
struct candidates {
	uint32_t n, n_decode;
	uint32_t decode_from, prompt_from;
	float *scores, *sum; /* [n], candidate order; sum: per-token accumulator over layers or heads */
};

/* scores and sum are one allocation of 2n floats. */
static void candidates_free(const struct kvp_policy *p, struct candidates *c)
{
	kvp_release(&p->mem, c->scores, 2 * (size_t)c->n * sizeof *c->scores);
}

/* Stream index of candidate j. */
static uint32_t candidate_index(const struct candidates *c, uint32_t j)
{
	return j < c->n_decode ? c->decode_from + j : c->prompt_from + (j - c->n_decode);
}

static kvp_status check_round(const char *what, const struct kvp_policy *p, uint32_t layer, uint32_t kv_head,
			      const struct kvp_round *r)
{
	kvp_status st = kvp_policy_check_stream(what, p, layer, kv_head);

	if (st == KVP_OK && r->n && (!r->pos || (!r->k && p->ops->scores_keys)))
		st = kvp_fail(KVP_EINVAL, "%s: NULL positions or keys", what);
	if (st == KVP_OK && r->n && r->t0 <= r->pos[r->n - 1])
		st = kvp_fail(KVP_EINVAL, "%s: t0=%lld is not after the last position %d", what, (long long)r->t0,
			      r->pos[r->n - 1]);
	return st;
}

/* The union of the pager's protection and the policy's own. */
static struct kvp_protect protection(const struct kvp_policy *p, const struct kvp_round *r)
{
	uint32_t window = kvp_policy_window(p, r->t0);
	struct kvp_protect pr = {
		.sinks = r->sinks > p->plan.sinks ? r->sinks : p->plan.sinks,
		.window = r->window > window ? r->window : window,
		.prompt_end = r->prompt_end,
		.pin_prompt = p->plan.pin_prompt,
	};
	return pr;
}

/* The unprotected tokens [*from, *to) of a stream of n under pr: everything between sinks and window. */
static void candidate_run(uint32_t n, const struct kvp_protect *pr, uint32_t *from, uint32_t *to)
{
	*from = pr->sinks < n ? pr->sinks : n;
	*to = pr->window < n ? n - pr->window : 0;
	if (*to < *from)
		*to = *from;
}

/* The runs of candidates of a round of n tokens with positions pos under protection pr. */
static void candidates_find(struct candidates *c, uint32_t n, const int32_t *pos, const struct kvp_protect *pr)
{
	uint32_t from, to, prompt_end;

	candidate_run(n, pr, &from, &to);
	prompt_end = from;
	if (pr->pin_prompt)
		while (prompt_end < to && pos[prompt_end] < pr->prompt_end)
			prompt_end++;
	c->decode_from = prompt_end;
	c->n_decode = to - prompt_end;
	c->prompt_from = from;
	c->n = to - from;
}

static kvp_status candidates_alloc(const struct kvp_policy *p, struct candidates *c, const struct kvp_round *r,
				   const struct kvp_protect *pr)
{
	memset(c, 0, sizeof *c);
	candidates_find(c, r->n, r->pos, pr);
	c->scores = kvp_allocate_array(&p->mem, 2 * (size_t)c->n, sizeof *c->scores, "the candidates' scores");
	if (!c->scores)
		return kvp_fail_context(KVP_ENOMEM, "policy round of %u tokens", r->n);
	c->sum = c->scores + c->n;
	return KVP_OK;
}

/*
 * Scores the candidates of r into c->scores. A pinned prompt is scored on its own: the reference
 * z-normalizes over the decode tokens only, so the prompt must not shift their rows; its own scores
 * matter only when it outgrows the budget and competes within itself.
 */
static kvp_status score_candidates(struct kvp_policy *p, uint32_t layer, uint32_t kv_head, const struct kvp_round *r,
				   const struct candidates *c)
{
	size_t hd = p->shape.head_dim;
	uint32_t n_prompt = c->n - c->n_decode;
	kvp_status st = KVP_OK;

	if (c->n_decode)
		st = p->ops->score(p, layer, kv_head, r->t0, c->n_decode, r->pos + c->decode_from,
				   r->k ? r->k + c->decode_from * hd : NULL, c->scores);
	if (st == KVP_OK && n_prompt)
		st = p->ops->score(p, layer, kv_head, r->t0, n_prompt, r->pos + c->prompt_from,
				   r->k ? r->k + c->prompt_from * hd : NULL, c->scores + c->n_decode);
	return st;
}

/* Spreads candidate values back to stream order (protected entries 0: they are not read) and selects. */
static kvp_status select_from(const struct kvp_policy *p, const struct kvp_round *r, const struct kvp_protect *pr,
			      const struct candidates *c, const float *values, uint8_t *keep, uint32_t *n_kept)
{
	float *scores = kvp_allocate_array(&p->mem, r->n, sizeof *scores, "the scores in stream order");
	kvp_status st;

	if (!scores)
		return kvp_fail_context(KVP_ENOMEM, "policy round of %u tokens", r->n);
	for (uint32_t j = 0; j < c->n; j++)
		scores[candidate_index(c, j)] = values[j];
	st = kvp_select_survivors(r->n, r->pos, scores, pr, r->budget ? r->budget : kvp_policy_budget(p, r->t0), keep,
				  n_kept);
	kvp_release(&p->mem, scores, (size_t)r->n * sizeof *scores);
	return st;
}

kvp_status kvp_policy_round(struct kvp_policy *p, uint32_t layer, uint32_t kv_head, const struct kvp_round *r,
			    uint8_t *keep, uint32_t *n_kept)
{
	struct kvp_protect pr;
	struct candidates c;
	kvp_status st;

	if (!r || !keep || !n_kept)
		return kvp_fail(KVP_EINVAL, "kvp_policy_round: NULL round, keep or count");
	st = check_round("kvp_policy_round", p, layer, kv_head, r);
	if (st != KVP_OK)
		return st;
	pr = protection(p, r);
	if ((st = candidates_alloc(p, &c, r, &pr)) != KVP_OK)
		return st;
	st = score_candidates(p, layer, kv_head, r, &c);
	if (st == KVP_OK)
		st = select_from(p, r, &pr, &c, c.scores, keep, n_kept);
	candidates_free(p, &c);
	return st;
}

/*
 * Scores that never decrease with position rank candidates by position (ties go to the newer token), so
 * each side of rule 2 keeps its newest take and drops its oldest: kvp_select_survivors' result, by
 * index arithmetic.
 */
kvp_status kvp_policy_cut(const struct kvp_policy *p, const struct kvp_round *r, uint32_t prompt_tokens,
			  struct kvp_cut *cut)
{
	struct kvp_protect pr;
	uint32_t from, to, prompt_to, prompt_take, decode_take, n_prompt, n_decode;

	if (!p || !r || !cut || !p->ops->keeps_newest)
		return kvp_fail(KVP_EINVAL, "kvp_policy_cut: NULL argument or a policy that does not keep the newest");
	pr = protection(p, r);
	candidate_run(r->n, &pr, &from, &to);
	prompt_to = !pr.pin_prompt || prompt_tokens < from ? from : prompt_tokens > to ? to : prompt_tokens;
	n_prompt = prompt_to - from;
	n_decode = to - prompt_to;
	kvp_select_split(r->n - (to - from), n_prompt, n_decode, r->budget ? r->budget : kvp_policy_budget(p, r->t0),
			 &prompt_take, &decode_take);
	decode_take = decode_take < n_decode ? decode_take : n_decode;
	*cut = (struct kvp_cut){
		.from = { from, prompt_to },
		.count = { n_prompt - prompt_take, n_decode - decode_take },
		.n_kept = r->n - (n_prompt - prompt_take) - (n_decode - decode_take),
	};
	return KVP_OK;
}

/* The rounds of a group must describe the same tokens: same t0, count and positions. */
static kvp_status check_same_tokens(const char *what, const struct kvp_round *rounds, uint32_t count)
{
	for (uint32_t j = 1; j < count; j++)
		if (rounds[j].t0 != rounds[0].t0 || rounds[j].n != rounds[0].n ||
		    (rounds[0].n && memcmp(rounds[j].pos, rounds[0].pos, sizeof(int32_t) * rounds[0].n)))
			return kvp_fail(KVP_EINVAL, "%s: round %u holds other tokens than round 0 (t0, count or "
					"positions differ)", what, j);
	return KVP_OK;
}

kvp_status kvp_policy_round_layers(struct kvp_policy *p, uint32_t kv_head, const struct kvp_round *rounds,
				   uint8_t *keep, uint32_t *n_kept)
{
	const char *what = "kvp_policy_round_layers";
	uint32_t L = p ? p->shape.n_layers : 0;
	struct kvp_protect pr;
	struct candidates c;
	kvp_status st = KVP_OK;

	if (!p || !rounds || !keep || !n_kept)
		return kvp_fail(KVP_EINVAL, "%s: NULL policy, rounds, keep or count", what);
	for (uint32_t l = 0; st == KVP_OK && l < L; l++)
		st = check_round(what, p, l, kv_head, &rounds[l]);
	if (st == KVP_OK)
		st = check_same_tokens(what, rounds, L);
	if (st != KVP_OK)
		return st;
	pr = protection(p, &rounds[0]);
	if ((st = candidates_alloc(p, &c, &rounds[0], &pr)) != KVP_OK)
		return st;
	for (uint32_t l = 0; st == KVP_OK && l < L; l++) {
		st = score_candidates(p, l, kv_head, &rounds[l], &c);
		for (uint32_t i = 0; st == KVP_OK && i < c.n; i++)
			c.sum[i] += c.scores[i] / (float)L;
	}
	if (st == KVP_OK)
		st = select_from(p, &rounds[0], &pr, &c, c.sum, keep, n_kept);
	candidates_free(p, &c);
	return st;
}

/* Marks the best `take` candidates of one head's scores in proposed[]; order and mine are one
 * allocation of n int32 and n bytes. */
static kvp_status propose(const struct kvp_policy *p, const float *scores, uint32_t n, uint32_t take,
			  uint8_t *proposed)
{
	struct kvp_protect none = { 0 };
	size_t bytes = (size_t)n * (sizeof(int32_t) + 1);
	int32_t *order = kvp_allocate(&p->mem, bytes, "union round: proposals");
	uint8_t *mine = (uint8_t *)(order + n);
	uint32_t got;
	kvp_status st;

	if (!order)
		return KVP_ENOMEM;
	for (uint32_t i = 0; i < n; i++)
		order[i] = (int32_t)i; /* ties: the later candidate, as in kvp_select_survivors */
	st = kvp_select_survivors(n, order, scores, &none, take, mine, &got);
	for (uint32_t i = 0; st == KVP_OK && i < n; i++)
		proposed[i] |= mine[i];
	kvp_release(&p->mem, order, bytes);
	return st;
}

kvp_status kvp_policy_round_union(struct kvp_policy *p, uint32_t layer, const struct kvp_round *rounds,
				  uint8_t *keep, uint32_t *n_kept)
{
	const char *what = "kvp_policy_round_union";
	uint32_t H = p ? p->shape.n_kv_heads : 0, take, held = 0;
	struct kvp_protect pr;
	struct candidates c;
	uint8_t *proposed;
	kvp_status st = KVP_OK;

	if (!p || !rounds || !keep || !n_kept)
		return kvp_fail(KVP_EINVAL, "%s: NULL policy, rounds, keep or count", what);
	for (uint32_t h = 0; st == KVP_OK && h < H; h++)
		st = check_round(what, p, layer, h, &rounds[h]);
	if (st == KVP_OK)
		st = check_same_tokens(what, rounds, H);
	if (st != KVP_OK)
		return st;
	pr = protection(p, &rounds[0]);
	if ((st = candidates_alloc(p, &c, &rounds[0], &pr)) != KVP_OK)
		return st;
	proposed = kvp_allocate(&p->mem, rounds[0].n, what);
	if (!proposed) {
		candidates_free(p, &c);
		return KVP_ENOMEM;
	}
	for (uint32_t i = 0; i < rounds[0].n; i++)
		held += i < pr.sinks || (uint64_t)i + pr.window >= rounds[0].n;
	take = kvp_policy_budget(p, rounds[0].t0) > held ? kvp_policy_budget(p, rounds[0].t0) - held : 0;
	/* each head proposes its top `take`; a proposed token ranks by its best score over all heads */
	for (uint32_t i = 0; i < c.n; i++)
		c.sum[i] = -INFINITY;
	for (uint32_t h = 0; st == KVP_OK && h < H; h++) {
		st = score_candidates(p, layer, h, &rounds[h], &c);
		if (st == KVP_OK)
			st = propose(p, c.scores, c.n, take, proposed);
		for (uint32_t i = 0; st == KVP_OK && i < c.n; i++)
			c.sum[i] = c.scores[i] > c.sum[i] ? c.scores[i] : c.sum[i];
	}
	for (uint32_t i = 0; st == KVP_OK && i < c.n; i++)
		if (!proposed[i])
			c.sum[i] = -INFINITY; /* every head proposed at least `take`, so these are never needed */
	if (st == KVP_OK)
		st = select_from(p, &rounds[0], &pr, &c, c.sum, keep, n_kept);
	kvp_release(&p->mem, proposed, rounds[0].n);
	candidates_free(p, &c);
	return st;
}
