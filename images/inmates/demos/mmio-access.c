/*
 * mmio-access: exercises the hypervisor's MMIO instruction decoder against
 * the test device page (reference 3.3): offsets 0xff8..0xfff of the page
 * after the comm region (0x101ff8) are redirected to bytes 0xff8..0xfff of
 * the comm page, which the cell also sees as plain memory at 0x100ff8.
 * Needs a cell with the TEST_DEVICE flag (and, on Jailhouse, a hypervisor
 * built with CONFIG_TEST_DEVICE).
 *
 * Every check prints "Test at line #N passed" or "Test at line #N FAILED
 * (...)"; the end is "MMIO write test passed" or "MMIO write test FAILED".
 * Forms covered: MOV 88/89/8a/8b in byte, word (0x66), dword and qword
 * (REX.W) sizes, MOV C7 /0 with imm32 (dword and sign-extended qword),
 * MOVZX 0f b6 / 0f b7, MOV moffs a1/a3 with 64-bit and (0x67) 32-bit
 * addresses, REX.R/REX.B registers, SIB with scaled index, no-base SIB and
 * disp8/disp32 displacements.
 */
#include <inmate.h>

#define TP_ADDR		(TEST_DEVICE_BASE + 0xff8)
#define TP		((volatile u8 *)TP_ADDR)
#define MIRROR		((volatile u64 *)(COMM_REGION_BASE + 0xff8))

static unsigned int tests, failures;

static void expect(int line, u64 got, u64 want)
{
	tests++;
	if (got == want) {
		printk("Test at line #%d passed\n", line);
		return;
	}
	failures++;
	printk("Test at line #%d FAILED (got 0x%lx, expected 0x%lx)\n", line,
	       got, want);
}

#define EXPECT_EQUAL(got, want) expect(__LINE__, (got), (want))

static void mirror_set(u64 v)
{
	*MIRROR = v;
	barrier();
}

void inmate_main(void)
{
	u64 q;
	u32 l;
	u16 w;
	u8 b;

	printk("mmio-access: testing MMIO instruction forms on 0x%lx\n",
	       TP_ADDR);

	/* --- writes --- */
	mirror_set(0);
	asm volatile("movq %0, (%1)"			/* REX.W 89 */
		     : : "r"(0x1122334455667788UL), "r"(TP) : "memory");
	EXPECT_EQUAL(*MIRROR, 0x1122334455667788UL);

	asm volatile("movl %0, (%1)"			/* 89 */
		     : : "r"(0xaabbccddU), "r"(TP) : "memory");
	EXPECT_EQUAL(*MIRROR, 0x11223344aabbccddUL);

	asm volatile("movw %0, 2(%1)"			/* 66 89, disp8 */
		     : : "r"((u16)0x5a5a), "r"(TP) : "memory");
	EXPECT_EQUAL(*MIRROR, 0x112233445a5accddUL);

	asm volatile("movb %0, 7(%1)"			/* 88, disp8 */
		     : : "q"((u8)0xee), "r"(TP) : "memory");
	EXPECT_EQUAL(*MIRROR, 0xee2233445a5accddUL);

	asm volatile("movl $0x87654321, 4(%0)"		/* c7 /0 imm32 */
		     : : "r"(TP) : "memory");
	EXPECT_EQUAL(*MIRROR, 0x876543215a5accddUL);

	asm volatile("movq $-0x12345678, (%0)"		/* REX.W c7 /0 */
		     : : "r"(TP) : "memory");
	EXPECT_EQUAL(*MIRROR, 0xffffffffedcba988UL);

	mirror_set(0);
	asm volatile("movabs %%eax, 0x101ff8"		/* a3, moffs64 */
		     : : "a"(0xcafef00dU) : "memory");
	EXPECT_EQUAL(*MIRROR, 0xcafef00dUL);

	asm volatile("movabs %%rax, 0x101ff8"		/* REX.W a3 */
		     : : "a"(0x0123456789abcdefUL) : "memory");
	EXPECT_EQUAL(*MIRROR, 0x0123456789abcdefUL);

	mirror_set(0);
	asm volatile(".byte 0x67, 0xa3; .long 0x101ffc"	/* 67 a3, moffs32 */
		     : : "a"(0x600dbeefU) : "memory");
	EXPECT_EQUAL(*MIRROR, 0x600dbeef00000000UL);

	mirror_set(0);
	asm volatile("mov %0, %%r9; mov %1, %%r10; movq %%r9, (%%r10)"
		     : : "r"(0x0badc0de0badc0deUL), "r"(TP)	/* REX.WRB 89 */
		     : "r9", "r10", "memory");
	EXPECT_EQUAL(*MIRROR, 0x0badc0de0badc0deUL);

	mirror_set(0);
	asm volatile("movl %0, 4(%1,%2,2)"		/* 89, SIB, disp8 */
		     : : "r"(0x13579bdfU), "r"(TP - 8), "r"(4UL)
		     : "memory");
	EXPECT_EQUAL(*MIRROR, 0x13579bdf00000000UL);

	mirror_set(0);
	asm volatile("movl %0, 0x1000(%1)"		/* 89, disp32 */
		     : : "r"(0x2468ace0U), "r"(TP - 0x1000) : "memory");
	EXPECT_EQUAL(*MIRROR, 0x2468ace0UL);

	mirror_set(0);
	asm volatile("movl %0, 0x101ffc"		/* 89, SIB no base */
		     : : "r"(0x01020304U) : "memory");
	EXPECT_EQUAL(*MIRROR, 0x0102030400000000UL);

	/* --- reads --- */
	mirror_set(0x8877665544332211UL);
	asm volatile("movq (%1), %0" : "=r"(q) : "r"(TP));	/* REX.W 8b */
	EXPECT_EQUAL(q, 0x8877665544332211UL);

	asm volatile("movl 4(%1), %0" : "=r"(l) : "r"(TP));	/* 8b */
	EXPECT_EQUAL(l, 0x88776655U);

	asm volatile("movw 2(%1), %0" : "=r"(w) : "r"(TP));	/* 66 8b */
	EXPECT_EQUAL(w, 0x4433);

	asm volatile("movb 7(%1), %0" : "=q"(b) : "r"(TP));	/* 8a */
	EXPECT_EQUAL(b, 0x88);

	asm volatile("movzbl 1(%1), %0" : "=r"(l) : "r"(TP));	/* 0f b6 */
	EXPECT_EQUAL(l, 0x22);

	asm volatile("movzwl 6(%1), %0" : "=r"(l) : "r"(TP));	/* 0f b7 */
	EXPECT_EQUAL(l, 0x8877);

	/* movzx must clear the upper bits of a 64-bit destination */
	q = ~0UL;
	asm volatile("movzbq 3(%1), %0" : "+r"(q) : "r"(TP));	/* REX.W 0f b6 */
	EXPECT_EQUAL(q, 0x44);

	/* a 32-bit MOV read zero-extends into the full register */
	q = ~0UL;
	asm volatile("movl (%1), %k0" : "+r"(q) : "r"(TP));
	EXPECT_EQUAL(q, 0x44332211UL);

	asm volatile("movabs 0x101ff8, %%eax" : "=a"(l));	/* a1, moffs64 */
	EXPECT_EQUAL(l, 0x44332211U);

	asm volatile("movabs 0x101ff8, %%rax" : "=a"(q));	/* REX.W a1 */
	EXPECT_EQUAL(q, 0x8877665544332211UL);

	asm volatile(".byte 0x67, 0xa1; .long 0x101ffc"	/* 67 a1, moffs32 */
		     : "=a"(l));
	EXPECT_EQUAL(l, 0x88776655U);

	asm volatile("mov %1, %%r11; movl (%%r11), %%r12d; mov %%r12, %0"
		     : "=r"(q) : "r"(TP) : "r11", "r12");	/* REX.RB 8b */
	EXPECT_EQUAL(q, 0x44332211UL);

	asm volatile("movl 0x101ffc, %0" : "=r"(l));		/* SIB no base */
	EXPECT_EQUAL(l, 0x88776655U);

	/* a byte write must not disturb its neighbours */
	mirror_set(0);
	mmio_write8(TP + 3, 0x7f);
	EXPECT_EQUAL(*MIRROR, 0x7f000000UL);

	printk("mmio-access: %u tests, %u failed\n", tests, failures);
	printk("MMIO write test %s\n", failures ? "FAILED" : "passed");
}
