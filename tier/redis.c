/* Connections to Redis servers and cluster nodes, one exchange at a time (tier/redis.h says why). */
#include <errno.h>
#include <netdb.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>

#include "tier/redis.h"
#include "tier/remote.h"

#define INBUF_BYTES 16384u

uint64_t kvp_redis_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void kvp_redis_fault(struct kvp_redis_faults *f, const char *fmt, ...)
{
	va_list ap;
	atomic_fetch_add(&f->count, 1);
	pthread_mutex_lock(&f->lock);
	va_start(ap, fmt);
	vsnprintf(f->note, sizeof f->note, fmt, ap);
	va_end(ap);
	pthread_mutex_unlock(&f->lock);
}

/* ---- hash slots ---- */

static uint16_t crc16_xmodem(const unsigned char *p, size_t n)
{
	uint16_t crc = 0;
	for (size_t i = 0; i < n; i++) {
		crc ^= (uint16_t)(p[i] << 8);
		for (int b = 0; b < 8; b++)
			crc = (uint16_t)(crc & 0x8000 ? (crc << 1) ^ 0x1021 : crc << 1);
	}
	return crc;
}

uint32_t kvp_redis_slot(const char *key, size_t len)
{
	const char *open = memchr(key, '{', len);
	if (open) {
		const char *close = memchr(open + 1, '}', len - (size_t)(open + 1 - key));
		if (close && close > open + 1) {
			key = open + 1;
			len = (size_t)(close - key);
		}
	}
	return crc16_xmodem((const unsigned char *)key, len) & (KVP_REDIS_SLOTS - 1);
}

/* ---- nodes ---- */

static int node_find(const struct kvp_redis_link *l, const char *name)
{
	for (uint32_t i = 0; i < l->n_nodes; i++)
		if (!strcmp(l->nodes[i].name, name))
			return (int)i;
	return -1;
}

static void node_reset(struct kvp_redis_node *nd)
{
	nd->fd = -1;
	nd->connecting = 0;
	nd->reader = NULL;
}

/* The node at host:port (an address, as CLUSTER SLOTS and MOVED give it), added when new; -1 when it
 * is not an address or the table is full. */
static int node_at(struct kvp_redis_link *l, const char *host, size_t host_len, long port)
{
	struct addrinfo hints = { .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV, .ai_socktype = SOCK_STREAM };
	struct addrinfo *ai;
	char name[64], h[48], p[8];
	struct kvp_redis_node *nd;
	int i;
	if (host_len == 0 || host_len >= sizeof h || port <= 0 || port > 65535)
		return -1;
	memcpy(h, host, host_len);
	h[host_len] = '\0';
	snprintf(p, sizeof p, "%ld", port);
	snprintf(name, sizeof name, "%s:%s", h, p);
	if ((i = node_find(l, name)) >= 0)
		return i;
	if (l->n_nodes == KVP_REDIS_NODES_MAX || getaddrinfo(h, p, &hints, &ai) != 0)
		return -1;
	nd = &l->nodes[l->n_nodes];
	memset(nd, 0, sizeof *nd);
	memcpy(&nd->addr, ai->ai_addr, ai->ai_addrlen);
	nd->addr_len = ai->ai_addrlen;
	freeaddrinfo(ai);
	snprintf(nd->name, sizeof nd->name, "%s", name);
	node_reset(nd);
	return (int)l->n_nodes++;
}

static void node_close(struct kvp_redis_node *nd)
{
	if (nd->fd >= 0)
		close(nd->fd);
	if (nd->reader)
		redisReaderFree(nd->reader);
	node_reset(nd);
}

/* A fault on the node: counted with a note, the connection dropped (late answers must never be taken
 * for the next exchange's), its unanswered requests left without a reply, and a backoff before the next
 * try so a dead node does not cost the timeout again at once. */
static void node_fail(struct kvp_redis_link *l, struct kvp_redis_node *nd, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void node_fail(struct kvp_redis_link *l, struct kvp_redis_node *nd, const char *fmt, ...)
{
	char what[120];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(what, sizeof what, fmt, ap);
	va_end(ap);
	kvp_redis_fault(l->faults, "redis %s: %s", nd->name, what);
	node_close(nd);
	l->stale = l->cluster; /* a failover may have moved its slots: ask the others at the next exchange */
	nd->got = nd->n_expect;
	if (!nd->backoff_ms)
		nd->backoff_ms = KVP_REDIS_BACKOFF_MS;
	nd->retry_at = kvp_redis_now() + (uint64_t)nd->backoff_ms * 1000000u;
	nd->backoff_ms = nd->backoff_ms * 2 > KVP_REDIS_BACKOFF_MAX_MS ? KVP_REDIS_BACKOFF_MAX_MS : nd->backoff_ms * 2;
}

/* ---- what one exchange sends: RESP arrays of bulk strings ---- */

static int out_put(struct kvp_redis_node *nd, const void *p, size_t n)
{
	if (nd->out_cap - nd->out_len < n) {
		size_t cap = nd->out_cap ? nd->out_cap : 4096;
		char *grown;
		while (cap - nd->out_len < n)
			cap *= 2;
		if (!(grown = realloc(nd->out, cap)))
			return -1;
		nd->out = grown;
		nd->out_cap = cap;
	}
	memcpy(nd->out + nd->out_len, p, n);
	nd->out_len += n;
	return 0;
}

static int out_command(struct kvp_redis_node *nd, int argc, const char *const *argv, const size_t *len)
{
	char line[32];
	int n = snprintf(line, sizeof line, "*%d\r\n", argc), rc = out_put(nd, line, (size_t)n);
	for (int i = 0; i < argc && rc == 0; i++) {
		n = snprintf(line, sizeof line, "$%zu\r\n", len[i]);
		rc = out_put(nd, line, (size_t)n);
		if (rc == 0)
			rc = out_put(nd, argv[i], len[i]);
		if (rc == 0)
			rc = out_put(nd, "\r\n", 2);
	}
	return rc;
}

static int expect_push(struct kvp_redis_node *nd, int32_t what)
{
	if (nd->n_expect == nd->expect_cap) {
		uint32_t cap = nd->expect_cap ? nd->expect_cap * 2 : 64;
		int32_t *grown = realloc(nd->expect, cap * sizeof *grown);
		if (!grown)
			return -1;
		nd->expect = grown;
		nd->expect_cap = cap;
	}
	nd->expect[nd->n_expect++] = what;
	return 0;
}

/* One command and the reply it is owed. */
static int send_command(struct kvp_redis_node *nd, int32_t what, int argc, const char *const *argv,
			const size_t *len)
{
	return out_command(nd, argc, argv, len) == 0 && expect_push(nd, what) == 0 ? 0 : -1;
}

static int req_append(const struct kvp_redis_link *l, struct kvp_redis_node *nd, const struct kvp_redis_req *q,
		      int32_t index)
{
	static const char *const asking[] = { "ASKING" }, *const ping[] = { "PING" },
				 *const slots[] = { "CLUSTER", "SLOTS" };
	static const size_t asking_len[] = { 6 }, ping_len[] = { 4 }, slots_len[] = { 7, 5 };
	char ttl[16];
	const char *argv[5] = { q->op == KVP_REDIS_GET ? "GET" : "SET", q->key, q->val, "EX", ttl };
	size_t len[5] = { 3, q->key_len, q->val_len, 2, 0 };
	if (q->asking && send_command(nd, KVP_REDIS_PREAMBLE, 1, asking, asking_len) != 0)
		return -1;
	switch (q->op) {
	case KVP_REDIS_GET: return send_command(nd, index, 2, argv, len);
	case KVP_REDIS_SET:
		len[4] = (size_t)snprintf(ttl, sizeof ttl, "%u", l->ttl_s);
		return send_command(nd, index, l->ttl_s ? 5 : 3, argv, len);
	case KVP_REDIS_PING: return send_command(nd, index, 1, ping, ping_len);
	case KVP_REDIS_CLUSTER_SLOTS: return send_command(nd, index, 2, slots, slots_len);
	}
	return -1;
}

/* Starts a non-blocking connect; AUTH goes first in the pipeline when there is a password. */
static int node_connect(struct kvp_redis_link *l, struct kvp_redis_node *nd)
{
	int one = 1;
	nd->fd = socket(nd->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (nd->fd < 0) {
		node_fail(l, nd, "socket: %s", strerror(errno));
		return -1;
	}
	setsockopt(nd->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	if (!(nd->reader = redisReaderCreate())) {
		node_fail(l, nd, "out of memory");
		return -1;
	}
	if (connect(nd->fd, (const struct sockaddr *)&nd->addr, nd->addr_len) != 0) {
		if (errno != EINPROGRESS) {
			node_fail(l, nd, "connect: %s", strerror(errno));
			return -1;
		}
		nd->connecting = 1;
	}
	if (l->password) {
		const char *argv[2] = { "AUTH", l->password };
		size_t len[2] = { 4, strlen(l->password) };
		if (send_command(nd, KVP_REDIS_PREAMBLE, 2, argv, len) != 0) {
			node_fail(l, nd, "out of memory");
			return -1;
		}
	}
	return 0;
}

/* ---- answers ---- */

/* "MOVED 3999 127.0.0.1:6381" or "ASK ...": follows it once, or fails the request. */
static void redirect(struct kvp_redis_link *l, struct kvp_redis_node *from, struct kvp_redis_req *q,
		     const redisReply *r)
{
	int ask = !strncmp(r->str, "ASK ", 4);
	const char *p = r->str + (ask ? 4 : 6), *colon;
	char *end;
	unsigned long slot = strtoul(p, &end, 10);
	int to = -1;
	if (*end == ' ' && (colon = strrchr(end + 1, ':'))) {
		const char *host = end + 1;
		size_t host_len = (size_t)(colon - host);
		if (host_len == 0 || (host_len == 1 && *host == '?')) { /* "MOVED 3999 :6381": the asked node's host */
			host = from->name;
			host_len = (size_t)(strrchr(from->name, ':') - from->name);
		}
		to = node_at(l, host, host_len, strtol(colon + 1, NULL, 10));
	}
	if (to < 0 || slot >= KVP_REDIS_SLOTS || q->redirected) {
		kvp_redis_fault(l->faults, "redis %s: %s: %.80s", from->name,
				q->redirected ? "redirected twice" : "bad redirection", r->str);
		q->redirected = 2;
		return;
	}
	if (!ask && l->cluster)
		l->slots[slot] = (uint16_t)to;
	q->node = (uint16_t)to;
	q->asking = (uint8_t)ask;
	q->redirected = 1;
}

static int is_redirect(const redisReply *r)
{
	return r->type == REDIS_REPLY_ERROR && r->str && (!strncmp(r->str, "MOVED ", 6) || !strncmp(r->str, "ASK ", 4));
}

/* Files one reply: -1 when it failed the node (a refused AUTH). */
static int take(struct kvp_redis_link *l, struct kvp_redis_node *nd, struct kvp_redis_req *reqs, redisReply *r)
{
	int32_t what = nd->expect[nd->got++];
	if (what == KVP_REDIS_PREAMBLE) {
		int refused = r->type == REDIS_REPLY_ERROR;
		if (refused)
			node_fail(l, nd, "refused: %.100s", r->str ? r->str : "");
		freeReplyObject(r);
		return refused ? -1 : 0;
	}
	if (is_redirect(r)) {
		redirect(l, nd, &reqs[what], r);
		freeReplyObject(r);
		return 0;
	}
	reqs[what].reply = r;
	return 0;
}

/* Reads what the socket has and files every whole reply. */
static void node_receive(struct kvp_redis_link *l, struct kvp_redis_node *nd, struct kvp_redis_req *reqs)
{
	for (;;) {
		ssize_t n = recv(nd->fd, l->inbuf, INBUF_BYTES, MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		if (n < 0) {
			node_fail(l, nd, "recv: %s", strerror(errno));
			return;
		}
		if (n > 0 && redisReaderFeed(nd->reader, l->inbuf, (size_t)n) != REDIS_OK) {
			node_fail(l, nd, "out of memory");
			return;
		}
		while (nd->got < nd->n_expect) {
			void *r = NULL;
			if (redisReaderGetReply(nd->reader, &r) != REDIS_OK) {
				node_fail(l, nd, "protocol error: %s", nd->reader->errstr);
				return;
			}
			if (!r)
				break;
			if (take(l, nd, reqs, r) != 0)
				return;
		}
		if (n == 0) {
			if (nd->got < nd->n_expect)
				node_fail(l, nd, "connection closed");
			else
				node_close(nd);
			return;
		}
		if (nd->got == nd->n_expect)
			return;
	}
}

static void node_service(struct kvp_redis_link *l, struct kvp_redis_node *nd, short revents,
			 struct kvp_redis_req *reqs)
{
	if (nd->connecting) {
		int err = 0;
		socklen_t len = sizeof err;
		if (!(revents & (POLLOUT | POLLERR | POLLHUP)))
			return;
		if (getsockopt(nd->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0)
			err = errno;
		if (err) {
			node_fail(l, nd, "connect: %s", strerror(err));
			return;
		}
		nd->connecting = 0;
		revents |= POLLOUT;
	}
	if (nd->out_off < nd->out_len && (revents & POLLOUT)) {
		ssize_t n = send(nd->fd, nd->out + nd->out_off, nd->out_len - nd->out_off, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n > 0)
			nd->out_off += (size_t)n;
		else if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
			node_fail(l, nd, "send: %s", strerror(errno));
			return;
		}
	}
	if (revents & (POLLIN | POLLERR | POLLHUP))
		node_receive(l, nd, reqs);
}

/* ---- one round: every pending request sent, every answer awaited until the deadline ---- */

/* An idle connection has nothing to read: anything there is the server's goodbye (it closed the
 * connection, after its idle timeout or a restart), so the connection is replaced, no fault. */
static void node_refresh(struct kvp_redis_node *nd)
{
	struct pollfd p = { .fd = nd->fd, .events = POLLIN };
	if (nd->fd >= 0 && !nd->connecting && poll(&p, 1, 0) > 0)
		node_close(nd);
}

static void round_send(struct kvp_redis_link *l, struct kvp_redis_req *reqs, uint32_t n)
{
	uint64_t now = kvp_redis_now();
	for (uint32_t i = 0; i < l->n_nodes; i++) {
		struct kvp_redis_node *nd = &l->nodes[i];
		nd->out_len = nd->out_off = 0;
		nd->n_expect = nd->got = 0;
		node_refresh(nd);
	}
	for (uint32_t i = 0; i < n; i++) {
		struct kvp_redis_node *nd = &l->nodes[reqs[i].node];
		if (!reqs[i].pending)
			continue;
		if (nd->fd < 0 && (now < nd->retry_at || node_connect(l, nd) != 0))
			continue; /* backing off, or the connect failed: a miss */
		if (req_append(l, nd, &reqs[i], (int32_t)i) != 0)
			node_fail(l, nd, "out of memory");
	}
}

/* How often a round with a cut looks at it again while it waits: what a cut brought forward may overrun. */
#define CUT_LOOK_NS 10000000u

/* When the round ends if nothing moves: its deadline, or idle_ns after the last move, or the cut. */
static uint64_t round_end(const struct kvp_redis_link *l, uint64_t deadline, uint64_t moved)
{
	const uint64_t cut = l->cut ? atomic_load_explicit(l->cut, memory_order_relaxed) : UINT64_MAX;
	uint64_t end = deadline < cut ? deadline : cut;
	if (l->idle_ns && moved + l->idle_ns < end)
		end = moved + l->idle_ns;
	return end;
}

static void round_run(struct kvp_redis_link *l, struct kvp_redis_req *reqs, uint32_t n, uint64_t deadline)
{
	const uint64_t look = l->cut ? CUT_LOOK_NS : 1000000000u;
	uint64_t moved = kvp_redis_now();
	round_send(l, reqs, n);
	for (;;) {
		uint32_t k = 0;
		uint64_t now, end, wait;
		int ready;
		for (uint32_t i = 0; i < l->n_nodes; i++) {
			struct kvp_redis_node *nd = &l->nodes[i];
			if (nd->fd < 0 || nd->got == nd->n_expect)
				continue;
			l->poll_fds[k] = (struct pollfd){ .fd = nd->fd,
							  .events = nd->connecting ? POLLOUT
								  : (short)(POLLIN | (nd->out_off < nd->out_len ? POLLOUT : 0)) };
			l->poll_nodes[k++] = (uint16_t)i;
		}
		if (k == 0)
			return;
		now = kvp_redis_now();
		end = round_end(l, deadline, moved);
		if (now >= end) {
			for (uint32_t j = 0; j < k; j++)
				node_fail(l, &l->nodes[l->poll_nodes[j]], "timeout");
			return;
		}
		wait = end - now;
		if (wait > look) /* a cut is looked at again, and the milliseconds fit poll's int */
			wait = look;
		ready = poll(l->poll_fds, k, (int)((wait + 999999) / 1000000));
		if (ready > 0)
			moved = kvp_redis_now();
		if (ready < 0 && errno != EINTR) {
			for (uint32_t j = 0; j < k; j++)
				node_fail(l, &l->nodes[l->poll_nodes[j]], "poll: %s", strerror(errno));
			return;
		}
		for (uint32_t j = 0; ready > 0 && j < k; j++)
			if (l->poll_fds[j].revents)
				node_service(l, &l->nodes[l->poll_nodes[j]], l->poll_fds[j].revents, reqs);
	}
}

/* ---- the slot map ---- */

static int slots_parse(struct kvp_redis_link *l, const struct kvp_redis_node *asked, const redisReply *r)
{
	uint16_t *map = l->slots_next;
	int mapped = 0;
	for (uint32_t s = 0; s < KVP_REDIS_SLOTS; s++)
		map[s] = KVP_REDIS_NO_NODE;
	for (size_t i = 0; i < r->elements; i++) {
		const redisReply *e = r->element[i], *m;
		const char *host;
		size_t host_len;
		int node;
		if (e->type != REDIS_REPLY_ARRAY || e->elements < 3 || (m = e->element[2])->type != REDIS_REPLY_ARRAY ||
		    m->elements < 2 || m->element[1]->type != REDIS_REPLY_INTEGER)
			continue;
		host = m->element[0]->type == REDIS_REPLY_STRING ? m->element[0]->str : "";
		host_len = m->element[0]->type == REDIS_REPLY_STRING ? m->element[0]->len : 0;
		/* an unknown endpoint (nil, "" or "?"): the host the map came from */
		if (host_len == 0 || !strcmp(host, "?")) {
			host = asked->name;
			host_len = (size_t)(strrchr(asked->name, ':') - asked->name);
		}
		node = node_at(l, host, host_len, (long)m->element[1]->integer);
		if (node < 0)
			continue;
		for (long long s = e->element[0]->integer; s <= e->element[1]->integer && s < KVP_REDIS_SLOTS; s++)
			if (s >= 0) {
				map[s] = (uint16_t)node;
				mapped = 1;
			}
	}
	if (mapped) { /* the map in use stays when the answer maps nothing */
		l->slots_next = l->slots;
		l->slots = map;
	}
	return mapped;
}

/* CLUSTER SLOTS from the first known node that answers; a map already learned stays when none does. */
static void slots_learn(struct kvp_redis_link *l, uint64_t deadline)
{
	int learned = 0;
	l->stale = 0;
	for (uint32_t i = 0; i < l->n_nodes && !learned && kvp_redis_now() < deadline; i++) {
		struct kvp_redis_req q = { .op = KVP_REDIS_CLUSTER_SLOTS, .node = (uint16_t)i, .pending = 1 };
		const redisReply *r;
		if (l->nodes[i].fd < 0 && kvp_redis_now() < l->nodes[i].retry_at)
			continue;
		round_run(l, &q, 1, deadline);
		if (!(r = q.reply))
			continue;
		if (r->type == REDIS_REPLY_ARRAY && r->elements > 0 && slots_parse(l, &l->nodes[i], r))
			learned = l->mapped = 1;
		else if (r->type == REDIS_REPLY_ARRAY)
			kvp_redis_fault(l->faults, "redis %s: CLUSTER SLOTS maps no slot to an address", l->nodes[i].name);
		else
			kvp_redis_fault(l->faults, "redis %s: CLUSTER SLOTS: %.100s", l->nodes[i].name,
					r->type == REDIS_REPLY_ERROR ? r->str : "not an array");
		kvp_redis_reply_free(&q, 1);
	}
}

/* Each pending request's node: 0 for a single server, by slot in a cluster. 0 when none can go. */
static int route(struct kvp_redis_link *l, struct kvp_redis_req *reqs, uint32_t n, uint64_t deadline)
{
	int unserved = 0;
	if (!l->cluster)
		return 1;
	if (!l->mapped || l->stale)
		slots_learn(l, deadline);
	if (!l->mapped)
		return 0;
	for (uint32_t i = 0; i < n; i++) {
		uint32_t slot = kvp_redis_slot(reqs[i].key, reqs[i].key_len);
		if (l->slots[slot] == KVP_REDIS_NO_NODE) {
			reqs[i].pending = 0;
			unserved = (int)slot + 1;
		} else
			reqs[i].node = l->slots[slot];
	}
	if (unserved)
		kvp_redis_fault(l->faults, "redis cluster: slot %d has no node", unserved - 1);
	return 1;
}

void kvp_redis_exchange(struct kvp_redis_link *l, struct kvp_redis_req *reqs, uint32_t n, uint64_t deadline)
{
	int again = 0;
	for (uint32_t i = 0; i < n; i++) {
		reqs[i].reply = NULL;
		reqs[i].node = 0;
		reqs[i].asking = reqs[i].redirected = 0;
		reqs[i].pending = 1;
	}
	if (!route(l, reqs, n, deadline))
		return;
	round_run(l, reqs, n, deadline);
	for (uint32_t i = 0; i < n; i++) {
		reqs[i].pending = reqs[i].redirected == 1 && !reqs[i].reply;
		again |= reqs[i].pending;
	}
	if (again)
		round_run(l, reqs, n, deadline);
}

int kvp_redis_probe(struct kvp_redis_link *l, uint64_t deadline)
{
	struct kvp_redis_req q = { .op = KVP_REDIS_PING, .pending = 1 };
	int answered;
	if (l->cluster) {
		slots_learn(l, deadline);
		return l->mapped ? 0 : -1;
	}
	round_run(l, &q, 1, deadline);
	answered = q.reply && q.reply->type != REDIS_REPLY_ERROR;
	if (q.reply && !answered)
		kvp_redis_fault(l->faults, "redis %s: PING: %.100s", l->nodes[0].name, q.reply->str);
	kvp_redis_reply_free(&q, 1);
	return answered ? 0 : -1;
}

void kvp_redis_reply_free(struct kvp_redis_req *reqs, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++) {
		if (reqs[i].reply)
			freeReplyObject(reqs[i].reply);
		reqs[i].reply = NULL;
	}
}

/* ---- the link ---- */

kvp_status kvp_redis_link_init(struct kvp_redis_link *l, int cluster, const struct kvp_redis_seed *seeds,
			       uint32_t n_seeds)
{
	l->cluster = cluster;
	l->nodes = calloc(KVP_REDIS_NODES_MAX, sizeof *l->nodes);
	l->slots = calloc(KVP_REDIS_SLOTS, sizeof *l->slots);
	l->slots_next = calloc(KVP_REDIS_SLOTS, sizeof *l->slots_next);
	l->inbuf = malloc(INBUF_BYTES);
	l->poll_fds = calloc(KVP_REDIS_NODES_MAX, sizeof *l->poll_fds);
	l->poll_nodes = calloc(KVP_REDIS_NODES_MAX, sizeof *l->poll_nodes);
	if (!l->nodes || !l->slots || !l->slots_next || !l->inbuf || !l->poll_fds || !l->poll_nodes) {
		kvp_redis_link_fini(l);
		return kvp_fail(KVP_ENOMEM, "pool: remote=: out of memory");
	}
	for (uint32_t i = 0; i < n_seeds && i < KVP_REDIS_NODES_MAX; i++) {
		struct kvp_redis_node *nd = &l->nodes[l->n_nodes++];
		nd->addr = seeds[i].addr;
		nd->addr_len = seeds[i].addr_len;
		snprintf(nd->name, sizeof nd->name, "%s", seeds[i].name);
		node_reset(nd);
	}
	return KVP_OK;
}

void kvp_redis_link_fini(struct kvp_redis_link *l)
{
	for (uint32_t i = 0; l->nodes && i < l->n_nodes; i++) {
		node_close(&l->nodes[i]);
		free(l->nodes[i].out);
		free(l->nodes[i].expect);
	}
	free(l->nodes);
	free(l->slots);
	free(l->slots_next);
	free(l->inbuf);
	free(l->poll_fds);
	free(l->poll_nodes);
	l->nodes = NULL;
	l->slots = NULL;
	l->slots_next = NULL;
	l->inbuf = NULL;
	l->poll_fds = NULL;
	l->poll_nodes = NULL;
	l->n_nodes = 0;
}
