/*
 * Interrupt and exception entry stubs: one 16-byte slot per vector
 * (irq_stubs + 16 * vector), pushing a dummy error code where the CPU
 * does not push one, then the vector number.
 *
 * Exceptions save every general-purpose register and call
 * exception_handler(frame), which does not return. Vectors 32..255 save
 * the caller-saved registers, call irq_dispatch(vector) and return.
 * Both keep RSP 16-byte aligned at the call (the CPU aligns it on entry).
 */

	.text
	.balign	16
	.globl	irq_stubs
irq_stubs:
	vector = 0
	.rept	256
	.balign	16
	/* vectors with a CPU error code: 8, 10-14, 17, 21, 29, 30 */
	.if !(vector == 8 || (vector >= 10 && vector <= 14) || vector == 17 || vector == 21 || vector == 29 || vector == 30)
	pushq	$0
	.endif
	pushq	$vector
	.if vector < 32
	jmp	exception_common
	.else
	jmp	irq_common
	.endif
	vector = vector + 1
	.endr

exception_common:
	push	%r15
	push	%r14
	push	%r13
	push	%r12
	push	%r11
	push	%r10
	push	%r9
	push	%r8
	push	%rbp
	push	%rdi
	push	%rsi
	push	%rdx
	push	%rcx
	push	%rbx
	push	%rax
	cld
	mov	%rsp, %rdi
	call	exception_handler
1:	cli
	hlt
	jmp	1b

irq_common:
	push	%r11
	push	%r10
	push	%r9
	push	%r8
	push	%rdi
	push	%rsi
	push	%rdx
	push	%rcx
	push	%rax
	cld
	mov	9*8(%rsp), %rdi
	call	irq_dispatch
	pop	%rax
	pop	%rcx
	pop	%rdx
	pop	%rsi
	pop	%rdi
	pop	%r8
	pop	%r9
	pop	%r10
	pop	%r11
	add	$16, %rsp
	iretq
