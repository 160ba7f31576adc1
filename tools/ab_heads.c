/*
 * kvpager-ab --heads: what gating chose for every (layer, KV head) of a spec at the end of its run, read
 * through the plugin table's seq_head_level (ABI minor 2): the measured coherence, the aggressiveness
 * (the host's override when set), the ladder level and its codec bits, and the token budget of the last
 * kvp_seq_step. A spec with gate=off has no levels: every head keeps the policy's budget and the codecs'
 * bits as written, and the report says so.
 */
#include <stdlib.h>
#include <string.h>

#include "tools/ab.h"

int ab_heads_read(const kvp_plugin_v1 *api, kvp_seq *seq, const kvp_shape *shape, struct ab_heads *out)
{
	size_t n = (size_t)shape->n_layers * shape->n_kv_heads;
	kvp_status st;

	ab_heads_free(out);
	if (api->abi_minor < 2 || !api->seq_head_level) {
		out->state = AB_HEADS_UNSUPPORTED;
		return 0;
	}
	if (!(out->level = calloc(n, sizeof *out->level)))
		return -1;
	out->n_layers = shape->n_layers;
	out->n_kv_heads = shape->n_kv_heads;
	for (size_t i = 0; i < n; i++) {
		out->level[i].size = sizeof out->level[i];
		st = api->seq_head_level(seq, (uint32_t)(i / shape->n_kv_heads), (uint32_t)(i % shape->n_kv_heads),
					 &out->level[i]);
		if (st != KVP_OK) { /* gate=off: the library says so for every head */
			free(out->level);
			out->level = NULL;
			out->state = AB_HEADS_OFF;
			return 0;
		}
	}
	out->state = AB_HEADS_READ;
	return 0;
}

void ab_heads_free(struct ab_heads *h)
{
	free(h->level);
	memset(h, 0, sizeof *h);
}

/* levels used (how many heads each), the mean bits over the heads, and the budgets' range */
static void print_summary(FILE *f, const struct ab_heads *h)
{
	size_t n = (size_t)h->n_layers * h->n_kv_heads;
	unsigned count[16] = { 0 }, top = 0;
	uint32_t lo = UINT32_MAX, hi = 0;
	double bits = 0;

	for (size_t i = 0; i < n; i++) {
		const kvp_head_level *l = &h->level[i];
		unsigned at = l->level < 16 ? l->level : 15;
		count[at]++;
		top = at > top ? at : top;
		bits += l->bits;
		lo = l->budget < lo ? l->budget : lo;
		hi = l->budget > hi ? l->budget : hi;
	}
	fputs("  heads per level:", f);
	for (unsigned i = 0; i <= top; i++)
		fprintf(f, " %u:%u", i, count[i]);
	if (bits > 0)
		fprintf(f, "; mean bits %.2f", bits / (double)n);
	fprintf(f, "; budgets %u..%u tokens\n", lo, hi);
}

static void print_spec(FILE *f, const struct ab_result *r)
{
	const struct ab_heads *h = &r->heads;

	fprintf(f, "%s\n", r->spec[0] ? r->spec : "(empty spec)");
	if (h->state == AB_HEADS_OFF) {
		fputs("  gate=off: no per-head levels; every head keeps the policy's budget, codec bits as written\n", f);
		return;
	}
	if (h->state != AB_HEADS_READ) {
		fputs("  not read: the plugin has no seq_head_level (ABI minor < 2), or the run failed\n", f);
		return;
	}
	fprintf(f, "  %5s %7s %9s %14s %5s %4s %7s\n", "layer", "KV head", "coherence", "aggressiveness", "level",
		"bits", "budget");
	for (uint32_t l = 0; l < h->n_layers; l++)
		for (uint32_t k = 0; k < h->n_kv_heads; k++) {
			const kvp_head_level *x = &h->level[(size_t)l * h->n_kv_heads + k];
			fprintf(f, "  %5u %7u %9.4f %13.4f%s %5u %4u %7u\n", l, k, (double)x->coherence,
				(double)x->aggressiveness, x->overridden ? "*" : " ", x->level, x->bits, x->budget);
		}
	print_summary(f, h);
}

void ab_heads_print(FILE *f, const struct ab_result *r, int n)
{
	fputs("\nPer-head gating at the end of each spec's run (--heads; bits 0: no ladder, the codecs' own; budget:"
	      " tokens at the last step, 0 before the first; * an override):\n", f);
	for (int i = 0; i < n; i++)
		print_spec(f, &r[i]);
}
