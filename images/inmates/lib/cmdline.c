/*
 * Command line (reference 5.3): a NUL-terminated string at 0x1000, loaded
 * with `jailhouse cell load NAME img.bin -s "..." -a 0x1000`. Tokens are
 * separated by spaces: `key=value` or a bare `key`. Integers take a 0x
 * prefix for hex, else decimal with an optional sign. Booleans: "true",
 * "1", an empty value or a bare key are true; "false" and "0" are false.
 * The first occurrence of a key counts; a malformed value gives the
 * default.
 */
#include <inmate.h>

/* The buffer at 0x1000 (the linker script adds a terminating NUL). */
char cmdline[CMDLINE_SIZE] __attribute__((section(".cmdline"), weak));

/* Finds key; returns its value (after '=', or at the end of a bare key),
 * sets *len to the value length; NULL if absent. */
static const char *find_param(const char *line, const char *key,
			      size_t *len)
{
	size_t key_len = strlen(key);
	const char *p = line, *val;

	while (*p) {
		while (*p == ' ')
			p++;
		if (!*p)
			break;
		if (strncmp(p, key, key_len) == 0 &&
		    (p[key_len] == '=' || p[key_len] == ' ' || !p[key_len])) {
			val = p + key_len;
			if (*val == '=')
				val++;
			*len = 0;
			while (val[*len] && val[*len] != ' ')
				(*len)++;
			return val;
		}
		while (*p && *p != ' ')
			p++;
	}
	return NULL;
}

static bool parse_long(const char *s, size_t len, long *out)
{
	unsigned long v = 0, base = 10, d;
	bool neg = false;
	size_t i = 0;

	if (i < len && (s[i] == '-' || s[i] == '+'))
		neg = s[i++] == '-';
	if (i + 1 < len && s[i] == '0' && (s[i + 1] == 'x' || s[i + 1] == 'X')) {
		base = 16;
		i += 2;
	}
	if (i == len)
		return false;
	for (; i < len; i++) {
		if (s[i] >= '0' && s[i] <= '9')
			d = s[i] - '0';
		else if (base == 16 && s[i] >= 'a' && s[i] <= 'f')
			d = s[i] - 'a' + 10;
		else if (base == 16 && s[i] >= 'A' && s[i] <= 'F')
			d = s[i] - 'A' + 10;
		else
			return false;
		v = v * base + d;
	}
	*out = neg ? -(long)v : (long)v;
	return true;
}

long cmdline_parse_int_in(const char *line, const char *param, long defval)
{
	size_t len;
	const char *val = find_param(line, param, &len);
	long v;

	if (val && parse_long(val, len, &v))
		return v;
	return defval;
}

bool cmdline_parse_bool_in(const char *line, const char *param, bool defval)
{
	size_t len;
	const char *val = find_param(line, param, &len);

	if (!val)
		return defval;
	if (len == 0 || (len == 4 && strncmp(val, "true", 4) == 0) ||
	    (len == 1 && val[0] == '1'))
		return true;
	if ((len == 5 && strncmp(val, "false", 5) == 0) ||
	    (len == 1 && val[0] == '0'))
		return false;
	return defval;
}

const char *cmdline_parse_str_in(const char *line, const char *param,
				 char *buf, size_t size, const char *defval)
{
	size_t len;
	const char *val = find_param(line, param, &len);

	if (!val)
		val = defval, len = defval ? strlen(defval) : 0;
	if (!val || !size)
		return val;
	if (len >= size)
		len = size - 1;
	memcpy(buf, val, len);
	buf[len] = 0;
	return buf;
}

long cmdline_parse_int(const char *param, long defval)
{
	return cmdline_parse_int_in(cmdline, param, defval);
}

bool cmdline_parse_bool(const char *param, bool defval)
{
	return cmdline_parse_bool_in(cmdline, param, defval);
}

const char *cmdline_parse_str(const char *param, char *buf, size_t size,
			      const char *defval)
{
	return cmdline_parse_str_in(cmdline, param, buf, size, defval);
}
