/* The thread-local failure message behind kvp_last_error(). */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "base.h"

static _Thread_local char last_error[512];

const char *kvp_strerror(kvp_status s)
{
	switch (s) {
	case KVP_OK: return "success";
	case KVP_EINVAL: return "invalid argument";
	case KVP_ENOMEM: return "out of memory or over quota";
	case KVP_EIO: return "spill device I/O error";
	case KVP_ECORRUPT: return "data failed its integrity checks";
	case KVP_EPERM: return "handle not usable here";
	case KVP_EUNSUPPORTED: return "not supported by this build";
	case KVP_EABI: return "ABI version mismatch";
	case KVP_EBUSY: return "another call on the sequence is in progress";
	}
	return "unknown status";
}

const char *kvp_last_error(void)
{
	return last_error;
}

void kvp_clear_error(void)
{
	last_error[0] = '\0';
}

kvp_status kvp_fail(kvp_status s, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(last_error, sizeof last_error, fmt, ap);
	va_end(ap);
	return s;
}

kvp_status kvp_fail_context(kvp_status s, const char *fmt, ...)
{
	char prefix[256], old[sizeof last_error];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(prefix, sizeof prefix, fmt, ap);
	va_end(ap);
	memcpy(old, last_error, sizeof old);
	/* Truncation is acceptable: the message is for people, and the status carries the meaning. */
	size_t n = strlen(prefix);
	memcpy(last_error, prefix, n);
	if (n + 2 < sizeof last_error) {
		memcpy(last_error + n, ": ", 2);
		n += 2;
		size_t rest = strnlen(old, sizeof old - 1);
		if (rest > sizeof last_error - 1 - n)
			rest = sizeof last_error - 1 - n;
		memcpy(last_error + n, old, rest);
		n += rest;
	}
	last_error[n] = '\0';
	return s;
}
