/* The pieces every tool needs; see cli.h. */
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tools/cli.h"

const char *cli_program = "kvpager";

int cli_bad_input(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "%s: ", cli_program);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	return CLI_EXIT_BAD_INPUT;
}

int cli_parse_long(const char *s, long lo, long hi, long *out)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno || end == s || *end || v < lo || v > hi)
		return -1;
	*out = v;
	return 0;
}

int cli_beside(const char *path, const char *name, char *out)
{
	const char *slash = strrchr(path, '/');
	int dir = slash ? (int)(slash - path) + 1 : 0;
	int n = snprintf(out, CLI_PATH_CAP, "%.*s%s", dir, path, name);

	return n < 0 || n >= CLI_PATH_CAP;
}

int cli_beside_executable(const char *argv0, const char *name, char *out)
{
	char exe[CLI_PATH_CAP];
	ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);

	if (n > 0) {
		exe[n] = '\0';
		return cli_beside(exe, name, out);
	}
	/* a bare program name ran from $PATH: look in the working directory */
	return strchr(argv0, '/') ? cli_beside(argv0, name, out) : cli_beside("./", name, out);
}

int cli_default_plugin(const char *argv0, char *out)
{
	if (cli_beside_executable(argv0, "libkvpager.so.1", out))
		return 1;
	if (access(out, R_OK) != 0)
		snprintf(out, CLI_PATH_CAP, "libkvpager.so.1");
	return 0;
}

typedef const kvp_plugin_v1 *(*plugin_entry)(uint32_t abi_major);

const kvp_plugin_v1 *cli_plugin_load(const char *path, void **library)
{
	const kvp_plugin_v1 *api;
	plugin_entry entry;

	*library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (!*library) {
		fprintf(stderr, "%s: cannot load the plugin: %s\n", cli_program, dlerror());
		return NULL;
	}
	*(void **)&entry = dlsym(*library, "kvp_plugin");
	api = entry ? entry(KVP_ABI_MAJOR) : NULL;
	if (!api || api->abi_major != KVP_ABI_MAJOR || api->size < sizeof(kvp_plugin_v1)) {
		fprintf(stderr, "%s: %s does not serve the kvp_plugin_v1 table of ABI %d\n", cli_program, path,
			KVP_ABI_MAJOR);
		return NULL;
	}
	return api;
}
