/*
 * SMP (reference 5.5). All cell CPUs start at the reset entry together;
 * each registers its APIC ID in smp_cpu_ids and all but the first halt.
 * smp_start_cpu() brings a halted CPU back with INIT, SIPI, SIPI through
 * the x2APIC ICR: it re-runs the reset entry, finds ap_entry set, and
 * calls the entry on the stack left in ap_stack.
 */
#include <inmate.h>

#define ICR_INIT		0x00000500
#define ICR_STARTUP		0x00000600
#define ICR_LEVEL_ASSERT	0x00004000
#define AP_STACK_SIZE		0x1000
#define AP_START_TIMEOUT_NS	(1000 * NS_PER_MSEC)

extern void (*volatile ap_entry)(void);
extern volatile u64 ap_stack;

static u64 now_ns(void)
{
	return pm_timer_available() ? pm_timer_read() : tsc_read_ns();
}

unsigned int smp_wait_for_all_cpus(u64 timeout_ns)
{
	u64 start = now_ns();
	unsigned int spins = 0;

	while (smp_num_cpus < comm_region->num_cpus) {
		cpu_relax();
		/* without any clock, give up after a fixed number of polls */
		if (start == 0 && ++spins > 100000000)
			break;
		if (start && now_ns() - start > timeout_ns)
			break;
	}
	return smp_num_cpus;
}

bool smp_start_cpu(u32 apic_id, void (*entry)(void))
{
	u64 dest = (u64)apic_id << 32, start;

	ap_stack = (u64)zalloc(AP_STACK_SIZE, 16) + AP_STACK_SIZE;
	barrier();	/* store order: stack before entry (x86 is TSO) */
	ap_entry = entry;

	write_msr(X2APIC_ICR, dest | ICR_LEVEL_ASSERT | ICR_INIT);
	delay_us(10000);
	write_msr(X2APIC_ICR, dest | ICR_LEVEL_ASSERT | ICR_STARTUP | 0x00);
	delay_us(200);
	write_msr(X2APIC_ICR, dest | ICR_LEVEL_ASSERT | ICR_STARTUP | 0x00);

	start = now_ns();
	while (ap_entry) {
		cpu_relax();
		if (now_ns() - start > AP_START_TIMEOUT_NS) {
			ap_entry = NULL;
			return false;
		}
	}
	return true;
}

/* Called from the reset entry on a CPU started by smp_start_cpu(). */
void __noreturn smp_ap_c_entry(void (*entry)(void))
{
	irq_init();
	entry();
	stop();
}
