/*
 * Guest for the benchmarks (bench/qemu_bench.py, bench/nested_bench.py):
 * TIMING_CALLS calls of PSCI_VERSION on one CPU, timed with the generic
 * timer (CNTVCT_EL0, after an ISB), then as many of SMCCC_VERSION, which is
 * never forwarded (QEMU answers it under TCG, the kernel under KVM): the
 * floor of a call that leaves the guest, measured in the same run.
 *
 *   TIMING calls=0x... ticks=0x... freq=0x... x0=0x...
 *   TIMING_LOCAL calls=0x... ticks=0x... freq=0x... x0=0x...
 *
 * (x0: the last answer) and PSCI SYSTEM_OFF.  100 warm-up calls come first,
 * untimed, so the first forwarded call's connection set-up is not counted.
 * TIMING_CALLS is 20000 unless the build says otherwise (timing-short.elf:
 * 300, for the nested tier, where every call crosses a serial line).
 */

#include "guest.h"

#ifndef TIMING_CALLS
#define TIMING_CALLS	20000
#endif
#define WARMUP_CALLS	100

/* Time TIMING_CALLS calls of \fn and print them on a line named \name. */
.macro	timed_calls fn, name
	ldr	x19, =TIMING_CALLS
	isb
	mrs	x20, cntvct_el0
1:	ldr	x0, =\fn
	mov	x1, xzr
	mov	x2, xzr
	mov	x3, xzr
	bl	smccc
	subs	x19, x19, #1
	b.ne	1b
	isb
	mrs	x21, cntvct_el0
	mov	x22, x0

	ldr	x0, =\name
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
.endm

	guest_entry str_hello

	mov	x19, #WARMUP_CALLS
1:	ldr	x0, =FN_PSCI_VERSION
	bl	smccc
	subs	x19, x19, #1
	b.ne	1b

	timed_calls FN_PSCI_VERSION, str_timing
	timed_calls FN_SMCCC_VERSION, str_local
	b	system_off

	.section .rodata
str_hello:	.asciz	"GUEST timing conduit=" CONDUIT_NAME
str_timing:	.asciz	"TIMING"
str_local:	.asciz	"TIMING_LOCAL"
str_calls:	.asciz	"calls"
str_ticks:	.asciz	"ticks"
str_freq:	.asciz	"freq"
str_x0:		.asciz	"x0"

	.bss
	.balign	16
	.space	16384
stack_top:
