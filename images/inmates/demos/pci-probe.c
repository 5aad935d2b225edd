/*
 * pci-probe: lists the PCI devices the cell sees through 0xCF8/0xCFC and
 * their BARs and capabilities. Under Jailhouse a cell sees only its own
 * devices (others read as all ones), including ivshmem devices.
 *
 * In the default lab (cell pci-probe: QEMU's intel-hda and the demo ivshmem
 * link, loaded with "expect=2"):
 *
 *   pci-probe: scanning buses 0-1 through 0xcf8/0xcfc
 *   00:1b.0 8086:2668 class 04:03.00 rev 01 type 00
 *     BAR0: mem32 0x00000000fea94000 size 0x4000
 *       caps: 05@0x60
 *   01:0e.0 110a:4106 class ff:00.00 rev 00 type 00
 *     BAR0: mem32 0x0000000000000000 size 0x1000
 *     BAR1: mem32 0x0000000000000000 size 0x1000
 *       caps: 09@0x40 11@0x60
 *   pci-probe: 2 device(s), 3 BAR(s): PASSED
 *
 * BAR sizes come from the usual all-ones probe (memory/I/O decoding off
 * meanwhile, every value restored); `nosize` skips it. PASSED needs at
 * least `expect=N` devices (default 1) and every BAR size a power of two.
 * Command line: buses=N (scan buses 0..N-1, default 2), expect=N, nosize.
 */
#include <inmate.h>

static bool size_ok = true;
static unsigned int bars_seen;

static void show_bar(u16 bdf, unsigned int *n, bool sizing)
{
	unsigned int reg = PCI_CFG_BAR + *n * 4;
	u32 lo = pci_read_config(bdf, reg, 4), hi = 0, mlo, mhi = 0xffffffff;
	bool is64 = !(lo & 1) && (lo & 6) == 4;
	u64 addr, mask, size = 0;
	const char *kind;

	if (is64)
		hi = pci_read_config(bdf, reg + 4, 4);
	if (sizing) {
		pci_write_config(bdf, reg, 0xffffffff, 4);
		mlo = pci_read_config(bdf, reg, 4);
		pci_write_config(bdf, reg, lo, 4);
		if (is64) {
			pci_write_config(bdf, reg + 4, 0xffffffff, 4);
			mhi = pci_read_config(bdf, reg + 4, 4);
			pci_write_config(bdf, reg + 4, hi, 4);
		}
		mask = ((u64)mhi << 32) | (mlo & (lo & 1 ? ~3u : ~0xfu));
		if (lo & 1)
			mask |= 0xffffffffffff0000UL;	/* 16-bit I/O space */
		size = mask ? ~mask + 1 : 0;
		if (!is64 && !(lo & 1))
			size &= 0xffffffff;
	}
	addr = lo & 1 ? lo & ~3u : (((u64)hi << 32) | (lo & ~0xfu));
	kind = lo & 1 ? "io" : is64 ? "mem64" : "mem32";

	if (addr || size) {
		bars_seen++;
		printk("  BAR%u: %s%s 0x%016lx", *n, kind,
		       !(lo & 1) && (lo & 8) ? " prefetchable" : "", addr);
		if (sizing)
			printk(" size 0x%lx", size);
		printk("\n");
		if (sizing && (size & (size - 1)))
			size_ok = false;
	}
	*n += is64 ? 2 : 1;
}

static void show_caps(u16 bdf)
{
	unsigned int pos, guard;

	if (!(pci_read_config(bdf, PCI_CFG_STATUS, 2) & PCI_STS_CAPS))
		return;
	printk("    caps:");
	pos = pci_read_config(bdf, PCI_CFG_CAP_PTR, 1) & 0xfc;
	for (guard = 0; pos >= 0x40 && guard < 48; guard++) {
		printk(" %02x@0x%02x", pci_read_config(bdf, pos, 1), pos);
		pos = pci_read_config(bdf, pos + 1, 1) & 0xfc;
	}
	printk("\n");
}

void inmate_main(void)
{
	unsigned int buses = cmdline_parse_int("buses", 2);
	unsigned int expect = cmdline_parse_int("expect", 1);
	bool sizing = !cmdline_parse_bool("nosize", false);
	unsigned int bdf, devices = 0, n, num_bars;
	u32 id, class_rev;
	u16 cmd;
	u8 type;

	if (buses < 1 || buses > 256)
		buses = 2;
	printk("pci-probe: scanning buses 0-%u through 0xcf8/0xcfc\n",
	       buses - 1);
	for (bdf = 0; bdf < buses << 8; bdf++) {
		id = pci_read_config(bdf, PCI_CFG_VENDOR_ID, 4);
		if ((id & 0xffff) == 0xffff || (id & 0xffff) == 0)
			continue;
		devices++;
		class_rev = pci_read_config(bdf, PCI_CFG_CLASS_REV, 4);
		type = pci_read_config(bdf, PCI_CFG_HEADER_TYPE, 1);
		printk("%02x:%02x.%x %04x:%04x class %02x:%02x.%02x rev %02x "
		       "type %02x\n", PCI_BUS(bdf), PCI_DEV(bdf), PCI_FN(bdf),
		       id & 0xffff, id >> 16, class_rev >> 24,
		       (class_rev >> 16) & 0xff, (class_rev >> 8) & 0xff,
		       class_rev & 0xff, type);

		num_bars = (type & 0x7f) == 0 ? 6 : (type & 0x7f) == 1 ? 2 : 0;
		cmd = pci_read_config(bdf, PCI_CFG_COMMAND, 2);
		if (sizing && num_bars)
			pci_write_config(bdf, PCI_CFG_COMMAND,
					 cmd & ~(PCI_CMD_IO | PCI_CMD_MEM), 2);
		for (n = 0; n < num_bars; )
			show_bar(bdf, &n, sizing);
		if (sizing && num_bars)
			pci_write_config(bdf, PCI_CFG_COMMAND, cmd, 2);
		show_caps(bdf);
	}
	printk("pci-probe: %u device(s), %u BAR(s): %s\n", devices, bars_seen,
	       devices >= expect && size_ok ? "PASSED" : "FAILED");
}
