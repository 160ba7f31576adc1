/*
 * Where the tests find the models ($KVP_MODELS, default ../shared/models) and the build ($KVP_TEST_BUILD,
 * default build), and how they run a built tool as a user would: through the shell, its output read back.
 * A test whose model file is missing skips, naming the file (CI provides the models, so there they run).
 */
#ifndef KVP_TEST_TOOL_FIXTURE_H
#define KVP_TEST_TOOL_FIXTURE_H

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static inline const char *env_or(const char *name, const char *fallback)
{
	const char *v = getenv(name);

	return v && v[0] ? v : fallback;
}

/* dir/name in one of a few rotating buffers: enough for the paths one test holds at once */
static inline const char *join(const char *dir, const char *name)
{
	static char buf[8][1024];
	static int next;
	char *p = buf[next++ % 8];

	snprintf(p, sizeof buf[0], "%s/%s", dir, name);
	return p;
}

/* The path of a model file; skips the test when it is not there. */
static inline const char *model_path(const char *name)
{
	const char *path = join(env_or("KVP_MODELS", "../shared/models"), name);

	if (access(path, R_OK) != 0) {
		/* Criterion shows a skip's message only with --verbose: say it where a plain run shows it */
		fprintf(stderr, "[SKIP] %s::%s: model %s is missing (set KVP_MODELS to the models directory)\n",
			criterion_current_test->category, criterion_current_test->name, path);
		cr_skip_test("model %s is missing (set KVP_MODELS to the models directory)", path);
	}
	return path;
}

static inline const char *build_path(const char *name)
{
	return join(env_or("KVP_TEST_BUILD", "build"), name);
}

/* A built tool; skips the test in builds that make only the tests (the sanitizer build). */
static inline const char *tool_path(const char *name)
{
	const char *tool = build_path(name);

	if (access(tool, X_OK) != 0)
		cr_skip_test("%s is not built here", tool);
	return tool;
}

/* Runs tool with args; stdout, and stderr when merge (else it is dropped), into out. The exit status. */
static inline int run_tool(const char *name, const char *args, int merge, char *out, size_t cap)
{
	char cmd[8192];
	size_t n;
	FILE *f;
	int st = snprintf(cmd, sizeof cmd, "%s %s%s", tool_path(name), args, merge ? " 2>&1" : " 2>/dev/null");

	cr_assert(st > 0 && (size_t)st < sizeof cmd, "the command line for %s is too long", name);
	f = popen(cmd, "r");
	cr_assert_not_null(f);
	n = fread(out, 1, cap - 1, f);
	out[n] = '\0';
	st = pclose(f);
	cr_assert(WIFEXITED(st), "%s: did not exit normally (status %#x)", cmd, st);
	return WEXITSTATUS(st);
}

#endif /* KVP_TEST_TOOL_FIXTURE_H */
