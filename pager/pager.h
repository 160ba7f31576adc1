/*
 * pager/ — pools, tenants, sequences, streams and blocks.
 *
 * Memory: every byte a sequence holds is allocated from its tenant's jemalloc arena and charged to the
 * tenant and the pool before it is allocated, so an append that would pass a limit fails before it
 * changes anything. Blocks are reference counted so forks share them; a shared block is copied before
 * it is written (copy-on-write).
 *
 * A stream is one (layer, KV head) of a sequence:
 *   sink block   the first `sinks` tokens, exact, never evicted
 *   blocks[]     the rest in position order, `block` tokens each; the last `window` tokens are the hot
 *                window. Exact storage (store=fp32|fp16) for now; cold codec-encoded blocks come later.
 */
#ifndef KVP_PAGER_H
#define KVP_PAGER_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "base/base.h"
#include "pager/spill.h"

/* ---- jemalloc, loaded at pool open (see arena.c for why not linked) ---- */
struct kvp_jemalloc {
	void *(*mallocx)(size_t size, int flags);
	void (*dallocx)(void *ptr, int flags);
	size_t (*nallocx)(size_t size, int flags);
	int (*mallctl)(const char *name, void *oldp, size_t *oldlenp, void *newp, size_t newlen);
};
kvp_status kvp_jemalloc_load(const struct kvp_jemalloc **out);

#define KVP_BLOCK_MAX 4096 /* tokens per block, and per sink block */
#define KVP_GROUP_MAX 128  /* query heads per KV head */
#define KVP_HEAD_DIM_MAX 1024

enum kvp_bytes_kind { KVP_BYTES_EXACT, KVP_BYTES_COMPRESSED, KVP_BYTES_META, KVP_BYTES_KINDS };

enum kvp_store { KVP_STORE_FP32, KVP_STORE_FP16 };

struct kvp_pool {
	uint32_t magic;
	const struct kvp_jemalloc *je;
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
};

struct kvp_tenant {
	uint32_t magic;
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
	size_t size; /* the whole allocation, as jemalloc sized it */
	int32_t *pos;
	void *k, *v; /* [cap][head_dim] in the block's store */
};

struct kvp_stream {
	uint32_t n_tokens;
	struct kvp_block *sink;
	uint32_t n_blocks, cap_blocks;
	struct kvp_block **blocks;
};

struct kvp_seq {
	uint32_t magic;
	struct kvp_tenant *tenant;
	struct kvp_seq *next;
	kvp_shape shape;
	uint32_t group; /* query heads per KV head */
	struct kvp_stream *streams; /* [n_layers][n_kv_heads] */
	uint64_t tokens_appended;
	struct kvp_parked *parked; /* non-NULL while parked: its blocks are on the spill device */
	uint64_t spill_id; /* names the sequence in slot headers; 0 until its first park */
	int pressure_parked; /* parked by memory pressure, not by the host: unparked on next use */
	_Atomic int parked_flag; /* parked != NULL, for pressure.c to read without entering the sequence */
	uint32_t handle_index; /* its slot in the handle table (handle.c) */
	kvp_seq *handle;       /* what the host holds */
	_Atomic uint32_t calls; /* public calls in progress, or KVP_SEQ_CLAIMED (pressure.c) */
	_Atomic uint64_t last_use; /* the tenant's clock at the last call: pressure spills the oldest */
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
kvp_status kvp_arena_create(const struct kvp_pool *pool, unsigned *arena);
void kvp_arena_destroy(const struct kvp_pool *pool, unsigned arena);
int kvp_arena_flags(unsigned arena);
/* KVP_EUNSUPPORTED where the machine has no NUMA, KVP_EINVAL for a node it does not have. */
kvp_status kvp_numa_check(int node);

/* ---- blocks ---- */
size_t kvp_block_size(const struct kvp_tenant *t, uint32_t cap, uint32_t dim, enum kvp_store store);
struct kvp_block *kvp_block_new(struct kvp_tenant *t, uint32_t cap, uint32_t dim, enum kvp_store store);
/* A private copy of b with the same tokens (copy-on-write). */
struct kvp_block *kvp_block_copy(struct kvp_tenant *t, const struct kvp_block *b, uint32_t dim);
void kvp_block_get(struct kvp_block *b);
void kvp_block_put(struct kvp_tenant *t, struct kvp_block *b, uint32_t dim);
size_t kvp_block_token_bytes(const struct kvp_block *b, uint32_t dim); /* k and v storage */
/* Writes rows [at, at+n) of the block from fp32 k/v with the given row stride (floats). */
void kvp_block_write(struct kvp_block *b, uint32_t at, uint32_t n, uint32_t dim, const int32_t *pos,
		     const float *k, const float *v, size_t stride);

/* ---- streams ---- */
void kvp_stream_release(struct kvp_tenant *t, struct kvp_stream *s, uint32_t dim);
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
 * for a closed handle or a value that never was one. new: 0 with KVP_ENOMEM set when the table is full. */
int kvp_seq_handle_new(struct kvp_seq *s);
void kvp_seq_handle_free(struct kvp_seq *s);
kvp_status kvp_seq_handle_get(const kvp_seq *h, const char *call, struct kvp_seq **out);
/* Internal park and unpark of an entered (or claimed) sequence. */
kvp_status kvp_park_sequence(struct kvp_seq *s);
kvp_status kvp_unpark_sequence(struct kvp_seq *s);

/* Charging mode of the calling thread, set by the spill code around its own allocations:
 * NO_RELIEF: a failed charge does not try to spill (inside the device lock, or already relieving);
 * OVERDRAFT: park's own tables are charged past the limits, because parking is what frees memory. */
enum { KVP_CHARGE_NO_RELIEF = 1, KVP_CHARGE_OVERDRAFT = 2 };
extern _Thread_local unsigned kvp_charge_mode;
/* Parks the least recently used idle sequence of t (never another tenant's) to make room for bytes.
 * Returns nonzero when it parked one, so the caller charges again. */
int kvp_pressure_relieve(struct kvp_tenant *t, uint64_t bytes);

/* ---- configuration ---- */
kvp_status kvp_tenant_config_parse(struct kvp_tenant_config *cfg, uint64_t *quota, const char *spec);
kvp_status kvp_shape_check(const kvp_shape *shape);

#endif /* KVP_PAGER_H */
