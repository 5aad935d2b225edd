/*
 * hello: the smallest useful inmate. Prints a greeting, what the comm
 * region says, the command line and ten PM timer readings 100 ms apart,
 * checks that the timer advanced, then serves the comm region until a
 * shutdown request arrives (its cell config is not passive).
 */
#include <inmate.h>

void inmate_main(void)
{
	u64 t0, t, prev;
	bool ok = true;
	int i;

	printk("Hello from jhlab inmate \"hello\"!\n");
	printk("comm region: %s rev %u, state %u, %u CPU(s), PM timer 0x%x, "
	       "tsc_khz %u, apic_khz %u, flags 0x%x\n",
	       "JHCOMM", comm_region->revision, comm_region->cell_state,
	       comm_region->num_cpus, comm_region->pm_timer_address,
	       comm_region->tsc_khz, comm_region->apic_khz,
	       comm_region->flags);
	printk("cmdline: \"%s\"\n", cmdline);

	if (pm_timer_available()) {
		t0 = prev = pm_timer_read();
		for (i = 1; i <= 10; i++) {
			delay_us(100000);
			t = pm_timer_read();
			printk("PM timer: %lu us since start\n",
			       (t - t0) / NS_PER_USEC);
			if (t <= prev)
				ok = false;
			prev = t;
		}
		if (prev - t0 < 1000 * NS_PER_MSEC)
			ok = false;
	} else {
		printk("no PM timer in the comm region\n");
		ok = false;
	}
	printk("hello: %s\n", ok ? "PASSED" : "FAILED");
	comm_serve_until_shutdown();
}
