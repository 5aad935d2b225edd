/*
 * msix: MSI-X of a passed-through device, programmed and used by the cell
 * (PCI Local Bus spec 3.0 6.8.2: the table entry's address/data, the
 * per-vector mask bit and the pending bit: a message the function wants to
 * send while its vector is masked is held pending and sent once unmasked).
 * The device is the 82574L (QEMU e1000e): IVAR (0xe4) bits 19:16 route the
 * "other" causes to a vector, IMS (0xd0) enables causes, ICS (0xc8) sets
 * them, a write of ICR (0xc0) clears them (82574 datasheet 10.2.4).
 *
 * Checks ("msix: NAME: PASS|FAIL (...)"):
 *   enable        the MSI-X control word reads back enabled, not masked
 *   vector0       setting the link-status cause raises vector 0 in 2 s
 *   masked        with vector 0 masked, the same cause raises nothing (0.5 s)
 *   pending       unmasking it delivers the held message (2 s)
 * Command line: bdf=N (default 0x0010 = 00:02.0).
 */
#include <inmate.h>

#define PROBE		"msix"
#define MSIX_VECTOR	0x44
#define E1000_ICR	0xc0
#define E1000_ICS	0xc8
#define E1000_IMS	0xd0
#define E1000_IMC	0xd8
#define E1000_IVAR	0xe4
#define ICR_LSC		(1U << 2)
#define ICR_OTHER	(1U << 24)
#define IVAR_OTHER_VALID_VEC0	(0x8U << 16)
#define MSIX_CTRL_ENABLE	0x8000
#define MSIX_CTRL_FMASK		0x4000
#define MSIX_VECTOR_CTRL	12

static volatile unsigned int msis;
static volatile u8 *regs;

static void msix_irq(unsigned int vector)
{
	mmio_write32(regs + E1000_ICR, 0xffffffff);
	msis++;
}

static bool wait_msis(unsigned int count, u64 ms)
{
	u64 start = pm_timer_read();

	enable_irqs();
	while (msis < count && pm_timer_read() - start < ms * NS_PER_MSEC)
		cpu_relax();
	disable_irqs();
	return msis >= count;
}

void inmate_main(void)
{
	u16 bdf = cmdline_parse_int("bdf", 0x0010);
	unsigned int cap;
	volatile u8 *table;
	u64 bar0, table_addr;
	u16 ctrl;
	bool ok;

	irq_init();
	irq_set_handler(MSIX_VECTOR, msix_irq);
	cap = pci_find_cap(bdf, PCI_CAP_MSIX);
	bar0 = pci_bar_address(bdf, 0);
	table_addr = pci_msix_table_address(bdf);
	printk("%s: device %02x:%02x.%x, BAR0 0x%lx, MSI-X cap 0x%x, table 0x%lx\n",
	       PROBE, PCI_BUS(bdf), PCI_DEV(bdf), PCI_FN(bdf), bar0, cap,
	       table_addr);
	if (!cap || !bar0 || !table_addr) {
		check(PROBE, "enable", false, "no MSI-X capability or BAR");
		check_summary(PROBE);
		return;
	}
	regs = (volatile u8 *)bar0;
	table = (volatile u8 *)table_addr;
	map_range(bar0, 0x20000, MAP_UNCACHED);
	map_range(table_addr, PAGE_SIZE, MAP_UNCACHED);
	pci_write_config(bdf, PCI_CFG_COMMAND, PCI_CMD_MEM | PCI_CMD_MASTER |
			 PCI_CMD_INTX_OFF, 2);

	mmio_write32(regs + E1000_IMC, 0xffffffff);
	mmio_write32(regs + E1000_ICR, 0xffffffff);
	pci_msix_set_vector(bdf, MSIX_VECTOR, 0, table);
	ctrl = pci_read_config(bdf, cap + 2, 2);
	check(PROBE, "enable", (ctrl & (MSIX_CTRL_ENABLE | MSIX_CTRL_FMASK)) ==
	      MSIX_CTRL_ENABLE, "control word 0x%04x", ctrl);

	mmio_write32(regs + E1000_IVAR, IVAR_OTHER_VALID_VEC0);
	mmio_write32(regs + E1000_IMS, ICR_LSC | ICR_OTHER);
	mmio_write32(regs + E1000_ICS, ICR_LSC);
	ok = wait_msis(1, 2000);
	check(PROBE, "vector0", ok, "%u message(s) on vector 0", msis);

	mmio_write32(table + MSIX_VECTOR_CTRL, 1);		/* mask */
	mmio_write32(regs + E1000_ICS, ICR_LSC);
	ok = !wait_msis(2, 500);
	check(PROBE, "masked", ok, "%u message(s) in total while masked", msis);

	mmio_write32(table + MSIX_VECTOR_CTRL, 0);		/* unmask */
	ok = wait_msis(2, 2000);
	check(PROBE, "pending", ok, "%u message(s) in total after unmasking",
	      msis);
	mmio_write32(regs + E1000_IMC, 0xffffffff);
	check_summary(PROBE);
}
