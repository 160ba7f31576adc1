/*
 * The library's layers, read from the built objects: which file calls which is what their symbol tables
 * say (a kvp_ symbol one object needs and another defines). Folders rank
 * base < kernels < (codecs, policies) < (gating, tier) < pager < plugin: a file calls only files of its own
 * folder or of a lower one, codecs and policies never each other, nor gating and the tier, and no chain of
 * calls comes back to where it started, inside a folder either. The objects come from $KVP_TEST_BUILD (default build).
 */
#include <criterion/criterion.h>
#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define OBJECTS_MAX 128
#define SYMBOLS_MAX 8192

struct symbol {
	char name[96];
	int object;
};

static char objects[OBJECTS_MAX][256]; /* "folder/file" */
static int n_objects;
static struct symbol symbols[SYMBOLS_MAX];
static int n_symbols;
static unsigned char calls[OBJECTS_MAX][OBJECTS_MAX];

static const char *const ranks[][2] = {
	{ "base", "0" }, { "kernels", "1" }, { "codecs", "2" }, { "policies", "2" },
	{ "gating", "3" }, { "tier", "3" }, { "pager", "4" }, { "plugin", "5" },
};

static int rank_of(const char *object)
{
	for (size_t i = 0; i < sizeof ranks / sizeof ranks[0]; i++)
		if (!strncmp(object, ranks[i][0], strlen(ranks[i][0])) && object[strlen(ranks[i][0])] == '/')
			return atoi(ranks[i][1]);
	cr_assert_fail("%s: a folder with no place among the layers", object);
	return -1;
}

static int same_folder(const char *a, const char *b)
{
	size_t n = strcspn(a, "/");
	return n == strcspn(b, "/") && !strncmp(a, b, n);
}

/* Every kvp_ symbol of the object's `nm -P` listing with the given option. */
static void symbols_each(const char *path, const char *option, void (*fn)(const char *name, int object),
			 int object)
{
	char cmd[600], line[512], name[256], type[8];
	FILE *p;
	snprintf(cmd, sizeof cmd, "nm -P %s '%s'", option, path);
	cr_assert_not_null(p = popen(cmd, "r"), "%s", cmd);
	while (fgets(line, sizeof line, p))
		if (sscanf(line, "%255s %7s", name, type) == 2 && !strncmp(name, "kvp_", 4) &&
		    strchr("TDBRU", type[0]))
			fn(name, object);
	cr_assert_eq(pclose(p), 0, "%s failed", cmd);
}

static void defined(const char *name, int object)
{
	cr_assert_lt(n_symbols, SYMBOLS_MAX);
	snprintf(symbols[n_symbols].name, sizeof symbols[n_symbols].name, "%s", name);
	symbols[n_symbols++].object = object;
}

static void needed(const char *name, int object)
{
	for (int i = 0; i < n_symbols; i++)
		if (!strcmp(symbols[i].name, name) && symbols[i].object != object)
			calls[object][symbols[i].object] = 1;
}

/* An object of the library whose source is still there: not the tools' own code, and not what an older
 * build left behind of a file since moved (the suites run from the top of the tree). */
static int library_object(const char *rel)
{
	char source[300];
	snprintf(source, sizeof source, "%.*s.c", (int)(strlen(rel) - 2), rel);
	return strncmp(rel, "tools/", 6) && access(source, F_OK) == 0;
}

static void objects_read(void)
{
	const char *build = getenv("KVP_TEST_BUILD") ? getenv("KVP_TEST_BUILD") : "build";
	char pattern[300];
	glob_t g;
	snprintf(pattern, sizeof pattern, "%s/obj/*/*.o", build);
	cr_assert_eq(glob(pattern, 0, NULL, &g), 0, "no objects at %s", pattern);
	for (size_t i = 0; i < g.gl_pathc; i++) {
		const char *rel = g.gl_pathv[i] + strlen(build) + strlen("/obj/");
		if (!library_object(rel))
			continue;
		cr_assert_lt(n_objects, OBJECTS_MAX);
		snprintf(objects[n_objects], sizeof objects[0], "%.*s", (int)(strlen(rel) - 2), rel);
		symbols_each(g.gl_pathv[i], "--defined-only", defined, n_objects++);
	}
	for (int o = 0, i = 0; i < (int)g.gl_pathc; i++) {
		const char *rel = g.gl_pathv[i] + strlen(build) + strlen("/obj/");
		if (library_object(rel))
			symbols_each(g.gl_pathv[i], "-u", needed, o++);
	}
	globfree(&g);
	cr_assert_gt(n_objects, 30, "the library's objects were not found under %s", pattern);
}

TestSuite(layers, .init = objects_read);

Test(layers, a_file_calls_only_its_own_folder_or_a_lower_layer)
{
	int edges = 0;
	for (int a = 0; a < n_objects; a++)
		for (int b = 0; b < n_objects; b++) {
			if (!calls[a][b])
				continue;
			edges++;
			cr_expect(same_folder(objects[a], objects[b]) || rank_of(objects[b]) < rank_of(objects[a]),
				  "%s calls %s, which is not below it", objects[a], objects[b]);
		}
	cr_assert_gt(edges, 50, "too few calls between files were found to judge");
}

/* Depth first. Returns -1 when no cycle is reachable from a; else, while unwinding, the file that closes
 * the cycle (each file on the way adds itself to *path) and -2 once the whole cycle is in *path. */
static int cycle_from(int a, unsigned char *state, char *path, size_t cap)
{
	state[a] = 1;
	for (int b = 0; b < n_objects; b++) {
		int found;
		if (!calls[a][b] || state[b] == 2)
			continue;
		found = state[b] == 1 ? b : cycle_from(b, state, path, cap);
		if (found == -1)
			continue;
		if (found >= 0) {
			size_t len = strlen(path);
			snprintf(path + len, cap - len, "%s calls %s, ", objects[a], objects[b]);
		}
		return found == a ? -2 : found;
	}
	state[a] = 2;
	return -1;
}

Test(layers, no_chain_of_calls_between_files_comes_back_to_where_it_started)
{
	unsigned char state[OBJECTS_MAX] = { 0 };
	char path[2048] = "";
	for (int a = 0; a < n_objects; a++)
		if (!state[a] && cycle_from(a, state, path, sizeof path) != -1)
			cr_assert_fail("a cycle: %.*s", (int)strlen(path) - 2, path); /* without the last ", " */
}

Test(layers, the_tier_calls_nothing_in_the_pager)
{
	for (int a = 0; a < n_objects; a++)
		for (int b = 0; b < n_objects; b++)
			if (calls[a][b] && !strncmp(objects[a], "tier/", 5))
				cr_expect(strncmp(objects[b], "pager/", 6), "%s calls %s", objects[a], objects[b]);
}
