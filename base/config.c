/* The configuration grammar shared by pool, tenant, codec and policy specs (see base.h). */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "base.h"

static int is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static void trim(const char **s, unsigned *len)
{
	while (*len && is_space(**s)) {
		(*s)++;
		(*len)--;
	}
	while (*len && is_space((*s)[*len - 1]))
		(*len)--;
}

int kvp_name_is(const char *name, unsigned nlen, const char *s)
{
	return strlen(s) == nlen && memcmp(name, s, nlen) == 0;
}

/* Length of the item starting at s, ending at a ',' at depth 0 or at end. */
static kvp_status item_length(const char *what, const char *s, size_t len, size_t *out)
{
	int depth = 0;
	size_t i;
	for (i = 0; i < len; i++) {
		if (s[i] == '(')
			depth++;
		else if (s[i] == ')' && --depth < 0)
			return kvp_fail(KVP_EINVAL, "%s: unbalanced ')' in '%.*s'", what, (int)len, s);
		else if (s[i] == ',' && depth == 0)
			break;
	}
	if (depth != 0)
		return kvp_fail(KVP_EINVAL, "%s: unclosed '(' in '%.*s'", what, (int)i, s);
	*out = i;
	return KVP_OK;
}

static kvp_status add_item(struct kvp_args *args, const char *s, unsigned len)
{
	const char *eq = memchr(s, '=', len);
	struct kvp_arg *a;

	trim(&s, &len);
	if (len == 0)
		return kvp_fail(KVP_EINVAL, "%s: empty item (stray ',')", args->what);
	eq = memchr(s, '=', len);
	if (!eq)
		return kvp_fail(KVP_EINVAL, "%s: '%.*s' is not key=value", args->what, (int)len, s);
	if (args->n == KVP_ARGS_MAX)
		return kvp_fail(KVP_EINVAL, "%s: more than %d items", args->what, KVP_ARGS_MAX);
	a = &args->a[args->n];
	a->key = s;
	a->klen = (unsigned)(eq - s);
	a->val = eq + 1;
	a->vlen = len - a->klen - 1;
	a->used = 0;
	trim(&a->key, &a->klen);
	trim(&a->val, &a->vlen);
	if (a->klen == 0)
		return kvp_fail(KVP_EINVAL, "%s: '%.*s' has no key", args->what, (int)len, s);
	for (unsigned i = 0; i < a->klen; i++)
		if (!isalnum((unsigned char)a->key[i]) && a->key[i] != '_')
			return kvp_fail(KVP_EINVAL, "%s: bad key '%.*s'", args->what, (int)a->klen, a->key);
	for (unsigned i = 0; i < args->n; i++)
		if (args->a[i].klen == a->klen && !memcmp(args->a[i].key, a->key, a->klen))
			return kvp_fail(KVP_EINVAL, "%s: key '%.*s' given twice", args->what, (int)a->klen,
					a->key);
	args->n++;
	return KVP_OK;
}

kvp_status kvp_args_parse(struct kvp_args *args, const char *what, const char *text, size_t len)
{
	size_t at = 0;
	args->what = what;
	args->n = 0;
	if (!text)
		return KVP_OK;
	{
		const char *t = text;
		unsigned l = (unsigned)len;
		trim(&t, &l);
		if (l == 0)
			return KVP_OK;
	}
	while (at <= len) {
		size_t n = 0;
		kvp_status st = item_length(what, text + at, len - at, &n);
		if (st == KVP_OK)
			st = add_item(args, text + at, (unsigned)n);
		if (st != KVP_OK) {
			args->n = 0;
			return st;
		}
		at += n + 1;
	}
	return KVP_OK;
}

static struct kvp_arg *find(struct kvp_args *args, const char *key)
{
	for (unsigned i = 0; i < args->n; i++)
		if (kvp_name_is(args->a[i].key, args->a[i].klen, key)) {
			args->a[i].used = 1;
			return &args->a[i];
		}
	return NULL;
}

static kvp_status bad_value(const struct kvp_args *args, const struct kvp_arg *a, const char *why)
{
	return kvp_fail(KVP_EINVAL, "%s: %.*s=%.*s: %s", args->what, (int)a->klen, a->key, (int)a->vlen,
			a->val, why);
}

/* Parses a whole unsigned decimal value; returns the count of characters consumed or 0. */
static unsigned parse_u64(const char *s, unsigned len, uint64_t *out)
{
	uint64_t v = 0;
	unsigned i = 0;
	for (; i < len && s[i] >= '0' && s[i] <= '9'; i++) {
		unsigned digit = (unsigned)(s[i] - '0');
		if (v > (UINT64_MAX - digit) / 10)
			return 0;
		v = v * 10 + digit;
	}
	*out = v;
	return i;
}

kvp_status kvp_args_u64(struct kvp_args *args, const char *key, uint64_t lo, uint64_t hi, uint64_t *out)
{
	struct kvp_arg *a = find(args, key);
	uint64_t v;
	if (!a)
		return KVP_OK;
	if (a->vlen == 0 || parse_u64(a->val, a->vlen, &v) != a->vlen)
		return bad_value(args, a, "not a whole number");
	if (v < lo || v > hi)
		return kvp_fail(KVP_EINVAL, "%s: %.*s=%.*s is outside %llu..%llu", args->what, (int)a->klen,
				a->key, (int)a->vlen, a->val, (unsigned long long)lo, (unsigned long long)hi);
	*out = v;
	return KVP_OK;
}

kvp_status kvp_args_u32(struct kvp_args *args, const char *key, uint32_t lo, uint32_t hi, uint32_t *out)
{
	uint64_t v = *out;
	kvp_status st = kvp_args_u64(args, key, lo, hi, &v);
	if (st == KVP_OK)
		*out = (uint32_t)v;
	return st;
}

static const struct {
	const char *suffix;
	unsigned shift;
} size_units[] = {
	{ "", 0 }, { "B", 0 }, { "K", 10 }, { "KiB", 10 }, { "M", 20 }, { "MiB", 20 },
	{ "G", 30 }, { "GiB", 30 }, { "T", 40 }, { "TiB", 40 },
};

kvp_status kvp_args_size(struct kvp_args *args, const char *key, uint64_t *out)
{
	struct kvp_arg *a = find(args, key);
	uint64_t v;
	unsigned n;
	if (!a)
		return KVP_OK;
	n = parse_u64(a->val, a->vlen, &v);
	if (n == 0)
		return bad_value(args, a, "not a size (examples: 4096, 512MiB, 4GiB)");
	for (size_t i = 0; i < sizeof size_units / sizeof size_units[0]; i++) {
		if (!kvp_name_is(a->val + n, a->vlen - n, size_units[i].suffix))
			continue;
		if (size_units[i].shift && v > (UINT64_MAX >> size_units[i].shift))
			return bad_value(args, a, "too large");
		*out = v << size_units[i].shift;
		return KVP_OK;
	}
	return bad_value(args, a, "unknown unit (use B, KiB, MiB, GiB or TiB)");
}

kvp_status kvp_args_double(struct kvp_args *args, const char *key, double lo, double hi, double *out)
{
	struct kvp_arg *a = find(args, key);
	char buf[64], *end;
	double v;
	if (!a)
		return KVP_OK;
	if (a->vlen == 0 || a->vlen >= sizeof buf)
		return bad_value(args, a, "not a number");
	memcpy(buf, a->val, a->vlen);
	buf[a->vlen] = '\0';
	errno = 0;
	v = strtod(buf, &end);
	if (*end != '\0' || errno != 0 || !isfinite(v))
		return bad_value(args, a, "not a number");
	if (v < lo || v > hi)
		return kvp_fail(KVP_EINVAL, "%s: %.*s=%.*s is outside %g..%g", args->what, (int)a->klen, a->key,
				(int)a->vlen, a->val, lo, hi);
	*out = v;
	return KVP_OK;
}

kvp_status kvp_args_choice(struct kvp_args *args, const char *key, const char *const *choices, unsigned *out)
{
	struct kvp_arg *a = find(args, key);
	char list[256] = "";
	if (!a)
		return KVP_OK;
	for (unsigned i = 0; choices[i]; i++) {
		if (kvp_name_is(a->val, a->vlen, choices[i])) {
			*out = i;
			return KVP_OK;
		}
		if (strlen(list) + strlen(choices[i]) + 2 < sizeof list) {
			if (i)
				strcat(list, "|");
			strcat(list, choices[i]);
		}
	}
	return kvp_fail(KVP_EINVAL, "%s: %.*s=%.*s is not one of %s", args->what, (int)a->klen, a->key,
			(int)a->vlen, a->val, list);
}

kvp_status kvp_args_text(struct kvp_args *args, const char *key, const char **val, unsigned *vlen)
{
	struct kvp_arg *a = find(args, key);
	if (!a)
		return KVP_OK;
	*val = a->val;
	*vlen = a->vlen;
	return KVP_OK;
}

kvp_status kvp_args_put(struct kvp_args *args, const char *key, const char *val)
{
	unsigned at = 0;

	for (unsigned i = 0; i < args->n; i++)
		if (!kvp_name_is(args->a[i].key, args->a[i].klen, key))
			args->a[at++] = args->a[i];
	if (at == KVP_ARGS_MAX)
		return kvp_fail(KVP_EINVAL, "%s: more than %d items with %s=%s", args->what, KVP_ARGS_MAX, key, val);
	memmove(&args->a[1], &args->a[0], at * sizeof args->a[0]);
	args->a[0] = (struct kvp_arg){ .key = key, .klen = (unsigned)strlen(key), .val = val,
				      .vlen = (unsigned)strlen(val) };
	args->n = at + 1;
	return KVP_OK;
}

kvp_status kvp_args_finish(const struct kvp_args *args)
{
	for (unsigned i = 0; i < args->n; i++)
		if (!args->a[i].used)
			return kvp_fail(KVP_EINVAL, "%s: unknown key '%.*s'", args->what, (int)args->a[i].klen,
					args->a[i].key);
	return KVP_OK;
}

kvp_status kvp_call_split(const char *val, unsigned vlen, const char **name, unsigned *nlen,
			  const char **inner, unsigned *ilen)
{
	const char *open;
	trim(&val, &vlen);
	open = memchr(val, '(', vlen);
	*name = val;
	if (!open) {
		*nlen = vlen;
		*inner = val + vlen;
		*ilen = 0;
	} else {
		if (val[vlen - 1] != ')')
			return kvp_fail(KVP_EINVAL, "'%.*s': expected ')' at the end", (int)vlen, val);
		*nlen = (unsigned)(open - val);
		*inner = open + 1;
		*ilen = (unsigned)(val + vlen - 1 - *inner);
		{
			int depth = 0;
			for (unsigned i = 0; i < *ilen; i++) {
				if ((*inner)[i] == '(')
					depth++;
				else if ((*inner)[i] == ')' && --depth < 0)
					break;
			}
			if (depth != 0)
				return kvp_fail(KVP_EINVAL, "'%.*s': unbalanced parentheses", (int)vlen, val);
		}
	}
	trim(name, nlen);
	if (*nlen == 0)
		return kvp_fail(KVP_EINVAL, "'%.*s': missing name", (int)vlen, val);
	for (unsigned i = 0; i < *nlen; i++)
		if (!isalnum((unsigned char)(*name)[i]) && (*name)[i] != '_')
			return kvp_fail(KVP_EINVAL, "'%.*s': bad name '%.*s'", (int)vlen, val, (int)*nlen, *name);
	return KVP_OK;
}
