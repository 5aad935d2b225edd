/* Console selection shared by printk.c and uart-8250.c (library-internal). */
#ifndef JHLAB_CONSOLE_H
#define JHLAB_CONSOLE_H

enum console_kind { CONSOLE_NONE, CONSOLE_8250, CONSOLE_VIRTUAL };

struct console_cfg {
	enum console_kind kind;
	u64 base;
	u32 divider;
	bool mmio;
	bool regdist_4;
};

void uart_8250_init(const struct console_cfg *c);
void uart_8250_putc(const struct console_cfg *c, char ch);

#endif
