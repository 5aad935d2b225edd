/*
 * printf-style formatting for the inmates: %s %c %d %i %u %x %X %p %%, the
 * length modifier l (ll and z are taken as l), the flags '0' and '-', and
 * a field width. Anything else is copied through literally, so a bad
 * format shows up in the output instead of eating arguments.
 */
#include <inmate.h>

struct out {
	char *buf;
	size_t size;
	size_t len;
};

static void put(struct out *o, char c)
{
	if (o->len + 1 < o->size)
		o->buf[o->len] = c;
	o->len++;
}

static void pad(struct out *o, char c, int n)
{
	while (n-- > 0)
		put(o, c);
}

static void put_field(struct out *o, const char *prefix, const char *body,
		      int body_len, int width, bool left, bool zero)
{
	int prefix_len = strlen(prefix);
	int fill = width - prefix_len - body_len;

	if (left) {
		while (*prefix)
			put(o, *prefix++);
		while (body_len--)
			put(o, *body++);
		pad(o, ' ', fill);
		return;
	}
	if (!zero)
		pad(o, ' ', fill);
	while (*prefix)
		put(o, *prefix++);
	if (zero)
		pad(o, '0', fill);
	while (body_len--)
		put(o, *body++);
}

/* Digits of v in base 10 or 16, written backwards from end. */
static int digits(char *end, unsigned long v, unsigned int base, bool upper)
{
	const char *set = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	char *p = end;

	do {
		*--p = set[v % base];
		v /= base;
	} while (v);
	return end - p;
}

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
	struct out o = { .buf = buf, .size = size, .len = 0 };
	char num[24], *end = num + sizeof(num);
	const char *start, *s;
	bool left, zero, is_long, upper;
	unsigned long uv;
	long sv;
	int width, n;

	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			put(&o, *fmt);
			continue;
		}
		start = fmt++;
		left = zero = is_long = upper = false;
		width = 0;
		for (;; fmt++) {
			if (*fmt == '-')
				left = true;
			else if (*fmt == '0')
				zero = true;
			else
				break;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l' || *fmt == 'z') {
			is_long = true;
			fmt++;
		}
		if (left)
			zero = false;

		switch (*fmt) {
		case '%':
			put(&o, '%');
			break;
		case 'c':
			num[0] = (char)va_arg(ap, int);
			put_field(&o, "", num, 1, width, left, false);
			break;
		case 's':
			s = va_arg(ap, const char *);
			if (!s)
				s = "(null)";
			put_field(&o, "", s, strlen(s), width, left, false);
			break;
		case 'd':
		case 'i':
			sv = is_long ? va_arg(ap, long) : va_arg(ap, int);
			uv = sv < 0 ? -(unsigned long)sv : (unsigned long)sv;
			n = digits(end, uv, 10, false);
			put_field(&o, sv < 0 ? "-" : "", end - n, n, width,
				  left, zero);
			break;
		case 'u':
			uv = is_long ? va_arg(ap, unsigned long) :
				va_arg(ap, unsigned int);
			n = digits(end, uv, 10, false);
			put_field(&o, "", end - n, n, width, left, zero);
			break;
		case 'X':
			upper = true;
			/* fall through */
		case 'x':
			uv = is_long ? va_arg(ap, unsigned long) :
				va_arg(ap, unsigned int);
			n = digits(end, uv, 16, upper);
			put_field(&o, "", end - n, n, width, left, zero);
			break;
		case 'p':
			uv = (unsigned long)va_arg(ap, void *);
			n = digits(end, uv, 16, false);
			put_field(&o, "0x", end - n, n, width, left, zero);
			break;
		default:
			/* unknown conversion: show it as written */
			for (s = start; s <= fmt && *s; s++)
				put(&o, *s);
			if (!*fmt)
				fmt--;
			break;
		}
	}
	if (size)
		buf[o.len < size ? o.len : size - 1] = 0;
	return o.len;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf, size, fmt, ap);
	va_end(ap);
	return n;
}
