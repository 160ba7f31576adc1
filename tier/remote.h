/*
 * The remote tier: a client of a Redis server or a Redis Cluster that prefix blocks are shared through
 * (remote.c, over the connections of redis.c), and the record format of what is stored there (record.c).
 *
 * One struct kvp_remote per pool (remote=). Two sides, each with its own connections, so neither waits on
 * the other: lookups (kvp_remote_fetch, on the caller's thread, one at a time per pool) and publication
 * (kvp_remote_publish copies into a bounded queue; a writer thread of ours sends it). Every fault (a server
 * down, slow, paused, refusing a command, a cluster redirecting twice) costs at most the timeout, turns
 * the keys it touched into misses, and is counted with a note; nothing blocks longer and nothing crashes.
 *
 * Values and keys are opaque bytes here: the pager chooses the keys (a namespace, then the chain hash) and
 * packs the values as records (below).
 */
#ifndef KVP_TIER_REMOTE_H
#define KVP_TIER_REMOTE_H

#include <stddef.h>
#include <stdint.h>

#include "base/base.h"

struct kvp_remote;

#define KVP_REMOTE_URL_MAX 1024
#define KVP_REMOTE_PATH_MAX 4096
#define KVP_REMOTE_TIMEOUT_DEFAULT 5u      /* ms */
#define KVP_REMOTE_QUEUE_DEFAULT 1024u     /* values */
#define KVP_REMOTE_QUEUE_BYTES_DEFAULT (64ull << 20)

struct kvp_remote_config {
	/* redis://HOST:PORT or redis-cluster://HOST:PORT[|HOST:PORT...] (',' separates seeds too, but not in
	 * a pool spec, where it separates keys); HOST is a name, an IPv4 address or [an IPv6 address]. At most
	 * 16 seeds. "" when the pool has no remote tier. */
	char url[KVP_REMOTE_URL_MAX];
	/* "" when none. AUTH's password is the file's first line (its line end dropped); never in a spec. */
	char auth_file[KVP_REMOTE_PATH_MAX];
	uint32_t timeout_ms; /* connect and every round trip; default KVP_REMOTE_TIMEOUT_DEFAULT */
	uint32_t ttl_s;      /* SET ... EX ttl_s; 0: keys never expire */
	uint32_t queue_max;  /* publication queue bound in values (queued and being sent) */
	uint64_t queue_bytes; /* and in bytes of keys and values */
};

/* Defaults: no remote, 5 ms, no TTL, 1024 values, 64 MiB. */
void kvp_remote_config_default(struct kvp_remote_config *cfg);
/* The pool spec's remote=, remote_auth_file=, remote_timeout=MS (1..60000) and remote_ttl=SECONDS
 * (0..2^31-1) into cfg (set to the defaults first). KVP_EINVAL naming the key for a value that does not
 * parse, a URL that is not one of the two forms (a password in it included: the password lives in
 * remote_auth_file), or a remote_* key without remote=. Nothing is opened or read here. */
kvp_status kvp_remote_config_parse(struct kvp_args *args, struct kvp_remote_config *cfg);

/* Resolves the URL's hosts (once, here: later connections never wait for a name lookup), reads the
 * password, starts the writer thread, and tries the server once within the timeout (a cluster: learns its
 * slot map). KVP_EINVAL naming the cause for a host that does not resolve or an auth file that cannot be
 * read or is empty; KVP_ENOMEM. A server that does not answer is not an error: *out is made, and
 * kvp_last_error() holds a note saying so (lookups miss until it answers). */
kvp_status kvp_remote_open(const struct kvp_remote_config *cfg, struct kvp_remote **out);
/* Stops the writer: what is queued still gets until the timeout to be sent, then is dropped (counted).
 * Closes every connection and wipes the password. NULL is a no-op. */
void kvp_remote_close(struct kvp_remote *r);

/*
 * Lookup of n keys in one pipelined round trip: GETs grouped by cluster node, sent to every node at once,
 * answers read from all of them together until the deadline (now + timeout). vals[i] gets a copy of the
 * value (free it with kvp_remote_value_free) and val_len[i] its length, or NULL and 0 on a miss. Returns
 * the number of hits. A MOVED answer updates the slot map and an ASK is followed with ASKING; either is
 * retried once, within the same deadline; a second redirection is a fault. A node that failed is not
 * tried again before a backoff (100 ms, doubling to 1 s) has passed: its keys miss at once, with no new
 * fault. After a fault a cluster's slot map is asked for again (from the first node that answers) at the
 * next exchange, so slots a failover moved are found without a MOVED. Connections persist between calls;
 * one the server closed while idle (its timeout, a restart) is replaced at the next call, no fault.
 * Concurrent fetches on one remote take turns. r NULL: every key misses. *unanswered (when not NULL) gets
 * the keys that missed for a fault, a refusal or a backoff rather than for being absent.
 */
uint32_t kvp_remote_fetch(struct kvp_remote *r, uint32_t n, const char *const *keys, const size_t *key_len,
			  void **vals, size_t *val_len, uint32_t *unanswered);
void kvp_remote_value_free(void *val);

/* Write-behind publication: copies key and value into the queue and returns 0 at once, or returns
 * nonzero without queueing when the queue is at its bound (counted in dropped). The writer sends
 * SET key value [EX ttl], in pipelined batches; a value the server refuses (maxmemory) or that a fault
 * lost is counted in dropped with a note. Never waits on the network. */
int kvp_remote_publish(struct kvp_remote *r, const char *key, size_t key_len, const void *val, size_t len);
/* Waits up to wait_ms until nothing is queued or being sent: 0 then, nonzero on timeout (kvp_pool_flush). */
int kvp_remote_drain(struct kvp_remote *r, uint32_t wait_ms);

struct kvp_remote_counters {
	uint64_t hits, misses;  /* keys looked up */
	uint64_t faults;        /* events: a failed connect, a timeout, a refused command, ... */
	uint64_t published;     /* values the server stored */
	uint64_t dropped;       /* values not stored: queue full, refused, lost to a fault, left at close */
	uint64_t bytes_fetched, bytes_published; /* of values */
	uint64_t queued;        /* values queued or being sent now */
	char note[160];         /* the last fault, e.g. "redis 127.0.0.1:7001: timeout"; "" when none */
};
void kvp_remote_counters(struct kvp_remote *r, struct kvp_remote_counters *out);

/* Redis Cluster's hash slot of a key: CRC16 (XMODEM) of the key, or of its {hash tag} when it has a
 * non-empty one, modulo 16384. */
uint32_t kvp_redis_slot(const char *key, size_t len);

/*
 * The record: what one stored block (one layer, one KV head) looks like in a value. Little-endian on
 * every machine, so processes on other hosts read it; versioned. A value may hold several records back
 * to back: unpack says how many bytes each took.
 *
 *   offset size
 *    0     4   magic KVP_RECORD_MAGIC ("KVPR")
 *    4     4   format version KVP_RECORD_VERSION
 *    8     4   CRC32C of the 64-byte header (these 4 bytes as zeros) and then the payload
 *   12     4   layer
 *   16     4   KV head
 *   20     4   tokens
 *   24     4   storage kind (enum kvp_store)
 *   28     4   zero
 *   32     8   chain hash of the prefix block
 *   40     8   codec-configuration id
 *   48     8   payload bytes
 *   56     8   zero
 *   64         payload
 */
#define KVP_RECORD_MAGIC 0x5250564bu /* "KVPR" */
#define KVP_RECORD_VERSION 1u
#define KVP_RECORD_HEADER 64u

struct kvp_record_id {
	uint64_t chain;
	uint32_t layer, kv_head, tokens, store;
	uint64_t codec;
	uint64_t payload; /* bytes */
};

/* KVP_RECORD_HEADER + id->payload; 0 when that overflows. */
size_t kvp_record_bytes(const struct kvp_record_id *id);
/* Writes the record of id with payload (id->payload bytes) to out[0..cap): KVP_EINVAL when cap is short.
 * *used gets the bytes written. */
kvp_status kvp_record_pack(const struct kvp_record_id *id, const void *payload, void *out, size_t cap,
			   size_t *used);
/* Checks the record at src[0..len) against the expected identity: length (sizes come from expected,
 * never from the bytes), magic, version, every identity field, the zero fields, then the CRC. On success
 * *payload points into src at expected->payload bytes and *used is the record's size (the next record of
 * the value starts there). KVP_ECORRUPT naming the first mismatch otherwise. */
kvp_status kvp_record_unpack(const struct kvp_record_id *expected, const void *src, size_t len,
			     const void **payload, size_t *used);

#endif /* KVP_TIER_REMOTE_H */
