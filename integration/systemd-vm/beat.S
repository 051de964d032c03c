/*
 * Guest for the systemd-vm tier: calls BEAT_FN forever, one call every
 * BEAT_DIV-th of a second (generic timer), and prints every answer:
 *
 *   GUEST beat conduit=hvc el=0x1 mpidr=0x...
 *   BEAT n=0x... x0=0x... x1=0x...
 *
 * It never powers off, so its QEMU unit stays up while the daemon behind
 * it is reloaded and restarted; the test reads the answers from the serial log.
 * Built with ../guests/lib.S (make -f Makefile.beat O=DIR).
 */

#include "guest.h"

#define BEAT_FN		0x82000001	/* the test config's static handler */
#define BEAT_DIV	4		/* 250 ms between calls */

	guest_entry str_hello

	mrs	x25, cntfrq_el0
	mov	x0, #BEAT_DIV
	udiv	x25, x25, x0		/* x25: ticks between calls */
	mov	x19, xzr		/* n */
beat:
	ldr	x0, =BEAT_FN
	mov	x1, xzr
	mov	x2, xzr
	mov	x3, xzr
	mov	x4, xzr
	mov	x5, xzr
	mov	x6, xzr
	mov	x7, xzr
	bl	smccc
	mov	x20, x0
	mov	x21, x1
	add	x19, x19, #1
	ldr	x0, =str_beat
	bl	puts
	ldr	x0, =str_n
	mov	x1, x19
	bl	putkv
	ldr	x0, =str_x0
	mov	x1, x20
	bl	putkv
	ldr	x0, =str_x1
	mov	x1, x21
	bl	putkv
	bl	newline
	isb
	mrs	x26, cntvct_el0
	add	x26, x26, x25
1:	isb
	mrs	x0, cntvct_el0
	cmp	x0, x26
	b.lo	1b
	b	beat

	.section .rodata
str_hello:	.asciz	"GUEST beat conduit=" CONDUIT_NAME
str_beat:	.asciz	"BEAT"
str_n:		.asciz	"n"
str_x0:		.asciz	"x0"
str_x1:		.asciz	"x1"

	.bss
	.balign	16
	.space	16384
stack_top:
