/*
 * PCI configuration access through ports 0xCF8/0xCFC (reference 4.3):
 * the address port is always written with a 4-byte OUT (the hypervisor
 * rejects anything else there); the data port is accessed at 0xCFC plus
 * the low address bits with the access size. Only the first 256 bytes of
 * config space are reachable this way.
 */
#include <inmate.h>

#define PCI_ADDR_PORT	0xcf8
#define PCI_DATA_PORT	0xcfc
#define PCI_ADDR_ENABLE	0x80000000

#define MSI_CTRL_ENABLE		0x0001
#define MSI_CTRL_64BIT		0x0080
#define MSIX_CTRL_ENABLE	0x8000
#define MSIX_CTRL_FMASK		0x4000

static volatile u32 pci_lock;

/* Takes the lock with interrupts off (an interrupt handler may access
 * config space too, see irqs_save); returns the flags for pci_unlock(). */
static unsigned long pci_select(u16 bdf, unsigned int addr)
{
	unsigned long flags = irqs_save();

	while (__atomic_exchange_n(&pci_lock, 1, __ATOMIC_ACQUIRE))
		cpu_relax();
	outl(PCI_ADDR_ENABLE | ((u32)bdf << 8) | (addr & 0xfc), PCI_ADDR_PORT);
	return flags;
}

static void pci_unlock(unsigned long flags)
{
	__atomic_store_n(&pci_lock, 0, __ATOMIC_RELEASE);
	irqs_restore(flags);
}

u32 pci_read_config(u16 bdf, unsigned int addr, unsigned int size)
{
	u16 port = PCI_DATA_PORT + (addr & 3);
	unsigned long flags;
	u32 v;

	flags = pci_select(bdf, addr);
	if (size == 1)
		v = inb(port);
	else if (size == 2)
		v = inw(port);
	else
		v = inl(port);
	pci_unlock(flags);
	return v;
}

void pci_write_config(u16 bdf, unsigned int addr, u32 value,
		      unsigned int size)
{
	u16 port = PCI_DATA_PORT + (addr & 3);
	unsigned long flags;

	flags = pci_select(bdf, addr);
	if (size == 1)
		outb(value, port);
	else if (size == 2)
		outw(value, port);
	else
		outl(value, port);
	pci_unlock(flags);
}

int pci_find_device(u16 vendor, u16 device, u16 start_bdf, u8 max_bus)
{
	unsigned int bdf;
	u32 id;

	for (bdf = start_bdf; bdf < ((unsigned int)max_bus + 1) << 8; bdf++) {
		id = pci_read_config(bdf, PCI_CFG_VENDOR_ID, 4);
		if ((id & 0xffff) == 0xffff)
			continue;
		if ((vendor == 0xffff || (id & 0xffff) == vendor) &&
		    (device == 0xffff || (id >> 16) == device))
			return bdf;
	}
	return PCI_NO_DEVICE;
}

unsigned int pci_find_cap(u16 bdf, u8 cap_id)
{
	unsigned int pos, guard;

	if (!(pci_read_config(bdf, PCI_CFG_STATUS, 2) & PCI_STS_CAPS))
		return 0;
	pos = pci_read_config(bdf, PCI_CFG_CAP_PTR, 1) & 0xfc;
	/* 48 capabilities fill 192 bytes: more means a loop */
	for (guard = 0; pos >= 0x40 && guard < 48; guard++) {
		if (pci_read_config(bdf, pos, 1) == cap_id)
			return pos;
		pos = pci_read_config(bdf, pos + 1, 1) & 0xfc;
	}
	return 0;
}

u64 pci_bar_address(u16 bdf, unsigned int bar)
{
	u32 lo = pci_read_config(bdf, PCI_CFG_BAR + bar * 4, 4);

	if (lo & 1)			/* I/O BAR */
		return lo & ~3u;
	if ((lo & 6) == 4 && bar < 5)	/* 64-bit memory BAR */
		return (lo & ~0xfu) |
			((u64)pci_read_config(bdf, PCI_CFG_BAR + bar * 4 + 4,
					      4) << 32);
	return lo & ~0xfu;
}

static u32 msi_address(void)
{
	return 0xfee00000 | (cpu_apic_id() << 12);
}

bool pci_msi_set_vector(u16 bdf, unsigned int vector)
{
	unsigned int cap = pci_find_cap(bdf, PCI_CAP_MSI);
	u16 ctrl;

	if (!cap)
		return false;
	ctrl = pci_read_config(bdf, cap + 2, 2);
	pci_write_config(bdf, cap + 4, msi_address(), 4);
	if (ctrl & MSI_CTRL_64BIT) {
		pci_write_config(bdf, cap + 8, 0, 4);
		pci_write_config(bdf, cap + 12, vector, 2);
	} else {
		pci_write_config(bdf, cap + 8, vector, 2);
	}
	/* one vector (MME = 0), enabled */
	pci_write_config(bdf, cap + 2, (ctrl & ~0x0070) | MSI_CTRL_ENABLE, 2);
	return true;
}

u64 pci_msix_table_address(u16 bdf)
{
	unsigned int cap = pci_find_cap(bdf, PCI_CAP_MSIX);
	u32 table;

	if (!cap)
		return 0;
	table = pci_read_config(bdf, cap + 4, 4);
	return pci_bar_address(bdf, table & 7) + (table & ~7u);
}

bool pci_msix_set_vector(u16 bdf, unsigned int vector, unsigned int index,
			 volatile void *table)
{
	unsigned int cap = pci_find_cap(bdf, PCI_CAP_MSIX);
	volatile u8 *entry;
	u16 ctrl;

	if (!cap || index > (pci_read_config(bdf, cap + 2, 2) & 0x7ff))
		return false;
	if (!table) {
		table = (volatile void *)pci_msix_table_address(bdf);
		map_range((u64)table, PAGE_SIZE, MAP_UNCACHED);
	}
	entry = (volatile u8 *)table + index * 16;
	mmio_write32(entry + 0, msi_address());
	mmio_write32(entry + 4, 0);
	mmio_write32(entry + 8, vector);
	mmio_write32(entry + 12, 0);		/* unmasked */
	ctrl = pci_read_config(bdf, cap + 2, 2);
	pci_write_config(bdf, cap + 2,
			 (ctrl & ~MSIX_CTRL_FMASK) | MSIX_CTRL_ENABLE, 2);
	return true;
}
