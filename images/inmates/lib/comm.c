/*
 * Comm region messages (reference 3.2). The hypervisor clears
 * reply_from_cell, fences and writes msg_to_cell, then waits; the cell
 * answers by clearing msg_to_cell, fencing, and writing reply_from_cell.
 * Cells flagged PASSIVE_COMMREG never get messages.
 */
#include <inmate.h>

#define SERVE_VECTOR		0xef
#define SERVE_PERIOD_NS		(50 * NS_PER_MSEC)

void comm_reply(u32 reply)
{
	comm_region->msg_to_cell = JAILHOUSE_MSG_NONE;
	mfence();
	comm_region->reply_from_cell = reply;
}

void comm_set_state(u32 state)
{
	mfence();
	comm_region->cell_state = state;
}

u32 comm_poll(void)
{
	u32 msg = comm_region->msg_to_cell;

	switch (msg) {
	case JAILHOUSE_MSG_NONE:
	case JAILHOUSE_MSG_SHUTDOWN_REQUEST:
		break;
	case JAILHOUSE_MSG_RECONFIG_COMPLETED:
		comm_reply(JAILHOUSE_MSG_RECEIVED);
		break;
	default:
		comm_reply(JAILHOUSE_MSG_UNKNOWN);
		break;
	}
	return msg;
}

static void serve_tick(unsigned int vector)
{
	(void)vector;
}

void __noreturn comm_serve_until_shutdown(void)
{
	bool timer;

	irq_set_handler(SERVE_VECTOR, serve_tick);
	timer = apic_timer_init(SERVE_VECTOR) || apic_timer_tsc_deadline();
	for (;;) {
		if (comm_poll() == JAILHOUSE_MSG_SHUTDOWN_REQUEST)
			break;
		if (timer) {
			apic_timer_set(SERVE_PERIOD_NS);
			wait_for_interrupt();
		} else {
			cpu_relax();
		}
	}
	apic_timer_stop();
	printk("Shutdown request approved\n");
	comm_reply(JAILHOUSE_MSG_REQUEST_APPROVED);
	stop();
}
