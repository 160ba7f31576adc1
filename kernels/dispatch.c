/*
 * Chooses the kernel table once per process. KVP_KERNELS names one; a name this build or CPU cannot run
 * silently falls back to the best available, so a stale setting never stops a server from starting.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__aarch64__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

#include "kernels/kernels.h"

#if defined(__x86_64__)
/* clang (through 14 at least) rejects __builtin_cpu_supports("f16c"), so ask CPUID leaf 1 directly. */
static int f16c_present(void)
{
	unsigned a, b, c, d;

	return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
}

static int avx2_runnable(void)
{
	__builtin_cpu_init();
	/* libgcc and compiler-rt also check XCR0, so "avx2" implies the OS saves the YMM registers */
	return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c_present();
}
#endif

#if defined(__aarch64__)
static int neon_runnable(void)
{
	return (getauxval(AT_HWCAP) & HWCAP_ASIMD) != 0;
}
#endif

const struct kvp_kernels *kvp_kernels_named(const char *name)
{
	if (!name)
		return NULL;
	if (!strcmp(name, "scalar"))
		return &kvp_kernels_scalar;
#if defined(__x86_64__)
	if (!strcmp(name, "avx2"))
		return avx2_runnable() ? &kvp_kernels_avx2 : NULL;
#endif
#if defined(__aarch64__)
	if (!strcmp(name, "neon"))
		return neon_runnable() ? &kvp_kernels_neon : NULL;
#endif
	return NULL;
}

/* Most preferred first; scalar always runs, so the walk always ends in a table. */
static const char *const preference[] = { "avx2", "neon", "scalar" };

static const struct kvp_kernels *chosen;
static pthread_once_t chosen_once = PTHREAD_ONCE_INIT;

static void choose(void)
{
	const char *env = getenv("KVP_KERNELS");

	chosen = env && *env ? kvp_kernels_named(env) : NULL;
	for (size_t i = 0; !chosen && i < sizeof preference / sizeof preference[0]; i++)
		chosen = kvp_kernels_named(preference[i]);
}

const struct kvp_kernels *kvp_kernels(void)
{
	pthread_once(&chosen_once, choose);
	return chosen;
}
