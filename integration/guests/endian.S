/*
 * Guest (g): the caller's data endianness carries over to the CPU it powers
 * on (-smp 3, EL1, HVC), as KVM does (kvm_psci_vcpu_on: a big-endian caller
 * gives a big-endian target).
 *
 * The boot CPU powers on CPU 1 with SCTLR_EL1.EE set (data big-endian; it
 * touches no memory until it clears EE again) and CPU 2 with EE clear.  Each
 * secondary reads SCTLR_EL1.EE first thing, clears it and reports what it
 * saw through memory; the boot CPU prints it.
 *
 * Transcript lines:
 *   GUEST endian conduit=hvc el=0x1 mpidr=0x...
 *   CPU_ON_BIG_ENDIAN target=0x1 x0=0x0
 *   SECONDARY_EE target=0x1 x0=0x1
 *   CPU_ON target=0x2 x0=0x0
 *   SECONDARY_EE target=0x2 x0=0x0
 *   ENDIAN DONE
 *   SYSTEM_OFF
 */

#include "guest.h"

#define SCTLR_EE	(1 << 25)
#define POLL_LIMIT	0x1000000

	guest_entry str_hello

	/* CPU 1 from a big-endian caller: every literal is loaded first. */
	ldr	x0, =FN_PSCI_CPU_ON_64
	mov	x1, #1
	ldr	x2, =secondary_entry
	mov	x3, #1
	mov	x4, xzr
	mrs	x21, sctlr_el1
	orr	x22, x21, #SCTLR_EE
	msr	sctlr_el1, x22
	isb
	CONDUIT	#0
	msr	sctlr_el1, x21
	isb
	mov	x20, x0
	ldr	x0, =str_cpu_on_be
	mov	x1, #1
	mov	x2, x20
	bl	put_result
	mov	x19, #1
	bl	wait_and_report

	/* CPU 2 from a little-endian caller. */
	ldr	x0, =FN_PSCI_CPU_ON_64
	mov	x1, #2
	ldr	x2, =secondary_entry
	mov	x3, #2
	bl	smccc
	mov	x20, x0
	ldr	x0, =str_cpu_on
	mov	x1, #2
	mov	x2, x20
	bl	put_result
	mov	x19, #2
	bl	wait_and_report

	ldr	x0, =str_done
	bl	puts
	b	system_off

/* Wait for the secondary in x19 to say what it saw, and print it. */
wait_and_report:
	mov	x25, x30
	ldr	x21, =ee_seen
	add	x21, x21, x19, lsl #3
	ldr	x22, =POLL_LIMIT
1:	ldar	x0, [x21]
	cbnz	x0, 2f
	subs	x22, x22, #1
	b.ne	1b
	ldr	x0, =str_timeout
	bl	puts
	b	system_off
2:	sub	x2, x0, #1
	ldr	x0, =str_secondary_ee
	mov	x1, x19
	bl	put_result
	mov	x30, x25
	ret

/* Secondary entry: read EE before any memory access, then go little-endian. */
secondary_entry:
	mrs	x1, sctlr_el1
	ubfx	x20, x1, #25, #1
	bic	x1, x1, #SCTLR_EE
	msr	sctlr_el1, x1
	isb
	mrs	x1, mpidr_el1
	and	x1, x1, #0xff
	ldr	x2, =ee_seen
	add	x2, x2, x1, lsl #3
	add	x0, x20, #1		/* 0 means "not yet" */
	stlr	x0, [x2]
	b	halt

	.section .rodata
str_hello:	.asciz	"GUEST endian conduit=" CONDUIT_NAME
str_cpu_on_be:	.asciz	"CPU_ON_BIG_ENDIAN"
str_cpu_on:	.asciz	"CPU_ON"
str_secondary_ee: .asciz "SECONDARY_EE"
str_timeout:	.asciz	"TIMEOUT waiting for secondary\n"
str_done:	.asciz	"ENDIAN DONE\n"

	.data
	.balign	8
ee_seen:	.quad	0, 0, 0

	.bss
	.balign	16
	.space	16384
stack_top:
