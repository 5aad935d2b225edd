/*
 * ivshmem: one peer of an ivshmem v2 link (reference 4.8), talking to
 * another peer that runs the same demo.
 *
 * Finds the device (110a:4106), reads the shared-memory layout from its
 * vendor capability, places BAR0 (registers) and BAR1 (MSI-X) at bar=
 * (default 0xff000000), enables MSI-X (vector 0 = peer state change,
 * vector 1 = doorbell) and the interrupt control register, writes a
 * greeting into its own output section and a mark into the R/W section,
 * then sets its state to 1 (ready). Once the target peer is ready too, it
 * rings the target's doorbell (vector 1), waits for the target's doorbell,
 * checks the target's greeting and mark, sets state 2 (done) and waits
 * for the target to be done as well. R/W section: peer n's mark at n * 64;
 * its last 64 bytes hold the console lock word both peers take around each
 * line (they print on the same UART; console_share_lock()).
 *
 *   ivshmem: 01:0e.0, ID 1 of 3 peers, protocol 0x0000
 *   ivshmem: shared memory at 0x3f0f0000: state table 0x1000, R/W 0x9000, output 0x2000 x 3
 *   ivshmem: waiting for peer 2
 *   ivshmem: peer 2 is ready
 *   ivshmem: doorbell from peer received (vector 1)
 *   ivshmem: peer 2 says "ivshmem: hello from peer 2"
 *   ivshmem: R/W section mark of peer 2 found
 *   ivshmem: 2 state-change and 1 doorbell interrupts
 *   ivshmem: state, doorbell and shared data with peer 2: PASSED
 *
 * Command line: bdf=N (default: first ivshmem device on buses 0-1),
 * target=N (default: with 3+ peers the other of 1 and 2, else the other
 * of 0 and 1), bar=ADDR, wait-ms=N (per step, default 30000).
 */
#include <inmate.h>

#define IVSHMEM_VENDOR		0x110a
#define IVSHMEM_DEVICE		0x4106
#define REG_ID			0x00
#define REG_MAX_PEERS		0x04
#define REG_INT_CTRL		0x08
#define REG_DOORBELL		0x0c
#define REG_STATE		0x10
#define IRQ_BASE		0x50
#define STATE_READY		1
#define STATE_DONE		2
#define GREETING		"ivshmem: hello from peer "

static volatile unsigned long irqs[2];

static void ivshmem_irq(unsigned int vector)
{
	irqs[vector - IRQ_BASE]++;
}

static u64 cfg64(u16 bdf, unsigned int off)
{
	return pci_read_config(bdf, off, 4) |
		((u64)pci_read_config(bdf, off + 4, 4) << 32);
}

static bool wait_until(volatile u32 *word, u32 at_least,
		       volatile unsigned long *counter, u64 timeout_ns)
{
	u64 start = pm_timer_read();

	for (;;) {
		if (word && *word >= at_least)
			return true;
		if (counter && *counter >= at_least)
			return true;
		if (pm_timer_read() - start > timeout_ns)
			return false;
		delay_us(1000);
	}
}

void inmate_main(void)
{
	u64 bar = cmdline_parse_int("bar", 0xff000000);
	u64 wait_ns = cmdline_parse_int("wait-ms", 30000) * NS_PER_MSEC;
	u64 shmem, rw_size, out_size, state_size;
	volatile u32 *state_table;
	volatile u8 *regs, *rw, *out, *peer_out;
	unsigned int cap, msix, vectors, v;
	u32 id, peers, target, class_rev;
	char expected[64], mark[64];
	bool layout_ok, data_ok, mark_ok, bell_ok, done_ok;
	int bdf;

	bdf = cmdline_parse_int("bdf", -1);
	if (bdf < 0)
		bdf = pci_find_device(IVSHMEM_VENDOR, IVSHMEM_DEVICE, 0, 1);
	if (bdf < 0) {
		printk("ivshmem: no ivshmem device found: FAILED\n");
		return;
	}
	cap = pci_find_cap(bdf, PCI_CAP_VENDOR);
	if (!cap) {
		printk("ivshmem: no vendor capability: FAILED\n");
		return;
	}
	state_size = pci_read_config(bdf, cap + 4, 4);
	rw_size = cfg64(bdf, cap + 8);
	out_size = cfg64(bdf, cap + 0x10);
	shmem = cfg64(bdf, cap + 0x18);

	pci_write_config(bdf, PCI_CFG_BAR, bar, 4);
	pci_write_config(bdf, PCI_CFG_BAR + 4, bar + PAGE_SIZE, 4);
	pci_write_config(bdf, PCI_CFG_COMMAND, PCI_CMD_MEM | PCI_CMD_MASTER,
			 2);
	map_range(bar, 2 * PAGE_SIZE, MAP_UNCACHED);
	regs = (volatile u8 *)bar;

	id = mmio_read32(regs + REG_ID);
	peers = mmio_read32(regs + REG_MAX_PEERS);
	class_rev = pci_read_config(bdf, PCI_CFG_CLASS_REV, 4);
	layout_ok = peers >= 2 && id < peers && state_size && out_size;
	if (layout_ok) {
		map_range(shmem, state_size + rw_size + peers * out_size,
			  MAP_CACHED);
		/* the peer prints on the same UART: keep our lines apart */
		if (rw_size >= (u64)(peers + 1) * 64)
			console_share_lock((volatile u32 *)(shmem + state_size +
							    rw_size - 64));
	}
	printk("ivshmem: %02x:%02x.%x, ID %u of %u peers, protocol 0x%04x\n",
	       PCI_BUS(bdf), PCI_DEV(bdf), PCI_FN(bdf), id, peers,
	       (class_rev >> 8) & 0xffff);
	printk("ivshmem: shared memory at 0x%lx: state table 0x%lx, R/W "
	       "0x%lx, output 0x%lx x %u\n", shmem, state_size, rw_size,
	       out_size, peers);
	if (!layout_ok) {
		printk("ivshmem: unusable layout: FAILED\n");
		return;
	}
	state_table = (volatile u32 *)shmem;
	rw = (volatile u8 *)(shmem + state_size);
	out = rw + rw_size + id * out_size;

	target = cmdline_parse_int("target", peers >= 3 ? (id == 1 ? 2 : 1) :
				   (id == 0 ? 1 : 0));
	if (target >= peers || target == id) {
		printk("ivshmem: bad target %u: FAILED\n", target);
		return;
	}
	peer_out = rw + rw_size + target * out_size;

	/* interrupts first, so the peer's doorbell cannot get lost */
	msix = pci_find_cap(bdf, PCI_CAP_MSIX);
	vectors = msix ? (pci_read_config(bdf, msix + 2, 2) & 0x7ff) + 1 : 0;
	for (v = 0; v < 2 && v < vectors; v++) {
		irq_set_handler(IRQ_BASE + v, ivshmem_irq);
		pci_msix_set_vector(bdf, IRQ_BASE + v, v,
				    (void *)(bar + PAGE_SIZE));
	}
	mmio_write32(regs + REG_INT_CTRL, 1);
	enable_irqs();

	snprintf((char *)out, out_size, GREETING "%u", id);
	if (rw_size >= (u64)(id + 1) * 64)
		snprintf((char *)rw + id * 64, 64, "peer %u was here", id);
	mfence();
	mmio_write32(regs + REG_STATE, STATE_READY);

	printk("ivshmem: waiting for peer %u\n", target);
	if (!wait_until(&state_table[target], STATE_READY, NULL, wait_ns)) {
		printk("ivshmem: peer %u never became ready (state %u): "
		       "FAILED\n", target, state_table[target]);
		return;
	}
	printk("ivshmem: peer %u is ready\n", target);
	mmio_write32(regs + REG_DOORBELL, (target << 16) | 1);

	bell_ok = vectors > 1 && wait_until(NULL, 1, &irqs[1], wait_ns);
	if (bell_ok)
		printk("ivshmem: doorbell from peer received (vector 1)\n");
	else
		printk("ivshmem: no doorbell received\n");

	snprintf(expected, sizeof(expected), GREETING "%u", target);
	data_ok = strncmp((const char *)peer_out, expected, 64) == 0;
	printk("ivshmem: peer %u says \"%s\"\n", target,
	       data_ok ? expected : "(something else)");
	mark_ok = true;
	if (rw_size >= (u64)(target + 1) * 64) {
		snprintf(mark, sizeof(mark), "peer %u was here", target);
		mark_ok = strncmp((const char *)rw + target * 64, mark, 64)
			== 0;
		printk("ivshmem: R/W section mark of peer %u %s\n", target,
		       mark_ok ? "found" : "missing");
	}

	mmio_write32(regs + REG_STATE, STATE_DONE);
	done_ok = wait_until(&state_table[target], STATE_DONE, NULL, wait_ns);
	printk("ivshmem: %lu state-change and %lu doorbell interrupts\n",
	       irqs[0], irqs[1]);
	printk("ivshmem: state, doorbell and shared data with peer %u: %s\n",
	       target, bell_ok && data_ok && mark_ok && done_ok ?
	       "PASSED" : "FAILED");
	disable_irqs();
}
