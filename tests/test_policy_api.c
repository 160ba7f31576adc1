/* The public policy calls: the plugin table's new member, NULL handles and bad arguments. */
#include <criterion/criterion.h>

#include "policy_fixture.h"

Test(policy_api, the_plugin_table_serves_observe_from_minor_1)
{
	const kvp_plugin_v1 *api = kvp_plugin(KVP_ABI_MAJOR);
	kvp_shape s = fixture_shape(1, 2, 1, 4, 1e4f, KVP_ROPE_HALF);
	kvp_policy *p = NULL;
	int32_t pos[2] = { 0, 1 };
	float w[4] = { 0.25f, 0.75f, 0.5f, 0.5f }, k[2][4] = { { 0 } }, sc[2];

	cr_assert_not_null(api);
	cr_assert_geq(api->abi_minor, 1);
	cr_assert_geq(api->size, offsetof(kvp_plugin_v1, policy_observe) + sizeof api->policy_observe);
	cr_assert_eq(api->policy_open("h2o", &s, &p), KVP_OK);
	cr_assert_eq(api->policy_observe(p, 0, 0, 2, NULL, 2, pos, w), KVP_OK);
	cr_assert_eq(api->policy_score(p, 0, 0, 3, 2, pos, &k[0][0], sc), KVP_OK);
	cr_assert_float_eq(sc[1], 1.25f, 1e-7);
	api->policy_close(p);
}

Test(policy_api, null_and_out_of_range_arguments_fail_with_a_message)
{
	kvp_shape s = fixture_shape(2, 2, 1, 4, 1e4f, KVP_ROPE_HALF);
	kvp_policy *p = NULL;
	int32_t pos[2] = { 3, 3 };
	float k[2][4] = { { 0 } }, sc[2];

	cr_assert_eq(kvp_policy_open(NULL, &s, &p), KVP_EINVAL);
	cr_assert_eq(kvp_policy_open("streaming", NULL, &p), KVP_EINVAL);
	cr_assert_eq(kvp_policy_open("streaming", &s, NULL), KVP_EINVAL);
	cr_assert_eq(kvp_policy_score(NULL, 0, 0, 5, 2, pos, &k[0][0], sc), KVP_EINVAL);
	cr_assert_eq(kvp_policy_observe(NULL, 0, 0, 5, NULL, 0, NULL, NULL), KVP_EINVAL);
	kvp_policy_close(NULL);
	cr_assert_eq(kvp_policy_open("streaming(window=8)", &s, &p), KVP_OK);
	cr_assert_eq(kvp_policy_score(p, 2, 0, 5, 2, pos, &k[0][0], sc), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "layer 2"), "%s", kvp_last_error());
	cr_assert_eq(kvp_policy_score(p, 0, 1, 5, 2, pos, &k[0][0], sc), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "KV head 1"), "%s", kvp_last_error());
	cr_assert_eq(kvp_policy_score(p, 0, 0, 5, 2, pos, &k[0][0], sc), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "not increasing"), "%s", kvp_last_error());
	cr_assert_eq(kvp_policy_score(p, 0, 0, 5, 2, pos, NULL, sc), KVP_EINVAL);
	cr_assert_eq(kvp_policy_score(p, 0, 0, 5, 0, NULL, NULL, NULL), KVP_OK, "nothing to score is fine");
	cr_assert_eq(kvp_policy_observe(p, 0, 0, -1, NULL, 0, NULL, NULL), KVP_EINVAL);
	kvp_policy_close(p);
	s.head_dim = 5;
	cr_assert_eq(kvp_policy_open("streaming", &s, &p), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "head_dim=5"), "%s", kvp_last_error());
	s.head_dim = 4, s.rope_theta = NAN;
	cr_assert_eq(kvp_policy_open("streaming", &s, &p), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "rope_theta"), "%s", kvp_last_error());
	cr_assert_null(p);
}
