/*
 * Reset entry of a jhlab inmate (reference 5.1, 5.2).
 *
 * Every CPU of the cell starts here at once, in real mode with CS=0, IP=0.
 * A CPU brought up later through INIT/SIPI (vector 0) comes here too. Path:
 * 16-bit -> 32-bit protected mode -> 64-bit long mode with the static
 * identity map of the first 2 MiB. Then, if the first CPU left an entry in
 * ap_entry, this CPU takes it; otherwise it draws a CPU number, records its
 * APIC ID, and all but number 0 halt for good.
 */

#define X86_CR0_PE		0x00000001
#define X86_CR0_WP		0x00010000
#define X86_CR0_PG		0x80000000
#define X86_CR4_PAE		0x00000020
#define MSR_EFER		0xc0000080
#define EFER_LME		0x00000100
#define MSR_MTRR_DEF_TYPE	0x000002ff
#define MTRR_ENABLE		0x00000800

#define PTE_PRESENT		0x001
#define PTE_RW			0x002
#define PTE_HUGE		0x080

#define SEL_CODE32		0x08
#define SEL_CODE64		0x10
#define SEL_DATA		0x18

#define MAX_CPUS		16

	.code16
	.section ".boot.entry", "ax"
	.globl	__reset_entry
__reset_entry:
	lgdtl	%cs:gdt_ptr

	mov	%cr0, %eax
	or	$X86_CR0_PE, %eax
	mov	%eax, %cr0

	ljmpl	$SEL_CODE32, $start32

	.balign	8
gdt:
	.quad	0
	.quad	0x00cf9b000000ffff	/* 0x08: 32-bit code, flat */
	.quad	0x00af9b000000ffff	/* 0x10: 64-bit code */
	.quad	0x00cf93000000ffff	/* 0x18: data, flat */
gdt_end:

gdt_ptr:
	.short	gdt_end - gdt - 1
	.long	gdt

	.code32
start32:
	mov	$SEL_DATA, %eax
	mov	%eax, %ds
	mov	%eax, %es
	mov	%eax, %ss
	mov	%eax, %fs
	mov	%eax, %gs

	mov	%cr4, %eax
	or	$X86_CR4_PAE, %eax
	mov	%eax, %cr4

	mov	$pml4, %eax
	mov	%eax, %cr3

	/* Only the enable bit counts: the hypervisor emulates it. */
	mov	$MSR_MTRR_DEF_TYPE, %ecx
	rdmsr
	or	$MTRR_ENABLE, %eax
	wrmsr

	mov	$MSR_EFER, %ecx
	rdmsr
	or	$EFER_LME, %eax
	wrmsr

	/* Also clears CD and NW, which are set at reset. */
	mov	$(X86_CR0_PG | X86_CR0_WP | X86_CR0_PE), %eax
	mov	%eax, %cr0

	ljmpl	$SEL_CODE64, $start64

	.code64
	.text
start64:
	/* A CPU started through INIT/SIPI: take the pending entry. */
	mov	ap_entry(%rip), %rax
	test	%rax, %rax
	jnz	ap_start

	mov	$1, %r8d
	lock xaddl %r8d, cpu_ticket(%rip)

	mov	$1, %eax
	xor	%ecx, %ecx
	cpuid
	shr	$24, %ebx
	cmp	$MAX_CPUS, %r8d
	jae	1f
	lea	smp_cpu_ids(%rip), %rax
	mov	%ebx, (%rax, %r8, 4)
1:	lock incl smp_num_cpus(%rip)

	test	%r8d, %r8d
	jnz	park

	/* CPU number 0: .bss is ours alone, the others only touch .data. */
	lea	__bss_start(%rip), %rdi
	lea	__bss_end(%rip), %rcx
	sub	%rdi, %rcx
	xor	%eax, %eax
	cld
	rep stosb

	lea	stack_top(%rip), %rsp
	call	arch_init_early
	call	c_entry
	jmp	stop

ap_start:
	/* The stack was published before the entry (x86 keeps store order);
	 * hand both back by clearing ap_entry once the stack is loaded. */
	mov	ap_stack(%rip), %rsp
	movq	$0, ap_entry(%rip)
	mov	%rax, %rdi
	call	smp_ap_c_entry
	jmp	stop

park:
	cli
1:	hlt
	jmp	1b

	.data
	.globl	ap_entry, ap_stack, smp_num_cpus, smp_cpu_ids
	.balign	8
ap_entry:
	.quad	0
ap_stack:
	.quad	0
cpu_ticket:
	.long	0
smp_num_cpus:
	.long	0
smp_cpu_ids:
	.fill	MAX_CPUS, 4, 0xffffffff

	/*
	 * Page tables: identity map of 0..2 MiB with one 2 MiB page, which
	 * covers the cell RAM, the comm region and the test device page.
	 * They live in .data because map_range() adds entries at run time.
	 */
	.section ".data.pagetables", "aw"
	.balign	4096
	.globl	pml4, pdpt0, pd0
pml4:
	.quad	pdpt0 + (PTE_PRESENT | PTE_RW)
	.fill	511, 8, 0
pdpt0:
	.quad	pd0 + (PTE_PRESENT | PTE_RW)
	.fill	511, 8, 0
pd0:
	.quad	0x0 + (PTE_PRESENT | PTE_RW | PTE_HUGE)
	.fill	511, 8, 0
