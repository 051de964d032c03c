/*
 * Guest for bench/qemu_bench.py: TIMING_CALLS calls of PSCI_VERSION on one
 * CPU, timed with the generic timer (CNTVCT_EL0, after an ISB), then
 *
 *   TIMING calls=0x... ticks=0x... freq=0x... x0=0x...
 *
 * (x0: the last answer) and PSCI SYSTEM_OFF.  100 warm-up calls come first,
 * untimed, so the first forwarded call's connection set-up is not counted.
 */

#include "guest.h"

#define TIMING_CALLS	20000
#define WARMUP_CALLS	100

	guest_entry str_hello

	mov	x19, #WARMUP_CALLS
1:	ldr	x0, =FN_PSCI_VERSION
	bl	smccc
	subs	x19, x19, #1
	b.ne	1b

	ldr	x19, =TIMING_CALLS
	isb
	mrs	x20, cntvct_el0
2:	ldr	x0, =FN_PSCI_VERSION
	mov	x1, xzr
	mov	x2, xzr
	mov	x3, xzr
	bl	smccc
	subs	x19, x19, #1
	b.ne	2b
	isb
	mrs	x21, cntvct_el0
	mov	x22, x0

	ldr	x0, =str_timing
	bl	puts
	ldr	x0, =str_calls
	ldr	x1, =TIMING_CALLS
	bl	putkv
	ldr	x0, =str_ticks
	sub	x1, x21, x20
	bl	putkv
	ldr	x0, =str_freq
	mrs	x1, cntfrq_el0
	bl	putkv
	ldr	x0, =str_x0
	mov	x1, x22
	bl	putkv
	bl	newline
	b	system_off

	.section .rodata
str_hello:	.asciz	"GUEST timing conduit=" CONDUIT_NAME
str_timing:	.asciz	"TIMING"
str_calls:	.asciz	"calls"
str_ticks:	.asciz	"ticks"
str_freq:	.asciz	"freq"
str_x0:		.asciz	"x0"

	.bss
	.balign	16
	.space	16384
stack_top:
