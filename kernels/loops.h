/*
 * kernels/loops.h — the part of a vector kernel table that does not depend on the instruction set: the
 * walk over a GQA group's heads in blocks of four, the switch that gives every code width its own loop,
 * the walks over rows of masked and band-norm kernels, and the table itself.
 *
 * Not a header for general use: avx512.c, avx2.c and neon.c each include it once, at their end, after their
 * primitives. The loops then compile once per instruction set, with that file's flags, and the
 * primitives (static, mostly always inlined) inline into them as if written there.
 *
 * The including file defines, as static functions:
 *   dot_f32, axpy_f32, f32_to_f16, f16_to_f32, scale
 *                                   the table's entries of those names (contracts in kernels.h)
 *   dot_f16_ahead, axpy_f16_ahead   dot_f16 and axpy_f16 with the prefetch hint `ahead` (see kernels.h)
 *   dot_f16_heads4, axpy_f16_heads4 four heads of a group at once, q or w and acc holding 4 rows, same hint
 *   lut_dot_bits, lut_axpy_bits     lut_dot and lut_axpy for a bit width that is a constant once inlined
 *   lut_dot_heads4, lut_axpy_heads4 the same for four heads, strides as in lut_*_group
 *   dot_i8_core, axpy_i16_width     the integer sums of lut_dot_i8_group and lut_axpy_i16_group alone:
 *                                   dot_i8_core(bits, m, n, codes, stride, lut, g, q, q_stride, int32 out[g*n]) sets
 *                                   out[h*n + i] = S(h, i); axpy_i16_width(bits, ...) (bits a constant once
 *                                   inlined; the same arguments as axpy_i16_core below: lut16, g, int16 w[g*n],
 *                                   int32 acc, acc_stride) adds sum_i w[h*n + i] * lut[code(i, j)] to
 *                                   acc[h*acc_stride + j]; the float steps around them are below
 *   or, with KVP_ISA_FUSED_LOOKUPS defined, lut_dot_i8_group and lut_axpy_i16_group themselves
 *   lut_axpy_u8_group (with KVP_ISA_AXPY_U8 defined; otherwise the table declines every call)
 *   axpy_u8_scaled                  the table's entry (contract in kernels.h: it declines the shapes it leaves)
 *   dot_i8_scaled, axpy_i16_scaled (with KVP_ISA_DOT_I8_SCALED, KVP_ISA_AXPY_I16_SCALED defined; otherwise
 *                                   the loops here, loops_dot_i8_scaled and loops_axpy_i16_scaled, which an
 *                                   own version calls for the shapes it leaves)
 *   sym_codes_width, sum_squares (with KVP_ISA_ENCODE defined)
 *                                   sym_codes for a width that is a constant once inlined, and sum_squares
 *   spark_dot_i16_group (with KVP_ISA_SPARK defined; otherwise loops_spark_dot_i16_group here, which an own
 *                                   version calls for the shapes it leaves)
 *   scaled_max, exp_sum, max_keeping (with KVP_ISA_SOFTMAX_GROUP defined) the two passes over one head's
 *                                   scores and the running maximum's update, from which softmax_step and
 *                                   softmax_group are built here; otherwise softmax_step itself (contract in
 *                                   kernels.h), and softmax_group is scale, then softmax_step per head
 *   spark_choose (with KVP_ISA_SPARK_CHOOSE defined; otherwise the plain code of kernels.h)
 *   mask_codes (with KVP_ISA_MASK_CODES defined; otherwise the plain code of kernels.h, or with
 *                                   KVP_ISA_MASK_LEVELS defined built here from the file's two steps:)
 *   mask_levels, mask_codes32       a row's kept levels (1 + magnitude, 2 bits at most) in rank order into
 *                                   lv[0..kept), bytes past them scratch: (rows, mag, lv); and 32 channels'
 *                                   codes from mask bits w, sign bits s and levels from lv[0] on (the first
 *                                   kept channel's), packed into 16 bytes at out, returning how many it keeps:
 *                                   (w, s, lv, out). lv has 16 bytes past the row's last level.
 *   fwht_blocks16 (with KVP_ISA_FWHT defined)
 *                                   stages 1, 2, 4 and 8 of fwht on each block of 16 values of v[0..p), p >= 16
 *   dot_i8_step (with KVP_ISA_DOT_I8_STEP defined) lut_dot_i8_group's float step on a slice of rows' sums
 *   weights_i16 (with KVP_ISA_WEIGHTS_I16 defined) lut_axpy_i16_group's 12-bit weights of one head
 *   mask_expand_row                 one row of mask_expand: (d, mask, sign or NULL, kept, scale, mag, x)
 *   band_norms_vector               the bands [0, returned) of one row of band_norms, F = d / 2
 * and the macros KVP_ISA_NAME (the table's name string) and KVP_ISA_TABLE (its identifier, declared in
 * kernels.h). KVP_ISA_ENTRIES, defined here, lets the file build another table from the same loops.
 */

static void dot_f16(unsigned d, unsigned n, const uint16_t *rows, const float *q, float scale, float *out)
{
	dot_f16_ahead(d, n, rows, q, scale, out, NULL);
}

static void axpy_f16(unsigned d, unsigned n, const uint16_t *rows, const float *w, float *acc)
{
	axpy_f16_ahead(d, n, rows, w, acc, NULL);
}

/* The first pass over rows asks for ahead; later passes find rows in cache and ahead on its way. */
static void dot_f16_group(unsigned d, unsigned n, const uint16_t *rows, unsigned g, const float *q,
			  float scale, float *out, const uint16_t *ahead)
{
	unsigned h = 0;

	for (; h + 4 <= g; h += 4, ahead = NULL)
		dot_f16_heads4(d, n, rows, q + (size_t)h * d, scale, out + (size_t)h * n, ahead);
	for (; h < g; h++, ahead = NULL)
		dot_f16_ahead(d, n, rows, q + (size_t)h * d, scale, out + (size_t)h * n, ahead);
}

static void axpy_f16_group(unsigned d, unsigned n, const uint16_t *rows, unsigned g, const float *w,
			   float *acc, const uint16_t *ahead)
{
	unsigned h = 0;

	for (; h + 4 <= g; h += 4, ahead = NULL)
		axpy_f16_heads4(d, n, rows, w + (size_t)h * n, acc + (size_t)h * d, ahead);
	for (; h < g; h++, ahead = NULL)
		axpy_f16_ahead(d, n, rows, w + (size_t)h * n, acc + (size_t)h * d, ahead);
}

/* One case per width: the *_bits functions inline into each with bits a constant (shifts, load sizes). */
static void lut_dot(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
		    const float *lut, const float *q, float *out)
{
	switch (bits) {
	case 1: lut_dot_bits(1, m, n, codes, stride, lut, q, out); break;
	case 2: lut_dot_bits(2, m, n, codes, stride, lut, q, out); break;
	case 3: lut_dot_bits(3, m, n, codes, stride, lut, q, out); break;
	default: lut_dot_bits(4, m, n, codes, stride, lut, q, out); break;
	}
}

static void lut_axpy(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
		     const float *lut, const float *w, float *acc)
{
	switch (bits) {
	case 1: lut_axpy_bits(1, m, n, codes, stride, lut, w, acc); break;
	case 2: lut_axpy_bits(2, m, n, codes, stride, lut, w, acc); break;
	case 3: lut_axpy_bits(3, m, n, codes, stride, lut, w, acc); break;
	default: lut_axpy_bits(4, m, n, codes, stride, lut, w, acc); break;
	}
}

static void lut_dot_heads4_any(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			       const float *lut, const float *q, size_t qs, float *out)
{
	switch (bits) {
	case 1: lut_dot_heads4(1, m, n, codes, stride, lut, q, qs, out); break;
	case 2: lut_dot_heads4(2, m, n, codes, stride, lut, q, qs, out); break;
	case 3: lut_dot_heads4(3, m, n, codes, stride, lut, q, qs, out); break;
	default: lut_dot_heads4(4, m, n, codes, stride, lut, q, qs, out); break;
	}
}

static void lut_axpy_heads4_any(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
				const float *lut, const float *w, float *acc, size_t as)
{
	switch (bits) {
	case 1: lut_axpy_heads4(1, m, n, codes, stride, lut, w, acc, as); break;
	case 2: lut_axpy_heads4(2, m, n, codes, stride, lut, w, acc, as); break;
	case 3: lut_axpy_heads4(3, m, n, codes, stride, lut, w, acc, as); break;
	default: lut_axpy_heads4(4, m, n, codes, stride, lut, w, acc, as); break;
	}
}

static void lut_dot_group(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			  const float *lut, unsigned g, const float *q, size_t q_stride, float *out)
{
	unsigned h = 0;

	for (; h + 4 <= g; h += 4)
		lut_dot_heads4_any(bits, m, n, codes, stride, lut, q + h * q_stride, q_stride, out + (size_t)h * n);
	for (; h < g; h++)
		lut_dot(bits, m, n, codes, stride, lut, q + h * q_stride, out + (size_t)h * n);
}

static void lut_axpy_group(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			   const float *lut, unsigned g, const float *w, float *acc, size_t acc_stride)
{
	unsigned h = 0;

	for (; h + 4 <= g; h += 4)
		lut_axpy_heads4_any(bits, m, n, codes, stride, lut, w + (size_t)h * n, acc + h * acc_stride,
				    acc_stride);
	for (; h < g; h++)
		lut_axpy(bits, m, n, codes, stride, lut, w + (size_t)h * n, acc + h * acc_stride);
}

#ifndef KVP_ISA_FUSED_LOOKUPS
/* The float steps of kernels.h around the integer cores, in slices of rows whose sums fit the stack. */
#define CORE_INTS 1024

#ifndef KVP_ISA_DOT_I8_STEP
/* The float step of lut_dot_i8_group on a slice of rows' integer sums s[h * n + i]: a file may vectorize it
 * (KVP_ISA_DOT_I8_STEP), with the same operations in the same order. */
static inline void dot_i8_step(unsigned g, unsigned n, const int32_t *s, const float *head_scale,
			       const uint8_t *row_scale, size_t scale_stride, float *out, size_t out_stride, int add)
{
	for (unsigned h = 0; h < g; h++)
		for (unsigned i = 0; i < n; i++)
			kvp_put_score(out + h * out_stride + i,
				      ((float)s[h * n + i] * head_scale[h]) * kvp_load_f32(row_scale + (size_t)i * scale_stride),
				      add);
}
#endif

/* lut_dot_i8_group as `name`, on the integer sums of `core` (a file with two cores builds two of these). */
#define KVP_DOT_I8_GROUP(name, core)                                                                            \
	static void name(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,            \
			 const int8_t *lut, unsigned g, const int8_t *q, size_t q_stride, const float *head_scale,  \
			 const uint8_t *row_scale, size_t scale_stride, float *out, size_t out_stride, int add) \
	{                                                                                                        \
		const unsigned slice = g < CORE_INTS ? CORE_INTS / g : 1;                                        \
		int32_t s[CORE_INTS];                                                                            \
                                                                                                                 \
		for (unsigned h0 = 0; h0 < g; h0 += CORE_INTS) {                                                 \
			const unsigned gn = g - h0 < CORE_INTS ? g - h0 : CORE_INTS;                             \
			for (unsigned i0 = 0; i0 < n; i0 += slice) {                                             \
				const unsigned cn = n - i0 < slice ? n - i0 : slice;                             \
                                                                                                                 \
				core(bits, m, cn, codes + (size_t)i0 * stride, stride, lut, gn, q + h0 * q_stride, \
				     q_stride, s);                                                               \
				dot_i8_step(gn, cn, s, head_scale + h0, row_scale + (size_t)i0 * scale_stride,   \
					    scale_stride, out + h0 * out_stride + i0, out_stride, add);          \
			}                                                                                        \
		}                                                                                                \
	}

KVP_DOT_I8_GROUP(lut_dot_i8_group, dot_i8_core)

/* One case per width, as lut_dot's. */
static void axpy_i16_core(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			  const int16_t *lut, unsigned g, const int16_t *w, int32_t *acc, size_t acc_stride)
{
	switch (bits) {
	case 1: axpy_i16_width(1, m, n, codes, stride, lut, g, w, acc, acc_stride); break;
	case 2: axpy_i16_width(2, m, n, codes, stride, lut, g, w, acc, acc_stride); break;
	case 3: axpy_i16_width(3, m, n, codes, stride, lut, g, w, acc, acc_stride); break;
	default: axpy_i16_width(4, m, n, codes, stride, lut, g, w, acc, acc_stride); break;
	}
}

#ifndef KVP_ISA_WEIGHTS_I16
/* One head's 12-bit weights, kernels.h's kvp_weights_i16; a file may vectorize it (KVP_ISA_WEIGHTS_I16), with
 * the same operations. */
static inline float weights_i16(unsigned n, const float *w, const uint8_t *row_scale, size_t scale_stride,
				int16_t *w16)
{
	return kvp_weights_i16(n, w, row_scale, scale_stride, w16);
}
#endif

/* Columns 64 at a time (a multiple of 8, so each chunk's codes start on a byte), four heads at a time. */
static void lut_axpy_i16_group(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, size_t stride,
			       const int16_t *lut, float unit, unsigned g, const float *w, size_t w_stride,
			       const uint8_t *row_scale, size_t scale_stride, float *acc, size_t acc_stride,
			       const struct kvp_ahead *ahead)
{
	const unsigned steps = (g + 3) / 4 * ((m + 63) / 64); /* ahead: a share per chunk of columns */
	int16_t w16[4 * KVP_AXPY_I16_ROWS];
	int32_t sums[4 * 64];
	float f[4];
	unsigned step = 0;

	for (unsigned h0 = 0; h0 < g; h0 += 4) {
		const unsigned gn = g - h0 < 4 ? g - h0 : 4;

		for (unsigned h = 0; h < gn; h++)
			f[h] = unit * weights_i16(n, w + (h0 + h) * w_stride, row_scale, scale_stride, w16 + h * n);
		for (unsigned j = 0; j < m; j += 64) {
			const unsigned k = m - j < 64 ? m - j : 64;

			kvp_ahead_share(ahead, step++, steps);
			memset(sums, 0, sizeof sums);
			axpy_i16_core(bits, k, n, codes + j * bits / 8, stride, lut, gn, w16, sums, 64);
			for (unsigned h = 0; h < gn; h++)
				for (unsigned c = 0; c < k; c++)
					acc[(h0 + h) * acc_stride + j + c] += f[h] * (float)sums[h * 64 + c];
		}
	}
}
#endif

#ifdef KVP_ISA_SOFTMAX_GROUP
/*
 * softmax_step and softmax_group on the file's two passes over one head's scores: scaled_max (the scores
 * times scale written back, and to raw unless NULL; returns their largest) and exp_sum (s[i] = e^(s[i] - mx);
 * returns their sum), with max_keeping (fmaxf of a running maximum that is not NaN). Up to four heads at a
 * time, each pass over all of them before the next, so that the heads' horizontal reductions, which end each
 * pass, overlap instead of each head's waiting on the one before. Same contract and same all-masked (-inf)
 * handling as the scalar reference (see scalar.c), and the same operations on each score as scale then
 * softmax_step.
 */
static inline __attribute__((always_inline)) void softmax_heads(unsigned n, unsigned c, float scale_by, float *s,
								  float *raw, size_t raw_stride, float *m, float *l,
								  float *corr)
{
	float mx[4], sum[4];

	for (unsigned h = 0; h < c; h++)
		mx[h] = max_keeping(m[h], scaled_max(n, scale_by, s + (size_t)h * n, raw ? raw + h * raw_stride : NULL));
	for (unsigned h = 0; h < c; h++) {
		if (mx[h] == -INFINITY)
			memset(s + (size_t)h * n, 0, n * sizeof *s);
		else
			sum[h] = exp_sum(n, mx[h], s + (size_t)h * n);
	}
	for (unsigned h = 0; h < c; h++) {
		if (mx[h] == -INFINITY) {
			l[h] = corr[h] = 0.0f;
			continue;
		}
		/* one exponential per block, and none when the running maximum stays (e^0 is 1): libm is fine here */
		corr[h] = mx[h] == m[h] ? 1.0f : expf(m[h] - mx[h]);
		l[h] = l[h] * corr[h] + sum[h];
		m[h] = mx[h];
	}
}

/* x * 1 is x exactly, and the compiler drops both the multiply and the raw stores */
static float softmax_step(unsigned n, float *s, float *m, float *l)
{
	float corr;

	softmax_heads(n, 1, 1.0f, s, NULL, 0, m, l, &corr);
	return corr;
}

static void softmax_group(unsigned n, unsigned g, float scale_by, float *s, float *raw, size_t raw_stride,
			  float *m, float *l, float *corr)
{
	for (unsigned h = 0; h < g; h += 4)
		softmax_heads(n, g - h < 4 ? g - h : 4, scale_by, s + (size_t)h * n,
			      raw ? raw + h * raw_stride : NULL, raw_stride, m + h, l + h, corr + h);
}
#else
/* softmax_group as its definition in kernels.h reads: scale, then softmax_step per head (same bits). */
static void softmax_group(unsigned n, unsigned g, float scale_by, float *s, float *raw, size_t raw_stride,
			  float *m, float *l, float *corr)
{
	scale(g * n, scale_by, s);
	for (unsigned h = 0; h < g; h++) {
		if (raw)
			memcpy(raw + h * raw_stride, s + (size_t)h * n, n * sizeof *s);
		corr[h] = softmax_step(n, s + (size_t)h * n, &m[h], &l[h]);
	}
}
#endif

/*
 * fwht: the stages within blocks of 16 (the file's own, or plain loops a compiler vectorizes), then the
 * wider stages between blocks, two at a time, on 16 columns each. The sums are those of kernels.h's
 * definition, stage after stage, so every version gives the same bits.
 */
#ifndef KVP_ISA_FWHT
/* Stage h of 16 values: pairs (l, l + h) for l with bit h clear, written out per h so each loop has a fixed
 * pattern a compiler can vectorize. */
static inline __attribute__((always_inline)) void fwht16_stage(float *restrict v, unsigned h)
{
	float w[16];

	for (unsigned l = 0; l < 16; l++) {
		float self = v[l], partner = v[l ^ h];
		w[l] = (l & h) ? partner - self : self + partner;
	}
	memcpy(v, w, sizeof w);
}

static void fwht_blocks16(unsigned p, float *v)
{
	for (unsigned i = 0; i < p; i += 16) {
		fwht16_stage(v + i, 1);
		fwht16_stage(v + i, 2);
		fwht16_stage(v + i, 4);
		fwht16_stage(v + i, 8);
	}
}
#endif

/* Stages h and 2h on the 16 columns at a, a + h, a + 2h, a + 3h; restrict lets them vectorize. */
static void fwht_radix4(float *restrict a, float *restrict b, float *restrict c, float *restrict d)
{
	for (unsigned l = 0; l < 16; l++) {
		float s0 = a[l] + b[l], d0 = a[l] - b[l], s1 = c[l] + d[l], d1 = c[l] - d[l];
		a[l] = s0 + s1, c[l] = s0 - s1, b[l] = d0 + d1, d[l] = d0 - d1;
	}
}

static void fwht_radix2(float *restrict a, float *restrict b)
{
	for (unsigned l = 0; l < 16; l++) {
		float s = a[l] + b[l], d = a[l] - b[l];
		a[l] = s, b[l] = d;
	}
}

static void fwht(unsigned p, float *v)
{
	unsigned h = 16;

	if (p < 16) {
		kvp_kernels_scalar.fwht(p, v);
		return;
	}
	fwht_blocks16(p, v);
	for (; 4 * h <= p; h *= 4)
		for (unsigned i = 0; i < p; i += 4 * h)
			for (unsigned j = i; j < i + h; j += 16)
				fwht_radix4(v + j, v + j + h, v + j + 2 * h, v + j + 3 * h);
	for (; h < p; h *= 2)
		for (unsigned i = 0; i < p; i += 2 * h)
			for (unsigned j = i; j < i + h; j += 16)
				fwht_radix2(v + j, v + j + h);
}

#ifndef KVP_ISA_ENCODE
/*
 * sym_codes_width and sum_squares as plain code: sixteen codes at a time counted on integers (b = a, or
 * min(a, 2^31 - 2) + 1 at or below zero, so that one compare serves both signs), eight packed into `bits`
 * bytes by shifts; the squares in the scalar loop, whose order is the definition's.
 */
static inline __attribute__((always_inline)) void sym_codes_width(unsigned bits, unsigned m, const float *y,
								  const int32_t *t, uint8_t *out)
{
	const int32_t half = 1 << (bits - 1);

	for (unsigned j = 0; j < m; j += 16, out += 2 * bits) {
		int32_t u[16], code[16];

		memcpy(u, y + j, sizeof u);
		for (unsigned l = 0; l < 16; l++) {
			int32_t a = u[l] & 0x7fffffff, pos = u[l] > 0;
			int32_t b = pos ? a : (a < 0x7ffffffe ? a : 0x7ffffffe) + 1, cnt = 0;
			for (int32_t k = 0; k + 1 < half; k++)
				cnt += b > t[k];
			code[l] = pos ? half + cnt : half - 1 - cnt;
		}
		kvp_pack8(code, bits, out);
		kvp_pack8(code + 8, bits, out + bits);
	}
}

static double sum_squares(unsigned m, const float *y)
{
	return kvp_kernels_scalar.sum_squares(m, y);
}
#endif

/* One case per width, on the file's sym_codes_width or the plain one above. */
static void sym_codes(unsigned bits, unsigned m, const float *y, const int32_t *t, uint8_t *out)
{
	switch (bits) {
	case 1: sym_codes_width(1, m, y, t, out); break;
	case 2: sym_codes_width(2, m, y, t, out); break;
	case 3: sym_codes_width(3, m, y, t, out); break;
	default: sym_codes_width(4, m, y, t, out); break;
	}
}

static void mask_expand(unsigned d, unsigned n, const uint8_t *masks, const uint8_t *signs, size_t stride,
			const float *kept, size_t kept_stride, const float *scale, const float *mag, float *x)
{
	for (unsigned i = 0; i < n; i++)
		mask_expand_row(d, masks + (size_t)i * stride, signs ? signs + (size_t)i * stride : NULL,
				kept + (size_t)i * kept_stride, signs ? scale[i] : 0.0f, mag, x + (size_t)i * d);
}

/*
 * The integer loops below for the tables without versions of their own (and the shapes a table's own
 * version leaves) run on the including file's vectors through GCC's and Clang's vector extensions (at -O2
 * GCC 12 vectorizes only loops of a known count, so they say how they run): loops_i32v, LOOPS_LANES int32 lanes, and loops_bytes, LOOPS_LANES bytes widened into
 * them, come from the including file; these are the same lanes as floats and uint32.
 */
typedef float loops_f32v __attribute__((vector_size(LOOPS_LANES * 4)));
typedef uint32_t loops_u32v __attribute__((vector_size(LOOPS_LANES * 4)));

/*
 * spark_dot_i16_group in plain code, for the tables without a version of their own (and the shapes a
 * table's own version leaves): a row's transform in
 * int32 (stages as loops the compiler vectorizes), its channels placed by the mask, then one dot per head
 * over int16 products summed in int32, which the vectorizer takes (pmaddwd, smlal).
 */
static int32_t spark_dot_row(unsigned d, const int16_t *restrict x, const int16_t *restrict q)
{
	int32_t s = 0;

	for (unsigned j = 0; j < d; j++)
		s += x[j] * q[j];
	return s;
}

static void spark_x_row(const struct kvp_masked_codes *rc, const uint8_t *row, int16_t ell, int16_t *x)
{
	const uint8_t *mask = row + rc->mask_at, *sign = row + rc->sign_at, *codes = row + rc->code_at;
	const unsigned b = rc->bits;
	int32_t z[64];
	unsigned t = 0, r = 0;

	for (unsigned k = 0; k < rc->kept; k++) {
		size_t at = (size_t)k * b;
		unsigned w = codes[at >> 3] | (((at & 7) + b > 8) ? (unsigned)codes[(at >> 3) + 1] << 8 : 0u);
		z[k] = rc->lut[(w >> (at & 7)) & ((1u << b) - 1)];
	}
	for (unsigned h = 1; h < rc->kept; h *= 2)
		for (unsigned k0 = 0; k0 < rc->kept; k0 += 2 * h)
			for (unsigned k = k0; k < k0 + h; k++) {
				int32_t a = z[k], c = z[k + h];
				z[k] = a + c;
				z[k + h] = a - c;
			}
	for (unsigned j = 0; j < rc->d; j++) {
		int32_t v = (rc->rho[j] * ell + (1 << 14)) >> 15;

		if (mask[j >> 3] >> (j & 7) & 1) {
			x[j] = t < rc->kept ? (int16_t)(rc->sgn[t] * (z[t] * (1 << rc->shift))) : 0;
			t++;
		} else {
			x[j] = (int16_t)(sign[r >> 3] >> (r & 7) & 1 ? -v : v);
			r++;
		}
	}
	if (t != rc->kept)
		memset(x, 0, sizeof *x * rc->d);
}

static void spark_dot_i16_plain(const struct kvp_masked_codes *rc, unsigned n, const uint8_t *base,
				const int16_t *ell, const float *row_scale, unsigned g, const int16_t *q,
				size_t q_stride, const float *head_scale, float *out, size_t out_stride)
{
	int16_t x[256];

	for (unsigned i = 0; i < n; i++) {
		spark_x_row(rc, base + (size_t)i * rc->stride, ell[i], x);
		for (unsigned h = 0; h < g; h++)
			out[h * out_stride + i] =
				((float)spark_dot_row(rc->d, x, q + h * q_stride) * head_scale[h]) * row_scale[i];
	}
}

/*
 * spark_dot_i16_group for the tables without their own (NEON), and the shapes a table's own leaves: the plain code's integers, with a
 * row's x built without a branch per channel (the plain code's branches on the mask bits went the wrong way
 * about half the time), the transform's stages that span whole vectors in vectors, and the products in
 * vectors of int32 for four heads. Rows of at most 128 channels, a multiple of LOOPS_LANES, with at most 64
 * kept and 64 pruned; other shapes take the plain code. Codes and mask words are read little endian.
 */
#define SPARK_LOOPS_D 128u

/* The row's kept values by rank: the T-point transform of its looked-up codes, exact in int32, then times
 * sgs = sgn << shift and cut to int16 as the plain code does; z[T] is 0 (read, never used, past the last
 * rank). */
static void spark_z(const struct kvp_masked_codes *rc, const int32_t *sgs, const uint8_t *codes, int32_t *z)
{
	const unsigned b = rc->bits, T = rc->kept, mask = (1u << b) - 1;
	const int8_t *lut = rc->lut; /* a local: z's stores could otherwise change rc->lut */

	for (unsigned k0 = 0; k0 < T; k0 += 8) {
		const unsigned run = T - k0 < 8 ? T - k0 : 8;
		uint64_t w = 0;

		memcpy(&w, codes + k0 * b / 8, (run * b + 7) / 8);
		for (unsigned l = 0; l < run; l++)
			z[k0 + l] = lut[w >> (l * b) & mask];
	}
	for (unsigned h = 1; h < T; h *= 2)
		for (unsigned k0 = 0; k0 < T; k0 += 2 * h) {
			unsigned k = k0;

			for (; h >= LOOPS_LANES && k < k0 + h; k += LOOPS_LANES) {
				loops_i32v a, c;

				memcpy(&a, z + k, sizeof a), memcpy(&c, z + k + h, sizeof c);
				a += c, c = a - c - c;
				memcpy(z + k, &a, sizeof a), memcpy(z + k + h, &c, sizeof c);
			}
			for (; k < k0 + h; k++) {
				const int32_t a = z[k], c = z[k + h];

				z[k] = a + c, z[k + h] = a - c;
			}
		}
	for (unsigned k = 0; k + LOOPS_LANES <= T; k += LOOPS_LANES) {
		loops_i32v a, f;

		memcpy(&a, z + k, sizeof a), memcpy(&f, sgs + k, sizeof f);
		a *= f;
		a = (loops_i32v)((loops_u32v)a << 16) >> 16; /* cut to int16 */
		memcpy(z + k, &a, sizeof a);
	}
	for (unsigned k = T - T % LOOPS_LANES; k < T; k++)
		z[k] = (int16_t)(z[k] * sgs[k]);
	z[T] = 0;
}

/* The row's x (d int32 of int16 values); 0 everywhere when its mask does not keep `kept` channels. The
 * pruned channels, then the kept ones, are visited by their mask bits (lowest first): no branch on a bit, and
 * no step for a channel of the other kind. */
static void spark_x32(const struct kvp_masked_codes *rc, const uint8_t *row, int16_t ell, const int32_t *z, int32_t *x)
{
	const unsigned d = rc->d;
	const int16_t *rho = rc->rho;
	/* the mask's bits of channels below d (those past it are padding) */
	const uint64_t valid[2] = { d >= 64 ? ~(uint64_t)0 : ((uint64_t)1 << d) - 1,
				    d >= 128 ? ~(uint64_t)0 : d > 64 ? ((uint64_t)1 << (d - 64)) - 1 : 0 };
	uint64_t m[2] = { 0, 0 }, sw = 0;
	unsigned t = 0;

	memcpy(m, row + rc->mask_at, (d + 7) / 8);
	memcpy(&sw, row + rc->sign_at, (d - rc->kept + 7) / 8);
	m[0] &= valid[0], m[1] &= valid[1];
	if ((unsigned)(__builtin_popcountll(m[0]) + __builtin_popcountll(m[1])) != rc->kept) {
		memset(x, 0, sizeof *x * d);
		return;
	}
	for (unsigned w = 0; w < 2; w++)
		for (uint64_t pruned = ~m[w] & valid[w]; pruned; pruned &= pruned - 1, sw >>= 1) {
			const unsigned j = 64 * w + (unsigned)__builtin_ctzll(pruned);
			const int32_t v = (rho[j] * ell + (1 << 14)) >> 15, neg = (int32_t)(sw & 1);

			x[j] = (int16_t)((v ^ -neg) + neg);
		}
	for (unsigned w = 0; w < 2; w++)
		for (uint64_t kept = m[w]; kept; kept &= kept - 1)
			x[64 * w + (unsigned)__builtin_ctzll(kept)] = z[t++];
}

/* The sum of the int32 lanes of x[j] * q[j], j < d (exact: the query's step keeps it in int32) */
static int32_t dot32(unsigned d, const int32_t *x, const int32_t *q)
{
	loops_i32v a = { 0 };
	int32_t s = 0;

	for (unsigned j = 0; j < d; j += LOOPS_LANES) {
		loops_i32v xv, qv;

		memcpy(&xv, x + j, sizeof xv), memcpy(&qv, q + j, sizeof qv);
		a += xv * qv;
	}
	for (unsigned l = 0; l < LOOPS_LANES; l++)
		s += a[l];
	return s;
}

static void loops_spark_dot_i16_group(const struct kvp_masked_codes *rc, unsigned n, const uint8_t *base,
				      const int16_t *ell, const float *row_scale, unsigned g, const int16_t *q,
				      size_t q_stride, const float *head_scale, float *out, size_t out_stride)
{
	int32_t z[65], sgs[64], x[SPARK_LOOPS_D], q32[4][SPARK_LOOPS_D];

	if (rc->d > SPARK_LOOPS_D || rc->d % LOOPS_LANES || rc->kept > 64 || rc->d - rc->kept > 64) {
		spark_dot_i16_plain(rc, n, base, ell, row_scale, g, q, q_stride, head_scale, out, out_stride);
		return;
	}
	for (unsigned k = 0; k < rc->kept; k++)
		sgs[k] = rc->sgn[k] * (1 << rc->shift);
	for (unsigned h0 = 0; h0 < g; h0 += 4) {
		const unsigned hn = g - h0 < 4 ? g - h0 : 4;

		for (unsigned h = 0; h < hn; h++)
			for (unsigned j = 0; j < rc->d; j++)
				q32[h][j] = q[(h0 + h) * q_stride + j];
		for (unsigned i = 0; i < n; i++) {
			const uint8_t *row = base + (size_t)i * rc->stride;

			spark_z(rc, sgs, row + rc->code_at, z);
			spark_x32(rc, row, ell[i], z, x);
			for (unsigned h = 0; h < hn; h++)
				out[(h0 + h) * out_stride + i] = ((float)dot32(rc->d, x, q32[h]) * head_scale[h0 + h]) * row_scale[i];
		}
	}
}

#ifdef KVP_ISA_SPARK
#define LOOPS_SPARK_DOT_I16_GROUP spark_dot_i16_group
#else
#define LOOPS_SPARK_DOT_I16_GROUP loops_spark_dot_i16_group
#endif

/* The vector part of each row, then the bands short of a whole vector as the scalar reference does them. */
static void band_norms(unsigned d, unsigned n, int interleaved, const float *rows, float *out)
{
	const unsigned F = d / 2;

	for (unsigned i = 0; i < n; i++) {
		const float *r = rows + (size_t)i * d;
		float *o = out + (size_t)i * F;

		for (unsigned f = band_norms_vector(F, interleaved, r, o); f < F; f++)
			o[f] = interleaved ? kvp_band_norm(r[2 * f], r[2 * f + 1]) : kvp_band_norm(r[f], r[f + F]);
	}
}

/*
 * KIVI's kernels for the tables without versions of their own, and for the shapes a table's own version
 * leaves (AVX-512's other widths, which ran the plain code before, slower than AVX2's loops): the plain
 * code's arithmetic (kernels.h), in loops the compiler vectorizes. The plain code converted each fp16 number
 * where it used it and unpacked each code once per head (per channel, for the values' weights): at 32K
 * tokens, d=128, AVX2 took 559 ms for a layer, against 3 ms for AVX-512's own kernels. Here fp16 numbers go
 * through the table's f16_to_f32 (the same bits as kvp_f16_at), and a code is unpacked once for four heads.
 * Widths that do not divide a byte, and shapes past the buffers below, take the plain code.
 */
#define SCALED_CHUNK 256u /* channels or scalars converted at a time */
#define SCALED_ROWS 64u   /* dot_i8_scaled: rows whose sums are in flight */
#define SCALED_DIM 520u   /* the widest rows these loops take, 512, and the last byte's codes past them */

/* n <= SCALED_CHUNK fp16 numbers at p (any alignment; little endian, as the hosts of these tables are) as floats */
static void f16_run(unsigned n, const uint8_t *p, float *y)
{
	uint16_t h[SCALED_CHUNK];

	memcpy(h, p, 2 * (size_t)n);
	f16_to_f32(n, h, y);
}

static inline loops_f32v f32v_at(const float *p)
{
	loops_f32v v;

	memcpy(&v, p, sizeof v);
	return v;
}

/* kvp_fold16's sixteen running sums as vectors; x + ROUNDER - ROUNDER rounds |x| <= 2^22 to an integer, ties
 * to even, as nearbyintf does in the default rounding mode */
#define LOOPS_SUMS (16 / LOOPS_LANES)
#define ROUNDER 12582912.0f
_Static_assert(SCALED_CHUNK % 16 == 0, "scaled_query takes whole runs of sixteen channels from each chunk");

/* top with each lane raised to |u| where that is larger: the plain code's running maximum of |u| (a NaN u
 * raises nothing), lane by lane */
static inline loops_f32v max_abs_lanes(loops_f32v top, loops_f32v u)
{
	const loops_i32v a = (loops_i32v)u & INT32_MAX, more = (loops_i32v)((loops_f32v)a > top);

	return (loops_f32v)((a & more) | ((loops_i32v)top & ~more));
}

/* The largest of t and the lanes of tops[0..LOOPS_SUMS), as the plain code's comparisons take it */
static inline float lanes_max(const loops_f32v *tops, float t)
{
	for (unsigned v = 0; v < LOOPS_SUMS; v++)
		for (unsigned l = 0; l < LOOPS_LANES; l++)
			t = tops[v][l] > t ? tops[v][l] : t;
	return t;
}

/* Each lane of x, |x| <= 2^22, to the nearest integer, ties to even (kvp_nearest_even's bits) */
static inline loops_i32v nearest_lanes(loops_f32v x)
{
	return __builtin_convertvector((x + ROUNDER) - ROUNDER, loops_i32v);
}

/* code j of a row whose codes of `bits` bits (a divisor of 8) are packed LSB first */
static inline unsigned byte_code(const uint8_t *row, unsigned j, unsigned bits)
{
	return (unsigned)row[j / (8 / bits)] >> (j % (8 / bits) * bits) & ((1u << bits) - 1);
}

/*
 * kvp_scaled_query_i8 and kvp_dot_f16_fold16 of one head: its int8 query into q32 (as int32), Z into *z;
 * returns the step. Sixteen channels at a time in vectors: kvp_fold16's sixteen running sums are lanes, and
 * so are sixteen running maxima of |q_j s_j| (a maximum in any order is the same); the channels past the last
 * sixteen go one at a time, after.
 */
static float scaled_query(unsigned m, const float *q, const uint8_t *group, int32_t *q32, float *z)
{
	float s[SCALED_CHUNK], zv[SCALED_CHUNK], p[16], top = 0.0f, inv;
	const unsigned whole = m - m % 16;
	loops_f32v sums[LOOPS_SUMS], tops[LOOPS_SUMS];

	memset(sums, 0, sizeof sums), memset(tops, 0, sizeof tops);
	for (unsigned j0 = 0; j0 < m; j0 += SCALED_CHUNK) {
		const unsigned k = m - j0 < SCALED_CHUNK ? m - j0 : SCALED_CHUNK;

		f16_run(k, group + 2 * ((size_t)m + j0), s);
		f16_run(k, group + 2 * (size_t)j0, zv);
		for (unsigned j = 0; j < k && j0 + j < whole; j += 16)
			for (unsigned v = 0; v < LOOPS_SUMS; v++) {
				const unsigned at = j + v * LOOPS_LANES;
				const loops_f32v qv = f32v_at(q + j0 + at);

				tops[v] = max_abs_lanes(tops[v], qv * f32v_at(s + at));
				sums[v] += qv * f32v_at(zv + at);
			}
		memcpy(p, sums, sizeof p);
		for (unsigned j = whole > j0 ? whole - j0 : 0; j < k; j++) {
			const float u = q[j0 + j] * s[j];

			top = fabsf(u) > top ? fabsf(u) : top;
			p[(j0 + j) % 16] += q[j0 + j] * zv[j];
		}
	}
	top = lanes_max(tops, top);
	*z = kvp_fold16(p);
	inv = top > 127.0f / 3.0e38f ? 127.0f / top : 0.0f;
	for (unsigned j0 = 0; j0 < m; j0 += SCALED_CHUNK) {
		const unsigned k = m - j0 < SCALED_CHUNK ? m - j0 : SCALED_CHUNK, kv = k - k % LOOPS_LANES;
		unsigned j = 0;

		if (m > SCALED_CHUNK) /* in one chunk, s still holds its scales */
			f16_run(k, group + 2 * ((size_t)m + j0), s);
		for (; j < kv; j += LOOPS_LANES) {
			const loops_i32v x = nearest_lanes((f32v_at(q + j0 + j) * f32v_at(s + j)) * inv);

			for (unsigned l = 0; l < LOOPS_LANES; l++)
				q32[j0 + j + l] = (int8_t)x[l];
		}
		for (; j < k; j++)
			q32[j0 + j] = (int8_t)kvp_nearest_even((q[j0 + j] * s[j]) * inv);
	}
	return top / 127.0f;
}

/* Four heads' sums S(h, i) of rows [i0, i0 + rows): a column's byte of every row is contiguous, so
 * LOOPS_LANES rows are the vector lanes, each byte is loaded once for its codes and each code unpacked
 * once for the four heads, whose sums stay in registers over the channels. The query is int32 (q32[h][j]),
 * broadcast from memory. Rows short of a vector at the end go one at a time. */
static void scaled_sums4(unsigned bits, unsigned m, unsigned n, const uint8_t *codes, unsigned i0, unsigned rows,
			 const int32_t (*q32)[SCALED_DIM], int32_t (*sum)[SCALED_ROWS])
{
	const unsigned per = 8 / bits, whole = rows - rows % LOOPS_LANES, nb = (m + per - 1) / per;
	const int32_t mask = (int32_t)(1u << bits) - 1;

	for (unsigned i = 0; i < whole; i += LOOPS_LANES) {
		loops_i32v a0 = { 0 }, a1 = { 0 }, a2 = { 0 }, a3 = { 0 };

		for (unsigned b = 0; b < nb; b++) {
			const loops_i32v x = loops_bytes(codes + (size_t)b * n + i0 + i);

			/* q32 is zero past m, up to the last byte's codes */
			for (unsigned t = 0, j = b * per; t < per; t++, j++) {
				const loops_i32v c = x >> (int32_t)(t * bits) & mask;

				a0 += q32[0][j] * c, a1 += q32[1][j] * c, a2 += q32[2][j] * c, a3 += q32[3][j] * c;
			}
		}
		memcpy(sum[0] + i, &a0, sizeof a0), memcpy(sum[1] + i, &a1, sizeof a1);
		memcpy(sum[2] + i, &a2, sizeof a2), memcpy(sum[3] + i, &a3, sizeof a3);
	}
	for (unsigned i = whole; i < rows; i++) {
		int32_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;

		for (unsigned j = 0; j < m; j++) {
			const int32_t c = (int32_t)(codes[(size_t)(j / per) * n + i0 + i] >> (j % per * bits)) & mask;

			s0 += q32[0][j] * c, s1 += q32[1][j] * c, s2 += q32[2][j] * c, s3 += q32[3][j] * c;
		}
		sum[0][i] = s0, sum[1][i] = s1, sum[2][i] = s2, sum[3][i] = s3;
	}
}

static void loops_dot_i8_scaled(unsigned bits, unsigned m, unsigned n, const uint8_t *group, unsigned g,
				const float *q, size_t q_stride, float *out, size_t out_stride)
{
	const uint8_t *codes = group + 4 * (size_t)m;
	int32_t q32[4][SCALED_DIM], sum[4][SCALED_ROWS];
	float step[4], z[4];

	if (8 % bits || m + 8 > SCALED_DIM) {
		kvp_dot_i8_scaled_group_plain(bits, m, n, group, g, q, q_stride, out, out_stride);
		return;
	}
	for (unsigned h0 = 0; h0 < g; h0 += 4) {
		const unsigned hn = g - h0 < 4 ? g - h0 : 4;

		/* the last byte's codes past m weigh 0, and so do the heads past hn */
		for (unsigned h = 0; h < 4; h++)
			if (h < hn) {
				step[h] = scaled_query(m, q + (h0 + h) * q_stride, group, q32[h], &z[h]);
				memset(q32[h] + m, 0, 8 * sizeof **q32);
			} else {
				memset(q32[h], 0, (m + 8) * sizeof **q32);
			}
		for (unsigned i0 = 0; i0 < n; i0 += SCALED_ROWS) {
			const unsigned rows = n - i0 < SCALED_ROWS ? n - i0 : SCALED_ROWS;

			scaled_sums4(bits, m, n, codes, i0, rows, (const int32_t (*)[SCALED_DIM])q32, sum);
			for (unsigned h = 0; h < hn; h++)
				for (unsigned i = 0; i < rows; i++)
					out[(h0 + h) * out_stride + i0 + i] = z[h] + (float)sum[h][i] * step[h];
		}
	}
}

#ifdef KVP_ISA_DOT_I8_SCALED
#define LOOPS_DOT_I8_SCALED dot_i8_scaled
#else
#define LOOPS_DOT_I8_SCALED loops_dot_i8_scaled
#endif

/* The table's dot_i8_scaled: its version for one group, the groups in turn (kernels.h), unless the file has a
 * version of its own for groups in a row (KVP_ISA_DOT_I8_GROUPS, dot_i8_scaled_groups). */
#ifndef KVP_ISA_DOT_I8_GROUPS
KVP_SCALED_GROUPS(dot_i8_scaled_groups, LOOPS_DOT_I8_SCALED)
#endif

#ifndef KVP_ISA_AXPY_U8
/* No vector version in this table: it declines every call (kernels.h), so that callers keep this table's
 * vector lut_axpy_i16_group rather than the plain code. */
static int lut_axpy_u8_group(unsigned bits, unsigned m, const struct kvp_row_runs *rows, const int8_t *lut,
			     float unit, unsigned g, const float *w, size_t w_stride, float *acc, size_t acc_stride,
			     const struct kvp_ahead *ahead)
{
	(void)bits, (void)m, (void)rows, (void)lut, (void)unit, (void)g, (void)w, (void)w_stride, (void)acc;
	(void)acc_stride, (void)ahead;
	return 0;
}
#endif

#define SCALED_SCALARS 2048u /* rows x scalars per row that axpy_i16_scaled's loops convert at once */

/* Every row's 2 * ng scalars (z then s) as floats, by scalar: scalar e of row i at y[e * n + i], so that a
 * scalar of consecutive rows is a vector. */
static void row_scalars(unsigned n, unsigned ng, const uint8_t *rows, size_t stride, float *y)
{
	float one[SCALED_CHUNK];

	for (unsigned i = 0; i < n; i++) {
		f16_run(2 * ng, rows + i * stride, one);
		for (unsigned e = 0; e < 2 * ng; e++)
			y[(size_t)e * n + i] = one[e];
	}
}

/* Head h's weights w[0..n) (wz: the z scalars of group c, ws: its s scalars): the float sum of w_i z(i, c) in
 * kvp_fold16's order added to *acc, and the largest |w_i s(i, c)| into *top (the plain code's maximum, taken
 * in any order). */
static void scaled_group_pass(unsigned n, const float *w, const float *wz, const float *ws, float *acc, float *top)
{
	const unsigned whole = n - n % 16;
	loops_f32v sums[LOOPS_SUMS], tops[LOOPS_SUMS];
	float p[16], t = *top;

	memset(sums, 0, sizeof sums), memset(tops, 0, sizeof tops);
	for (unsigned i = 0; i < whole; i += 16)
		for (unsigned v = 0; v < LOOPS_SUMS; v++) {
			const loops_f32v wv = f32v_at(w + i + v * LOOPS_LANES);

			tops[v] = max_abs_lanes(tops[v], wv * f32v_at(ws + i + v * LOOPS_LANES));
			sums[v] += wv * f32v_at(wz + i + v * LOOPS_LANES);
		}
	memcpy(p, sums, sizeof p);
	for (unsigned i = whole; i < n; i++) {
		const float u = w[i] * ws[i];

		t = fabsf(u) > t ? fabsf(u) : t;
		p[i % 16] += w[i] * wz[i];
	}
	*acc += kvp_fold16(p);
	*top = lanes_max(tops, t);
}

/* W(i, c) = kvp_nearest_even((w_i * s(i, c)) * inv), |W| <= 4095, for i < n (ws: the s scalars of group c) */
static void scaled_weights16(unsigned n, const float *w, const float *ws, float inv, int16_t *out)
{
	const unsigned whole = n - n % LOOPS_LANES;
	unsigned i = 0;

	for (; i < whole; i += LOOPS_LANES) {
		const loops_i32v x = nearest_lanes((f32v_at(w + i) * f32v_at(ws + i)) * inv);

		for (unsigned l = 0; l < LOOPS_LANES; l++)
			out[i + l] = (int16_t)x[l];
	}
	for (; i < n; i++)
		out[i] = (int16_t)kvp_nearest_even((w[i] * ws[i]) * inv);
}

/*
 * One pass of k <= 256 columns from column j0 (codes: the pass's first byte of row 0): sums[h][j] = sum_i
 * W(h, i, (j0 + j) / gsize) * code(i, j0 + j). Where a group covers whole runs of LOOPS_LANES bytes, those
 * bytes of a row are the vector lanes, a row's code t of each byte is taken by a shift, and four heads' sums
 * of those columns stay in registers over the rows (the heads past hn weigh 0); the columns past the last
 * whole run, and other group sizes, go a code at a time.
 */
static void scaled_pass4(unsigned bits, unsigned k, unsigned gsize, unsigned n, const uint8_t *codes, size_t stride,
			 unsigned j0, unsigned hn, const float *w, size_t w_stride, const float *s, const float *inv,
			 int32_t (*sums)[256])
{
	const unsigned per = 8 / bits, run = LOOPS_LANES * per, vec = gsize % run ? 0 : k / run * run;
	const int32_t mask = (int32_t)(1u << bits) - 1;
	int16_t wc[4][KVP_AXPY_I16_ROWS]; /* W(h, i, c) of the group in hand */
	unsigned in_hand = UINT32_MAX;

	memset(wc, 0, sizeof wc);
	for (unsigned jv = 0; jv < k; jv += jv < vec ? run : 1) {
		const unsigned c = (j0 + jv) / gsize;

		for (unsigned h = 0; c != in_hand && h < hn; h++)
			scaled_weights16(n, w + h * w_stride, s + (size_t)c * n, inv[h], wc[h]);
		in_hand = c;
		if (jv >= vec) { /* one column */
			for (unsigned h = 0; h < hn; h++) {
				int32_t sum = 0;

				for (unsigned i = 0; i < n; i++)
					sum += wc[h][i] * (int32_t)byte_code(codes + i * stride, jv, bits);
				sums[h][jv] = sum;
			}
			continue;
		}
		for (unsigned t = 0; t < per; t++) {
			loops_i32v a0 = { 0 }, a1 = { 0 }, a2 = { 0 }, a3 = { 0 };

			for (unsigned i = 0; i < n; i++) {
				const loops_i32v x = loops_bytes(codes + i * stride + jv / per) >> (int32_t)(t * bits) & mask;

				a0 += wc[0][i] * x, a1 += wc[1][i] * x, a2 += wc[2][i] * x, a3 += wc[3][i] * x;
			}
			for (unsigned l = 0; l < LOOPS_LANES; l++) {
				int32_t *at = &sums[0][jv + per * l + t];

				at[0] = a0[l], at[256] = a1[l], at[512] = a2[l], at[768] = a3[l];
			}
		}
	}
}

/* Heads [h0, h0 + hn), hn <= 4, of axpy_i16_scaled, the row scalars converted (sc, by scalar): each head's
 * group sums and step, then per pass of 256 columns the four heads' integer sums. */
static void scaled_axpy4(unsigned bits, unsigned m, unsigned gsize, unsigned n, const uint8_t *rows, size_t stride,
			 unsigned hn, const float *w, size_t w_stride, const float *sc, float *acc, size_t acc_stride)
{
	const unsigned ng = (m + gsize - 1) / gsize, per = 8 / bits;
	float inv[4], f[4];
	int32_t sums[4][256];

	for (unsigned h = 0; h < hn; h++) {
		float top = 0.0f;

		for (unsigned c = 0; c < ng; c++)
			scaled_group_pass(n, w + h * w_stride, sc + (size_t)c * n, sc + (size_t)(ng + c) * n,
					  &acc[h * acc_stride + m + c], &top);
		inv[h] = kvp_weight_inv(top);
		f[h] = top / KVP_WEIGHT_MAX;
	}
	for (unsigned j0 = 0; j0 < m; j0 += 256) {
		const unsigned k = m - j0 < 256 ? m - j0 : 256;

		scaled_pass4(bits, k, gsize, n, rows + 4 * (size_t)ng + j0 / per, stride, j0, hn, w, w_stride,
			     sc + (size_t)ng * n, inv, sums);
		for (unsigned h = 0; h < hn; h++)
			for (unsigned j = 0; j < k; j++)
				acc[h * acc_stride + j0 + j] += f[h] * (float)sums[h][j];
	}
}

static void loops_axpy_i16_scaled(unsigned bits, unsigned m, unsigned gsize, unsigned n, const uint8_t *rows,
				  size_t stride, unsigned g, const float *w, size_t w_stride, float *acc, size_t acc_stride)
{
	const unsigned ng = (m + gsize - 1) / gsize;
	float sc[SCALED_SCALARS];

	if (8 % bits || 2 * ng > SCALED_CHUNK || (size_t)n * 2 * ng > SCALED_SCALARS) {
		kvp_axpy_i16_scaled_plain(bits, m, gsize, n, rows, stride, g, w, w_stride, acc, acc_stride);
		return;
	}
	row_scalars(n, ng, rows, stride, sc);
	for (unsigned h0 = 0; h0 < g; h0 += 4)
		scaled_axpy4(bits, m, gsize, n, rows, stride, g - h0 < 4 ? g - h0 : 4, w + h0 * w_stride, w_stride, sc,
			     acc + h0 * acc_stride, acc_stride);
}

#ifdef KVP_ISA_AXPY_I16_SCALED
#define LOOPS_AXPY_I16_SCALED axpy_i16_scaled
#else
#define LOOPS_AXPY_I16_SCALED loops_axpy_i16_scaled
#endif

/*
 * The table's entries but its name, with dot_i8 as lut_dot_i8_group, lut_axpy_u8 as lut_axpy_u8_group,
 * dot_i8_scaled_fn as dot_i8_scaled and axpy_u8_scaled_fn as axpy_u8_scaled: a file can build a second table
 * that differs from the first only there (neon.c: neon-dotprod, avx2.c: avx2-vnni, whose integer kernels
 * need an extension).
 */
#ifndef KVP_ISA_SPARK_CHOOSE
static double spark_choose(unsigned d, unsigned kept, const int32_t *key, const float *x, uint8_t *mask,
			   uint8_t *signs, float *y)
{
	return kvp_spark_choose_plain(d, kept, key, x, mask, signs, y);
}
#endif

#if defined(KVP_ISA_MASK_LEVELS)
/*
 * mask_codes from the file's two steps, for d a multiple of 64 up to 256 and magnitudes of at most 2 bits
 * (the plain code otherwise). Rows go in batches: every row's levels, then every row's codes, so that a load
 * of levels reads stores made rows before (a 16-byte load of bytes just stored a few at a time waits for
 * them to retire: a sixth of the time on AVX2 when each row's codes followed its own levels).
 */
#define LOOPS_MASK_BATCH 16u

static void mask_codes(const struct kvp_mask_rows *rows, unsigned n, const uint8_t *base, uint8_t *codes)
{
	const struct kvp_mask_rows rs = *rows; /* the stores to codes could alias *rows */
	/* the loads pass a row's last level: defined bytes, never used */
	uint8_t lv[LOOPS_MASK_BATCH][256 + 16] = { { 0 } };
	unsigned sound[LOOPS_MASK_BATCH];

	if (rs.mb > 2 || rs.d % 64 || rs.d > 256) {
		kvp_mask_codes_plain(rows, n, base, codes);
		return;
	}
	for (unsigned i0 = 0; i0 < n; i0 += LOOPS_MASK_BATCH) {
		const unsigned bn = n - i0 < LOOPS_MASK_BATCH ? n - i0 : LOOPS_MASK_BATCH;

		for (unsigned t = 0; t < bn; t++) {
			const uint8_t *row = base + (size_t)(i0 + t) * rs.stride;

			sound[t] = kvp_mask_count(rs.d, row + rs.mask_at) == rs.kept;
			if (sound[t])
				mask_levels(&rs, row + rs.mag_at, lv[t]);
		}
		for (unsigned t = 0; t < bn; t++) {
			const uint8_t *row = base + (size_t)(i0 + t) * rs.stride;
			uint8_t *out = codes + (size_t)(i0 + t) * (rs.d / 2);
			unsigned r = 0;

			if (!sound[t]) {
				memset(out, 0xff, rs.d / 2);
				continue;
			}
			for (unsigned j = 0; j < rs.d; j += 32) {
				uint32_t w, s;

				memcpy(&w, row + rs.mask_at + j / 8, sizeof w);
				memcpy(&s, row + rs.sign_at + j / 8, sizeof s);
				r += mask_codes32(w, s, lv[t] + r, out + j / 2);
			}
		}
	}
}

#undef LOOPS_MASK_BATCH
#elif !defined(KVP_ISA_MASK_CODES)
static void mask_codes(const struct kvp_mask_rows *rows, unsigned n, const uint8_t *base, uint8_t *codes)
{
	kvp_mask_codes_plain(rows, n, base, codes);
}
#endif

#define KVP_ISA_ENTRIES(dot_i8, lut_axpy_u8, dot_i8_scaled_fn, axpy_u8_scaled_fn) \
	.dot_f32 = dot_f32, \
	.dot_f16 = dot_f16, \
	.axpy_f32 = axpy_f32, \
	.axpy_f16 = axpy_f16, \
	.dot_f16_group = dot_f16_group, \
	.axpy_f16_group = axpy_f16_group, \
	.band_norms = band_norms, \
	.f32_to_f16 = f32_to_f16, \
	.f16_to_f32 = f16_to_f32, \
	.softmax_step = softmax_step, \
	.softmax_group = softmax_group, \
	.scale = scale, \
	.lut_dot = lut_dot, \
	.lut_axpy = lut_axpy, \
	.lut_dot_group = lut_dot_group, \
	.lut_axpy_group = lut_axpy_group, \
	.lut_dot_i8_group = (dot_i8), \
	.lut_axpy_i16_group = lut_axpy_i16_group, \
	.lut_axpy_u8_group = (lut_axpy_u8), \
	.dot_i8_scaled = (dot_i8_scaled_fn), \
	.axpy_i16_scaled = LOOPS_AXPY_I16_SCALED, \
	.axpy_u8_scaled = (axpy_u8_scaled_fn), \
	.fwht = fwht, \
	.sym_codes = sym_codes, \
	.sum_squares = sum_squares, \
	.mask_expand = mask_expand, \
	.spark_dot_i16_group = LOOPS_SPARK_DOT_I16_GROUP, \
	.spark_choose = spark_choose, \
	.mask_codes = mask_codes,

const struct kvp_kernels KVP_ISA_TABLE = {
	.name = KVP_ISA_NAME,
	KVP_ISA_ENTRIES(lut_dot_i8_group, lut_axpy_u8_group, dot_i8_scaled_groups, axpy_u8_scaled)
};
