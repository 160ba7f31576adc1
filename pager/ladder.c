/*
 * Ladders of codec bits (tenant ladder=(B:K,...), with gate=mrl|entropy): coherence gating gives every
 * (layer, KV head) an aggressiveness a in [0, 1] (gate.c); with a ladder of n levels, from gentle to
 * aggressive, the head sits at level round(a (n - 1)). The level's K is the head's budget share (gate.c
 * splits the layer's budget in proportion to it) and its B the bits of the head's cold blocks encoded from
 * then on: level l's codecs are the k= and v= specs with bits=B on every member that takes bits (cold.c
 * opens one pair per level). A block records its level, so it is always read with the codecs that encoded
 * it, and compaction packs survivors only among blocks of one level (evict.c).
 */
#include <stdio.h>
#include <string.h>

#include "pager.h"

/* Codecs that take bits=: a ladder's bits go to these members of a k= or v= stack. */
static const char *const bit_codecs[] = { "turboquant", "kivi", NULL };

kvp_status kvp_ladder_config(struct kvp_args *args, struct kvp_tenant_config *cfg)
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

kvp_status kvp_ladder_spec_bits(const char *spec, unsigned bits, char *out, size_t cap, unsigned *changed)
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

/* A ladder's bits must reach a codec: at least one side has a member that takes bits=. */
kvp_status kvp_ladder_check(const struct kvp_tenant_config *cfg)
{
	char spec[KVP_CODEC_SPEC_MAX];
	unsigned k = 0, v = 0;
	kvp_status st = KVP_OK;

	if (!cfg->ladder.n)
		return KVP_OK;
	if (cfg->gate == KVP_GATE_OFF)
		return kvp_fail(KVP_EINVAL, "tenant: ladder=%s needs gate=mrl or gate=entropy to pick the levels",
				cfg->ladder_spec);
	if (cfg->k_spec[0])
		st = kvp_ladder_spec_bits(cfg->k_spec, 1, spec, sizeof spec, &k);
	if (st == KVP_OK && cfg->v_spec[0])
		st = kvp_ladder_spec_bits(cfg->v_spec, 1, spec, sizeof spec, &v);
	if (st == KVP_OK && !k && !v)
		st = kvp_fail(KVP_EINVAL, "tenant: ladder=%s picks codec bits, but neither k=%s nor v=%s takes "
			      "bits= (turboquant, kivi)", cfg->ladder_spec, cfg->k_spec[0] ? cfg->k_spec : "(none)",
			      cfg->v_spec[0] ? cfg->v_spec : "(none)");
	return st;
}

uint32_t kvp_ladder_head_level(const struct kvp_seq *s, uint32_t layer, uint32_t kv_head)
{
	const struct kvp_ladder *l = &s->tenant->cfg.ladder;
	size_t i = (size_t)layer * s->shape.n_kv_heads + kv_head;
	double a;

	if (!l->n || !s->gating)
		return 0;
	a = s->gating->override[i] >= 0 ? s->gating->override[i] : s->gating->coherence[i];
	return kvp_ladder_level(l, a);
}

uint32_t kvp_ladder_stream_level(const struct kvp_seq *s, const struct kvp_stream *st)
{
	size_t i = (size_t)(st - s->streams);

	return kvp_ladder_head_level(s, (uint32_t)(i / s->shape.n_kv_heads), (uint32_t)(i % s->shape.n_kv_heads));
}
