/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * jhlab_gsi: the user-space interface of the root cell's interrupt-line
 * forwarder (/dev/jhlab-gsi). One open file takes one GSI from the root
 * cell's Linux and signals an eventfd each time the line fires.
 *
 * The Python side (harness/hvmodel/arch/gsi.py) mirrors these numbers; a unit
 * test compiles this header and compares.
 */
#ifndef _UAPI_JHLAB_GSI_H
#define _UAPI_JHLAB_GSI_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define JHLAB_GSI_DEVICE	"jhlab-gsi"

/**
 * struct jhlab_gsi_claim - JHLAB_GSI_CLAIM's argument
 * @gsi:	in: the global system interrupt (IOAPIC GSI base + pin)
 * @eventfd:	in: signalled once per interrupt; the line is then masked
 *		until JHLAB_GSI_UNMASK
 * @irq:	out: the root Linux's IRQ number of the line
 * @taken:	out: how many handlers of the root the line had (detached
 *		until the file is closed)
 */
struct jhlab_gsi_claim {
	__u32 gsi;
	__s32 eventfd;
	__u32 irq;
	__u32 taken;
};

#define JHLAB_GSI_MAGIC		'J'
/* Take the GSI from the root (once per open file). */
#define JHLAB_GSI_CLAIM		_IOWR(JHLAB_GSI_MAGIC, 0x40, struct jhlab_gsi_claim)
/* Unmask the line after an interrupt (no-op while it is not masked). */
#define JHLAB_GSI_UNMASK	_IO(JHLAB_GSI_MAGIC, 0x41)

#endif /* _UAPI_JHLAB_GSI_H */
