/*
 * CRC32C: table reference and hardware versions (see crc32c.h). The hardware versions use function
 * target attributes instead of per-file flags, so one file serves both architectures and the build
 * needs no new rules; they are only called after the runtime check says the CPU has the instruction.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif
#if defined(__aarch64__)
#include <arm_acle.h>
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

#include "kernels/crc32c.h"

#define CRC32C_POLY 0x82f63b78u

static uint32_t table[256];
static pthread_once_t table_once = PTHREAD_ONCE_INIT;

static void table_fill(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int b = 0; b < 8; b++)
			c = (c >> 1) ^ (CRC32C_POLY & (0u - (c & 1)));
		table[i] = c;
	}
}

uint32_t kvp_crc32c_scalar(uint32_t crc, const void *p, size_t n)
{
	const unsigned char *b = p;
	pthread_once(&table_once, table_fill);
	crc = ~crc;
	for (size_t i = 0; i < n; i++)
		crc = (crc >> 8) ^ table[(crc ^ b[i]) & 0xff];
	return ~crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t crc32c_sse42(uint32_t crc, const void *p, size_t n)
{
	const unsigned char *b = p;
	uint64_t c = ~crc;
	size_t i = 0;
	for (; i + 8 <= n; i += 8) {
		uint64_t w;
		memcpy(&w, b + i, sizeof w); /* no alignment is required of p */
		c = _mm_crc32_u64(c, w);
	}
	for (; i < n; i++)
		c = _mm_crc32_u8((uint32_t)c, b[i]);
	return ~(uint32_t)c;
}

static int sse42_runnable(void)
{
	__builtin_cpu_init();
	return __builtin_cpu_supports("sse4.2");
}
#endif

#if defined(__aarch64__)
#if defined(__clang__)
#define CRC_TARGET __attribute__((target("crc")))
#else
#define CRC_TARGET __attribute__((target("+crc")))
#endif
CRC_TARGET static uint32_t crc32c_armv8(uint32_t crc, const void *p, size_t n)
{
	const unsigned char *b = p;
	uint32_t c = ~crc;
	size_t i = 0;
	for (; i + 8 <= n; i += 8) {
		uint64_t w;
		memcpy(&w, b + i, sizeof w);
		c = __crc32cd(c, w);
	}
	for (; i < n; i++)
		c = __crc32cb(c, b[i]);
	return ~c;
}

static int armv8_runnable(void)
{
	return (getauxval(AT_HWCAP) & HWCAP_CRC32) != 0;
}
#endif

kvp_crc32c_fn kvp_crc32c_named(const char *name)
{
	if (!name)
		return NULL;
	if (!strcmp(name, "scalar"))
		return kvp_crc32c_scalar;
#if defined(__x86_64__)
	if (!strcmp(name, "sse42"))
		return sse42_runnable() ? crc32c_sse42 : NULL;
#endif
#if defined(__aarch64__)
	if (!strcmp(name, "armv8"))
		return armv8_runnable() ? crc32c_armv8 : NULL;
#endif
	return NULL;
}

static const char *const preference[] = { "sse42", "armv8", "scalar" };
static kvp_crc32c_fn chosen;
static const char *chosen_name;
static pthread_once_t chosen_once = PTHREAD_ONCE_INIT;

static void choose(void)
{
	const char *env = getenv("KVP_KERNELS");
	if (env && !strcmp(env, "scalar")) {
		chosen = kvp_crc32c_scalar;
		chosen_name = "scalar";
		return;
	}
	for (size_t i = 0; !chosen && i < sizeof preference / sizeof preference[0]; i++) {
		chosen = kvp_crc32c_named(preference[i]);
		chosen_name = preference[i];
	}
}

uint32_t kvp_crc32c(uint32_t crc, const void *p, size_t n)
{
	pthread_once(&chosen_once, choose);
	return chosen(crc, p, n);
}

const char *kvp_crc32c_name(void)
{
	pthread_once(&chosen_once, choose);
	return chosen_name;
}
