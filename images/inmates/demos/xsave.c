/*
 * xsave: extended CPU state as the SDM defines it (vol. 1 ch. 13, vol. 2
 * CPUID/XSETBV/XGETBV): CPUID leaves 1, 7 and 0xD must agree with each other,
 * XCR0 must hold what XSETBV wrote (also after the CPU left the cell for the
 * hypervisor and came back), and what CPUID announces must execute.
 *
 * Checks ("xsave: NAME: PASS|FAIL (...)"):
 *   cpuid-consistent  AVX => XSAVE and 0xD.0:EAX has SSE|YMM; AVX2 => AVX;
 *                     XSAVE => 0xD.0:EAX has x87|SSE
 *   osxsave           CPUID.1:ECX.OSXSAVE follows CR4.OSXSAVE
 *   xcr0-readback     XGETBV returns what XSETBV wrote (x87|SSE|AVX as
 *                     far as 0xD.0:EAX allows)
 *   xcr0-after-exit   ... still after port I/O to the console (an exit)
 *   sse2              ADDSD computes 123.45 + 543.55
 *   avx               VADDSD computes it (only when CPUID announces AVX)
 * Without XSAVE only cpuid-consistent and sse2 run.
 */
#include <inmate.h>

#define PROBE		"xsave"
#define CR4_OSFXSR	(1UL << 9)
#define CR4_OSXSAVE	(1UL << 18)
#define XCR0_X87	(1UL << 0)
#define XCR0_SSE	(1UL << 1)
#define XCR0_YMM	(1UL << 2)
#define A_BITS		0x405edccccccccccdUL	/* 123.45 */
#define B_BITS		0x4080fc6666666666UL	/* 543.55 */
#define SUM_BITS	0x4084d80000000000UL	/* 667.0 */

static u64 read_cr4(void)
{
	u64 v;

	asm volatile("mov %%cr4, %0" : "=r"(v));
	return v;
}

static void write_cr4(u64 v)
{
	asm volatile("mov %0, %%cr4" : : "r"(v) : "memory");
}

static u64 xgetbv0(void)
{
	u32 lo, hi;

	asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
	return lo | ((u64)hi << 32);
}

static void xsetbv0(u64 v)
{
	asm volatile("xsetbv" : : "a"((u32)v), "d"((u32)(v >> 32)), "c"(0));
}

/* The library is built with -mgeneral-regs-only: the vector registers
 * are used here only, by name, so nothing else needs to preserve them. */
static u64 sse2_add(u64 a, u64 b)
{
	u64 r;

	asm volatile("movq %1, %%xmm0\n\t"
		     "movq %2, %%xmm1\n\t"
		     "addsd %%xmm1, %%xmm0\n\t"
		     "movq %%xmm0, %0" : "=r"(r) : "r"(a), "r"(b));
	return r;
}

static u64 avx_add(u64 a, u64 b)
{
	u64 r;

	asm volatile("vmovq %1, %%xmm0\n\t"
		     "vmovq %2, %%xmm1\n\t"
		     "vaddsd %%xmm1, %%xmm0, %%xmm2\n\t"
		     "vmovq %%xmm2, %0" : "=r"(r) : "r"(a), "r"(b));
	return r;
}

void inmate_main(void)
{
	u32 a, b, c, d, d_eax, d_edx, max_leaf;
	bool xsave, avx, avx2 = false, ok;
	u64 supported, want, got;

	irq_init();	/* an unexpected exception is reported, not a shutdown */
	cpuid(0, 0, &max_leaf, &b, &c, &d);
	cpuid(1, 0, &a, &b, &c, &d);
	xsave = c & (1 << 26);
	avx = c & (1 << 28);
	if (max_leaf >= 7) {
		cpuid(7, 0, &a, &b, &c, &d);
		avx2 = b & (1 << 5);
	}
	d_eax = d_edx = 0;
	if (max_leaf >= 0xd)
		cpuid(0xd, 0, &d_eax, &b, &c, &d_edx);
	supported = d_eax | ((u64)d_edx << 32);
	printk("%s: CPUID XSAVE %d AVX %d AVX2 %d, 0xD.0 XCR0 mask 0x%lx\n",
	       PROBE, xsave, avx, avx2, supported);

	ok = (!avx || (xsave && (supported & (XCR0_SSE | XCR0_YMM)) ==
		       (XCR0_SSE | XCR0_YMM))) &&
	     (!avx2 || avx) &&
	     (!xsave || (supported & (XCR0_X87 | XCR0_SSE)) ==
			(XCR0_X87 | XCR0_SSE));
	check(PROBE, "cpuid-consistent", ok,
	      "XSAVE %d AVX %d AVX2 %d, XCR0 mask 0x%lx", xsave, avx, avx2,
	      supported);

	write_cr4(read_cr4() | CR4_OSFXSR);
	got = sse2_add(A_BITS, B_BITS);
	check(PROBE, "sse2", got == SUM_BITS, "ADDSD result 0x%lx", got);

	if (!xsave) {
		check_summary(PROBE);
		return;
	}
	write_cr4(read_cr4() | CR4_OSXSAVE);
	cpuid(1, 0, &a, &b, &c, &d);
	check(PROBE, "osxsave", c & (1 << 27), "CPUID.1:ECX 0x%x", c);

	want = XCR0_X87 | XCR0_SSE | (supported & XCR0_YMM);
	printk("%s: XCR0 before XSETBV 0x%lx\n", PROBE, xgetbv0());
	xsetbv0(want);
	got = xgetbv0();
	check(PROBE, "xcr0-readback", got == want, "wrote 0x%lx, read 0x%lx",
	      want, got);
	/* the check line above went out through the UART: port exits */
	got = xgetbv0();
	check(PROBE, "xcr0-after-exit", got == want,
	      "0x%lx after console output, 0x%lx written", got, want);

	if (avx) {
		got = avx_add(A_BITS, B_BITS);
		check(PROBE, "avx", got == SUM_BITS, "VADDSD result 0x%lx",
		      got);
	}
	check_summary(PROBE);
}
