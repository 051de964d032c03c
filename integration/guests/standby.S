/*
 * Guest: PSCI CPU_SUSPEND standby waits for a wake-up event (-M
 * virt,gic-version=3, EL1, HVC conduit, one CPU).
 *
 * It sets up GICv3 for the EL1 virtual timer's PPI (INTID 27) and for one
 * SGI (INTID 1), with DAIF.I kept masked: no interrupt is ever taken, but a
 * pending one still ends a WFI (and so a standby).
 *
 *  1. Arm the virtual timer STANDBY_DIV-th of a second ahead and call
 *     CPU_SUSPEND(power_state 0 = standby): it must return only once the
 *     timer fired, so waited >= wanted.
 *  2. The same with a power-down state (bit 16): served as standby too
 *     (standby-only, and QEMU's own PSCI).
 *  3. Timer off, an SGI sent to itself and left pending: CPU_SUSPEND must
 *     return at once (the test checks only that it returns).
 *
 * Transcript lines (ticks of CNTVCT_EL0, freq = CNTFRQ_EL0):
 *   GUEST standby conduit=hvc el=0x1 mpidr=0x...
 *   STANDBY name=timer x0=0x... waited=0x... wanted=0x... freq=0x...
 *   STANDBY name=powerdown x0=0x... waited=0x... wanted=0x... freq=0x...
 *   STANDBY name=pending x0=0x... waited=0x... wanted=0x0 freq=0x...
 *   STANDBY DONE
 *   SYSTEM_OFF
 */

#include "guest.h"

#define FN_PSCI_CPU_SUSPEND_64	0xC4000001
#define POWER_STATE_STANDBY	0x00000000
#define POWER_STATE_POWERDOWN	0x00010000	/* original format: StateType */
#define STANDBY_DIV		10		/* 100 ms */

#define GICD_BASE		0x08000000
#define GICD_CTLR		0x0000
#define GICD_CTLR_RWP		(1 << 31)
#define GICD_CTLR_ARE		(1 << 4)
#define GICD_CTLR_ENGRP1	(1 << 1)
#define GICR_BASE		0x080A0000	/* CPU 0's redistributor */
#define GICR_WAKER		0x0014
#define GICR_WAKER_PSLEEP	(1 << 1)
#define GICR_WAKER_CASLEEP	(1 << 2)
#define GICR_SGI		0x10000		/* SGI_base */
#define GICR_IGROUPR0		(GICR_SGI + 0x0080)
#define GICR_ISENABLER0		(GICR_SGI + 0x0100)
#define GICR_ICPENDR0		(GICR_SGI + 0x0280)
#define GICR_IPRIORITYR		(GICR_SGI + 0x0400)
#define VTIMER_INTID		27
#define SGI_INTID		1
#define POLL_LIMIT		0x1000000

	guest_entry str_hello
	msr	daifset, #0xf		/* I (and the rest) masked throughout */

	bl	gic_init

	/* 1. Standby with the timer armed. */
	ldr	x0, =str_timer
	ldr	x1, =POWER_STATE_STANDBY
	mov	x2, #1
	bl	standby

	/* 2. A power-down state, served as standby. */
	ldr	x0, =str_powerdown
	ldr	x1, =POWER_STATE_POWERDOWN
	mov	x2, #1
	bl	standby

	/* 3. Timer off, an SGI pending: no wait. */
	msr	cntv_ctl_el0, xzr
	isb
	mov	x0, #(SGI_INTID << 24)	/* target list: Aff0 0 (this CPU), Aff1..3 0 */
	orr	x0, x0, #1
	msr	icc_sgi1r_el1, x0
	isb
	/* Wait until the redistributor has it pending (ISPENDR0 = ICPENDR0 reads). */
	ldr	x1, =GICR_BASE + GICR_ICPENDR0
	ldr	x3, =POLL_LIMIT
4:	ldr	w2, [x1]
	tbnz	w2, #SGI_INTID, 5f
	subs	x3, x3, #1
	b.ne	4b
	ldr	x0, =str_sgi_timeout
	bl	puts
	b	system_off
5:	ldr	x0, =str_pending
	ldr	x1, =POWER_STATE_STANDBY
	mov	x2, xzr
	bl	standby

	ldr	x0, =str_done
	bl	puts
	b	system_off

/*
 * standby(x0 = name, x1 = power_state, x2 = arm the timer?): CPU_SUSPEND,
 * timed, and its STANDBY line.  The timer is left as the call found it
 * (fired, if it was armed) until the next arming or disarming.
 */
standby:
	mov	x28, x30
	mov	x19, x0
	mov	x20, x1
	mov	x23, xzr			/* wanted */
	mrs	x24, cntfrq_el0
	isb
	mrs	x21, cntvct_el0			/* the start: CVAL counts from here */
	cbz	x2, 1f
	msr	cntv_ctl_el0, xzr		/* disarmed while CVAL changes */
	isb
	mov	x25, #STANDBY_DIV
	udiv	x23, x24, x25
	add	x0, x21, x23
	msr	cntv_cval_el0, x0
	mov	x0, #1				/* ENABLE, IMASK clear */
	msr	cntv_ctl_el0, x0
	isb
1:	ldr	x0, =FN_PSCI_CPU_SUSPEND_64
	mov	x1, x20
	mov	x2, xzr				/* entry point */
	mov	x3, xzr				/* context ID */
	bl	smccc
	mov	x22, x0
	isb
	mrs	x0, cntvct_el0
	sub	x21, x0, x21			/* waited */

	ldr	x0, =str_standby
	bl	puts
	ldr	x0, =str_name
	bl	puts
	mov	x0, x19
	bl	puts
	ldr	x0, =str_x0
	mov	x1, x22
	bl	putkv
	ldr	x0, =str_waited
	mov	x1, x21
	bl	putkv
	ldr	x0, =str_wanted
	mov	x1, x23
	bl	putkv
	ldr	x0, =str_freq
	mov	x1, x24
	bl	putkv
	bl	newline
	mov	x30, x28
	ret

/* GICv3, single security state (-M virt without security): the vtimer PPI and one SGI, group 1. */
gic_init:
	ldr	x1, =GICD_BASE
	ldr	w0, =(GICD_CTLR_ARE | GICD_CTLR_ENGRP1)
	str	w0, [x1, #GICD_CTLR]
	ldr	x3, =POLL_LIMIT
1:	ldr	w0, [x1, #GICD_CTLR]
	tbz	w0, #31, 2f			/* RWP */
	subs	x3, x3, #1
	b.ne	1b

	/* Wake the redistributor. */
2:	ldr	x1, =GICR_BASE
	ldr	w0, [x1, #GICR_WAKER]
	bic	w0, w0, #GICR_WAKER_PSLEEP
	str	w0, [x1, #GICR_WAKER]
	ldr	x3, =POLL_LIMIT
3:	ldr	w0, [x1, #GICR_WAKER]
	tbz	w0, #2, 4f			/* ChildrenAsleep */
	subs	x3, x3, #1
	b.ne	3b
	ldr	x0, =str_gicr_timeout
	bl	puts
	b	system_off

4:	ldr	w0, =((1 << VTIMER_INTID) | (1 << SGI_INTID))
	ldr	x4, =GICR_BASE + GICR_IGROUPR0
	ldr	w5, [x4]
	orr	w5, w5, w0
	str	w5, [x4]			/* group 1 */
	ldr	x4, =GICR_BASE + GICR_IPRIORITYR
	mov	w5, #0x80
	strb	w5, [x4, #VTIMER_INTID]
	strb	w5, [x4, #SGI_INTID]
	ldr	x4, =GICR_BASE + GICR_ISENABLER0
	str	w0, [x4]

	/* CPU interface: system registers, every priority, group 1 on. */
	mrs	x0, icc_sre_el1
	orr	x0, x0, #1
	msr	icc_sre_el1, x0
	isb
	mov	x0, #0xff
	msr	icc_pmr_el1, x0
	mov	x0, #1
	msr	icc_igrpen1_el1, x0
	isb
	ret

	.section .rodata
str_hello:	.asciz	"GUEST standby conduit=" CONDUIT_NAME
str_standby:	.asciz	"STANDBY"
str_name:	.asciz	" name="
str_timer:	.asciz	"timer"
str_powerdown:	.asciz	"powerdown"
str_pending:	.asciz	"pending"
str_x0:		.asciz	"x0"
str_waited:	.asciz	"waited"
str_wanted:	.asciz	"wanted"
str_freq:	.asciz	"freq"
str_done:	.asciz	"STANDBY DONE\n"
str_gicr_timeout: .asciz "TIMEOUT waking the redistributor\n"
str_sgi_timeout: .asciz	"TIMEOUT waiting for the SGI to pend\n"

	.bss
	.balign	16
	.space	16384
stack_top:
