/*
 * Ladders of codec bits (tenant ladder=(B:K,...), with gate=mrl|entropy) and the tenant's gating keys.
 * Gating gives every (layer, KV head) an aggressiveness a in [0, 1] (gating.c); with a ladder of n levels,
 * from gentle to aggressive, the head sits at level round(a (n - 1)). The level's K is the head's budget
 * share and its B the bits of the head's cold blocks encoded from then on: level l's codecs are the k= and
 * v= specs opened at width B, which every codec that takes bits receives through its with_bits (the pager's
 * cold tier opens one pair per level). A block records its level, so it is always read with the codecs
 * that encoded it, and compaction packs survivors only among blocks of one level (pager/evict.c).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gating/gating.h"

static kvp_status ladder_config(struct kvp_args *args, struct kvp_gating_config *cfg)
{
	const char *text = NULL;
	unsigned len = 0;
	kvp_status st;

	memset(&cfg->ladder, 0, sizeof cfg->ladder);
	cfg->ladder_spec[0] = '\0';
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

kvp_status kvp_gating_config(struct kvp_args *args, struct kvp_gating_config *cfg)
{
	static const char *const gates[] = { "off", "mrl", "entropy", NULL };
	unsigned gate = KVP_GATE_OFF;
	kvp_status st = kvp_args_choice(args, "gate", gates, &gate);

	cfg->gate = (enum kvp_gate)gate;
	return st == KVP_OK ? ladder_config(args, cfg) : st;
}

/* 1 when the ladder gives its levels different budget shares (some keep differs from the first). */
static int ladder_moves_budget(const struct kvp_ladder *l)
{
	for (unsigned i = 1; i < l->n; i++)
		if (l->keep[i] != l->keep[0])
			return 1;
	return 0;
}

static const char *gate_name(const struct kvp_gating_config *cfg)
{
	return cfg->gate == KVP_GATE_MRL ? "mrl" : "entropy";
}

/*
 * What gating can change under the policy's rounds. A policy that keeps the newest tokens protects its whole
 * budget (sinks + window) in every stream: no head can give tokens away. Rounds whose verdict covers
 * several streams keep the policy's budget, so per-head budgets change nothing there: only a ladder's bits
 * can, and then the ladder must not promise budget shares (its keeps all equal).
 */
static kvp_status gate_fits_rounds(const struct kvp_gating_config *cfg, const char *policy,
				   const struct kvp_policy_spec *spec)
{
	enum kvp_round_scope scope;
	kvp_status st;

	if (kvp_policy_spec_ops(spec)->keeps_newest)
		return kvp_fail(KVP_EINVAL, "tenant: gate=%s with policy=%s: this policy keeps its whole budget (sinks + "
				"window, the newest tokens) in every stream, so there is no budget to move between heads; "
				"gate= needs a policy that scores tokens", gate_name(cfg), policy);
	if ((st = kvp_policy_spec_scope(spec, &scope)) != KVP_OK)
		return kvp_fail_context(st, "tenant: policy=%s", policy);
	if (scope == KVP_ROUND_STREAM || (cfg->ladder.n > 1 && !ladder_moves_budget(&cfg->ladder)))
		return KVP_OK;
	if (cfg->ladder.n > 1)
		return kvp_fail(KVP_EINVAL, "tenant: gate=%s,ladder=%s with policy=%s: its rounds keep one set of tokens "
				"for %s, so the ladder's budget shares (keeps) cannot apply; give every level the same "
				"keep (bits alone) or rounds that decide each stream (select=per_layer_head)",
				gate_name(cfg), cfg->ladder_spec, policy,
				scope == KVP_ROUND_HEAD ? "every layer of a KV head" : "every KV head of a layer");
	return kvp_fail(KVP_EINVAL, "tenant: gate=%s with policy=%s: its rounds keep one set of tokens for %s, so "
			"per-head budgets would change nothing; use rounds that decide each stream "
			"(select=per_layer_head), or a ladder= of bits alone (every keep the same)", gate_name(cfg),
			policy, scope == KVP_ROUND_HEAD ? "every layer of a KV head" : "every KV head of a layer");
}

/* gate= moves a policy's budget; gate=mrl reads the policy's coherence op. */
static kvp_status gate_check(const struct kvp_gating_config *cfg, const char *policy)
{
	struct kvp_policy_spec *spec;
	char known[128];
	kvp_status st;

	if (cfg->gate == KVP_GATE_OFF)
		return KVP_OK;
	if (!policy[0])
		return kvp_fail(KVP_EINVAL, "tenant: gate=%s moves a policy's budget between heads, and no policy= "
				"is set", gate_name(cfg));
	if ((st = kvp_policy_spec_parse(policy, strlen(policy), &spec)) != KVP_OK)
		return kvp_fail_context(st, "tenant: policy=%s", policy);
	if (cfg->gate == KVP_GATE_MRL && !kvp_policy_spec_ops(spec)->coherence) {
		kvp_policy_names(1, known, sizeof known);
		st = kvp_fail(KVP_EINVAL, "tenant: gate=mrl reads the coherence signal of a policy that offers one "
			      "(%s); policy=%s has none (gate=entropy works with any policy)", known, policy);
	} else {
		st = gate_fits_rounds(cfg, policy, spec);
	}
	kvp_policy_spec_free(spec);
	return st;
}

/* How many members of a k= or v= spec ("" when unset) take bits; 0 for an unparsable one, whose fault
 * the cold tier's check reports. */
static unsigned bits_members(const char *text)
{
	struct kvp_codec_spec *spec;
	unsigned n;

	if (!text[0] || kvp_codec_spec_parse(text, strlen(text), &spec) != KVP_OK)
		return 0;
	n = kvp_codec_spec_bits_members(spec);
	kvp_codec_spec_free(spec);
	return n;
}

/* A ladder's bits must reach a codec: at least one side has a member that takes bits. */
static kvp_status ladder_check(const struct kvp_gating_config *cfg, const char *k, const char *v)
{
	char known[128];

	if (!cfg->ladder.n)
		return KVP_OK;
	if (cfg->gate == KVP_GATE_OFF)
		return kvp_fail(KVP_EINVAL, "tenant: ladder=%s needs gate=mrl or gate=entropy to pick the levels",
				cfg->ladder_spec);
	if (cfg->ladder.n == 1)
		return kvp_fail(KVP_EINVAL, "tenant: ladder=%s has one level, so every head sits on it: that is k=/v= "
				"with bits=%u, not gating; give two levels or more", cfg->ladder_spec, cfg->ladder.bits[0]);
	if (bits_members(k) || bits_members(v))
		return KVP_OK;
	kvp_codec_names(KVP_CODEC_BITS, known, sizeof known);
	return kvp_fail(KVP_EINVAL, "tenant: ladder=%s picks codec bits, but neither k=%s nor v=%s takes bits= (%s)",
			cfg->ladder_spec, k[0] ? k : "(none)", v[0] ? v : "(none)", known);
}

kvp_status kvp_gating_check(const struct kvp_gating_config *cfg, const char *policy, const char *k, const char *v)
{
	kvp_status st = gate_check(cfg, policy);

	return st == KVP_OK ? ladder_check(cfg, k, v) : st;
}

unsigned kvp_gating_levels(const struct kvp_gating_config *cfg)
{
	return cfg->ladder.n ? cfg->ladder.n : 1;
}

unsigned kvp_gating_level_bits(const struct kvp_gating_config *cfg, unsigned level)
{
	return cfg->ladder.n && level < cfg->ladder.n ? cfg->ladder.bits[level] : 0;
}

kvp_status kvp_gating_level_fail(const struct kvp_gating_config *cfg, unsigned level, kvp_status st)
{
	if (!cfg->ladder.n || level >= cfg->ladder.n)
		return st;
	return kvp_fail_context(st, "tenant: ladder=%s, level %u (%u:%g)", cfg->ladder_spec, level + 1,
				cfg->ladder.bits[level], cfg->ladder.keep[level]);
}

kvp_status kvp_ladder_spec_bits(const char *text, unsigned bits, char *out, size_t cap, unsigned *changed)
{
	struct kvp_codec_spec *spec;
	kvp_status st = kvp_codec_spec_parse(text, strlen(text), &spec);

	*changed = 0;
	if (st != KVP_OK)
		return st;
	st = kvp_codec_spec_write(spec, bits, out, cap);
	if (st == KVP_OK)
		*changed = kvp_codec_spec_bits_members(spec);
	else
		kvp_fail(st, "tenant: %s with bits=%u is longer than %zu characters", text, bits, cap ? cap - 1 : 0);
	kvp_codec_spec_free(spec);
	return st;
}

/* ---- the ladder's arithmetic ---- */

/* One "bits:keep" item. */
static kvp_status parse_level(const char *s, unsigned len, unsigned *bits, double *keep)
{
	char buf[64], *end;
	const char *colon = memchr(s, ':', len);
	unsigned long b;

	if (!colon || len >= sizeof buf)
		return kvp_fail(KVP_EINVAL, "ladder: '%.*s' is not bits:keep", (int)len, s);
	memcpy(buf, s, len);
	buf[len] = '\0';
	b = strtoul(buf, &end, 10);
	if (end != buf + (colon - s) || b < 1 || b > 16)
		return kvp_fail(KVP_EINVAL, "ladder: bits in '%.*s' must be a whole number in 1..16", (int)len, s);
	*keep = strtod(end + 1, &end);
	if (*end != '\0' || !(*keep > 0 && *keep <= 1))
		return kvp_fail(KVP_EINVAL, "ladder: keep in '%.*s' must be a number in (0, 1]", (int)len, s);
	*bits = (unsigned)b;
	return KVP_OK;
}

kvp_status kvp_ladder_parse(const char *text, size_t len, struct kvp_ladder *out)
{
	struct kvp_ladder l = { 0 };
	size_t at = 0;

	if (!text || len == 0)
		return kvp_fail(KVP_EINVAL, "ladder: empty (example: 4:1.0,3:0.5,2:0.25)");
	while (at <= len) {
		const char *comma = memchr(text + at, ',', len - at);
		size_t end = comma ? (size_t)(comma - text) : len;
		kvp_status st;
		if (l.n == KVP_LADDER_MAX)
			return kvp_fail(KVP_EINVAL, "ladder: more than %d levels", KVP_LADDER_MAX);
		st = parse_level(text + at, (unsigned)(end - at), &l.bits[l.n], &l.keep[l.n]);
		if (st != KVP_OK)
			return st;
		if (l.n && (l.keep[l.n] > l.keep[l.n - 1] || l.bits[l.n] > l.bits[l.n - 1]))
			return kvp_fail(KVP_EINVAL, "ladder: level %u (%u:%g) is gentler than the one before; list "
					"levels from gentle to aggressive", l.n + 1, l.bits[l.n], l.keep[l.n]);
		l.n++;
		at = end + 1;
	}
	*out = l;
	return KVP_OK;
}

unsigned kvp_ladder_level(const struct kvp_ladder *l, double coherence)
{
	double c = coherence < 0 ? 0 : coherence > 1 ? 1 : coherence;
	return l->n ? (unsigned)lround(c * (l->n - 1)) : 0;
}

unsigned kvp_ladder_rank_level(unsigned levels, uint32_t below, uint32_t equal, uint32_t total)
{
	/* the middle of the tied run, as a share of all heads, picks one of `levels` equal shares; a share
	 * exactly on a boundary takes the gentler level */
	double mid = ((double)below + equal / 2.0) / total * levels;
	double level = ceil(mid) - 1;

	if (!levels || !total || level < 0)
		return 0;
	return level > levels - 1 ? levels - 1 : (unsigned)level;
}
