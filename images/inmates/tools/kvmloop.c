/*
 * kvmloop - the smallest VMM that runs a jhlab inmate the way a cell runs
 * it, with port I/O passed to the real ports: the C baseline of the PIO
 * exit benchmark (scripts/bench cells), run in the lab's root cell beside
 * the executor.
 *
 * It gives the inmate what the executor gives it: 1 MiB of RAM at 0 with
 * the image at 0 and the command line at 0x1000, the comm region page at
 * 0x100000 ("JHCOMM" revision 2, console 8250 PIO at 0x2f8, PM timer
 * 0x608, one CPU), an in-kernel irqchip, CPUID from KVM_GET_SUPPORTED_CPUID
 * and the local APIC in x2APIC mode, one vCPU in real mode at CS=0 IP=0,
 * its thread pinned with -C. Then one loop: KVM_RUN, and for an I/O exit
 * a single IN or OUT of the same width on the real port (ioperm), when the
 * port is the UART's (0x2f8-0x2ff) or the PM timer's (0x608-0x60b); the
 * cell's whitelist, as in the executor. Anything else ends the run.
 *
 * What the inmate writes to the UART's THR also goes to stdout. The run
 * ends with status 0 after a console line containing the -e string, 1 on
 * timeout (-t, default 60 s), 2 on usage or KVM set-up errors, 3 on any
 * exit other than a whitelisted port access.
 *
 *   kvmloop [-c CMDLINE] [-C CPU] [-t SEC] [-e STR] IMAGE
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define MEM_SIZE	0x100000UL
#define COMM_BASE	0x100000UL
#define CMDLINE_ADDR	0x1000UL
#define UART		0x2f8
#define UART_PORTS	8
#define PM_TIMER	0x608
#define PM_TIMER_PORTS	4
#define LINE_MAX_LEN	512

#define MSR_IA32_APIC_BASE	0x1b
#define APIC_BASE_EXTD		0x400
#define APIC_BASE_EN		0x800

/* comm region offsets, reference section 3.3 */
#define COMM_REVISION	6
#define COMM_FLAGS	20
#define COMM_CONSOLE	24
#define COMM_PM_TIMER	64
#define COMM_NUM_CPUS	66

static void die(const char *what)
{
	fprintf(stderr, "kvmloop: %s%s%s\n", what, errno ? ": " : "",
		errno ? strerror(errno) : "");
	exit(2);
}

static void on_alarm(int sig)
{
	static const char msg[] = "kvmloop: timeout\n";

	(void)sig;
	if (write(2, msg, sizeof(msg) - 1) < 0)
		_exit(1);
	_exit(1);
}

static int whitelisted(uint16_t port, int size)
{
	return (port >= UART && port + size <= UART + UART_PORTS) ||
		(port >= PM_TIMER && port + size <= PM_TIMER + PM_TIMER_PORTS);
}

static uint32_t port_in(uint16_t port, int size)
{
	return size == 1 ? inb(port) : size == 2 ? inw(port) : inl(port);
}

static void port_out(uint16_t port, int size, uint32_t value)
{
	if (size == 1)
		outb(value, port);
	else if (size == 2)
		outw(value, port);
	else
		outl(value, port);
}

static void setup_vcpu(int kvm, int vcpu)
{
	int n = 256;
	struct kvm_cpuid2 *cpuid;
	struct {
		struct kvm_msrs hdr;
		struct kvm_msr_entry entry;
	} msrs;
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	uint32_t i;

	for (;;) {
		cpuid = calloc(1, sizeof(*cpuid) +
			       n * sizeof(struct kvm_cpuid_entry2));
		if (!cpuid)
			die("out of memory");
		cpuid->nent = n;
		if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) == 0)
			break;
		if (errno != E2BIG)
			die("KVM_GET_SUPPORTED_CPUID");
		free(cpuid);
		n *= 2;
	}
	for (i = 0; i < cpuid->nent; i++) {
		struct kvm_cpuid_entry2 *e = &cpuid->entries[i];

		if (e->function == 1) {
			e->ebx &= 0x00ffffff;		/* APIC ID 0 */
			e->ecx |= 1u << 31 | 1u << 21;	/* hypervisor, x2APIC */
		}
		if (e->function == 0xb || e->function == 0x1f)
			e->edx = 0;
	}
	if (ioctl(vcpu, KVM_SET_CPUID2, cpuid) < 0)
		die("KVM_SET_CPUID2");
	free(cpuid);

	/* x2APIC, no BSP flag: a cell CPU is an application processor */
	memset(&msrs, 0, sizeof(msrs));
	msrs.hdr.nmsrs = 1;
	msrs.entry.index = MSR_IA32_APIC_BASE;
	msrs.entry.data = 0xfee00000ULL | APIC_BASE_EN | APIC_BASE_EXTD;
	if (ioctl(vcpu, KVM_SET_MSRS, &msrs) != 1)
		die("KVM_SET_MSRS IA32_APIC_BASE");

	/* Jailhouse start state: real mode, CS=0 base 0, IP=0 */
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		die("KVM_GET_SREGS");
	sregs.cs.selector = 0;
	sregs.cs.base = 0;
	sregs.cs.limit = 0xffff;
	sregs.ds.selector = sregs.es.selector = sregs.fs.selector = 0;
	sregs.gs.selector = sregs.ss.selector = 0;
	sregs.ds.base = sregs.es.base = sregs.fs.base = 0;
	sregs.gs.base = sregs.ss.base = 0;
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		die("KVM_SET_SREGS");
	memset(&regs, 0, sizeof(regs));
	regs.rflags = 2;
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");
}

static void add_slot(int vm, int slot, uint64_t gpa, size_t size, void *host)
{
	struct kvm_userspace_memory_region region = {
		.slot = slot,
		.guest_phys_addr = gpa,
		.memory_size = size,
		.userspace_addr = (uint64_t)host,
	};

	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION");
}

static void usage(void)
{
	fprintf(stderr, "usage: kvmloop [-c CMDLINE] [-C CPU] [-t SEC] "
		"[-e STR] IMAGE\n");
	exit(2);
}

int main(int argc, char **argv)
{
	const char *cmdline = NULL, *expect = NULL, *image;
	char line[LINE_MAX_LEN + 1];
	size_t line_len = 0;
	unsigned int timeout = 60;
	int cpu = -1, opt, fd, kvm, vm, vcpu, run_size;
	struct kvm_run *run;
	uint8_t *mem, *comm;
	struct stat st;

	while ((opt = getopt(argc, argv, "c:C:t:e:")) != -1) {
		switch (opt) {
		case 'c':
			cmdline = optarg;
			break;
		case 'C':
			cpu = atoi(optarg);
			break;
		case 't':
			timeout = strtoul(optarg, NULL, 0);
			break;
		case 'e':
			expect = optarg;
			break;
		default:
			usage();
		}
	}
	if (optind != argc - 1)
		usage();
	image = argv[optind];

	if (cpu >= 0) {
		cpu_set_t set;

		CPU_ZERO(&set);
		CPU_SET(cpu, &set);
		if (sched_setaffinity(0, sizeof(set), &set) < 0)
			die("sched_setaffinity");
	}
	signal(SIGALRM, on_alarm);
	alarm(timeout);
	if (ioperm(UART, UART_PORTS, 1) < 0 ||
	    ioperm(PM_TIMER, PM_TIMER_PORTS, 1) < 0)
		die("ioperm");

	mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	comm = mmap(NULL, 0x1000, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED || comm == MAP_FAILED)
		die("mmap guest memory");
	fd = open(image, O_RDONLY);
	if (fd < 0 || fstat(fd, &st) < 0)
		die(image);
	errno = 0;
	if ((size_t)st.st_size > MEM_SIZE)
		die("image does not fit into 1 MiB");
	if (read(fd, mem, st.st_size) != st.st_size)
		die(image);
	close(fd);
	if (cmdline) {
		if (strlen(cmdline) > 256)
			die("command line too long");
		memcpy(mem + CMDLINE_ADDR, cmdline, strlen(cmdline) + 1);
	}

	/* comm region as the hypervisor fills it at cell start (3.3) */
	memcpy(comm, "JHCOMM", 6);
	*(uint16_t *)(comm + COMM_REVISION) = 2;
	*(uint32_t *)(comm + COMM_FLAGS) = 1;		/* DBG_PUTC_PERMITTED */
	*(uint64_t *)(comm + COMM_CONSOLE) = UART;
	*(uint16_t *)(comm + COMM_CONSOLE + 12) = 2;	/* 8250 */
	*(uint16_t *)(comm + COMM_PM_TIMER) = PM_TIMER;
	*(uint16_t *)(comm + COMM_NUM_CPUS) = 1;

	kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("open /dev/kvm");
	vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM");
	ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000UL);	/* VMX real mode */
	errno = 0;
	if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0)
		die("KVM_CREATE_IRQCHIP");
	add_slot(vm, 0, 0, MEM_SIZE, mem);
	add_slot(vm, 1, COMM_BASE, 0x1000, comm);
	vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");
	setup_vcpu(kvm, vcpu);

	for (;;) {
		uint8_t *data;
		uint32_t value = 0;
		int size;

		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;
			die("KVM_RUN");
		}
		if (run->exit_reason != KVM_EXIT_IO) {
			fprintf(stderr, "kvmloop: exit reason %u\n",
				run->exit_reason);
			return 3;
		}
		size = run->io.size;
		data = (uint8_t *)run + run->io.data_offset;
		if (run->io.count != 1 || !whitelisted(run->io.port, size)) {
			fprintf(stderr, "kvmloop: %s of port 0x%x size %d "
				"count %u: not whitelisted\n",
				run->io.direction == KVM_EXIT_IO_OUT ?
				"write" : "read", run->io.port, size,
				run->io.count);
			return 3;
		}
		if (run->io.direction == KVM_EXIT_IO_IN) {
			value = port_in(run->io.port, size);
			memcpy(data, &value, size);
			continue;
		}
		memcpy(&value, data, size);
		port_out(run->io.port, size, value);
		if (run->io.port != UART || (value & 0xff) == '\r')
			continue;
		/* the console: copy to stdout, stop after the expected line */
		putchar(value & 0xff);
		if ((value & 0xff) != '\n') {
			if (line_len < LINE_MAX_LEN)
				line[line_len++] = value & 0xff;
			continue;
		}
		line[line_len] = 0;
		line_len = 0;
		if (expect && strstr(line, expect)) {
			fflush(stdout);
			return 0;
		}
	}
}
