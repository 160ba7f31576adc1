/* Survivor selection: protection first, then the budget's free slots by score (policy.h states the rules). */
#include <math.h>
#include <stdlib.h>

#include "policies/policy.h"

struct ranked {
	float score;
	int32_t pos;
	uint32_t index;
};

/* Best first: higher score, then newer position (recent tokens are the safer keep when scores tie). */
static int by_rank(const void *a, const void *b)
{
	const struct ranked *x = a, *y = b;
	float sx = isnan(x->score) ? -INFINITY : x->score, sy = isnan(y->score) ? -INFINITY : y->score;

	if (sx != sy)
		return sx > sy ? -1 : 1;
	return x->pos > y->pos ? -1 : x->pos < y->pos;
}

/* Keeps the best `take` of list[0..n), ranked; returns how many it kept. */
static uint32_t keep_best(struct ranked *list, uint32_t n, uint32_t take, uint8_t *keep)
{
	if (take > n)
		take = n;
	qsort(list, n, sizeof *list, by_rank);
	for (uint32_t i = 0; i < take; i++)
		keep[list[i].index] = 1;
	return take;
}

kvp_status kvp_select_survivors(uint32_t n, const int32_t *pos, const float *scores,
				const struct kvp_protect *protect, uint32_t budget, uint8_t *keep,
				uint32_t *n_kept)
{
	struct ranked *prompt, *decode;
	uint32_t n_prompt = 0, n_decode = 0, held = 0, free_slots, prompt_take, decode_take;

	prompt = malloc(sizeof *prompt * (n ? n : 1));
	decode = malloc(sizeof *decode * (n ? n : 1));
	if (!prompt || !decode) {
		free(prompt), free(decode);
		return kvp_fail(KVP_ENOMEM, "selection: out of memory for %u tokens", n);
	}
	for (uint32_t i = 0; i < n; i++) {
		keep[i] = i < protect->sinks || (uint64_t)i + protect->window >= n;
		if (keep[i])
			held++;
		else if (protect->pin_prompt && pos[i] < protect->prompt_end)
			prompt[n_prompt++] = (struct ranked){ scores[i], pos[i], i };
		else
			decode[n_decode++] = (struct ranked){ scores[i], pos[i], i };
	}
	free_slots = budget > held ? budget - held : 0;
	if (n_prompt <= free_slots) {
		prompt_take = n_prompt; /* the pinned prompt fits: all of it stays */
	} else {
		/* The prompt is longer than the budget leaves: it gets half, and whatever the newer tokens
		 * cannot use. */
		uint32_t half = free_slots - free_slots / 2;
		prompt_take = n_decode >= free_slots - half ? half : free_slots - n_decode;
	}
	decode_take = free_slots - prompt_take;
	held += keep_best(prompt, n_prompt, prompt_take, keep);
	held += keep_best(decode, n_decode, decode_take, keep);
	free(prompt), free(decode);
	*n_kept = held;
	return KVP_OK;
}
