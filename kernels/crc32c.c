/*
 * CRC32C: table reference and hardware versions (see crc32c.h). The hardware versions use function
 * target attributes instead of per-file flags, so one file serves both architectures and the build
 * needs no new rules; dispatch.c only hands them out after its runtime check says the CPU has the
 * instruction, in the same choice as the other kernels.
 */
#include <pthread.h>
#include <string.h>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif
#if defined(__aarch64__)
#include <arm_acle.h>
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

/*
 * The hardware instruction has a 3-cycle latency and a 1-cycle throughput, so one dependent chain runs
 * at a third of the speed the unit can go. Long inputs are cut into three lanes of LANE bytes checksummed
 * side by side; the CRC register is linear, so the lanes join as
 *   reg(r, A B C) = shift(shift(reg(r, A)) ^ reg(0, B)) ^ reg(0, C),
 * where shift(x) advances x over LANE zero bytes: a linear map, applied here as four byte tables.
 */
#define LANE 2048
static uint32_t lane_shift[4][256];
static pthread_once_t lane_once = PTHREAD_ONCE_INIT;

static uint32_t zeros_advance(uint32_t reg, size_t n)
{
	for (size_t i = 0; i < n; i++)
		reg = (reg >> 8) ^ table[reg & 0xff];
	return reg;
}

static void lane_fill(void)
{
	uint32_t basis[32];
	pthread_once(&table_once, table_fill);
	for (int bit = 0; bit < 32; bit++)
		basis[bit] = zeros_advance(1u << bit, LANE);
	for (int byte = 0; byte < 4; byte++)
		for (uint32_t v = 0; v < 256; v++) {
			uint32_t x = 0;
			for (int bit = 0; bit < 8; bit++)
				if (v >> bit & 1)
					x ^= basis[byte * 8 + bit];
			lane_shift[byte][v] = x;
		}
}

static uint32_t lane_advance(uint32_t reg)
{
	return lane_shift[0][reg & 0xff] ^ lane_shift[1][(reg >> 8) & 0xff] ^ lane_shift[2][(reg >> 16) & 0xff] ^
	       lane_shift[3][reg >> 24];
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
__attribute__((target("sse4.2"))) uint32_t kvp_crc32c_sse42(uint32_t crc, const void *p, size_t n)
{
	const unsigned char *b = p;
	uint64_t c = ~crc;
	size_t i = 0;
	pthread_once(&lane_once, lane_fill);
	for (; i + 3 * LANE <= n; i += 3 * LANE) {
		uint64_t c1 = 0, c2 = 0;
		for (size_t j = i; j < i + LANE; j += 8) {
			uint64_t w0, w1, w2;
			memcpy(&w0, b + j, 8); /* no alignment is required of p */
			memcpy(&w1, b + j + LANE, 8);
			memcpy(&w2, b + j + 2 * LANE, 8);
			c = _mm_crc32_u64(c, w0);
			c1 = _mm_crc32_u64(c1, w1);
			c2 = _mm_crc32_u64(c2, w2);
		}
		c = lane_advance(lane_advance((uint32_t)c) ^ (uint32_t)c1) ^ (uint32_t)c2;
	}
	for (; i + 8 <= n; i += 8) {
		uint64_t w;
		memcpy(&w, b + i, sizeof w);
		c = _mm_crc32_u64(c, w);
	}
	for (; i < n; i++)
		c = _mm_crc32_u8((uint32_t)c, b[i]);
	return ~(uint32_t)c;
}
#endif

#if defined(__aarch64__)
#if defined(__clang__)
#define CRC_TARGET __attribute__((target("crc")))
#else
#define CRC_TARGET __attribute__((target("+crc")))
#endif
CRC_TARGET uint32_t kvp_crc32c_armv8(uint32_t crc, const void *p, size_t n)
{
	const unsigned char *b = p;
	uint32_t c = ~crc;
	size_t i = 0;
	pthread_once(&lane_once, lane_fill);
	for (; i + 3 * LANE <= n; i += 3 * LANE) {
		uint32_t c1 = 0, c2 = 0;
		for (size_t j = i; j < i + LANE; j += 8) {
			uint64_t w0, w1, w2;
			memcpy(&w0, b + j, 8);
			memcpy(&w1, b + j + LANE, 8);
			memcpy(&w2, b + j + 2 * LANE, 8);
			c = __crc32cd(c, w0);
			c1 = __crc32cd(c1, w1);
			c2 = __crc32cd(c2, w2);
		}
		c = lane_advance(lane_advance(c) ^ c1) ^ c2;
	}
	for (; i + 8 <= n; i += 8) {
		uint64_t w;
		memcpy(&w, b + i, sizeof w);
		c = __crc32cd(c, w);
	}
	for (; i < n; i++)
		c = __crc32cb(c, b[i]);
	return ~c;
}
#endif
