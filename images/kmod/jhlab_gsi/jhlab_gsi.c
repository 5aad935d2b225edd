// SPDX-License-Identifier: GPL-2.0
/*
 * jhlab_gsi: hands an interrupt line (GSI) of the root cell to a cell.
 *
 * On Jailhouse a cell that owns an IOAPIC pin gets that pin's interrupts:
 * the hypervisor programs the physical redirection entry with the cell's
 * vector and destination, so the root cell's Linux loses the line and none
 * of its handlers runs (the ACPI SCI handler included). jhlab's root cell is
 * not virtualized: a line's interrupt always arrives in the root's Linux.
 * This module is the smallest piece of kernel that gives it to the cell
 * instead. While a file holds a GSI:
 *
 *  - every handler the root's drivers have on the line is replaced, in
 *    place, by the forwarder below: it masks the line (disable_irq_nosync)
 *    and signals the file's eventfd, which the hypervisor model turns into
 *    the interrupt of the cell's redirection entry; the root's own handler
 *    is not called;
 *  - user space unmasks the line after the cell's EOI (JHLAB_GSI_UNMASK),
 *    so a level-triggered line cannot storm;
 *  - closing the file (or the process ending) puts the root's handlers
 *    back and unmasks the line.
 *
 * The drivers' actions stay registered, so a driver may free or request its
 * interrupt meanwhile as usual (a handler requested meanwhile runs as its
 * driver wrote it). A line without handlers gets one of ours, exclusive.
 *
 * User space alone cannot do this: no Linux interface forwards a line that
 * has no PCI device behind it (VFIO and UIO need one), and the root's own
 * handler would still run (the ACPI SCI handler clears and disables the
 * fixed events a cell enabled).
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/acpi.h>
#include <linux/eventfd.h>
#include <linux/fs.h>
#include <linux/interrupt.h>
#include <linux/irq.h>
#include <linux/irqdesc.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/uaccess.h>
#include <linux/xarray.h>

#include "jhlab_gsi.h"

/* Handlers of one line this module replaces at most (a shared line's). */
#define MAX_TAKEN	16

/* A root handler replaced by the forwarder, to be put back. */
struct taken_handler {
	struct irqaction *action;
	void *dev_id;
	irq_handler_t handler;
	const char *name;
};

/* One open file: at most one claimed line. */
struct gsi_line {
	spinlock_t mask_lock;		/* masked, against the forwarder */
	bool claimed;
	bool masked;
	bool own_action;		/* no root handler: ours is requested */
	unsigned int gsi;
	unsigned int irq;
	struct eventfd_ctx *trigger;
	unsigned int taken;
	struct taken_handler root[MAX_TAKEN];
};

/* Claims and releases; the forwarder finds its line by IRQ number. */
static DEFINE_MUTEX(gsi_mutex);
static DEFINE_XARRAY(lines_by_irq);

static irqreturn_t gsi_forward(int irq, void *dev_id)
{
	struct gsi_line *line = xa_load(&lines_by_irq, irq);
	unsigned long flags;
	bool signal = false;

	if (!line)
		return IRQ_NONE;
	spin_lock_irqsave(&line->mask_lock, flags);
	if (!line->masked) {
		line->masked = true;
		disable_irq_nosync(irq);
		signal = true;
	}
	spin_unlock_irqrestore(&line->mask_lock, flags);
	if (signal)
		eventfd_signal(line->trigger, 1);
	return IRQ_HANDLED;
}

static void gsi_unmask(struct gsi_line *line)
{
	unsigned long flags;

	spin_lock_irqsave(&line->mask_lock, flags);
	if (line->masked) {
		line->masked = false;
		enable_irq(line->irq);
	}
	spin_unlock_irqrestore(&line->mask_lock, flags);
}

/*
 * Replace the root's handlers of the line by the forwarder; returns how many,
 * or -EBUSY for a line the root cannot lose (per-CPU, timer, NMI, or more
 * handlers than we keep).
 */
static int gsi_take_handlers(struct gsi_line *line, struct irq_desc *desc)
{
	struct irqaction *action;
	unsigned long flags;
	unsigned int n = 0;
	int err = 0;

	raw_spin_lock_irqsave(&desc->lock, flags);
	for (action = desc->action; action; action = action->next) {
		if (n == MAX_TAKEN || action->secondary ||
		    action->flags & (IRQF_PERCPU | __IRQF_TIMER | IRQF_NO_THREAD)) {
			err = -EBUSY;
			break;
		}
		line->root[n++] = (struct taken_handler) {
			.action = action, .dev_id = action->dev_id,
			.handler = action->handler, .name = action->name,
		};
	}
	if (!err) {
		unsigned int i;

		for (i = 0; i < n; i++)
			WRITE_ONCE(line->root[i].action->handler, gsi_forward);
	}
	raw_spin_unlock_irqrestore(&desc->lock, flags);
	if (err)
		return err;
	/* No root handler runs any more once those in flight are done. */
	synchronize_irq(line->irq);
	return n;
}

/* Put back the handlers still registered (their drivers may have freed some). */
static void gsi_restore_handlers(struct gsi_line *line, struct irq_desc *desc)
{
	struct irqaction *action;
	unsigned long flags;
	unsigned int i;

	raw_spin_lock_irqsave(&desc->lock, flags);
	for (action = desc->action; action; action = action->next) {
		if (action->handler != gsi_forward)
			continue;
		for (i = 0; i < line->taken; i++) {
			if (line->root[i].action == action &&
			    line->root[i].dev_id == action->dev_id) {
				WRITE_ONCE(action->handler, line->root[i].handler);
				break;
			}
		}
	}
	raw_spin_unlock_irqrestore(&desc->lock, flags);
}

static long gsi_claim(struct gsi_line *line, struct jhlab_gsi_claim __user *arg)
{
	struct jhlab_gsi_claim claim;
	struct eventfd_ctx *trigger;
	struct irq_data *data;
	struct irq_desc *desc;
	unsigned int irq, i;
	int err, taken;

	if (copy_from_user(&claim, arg, sizeof(claim)))
		return -EFAULT;
	if (line->claimed)
		return -EBUSY;
	if (acpi_gsi_to_irq(claim.gsi, &irq))
		return -EINVAL;
	data = irq_get_irq_data(irq);
	if (!data)
		return -EINVAL;
	desc = irq_data_to_desc(data);
	if (xa_load(&lines_by_irq, irq))
		return -EBUSY;
	trigger = eventfd_ctx_fdget(claim.eventfd);
	if (IS_ERR(trigger))
		return PTR_ERR(trigger);

	line->gsi = claim.gsi;
	line->irq = irq;
	line->trigger = trigger;
	line->masked = false;
	err = xa_err(xa_store(&lines_by_irq, irq, line, GFP_KERNEL));
	if (err)
		goto put;
	taken = gsi_take_handlers(line, desc);
	if (taken < 0) {
		err = taken;
		goto erase;
	}
	line->taken = taken;
	line->own_action = !taken;
	if (line->own_action) {
		err = request_irq(irq, gsi_forward, 0, "jhlab-gsi", line);
		if (err)
			goto erase;
	}
	line->claimed = true;

	if (taken) {
		pr_info("GSI %u (IRQ %u) taken from the root cell:", claim.gsi, irq);
		for (i = 0; i < line->taken; i++)
			pr_cont(" %s", line->root[i].name);
		pr_cont("\n");
	} else {
		pr_info("GSI %u (IRQ %u) taken (no root handler)\n", claim.gsi, irq);
	}
	claim.irq = irq;
	claim.taken = taken;
	if (copy_to_user(arg, &claim, sizeof(claim)))
		return -EFAULT;	/* claimed all the same: closing the file undoes it */
	return 0;

erase:
	xa_erase(&lines_by_irq, irq);
put:
	eventfd_ctx_put(trigger);
	return err;
}

static void gsi_release_line(struct gsi_line *line)
{
	struct irq_desc *desc;

	if (!line->claimed)
		return;
	desc = irq_data_to_desc(irq_get_irq_data(line->irq));
	if (line->own_action)
		free_irq(line->irq, line);
	else
		gsi_restore_handlers(line, desc);
	/* The forwarder of a handler in flight may still look the line up. */
	synchronize_irq(line->irq);
	xa_erase(&lines_by_irq, line->irq);
	if (!line->own_action)
		gsi_unmask(line);
	eventfd_ctx_put(line->trigger);
	line->claimed = false;
	pr_info("GSI %u (IRQ %u) back to the root cell\n", line->gsi, line->irq);
}

static long gsi_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct gsi_line *line = file->private_data;
	long ret;

	mutex_lock(&gsi_mutex);
	switch (cmd) {
	case JHLAB_GSI_CLAIM:
		ret = gsi_claim(line, (struct jhlab_gsi_claim __user *)arg);
		break;
	case JHLAB_GSI_UNMASK:
		ret = line->claimed ? 0 : -EINVAL;
		if (line->claimed)
			gsi_unmask(line);
		break;
	default:
		ret = -ENOTTY;
	}
	mutex_unlock(&gsi_mutex);
	return ret;
}

static int gsi_open(struct inode *inode, struct file *file)
{
	struct gsi_line *line;

	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;
	line = kzalloc(sizeof(*line), GFP_KERNEL);
	if (!line)
		return -ENOMEM;
	spin_lock_init(&line->mask_lock);
	file->private_data = line;
	return nonseekable_open(inode, file);
}

static int gsi_release(struct inode *inode, struct file *file)
{
	struct gsi_line *line = file->private_data;

	mutex_lock(&gsi_mutex);
	gsi_release_line(line);
	mutex_unlock(&gsi_mutex);
	kfree(line);
	return 0;
}

static const struct file_operations gsi_fops = {
	.owner = THIS_MODULE,
	.open = gsi_open,
	.release = gsi_release,
	.unlocked_ioctl = gsi_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = no_llseek,
};

static struct miscdevice gsi_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = JHLAB_GSI_DEVICE,
	.fops = &gsi_fops,
	.mode = 0600,
};

module_misc_device(gsi_misc);

MODULE_DESCRIPTION("jhlab: a root-cell interrupt line (GSI) forwarded to a cell");
MODULE_LICENSE("GPL");
