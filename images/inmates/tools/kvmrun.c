/*
 * kvmrun - boot a jhlab inmate image in a bare KVM VM with the Jailhouse
 * x86 start state (reference section 5.1) and show what it does.
 *
 * This is a test tool, not the hypervisor model: it gives the inmate just
 * enough of a cell to run in.
 *
 *   - cell RAM at guest-physical 0 (default 1 MiB) with the image at 0 and
 *     an optional command line string at 0x1000;
 *   - a comm region page at 0x100000 filled as the hypervisor fills it at
 *     cell start (section 3.3): "JHCOMM", revision 2, console 8250 PIO at
 *     the UART port, PM timer port, number of CPUs, tsc/apic kHz;
 *   - optionally the test device page at 0x101000 (only offsets 0xff8..0xfff,
 *     redirected to the comm page like Jailhouse's CONFIG_TEST_DEVICE);
 *   - in-kernel irqchip, CPUID from KVM_GET_SUPPORTED_CPUID, every vCPU's
 *     local APIC switched to x2APIC mode before start, every vCPU runnable
 *     in real mode at CS=0 IP=0 (all cell CPUs start at once), none of
 *     them flagged BSP in IA32_APIC_BASE (cell CPUs are APs, and KVM
 *     resets a BSP to the reset vector on INIT instead of awaiting SIPI);
 *   - UART: bytes written to THR of the console port go to stdout, LSR reads
 *     say "transmitter empty"; PM timer reads come from CLOCK_MONOTONIC;
 *     0xCF8/0xCFC answer like a bus with no devices (all ones), unless
 *   - --ivshmem ID:PEERS adds an ivshmem v2 endpoint (reference 4.8) at
 *     01:0e.0 with its shared memory at 0x3f0f0000 and a simulated peer
 *     that plays the ivshmem demo's part, and --edu adds QEMU's edu device
 *     (ID, liveness, factorial, DMA against cell RAM, MSI) at 01:01.0;
 *   - every other exit is reported on stderr.
 *
 * It can also play the hypervisor's part in the message protocol
 * (section 3.2): --shutdown-at T sends SHUTDOWN_REQUEST at T seconds and
 * reports the reply.
 *
 * Exit status: 0 when every --expect string was seen (or, without --expect,
 * when the run ended by timeout or by the cell shutting down), 1 when an
 * expected string did not appear before the timeout, 2 on usage or KVM
 * set-up errors, 3 when a --fail string appeared or the VM died (triple
 * fault, entry failure, internal error).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_CPUS	8
#define MAX_PATTERNS	16
#define COMM_BASE	0x100000UL
#define TESTDEV_BASE	0x101000UL
#define OUT_MAX		(1 << 20)

#define MSR_IA32_APIC_BASE	0x1b
#define APIC_BASE_EXTD		0x400
#define APIC_BASE_EN		0x800

#define PM_TIMER_HZ	3579545ULL

/* comm region offsets, reference section 3.3 */
#define COMM_CELL_STATE		8
#define COMM_MSG_TO_CELL	12
#define COMM_REPLY_FROM_CELL	16
#define COMM_FLAGS		20
#define COMM_CONSOLE		24
#define COMM_MMCONFIG		56
#define COMM_PM_TIMER		64
#define COMM_NUM_CPUS		66
#define COMM_TSC_KHZ		68
#define COMM_APIC_KHZ		72

static const char *const state_names[] = {
	"running", "running/locked", "shut down", "failed", "Comm ABI mismatch",
};
static const char *const reply_names[] = {
	"none", "UNKNOWN", "REQUEST_DENIED", "REQUEST_APPROVED", "RECEIVED",
};

struct vcpu {
	int index;
	int fd;
	struct kvm_run *run;
	pthread_t thread;
};

static struct {
	int kvm_fd;
	int vm_fd;
	int num_cpus;
	size_t mem_size;
	uint8_t *mem;
	volatile uint8_t *comm;
	uint16_t uart;
	uint16_t pm_timer;
	int testdev;
	int verbose;
	struct vcpu cpus[MAX_CPUS];
	struct timespec start;

	pthread_mutex_t lock;
	char out[OUT_MAX];
	size_t out_len;
	int dead;		/* VM died: triple fault, entry failure, ... */
	int reported;		/* number of "other exit" lines printed */
	unsigned long long exits_other;
	uint32_t pci_addr;
} vm = {
	.lock = PTHREAD_MUTEX_INITIALIZER,
};

static void die(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	fprintf(stderr, "kvmrun: ");
	vfprintf(stderr, fmt, ap);
	if (errno)
		fprintf(stderr, ": %s", strerror(errno));
	fprintf(stderr, "\n");
	va_end(ap);
	exit(2);
}

static double elapsed(void)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (now.tv_sec - vm.start.tv_sec) +
		(now.tv_nsec - vm.start.tv_nsec) / 1e9;
}

static void report(int cpu, const char *fmt, ...)
{
	va_list ap;

	pthread_mutex_lock(&vm.lock);
	vm.exits_other++;
	if (vm.reported < 50 || vm.verbose) {
		va_start(ap, fmt);
		fprintf(stderr, "[kvmrun %.3f cpu%d] ", elapsed(), cpu);
		vfprintf(stderr, fmt, ap);
		fprintf(stderr, "\n");
		va_end(ap);
		if (++vm.reported == 50 && !vm.verbose)
			fprintf(stderr, "[kvmrun] further exit reports suppressed\n");
	}
	pthread_mutex_unlock(&vm.lock);
}

static void uart_output(uint8_t c)
{
	pthread_mutex_lock(&vm.lock);
	if (vm.out_len < OUT_MAX - 1) {
		vm.out[vm.out_len++] = c;
		vm.out[vm.out_len] = 0;
	}
	if (c != '\r')
		fputc(c, stdout);
	if (c == '\n')
		fflush(stdout);
	pthread_mutex_unlock(&vm.lock);
}

static uint32_t pm_timer_value(void)
{
	struct timespec now;
	unsigned long long ns;

	clock_gettime(CLOCK_MONOTONIC, &now);
	ns = (now.tv_sec - vm.start.tv_sec) * 1000000000ULL +
		now.tv_nsec - vm.start.tv_nsec;
	return (uint32_t)((ns / 1000000000ULL) * PM_TIMER_HZ +
		(ns % 1000000000ULL) * PM_TIMER_HZ / 1000000000ULL) & 0xffffff;
}


/* ---------------------------------------------------------------------- */
/* Optional PCI devices: an ivshmem v2 endpoint with a simulated peer and */
/* QEMU's edu device, enough to run the ivshmem and edu demos.            */

#define IVSHMEM_BDF		0x0170		/* 01:0e.0, as in the lab */
#define IVSHMEM_SHMEM		0x3f0f0000UL	/* the lab's demo link */
#define IVSHMEM_STATE_SIZE	0x1000
#define IVSHMEM_RW_SIZE		0x9000
#define IVSHMEM_OUT_SIZE	0x2000
#define IVSHMEM_VECTORS		16
#define EDU_BDF			0x0108		/* 01:01.0, as in the lab */
#define EDU_BAR0		0xfe800000U

struct pci_dev {
	int present;
	uint16_t bdf;
	uint8_t cfg[256];
	uint32_t bar_mask[6];
};

static struct {
	struct pci_dev pci;
	uint32_t id, peers, peer;	/* our ID, link size, simulated peer */
	uint8_t *shmem;
	size_t shmem_size;
	uint32_t int_ctrl;
	uint8_t msix[IVSHMEM_VECTORS * 16];
	int doorbell_from_guest;	/* guest rang the simulated peer */
	int peer_step;
	uint32_t last_guest_state;
} ivs;

static struct {
	struct pci_dev pci;
	uint32_t liveness, factorial, status, irq_status;
	uint64_t dma_src, dma_dst, dma_count, dma_cmd;
	uint8_t buffer[4096];
	unsigned long msis;
} edu;

static uint32_t cfg_read(const struct pci_dev *d, unsigned int reg,
			 unsigned int size)
{
	uint32_t v = 0;

	memcpy(&v, d->cfg + reg, size);
	return v;
}

static void cfg_put(struct pci_dev *d, unsigned int reg, uint32_t v,
		    unsigned int size)
{
	memcpy(d->cfg + reg, &v, size);
}

/* Writable: command, BARs (masked), interrupt line, MSI/MSI-X fields. */
static void cfg_write(struct pci_dev *d, unsigned int reg, uint32_t v,
		      unsigned int size)
{
	unsigned int i, byte;

	for (i = 0; i < size; i++) {
		byte = reg + i;
		uint8_t b = v >> (8 * i);

		if (byte >= 0x10 && byte < 0x28) {
			unsigned int bar = (byte - 0x10) / 4, shift =
				8 * ((byte - 0x10) % 4);
			uint32_t mask = d->bar_mask[bar], cur;

			memcpy(&cur, d->cfg + 0x10 + bar * 4, 4);
			cur = (cur & ~(0xffu << shift)) |
				((uint32_t)b << shift & mask) |
				(cur & ~mask & (0xffu << shift));
			memcpy(d->cfg + 0x10 + bar * 4, &cur, 4);
		} else if (byte == 0x04 || byte == 0x05 || byte == 0x3c ||
			   byte >= 0x40) {
			d->cfg[byte] = b;
		}
	}
}

static struct pci_dev *pci_lookup(uint16_t bdf)
{
	if (ivs.pci.present && ivs.pci.bdf == bdf)
		return &ivs.pci;
	if (edu.pci.present && edu.pci.bdf == bdf)
		return &edu.pci;
	return NULL;
}

static void signal_msi(uint32_t addr_lo, uint32_t addr_hi, uint32_t data)
{
	struct kvm_msi msi = {
		.address_lo = addr_lo, .address_hi = addr_hi, .data = data,
	};

	if (ioctl(vm.vm_fd, KVM_SIGNAL_MSI, &msi) < 0)
		fprintf(stderr, "[kvmrun] KVM_SIGNAL_MSI failed: %s\n",
			strerror(errno));
}

static uint32_t bar_base(const struct pci_dev *d, int bar)
{
	return cfg_read(d, 0x10 + bar * 4, 4) & ~0xfu;
}

static int mem_enabled(const struct pci_dev *d)
{
	return cfg_read(d, 0x04, 2) & 0x2;
}

/* ivshmem: vector v to the guest if every enable bit says so (ref. 4.8) */
static void ivshmem_interrupt(unsigned int vector)
{
	uint16_t ctrl = cfg_read(&ivs.pci, 0x62, 2);
	uint8_t *e = ivs.msix + vector * 16;
	uint32_t lo, hi, data, vctrl;

	memcpy(&lo, e, 4);
	memcpy(&hi, e + 4, 4);
	memcpy(&data, e + 8, 4);
	memcpy(&vctrl, e + 12, 4);
	if (!(ivs.int_ctrl & 1) || !(ctrl & 0x8000) || (ctrl & 0x4000) ||
	    (vctrl & 1) || !(cfg_read(&ivs.pci, 0x04, 2) & 0x4))
		return;
	signal_msi(lo, hi, data);
}

static volatile uint32_t *ivshmem_state(uint32_t peer)
{
	return (volatile uint32_t *)(ivs.shmem + 4 * peer);
}

static uint8_t *ivshmem_out(uint32_t peer)
{
	return ivs.shmem + IVSHMEM_STATE_SIZE + IVSHMEM_RW_SIZE +
		peer * IVSHMEM_OUT_SIZE;
}

static int ivshmem_mmio(uint64_t addr, uint8_t *data, uint32_t len,
			int write)
{
	uint32_t bar0 = bar_base(&ivs.pci, 0), bar1 = bar_base(&ivs.pci, 1);
	uint32_t v = 0, off;

	if (!ivs.pci.present || !mem_enabled(&ivs.pci))
		return 0;
	if (write)
		memcpy(&v, data, len < 4 ? len : 4);
	if (addr >= bar0 && addr + len <= bar0 + 0x1000) {
		off = addr - bar0;
		if (!write) {
			v = off == 0 ? ivs.id : off == 4 ? ivs.peers :
				off == 8 ? ivs.int_ctrl :
				off == 0x10 ? *ivshmem_state(ivs.id) : 0;
			memcpy(data, &v, len < 4 ? len : 4);
		} else if (off == 8) {
			ivs.int_ctrl = v & 1;
		} else if (off == 0xc) {
			if ((v >> 16) == ivs.peer)
				ivs.doorbell_from_guest++;
		} else if (off == 0x10) {
			*ivshmem_state(ivs.id) = v;
		}
		return 1;
	}
	if (addr >= bar1 && addr + len <= bar1 + 0x200) {
		off = addr - bar1;
		if (off >= 0x100) {
			if (!write)
				memset(data, 0, len);
		} else if (write) {
			memcpy(ivs.msix + off, data, len);
		} else {
			memcpy(data, ivs.msix + off, len);
		}
		return 1;
	}
	return 0;
}

/*
 * The simulated peer does what the ivshmem demo does, one step per call
 * from the main loop: once the guest is ready, publish greeting and mark,
 * set state 1 (guest gets vector 0), ring the guest (vector 1) once the
 * guest rang us, and set state 2 when the guest is done.
 */
static void ivshmem_peer_poll(void)
{
	uint32_t guest;

	if (!ivs.pci.present)
		return;
	guest = *ivshmem_state(ivs.id);
	if (guest != ivs.last_guest_state) {
		ivs.last_guest_state = guest;
		fprintf(stderr, "[kvmrun %.3f] ivshmem: guest peer %u state "
			"%u\n", elapsed(), ivs.id, guest);
	}
	if (ivs.peer_step == 0 && guest >= 1) {
		snprintf((char *)ivshmem_out(ivs.peer), 64,
			 "ivshmem: hello from peer %u", ivs.peer);
		snprintf((char *)ivs.shmem + IVSHMEM_STATE_SIZE + ivs.peer * 64,
			 64, "peer %u was here", ivs.peer);
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		*ivshmem_state(ivs.peer) = 1;
		ivshmem_interrupt(0);
		ivs.peer_step = 1;
	}
	if (ivs.peer_step == 1 && ivs.doorbell_from_guest) {
		fprintf(stderr, "[kvmrun %.3f] ivshmem: peer %u got the "
			"guest's doorbell; guest says \"%.40s\"\n", elapsed(),
			ivs.peer, (char *)ivshmem_out(ivs.id));
		ivshmem_interrupt(1);
		ivs.peer_step = 2;
	}
	if (ivs.peer_step == 2 && guest >= 2) {
		*ivshmem_state(ivs.peer) = 2;
		ivshmem_interrupt(0);
		ivs.peer_step = 3;
	}
}

static void ivshmem_setup(uint32_t id, uint32_t peers)
{
	struct pci_dev *d = &ivs.pci;

	ivs.id = id;
	ivs.peers = peers;
	ivs.peer = peers >= 3 ? (id == 1 ? 2 : 1) : (id == 0 ? 1 : 0);
	ivs.shmem_size = IVSHMEM_STATE_SIZE + IVSHMEM_RW_SIZE +
		peers * IVSHMEM_OUT_SIZE;
	ivs.shmem = mmap(NULL, ivs.shmem_size, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (ivs.shmem == MAP_FAILED)
		die("mmap ivshmem");
	d->present = 1;
	d->bdf = IVSHMEM_BDF;
	cfg_put(d, 0x00, 0x4106110a, 4);
	cfg_put(d, 0x06, 0x0010, 2);		/* capability list */
	cfg_put(d, 0x08, 0xff000000, 4);	/* class ff, protocol 0 */
	cfg_put(d, 0x2c, 0x4106110a, 4);
	cfg_put(d, 0x34, 0x40, 1);
	d->bar_mask[0] = d->bar_mask[1] = 0xfffff000;
	cfg_put(d, 0x40, 0x00206009, 4);	/* vendor cap, next 0x60 */
	cfg_put(d, 0x44, IVSHMEM_STATE_SIZE, 4);
	cfg_put(d, 0x48, IVSHMEM_RW_SIZE, 4);
	cfg_put(d, 0x50, IVSHMEM_OUT_SIZE, 4);
	cfg_put(d, 0x58, IVSHMEM_SHMEM, 4);
	cfg_put(d, 0x60, 0x11 | ((IVSHMEM_VECTORS - 1) << 16), 4);
	cfg_put(d, 0x64, 0x00000001, 4);	/* table: BIR 1, offset 0 */
	cfg_put(d, 0x68, 0x00000101, 4);	/* PBA: BIR 1, offset 0x100 */
}

static void edu_msi(uint32_t why)
{
	uint16_t ctrl = cfg_read(&edu.pci, 0x42, 2);

	edu.irq_status |= why;
	if ((ctrl & 1) && (cfg_read(&edu.pci, 0x04, 2) & 0x4)) {
		edu.msis++;
		signal_msi(cfg_read(&edu.pci, 0x44, 4),
			   cfg_read(&edu.pci, 0x48, 4),
			   cfg_read(&edu.pci, 0x4c, 2));
	}
}

static uint8_t *guest_ram(uint64_t addr, uint64_t len)
{
	return addr + len <= vm.mem_size && addr + len >= addr ?
		vm.mem + addr : NULL;
}

static void edu_dma(void)
{
	uint8_t *ram;
	uint64_t off;

	edu.dma_cmd &= ~1ULL;
	/*
	 * QEMU 7.2 checks that the transfer ends strictly before the end of
	 * the buffer and aborts the whole machine (hw_error) otherwise: treat
	 * such a transfer as the fatal error it is in the lab.
	 */
	off = (edu.dma_cmd & 2 ? edu.dma_src : edu.dma_dst) - 0x40000;
	if (off >= sizeof(edu.buffer) ||
	    off + edu.dma_count >= sizeof(edu.buffer)) {
		fprintf(stderr, "kvmrun: edu DMA of %llu bytes at buffer offset "
			"%#llx would abort QEMU\n",
			(unsigned long long)edu.dma_count,
			(unsigned long long)off);
		exit(3);
	}
	if (edu.dma_cmd & 2) {		/* device -> RAM */
		off = edu.dma_src - 0x40000;
		ram = guest_ram(edu.dma_dst, edu.dma_count);
		if (ram && off + edu.dma_count <= sizeof(edu.buffer))
			memcpy(ram, edu.buffer + off, edu.dma_count);
	} else {
		off = edu.dma_dst - 0x40000;
		ram = guest_ram(edu.dma_src, edu.dma_count);
		if (ram && off + edu.dma_count <= sizeof(edu.buffer))
			memcpy(edu.buffer + off, ram, edu.dma_count);
	}
	if (edu.dma_cmd & 4)
		edu_msi(0x100);
}

static int edu_mmio(uint64_t addr, uint8_t *data, uint32_t len, int write)
{
	uint32_t bar0 = bar_base(&edu.pci, 0), off, i;
	uint64_t v = 0, *dma_reg;

	if (!edu.pci.present || !mem_enabled(&edu.pci) || addr < bar0 ||
	    addr + len > bar0 + 0x100000)
		return 0;
	off = addr - bar0;
	if (write)
		memcpy(&v, data, len);
	dma_reg = off == 0x80 ? &edu.dma_src : off == 0x88 ? &edu.dma_dst :
		off == 0x90 ? &edu.dma_count : off == 0x98 ? &edu.dma_cmd :
		NULL;
	if (!write) {
		v = off == 0x00 ? 0x010000ed : off == 0x04 ? ~edu.liveness :
			off == 0x08 ? edu.factorial : off == 0x20 ? edu.status :
			off == 0x24 ? edu.irq_status : dma_reg ? *dma_reg : 0;
		memcpy(data, &v, len);
		return 1;
	}
	switch (off) {
	case 0x04:
		edu.liveness = v;
		break;
	case 0x08:
		for (edu.factorial = 1, i = 2; i <= v; i++)
			edu.factorial *= i;
		if (edu.status & 0x80)
			edu_msi(0x1);
		break;
	case 0x20:
		edu.status = v & 0x80;
		break;
	case 0x60:
		edu_msi(v);
		break;
	case 0x64:
		edu.irq_status &= ~v;
		break;
	default:
		if (dma_reg) {
			*dma_reg = v;
			if (off == 0x98 && (v & 1))
				edu_dma();
		}
		break;
	}
	return 1;
}

static void edu_setup(void)
{
	struct pci_dev *d = &edu.pci;

	d->present = 1;
	d->bdf = EDU_BDF;
	cfg_put(d, 0x00, 0x11e81234, 4);
	cfg_put(d, 0x06, 0x0010, 2);
	cfg_put(d, 0x08, 0x00ff0010, 4);
	d->bar_mask[0] = 0xfff00000;
	cfg_put(d, 0x10, EDU_BAR0, 4);		/* as firmware left it */
	cfg_put(d, 0x34, 0x40, 1);
	cfg_put(d, 0x40, 0x00800005, 4);	/* MSI, 64-bit, next 0 */
}

/* Returns the value of an IN; handles an OUT. */
static uint32_t pio_access(int cpu, uint16_t port, int size, int out,
			   uint32_t value)
{
	if (port >= vm.uart && port < vm.uart + 8) {
		if (out) {
			if (port == vm.uart)
				uart_output(value & 0xff);
			return 0;
		}
		if (port == vm.uart + 5)	/* LSR: THRE | TEMT */
			return 0x60;
		return 0;
	}
	if (vm.pm_timer && port == vm.pm_timer && !out && size == 4)
		return pm_timer_value();
	if (port == 0xcf8 && size == 4) {
		if (out)
			vm.pci_addr = value;
		return vm.pci_addr;
	}
	if (port >= 0xcfc && port + size <= 0xd00) {
		struct pci_dev *d = (vm.pci_addr & 0x80000000) ?
			pci_lookup((vm.pci_addr >> 8) & 0xffff) : NULL;
		unsigned int reg = (vm.pci_addr & 0xfc) + (port - 0xcfc);
		uint32_t v = 0xffffffff;

		/* absent devices: reads are all ones, writes vanish */
		pthread_mutex_lock(&vm.lock);
		if (d && out)
			cfg_write(d, reg, value, size);
		else if (d)
			v = cfg_read(d, reg, size);
		pthread_mutex_unlock(&vm.lock);
		return out ? 0 : v;
	}
	if (port == 0x80)
		return 0;
	if (out)
		report(cpu, "PIO write port 0x%x size %d value 0x%x (dropped)",
		       port, size, value);
	else
		report(cpu, "PIO read port 0x%x size %d (reads as all ones)",
			port, size);
	return 0xffffffff;
}

static void handle_io(struct vcpu *v)
{
	struct kvm_run *run = v->run;
	uint8_t *data = (uint8_t *)run + run->io.data_offset;
	int out = run->io.direction == KVM_EXIT_IO_OUT;
	uint32_t i, value;

	for (i = 0; i < run->io.count; i++, data += run->io.size) {
		value = 0;
		if (out)
			memcpy(&value, data, run->io.size);
		value = pio_access(v->index, run->io.port, run->io.size, out,
				   value);
		if (!out)
			memcpy(data, &value, run->io.size);
	}
}

static void handle_mmio(struct vcpu *v)
{
	struct kvm_run *run = v->run;
	uint64_t addr = run->mmio.phys_addr;
	uint32_t len = run->mmio.len;

	if (vm.testdev && addr >= TESTDEV_BASE + 0xff8 &&
	    addr + len <= TESTDEV_BASE + 0x1000) {
		volatile uint8_t *reg = vm.comm + (addr - TESTDEV_BASE);

		if (run->mmio.is_write)
			memcpy((void *)reg, run->mmio.data, len);
		else
			memcpy(run->mmio.data, (void *)reg, len);
		return;
	}
	pthread_mutex_lock(&vm.lock);
	if (ivshmem_mmio(addr, run->mmio.data, len, run->mmio.is_write) ||
	    edu_mmio(addr, run->mmio.data, len, run->mmio.is_write)) {
		pthread_mutex_unlock(&vm.lock);
		return;
	}
	pthread_mutex_unlock(&vm.lock);
	report(v->index, "MMIO %s addr 0x%llx len %u%s", run->mmio.is_write ?
	       "write" : "read", (unsigned long long)addr, len,
	       run->mmio.is_write ? " (write dropped)" : " (reads as zero)");
	if (!run->mmio.is_write)
		memset(run->mmio.data, 0, len);
}

static void dump_regs(struct vcpu *v)
{
	struct kvm_regs regs;
	struct kvm_sregs sregs;

	if (ioctl(v->fd, KVM_GET_REGS, &regs) < 0 ||
	    ioctl(v->fd, KVM_GET_SREGS, &sregs) < 0)
		return;
	fprintf(stderr, "[kvmrun cpu%d] RIP 0x%llx RSP 0x%llx RFLAGS 0x%llx "
		"CR0 0x%llx CR3 0x%llx CR4 0x%llx EFER 0x%llx CS 0x%x/0x%llx\n",
		v->index, regs.rip, regs.rsp, regs.rflags, sregs.cr0, sregs.cr3,
		sregs.cr4, sregs.efer, sregs.cs.selector, sregs.cs.base);
}

static void *vcpu_thread(void *arg)
{
	struct vcpu *v = arg;
	struct kvm_run *run = v->run;

	for (;;) {
		if (ioctl(v->fd, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			report(v->index, "KVM_RUN failed: %s", strerror(errno));
			vm.dead = 1;
			return NULL;
		}
		switch (run->exit_reason) {
		case KVM_EXIT_IO:
			handle_io(v);
			break;
		case KVM_EXIT_MMIO:
			handle_mmio(v);
			break;
		case KVM_EXIT_HLT:
			report(v->index, "HLT exit (CPU halted for good)");
			return NULL;
		case KVM_EXIT_SHUTDOWN:
			report(v->index, "SHUTDOWN exit (triple fault)");
			dump_regs(v);
			vm.dead = 1;
			return NULL;
		case KVM_EXIT_FAIL_ENTRY:
			report(v->index, "FAIL_ENTRY, reason 0x%llx",
			       (unsigned long long)run->fail_entry.
			       hardware_entry_failure_reason);
			dump_regs(v);
			vm.dead = 1;
			return NULL;
		case KVM_EXIT_INTERNAL_ERROR:
			report(v->index, "INTERNAL_ERROR, suberror %u",
			       run->internal.suberror);
			dump_regs(v);
			vm.dead = 1;
			return NULL;
		case KVM_EXIT_SYSTEM_EVENT:
			report(v->index, "SYSTEM_EVENT type %u",
			       run->system_event.type);
			vm.dead = 1;
			return NULL;
		case KVM_EXIT_HYPERCALL:
			report(v->index, "HYPERCALL nr %llu",
			       (unsigned long long)run->hypercall.nr);
			run->hypercall.ret = -38;
			break;
		default:
			report(v->index, "unhandled exit reason %u",
			       run->exit_reason);
			dump_regs(v);
			vm.dead = 1;
			return NULL;
		}
	}
}

static struct kvm_cpuid2 *supported_cpuid(void)
{
	int n = 256;
	struct kvm_cpuid2 *cpuid;

	for (;;) {
		cpuid = calloc(1, sizeof(*cpuid) +
			       n * sizeof(struct kvm_cpuid_entry2));
		if (!cpuid)
			die("out of memory");
		cpuid->nent = n;
		if (ioctl(vm.kvm_fd, KVM_GET_SUPPORTED_CPUID, cpuid) == 0)
			return cpuid;
		if (errno != E2BIG)
			die("KVM_GET_SUPPORTED_CPUID");
		free(cpuid);
		n *= 2;
	}
}

static void setup_vcpu(struct vcpu *v, const struct kvm_cpuid2 *proto,
		       int tsc_deadline)
{
	size_t cpuid_size = sizeof(*proto) +
		proto->nent * sizeof(struct kvm_cpuid_entry2);
	struct kvm_cpuid2 *cpuid = malloc(cpuid_size);
	struct {
		struct kvm_msrs hdr;
		struct kvm_msr_entry entry;
	} msrs;
	struct kvm_mp_state mp = { .mp_state = KVM_MP_STATE_RUNNABLE };
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	int mmap_size;
	uint32_t i;

	v->fd = ioctl(vm.vm_fd, KVM_CREATE_VCPU, v->index);
	if (v->fd < 0)
		die("KVM_CREATE_VCPU %d", v->index);
	mmap_size = ioctl(vm.kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	v->run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED,
		      v->fd, 0);
	if (v->run == MAP_FAILED)
		die("mmap kvm_run");

	memcpy(cpuid, proto, cpuid_size);
	for (i = 0; i < cpuid->nent; i++) {
		struct kvm_cpuid_entry2 *e = &cpuid->entries[i];

		if (e->function == 1) {
			e->ebx = (e->ebx & 0x00ffffff) | (v->index << 24);
			e->ecx |= 1u << 31;		/* hypervisor */
			e->ecx |= 1u << 21;		/* x2APIC */
			if (tsc_deadline)
				e->ecx |= 1u << 24;
			else
				e->ecx &= ~(1u << 24);
		}
		if (e->function == 0xb || e->function == 0x1f)
			e->edx = v->index;
	}
	if (ioctl(v->fd, KVM_SET_CPUID2, cpuid) < 0)
		die("KVM_SET_CPUID2");
	free(cpuid);

	memset(&msrs, 0, sizeof(msrs));
	msrs.hdr.nmsrs = 1;
	msrs.entry.index = MSR_IA32_APIC_BASE;
	/*
	 * No BSP flag on any vCPU: cell CPUs are application processors of
	 * the machine under Jailhouse too. With the flag, KVM would restart
	 * that vCPU at the reset vector on INIT instead of waiting for SIPI.
	 */
	msrs.entry.data = 0xfee00000ULL | APIC_BASE_EN | APIC_BASE_EXTD;
	if (ioctl(v->fd, KVM_SET_MSRS, &msrs) != 1)
		die("KVM_SET_MSRS IA32_APIC_BASE (x2APIC)");

	/* Jailhouse start state: real mode, CS=0 base 0, IP=0 */
	if (ioctl(v->fd, KVM_GET_SREGS, &sregs) < 0)
		die("KVM_GET_SREGS");
	sregs.cs.selector = 0;
	sregs.cs.base = 0;
	sregs.cs.limit = 0xffff;
	sregs.ds.selector = sregs.es.selector = sregs.fs.selector = 0;
	sregs.gs.selector = sregs.ss.selector = 0;
	sregs.ds.base = sregs.es.base = sregs.fs.base = 0;
	sregs.gs.base = sregs.ss.base = 0;
	if (ioctl(v->fd, KVM_SET_SREGS, &sregs) < 0)
		die("KVM_SET_SREGS");
	memset(&regs, 0, sizeof(regs));
	regs.rflags = 2;
	regs.rip = 0;
	if (ioctl(v->fd, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");
	if (ioctl(v->fd, KVM_SET_MP_STATE, &mp) < 0)
		die("KVM_SET_MP_STATE");
}

static void add_slot(int slot, uint64_t gpa, size_t size, void *host)
{
	struct kvm_userspace_memory_region region = {
		.slot = slot,
		.guest_phys_addr = gpa,
		.memory_size = size,
		.userspace_addr = (uint64_t)host,
	};

	if (ioctl(vm.vm_fd, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION slot %d", slot);
}

static uint32_t comm_read32(unsigned int off)
{
	return __atomic_load_n((volatile uint32_t *)(vm.comm + off),
			       __ATOMIC_SEQ_CST);
}

static void comm_write32(unsigned int off, uint32_t value)
{
	__atomic_store_n((volatile uint32_t *)(vm.comm + off), value,
			 __ATOMIC_SEQ_CST);
}

static const char *name_of(const char *const *names, int n, uint32_t v)
{
	return v < (uint32_t)n ? names[v] : "invalid";
}

/*
 * The hypervisor's side of cell_exchange_message for SHUTDOWN_REQUEST.
 * Returns 1 when the cell agreed (APPROVED, or it set SHUT_DOWN/FAILED);
 * the hypervisor would then suspend it, so the run ends.
 */
static int send_shutdown_request(double wait)
{
	double deadline = elapsed() + wait;
	uint32_t reply, state;

	comm_write32(COMM_REPLY_FROM_CELL, 0);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	comm_write32(COMM_MSG_TO_CELL, 1);
	fprintf(stderr, "[kvmrun %.3f] sent SHUTDOWN_REQUEST\n", elapsed());
	while (elapsed() < deadline) {
		state = comm_read32(COMM_CELL_STATE);
		reply = comm_read32(COMM_REPLY_FROM_CELL);
		if (state == 2 || state == 3) {
			fprintf(stderr, "[kvmrun %.3f] cell state is now %s: "
				"shutdown done\n", elapsed(),
				name_of(state_names, 5, state));
			return 1;
		}
		if (reply) {
			fprintf(stderr, "[kvmrun %.3f] reply %s, msg_to_cell "
				"%u\n", elapsed(),
				name_of(reply_names, 5, reply),
				comm_read32(COMM_MSG_TO_CELL));
			return reply == 3;
		}
		usleep(1000);
	}
	fprintf(stderr, "[kvmrun %.3f] no reply to SHUTDOWN_REQUEST\n",
		elapsed());
	return 0;
}

static void usage(void)
{
	fprintf(stderr,
"usage: kvmrun [options] IMAGE\n"
"  -c, --cmdline STR      command line, written at 0x1000\n"
"  -n, --cpus N           number of vCPUs (default 1)\n"
"  -m, --mem KB           cell RAM at 0 in KiB (default 1024)\n"
"  -t, --timeout SEC      stop after SEC seconds (default 10)\n"
"  -u, --uart PORT        8250 console port in the comm region (default 0x2f8)\n"
"  -p, --pm-timer PORT    PM timer port, 0 for none (default 0x608)\n"
"      --tsc-khz N        comm region tsc_khz (default 0)\n"
"      --apic-khz N       comm region apic_khz (default 0)\n"
"      --testdev          emulate the test device page at 0x101000\n"
"      --no-tsc-deadline  hide TSC-deadline from CPUID\n"
"      --revision N       comm region ABI revision (default 2)\n"
"      --ivshmem ID:PEERS ivshmem v2 device 01:0e.0 as peer ID, shared memory\n"
"                         at 0x3f0f0000, the ivshmem demo's target simulated\n"
"      --edu              QEMU edu device at 01:01.0, BAR0 0xfe800000\n"
"  -e, --expect STR       stop with 0 once all expected strings appeared\n"
"  -f, --fail STR         stop with 3 when STR appears\n"
"  -s, --shutdown-at SEC  send SHUTDOWN_REQUEST at SEC (repeatable)\n"
"  -v, --verbose          report every exit\n");
	exit(2);
}

static unsigned long num_arg(const char *s)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(s, &end, 0);
	if (errno || *end || end == s) {
		errno = 0;
		die("bad number '%s'", s);
	}
	return v;
}

int main(int argc, char **argv)
{
	const char *expect[MAX_PATTERNS], *fail[MAX_PATTERNS];
	double shutdown_at[MAX_PATTERNS];
	int n_expect = 0, n_fail = 0, n_shutdown = 0, next_shutdown = 0;
	const char *cmdline = NULL, *image = NULL;
	unsigned long tsc_khz = 0, apic_khz = 0, revision = 2;
	int tsc_deadline_cap, hide_deadline = 0, i, status, matched;
	double timeout = 10;
	struct kvm_cpuid2 *cpuid;
	struct stat st;
	uint32_t state, last_state;
	int fd, approved = 0;

	vm.num_cpus = 1;
	vm.mem_size = 1024 * 1024;
	vm.uart = 0x2f8;
	vm.pm_timer = 0x608;

	for (i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char *val = i + 1 < argc ? argv[i + 1] : NULL;

#define OPT(s, l) (!strcmp(a, s) || !strcmp(a, l))
#define NEED() do { if (!val) usage(); i++; } while (0)
		if (OPT("-c", "--cmdline")) {
			NEED(); cmdline = val;
		} else if (OPT("-n", "--cpus")) {
			NEED(); vm.num_cpus = num_arg(val);
		} else if (OPT("-m", "--mem")) {
			NEED(); vm.mem_size = num_arg(val) * 1024;
		} else if (OPT("-t", "--timeout")) {
			NEED(); timeout = atof(val);
		} else if (OPT("-u", "--uart")) {
			NEED(); vm.uart = num_arg(val);
		} else if (OPT("-p", "--pm-timer")) {
			NEED(); vm.pm_timer = num_arg(val);
		} else if (!strcmp(a, "--tsc-khz")) {
			NEED(); tsc_khz = num_arg(val);
		} else if (!strcmp(a, "--apic-khz")) {
			NEED(); apic_khz = num_arg(val);
		} else if (!strcmp(a, "--revision")) {
			NEED(); revision = num_arg(val);
		} else if (!strcmp(a, "--ivshmem")) {
			unsigned int id, peers;

			NEED();
			if (sscanf(val, "%u:%u", &id, &peers) != 2 ||
			    peers < 2 || peers > 12 || id >= peers)
				usage();
			ivshmem_setup(id, peers);
		} else if (!strcmp(a, "--edu")) {
			edu_setup();
		} else if (!strcmp(a, "--testdev")) {
			vm.testdev = 1;
		} else if (!strcmp(a, "--no-tsc-deadline")) {
			hide_deadline = 1;
		} else if (OPT("-e", "--expect")) {
			NEED();
			if (n_expect == MAX_PATTERNS) usage();
			expect[n_expect++] = val;
		} else if (OPT("-f", "--fail")) {
			NEED();
			if (n_fail == MAX_PATTERNS) usage();
			fail[n_fail++] = val;
		} else if (OPT("-s", "--shutdown-at")) {
			NEED();
			if (n_shutdown == MAX_PATTERNS) usage();
			shutdown_at[n_shutdown++] = atof(val);
		} else if (OPT("-v", "--verbose")) {
			vm.verbose = 1;
		} else if (a[0] == '-' || image) {
			usage();
		} else {
			image = a;
		}
	}
	if (!image || vm.num_cpus < 1 || vm.num_cpus > MAX_CPUS ||
	    vm.mem_size < 0x2000 || vm.mem_size > COMM_BASE)
		usage();

	vm.mem = mmap(NULL, vm.mem_size, PROT_READ | PROT_WRITE,
		      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	vm.comm = mmap(NULL, 0x1000, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (vm.mem == MAP_FAILED || vm.comm == MAP_FAILED)
		die("mmap guest memory");

	fd = open(image, O_RDONLY);
	if (fd < 0 || fstat(fd, &st) < 0)
		die("cannot open %s", image);
	if ((size_t)st.st_size > vm.mem_size)
		die("%s does not fit into %zu bytes of RAM", image,
		    vm.mem_size);
	if (read(fd, vm.mem, st.st_size) != st.st_size)
		die("cannot read %s", image);
	close(fd);
	if (cmdline) {
		if (strlen(cmdline) + 1 > vm.mem_size - 0x1000)
			die("command line too long");
		memcpy(vm.mem + 0x1000, cmdline, strlen(cmdline) + 1);
	}

	/* comm region as filled at cell start (reference 3.3) */
	memcpy((void *)vm.comm, "JHCOMM", 6);
	*(volatile uint16_t *)(vm.comm + 6) = revision;
	*(volatile uint64_t *)(vm.comm + COMM_CONSOLE) = vm.uart;
	*(volatile uint16_t *)(vm.comm + COMM_CONSOLE + 12) = 2; /* 8250 */
	*(volatile uint16_t *)(vm.comm + COMM_CONSOLE + 14) = 0; /* PIO */
	*(volatile uint16_t *)(vm.comm + COMM_PM_TIMER) = vm.pm_timer;
	*(volatile uint16_t *)(vm.comm + COMM_NUM_CPUS) = vm.num_cpus;
	*(volatile uint32_t *)(vm.comm + COMM_TSC_KHZ) = tsc_khz;
	*(volatile uint32_t *)(vm.comm + COMM_APIC_KHZ) = apic_khz;

	vm.kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (vm.kvm_fd < 0)
		die("open /dev/kvm");
	if (ioctl(vm.kvm_fd, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
		die("unexpected KVM API version");
	vm.vm_fd = ioctl(vm.kvm_fd, KVM_CREATE_VM, 0);
	if (vm.vm_fd < 0)
		die("KVM_CREATE_VM");
	/* needed for real mode on VMX without unrestricted guest; harmless */
	ioctl(vm.vm_fd, KVM_SET_TSS_ADDR, 0xfffbd000UL);
	errno = 0;
	if (ioctl(vm.vm_fd, KVM_CREATE_IRQCHIP, 0) < 0)
		die("KVM_CREATE_IRQCHIP");
	add_slot(0, 0, vm.mem_size, vm.mem);
	add_slot(1, COMM_BASE, 0x1000, (void *)vm.comm);
	if (ivs.pci.present)
		add_slot(2, IVSHMEM_SHMEM, ivs.shmem_size, ivs.shmem);

	tsc_deadline_cap = ioctl(vm.kvm_fd, KVM_CHECK_EXTENSION,
				 KVM_CAP_TSC_DEADLINE_TIMER) > 0;
	cpuid = supported_cpuid();
	clock_gettime(CLOCK_MONOTONIC, &vm.start);
	for (i = 0; i < vm.num_cpus; i++) {
		vm.cpus[i].index = i;
		setup_vcpu(&vm.cpus[i], cpuid, tsc_deadline_cap &&
			   !hide_deadline);
	}
	fprintf(stderr, "[kvmrun] %s: %ld bytes, %d CPU(s), RAM %zu KiB, "
		"console 8250 @0x%x, PM timer @0x%x, TSC-deadline %s\n",
		image, (long)st.st_size, vm.num_cpus, vm.mem_size / 1024,
		vm.uart, vm.pm_timer,
		tsc_deadline_cap && !hide_deadline ? "on" : "off");
	for (i = 0; i < vm.num_cpus; i++)
		if (pthread_create(&vm.cpus[i].thread, NULL, vcpu_thread,
				   &vm.cpus[i]))
			die("pthread_create");

	status = 0;
	last_state = 0;
	while (elapsed() < timeout) {
		usleep(2000);
		if (next_shutdown < n_shutdown &&
		    elapsed() >= shutdown_at[next_shutdown]) {
			next_shutdown++;
			approved = send_shutdown_request(2.0);
		}
		pthread_mutex_lock(&vm.lock);
		ivshmem_peer_poll();
		for (i = 0; i < n_fail; i++)
			if (strstr(vm.out, fail[i]))
				status = 3;
		matched = n_expect > 0;
		for (i = 0; i < n_expect; i++)
			if (!strstr(vm.out, expect[i]))
				matched = 0;
		pthread_mutex_unlock(&vm.lock);
		if (status || vm.dead)
			break;
		if (matched && next_shutdown == n_shutdown) {
			usleep(50000);	/* let the matching line finish */
			break;
		}
		state = comm_read32(COMM_CELL_STATE);
		if (state != last_state) {
			fprintf(stderr, "[kvmrun %.3f] cell state: %s\n",
				elapsed(), name_of(state_names, 5, state));
			last_state = state;
		}
		if (approved && next_shutdown == n_shutdown) {
			usleep(100000);	/* let the last line drain */
			break;
		}
		if ((state == 2 || state == 3 || state == 4) &&
		    next_shutdown == n_shutdown) {
			usleep(100000);	/* let the last line drain */
			break;
		}
	}
	if (vm.dead && !status)
		status = 3;
	if (!status && n_expect) {
		pthread_mutex_lock(&vm.lock);
		for (i = 0; i < n_expect; i++)
			if (!strstr(vm.out, expect[i])) {
				fprintf(stderr, "[kvmrun] expected output "
					"missing: \"%s\"\n", expect[i]);
				status = 1;
			}
		pthread_mutex_unlock(&vm.lock);
	}
	fflush(stdout);
	state = comm_read32(COMM_CELL_STATE);
	fprintf(stderr, "[kvmrun] stopped after %.2f s: cell state %s, "
		"msg_to_cell %u, reply_from_cell %u, %llu other exits, "
		"status %d\n", elapsed(), name_of(state_names, 5, state),
		comm_read32(COMM_MSG_TO_CELL),
		comm_read32(COMM_REPLY_FROM_CELL), vm.exits_other, status);
	/* vCPU threads may sit in KVM_RUN forever (cli; hlt): just exit */
	_exit(status);
}
