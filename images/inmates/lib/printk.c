/*
 * printk (reference 5.4). The console is chosen on first use:
 *   - the debug-putc hypercall when the comm region permits it and
 *     con-virtual is given (default: the comm region's PUTC_ACTIVE flag);
 *   - else an 8250 UART: con-type/con-base/con-divider/con-is-mmio/
 *     con-regdist-1 from the command line, defaulting to the comm region's
 *     console (type, address, divider, flags); a con-base on the command
 *     line implies con-type=8250;
 *   - else nothing.
 * A lock keeps lines of different CPUs apart; a CPU that already holds it
 * (printk from an interrupt handler) does not wait for itself. Cells that
 * print on the same UART can keep their lines apart too: console_share_lock()
 * names a word in memory they share, taken around every printk (with a
 * bounded wait, so a peer that died holding it delays only one line).
 */
#include <inmate.h>
#include "console.h"

static struct console_cfg con;
static bool con_ready;
static volatile u32 print_lock;
static volatile u32 print_owner = 0xffffffff;
static volatile u32 *shared_lock;

/* longest wait for the shared lock, then it is taken over */
#define SHARED_LOCK_WAIT_NS	(2000 * NS_PER_MSEC)
/* spins between two looks at the clock (a PM timer read may exit) */
#define SHARED_LOCK_SPINS	1024
/* without a PM timer: spins in all */
#define SHARED_LOCK_MAX_SPINS	(1UL << 26)

static void console_init(void)
{
	const struct jailhouse_console *cc = &comm_region->console;
	u32 flags = comm_region->flags;
	char type[8];
	bool is_8250;

	con_ready = true;
	if ((flags & JAILHOUSE_COMM_FLAG_DBG_PUTC_PERMITTED) &&
	    cmdline_parse_bool("con-virtual",
			       flags & JAILHOUSE_COMM_FLAG_DBG_PUTC_ACTIVE)) {
		con.kind = CONSOLE_VIRTUAL;
		return;
	}

	/* an explicit con-base alone also means an 8250 */
	con.base = cmdline_parse_int("con-base", -1);
	cmdline_parse_str("con-type", type, sizeof(type),
			  cc->type == JAILHOUSE_CON_TYPE_8250 ||
			  con.base != (u64)-1 ? "8250" : "none");
	is_8250 = strcmp(type, "8250") == 0;
	if (con.base == (u64)-1)
		con.base = cc->address;
	con.divider = cmdline_parse_int("con-divider", cc->divider);
	con.mmio = cmdline_parse_bool("con-is-mmio",
				      cc->flags & JAILHOUSE_CON_ACCESS_MMIO);
	con.regdist_4 = !cmdline_parse_bool("con-regdist-1",
				!(cc->flags & JAILHOUSE_CON_REGDIST_4));
	if (!is_8250 || !con.base)
		return;
	con.kind = CONSOLE_8250;
	uart_8250_init(&con);
}

void console_putc(char c)
{
	if (!con_ready)
		console_init();
	switch (con.kind) {
	case CONSOLE_VIRTUAL:
		hypercall(JAILHOUSE_HC_DEBUG_CONSOLE_PUTC, (u8)c, 0);
		break;
	case CONSOLE_8250:
		if (c == '\n')
			uart_8250_putc(&con, '\r');
		uart_8250_putc(&con, c);
		break;
	case CONSOLE_NONE:
		break;
	}
}

static bool print_lock_take(void)
{
	u32 me = cpu_apic_id();

	if (print_owner == me)
		return false;
	while (__atomic_exchange_n(&print_lock, 1, __ATOMIC_ACQUIRE))
		cpu_relax();
	print_owner = me;
	return true;
}

static void print_lock_release(void)
{
	print_owner = 0xffffffff;
	__atomic_store_n(&print_lock, 0, __ATOMIC_RELEASE);
}

void console_share_lock(volatile u32 *lock)
{
	shared_lock = lock;
}

static void shared_lock_take(volatile u32 *lock)
{
	bool clock = pm_timer_available();
	u64 start = clock ? pm_timer_read() : 0;
	unsigned long spins = 0;

	while (__atomic_exchange_n(lock, 1, __ATOMIC_ACQUIRE)) {
		cpu_relax();
		if (++spins % SHARED_LOCK_SPINS)
			continue;
		if (clock ? pm_timer_read() - start > SHARED_LOCK_WAIT_NS :
		    spins > SHARED_LOCK_MAX_SPINS)
			return;	/* the holder is gone: go ahead */
	}
}

static void shared_lock_release(volatile u32 *lock)
{
	__atomic_store_n(lock, 0, __ATOMIC_RELEASE);
}

void vprintk(const char *fmt, va_list ap)
{
	char buf[256];
	volatile u32 *shared;
	bool taken;
	int n, i;

	n = vsnprintf(buf, sizeof(buf), fmt, ap);
	if (n >= (int)sizeof(buf))
		n = sizeof(buf) - 1;
	taken = print_lock_take();
	shared = taken ? shared_lock : NULL;
	if (shared)
		shared_lock_take(shared);
	for (i = 0; i < n; i++)
		console_putc(buf[i]);
	if (shared)
		shared_lock_release(shared);
	if (taken)
		print_lock_release();
}

void printk(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vprintk(fmt, ap);
	va_end(ap);
}
