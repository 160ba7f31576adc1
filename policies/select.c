/*
 * Survivor selection: protection first, then the budget's free slots by score (policy.h states the rules).
 *
 * The best `take` tokens are found by quickselect, not by sorting: only the set matters, and the rank is
 * a strict total order (score, NaN as -inf, then the newer position), so any correct selection gives the
 * one set a full sort would. Each candidate's rank is packed into one integer key so that comparing
 * keys is comparing ranks.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "policies/policy.h"

struct ranked {
	uint64_t key; /* rank_key(score, pos): larger is better */
	uint32_t index;
};

/*
 * Higher score first, then newer position (recent tokens are the safer keep when scores tie). The
 * score's bits are mapped so that unsigned order is float order (NaN ranks as -inf; -0 and +0 are one
 * score, as they compare equal), and the position breaks ties in the low half. Positions of one stream
 * differ, so keys do.
 */
static uint64_t rank_key(float score, int32_t pos)
{
	uint32_t bits;

	if (isnan(score))
		score = -INFINITY;
	if (score == 0.0f)
		score = 0.0f;
	memcpy(&bits, &score, sizeof bits);
	bits = bits & 0x80000000u ? ~bits : bits | 0x80000000u;
	return (uint64_t)bits << 32 | ((uint32_t)pos ^ 0x80000000u);
}

static void swap(struct ranked *a, struct ranked *b)
{
	struct ranked t = *a;
	*a = *b;
	*b = t;
}

/* Orders list[lo], list[mid], list[hi] best first and returns the median's key: a pivot that is never
 * the range's worst, so each partition below makes progress. */
static uint64_t median_of_three(struct ranked *list, uint32_t lo, uint32_t hi)
{
	uint32_t mid = lo + (hi - lo) / 2;

	if (list[mid].key > list[lo].key)
		swap(&list[mid], &list[lo]);
	if (list[hi].key > list[lo].key)
		swap(&list[hi], &list[lo]);
	if (list[hi].key > list[mid].key)
		swap(&list[hi], &list[mid]);
	return list[mid].key;
}

static int by_key_desc(const void *a, const void *b)
{
	const struct ranked *x = a, *y = b;
	return x->key > y->key ? -1 : x->key < y->key;
}

/*
 * Rearranges list[0..n) so that its best `take` entries come first (in no particular order), 0 < take <
 * n. Hoare partitions around a median of three; after 2 log2(n) rounds without converging (inputs
 * built to defeat the pivot) the remaining range is sorted instead, so the worst case stays n log n.
 */
static void select_best(struct ranked *list, uint32_t n, uint32_t take)
{
	uint32_t lo = 0, hi = n - 1, budget = 2;

	for (uint32_t m = n; m > 1; m >>= 1)
		budget += 2;
	while (hi - lo > 2) {
		if (!budget--) {
			qsort(list + lo, hi - lo + 1, sizeof *list, by_key_desc);
			return;
		}
		uint64_t pivot = median_of_three(list, lo, hi);
		uint32_t i = lo, j = hi;
		for (;;) {
			while (list[i].key > pivot)
				i++;
			while (list[j].key < pivot)
				j--;
			if (i >= j)
				break;
			swap(&list[i++], &list[j--]);
		}
		/* list[lo..j] are all >= pivot's rank and list[j+1..hi] all <= it */
		if (take <= j)
			hi = j;
		else
			lo = j + 1;
	}
	qsort(list + lo, hi - lo + 1, sizeof *list, by_key_desc);
}

/* Keeps the best `take` of list[0..n), ranked; returns how many it kept. */
static uint32_t keep_best(struct ranked *list, uint32_t n, uint32_t take, uint8_t *keep)
{
	if (take > n)
		take = n;
	if (take && take < n)
		select_best(list, n, take);
	for (uint32_t i = 0; i < take; i++)
		keep[list[i].index] = 1;
	return take;
}

void kvp_select_split(uint32_t held, uint32_t n_prompt, uint32_t n_decode, uint32_t budget,
		      uint32_t *prompt_take, uint32_t *decode_take)
{
	uint32_t free_slots = budget > held ? budget - held : 0;

	if (n_prompt <= free_slots) {
		*prompt_take = n_prompt; /* the pinned prompt fits: all of it stays */
	} else {
		/* The prompt is longer than the budget leaves: it gets half, and whatever the newer tokens
		 * cannot use. */
		uint32_t half = free_slots - free_slots / 2;
		*prompt_take = n_decode >= free_slots - half ? half : free_slots - n_decode;
	}
	*decode_take = free_slots - *prompt_take;
}

kvp_status kvp_select_survivors(uint32_t n, const int32_t *pos, const float *scores,
				const struct kvp_protect *protect, uint32_t budget, uint8_t *keep,
				uint32_t *n_kept)
{
	struct ranked *prompt, *decode;
	uint32_t n_prompt = 0, n_decode = 0, held = 0, prompt_take, decode_take;

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
			prompt[n_prompt++] = (struct ranked){ rank_key(scores[i], pos[i]), i };
		else
			decode[n_decode++] = (struct ranked){ rank_key(scores[i], pos[i]), i };
	}
	kvp_select_split(held, n_prompt, n_decode, budget, &prompt_take, &decode_take);
	held += keep_best(prompt, n_prompt, prompt_take, keep);
	held += keep_best(decode, n_decode, decode_take, keep);
	free(prompt), free(decode);
	*n_kept = held;
	return KVP_OK;
}
