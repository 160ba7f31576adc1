/* The configuration grammar: what parses, what does not, and what the messages say. */
#include <criterion/criterion.h>
#include <string.h>

#include "base/base.h"

static kvp_status parse(struct kvp_args *a, const char *text)
{
	return kvp_args_parse(a, "test", text, strlen(text));
}

Test(config, splits_items_at_top_level_commas_only)
{
	struct kvp_args a;
	const char *v;
	unsigned n;
	cr_assert_eq(parse(&a, "quota=1GiB, policy=triattention(budget=2048,every=128),k=spark(keep=0.75)|turboquant(bits=3)"),
		     KVP_OK);
	cr_assert_eq(a.n, 3);
	kvp_args_text(&a, "policy", &v, &n);
	cr_assert_eq(n, strlen("triattention(budget=2048,every=128)"));
	cr_assert(!memcmp(v, "triattention(budget=2048,every=128)", n));
	kvp_args_text(&a, "k", &v, &n);
	cr_assert(!memcmp(v, "spark(keep=0.75)|turboquant(bits=3)", n));
}

Test(config, empty_and_blank_specs_are_empty_lists)
{
	struct kvp_args a;
	cr_assert_eq(parse(&a, ""), KVP_OK);
	cr_assert_eq(a.n, 0);
	cr_assert_eq(parse(&a, "  \n "), KVP_OK);
	cr_assert_eq(a.n, 0);
	cr_assert_eq(kvp_args_parse(&a, "test", NULL, 0), KVP_OK);
}

Test(config, sizes_take_binary_units)
{
	struct kvp_args a;
	uint64_t x = 0, y = 0, z = 0, w = 0;
	cr_assert_eq(parse(&a, "a=4GiB,b=512MiB,c=100,d=3K"), KVP_OK);
	cr_assert_eq(kvp_args_size(&a, "a", &x), KVP_OK);
	cr_assert_eq(kvp_args_size(&a, "b", &y), KVP_OK);
	cr_assert_eq(kvp_args_size(&a, "c", &z), KVP_OK);
	cr_assert_eq(kvp_args_size(&a, "d", &w), KVP_OK);
	cr_assert_eq(x, 4ull << 30);
	cr_assert_eq(y, 512ull << 20);
	cr_assert_eq(z, 100);
	cr_assert_eq(w, 3072);
}

Test(config, bad_size_unit_is_named)
{
	struct kvp_args a;
	uint64_t x = 7;
	cr_assert_eq(parse(&a, "mem=4GB"), KVP_OK);
	cr_assert_eq(kvp_args_size(&a, "mem", &x), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "mem=4GB"), "%s", kvp_last_error());
	cr_assert_eq(x, 7, "a failed lookup must not change the value");
}

Test(config, numbers_out_of_range_quote_the_text)
{
	struct kvp_args a;
	uint32_t b = 64;
	cr_assert_eq(parse(&a, "block=0"), KVP_OK);
	cr_assert_eq(kvp_args_u32(&a, "block", 1, 4096, &b), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "block=0 is outside 1..4096"), "%s", kvp_last_error());
	cr_assert_eq(parse(&a, "block=12x"), KVP_OK);
	cr_assert_eq(kvp_args_u32(&a, "block", 1, 4096, &b), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "block=12x"), "%s", kvp_last_error());
	cr_assert_eq(parse(&a, "block=99999999999999999999999"), KVP_OK);
	cr_assert_eq(kvp_args_u32(&a, "block", 1, 4096, &b), KVP_EINVAL);
	cr_assert_eq(b, 64);
}

Test(config, doubles_parse_and_reject_garbage)
{
	struct kvp_args a;
	double r = 0;
	cr_assert_eq(parse(&a, "ratio=0.25"), KVP_OK);
	cr_assert_eq(kvp_args_double(&a, "ratio", 0, 1, &r), KVP_OK);
	cr_assert_float_eq(r, 0.25, 1e-12);
	cr_assert_eq(parse(&a, "ratio=nan"), KVP_OK);
	cr_assert_eq(kvp_args_double(&a, "ratio", 0, 1, &r), KVP_EINVAL);
	cr_assert_eq(parse(&a, "ratio=1.5"), KVP_OK);
	cr_assert_eq(kvp_args_double(&a, "ratio", 0, 1, &r), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "ratio=1.5"), "%s", kvp_last_error());
}

Test(config, choices_list_the_alternatives)
{
	struct kvp_args a;
	static const char *const stores[] = { "fp32", "fp16", NULL };
	unsigned i = 9;
	cr_assert_eq(parse(&a, "store=fp16"), KVP_OK);
	cr_assert_eq(kvp_args_choice(&a, "store", stores, &i), KVP_OK);
	cr_assert_eq(i, 1);
	cr_assert_eq(parse(&a, "store=int8"), KVP_OK);
	cr_assert_eq(kvp_args_choice(&a, "store", stores, &i), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "store=int8 is not one of fp32|fp16"), "%s", kvp_last_error());
}

Test(config, unknown_keys_are_errors_after_lookups)
{
	struct kvp_args a;
	uint32_t b = 0;
	cr_assert_eq(parse(&a, "block=64,blcok=32"), KVP_OK);
	cr_assert_eq(kvp_args_u32(&a, "block", 1, 4096, &b), KVP_OK);
	cr_assert_eq(kvp_args_finish(&a), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "unknown key 'blcok'"), "%s", kvp_last_error());
}

Test(config, malformed_items_are_rejected)
{
	struct kvp_args a;
	cr_assert_eq(parse(&a, "block"), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "'block' is not key=value"), "%s", kvp_last_error());
	cr_assert_eq(parse(&a, "a=1,,b=2"), KVP_EINVAL);
	cr_assert_eq(parse(&a, "=3"), KVP_EINVAL);
	cr_assert_eq(parse(&a, "a=1,a=2"), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "'a' given twice"), "%s", kvp_last_error());
	cr_assert_eq(parse(&a, "policy=h2o(heavy=0.1"), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "unclosed"), "%s", kvp_last_error());
	cr_assert_eq(parse(&a, "policy=h2o)"), KVP_EINVAL);
	cr_assert_eq(a.n, 0, "a failed parse leaves no items");
}

Test(config, call_values_split_into_name_and_inner_list)
{
	const char *name, *inner;
	unsigned nl, il;
	const char *v = "triattention(budget=2048,stats=online)";
	cr_assert_eq(kvp_call_split(v, (unsigned)strlen(v), &name, &nl, &inner, &il), KVP_OK);
	cr_assert(kvp_name_is(name, nl, "triattention"));
	cr_assert_eq(il, strlen("budget=2048,stats=online"));
	cr_assert_eq(kvp_call_split("fp16", 4, &name, &nl, &inner, &il), KVP_OK);
	cr_assert(kvp_name_is(name, nl, "fp16"));
	cr_assert_eq(il, 0);
	cr_assert_eq(kvp_call_split("(bits=3)", 8, &name, &nl, &inner, &il), KVP_EINVAL);
	cr_assert_eq(kvp_call_split("tq(bits=3", 9, &name, &nl, &inner, &il), KVP_EINVAL);
	cr_assert_eq(kvp_call_split("t q(bits=3)", 11, &name, &nl, &inner, &il), KVP_EINVAL);
}

Test(config, half_precision_rounds_to_nearest_even)
{
	cr_assert_eq(kvp_f32_to_f16(1.0f), 0x3c00);
	cr_assert_eq(kvp_f32_to_f16(-2.0f), 0xc000);
	cr_assert_eq(kvp_f32_to_f16(65504.0f), 0x7bff);
	cr_assert_eq(kvp_f32_to_f16(65520.0f), 0x7c00, "halfway above the largest half rounds to infinity");
	cr_assert_eq(kvp_f32_to_f16(1.0f + 0x1p-11f), 0x3c00, "a tie rounds to the even mantissa");
	cr_assert_eq(kvp_f32_to_f16(1.0f + 3 * 0x1p-11f), 0x3c02);
	cr_assert_eq(kvp_f32_to_f16(0x1p-24f), 0x0001, "the smallest subnormal survives");
	cr_assert_eq(kvp_f32_to_f16(0x1p-26f), 0x0000);
	cr_assert_float_eq(kvp_f16_to_f32(0x0001), 0x1p-24f, 0);
	cr_assert_float_eq(kvp_f16_to_f32(0x3555), 0.33325195f, 0);
}

/* What a ladder uses to give a codec its width: the key goes first, in place of the one it had. */
Test(config, put_sets_a_key_first_in_place_of_its_old_value)
{
	struct kvp_args a;
	uint32_t bits = 0, qjl = 0;

	cr_assert_eq(parse(&a, "qjl=1, bits=3"), KVP_OK);
	cr_assert_eq(kvp_args_put(&a, "bits", "2"), KVP_OK);
	cr_assert_eq(a.n, 2);
	cr_assert_eq(a.a[0].klen, 4);
	cr_assert(!memcmp(a.a[0].key, "bits", 4));
	cr_assert(!memcmp(a.a[1].key, "qjl", 3));
	cr_assert_eq(kvp_args_u32(&a, "bits", 1, 8, &bits), KVP_OK);
	cr_assert_eq(kvp_args_u32(&a, "qjl", 0, 1, &qjl), KVP_OK);
	cr_assert_eq(bits, 2);
	cr_assert_eq(qjl, 1);
	cr_assert_eq(kvp_args_finish(&a), KVP_OK);
	cr_assert_eq(parse(&a, ""), KVP_OK);
	cr_assert_eq(kvp_args_put(&a, "bits", "4"), KVP_OK);
	cr_assert_eq(a.n, 1);
	cr_assert_eq(kvp_args_finish(&a), KVP_EINVAL, "a put key is unread until someone reads it");
	cr_assert_eq(parse(&a, "a=1,b=1,c=1,d=1,e=1,f=1,g=1,h=1,i=1,j=1,k=1,l=1,m=1,n=1,o=1,p=1,q=1,r=1,s=1,t=1,"
			       "u=1,v=1,w=1,x=1,y=1,z=1,aa=1,ab=1,ac=1,ad=1,ae=1,af=1"), KVP_OK);
	cr_assert_eq(a.n, KVP_ARGS_MAX);
	cr_assert_eq(kvp_args_put(&a, "bits", "2"), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "bits=2"), "%s", kvp_last_error());
	cr_assert_eq(kvp_args_put(&a, "af", "2"), KVP_OK, "replacing needs no room");
	cr_assert_eq(a.n, KVP_ARGS_MAX);
}
