/* The public policy calls: the plugin table's new member, NULL handles and bad arguments; the registry's
 * specs parsed once and what policies say they offer. */
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

/* A host's keys, queries and weights must be finite: a NaN weight would stay in H2O's sums for good. The
 * refused observation records nothing (the scores afterwards are those of the accepted ones alone). */
Test(policy_api, non_finite_keys_queries_and_weights_are_refused_and_nothing_is_recorded)
{
	kvp_shape s = fixture_shape(1, 4, 2, 4, 1e4f, KVP_ROPE_HALF);
	kvp_policy *p = NULL;
	int32_t pos[3] = { 0, 1, 2 };
	float k[3][4] = { { 1, 0, 0, 0 }, { 0, 1, 0, 0 }, { 0, 0, 1, 0 } }, q[2][4] = { { 1, 1, 1, 1 }, { 1, 0, 0, 1 } };
	float w[2][3] = { { 0.5f, 0.25f, 0.25f }, { 0.2f, 0.3f, 0.5f } }, before[3], after[3];

	cr_assert_eq(kvp_policy_open("h2o(heavy=0.5,recent=0.25)", &s, &p), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_policy_observe(p, 0, 1, 3, &q[0][0], 3, pos, &w[0][0]), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_policy_score(p, 0, 1, 3, 3, pos, &k[0][0], before), KVP_OK, "%s", kvp_last_error());
	w[1][2] = NAN;
	cr_assert_eq(kvp_policy_observe(p, 0, 1, 3, &q[0][0], 3, pos, &w[0][0]), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "weights[1][2] is nan"), "%s", kvp_last_error());
	w[1][2] = 0.5f, q[1][3] = INFINITY;
	cr_assert_eq(kvp_policy_observe(p, 0, 1, 3, &q[0][0], 3, pos, &w[0][0]), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "q_post_rope[1][3] is inf"), "%s", kvp_last_error());
	cr_assert_eq(kvp_policy_score(p, 0, 1, 3, 3, pos, &k[0][0], after), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(memcmp(before, after, sizeof before), 0, "the refused observations recorded nothing");
	k[2][1] = -INFINITY;
	cr_assert_eq(kvp_policy_score(p, 0, 1, 3, 3, pos, &k[0][0], after), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "k_post_rope[2][1] is -inf"), "%s", kvp_last_error());
	kvp_policy_close(p);
}

/* Capabilities are in the ops rows and the plan: only TriAttention offers a coherence signal, its
 * select= sets the round scope, and the lists in messages come from the registry's table. */
Test(policy_api, policies_say_what_they_offer_in_their_ops_and_plan)
{
	static const struct {
		const char *spec;
		enum kvp_round_scope scope;
	} scopes[] = {
		{ "streaming", KVP_ROUND_STREAM },
		{ "h2o", KVP_ROUND_STREAM },
		{ "triattention(stats=online)", KVP_ROUND_HEAD },
		{ "triattention(stats=online,select=per_layer_head)", KVP_ROUND_STREAM },
		{ "triattention(stats=online,select=union)", KVP_ROUND_LAYER },
	};
	kvp_shape s = fixture_shape(2, 4, 2, 8, 1e4f, KVP_ROPE_HALF);
	char names[128];
	double c = -1;

	for (size_t i = 0; i < sizeof scopes / sizeof scopes[0]; i++) {
		kvp_policy *p = NULL;
		cr_assert_eq(kvp_policy_open(scopes[i].spec, &s, &p), KVP_OK, "%s: %s", scopes[i].spec, kvp_last_error());
		cr_assert_eq(p->plan.scope, scopes[i].scope, "%s", scopes[i].spec);
		cr_assert_eq(p->ops->coherence != NULL, p->ops == &kvp_policy_triattention, "%s", scopes[i].spec);
		if (p->ops->coherence) {
			cr_assert_eq(kvp_policy_coherence(p, 1, 1, &c), KVP_OK, "%s", kvp_last_error());
			cr_assert_float_eq(c, 0.0, 0, "no query seen yet: no coherence");
			cr_assert_eq(kvp_policy_coherence(p, 2, 0, &c), KVP_EINVAL, "layer 2 is outside the shape");
		} else {
			cr_assert_eq(kvp_policy_coherence(p, 0, 0, &c), KVP_EINVAL);
			cr_assert(strstr(kvp_last_error(), p->ops->name) && strstr(kvp_last_error(), "triattention"), "%s",
				  kvp_last_error());
		}
		kvp_policy_close(p);
	}
	kvp_policy_names(1, names, sizeof names);
	cr_assert_str_eq(names, "triattention");
	kvp_policy_names(0, names, sizeof names);
	cr_assert_str_eq(names, "streaming, h2o, triattention");
}

/* A spec is parsed once and opened for many shapes; parse reads no file and checks only names and
 * syntax, prepare loads the statistics once, and check skips the probe shape when something was loaded
 * (a file made for one model would not fit it). */
Test(policy_api, a_parsed_spec_opens_for_every_sequence_without_parsing_again)
{
	const char *path = fixture_path("spec.kvtria");
	kvp_shape s = fixture_shape(1, 2, 1, 8, 1e4f, KVP_ROPE_HALF);
	struct kvp_tria_stats st;
	struct kvp_policy_spec *spec;
	struct kvp_policy *a = NULL, *b = NULL;
	char text[512];

	cr_assert_eq(kvp_policy_spec_parse("lru(size=3)", 11, &spec), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "(known: streaming, h2o, triattention)"), "%s", kvp_last_error());
	cr_assert_eq(kvp_policy_spec_parse("h2o(heavy=2)", 12, &spec), KVP_OK, "values are checked at open");
	cr_assert_eq(kvp_policy_spec_prepare(spec, &kvp_heap), KVP_OK);
	cr_assert_eq(kvp_policy_spec_check(spec), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "heavy=2"), "%s", kvp_last_error());
	kvp_policy_spec_free(spec);

	cr_assert_eq(kvp_tria_stats_alloc(&st, 1, 2, 8, KVP_ROPE_HALF, 1e4f), KVP_OK);
	cr_assert_eq(kvp_tria_stats_write(path, &st), KVP_OK, "%s", kvp_last_error());
	kvp_tria_stats_free(&st);
	snprintf(text, sizeof text, "triattention(budget=16,stats=%s)", path);
	cr_assert_eq(kvp_policy_spec_parse(text, strlen(text), &spec), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_policy_spec_ops(spec), &kvp_policy_triattention);
	cr_assert_eq(kvp_policy_spec_prepare(spec, &kvp_heap), KVP_OK, "%s", kvp_last_error());
	unlink(path); /* read once, at prepare */
	cr_assert_eq(kvp_policy_spec_check(spec), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_policy_spec_open(spec, &s, &kvp_heap, &a), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_policy_spec_open(spec, &s, &kvp_heap, &b), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_policy_budget(a, 100), 16);
	cr_assert_eq(kvp_policy_budget(b, 100), 16);
	kvp_policy_free(b);
	s.n_heads = 4;
	cr_assert_eq(kvp_policy_spec_open(spec, &s, &kvp_heap, &b), KVP_EINVAL, "the file is for 2 query heads");
	cr_assert_null(b);
	kvp_policy_free(a);
	kvp_policy_spec_free(spec);
}
