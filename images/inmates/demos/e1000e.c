/*
 * e1000e: sends and receives Ethernet frames on an Intel 82574 (QEMU's
 * e1000e, 8086:10d3) passed through to the cell, with legacy descriptor
 * rings in cell RAM (so the RAM region needs the DMA flag) and polling.
 *
 * mode=loopback (default): MAC loopback (RCTL.LBM = 01): a broadcast frame
 * of ethertype 0x88b5 goes out and must come back unchanged.
 * mode=arp: a real network round trip: ARP "who-has gw= tell ip=" (default
 * 10.0.2.2 from 10.0.2.15, QEMU user networking) and wait for the reply.
 *
 *   e1000e: 00:02.0, BAR0 0xfea40000, MAC 52:54:00:12:34:56
 *   e1000e: link is up
 *   e1000e: sent 60 bytes (loopback)
 *   e1000e: received 60 bytes, content matches
 *   e1000e: PASSED
 *
 * Command line: bdf=N (default: first 8086:10d3 on buses 0-1), mode=,
 * ip=, gw= (dotted quads), count=N frames (default 3), wait-ms=N (per
 * frame and for the link, default 5000).
 */
#include <inmate.h>

#define E1000E_VENDOR	0x8086
#define E1000E_DEVICE	0x10d3

#define REG_CTRL	0x0000
#define  CTRL_SLU	(1 << 6)
#define  CTRL_RST	(1 << 26)
#define REG_STATUS	0x0008
#define  STATUS_LU	(1 << 1)
#define REG_IMC		0x00d8
#define REG_RCTL	0x0100
#define  RCTL_EN	(1 << 1)
#define  RCTL_LBM_MAC	(1 << 6)
#define  RCTL_BAM	(1 << 15)
#define  RCTL_SECRC	(1 << 26)
#define REG_TCTL	0x0400
#define  TCTL_EN	(1 << 1)
#define  TCTL_PSP	(1 << 3)
#define  TCTL_CT	(0x0f << 4)
#define  TCTL_COLD	(0x3f << 12)
#define REG_TIPG	0x0410
#define REG_RDBAL	0x2800
#define REG_RDBAH	0x2804
#define REG_RDLEN	0x2808
#define REG_RDH		0x2810
#define REG_RDT		0x2818
#define REG_TDBAL	0x3800
#define REG_TDBAH	0x3804
#define REG_TDLEN	0x3808
#define REG_TDH		0x3810
#define REG_TDT		0x3818
#define REG_MTA		0x5200
#define REG_RAL0	0x5400
#define REG_RAH0	0x5404

#define RING_SIZE	8
#define BUF_SIZE	2048
#define TXD_CMD_EOP	0x01
#define TXD_CMD_IFCS	0x02
#define TXD_CMD_RS	0x08
#define DESC_DD		0x01
#define RXD_EOP		0x02
#define ETH_TEST_TYPE	0x88b5
#define ETH_ARP		0x0806

struct rx_desc {
	u64 addr;
	u16 length;
	u16 csum;
	u8 status;
	u8 errors;
	u16 special;
} __attribute__((packed));

struct tx_desc {
	u64 addr;
	u16 length;
	u8 cso;
	u8 cmd;
	u8 status;
	u8 css;
	u16 special;
} __attribute__((packed));

static volatile u8 *regs;
static volatile struct rx_desc *rx_ring;
static volatile struct tx_desc *tx_ring;
static u8 *rx_bufs, *tx_buf;
static unsigned int rx_next, tx_next;
static u8 mac[6];

static u32 rd(unsigned int reg)
{
	return mmio_read32(regs + reg);
}

static void wr(unsigned int reg, u32 v)
{
	mmio_write32(regs + reg, v);
}

static bool poll_bits(unsigned int reg, u32 bits, bool set, u64 timeout_ns)
{
	u64 start = pm_timer_read();

	while (((rd(reg) & bits) == bits) != set) {
		if (pm_timer_read() - start > timeout_ns)
			return false;
		delay_us(1000);
	}
	return true;
}

static u32 parse_ip(const char *key, const char *def)
{
	char buf[20];
	const char *p = cmdline_parse_str(key, buf, sizeof(buf), def);
	u32 ip = 0, part = 0;
	int dots = 0;

	for (; *p; p++) {
		if (*p == '.') {
			ip = (ip << 8) | (part & 0xff);
			part = 0;
			dots++;
		} else {
			part = part * 10 + (*p - '0');
		}
	}
	ip = (ip << 8) | (part & 0xff);
	return dots == 3 ? ip : 0;
}

static void put16(u8 *p, u16 v)
{
	p[0] = v >> 8;
	p[1] = v;
}

static void put32(u8 *p, u32 v)
{
	put16(p, v >> 16);
	put16(p + 2, v);
}

static bool transmit(unsigned int len, u64 timeout_ns)
{
	volatile struct tx_desc *d = &tx_ring[tx_next];
	u64 start = pm_timer_read();

	d->addr = (u64)tx_buf;
	d->length = len;
	d->cmd = TXD_CMD_EOP | TXD_CMD_IFCS | TXD_CMD_RS;
	d->status = 0;
	mfence();
	tx_next = (tx_next + 1) % RING_SIZE;
	wr(REG_TDT, tx_next);
	while (!(d->status & DESC_DD)) {
		if (pm_timer_read() - start > timeout_ns)
			return false;
		delay_us(100);
	}
	return true;
}

/* Returns the length of the next received frame (0 on timeout); the
 * frame is in *frame until the next call. */
static unsigned int receive(u8 **frame, u64 timeout_ns)
{
	volatile struct rx_desc *d = &rx_ring[rx_next];
	u64 start = pm_timer_read();
	unsigned int len;

	while (!(d->status & DESC_DD)) {
		if (pm_timer_read() - start > timeout_ns)
			return 0;
		delay_us(100);
	}
	mfence();
	len = d->length;
	*frame = rx_bufs + rx_next * BUF_SIZE;
	/* hand the previous descriptor back to the device */
	d->status = 0;
	wr(REG_RDT, rx_next);
	rx_next = (rx_next + 1) % RING_SIZE;
	return len;
}

static void setup_rings(void)
{
	unsigned int i;

	rx_ring = zalloc(RING_SIZE * sizeof(*rx_ring), 128);
	tx_ring = zalloc(RING_SIZE * sizeof(*tx_ring), 128);
	rx_bufs = zalloc(RING_SIZE * BUF_SIZE, PAGE_SIZE);
	tx_buf = zalloc(BUF_SIZE, PAGE_SIZE);
	for (i = 0; i < RING_SIZE; i++)
		rx_ring[i].addr = (u64)(rx_bufs + i * BUF_SIZE);
	mfence();

	wr(REG_RDBAL, (u64)rx_ring);
	wr(REG_RDBAH, 0);
	wr(REG_RDLEN, RING_SIZE * sizeof(*rx_ring));
	wr(REG_RDH, 0);
	wr(REG_RDT, RING_SIZE - 1);
	wr(REG_TDBAL, (u64)tx_ring);
	wr(REG_TDBAH, 0);
	wr(REG_TDLEN, RING_SIZE * sizeof(*tx_ring));
	wr(REG_TDH, 0);
	wr(REG_TDT, 0);
}

static bool loopback_round(unsigned int n, u64 wait_ns)
{
	unsigned int len = 60, got;
	u8 *frame;

	memset(tx_buf, 0, len);
	memset(tx_buf, 0xff, 6);
	memcpy(tx_buf + 6, mac, 6);
	put16(tx_buf + 12, ETH_TEST_TYPE);
	snprintf((char *)tx_buf + 14, len - 14, "jhlab e1000e frame %u", n);
	if (!transmit(len, wait_ns)) {
		printk("e1000e: frame %u: transmit timed out\n", n);
		return false;
	}
	printk("e1000e: frame %u: sent %u bytes (loopback)\n", n, len);
	got = receive(&frame, wait_ns);
	if (!got) {
		printk("e1000e: frame %u: nothing received\n", n);
		return false;
	}
	if (got != len || memcmp(frame, tx_buf, len) != 0) {
		printk("e1000e: frame %u: received %u bytes, content differs\n",
		       n, got);
		return false;
	}
	printk("e1000e: frame %u: received %u bytes, content matches\n", n,
	       got);
	return true;
}

static bool arp_round(unsigned int n, u32 ip, u32 gw, u64 wait_ns)
{
	unsigned int len = 60, got, tries;
	u8 *f;

	memset(tx_buf, 0, len);
	memset(tx_buf, 0xff, 6);
	memcpy(tx_buf + 6, mac, 6);
	put16(tx_buf + 12, ETH_ARP);
	put16(tx_buf + 14, 1);			/* Ethernet */
	put16(tx_buf + 16, 0x0800);		/* IPv4 */
	tx_buf[18] = 6;
	tx_buf[19] = 4;
	put16(tx_buf + 20, 1);			/* request */
	memcpy(tx_buf + 22, mac, 6);
	put32(tx_buf + 28, ip);
	put32(tx_buf + 38, gw);
	if (!transmit(len, wait_ns)) {
		printk("e1000e: ARP %u: transmit timed out\n", n);
		return false;
	}
	printk("e1000e: ARP %u: who-has %u.%u.%u.%u sent\n", n, gw >> 24,
	       (gw >> 16) & 0xff, (gw >> 8) & 0xff, gw & 0xff);
	/* other traffic may arrive first: look at a few frames */
	for (tries = 0; tries < 16; tries++) {
		got = receive(&f, wait_ns);
		if (!got)
			break;
		if (got >= 42 && f[12] == 0x08 && f[13] == 0x06 &&
		    f[20] == 0 && f[21] == 2 &&
		    f[28] == gw >> 24 && f[29] == ((gw >> 16) & 0xff) &&
		    f[30] == ((gw >> 8) & 0xff) && f[31] == (gw & 0xff)) {
			printk("e1000e: ARP %u: reply, %u.%u.%u.%u is at "
			       "%02x:%02x:%02x:%02x:%02x:%02x\n", n, gw >> 24,
			       (gw >> 16) & 0xff, (gw >> 8) & 0xff, gw & 0xff,
			       f[22], f[23], f[24], f[25], f[26], f[27]);
			return true;
		}
	}
	printk("e1000e: ARP %u: no reply\n", n);
	return false;
}

void inmate_main(void)
{
	u64 wait_ns = cmdline_parse_int("wait-ms", 5000) * NS_PER_MSEC;
	unsigned int count = cmdline_parse_int("count", 3), n, good = 0;
	u32 ral, rah, ip, gw;
	char mode[16];
	bool arp;
	u64 bar;
	int bdf;

	cmdline_parse_str("mode", mode, sizeof(mode), "loopback");
	arp = strcmp(mode, "arp") == 0;
	if (!arp && strcmp(mode, "loopback") != 0) {
		printk("e1000e: unknown mode \"%s\": FAILED\n", mode);
		return;
	}
	bdf = cmdline_parse_int("bdf", -1);
	if (bdf < 0)
		bdf = pci_find_device(E1000E_VENDOR, E1000E_DEVICE, 0, 1);
	if (bdf < 0) {
		printk("e1000e: no e1000e device found: FAILED\n");
		return;
	}
	bar = pci_bar_address(bdf, 0);
	if (!bar) {
		printk("e1000e: BAR0 not assigned: FAILED\n");
		return;
	}
	map_range(bar, 0x20000, MAP_UNCACHED);
	regs = (volatile u8 *)bar;
	pci_write_config(bdf, PCI_CFG_COMMAND,
			 pci_read_config(bdf, PCI_CFG_COMMAND, 2) |
			 PCI_CMD_MEM | PCI_CMD_MASTER, 2);

	wr(REG_IMC, 0xffffffff);
	wr(REG_CTRL, rd(REG_CTRL) | CTRL_RST);
	delay_us(10000);
	if (!poll_bits(REG_CTRL, CTRL_RST, false, wait_ns)) {
		printk("e1000e: reset did not complete: FAILED\n");
		return;
	}
	wr(REG_IMC, 0xffffffff);
	wr(REG_CTRL, rd(REG_CTRL) | CTRL_SLU);

	ral = rd(REG_RAL0);
	rah = rd(REG_RAH0);
	mac[0] = ral;
	mac[1] = ral >> 8;
	mac[2] = ral >> 16;
	mac[3] = ral >> 24;
	mac[4] = rah;
	mac[5] = rah >> 8;
	printk("e1000e: %02x:%02x.%x, BAR0 0x%lx, MAC "
	       "%02x:%02x:%02x:%02x:%02x:%02x\n", PCI_BUS(bdf), PCI_DEV(bdf),
	       PCI_FN(bdf), bar, mac[0], mac[1], mac[2], mac[3], mac[4],
	       mac[5]);
	/* accept our unicast address (address-valid bit) */
	wr(REG_RAH0, rah | 0x80000000);
	for (n = 0; n < 128; n++)
		wr(REG_MTA + n * 4, 0);

	setup_rings();
	wr(REG_TIPG, 10 | (8 << 10) | (6 << 20));
	wr(REG_TCTL, TCTL_EN | TCTL_PSP | TCTL_CT | TCTL_COLD);
	wr(REG_RCTL, RCTL_EN | RCTL_BAM | RCTL_SECRC |
	   (arp ? 0 : RCTL_LBM_MAC));

	if (!poll_bits(REG_STATUS, STATUS_LU, true, wait_ns)) {
		printk("e1000e: link stays down: FAILED\n");
		return;
	}
	printk("e1000e: link is up\n");

	ip = parse_ip("ip", "10.0.2.15");
	gw = parse_ip("gw", "10.0.2.2");
	for (n = 1; n <= count; n++)
		good += arp ? arp_round(n, ip, gw, wait_ns) :
			loopback_round(n, wait_ns);
	wr(REG_RCTL, 0);
	wr(REG_TCTL, 0);
	printk("e1000e: %u/%u %s round trips: %s\n", good, count,
	       arp ? "ARP" : "loopback",
	       count && good == count ? "PASSED" : "FAILED");
}
