/*
 * pciconf: the config space of a passed-through PCI device, read through
 * 0xcf8/0xcfc, as Jailhouse's moderation gives it (hypervisor/pci.c:
 * pci_add_physical_device shadows all six BARs from the hardware, whatever
 * the config's bar_mask; reads below 0x40 other than BARs and the ROM BAR
 * come from the hardware; the root cell's pci_remove_physical_device
 * leaves COMMAND = INTx disabled when the device moves to the cell), then
 * an MSI from the device. The expected values come from the command line,
 * which the test fills in from what the root cell saw before cell create.
 *
 * Checks ("pciconf: NAME: PASS|FAIL (...)"):
 *   id        vendor/device == id= (0xDDDDVVVV)
 *   barN      BAR N == barN= (for each given, N = 0..5)
 *   command   COMMAND == cmd= (if given)
 *   caps      capability list "ID@OFFSET,..." == caps= (if given)
 *   msi       (hda=1) the ICH HD audio controller's MSI arrives after a
 *             controller reset with WAKEEN and GIE|CIE set (as Jailhouse's
 *             pci-demo does), within 2 s
 * Command line: bdf=N (default 0x00d8 = 00:1b.0), id=, bar0= ... bar5=,
 * cmd=, caps=, hda=1.
 */
#include <inmate.h>

#define PROBE		"pciconf"
#define MSI_VECTOR	0x43
#define HDA_GCTL	0x08
#define HDA_WAKEEN	0x0c
#define HDA_STATESTS	0x0e
#define HDA_INTCTL	0x20

static volatile unsigned int msis;
static volatile u16 statests;
static volatile u8 *hda;

static void msi_irq(unsigned int vector)
{
	u16 status = mmio_read16(hda + HDA_STATESTS);

	statests |= status;
	mmio_write16(hda + HDA_STATESTS, status);
	msis++;
}

static void check_caps(u16 bdf, const char *want)
{
	char got[96] = "", *p = got;
	unsigned int pos, guard = 0;

	if (pci_read_config(bdf, PCI_CFG_STATUS, 2) & PCI_STS_CAPS) {
		pos = pci_read_config(bdf, PCI_CFG_CAP_PTR, 1) & ~3;
		while (pos && guard++ < 32 && p < got + sizeof(got) - 8) {
			p += snprintf(p, got + sizeof(got) - p, "%s%02x@%02x",
				      p == got ? "" : ",",
				      pci_read_config(bdf, pos, 1), pos);
			pos = pci_read_config(bdf, pos + 1, 1) & ~3;
		}
	}
	check(PROBE, "caps", !strcmp(got, want), "\"%s\", root saw \"%s\"",
	      got, want);
}

static void hda_msi(u16 bdf, u64 bar0)
{
	u64 start;

	if (!bar0) {
		check(PROBE, "msi", false, "no BAR0 to reach the controller");
		return;
	}
	hda = (volatile u8 *)bar0;
	map_range(bar0, PAGE_SIZE, MAP_UNCACHED);
	irq_set_handler(MSI_VECTOR, msi_irq);
	if (!pci_msi_set_vector(bdf, MSI_VECTOR)) {
		check(PROBE, "msi", false, "no MSI capability");
		return;
	}
	pci_write_config(bdf, PCI_CFG_COMMAND, PCI_CMD_MEM | PCI_CMD_MASTER, 2);
	enable_irqs();
	mmio_write16(hda + HDA_STATESTS, mmio_read16(hda + HDA_STATESTS));
	mmio_write16(hda + HDA_GCTL, 0);
	delay_us(7000);
	mmio_write16(hda + HDA_GCTL, 1);
	mmio_write16(hda + HDA_WAKEEN, 0x0f);
	mmio_write32(hda + HDA_INTCTL, (1U << 31) | (1U << 30));
	start = pm_timer_read();
	while (!msis && pm_timer_read() - start < 2 * NS_PER_SEC)
		cpu_relax();
	disable_irqs();
	check(PROBE, "msi", msis > 0, "%u MSI(s), STATESTS 0x%04x", msis,
	      statests);
}

void inmate_main(void)
{
	u16 bdf = cmdline_parse_int("bdf", 0x00d8);
	long id = cmdline_parse_int("id", -1);
	long cmd = cmdline_parse_int("cmd", -1);
	char name[8], caps[96];
	u32 value;
	long want;
	unsigned int n;
	u64 bar0;

	irq_init();
	printk("%s: device %02x:%02x.%x\n", PROBE, PCI_BUS(bdf), PCI_DEV(bdf),
	       PCI_FN(bdf));
	value = pci_read_config(bdf, PCI_CFG_VENDOR_ID, 4);
	if (id >= 0)
		check(PROBE, "id", value == (u32)id, "0x%08x, root saw 0x%08lx",
		      value, id);
	for (n = 0; n < 6; n++) {
		snprintf(name, sizeof(name), "bar%u", n);
		want = cmdline_parse_int(name, -1);
		value = pci_read_config(bdf, PCI_CFG_BAR + 4 * n, 4);
		if (want >= 0)
			check(PROBE, name, value == (u32)want,
			      "0x%08x, root saw 0x%08lx", value, want);
	}
	value = pci_read_config(bdf, PCI_CFG_COMMAND, 2);
	if (cmd >= 0)
		check(PROBE, "command", value == (u32)cmd,
		      "0x%04x, expected 0x%04lx", value, cmd);
	if (cmdline_parse_str("caps", caps, sizeof(caps), NULL))
		check_caps(bdf, caps);
	if (cmdline_parse_bool("hda", false)) {
		bar0 = pci_read_config(bdf, PCI_CFG_BAR, 4) & ~0xfUL;
		hda_msi(bdf, bar0);
	}
	check_summary(PROBE);
}
