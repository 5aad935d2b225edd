/*
 * Host-side unit test of the inmate library's formatter and command-line
 * parser: lib/format.c and lib/cmdline.c are compiled for the host with
 * their functions renamed (jh_*), and every printf case is checked against
 * the host C library's snprintf for the same format and arguments.
 * Prints one line per failure and a final "N passed, N failed" line;
 * exits non-zero on any failure.
 */
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

int jh_vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
long jh_cmdline_parse_int_in(const char *line, const char *param, long def);
bool jh_cmdline_parse_bool_in(const char *line, const char *param, bool def);
const char *jh_cmdline_parse_str_in(const char *line, const char *param,
				    char *buf, size_t size, const char *def);

static int passed, failed;

static void check_format(const char *fmt, ...)
{
	char want[256], got[256];
	va_list ap, ap2;
	int n_want, n_got;

	va_start(ap, fmt);
	va_copy(ap2, ap);
	n_want = vsnprintf(want, sizeof(want), fmt, ap);
	n_got = jh_vsnprintf(got, sizeof(got), fmt, ap2);
	va_end(ap2);
	va_end(ap);
	if (n_want == n_got && strcmp(want, got) == 0) {
		passed++;
		return;
	}
	failed++;
	printf("FAIL format \"%s\": got \"%s\" (%d), want \"%s\" (%d)\n",
	       fmt, got, n_got, want, n_want);
}

static int jh_snprintf(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = jh_vsnprintf(buf, size, fmt, ap);
	va_end(ap);
	return n;
}

static void check(bool ok, const char *what)
{
	if (ok) {
		passed++;
		return;
	}
	failed++;
	printf("FAIL %s\n", what);
}

int main(void)
{
	char buf[64], guard[8];
	const char *line;

	check_format("plain text");
	check_format("%d %d %d", 0, -1, 2147483647);
	check_format("%d", -2147483647 - 1);
	check_format("%i|%u|%x|%X", 42, 4294967295u, 0xdeadbeefu, 0xabcu);
	check_format("%ld %lu %lx", -9223372036854775807L - 1,
		     18446744073709551615UL, 0x0123456789abcdefUL);
	check_format("[%5d] [%-5d] [%05d] [%05d]", 42, 42, 42, -42);
	check_format("[%6ld] [%06lx] [%-8x] [%2d]", -123456L, 0xfffUL, 0x1fu,
		     12345);
	check_format("%s|%10s|%-10s|%c|%3c", "abc", "right", "left", 'z', 'y');
	check_format("%p %p", (void *)0x101ff8, (void *)0xfee00000UL);
	check_format("%016lx %08x %02x:%02x.%x", 0x3a000000UL, 0x1234u, 1u,
		     0x1bu, 0u);
	check_format("%lu.%03lu MHz", 2445UL, 62UL);
	check_format("100%% done");
	check_format("%zu", (size_t)12345);

	/* truncation: the full length is returned, the buffer stays NUL-ended */
	memset(guard, 'G', sizeof(guard));
	check(jh_snprintf(buf, 6, "%s", "truncated") == 9 &&
	      strcmp(buf, "trunc") == 0, "truncation to 6 bytes");
	check(jh_snprintf(buf, 0, "abc") == 3, "size 0 returns the length");
	check(memcmp(guard, "GGGGGGGG", 8) == 0, "guard untouched");

	line = "con-base=0x2f8 count=10 neg=-5 flag empty= yes=true no=false "
	       "one=1 zero=0 name=edu bad=12x hex=0XfF";
	check(jh_cmdline_parse_int_in(line, "con-base", 0) == 0x2f8, "hex int");
	check(jh_cmdline_parse_int_in(line, "count", 0) == 10, "decimal int");
	check(jh_cmdline_parse_int_in(line, "neg", 0) == -5, "negative int");
	check(jh_cmdline_parse_int_in(line, "hex", 0) == 255, "0X prefix");
	check(jh_cmdline_parse_int_in(line, "bad", 7) == 7, "malformed int");
	check(jh_cmdline_parse_int_in(line, "missing", 99) == 99,
	      "absent int");
	check(jh_cmdline_parse_int_in(line, "con", 3) == 3,
	      "key prefix does not match");
	check(jh_cmdline_parse_bool_in(line, "flag", false), "bare key");
	check(jh_cmdline_parse_bool_in(line, "empty", false), "empty value");
	check(jh_cmdline_parse_bool_in(line, "yes", false), "true");
	check(!jh_cmdline_parse_bool_in(line, "no", true), "false");
	check(jh_cmdline_parse_bool_in(line, "one", false), "1");
	check(!jh_cmdline_parse_bool_in(line, "zero", true), "0");
	check(jh_cmdline_parse_bool_in(line, "name", true), "junk keeps default");
	check(!jh_cmdline_parse_bool_in(line, "absent", false), "absent bool");
	check(strcmp(jh_cmdline_parse_str_in(line, "name", buf, sizeof(buf),
					     "x"), "edu") == 0, "string");
	check(strcmp(jh_cmdline_parse_str_in(line, "nope", buf, sizeof(buf),
					     "dflt"), "dflt") == 0,
	      "string default");
	check(jh_cmdline_parse_str_in(line, "nope", buf, sizeof(buf), NULL) ==
	      NULL, "string absent without default");
	check(strcmp(jh_cmdline_parse_str_in(line, "con-base", buf, 4, NULL),
		     "0x2") == 0, "string truncation");
	check(jh_cmdline_parse_int_in("  count=3  ", "count", 0) == 3,
	      "extra spaces");
	check(jh_cmdline_parse_int_in("", "count", 4) == 4, "empty line");
	check(jh_cmdline_parse_int_in("a=1 a=2", "a", 0) == 1,
	      "first occurrence wins");

	printf("%d passed, %d failed\n", passed, failed);
	return failed != 0;
}
