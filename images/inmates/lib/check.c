/*
 * Probe checks: every check is one console line of its own, so that a test
 * can assert each one (and a failure names what failed and why).
 */
#include <inmate.h>

static unsigned int checks, failures;

bool check(const char *probe, const char *name, bool ok, const char *fmt, ...)
{
	char detail[160];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(detail, sizeof(detail), fmt, ap);
	va_end(ap);
	checks++;
	if (!ok)
		failures++;
	printk("%s: %s: %s (%s)\n", probe, name, ok ? "PASS" : "FAIL", detail);
	return ok;
}

bool check_summary(const char *probe)
{
	printk("%s: %u checks, %u failed: %s\n", probe, checks, failures,
	       failures ? "FAILED" : "PASSED");
	return failures == 0;
}
