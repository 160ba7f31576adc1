/*
 * The codec registry: the one table of codecs, the spec parser that builds stacks from it, and the public
 * kvp_codec_* calls for codecs used on their own.
 *
 * A spec is one or more elements joined by '|' at parenthesis depth 0, each `name` or `name(args)`:
 *   "fp16", "turboquant(bits=3,qjl=1)", "spark(keep=0.5)|turboquant(bits=3)"
 * Every element but the last must be a KVP_CODEC_STACKS codec. The left codec decides the dimension the
 * next one sees (inner_dim), and the codecs are opened right to left: each stacking codec receives its inner
 * codec already opened (open_from).
 *
 * What a codec can do is in its ops row (flags, inner_dim, with_bits), and the messages that list codecs
 * are written from this table: adding a codec is its file and one line here.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codecs/codec.h"

static const struct kvp_codec_ops *const codecs[] = {
	&kvp_codec_fp32, &kvp_codec_fp16, &kvp_codec_turboquant, &kvp_codec_kivi, &kvp_codec_spark,
};

#define STACK_MAX 4

struct element {
	const char *text; /* the whole element, for messages */
	unsigned len;
	const struct kvp_codec_ops *ops;
	struct kvp_args args;
	unsigned dim;
};

struct kvp_codec_spec {
	unsigned n;
	struct element el[STACK_MAX]; /* their text and arguments point into text */
	size_t len;
	char text[];
};

static const struct kvp_codec_ops *lookup(const char *name, unsigned nlen)
{
	for (size_t i = 0; i < sizeof codecs / sizeof codecs[0]; i++)
		if (kvp_name_is(name, nlen, codecs[i]->name))
			return codecs[i];
	return NULL;
}

void kvp_codec_names(unsigned flags, char *out, size_t cap)
{
	size_t at = 0;

	out[0] = '\0';
	for (size_t i = 0; i < sizeof codecs / sizeof codecs[0] && at < cap; i++)
		if ((codecs[i]->flags & flags) == flags)
			at += (size_t)snprintf(out + at, cap - at, "%s%s", at ? ", " : "", codecs[i]->name);
}

static void trim(const char **s, unsigned *len)
{
	while (*len && (**s == ' ' || **s == '\t' || **s == '\n' || **s == '\r')) {
		(*s)++;
		(*len)--;
	}
	while (*len && ((*s)[*len - 1] == ' ' || (*s)[*len - 1] == '\t' || (*s)[*len - 1] == '\n' ||
			(*s)[*len - 1] == '\r'))
		(*len)--;
}

/* Splits spec on '|' at depth 0 after checking that its parentheses balance. */
static kvp_status split(const char *spec, unsigned len, struct element *el, unsigned *n)
{
	unsigned start = 0, depth = 0;

	*n = 0;
	for (unsigned i = 0; i <= len; i++) {
		if (i < len && spec[i] == '(') {
			depth++;
		} else if (i < len && spec[i] == ')') {
			if (depth == 0)
				return kvp_fail(KVP_EINVAL, "codec: unbalanced ')' in '%.*s'", (int)len, spec);
			depth--;
		} else if (i == len || (spec[i] == '|' && depth == 0)) {
			if (i == len && depth != 0)
				return kvp_fail(KVP_EINVAL, "codec: unclosed '(' in '%.*s'", (int)len, spec);
			if (*n == STACK_MAX)
				return kvp_fail(KVP_EINVAL, "codec: more than %d codecs stacked in '%.*s'", STACK_MAX,
						(int)len, spec);
			el[*n].text = spec + start;
			el[*n].len = i - start;
			trim(&el[*n].text, &el[*n].len);
			if (el[*n].len == 0)
				return kvp_fail(KVP_EINVAL, "codec: empty codec name in '%.*s'", (int)len, spec);
			(*n)++;
			start = i + 1;
		}
	}
	return KVP_OK;
}

/* Looks up the element's codec and splits its arguments (they point into the spec). */
static kvp_status parse_element(struct element *e)
{
	const char *name, *inner;
	unsigned nlen, ilen;
	char known[128];
	kvp_status st = kvp_call_split(e->text, e->len, &name, &nlen, &inner, &ilen);

	if (st != KVP_OK)
		return st;
	e->ops = lookup(name, nlen);
	if (!e->ops) {
		kvp_codec_names(0, known, sizeof known);
		return kvp_fail(KVP_EINVAL, "codec: unknown codec '%.*s' (known: %s)", (int)nlen, name, known);
	}
	return kvp_args_parse(&e->args, e->ops->name, inner, ilen);
}

/* The stack's elements and their arguments; only the last may be other than a stacking codec. */
static kvp_status parse_elements(const char *spec, unsigned len, struct element *el, unsigned *n)
{
	char stacking[128];
	kvp_status st = split(spec, len, el, n);

	for (unsigned i = 0; st == KVP_OK && i < *n; i++)
		st = parse_element(&el[i]);
	for (unsigned i = 0; st == KVP_OK && i + 1 < *n; i++)
		if (!(el[i].ops->flags & KVP_CODEC_STACKS) || !el[i].ops->inner_dim) {
			kvp_codec_names(KVP_CODEC_STACKS, stacking, sizeof stacking);
			return kvp_fail(KVP_EINVAL, "codec: '%.*s' cannot stand left of '|' in '%.*s' (codecs that "
					"stack: %s)", (int)el[i].len, el[i].text, (int)len, spec, stacking);
		}
	return st;
}

/* The struct itself comes from mem, like everything the codec keeps. */
static void codec_release(struct kvp_codec *c)
{
	struct kvp_allocator mem = c->mem;

	kvp_release(&mem, c, sizeof *c);
}

static kvp_status open_one(struct element *e, unsigned role, const struct kvp_allocator *mem,
			   struct kvp_codec *inner, struct kvp_codec **out)
{
	struct kvp_codec *c = kvp_allocate(mem, sizeof *c, e->ops->name);
	kvp_status st;

	if (!c)
		return KVP_ENOMEM;
	c->mem = *mem;
	c->ops = e->ops;
	c->dim = e->dim;
	c->flags = e->ops->flags;
	c->role = role;
	c->group = 1;
	c->acc_dim = e->dim;
	st = e->ops->open(c, &e->args, e->dim, inner);
	if (st != KVP_OK) {
		codec_release(c);
		return st;
	}
	c->inner = inner;
	st = kvp_args_finish(&e->args);
	if (st == KVP_OK && c->scratch_bytes &&
	    !(c->scratch = kvp_allocate(mem, c->scratch_bytes, "codec: its scratch")))
		st = KVP_ENOMEM;
	if (st != KVP_OK) {
		c->inner = NULL; /* the caller still owns inner */
		if (c->ops->close)
			c->ops->close(c);
		codec_release(c);
		return st;
	}
	*out = c;
	return KVP_OK;
}

/*
 * Opens el[i..n) for dim channels: a stacking codec's inner codec first, at the width its inner_dim gives
 * with nothing opened; when inner_dim, shown that inner codec, names another width (a mode chosen by
 * what the inner codec can do), the inner codec is opened again at that one. Reopening reads the same
 * arguments again; the caller names the spec in the message.
 */
static kvp_status open_from(struct element *el, unsigned i, unsigned n, unsigned dim, unsigned role,
			    const struct kvp_allocator *mem, struct kvp_codec **out)
{
	struct kvp_codec *inner = NULL;
	unsigned first, settled;
	kvp_status st;

	*out = NULL;
	el[i].dim = dim;
	if (i + 1 < n) {
		if ((st = el[i].ops->inner_dim(&el[i].args, dim, NULL, &first)) != KVP_OK ||
		    (st = open_from(el, i + 1, n, first, role, mem, &inner)) != KVP_OK)
			return st;
		if ((st = el[i].ops->inner_dim(&el[i].args, dim, inner, &settled)) == KVP_OK && settled != first) {
			kvp_codec_free(inner);
			inner = NULL;
			st = open_from(el, i + 1, n, settled, role, mem, &inner);
		}
		if (st != KVP_OK) {
			kvp_codec_free(inner);
			return st;
		}
	}
	if ((st = open_one(&el[i], role, mem, inner, out)) != KVP_OK)
		kvp_codec_free(inner);
	return st;
}

static kvp_status check_open(const void *spec, unsigned dim, unsigned role, const struct kvp_allocator *mem,
			     const void *out)
{
	if (!spec || !mem || !out)
		return kvp_fail(KVP_EINVAL, "codec: NULL spec, memory or result");
	if (dim == 0 || dim > KVP_CODEC_DIM_MAX)
		return kvp_fail(KVP_EINVAL, "codec: dim=%u is outside 1..%u", dim, KVP_CODEC_DIM_MAX);
	if (role != KVP_CODEC_KEYS && role != KVP_CODEC_VALUES)
		return kvp_fail(KVP_EINVAL, "codec: role %u is neither keys nor values", role);
	return KVP_OK;
}

kvp_status kvp_codec_parse_role(const char *spec, size_t len, unsigned dim, unsigned role,
				struct kvp_codec **out)
{
	return kvp_codec_parse_in(spec, len, dim, role, &kvp_heap, out);
}

kvp_status kvp_codec_parse_in(const char *spec, size_t len, unsigned dim, unsigned role,
			      const struct kvp_allocator *mem, struct kvp_codec **out)
{
	struct element el[STACK_MAX];
	unsigned n;
	kvp_status st = check_open(spec, dim, role, mem, out);

	if (st == KVP_OK && len > 65536)
		st = kvp_fail(KVP_EINVAL, "codec: spec of %zu bytes is too long", len);
	if (st == KVP_OK)
		st = parse_elements(spec, (unsigned)len, el, &n);
	if (st == KVP_OK && (st = open_from(el, 0, n, dim, role, mem, out)) != KVP_OK)
		kvp_fail_context(st, "codec '%.*s'", (int)len, spec);
	return st;
}

kvp_status kvp_codec_parse(const char *spec, size_t len, unsigned dim, struct kvp_codec **out)
{
	return kvp_codec_parse_role(spec, len, dim, KVP_CODEC_KEYS, out);
}

void kvp_codec_free(struct kvp_codec *c)
{
	while (c) {
		struct kvp_codec *inner = c->inner;
		if (c->ops->close)
			c->ops->close(c);
		if (c->own_ctx)
			kvp_release(&c->mem, c->own_ctx, c->ctx_bytes);
		kvp_release(&c->mem, c->scratch, c->scratch_bytes);
		codec_release(c);
		c = inner;
	}
}

/* ---- specs parsed once ---- */

kvp_status kvp_codec_spec_parse(const char *text, size_t len, struct kvp_codec_spec **out)
{
	struct kvp_codec_spec *spec;
	kvp_status st;

	if (!text || !out)
		return kvp_fail(KVP_EINVAL, "codec: NULL spec or result");
	*out = NULL;
	if (len > 65536)
		return kvp_fail(KVP_EINVAL, "codec: spec of %zu bytes is too long", len);
	if (!(spec = malloc(sizeof *spec + len + 1)))
		return kvp_fail(KVP_ENOMEM, "codec: out of memory for the spec '%.*s'", (int)len, text);
	memcpy(spec->text, text, len);
	spec->text[len] = '\0';
	spec->len = len;
	st = parse_elements(spec->text, (unsigned)len, spec->el, &spec->n);
	if (st != KVP_OK) {
		free(spec);
		return st;
	}
	*out = spec;
	return KVP_OK;
}

void kvp_codec_spec_free(struct kvp_codec_spec *spec)
{
	free(spec);
}

const char *kvp_codec_spec_text(const struct kvp_codec_spec *spec)
{
	return spec->text;
}

unsigned kvp_codec_spec_bits_members(const struct kvp_codec_spec *spec)
{
	unsigned n = 0;

	for (unsigned i = 0; i < spec->n; i++)
		n += (spec->el[i].ops->flags & KVP_CODEC_BITS) && spec->el[i].ops->with_bits;
	return n;
}

/* The spec's elements with bits set on those that take it; digits holds the width's text. */
static kvp_status elements_at(const struct kvp_codec_spec *spec, unsigned bits, struct element *el, char digits[12])
{
	kvp_status st = KVP_OK;

	snprintf(digits, 12, "%u", bits);
	for (unsigned i = 0; i < spec->n; i++) {
		el[i] = spec->el[i];
		if (bits && (el[i].ops->flags & KVP_CODEC_BITS) && el[i].ops->with_bits &&
		    (st = el[i].ops->with_bits(&el[i].args, digits)) != KVP_OK)
			return st;
	}
	return st;
}

kvp_status kvp_codec_spec_open(const struct kvp_codec_spec *spec, unsigned bits, unsigned dim, unsigned role,
			       const struct kvp_allocator *mem, struct kvp_codec **out)
{
	struct element el[STACK_MAX];
	char digits[12], text[512];
	kvp_status st = check_open(spec, dim, role, mem, out);

	if (st == KVP_OK)
		st = elements_at(spec, bits, el, digits);
	if (st != KVP_OK || (st = open_from(el, 0, spec->n, dim, role, mem, out)) == KVP_OK)
		return st;
	/* the message quotes the spec as this width reads it */
	if (!bits || kvp_codec_spec_write(spec, bits, text, sizeof text) != KVP_OK)
		snprintf(text, sizeof text, "%s", spec->text);
	return kvp_fail_context(st, "codec '%s'", text);
}

/* name(key=value,...) of one element as it is opened. */
static int write_element(const struct element *e, char *out, size_t cap)
{
	int w = snprintf(out, cap, "%s", e->ops->name);

	for (unsigned i = 0; i < e->args.n && w >= 0 && (size_t)w < cap; i++)
		w += snprintf(out + w, cap - (size_t)w, "%c%.*s=%.*s", i ? ',' : '(', (int)e->args.a[i].klen,
			      e->args.a[i].key, (int)e->args.a[i].vlen, e->args.a[i].val);
	if (e->args.n && w >= 0 && (size_t)w < cap)
		w += snprintf(out + w, cap - (size_t)w, ")");
	return w;
}

kvp_status kvp_codec_spec_write(const struct kvp_codec_spec *spec, unsigned bits, char *out, size_t cap)
{
	struct element el[STACK_MAX];
	char digits[12];
	size_t at = 0;
	kvp_status st = elements_at(spec, bits, el, digits);

	for (unsigned i = 0; st == KVP_OK && i < spec->n && at < cap; i++) {
		int w = snprintf(out + at, cap - at, "%s", i ? "|" : "");
		if (w >= 0 && (size_t)w < cap - at) {
			if (bits && (el[i].ops->flags & KVP_CODEC_BITS))
				w += write_element(&el[i], out + at + w, cap - at - (size_t)w);
			else
				w += snprintf(out + at + w, cap - at - (size_t)w, "%.*s", (int)el[i].len, el[i].text);
		}
		at += w < 0 ? cap : (size_t)w;
	}
	/* no message: callers write this text while reporting another fault */
	return st == KVP_OK && at >= cap ? KVP_EINVAL : st;
}

/* ---- Codecs on their own: the public calls keep one context, fitted on the first encode. ---- */

KVP_API kvp_status kvp_codec_open(const char *spec, uint32_t dim, kvp_codec **out)
{
	struct kvp_codec *c;
	kvp_status st;

	if (!spec || !out)
		return kvp_fail(KVP_EINVAL, "kvp_codec_open: NULL spec or result");
	st = kvp_codec_parse(spec, strlen(spec), dim, &c);
	if (st != KVP_OK)
		return st;
	if (c->ctx_bytes) {
		c->own_ctx = kvp_allocate(&c->mem, c->ctx_bytes, "kvp_codec_open: the codec's context");
		if (!c->own_ctx) {
			kvp_codec_free(c);
			return KVP_ENOMEM;
		}
	}
	*out = c;
	return KVP_OK;
}

KVP_API uint32_t kvp_codec_group(const kvp_codec *c)
{
	return c ? c->group : 0;
}

/* The bytes of n tokens rounded up to whole groups, counted in 64 bits: the rounding of n near 2^32
 * must not wrap to 0. Every codec's bytes are a whole number of groups' bytes. UINT64_MAX when the
 * bytes pass 64 bits. */
static uint64_t group_bytes(const struct kvp_codec *c, uint32_t n)
{
	uint64_t groups = ((uint64_t)n + c->group - 1) / c->group, one = c->ops->bytes(c, c->group);
	return one && groups > UINT64_MAX / one ? UINT64_MAX : groups * one;
}

/* n is rounded up to whole groups, so the result is always enough room to encode n tokens' groups;
 * SIZE_MAX (which no allocation gets) when that room does not fit size_t. */
KVP_API size_t kvp_codec_bytes(const kvp_codec *c, uint32_t n)
{
	uint64_t bytes;
	if (!c)
		return 0;
	bytes = group_bytes(c, n);
	return bytes > SIZE_MAX ? SIZE_MAX : (size_t)bytes;
}

static kvp_status check_call(const char *what, const kvp_codec *c, uint32_t n, const void *a, const void *b)
{
	if (!c)
		return kvp_fail(KVP_EINVAL, "%s: NULL codec", what);
	if (n % c->group)
		return kvp_fail(KVP_EINVAL, "%s: n=%u is not a multiple of the %s group of %u tokens", what, n,
				c->ops->name, c->group);
	if (n && (!a || !b))
		return kvp_fail(KVP_EINVAL, "%s: NULL buffer", what);
	/* only where size_t is narrower than the products (32-bit): no buffer of n tokens can exist */
	if ((uint64_t)n * c->dim > SIZE_MAX / sizeof(float) || group_bytes(c, n) > SIZE_MAX)
		return kvp_fail(KVP_EINVAL, "%s: n=%u tokens of %u floats are more than this machine can address", what,
				n, c->dim);
	return KVP_OK;
}

static kvp_status check_fitted(const char *what, const kvp_codec *c)
{
	if (c->ctx_bytes && !c->own_ctx_fitted)
		return kvp_fail(KVP_EINVAL, "%s: nothing encoded yet (%s fits its parameters on the first encode)",
				what, c->ops->name);
	return KVP_OK;
}

/* The caller's bytes are read as codes only when they are ones encode writes (a norm that is NaN would
 * make every output NaN, a SparK mask of the wrong count would place values in the wrong channels). */
static kvp_status check_bytes(const char *what, const kvp_codec *c, uint32_t n, const void *src)
{
	kvp_status st = kvp_codec_check(c, n, src);

	return st == KVP_OK ? st : kvp_fail_context(st, "%s", what);
}

/* The n tokens' codes and the call's floats (after check_call: their sizes fit size_t) share no byte. */
static kvp_status check_apart(const char *what, const kvp_codec *c, uint32_t n, const void *codes, const float *x,
			      size_t floats)
{
	if (kvp_overlap(codes, (size_t)group_bytes(c, n), x, sizeof *x * floats))
		return kvp_fail(KVP_EINVAL, "%s: the codes and the floats overlap: each needs memory of its own", what);
	return KVP_OK;
}

KVP_API kvp_status kvp_codec_encode(kvp_codec *c, uint32_t n, const float *x, void *dst)
{
	kvp_status st = check_call("kvp_codec_encode", c, n, x, dst);

	if (st == KVP_OK)
		st = check_apart("kvp_codec_encode", c, n, dst, x, (size_t)n * c->dim);
	if (st != KVP_OK || n == 0)
		return st;
	if (c->ctx_bytes && !c->own_ctx_fitted)
		st = c->ops->fit(c, c->own_ctx, n, x, 0, NULL);
	if (st == KVP_OK)
		st = c->ops->encode(c, c->own_ctx, n, x, dst);
	if (c->ctx_bytes && !c->own_ctx_fitted) {
		if (st == KVP_OK)
			c->own_ctx_fitted = 1;
		else
			memset(c->own_ctx, 0, c->ctx_bytes);
	}
	return st;
}

KVP_API kvp_status kvp_codec_decode(kvp_codec *c, uint32_t n, const void *src, float *x)
{
	kvp_status st = check_call("kvp_codec_decode", c, n, src, x);

	if (st == KVP_OK)
		st = check_apart("kvp_codec_decode", c, n, src, x, (size_t)n * c->dim);
	if (st == KVP_OK && n)
		st = check_fitted("kvp_codec_decode", c);
	if (st == KVP_OK && n)
		st = check_bytes("kvp_codec_decode", c, n, src);
	if (st != KVP_OK || n == 0)
		return st;
	return c->ops->decode(c, c->own_ctx, n, src, x);
}

KVP_API kvp_status kvp_codec_dot(kvp_codec *c, uint32_t n, const void *src, const float *q, float *out)
{
	kvp_status st = check_call("kvp_codec_dot", c, n, src, q);
	void *qprep;

	if (st == KVP_OK && n && !out)
		st = kvp_fail(KVP_EINVAL, "kvp_codec_dot: NULL buffer");
	if (st == KVP_OK)
		st = check_apart("kvp_codec_dot", c, n, src, out, n);
	if (st == KVP_OK && n)
		st = check_fitted("kvp_codec_dot", c);
	if (st == KVP_OK && n)
		st = check_bytes("kvp_codec_dot", c, n, src);
	if (st != KVP_OK || n == 0)
		return st;
	qprep = malloc(c->qprep_bytes ? c->qprep_bytes : 1);
	if (!qprep)
		return kvp_fail(KVP_ENOMEM, "kvp_codec_dot: out of memory");
	c->ops->prepare_query(c, c->own_ctx, q, qprep);
	c->ops->dot(c, c->own_ctx, n, src, qprep, out);
	free(qprep);
	return KVP_OK;
}

KVP_API void kvp_codec_close(kvp_codec *c)
{
	kvp_codec_free(c);
}
