/*
 * IDT, exception reports and interrupt dispatch. Every vector has a stub
 * (irq-entry.S); exceptions print a register dump and stop the CPU,
 * interrupts go to the handler registered for their vector, followed by
 * an x2APIC EOI.
 */
#include <inmate.h>

#define SEL_CODE64	0x10
#define GATE_INTERRUPT	0x8e	/* present, DPL 0, 64-bit interrupt gate */
#define APIC_SPURIOUS	0xff
#define APIC_SW_ENABLE	0x100

struct idt_gate {
	u16 offset_lo;
	u16 selector;
	u8 ist;
	u8 type;
	u16 offset_mid;
	u32 offset_hi;
	u32 reserved;
} __attribute__((packed));

struct exception_frame {
	u64 rax, rbx, rcx, rdx, rsi, rdi, rbp;
	u64 r8, r9, r10, r11, r12, r13, r14, r15;
	u64 vector, error;
	u64 rip, cs, rflags, rsp, ss;
};

extern char irq_stubs[];

static struct idt_gate idt[256] __attribute__((aligned(16)));
static bool idt_ready;
static irq_handler_t handlers[256];

static const char *const exception_names[32] = {
	"#DE divide error", "#DB debug", "NMI", "#BP breakpoint",
	"#OF overflow", "#BR bound range", "#UD invalid opcode",
	"#NM device not available", "#DF double fault", "coprocessor overrun",
	"#TS invalid TSS", "#NP segment not present", "#SS stack fault",
	"#GP general protection", "#PF page fault", "reserved",
	"#MF x87 error", "#AC alignment check", "#MC machine check",
	"#XM SIMD error", "#VE virtualization", "#CP control protection",
};

static void idt_build(void)
{
	unsigned int v;
	u64 addr;

	for (v = 0; v < 256; v++) {
		addr = (u64)irq_stubs + v * 16;
		idt[v].offset_lo = addr & 0xffff;
		idt[v].selector = SEL_CODE64;
		idt[v].ist = 0;
		idt[v].type = GATE_INTERRUPT;
		idt[v].offset_mid = (addr >> 16) & 0xffff;
		idt[v].offset_hi = addr >> 32;
		idt[v].reserved = 0;
	}
	idt_ready = true;
}

void irq_init(void)
{
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) idtr = { sizeof(idt) - 1, (u64)idt };

	if (!idt_ready)
		idt_build();
	asm volatile("lidt %0" : : "m"(idtr));
	write_msr(X2APIC_SPIV, APIC_SW_ENABLE | APIC_SPURIOUS);
}

void irq_set_handler(unsigned int vector, irq_handler_t handler)
{
	if (vector >= 32 && vector < 256)
		handlers[vector] = handler;
}

void apic_eoi(void)
{
	write_msr(X2APIC_EOI, 0);
}

void irq_dispatch(u64 vector)
{
	if (vector == APIC_SPURIOUS)
		return;		/* no EOI for spurious interrupts */
	if (handlers[vector])
		handlers[vector](vector);
	else
		printk("CPU %u: unexpected interrupt, vector %lu\n",
		       cpu_apic_id(), vector);
	apic_eoi();
}

void __noreturn exception_handler(struct exception_frame *f)
{
	u64 cr2, cr3;

	asm volatile("mov %%cr2, %0; mov %%cr3, %1" : "=r"(cr2), "=r"(cr3));
	printk("\nEXCEPTION on CPU %u (APIC ID %u): vector %lu (%s), "
	       "error code 0x%lx\n", cpu_index(), cpu_apic_id(), f->vector,
	       f->vector < 22 ? exception_names[f->vector] : "reserved",
	       f->error);
	printk("RIP: 0x%016lx CS: 0x%04lx RFLAGS: 0x%08lx\n",
	       f->rip, f->cs, f->rflags);
	printk("RSP: 0x%016lx SS: 0x%04lx CR2: 0x%016lx CR3: 0x%016lx\n",
	       f->rsp, f->ss, cr2, cr3);
	printk("RAX: 0x%016lx RBX: 0x%016lx RCX: 0x%016lx\n",
	       f->rax, f->rbx, f->rcx);
	printk("RDX: 0x%016lx RSI: 0x%016lx RDI: 0x%016lx\n",
	       f->rdx, f->rsi, f->rdi);
	printk("RBP: 0x%016lx R8:  0x%016lx R9:  0x%016lx\n",
	       f->rbp, f->r8, f->r9);
	printk("R10: 0x%016lx R11: 0x%016lx R12: 0x%016lx\n",
	       f->r10, f->r11, f->r12);
	printk("R13: 0x%016lx R14: 0x%016lx R15: 0x%016lx\n",
	       f->r13, f->r14, f->r15);
	printk("Stopping CPU %u\n", cpu_index());
	stop();
}
