/*
 * Real Redis servers for the remote tier's tests: redis-server processes on free loopback ports (127.0.0.1,
 * and ::1 where the machine has it, so "localhost" reaches them whichever address it resolves to), each with
 * its own directory from mkdtemp, no persistence; a three-node cluster made by redis-cli --cluster create.
 * The suite's .fini (redis_fixture_fini) kills every server the test started and removes the directories,
 * also after a failed assertion; a server also dies with the test's process (PR_SET_PDEATHSIG) when the
 * test crashes. Tests call redis_fixture_need() first: it skips them where redis-server is not installed.
 */
#ifndef KVP_TEST_REDIS_FIXTURE_H
#define KVP_TEST_REDIS_FIXTURE_H

#include <criterion/criterion.h>
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

#define REDIS_SERVERS_MAX 8

struct redis_server {
	pid_t pid;
	int port;
	char dir[64];
	const char *extra[8]; /* more redis-server arguments, NULL-terminated */
};

static struct redis_server redis_servers[REDIS_SERVERS_MAX];
static int redis_n;

static inline double redis_fixture_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static inline int redis_fixture_installed(const char *program)
{
	char cmd[128];
	snprintf(cmd, sizeof cmd, "command -v %s >/dev/null 2>&1", program);
	return system(cmd) == 0;
}

static inline void redis_fixture_need(void)
{
	if (!redis_fixture_installed("redis-server") || !redis_fixture_installed("redis-cli"))
		cr_skip_test("redis-server is not installed (apt-get install redis-server redis-tools)");
}

static inline int port_free(int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port),
				 .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	int fd = socket(AF_INET, SOCK_STREAM, 0), ok;
	ok = fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0;
	if (fd >= 0)
		close(fd);
	return ok;
}

/* A port that is free, and so is port + 10000 (a cluster node's bus). */
static inline int redis_fixture_port(void)
{
	static unsigned seed;
	if (!seed)
		seed = (unsigned)getpid() * 2654435761u ^ (unsigned)time(NULL);
	for (;;) {
		int port;
		seed = seed * 1103515245u + 12345u;
		port = 20000 + (int)((seed >> 8) % 20000);
		if (port_free(port) && port_free(port + 10000))
			return port;
	}
}

/* A blocking admin connection for the test's own commands; NULL when the server does not answer. */
static inline redisContext *redis_admin(int port)
{
	struct timeval tv = { 2, 0 };
	redisContext *c = redisConnectWithTimeout("127.0.0.1", port, tv);
	if (c && c->err) {
		redisFree(c);
		return NULL;
	}
	if (c)
		redisSetTimeout(c, tv);
	return c;
}

/* Runs a command on the server at port; the reply (free it) or NULL. */
static inline redisReply *redis_run(int port, const char *fmt, ...)
{
	redisContext *c = redis_admin(port);
	redisReply *r;
	va_list ap;
	if (!c)
		return NULL;
	va_start(ap, fmt);
	r = redisvCommand(c, fmt, ap);
	va_end(ap);
	redisFree(c);
	return r;
}

static inline pid_t redis_spawn(struct redis_server *s)
{
	char port[16], log[96];
	const char *argv[32] = { "redis-server", "--port", port, "--bind", "127.0.0.1 -::1", "--save", "", "--appendonly", "no",
				 "--daemonize", "no", "--dir", s->dir };
	int argc = 13;
	pid_t pid;
	snprintf(port, sizeof port, "%d", s->port);
	snprintf(log, sizeof log, "%s/log", s->dir);
	for (int i = 0; s->extra[i] && argc < 31; i++)
		argv[argc++] = s->extra[i];
	argv[argc] = NULL;
	pid = fork();
	if (pid == 0) {
		int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0600);
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		dup2(fd, 1);
		dup2(fd, 2);
		execvp(argv[0], (char *const *)argv);
		_exit(127);
	}
	return pid;
}

/* Whether the server's log has a line of its own process (a restart appends to the same log) saying it
 * listens. A server whose port another test's server took in the meantime fails to bind and exits, while
 * PING on that port is answered by the other one, so PING alone does not say which server is up. */
static inline int redis_log_ready(const struct redis_server *s)
{
	char path[96], line[512], mine[24];
	FILE *f;
	int ready = 0;
	snprintf(path, sizeof path, "%s/log", s->dir);
	snprintf(mine, sizeof mine, "%d:", (int)s->pid);
	f = fopen(path, "r");
	if (!f)
		return 0;
	while (!ready && fgets(line, sizeof line, f))
		ready = strncmp(line, mine, strlen(mine)) == 0 && strstr(line, "Ready to accept connections");
	fclose(f);
	return ready;
}

/* Waits until this server (not another on its port) listens and answers PING (an error such as NOAUTH is
 * an answer too); 0 when it exited or the time ran out. */
static inline int redis_wait_up(struct redis_server *s, double ms)
{
	double until = redis_fixture_ms() + ms;
	do {
		redisReply *r;
		if (waitpid(s->pid, NULL, WNOHANG) == s->pid) {
			s->pid = 0;
			return 0;
		}
		if (redis_log_ready(s) && (r = redis_run(s->port, "PING"))) {
			freeReplyObject(r);
			return 1;
		}
		usleep(20000);
	} while (redis_fixture_ms() < until);
	return 0;
}

/* Starts one more server (extra: more arguments, NULL-terminated); its index. Fails the test when it
 * does not come up on any of a few ports. */
static inline int redis_start(const char *const *extra)
{
	struct redis_server *s;
	cr_assert_lt(redis_n, REDIS_SERVERS_MAX);
	s = &redis_servers[redis_n];
	memset(s, 0, sizeof *s);
	for (int i = 0; extra && extra[i] && i < 7; i++)
		s->extra[i] = extra[i];
	snprintf(s->dir, sizeof s->dir, "/tmp/kvp-redis-XXXXXX");
	cr_assert_not_null(mkdtemp(s->dir));
	for (int attempt = 0; attempt < 5; attempt++) {
		s->port = redis_fixture_port();
		s->pid = redis_spawn(s);
		cr_assert_gt(s->pid, 0);
		if (redis_wait_up(s, 5000))
			return redis_n++;
		if (s->pid > 0) {
			kill(s->pid, SIGKILL);
			waitpid(s->pid, NULL, 0);
		}
	}
	cr_assert_fail("redis-server did not come up (log in %s)", s->dir);
	return -1;
}

/* The server killed, and started again on the same port with the same arguments. */
static inline void redis_kill(int i)
{
	struct redis_server *s = &redis_servers[i];
	if (s->pid > 0) {
		kill(s->pid, SIGKILL);
		waitpid(s->pid, NULL, 0);
		s->pid = 0;
	}
}

static inline void redis_restart(int i)
{
	struct redis_server *s = &redis_servers[i];
	s->pid = redis_spawn(s);
	cr_assert(redis_wait_up(s, 5000), "redis-server did not come back on %d", s->port);
}

static inline int redis_port(int i)
{
	return redis_servers[i].port;
}

static inline pid_t redis_pid(int i)
{
	return redis_servers[i].pid;
}

/* Three cluster nodes, all slots assigned with redis-cli --cluster create; returns the first's index. */
static inline int redis_cluster_start(void)
{
	static const char *const cluster[] = { "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
					       "--cluster-node-timeout", "5000", NULL };
	char cmd[512];
	int first = redis_start(cluster);
	redis_start(cluster);
	redis_start(cluster);
	snprintf(cmd, sizeof cmd,
		 "redis-cli --cluster create 127.0.0.1:%d 127.0.0.1:%d 127.0.0.1:%d --cluster-replicas 0 "
		 "--cluster-yes >%s/create.log 2>&1",
		 redis_port(first), redis_port(first + 1), redis_port(first + 2), redis_servers[first].dir);
	cr_assert_eq(system(cmd), 0, "redis-cli --cluster create failed: %s/create.log", redis_servers[first].dir);
	for (int i = first; i < first + 3; i++) {
		double until = redis_fixture_ms() + 10000;
		int ok = 0;
		while (!ok && redis_fixture_ms() < until) {
			redisReply *r = redis_run(redis_port(i), "CLUSTER INFO");
			ok = r && r->type == REDIS_REPLY_STRING && strstr(r->str, "cluster_state:ok");
			if (r)
				freeReplyObject(r);
			if (!ok)
				usleep(50000);
		}
		cr_assert(ok, "cluster node %d never reached cluster_state:ok", redis_port(i));
	}
	return first;
}

static inline void redis_fixture_fini(void)
{
	char cmd[128];
	for (int i = 0; i < redis_n; i++) {
		if (redis_servers[i].pid > 0) {
			kill(redis_servers[i].pid, SIGCONT);
			kill(redis_servers[i].pid, SIGKILL);
			waitpid(redis_servers[i].pid, NULL, 0);
		}
		snprintf(cmd, sizeof cmd, "rm -rf '%s'", redis_servers[i].dir);
		if (system(cmd) != 0)
			fprintf(stderr, "could not remove %s\n", redis_servers[i].dir);
	}
	redis_n = 0;
}

#endif /* KVP_TEST_REDIS_FIXTURE_H */
