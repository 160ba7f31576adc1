/*
 * Time to first token (TTFT) of a 2048-token shared prompt, cold and after prefix-cache hits, each as a
 * ratio to cold in the same run; the remote tier's fetch rate against redis-benchmark on the same server;
 * the bytes one prompt puts on the remote tier.
 *
 *   kjv-2k (../shared/models/kjv-2k.bin, or $KVP_MODELS; skipped with a message when absent): TTFT = open
 *     the sequence (kvp_seq_open_prefix) + the reference engine's forward pass (tools/llama.c) over every
 *     prompt token not cached, the last always, through the plugin attention. The prompt: BOS and the first
 *     2047 tokens of kjv-heldout.txt.
 *   d=128, 8 KV heads, 32 query heads, 32 layers, without a model: the cache's part only (the row names say
 *     so): cold = appending 2048 tokens' K/V to every layer, in chunks of 256 tokens (a chunked prefill:
 *     every layer gets a chunk before the next chunk), a hit = the open plus the appends of what is not cached.
 * Rows, each the best of KVP_BENCH_REPS (default 3):
 *   cold        a fresh pool each time (with remote= when Redis is here: its lookup misses on a flushed
 *               server), after one more as a warm-up (the process's first touch of the memory);
 *   local hit   a second sequence of the same prompt in the pool that ran it;
 *   remote hit  a NEW pool with remote=redis://... after the first pool published (kvp_pool_flush), then
 *               the same with a three-node Redis Cluster.
 * n_cached is printed with each; a remote hit that found nothing says so plainly.
 * Fetch rate: bytes of values on the server (sum of STRLEN over its keys: what the remote-hit open had to
 * fetch when it found the whole prompt) over the remote-hit open's time, against `redis-benchmark -t get
 * -d SIZE -P 16 -c 1` on the same server, SIZE the largest value (one connection, as our lookups use).
 * Bytes per prompt, store=fp16 and with a TurboQuant 3-bit cold tier, against the dense fp16 K and V of the
 * cached tokens: what publication stored (sum of STRLEN: a cold tier publishes its block units twice,
 * exact and compressed), and what a remote hit moves (the server's INFO total_net_output_bytes across the
 * remote-hit open of a new pool: the values it fetched, compressed where the units would be cold).
 * Every pool spec carries remote_timeout=20000 (a lookup's deadline is not what is measured here) and
 * remote_queue=512MiB (a d=128, 32-layer prompt publishes 256 MiB at once).
 * The benchmark starts its own redis-server processes on free loopback ports (and removes them); where
 * redis-server, redis-cli or redis-benchmark is missing the remote rows are skipped with a message.
 */
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "kvpager.h"
#include "tools/llama.h"

enum { PROMPT = 2048, CHUNK = 256, SERVERS_MAX = 4 };

#define TIMEOUT_SPEC "remote_timeout=20000,remote_queue=512MiB"
#define TQ3 "k=turboquant(bits=3),v=turboquant(bits=3)"

static void die(const char *what, const char *why)
{
	fprintf(stderr, "bench_prefix: %s: %s\n", what, why);
	exit(1);
}

static void check(kvp_status st, const char *what)
{
	if (st != KVP_OK)
		die(what, kvp_last_error());
}

/* ---- redis-server processes of our own ---- */

struct server {
	pid_t pid;
	int port;
	char dir[64];
};

static struct server servers[SERVERS_MAX];
static int n_servers;

static void servers_stop(void)
{
	char cmd[128];
	for (int i = 0; i < n_servers; i++) {
		kill(servers[i].pid, SIGKILL);
		waitpid(servers[i].pid, NULL, 0);
		snprintf(cmd, sizeof cmd, "rm -rf '%s'", servers[i].dir);
		if (system(cmd) != 0)
			fprintf(stderr, "bench_prefix: could not remove %s\n", servers[i].dir);
	}
	n_servers = 0;
}

static int installed(const char *program)
{
	char cmd[128];
	snprintf(cmd, sizeof cmd, "command -v %s >/dev/null 2>&1", program);
	return system(cmd) == 0;
}

static int port_free(int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port),
				 .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	int fd = socket(AF_INET, SOCK_STREAM, 0), ok = fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0;
	if (fd >= 0)
		close(fd);
	return ok;
}

/* A free port whose cluster bus port (+10000) is free too. */
static int free_port(void)
{
	static unsigned seed;
	if (!seed)
		seed = (unsigned)getpid() * 2654435761u ^ (unsigned)time(NULL);
	for (;;) {
		seed = seed * 1103515245u + 12345u;
		int port = 20000 + (int)((seed >> 8) % 20000);
		if (port_free(port) && port_free(port + 10000))
			return port;
	}
}

/* A command on the server at port; the reply (free it) or NULL when it does not answer. */
static redisReply *run(int port, const char *fmt, ...)
{
	struct timeval tv = { 10, 0 };
	redisContext *c = redisConnectWithTimeout("127.0.0.1", port, tv);
	redisReply *r = NULL;
	va_list ap;
	if (c && !c->err) {
		redisSetTimeout(c, tv);
		va_start(ap, fmt);
		r = redisvCommand(c, fmt, ap);
		va_end(ap);
	}
	if (c)
		redisFree(c);
	return r;
}

static long long run_integer(int port, const char *cmd)
{
	redisReply *r = run(port, cmd);
	long long v = r && r->type == REDIS_REPLY_INTEGER ? r->integer : -1;
	if (r)
		freeReplyObject(r);
	return v;
}

static int answers(int port)
{
	redisReply *r = run(port, "PING");
	if (r)
		freeReplyObject(r);
	return r != NULL;
}

static pid_t spawn(const struct server *s, int cluster)
{
	char port[16], log[96];
	const char *argv[24] = { "redis-server", "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
				 "--daemonize", "no", "--dir", s->dir };
	int argc = 13;
	if (cluster) {
		argv[argc++] = "--cluster-enabled";
		argv[argc++] = "yes";
		argv[argc++] = "--cluster-config-file";
		argv[argc++] = "nodes.conf";
	}
	snprintf(port, sizeof port, "%d", s->port);
	snprintf(log, sizeof log, "%s/log", s->dir);
	pid_t pid = fork();
	if (pid == 0) {
		int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0600);
		prctl(PR_SET_PDEATHSIG, SIGKILL); /* dies with the benchmark, whatever ends it */
		dup2(fd, 1);
		dup2(fd, 2);
		execvp(argv[0], (char *const *)argv);
		_exit(127);
	}
	return pid;
}

/* One more server; its port. */
static int server_start(int cluster)
{
	struct server *s = &servers[n_servers];
	snprintf(s->dir, sizeof s->dir, "/tmp/kvp-bench-redis-XXXXXX");
	if (!mkdtemp(s->dir))
		die("mkdtemp", "cannot make a directory for redis-server");
	for (int attempt = 0; attempt < 5; attempt++) {
		s->port = free_port();
		s->pid = spawn(s, cluster);
		for (int i = 0; i < 250 && !answers(s->port); i++)
			usleep(20000);
		if (answers(s->port)) {
			n_servers++;
			return s->port;
		}
		kill(s->pid, SIGKILL);
		waitpid(s->pid, NULL, 0);
	}
	die("redis-server", "did not come up on any of five ports");
	return -1;
}

static int cluster_ok(int port)
{
	redisReply *r = run(port, "CLUSTER INFO");
	int ok = r && r->type == REDIS_REPLY_STRING && strstr(r->str, "cluster_state:ok");
	if (r)
		freeReplyObject(r);
	return ok;
}

/* Three cluster nodes with every slot assigned (redis-cli --cluster create); their ports. */
static void cluster_start(int port[3])
{
	char cmd[512];
	for (int i = 0; i < 3; i++)
		port[i] = server_start(1);
	snprintf(cmd, sizeof cmd, "redis-cli --cluster create 127.0.0.1:%d 127.0.0.1:%d 127.0.0.1:%d "
		 "--cluster-replicas 0 --cluster-yes >%s/create.log 2>&1", port[0], port[1], port[2],
		 servers[n_servers - 3].dir);
	if (system(cmd) != 0)
		die("redis-cli --cluster create", "failed (its log is in the first node's directory)");
	for (int i = 0; i < 3; i++)
		for (int w = 0; !cluster_ok(port[i]); w++) {
			if (w == 200)
				die("redis cluster", "a node never reached cluster_state:ok");
			usleep(50000);
		}
}

/* ---- what the servers hold ---- */

struct held {
	long long keys;
	long long bytes;     /* sum of STRLEN */
	long long largest;   /* the largest value */
};

/* Keys and value bytes over the nodes (each node's own keys: SCAN and STRLEN on that node). */
static struct held held_by(const int *port, int n)
{
	struct held h = { 0, 0, 0 };
	for (int i = 0; i < n; i++) {
		char cursor[32] = "0";
		do {
			redisReply *r = run(port[i], "SCAN %s COUNT 1000", cursor);
			if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 2)
				die("SCAN", "no answer");
			snprintf(cursor, sizeof cursor, "%s", r->element[0]->str);
			for (size_t k = 0; k < r->element[1]->elements; k++) {
				redisReply *key = r->element[1]->element[k];
				redisReply *len = run(port[i], "STRLEN %b", key->str, (size_t)key->len);
				long long v = len && len->type == REDIS_REPLY_INTEGER ? len->integer : 0;
				h.keys++;
				h.bytes += v;
				h.largest = v > h.largest ? v : h.largest;
				if (len)
					freeReplyObject(len);
			}
			freeReplyObject(r);
		} while (strcmp(cursor, "0"));
	}
	return h;
}

static void flush(const int *port, int n)
{
	for (int i = 0; i < n; i++) {
		redisReply *r = run(port[i], "FLUSHALL");
		if (!r)
			die("FLUSHALL", "no answer");
		freeReplyObject(r);
	}
}

/* Waits until the pool's publication is flushed (at most a minute; a note when it is not), then the keys
 * the nodes hold. */
static long long wait_published(kvp_pool *pool, const int *port, int n)
{
	long long keys = 0;
	if (kvp_pool_flush(pool, 60000) != KVP_OK)
		fprintf(stderr, "bench_prefix: %s\n", kvp_last_error());
	for (int i = 0; i < n; i++)
		keys += run_integer(port[i], "DBSIZE");
	return keys;
}

/* redis-benchmark's GET rate with values of size bytes on the server at port: requests per second, or a
 * negative value when its output has no GET line. The key it reads is set first and removed after. */
static double redis_benchmark_get(int port, long long size)
{
	char cmd[256], out[8192];
	long long n = (256ll << 20) / size; /* about 256 MiB of values */
	char *value = malloc((size_t)size), *at, *last = NULL;
	redisReply *r;
	size_t got;
	FILE *f;
	if (!value)
		die("redis-benchmark", "no memory for its value");
	memset(value, 'x', (size_t)size);
	r = run(port, "SET key:__rand_int__ %b", value, (size_t)size);
	free(value);
	if (!r)
		die("SET", "no answer");
	freeReplyObject(r);
	n = n < 32 ? 32 : n > 20000 ? 20000 : n;
	snprintf(cmd, sizeof cmd, "redis-benchmark -p %d -t get -d %lld -n %lld -P 16 -c 1 -q 2>&1", port, size, n);
	if (!(f = popen(cmd, "r")))
		die("redis-benchmark", "cannot run it");
	got = fread(out, 1, sizeof out - 1, f);
	out[got] = '\0';
	pclose(f);
	for (at = out; (at = strstr(at, "GET: ")); at++) /* progress lines end in \r; the result is the last */
		last = at;
	r = run(port, "DEL key:__rand_int__");
	if (r)
		freeReplyObject(r);
	return last ? strtod(last + 5, NULL) : -1;
}

/* ---- the two workloads: a model's forward pass, and the cache's appends alone ---- */

struct workload {
	const char *name;
	kvp_shape shape;
	int32_t tokens[PROMPT];
	/* computes prompt tokens [from, PROMPT) on s */
	void (*compute)(struct workload *w, kvp_seq *s, uint32_t from);
	/* the model's */
	struct llama_model model;
	struct llama_state state;
	/* the appends' rows: [PROMPT][n_kv_heads][head_dim], the same for every layer */
	float *k, *v;
	int32_t *pos;
};

static void model_compute(struct workload *w, kvp_seq *s, uint32_t from)
{
	struct llama_plugin_cache c;
	memset(&c, 0, sizeof c);
	c.api = kvp_plugin(KVP_ABI_MAJOR);
	c.seq = s;
	c.n_kv_heads = w->model.config.n_kv_heads;
	c.head_size = w->model.config.head_size;
	struct llama_attention att = llama_plugin_attention(&c);
	for (uint32_t p = from; p < PROMPT; p++)
		if (llama_forward(&w->model, &w->state, &att, NULL, w->tokens[p], (int)p) != LLAMA_OK)
			die("forward pass", c.message);
}

static void append_compute(struct workload *w, kvp_seq *s, uint32_t from)
{
	const size_t row = (size_t)w->shape.n_kv_heads * w->shape.head_dim;
	for (uint32_t at = from; at < PROMPT;) {
		uint32_t n = CHUNK - at % CHUNK;
		n = n < PROMPT - at ? n : PROMPT - at;
		for (uint32_t l = 0; l < w->shape.n_layers; l++)
			check(kvp_append(s, l, n, w->pos + at, w->k + at * row, w->v + at * row), "append");
		at += n;
	}
}

static const char *model_dir(void)
{
	const char *d = getenv("KVP_MODELS");
	return d && d[0] ? d : "../shared/models";
}

/* kjv-2k with BOS and the first 2047 tokens of kjv-heldout.txt; 0 when a file is missing. */
static int model_workload(struct workload *w)
{
	char path[3][1024], err[LLAMA_ERROR_MAX], text[8192];
	static int ids[sizeof text + 3];
	struct llama_tokenizer tok;
	const char *names[3] = { "kjv-2k.bin", "tok512.bin", "kjv-heldout.txt" };
	size_t got;
	FILE *f;
	int n;
	for (int i = 0; i < 3; i++) {
		snprintf(path[i], sizeof path[i], "%s/%s", model_dir(), names[i]);
		if (access(path[i], R_OK) != 0) {
			printf("\nkjv-2k rows skipped: %s is missing (set KVP_MODELS to the models directory)\n", path[i]);
			return 0;
		}
	}
	if (llama_model_load(&w->model, path[0], err) != LLAMA_OK ||
	    llama_tokenizer_load(&tok, path[1], w->model.config.vocab_size, err) != LLAMA_OK)
		die("model", err);
	if (!(f = fopen(path[2], "rb")))
		die(path[2], "cannot be read");
	got = fread(text, 1, sizeof text - 1, f); /* about 1.8 characters a token: 8 KiB is enough */
	text[got] = '\0';
	fclose(f);
	n = llama_encode(&tok, text, 1, 0, ids);
	llama_tokenizer_free(&tok);
	if (n < PROMPT)
		die(path[2], "gives fewer than 2048 tokens in its first 8 KiB");
	for (int i = 0; i < PROMPT; i++)
		w->tokens[i] = ids[i];
	if (llama_state_init(&w->state, &w->model.config) != LLAMA_OK)
		die("model", "no memory for its state");
	w->name = "kjv-2k";
	w->shape = llama_model_shape(&w->model.config);
	w->compute = model_compute;
	return 1;
}

static void shape_workload(struct workload *w)
{
	const kvp_shape shape = { 32, 32, 8, 128, 10000.0f, KVP_ROPE_HALF };
	const size_t n = (size_t)PROMPT * shape.n_kv_heads * shape.head_dim;
	w->name = "d128 8kv 32L, cache only";
	w->shape = shape;
	w->compute = append_compute;
	w->k = malloc(n * sizeof *w->k);
	w->v = malloc(n * sizeof *w->v);
	w->pos = malloc(PROMPT * sizeof *w->pos);
	if (!w->k || !w->v || !w->pos)
		die("workload", "no memory for its rows");
	for (size_t i = 0; i < n; i++) {
		w->k[i] = (float)((i * 2654435761u) % 2001) * 0.001f - 1.0f;
		w->v[i] = (float)((i * 40503u) % 1999) * 0.001f - 1.0f;
	}
	for (int i = 0; i < PROMPT; i++) {
		w->pos[i] = i;
		w->tokens[i] = 3 + (int32_t)((i * 7919u) % 509u); /* ids of a 512-token vocabulary */
	}
}

static void workload_free(struct workload *w)
{
	if (w->compute == model_compute) {
		llama_state_free(&w->state);
		llama_model_free(&w->model);
	}
	free(w->k);
	free(w->v);
	free(w->pos);
}

/* ---- timing ---- */

struct cache {
	kvp_pool *pool;
	kvp_tenant *tenant;
};

static struct cache cache_open(const char *pool_spec, const char *tenant_spec)
{
	struct cache c;
	check(kvp_pool_open(pool_spec, &c.pool), pool_spec);
	check(kvp_tenant_open(c.pool, "bench", tenant_spec, &c.tenant), tenant_spec);
	return c;
}

struct ttft {
	double total, open; /* seconds: the whole TTFT, and the open alone */
	uint32_t n_cached;
};

/* One request: open the prompt's sequence and compute what is not cached. The sequence stays open in
 * *seq when seq is given (it registers the prompt for the pool's later sequences), else it is closed. */
static struct ttft request(struct workload *w, kvp_tenant *t, kvp_seq **seq)
{
	struct ttft r;
	kvp_seq *s;
	double t0 = bench_now();
	check(kvp_seq_open_prefix(t, &w->shape, PROMPT, w->tokens, &s, &r.n_cached), "open");
	r.open = bench_now() - t0;
	w->compute(w, s, r.n_cached);
	r.total = bench_now() - t0;
	if (seq)
		*seq = s;
	else
		kvp_seq_close(s);
	return r;
}

static void keep_best(struct ttft *best, struct ttft r)
{
	if (r.total < best->total)
		*best = r;
}

static const struct ttft NONE = { 1e30, 1e30, 0 };

/* Best of reps requests, after one more as a warm-up when reps > 1, each through a new pool (remote, or ""
 * when there is none), flushing the servers first when flush_first (a cold request must miss there too). The last pool stays open in *kept with its
 * sequence, which published the prompt. */
static struct ttft fresh_pools(struct workload *w, const char *pool_spec, const char *tenant_spec,
			       const int *port, int n_ports, int flush_first, int reps, struct cache *kept)
{
	struct ttft best = NONE;
	kept->pool = NULL;
	for (int r = 0; r < reps + (reps > 1); r++) {
		kvp_seq *s;
		struct ttft t;
		if (kept->pool)
			kvp_pool_close(kept->pool);
		if (flush_first)
			flush(port, n_ports);
		*kept = cache_open(pool_spec, tenant_spec);
		t = request(w, kept->tenant, &s);
		if (r || reps == 1) /* the first of several is a warm-up: the process's first touch of the memory */
			keep_best(&best, t);
	}
	return best;
}

static void row(const struct workload *w, const char *what, struct ttft r, const struct ttft *cold)
{
	char config[128];
	snprintf(config, sizeof config, "%s: %s, n_cached %u", w->name, what, r.n_cached);
	bench_row(config, "TTFT", r.total, cold->total, 1e3, "ms", "cold in this run");
}

/* A remote hit's row, and a plain line when it found nothing. */
static void remote_row(const struct workload *w, const char *what, struct ttft r, const struct ttft *cold)
{
	row(w, what, r, cold);
	if (!r.n_cached)
		printf("  %s: the remote hit found NOTHING (n_cached = 0): the new pool fetched no prefix from "
		       "Redis, so this row is a cold prefill, not a hit\n", what);
}

static void say_published(const char *where, long long keys)
{
	if (keys <= 0)
		printf("  %s holds no keys 3 s after the first pool ran the prompt: nothing was published\n", where);
}

static const char *spec_with(char *buf, size_t cap, const char *a, const char *b)
{
	snprintf(buf, cap, "%s,%s", a, b);
	return buf;
}

struct remote {
	int single, cluster[3];
	char single_url[128], cluster_url[160];
};

/* The server's total_net_output_bytes (INFO stats): what it has sent, replies and values; -1 without it. */
static long long net_output_bytes(int port)
{
	redisReply *r = run(port, "INFO stats");
	const char *at = r && r->type == REDIS_REPLY_STRING ?
				 strstr(r->str, "total_net_output_bytes:") : NULL;
	long long v = at ? atoll(at + strlen("total_net_output_bytes:")) : -1;
	if (r)
		freeReplyObject(r);
	return v;
}

/* Bytes one prompt puts on the server with this tenant spec, and bytes a remote hit on it moves, against
 * dense fp16 K and V of what is cached: one cold request through a fresh pool on a flushed server, the
 * sum of STRLEN, then a request through a new pool with the server's output counted around it. */
static void bytes_row(struct workload *w, const struct remote *rd, const char *pool_spec, const char *tenant_spec,
		      const char *label, uint32_t n_cached)
{
	struct cache c;
	char config[160];
	double dense = 2.0 * 2 * n_cached * w->shape.n_layers * w->shape.n_kv_heads * w->shape.head_dim;
	fresh_pools(w, pool_spec, tenant_spec, &rd->single, 1, 1, 1, &c);
	say_published("the server", wait_published(c.pool, &rd->single, 1));
	kvp_pool_close(c.pool);
	struct held h = held_by(&rd->single, 1);
	snprintf(config, sizeof config, "%s: %s, %lld keys", w->name, label, h.keys);
	bench_row(config, "bytes stored per prompt", (double)h.bytes, dense, 1.0 / 1048576, "MiB",
		  "dense fp16 K+V of n_cached");
	c = cache_open(pool_spec, tenant_spec);
	long long before = net_output_bytes(rd->single);
	struct ttft hit = request(w, c.tenant, NULL);
	long long moved = net_output_bytes(rd->single) - before;
	kvp_pool_close(c.pool);
	snprintf(config, sizeof config, "%s: %s, remote hit n_cached %u", w->name, label, hit.n_cached);
	if (before < 0)
		printf("  INFO stats has no total_net_output_bytes: the bytes a hit moves are not measured\n");
	else
		bench_row(config, "bytes moved per hit", (double)moved, dense, 1.0 / 1048576, "MiB",
			  "dense fp16 K+V of n_cached");
}

static void run_workload(struct workload *w, const struct remote *rd, int reps)
{
	const char *tenant_spec = w->compute == model_compute ? "model=kjv-2k,store=fp16" : "model=shape-d128,store=fp16";
	char pool_spec[256], cluster_spec[256], tq_spec[256];
	struct ttft cold, local = NONE, remote = NONE, cluster = NONE;
	struct cache first, c;
	int ports = rd ? 1 : 0;
	snprintf(pool_spec, sizeof pool_spec, "%s%s%s", rd ? rd->single_url : "", rd ? "," : "", rd ? TIMEOUT_SPEC : "");
	printf("\n%s: TTFT of a %d-token prompt, tenant %s, pool %s\n", w->name, PROMPT, tenant_spec,
	       pool_spec[0] ? pool_spec : "\"\"");
	bench_header("TTFT, best of the runs; ratio to cold");
	cold = fresh_pools(w, pool_spec, tenant_spec, rd ? &rd->single : NULL, ports, rd != NULL, reps, &first);
	row(w, "cold (full prefill, fresh pool)", cold, &cold);
	for (int r = 0; r < reps; r++)
		keep_best(&local, request(w, first.tenant, NULL));
	row(w, "local hit (same pool)", local, &cold);
	if (!rd) {
		kvp_pool_close(first.pool);
		return;
	}
	long long keys = wait_published(first.pool, &rd->single, 1);
	say_published("the server", keys);
	struct held h = held_by(&rd->single, 1);
	kvp_pool_close(first.pool);
	for (int r = 0; r < reps; r++) {
		c = cache_open(pool_spec, tenant_spec);
		keep_best(&remote, request(w, c.tenant, NULL));
		kvp_pool_close(c.pool);
	}
	remote_row(w, "remote hit, 1 redis (new pool)", remote, &cold);

	snprintf(cluster_spec, sizeof cluster_spec, "%s," TIMEOUT_SPEC, rd->cluster_url);
	flush(rd->cluster, 3);
	fresh_pools(w, cluster_spec, tenant_spec, NULL, 0, 0, 1, &first);
	say_published("the cluster", wait_published(first.pool, rd->cluster, 3));
	kvp_pool_close(first.pool);
	for (int r = 0; r < reps; r++) {
		c = cache_open(cluster_spec, tenant_spec);
		keep_best(&cluster, request(w, c.tenant, NULL));
		kvp_pool_close(c.pool);
	}
	remote_row(w, "remote hit, 3-node cluster", cluster, &cold);

	bench_header("remote fetch: value bytes on the server over the remote-hit open's time");
	long long size = h.largest ? h.largest
				   : 2ll * 2 * 64 * w->shape.n_layers * w->shape.n_kv_heads * w->shape.head_dim;
	double gets = redis_benchmark_get(rd->single, size);
	char config[160], baseline[96];
	snprintf(config, sizeof config, "%s: 1 redis, %lld keys, %.1f MiB", w->name, h.keys, (double)h.bytes / 1048576);
	snprintf(baseline, sizeof baseline, "redis-benchmark GET -d %lld -P 16 -c 1", size);
	if (gets <= 0)
		printf("  redis-benchmark printed no GET rate: the baseline is missing\n");
	else
		printf("  redis-benchmark: %.0f GET/s of %lld bytes = %.1f MiB/s\n", gets, size,
		       gets * (double)size / 1048576);
	bench_row(config, "fetch", (double)h.bytes / remote.open, gets * (double)size, 1.0 / 1048576, "MiB/s", baseline);
	if (!remote.n_cached || remote.n_cached < local.n_cached)
		printf("  the remote-hit open found %u of the %u tokens a local hit finds: the rate above counts "
		       "bytes it did not fetch\n", remote.n_cached, local.n_cached);

	bench_header("bytes per prompt on the remote tier (stored: sum of STRLEN; moved: the server's output "
		     "during a remote hit), against dense fp16 K+V of n_cached");
	bytes_row(w, rd, pool_spec, tenant_spec, "store=fp16", local.n_cached);
	bytes_row(w, rd, pool_spec, spec_with(tq_spec, sizeof tq_spec, tenant_spec, TQ3), "store=fp16, tq3 cold tier",
		  local.n_cached);
}

int main(void)
{
	static struct workload model, shape;
	struct remote rd;
	int reps = bench_reps(3), have_redis = installed("redis-server") && installed("redis-cli") &&
					       installed("redis-benchmark");
	atexit(servers_stop);
	signal(SIGPIPE, SIG_IGN); /* output piped into head: run on to the end, where the servers are removed */
	printf("Prefix cache: time to first token of a %d-token shared prompt; best of %d\n", PROMPT, reps);
	if (have_redis) {
		rd.single = server_start(0);
		cluster_start(rd.cluster);
		snprintf(rd.single_url, sizeof rd.single_url, "remote=redis://127.0.0.1:%d", rd.single);
		snprintf(rd.cluster_url, sizeof rd.cluster_url, "remote=redis-cluster://127.0.0.1:%d|127.0.0.1:%d|127.0.0.1:%d",
			 rd.cluster[0], rd.cluster[1], rd.cluster[2]);
		printf("redis-server on 127.0.0.1:%d; a 3-node cluster on %d, %d, %d\n", rd.single, rd.cluster[0],
		       rd.cluster[1], rd.cluster[2]);
	} else {
		printf("remote rows skipped: redis-server, redis-cli or redis-benchmark is not installed "
		       "(apt-get install redis-server redis-tools)\n");
	}
	if (model_workload(&model)) {
		run_workload(&model, have_redis ? &rd : NULL, reps);
		workload_free(&model);
	}
	shape_workload(&shape);
	run_workload(&shape, have_redis ? &rd : NULL, reps);
	workload_free(&shape);
	return 0;
}
