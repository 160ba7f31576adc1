/*
 * Connections to one Redis server or the nodes of one Redis Cluster (redis.c), for the remote tier
 * (remote.c). A link is used by one thread at a time; the lookup side and the writer each have their own.
 *
 * hiredis parses the replies (redisReader); the sockets are ours, non-blocking, and one poll() waits on
 * every node of an exchange at once until one deadline. Why not hiredis's blocking contexts: their
 * timeout is per read, so n nodes could cost n timeouts, and their write() would raise SIGPIPE on the
 * host's thread when a server goes away; send(MSG_NOSIGNAL) never does.
 */
#ifndef KVP_TIER_REDIS_H
#define KVP_TIER_REDIS_H

#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/socket.h>

#include "base/base.h"

struct redisReply;
struct redisReader;

#define KVP_REDIS_SLOTS 16384u
#define KVP_REDIS_NO_NODE UINT16_MAX
#define KVP_REDIS_NODES_MAX 1024u
#define KVP_REDIS_BACKOFF_MS 100u
#define KVP_REDIS_BACKOFF_MAX_MS 1000u

/* Where faults are counted and the last one's note kept: shared by a remote's two links. */
struct kvp_redis_faults {
	_Atomic uint64_t count;
	pthread_mutex_t lock; /* guards note */
	char note[160];
};

struct kvp_redis_node {
	struct sockaddr_storage addr;
	socklen_t addr_len;
	char name[64]; /* "HOST:PORT" as in MOVED answers and notes */
	int fd;        /* -1 when not connected */
	int connecting; /* a non-blocking connect in progress */
	struct redisReader *reader;
	uint64_t retry_at;   /* ns: after a fault, not tried again before this */
	uint32_t backoff_ms; /* the next fault's backoff */
	/* one exchange: what to send, and which request each expected reply answers */
	char *out;
	size_t out_len, out_cap, out_off;
	int32_t *expect; /* a request's index, or KVP_REDIS_PREAMBLE for AUTH and ASKING */
	uint32_t n_expect, expect_cap, got;
};
#define KVP_REDIS_PREAMBLE (-1)

enum kvp_redis_op { KVP_REDIS_GET, KVP_REDIS_SET, KVP_REDIS_PING, KVP_REDIS_CLUSTER_SLOTS };

struct kvp_redis_req {
	enum kvp_redis_op op;
	const char *key;
	size_t key_len;
	const void *val; /* SET */
	size_t val_len;
	/* set by the exchange */
	uint16_t node;
	uint8_t asking, redirected, pending;
	struct redisReply *reply; /* the answer (free it with kvp_redis_reply_free), or NULL after a fault */
};

struct kvp_redis_link {
	int cluster;
	const char *password; /* NULL for none; the remote owns it */
	uint32_t ttl_s;
	/* A round ends at its deadline, and also (the writer's link) when no byte has moved for idle_ns (0:
	 * never) or at *cut, which another thread may bring forward while the round waits (NULL: none). */
	uint64_t idle_ns;
	const _Atomic uint64_t *cut;
	struct kvp_redis_faults *faults;
	struct kvp_redis_node *nodes;
	uint32_t n_nodes; /* the seeds come first */
	uint16_t *slots;           /* cluster: node by hash slot, KVP_REDIS_NO_NODE when unknown */
	uint16_t *slots_next;      /* where CLUSTER SLOTS is parsed before it replaces slots */
	int mapped;                /* cluster: the slot map was learned */
	int stale;                 /* cluster: a node failed since: learn the map again first */
	char *inbuf;               /* recv's buffer */
	struct pollfd *poll_fds;   /* one round's, by node waited on */
	uint16_t *poll_nodes;
};

struct kvp_redis_seed {
	struct sockaddr_storage addr;
	socklen_t addr_len;
	char name[64];
};

uint64_t kvp_redis_now(void); /* CLOCK_MONOTONIC, ns */
kvp_status kvp_redis_link_init(struct kvp_redis_link *l, int cluster, const struct kvp_redis_seed *seeds,
			       uint32_t n_seeds);
void kvp_redis_link_fini(struct kvp_redis_link *l);
/* Sends every request, reads every answer until deadline (ns; or the link's idle_ns and cut, whichever
 * comes first): reqs[i].reply is the answer, or NULL after
 * a fault (counted, noted, the node closed and backed off). Follows one redirection per request. A
 * cluster link learns its slot map first when it has none. */
void kvp_redis_exchange(struct kvp_redis_link *l, struct kvp_redis_req *reqs, uint32_t n, uint64_t deadline);
/* Whether the server answers (PING), or for a cluster, learns the slot map: 0 when it did, before deadline. */
int kvp_redis_probe(struct kvp_redis_link *l, uint64_t deadline);
void kvp_redis_reply_free(struct kvp_redis_req *reqs, uint32_t n);
/* Records a fault: counted, and its note kept. */
void kvp_redis_fault(struct kvp_redis_faults *f, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif /* KVP_TIER_REDIS_H */
