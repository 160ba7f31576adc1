/*
 * tier/ — where a sequence's blocks live: in the tenant's memory (memory.c, block.c) or on the spill
 * device (spill.c), and how they move between the two: one block at a time (restore.c), a whole sequence
 * (park.c), or under memory pressure (pressure.c).
 *
 * The pager (pager/) calls the tier; the tier never calls the pager. It reads the data model (tenants,
 * sequences, streams, blocks) whose types pager/pager.h defines, and it reaches memory relief only through
 * the hook the pool installs on each tenant (its `relieve` field), so the allocator does not call up into
 * pressure. What a public call's allocations and reliefs need to know travels in one explicit call
 * context (struct kvp_call), never in per-thread state.
 */
#ifndef KVP_TIER_H
#define KVP_TIER_H

#include <stddef.h>
#include <stdint.h>

#include "base/base.h"
#include "tier/spill.h"

struct kvp_tenant_obj;
struct kvp_seq_obj;
struct kvp_block;
struct kvp_spilled;

enum kvp_bytes_kind { KVP_BYTES_EXACT, KVP_BYTES_COMPRESSED, KVP_BYTES_META, KVP_BYTES_KINDS };

enum kvp_store { KVP_STORE_FP32, KVP_STORE_FP16, KVP_STORE_CODEC };

/* ---- the call context ---- */

/* How far a spill reaches, and the tally of what pressure spilled during one call: a KVP_ENOMEM that
 * follows says so. */
enum kvp_spill_reach { KVP_SPILL_IDLE, KVP_SPILL_OWN_COLD, KVP_SPILL_REACHES };
struct kvp_pressure_tally {
	uint32_t blocks[KVP_SPILL_REACHES]; /* blocks spilled, by whose */
	uint32_t parked;                    /* idle sequences parked whole */
	uint64_t bytes;                     /* records written */
};

/* Charges to t, up to cap bytes, paid from the memory the spill in progress frees (memory.c). */
struct kvp_prepaid {
	const struct kvp_tenant_obj *t;
	uint64_t cap, held; /* held: charges paid this way and not yet settled by a free */
};

/* One public call on a sequence: made on the call's stack (pager/calls.c), passed down to every tier
 * function, and reachable from the entered sequence (its `call` field) for the allocations made below the
 * call. NULL where no call is in progress (opening a tenant or a sequence): relief then has no caller. */
struct kvp_call {
	struct kvp_seq_obj *seq; /* the entered sequence: relief's last resort is its own cold blocks */
	int no_relief;       /* a failed charge does not relieve (inside a spill, or already relieving) */
	struct kvp_prepaid prepaid;
	struct kvp_pressure_tally tally;
};

/* ---- tenant memory: charge first, then allocate from the tenant's arena (memory.c) ---- */
/* Over a limit, a charge calls the tenant's relief hook (when the pool installed one and the call allows
 * it) until the charge fits or the hook frees nothing. */
kvp_status kvp_charge(struct kvp_tenant_obj *t, uint64_t bytes, struct kvp_call *call);
void kvp_uncharge(struct kvp_tenant_obj *t, uint64_t bytes, struct kvp_call *call);
size_t kvp_alloc_size(const struct kvp_tenant_obj *t, size_t bytes); /* what jemalloc will really give */
/* Charged allocation: all of what jemalloc gives (its size-class slack too) counts under kind, so token
 * storage is counted as allocated and metadata is only what is metadata. NULL with KVP_ENOMEM set on
 * failure. kvp_free takes the same numbers; only a spill's own frees (kvp_free_during) settle its
 * prepaid charges. */
void *kvp_alloc(struct kvp_tenant_obj *t, size_t bytes, enum kvp_bytes_kind kind, struct kvp_call *call);
void kvp_free(struct kvp_tenant_obj *t, void *p, size_t bytes, enum kvp_bytes_kind kind);
void kvp_free_during(struct kvp_tenant_obj *t, void *p, size_t bytes, enum kvp_bytes_kind kind,
		     struct kvp_call *call);
/* Until end, the call's charges to t, up to cap bytes, are paid from the memory the spill in progress
 * frees: the metadata of a spill never takes a tenant past its quota. */
void kvp_prepay_begin(struct kvp_call *call, const struct kvp_tenant_obj *t, uint64_t cap);
void kvp_prepay_end(struct kvp_call *call, struct kvp_tenant_obj *t);

/* ---- blocks (block.c) ---- */
struct kvp_block *kvp_block_new(struct kvp_tenant_obj *t, uint32_t cap, uint32_t dim, enum kvp_store store,
				struct kvp_call *call);
/* A block for n encoded tokens: positions, then k_bytes of keys and v_bytes of values. */
struct kvp_block *kvp_block_new_cold(struct kvp_tenant_obj *t, uint32_t n, size_t k_bytes, size_t v_bytes,
				     struct kvp_call *call);
/* A private copy of b with the same tokens (copy-on-write); b is exact (cold blocks are never written). */
struct kvp_block *kvp_block_copy(struct kvp_tenant_obj *t, const struct kvp_block *b, uint32_t dim,
				 struct kvp_call *call);
void kvp_block_get(struct kvp_block *b);
void kvp_block_put(struct kvp_tenant_obj *t, struct kvp_block *b);
/* kvp_block_put inside a spill, whose frees settle the call's prepaid charges. */
void kvp_block_put_during(struct kvp_tenant_obj *t, struct kvp_block *b, struct kvp_call *call);
size_t kvp_block_token_bytes(const struct kvp_tenant_obj *t, const struct kvp_block *b); /* k and v, as allocated */
size_t kvp_block_bytes(const struct kvp_tenant_obj *t, const struct kvp_block *b); /* both allocations */
/* Writes rows [at, at+n) of the block from fp32 k/v with the given row stride (floats); the positions are
 * the plan's (kvp_block_positions_plan/commit). */
void kvp_block_write(struct kvp_block *b, uint32_t at, uint32_t n, uint32_t dim, const float *k, const float *v,
		     size_t stride);

/* ---- positions of a block's tokens (block.c; struct kvp_positions in pager/pager.h) ---- */
struct kvp_positions;
/* The positions pos[0..n), increasing: *out NULL when they are a run (nothing to store), else made. */
kvp_status kvp_positions_make(struct kvp_tenant_obj *t, const int32_t *pos, uint32_t n, struct kvp_call *call,
			      struct kvp_positions **out);
struct kvp_positions *kvp_positions_get(struct kvp_positions *p); /* another reference; p may be NULL */
void kvp_positions_put(struct kvp_tenant_obj *t, struct kvp_positions *p, struct kvp_call *call);
/* Installs base and p (the block's reference to it) in place of the block's positions. */
void kvp_block_set_positions(struct kvp_tenant_obj *t, struct kvp_block *b, int32_t base, struct kvp_positions *p);
void kvp_block_positions(const struct kvp_block *b, int32_t *out); /* all n of them */
int32_t kvp_block_pos(const struct kvp_block *b, uint32_t i);
int32_t kvp_block_last(const struct kvp_block *b); /* n >= 1 */
size_t kvp_block_positions_bytes(const struct kvp_tenant_obj *t, const struct kvp_block *b);
/* The block's positions once pos[0..n) are appended to b (NULL: a fresh block), made in advance so the
 * commit cannot fail. */
struct kvp_positions_plan {
	int32_t base;
	int changed;                     /* positions holds what the block gets (NULL: a run) */
	struct kvp_positions *positions;
};
kvp_status kvp_block_positions_plan(struct kvp_tenant_obj *t, const struct kvp_block *b, const int32_t *pos,
				    uint32_t n, struct kvp_call *call, struct kvp_positions_plan *out);
void kvp_block_positions_commit(struct kvp_tenant_obj *t, struct kvp_block *b, struct kvp_positions_plan *p);
void kvp_positions_plan_unwind(struct kvp_tenant_obj *t, struct kvp_positions_plan *p);
/* Drop the rows of a private block whose record is written, or take new rows to read it into. */
void kvp_block_spill_out(struct kvp_tenant_obj *t, struct kvp_block *b, struct kvp_spilled *stub,
			 struct kvp_call *call);
kvp_status kvp_block_rows_alloc(struct kvp_tenant_obj *t, struct kvp_block *b, struct kvp_call *call);
void kvp_block_rows_free(struct kvp_tenant_obj *t, struct kvp_block *b, struct kvp_call *call);

/* ---- memory pressure (pressure.c) ---- */
/* The relief hook the pool installs on a tenant with a spill device. Relieves memory pressure on t (never
 * another tenant's) to make room for bytes: blocks of its least recently used idle sequence first, then
 * that sequence whole, then the calling sequence's own oldest cold blocks. Returns nonzero when it freed
 * something, so the caller charges again. */
int kvp_pressure_relieve(struct kvp_tenant_obj *t, uint64_t bytes, struct kvp_call *call);
/* A public call enters a sequence (waiting while pressure holds it) and leaves it; the call context is
 * the sequence's from enter to leave. enter returns nonzero, having entered nothing, when another call is
 * in the sequence: calls on one sequence must not overlap, and one that would is refused. */
int kvp_seq_enter(struct kvp_seq_obj *s, struct kvp_call *call);
void kvp_seq_leave(struct kvp_seq_obj *s);
/* The pressure lock held across fork() (pager/handle.c's handlers): before, then in the parent or the child. */
void kvp_pressure_fork_prepare(void);
void kvp_pressure_fork_parent(void);
void kvp_pressure_fork_child(void);

/* ---- blocks of a resident sequence on the spill device (restore.c) ---- */
/* Spills the oldest private blocks of s within reach, at least `bytes` of memory when there are that
 * many. KVP_SPILL_IDLE: s is claimed by pressure; every block but sinks and tails. KVP_SPILL_OWN_COLD: s
 * is the caller; only cold blocks outside its pinned layers. Returns how many blocks it spilled. */
size_t kvp_spill_blocks(struct kvp_seq_obj *s, uint64_t bytes, enum kvp_spill_reach reach, struct kvp_call *call);
/* attend: brings back layer's spilled blocks (waiting for the prefetch when it read them) and starts
 * the reads of the next layer's. KVP_EIO, KVP_ECORRUPT or KVP_ENOMEM leave the failed blocks spilled. */
kvp_status kvp_restore_layer(struct kvp_seq_obj *s, uint32_t layer, struct kvp_call *call);
/* append: brings back layer's spilled exact blocks, the ones its cold conversion may encode. */
kvp_status kvp_restore_exact(struct kvp_seq_obj *s, uint32_t layer, struct kvp_call *call);
/* Every spilled block back in memory (fork, step, gather need them). */
kvp_status kvp_restore_all(struct kvp_seq_obj *s, struct kvp_call *call);
/* Waits for reads in flight and files them; on any path that may free or park the sequence's blocks. */
void kvp_restore_settle(struct kvp_seq_obj *s);

/* ---- whole sequences on the spill device (park.c) ---- */
/* Park and unpark of an entered (or claimed) sequence. */
kvp_status kvp_park_sequence(struct kvp_seq_obj *s, struct kvp_call *call);
kvp_status kvp_unpark_sequence(struct kvp_seq_obj *s, struct kvp_call *call);

#endif /* KVP_TIER_H */
