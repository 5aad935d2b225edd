/*
 * pio-loop: port I/O as fast as the hypervisor serves it, the guest side of
 * the PIO exit benchmark (scripts/bench cells). For ms= milliseconds
 * (default 2000) it writes a counter byte to port= (default 0x2ff, the
 * scratch register of the cell's UART: whitelisted, and harmless to touch)
 * and reads it back. Under KVM every IN and OUT exits to the VMM, so this
 * measures the round trip guest -> VMM -> real port -> guest. Every 64
 * pairs it reads the PM timer (an exit of its own, counted too), and stops
 * once ms= have passed on it.
 *
 *   pio-loop: port 0x2ff for 2000 ms
 *   pio-loop: 123456 exits in 2000123 us, 0 mismatches: PASSED
 *
 * A read that does not return the byte written counts as a mismatch, and
 * any mismatch (or no PM timer) gives FAILED.
 */
#include <inmate.h>

#define PAIRS_PER_TIMER_READ	64

void inmate_main(void)
{
	u16 port = cmdline_parse_int("port", 0x2ff);
	u64 ms = cmdline_parse_int("ms", 2000);
	u64 t0, t, exits = 0, mismatches = 0;
	u8 value = 0;
	int i;

	printk("pio-loop: port 0x%x for %lu ms\n", port, ms);
	if (!pm_timer_available()) {
		printk("pio-loop: no PM timer: FAILED\n");
		return;
	}
	t0 = pm_timer_read();
	do {
		for (i = 0; i < PAIRS_PER_TIMER_READ; i++) {
			outb(++value, port);
			if (inb(port) != value)
				mismatches++;
		}
		exits += 2 * PAIRS_PER_TIMER_READ + 1;
		t = pm_timer_read();
	} while (t - t0 < ms * NS_PER_MSEC);
	printk("pio-loop: %lu exits in %lu us, %lu mismatches: %s\n", exits,
	       (t - t0) / NS_PER_USEC, mismatches,
	       mismatches ? "FAILED" : "PASSED");
}
