/*
 * gating/ — coherence gating, per-head budgets and ladders of codec bits, in one module between the pager
 * and the policies and codecs (the pager calls it; it calls policies and codecs only through their ops and
 * registries, never by name).
 *
 * Each (layer, KV head) of a sequence has a coherence c in [0, 1]: how predictable its attention is.
 * gate=mrl reads it from the policy's coherence op (TriAttention: the mean resultant length of its
 * queries), gate=entropy from the running mean of 1 - H/log n of the softmax weights kvp_attend computes.
 * At every kvp_seq_step the layer's budget is redistributed over its KV heads in proportion to
 * 1 - STRENGTH * a, a = c or the host's override: coherent heads give tokens to diffuse ones and the
 * layer's total is conserved exactly, in whole blocks (coherence.c). No head goes below what a round
 * protects (sinks + window of the tenant and the policy) while the budget allows. With ladder= (ladder.c)
 * the sequence's heads are ranked by c and split into n equal shares, one per level (bits, keep), gentle
 * to aggressive, a head moving once its rank has asked for another level 32 steps in a row (an
 * overridden head sits at level round(a (n - 1)) at once): its budget share is the level's keep
 * and the bits of its cold blocks are the level's, set through the codecs' with_bits.
 * The tenant's check refuses what gating cannot act on: a policy that protects its whole budget
 * (keeps_newest), rounds whose verdict covers several streams unless the ladder only sets bits, and a
 * ladder of one level.
 */
#ifndef KVP_GATING_H
#define KVP_GATING_H

#include <stdint.h>

#include "base/base.h"
#include "codecs/codec.h"
#include "policies/policy.h"

enum kvp_gate { KVP_GATE_OFF, KVP_GATE_MRL, KVP_GATE_ENTROPY };

#define KVP_LADDER_MAX 8
#define KVP_LADDER_SPEC_MAX 256
/* "4:1.0,3:0.5,2:0.25": levels of (bits, keep fraction) from gentle to aggressive. */
struct kvp_ladder {
	unsigned n;
	unsigned bits[KVP_LADDER_MAX];
	double keep[KVP_LADDER_MAX];
};

/* A tenant's gate= and ladder=. */
struct kvp_gating_config {
	enum kvp_gate gate;
	struct kvp_ladder ladder;             /* n == 0 without ladder= */
	char ladder_spec[KVP_LADDER_SPEC_MAX]; /* its text, for messages */
};

/* ---- a tenant's configuration (ladder.c) ---- */

/* Reads gate= and ladder= from a tenant spec's args. */
kvp_status kvp_gating_config(struct kvp_args *args, struct kvp_gating_config *cfg);
/* After the tenant's other keys: gate= needs a policy= ("" when none) whose budget it moves, that scores
 * tokens (not keeps_newest), with rounds that decide each stream unless a ladder sets bits alone (every
 * keep the same), and gate=mrl one that offers a coherence op; ladder= needs a gate=, two levels or more,
 * and a k= or v= codec that takes bits. */
kvp_status kvp_gating_check(const struct kvp_gating_config *cfg, const char *policy, const char *k, const char *v);
/* Codec levels a tenant opens (1 without a ladder) and the bits of one (0: the spec as written). */
unsigned kvp_gating_levels(const struct kvp_gating_config *cfg);
unsigned kvp_gating_level_bits(const struct kvp_gating_config *cfg, unsigned level);
/* Prefixes the current message with the ladder level a codec failed at (nothing without a ladder). */
kvp_status kvp_gating_level_fail(const struct kvp_gating_config *cfg, unsigned level, kvp_status st);
/* The codec spec with bits=N on every member that takes bits (as kvp_codec_spec_open reads it);
 * *changed counts them. KVP_EINVAL when it does not fit cap. */
kvp_status kvp_ladder_spec_bits(const char *spec, unsigned bits, char *out, size_t cap, unsigned *changed);

/* ---- one sequence's gating (gating.c) ---- */

struct kvp_gating;
/* *out is NULL with gate=off. cfg must outlive the state (it is the tenant's); mem pays for it. */
kvp_status kvp_gating_open(const struct kvp_gating_config *cfg, const kvp_shape *shape,
			   const struct kvp_allocator *mem, struct kvp_gating **out);
/* A fork continues from its source's measurements and overrides. */
kvp_status kvp_gating_fork(const struct kvp_gating *src, const struct kvp_allocator *mem, struct kvp_gating **out);
void kvp_gating_close(struct kvp_gating *g);
/* gate=entropy: attend hands over its final softmax weights. */
int kvp_gating_wants_weights(const struct kvp_gating *g);
void kvp_gating_observe(struct kvp_gating *g, uint32_t layer, uint32_t kv_head, uint32_t n, const float *weights);
/* Recomputes every stream's budget for this step from the policy's budget(t0), moving whole blocks of
 * `block` tokens, and with a ladder every head's level; no head gets less than floor (the protected
 * tiers) while the layer's total allows it. */
kvp_status kvp_gating_step(struct kvp_gating *g, const struct kvp_policy *policy, int64_t t0, uint64_t floor,
			   uint32_t block);
/* The stream's budget at the last step (0: the policy's own, also when g is NULL). */
uint32_t kvp_gating_budget(const struct kvp_gating *g, uint32_t layer, uint32_t kv_head);
/* The ladder level a head is at (0 without a ladder or without gating, and before the first step). */
uint32_t kvp_gating_level(const struct kvp_gating *g, uint32_t layer, uint32_t kv_head);
/* kvp_seq_head_level and kvp_seq_set_head_level for a head inside the shape; KVP_EINVAL naming call
 * when g is NULL (gate=off). */
kvp_status kvp_gating_head_level(const struct kvp_gating *g, uint32_t layer, uint32_t kv_head, kvp_head_level *out);
kvp_status kvp_gating_set_head_level(struct kvp_gating *g, uint32_t layer, uint32_t kv_head, float aggressiveness);

/* ---- the arithmetic (coherence.c, ladder.c) ---- */

/* 1 - H(w)/log(n) of a softmax row (weights need not be normalized); 1 for n <= 1. */
double kvp_gate_entropy_coherence(uint32_t n, const float *weights);
/*
 * Splits total tokens over n heads: each gets floor, the rest goes in proportion to 1 - strength * c[i]
 * (c in [0,1]: coherent heads get less), rounded by largest remainder so the parts sum to total exactly.
 * strength in [0, 1); total >= n * floor. Ties in remainders go to the lower index.
 */
kvp_status kvp_gate_distribute(uint32_t n, const double *coherence, double strength, uint64_t total,
			       uint64_t floor, uint64_t *out);
/*
 * kvp_gate_distribute over heads whose budget is each tokens, in whole blocks: each = q blocks + r, every
 * head gets r + a whole number of blocks, the n x q blocks split by kvp_gate_distribute with the floor
 * rounded up to blocks (at least one when r is 0, so no head gets 0; capped at q), so the parts sum to
 * n x each and differ from each by whole blocks. block 0 or 1: tokens.
 */
kvp_status kvp_gate_distribute_blocks(uint32_t n, const double *coherence, double strength, uint64_t each,
				      uint64_t floor_each, uint32_t block, uint64_t *out);
kvp_status kvp_ladder_parse(const char *text, size_t len, struct kvp_ladder *out);
/* Level for an aggressiveness a in [0, 1] (a host's override): round(a * (n - 1)). */
unsigned kvp_ladder_level(const struct kvp_ladder *l, double coherence);
/* Level of a head by rank among total heads: `below` have lower coherence and `equal` (itself included)
 * the same. The heads split into `levels` equal shares from the least coherent (level 0, gentle) up; tied
 * heads share the level of their run's middle. */
unsigned kvp_ladder_rank_level(unsigned levels, uint32_t below, uint32_t equal, uint32_t total);

#endif /* KVP_GATING_H */
