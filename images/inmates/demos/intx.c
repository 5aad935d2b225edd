/*
 * intx: the legacy INTx interrupt of a passed-through PCI device, through
 * an IOAPIC pin the cell owns (PCI Local Bus spec 3.0: 2.2.6 INTA# is
 * level-sensitive and stays asserted until the device's cause is cleared,
 * 6.2.2 Command bit 10 Interrupt Disable, 6.2.3 Status bit 3 Interrupt
 * Status; 6.8.1: a function with MSI enabled does not use INTx; 82093AA
 * IOAPIC datasheet 3.2.4: a masked pin delivers nothing, a level-triggered
 * one is delivered again after the EOI while its line stays asserted).
 *
 * The device is QEMU's edu (docs/specs/edu.txt): a write of 0x60 (raise)
 * sets bits of its interrupt status (0x24) and asserts INTA# while MSI is
 * off (an MSI while it is on); a write of 0x64 (acknowledge) clears them
 * and deasserts INTA# once the status is 0. The cell routes IOAPIC pin
 * gsi level-triggered to its own CPU; the handler reads the status and the
 * PCI Status register, and acknowledges unless told to hold the line.
 *
 * Checks ("intx: NAME: PASS|FAIL (...)"):
 *   pin        the Interrupt Pin register reads 1 (INTA#)
 *   deliver    a raise interrupts once; in the handler the device status
 *              holds the raised bit and PCI Status.Interrupt is set
 *   ack        once acknowledged, Status.Interrupt is clear and no other
 *              interrupt comes within 300 ms
 *   level      a handler that leaves the line asserted is entered again
 *              after its EOI, and not once more after acknowledging
 *   masked     with the pin's entry masked, a raise delivers nothing
 *   unmask     unmasking the entry delivers the still asserted line once
 *   disable    with Command.Interrupt Disable set, a raise delivers nothing
 *              while Status.Interrupt shows it pending
 *   enable     clearing Interrupt Disable delivers it once
 *   msi        with MSI on (and bus mastering, which an MSI needs), a raise
 *              arrives as the MSI, not on the pin
 *   msi-off    with MSI off again, a raise arrives on the pin again
 * Command line: gsi=N (the device's line as the root saw it, default 20),
 * bdf=N (default: the first 1234:11e8 on buses 0-1), wait-ms=N (per wait
 * for an interrupt, default 5000).
 */
#include <inmate.h>

#define PROBE			"intx"
#define EDU_VENDOR		0x1234
#define EDU_DEVICE		0x11e8
#define EDU_IRQ_STATUS		0x24
#define EDU_IRQ_RAISE		0x60
#define EDU_IRQ_ACK		0x64
#define PIN_VECTOR		0x52
#define MSI_VECTOR		0x53
#define PCI_CFG_INT_PIN		0x3d
#define PCI_STS_INT		0x0008
#define MSI_CTRL_ENABLE		0x0001
#define QUIET_MS		300

static volatile u8 *edu;
static u16 bdf;
/* the handler: how many entries, what it saw, how often to leave the line asserted */
static volatile unsigned int pin_irqs, msi_irqs, holds;
static volatile u32 seen_status;
static volatile u16 seen_pci_status;
/* PM timer (ns) at the last raise and at the handler's entry */
static volatile u64 raised_at, entered_at;

static void pin_irq(unsigned int vector)
{
	entered_at = pm_timer_read();
	seen_status = mmio_read32(edu + EDU_IRQ_STATUS);
	seen_pci_status = pci_read_config(bdf, PCI_CFG_STATUS, 2);
	pin_irqs++;
	if (holds) {
		holds--;
		return;		/* EOI with INTA# still asserted */
	}
	mmio_write32(edu + EDU_IRQ_ACK, seen_status);
}

static void msi_irq(unsigned int vector)
{
	mmio_write32(edu + EDU_IRQ_ACK, mmio_read32(edu + EDU_IRQ_STATUS));
	msi_irqs++;
}

/* Interrupts on for up to ms, or until count of *counter is reached. */
static bool wait_count(volatile unsigned int *counter, unsigned int count, u64 ms)
{
	u64 start = pm_timer_read();

	enable_irqs();
	while (*counter < count && pm_timer_read() - start < ms * NS_PER_MSEC)
		cpu_relax();
	disable_irqs();
	return *counter >= count;
}

static void edu_raise(u32 bit)
{
	raised_at = pm_timer_read();
	mmio_write32(edu + EDU_IRQ_RAISE, bit);
}

static u16 command(void)
{
	return pci_read_config(bdf, PCI_CFG_COMMAND, 2);
}

void inmate_main(void)
{
	unsigned int gsi = cmdline_parse_int("gsi", 20);
	u64 wait_ms = cmdline_parse_int("wait-ms", 5000);
	unsigned int before, msi_cap;
	int found = cmdline_parse_int("bdf", -1);
	u16 pci_status;
	u64 bar;
	u8 pin;
	bool ok;

	if (found < 0)
		found = pci_find_device(EDU_VENDOR, EDU_DEVICE, 0, 1);
	if (found < 0) {
		check(PROBE, "pin", false, "no edu device");
		check_summary(PROBE);
		return;
	}
	bdf = found;
	bar = pci_bar_address(bdf, 0);
	pin = pci_read_config(bdf, PCI_CFG_INT_PIN, 1);
	msi_cap = pci_find_cap(bdf, PCI_CAP_MSI);
	printk("%s: device %02x:%02x.%x, BAR0 0x%lx, IOAPIC pin %u, vector 0x%x\n",
	       PROBE, PCI_BUS(bdf), PCI_DEV(bdf), PCI_FN(bdf), bar, gsi,
	       PIN_VECTOR);
	check(PROBE, "pin", pin == 1, "Interrupt Pin %u", pin);
	if (!bar) {
		check_summary(PROBE);
		return;
	}
	edu = (volatile u8 *)bar;
	map_range(bar, HUGE_PAGE_SIZE, MAP_UNCACHED);
	irq_init();
	irq_set_handler(PIN_VECTOR, pin_irq);
	irq_set_handler(MSI_VECTOR, msi_irq);
	ioapic_init();
	ioapic_pin_set(gsi, PIN_VECTOR, IOAPIC_LEVEL);
	/* memory decoding on (the BAR answers), Interrupt Disable off */
	pci_write_config(bdf, PCI_CFG_COMMAND, PCI_CMD_MEM, 2);
	mmio_write32(edu + EDU_IRQ_ACK, 0xffffffff);

	/* deliver, ack */
	edu_raise(0x4);
	ok = wait_count(&pin_irqs, 1, wait_ms);
	check(PROBE, "deliver", ok && seen_status == 0x4 &&
	      (seen_pci_status & PCI_STS_INT), "%u interrupt(s), device status 0x%x, "
	      "PCI status 0x%04x in the handler, %lu us after the raise", pin_irqs,
	      seen_status, seen_pci_status, (entered_at - raised_at) / NS_PER_USEC);
	pci_status = pci_read_config(bdf, PCI_CFG_STATUS, 2);
	ok = !wait_count(&pin_irqs, 2, QUIET_MS) && !(pci_status & PCI_STS_INT);
	check(PROBE, "ack", ok, "%u interrupt(s) in total, PCI status 0x%04x after "
	      "the acknowledge", pin_irqs, pci_status);

	/* level: held once, entered again after the EOI */
	before = pin_irqs;
	holds = 1;
	edu_raise(0x8);
	ok = wait_count(&pin_irqs, before + 2, wait_ms);
	ok = ok && !wait_count(&pin_irqs, before + 3, QUIET_MS);
	check(PROBE, "level", ok && !holds, "%u entries for one raise held once "
	      "(2 expected), last device status 0x%x", pin_irqs - before,
	      seen_status);

	/* masked entry, then unmasked */
	before = pin_irqs;
	ioapic_pin_mask(gsi, true);
	edu_raise(0x10);
	ok = !wait_count(&pin_irqs, before + 1, QUIET_MS);
	check(PROBE, "masked", ok, "%u interrupt(s) while masked",
	      pin_irqs - before);
	ioapic_pin_mask(gsi, false);
	ok = wait_count(&pin_irqs, before + 1, wait_ms) &&
	     !wait_count(&pin_irqs, before + 2, QUIET_MS);
	check(PROBE, "unmask", ok && seen_status == 0x10, "%u interrupt(s) after "
	      "unmasking, device status 0x%x", pin_irqs - before, seen_status);

	/* Command.Interrupt Disable */
	before = pin_irqs;
	pci_write_config(bdf, PCI_CFG_COMMAND, command() | PCI_CMD_INTX_OFF, 2);
	edu_raise(0x20);
	ok = !wait_count(&pin_irqs, before + 1, QUIET_MS);
	pci_status = pci_read_config(bdf, PCI_CFG_STATUS, 2);
	check(PROBE, "disable", ok && (pci_status & PCI_STS_INT), "%u interrupt(s) "
	      "while disabled, PCI status 0x%04x", pin_irqs - before, pci_status);
	pci_write_config(bdf, PCI_CFG_COMMAND, command() & ~PCI_CMD_INTX_OFF, 2);
	ok = wait_count(&pin_irqs, before + 1, wait_ms) &&
	     !wait_count(&pin_irqs, before + 2, QUIET_MS);
	check(PROBE, "enable", ok, "%u interrupt(s) after enabling",
	      pin_irqs - before);

	/* MSI takes over, and gives INTx back */
	before = pin_irqs;
	/* an MSI is a memory write of the device: bus mastering on (6.8.1) */
	pci_write_config(bdf, PCI_CFG_COMMAND, command() | PCI_CMD_MASTER, 2);
	if (!msi_cap || !pci_msi_set_vector(bdf, MSI_VECTOR)) {
		check(PROBE, "msi", false, "no MSI capability");
	} else {
		edu_raise(0x40);
		ok = wait_count(&msi_irqs, 1, wait_ms) &&
		     !wait_count(&pin_irqs, before + 1, QUIET_MS);
		check(PROBE, "msi", ok, "%u MSI(s), %u pin interrupt(s)",
		      msi_irqs, pin_irqs - before);
		pci_write_config(bdf, msi_cap + 2,
				 pci_read_config(bdf, msi_cap + 2, 2) &
				 ~MSI_CTRL_ENABLE, 2);
		edu_raise(0x80);
		ok = wait_count(&pin_irqs, before + 1, wait_ms) &&
		     !wait_count(&msi_irqs, 2, QUIET_MS);
		check(PROBE, "msi-off", ok, "%u pin interrupt(s), %u MSI(s) in total",
		      pin_irqs - before, msi_irqs);
	}
	ioapic_pin_mask(gsi, true);
	check_summary(PROBE);
}
