/* Shared by the spill suites: a private directory under $TMPDIR (or /tmp) for spill files, removed at
 * the end of each test (by the suite's .fini when an assertion ended it early), and a spill-enabled pool
 * spec pointing into it. */
#ifndef KVP_TEST_SPILL_FIXTURE_H
#define KVP_TEST_SPILL_FIXTURE_H

#include <criterion/criterion.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char spill_dir[512], spill_path[600], spill_spec[800];

/* Makes the directory and sets spill_path and spill_spec ("spill=<path>,spill_max=<max><extra>"). */
static inline void spill_fixture_open(const char *max, const char *extra)
{
	const char *tmp = getenv("TMPDIR");
	snprintf(spill_dir, sizeof spill_dir, "%s/kvpager-spill-XXXXXX", tmp && *tmp ? tmp : "/tmp");
	cr_assert_not_null(mkdtemp(spill_dir), "mkdtemp %s", spill_dir);
	snprintf(spill_path, sizeof spill_path, "%s/cache.spill", spill_dir);
	snprintf(spill_spec, sizeof spill_spec, "spill=%s,spill_max=%s%s", spill_path, max, extra ? extra : "");
}

/* Removes whatever is left in the directory (nothing, when the pool cleaned up) and the directory. */
static inline int spill_fixture_close(void)
{
	DIR *dir = opendir(spill_dir);
	struct dirent *e;
	int left = 0;
	char path[1200];
	while (dir && (e = readdir(dir))) {
		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
			continue;
		snprintf(path, sizeof path, "%s/%s", spill_dir, e->d_name);
		unlink(path);
		left++;
	}
	if (dir)
		closedir(dir);
	rmdir(spill_dir);
	spill_dir[0] = '\0';
	return left;
}

/* Suite .fini: a test that failed before its own cleanup leaves nothing behind either. */
static inline void spill_fixture_fini(void)
{
	if (spill_dir[0])
		spill_fixture_close();
}

#endif
