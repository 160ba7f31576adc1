/*
 * pager/ — pools, tenants, sequences, streams and blocks.
 *
 * Memory: every byte a sequence holds is allocated from its tenant's jemalloc arena and charged to the
 * tenant and the pool before it is allocated, so an append that would pass a limit fails before it
 * changes anything. Its policy and codecs get theirs the same way, through the allocator the sequence
 * hands them (kvp_seq_allocator), and it shows in the sequence's bytes_meta. Blocks are reference
 * counted so forks share them; a shared block is copied before it is written (copy-on-write).
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
#include "pager/spill.h"
#include "policies/policy.h"

#define KVP_BLOCK_MAX 4096 /* tokens per block, and per sink block */
#define KVP_GROUP_MAX 128  /* query heads per KV head */
#define KVP_HEAD_DIM_MAX 1024
/* tokens one stream may hold: positions are int32_t, and every token and block count of a stream stays
 * far enough below 2^32 that uint32_t arithmetic on it cannot wrap */
#define KVP_STREAM_TOKENS_MAX INT32_MAX

enum kvp_bytes_kind { KVP_BYTES_EXACT, KVP_BYTES_COMPRESSED, KVP_BYTES_META, KVP_BYTES_KINDS };

enum kvp_store { KVP_STORE_FP32, KVP_STORE_FP16, KVP_STORE_CODEC };

#define KVP_CODEC_SPEC_MAX 256

struct kvp_pool {
	uint32_t magic;
	uint32_t handle_index; /* its slot in the handle table (handle.c) */
	kvp_pool *handle;      /* what the host holds */
	uint64_t limit; /* UINT64_MAX when unlimited */
	_Atomic uint64_t used;
	int numa_node; /* -1 when not placed */
	pthread_mutex_t lock; /* guards the tenant list */
	struct kvp_tenant *tenants;
	struct kvp_spill *spill; /* NULL without spill= */
};

struct kvp_tenant_config {
	uint32_t block, sinks, window;
	enum kvp_store store;
	/* codec specs of the cold tier, "" when not set; either set means the tier exists and the other side
	 * is stored as store= says */
	char k_spec[KVP_CODEC_SPEC_MAX], v_spec[KVP_CODEC_SPEC_MAX];
	char policy_spec[KVP_CODEC_SPEC_MAX]; /* "" when every token is kept */
	uint32_t pin_prompt;
	enum kvp_gate { KVP_GATE_OFF, KVP_GATE_MRL, KVP_GATE_ENTROPY } gate;
	struct kvp_ladder ladder;             /* n == 0 without ladder= (ladder.c) */
	char ladder_spec[KVP_CODEC_SPEC_MAX]; /* its text, for messages */
};

struct kvp_tenant {
	uint32_t magic;
	uint32_t handle_index; /* its slot in the handle table (handle.c) */
	kvp_tenant *handle;    /* what the host holds */
	struct kvp_pool *pool;
	struct kvp_tenant *next;
	char name[64];
	unsigned arena;
	int flags; /* MALLOCX_ARENA(arena) | MALLOCX_TCACHE_NONE */
	uint64_t quota;
	_Atomic uint64_t used;
	_Atomic uint64_t bytes[KVP_BYTES_KINDS];
	_Atomic uint64_t tokens_appended, tokens_retained, bytes_dense_fp16;
	struct kvp_tenant_config cfg;
	struct kvp_policy_shared *policy_shared; /* kvp_evict_prepare's; read-only until the tenant closes */
	pthread_mutex_t lock; /* guards the sequence list */
	struct kvp_seq *seqs;
	_Atomic uint64_t bytes_spilled; /* records on the spill device, each counted once */
	uint64_t spill_id; /* names the tenant in slot headers; 0 until its first park */
	_Atomic uint64_t clock; /* ticks once per call on any of its sequences */
};

struct kvp_block {
	_Atomic uint32_t refs;
	uint32_t n, cap;
	enum kvp_store store;
	size_t size;      /* the header allocation (this struct and pos), as asked of jemalloc */
	size_t data_size; /* the allocation k and v live in, as asked */
	size_t payload;   /* bytes of k and v together, as counted in stats */
	uint32_t level;   /* codec-encoded blocks: the ladder level whose codecs encoded it (0 without) */
	int32_t *pos;
	void *k, *v; /* [cap][head_dim] in the block's store, or the codecs' bytes for n tokens */
	/* Non-NULL while the block is spilled (restore.c): k and v are NULL, the allocation they lived in
	 * is freed, and this record holds their bytes; the header (n, cap, positions) stays in memory.
	 * Only private blocks are spilled, so only their sequence ever sees this. */
	struct kvp_spilled *spilled;
	size_t v_offset; /* where v starts in the allocation k points to: what a restore rebuilds */
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
	uint32_t scores_cap;       /* floats of scores: one block's tokens x group, at most KVP_BLOCK_MAX */
	size_t scratch_bytes;
	void *scratch; /* scores_cap floats, then group x qprep_max bytes, then group x acc_max floats */
};

struct kvp_seq {
	uint32_t magic;
	struct kvp_tenant *tenant;
	struct kvp_seq *next;
	kvp_shape shape;
	uint32_t group; /* query heads per KV head */
	struct kvp_stream *streams; /* [n_layers][n_kv_heads] */
	uint64_t tokens_appended;
	struct kvp_cold cold; /* codecs NULL when the tenant has no k= or v= */
	struct kvp_policy *policy; /* NULL when every token is kept */
	/* Bytes the policy and the codecs hold for this sequence (their state and buffers), as allocated
	 * through kvp_seq_allocator: charged to the tenant as metadata and counted in the sequence's bytes_meta. */
	uint64_t state_bytes;
	struct kvp_gating *gating; /* NULL when gate=off */
	int64_t t0;                /* one past the highest position appended */
	int32_t prompt_end;        /* the prompt's end, fixed at the first kvp_seq_step; -1 before */
	struct kvp_observe_buf {   /* what attend hands the policy: weights over one stream */
		uint32_t cap;
		size_t bytes;
		float *weights; /* [group][cap] */
		int32_t *pos;   /* [cap] */
	} observe;
	/* One stream's positions, fp32 keys and verdict for single-stream policy rounds, kept between rounds
	 * (charged as metadata) so a long stream's round does not fault in fresh pages each time (evict.c). */
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
	_Atomic int parked_flag; /* parked != NULL, for pressure.c to read without entering the sequence */
	uint32_t handle_index; /* its slot in the handle table (handle.c) */
	kvp_seq *handle;       /* what the host holds */
	_Atomic uint32_t calls; /* public calls in progress, or KVP_SEQ_CLAIMED (pressure.c) */
	_Atomic uint64_t last_use; /* the tenant's clock at the last call: pressure spills the oldest */
	/* Blocks spilled one by one under pressure (restore.c), read back before use. Touched only by the
	 * thread that entered the sequence (or claimed it). */
	uint32_t n_spilled;          /* blocks whose record is on the device, in flight or not: attend's one branch */
	uint32_t pin_from, pin_to;   /* layers pressure must not spill from: the ones a call is using */
	struct kvp_restore *restore; /* reads in flight (the prefetched layer), or NULL */
};

#define KVP_POOL_MAGIC 0x6b76706fu
#define KVP_TENANT_MAGIC 0x6b767074u
#define KVP_SEQ_MAGIC 0x6b767073u

/* ---- tenant memory: charge first, then allocate from the tenant's arena ---- */
kvp_status kvp_charge(struct kvp_tenant *t, uint64_t bytes);
void kvp_uncharge(struct kvp_tenant *t, uint64_t bytes);
size_t kvp_alloc_size(const struct kvp_tenant *t, size_t bytes); /* what jemalloc will really give */
/* Charged allocation: payload bytes count under kind, the rest (headers, size-class slack) as
 * metadata. NULL with KVP_ENOMEM set on failure. kvp_free takes the same three numbers. */
void *kvp_alloc(struct kvp_tenant *t, size_t bytes, enum kvp_bytes_kind kind, size_t payload);
void kvp_free(struct kvp_tenant *t, void *p, size_t bytes, enum kvp_bytes_kind kind, size_t payload);
/* What the sequence hands its policy and codecs: kvp_alloc/kvp_free as metadata, counted in state_bytes. */
struct kvp_allocator kvp_seq_allocator(struct kvp_seq *s);
kvp_status kvp_arena_create(const struct kvp_pool *pool, unsigned *arena);
void kvp_arena_destroy(unsigned arena);
int kvp_arena_flags(unsigned arena);
/* KVP_EUNSUPPORTED where the machine has no NUMA, KVP_EINVAL for a node it does not have. */
kvp_status kvp_numa_check(int node);

/* ---- blocks ---- */
struct kvp_block *kvp_block_new(struct kvp_tenant *t, uint32_t cap, uint32_t dim, enum kvp_store store);
/* A block for n encoded tokens: positions, then k_bytes of keys and v_bytes of values. */
struct kvp_block *kvp_block_new_cold(struct kvp_tenant *t, uint32_t n, size_t k_bytes, size_t v_bytes);
/* A private copy of b with the same tokens (copy-on-write); b is exact (cold blocks are never written). */
struct kvp_block *kvp_block_copy(struct kvp_tenant *t, const struct kvp_block *b, uint32_t dim);
void kvp_block_get(struct kvp_block *b);
void kvp_block_put(struct kvp_tenant *t, struct kvp_block *b);
size_t kvp_block_token_bytes(const struct kvp_block *b); /* k and v storage */
size_t kvp_block_bytes(const struct kvp_tenant *t, const struct kvp_block *b); /* both allocations */
/* Writes rows [at, at+n) of the block from fp32 k/v with the given row stride (floats). */
void kvp_block_write(struct kvp_block *b, uint32_t at, uint32_t n, uint32_t dim, const int32_t *pos,
		     const float *k, const float *v, size_t stride);

/* ---- the cold tier (cold.c) ---- */
struct kvp_cold_plan {
	uint32_t n;                /* blocks that turn cold with this append */
	struct kvp_block **blocks; /* their encoded blocks, allocated */
	struct kvp_stream_ctx *ctx; /* allocated when the stream has none yet */
	float *rows;               /* fp32 scratch for one block of k and one of v */
};
/* KVP_EINVAL naming the spec when a codec cannot serve blocks of `block` tokens. */
kvp_status kvp_cold_check(const struct kvp_tenant_config *cfg);
kvp_status kvp_cold_open(struct kvp_tenant *t, struct kvp_seq *s);
void kvp_cold_close(struct kvp_tenant *t, struct kvp_seq *s);
/* Allocate what turning blocks cold needs once `add` more tokens land in the stream's blocks. */
kvp_status kvp_cold_plan(struct kvp_tenant *t, const struct kvp_seq *s, const struct kvp_stream *st,
			 uint32_t add, struct kvp_cold_plan *p);
void kvp_cold_unwind(struct kvp_tenant *t, struct kvp_cold_plan *p);
/* Encode the planned blocks after the exact tokens are written. Cannot fail: a block that does not
 * encode stays exact, and the plan's leftovers are freed. */
void kvp_cold_commit(struct kvp_tenant *t, const struct kvp_seq *s, struct kvp_stream *st,
		     struct kvp_cold_plan *p);
void kvp_stream_ctx_put(struct kvp_tenant *t, struct kvp_stream_ctx *c);
/* Keeps the group's queries (group x head_dim) for the stream's first fit, when the key codec wants them. */
void kvp_cold_note_queries(struct kvp_seq *s, struct kvp_stream *st, const float *q);
void kvp_cold_forget_queries(struct kvp_tenant *t, struct kvp_stream *st);
void kvp_cold_gather(const struct kvp_seq *s, const struct kvp_stream *st, const struct kvp_block *b,
		     float *k, float *v);

/* ---- token policies (evict.c) ---- */
kvp_status kvp_evict_check(const struct kvp_tenant_config *cfg);
/* At tenant open and close: what every sequence's policy shares (a stats file, read once). */
kvp_status kvp_evict_prepare(struct kvp_tenant *t);
void kvp_evict_unprepare(struct kvp_tenant *t);
kvp_status kvp_evict_open(struct kvp_tenant *t, struct kvp_seq *s);
void kvp_evict_close(struct kvp_tenant *t, struct kvp_seq *s);
kvp_status kvp_evict_fork(struct kvp_tenant *t, const struct kvp_seq *src, struct kvp_seq *s);
/* Rounds that are due, then the cold conversion of what they scored. */
kvp_status kvp_evict_step(struct kvp_seq *s);
/* Room for attend's observation of streams of up to n tokens; KVP_ENOMEM leaves the old buffer. */
kvp_status kvp_observe_reserve(struct kvp_seq *s, uint32_t n);
/* Every token of a stream in order: positions, and keys and values as fp32 (either may be NULL). */
void kvp_stream_gather(const struct kvp_seq *s, const struct kvp_stream *st, int32_t *pos, float *k, float *v);

/* ---- ladders of codec bits (ladder.c) ---- */
kvp_status kvp_ladder_config(struct kvp_args *args, struct kvp_tenant_config *cfg);
kvp_status kvp_ladder_check(const struct kvp_tenant_config *cfg);
/* The level new cold blocks of st are encoded at, and the level a head is at (0 without a ladder). */
uint32_t kvp_ladder_stream_level(const struct kvp_seq *s, const struct kvp_stream *st);
uint32_t kvp_ladder_head_level(const struct kvp_seq *s, uint32_t layer, uint32_t kv_head);
/* The k= or v= spec with bits=N on every codec of the stack that takes bits; *changed counts them. */
kvp_status kvp_ladder_spec_bits(const char *spec, unsigned bits, char *out, size_t cap, unsigned *changed);

/* ---- coherence gating (gate.c) ---- */
/* Per (layer, KV head): coherence measured so far, the host's override, and the budget it yields. */
struct kvp_gating {
	size_t bytes;
	double *coherence;   /* [layers][kv_heads] in [0, 1] */
	uint32_t *samples;   /* entropy observations folded into coherence */
	float *override;     /* aggressiveness set through kvp_seq_set_head_level, or -1 */
	uint32_t *budget;    /* the stream's budget at the last step, 0 before */
};
kvp_status kvp_gate_check(const struct kvp_tenant_config *cfg);
kvp_status kvp_gate_open(struct kvp_tenant *t, struct kvp_seq *s);
void kvp_gate_close(struct kvp_tenant *t, struct kvp_seq *s);
kvp_status kvp_gate_fork(struct kvp_tenant *t, const struct kvp_seq *src, struct kvp_seq *s);
/* attend's final softmax weights of one stream ([group][n]) for gate=entropy */
void kvp_gate_observe(struct kvp_seq *s, uint32_t layer, uint32_t kv_head, uint32_t n, const float *weights);
/* Recomputes every stream's budget for this step; the rounds then use kvp_gate_budget. */
kvp_status kvp_gate_step(struct kvp_seq *s);
uint32_t kvp_gate_budget(const struct kvp_seq *s, uint32_t layer, uint32_t kv_head); /* 0: the policy's */
int kvp_gate_wants_weights(const struct kvp_seq *s);
kvp_status kvp_seq_head_level_entered(struct kvp_seq *s, uint32_t layer, uint32_t kv_head, kvp_head_level *out);
kvp_status kvp_seq_set_head_level_entered(struct kvp_seq *s, uint32_t layer, uint32_t kv_head, float aggressiveness);

/* ---- streams ---- */
void kvp_stream_release(struct kvp_tenant *t, struct kvp_stream *s);
kvp_status kvp_stream_share(struct kvp_tenant *t, struct kvp_stream *dst, const struct kvp_stream *src);

/* ---- sequences ---- */
struct kvp_stream *kvp_seq_stream(const struct kvp_seq *s, uint32_t layer, uint32_t kv_head);
void kvp_seq_destroy(struct kvp_seq *s); /* without unlinking from the tenant */
void kvp_tenant_destroy(struct kvp_tenant *t);

/*
 * ---- calls on a sequence (pressure.c) ----
 * The public calls on a sequence are wrappers that enter the sequence (waiting while memory pressure is
 * parking it), bring back a sequence that pressure parked when the call needs its tokens, and run these:
 */
kvp_status kvp_append_resident(kvp_seq *s, uint32_t layer, uint32_t n, const int32_t *pos, const float *k,
			       const float *v);
kvp_status kvp_attend_resident(kvp_seq *s, uint32_t layer, const float *q, float *out);
kvp_status kvp_gather_resident(kvp_seq *s, uint32_t layer, uint32_t kv_head, uint32_t cap, int32_t *pos,
			       float *k, float *v, uint32_t *n_out);
kvp_status kvp_seq_fork_resident(kvp_seq *src, kvp_seq **out);
kvp_status kvp_seq_stats_entered(const kvp_seq *s, kvp_stats *out);
kvp_status kvp_seq_step_entered(kvp_seq *s);
void kvp_seq_close_entered(kvp_seq *s);
/* Handles (handle.c): what the host holds instead of the address. get: KVP_EINVAL for NULL, KVP_EPERM
 * for a closed handle, a handle of another kind or a value that never was one. take: get, and the handle
 * is closed at once, so of two closes racing on one handle exactly one gets the object. new: 0 with
 * KVP_ENOMEM set when the table is full; *index names the slot for kvp_handle_free. */
enum kvp_handle_kind { KVP_HANDLE_POOL = 1, KVP_HANDLE_TENANT, KVP_HANDLE_SEQ };
uintptr_t kvp_handle_new(enum kvp_handle_kind kind, void *obj, uint32_t *index);
void kvp_handle_free(uint32_t index);
kvp_status kvp_handle_get(enum kvp_handle_kind kind, const void *h, const char *call, void **out);
kvp_status kvp_handle_take(enum kvp_handle_kind kind, const void *h, const char *call, void **out);
/* The pool or tenant behind an open handle, or NULL: for white-box tests that look inside. */
struct kvp_pool *kvp_pool_from_handle(const kvp_pool *h);
struct kvp_tenant *kvp_tenant_from_handle(const kvp_tenant *h);
int kvp_seq_handle_new(struct kvp_seq *s);
void kvp_seq_handle_free(struct kvp_seq *s);
kvp_status kvp_seq_handle_get(const kvp_seq *h, const char *call, struct kvp_seq **out);
/* The sequence behind an open handle, or NULL: for white-box tests that look inside. */
struct kvp_seq *kvp_seq_from_handle(const kvp_seq *h);
/* Internal park and unpark of an entered (or claimed) sequence. */
kvp_status kvp_park_sequence(struct kvp_seq *s);
kvp_status kvp_unpark_sequence(struct kvp_seq *s);

/* Charging mode of the calling thread, set by the spill code around its own allocations:
 * NO_RELIEF: a failed charge does not try to spill (inside the device lock, or already relieving). */
enum { KVP_CHARGE_NO_RELIEF = 1 };
extern _Thread_local unsigned kvp_charge_mode;
/* Until end, the calling thread's charges to t, up to cap bytes, are paid from the memory the spill in
 * progress frees (arena.c): the metadata of a spill never takes a tenant past its quota. */
void kvp_prepay_begin(const struct kvp_tenant *t, uint64_t cap);
void kvp_prepay_end(struct kvp_tenant *t);
/* Relieves memory pressure on t (never another tenant's) to make room for bytes: blocks of its least
 * recently used idle sequence first, then that sequence whole, then the calling sequence's own oldest cold
 * blocks. Returns nonzero when it freed something, so the caller charges again. */
int kvp_pressure_relieve(struct kvp_tenant *t, uint64_t bytes);
/* What pressure spilled and parked during the calling thread's current public call (reset when a call
 * enters and leaves): a KVP_ENOMEM that follows says so. */
enum kvp_spill_reach { KVP_SPILL_IDLE, KVP_SPILL_OWN_COLD, KVP_SPILL_REACHES };
struct kvp_pressure_tally {
	uint32_t blocks[KVP_SPILL_REACHES]; /* blocks spilled, by whose */
	uint32_t parked;                    /* idle sequences parked whole */
	uint64_t bytes;                     /* records written */
};
extern _Thread_local struct kvp_pressure_tally kvp_pressure_tally;

/* ---- blocks of a resident sequence on the spill device (restore.c) ---- */
/* The sequence whose public call this thread is running (pressure.c), or NULL. */
extern _Thread_local struct kvp_seq *kvp_calling_seq;
/* Spills the oldest private blocks of s within reach, at least `bytes` of memory when there are that
 * many. KVP_SPILL_IDLE: s is claimed by pressure; every block but sinks and tails. KVP_SPILL_OWN_COLD: s
 * is the caller; only cold blocks outside its pinned layers. Returns how many blocks it spilled. */
size_t kvp_spill_blocks(struct kvp_seq *s, uint64_t bytes, enum kvp_spill_reach reach);
/* attend: brings back layer's spilled blocks (waiting for the prefetch when it read them) and starts
 * the reads of the next layer's. KVP_EIO, KVP_ECORRUPT or KVP_ENOMEM leave the failed blocks spilled. */
kvp_status kvp_restore_layer(struct kvp_seq *s, uint32_t layer);
/* append: brings back layer's spilled exact blocks, the ones its cold conversion may encode. */
kvp_status kvp_restore_exact(struct kvp_seq *s, uint32_t layer);
/* Every spilled block back in memory (fork, step, gather need them). */
kvp_status kvp_restore_all(struct kvp_seq *s);
/* Waits for reads in flight and files them; on any path that may free or park the sequence's blocks. */
void kvp_restore_settle(struct kvp_seq *s);
/* Block side (block.c): drop the rows of a private block whose record is written, or take new rows. */
void kvp_block_spill_out(struct kvp_tenant *t, struct kvp_block *b, struct kvp_spilled *stub);
kvp_status kvp_block_rows_alloc(struct kvp_tenant *t, struct kvp_block *b);
void kvp_block_rows_free(struct kvp_tenant *t, struct kvp_block *b);

/* ---- configuration ---- */
kvp_status kvp_tenant_config_parse(struct kvp_tenant_config *cfg, uint64_t *quota, const char *spec);
kvp_status kvp_shape_check(const kvp_shape *shape);

#endif /* KVP_PAGER_H */
