/*
 * sci: the ACPI SCI reaches a cell that owns its IOAPIC pin. Jailhouse
 * gives a cell the pins its config's irqchip bitmap names and moderates
 * the redirection entries (reference 4.6); the interrupt itself comes from
 * the hardware. The ACPI PM1 event block (ACPI spec 4.8.3.1: PM1a_STS at
 * the block, PM1a_EN 2 bytes later; TMR_STS/EN bit 0, PWRBTN_STS/EN bit 8)
 * lies 8 ports below the PM timer on the ICH (as Jailhouse's ioapic-demo
 * assumes).
 *
 * Checks ("sci: NAME: PASS|FAIL (...)"):
 *   timer-overflow  with TMR_EN set, the PM timer's bit-23 carry raises the
 *                   SCI within 6 s (it toggles every 2.34 s)
 *   power-button    with PWRBTN_EN set, a power-button press (QMP
 *                   system_powerdown) raises it within wait-ms
 * Command line: gsi=N (default 9), wait-ms=N (default 30000),
 * button=0 skips the power-button check.
 */
#include <inmate.h>

#define PROBE		"sci"
#define SCI_VECTOR	0x42
#define PM1_TMR		(1 << 0)
#define PM1_PWRBTN	(1 << 8)

static volatile unsigned int sci_count;
static volatile u16 sci_status;
static u16 pm1_base;

static void sci_irq(unsigned int vector)
{
	u16 status = inw(pm1_base);

	sci_status |= status;
	outw(status, pm1_base);		/* write 1 to clear */
	sci_count++;
}

static bool wait_for(u16 bit, u64 timeout_ms)
{
	u64 start = pm_timer_read();

	while (!(sci_status & bit) &&
	       pm_timer_read() - start < timeout_ms * NS_PER_MSEC) {
		enable_irqs();
		delay_us(1000);
		disable_irqs();
	}
	return sci_status & bit;
}

void inmate_main(void)
{
	unsigned int gsi = cmdline_parse_int("gsi", 9);
	u64 wait_ms = cmdline_parse_int("wait-ms", 30000);
	bool button = cmdline_parse_bool("button", true);
	bool ok;

	pm1_base = comm_region->pm_timer_address - 8;
	irq_init();
	irq_set_handler(SCI_VECTOR, sci_irq);
	ioapic_init();
	ioapic_pin_set(gsi, SCI_VECTOR, IOAPIC_LEVEL);
	outw(inw(pm1_base), pm1_base);	/* clear what is pending */

	printk("%s: GSI %u, PM1 event block 0x%x\n", PROBE, gsi, pm1_base);
	outw(inw(pm1_base + 2) | PM1_TMR, pm1_base + 2);
	ok = wait_for(PM1_TMR, 6000);
	outw(inw(pm1_base + 2) & ~PM1_TMR, pm1_base + 2);
	check(PROBE, "timer-overflow", ok, "%u SCI(s), PM1 status seen 0x%04x",
	      sci_count, sci_status);

	if (button) {
		sci_status = 0;
		outw(inw(pm1_base + 2) | PM1_PWRBTN, pm1_base + 2);
		printk("%s: waiting %lu ms for the power button (QMP "
		       "system_powerdown)\n", PROBE, wait_ms);
		ok = wait_for(PM1_PWRBTN, wait_ms);
		check(PROBE, "power-button", ok, "ACPI IRQ received: %s, PM1 "
		      "status seen 0x%04x", ok ? "yes" : "no", sci_status);
	}
	check_summary(PROBE);
}
