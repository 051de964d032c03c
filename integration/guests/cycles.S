/*
 * Guest: power cycles on four CPUs (-smp 4, EL1, HVC conduit).
 *
 * The boot CPU powers the secondaries on and off CYCLES times, one at a
 * time: CYCLES_SAME times CPU 1 (a CPU_ON right after the same CPU's
 * CPU_OFF), then in turn (CPU 1, 2, 3, 1, ...): CPU_ON with a context ID unique
 * to the cycle, a wait until the secondary has stored that context ID
 * (it prints nothing, then calls CPU_OFF), and AFFINITY_INFO polled until
 * it reads OFF, before the next CPU_ON.  Every wait is bounded by the
 * generic timer (WAIT_SECONDS); a cycle that fails prints a CYCLE_FAIL
 * line and counts as failed, and MAX_FAILED failures end the loop early.
 * Then all three secondaries are brought up once more, each printing its
 * line (one at a time), released into CPU_OFF together and waited for.
 *
 * Transcript lines:
 *   GUEST cycles conduit=hvc el=0x1 mpidr=0x...
 *   CYCLE_FAIL cycle=0x... target=0x... stage=on|up|off x0=0x...   (only on failure)
 *   CYCLES done=0x... failed=0x... cycles=0x...
 *   SECONDARY mpidr=0x80000001 context=0xf1a10001 el=0x1
 *   ...
 *   FINAL_OFF target=0x1 x0=0x1                                     (AFFINITY_INFO: OFF)
 *   ...
 *   CYCLES DONE
 *   SYSTEM_OFF
 */

#include "guest.h"

#define NCPUS		4
#define CYCLES		120
#define CYCLES_SAME	60	/* the first ones all on CPU 1, then in turn */
#define MAX_FAILED	4
#define WAIT_SECONDS	10
#define CYCLE_CONTEXT	0xc9c10000	/* + the cycle number */
#define FINAL_CONTEXT	0xf1a10000	/* + the CPU number */

#define STAGE_ON	0	/* CPU_ON did not answer SUCCESS */
#define STAGE_UP	1	/* the secondary did not report in */
#define STAGE_OFF	2	/* AFFINITY_INFO did not reach OFF */

	guest_entry str_hello

	mrs	x25, cntfrq_el0
	mov	x0, #WAIT_SECONDS
	mul	x25, x25, x0		/* x25: the bound of each wait, in ticks */
	mov	x19, xzr		/* cycle */
	mov	x20, #1			/* target */
	mov	x21, xzr		/* done */
	mov	x22, xzr		/* failed */

cycle:
	ldr	x27, =seen
	add	x27, x27, x20, lsl #3
	stlr	xzr, [x27]
	ldr	x23, =CYCLE_CONTEXT
	add	x23, x23, x19

	ldr	x0, =FN_PSCI_CPU_ON_64
	mov	x1, x20
	ldr	x2, =cycle_entry
	mov	x3, x23
	bl	smccc
	mov	x26, x0
	mov	x28, #STAGE_ON
	cbnz	x26, failed

	/* Wait until the secondary has stored this cycle's context ID. */
	mov	x28, #STAGE_UP
	bl	deadline
1:	ldar	x0, [x27]
	cmp	x0, x23
	b.eq	2f
	isb
	mrs	x0, cntvct_el0
	cmp	x0, x24
	b.lo	1b
	ldar	x26, [x27]		/* what it stored instead, if anything */
	b	failed

	/* Then until AFFINITY_INFO says it is OFF. */
2:	mov	x28, #STAGE_OFF
	bl	deadline
3:	ldr	x0, =FN_PSCI_AFFINITY_INFO_64
	mov	x1, x20
	mov	x2, xzr
	bl	smccc
	mov	x26, x0
	cmp	x26, #1			/* OFF */
	b.eq	4f
	isb
	mrs	x0, cntvct_el0
	cmp	x0, x24
	b.lo	3b
	b	failed

4:	add	x21, x21, #1
	b	next

failed:
	add	x22, x22, #1
	ldr	x0, =str_cycle_fail
	bl	puts
	ldr	x0, =str_cycle
	mov	x1, x19
	bl	putkv
	ldr	x0, =str_target
	mov	x1, x20
	bl	putkv
	ldr	x0, =str_stage
	bl	puts
	ldr	x0, =stage_names
	ldr	x0, [x0, x28, lsl #3]
	bl	puts
	ldr	x0, =str_x0
	mov	x1, x26
	bl	putkv
	bl	newline
	cmp	x22, #MAX_FAILED
	b.hs	summary

next:
	add	x19, x19, #1
	cmp	x19, #CYCLES_SAME
	b.lo	5f			/* the first CYCLES_SAME cycles: CPU 1 only */
	add	x20, x20, #1
	cmp	x20, #NCPUS
	b.lo	5f
	mov	x20, #1
5:	cmp	x19, #CYCLES
	b.lo	cycle

summary:
	ldr	x0, =str_cycles
	bl	puts
	ldr	x0, =str_done_kv
	mov	x1, x21
	bl	putkv
	ldr	x0, =str_failed
	mov	x1, x22
	bl	putkv
	ldr	x0, =str_ncycles
	mov	x1, x19
	bl	putkv
	bl	newline

	/* All three secondaries up once more, one at a time (each prints). */
	mov	x20, #1
6:	ldr	x0, =FN_PSCI_CPU_ON_64
	mov	x1, x20
	ldr	x2, =final_entry
	ldr	x3, =FINAL_CONTEXT
	add	x3, x3, x20
	bl	smccc
	mov	x26, x0
	cbnz	x26, 8f
	ldr	x27, =up_flags
	add	x27, x27, x20, lsl #3
	bl	deadline
7:	ldar	x0, [x27]
	cbnz	x0, 9f
	isb
	mrs	x0, cntvct_el0
	cmp	x0, x24
	b.lo	7b
8:	mov	x2, x26
	mov	x1, x20
	ldr	x0, =str_final_fail
	bl	put_result
9:	add	x20, x20, #1
	cmp	x20, #NCPUS
	b.lo	6b

	/* Release them all into CPU_OFF, then wait for each to be OFF. */
	ldr	x0, =go
	mov	x1, #1
	stlr	x1, [x0]
	mov	x20, #1
10:	bl	deadline
11:	ldr	x0, =FN_PSCI_AFFINITY_INFO_64
	mov	x1, x20
	mov	x2, xzr
	bl	smccc
	mov	x26, x0
	cmp	x26, #1
	b.eq	12f
	isb
	mrs	x0, cntvct_el0
	cmp	x0, x24
	b.lo	11b
12:	mov	x2, x26
	mov	x1, x20
	ldr	x0, =str_final_off
	bl	put_result
	add	x20, x20, #1
	cmp	x20, #NCPUS
	b.lo	10b

	ldr	x0, =str_all_done
	bl	puts
	b	system_off

/* x24 = now + x25 (ticks). */
deadline:
	isb
	mrs	x24, cntvct_el0
	add	x24, x24, x25
	ret

/* A secondary's stack: x19 = its CPU number. */
secondary_stack:
	ldr	x0, =secondary_stacks
	add	x1, x19, #1
	add	x0, x0, x1, lsl #12
	mov	sp, x0
	ret

/* A cycle's secondary: store the context ID (x0), then CPU_OFF. */
cycle_entry:
	mov	x26, x0
	mrs	x27, mpidr_el1
	and	x19, x27, #0xff
	bl	secondary_stack
	bl	set_vbar
	ldr	x21, =seen
	add	x21, x21, x19, lsl #3
	stlr	x26, [x21]
	ldr	x0, =FN_PSCI_CPU_OFF
	bl	smccc
	/* CPU_OFF returned: the boot CPU sees AFFINITY_INFO stay ON and says so. */
	b	off_returned

/* The final power-on: print, report in, wait to be released, CPU_OFF. */
final_entry:
	mov	x26, x0
	mrs	x27, mpidr_el1
	and	x19, x27, #0xff
	bl	secondary_stack
	bl	set_vbar
	mov	x0, x27
	mov	x1, x26
	bl	secondary_banner
	ldr	x21, =up_flags
	add	x21, x21, x19, lsl #3
	mov	x0, #1
	stlr	x0, [x21]
	ldr	x21, =go
13:	ldar	x0, [x21]
	cbz	x0, 13b
	ldr	x0, =FN_PSCI_CPU_OFF
	bl	smccc
off_returned:
	ldr	x1, =off_returns
	add	x1, x1, x19, lsl #3
	str	x0, [x1]
	b	halt

	.section .rodata
str_hello:	.asciz	"GUEST cycles conduit=" CONDUIT_NAME
str_cycle_fail:	.asciz	"CYCLE_FAIL"
str_cycle:	.asciz	"cycle"
str_stage:	.asciz	" stage="
str_stage_on:	.asciz	"on"
str_stage_up:	.asciz	"up"
str_stage_off:	.asciz	"off"
str_x0:		.asciz	"x0"
str_cycles:	.asciz	"CYCLES"
str_done_kv:	.asciz	"done"
str_failed:	.asciz	"failed"
str_ncycles:	.asciz	"cycles"
str_final_fail:	.asciz	"FINAL_FAIL"
str_final_off:	.asciz	"FINAL_OFF"
str_all_done:	.asciz	"CYCLES DONE\n"
	.balign	8
stage_names:	.quad	str_stage_on, str_stage_up, str_stage_off

	.data
	.balign	8
seen:		.quad	0, 0, 0, 0
up_flags:	.quad	0, 0, 0, 0
go:		.quad	0
off_returns:	.quad	0, 0, 0, 0

	.bss
	.balign	16
secondary_stacks:
	.space	4096 * NCPUS
	.space	16384
stack_top:
