/*
 * Guest for the systemd-vm tier (-M virt,gic-version=3): calls BEAT_FN
 * forever, one call every BEAT_DIV-th of a second, and prints every answer.
 * Between calls it sleeps in WFI until the virtual timer's PPI is pending
 * (GICv3 set up for it, DAIF.I masked: never taken), so an idle guest costs
 * the nested TCG next to nothing:
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

#define GICD_BASE	0x08000000
#define GICR_BASE	0x080A0000	/* CPU 0's redistributor */
#define GICR_WAKER	0x0014
#define GICR_SGI	0x10000
#define VTIMER_INTID	27

	guest_entry str_hello
	msr	daifset, #0xf
	bl	gic_init

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
	msr	cntv_cval_el0, x26	/* re-armed: the last firing is no longer pending */
	mov	x0, #1			/* ENABLE, IMASK clear */
	msr	cntv_ctl_el0, x0
	isb
1:	wfi
	isb
	mrs	x0, cntvct_el0
	cmp	x0, x26
	b.lo	1b
	b	beat

/* GICv3 (single security state): the distributor, CPU 0's redistributor and
 * its CPU interface, with the vtimer PPI enabled in group 1. */
gic_init:
	ldr	x1, =GICD_BASE
	mov	w0, #((1 << 4) | (1 << 1))	/* ARE, EnableGrp1 */
	str	w0, [x1]
1:	ldr	w0, [x1]
	tbnz	w0, #31, 1b			/* RWP */
	ldr	x1, =GICR_BASE
	ldr	w0, [x1, #GICR_WAKER]
	bic	w0, w0, #(1 << 1)		/* ProcessorSleep */
	str	w0, [x1, #GICR_WAKER]
2:	ldr	w0, [x1, #GICR_WAKER]
	tbnz	w0, #2, 2b			/* ChildrenAsleep */
	ldr	x1, =GICR_BASE + GICR_SGI
	mov	w0, #(1 << VTIMER_INTID)
	str	w0, [x1, #0x80]			/* IGROUPR0: group 1 */
	mov	w2, #0x80
	strb	w2, [x1, #(0x400 + VTIMER_INTID)]	/* IPRIORITYR */
	str	w0, [x1, #0x100]		/* ISENABLER0 */
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
str_hello:	.asciz	"GUEST beat conduit=" CONDUIT_NAME
str_beat:	.asciz	"BEAT"
str_n:		.asciz	"n"
str_x0:		.asciz	"x0"
str_x1:		.asciz	"x1"

	.bss
	.balign	16
	.space	16384
stack_top:
