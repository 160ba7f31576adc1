/*
 * fork(): a child process is refused the pools, tenants and sequences it inherited (KVP_EPERM, naming the
 * fork), a close of one there only retires the handle, the parent's objects go on as before, and the
 * child opens pools of its own, also when the fork came while other threads were inside the library.
 * The child reports by its exit status: 0 when every check held, else the number of the first that did
 * not.
 */
#include <criterion/criterion.h>
#include <execinfo.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kvpager.h"
#include "park_fixture.h"
#include "redis_fixture.h"

static void fixtures_fini(void)
{
	spill_fixture_fini();
	redis_fixture_fini();
}

TestSuite(fork, .fini = fixtures_fini, .timeout = 60);

/* The child's exit status, or -1 when it has not ended within ms (it is killed then: a hang). */
static int child_status(pid_t pid, int ms)
{
	int status;
	for (int waited = 0; waited < ms; waited += 5) {
		pid_t got = waitpid(pid, &status, WNOHANG);
		if (got == pid)
			return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
		usleep(5000);
	}
	kill(pid, SIGKILL);
	waitpid(pid, &status, 0);
	return -1;
}

/* check(s) run in a child of this process, which must end with status 0. */
static void in_child(int (*check)(kvp_seq *), kvp_seq *s)
{
	pid_t pid = fork();
	int status;
	cr_assert_geq(pid, 0);
	if (pid == 0)
		_exit(check(s));
	status = child_status(pid, 20000);
	cr_assert_eq(status, 0, "the child's check %d failed (-1: it hung)", status);
}

static int refused_for_fork(kvp_status st)
{
	return st == KVP_EPERM && strstr(kvp_last_error(), "opened before this process forked");
}

/* A pool, tenant and sequence of the child's own: a token in, attention out. */
static int child_own_pool_works(void)
{
	float x[PARK_ROW] = { 1.0f }, q[PARK_OUT] = { 1.0f }, out[PARK_OUT];
	int32_t pos = 0;
	kvp_pool *p;
	kvp_tenant *t;
	kvp_seq *s;
	int ok = kvp_pool_open("", &p) == KVP_OK && kvp_tenant_open(p, "child", "", &t) == KVP_OK &&
		 kvp_seq_open(t, &park_shape, &s) == KVP_OK && kvp_append(s, 0, 1, &pos, x, x) == KVP_OK &&
		 kvp_attend(s, 0, q, out) == KVP_OK && out[0] == 1.0f;
	kvp_pool_close(p);
	return ok;
}

static int child_checks_refusals(kvp_seq *s)
{
	float x[PARK_ROW] = { 0 }, out[PARK_OUT];
	int32_t pos = 1000;
	kvp_tenant *t2;
	kvp_seq *s2;
	kvp_stats st = { .size = sizeof st };
	if (!refused_for_fork(kvp_attend(s, 0, x, out)))
		return 1;
	if (!strstr(kvp_last_error(), "kvp_attend: the sequence"))
		return 2;
	if (!refused_for_fork(kvp_append(s, 0, 1, &pos, x, x)))
		return 3;
	if (!refused_for_fork(kvp_seq_stats(s, &st)) || !refused_for_fork(kvp_tenant_stats(tenant, &st)))
		return 4;
	if (!refused_for_fork(kvp_seq_open(tenant, &park_shape, &s2)) || s2 != NULL)
		return 5;
	if (!refused_for_fork(kvp_tenant_open(pool, "u", "", &t2)) || t2 != NULL)
		return 6;
	if (!refused_for_fork(kvp_seq_fork(s, &s2)) || !refused_for_fork(kvp_seq_unpark(s)))
		return 7;
	return 0;
}

Test(fork, a_child_is_refused_the_handles_it_inherited_and_the_parent_goes_on)
{
	float before[PARK_LAYERS * PARK_OUT], after[PARK_LAYERS * PARK_OUT];
	kvp_seq *s;
	park_open("1MiB", "");
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &s), KVP_OK);
	park_fill(s, 0, 40, 7);
	park_attend(s, before);
	in_child(child_checks_refusals, s);
	park_attend(s, after);
	cr_assert_eq(memcmp(before, after, sizeof before), 0, "the parent's sequence changed");
	park_close();
}

static int child_opens_its_own(kvp_seq *inherited)
{
	(void)inherited;
	return child_own_pool_works() ? 0 : 1;
}

Test(fork, a_child_opens_pools_of_its_own)
{
	park_open("1MiB", "");
	in_child(child_opens_its_own, NULL);
	park_close();
}

/* The child closes what it inherited: the handles are retired there (a later call finds no open
 * sequence); the parent's parked sequence comes back from its spill file bit for bit, and the parent's
 * close still finds the file its pool made. */
static int child_closes_inherited(kvp_seq *s)
{
	float x[PARK_OUT] = { 0 }, out[PARK_OUT];
	kvp_seq_close(s);
	if (!strstr(kvp_last_error(), "opened before this process forked"))
		return 1;
	if (kvp_attend(s, 0, x, out) != KVP_EPERM || !strstr(kvp_last_error(), "not an open sequence"))
		return 2;
	kvp_tenant_close(tenant);
	kvp_pool_close(pool);
	if (kvp_tenant_stats(tenant, &(kvp_stats){ .size = sizeof(kvp_stats) }) != KVP_EPERM ||
	    !strstr(kvp_last_error(), "not an open tenant"))
		return 3;
	return child_own_pool_works() ? 0 : 4;
}

Test(fork, closing_inherited_handles_in_the_child_leaves_the_parents_objects_open)
{
	float before[PARK_LAYERS * PARK_OUT], after[PARK_LAYERS * PARK_OUT];
	kvp_seq *s;
	park_open("1MiB", "");
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &s), KVP_OK);
	park_fill(s, 0, 100, 11);
	park_attend(s, before);
	cr_assert_eq(kvp_seq_park(s), KVP_OK, "%s", kvp_last_error());
	in_child(child_closes_inherited, s);
	cr_assert_eq(access(spill_path, F_OK), 0, "the child's close removed the parent's spill file");
	cr_assert_eq(kvp_seq_unpark(s), KVP_OK, "%s", kvp_last_error());
	park_attend(s, after);
	cr_assert_eq(memcmp(before, after, sizeof before), 0, "the parked sequence came back changed");
	kvp_seq_close(s);
	park_close();
}

/* A child still running after 8 s (the parent gives it 10) writes its stack to stderr and exits with 99:
 * this test once saw a child hang, in about one of several thousand forks, and its stack says on what. */
#define HUNG 99

static void hung_child_stack(int sig)
{
	static const char says[] = "test_fork: a child waited 8 s; its stack (addr2line -e this test's binary):\n";
	void *frames[32];
	int n = backtrace(frames, 32);

	(void)sig;
	if (write(2, says, sizeof says - 1) < 0)
		_exit(HUNG);
	backtrace_symbols_fd(frames, n, 2);
	_exit(HUNG);
}

/* Threads open, fill and close pools while the main thread forks: each child, whatever the threads
 * held at its fork, opens and uses a pool of its own. */
static _Atomic int churn_stop;

static void *churn(void *arg)
{
	(void)arg;
	while (!atomic_load(&churn_stop))
		child_own_pool_works();
	return NULL;
}

Test(fork, a_fork_while_threads_are_inside_the_library_leaves_the_child_able_to_open_pools)
{
	pthread_t th[2];
	void *frame;
	int failed = 0, hung = 0;
	backtrace(&frame, 1); /* loads the unwinder here, not in a child's signal handler */
	for (int i = 0; i < 2; i++)
		cr_assert_eq(pthread_create(&th[i], NULL, churn, NULL), 0);
	for (int i = 0; i < 40; i++) {
		pid_t pid = fork();
		int status;
		cr_assert_geq(pid, 0);
		if (pid == 0) {
			signal(SIGALRM, hung_child_stack);
			alarm(8);
			_exit(child_own_pool_works() ? 0 : 1);
		}
		status = child_status(pid, 10000);
		hung += status == -1 || status == HUNG;
		failed += status != 0;
	}
	atomic_store(&churn_stop, 1);
	for (int i = 0; i < 2; i++)
		pthread_join(th[i], NULL);
	cr_assert_eq(hung, 0, "%d of 40 children hung (a stack above, from each that could still write it)", hung);
	cr_assert_eq(failed, 0, "%d of 40 children could not use a pool of their own", failed);
}

/* A pool with a remote tier has a writer thread, which the child does not have: closing the inherited
 * pool there must not wait for it (the parent's close still stops its own). */
Test(fork, a_child_closing_an_inherited_remote_pool_does_not_wait_for_the_parents_writer)
{
	char spec[96];
	kvp_pool *p;
	pid_t pid;
	redis_fixture_need();
	snprintf(spec, sizeof spec, "remote=redis://127.0.0.1:%d", redis_port(redis_start(NULL)));
	cr_assert_eq(kvp_pool_open(spec, &p), KVP_OK, "%s", kvp_last_error());
	pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) {
		kvp_pool_close(p);
		_exit(refused_for_fork(KVP_EPERM) ? 0 : 1);
	}
	cr_assert_eq(child_status(pid, 10000), 0, "the child's close hung or failed");
	kvp_pool_close(p);
}
