/*
 * CRC32C (Castagnoli, reflected polynomial 0x82f63b78), the checksum of every spilled block.
 *
 * kvp_crc32c(0, p, n) is the standard CRC32C of p[0..n) ("123456789" -> 0xe3069283); passing a previous
 * result as crc continues it, so a record can be checksummed piece by piece.
 *
 * Implementations: a table-driven scalar reference, SSE4.2 crc32 on x86-64, the ARMv8 CRC extension on
 * aarch64; chosen once per process from the CPU's features, by dispatch.c together with the other
 * kernels. KVP_KERNELS=scalar forces the reference, like the other kernels.
 */
#ifndef KVP_KERNELS_CRC32C_H
#define KVP_KERNELS_CRC32C_H

#include <stddef.h>
#include <stdint.h>

typedef uint32_t (*kvp_crc32c_fn)(uint32_t crc, const void *p, size_t n);

uint32_t kvp_crc32c(uint32_t crc, const void *p, size_t n);
uint32_t kvp_crc32c_scalar(uint32_t crc, const void *p, size_t n);
/* The hardware versions: only for dispatch.c, which calls them after checking the CPU has the instruction. */
#if defined(__x86_64__)
uint32_t kvp_crc32c_sse42(uint32_t crc, const void *p, size_t n);
#endif
#if defined(__aarch64__)
uint32_t kvp_crc32c_armv8(uint32_t crc, const void *p, size_t n);
#endif
/* "scalar", "sse42" or "armv8": NULL when this build or CPU cannot run it. For tests and benchmarks. */
kvp_crc32c_fn kvp_crc32c_named(const char *name);
/* The name of the implementation kvp_crc32c uses. */
const char *kvp_crc32c_name(void);

#endif
