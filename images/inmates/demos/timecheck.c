/*
 * timecheck: is the cell's time consistent? The TSC, the local APIC timer
 * and the ACPI PM timer must run at the rates the comm region advertises
 * (tsc_khz, apic_khz; PM timer 3.579545 MHz) and agree with each other, and
 * a timer must never fire before its deadline by the cell's own clocks.
 *
 * Written from the hardware's definition (SDM vol. 3 "APIC timer": the
 * count decrements at the bus clock divided by TDCR; TMCCT reads the
 * current count; LVTT bit 17 = periodic) and Jailhouse's inmate ABI (comm
 * region x86 fields; apic_khz is the undivided APIC bus clock, as Linux's
 * lapic_timer_period / (1000 / HZ) which Jailhouse's driver puts there),
 * not from what any hypervisor implementation does.
 *
 * Checks, one line each ("timecheck: NAME: PASS|FAIL (...)"):
 *   apic-divider     TDCR at start is divide-by-16 (only without TSC
 *                    deadline): a Jailhouse cell CPU keeps the divider the
 *                    root's Linux programmed, and Jailhouse's own timing.c
 *                    relies on it (it never writes TDCR)
 *   tsc-rate         TSC ticks per PM-timer second vs tsc_khz, within 1 %
 *   apic-rate        APIC timer ticks (TDCR /16) per PM-timer second vs
 *                    apic_khz / 16, within 1 %
 *   apic-vs-tsc      APIC timer vs TSC over the same window, within 1 %
 *   tsc-rate-idle    TSC vs PM timer across the one-shot phase, where the
 *                    CPU sleeps in HLT, within 1 %
 *   oneshot-early    no one-shot APIC timer fires more than 1 ms before its
 *                    deadline, by the TSC (and by the PM timer)
 *   periodic-jitter  median |jitter| of a 100 ms periodic APIC timer, by the
 *                    TSC, at most 5 ms (min/median/max printed), the CPU
 *                    waiting in HLT
 *   periodic-early-busy  the same timer while the CPU spins with interrupts
 *                    on (as Jailhouse's apic-demo does between its ticks): no
 *                    tick more than 1 ms early (figures printed; how late
 *                    a tick comes then depends on the host's scheduler)
 *   irq-clock        a 5 ms periodic timer whose handler reads the PM timer
 *                    while the interrupted loop reads it too: every tick
 *                    arrives (within 10 s) and no reading, in the handler or
 *                    in the loop, is earlier than the one before it
 *
 * Command line: seconds=N (rate window, default 10), shots=N (one-shot
 * timers, default 20), periods=N (periodic ticks, default 20),
 * max-jitter-us=N (default 5000), ticks (print each tick of the periodic
 * timer in HLT: "timecheck: tick N jitter J us", for benchmarks),
 * irq-ticks=N (ticks of the irq-clock check, default 20).
 */
#include <inmate.h>

#define PROBE		"timecheck"
#define TIMER_VECTOR	0x40
#define LVTT_PERIODIC	(1 << 17)
#define LVTT_MASKED	(1 << 16)
#define TDCR_DIV_16	0x3
#define MAX_SAMPLES	64
#define PPM_LIMIT	10000	/* 1 % */
#define IRQ_CLOCK_PERIOD_MS	5
#define IRQ_CLOCK_WAIT_MS	10000

static volatile u64 fired_tsc[MAX_SAMPLES + 1];
static volatile unsigned int fired;
/* irq-clock: the handler reads the PM timer too. The latest reading of the
 * loop and of the handler, and how often one was earlier than a reading
 * that came before it (a handler's is later than the loop's last one). */
static volatile bool clock_in_irq;
static volatile u64 loop_last, irq_last;
static volatile unsigned int loop_backwards, irq_backwards;

static void timer_irq(unsigned int vector)
{
	u64 now;

	if (fired <= MAX_SAMPLES)
		fired_tsc[fired] = rdtsc();
	if (clock_in_irq) {
		now = pm_timer_read();
		if (now < irq_last || now < loop_last)
			irq_backwards++;
		irq_last = now;
	}
	fired++;
}

static u64 tsc_to_ns(u64 ticks)
{
	u64 khz = comm_region->tsc_khz;

	return (ticks / khz) * 1000000 + (ticks % khz) * 1000000 / khz;
}

/* Deviation of measured from expected in parts per million (signed). */
static long ppm(u64 measured, u64 expected)
{
	if (!expected)
		return 1000000;
	return (long)((measured * 1000000) / expected) - 1000000;
}

static long labs_(long v)
{
	return v < 0 ? -v : v;
}

static void sort(long *v, unsigned int n)
{
	unsigned int i, j;
	long t;

	for (i = 1; i < n; i++)
		for (j = i; j > 0 && v[j - 1] > v[j]; j--) {
			t = v[j];
			v[j] = v[j - 1];
			v[j - 1] = t;
		}
}

static void rates(u64 window_ns)
{
	u64 pm0, pm1, tsc0, tsc1, elapsed, tsc_khz_m, apic_khz_m;
	u32 left;
	long dev;

	write_msr(X2APIC_LVTT, LVTT_MASKED | TIMER_VECTOR);
	write_msr(X2APIC_TDCR, TDCR_DIV_16);
	pm0 = pm_timer_read();
	tsc0 = rdtsc();
	write_msr(X2APIC_TMICT, 0xffffffff);
	do
		pm1 = pm_timer_read();
	while (pm1 - pm0 < window_ns);
	left = (u32)read_msr(X2APIC_TMCCT);
	tsc1 = rdtsc();
	write_msr(X2APIC_TMICT, 0);
	elapsed = pm1 - pm0;

	tsc_khz_m = (tsc1 - tsc0) * 1000 / (elapsed / 1000);
	dev = ppm(tsc_khz_m, comm_region->tsc_khz);
	check(PROBE, "tsc-rate", labs_(dev) <= PPM_LIMIT,
	      "%lu kHz over %lu ms of PM timer, comm region %u kHz, %ld ppm",
	      tsc_khz_m, elapsed / NS_PER_MSEC, comm_region->tsc_khz, dev);

	apic_khz_m = (u64)(0xffffffffU - left) * 16 * 1000 / (elapsed / 1000);
	dev = ppm(apic_khz_m, comm_region->apic_khz);
	check(PROBE, "apic-rate", labs_(dev) <= PPM_LIMIT,
	      "%lu kHz bus clock (TDCR /16) over %lu ms of PM timer, "
	      "comm region %u kHz, %ld ppm", apic_khz_m,
	      elapsed / NS_PER_MSEC, comm_region->apic_khz, dev);

	/* APIC ticks expected over the TSC's idea of the window */
	dev = ppm((u64)(0xffffffffU - left) * 16,
		  tsc_to_ns(tsc1 - tsc0) * comm_region->apic_khz / 1000000);
	check(PROBE, "apic-vs-tsc", labs_(dev) <= PPM_LIMIT,
	      "APIC timer vs TSC over the same window: %ld ppm", dev);
}

static void oneshots(unsigned int shots)
{
	u64 pm0, pm1, tsc0, tsc1, interval, elapsed, pm_elapsed;
	u64 arm_tsc, arm_pm, fire_pm;
	long early, worst = -1000000000L, worst_pm = -1000000000L, dev;
	unsigned int i;

	write_msr(X2APIC_TDCR, TDCR_DIV_16);
	write_msr(X2APIC_LVTT, TIMER_VECTOR);
	pm0 = pm_timer_read();
	tsc0 = rdtsc();
	for (i = 0; i < shots; i++) {
		interval = (10 + (i * 7) % 41) * NS_PER_MSEC;
		fired = 0;
		arm_pm = pm_timer_read();
		arm_tsc = rdtsc();
		write_msr(X2APIC_TMICT, interval * comm_region->apic_khz /
			  16 / 1000000 + 1);
		while (!fired)
			wait_for_interrupt();
		fire_pm = pm_timer_read();
		elapsed = tsc_to_ns(fired_tsc[0] - arm_tsc);
		pm_elapsed = fire_pm - arm_pm;
		early = (long)interval - (long)elapsed;
		if (early > worst)
			worst = early;
		early = (long)interval - (long)pm_elapsed;
		if (early > worst_pm)
			worst_pm = early;
	}
	pm1 = pm_timer_read();
	tsc1 = rdtsc();
	check(PROBE, "oneshot-early", worst <= (long)NS_PER_MSEC,
	      "%u one-shot timers of 10-50 ms: at worst %ld us early by the "
	      "TSC, %ld us by the PM timer (negative: late)", shots,
	      worst / 1000, worst_pm / 1000);
	dev = ppm(tsc_to_ns(tsc1 - tsc0), pm1 - pm0);
	check(PROBE, "tsc-rate-idle", labs_(dev) <= PPM_LIMIT,
	      "TSC vs PM timer across %lu ms mostly in HLT: %ld ppm",
	      (pm1 - pm0) / NS_PER_MSEC, dev);
}

static void periodic(unsigned int periods, long limit_ns, bool busy,
		     bool print_ticks)
{
	long jitter[MAX_SAMPLES], abs_jitter[MAX_SAMPLES], median;
	u64 arm_tsc;
	bool ok;
	u64 period_ticks = 100 * NS_PER_MSEC * comm_region->apic_khz / 16 /
		1000000;
	unsigned int n;

	if (periods > MAX_SAMPLES - 1)
		periods = MAX_SAMPLES - 1;
	fired = 0;
	write_msr(X2APIC_TDCR, TDCR_DIV_16);
	write_msr(X2APIC_LVTT, LVTT_PERIODIC | TIMER_VECTOR);
	arm_tsc = rdtsc();
	write_msr(X2APIC_TMICT, period_ticks);
	if (busy) {
		enable_irqs();
		while (fired <= periods)
			cpu_relax();
		disable_irqs();
	} else {
		while (fired <= periods)
			wait_for_interrupt();
	}
	write_msr(X2APIC_TMICT, 0);
	write_msr(X2APIC_LVTT, LVTT_MASKED | TIMER_VECTOR);

	/* tick n is due n periods after the timer was armed (the APIC reloads the
	 * count at expiry, so a late delivery does not move the later ones) */
	for (n = 0; n < periods; n++) {
		jitter[n] = (long)tsc_to_ns(fired_tsc[n] - arm_tsc) -
			(long)((n + 1) * 100 * NS_PER_MSEC);
		abs_jitter[n] = labs_(jitter[n]);
		if (print_ticks && !busy)
			printk("%s: tick %u jitter %ld us\n", PROBE, n + 1,
			       jitter[n] / 1000);
	}
	sort(jitter, periods);
	sort(abs_jitter, periods);
	median = abs_jitter[periods / 2];
	/* In HLT the median is held to the limit; while spinning, how late a tick
	 * is depends on the host's scheduler, so only an early tick fails. */
	ok = busy ? jitter[0] >= -(long)NS_PER_MSEC : median <= limit_ns;
	check(PROBE, busy ? "periodic-early-busy" : "periodic-jitter",
	      ok, "%u ticks of 100 ms by the TSC%s: jitter min "
	      "%ld us, median "
	      "|jitter| %ld us, max %ld us", periods,
	      busy ? ", CPU spinning" : ", CPU in HLT", jitter[0] / 1000,
	      median / 1000, jitter[periods - 1] / 1000);
}

/* The PM timer read in an interrupt handler while the interrupted code
 * reads it as well: the clock's lock must not be held with interrupts on
 * (a tick that interrupted the loop inside it would wait for it forever). */
static void irq_clock(unsigned int ticks)
{
	u64 start, now;

	fired = 0;
	loop_backwards = irq_backwards = 0;
	loop_last = irq_last = 0;
	clock_in_irq = true;
	write_msr(X2APIC_TDCR, TDCR_DIV_16);
	write_msr(X2APIC_LVTT, LVTT_PERIODIC | TIMER_VECTOR);
	start = pm_timer_read();
	write_msr(X2APIC_TMICT, IRQ_CLOCK_PERIOD_MS * comm_region->apic_khz / 16);
	enable_irqs();
	do {
		now = pm_timer_read();
		if (now < loop_last)
			loop_backwards++;
		loop_last = now;
	} while (fired < ticks && now - start < IRQ_CLOCK_WAIT_MS * NS_PER_MSEC);
	disable_irqs();
	write_msr(X2APIC_TMICT, 0);
	write_msr(X2APIC_LVTT, LVTT_MASKED | TIMER_VECTOR);
	clock_in_irq = false;
	check(PROBE, "irq-clock", fired >= ticks && !loop_backwards &&
	      !irq_backwards, "%u of %u ticks of %u ms read the PM timer in "
	      "their handler while the loop read it; readings earlier than one "
	      "before: %u in the loop, %u in the handler", fired, ticks,
	      IRQ_CLOCK_PERIOD_MS, loop_backwards, irq_backwards);
}

void inmate_main(void)
{
	u64 seconds = cmdline_parse_int("seconds", 10);
	unsigned int shots = cmdline_parse_int("shots", 20);
	unsigned int periods = cmdline_parse_int("periods", 20);
	long limit = cmdline_parse_int("max-jitter-us", 5000) * 1000L;
	bool print_ticks = cmdline_parse_bool("ticks", false);
	unsigned int irq_ticks = cmdline_parse_int("irq-ticks", 20);
	u32 a, b, c, d, tdcr;
	bool deadline;

	/* before anything touches the APIC timer */
	tdcr = (u32)read_msr(X2APIC_TDCR);
	cpuid(1, 0, &a, &b, &c, &d);
	deadline = c & (1 << 24);
	irq_init();
	irq_set_handler(TIMER_VECTOR, timer_irq);

	printk("%s: comm region tsc_khz %u apic_khz %u, PM timer 0x%x, "
	       "TSC-deadline %s, TDCR at start 0x%x\n", PROBE,
	       comm_region->tsc_khz, comm_region->apic_khz,
	       comm_region->pm_timer_address, deadline ? "yes" : "no", tdcr);
	if (!comm_region->tsc_khz || !comm_region->apic_khz ||
	    !pm_timer_available()) {
		check(PROBE, "comm-region", false,
		      "needs tsc_khz, apic_khz and a PM timer");
		check_summary(PROBE);
		return;
	}
	if (!deadline)
		check(PROBE, "apic-divider", (tdcr & 0xb) == TDCR_DIV_16,
		      "TDCR 0x%x at start, divide-by-16 expected", tdcr);
	rates(seconds * NS_PER_SEC);
	oneshots(shots);
	periodic(periods, limit, false, print_ticks);
	periodic(periods, limit, true, print_ticks);
	irq_clock(irq_ticks);
	check_summary(PROBE);
}
