/* The multi-thread stress (tests/stress.h) without Criterion, which cannot start under ThreadSanitizer.
 * One test: it ends with "1 passed, 0 failed" or "0 passed, 1 failed", which tests/run.sh counts, after
 * the failed checks, named above it, are counted on a line of their own. */
#include <stdlib.h>

#include "stress.h"

int main(void)
{
	const char *tmp = getenv("TMPDIR");
	unsigned failed = stress_run(tmp && *tmp ? tmp : "/tmp");
	if (failed)
		printf("stress: %u failures (above)\n", failed);
	printf("%u passed, %u failed\n", failed ? 0u : 1u, failed ? 1u : 0u);
	return failed != 0;
}
