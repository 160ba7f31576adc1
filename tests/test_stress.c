/* The multi-thread stress (tests/stress.h) as a Criterion suite. */
#include <criterion/criterion.h>
#include <stdlib.h>

#include "stress.h"

Test(stress, threads_on_two_tenants_end_with_every_byte_and_slot_accounted_for)
{
	const char *tmp = getenv("TMPDIR");
	cr_assert_eq(stress_run(tmp && *tmp ? tmp : "/tmp"), 0, "see the FAIL lines above");
}
