/*
 * The remote tier's client (tier/remote.h) against real Redis servers on loopback: a single server and a
 * three-node cluster; publication and lookup, redirections, AUTH, and every fault the issue names (a
 * server killed, paused, out of memory; a full queue); the record format and the pool's remote= keys.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

#include "kvpager.h"
#include "redis_fixture.h"
#include "tier/remote.h"

TestSuite(remote, .fini = redis_fixture_fini);

static struct kvp_remote *remote_open_at(const char *url, uint32_t timeout_ms, const char *auth_file)
{
	struct kvp_remote_config cfg;
	struct kvp_remote *r;
	kvp_remote_config_default(&cfg);
	snprintf(cfg.url, sizeof cfg.url, "%s", url);
	if (auth_file)
		snprintf(cfg.auth_file, sizeof cfg.auth_file, "%s", auth_file);
	cfg.timeout_ms = timeout_ms;
	cr_assert_eq(kvp_remote_open(&cfg, &r), KVP_OK, "%s", kvp_last_error());
	return r;
}

static struct kvp_remote *remote_single(int server, uint32_t timeout_ms)
{
	char url[64];
	snprintf(url, sizeof url, "redis://127.0.0.1:%d", redis_port(server));
	return remote_open_at(url, timeout_ms, NULL);
}

/* A value of len bytes that depends on seed. */
static void value_fill(unsigned char *v, size_t len, unsigned seed)
{
	for (size_t i = 0; i < len; i++)
		v[i] = (unsigned char)(seed * 131u + i * 7u + (i >> 8));
}

static void publish_drained(struct kvp_remote *r, const char *key, const void *val, size_t len)
{
	cr_assert_eq(kvp_remote_publish(r, key, strlen(key), val, len), 0);
	cr_assert_eq(kvp_remote_drain(r, 5000), 0, "the writer never emptied its queue");
}

/* One key looked up: its value (free it) or NULL. */
static void *fetch_one(struct kvp_remote *r, const char *key, size_t *len)
{
	const char *keys[1] = { key };
	size_t key_len[1] = { strlen(key) };
	void *val;
	kvp_remote_fetch(r, 1, keys, key_len, &val, len, NULL);
	return val;
}

static struct kvp_remote_counters counters_of(struct kvp_remote *r)
{
	struct kvp_remote_counters c;
	kvp_remote_counters(r, &c);
	return c;
}

/* ---- the record format ---- */

static const struct kvp_record_id record_id = { .chain = 0x0123456789abcdefull, .layer = 3, .kv_head = 1,
						.tokens = 64, .store = 1, .codec = 0xfeedfacecafebeefull,
						.payload = 1000 };

static unsigned char *record_made(size_t *len)
{
	unsigned char payload[1000], *rec = malloc(kvp_record_bytes(&record_id));
	value_fill(payload, sizeof payload, 5);
	cr_assert_eq(kvp_record_pack(&record_id, payload, rec, kvp_record_bytes(&record_id), len), KVP_OK);
	return rec;
}

Test(remote, record_round_trips_its_payload_in_little_endian)
{
	unsigned char payload[1000];
	const void *got;
	size_t len, used;
	unsigned char *rec = record_made(&len);
	value_fill(payload, sizeof payload, 5);
	cr_assert_eq(len, KVP_RECORD_HEADER + 1000);
	cr_assert_eq(memcmp(rec, "KVPR", 4), 0, "magic, little-endian");
	cr_assert_eq(rec[4], KVP_RECORD_VERSION);
	cr_assert_eq(rec[12], 3, "layer at offset 12");
	cr_assert_eq(rec[32], 0xef, "chain hash at offset 32, low byte first");
	cr_assert_eq(kvp_record_unpack(&record_id, rec, len, &got, &used), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(used, len);
	cr_assert_eq(got, rec + KVP_RECORD_HEADER);
	cr_assert_eq(memcmp(got, payload, sizeof payload), 0);
	free(rec);
}

Test(remote, records_back_to_back_unpack_in_turn)
{
	struct kvp_record_id second = record_id;
	unsigned char small[10] = { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 }, *value;
	size_t first_len, second_len, used;
	const void *got;
	unsigned char *first = record_made(&first_len);
	second.kv_head = 2;
	second.payload = sizeof small;
	value = malloc(first_len + kvp_record_bytes(&second));
	memcpy(value, first, first_len);
	cr_assert_eq(kvp_record_pack(&second, small, value + first_len, kvp_record_bytes(&second), &second_len), KVP_OK);
	cr_assert_eq(kvp_record_unpack(&record_id, value, first_len + second_len, &got, &used), KVP_OK);
	cr_assert_eq(used, first_len);
	cr_assert_eq(kvp_record_unpack(&second, value + used, first_len + second_len - used, &got, &used), KVP_OK,
		     "%s", kvp_last_error());
	cr_assert_eq(used, KVP_RECORD_HEADER + sizeof small);
	cr_assert_eq(memcmp(got, small, sizeof small), 0);
	free(first);
	free(value);
}

Test(remote, record_with_a_flipped_bit_is_corrupt)
{
	size_t len, used;
	const void *got;
	unsigned char *rec = record_made(&len);
	for (size_t byte = 0; byte < len; byte += 37) {
		rec[byte] ^= 0x10;
		cr_assert_eq(kvp_record_unpack(&record_id, rec, len, &got, &used), KVP_ECORRUPT, "byte %zu", byte);
		rec[byte] ^= 0x10;
	}
	rec[8] ^= 1;
	cr_assert_eq(kvp_record_unpack(&record_id, rec, len, &got, &used), KVP_ECORRUPT);
	cr_assert(strstr(kvp_last_error(), "CRC32C"), "%s", kvp_last_error());
	free(rec);
}

Test(remote, truncated_record_is_corrupt)
{
	size_t len, used;
	const void *got;
	unsigned char *rec = record_made(&len);
	for (size_t cut = 0; cut < len; cut = cut * 2 + 1)
		cr_assert_eq(kvp_record_unpack(&record_id, rec, cut, &got, &used), KVP_ECORRUPT, "%zu bytes", cut);
	cr_assert_eq(kvp_record_unpack(&record_id, rec, len - 1, &got, &used), KVP_ECORRUPT);
	free(rec);
}

Test(remote, record_of_another_identity_is_corrupt)
{
	size_t len, used;
	const void *got;
	unsigned char *rec = record_made(&len);
	struct kvp_record_id other[6];
	for (int i = 0; i < 6; i++)
		other[i] = record_id;
	other[0].chain ^= 1;
	other[1].layer = 4;
	other[2].kv_head = 0;
	other[3].tokens = 63;
	other[4].codec ^= 1ull << 63;
	other[5].payload = 999; /* a shorter expectation must not read the longer record as valid either */
	for (int i = 0; i < 6; i++)
		cr_assert_eq(kvp_record_unpack(&other[i], rec, len, &got, &used), KVP_ECORRUPT, "field %d", i);
	cr_assert(strstr(kvp_last_error(), "payload length"), "%s", kvp_last_error());
	rec[4] = 2;
	cr_assert_eq(kvp_record_unpack(&record_id, rec, len, &got, &used), KVP_ECORRUPT);
	cr_assert(strstr(kvp_last_error(), "version"), "%s", kvp_last_error());
	free(rec);
}

/* ---- slots and the pool's keys ---- */

Test(remote, slots_follow_redis_cluster_with_hash_tags)
{
	cr_assert_eq(kvp_redis_slot("123456789", 9), 0x31c3u, "CRC16/XMODEM's check value, below 16384");
	cr_assert_eq(kvp_redis_slot("foo", 3), 12182u);
	cr_assert_eq(kvp_redis_slot("{user1000}.following", 20), kvp_redis_slot("user1000", 8));
	cr_assert_eq(kvp_redis_slot("a{b}c", 5), kvp_redis_slot("b", 1));
	cr_assert_eq(kvp_redis_slot("foo{}{bar}", 10), 8363u, "an empty tag: the whole key");
	cr_assert_eq(kvp_redis_slot("foo{{bar}}zap", 13), 4015u, "the tag is '{bar'");
}

Test(remote, pool_keys_refuse_bad_values_by_name)
{
	static const struct {
		const char *spec, *names;
	} bad[] = {
		{ "remote=http://127.0.0.1:6379", "remote=http" },
		{ "remote=redis://127.0.0.1", "HOST:PORT" },
		{ "remote=redis://127.0.0.1:0", "port" },
		{ "remote=redis://127.0.0.1:70000", "port" },
		{ "remote=redis://:secret@127.0.0.1:6379", "remote_auth_file" },
		{ "remote=redis://127.0.0.1:6379/0", "path" },
		{ "remote=redis://127.0.0.1:1|127.0.0.1:2", "one server" },
		{ "remote=redis://::1:6379", "brackets" },
		{ "remote=redis://127.0.0.1:6379,remote_timeout=0", "remote_timeout" },
		{ "remote=redis://127.0.0.1:6379,remote_timeout=fast", "remote_timeout" },
		{ "remote=redis://127.0.0.1:6379,remote_ttl=-1", "remote_ttl" },
		{ "remote_timeout=5", "without remote=" },
		{ "remote_auth_file=/etc/hostname", "without remote=" },
		{ "remote=redis://127.0.0.1:6379,remote_queue=64KiB", "remote_queue" },
		{ "remote=redis://127.0.0.1:6379,remote_queue=lots", "remote_queue" },
		{ "remote_queue=1GiB", "without remote=" },
	};
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		kvp_pool *p = NULL;
		cr_assert_eq(kvp_pool_open(bad[i].spec, &p), KVP_EINVAL, "%s", bad[i].spec);
		cr_assert_null(p);
		cr_assert(strstr(kvp_last_error(), bad[i].names), "%s: %s", bad[i].spec, kvp_last_error());
	}
}

Test(remote, pool_refuses_an_unreadable_auth_file_at_open)
{
	kvp_pool *p = NULL;
	cr_assert_eq(kvp_pool_open("remote=redis://127.0.0.1:1,remote_auth_file=/nonexistent/kvp-pass", &p),
		     KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "remote_auth_file=/nonexistent/kvp-pass"), "%s", kvp_last_error());
	cr_assert_eq(kvp_pool_open("remote=redis://127.0.0.1:1,remote_auth_file=/dev/null", &p), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "no password"), "%s", kvp_last_error());
}

Test(remote, pool_opens_with_a_note_when_the_server_is_down)
{
	char spec[128];
	kvp_pool *p = NULL;
	snprintf(spec, sizeof spec, "remote=redis://127.0.0.1:%d,remote_timeout=50,remote_ttl=60", redis_fixture_port());
	cr_assert_eq(kvp_pool_open(spec, &p), KVP_OK, "%s", kvp_last_error());
	cr_assert_not_null(p);
	cr_assert(strstr(kvp_last_error(), "does not answer yet"), "%s", kvp_last_error());
	cr_assert(strstr(kvp_last_error(), "connect"), "%s", kvp_last_error());
	kvp_pool_close(p);
}

Test(remote, pool_takes_cluster_seeds_separated_by_bars)
{
	char spec[160];
	kvp_pool *p = NULL;
	snprintf(spec, sizeof spec, "remote=redis-cluster://127.0.0.1:%d|[::1]:%d|localhost:%d,remote_timeout=20",
		 redis_fixture_port(), redis_fixture_port(), redis_fixture_port());
	cr_assert_eq(kvp_pool_open(spec, &p), KVP_OK, "%s", kvp_last_error());
	cr_assert(strstr(kvp_last_error(), "does not answer yet"), "%s", kvp_last_error());
	kvp_pool_close(p);
	cr_assert_eq(kvp_pool_open("remote=redis-cluster://127.0.0.1:1,127.0.0.1:2", &p), KVP_EINVAL,
		     "',' ends the remote= value in a pool spec");
}

Test(remote, pool_takes_cluster_seeds_separated_by_commas_in_parentheses)
{
	char spec[160];
	kvp_pool *p = NULL;
	snprintf(spec, sizeof spec, "remote=(redis-cluster://127.0.0.1:%d,127.0.0.1:%d),remote_timeout=20",
		 redis_fixture_port(), redis_fixture_port());
	cr_assert_eq(kvp_pool_open(spec, &p), KVP_OK, "%s", kvp_last_error());
	cr_assert(strstr(kvp_last_error(), "does not answer yet"), "%s", kvp_last_error());
	kvp_pool_close(p);
}

Test(remote, pool_opens_against_a_live_server_without_a_note)
{
	char spec[128];
	kvp_pool *p = NULL;
	int s;
	redis_fixture_need();
	s = redis_start(NULL);
	snprintf(spec, sizeof spec, "mem=64MiB,remote=redis://localhost:%d,remote_timeout=1000", redis_port(s));
	cr_assert_eq(kvp_pool_open(spec, &p), KVP_OK, "%s", kvp_last_error());
	cr_assert_str_empty(kvp_last_error());
	kvp_pool_close(p);
}

/* ---- one server ---- */

Test(remote, publish_then_fetch_round_trips)
{
	unsigned char value[5000];
	struct kvp_remote *r;
	struct kvp_remote_counters c;
	size_t len;
	void *got;
	redis_fixture_need();
	r = remote_single(redis_start(NULL), 1000);
	value_fill(value, sizeof value, 1);
	publish_drained(r, "kvp:t:0001", value, sizeof value);
	got = fetch_one(r, "kvp:t:0001", &len);
	cr_assert_not_null(got, "%s", counters_of(r).note);
	cr_assert_eq(len, sizeof value);
	cr_assert_eq(memcmp(got, value, len), 0);
	kvp_remote_value_free(got);
	c = counters_of(r);
	cr_assert_eq(c.published, 1);
	cr_assert_eq(c.hits, 1);
	cr_assert_eq(c.misses, 0);
	cr_assert_eq(c.faults, 0, "%s", c.note);
	cr_assert_eq(c.bytes_fetched, sizeof value);
	cr_assert_eq(c.bytes_published, sizeof value);
	kvp_remote_close(r);
}

Test(remote, missing_key_is_a_miss)
{
	struct kvp_remote *r;
	size_t len = 7;
	redis_fixture_need();
	r = remote_single(redis_start(NULL), 1000);
	cr_assert_null(fetch_one(r, "kvp:never", &len));
	cr_assert_eq(len, 0);
	cr_assert_eq(counters_of(r).misses, 1);
	cr_assert_eq(counters_of(r).faults, 0, "a miss is not a fault");
	kvp_remote_close(r);
}

Test(remote, pipelined_fetch_answers_every_key_in_order)
{
	enum { N = 600 };
	static char names[N][24];
	const char *keys[N];
	size_t key_len[N], len[N];
	void *vals[N];
	unsigned char value[300];
	struct kvp_remote *r;
	redisReply *stats;
	int s;
	redis_fixture_need();
	s = redis_start(NULL);
	r = remote_single(s, 2000);
	for (int i = 0; i < N; i++) {
		snprintf(names[i], sizeof names[i], "kvp:many:%d", i);
		keys[i] = names[i];
		key_len[i] = strlen(names[i]);
		if (i % 3 != 0) {
			value_fill(value, sizeof value, (unsigned)i);
			while (kvp_remote_publish(r, keys[i], key_len[i], value, sizeof value - (size_t)i % 50) != 0)
				kvp_remote_drain(r, 1000); /* the queue holds 1024 values: never full here */
		}
	}
	cr_assert_eq(kvp_remote_drain(r, 5000), 0);
	cr_assert_eq(kvp_remote_fetch(r, N, keys, key_len, vals, len, NULL), N - N / 3, "%s", counters_of(r).note);
	for (int i = 0; i < N; i++) {
		if (i % 3 == 0) {
			cr_assert_null(vals[i], "key %d", i);
			continue;
		}
		value_fill(value, sizeof value, (unsigned)i);
		cr_assert_eq(len[i], sizeof value - (size_t)i % 50, "key %d", i);
		cr_assert_eq(memcmp(vals[i], value, len[i]), 0, "key %d", i);
		kvp_remote_value_free(vals[i]);
	}
	stats = redis_run(redis_port(s), "INFO commandstats");
	cr_assert_not_null(stats);
	cr_assert(strstr(stats->str, "cmdstat_get:calls=600,"), "one GET per key: %s", stats->str);
	freeReplyObject(stats);
	kvp_remote_close(r);
}

Test(remote, ttl_is_set_on_published_keys)
{
	struct kvp_remote_config cfg;
	struct kvp_remote *r;
	redisReply *ttl;
	int s;
	redis_fixture_need();
	s = redis_start(NULL);
	kvp_remote_config_default(&cfg);
	snprintf(cfg.url, sizeof cfg.url, "redis://127.0.0.1:%d", redis_port(s));
	cfg.timeout_ms = 1000;
	cfg.ttl_s = 100;
	cr_assert_eq(kvp_remote_open(&cfg, &r), KVP_OK, "%s", kvp_last_error());
	publish_drained(r, "kvp:ttl", "abc", 3);
	ttl = redis_run(redis_port(s), "TTL kvp:ttl");
	cr_assert_not_null(ttl);
	cr_assert_eq(ttl->type, REDIS_REPLY_INTEGER);
	cr_assert(ttl->integer > 0 && ttl->integer <= 100, "TTL %lld", ttl->integer);
	freeReplyObject(ttl);
	kvp_remote_close(r);
}

static void password_file(char *path, size_t cap, const char *text)
{
	FILE *f;
	snprintf(path, cap, "%s/password", redis_servers[0].dir);
	cr_assert_not_null(f = fopen(path, "w"));
	fputs(text, f);
	fclose(f);
}

Test(remote, auth_from_a_file_opens_the_server)
{
	static const char *const pass[] = { "--requirepass", "s3cret word", NULL };
	char path[128], url[64];
	struct kvp_remote *r;
	size_t len;
	void *got;
	int s;
	redis_fixture_need();
	s = redis_start(pass);
	password_file(path, sizeof path, "s3cret word\n");
	snprintf(url, sizeof url, "redis://127.0.0.1:%d", redis_port(s));
	r = remote_open_at(url, 1000, path);
	publish_drained(r, "kvp:auth", "payload", 7);
	got = fetch_one(r, "kvp:auth", &len);
	cr_assert_not_null(got, "%s", counters_of(r).note);
	cr_assert_eq(len, 7);
	kvp_remote_value_free(got);
	cr_assert_eq(counters_of(r).faults, 0, "%s", counters_of(r).note);
	kvp_remote_close(r);
}

Test(remote, wrong_password_is_a_miss_with_a_note)
{
	static const char *const pass[] = { "--requirepass", "right", NULL };
	char path[128], url[64];
	struct kvp_remote *r;
	struct kvp_remote_counters c;
	size_t len;
	int s;
	redis_fixture_need();
	s = redis_start(pass);
	password_file(path, sizeof path, "wrong\n");
	snprintf(url, sizeof url, "redis://127.0.0.1:%d", redis_port(s));
	r = remote_open_at(url, 1000, path);
	cr_assert_null(fetch_one(r, "kvp:auth", &len));
	c = counters_of(r);
	cr_assert_geq(c.faults, 1);
	cr_assert_eq(c.misses, 1);
	cr_assert(strstr(c.note, "refused") && strstr(c.note, "WRONGPASS"), "%s", c.note);
	kvp_remote_close(r);
}

Test(remote, killed_server_turns_into_misses_and_a_restart_serves_again)
{
	struct kvp_remote *r;
	struct kvp_remote_counters c;
	double t0, until;
	size_t len;
	void *got = NULL;
	int s;
	redis_fixture_need();
	s = redis_start(NULL);
	r = remote_single(s, 50);
	publish_drained(r, "kvp:k", "before", 6);
	got = fetch_one(r, "kvp:k", &len);
	cr_assert_not_null(got, "%s", counters_of(r).note);
	kvp_remote_value_free(got);
	got = NULL;
	redis_kill(s);
	for (int i = 0; i < 5; i++) {
		t0 = redis_fixture_ms();
		cr_assert_null(fetch_one(r, "kvp:k", &len));
		cr_assert_lt(redis_fixture_ms() - t0, 1000.0, "a lookup costs at most the timeout");
	}
	c = counters_of(r);
	cr_assert_geq(c.faults, 1);
	cr_assert(strstr(c.note, "127.0.0.1:"), "%s", c.note);
	redis_restart(s);
	/* the node is retried after its backoff (at most 1 s): publish until the writer gets through */
	until = redis_fixture_ms() + 8000;
	while (!got && redis_fixture_ms() < until) {
		kvp_remote_publish(r, "kvp:k", 5, "after", 5);
		kvp_remote_drain(r, 1000);
		got = fetch_one(r, "kvp:k", &len);
		if (!got)
			usleep(100000);
	}
	cr_assert_not_null(got, "never served again: %s", counters_of(r).note);
	cr_assert_eq(memcmp(got, "after", 5), 0);
	kvp_remote_value_free(got);
	kvp_remote_close(r);
}

Test(remote, connection_the_server_closed_while_idle_is_replaced_without_a_miss)
{
	struct kvp_remote *r;
	redisReply *kill;
	size_t len;
	void *got;
	int s;
	redis_fixture_need();
	s = redis_start(NULL);
	r = remote_single(s, 1000);
	publish_drained(r, "kvp:idle", "value", 5);
	got = fetch_one(r, "kvp:idle", &len);
	cr_assert_not_null(got);
	kvp_remote_value_free(got);
	kill = redis_run(redis_port(s), "CLIENT KILL TYPE normal");
	cr_assert(kill && kill->type == REDIS_REPLY_INTEGER && kill->integer >= 2, "the lookup and writer links");
	freeReplyObject(kill);
	usleep(50000); /* the FIN reaches us */
	got = fetch_one(r, "kvp:idle", &len);
	cr_assert_not_null(got, "%s", counters_of(r).note);
	kvp_remote_value_free(got);
	publish_drained(r, "kvp:idle2", "value", 5);
	cr_assert_eq(counters_of(r).published, 2, "%s", counters_of(r).note);
	cr_assert_eq(counters_of(r).faults, 0, "%s", counters_of(r).note);
	kvp_remote_close(r);
}

Test(remote, paused_server_costs_at_most_the_timeout)
{
	enum { TIMEOUT = 50 };
	const char *keys[3] = { "kvp:a", "kvp:b", "kvp:c" };
	size_t key_len[3] = { 5, 5, 5 }, len[3];
	void *vals[3];
	struct kvp_remote *r;
	double t0, elapsed, until;
	uint32_t hits = 0;
	int s;
	redis_fixture_need();
	s = redis_start(NULL);
	r = remote_single(s, TIMEOUT);
	for (int i = 0; i < 3; i++)
		kvp_remote_publish(r, keys[i], 5, "v", 1);
	cr_assert_eq(kvp_remote_drain(r, 5000), 0);
	kill(redis_pid(s), SIGSTOP);
	t0 = redis_fixture_ms();
	cr_assert_eq(kvp_remote_fetch(r, 3, keys, key_len, vals, len, NULL), 0);
	elapsed = redis_fixture_ms() - t0;
	cr_assert_lt(elapsed, 20.0 * TIMEOUT, "%.1f ms for a %d ms timeout", elapsed, TIMEOUT);
	cr_assert_null(vals[0]);
	cr_assert(strstr(counters_of(r).note, "timeout"), "%s", counters_of(r).note);
	cr_assert_eq(counters_of(r).misses, 3);
	/* while it backs off, the paused node costs nothing */
	t0 = redis_fixture_ms();
	cr_assert_eq(kvp_remote_fetch(r, 3, keys, key_len, vals, len, NULL), 0);
	cr_assert_lt(redis_fixture_ms() - t0, 20.0 * TIMEOUT);
	kill(redis_pid(s), SIGCONT);
	until = redis_fixture_ms() + 5000;
	while (hits < 3 && redis_fixture_ms() < until) {
		usleep(50000);
		hits = kvp_remote_fetch(r, 3, keys, key_len, vals, len, NULL);
	}
	cr_assert_eq(hits, 3, "%s", counters_of(r).note);
	for (int i = 0; i < 3; i++)
		kvp_remote_value_free(vals[i]);
	kvp_remote_close(r);
}

Test(remote, full_server_memory_refuses_sets_and_counts_them)
{
	enum { N = 40, BYTES = 64 << 10 };
	static unsigned char value[BYTES];
	struct kvp_remote *r;
	struct kvp_remote_counters c;
	redisReply *rep;
	char key[32];
	int s;
	redis_fixture_need();
	s = redis_start(NULL);
	rep = redis_run(redis_port(s), "CONFIG SET maxmemory 1mb");
	cr_assert(rep && rep->type == REDIS_REPLY_STATUS);
	freeReplyObject(rep);
	rep = redis_run(redis_port(s), "CONFIG SET maxmemory-policy noeviction");
	freeReplyObject(rep);
	r = remote_single(s, 1000);
	for (int i = 0; i < N; i++) {
		snprintf(key, sizeof key, "kvp:big:%d", i);
		value_fill(value, sizeof value, (unsigned)i);
		cr_assert_eq(kvp_remote_publish(r, key, strlen(key), value, sizeof value), 0);
	}
	cr_assert_eq(kvp_remote_drain(r, 5000), 0);
	c = counters_of(r);
	cr_assert_eq(c.published + c.dropped, N);
	cr_assert_gt(c.dropped, 0, "1 MiB cannot hold 2.5 MiB");
	cr_assert_geq(c.faults, 1);
	cr_assert(strstr(c.note, "SET refused") && strstr(c.note, "OOM"), "%s", c.note);
	kvp_remote_close(r);
}

/* A listener that accepts connections (the kernel does) and never answers. */
static int silent_listener(int *port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof a;
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	cr_assert_eq(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
	cr_assert_eq(listen(fd, 16), 0);
	cr_assert_eq(getsockname(fd, (struct sockaddr *)&a, &len), 0);
	*port = ntohs(a.sin_port);
	return fd;
}

Test(remote, full_queue_drops_and_counts)
{
	struct kvp_remote_config cfg;
	struct kvp_remote *r;
	int port, fd = silent_listener(&port), refused = 0;
	double t0;
	kvp_remote_config_default(&cfg);
	snprintf(cfg.url, sizeof cfg.url, "redis://127.0.0.1:%d", port);
	cfg.timeout_ms = 500; /* the writer stays on its first batch while the test fills the queue */
	cfg.queue_max = 4;
	cr_assert_eq(kvp_remote_open(&cfg, &r), KVP_OK, "%s", kvp_last_error());
	for (int i = 0; i < 4; i++)
		cr_assert_eq(kvp_remote_publish(r, "kvp:q", 5, "value", 5), 0);
	t0 = redis_fixture_ms();
	for (int i = 0; i < 3; i++)
		refused += kvp_remote_publish(r, "kvp:q", 5, "value", 5) != 0;
	cr_assert_lt(redis_fixture_ms() - t0, 100.0, "publish never waits on the network");
	cr_assert_eq(refused, 3);
	cr_assert_eq(counters_of(r).dropped, 3);
	cr_assert_eq(counters_of(r).published, 0);
	t0 = redis_fixture_ms();
	kvp_remote_close(r);
	cr_assert_lt(redis_fixture_ms() - t0, 2 * 500.0, "close waits at most the timeout");
	close(fd);
}

Test(remote, byte_bound_of_the_queue_drops_too)
{
	static unsigned char value[4096];
	struct kvp_remote_config cfg;
	struct kvp_remote *r;
	int port, fd = silent_listener(&port);
	kvp_remote_config_default(&cfg);
	snprintf(cfg.url, sizeof cfg.url, "redis://127.0.0.1:%d", port);
	cfg.timeout_ms = 500;
	cfg.queue_bytes = 3 * (sizeof value + 5) + 5; /* keys count: three values and one empty one */
	cr_assert_eq(kvp_remote_open(&cfg, &r), KVP_OK, "%s", kvp_last_error());
	for (int i = 0; i < 3; i++)
		cr_assert_eq(kvp_remote_publish(r, "kvp:b", 5, value, sizeof value), 0);
	cr_assert_neq(kvp_remote_publish(r, "kvp:b", 5, value, sizeof value), 0);
	cr_assert_eq(kvp_remote_publish(r, "kvp:b", 5, value, 0), 0, "an empty value still fits");
	cr_assert_eq(counters_of(r).dropped, 1);
	kvp_remote_close(r);
	close(fd);
}

/* Three megabytes in one batch take longer than a 1 ms timeout to reach the server: the writer waits while
 * bytes move (a lookup's timeout is no bound on what it costs to publish a long prompt). */
Test(remote, a_batch_longer_than_the_timeout_is_published_while_its_bytes_move)
{
	enum { N = 48, BYTES = 64 << 10 };
	static unsigned char value[BYTES];
	struct kvp_remote *r, *reader;
	struct kvp_remote_counters c;
	uint64_t opened_with;
	char key[32];
	size_t len;
	void *got;
	int s;
	redis_fixture_need();
	s = redis_start(NULL);
	r = remote_single(s, 1);
	opened_with = counters_of(r).faults; /* open's PING is a lookup: on a busy machine 1 ms may pass */
	for (int i = 0; i < N; i++) {
		snprintf(key, sizeof key, "kvp:long:%02d", i);
		value_fill(value, sizeof value, (unsigned)i);
		cr_assert_eq(kvp_remote_publish(r, key, strlen(key), value, sizeof value), 0);
	}
	cr_assert_eq(kvp_remote_drain(r, 10000), 0, "the writer never emptied its queue");
	c = counters_of(r);
	cr_assert_eq(c.published, N, "%s", c.note);
	cr_assert_eq(c.dropped, 0, "%s", c.note);
	cr_assert_eq(c.faults, opened_with, "the writer faulted: %s", c.note);
	kvp_remote_close(r);
	reader = remote_single(s, 2000);
	value_fill(value, sizeof value, N - 1);
	got = fetch_one(reader, "kvp:long:47", &len);
	cr_assert_not_null(got, "%s", counters_of(reader).note);
	cr_assert_eq(len, sizeof value);
	cr_assert_eq(memcmp(got, value, len), 0);
	kvp_remote_value_free(got);
	kvp_remote_close(reader);
}

/* A server that does not run for 300 ms (a busy machine's scheduler, here SIGSTOP) with a value on its way:
 * past a lookup's 50 ms timeout, within the writer's patience of a second, so the value is stored. */
Test(remote, publication_outlasts_a_server_that_stalls_for_less_than_a_second)
{
	struct kvp_remote *r;
	struct kvp_remote_counters c;
	size_t len;
	void *got;
	int s;
	redis_fixture_need();
	s = redis_start(NULL);
	r = remote_single(s, 50);
	publish_drained(r, "kvp:before", "v", 1);
	kill(redis_pid(s), SIGSTOP);
	cr_assert_eq(kvp_remote_publish(r, "kvp:stalled", 11, "stalled", 7), 0);
	usleep(300000);
	kill(redis_pid(s), SIGCONT);
	cr_assert_eq(kvp_remote_drain(r, 5000), 0, "the writer never emptied its queue");
	c = counters_of(r);
	cr_assert_eq(c.published, 2, "%s", c.note);
	cr_assert_eq(c.dropped, 0, "%s", c.note);
	got = fetch_one(r, "kvp:stalled", &len);
	cr_assert_not_null(got, "%s", counters_of(r).note);
	cr_assert_eq(memcmp(got, "stalled", 7), 0);
	kvp_remote_value_free(got);
	kvp_remote_close(r);
}

/* ---- the cluster ---- */

static struct kvp_remote *remote_cluster(int first, int seeds, uint32_t timeout_ms)
{
	char url[128];
	int n = snprintf(url, sizeof url, "redis-cluster://");
	for (int i = 0; i < seeds; i++)
		n += snprintf(url + n, sizeof url - (size_t)n, "%s127.0.0.1:%d", i ? "|" : "", redis_port(first + i));
	return remote_open_at(url, timeout_ms, NULL);
}

static long long dbsize(int server)
{
	redisReply *r = redis_run(redis_port(server), "DBSIZE");
	long long n;
	cr_assert(r && r->type == REDIS_REPLY_INTEGER);
	n = r->integer;
	freeReplyObject(r);
	return n;
}

Test(remote, cluster_round_trips_keys_spread_over_every_node)
{
	enum { N = 60 };
	static char names[N][24];
	const char *keys[N];
	size_t key_len[N], len[N];
	void *vals[N];
	unsigned char value[200];
	struct kvp_remote *r;
	int first;
	redis_fixture_need();
	first = redis_cluster_start();
	r = remote_cluster(first, 3, 1000);
	for (int i = 0; i < N; i++) {
		snprintf(names[i], sizeof names[i], "kvp:c:%d", i);
		keys[i] = names[i];
		key_len[i] = strlen(names[i]);
		value_fill(value, sizeof value, (unsigned)i);
		cr_assert_eq(kvp_remote_publish(r, keys[i], key_len[i], value, sizeof value), 0);
	}
	cr_assert_eq(kvp_remote_drain(r, 5000), 0);
	cr_assert_eq(counters_of(r).published, N, "%s", counters_of(r).note);
	for (int i = 0; i < 3; i++)
		cr_assert_gt(dbsize(first + i), 0, "node %d holds some of the keys", i);
	cr_assert_eq(dbsize(first) + dbsize(first + 1) + dbsize(first + 2), N);
	cr_assert_eq(kvp_remote_fetch(r, N, keys, key_len, vals, len, NULL), N, "%s", counters_of(r).note);
	for (int i = 0; i < N; i++) {
		value_fill(value, sizeof value, (unsigned)i);
		cr_assert_eq(len[i], sizeof value);
		cr_assert_eq(memcmp(vals[i], value, sizeof value), 0, "key %d", i);
		kvp_remote_value_free(vals[i]);
	}
	cr_assert_eq(counters_of(r).faults, 0, "%s", counters_of(r).note);
	kvp_remote_close(r);
}

Test(remote, cluster_node_killed_misses_only_its_keys)
{
	enum { N = 60, TIMEOUT = 50 };
	static char names[N][24];
	const char *keys[N];
	size_t key_len[N], len[N];
	void *vals[N];
	struct kvp_remote *r;
	uint32_t hits, expected = 0;
	double t0;
	char dead[32];
	int first;
	redis_fixture_need();
	first = redis_cluster_start();
	r = remote_cluster(first, 3, TIMEOUT);
	for (int i = 0; i < N; i++) {
		snprintf(names[i], sizeof names[i], "kvp:d:%d", i);
		keys[i] = names[i];
		key_len[i] = strlen(names[i]);
		cr_assert_eq(kvp_remote_publish(r, keys[i], key_len[i], "v", 1), 0);
	}
	cr_assert_eq(kvp_remote_drain(r, 5000), 0);
	cr_assert_eq(counters_of(r).published, N, "%s", counters_of(r).note);
	expected = (uint32_t)(N - dbsize(first + 2));
	redis_kill(first + 2);
	snprintf(dead, sizeof dead, "127.0.0.1:%d", redis_port(first + 2));
	for (int round = 0; round < 3; round++) {
		t0 = redis_fixture_ms();
		hits = kvp_remote_fetch(r, N, keys, key_len, vals, len, NULL);
		cr_assert_lt(redis_fixture_ms() - t0, 20.0 * TIMEOUT);
		cr_assert_eq(hits, expected, "round %d: %s", round, counters_of(r).note);
		for (int i = 0; i < N; i++)
			kvp_remote_value_free(vals[i]);
	}
	cr_assert(strstr(counters_of(r).note, dead), "%s names %s", counters_of(r).note, dead);
	kvp_remote_close(r);
}

static void node_id(int server, char id[48])
{
	redisReply *r = redis_run(redis_port(server), "CLUSTER MYID");
	cr_assert(r && r->type == REDIS_REPLY_STRING && r->len < 48);
	memcpy(id, r->str, r->len + 1);
	freeReplyObject(r);
}

/* The node of first..first+2 that serves key: the others answer MOVED. */
static int key_owner(int first, const char *key)
{
	for (int i = first; i < first + 3; i++) {
		redisReply *r = redis_run(redis_port(i), "GET %s", key);
		int owns = r && r->type != REDIS_REPLY_ERROR;
		if (r)
			freeReplyObject(r);
		if (owns)
			return i;
	}
	cr_assert_fail("no node serves %s", key);
	return -1;
}

static void run_ok(int server, const char *fmt, const char *a, const char *b)
{
	redisReply *r = redis_run(redis_port(server), fmt, a, b);
	cr_assert(r && r->type != REDIS_REPLY_ERROR, "%s on %d: %s", fmt, redis_port(server), r ? r->str : "no reply");
	freeReplyObject(r);
}

Test(remote, cluster_nodes_of_unknown_endpoint_are_reached_at_the_address_asked)
{
	enum { N = 30 };
	static char names[N][24];
	const char *keys[N];
	size_t key_len[N], len[N];
	void *vals[N];
	struct kvp_remote *cluster, *single;
	char url[64];
	int first;
	redis_fixture_need();
	first = redis_cluster_start();
	for (int i = first; i < first + 3; i++)
		run_ok(i, "CONFIG SET %s %s", "cluster-preferred-endpoint-type", "unknown-endpoint");
	for (int i = 0; i < N; i++) {
		snprintf(names[i], sizeof names[i], "kvp:u:%d", i);
		keys[i] = names[i];
		key_len[i] = strlen(names[i]);
	}
	/* CLUSTER SLOTS names every node "": the seed's host with each node's port */
	cluster = remote_cluster(first, 1, 1000);
	for (int i = 0; i < N; i++)
		kvp_remote_publish(cluster, keys[i], key_len[i], "c", 1);
	cr_assert_eq(kvp_remote_drain(cluster, 5000), 0);
	cr_assert_eq(kvp_remote_fetch(cluster, N, keys, key_len, vals, len, NULL), N, "%s", counters_of(cluster).note);
	for (int i = 0; i < N; i++)
		kvp_remote_value_free(vals[i]);
	kvp_remote_close(cluster);
	/* a client that takes the cluster for one server gets "MOVED slot :port" for two thirds of the keys */
	snprintf(url, sizeof url, "redis://127.0.0.1:%d", redis_port(first));
	single = remote_open_at(url, 1000, NULL);
	cr_assert_eq(kvp_remote_fetch(single, N, keys, key_len, vals, len, NULL), N, "%s", counters_of(single).note);
	for (int i = 0; i < N; i++)
		kvp_remote_value_free(vals[i]);
	cr_assert_eq(counters_of(single).faults, 0, "%s", counters_of(single).note);
	kvp_remote_close(single);
}

static void cluster_wait_ok(int server)
{
	double until = redis_fixture_ms() + 10000;
	for (;;) {
		redisReply *r = redis_run(redis_port(server), "CLUSTER INFO");
		int ok = r && r->type == REDIS_REPLY_STRING && strstr(r->str, "cluster_state:ok");
		if (r)
			freeReplyObject(r);
		if (ok)
			return;
		cr_assert_lt(redis_fixture_ms(), until, "node %d never reached cluster_state:ok", redis_port(server));
		usleep(50000);
	}
}

Test(remote, cluster_slots_of_a_dead_node_are_learned_again_from_the_others)
{
	enum { N = 60 };
	static char names[N][24];
	const char *keys[N];
	size_t key_len[N], len[N];
	void *vals[N];
	struct kvp_remote *r;
	char dead_id[48];
	int first;
	redis_fixture_need();
	first = redis_cluster_start();
	r = remote_cluster(first, 3, 1000);
	for (int i = 0; i < N; i++) {
		snprintf(names[i], sizeof names[i], "kvp:f:%d", i);
		keys[i] = names[i];
		key_len[i] = strlen(names[i]);
		kvp_remote_publish(r, keys[i], key_len[i], "v", 1);
	}
	cr_assert_eq(kvp_remote_drain(r, 5000), 0);
	cr_assert_eq(kvp_remote_fetch(r, N, keys, key_len, vals, len, NULL), N, "%s", counters_of(r).note);
	for (int i = 0; i < N; i++)
		kvp_remote_value_free(vals[i]);
	/* the third node dies and the first takes its slots (redis-cli gave it 10923-16383), as a failover
	 * would: no node ever answers MOVED for them */
	node_id(first + 2, dead_id);
	redis_kill(first + 2);
	run_ok(first, "CLUSTER FORGET %s%s", dead_id, "");
	run_ok(first + 1, "CLUSTER FORGET %s%s", dead_id, "");
	run_ok(first, "CLUSTER ADDSLOTSRANGE %s %s", "10923", "16383");
	cluster_wait_ok(first);
	cluster_wait_ok(first + 1);
	/* the first lookup and the first batch meet the dead node; the next ones ask for the map again */
	kvp_remote_fetch(r, N, keys, key_len, vals, len, NULL);
	for (int i = 0; i < N; i++)
		kvp_remote_value_free(vals[i]);
	for (int pass = 0; pass < 2; pass++) {
		for (int i = 0; i < N; i++)
			kvp_remote_publish(r, keys[i], key_len[i], "w", 1);
		cr_assert_eq(kvp_remote_drain(r, 5000), 0);
	}
	cr_assert_eq(kvp_remote_fetch(r, N, keys, key_len, vals, len, NULL), N, "%s", counters_of(r).note);
	for (int i = 0; i < N; i++)
		kvp_remote_value_free(vals[i]);
	kvp_remote_close(r);
}

Test(remote, cluster_follows_ask_during_a_migration_and_moved_after_it)
{
	char src_id[48], dst_id[48], slot_text[16], port_text[16];
	const char *key = "kvp:{moving}";
	struct kvp_remote *r;
	uint32_t slot = kvp_redis_slot(key, strlen(key));
	size_t len;
	void *got;
	int first, src, dst;
	redis_fixture_need();
	first = redis_cluster_start();
	r = remote_cluster(first, 1, 1000); /* one seed: the rest comes from CLUSTER SLOTS */
	publish_drained(r, key, "moved value", 11);
	got = fetch_one(r, key, &len);
	cr_assert_not_null(got, "%s", counters_of(r).note);
	kvp_remote_value_free(got);
	src = key_owner(first, key);
	dst = src == first ? first + 1 : first;
	node_id(src, src_id);
	node_id(dst, dst_id);
	snprintf(slot_text, sizeof slot_text, "%u", slot);
	snprintf(port_text, sizeof port_text, "%d", redis_port(dst));
	run_ok(dst, "CLUSTER SETSLOT %s IMPORTING %s", slot_text, src_id);
	run_ok(src, "CLUSTER SETSLOT %s MIGRATING %s", slot_text, dst_id);
	{
		redisReply *m = redis_run(redis_port(src), "MIGRATE 127.0.0.1 %s %s 0 5000", port_text, key);
		cr_assert(m && m->type == REDIS_REPLY_STATUS, "MIGRATE: %s", m ? m->str : "no reply");
		freeReplyObject(m);
	}
	/* the key left src: src answers ASK, and dst serves it after ASKING */
	got = fetch_one(r, key, &len);
	cr_assert_not_null(got, "ASK not followed: %s", counters_of(r).note);
	kvp_remote_value_free(got);
	run_ok(dst, "CLUSTER SETSLOT %s NODE %s", slot_text, dst_id);
	run_ok(src, "CLUSTER SETSLOT %s NODE %s", slot_text, dst_id);
	/* the slot is dst's now: src answers MOVED, which updates the map */
	got = fetch_one(r, key, &len);
	cr_assert_not_null(got, "MOVED not followed: %s", counters_of(r).note);
	cr_assert_eq(len, 11);
	cr_assert_eq(memcmp(got, "moved value", 11), 0);
	kvp_remote_value_free(got);
	cr_assert_eq(counters_of(r).faults, 0, "%s", counters_of(r).note);
	kvp_remote_close(r);
}

Test(remote, cluster_second_redirection_is_a_fault_not_a_loop)
{
	char dst_id[48], slot_text[16];
	const char *key = "kvp:{nowhere}";
	struct kvp_remote *r;
	struct kvp_remote_counters c;
	uint32_t slot = kvp_redis_slot(key, strlen(key));
	size_t len;
	double t0;
	int first, src, dst;
	redis_fixture_need();
	first = redis_cluster_start();
	r = remote_cluster(first, 3, 1000);
	src = key_owner(first, key);
	dst = src == first ? first + 1 : first;
	node_id(dst, dst_id);
	snprintf(slot_text, sizeof slot_text, "%u", slot);
	/* src says ASK dst for a key it lacks, but dst is not importing: it answers MOVED back to src */
	run_ok(src, "CLUSTER SETSLOT %s MIGRATING %s", slot_text, dst_id);
	t0 = redis_fixture_ms();
	cr_assert_null(fetch_one(r, key, &len));
	cr_assert_lt(redis_fixture_ms() - t0, 1000.0);
	c = counters_of(r);
	cr_assert_eq(c.faults, 1, "%s", c.note);
	cr_assert(strstr(c.note, "redirected twice"), "%s", c.note);
	kvp_remote_close(r);
}
