/*
 * Time sources (reference 5.5): the ACPI PM timer at the comm region's
 * pm_timer_address (3.579545 MHz, 24 bit), the TSC calibrated against it,
 * and the x2APIC timer in TSC-deadline mode when CPUID.1:ECX[24] says so,
 * else in one-shot mode divided by 16 (apic_khz / 16 ticks per ms).
 */
#include <inmate.h>

#define LVTT_TSC_DEADLINE	(2 << 17)
#define LVTT_MASKED		(1 << 16)
#define TDCR_DIV_16		0x3
#define CALIBRATION_NS		(100 * NS_PER_MSEC)

static volatile u32 pm_lock;
static u32 pm_last;
static u64 pm_overflows;

static u64 tsc_freq_khz;
static u64 apic_freq_khz;	/* after the divider */
static bool timer_deadline;

static u64 mul_div(u64 a, u64 mul, u64 div)
{
	return (a / div) * mul + (a % div) * mul / div;
}

bool pm_timer_available(void)
{
	return comm_region->pm_timer_address != 0;
}

u64 pm_timer_read(void)
{
	unsigned long flags;
	u32 now;
	u64 ticks;

	if (!pm_timer_available())
		return 0;
	/* interrupts off: a handler reading the clock must not find the lock
	 * taken by the code it interrupted (see irqs_save) */
	flags = irqs_save();
	while (__atomic_exchange_n(&pm_lock, 1, __ATOMIC_ACQUIRE))
		cpu_relax();
	now = inl(comm_region->pm_timer_address) & 0xffffff;
	if (now < pm_last)
		pm_overflows += 1UL << 24;
	pm_last = now;
	ticks = pm_overflows + now;
	__atomic_store_n(&pm_lock, 0, __ATOMIC_RELEASE);
	irqs_restore(flags);
	return mul_div(ticks, NS_PER_SEC, PM_TIMER_HZ);
}

u64 tsc_khz(void)
{
	return tsc_freq_khz;
}

u64 tsc_read_ns(void)
{
	return tsc_freq_khz ? mul_div(rdtsc(), 1000000, tsc_freq_khz) : 0;
}

void delay_us(u64 us)
{
	u64 start, end;

	if (pm_timer_available()) {
		start = pm_timer_read();
		while (pm_timer_read() - start < us * NS_PER_USEC)
			cpu_relax();
	} else if (tsc_freq_khz) {
		end = rdtsc() + mul_div(us, tsc_freq_khz, 1000);
		while (rdtsc() < end)
			cpu_relax();
	}
}

u64 tsc_init(void)
{
	u64 pm_start, pm_end, tsc_start, tsc_end;

	if (!pm_timer_available()) {
		tsc_freq_khz = comm_region->tsc_khz;
		return tsc_freq_khz;
	}
	pm_start = pm_timer_read();
	tsc_start = rdtsc();
	do {
		pm_end = pm_timer_read();
	} while (pm_end - pm_start < CALIBRATION_NS);
	tsc_end = rdtsc();
	tsc_freq_khz = mul_div(tsc_end - tsc_start, 1000000, pm_end - pm_start);
	return tsc_freq_khz;
}

bool apic_timer_tsc_deadline(void)
{
	return timer_deadline;
}

static u64 apic_timer_calibrate(void)
{
	u64 pm_start, pm_end;
	u32 count;

	write_msr(X2APIC_LVTT, LVTT_MASKED);
	write_msr(X2APIC_TMICT, 0xffffffff);
	pm_start = pm_timer_read();
	do {
		pm_end = pm_timer_read();
	} while (pm_end - pm_start < CALIBRATION_NS);
	count = 0xffffffff - (u32)read_msr(X2APIC_TMCCT);
	write_msr(X2APIC_TMICT, 0);
	return mul_div(count, 1000000, pm_end - pm_start);
}

u64 apic_timer_init(unsigned int vector)
{
	u32 a, b, c, d;

	cpuid(1, 0, &a, &b, &c, &d);
	timer_deadline = c & (1 << 24);
	if (timer_deadline) {
		if (!tsc_freq_khz)
			tsc_init();
		write_msr(X2APIC_LVTT, vector | LVTT_TSC_DEADLINE);
		return 0;
	}
	write_msr(X2APIC_TDCR, TDCR_DIV_16);
	if (comm_region->apic_khz)
		apic_freq_khz = comm_region->apic_khz / 16;
	else if (pm_timer_available())
		apic_freq_khz = apic_timer_calibrate();
	write_msr(X2APIC_LVTT, vector);
	return apic_freq_khz;
}

void apic_timer_set_deadline(u64 tsc)
{
	u64 now;

	if (timer_deadline) {
		write_msr(MSR_IA32_TSC_DEADLINE, tsc);
		return;
	}
	now = rdtsc();
	apic_timer_set(tsc > now && tsc_freq_khz ?
		       mul_div(tsc - now, 1000000, tsc_freq_khz) : 0);
}

void apic_timer_set(u64 ns)
{
	u64 ticks;

	if (timer_deadline) {
		write_msr(MSR_IA32_TSC_DEADLINE,
			  rdtsc() + mul_div(ns, tsc_freq_khz, 1000000) + 1);
		return;
	}
	ticks = mul_div(ns, apic_freq_khz, 1000000);
	if (ticks == 0)
		ticks = 1;
	if (ticks > 0xffffffff)
		ticks = 0xffffffff;
	write_msr(X2APIC_TMICT, ticks);
}

void apic_timer_stop(void)
{
	if (timer_deadline)
		write_msr(MSR_IA32_TSC_DEADLINE, 0);
	else
		write_msr(X2APIC_TMICT, 0);
}
