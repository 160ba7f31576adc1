/*
 * pager/ — the public calls on sequences (calls.c), pools and tenants (pool.c), sequences, streams and
 * their block tables, the cold tier and policy rounds. The data model below (pool, tenant, sequence,
 * stream, block) is read by tier/ too, which keeps the blocks' memory and the spill device; the pager
 * calls the tier (tier/tier.h), never the other way round.
 *
 * Memory: every byte a sequence holds is allocated from its tenant's jemalloc arena and charged to the
 * tenant and the pool before it is allocated (tier/memory.c), so an append that would pass a limit fails
 * before it changes anything. Its policy and codecs get theirs the same way, through the allocator the
 * sequence hands them (kvp_seq_allocator), and it shows in the sequence's bytes_meta. Blocks are
 * reference counted so forks share them; a shared block is copied before it is written (copy-on-write).
 *
 * A stream is one (layer, KV head) of a sequence:
 *   sink block   the first `sinks` tokens, exact, never evicted
 *   blocks[]     the rest in position order, `block` tokens each; the last `window` tokens are the hot
 *                window, exact (store=fp32|fp16). With k= or v= configured, every full block whose tokens
 *                have all left the hot window is encoded by the sequence's codecs: blocks[0..n_cold) are
 *                cold, the rest exact (cold.c).
 */
#ifndef KVP_PAGER_H
#define KVP_PAGER_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "base/base.h"
#include "gating/gating.h"
#include "tier/tier.h"
#include "tier/remote.h"
#include "policies/policy.h"

#define KVP_BLOCK_MAX 4096 /* tokens per block, and per sink block */
#define KVP_GROUP_MAX 128  /* query heads per KV head */
#define KVP_HEAD_DIM_MAX 1024
/* tokens one stream may hold: positions are int32_t, and every token and block count of a stream stays
 * far enough below 2^32 that uint32_t arithmetic on it cannot wrap */
#define KVP_STREAM_TOKENS_MAX INT32_MAX

#define KVP_CODEC_SPEC_MAX 256

struct kvp_pool_obj {
	uint32_t magic;
	uint32_t handle_index; /* its slot in the handle table (handle.c) */
	kvp_pool *handle;      /* what the host holds */
	uint64_t limit; /* UINT64_MAX when unlimited */
	_Atomic uint64_t used;
	int numa_node; /* -1 when not placed */
	pthread_mutex_t lock; /* guards the tenant list */
	struct kvp_tenant_obj *tenants;
	struct kvp_spill *spill; /* NULL without spill= */
	struct kvp_remote *remote; /* NULL without remote= (tier/remote.h) */
	uint32_t share_prefix; /* share_prefix=1: tenants find each other's cached prefixes (as copies) */
	struct kvp_prefix_table *prefix; /* the pool's prefix cache (prefix.c) */
};

struct kvp_tenant_config {
	uint32_t block, sinks, window;
	enum kvp_store store;
	/* codec specs of the cold tier, "" when not set; either set means the tier exists and the other side
	 * is stored as store= says */
	char k_spec[KVP_CODEC_SPEC_MAX], v_spec[KVP_CODEC_SPEC_MAX];
	char policy_spec[KVP_CODEC_SPEC_MAX]; /* "" when every token is kept */
	uint32_t pin_prompt;
	struct kvp_gating_config gating; /* gate= and ladder= (gating/) */
	char model[64];  /* model=: the host's name for the weights, "" when not set */
	uint32_t prefix; /* prefix=on: kvp_seq_open_prefix looks prompts up and registers them */
};

struct kvp_tenant_obj {
	uint32_t magic;
	uint32_t handle_index; /* its slot in the handle table (handle.c) */
	kvp_tenant *handle;    /* what the host holds */
	struct kvp_pool_obj *pool;
	struct kvp_tenant_obj *next;
	char name[64];
	unsigned arena;
	int flags; /* MALLOCX_ARENA(arena) | MALLOCX_TCACHE_NONE */
	uint64_t quota;
	_Atomic uint64_t used;
	_Atomic uint64_t bytes[KVP_BYTES_KINDS];
	_Atomic uint64_t tokens_appended, tokens_retained, bytes_dense_fp16;
	_Atomic uint64_t prefix_hit_tokens, prefix_miss_tokens; /* over its kvp_seq_open_prefix calls */
	_Atomic uint64_t remote_hit_tokens, remote_faults, remote_rejected;
	struct kvp_tenant_config cfg;
	/* The specs, parsed once at tenant open (with what the policy loads once, e.g. a .kvtria file) and
	 * read-only until the tenant closes: NULL when not set. */
	struct kvp_policy_spec *policy_spec;    /* kvp_evict_prepare's */
	struct kvp_codec_spec *k_codec, *v_codec; /* kvp_cold_prepare's */
	pthread_mutex_t lock; /* guards the sequence list */
	struct kvp_seq_obj *seqs;
	_Atomic uint64_t bytes_spilled; /* records on the spill device, each counted once */
	uint64_t spill_id; /* names the tenant in slot headers; 0 until its first park */
	_Atomic uint64_t clock; /* ticks once per call on any of its sequences */
	/* Memory relief the pool installs on the tenant's allocator (kvp_pressure_relieve with a spill device,
	 * else NULL): a charge over a limit calls it instead of calling up into pressure. */
	int (*relieve)(struct kvp_tenant_obj *t, uint64_t bytes, struct kvp_call *call);
};

/* The positions of a block's tokens when they are not a run (pos_base, pos_base + 1, ...): immutable once
 * made, reference counted so a copy, a cold encoding or a parked record of the block shares them, and
 * charged to the tenant as metadata (tier/block.c). Either a survivor bitmap over [pos_base, pos_base +
 * span) or, where that would be larger, every position as an int32. */
enum kvp_positions_kind { KVP_POSITIONS_BITMAP, KVP_POSITIONS_INT32 };
struct kvp_positions {
	_Atomic uint32_t refs;
	uint32_t kind;  /* enum kvp_positions_kind */
	uint32_t n;     /* positions held */
	uint32_t bytes; /* the allocation, as asked */
	uint64_t word[]; /* BITMAP: bit i set for position pos_base + i; INT32: n int32 values */
};

/* 64 bytes, one jemalloc size class: the header is the bookkeeping every block of every stream pays. */
struct kvp_block {
	_Atomic uint32_t refs;
	uint16_t n, cap; /* at most KVP_BLOCK_MAX */
	uint8_t store;   /* enum kvp_store */
	uint8_t level;   /* codec-encoded blocks: the ladder level whose codecs encoded it (0 without) */
	int32_t pos_base; /* the first token's position */
	/* NULL while the positions are the run pos_base, pos_base + 1, ... (appended tokens), else theirs */
	struct kvp_positions *positions;
	uint32_t data_size; /* the allocation k and v live in, as asked */
	uint32_t payload;   /* bytes of k and v together: what a spill record holds */
	uint32_t v_offset;  /* where v starts in the allocation k points to: what a restore rebuilds */
	void *k, *v; /* [cap][head_dim] in the block's store, or the codecs' bytes for n tokens */
	/* Non-NULL while the block is spilled (tier/restore.c): k and v are NULL, the allocation they lived in
	 * is freed, and this record holds their bytes; the header (n, cap, positions) stays in memory.
	 * Only private blocks are spilled, so only their sequence ever sees this. */
	struct kvp_spilled *spilled;
};

/* Codec contexts of one stream (outlier channels and the like), fitted on its first cold block and
 * immutable afterwards, so forks share them. */
struct kvp_stream_ctx {
	_Atomic uint32_t refs;
	size_t size;
	void *k, *v; /* level 0's; with a ladder every level has its own, all fitted on the first block */
	void *k_level[KVP_LADDER_MAX], *v_level[KVP_LADDER_MAX];
};

struct kvp_stream {
	uint32_t n_tokens;
	struct kvp_block *sink;
	uint32_t n_blocks, cap_blocks, n_cold;
	struct kvp_block **blocks;
	struct kvp_stream_ctx *ctx; /* NULL until the first block turns cold */
	int64_t scored_upto;        /* with a policy: tokens below this position went through a round */
	struct kvp_recent_queries *recent; /* for a key codec that fits on queries, until ctx is fitted */
};

/* The last decode steps' queries of a stream's GQA group, a ring of steps x group x head_dim floats. */
struct kvp_recent_queries {
	size_t bytes;
	uint32_t cap, n, next; /* in query vectors */
	float q[];
};

/* The cold tier of a sequence: its codecs, parsed for its head_dim, and the scratch attend needs (every
 * sequence has that, cold tier or not). */
struct kvp_cold {
	struct kvp_codec *k, *v; /* level 0's */
	/* With a ladder, level l's codecs are k=/v= with the level's bits (k_level[0] == k); a block is
	 * always read with the codecs of the level recorded in it. */
	unsigned n_levels; /* 1 without a ladder */
	struct kvp_codec *k_level[KVP_LADDER_MAX], *v_level[KVP_LADDER_MAX];
	size_t qprep_max, acc_max; /* largest qprep_bytes and acc_dim over the levels */
	uint32_t scores_cap;       /* floats of scores: a block's or a span's tokens x group, at most KVP_BLOCK_MAX */
	size_t scratch_bytes;
	void *scratch; /* scores_cap floats, then group x qprep_max bytes, then group x acc_max floats */
};

struct kvp_seq_obj {
	uint32_t magic;
	uint32_t handle_index; /* its slot in the handle table (handle.c) */
	struct kvp_tenant_obj *tenant;
	struct kvp_seq_obj *next;
	kvp_shape shape;
	uint32_t group; /* query heads per KV head */
	struct kvp_stream *streams; /* [n_layers][n_kv_heads] */
	uint64_t tokens_appended;
	struct kvp_cold cold; /* codecs NULL when the tenant has no k= or v= */
	struct kvp_policy *policy; /* NULL when every token is kept */
	/* Bytes the policy and the codecs hold for this sequence (their state and buffers), as allocated
	 * through kvp_seq_allocator: charged to the tenant as metadata and counted in the sequence's bytes_meta. */
	uint64_t state_bytes;
	struct kvp_gating *gating; /* NULL when gate=off (gating/gating.h) */
	int64_t t0;                /* one past the highest position appended */
	int32_t prompt_end;        /* the prompt's end, fixed at the first kvp_seq_step; -1 before */
	struct kvp_observe_buf {   /* what attend hands the policy: weights over one stream, during one attend */
		uint32_t cap;
		size_t bytes;
		float *weights; /* [group][cap] */
		int32_t *pos;   /* [cap] */
	} observe;
	/* One stream's positions, fp32 keys and verdict for single-stream policy rounds, kept between rounds
	 * (charged as metadata) so a long stream's round does not fault in fresh pages each time, while it
	 * is small beside the sequence's tokens (evict.c). */
	struct kvp_round_space {
		uint32_t cap;   /* tokens */
		size_t bytes;
		float *k;       /* [cap][head_dim], or NULL when the policy does not read keys */
		int32_t *pos;   /* [cap] */
		uint8_t *keep;  /* [cap] */
	} round_space;
	struct kvp_parked *parked; /* non-NULL while parked: its blocks are on the spill device */
	uint64_t spill_id; /* names the sequence in slot headers; 0 until its first park */
	int pressure_parked; /* parked by memory pressure, not by the host: unparked on next use */
	_Atomic int parked_flag; /* parked != NULL, for tier/pressure.c to read without entering the sequence */
	kvp_seq *handle;       /* what the host holds */
	_Atomic uint32_t calls; /* 1 while a public call is in it, or KVP_SEQ_CLAIMED (tier/pressure.c) */
	struct kvp_call *call;  /* the context of the call in progress (pager/calls.c), or NULL */
	_Atomic uint64_t last_use; /* the tenant's clock at the last call: pressure spills the oldest */
	/* Blocks spilled one by one under pressure (tier/restore.c), read back before use. Touched only by the
	 * thread that entered the sequence (or claimed it). */
	uint32_t n_spilled;          /* blocks whose record is on the device, in flight or not: attend's one branch */
	uint32_t pin_from, pin_to;   /* layers pressure must not spill from: the ones a call is using */
	struct kvp_restore *restore; /* reads in flight (the prefetched layer), or NULL */
	/* Opened by kvp_seq_open_prefix: its prompt's units waiting to be registered in the prefix cache, or
	 * NULL (prefix.c); and what its lookup found. */
	struct kvp_prefix_prompt *prompt;
	uint64_t prefix_hit_tokens, prefix_miss_tokens;
	uint64_t remote_hit_tokens, remote_faults, remote_rejected; /* of those, from the remote tier */
};

#define KVP_POOL_MAGIC 0x6b76706fu
#define KVP_TENANT_MAGIC 0x6b767074u
#define KVP_SEQ_MAGIC 0x6b767073u

/* ---- tenant memory (arena.c; charging and allocating is the tier's, tier/memory.c) ---- */
/* What the sequence hands its policy and codecs: kvp_alloc/kvp_free as metadata, counted in state_bytes. */
struct kvp_allocator kvp_seq_allocator(struct kvp_seq_obj *s);
/* What the tenant hands what its sequences share (a policy's statistics file): metadata of the tenant,
 * never relieving (the tenant has no sequence yet); needs its arena. */
struct kvp_allocator kvp_tenant_allocator(struct kvp_tenant_obj *t);
kvp_status kvp_arena_create(const struct kvp_pool_obj *pool, unsigned *arena);
void kvp_arena_destroy(unsigned arena);
int kvp_arena_flags(unsigned arena);
/* jemalloc started (its fork handlers registered); the NUMA hook table's lock, held across fork() by
 * handle.c's handlers. */
void kvp_arena_start(void);
void kvp_arena_fork_lock(void);
void kvp_arena_fork_unlock(void);
/* KVP_EUNSUPPORTED where the machine has no NUMA, KVP_EINVAL for a node it does not have. */
kvp_status kvp_numa_check(int node);

/* ---- the cold tier (cold.c) ---- */
struct kvp_cold_plan {
	uint32_t n;                /* blocks that turn cold with this append */
	struct kvp_block **blocks; /* their encoded blocks, allocated */
	struct kvp_stream_ctx *ctx; /* allocated when the stream has none yet */
	float *rows;               /* fp32 scratch for one block of k and one of v */
};
/* KVP_EINVAL naming the spec when a codec cannot serve blocks of `block` tokens. */
kvp_status kvp_cold_check(const struct kvp_tenant_config *cfg);
/* At tenant open and close: k= and v= parsed once for every sequence. */
kvp_status kvp_cold_prepare(struct kvp_tenant_obj *t);
void kvp_cold_unprepare(struct kvp_tenant_obj *t);
kvp_status kvp_cold_open(struct kvp_tenant_obj *t, struct kvp_seq_obj *s);
void kvp_cold_close(struct kvp_tenant_obj *t, struct kvp_seq_obj *s);
/* Allocate what turning blocks cold needs once `add` more tokens land in the stream's blocks. */
kvp_status kvp_cold_plan(struct kvp_tenant_obj *t, const struct kvp_seq_obj *s, const struct kvp_stream *st,
			 uint32_t add, struct kvp_cold_plan *p);
void kvp_cold_unwind(struct kvp_tenant_obj *t, struct kvp_cold_plan *p);
/* Encode the planned blocks after the exact tokens are written. Cannot fail: a block that does not
 * encode stays exact, and the plan's leftovers are freed. */
void kvp_cold_commit(struct kvp_tenant_obj *t, const struct kvp_seq_obj *s, struct kvp_stream *st,
		     struct kvp_cold_plan *p);
void kvp_stream_ctx_put(struct kvp_tenant_obj *t, struct kvp_stream_ctx *c);
/* Keeps the group's queries (group x head_dim) for the stream's first fit, when the key codec wants them. */
void kvp_cold_note_queries(struct kvp_seq_obj *s, struct kvp_stream *st, const float *q);
void kvp_cold_forget_queries(struct kvp_tenant_obj *t, struct kvp_stream *st);
void kvp_cold_gather(const struct kvp_seq_obj *s, const struct kvp_stream *st, const struct kvp_block *b,
		     float *k, float *v);

/* Level 0's codes of a full exact block as kvp_cold_commit makes them, for codecs with ctx_bytes == 0 (else
 * KVP_EINVAL); k_codes and v_codes hold the codecs' bytes for b->n tokens, rows 2 x n x head_dim floats. */
kvp_status kvp_cold_encode_block(const struct kvp_seq_obj *s, const struct kvp_block *exact, float *rows,
				 void *k_codes, void *v_codes);
/* A stream given cold blocks by a prefix hit: its codec contexts, as its first cold block would make them
 * (unfitted: only codecs without a context qualify). KVP_ENOMEM. */
kvp_status kvp_cold_stream_ctx(struct kvp_tenant_obj *t, const struct kvp_seq_obj *s, struct kvp_stream *st);

/* ---- token policies (evict.c) ---- */
kvp_status kvp_evict_check(const struct kvp_tenant_config *cfg);
/* At tenant open and close: policy= parsed once, with what every sequence's policy shares (a stats file,
 * read once), and its arguments checked. */
kvp_status kvp_evict_prepare(struct kvp_tenant_obj *t);
void kvp_evict_unprepare(struct kvp_tenant_obj *t);
kvp_status kvp_evict_open(struct kvp_tenant_obj *t, struct kvp_seq_obj *s);
void kvp_evict_close(struct kvp_tenant_obj *t, struct kvp_seq_obj *s);
kvp_status kvp_evict_fork(struct kvp_tenant_obj *t, const struct kvp_seq_obj *src, struct kvp_seq_obj *s);
/* Rounds that are due, then the cold conversion of what they scored. */
kvp_status kvp_evict_step(struct kvp_seq_obj *s);
/* Room for attend's observation of streams of up to n tokens; KVP_ENOMEM leaves the old buffer. The
 * room lives for one kvp_attend (released at its end): sized by the longest stream, it would otherwise be
 * bookkeeping every token pays for between calls. */
kvp_status kvp_observe_reserve(struct kvp_seq_obj *s, uint32_t n);
void kvp_observe_release(struct kvp_seq_obj *s);

/* ---- coherence gating (gating/gating.h) of a sequence, and the public calls on heads (evict.c) ---- */
/* The state comes from kvp_seq_allocator: its bytes count in state_bytes. */
kvp_status kvp_gate_open(struct kvp_tenant_obj *t, struct kvp_seq_obj *s);
kvp_status kvp_gate_fork(struct kvp_tenant_obj *t, const struct kvp_seq_obj *src, struct kvp_seq_obj *s);
void kvp_gate_close(struct kvp_tenant_obj *t, struct kvp_seq_obj *s);
kvp_status kvp_seq_head_level_entered(struct kvp_seq_obj *s, uint32_t layer, uint32_t kv_head, kvp_head_level *out);
kvp_status kvp_seq_set_head_level_entered(struct kvp_seq_obj *s, uint32_t layer, uint32_t kv_head,
					   float aggressiveness);

/* ---- streams (stream.c) ---- */
/* Every token of a stream in order: positions, and keys and values as fp32 (either may be NULL). */
void kvp_stream_gather(const struct kvp_seq_obj *s, const struct kvp_stream *st, int32_t *pos, float *k, float *v);
void kvp_stream_release(struct kvp_tenant_obj *t, struct kvp_stream *s);
kvp_status kvp_stream_share(struct kvp_tenant_obj *t, struct kvp_stream *dst, const struct kvp_stream *src,
			    struct kvp_call *call);

/* ---- sequences ---- */
static inline struct kvp_stream *kvp_seq_stream(const struct kvp_seq_obj *s, uint32_t layer, uint32_t kv_head)
{
	return &s->streams[(size_t)layer * s->shape.n_kv_heads + kv_head];
}
/* A new sequence of t, open and linked to it (kvp_seq_open's work); the shape is checked first. */
kvp_status kvp_seq_create(struct kvp_tenant_obj *t, const kvp_shape *shape, struct kvp_seq_obj **out);
/* The same, not yet linked: nothing else (memory pressure) can see it until kvp_seq_link. */
kvp_status kvp_seq_create_unlinked(struct kvp_tenant_obj *t, const kvp_shape *shape, struct kvp_seq_obj **out);
void kvp_seq_link(struct kvp_tenant_obj *t, struct kvp_seq_obj *s);
void kvp_seq_destroy(struct kvp_seq_obj *s); /* without unlinking from the tenant */
void kvp_tenant_destroy(struct kvp_tenant_obj *t);

/*
 * ---- calls on a sequence (calls.c) ----
 * The public calls on a sequence are wrappers that enter the sequence (waiting while memory pressure is
 * parking it), bring back a sequence that pressure parked when the call needs its tokens, and run these:
 */
kvp_status kvp_append_resident(struct kvp_seq_obj *s, uint32_t layer, uint32_t n, const int32_t *pos, const float *k,
			       const float *v);
kvp_status kvp_attend_resident(struct kvp_seq_obj *s, uint32_t layer, const float *q, float *out);
kvp_status kvp_gather_resident(struct kvp_seq_obj *s, uint32_t layer, uint32_t kv_head, uint32_t cap, int32_t *pos,
			       float *k, float *v, uint32_t *n_out);
kvp_status kvp_seq_fork_resident(struct kvp_seq_obj *src, kvp_seq **out);
kvp_status kvp_seq_stats_entered(const struct kvp_seq_obj *s, kvp_stats *out);
kvp_status kvp_seq_step_entered(struct kvp_seq_obj *s);
void kvp_seq_close_entered(struct kvp_seq_obj *s);
/* Handles (handle.c): what the host holds instead of the address. get: KVP_EINVAL for NULL, KVP_EPERM
 * for a closed handle, a handle of another kind or a value that never was one. take: get, and the handle
 * is closed at once, so of two closes racing on one handle exactly one gets the object. new: 0 with
 * KVP_ENOMEM set when the table is full; *index names the slot for kvp_handle_free. */
enum kvp_handle_kind { KVP_HANDLE_POOL = 1, KVP_HANDLE_TENANT, KVP_HANDLE_SEQ };
uintptr_t kvp_handle_new(enum kvp_handle_kind kind, void *obj, uint32_t *index);
void kvp_handle_free(uint32_t index);
kvp_status kvp_handle_get(enum kvp_handle_kind kind, const void *h, const char *call, void **out);
kvp_status kvp_handle_take(enum kvp_handle_kind kind, const void *h, const char *call, void **out);
/* Makes handles opened before a fork() refused in the child (handle.c says how); called by each pool open. */
void kvp_handle_fork_guard(void);
/* h retired when it names an object opened before this process forked (a close that took no object). */
void kvp_handle_retire_inherited(enum kvp_handle_kind kind, const void *h);
/* The pool or tenant behind an open handle, or NULL: for white-box tests that look inside. */
struct kvp_pool_obj *kvp_pool_from_handle(const kvp_pool *h);
struct kvp_tenant_obj *kvp_tenant_from_handle(const kvp_tenant *h);
int kvp_seq_handle_new(struct kvp_seq_obj *s);
void kvp_seq_handle_free(struct kvp_seq_obj *s);
kvp_status kvp_seq_handle_get(const kvp_seq *h, const char *call, struct kvp_seq_obj **out);
/* The sequence behind an open handle, or NULL: for white-box tests that look inside. */
struct kvp_seq_obj *kvp_seq_from_handle(const kvp_seq *h);
/* For tests and benchmarks: what the device of the pool behind a handle does (0 without one), and
 * faults injected into it (tier/spill.h). */
int kvp_spill_is_direct(const kvp_pool *pool);
int kvp_spill_is_registered(const kvp_pool *pool);
uint64_t kvp_spill_pages_used(const kvp_pool *pool);
uint64_t kvp_spill_pages_total(const kvp_pool *pool);
void kvp_spill_inject(kvp_pool *pool, const struct kvp_spill_faults *f);

/*
 * ---- the prefix cache (prefix.c) ----
 * One table per pool, guarded by its own lock, of prompt units (the sink block, then blocks of `block`
 * tokens) registered by the sequences kvp_seq_open_prefix opened: each entry holds one block reference
 * per stream, the unit's token ids and its chain hash. Entries are their registering tenant's (their
 * bookkeeping is charged to it as metadata); pressure frees the ones no sequence holds first.
 */
kvp_status kvp_prefix_table_open(struct kvp_pool_obj *pool);
void kvp_prefix_table_close(struct kvp_pool_obj *pool);
/* kvp_seq_open_prefix's work, for a tenant with prefix=on. */
kvp_status kvp_prefix_open_check(uint32_t n, const int32_t *tokens, const void *out, const uint32_t *n_cached);
/* Installs what the cache holds of the prompt into s, a new sequence of t not linked yet, and prepares
 * the registration of the rest. On failure s holds nothing of the cache (destroy it). */
kvp_status kvp_prefix_seq_fill(struct kvp_tenant_obj *t, struct kvp_seq_obj *s, uint32_t n, const int32_t *tokens,
			       uint32_t *n_cached);
/* append: takes the stream's prompt blocks that are full, before its cold conversion may replace them. */
void kvp_prefix_capture(const struct kvp_seq_obj *s, struct kvp_stream *st);
/* after an append: registers the prompt's units that every stream holds now. */
void kvp_prefix_register(struct kvp_seq_obj *s);
void kvp_prefix_prompt_free(struct kvp_seq_obj *s);
size_t kvp_prefix_prompt_bytes(const struct kvp_seq_obj *s); /* its metadata, as allocated */
/* The relief hook of a tenant with prefix=on: its cached entries no sequence holds first, then
 * kvp_pressure_relieve when the pool has a spill device. */
int kvp_prefix_relieve(struct kvp_tenant_obj *t, uint64_t bytes, struct kvp_call *call);
void kvp_prefix_drop_tenant(struct kvp_tenant_obj *t);
/* Bytes of blocks of t's entries that no sequence holds. */
uint64_t kvp_prefix_bytes_cached(const struct kvp_tenant_obj *t);
/*
 * Records of cached units, for a tier beyond the pool (a remote store): an entry's chain hashes, token
 * ids and every stream's block as stored, under a CRC32C (prefix.c). record_make: unit u of the prompt
 * `tokens` as t finds it in the cache, written to *rec (malloc'd; the caller frees). record_install:
 * checks a record (CRC32C, sizes, and its hash recomputed from t's own identity, the parent hash and the
 * ids: another model, shape or tenant namespace is KVP_ECORRUPT) and adds it to the cache as t's entry,
 * in t's memory; KVP_EINVAL when its parent unit is not cached (a chain installs from its start).
 */
kvp_status kvp_prefix_record_make(struct kvp_tenant_obj *t, const kvp_shape *shape, const int32_t *tokens,
				  uint32_t unit, void **rec, size_t *bytes);
kvp_status kvp_prefix_record_install(struct kvp_tenant_obj *t, const kvp_shape *shape, const int32_t *tokens,
				     uint32_t unit, const void *rec, size_t bytes);

/* ---- configuration ---- */
kvp_status kvp_tenant_config_parse(struct kvp_tenant_config *cfg, uint64_t *quota, const char *spec);
kvp_status kvp_shape_check(const kvp_shape *shape);

#endif /* KVP_PAGER_H */
