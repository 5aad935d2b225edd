/*
 * counters: a known number of exits of each kind Jailhouse counts, so that
 * `jailhouse cell stats` can be compared with what the cell did. Every one
 * of these exits on Jailhouse (reference 4.1-4.3, 4.9): port I/O to
 * 0xcf8/0xcfc that the cell's PIO whitelist does not open (PCI config of a
 * device it does not own: reads all ones), CPUID, writes of
 * IA32_MTRR_DEF_TYPE (trapped on VMX and SVM), XSETBV (when the CPU has
 * XSAVE) and x2APIC ICR writes (an IPI to the cell's own CPU).
 *
 * Output: "counters: issued pio N cpuid N msr N xsetbv N icr N" once done;
 * the test then expects vmexits_pio >= pio, vmexits_cpuid >= cpuid, ...,
 * and vmexits_total >= their sum. Also one check line: every IPI arrived.
 * Command line: pio=N (config reads, two port accesses each; default
 * 1000), cpuid=N (500), msr=N (100), xsetbv=N (10), icr=N (10).
 */
#include <inmate.h>

#define PROBE		"counters"
#define IPI_VECTOR	0x41
#define CR4_OSXSAVE	(1UL << 18)

static volatile unsigned int ipis;

static void ipi_irq(unsigned int vector)
{
	ipis++;
}

void inmate_main(void)
{
	unsigned int pio = cmdline_parse_int("pio", 1000);
	unsigned int cpuids = cmdline_parse_int("cpuid", 500);
	unsigned int msrs = cmdline_parse_int("msr", 100);
	unsigned int xsetbvs = cmdline_parse_int("xsetbv", 10);
	unsigned int icrs = cmdline_parse_int("icr", 10);
	u32 a, b, c, d, n, sink = 0;
	u64 mtrr, cr4;

	irq_init();
	irq_set_handler(IPI_VECTOR, ipi_irq);

	for (n = 0; n < pio; n++) {
		outl(0x80000000 | (n & 0xff) << 8, 0xcf8);	/* bus 0, any slot */
		sink += inl(0xcfc);
	}
	for (n = 0; n < cpuids; n++)
		cpuid(0, 0, &a, &b, &c, &d);
	mtrr = read_msr(MSR_MTRR_DEF_TYPE);
	for (n = 0; n < msrs; n++)
		write_msr(MSR_MTRR_DEF_TYPE, mtrr);
	cpuid(1, 0, &a, &b, &c, &d);
	if (c & (1 << 26)) {
		asm volatile("mov %%cr4, %0" : "=r"(cr4));
		asm volatile("mov %0, %%cr4" : : "r"(cr4 | CR4_OSXSAVE));
		for (n = 0; n < xsetbvs; n++)
			asm volatile("xsetbv" : : "a"(1), "d"(0), "c"(0));
	} else {
		xsetbvs = 0;
	}
	for (n = 0; n < icrs; n++) {
		write_msr(X2APIC_ICR, ((u64)cpu_apic_id() << 32) | IPI_VECTOR);
		enable_irqs();
		delay_us(1000);
		disable_irqs();
	}
	check(PROBE, "ipis", ipis == icrs, "%u of %u self-addressed IPIs "
	      "arrived", ipis, icrs);
	printk("%s: issued pio %u cpuid %u msr %u xsetbv %u icr %u "
	       "(config reads summed 0x%x)\n", PROBE, 2 * pio, cpuids, msrs,
	       xsetbvs, icrs, sink);
	check_summary(PROBE);
}
