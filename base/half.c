/* IEEE 754 binary16 <-> binary32, bit-exact with F16C / NEON fcvt (round to nearest even), and the scan
 * for values outside a bound (not finite, or beyond what binary16 holds). */
#include <string.h>

#include "base.h"

static uint32_t bits_of(float x)
{
	uint32_t u;
	memcpy(&u, &x, sizeof u);
	return u;
}

static float float_of(uint32_t u)
{
	float x;
	memcpy(&x, &u, sizeof x);
	return x;
}

uint16_t kvp_f32_to_f16(float x)
{
	uint32_t u = bits_of(x);
	uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
	uint32_t absu = u & 0x7fffffffu;

	if (absu >= 0x7f800000u) /* inf or NaN: keep NaN quiet and non-zero */
		return sign | (absu > 0x7f800000u ? (uint16_t)(0x7e00u | ((absu >> 13) & 0x3ffu)) : 0x7c00u);
	if (absu >= 0x477ff000u) /* rounds to >= 65520: overflow to infinity */
		return sign | 0x7c00u;
	if (absu < 0x38800000u) { /* result is subnormal or zero: scale so the FPU rounds for us */
		float f = float_of(absu) * 0x1p24f; /* now an integer count of 2^-24 units, exact below 2^24 */
		uint32_t m = (uint32_t)f;
		float rem = f - (float)m;
		if (rem > 0.5f || (rem == 0.5f && (m & 1u)))
			m++;
		return sign | (uint16_t)m;
	}
	/* normal: rebias exponent, round mantissa from 23 to 10 bits, nearest even */
	uint32_t mant = absu + ((uint32_t)(15 - 127) << 23);
	mant += 0xfffu + ((mant >> 13) & 1u);
	return sign | (uint16_t)(mant >> 13);
}

float kvp_f16_to_f32(uint16_t h)
{
	uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
	uint32_t exp = (h >> 10) & 0x1fu;
	uint32_t mant = h & 0x3ffu;

	if (exp == 0x1f)
		return float_of(sign | 0x7f800000u | (mant << 13));
	if (exp == 0) /* zero or subnormal: mant * 2^-24 is exact in fp32 */
		return sign ? -(float)mant * 0x1p-24f : (float)mant * 0x1p-24f;
	return float_of(sign | ((exp + 127 - 15) << 23) | (mant << 13));
}

/* Whether any of x[0..n) has its magnitude's bits at limit or above: branchless, so that a loop of a
 * constant n vectorizes. */
static unsigned run_outside(const float *restrict x, size_t n, uint32_t limit)
{
	unsigned bad = 0;

	for (size_t i = 0; i < n; i++)
		bad |= (bits_of(x[i]) & 0x7fffffffu) >= limit;
	return bad;
}

/* Whole runs of RUN first; the exact index from the first run that has one (or the tail) on. */
size_t kvp_first_outside(const float *x, size_t n, float bound)
{
	enum { RUN = 64 };
	const uint32_t limit = bits_of(bound); /* magnitudes compare as their bits; every NaN's are above */
	size_t at = 0;

	for (; at + RUN <= n; at += RUN)
		if (run_outside(x + at, RUN, limit))
			break;
	for (; at < n; at++)
		if ((bits_of(x[at]) & 0x7fffffffu) >= limit)
			return at;
	return n;
}
