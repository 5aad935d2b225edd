/*
 * smp: every CPU of the cell reports in.
 *
 * All cell CPUs start at the reset entry together and register their APIC
 * IDs; the first one lists them, then restarts each other CPU through
 * INIT/SIPI/SIPI (x2APIC ICR) into ap_main, which prints a line and waits
 * for a fixed IPI from the first CPU. The result line says whether every
 * CPU the comm region announced came back and took its IPI:
 *
 *   SMP demo: N/N CPUs registered
 *   CPU 0: APIC ID a (this CPU)
 *   CPU 1: APIC ID b
 *   Hello from CPU 1 (APIC ID b)
 *   CPU 1: IPI received
 *   smp: N CPUs reported in, N-1 IPIs delivered: PASSED
 */
#include <inmate.h>

#define IPI_VECTOR	0x40
#define ICR_FIXED	0x0000
#define WAIT_NS		(2000 * NS_PER_MSEC)

static volatile u32 reported[MAX_CPUS];
static volatile u32 ipi_seen[MAX_CPUS];

static void ipi_handler(unsigned int vector)
{
	ipi_seen[cpu_index()] = 1;
}

static void ap_main(void)
{
	unsigned int me = cpu_index();

	printk("Hello from CPU %u (APIC ID %u, x2APIC ID %lu)\n", me,
	       cpu_apic_id(), read_msr(X2APIC_ID));
	reported[me] = 1;
	while (!ipi_seen[me])
		wait_for_interrupt();
	printk("CPU %u: IPI received\n", me);
}

static bool wait_flag(volatile u32 *flag)
{
	u64 start = pm_timer_read();

	while (!*flag) {
		cpu_relax();
		if (pm_timer_read() - start > WAIT_NS)
			return false;
	}
	return true;
}

void inmate_main(void)
{
	unsigned int n, i, ok_cpus = 1, ipis = 0;
	u32 expected = comm_region->num_cpus;

	irq_set_handler(IPI_VECTOR, ipi_handler);
	n = smp_wait_for_all_cpus(WAIT_NS);
	printk("SMP demo: %u/%u CPUs registered\n", n, expected);
	if (n > MAX_CPUS)
		n = MAX_CPUS;
	for (i = 0; i < n; i++)
		printk("CPU %u: APIC ID %u%s\n", i, smp_cpu_ids[i],
		       i == 0 ? " (this CPU)" : "");

	for (i = 1; i < n; i++) {
		if (!smp_start_cpu(smp_cpu_ids[i], ap_main)) {
			printk("CPU %u: did not start\n", i);
			continue;
		}
		if (!wait_flag(&reported[i])) {
			printk("CPU %u: started but did not report\n", i);
			continue;
		}
		ok_cpus++;
		write_msr(X2APIC_ICR, ((u64)smp_cpu_ids[i] << 32) | ICR_FIXED |
			  IPI_VECTOR);
		if (wait_flag(&ipi_seen[i]))
			ipis++;
		else
			printk("CPU %u: no IPI seen\n", i);
	}
	/* give the last "IPI received" line time to come out */
	delay_us(10000);
	printk("smp: %u CPUs reported in, %u IPIs delivered: %s\n", ok_cpus,
	       ipis, ok_cpus == expected && n == expected &&
	       ipis == expected - 1 ? "PASSED" : "FAILED");
}
