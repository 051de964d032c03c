/*
 * Shared routines for the bare-metal test guests: PL011 output, hex
 * printing, SMCCC calls and the exception vectors.
 *
 * Register use: the routines here clobber x0-x17 (an SMCCC 1.2 call may
 * return in all of them) and x30; guests keep their state in x19-x28.
 */

#include "guest.h"

	.text

/* putc(w0): wait for room in the TX FIFO, then write the byte. */
	.global putc
putc:
	ldr	x9, =UART_BASE
1:	ldr	w10, [x9, #UART_FR]
	tbnz	w10, #UART_FR_TXFF, 1b
	strb	w0, [x9, #UART_DR]
	ret

/* puts(x0 = NUL-terminated string) */
	.global puts
puts:
	mov	x11, x30
	mov	x12, x0
1:	ldrb	w0, [x12], #1
	cbz	w0, 2f
	bl	putc
	b	1b
2:	mov	x30, x11
	ret

/* puthex(x0): "0x" and 16 hex digits. */
	.global puthex
puthex:
	mov	x11, x30
	mov	x12, x0
	mov	w0, #'0'
	bl	putc
	mov	w0, #'x'
	bl	putc
	mov	x13, #60
1:	lsr	x0, x12, x13
	and	x0, x0, #0xf
	cmp	x0, #10
	add	x14, x0, #'0'
	add	x15, x0, #('a' - 10)
	csel	x0, x14, x15, lo
	bl	putc
	subs	x13, x13, #4
	b.ge	1b
	mov	x30, x11
	ret

/* putkv(x0 = label, x1 = value): " label=0x..." */
	.global putkv
putkv:
	mov	x16, x30
	mov	x17, x1
	mov	x12, x0
	mov	w0, #' '
	bl	putc
	mov	x0, x12
	bl	puts
	mov	w0, #'='
	bl	putc
	mov	x0, x17
	bl	puthex
	mov	x30, x16
	ret

/*
 * secondary_banner(x0 = MPIDR, x1 = context ID): "SECONDARY mpidr=0x...
 * context=0x... el=0x..." and a newline: a secondary CPU's first words.
 */
	.global secondary_banner
secondary_banner:
	stp	x29, x30, [sp, #-32]!
	stp	x0, x1, [sp, #16]
	ldr	x0, =str_secondary
	bl	puts
	ldr	x0, =str_mpidr
	ldr	x1, [sp, #16]
	bl	putkv
	ldr	x0, =str_context
	ldr	x1, [sp, #24]
	bl	putkv
	ldr	x0, =str_el
	mrs	x1, CurrentEL
	lsr	x1, x1, #2
	bl	putkv
	bl	newline
	ldp	x29, x30, [sp], #32
	ret

/*
 * put_result(x0 = label, x1 = target CPU, x2 = a call's x0): "label
 * target=0x... x0=0x..." and a newline.
 */
	.global put_result
put_result:
	stp	x29, x30, [sp, #-32]!
	stp	x1, x2, [sp, #16]
	bl	puts
	ldr	x0, =str_target
	ldr	x1, [sp, #16]
	bl	putkv
	ldr	x0, =str_result_x0
	ldr	x1, [sp, #24]
	bl	putkv
	bl	newline
	ldp	x29, x30, [sp], #32
	ret

/* boot_banner(x0 = title): "title el=0x... mpidr=0x..." and a newline. */
	.global boot_banner
boot_banner:
	stp	x29, x30, [sp, #-16]!
	bl	puts
	ldr	x0, =str_el
	mrs	x1, CurrentEL
	lsr	x1, x1, #2
	bl	putkv
	ldr	x0, =str_mpidr
	mrs	x1, mpidr_el1
	bl	putkv
	bl	newline
	ldp	x29, x30, [sp], #16
	ret

	.global newline
newline:
	mov	w0, #'\n'
	b	putc

/*
 * smccc(x0 = function ID, x1..x7 = arguments): issue the call on the
 * conduit this guest was built for.  x8..x17 are zeroed first so that a
 * transcript of what arrives at the daemon is deterministic.
 */
	.global smccc
smccc:
	mov	x8, xzr
	mov	x9, xzr
	mov	x10, xzr
	mov	x11, xzr
	mov	x12, xzr
	mov	x13, xzr
	mov	x14, xzr
	mov	x15, xzr
	mov	x16, xzr
	mov	x17, xzr
	CONDUIT	#0
	ret

/* smccc_imm1: the same call with immediate 1, which is not SMCCC for an SMC. */
	.global smccc_imm1
smccc_imm1:
	CONDUIT	#1
	ret

/*
 * Exception vectors: any synchronous exception, IRQ, FIQ or SError taken
 * to the guest prints "EXCEPTION" with the syndrome and powers off.  Stock
 * QEMU on -M virt, for example, makes SMC from EL1 an undefined
 * instruction.
 */
	.balign	2048
	.global vectors
vectors:
	.irp	n, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
	.balign	128
	mov	x19, #\n
	b	unexpected_exception
	.endr

unexpected_exception:
	/* A second exception (e.g. SYSTEM_OFF trapping too): stop here. */
	ldr	x1, =in_exception
	ldr	x0, [x1]
	cbnz	x0, 3f
	mov	x0, #1
	str	x0, [x1]
	ldr	x0, =str_exception
	bl	puts
	ldr	x0, =str_vector
	mov	x1, x19
	bl	putkv
	ldr	x0, =str_esr
	mrs	x1, CurrentEL
	cmp	x1, #(3 << 2)
	b.eq	4f
	cmp	x1, #(2 << 2)
	b.ne	1f
	mrs	x1, esr_el2
	mrs	x20, elr_el2
	b	2f
4:	mrs	x1, esr_el3
	mrs	x20, elr_el3
	b	2f
1:	mrs	x1, esr_el1
	mrs	x20, elr_el1
2:	bl	putkv
	ldr	x0, =str_elr
	mov	x1, x20
	bl	putkv
	bl	newline
	b	system_off
3:	ldr	x0, =str_halt
	bl	puts
	b	halt

/* Point the vector base register of the current EL (1 or 2) at vectors. */
	.global set_vbar
set_vbar:
	ldr	x0, =vectors
	mrs	x1, CurrentEL
	cmp	x1, #(3 << 2)
	b.eq	2f
	cmp	x1, #(2 << 2)
	b.ne	1f
	msr	vbar_el2, x0
	isb
	ret
2:	msr	vbar_el3, x0
	isb
	ret
1:	msr	vbar_el1, x0
	isb
	ret

/* Print "SYSTEM_OFF", then PSCI SYSTEM_OFF; spin if it returns. */
	.global system_off
system_off:
	ldr	x0, =str_system_off
	bl	puts
	ldr	x0, =FN_PSCI_SYSTEM_OFF
	bl	smccc
	ldr	x0, =str_system_off_returned
	bl	puts
	b	halt

	.global halt
halt:
	wfi
	b	halt

	.section .rodata
	.global str_el, str_mpidr
str_el:			.asciz	"el"
str_mpidr:		.asciz	"mpidr"
str_secondary:		.asciz	"SECONDARY"
str_context:		.asciz	"context"
	.global str_target
str_target:		.asciz	"target"
str_result_x0:		.asciz	"x0"
str_exception:		.asciz	"EXCEPTION"
str_vector:		.asciz	"vector"
str_esr:		.asciz	"esr"
str_elr:		.asciz	"elr"
str_halt:		.asciz	"HALT\n"
str_system_off:		.asciz	"SYSTEM_OFF\n"
str_system_off_returned: .asciz	"SYSTEM_OFF returned\n"

	.data
	.balign	8
in_exception:	.quad	0
