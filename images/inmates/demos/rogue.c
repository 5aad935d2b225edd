/*
 * rogue: commits one access violation, chosen on the command line, so the
 * tests can check that the hypervisor stops it (FATAL line on the
 * hypervisor console, CPU parked, cell state "failed").
 *
 *   mode=mem   [addr=0x1f0000] [value=N]   32-bit write outside the cell RAM
 *   mode=mem-read [addr=0x1f0000]          32-bit read outside the cell RAM
 *   mode=pio   [port=0x3f8] [write]        byte access to a port the cell
 *                                          does not own (read unless write)
 *   mode=pci   [bdf=0x00f8]                config write to the vendor ID
 *                                          register (read-only, so harmless
 *                                          if let through) of a device; the
 *                                          hypervisor denies it whether the
 *                                          cell owns the device or not
 *
 * The accesses use plain MOV/IN/OUT, so the hypervisor can decode and name
 * them. Expected: output ends after "rogue: ... now" and the hypervisor
 * reports, e.g., "FATAL: Invalid MMIO/RAM write, addr: 0x00000000001f0000
 * size: 4" or "FATAL: Invalid PIO read, port: 3f8 size: 1". If the
 * inmate keeps running, it prints "rogue: FAILED - violation not stopped".
 * Without a mode it prints its usage and "rogue: FAILED - no mode given".
 */
#include <inmate.h>

void inmate_main(void)
{
	char mode[16];
	u64 addr = cmdline_parse_int("addr", 0x1f0000);
	u32 value = cmdline_parse_int("value", 0xdeadbeef);
	u16 port = cmdline_parse_int("port", 0x3f8);
	u16 bdf = cmdline_parse_int("bdf", 0x00f8);
	bool write = cmdline_parse_bool("write", false);

	cmdline_parse_str("mode", mode, sizeof(mode), "");
	if (addr >= HUGE_PAGE_SIZE)
		map_range(addr, 4, MAP_UNCACHED);

	if (strcmp(mode, "mem") == 0) {
		printk("rogue: writing 0x%x to 0x%lx (outside the cell) now\n",
		       value, addr);
		mmio_write32((void *)addr, value);
	} else if (strcmp(mode, "mem-read") == 0) {
		printk("rogue: reading from 0x%lx (outside the cell) now\n",
		       addr);
		value = mmio_read32((void *)addr);
		printk("rogue: read 0x%x\n", value);
	} else if (strcmp(mode, "pio") == 0) {
		printk("rogue: %s port 0x%x (not the cell's) now\n",
		       write ? "writing 0 to" : "reading", port);
		if (write)
			outb(0, port);
		else
			printk("rogue: read 0x%x\n", inb(port));
	} else if (strcmp(mode, "pci") == 0) {
		printk("rogue: writing the vendor ID of %02x:%02x.%x now\n",
		       PCI_BUS(bdf), PCI_DEV(bdf), PCI_FN(bdf));
		pci_write_config(bdf, PCI_CFG_VENDOR_ID, 0xffff, 2);
	} else {
		printk("rogue: usage: mode=mem|mem-read|pio|pci [addr=] "
		       "[value=] [port=] [write] [bdf=]\n");
		printk("rogue: FAILED - no mode given\n");
		return;
	}
	/* on a hypervisor that enforces isolation, this is never reached */
	printk("rogue: FAILED - violation not stopped\n");
}
