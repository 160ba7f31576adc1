/* The remote tier's client: configuration, lookups, and write-behind publication (tier/remote.h). */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <hiredis/hiredis.h>

#include "tier/redis.h"
#include "tier/remote.h"

#define SEEDS_MAX 16u
#define PASSWORD_MAX 1024u
#define BATCH_VALUES 64u
#define BATCH_BYTES (4u << 20)
#define WRITER_PATIENCE_MS 1000u /* or remote_timeout when longer */

/* A value waiting to be published: key bytes, then value bytes. */
struct remote_item {
	struct remote_item *next;
	size_t key_len, val_len;
	char bytes[];
};

struct kvp_remote {
	struct kvp_remote_config cfg;
	char *password; /* NULL for none */
	struct kvp_redis_faults faults;
	pthread_mutex_t fetch_lock; /* one lookup at a time on the lookup link */
	struct kvp_redis_link fetch;
	struct kvp_redis_link write; /* the writer thread's alone */
	pthread_mutex_t queue_lock;
	pthread_cond_t work, idle;
	struct remote_item *head, *tail;
	uint32_t held;       /* values queued or being sent */
	uint64_t held_bytes; /* and their bytes */
	int stopping;
	_Atomic uint64_t stop_deadline; /* UINT64_MAX until close: then the writer's rounds end there */
	pthread_t writer;
	int writer_started;
	_Atomic uint64_t hits, misses, published, dropped, bytes_fetched, bytes_published;
};

/* ---- configuration ---- */

void kvp_remote_config_default(struct kvp_remote_config *cfg)
{
	memset(cfg, 0, sizeof *cfg);
	cfg->timeout_ms = KVP_REMOTE_TIMEOUT_DEFAULT;
	cfg->queue_max = KVP_REMOTE_QUEUE_DEFAULT;
	cfg->queue_bytes = KVP_REMOTE_QUEUE_BYTES_DEFAULT;
}

static kvp_status text_copy(struct kvp_args *args, const char *key, char *out, size_t cap)
{
	const char *v = NULL;
	unsigned n = 0;
	kvp_status st = kvp_args_text(args, key, &v, &n);
	if (st != KVP_OK || !v)
		return st;
	if (n >= 2 && v[0] == '(' && v[n - 1] == ')') /* the grammar's parentheses: ',' inside is the value's */
		v++, n -= 2;
	if (n == 0 || n >= cap)
		return kvp_fail(KVP_EINVAL, "pool: %s= takes 1..%zu characters", key, cap - 1);
	memcpy(out, v, n);
	out[n] = '\0';
	return KVP_OK;
}

/* One HOST:PORT of a URL, from *p up to the next ',' or '|' or the end; *p moves past it. A pool spec
 * separates its keys with ',', so there the seeds of a cluster are separated by '|'. */
static kvp_status endpoint_next(const char *url, const char **p, char host[256], unsigned *port)
{
	const char *end = *p + strcspn(*p, ",|"), *h = *p, *h_end = NULL, *colon = NULL;
	char *port_end;
	unsigned long n;
	if (*h == '[') {
		h_end = memchr(h, ']', (size_t)(end - h));
		colon = h_end && h_end + 1 < end && h_end[1] == ':' ? h_end + 1 : NULL;
		h++;
	} else {
		for (const char *c = h; c < end; c++)
			if (*c == ':')
				colon = c;
		h_end = colon;
		if (colon && memchr(h, ':', (size_t)(colon - h)))
			return kvp_fail(KVP_EINVAL, "pool: remote=%s: an IPv6 address goes in brackets: [::1]:6379", url);
	}
	if (!colon || !h_end || h_end <= h || h_end - h >= 256)
		return kvp_fail(KVP_EINVAL, "pool: remote=%s: each server is HOST:PORT", url);
	errno = 0;
	n = strtoul(colon + 1, &port_end, 10);
	if (port_end != end || colon + 1 == end || n == 0 || n > 65535 || errno || colon[1] == '-' || colon[1] == '+')
		return kvp_fail(KVP_EINVAL, "pool: remote=%s: a port is 1..65535", url);
	memcpy(host, h, (size_t)(h_end - h));
	host[h_end - h] = '\0';
	*port = (unsigned)n;
	*p = *end ? end + 1 : end;
	return KVP_OK;
}

/* Calls each(ctx, host, port) for every server of the URL; *cluster says which form it has. */
static kvp_status url_walk(const char *url, int *cluster,
			   kvp_status (*each)(void *ctx, const char *host, unsigned port), void *ctx)
{
	const char *p;
	char host[256];
	unsigned port = 0, n = 0;
	kvp_status st = KVP_OK;
	if (!strncmp(url, "redis://", 8)) {
		*cluster = 0;
		p = url + 8;
	} else if (!strncmp(url, "redis-cluster://", 16)) {
		*cluster = 1;
		p = url + 16;
	} else
		return kvp_fail(KVP_EINVAL, "pool: remote=%s: the URL is redis://HOST:PORT or "
				"redis-cluster://HOST:PORT[|HOST:PORT...]", url);
	if (strchr(p, '@'))
		return kvp_fail(KVP_EINVAL, "pool: remote=%s: no password in the URL: it goes in remote_auth_file=PATH",
				url);
	if (strchr(p, '/') || strchr(p, '?'))
		return kvp_fail(KVP_EINVAL, "pool: remote=%s: no path or options after HOST:PORT", url);
	while (st == KVP_OK && *p) {
		if (++n > (*cluster ? SEEDS_MAX : 1))
			return kvp_fail(KVP_EINVAL, "pool: remote=%s: %s", url,
					*cluster ? "at most 16 seed servers" : "one server (redis-cluster:// takes several)");
		st = endpoint_next(url, &p, host, &port);
		if (st == KVP_OK && each)
			st = each(ctx, host, port);
	}
	if (st == KVP_OK && n == 0)
		return kvp_fail(KVP_EINVAL, "pool: remote=%s: no server", url);
	return st;
}

kvp_status kvp_remote_config_parse(struct kvp_args *args, struct kvp_remote_config *cfg)
{
	uint32_t timeout = 0, ttl = UINT32_MAX;
	uint64_t queue = 0;
	int cluster;
	kvp_status st;
	kvp_remote_config_default(cfg);
	st = text_copy(args, "remote", cfg->url, sizeof cfg->url);
	if (st == KVP_OK)
		st = text_copy(args, "remote_auth_file", cfg->auth_file, sizeof cfg->auth_file);
	if (st == KVP_OK)
		st = kvp_args_u32(args, "remote_timeout", 1, 60000, &timeout);
	if (st == KVP_OK)
		st = kvp_args_u32(args, "remote_ttl", 0, INT32_MAX, &ttl);
	if (st == KVP_OK)
		st = kvp_args_size(args, "remote_queue", &queue);
	if (st != KVP_OK)
		return st;
	if (!cfg->url[0] && (cfg->auth_file[0] || timeout || ttl != UINT32_MAX || queue))
		return kvp_fail(KVP_EINVAL, "pool: remote_auth_file=, remote_timeout=, remote_ttl= or remote_queue= "
				"without remote=URL");
	if (queue && queue < (1u << 20))
		return kvp_fail(KVP_EINVAL, "pool: remote_queue=%llu is below 1MiB", (unsigned long long)queue);
	if (queue)
		cfg->queue_bytes = queue;
	if (timeout)
		cfg->timeout_ms = timeout;
	if (ttl != UINT32_MAX)
		cfg->ttl_s = ttl;
	return cfg->url[0] ? url_walk(cfg->url, &cluster, NULL, NULL) : KVP_OK;
}

/* ---- opening ---- */

struct seed_list {
	const char *url;
	struct kvp_redis_seed seeds[SEEDS_MAX];
	uint32_t n;
};

/* Resolves one server now, so that no connection later waits for a name lookup. */
static kvp_status seed_resolve(void *ctx, const char *host, unsigned port)
{
	struct seed_list *list = ctx;
	struct addrinfo hints = { .ai_flags = AI_NUMERICSERV, .ai_socktype = SOCK_STREAM }, *ai;
	struct kvp_redis_seed *s = &list->seeds[list->n];
	char service[8], numeric[48];
	int rc;
	snprintf(service, sizeof service, "%u", port);
	if ((rc = getaddrinfo(host, service, &hints, &ai)) != 0)
		return kvp_fail(KVP_EINVAL, "pool: remote=%s: %s: %s", list->url, host, gai_strerror(rc));
	memcpy(&s->addr, ai->ai_addr, ai->ai_addrlen);
	s->addr_len = ai->ai_addrlen;
	freeaddrinfo(ai);
	/* named as MOVED and CLUSTER SLOTS name nodes, so a seed is the same node as the map's */
	if (getnameinfo((const struct sockaddr *)&s->addr, s->addr_len, numeric, sizeof numeric, NULL, 0,
			NI_NUMERICHOST) != 0)
		snprintf(numeric, sizeof numeric, "%s", host);
	snprintf(s->name, sizeof s->name, "%s:%u", numeric, port);
	list->n++;
	return KVP_OK;
}

/* The password: the file's first line without its line end. */
static kvp_status password_read(const char *path, char **out)
{
	char buf[PASSWORD_MAX + 1];
	ssize_t n;
	size_t len;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return kvp_fail(KVP_EINVAL, "pool: remote_auth_file=%s: %s", path, strerror(errno));
	n = read(fd, buf, PASSWORD_MAX);
	close(fd);
	if (n < 0)
		return kvp_fail(KVP_EINVAL, "pool: remote_auth_file=%s: %s", path, strerror(errno));
	buf[n] = '\0';
	len = strcspn(buf, "\r\n");
	buf[len] = '\0';
	if (len == 0) {
		explicit_bzero(buf, sizeof buf);
		return kvp_fail(KVP_EINVAL, "pool: remote_auth_file=%s holds no password", path);
	}
	*out = strdup(buf);
	explicit_bzero(buf, sizeof buf);
	return *out ? KVP_OK : kvp_fail(KVP_ENOMEM, "pool: remote_auth_file: out of memory");
}

static void *writer_main(void *arg);

/* The writer takes no signal meant for the host's threads. */
static kvp_status writer_start(struct kvp_remote *r)
{
	sigset_t all, old;
	int rc;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	rc = pthread_create(&r->writer, NULL, writer_main, r);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (rc != 0)
		return kvp_fail(KVP_ENOMEM, "pool: remote=: no writer thread: %s", strerror(rc));
	r->writer_started = 1;
	return KVP_OK;
}

static kvp_status remote_init(struct kvp_remote *r, const struct kvp_remote_config *cfg)
{
	struct seed_list list = { .url = cfg->url };
	int cluster = 0;
	kvp_status st = url_walk(cfg->url, &cluster, seed_resolve, &list);
	if (st == KVP_OK && cfg->auth_file[0])
		st = password_read(cfg->auth_file, &r->password);
	if (st == KVP_OK)
		st = kvp_redis_link_init(&r->fetch, cluster, list.seeds, list.n);
	if (st == KVP_OK)
		st = kvp_redis_link_init(&r->write, cluster, list.seeds, list.n);
	if (st != KVP_OK)
		return st;
	for (struct kvp_redis_link *l = &r->fetch; l; l = l == &r->fetch ? &r->write : NULL) {
		l->password = r->password;
		l->ttl_s = cfg->ttl_s;
		l->faults = &r->faults;
	}
	/* Nothing waits on the writer but close, so its round trips take what their bytes take: a batch of
	 * megabytes outlasts a lookup's few milliseconds even on a quiet machine, and on a busy one the server
	 * may not run for longer than that. They end when nothing has moved for the writer's patience, or at
	 * close's cut. */
	atomic_init(&r->stop_deadline, UINT64_MAX);
	r->write.idle_ns = (uint64_t)(cfg->timeout_ms > WRITER_PATIENCE_MS ? cfg->timeout_ms : WRITER_PATIENCE_MS) * 1000000u;
	r->write.cut = &r->stop_deadline;
	return writer_start(r);
}

static void remote_free(struct kvp_remote *r)
{
	kvp_redis_link_fini(&r->fetch);
	kvp_redis_link_fini(&r->write);
	if (r->password) {
		explicit_bzero(r->password, strlen(r->password));
		free(r->password);
	}
	pthread_cond_destroy(&r->work);
	pthread_cond_destroy(&r->idle);
	pthread_mutex_destroy(&r->queue_lock);
	pthread_mutex_destroy(&r->fetch_lock);
	pthread_mutex_destroy(&r->faults.lock);
	free(r);
}

kvp_status kvp_remote_open(const struct kvp_remote_config *cfg, struct kvp_remote **out)
{
	struct kvp_remote *r;
	pthread_condattr_t monotonic;
	kvp_status st;
	*out = NULL;
	if (!(r = calloc(1, sizeof *r)))
		return kvp_fail(KVP_ENOMEM, "pool: remote=: out of memory");
	r->cfg = *cfg;
	pthread_mutex_init(&r->faults.lock, NULL);
	pthread_mutex_init(&r->fetch_lock, NULL);
	pthread_mutex_init(&r->queue_lock, NULL);
	pthread_condattr_init(&monotonic);
	pthread_condattr_setclock(&monotonic, CLOCK_MONOTONIC);
	pthread_cond_init(&r->work, &monotonic);
	pthread_cond_init(&r->idle, &monotonic);
	pthread_condattr_destroy(&monotonic);
	if ((st = remote_init(r, cfg)) != KVP_OK) {
		remote_free(r);
		return st;
	}
	if (kvp_redis_probe(&r->fetch, kvp_redis_now() + (uint64_t)cfg->timeout_ms * 1000000u) != 0) {
		char note[sizeof r->faults.note];
		pthread_mutex_lock(&r->faults.lock);
		memcpy(note, r->faults.note, sizeof note);
		pthread_mutex_unlock(&r->faults.lock);
		kvp_fail(KVP_OK, "pool: remote=%s does not answer yet (%s): lookups miss until it does", cfg->url,
			 note);
	}
	*out = r;
	return KVP_OK;
}

static void queue_drop_all(struct kvp_remote *r)
{
	while (r->head) {
		struct remote_item *it = r->head;
		r->head = it->next;
		r->held--;
		r->held_bytes -= it->key_len + it->val_len;
		atomic_fetch_add(&r->dropped, 1);
		free(it);
	}
	r->tail = NULL;
}

void kvp_remote_close(struct kvp_remote *r)
{
	if (!r)
		return;
	pthread_mutex_lock(&r->queue_lock);
	r->stopping = 1;
	atomic_store(&r->stop_deadline, kvp_redis_now() + (uint64_t)r->cfg.timeout_ms * 1000000u);
	pthread_cond_broadcast(&r->work);
	pthread_mutex_unlock(&r->queue_lock);
	if (r->writer_started)
		pthread_join(r->writer, NULL);
	queue_drop_all(r);
	remote_free(r);
}

/* ---- lookups ---- */

/* Copies a hit out of its reply; a refused GET is a fault (counted once per lookup). */
static uint32_t fetch_collect(struct kvp_remote *r, struct kvp_redis_req *reqs, uint32_t n, void **vals,
			      size_t *val_len, uint32_t *unanswered)
{
	uint32_t hits = 0, lost = 0;
	uint64_t bytes = 0;
	const char *refused = NULL, *refused_by = NULL;
	for (uint32_t i = 0; i < n; i++) {
		const redisReply *rep = reqs[i].reply;
		if (rep && rep->type == REDIS_REPLY_STRING && (vals[i] = malloc(rep->len ? rep->len : 1))) {
			memcpy(vals[i], rep->str, rep->len);
			val_len[i] = rep->len;
			bytes += rep->len;
			hits++;
		} else if (!rep || rep->type != REDIS_REPLY_NIL) {
			lost++;
			if (rep && rep->type == REDIS_REPLY_ERROR && !refused) {
				refused = rep->str;
				refused_by = r->fetch.nodes[reqs[i].node].name;
			}
		}
	}
	if (unanswered)
		*unanswered = lost;
	if (refused)
		kvp_redis_fault(&r->faults, "redis %s: GET refused: %.100s", refused_by, refused);
	atomic_fetch_add(&r->hits, hits);
	atomic_fetch_add(&r->misses, n - hits);
	atomic_fetch_add(&r->bytes_fetched, bytes);
	return hits;
}

uint32_t kvp_remote_fetch(struct kvp_remote *r, uint32_t n, const char *const *keys, const size_t *key_len,
			  void **vals, size_t *val_len, uint32_t *unanswered)
{
	struct kvp_redis_req *reqs;
	uint32_t hits;
	for (uint32_t i = 0; i < n; i++) {
		vals[i] = NULL;
		val_len[i] = 0;
	}
	if (unanswered)
		*unanswered = r ? n : 0;
	if (!r || n == 0)
		return 0;
	if (!(reqs = calloc(n, sizeof *reqs))) {
		kvp_redis_fault(&r->faults, "redis: out of memory for %u lookups", n);
		atomic_fetch_add(&r->misses, n);
		return 0;
	}
	for (uint32_t i = 0; i < n; i++)
		reqs[i] = (struct kvp_redis_req){ .op = KVP_REDIS_GET, .key = keys[i], .key_len = key_len[i] };
	pthread_mutex_lock(&r->fetch_lock);
	kvp_redis_exchange(&r->fetch, reqs, n, kvp_redis_now() + (uint64_t)r->cfg.timeout_ms * 1000000u);
	hits = fetch_collect(r, reqs, n, vals, val_len, unanswered);
	pthread_mutex_unlock(&r->fetch_lock);
	kvp_redis_reply_free(reqs, n);
	free(reqs);
	return hits;
}

void kvp_remote_value_free(void *val)
{
	free(val);
}

/* ---- publication ---- */

int kvp_remote_publish(struct kvp_remote *r, const char *key, size_t key_len, const void *val, size_t len)
{
	struct remote_item *it;
	int full;
	if (!r)
		return -1;
	if (len > SIZE_MAX - key_len - sizeof *it || !(it = malloc(sizeof *it + key_len + len))) {
		atomic_fetch_add(&r->dropped, 1);
		return -1;
	}
	it->next = NULL;
	it->key_len = key_len;
	it->val_len = len;
	memcpy(it->bytes, key, key_len);
	memcpy(it->bytes + key_len, val, len);
	pthread_mutex_lock(&r->queue_lock);
	full = r->stopping || r->held >= r->cfg.queue_max || r->held_bytes + key_len + len > r->cfg.queue_bytes;
	if (!full) {
		if (r->tail)
			r->tail->next = it;
		else
			r->head = it;
		r->tail = it;
		r->held++;
		r->held_bytes += key_len + len;
		pthread_cond_signal(&r->work);
	}
	pthread_mutex_unlock(&r->queue_lock);
	if (full) {
		free(it);
		atomic_fetch_add(&r->dropped, 1);
		return 1;
	}
	return 0;
}

/* Sends one batch as pipelined SETs and counts what the servers stored. */
static void writer_send(struct kvp_remote *r, struct remote_item **batch, uint32_t n)
{
	struct kvp_redis_req reqs[BATCH_VALUES];
	uint32_t stored = 0;
	uint64_t bytes = 0;
	const char *refused = NULL, *refused_by = NULL;
	for (uint32_t i = 0; i < n; i++)
		reqs[i] = (struct kvp_redis_req){ .op = KVP_REDIS_SET, .key = batch[i]->bytes, .key_len = batch[i]->key_len,
						  .val = batch[i]->bytes + batch[i]->key_len, .val_len = batch[i]->val_len };
	kvp_redis_exchange(&r->write, reqs, n, UINT64_MAX); /* the link's patience and cut end it */
	for (uint32_t i = 0; i < n; i++) {
		const redisReply *rep = reqs[i].reply;
		if (rep && rep->type == REDIS_REPLY_STATUS) {
			stored++;
			bytes += batch[i]->val_len;
		} else if (rep && rep->type == REDIS_REPLY_ERROR && !refused) {
			refused = rep->str;
			refused_by = r->write.nodes[reqs[i].node].name;
		}
	}
	if (refused)
		kvp_redis_fault(&r->faults, "redis %s: SET refused: %.100s", refused_by, refused);
	kvp_redis_reply_free(reqs, n);
	atomic_fetch_add(&r->published, stored);
	atomic_fetch_add(&r->bytes_published, bytes);
	atomic_fetch_add(&r->dropped, n - stored);
}

/* Takes up to a batch off the queue, under the queue lock. */
static uint32_t batch_take(struct kvp_remote *r, struct remote_item **batch)
{
	uint32_t n = 0;
	size_t bytes = 0;
	while (r->head && n < BATCH_VALUES && (n == 0 || bytes + r->head->val_len <= BATCH_BYTES)) {
		struct remote_item *it = r->head;
		r->head = it->next;
		bytes += it->val_len;
		batch[n++] = it;
	}
	if (!r->head)
		r->tail = NULL;
	return n;
}

static void *writer_main(void *arg)
{
	struct kvp_remote *r = arg;
	struct remote_item *batch[BATCH_VALUES];
	pthread_mutex_lock(&r->queue_lock);
	for (;;) {
		uint64_t bytes = 0;
		uint32_t n;
		while (!r->head && !r->stopping)
			pthread_cond_wait(&r->work, &r->queue_lock);
		if (!r->head)
			break;
		if (r->stopping && kvp_redis_now() >= atomic_load(&r->stop_deadline))
			break; /* what is left is dropped by close */
		n = batch_take(r, batch);
		pthread_mutex_unlock(&r->queue_lock);
		writer_send(r, batch, n);
		for (uint32_t i = 0; i < n; i++) {
			bytes += batch[i]->key_len + batch[i]->val_len;
			free(batch[i]);
		}
		pthread_mutex_lock(&r->queue_lock);
		r->held -= n;
		r->held_bytes -= bytes;
		pthread_cond_broadcast(&r->idle);
	}
	pthread_mutex_unlock(&r->queue_lock);
	return NULL;
}

int kvp_remote_drain(struct kvp_remote *r, uint32_t wait_ms)
{
	struct timespec until;
	int busy;
	if (!r)
		return 0;
	clock_gettime(CLOCK_MONOTONIC, &until);
	until.tv_sec += wait_ms / 1000;
	until.tv_nsec += (long)(wait_ms % 1000) * 1000000;
	if (until.tv_nsec >= 1000000000) {
		until.tv_sec++;
		until.tv_nsec -= 1000000000;
	}
	pthread_mutex_lock(&r->queue_lock);
	while (r->held && pthread_cond_timedwait(&r->idle, &r->queue_lock, &until) != ETIMEDOUT)
		;
	busy = r->held != 0;
	pthread_mutex_unlock(&r->queue_lock);
	return busy;
}

void kvp_remote_counters(struct kvp_remote *r, struct kvp_remote_counters *out)
{
	memset(out, 0, sizeof *out);
	if (!r)
		return;
	out->hits = atomic_load(&r->hits);
	out->misses = atomic_load(&r->misses);
	out->faults = atomic_load(&r->faults.count);
	out->published = atomic_load(&r->published);
	out->dropped = atomic_load(&r->dropped);
	out->bytes_fetched = atomic_load(&r->bytes_fetched);
	out->bytes_published = atomic_load(&r->bytes_published);
	pthread_mutex_lock(&r->queue_lock);
	out->queued = r->held;
	pthread_mutex_unlock(&r->queue_lock);
	pthread_mutex_lock(&r->faults.lock);
	memcpy(out->note, r->faults.note, sizeof out->note);
	pthread_mutex_unlock(&r->faults.lock);
}
