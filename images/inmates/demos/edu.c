/*
 * edu: drives QEMU's "edu" teaching device (1234:11e8) passed through to
 * the cell: MMIO registers, factorial unit, DMA engine and MSI.
 *
 *   edu: 01:01.0, BAR0 0xfe800000
 *   edu: ID register 0x010000ed: ok
 *   edu: liveness check: ok
 *   edu: 10! = 3628800: ok (MSI, status 0x1)
 *   edu: raised interrupt 0x4000: ok (MSI)
 *   edu: DMA RAM -> device -> RAM, 2048 bytes to 0x...: ok (MSI, status 0x100)
 *   edu: PASSED
 *
 * Register map (QEMU docs/specs/edu.txt): 0x00 ID, 0x04 liveness (reads
 * back inverted), 0x08 factorial, 0x20 status (bit 0 busy, bit 7 raise
 * interrupt when the factorial is done), 0x24 interrupt status, 0x60 raise,
 * 0x64 acknowledge, 0x80/0x88/0x90/0x98 DMA source, destination, count,
 * command (bit 0 start, bit 1 device-to-RAM, bit 2 interrupt when done);
 * the device's DMA buffer is at 0x40000 (4 KiB). DMA uses cell addresses,
 * so the cell RAM must carry the DMA flag. A transfer must end strictly
 * inside the device buffer: QEMU 7.2 aborts the whole machine otherwise (its
 * range check is off by one), so 2 KiB move. The destination buffer holds
 * (i * 7 + 3) & 0xff at byte i afterwards; its cell address is printed so a
 * host can read it back.
 *
 * Command line: bdf=N (default: first 1234:11e8 on buses 0-1), wait-ms=N
 * (per step, default 5000).
 */
#include <inmate.h>

#define EDU_VENDOR		0x1234
#define EDU_DEVICE		0x11e8
#define EDU_ID_VALUE		0x010000ed
#define EDU_ID			0x00
#define EDU_LIVENESS		0x04
#define EDU_FACTORIAL		0x08
#define EDU_STATUS		0x20
#define  EDU_STATUS_BUSY	0x01
#define  EDU_STATUS_IRQFACT	0x80
#define EDU_IRQ_STATUS		0x24
#define EDU_IRQ_RAISE		0x60
#define EDU_IRQ_ACK		0x64
#define EDU_DMA_SRC		0x80
#define EDU_DMA_DST		0x88
#define EDU_DMA_COUNT		0x90
#define EDU_DMA_CMD		0x98
#define  EDU_DMA_START		0x01
#define  EDU_DMA_TO_RAM		0x02
#define  EDU_DMA_IRQ		0x04
#define EDU_DMA_BUFFER		0x40000
#define DMA_SIZE		2048
#define EDU_VECTOR		0x60

static volatile u8 *edu;
static volatile unsigned long irq_count;
static volatile u32 irq_status;

static void edu_irq(unsigned int vector)
{
	u32 status = mmio_read32(edu + EDU_IRQ_STATUS);

	irq_status = status;
	mmio_write32(edu + EDU_IRQ_ACK, status);
	irq_count++;
}

/* Waits until irq_count reaches `count` (or a timeout). */
static bool wait_irqs(unsigned long count, u64 timeout_ns)
{
	u64 start = pm_timer_read();

	while (irq_count < count) {
		if (pm_timer_read() - start > timeout_ns)
			return false;
		delay_us(1000);
	}
	return true;
}

static bool wait_idle(unsigned int reg, u32 busy_bits, u64 timeout_ns)
{
	u64 start = pm_timer_read();

	while (mmio_read32(edu + reg) & busy_bits) {
		if (pm_timer_read() - start > timeout_ns)
			return false;
		delay_us(1000);
	}
	return true;
}

static bool dma(u64 src, u64 dst, u64 count, u32 cmd, u64 timeout_ns)
{
	mmio_write64(edu + EDU_DMA_SRC, src);
	mmio_write64(edu + EDU_DMA_DST, dst);
	mmio_write64(edu + EDU_DMA_COUNT, count);
	mmio_write64(edu + EDU_DMA_CMD, cmd | EDU_DMA_START | EDU_DMA_IRQ);
	return wait_idle(EDU_DMA_CMD, EDU_DMA_START, timeout_ns);
}

void inmate_main(void)
{
	u64 wait_ns = cmdline_parse_int("wait-ms", 5000) * NS_PER_MSEC;
	bool ok = true, step, msi;
	unsigned long before;
	u8 *src, *dst;
	u64 bar;
	u32 v;
	int bdf, i;

	bdf = cmdline_parse_int("bdf", -1);
	if (bdf < 0)
		bdf = pci_find_device(EDU_VENDOR, EDU_DEVICE, 0, 1);
	if (bdf < 0) {
		printk("edu: no edu device found: FAILED\n");
		return;
	}
	bar = pci_bar_address(bdf, 0);
	printk("edu: %02x:%02x.%x, BAR0 0x%lx\n", PCI_BUS(bdf), PCI_DEV(bdf),
	       PCI_FN(bdf), bar);
	if (!bar) {
		printk("edu: BAR0 not assigned: FAILED\n");
		return;
	}
	map_range(bar, 0x100000, MAP_UNCACHED);
	edu = (volatile u8 *)bar;
	pci_write_config(bdf, PCI_CFG_COMMAND,
			 pci_read_config(bdf, PCI_CFG_COMMAND, 2) |
			 PCI_CMD_MEM | PCI_CMD_MASTER, 2);

	v = mmio_read32(edu + EDU_ID);
	step = v == EDU_ID_VALUE;
	printk("edu: ID register 0x%08x: %s\n", v, step ? "ok" : "WRONG");
	if (!step) {
		printk("edu: FAILED\n");
		return;
	}

	mmio_write32(edu + EDU_LIVENESS, 0x12345678);
	v = mmio_read32(edu + EDU_LIVENESS);
	step = v == ~0x12345678U;
	ok &= step;
	printk("edu: liveness check: %s\n", step ? "ok" : "WRONG");

	irq_set_handler(EDU_VECTOR, edu_irq);
	msi = pci_msi_set_vector(bdf, EDU_VECTOR);
	if (!msi)
		printk("edu: no MSI capability\n");
	enable_irqs();

	before = irq_count;
	mmio_write32(edu + EDU_STATUS, EDU_STATUS_IRQFACT);
	mmio_write32(edu + EDU_FACTORIAL, 10);
	step = wait_idle(EDU_STATUS, EDU_STATUS_BUSY, wait_ns);
	v = mmio_read32(edu + EDU_FACTORIAL);
	step = step && v == 3628800;
	ok &= step;
	printk("edu: 10! = %u: %s", v, step ? "ok" : "WRONG");
	step = wait_irqs(before + 1, wait_ns) && irq_status == 0x1;
	ok &= step;
	printk(" (%s, status 0x%x)\n", step ? "MSI" : "no MSI", irq_status);
	mmio_write32(edu + EDU_STATUS, 0);

	before = irq_count;
	mmio_write32(edu + EDU_IRQ_RAISE, 0x4000);
	step = wait_irqs(before + 1, wait_ns) && irq_status == 0x4000;
	ok &= step;
	printk("edu: raised interrupt 0x4000: %s (%s)\n", step ? "ok" : "WRONG",
	       irq_count != before ? "MSI" : "no MSI");

	src = zalloc(DMA_SIZE, PAGE_SIZE);
	dst = zalloc(DMA_SIZE, PAGE_SIZE);
	for (i = 0; i < DMA_SIZE; i++)
		src[i] = (u8)(i * 7 + 3);
	mfence();
	before = irq_count;
	step = dma((u64)src, EDU_DMA_BUFFER, DMA_SIZE, 0, wait_ns) &&
		dma(EDU_DMA_BUFFER, (u64)dst, DMA_SIZE, EDU_DMA_TO_RAM,
		    wait_ns);
	mfence();
	step = step && memcmp(src, dst, DMA_SIZE) == 0;
	ok &= step;
	msi = wait_irqs(before + 2, wait_ns) && irq_status == 0x100;
	ok &= msi;
	printk("edu: DMA RAM -> device -> RAM, %u bytes to 0x%lx: %s (%s, "
	       "status 0x%x)\n", DMA_SIZE, (u64)dst, step ? "ok" : "WRONG",
	       msi ? "MSI" : "no MSI", irq_status);

	disable_irqs();
	printk("edu: %s\n", ok ? "PASSED" : "FAILED");
}
