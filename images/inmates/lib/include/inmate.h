/*
 * jhlab inmate library: the interface a demo sees.
 *
 * The ABI facts (start state, image layout, comm region, message protocol,
 * hypercalls) follow shared/reference/jailhouse-x86.md sections 3 and 5, so
 * that an image built here also runs in a cell of a real Jailhouse.
 */
#ifndef JHLAB_INMATE_H
#define JHLAB_INMATE_H

#ifndef __ASSEMBLER__

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef signed char s8;
typedef short s16;
typedef int s32;
typedef long s64;
typedef unsigned long size_t;
typedef long ssize_t;
typedef _Bool bool;
typedef __builtin_va_list va_list;

#define true	1
#define false	0
#define NULL	((void *)0)

#define va_start(ap, last)	__builtin_va_start(ap, last)
#define va_arg(ap, type)	__builtin_va_arg(ap, type)
#define va_end(ap)		__builtin_va_end(ap)

#define ARRAY_SIZE(a)	(sizeof(a) / sizeof((a)[0]))
#define ALIGN_UP(x, a)	(((x) + (a) - 1) & ~((u64)(a) - 1))
#define barrier()	asm volatile("" : : : "memory")
#define cpu_relax()	asm volatile("pause" : : : "memory")
#define __noreturn	__attribute__((noreturn))
#define __printf(a, b)	__attribute__((format(printf, a, b)))
#define __weak		__attribute__((weak))

#define NS_PER_USEC	1000UL
#define NS_PER_MSEC	1000000UL
#define NS_PER_SEC	1000000000UL

/* ------------------------------------------------------------------ */
/* Memory layout (reference 5.2)                                       */

#define COMM_REGION_BASE	0x100000UL
#define TEST_DEVICE_BASE	0x101000UL
#define CMDLINE_ADDR		0x1000UL
#define CMDLINE_SIZE		256
#define PAGE_SIZE		0x1000UL
#define HUGE_PAGE_SIZE		0x200000UL
#define MAX_CPUS		16

/* ------------------------------------------------------------------ */
/* Comm region and messages (reference 3.2, 3.3)                       */

#define COMM_REGION_SIGNATURE		"JHCOMM"
#define COMM_REGION_ABI_REVISION	2

#define JAILHOUSE_CELL_RUNNING		0
#define JAILHOUSE_CELL_RUNNING_LOCKED	1
#define JAILHOUSE_CELL_SHUT_DOWN	2
#define JAILHOUSE_CELL_FAILED		3
#define JAILHOUSE_CELL_FAILED_COMM_REV	4

#define JAILHOUSE_MSG_NONE		0
#define JAILHOUSE_MSG_SHUTDOWN_REQUEST	1
#define JAILHOUSE_MSG_RECONFIG_COMPLETED 2

#define JAILHOUSE_MSG_UNKNOWN		1
#define JAILHOUSE_MSG_REQUEST_DENIED	2
#define JAILHOUSE_MSG_REQUEST_APPROVED	3
#define JAILHOUSE_MSG_RECEIVED		4

#define JAILHOUSE_COMM_FLAG_DBG_PUTC_PERMITTED	0x0001
#define JAILHOUSE_COMM_FLAG_DBG_PUTC_ACTIVE	0x0002

#define JAILHOUSE_CON_TYPE_NONE		0
#define JAILHOUSE_CON_TYPE_8250		2
#define JAILHOUSE_CON_ACCESS_MMIO	0x0001
#define JAILHOUSE_CON_REGDIST_4		0x0002

#define JAILHOUSE_HC_DEBUG_CONSOLE_PUTC	8

struct jailhouse_console {
	u64 address;
	u32 size;
	u16 type;
	u16 flags;
	u32 divider;
	u32 gate_nr;
	u64 clock_reg;
} __attribute__((packed));

struct jailhouse_comm_region {
	char signature[6];
	u16 revision;
	volatile u32 cell_state;
	volatile u32 msg_to_cell;
	volatile u32 reply_from_cell;
	u32 flags;
	struct jailhouse_console console;
	u64 pci_mmconfig_base;
	/* x86 part */
	u16 pm_timer_address;
	u16 num_cpus;
	u32 tsc_khz;
	u32 apic_khz;
} __attribute__((packed));

#define comm_region ((struct jailhouse_comm_region *)COMM_REGION_BASE)

/* Reply to the pending message: clear msg_to_cell, fence, write reply. */
void comm_reply(u32 reply);
/* Look at the comm region once. RECONFIG_COMPLETED is acknowledged with
 * RECEIVED, unknown messages with UNKNOWN; a SHUTDOWN_REQUEST is returned
 * to the caller unanswered. Returns the message seen (MSG_NONE if none). */
u32 comm_poll(void);
void comm_set_state(u32 state);
/* Wait for a shutdown request (waking up every 50 ms through the APIC
 * timer), answer other messages, approve the request, stop. */
void __noreturn comm_serve_until_shutdown(void);

/* ------------------------------------------------------------------ */
/* Port and memory-mapped I/O                                          */

static inline void outb(u8 v, u16 port)
{
	asm volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outw(u16 v, u16 port)
{
	asm volatile("outw %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outl(u32 v, u16 port)
{
	asm volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

static inline u8 inb(u16 port)
{
	u8 v;

	asm volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline u16 inw(u16 port)
{
	u16 v;

	asm volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline u32 inl(u16 port)
{
	u32 v;

	asm volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

/*
 * MMIO accessors. Each one is a single plain MOV (opcodes 0x88/0x89/
 * 0x8a/0x8b, with 0x66 or REX.W where needed) through a register, the only
 * instruction forms the hypervisor's MMIO decoder accepts (reference 4.5).
 * Never let the compiler pick the instruction for device memory.
 */
static inline u8 mmio_read8(const volatile void *addr)
{
	u8 v;

	asm volatile("movb (%1), %0" : "=q"(v) : "r"(addr) : "memory");
	return v;
}

static inline u16 mmio_read16(const volatile void *addr)
{
	u16 v;

	asm volatile("movw (%1), %0" : "=r"(v) : "r"(addr) : "memory");
	return v;
}

static inline u32 mmio_read32(const volatile void *addr)
{
	u32 v;

	asm volatile("movl (%1), %0" : "=r"(v) : "r"(addr) : "memory");
	return v;
}

static inline u64 mmio_read64(const volatile void *addr)
{
	u64 v;

	asm volatile("movq (%1), %0" : "=r"(v) : "r"(addr) : "memory");
	return v;
}

static inline void mmio_write8(volatile void *addr, u8 v)
{
	asm volatile("movb %0, (%1)" : : "q"(v), "r"(addr) : "memory");
}

static inline void mmio_write16(volatile void *addr, u16 v)
{
	asm volatile("movw %0, (%1)" : : "r"(v), "r"(addr) : "memory");
}

static inline void mmio_write32(volatile void *addr, u32 v)
{
	asm volatile("movl %0, (%1)" : : "r"(v), "r"(addr) : "memory");
}

static inline void mmio_write64(volatile void *addr, u64 v)
{
	asm volatile("movq %0, (%1)" : : "r"(v), "r"(addr) : "memory");
}

/* ------------------------------------------------------------------ */
/* CPU                                                                 */

#define MSR_X2APIC_BASE		0x800
#define X2APIC_ID		0x802
#define X2APIC_EOI		0x80b
#define X2APIC_SPIV		0x80f
#define X2APIC_ICR		0x830
#define X2APIC_LVTT		0x832
#define X2APIC_TMICT		0x838
#define X2APIC_TMCCT		0x839
#define X2APIC_TDCR		0x83e
#define MSR_IA32_TSC_DEADLINE	0x6e0
#define MSR_MTRR_DEF_TYPE	0x2ff

static inline u64 read_msr(u32 msr)
{
	u32 lo, hi;

	asm volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr) : "memory");
	return lo | ((u64)hi << 32);
}

static inline void write_msr(u32 msr, u64 v)
{
	asm volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32))
		     : "memory");
}

static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
	asm volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d)
		     : "a"(leaf), "c"(sub));
}

static inline u64 rdtsc(void)
{
	u32 lo, hi;

	asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return lo | ((u64)hi << 32);
}

static inline void enable_irqs(void)
{
	asm volatile("sti" : : : "memory");
}

static inline void disable_irqs(void)
{
	asm volatile("cli" : : : "memory");
}

/*
 * Interrupts off, returning RFLAGS as they were for irqs_restore(). A lock
 * that an interrupt handler may take as well is held with interrupts off:
 * otherwise an interrupt arriving while its own CPU holds the lock spins
 * in the handler forever (under KVM a pending interrupt is injected right
 * after the exit of a port access, i.e. inside such a lock, as a rule).
 */
static inline unsigned long irqs_save(void)
{
	unsigned long flags;

	asm volatile("pushf; pop %0; cli" : "=rm"(flags) : : "memory");
	return flags;
}

/* RFLAGS (the interrupt flag) as irqs_save() found them. */
static inline void irqs_restore(unsigned long flags)
{
	asm volatile("push %0; popf" : : "rm"(flags) : "memory", "cc");
}

/* Halt until the next interrupt. sti;hlt closes the wake-up race. */
static inline void wait_for_interrupt(void)
{
	asm volatile("sti; hlt; cli" : : : "memory");
}

static inline void mfence(void)
{
	asm volatile("mfence" : : : "memory");
}

void __noreturn stop(void);
u32 cpu_apic_id(void);
/* Index of this CPU in smp_cpu_ids (0 = the first CPU). */
unsigned int cpu_index(void);

/* ------------------------------------------------------------------ */
/* Hypercalls (reference 3.1)                                          */

long hypercall(unsigned long code, unsigned long arg1, unsigned long arg2);
bool cpu_vendor_amd(void);

/* ------------------------------------------------------------------ */
/* Strings and formatting                                              */

void *memset(void *s, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);

/* Formats into buf (always NUL-terminated when size > 0); returns the
 * length the full output would have. Subset: %s %c %d %i %u %x %X %p %%,
 * length modifier l, flags '0' and '-', field width. */
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...) __printf(3, 4);

void printk(const char *fmt, ...) __printf(1, 2);
void vprintk(const char *fmt, va_list ap);
/* Raw console output of one character ('\n' becomes "\r\n" on a UART). */
void console_putc(char c);
/* Another cell prints on the same console: from now on every printk also
 * holds *lock, a word in memory shared with that cell (0 = free), so that
 * lines of the two cells do not mix (waits 2 s at most, then prints). */
void console_share_lock(volatile u32 *lock);

/* ------------------------------------------------------------------ */
/* Command line (reference 5.3)                                        */

extern char cmdline[];
long cmdline_parse_int(const char *param, long defval);
bool cmdline_parse_bool(const char *param, bool defval);
/* Copies the value, or defval when the key is absent, into buf (NUL-
 * terminated, truncated to size) and returns buf; NULL when the key is
 * absent and defval is NULL. */
const char *cmdline_parse_str(const char *param, char *buf, size_t size,
			      const char *defval);

/* The same parsers on an arbitrary string (used by the host unit tests). */
long cmdline_parse_int_in(const char *line, const char *param, long defval);
bool cmdline_parse_bool_in(const char *line, const char *param, bool defval);
const char *cmdline_parse_str_in(const char *line, const char *param,
				 char *buf, size_t size, const char *defval);

/* ------------------------------------------------------------------ */
/* Memory                                                              */

#define MAP_CACHED	0
#define MAP_UNCACHED	1

/* Identity-map [addr, addr+size) with 2 MiB pages. */
void map_range(u64 addr, u64 size, unsigned int flags);
void *alloc(u64 size, u64 align);
void *zalloc(u64 size, u64 align);

/* ------------------------------------------------------------------ */
/* Interrupts and exceptions                                           */

typedef void (*irq_handler_t)(unsigned int vector);

/* Install the IDT on this CPU and software-enable its x2APIC. */
void irq_init(void);
/* Called for vector (32..254); the library writes the EOI afterwards. */
void irq_set_handler(unsigned int vector, irq_handler_t handler);
void apic_eoi(void);
/* Exceptions are never expected: each prints "EXCEPTION on CPU ..." with a
 * register dump and stops the CPU. */

/* ------------------------------------------------------------------ */
/* IOAPIC (reference 4.6): the pins the cell's config gives it          */

#define IOAPIC_BASE		0xfec00000UL
/* Redirection entry flags (82093AA datasheet 3.2.4). */
#define IOAPIC_LEVEL		(1U << 15)
#define IOAPIC_ACTIVE_LOW	(1U << 13)
#define IOAPIC_MASKED		(1U << 16)

/* Map the IOAPIC page (uncached). */
void ioapic_init(void);
/* Route pin to vector on this CPU (physical destination, fixed delivery);
 * flags: IOAPIC_LEVEL, IOAPIC_ACTIVE_LOW, IOAPIC_MASKED. */
void ioapic_pin_set(unsigned int pin, unsigned int vector, u32 flags);
/* Set or clear the pin's mask bit, keeping the rest of its entry. */
void ioapic_pin_mask(unsigned int pin, bool masked);

/* ------------------------------------------------------------------ */
/* Timing (reference 5.5)                                              */

#define PM_TIMER_HZ	3579545UL

/* Nanoseconds since the first call, from the ACPI PM timer (24 bit,
 * overflows tracked; call at least every 4 s). 0 if there is none. Any CPU
 * of the cell, also in an interrupt handler. */
u64 pm_timer_read(void);
bool pm_timer_available(void);
/* Busy-wait using the PM timer (or the TSC if there is no PM timer). */
void delay_us(u64 us);
/* Calibrates the TSC against the PM timer (100 ms), falls back to the comm
 * region's tsc_khz; returns kHz. */
u64 tsc_init(void);
u64 tsc_khz(void);
u64 tsc_read_ns(void);
/* Sets up the x2APIC timer for vector: TSC-deadline if CPUID says so,
 * else one-shot mode divided by 16, with apic_khz from the comm region or
 * calibrated against the PM timer. Returns the APIC timer kHz (0 in
 * TSC-deadline mode). */
u64 apic_timer_init(unsigned int vector);
bool apic_timer_tsc_deadline(void);
/* One-shot: fire after ns nanoseconds. */
void apic_timer_set(u64 ns);
/* One-shot: fire at an absolute TSC value. */
void apic_timer_set_deadline(u64 tsc);
void apic_timer_stop(void);

/* ------------------------------------------------------------------ */
/* PCI (reference 4.3, 4.4)                                            */

#define PCI_CFG_VENDOR_ID	0x00
#define PCI_CFG_DEVICE_ID	0x02
#define PCI_CFG_COMMAND		0x04
#define  PCI_CMD_IO		0x0001
#define  PCI_CMD_MEM		0x0002
#define  PCI_CMD_MASTER		0x0004
#define  PCI_CMD_INTX_OFF	0x0400
#define PCI_CFG_STATUS		0x06
#define  PCI_STS_CAPS		0x0010
#define PCI_CFG_CLASS_REV	0x08
#define PCI_CFG_HEADER_TYPE	0x0e
#define PCI_CFG_BAR		0x10
#define PCI_CFG_CAP_PTR		0x34
#define PCI_CFG_INT		0x3c

#define PCI_CAP_PM		0x01
#define PCI_CAP_MSI		0x05
#define PCI_CAP_VENDOR		0x09
#define PCI_CAP_EXP		0x10
#define PCI_CAP_MSIX		0x11

#define PCI_BDF(bus, dev, fn)	(((bus) << 8) | ((dev) << 3) | (fn))
#define PCI_BUS(bdf)		(((bdf) >> 8) & 0xff)
#define PCI_DEV(bdf)		(((bdf) >> 3) & 0x1f)
#define PCI_FN(bdf)		((bdf) & 7)
#define PCI_NO_DEVICE		(-1)

/* Config space through 0xcf8/0xcfc: any CPU, also in an interrupt handler. */
u32 pci_read_config(u16 bdf, unsigned int addr, unsigned int size);
void pci_write_config(u16 bdf, unsigned int addr, u32 value,
		      unsigned int size);
/* First device at or after start_bdf with this vendor/device (0xffff =
 * any), scanning buses 0..max_bus; PCI_NO_DEVICE if none. */
int pci_find_device(u16 vendor, u16 device, u16 start_bdf, u8 max_bus);
/* Capability walk; returns the config offset or 0. */
unsigned int pci_find_cap(u16 bdf, u8 cap_id);
/* BAR n as a 64-bit address (memory BARs, 64-bit pairs joined). */
u64 pci_bar_address(u16 bdf, unsigned int bar);
/* Program MSI for one vector to this CPU; returns false without a cap. */
bool pci_msi_set_vector(u16 bdf, unsigned int vector);
/* Program MSI-X table entry index for one vector to this CPU, unmask it
 * and enable MSI-X. table: the mapped MSI-X table, or NULL to locate it
 * through the capability's BIR/offset and map it uncached. */
bool pci_msix_set_vector(u16 bdf, unsigned int vector, unsigned int index,
			 volatile void *table);
/* MSI-X table address according to the capability's BIR and offset. */
u64 pci_msix_table_address(u16 bdf);

/* ------------------------------------------------------------------ */
/* SMP (reference 5.5)                                                 */

extern volatile u32 smp_num_cpus;
extern volatile u32 smp_cpu_ids[MAX_CPUS];
/* Spin until every cell CPU registered (comm region num_cpus) or the
 * timeout expires; returns the number seen. */
unsigned int smp_wait_for_all_cpus(u64 timeout_ns);
/* INIT, SIPI, SIPI through the x2APIC ICR; the CPU comes back through the
 * reset entry and calls entry on a fresh stack. Returns false if it did
 * not pick up the entry in time. */
bool smp_start_cpu(u32 apic_id, void (*entry)(void));

/* Every demo provides this; returning ends in stop(). */
/* ------------------------------------------------------------------ */
/* Probe checks: one line per check that a test can assert on its own:
 *   "<probe>: <name>: PASS (<detail>)" or "<probe>: <name>: FAIL (<detail>)",
 * and a last line "<probe>: N checks, M failed: PASSED|FAILED".            */

/* Print one check line; returns ok. */
bool check(const char *probe, const char *name, bool ok, const char *fmt, ...)
	__printf(4, 5);
/* Print the summary line of all checks so far; true if none failed. */
bool check_summary(const char *probe);

void inmate_main(void);

#endif /* !__ASSEMBLER__ */
#endif
