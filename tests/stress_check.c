/* The multi-thread stress (tests/stress.h) without Criterion, which cannot start under ThreadSanitizer.
 * Ends with "N passed, M failed" like kernels_check, so tests/run.sh counts it. */
#include <stdlib.h>

#include "stress.h"

int main(void)
{
	const char *tmp = getenv("TMPDIR");
	unsigned failed = stress_run(tmp && *tmp ? tmp : "/tmp");
	printf("%u passed, %u failed\n", failed ? 0u : 1u, failed);
	return failed != 0;
}
