/*
 * apic-timer: the x2APIC timer at 10 Hz, in the manner of Jailhouse's
 * apic-demo. Calibrates the TSC (and the APIC timer when TSC-deadline is
 * absent) against the PM timer, locks the cell (RUNNING_LOCKED), then
 * prints one line per timer interrupt:
 *
 *   Timer fired, jitter:  NNNN ns, min:  NNNN ns, max:  NNNN ns
 *
 * jitter = how late the interrupt handler ran after the programmed expiry.
 * The first shutdown request is refused ("Rejecting first shutdown request
 * - try again!"); the second stops the timer, prints "Stopped APIC demo"
 * and sets the cell state to SHUT_DOWN. After `count=N` timer events
 * (default 0 = unlimited) it prints a PASSED/FAILED summary of the
 * interval checks and keeps running until shut down.
 *
 * Command line: count=N, period-us=N (default 100000).
 */
#include <inmate.h>

#define TIMER_VECTOR	32

static volatile u64 expected_tsc;
static volatile u64 fired_tsc;
static volatile unsigned long events;

static void timer_handler(unsigned int vector)
{
	fired_tsc = rdtsc();
	events++;
}

static long tsc_to_ns(long cycles)
{
	return cycles * 1000000L / (long)tsc_khz();
}

void inmate_main(void)
{
	unsigned long seen = 0, count, late = 0;
	long period_us, jitter, min = 0, max = 0;
	bool shutdown_requested = false, checked = false;
	u64 khz, apic_khz, period_tsc;

	count = cmdline_parse_int("count", 0);
	period_us = cmdline_parse_int("period-us", 100000);
	if (period_us < 1000)
		period_us = 1000;

	khz = tsc_init();
	printk("Calibrated TSC frequency: %lu.%03lu MHz\n", khz / 1000,
	       khz % 1000);
	irq_set_handler(TIMER_VECTOR, timer_handler);
	apic_khz = apic_timer_init(TIMER_VECTOR);
	if (apic_timer_tsc_deadline())
		printk("Using TSC-deadline mode of the x2APIC timer\n");
	else
		printk("Calibrated APIC frequency: %lu kHz\n", apic_khz * 16);
	if (!khz) {
		printk("apic-timer: FAILED (no TSC frequency)\n");
		return;
	}

	comm_set_state(JAILHOUSE_CELL_RUNNING_LOCKED);

	period_tsc = period_us * khz / 1000;
	expected_tsc = rdtsc() + period_tsc;
	apic_timer_set_deadline(expected_tsc);

	for (;;) {
		wait_for_interrupt();

		if (events != seen) {
			seen = events;
			jitter = tsc_to_ns(fired_tsc - expected_tsc);
			if (seen == 1 || jitter < min)
				min = jitter;
			if (seen == 1 || jitter > max)
				max = jitter;
			/* a tick that came in early, or a whole period late */
			if (jitter < 0 || jitter > period_us * 1000L)
				late++;
			printk("Timer fired, jitter: %6ld ns, min: %6ld ns, "
			       "max: %6ld ns\n", jitter, min, max);
			expected_tsc += period_tsc;
			/* never program a deadline in the past */
			if (expected_tsc < rdtsc())
				expected_tsc = rdtsc() + period_tsc;
			apic_timer_set_deadline(expected_tsc);
			if (count && seen == count && !checked) {
				checked = true;
				printk("apic-timer: %lu events, %lu out of "
				       "range: %s\n", seen, late,
				       late ? "FAILED" : "PASSED");
			}
		}

		switch (comm_poll()) {
		case JAILHOUSE_MSG_SHUTDOWN_REQUEST:
			if (!shutdown_requested) {
				shutdown_requested = true;
				printk("Rejecting first shutdown request - "
				       "try again!\n");
				comm_reply(JAILHOUSE_MSG_REQUEST_DENIED);
				break;
			}
			apic_timer_stop();
			printk("Stopped APIC demo\n");
			comm_set_state(JAILHOUSE_CELL_SHUT_DOWN);
			return;
		default:
			break;
		}
	}
}
