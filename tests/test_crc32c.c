/* CRC32C: published check values, and the runtime-chosen implementation against the table reference. */
#include <criterion/criterion.h>
#include <string.h>

#include "kernels/crc32c.h"

Test(crc32c, reference_matches_the_published_check_values)
{
	unsigned char zeros[32] = { 0 }, ones[32];
	memset(ones, 0xff, sizeof ones);
	cr_assert_eq(kvp_crc32c_scalar(0, "123456789", 9), 0xe3069283u);
	/* RFC 3720 (iSCSI) appendix B.4 */
	cr_assert_eq(kvp_crc32c_scalar(0, zeros, sizeof zeros), 0x8a9136aau);
	cr_assert_eq(kvp_crc32c_scalar(0, ones, sizeof ones), 0x62a8ab43u);
}

Test(crc32c, chosen_implementation_agrees_with_the_reference)
{
	static unsigned char buf[70000];
	uint64_t s = 88172645463325252ull;
	for (size_t i = 0; i < sizeof buf; i++) {
		s ^= s << 13, s ^= s >> 7, s ^= s << 17;
		buf[i] = (unsigned char)s;
	}
	for (size_t off = 0; off < 9; off++)
		for (size_t n = 0; n + off < sizeof buf; n = n * 3 + 1)
			cr_assert_eq(kvp_crc32c(0, buf + off, n), kvp_crc32c_scalar(0, buf + off, n),
				     "%s: %zu bytes at +%zu", kvp_crc32c_name(), n, off);
}

Test(crc32c, continuing_a_checksum_equals_one_pass)
{
	static const char text[] = "a block header followed by its payload";
	size_t n = sizeof text - 1;
	for (size_t cut = 0; cut <= n; cut++)
		cr_assert_eq(kvp_crc32c(kvp_crc32c(0, text, cut), text + cut, n - cut), kvp_crc32c(0, text, n));
}

Test(crc32c, one_flipped_bit_changes_the_checksum)
{
	unsigned char buf[4096] = { 0 };
	uint32_t clean = kvp_crc32c(0, buf, sizeof buf);
	for (size_t bit = 0; bit < sizeof buf * 8; bit += 97) {
		buf[bit / 8] ^= (unsigned char)(1u << (bit % 8));
		cr_assert_neq(kvp_crc32c(0, buf, sizeof buf), clean, "bit %zu", bit);
		buf[bit / 8] ^= (unsigned char)(1u << (bit % 8));
	}
}
