/*
 * What the command-line tools share: messages for bad input (exit status 2), integer options, paths
 * next to the model or the executable, and loading the plugin's function table with dlopen.
 */
#ifndef KVP_TOOLS_CLI_H
#define KVP_TOOLS_CLI_H

#include <stddef.h>

#include "kvpager.h"

#define CLI_EXIT_BAD_INPUT 2
#define CLI_PATH_CAP 4096

/* The tool's name, for the front of every message; main sets it first. */
extern const char *cli_program;

/* "<program>: <message>" on stderr; returns CLI_EXIT_BAD_INPUT. */
int cli_bad_input(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* A whole decimal integer in lo..hi; -1 for anything else. */
int cli_parse_long(const char *s, long lo, long hi, long *out);
/* name in the directory of path (path's own directory part, "" when none) into out[CLI_PATH_CAP];
 * nonzero when it does not fit. */
int cli_beside(const char *path, const char *name, char *out);
/* name next to the running executable (argv0 when /proc/self/exe cannot be read). */
int cli_beside_executable(const char *argv0, const char *name, char *out);
/* The plugin a tool loads by default: libkvpager.so.1 next to the executable (the build tree), or else
 * the installed one, found by the dynamic loader's search. */
int cli_default_plugin(const char *argv0, char *out);
/* dlopen the plugin and ask for the v1 table; only the table is used afterwards. NULL with a message. */
const kvp_plugin_v1 *cli_plugin_load(const char *path, void **library);

#endif /* KVP_TOOLS_CLI_H */
