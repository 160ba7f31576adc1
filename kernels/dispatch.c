/*
 * Chooses the kernels once per process: the kernel table and the CRC32C version, from one look at the CPU
 * and at KVP_KERNELS. KVP_KERNELS names a table; a name this build or CPU cannot run silently falls back
 * to the best available, so a stale setting never stops a server from starting. CRC32C versions carry
 * other names (sse42, armv8), so of KVP_KERNELS only "scalar" reaches them: it forces every reference.
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
#ifndef HWCAP_ASIMDDP /* kernel headers older than Linux 4.15 */
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

#include "kernels/crc32c.h"
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

/* AVX-VNNI (CPUID leaf 7, subleaf 1, EAX bit 4: the VEX-encoded vpdpbusd on ymm registers), asked of CPUID
 * directly: clang 14's __builtin_cpu_supports does not know it. */
static int avx2_vnni_runnable(void)
{
	unsigned a, b, c, d;

	return avx2_runnable() && __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 4));
}

/*
 * XCR0 bits 1-2 (SSE, AVX) and 5-7 (opmask, upper halves of zmm0-15, zmm16-31): without them the OS
 * does not save the AVX-512 registers across a context switch, and an AVX-512 instruction faults. Read
 * here, so the rule holds whichever runtime library answers __builtin_cpu_supports and however it reads
 * XCR0.
 */
static int os_saves_zmm(void)
{
	unsigned a, b, c, d, lo, hi;

	if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_OSXSAVE))
		return 0;
	__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
	(void)hi;
	return (lo & 0xe6u) == 0xe6u;
}

/* avx512.c is built with F, BW, VL and DQ (every AVX-512 CPU with BW and VL has DQ), VBMI, VBMI2 and VNNI
 * (Ice Lake, Zen 4 and later: the integer lookups of the codecs, SparK's expanding loads), BMI2, FMA and F16C. Older AVX-512 CPUs run avx2. */
static int avx512_runnable(void)
{
	__builtin_cpu_init();
	return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
	       __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
	       __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vbmi2") &&
	       __builtin_cpu_supports("avx512vnni") &&
	       __builtin_cpu_supports("bmi2") &&
	       __builtin_cpu_supports("fma") && f16c_present() && os_saves_zmm();
}

static int sse42_runnable(void)
{
	__builtin_cpu_init();
	return __builtin_cpu_supports("sse4.2");
}
#endif

#if defined(__aarch64__)
static int neon_runnable(void)
{
	return (getauxval(AT_HWCAP) & HWCAP_ASIMD) != 0;
}

/* sdot and udot (Armv8.2 dot product): neon-dotprod's integer kernels */
static int neon_dotprod_runnable(void)
{
	return neon_runnable() && (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
}

static int armv8_crc_runnable(void)
{
	return (getauxval(AT_HWCAP) & HWCAP_CRC32) != 0;
}
#endif

static int always_runnable(void)
{
	return 1;
}

/* Each list most preferred first; the scalar reference always runs, so a walk down one always ends. */
static const struct kernels_version {
	const char *name;
	int (*runnable)(void);
	const struct kvp_kernels *table;
} tables[] = {
#if defined(__x86_64__)
	{ "avx512", avx512_runnable, &kvp_kernels_avx512 },
	{ "avx2-vnni", avx2_vnni_runnable, &kvp_kernels_avx2_vnni },
	{ "avx2", avx2_runnable, &kvp_kernels_avx2 },
#endif
#if defined(__aarch64__)
	{ "neon-dotprod", neon_dotprod_runnable, &kvp_kernels_neon_dotprod },
	{ "neon", neon_runnable, &kvp_kernels_neon },
#endif
	{ "scalar", always_runnable, &kvp_kernels_scalar },
};

static const struct crc32c_version {
	const char *name;
	int (*runnable)(void);
	kvp_crc32c_fn crc32c;
} crc32cs[] = {
#if defined(__x86_64__)
	{ "sse42", sse42_runnable, kvp_crc32c_sse42 },
#endif
#if defined(__aarch64__)
	{ "armv8", armv8_crc_runnable, kvp_crc32c_armv8 },
#endif
	{ "scalar", always_runnable, kvp_crc32c_scalar },
};

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

const struct kvp_kernels *kvp_kernels_named(const char *name)
{
	for (size_t i = 0; name && i < COUNT(tables); i++)
		if (!strcmp(name, tables[i].name))
			return tables[i].runnable() ? tables[i].table : NULL;
	return NULL;
}

kvp_crc32c_fn kvp_crc32c_named(const char *name)
{
	for (size_t i = 0; name && i < COUNT(crc32cs); i++)
		if (!strcmp(name, crc32cs[i].name))
			return crc32cs[i].runnable() ? crc32cs[i].crc32c : NULL;
	return NULL;
}

static const struct kvp_kernels *chosen_table;
static const struct crc32c_version *chosen_crc32c;
static pthread_once_t chosen_once = PTHREAD_ONCE_INIT;

static void choose(void)
{
	const char *env = getenv("KVP_KERNELS");
	const int references = env && !strcmp(env, "scalar");

	chosen_table = env && *env ? kvp_kernels_named(env) : NULL;
	for (size_t i = 0; !chosen_table; i++)
		chosen_table = kvp_kernels_named(tables[i].name);
	for (size_t i = 0; !chosen_crc32c; i++)
		if (references ? !strcmp(crc32cs[i].name, "scalar") : crc32cs[i].runnable())
			chosen_crc32c = &crc32cs[i];
}

const struct kvp_kernels *kvp_kernels(void)
{
	pthread_once(&chosen_once, choose);
	return chosen_table;
}

uint32_t kvp_crc32c(uint32_t crc, const void *p, size_t n)
{
	pthread_once(&chosen_once, choose);
	return chosen_crc32c->crc32c(crc, p, n);
}

const char *kvp_crc32c_name(void)
{
	pthread_once(&chosen_once, choose);
	return chosen_crc32c->name;
}
