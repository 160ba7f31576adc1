/*
 * The policy registry: the one table of policies, the spec parser, the plan arithmetic (budget, window,
 * when a round is due), and the public kvp_policy_* calls for policies used on their own.
 *
 * A spec is `name` or `name(args)`: "streaming(sinks=4,window=1024)", "h2o(heavy=0.1,recent=0.1)",
 * "triattention(budget=2048,stats=qwen3.kvtria)". Every policy also takes pin_prompt=0|1.
 *
 * What a policy can do is in its ops row (prepare, coherence, scores_keys, keeps_newest) and its plan (round
 * scope), and the messages that list policies are written from this table: adding a policy is its file
 * and one line here.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "policies/policy.h"

static const struct kvp_policy_ops *const policies[] = {
	&kvp_policy_streaming, &kvp_policy_h2o, &kvp_policy_triattention,
};

static const struct kvp_policy_ops *lookup(const char *name, unsigned nlen)
{
	for (size_t i = 0; i < sizeof policies / sizeof policies[0]; i++)
		if (kvp_name_is(name, nlen, policies[i]->name))
			return policies[i];
	return NULL;
}

void kvp_policy_names(int coherence, char *out, size_t cap)
{
	size_t at = 0;

	out[0] = '\0';
	for (size_t i = 0; i < sizeof policies / sizeof policies[0] && at < cap; i++)
		if (!coherence || policies[i]->coherence)
			at += (size_t)snprintf(out + at, cap - at, "%s%s", at ? ", " : "", policies[i]->name);
}

static kvp_status check_shape(const kvp_shape *s)
{
	if (!s)
		return kvp_fail(KVP_EINVAL, "policy: NULL shape");
	if (s->n_layers == 0 || s->n_heads == 0 || s->n_kv_heads == 0 || s->head_dim == 0)
		return kvp_fail(KVP_EINVAL, "policy: shape has a zero dimension (layers %u, heads %u, kv heads %u, "
				"head_dim %u)", s->n_layers, s->n_heads, s->n_kv_heads, s->head_dim);
	if (s->n_heads % s->n_kv_heads)
		return kvp_fail(KVP_EINVAL, "policy: n_heads=%u is not a multiple of n_kv_heads=%u", s->n_heads,
				s->n_kv_heads);
	if (s->head_dim % 2 || s->head_dim > 4096)
		return kvp_fail(KVP_EINVAL, "policy: head_dim=%u must be even and at most 4096", s->head_dim);
	if (s->n_layers > 4096 || s->n_heads > 4096)
		return kvp_fail(KVP_EINVAL, "policy: shape of %u layers x %u heads is too large", s->n_layers,
				s->n_heads);
	if (!(s->rope_theta > 1.0f) || !isfinite(s->rope_theta))
		return kvp_fail(KVP_EINVAL, "policy: rope_theta=%g must be a finite number above 1",
				(double)s->rope_theta);
	if (s->rope_layout != KVP_ROPE_HALF && s->rope_layout != KVP_ROPE_INTERLEAVED)
		return kvp_fail(KVP_EINVAL, "policy: unknown rope_layout %d", (int)s->rope_layout);
	return KVP_OK;
}

struct kvp_policy_shared {
	const struct kvp_policy_ops *ops;
	void *state;
};

/* The struct itself, from mem like everything the policy keeps. */
static struct kvp_policy *policy_new(const struct kvp_policy_ops *ops, const kvp_shape *shape,
				     const struct kvp_allocator *mem)
{
	struct kvp_policy *p = kvp_allocate(mem, sizeof *p, ops->name);

	if (!p)
		return NULL;
	p->ops = ops;
	p->shape = *shape;
	p->mem = *mem;
	return p;
}

static void policy_release(struct kvp_policy *p)
{
	struct kvp_allocator mem = p->mem;

	kvp_release(&mem, p, sizeof *p);
}

static kvp_status open_parsed(const struct kvp_policy_ops *ops, struct kvp_args *args, const kvp_shape *shape,
			      const struct kvp_policy_shared *shared, const struct kvp_allocator *mem,
			      struct kvp_policy **out)
{
	struct kvp_policy *p = policy_new(ops, shape, mem);
	uint32_t pin;
	kvp_status st;

	if (!p)
		return KVP_ENOMEM;
	p->plan.every = 1;
	p->shared = shared && shared->ops == ops ? shared->state : NULL;
	st = ops->open(p, args);
	p->shared = NULL;
	if (st != KVP_OK) {
		policy_release(p);
		return st;
	}
	pin = (uint32_t)p->plan.pin_prompt;
	st = kvp_args_u32(args, "pin_prompt", 0, 1, &pin);
	if (st == KVP_OK)
		st = kvp_args_finish(args);
	if (st != KVP_OK) {
		kvp_policy_free(p);
		return st;
	}
	p->plan.pin_prompt = (int)pin;
	*out = p;
	return KVP_OK;
}

/* The policy spec names and its parsed arguments. */
static kvp_status spec_split(const char *spec, size_t len, const struct kvp_policy_ops **ops, struct kvp_args *args)
{
	const char *name, *inner;
	unsigned nlen, ilen;
	char known[128];
	kvp_status st;

	if (len > 65536)
		return kvp_fail(KVP_EINVAL, "policy: spec of %zu bytes is too long", len);
	st = kvp_call_split(spec, (unsigned)len, &name, &nlen, &inner, &ilen);
	if (st != KVP_OK)
		return st;
	*ops = lookup(name, nlen);
	if (!*ops) {
		kvp_policy_names(0, known, sizeof known);
		return kvp_fail(KVP_EINVAL, "policy: unknown policy '%.*s' (known: %s)", (int)nlen, name, known);
	}
	return kvp_args_parse(args, (*ops)->name, inner, ilen);
}

kvp_status kvp_policy_parse(const char *spec, size_t len, const kvp_shape *shape, struct kvp_policy **out)
{
	return kvp_policy_parse_in(spec, len, shape, &kvp_heap, out);
}

kvp_status kvp_policy_parse_in(const char *spec, size_t len, const kvp_shape *shape, const struct kvp_allocator *mem,
			       struct kvp_policy **out)
{
	const struct kvp_policy_ops *ops;
	struct kvp_args args;
	kvp_status st;

	if (!spec || !mem || !out)
		return kvp_fail(KVP_EINVAL, "policy: NULL spec, memory or result");
	*out = NULL;
	st = check_shape(shape);
	if (st == KVP_OK)
		st = spec_split(spec, len, &ops, &args);
	if (st != KVP_OK)
		return st;
	return open_parsed(ops, &args, shape, NULL, mem, out);
}

/* ---- specs parsed once ---- */

struct kvp_policy_spec {
	const struct kvp_policy_ops *ops;
	struct kvp_args args;            /* point into text */
	struct kvp_policy_shared shared; /* state NULL until prepare loads something */
	char text[];
};

/* The shape a spec is checked with when it prepared nothing. */
static const kvp_shape probe_shape = { 1, 1, 1, 64, 1e4f, KVP_ROPE_HALF };

kvp_status kvp_policy_spec_parse(const char *text, size_t len, struct kvp_policy_spec **out)
{
	struct kvp_policy_spec *spec;
	kvp_status st;

	if (!text || !out)
		return kvp_fail(KVP_EINVAL, "policy: NULL spec or result");
	*out = NULL;
	if (len > 65536)
		return kvp_fail(KVP_EINVAL, "policy: spec of %zu bytes is too long", len);
	if (!(spec = calloc(1, sizeof *spec + len + 1)))
		return kvp_fail(KVP_ENOMEM, "policy: out of memory for the spec '%.*s'", (int)len, text);
	memcpy(spec->text, text, len);
	st = spec_split(spec->text, len, &spec->ops, &spec->args);
	if (st != KVP_OK) {
		free(spec);
		return st;
	}
	spec->shared.ops = spec->ops;
	*out = spec;
	return KVP_OK;
}

kvp_status kvp_policy_spec_prepare(struct kvp_policy_spec *spec, const struct kvp_allocator *mem)
{
	struct kvp_args args = spec->args;

	if (!spec->ops->prepare || spec->shared.state)
		return KVP_OK;
	return spec->ops->prepare(&args, mem, &spec->shared.state);
}

kvp_status kvp_policy_spec_check(const struct kvp_policy_spec *spec)
{
	struct kvp_policy *p;
	kvp_status st;

	/* what prepare loaded (a .kvtria file) is checked against each sequence's shape when it opens */
	if (spec->shared.state)
		return KVP_OK;
	st = kvp_policy_spec_open(spec, &probe_shape, &kvp_heap, &p);
	kvp_policy_free(p);
	return st;
}

void kvp_policy_spec_free(struct kvp_policy_spec *spec)
{
	if (!spec)
		return;
	if (spec->shared.state)
		spec->ops->release(spec->shared.state);
	free(spec);
}

const struct kvp_policy_ops *kvp_policy_spec_ops(const struct kvp_policy_spec *spec)
{
	return spec->ops;
}

kvp_status kvp_policy_spec_scope(const struct kvp_policy_spec *spec, enum kvp_round_scope *out)
{
	struct kvp_args args = spec->args; /* a copy: the spec's keys stay unread for open */

	*out = KVP_ROUND_STREAM;
	return spec->ops->scope ? spec->ops->scope(&args, out) : KVP_OK;
}

kvp_status kvp_policy_spec_open(const struct kvp_policy_spec *spec, const kvp_shape *shape,
				const struct kvp_allocator *mem, struct kvp_policy **out)
{
	struct kvp_args args = spec->args; /* open marks the keys it reads: the spec's stay unread */
	kvp_status st;

	if (!mem || !out)
		return kvp_fail(KVP_EINVAL, "policy: NULL memory or result");
	*out = NULL;
	st = check_shape(shape);
	if (st != KVP_OK)
		return st;
	return open_parsed(spec->ops, &args, shape, &spec->shared, mem, out);
}

void kvp_policy_free(struct kvp_policy *p)
{
	if (!p)
		return;
	if (p->ops->close)
		p->ops->close(p);
	policy_release(p);
}

kvp_status kvp_policy_clone(const struct kvp_policy *p, struct kvp_policy **out)
{
	if (!p || !out)
		return kvp_fail(KVP_EINVAL, "kvp_policy_clone: NULL policy or result");
	return kvp_policy_clone_in(p, &p->mem, out);
}

kvp_status kvp_policy_clone_in(const struct kvp_policy *p, const struct kvp_allocator *mem, struct kvp_policy **out)
{
	struct kvp_policy *c;
	kvp_status st = KVP_OK;

	if (!p || !mem || !out)
		return kvp_fail(KVP_EINVAL, "kvp_policy_clone: NULL policy, memory or result");
	*out = NULL;
	if (!(c = policy_new(p->ops, &p->shape, mem)))
		return KVP_ENOMEM;
	c->plan = p->plan;
	if (p->ops->clone)
		st = p->ops->clone(c, p);
	if (st != KVP_OK) {
		policy_release(c);
		return st;
	}
	*out = c;
	return KVP_OK;
}

/* ---- the plan ---- */

static uint32_t ceil_fraction(double r, int64_t t0)
{
	/* 0.15 * 200 is 30.000000000000004 in binary: a relative nudge keeps exact products exact */
	double x = r * (double)(t0 > 0 ? t0 : 0), v = ceil(x - x * 1e-12);
	return v >= (double)UINT32_MAX ? UINT32_MAX : (uint32_t)v;
}

uint32_t kvp_policy_budget(const struct kvp_policy *p, int64_t t0)
{
	uint32_t b;

	if (p->plan.ratio <= 0)
		return p->plan.budget;
	b = ceil_fraction(p->plan.ratio, t0);
	return b ? b : 1;
}

uint32_t kvp_policy_window(const struct kvp_policy *p, int64_t t0)
{
	uint64_t w = (uint64_t)p->plan.window + ceil_fraction(p->plan.window_ratio, t0);
	return w > UINT32_MAX ? UINT32_MAX : (uint32_t)w;
}

uint64_t kvp_policy_protected(const struct kvp_policy *p, int64_t t0, uint32_t sinks, uint32_t window)
{
	uint32_t w = kvp_policy_window(p, t0);

	return (uint64_t)(sinks > p->plan.sinks ? sinks : p->plan.sinks) + (window > w ? window : w);
}

int kvp_policy_due(const struct kvp_policy *p, int64_t t0, uint32_t n)
{
	return (uint64_t)n >= (uint64_t)kvp_policy_budget(p, t0) + p->plan.every;
}

/* ---- checked calls ---- */

kvp_status kvp_policy_coherence(const struct kvp_policy *p, uint32_t layer, uint32_t kv_head, double *out)
{
	char known[128];
	kvp_status st = kvp_policy_check_stream("coherence", p, layer, kv_head);

	if (st != KVP_OK)
		return st;
	if (!p->ops->coherence) {
		kvp_policy_names(1, known, sizeof known);
		return kvp_fail(KVP_EINVAL, "gate=mrl: policy %s offers no coherence signal (%s do)", p->ops->name,
				known);
	}
	return p->ops->coherence(p, layer, kv_head, out);
}

kvp_status kvp_policy_check_stream(const char *what, const struct kvp_policy *p, uint32_t layer,
				   uint32_t kv_head)
{
	if (!p)
		return kvp_fail(KVP_EINVAL, "%s: NULL policy", what);
	if (layer >= p->shape.n_layers)
		return kvp_fail(KVP_EINVAL, "%s: layer %u is outside the shape's %u layers", what, layer,
				p->shape.n_layers);
	if (kv_head >= p->shape.n_kv_heads)
		return kvp_fail(KVP_EINVAL, "%s: KV head %u is outside the shape's %u KV heads", what, kv_head,
				p->shape.n_kv_heads);
	return KVP_OK;
}

/* Positions are absolute, nonnegative and increasing within a stream. */
kvp_status kvp_policy_check_positions(const char *what, uint32_t n, const int32_t *pos)
{
	for (uint32_t i = 0; i < n; i++)
		if (pos[i] < 0 || (i && pos[i] <= pos[i - 1]))
			return kvp_fail(KVP_EINVAL, "%s: position %d at index %u is negative or not increasing", what,
					pos[i], i);
	return KVP_OK;
}

/* What an observation must hold before a policy reads it, short of increasing positions. */
static kvp_status check_observation(const struct kvp_policy *p, const struct kvp_observation *o)
{
	kvp_status st;

	if (!o)
		return kvp_fail(KVP_EINVAL, "kvp_policy_observe: NULL observation");
	st = kvp_policy_check_stream("kvp_policy_observe", p, o->layer, o->kv_head);
	if (st != KVP_OK)
		return st;
	if (o->t < 0)
		return kvp_fail(KVP_EINVAL, "kvp_policy_observe: query position %lld is negative", (long long)o->t);
	if (o->n && o->weights && !o->pos)
		return kvp_fail(KVP_EINVAL, "kvp_policy_observe: weights without positions");
	return KVP_OK;
}

kvp_status kvp_policy_learn(struct kvp_policy *p, const struct kvp_observation *o)
{
	kvp_status st = check_observation(p, o);

	if (st != KVP_OK)
		return st;
	return p->ops->observe ? p->ops->observe(p, o) : KVP_OK;
}

/* A host's floats: rows x cols of them, each finite (a NaN weight or query would stay in a policy's
 * statistics for good, a NaN key make its score NaN). */
static kvp_status check_finite(const char *what, const char *name, const float *x, size_t rows, size_t cols)
{
	const size_t all = rows * cols, at = kvp_first_outside(x, all, INFINITY);

	if (at == all)
		return KVP_OK;
	return kvp_fail(KVP_EINVAL, "%s: %s[%zu][%zu] is %g: it must be finite", what, name, at / cols, at % cols,
			(double)x[at]);
}

static kvp_status score_checked(struct kvp_policy *p, uint32_t layer, uint32_t kv_head, int64_t t0, uint32_t n,
				const int32_t *pos, const float *k, float *scores)
{
	kvp_status st = kvp_policy_check_stream("kvp_policy_score", p, layer, kv_head);

	if (st != KVP_OK || n == 0)
		return st;
	if (!pos || !k || !scores)
		return kvp_fail(KVP_EINVAL, "kvp_policy_score: NULL positions, keys or scores");
	st = kvp_policy_check_positions("kvp_policy_score", n, pos);
	if (st == KVP_OK)
		st = check_finite("kvp_policy_score", "k_post_rope", k, n, p->shape.head_dim);
	if (st == KVP_OK && t0 <= pos[n - 1])
		st = kvp_fail(KVP_EINVAL, "kvp_policy_score: t0=%lld is not after the last key's position %d",
			      (long long)t0, pos[n - 1]);
	if (st != KVP_OK)
		return st;
	return p->ops->score(p, layer, kv_head, t0, n, pos, k, scores);
}

/* ---- the public calls ---- */

KVP_API kvp_status kvp_policy_open(const char *spec, const kvp_shape *shape, kvp_policy **out)
{
	if (out)
		*out = NULL;
	if (!spec || !out)
		return kvp_fail(KVP_EINVAL, "kvp_policy_open: NULL spec or result");
	return kvp_policy_parse(spec, strlen(spec), shape, out);
}

KVP_API kvp_status kvp_policy_score(kvp_policy *p, uint32_t layer, uint32_t kv_head, int64_t t0, uint32_t n,
				    const int32_t *pos, const float *k_post_rope, float *scores)
{
	return score_checked(p, layer, kv_head, t0, n, pos, k_post_rope, scores);
}

KVP_API kvp_status kvp_policy_observe(kvp_policy *p, uint32_t layer, uint32_t kv_head, int64_t t,
				      const float *q_post_rope, uint32_t n, const int32_t *pos,
				      const float *weights)
{
	struct kvp_observation o = {
		.layer = layer, .kv_head = kv_head, .t = t, .q = q_post_rope, .n = n, .pos = pos,
		.weights = weights,
	};
	kvp_status st = check_observation(p, &o);

	/* a host's positions and floats are checked here; the pager's were when they were appended or given */
	if (st == KVP_OK && weights && n)
		st = kvp_policy_check_positions("kvp_policy_observe", n, pos);
	if (st == KVP_OK && q_post_rope)
		st = check_finite("kvp_policy_observe", "q_post_rope", q_post_rope, p->shape.n_heads / p->shape.n_kv_heads,
				  p->shape.head_dim);
	if (st == KVP_OK && weights && n)
		st = check_finite("kvp_policy_observe", "weights", weights, p->shape.n_heads / p->shape.n_kv_heads, n);
	if (st != KVP_OK)
		return st;
	return kvp_policy_learn(p, &o);
}

KVP_API void kvp_policy_close(kvp_policy *p)
{
	kvp_policy_free(p);
}
