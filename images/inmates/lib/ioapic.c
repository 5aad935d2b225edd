/*
 * The IOAPIC as a cell sees it (reference 4.6): the index/data register
 * pair of the 82093AA at the standard base, of which a cell may touch the
 * redirection entries of the pins its config gives it (two 32-bit registers
 * per pin from index 0x10; write the high half first, so the entry is never
 * live with a stale destination).
 */
#include <inmate.h>

#define IOAPIC_INDEX		0x00
#define IOAPIC_DATA		0x10
#define IOAPIC_REDIR_TBL	0x10

static void ioapic_write(unsigned int index, u32 value)
{
	mmio_write32((void *)(IOAPIC_BASE + IOAPIC_INDEX), index);
	mmio_write32((void *)(IOAPIC_BASE + IOAPIC_DATA), value);
}

static u32 ioapic_read(unsigned int index)
{
	mmio_write32((void *)(IOAPIC_BASE + IOAPIC_INDEX), index);
	return mmio_read32((void *)(IOAPIC_BASE + IOAPIC_DATA));
}

void ioapic_init(void)
{
	map_range(IOAPIC_BASE, PAGE_SIZE, MAP_UNCACHED);
}

void ioapic_pin_set(unsigned int pin, unsigned int vector, u32 flags)
{
	ioapic_write(IOAPIC_REDIR_TBL + 2 * pin + 1, cpu_apic_id() << 24);
	ioapic_write(IOAPIC_REDIR_TBL + 2 * pin, flags | vector);
}

void ioapic_pin_mask(unsigned int pin, bool masked)
{
	u32 low = ioapic_read(IOAPIC_REDIR_TBL + 2 * pin);

	low = masked ? low | IOAPIC_MASKED : low & ~IOAPIC_MASKED;
	ioapic_write(IOAPIC_REDIR_TBL + 2 * pin, low);
}
