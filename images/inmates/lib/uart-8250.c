/*
 * 8250/16550 UART output (reference 5.4): wait for THRE (LSR bit 5), then
 * write THR. Port I/O, or MMIO with 1- or 4-byte register spacing (4-byte
 * spacing means 32-bit accesses).
 */
#include <inmate.h>
#include "console.h"

#define UART_THR	0
#define UART_DLL	0
#define UART_DLM	1
#define UART_IER	1
#define UART_LCR	3
#define UART_LSR	5
#define  UART_LCR_8N1	0x03
#define  UART_LCR_DLAB	0x80
#define  UART_LSR_THRE	0x20
#define  UART_LSR_TEMT	0x40

/* A UART that never becomes ready must not hang the inmate forever. */
#define UART_POLL_LIMIT	1000000

static void uart_write(const struct console_cfg *c, unsigned int reg, u8 v)
{
	if (!c->mmio)
		outb(v, c->base + reg);
	else if (c->regdist_4)
		mmio_write32((void *)(c->base + reg * 4), v);
	else
		mmio_write8((void *)(c->base + reg), v);
}

static u8 uart_read(const struct console_cfg *c, unsigned int reg)
{
	if (!c->mmio)
		return inb(c->base + reg);
	if (c->regdist_4)
		return mmio_read32((void *)(c->base + reg * 4));
	return mmio_read8((void *)(c->base + reg));
}

static void uart_wait(const struct console_cfg *c, u8 bits)
{
	unsigned int n;

	for (n = 0; n < UART_POLL_LIMIT; n++) {
		if ((uart_read(c, UART_LSR) & bits) == bits)
			return;
		cpu_relax();
	}
}

void uart_8250_init(const struct console_cfg *c)
{
	if (c->mmio)
		map_range(c->base, PAGE_SIZE, MAP_UNCACHED);
	/* shared with the hypervisor: let its output drain first */
	uart_wait(c, UART_LSR_TEMT);
	if (!c->divider)
		return;
	uart_write(c, UART_LCR, UART_LCR_DLAB);
	uart_write(c, UART_DLL, c->divider & 0xff);
	uart_write(c, UART_DLM, (c->divider >> 8) & 0xff);
	uart_write(c, UART_LCR, UART_LCR_8N1);
	uart_write(c, UART_IER, 0);
}

void uart_8250_putc(const struct console_cfg *c, char ch)
{
	uart_wait(c, UART_LSR_THRE);
	uart_write(c, UART_THR, ch);
}
