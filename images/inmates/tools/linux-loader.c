/*
 * linux-loader: starts an x86-64 Linux kernel in a cell, the boot loader
 * half of `jailhouse cell linux` (reference 5.6).
 *
 * The tool loads this image at 0, the kernel's bzImage so that its
 * protected-mode part sits at the kernel's preferred address, the initrd
 * after it, and the boot parameters at 0x1000: the zero page, then at
 * 0x2000 one setup_data entry of type SETUP_JAILHOUSE, then the command
 * line. Those three pages are this image's .cmdline buffer, so nothing of
 * the loader lives there.
 *
 * Every cell CPU starts here. The first one maps the kernel's
 * initialization range, fills in what only the running cell knows (the
 * comm region's PM timer, MMCONFIG, TSC and APIC timer frequencies and the
 * APIC IDs of the CPUs that checked in), and enters the kernel's 64-bit
 * entry point (its load address + 0x200) with RSI pointing at the zero
 * page, interrupts off, CS 0x10 and data segments 0x18 (the library's GDT,
 * as the boot protocol's 64-bit entry wants them). The other CPUs halt in
 * the library; Linux wakes them with INIT and SIPI.
 */
#include <inmate.h>

/* Linux's boot protocol (Documentation/x86/boot.rst), zero-page offsets. */
#define BOOT_KERNEL_ALIGNMENT	0x230	/* u32: the tool stores the load address */
#define BOOT_SETUP_DATA		0x250	/* u64: first setup_data entry */
#define BOOT_INIT_SIZE		0x260	/* u32: memory the kernel needs from there */
#define KERNEL_ENTRY_64		0x200	/* startup_64 in the protected-mode part */

/* The boot parameters: three pages, as Jailhouse's loader reserves. */
#define BOOT_AREA_SIZE		(3 * PAGE_SIZE)

/* How long the first CPU waits for the others to check in. */
#define CPU_WAIT_NS		(10 * NS_PER_SEC)

/* struct setup_data's header, then Linux's struct jailhouse_setup_data
 * (arch/x86/include/uapi/asm/bootparam.h), version 2. */
struct setup_data_header {
	u64 next;
	u32 type;
	u32 len;
} __attribute__((packed));

struct jailhouse_setup_data {
	u16 version;
	u16 compatible_version;
	u16 pm_timer_address;
	u16 num_cpus;
	u64 pci_mmconfig_base;
	u32 tsc_khz;
	u32 apic_khz;
	u8 standard_ioapic;
	u8 cpu_ids[255];
	u32 flags;
} __attribute__((packed));

/* Replaces the library's 256-byte command line: the boot parameters. */
char cmdline[BOOT_AREA_SIZE] __attribute__((section(".cmdline"), aligned(4096)));

static u64 boot_u64(unsigned int offset)
{
	return *(u64 *)(cmdline + offset);
}

static u32 boot_u32(unsigned int offset)
{
	return *(u32 *)(cmdline + offset);
}

void inmate_main(void)
{
	u64 kernel = boot_u32(BOOT_KERNEL_ALIGNMENT);
	struct jailhouse_setup_data *params;
	void (*entry)(long, void *);
	unsigned int cpus, n;

	map_range(kernel, boot_u32(BOOT_INIT_SIZE), MAP_CACHED);

	params = (void *)(boot_u64(BOOT_SETUP_DATA) +
			  sizeof(struct setup_data_header));
	params->pm_timer_address = comm_region->pm_timer_address;
	params->pci_mmconfig_base = comm_region->pci_mmconfig_base;
	params->tsc_khz = comm_region->tsc_khz;
	params->apic_khz = comm_region->apic_khz;

	/* Only CPUs that checked in can be started by Linux later. */
	cpus = smp_wait_for_all_cpus(CPU_WAIT_NS);
	if (cpus > MAX_CPUS)
		cpus = MAX_CPUS;
	if (cpus < comm_region->num_cpus)
		printk("linux-loader: %u of %u CPUs checked in\n", cpus,
		       comm_region->num_cpus);
	for (n = 0; n < cpus; n++)
		params->cpu_ids[n] = smp_cpu_ids[n];
	params->num_cpus = cpus;

	asm volatile("cli" : : : "memory");
	entry = (void (*)(long, void *))(kernel + KERNEL_ENTRY_64);
	entry(0, cmdline);
}
