/*
 * kvpager.h — the public interface of libkvpager.
 *
 * kvpager holds the key/value cache of transformer inference in block-paged memory and shrinks it on
 * three axes: fewer tokens (policies), fewer bits (codecs), fewer channels (SparK).
 *
 * Conventions
 *   - Every call that can fail returns a kvp_status. On failure, kvp_last_error() returns a message for
 *     the calling thread naming what was wrong; the objects involved are left exactly as they were.
 *   - Handles are opaque. Passing NULL where a handle is expected returns KVP_EINVAL (a no-op for the
 *     close calls). Pool, tenant and sequence handles carry a generation: after the object's close (or,
 *     for a tenant or sequence, its pool's or tenant's close) every call with the handle returns
 *     KVP_EPERM without touching memory and closing it again is a no-op, even when a newer object now
 *     lives at the same address; so does a handle of another kind (a sequence handle passed as a tenant)
 *     and a value that never was a handle. Of two closes of one pool or tenant racing from two threads,
 *     one closes it and the other is a no-op. With 32-bit pointers a generation has 15 bits, so a handle
 *     could name a newer object again after 32768 objects have used its slot since.
 *   - Calls on different sequences may run concurrently from different threads. Calls on one sequence
 *     must not overlap: the caller serializes them (one decode loop per sequence is the normal case).
 *     Opening and closing tenants and sequences may run from any thread; closing a pool or tenant must
 *     not overlap calls on what it contains.
 *   - Configuration strings follow one grammar: key=value pairs separated by commas; a value may be
 *     name(args) with the same grammar inside; codec stacks are joined by '|'. Unknown keys are errors.
 */
#ifndef KVPAGER_H
#define KVPAGER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define KVP_API __attribute__((visibility("default")))
#else
#define KVP_API
#endif

typedef struct kvp_pool kvp_pool;
typedef struct kvp_tenant kvp_tenant;
typedef struct kvp_seq kvp_seq;
typedef struct kvp_codec kvp_codec;
typedef struct kvp_policy kvp_policy;

typedef enum {
	KVP_OK = 0,
	KVP_EINVAL = -1,       /* bad argument, spec, shape or handle */
	KVP_ENOMEM = -2,       /* quota, pool limit or the system is out of memory */
	KVP_EIO = -3,          /* the spill device failed */
	KVP_ECORRUPT = -4,     /* spilled or loaded data failed its checks */
	KVP_EPERM = -5,        /* a handle used outside its owner */
	KVP_EUNSUPPORTED = -6, /* valid request this build does not serve yet */
	KVP_EABI = -7,         /* host and library disagree on a structure version */
	KVP_EBUSY = -8         /* another call on the same sequence is in progress; kvp_pool_flush: not yet */
} kvp_status;

typedef enum { KVP_ROPE_HALF = 0, KVP_ROPE_INTERLEAVED = 1 } kvp_rope_layout;

/* The attention geometry of one model. n_heads must be a multiple of n_kv_heads (GQA). */
typedef struct {
	uint32_t n_layers, n_heads, n_kv_heads, head_dim;
	float rope_theta;
	kvp_rope_layout rope_layout;
} kvp_shape;

/* Static description of a status; never NULL. */
KVP_API const char *kvp_strerror(kvp_status s);
/* Detail of the last failure on this thread ("" when none); valid until the next failing call. */
KVP_API const char *kvp_last_error(void);

/*
 * Pool: all cache memory of one process.
 *   mem=SIZE        global byte limit over all tenants (default: unlimited); SIZE takes B, KiB, MiB, GiB
 *   numa=N          place block memory on NUMA node N (a no-op with a note where NUMA is absent)
 *   spill=PATH      the spill device, written with O_DIRECT through io_uring (buffered, with a note in
 *                   kvp_last_error, where the file system refuses O_DIRECT; KVP_EUNSUPPORTED where
 *                   io_uring is not permitted). PATH may name:
 *                   - a directory: an unnamed file in it (O_TMPFILE): nothing to remove at close, nothing
 *                     left after a crash (KVP_EUNSUPPORTED where the file system has no O_TMPFILE);
 *                   - nothing yet: a file created there with mode 0600 (never through a symbolic link),
 *                     removed at close only if the path still names that same file;
 *                   - a block device: used as it is, and kept;
 *                   - a spill file this library made (its last page holds the library's label; one left
 *                     by a crashed process, say) owned by this user with no group or other permissions:
 *                     its contents are discarded, and it is reused and kept.
 *                   Anything else (a symbolic link, a FIFO, a file without the label, one others may
 *                   read) is KVP_EINVAL and left untouched: every check comes before any change.
 *                   Files are preallocated to spill_max plus one 4 KiB page for the label.
 *   spill_max=SIZE  bytes of the spill device to use for blocks (at least 64KiB; KVP_EINVAL before the
 *                   path is touched otherwise); required with spill=
 *   spill_buffer=SIZE  staging for spill I/O, registered with io_uring (default 2MiB; larger is faster
 *                   where RLIMIT_MEMLOCK allows it, and falls back to unregistered I/O where it does not)
 *   remote=URL      a shared remote tier on Redis, the prefix cache's (the pool holds one client of it):
 *                   redis://HOST:PORT, one server, or redis-cluster://HOST:PORT[|HOST:PORT...], seeds of a
 *                   Redis Cluster ('|' between seeds: ',' separates the keys of this spec, unless the value
 *                   is in parentheses: remote=(redis-cluster://HOST:PORT,HOST:PORT)), whose slot map
 *                   is learned with CLUSTER SLOTS and kept up to date by following MOVED (and ASK). HOST is
 *                   resolved once, at open (an unknown name is KVP_EINVAL); an IPv6 address goes in brackets.
 *                   A password in the URL is KVP_EINVAL: it goes in remote_auth_file. A server that does
 *                   not answer at open is not an error: KVP_OK with a note in kvp_last_error, and lookups
 *                   miss until it answers. Lookups take one pipelined round trip to every node at once;
 *                   publication is write-behind, from a bounded queue, by a thread of the pool's own (a full
 *                   queue drops, counted), so decoding never waits on the network. Units go exact; under a
 *                   cold tier with no policy=, gate= or ladder= and codecs without a per-stream context
 *                   (TurboQuant without outliers, KIVI; not SparK), block units go compressed too (key +
 *                   ":c"), and a hit fetches the ones its window leaves cold that way (README).
 *   remote_auth_file=PATH  AUTH's password, the file's first line; an unreadable or empty file is
 *                   KVP_EINVAL at open. Never read from the spec.
 *   remote_timeout=MS  a lookup's connect and round trip, 1..60000 (default 5). A server down, slow, paused
 *                   or refusing costs a lookup at most this, and its keys miss; a node that failed is not
 *                   tried again before a backoff (100 ms, doubling to 1 s). A hit's values must arrive
 *                   within it: raise it for long prompts (megabytes take milliseconds). The writer is
 *                   not bound by it: a batch goes on while its bytes move, and fails when nothing has
 *                   moved for a second (or this, when longer); kvp_pool_close gives what is queued this
 *                   long, then drops it.
 *   remote_ttl=SECONDS  stored blocks expire after this (SET ... EX), 0..2^31-1 (default 0: never)
 *   remote_queue=SIZE  bound of the publication queue (default 64MiB, at least 1MiB): copies of values
 *                   waiting for the writer, the pool's own memory (not a tenant's); a value that does not
 *                   fit is dropped and counted. A prompt's units are published as they register: size it
 *                   for a prompt's bytes when prompts are long (a 2048-token prompt of 32 layers, 8 KV heads,
 *                   d=128 at fp16 is 256MiB).
 *                   The remote_* keys without remote= are KVP_EINVAL.
 *   share_prefix=0|1  1: tenants find each other's cached prompts (kvp_seq_open_prefix), each hit paid
 *                   as copies in the caller's memory; 0 (default): a tenant only ever finds its own, so
 *                   no tenant can learn what another cached
 * With a spill device, a charge that would pass a tenant's quota or the pool's limit first spills blocks
 * of the tenant's least recently used idle sequence, or parks it (never another tenant's); see
 * kvp_seq_park. The spill's own metadata is paid from the memory it frees: no charge passes a limit.
 */
KVP_API kvp_status kvp_pool_open(const char *spec, kvp_pool **out);
/* Closes the pool; tenants and sequences still open are closed with it, and their handles refused. */
KVP_API void kvp_pool_close(kvp_pool *pool);
/*
 * The remote tier's publication (pool remote=), pool-wide: every tenant's prompts go through one queue.
 * The caller sets size = sizeof(kvp_remote_stats); older, smaller structs are filled up to their size.
 * All zero without remote=.
 */
typedef struct {
	uint32_t size;
	uint64_t queued;          /* values waiting for the writer or on their way now */
	uint64_t published;       /* values the servers stored */
	uint64_t dropped;         /* values not stored: the queue full, refused (maxmemory), a failed write */
	uint64_t bytes_published; /* of the stored values */
	uint64_t faults;          /* the remote tier's faults, lookups' and the writer's */
} kvp_remote_stats;
KVP_API kvp_status kvp_pool_remote_stats(const kvp_pool *pool, kvp_remote_stats *out);
/*
 * Waits until the publication queue is empty (so every value queued before the call is stored or dropped)
 * or wait_ms has passed: KVP_OK when it is empty, KVP_EBUSY (values still queued) otherwise; while other
 * threads keep publishing, the queue may not empty within wait_ms. A process that publishes prompts and
 * then exits calls it before kvp_pool_close, which gives the queue only remote_timeout. KVP_OK at once
 * without remote=.
 */
KVP_API kvp_status kvp_pool_flush(kvp_pool *pool, uint32_t wait_ms);

/*
 * Tenant: a quota and a default cache configuration; its blocks live in its own jemalloc arena.
 *   quota=SIZE      byte limit over the tenant's sequences (default: none; the pool's limit binds): their
 *                   blocks and tables, and what their policies and codecs keep (H2O's weights, TriAttention's
 *                   statistics and score rows, codec tables, round buffers), sized by the tokens retained
 *   block=N         tokens per block (default 64)
 *   sinks=N         first N tokens of every stream are kept exact (default 4)
 *   window=N        last N tokens of every stream are kept exact (default 128)
 *   store=fp32|fp16 storage of the exact tiers (default fp32)
 *   gate=off|mrl|entropy  coherence gating of a policy's budget (see kvp_head_level; default off). Needs a
 *                   policy that scores tokens (StreamingLLM protects its whole budget: KVP_EINVAL) whose
 *                   rounds decide each stream (TriAttention's select=per_head and union keep one set for
 *                   several streams: KVP_EINVAL unless ladder= sets bits alone, every keep the same).
 *                   Budgets move in whole blocks, and never below what a round protects (sinks + window).
 *   ladder=B:K or ladder=(B:K,B:K,...)  with gate=: two or more levels from gentle to aggressive (bits B,
 *                   budget share K in (0, 1]), e.g. ladder=(4:1.0,3:0.5,2:0.25). At every kvp_seq_step the
 *                   sequence's heads are ranked by coherence and split into equal shares, one per level,
 *                   the least coherent on level 1 (an overridden head sits at round(a x (levels - 1)));
 *                   a head moves once its rank has asked for another level 32 steps in a row:
 *                   its share of the layer's budget is K (total conserved), and its cold blocks encoded
 *                   from then on use bits=B on every codec of k= and v= that takes bits (turboquant, kivi;
 *                   at least one must). Blocks keep the level they were encoded at and are always read
 *                   with its codecs. The parentheses are needed because ',' separates the tenant's keys.
 *   model=NAME      the host's name for the weights (e.g. checkpoint and revision; 1..63 printable
 *                   characters without space , ( ) =): an identity of cached prefixes
 *   prefix=on|off   prefix caching by kvp_seq_open_prefix (default on when model= is given; on needs it)
 * Names are unique within a pool.
 */
KVP_API kvp_status kvp_tenant_open(kvp_pool *pool, const char *name, const char *spec, kvp_tenant **out);
/* Closes the tenant and its sequences; their handles are refused from then on. */
KVP_API void kvp_tenant_close(kvp_tenant *t);

/*
 * Sequence: one request; the shape is copied. Calls on different sequences may run concurrently; calls on
 * one sequence must not overlap. One that starts while another call is in the sequence returns
 * KVP_EBUSY and does nothing (kvp_seq_close leaves the sequence open, KVP_EBUSY in kvp_last_error): the
 * host's serialization is missing, and the sequence is left to the call that holds it.
 */
KVP_API kvp_status kvp_seq_open(kvp_tenant *t, const kvp_shape *shape, kvp_seq **out);
/*
 * Prefix caching (tenant model=NAME, prefix=on): open a sequence for a prompt of n token ids, token i
 * at position i. The cache is cut in units: the sink block (the first `sinks` tokens, when sinks > 0),
 * then blocks of `block` tokens. *n_cached is the tokens of the longest run of whole units from the
 * start that the cache holds, at most n - 1 (the host computes at least the last token: it needs its
 * logits); those tokens are in the sequence already, in every layer and KV head, and attention over it
 * equals that of a sequence that appended them. The host appends from position n_cached on.
 * As the sequence's appends fill a prompt unit in every stream (exact, holding the unit's positions),
 * it is registered under a chain hash of (model, shape, tenant unless the pool says share_prefix=1,
 * block, sinks, store, the parent unit's hash, the unit's token ids); a lookup compares the token ids
 * too, so a hash collision is a miss. The prompt's ids and the entries waiting for their blocks are the
 * sequence's metadata until the prompt is registered (or can no longer be: a policy round or the cold
 * tier changed a block first). Cached blocks are the registering tenant's: a hit of the same tenant
 * shares them copy-on-write (nothing is copied: whole units are never written again); with
 * share_prefix=1 a hit on another tenant's entry copies the blocks into the caller's memory, charged to
 * it (a copy over the quota ends the hit there). Blocks the cache holds and no sequence does
 * (bytes_cached) are the first thing a charge over a limit frees, least recently used and deepest unit
 * first, before any sequence is spilled; closing the tenant drops its entries. What a hit cannot give
 * is what the skipped calls would have shown the sequence: a policy's observations of the prompt's
 * attention (H2O), and the queries a SparK key codec fits on (kvp_attend's before the first cold block).
 * A tenant with prefix off: a plain kvp_seq_open, n_cached = 0 and nothing registered. n = 0, tokens
 * NULL, out or n_cached NULL: KVP_EINVAL. On failure nothing is opened, registered or charged.
 */
KVP_API kvp_status kvp_seq_open_prefix(kvp_tenant *t, const kvp_shape *shape, uint32_t n, const int32_t *tokens,
				       kvp_seq **out, uint32_t *n_cached);
/* A copy-on-write duplicate of src: blocks are shared until either side writes to them. */
KVP_API kvp_status kvp_seq_fork(kvp_seq *src, kvp_seq **out);
KVP_API void kvp_seq_close(kvp_seq *s);

/*
 * Append n tokens to one layer of a sequence.
 *   pos: [n] absolute positions; k, v: [n][n_kv_heads][head_dim] fp32, keys after RoPE.
 * Either every token is appended to every KV head of the layer or nothing is (KVP_ENOMEM on quota).
 * A stream holds at most 2^31 - 1 tokens: an n that would take one past that is KVP_EINVAL before pos, k
 * or v is read. Keys and values must be finite, and with store=fp16 within +-65504 (what would round to
 * an infinity there): another is KVP_EINVAL naming its token, KV head and channel, and nothing is appended.
 */
KVP_API kvp_status kvp_append(kvp_seq *s, uint32_t layer, uint32_t n, const int32_t *pos,
			      const float *k, const float *v);
/*
 * Attention for one query token over one layer.
 *   q: [n_heads][head_dim] after RoPE; out: [n_heads][head_dim] = softmax(q K^T / sqrt(head_dim)) V,
 *   query head h reading KV head h / (n_heads / n_kv_heads). A layer with no tokens gives zeros, with any
 *   policy (a policy or gate that observes attention learns nothing from a stream without tokens).
 *   Exact tiers are read in floats. Codec-encoded blocks are read by their codecs' group paths, which may
 *   work on integers: TurboQuant's quantize the query to int8 and each block's weights to 12 bits (2-bit
 *   values with AVX-512: 8 bits above the block's least weight), which keeps the output within about 1e-3
 *   (relative) of exact attention over the vectors kvp_gather returns.
 *   q must be finite: a NaN or an infinity is KVP_EINVAL naming its head and channel, out untouched; q
 *   and out must not overlap (KVP_EINVAL: no attention in place).
 */
KVP_API kvp_status kvp_attend(kvp_seq *s, uint32_t layer, const float *q, float *out);
/*
 * End of one decode step: policy rounds run here, all or nothing per round (KVP_ENOMEM leaves the stream
 * as it was). Blocks memory pressure spilled are read back first; the step's own allocations never spill
 * the caller's blocks, since its rounds read every layer. On a parked sequence (by the host or by memory
 * pressure) a step runs no round and leaves the sequence parked: its rounds wait for the first step after
 * it is back, and then do what they would have done (a round is due by a stream's size, which does not
 * change while parked).
 */
KVP_API kvp_status kvp_seq_step(kvp_seq *s);
/*
 * Copy out the retained tokens of one stream in position order, decoded to fp32.
 *   pos: [cap], k, v: [cap][head_dim] (any may be NULL); *n_out is the stream's token count. When the
 *   stream holds more than cap tokens, nothing is copied and KVP_EINVAL is returned with *n_out set, as
 *   when two of pos, k and v overlap.
 */
KVP_API kvp_status kvp_gather(kvp_seq *s, uint32_t layer, uint32_t kv_head, uint32_t cap, int32_t *pos,
			      float *k, float *v, uint32_t *n_out);
/*
 * Park: write every block of the sequence to the spill device (blocks shared with forks once) and free
 * their memory; all or nothing (KVP_EIO on a failed write, KVP_ENOMEM when the device is full or when the
 * records' metadata, paid from the memory the park frees, does not fit the quota past that: the
 * sequence stays in memory, unchanged). While the host keeps it parked, append, attend, gather and fork
 * return KVP_EINVAL; stats, step (see kvp_seq_step), close and unpark work. Unpark: read and check every
 * block back, all or nothing (KVP_EIO on a failed read, KVP_ECORRUPT when a record fails its CRC32C or
 * identity check, KVP_ENOMEM over quota: the sequence stays parked); attention afterwards is
 * bit-identical. A sequence parked by memory pressure instead comes back by itself on its next append,
 * attend, gather or fork. Without a spill device both return KVP_EUNSUPPORTED. Parking or unparking
 * twice is a no-op.
 */
KVP_API kvp_status kvp_seq_park(kvp_seq *s);
KVP_API kvp_status kvp_seq_unpark(kvp_seq *s);

/* Byte and token counters. The caller sets size = sizeof(kvp_stats); older, smaller structs are filled
 * up to their size, so the struct can grow without breaking hosts. */
typedef struct {
	uint32_t size;
	uint64_t tokens_appended, tokens_retained; /* summed over streams */
	uint64_t bytes_exact;      /* token storage of the exact tiers, as allocated */
	uint64_t bytes_compressed; /* token storage of codec-encoded blocks, as allocated */
	uint64_t bytes_meta;       /* positions, block headers, stream tables, and the policy's and codecs' state */
	uint64_t bytes_spilled;    /* bytes on the spill device */
	uint64_t bytes_dense_fp16; /* what every appended token would take as dense fp16 K and V */
	/* the prefix cache (kvp_seq_open_prefix): bytes of blocks the cache holds and no sequence does (the
	 * tenant's entries; 0 for a sequence), and over the lookups (the sequence's own, or all the tenant's)
	 * the tokens found, and the tokens of the whole units looked up and not found */
	uint64_t bytes_cached, prefix_hit_tokens, prefix_miss_tokens;
	/* the remote tier (pool remote=): of the hit tokens, those it supplied; lookups a fault cut short (a server
	 * down, slow, paused or refusing, or still in its backoff: its units miss, and kvp_last_error holds a note
	 * after the open); values it returned that failed their checks (never served) */
	uint64_t remote_hit_tokens, remote_faults, remote_rejected;
} kvp_stats;
/* Blocks shared by forks count in every sequence that holds them; tenant stats count them once. */
KVP_API kvp_status kvp_seq_stats(const kvp_seq *s, kvp_stats *out);
KVP_API kvp_status kvp_tenant_stats(const kvp_tenant *t, kvp_stats *out);

/*
 * Coherence gating (tenant gate=mrl|entropy): each (layer, KV head) has a measured coherence in [0, 1]
 * and an aggressiveness (the coherence, or the host's override) that sets its share of the layer's
 * token budget; the layer's total is conserved. The caller sets size = sizeof(kvp_head_level).
 */
typedef struct {
	uint32_t size;
	float coherence;      /* measured: mean resultant length (mrl) or 1 - H/log n (entropy) */
	float aggressiveness; /* what the budget follows: the override when set, else the coherence */
	int32_t overridden;   /* 1 when kvp_seq_set_head_level set it */
	uint32_t budget;      /* the stream's token budget at the last kvp_seq_step (0 before) */
	/* with ladder=: the level, 0 = gentlest (by the rank of the head's coherence among the sequence's
	 * heads, changed once the rank has asked for another level 32 steps in a row; when overridden,
	 * round(aggressiveness x (levels - 1))), and the codec bits of the head's cold blocks encoded from
	 * now on; 0 and 0 without a ladder */
	uint32_t level, bits;
} kvp_head_level;
KVP_API kvp_status kvp_seq_head_level(kvp_seq *s, uint32_t layer, uint32_t kv_head, kvp_head_level *out);
/* aggressiveness in [0, 1] pins the head's level from the next kvp_seq_step on; -1 hands it back to the
 * measured coherence. KVP_EINVAL when the tenant has gate=off. */
KVP_API kvp_status kvp_seq_set_head_level(kvp_seq *s, uint32_t layer, uint32_t kv_head, float aggressiveness);

/* Codecs on their own, e.g. "turboquant(bits=3)" or "spark(keep=0.5)|turboquant(bits=3)". A codec works in
 * memory of its own: calls on one codec must not overlap (different codecs may run concurrently). */
KVP_API kvp_status kvp_codec_open(const char *spec, uint32_t dim, kvp_codec **out);
KVP_API uint32_t kvp_codec_group(const kvp_codec *c); /* tokens per group; 1 when separable */
/* Bytes of n tokens, n rounded up to whole groups; SIZE_MAX when they do not fit size_t. */
KVP_API size_t kvp_codec_bytes(const kvp_codec *c, uint32_t n);
/* x must be finite (fp16 also refuses what rounds to an infinity, 65520 and above): KVP_EINVAL naming the token
 * and channel, dst untouched. */
KVP_API kvp_status kvp_codec_encode(kvp_codec *c, uint32_t n, const float *x, void *dst);
/* decode and dot read src only when it holds codes encode writes (finite norms and scales >= 0, SparK
 * masks of the kept count): KVP_ECORRUPT naming the token and the field otherwise. A call's codes and its
 * floats (x, out) must not overlap: KVP_EINVAL. */
KVP_API kvp_status kvp_codec_decode(kvp_codec *c, uint32_t n, const void *src, float *x);
/* out[i] = <q, decode(token i)>, in floats (the single-head path, not attention's integer group path). */
KVP_API kvp_status kvp_codec_dot(kvp_codec *c, uint32_t n, const void *src, const float *q, float *out);
KVP_API void kvp_codec_close(kvp_codec *c);

/*
 * Policies on their own: "streaming(sinks=4,window=1024)", "h2o(heavy=0.1,recent=0.1)",
 * "triattention(budget=2048,stats=FILE|online,every=128,offsets=17,aggregate=mean|max,
 * select=per_head|per_layer_head|union)"; every policy also takes pin_prompt=0|1. One policy holds the
 * history of one sequence (H2O's accumulated weights, online statistics).
 * stats=FILE is a .kvtria file: a regular file (a directory, FIFO or device is KVP_EINVAL, and a FIFO
 * never blocks) whose size must be exactly what its 40-byte header implies (KVP_ECORRUPT otherwise,
 * before the body is read), for the shape's layers, heads, head_dim, rope_theta and rope_layout
 * (KVP_EINVAL otherwise). As a tenant's policy= the file is read once, at kvp_tenant_open (a bad file
 * fails it), and shared read-only by the tenant's sequences, each checked against its shape at
 * kvp_seq_open; a fork shares its parent's. Its statistics are charged to the tenant (bytes_meta of
 * kvp_tenant_stats): a quota that cannot hold them fails kvp_tenant_open with KVP_ENOMEM.
 *
 * kvp_policy_score: scores of the n tokens of stream (layer, kv_head), higher = keep, after the policy's
 *   own normalization (TriAttention: z-score per query head over these n tokens) and GQA aggregation
 *   (TriAttention: max over the group; H2O: sum). pos: [n] absolute positions, increasing; k_post_rope:
 *   [n][head_dim] keys after RoPE; t0: absolute position of the next token (> pos[n-1]).
 */
KVP_API kvp_status kvp_policy_open(const char *spec, const kvp_shape *shape, kvp_policy **out);
KVP_API kvp_status kvp_policy_score(kvp_policy *p, uint32_t layer, uint32_t kv_head, int64_t t0,
				    uint32_t n, const int32_t *pos, const float *k_post_rope,
				    float *scores);
KVP_API void kvp_policy_close(kvp_policy *p);
/*
 * For hosts that run their own attention: what one query token at absolute position t saw on stream
 * (layer, kv_head). q_post_rope: [group][head_dim] the queries after RoPE of the group's query heads
 * (kv_head*group .. kv_head*group + group - 1, group = n_heads / n_kv_heads), or NULL; weights:
 * [group][n] their softmax weights over the stream's n tokens at positions pos (increasing), or NULL.
 * H2O accumulates the weights, one per token of pos: pos names every token the host still holds, and a
 * token left out is taken as evicted and its weight dropped, so H2O's memory follows the tokens held,
 * not the values of their positions. TriAttention with stats=online averages the queries (rotated back
 * to pre-RoPE with t). On failure (KVP_ENOMEM) nothing is recorded. Keys (kvp_policy_score), queries and
 * weights must be finite: a NaN or an infinity is KVP_EINVAL naming its element, nothing recorded.
 */
KVP_API kvp_status kvp_policy_observe(kvp_policy *p, uint32_t layer, uint32_t kv_head, int64_t t,
				      const float *q_post_rope, uint32_t n, const int32_t *pos,
				      const float *weights);

/*
 * Plugin entry for dlopen hosts. kvp_plugin(KVP_ABI_MAJOR) returns a table with one pointer per public
 * call. Minor versions only append members: a host compiled against minor m may use every member it
 * knows when the table's abi_minor >= m (and size covers it).
 */
#define KVP_ABI_MAJOR 1
#define KVP_ABI_MINOR 4

typedef struct kvp_plugin_v1 {
	uint32_t abi_major, abi_minor, size;
	const char *(*strerror)(kvp_status s);
	const char *(*last_error)(void);
	kvp_status (*pool_open)(const char *spec, kvp_pool **out);
	void (*pool_close)(kvp_pool *pool);
	kvp_status (*tenant_open)(kvp_pool *pool, const char *name, const char *spec, kvp_tenant **out);
	void (*tenant_close)(kvp_tenant *t);
	kvp_status (*seq_open)(kvp_tenant *t, const kvp_shape *shape, kvp_seq **out);
	kvp_status (*seq_fork)(kvp_seq *src, kvp_seq **out);
	void (*seq_close)(kvp_seq *s);
	kvp_status (*append)(kvp_seq *s, uint32_t layer, uint32_t n, const int32_t *pos, const float *k,
			     const float *v);
	kvp_status (*attend)(kvp_seq *s, uint32_t layer, const float *q, float *out);
	kvp_status (*seq_step)(kvp_seq *s);
	kvp_status (*gather)(kvp_seq *s, uint32_t layer, uint32_t kv_head, uint32_t cap, int32_t *pos,
			     float *k, float *v, uint32_t *n_out);
	kvp_status (*seq_park)(kvp_seq *s);
	kvp_status (*seq_unpark)(kvp_seq *s);
	kvp_status (*seq_stats)(const kvp_seq *s, kvp_stats *out);
	kvp_status (*tenant_stats)(const kvp_tenant *t, kvp_stats *out);
	kvp_status (*codec_open)(const char *spec, uint32_t dim, kvp_codec **out);
	uint32_t (*codec_group)(const kvp_codec *c);
	size_t (*codec_bytes)(const kvp_codec *c, uint32_t n);
	kvp_status (*codec_encode)(kvp_codec *c, uint32_t n, const float *x, void *dst);
	kvp_status (*codec_decode)(kvp_codec *c, uint32_t n, const void *src, float *x);
	kvp_status (*codec_dot)(kvp_codec *c, uint32_t n, const void *src, const float *q, float *out);
	void (*codec_close)(kvp_codec *c);
	kvp_status (*policy_open)(const char *spec, const kvp_shape *shape, kvp_policy **out);
	kvp_status (*policy_score)(kvp_policy *p, uint32_t layer, uint32_t kv_head, int64_t t0, uint32_t n,
				   const int32_t *pos, const float *k_post_rope, float *scores);
	void (*policy_close)(kvp_policy *p);
	/* abi_minor 1 */
	kvp_status (*policy_observe)(kvp_policy *p, uint32_t layer, uint32_t kv_head, int64_t t,
				     const float *q_post_rope, uint32_t n, const int32_t *pos, const float *weights);
	/* abi_minor 2 */
	kvp_status (*seq_head_level)(kvp_seq *s, uint32_t layer, uint32_t kv_head, kvp_head_level *out);
	kvp_status (*seq_set_head_level)(kvp_seq *s, uint32_t layer, uint32_t kv_head, float aggressiveness);
	/* abi_minor 3 */
	kvp_status (*seq_open_prefix)(kvp_tenant *t, const kvp_shape *shape, uint32_t n, const int32_t *tokens,
				      kvp_seq **out, uint32_t *n_cached);
	/* abi_minor 4 */
	kvp_status (*pool_remote_stats)(const kvp_pool *pool, kvp_remote_stats *out);
	kvp_status (*pool_flush)(kvp_pool *pool, uint32_t wait_ms);
} kvp_plugin_v1;

/* NULL when abi_major is not served (kvp_last_error says which majors are). */
KVP_API const kvp_plugin_v1 *kvp_plugin(uint32_t abi_major);

#ifdef __cplusplus
}
#endif
#endif /* KVPAGER_H */
