/*
 * Start-up of the first CPU, comm region checks, hypercalls, heap and
 * run-time page mapping (reference 5.2, 3.1).
 */
#include <inmate.h>

extern u64 pml4[512];
extern char heap_start[];

static bool vendor_amd;
static u64 heap_pos;

bool cpu_vendor_amd(void)
{
	return vendor_amd;
}

/*
 * Hypercall: code in EAX, arguments in RDI and RSI, result in RAX; vmmcall
 * on AMD, vmcall elsewhere (the vendor string decides, as in Jailhouse).
 */
long hypercall(unsigned long code, unsigned long arg1, unsigned long arg2)
{
	long ret;

	if (vendor_amd)
		asm volatile("vmmcall" : "=a"(ret)
			     : "a"(code), "D"(arg1), "S"(arg2) : "memory");
	else
		asm volatile("vmcall" : "=a"(ret)
			     : "a"(code), "D"(arg1), "S"(arg2) : "memory");
	return ret;
}

void __noreturn stop(void)
{
	for (;;)
		asm volatile("cli; hlt" : : : "memory");
}

u32 cpu_apic_id(void)
{
	u32 a, b, c, d;

	cpuid(1, 0, &a, &b, &c, &d);
	return b >> 24;
}

unsigned int cpu_index(void)
{
	u32 id = cpu_apic_id();
	unsigned int n;

	for (n = 0; n < MAX_CPUS; n++)
		if (smp_cpu_ids[n] == id)
			return n;
	return 0;
}

void *alloc(u64 size, u64 align)
{
	u64 base;

	if (!heap_pos)
		heap_pos = (u64)heap_start;
	if (align < 8)
		align = 8;
	base = ALIGN_UP(heap_pos, align);
	heap_pos = base + size;
	return (void *)base;
}

void *zalloc(u64 size, u64 align)
{
	void *p = alloc(size, align);

	memset(p, 0, size);
	return p;
}

#define PTE_PRESENT	0x001UL
#define PTE_RW		0x002UL
#define PTE_PWT		0x008UL
#define PTE_PCD		0x010UL
#define PTE_HUGE	0x080UL
#define PTE_ADDR_MASK	0x000ffffffffff000UL

static u64 *next_table(u64 *entry)
{
	u64 *table;

	if (!(*entry & PTE_PRESENT)) {
		table = zalloc(PAGE_SIZE, PAGE_SIZE);
		*entry = (u64)table | PTE_PRESENT | PTE_RW;
	}
	return (u64 *)(*entry & PTE_ADDR_MASK);
}

/*
 * Identity-map [addr, addr + size) in 2 MiB pages. New intermediate tables
 * come from the heap, which sits inside the statically mapped first 2 MiB.
 */
void map_range(u64 addr, u64 size, unsigned int flags)
{
	u64 page, end = ALIGN_UP(addr + size, HUGE_PAGE_SIZE);
	u64 *pdpt, *pd;

	for (page = addr & ~(HUGE_PAGE_SIZE - 1); page < end;
	     page += HUGE_PAGE_SIZE) {
		pdpt = next_table(&pml4[(page >> 39) & 0x1ff]);
		pd = next_table(&pdpt[(page >> 30) & 0x1ff]);
		pd[(page >> 21) & 0x1ff] = page | PTE_PRESENT | PTE_RW |
			PTE_HUGE |
			(flags & MAP_UNCACHED ? PTE_PCD | PTE_PWT : 0);
		asm volatile("invlpg (%0)" : : "r"(page) : "memory");
	}
}

/* Runs on the first CPU before c_entry, on its final stack. */
void arch_init_early(void)
{
	u32 a, b, c, d;

	cpuid(0, 0, &a, &b, &c, &d);
	/* "AuthenticAMD": EBX "Auth", EDX "enti", ECX "cAMD" */
	vendor_amd = b == 0x68747541 && d == 0x69746e65 && c == 0x444d4163;
	irq_init();
}

void c_entry(void)
{
	if (comm_region->revision != COMM_REGION_ABI_REVISION ||
	    memcmp(comm_region->signature, COMM_REGION_SIGNATURE, 6) != 0) {
		/* Nothing else is trustworthy then: report it and stop. */
		comm_region->cell_state = JAILHOUSE_CELL_FAILED_COMM_REV;
		stop();
	}
	inmate_main();
}
