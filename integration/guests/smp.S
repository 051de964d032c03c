/*
 * Guest (c): PSCI on four CPUs (-smp 4, EL1, HVC conduit).
 *
 * The boot CPU powers on CPUs 1..3 one at a time with CPU_ON (context ID
 * 0xc0de0000 + n).  Each secondary prints its MPIDR and the context ID it
 * received in x0, sets a flag and waits.  Only one CPU prints at a time.
 * The boot CPU then checks AFFINITY_INFO (ON), that a second CPU_ON gives
 * ALREADY_ON, releases each secondary into CPU_OFF, polls AFFINITY_INFO
 * until it reads OFF, asks for CPU 1 again at a misaligned entry point (an
 * error, never a CPU that does not come), and ends with SYSTEM_OFF.
 *
 * Transcript lines:
 *   GUEST smp conduit=hvc el=0x1 mpidr=0x...
 *   SECONDARY mpidr=0x80000001 context=0xc0de0001 el=0x1
 *   CPU_ON target=0x1 x0=0x0
 *   AFFINITY_INFO target=0x1 x0=0x0
 *   ...
 *   CPU_ON_AGAIN target=0x1 x0=0xfffffffffffffffc
 *   CPU_OFF target=0x1 polls=0x... x0=0x1
 *   ...
 *   CPU_ON_MISALIGNED target=0x1 x0=0x...  (INVALID_ADDRESS via hvcproxyd)
 *   SMP DONE
 *   SYSTEM_OFF
 */

#include "guest.h"

#define NCPUS		4
#define CONTEXT_BASE	0xc0de0000
#define POLL_LIMIT	0x1000000

	guest_entry str_hello

	/* Power on CPUs 1..3, one at a time. */
	mov	x19, #1
1:	ldr	x0, =FN_PSCI_CPU_ON_64
	mov	x1, x19
	ldr	x2, =secondary_entry
	ldr	x3, =CONTEXT_BASE
	add	x3, x3, x19
	bl	smccc
	mov	x20, x0
	cbnz	x20, 3f			/* CPU_ON failed: don't wait */

	/* Wait until the secondary has printed its line. */
	ldr	x21, =up_flags
	add	x21, x21, x19, lsl #3
	ldr	x22, =POLL_LIMIT
2:	ldar	x0, [x21]
	cbnz	x0, 3f
	subs	x22, x22, #1
	b.ne	2b
	ldr	x0, =str_timeout
	bl	puts
	b	system_off

3:	ldr	x0, =str_cpu_on
	mov	x1, x19
	bl	report
	bl	affinity_info
	add	x19, x19, #1
	cmp	x19, #NCPUS
	b.lo	1b

	/* CPU 1 is on: a second CPU_ON must say ALREADY_ON. */
	ldr	x0, =FN_PSCI_CPU_ON_64
	mov	x1, #1
	ldr	x2, =secondary_entry
	ldr	x3, =CONTEXT_BASE
	bl	smccc
	mov	x20, x0
	ldr	x0, =str_cpu_on_again
	mov	x1, #1
	bl	report

	/* Release each secondary into CPU_OFF and wait until it is OFF. */
	mov	x19, #1
4:	ldr	x21, =go_flags
	add	x21, x21, x19, lsl #3
	mov	x0, #1
	stlr	x0, [x21]
	mov	x22, xzr
5:	add	x22, x22, #1
	ldr	x0, =FN_PSCI_AFFINITY_INFO_64
	mov	x1, x19
	mov	x2, xzr
	bl	smccc
	cmp	x0, #1			/* OFF */
	b.eq	6f
	ldr	x1, =POLL_LIMIT
	cmp	x22, x1
	b.lo	5b
6:	mov	x20, x0
	ldr	x0, =str_cpu_off
	mov	x1, x19
	bl	report
	add	x19, x19, #1
	cmp	x19, #NCPUS
	b.lo	4b

	/* CPU 1 is off again: a CPU_ON at a misaligned AArch64 entry must fail. */
	ldr	x0, =FN_PSCI_CPU_ON_64
	mov	x1, #1
	ldr	x2, =secondary_entry
	add	x2, x2, #2
	ldr	x3, =CONTEXT_BASE
	bl	smccc
	mov	x20, x0
	ldr	x0, =str_cpu_on_misaligned
	mov	x1, #1
	bl	report

	ldr	x0, =str_done
	bl	puts
	b	system_off

/* Print AFFINITY_INFO for the CPU in x19. */
affinity_info:
	mov	x25, x30
	ldr	x0, =FN_PSCI_AFFINITY_INFO_64
	mov	x1, x19
	mov	x2, xzr
	bl	smccc
	mov	x20, x0
	ldr	x0, =str_affinity
	mov	x1, x19
	bl	report
	mov	x30, x25
	ret

/* report(x0 = label, x1 = target, x20 = result): put_result's line. */
report:
	mov	x2, x20
	b	put_result

/* Secondary entry: x0 = context ID. */
secondary_entry:
	mov	x26, x0
	mrs	x27, mpidr_el1
	and	x19, x27, #0xff
	ldr	x0, =secondary_stacks
	add	x1, x19, #1
	add	x0, x0, x1, lsl #12
	mov	sp, x0
	bl	set_vbar

	mov	x0, x27
	mov	x1, x26
	bl	secondary_banner

	ldr	x21, =up_flags
	add	x21, x21, x19, lsl #3
	mov	x0, #1
	stlr	x0, [x21]

	ldr	x21, =go_flags
	add	x21, x21, x19, lsl #3
7:	ldar	x0, [x21]
	cbz	x0, 7b

	ldr	x0, =FN_PSCI_CPU_OFF
	bl	smccc
	/* CPU_OFF returned: report it (the boot CPU is polling, not printing). */
	mov	x20, x0
	ldr	x0, =str_off_returned
	bl	puts
	ldr	x0, =str_x0
	mov	x1, x20
	bl	putkv
	bl	newline
	b	halt

	.section .rodata
str_hello:	.asciz	"GUEST smp conduit=" CONDUIT_NAME
str_x0:		.asciz	"x0"
str_cpu_on:	.asciz	"CPU_ON"
str_cpu_on_again: .asciz "CPU_ON_AGAIN"
str_cpu_on_misaligned: .asciz "CPU_ON_MISALIGNED"
str_cpu_off:	.asciz	"CPU_OFF"
str_affinity:	.asciz	"AFFINITY_INFO"
str_off_returned: .asciz "CPU_OFF_RETURNED"
str_timeout:	.asciz	"TIMEOUT waiting for secondary\n"
str_done:	.asciz	"SMP DONE\n"

	.data
	.balign	8
up_flags:	.quad	0, 0, 0, 0
go_flags:	.quad	0, 0, 0, 0

	.bss
	.balign	16
secondary_stacks:
	.space	4096 * NCPUS
	.space	16384
stack_top:
