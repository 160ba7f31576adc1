/*
 * Coherence gating in the pager (gate=, ladder= of the tenant spec; DESIGN.md "Coherence gating").
 *
 * Every stream (layer, KV head) carries a coherence c in [0, 1]: gate=mrl reads it from TriAttention's
 * statistics (a head whose queries point one way attends predictably), gate=entropy from the softmax
 * weights kvp_attend computes (running mean of 1 - H/log n over the calls and the group's query heads).
 * Its aggressiveness a is c, or with a ladder level / (levels - 1) for level round(c (levels - 1)); the
 * host may override either. At a round the sequence's total budget — the policy's budget times the units
 * that select on their own — is split by kvp_gate_distribute in proportion to each unit's share (1 - a/2,
 * or the ladder level's keep), never below a unit's protected tokens, and conserved exactly. The arithmetic
 * lives in policies/gate.c; this file holds the per-stream state and its use by the rounds and the cold tier.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pager.h"

/* Without a ladder a fully coherent head keeps half the share of a fully diffuse one. */
#define GATE_STRENGTH 0.5

/* Codecs that take bits=: a ladder's bits go to these members of a k= or v= stack. */
static const char *const bit_codecs[] = { "turboquant", "kivi", NULL };

kvp_status kvp_gate_config(struct kvp_args *args, struct kvp_tenant_config *cfg)
{
	static const char *const kinds[] = { "off", "mrl", "entropy", NULL };
	const char *text = NULL;
	unsigned kind = KVP_GATE_OFF, len = 0;
	kvp_status st = kvp_args_choice(args, "gate", kinds, &kind);

	if (st != KVP_OK)
		return st;
	cfg->gate = kind;
	memset(&cfg->ladder, 0, sizeof cfg->ladder);
	if ((st = kvp_args_text(args, "ladder", &text, &len)) != KVP_OK || !text)
		return st;
	if (len >= sizeof cfg->ladder_spec)
		return kvp_fail(KVP_EINVAL, "tenant: ladder=%.*s... is too long", 32, text);
	memcpy(cfg->ladder_spec, text, len);
	cfg->ladder_spec[len] = '\0';
	/* ',' separates the tenant's keys, so levels after the first come inside parentheses */
	if (len >= 2 && text[0] == '(' && text[len - 1] == ')')
		text++, len -= 2;
	st = kvp_ladder_parse(text, len, &cfg->ladder);
	if (st != KVP_OK)
		return kvp_fail_context(st, "tenant: ladder=%s", cfg->ladder_spec);
	return KVP_OK;
}

static int takes_bits(const char *name, size_t len)
{
	for (unsigned i = 0; bit_codecs[i]; i++)
		if (strlen(bit_codecs[i]) == len && !memcmp(bit_codecs[i], name, len))
			return 1;
	return 0;
}

/* Appends one stack member to out, with bits=N when it takes bits (replacing a bits= it has).
 * Returns -1 when out is too short. */
static int member_bits(const char *m, size_t len, unsigned bits, char *out, size_t cap, size_t *at,
		       unsigned *changed)
{
	const char *paren = memchr(m, '(', len);
	size_t name = paren ? (size_t)(paren - m) : len, room = cap - *at, w;
	char *o = out + *at;

	if (!takes_bits(m, name)) {
		w = (size_t)snprintf(o, room, "%.*s", (int)len, m);
	} else {
		const char *arg = paren ? paren + 1 : m + len, *end = paren ? m + len - 1 : m + len;
		w = (size_t)snprintf(o, room, "%.*s(bits=%u", (int)name, m, bits);
		while (arg < end && w < room) { /* every other argument, as written */
			const char *comma = memchr(arg, ',', (size_t)(end - arg));
			size_t n = comma ? (size_t)(comma - arg) : (size_t)(end - arg);
			if (n && strncmp(arg, "bits=", 5))
				w += (size_t)snprintf(o + w, room - w, ",%.*s", (int)n, arg);
			arg += n + 1;
		}
		if (w < room)
			w += (size_t)snprintf(o + w, room - w, ")");
		*changed += 1;
	}
	if (w >= room)
		return -1;
	*at += w;
	return 0;
}

kvp_status kvp_gate_spec_bits(const char *spec, unsigned bits, char *out, size_t cap, unsigned *changed)
{
	size_t at = 0, len = strlen(spec), from = 0;

	*changed = 0;
	out[0] = '\0';
	while (from <= len) {
		const char *bar = memchr(spec + from, '|', len - from);
		size_t end = bar ? (size_t)(bar - spec) : len;
		if (from && at + 1 < cap)
			out[at++] = '|', out[at] = '\0';
		if (member_bits(spec + from, end - from, bits, out, cap, &at, changed))
			return kvp_fail(KVP_EINVAL, "tenant: %s with bits=%u is longer than %zu characters", spec, bits,
					cap - 1);
		from = end + 1;
	}
	return KVP_OK;
}

static int policy_is(const struct kvp_tenant_config *cfg, const char *name)
{
	size_t n = strlen(name);
	return !strncmp(cfg->policy_spec, name, n) && (cfg->policy_spec[n] == '(' || !cfg->policy_spec[n]);
}

/* A ladder's bits must reach a codec: at least one side has a member that takes bits=. */
static kvp_status ladder_check(const struct kvp_tenant_config *cfg)
{
	char spec[KVP_CODEC_SPEC_MAX];
	unsigned k = 0, v = 0;
	kvp_status st = KVP_OK;

	if (cfg->gate == KVP_GATE_OFF)
		return kvp_fail(KVP_EINVAL, "tenant: ladder=%s needs gate=mrl or gate=entropy to pick the levels",
				cfg->ladder_spec);
	if (cfg->k_spec[0])
		st = kvp_gate_spec_bits(cfg->k_spec, 1, spec, sizeof spec, &k);
	if (st == KVP_OK && cfg->v_spec[0])
		st = kvp_gate_spec_bits(cfg->v_spec, 1, spec, sizeof spec, &v);
	if (st == KVP_OK && !k && !v)
		st = kvp_fail(KVP_EINVAL, "tenant: ladder=%s picks codec bits, but neither k=%s nor v=%s takes "
			      "bits= (turboquant, kivi)", cfg->ladder_spec, cfg->k_spec[0] ? cfg->k_spec : "(none)",
			      cfg->v_spec[0] ? cfg->v_spec : "(none)");
	return st;
}

kvp_status kvp_gate_check(const struct kvp_tenant_config *cfg)
{
	static const char *const kinds[] = { "off", "mrl", "entropy" };

	if (cfg->gate != KVP_GATE_OFF && !cfg->policy_spec[0])
		return kvp_fail(KVP_EINVAL, "tenant: gate=%s moves token budget between heads, but there is no "
				"policy= to keep budgets", kinds[cfg->gate]);
	if (cfg->gate != KVP_GATE_OFF && policy_is(cfg, "streaming"))
		return kvp_fail(KVP_EINVAL, "tenant: gate=%s with policy=%s: StreamingLLM keeps only protected "
				"tokens, so there is no budget to move", kinds[cfg->gate], cfg->policy_spec);
	if (cfg->gate == KVP_GATE_MRL && !policy_is(cfg, "triattention"))
		return kvp_fail(KVP_EINVAL, "tenant: gate=mrl reads TriAttention's statistics, but policy=%s",
				cfg->policy_spec);
	return cfg->ladder.n ? ladder_check(cfg) : KVP_OK;
}

/* ---- per-sequence state ---- */

static size_t gate_bytes(const struct kvp_seq *s)
{
	return (size_t)s->shape.n_layers * s->shape.n_kv_heads * sizeof *s->gate;
}

static void refresh(struct kvp_seq *s);

kvp_status kvp_gate_open(struct kvp_tenant *t, struct kvp_seq *s)
{
	s->gate = NULL;
	if (t->cfg.gate == KVP_GATE_OFF)
		return KVP_OK;
	if (!(s->gate = kvp_alloc(t, gate_bytes(s), KVP_BYTES_META, 0)))
		return kvp_fail_context(KVP_ENOMEM, "kvp_seq_open: gating state");
	memset(s->gate, 0, gate_bytes(s));
	refresh(s); /* a statistics file gives every level now */
	return KVP_OK;
}

kvp_status kvp_gate_fork(struct kvp_tenant *t, const struct kvp_seq *src, struct kvp_seq *s)
{
	s->gate = NULL;
	if (!src->gate)
		return KVP_OK;
	if (!(s->gate = kvp_alloc(t, gate_bytes(s), KVP_BYTES_META, 0)))
		return kvp_fail_context(KVP_ENOMEM, "kvp_seq_fork: gating state");
	memcpy(s->gate, src->gate, gate_bytes(s));
	return KVP_OK;
}

void kvp_gate_close(struct kvp_tenant *t, struct kvp_seq *s)
{
	if (s->gate)
		kvp_free(t, s->gate, gate_bytes(s), KVP_BYTES_META, 0);
	s->gate = NULL;
}

int kvp_gate_observes(const struct kvp_seq *s)
{
	return s->gate && s->tenant->cfg.gate == KVP_GATE_ENTROPY;
}

void kvp_gate_observe(struct kvp_seq *s, uint32_t layer, uint32_t kv_head, uint32_t n, const float *weights)
{
	struct kvp_head_gate *g = &s->gate[(size_t)layer * s->shape.n_kv_heads + kv_head];
	double sum = 0;

	if (n == 0)
		return; /* nothing attended: no evidence either way */
	for (uint32_t h = 0; h < s->group; h++)
		sum += kvp_gate_entropy_coherence(n, weights + (size_t)h * n);
	g->entropy_sum += sum / s->group;
	g->observed++;
}

/* ---- levels ---- */

static double measured(const struct kvp_seq *s, uint32_t layer, uint32_t kv_head, const struct kvp_head_gate *g)
{
	double c = 0;

	if (s->tenant->cfg.gate == KVP_GATE_ENTROPY)
		return g->observed ? g->entropy_sum / (double)g->observed : 0.0;
	if (kvp_tria_coherence(s->policy, layer, kv_head, &c) != KVP_OK)
		return 0.0; /* checked at tenant open: the policy is triattention */
	return c;
}

static double level_aggressiveness(const struct kvp_ladder *l, uint32_t level)
{
	return l->n > 1 ? (double)level / (double)(l->n - 1) : 0.0;
}

/* Coherence of every stream, and the level and aggressiveness of those the host does not hold. */
static void refresh(struct kvp_seq *s)
{
	const struct kvp_ladder *l = &s->tenant->cfg.ladder;

	for (uint32_t layer = 0; layer < s->shape.n_layers; layer++)
		for (uint32_t h = 0; h < s->shape.n_kv_heads; h++) {
			struct kvp_head_gate *g = &s->gate[(size_t)layer * s->shape.n_kv_heads + h];
			g->coherence = measured(s, layer, h, g);
			if (g->overridden)
				continue;
			g->level = l->n ? kvp_ladder_level(l, g->coherence) : 0;
			g->aggressiveness = l->n ? level_aggressiveness(l, g->level) : g->coherence;
		}
}

static double share(const struct kvp_seq *s, const struct kvp_head_gate *g)
{
	const struct kvp_ladder *l = &s->tenant->cfg.ladder;
	return l->n ? l->keep[g->level] : 1.0 - GATE_STRENGTH * g->aggressiveness;
}

uint32_t kvp_gate_level(const struct kvp_seq *s, const struct kvp_stream *st)
{
	return s->gate ? s->gate[st - s->streams].level : 0;
}

/* ---- budgets ---- */

/* The tokens a round keeps whatever it scores: the floor of every unit's budget. */
static uint64_t protected_tokens(const struct kvp_seq *s, uint32_t budget)
{
	const struct kvp_policy_plan *plan = &s->policy->plan;
	uint32_t sinks = s->tenant->cfg.sinks > plan->sinks ? s->tenant->cfg.sinks : plan->sinks;
	uint32_t window = kvp_policy_window(s->policy, s->t0);
	uint64_t held;

	window = s->tenant->cfg.window > window ? s->tenant->cfg.window : window;
	held = (uint64_t)sinks + window;
	return held < 1 ? 1 : held > budget ? budget : held;
}

/*
 * Units that select on their own: streams with per_layer_head, KV heads with per_head (over every layer),
 * layers with union (over every KV head). unit_of maps a stream index to its unit.
 */
static uint32_t units(const struct kvp_seq *s, uint32_t stream)
{
	const struct kvp_policy_plan *plan = &s->policy->plan;
	uint32_t H = s->shape.n_kv_heads;

	if (plan->per_head)
		return stream % H;
	if (plan->union_select)
		return stream / H;
	return stream;
}

static uint32_t unit_count(const struct kvp_seq *s)
{
	const struct kvp_policy_plan *plan = &s->policy->plan;
	return plan->per_head ? s->shape.n_kv_heads : plan->union_select ? s->shape.n_layers :
	       s->shape.n_layers * s->shape.n_kv_heads;
}

/*
 * kvp_gate_distribute splits in proportion to 1 - strength x c; shares in (0, 1] are that with
 * strength = 1 - the smallest share and c = (1 - share) / strength, so any shares can be given to it.
 */
static void shares_as_coherence(uint32_t n, double *v, double *strength)
{
	double least = 1.0;

	for (uint32_t i = 0; i < n; i++)
		least = v[i] < least ? v[i] : least;
	*strength = 1.0 - least;
	for (uint32_t i = 0; i < n; i++) {
		double c = *strength > 0 ? (1.0 - v[i]) / *strength : 0.0;
		v[i] = c < 0 ? 0 : c > 1 ? 1 : c;
	}
}

kvp_status kvp_gate_budgets(struct kvp_seq *s, uint32_t *budgets)
{
	uint32_t n = unit_count(s), streams = s->shape.n_layers * s->shape.n_kv_heads;
	uint32_t budget = kvp_policy_budget(s->policy, s->t0), members = streams / n;
	double *c = calloc(n, sizeof *c), strength;
	uint64_t *out = calloc(n, sizeof *out);
	kvp_status st;

	if (!c || !out) {
		free(c), free(out);
		return kvp_fail(KVP_ENOMEM, "kvp_seq_step: out of memory for gating %u heads", n);
	}
	refresh(s);
	for (uint32_t i = 0; i < streams; i++)
		c[units(s, i)] += share(s, &s->gate[i]) / members;
	shares_as_coherence(n, c, &strength);
	st = kvp_gate_distribute(n, c, strength, (uint64_t)budget * n, protected_tokens(s, budget), out);
	for (uint32_t i = 0; st == KVP_OK && i < streams; i++)
		s->gate[i].budget = budgets[i] = (uint32_t)out[units(s, i)];
	free(c), free(out);
	return st == KVP_OK ? KVP_OK : kvp_fail_context(st, "kvp_seq_step: gating");
}

/* ---- the public calls ---- */

static kvp_status head_check(const struct kvp_seq *s, uint32_t layer, uint32_t kv_head, const void *level,
			     uint32_t size, const char *call)
{
	if (!level)
		return kvp_fail(KVP_EINVAL, "%s: NULL level", call);
	if (size < offsetof(kvp_level, aggressiveness) + sizeof(double))
		return kvp_fail(KVP_EABI, "%s: level->size %u is too small; set it to sizeof(kvp_level)", call, size);
	if (!s->gate)
		return kvp_fail(KVP_EINVAL, "%s: the tenant has gate=off, so heads have no levels", call);
	if (layer >= s->shape.n_layers || kv_head >= s->shape.n_kv_heads)
		return kvp_fail(KVP_EINVAL, "%s: layer %u, KV head %u outside %u x %u", call, layer, kv_head,
				s->shape.n_layers, s->shape.n_kv_heads);
	return KVP_OK;
}

kvp_status kvp_seq_levels_entered(struct kvp_seq *s, uint32_t layer, uint32_t kv_head, kvp_level *out)
{
	const struct kvp_ladder *l;
	const struct kvp_head_gate *g;
	kvp_level full = { .size = sizeof full };
	kvp_status st = head_check(s, layer, kv_head, out, out ? out->size : 0, "kvp_seq_levels");

	if (st != KVP_OK)
		return st;
	refresh(s);
	l = &s->tenant->cfg.ladder;
	g = &s->gate[(size_t)layer * s->shape.n_kv_heads + kv_head];
	full.overridden = (uint32_t)g->overridden;
	full.level = g->level;
	full.n_levels = l->n ? l->n : 1;
	full.aggressiveness = g->aggressiveness;
	full.coherence = g->coherence;
	full.bits = l->n ? l->bits[g->level] : 0;
	full.budget = g->budget;
	full.keep = l->n ? l->keep[g->level] : 1.0;
	memcpy((char *)out + sizeof out->size, (const char *)&full + sizeof full.size,
	       (out->size < sizeof full ? out->size : sizeof full) - sizeof out->size);
	return KVP_OK;
}

kvp_status kvp_seq_set_level_entered(struct kvp_seq *s, uint32_t layer, uint32_t kv_head, const kvp_level *in)
{
	const struct kvp_ladder *l;
	struct kvp_head_gate *g;
	kvp_status st = head_check(s, layer, kv_head, in, in ? in->size : 0, "kvp_seq_set_level");

	if (st != KVP_OK)
		return st;
	l = &s->tenant->cfg.ladder;
	g = &s->gate[(size_t)layer * s->shape.n_kv_heads + kv_head];
	if (!in->overridden) {
		g->overridden = 0;
		refresh(s);
		return KVP_OK;
	}
	if (l->n && in->level >= l->n)
		return kvp_fail(KVP_EINVAL, "kvp_seq_set_level: level %u of a %u-level ladder", in->level, l->n);
	if (!l->n && !(in->aggressiveness >= 0 && in->aggressiveness <= 1))
		return kvp_fail(KVP_EINVAL, "kvp_seq_set_level: aggressiveness %g is outside [0, 1]", in->aggressiveness);
	g->overridden = 1;
	g->level = l->n ? in->level : 0;
	g->aggressiveness = l->n ? level_aggressiveness(l, in->level) : in->aggressiveness;
	return KVP_OK;
}
