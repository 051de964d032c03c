/*
 * Guest (a)/(b): a sequence of SMCCC calls on one CPU, each printed as
 *
 *   CALL <name> fn=0x... x0=0x... x1=0x... x2=0x... x3=0x...
 *
 * Built twice: calls-hvc.elf (EL1, -M virt) and calls-smc.elf
 * (-DCONDUIT_SMC, EL2, -M virt,virtualization=on).  Ends with PSCI
 * SYSTEM_OFF.
 */

#include "guest.h"

	.macro	call_and_print name, fn, a1=0, a2=0, a3=0, call=smccc
	ldr	x0, =1f
	bl	puts
	ldr	x0, =\fn
	ldr	x1, =\a1
	ldr	x2, =\a2
	ldr	x3, =\a3
	mov	x4, xzr
	mov	x5, xzr
	mov	x6, xzr
	mov	x7, xzr
	mov	x24, x0
	bl	\call
	mov	x20, x0
	mov	x21, x1
	mov	x22, x2
	mov	x23, x3
	ldr	x0, =str_fn
	mov	x1, x24
	bl	putkv
	ldr	x0, =str_x0
	mov	x1, x20
	bl	putkv
	ldr	x0, =str_x1
	mov	x1, x21
	bl	putkv
	ldr	x0, =str_x2
	mov	x1, x22
	bl	putkv
	ldr	x0, =str_x3
	mov	x1, x23
	bl	putkv
	bl	newline
	.pushsection .rodata
1:	.asciz	"CALL \name"
	.popsection
	.endm

	guest_entry str_hello

	call_and_print PSCI_VERSION, FN_PSCI_VERSION
	call_and_print SMCCC_VERSION, FN_SMCCC_VERSION
	call_and_print ARCH_FEATURES_PSCI_FEATURES, FN_SMCCC_ARCH_FEATURES, FN_PSCI_FEATURES
	call_and_print ARCH_FEATURES_WORKAROUND_1, FN_SMCCC_ARCH_FEATURES, 0x80008000
	call_and_print ARCH_FEATURES_WORKAROUND_2, FN_SMCCC_ARCH_FEATURES, 0x80007fff
	call_and_print PSCI_FEATURES_CPU_ON, FN_PSCI_FEATURES, FN_PSCI_CPU_ON_64
	call_and_print STATIC, TEST_STATIC_FN, 0x1111, 0x2222, 0x3333
	call_and_print STATIC_SVE_HINT, TEST_STATIC_FN_HINT, 0x1111, 0x2222, 0x3333
	call_and_print UNKNOWN, TEST_UNKNOWN_FN, 0x1111
	call_and_print DENIED, TEST_DENIED_FN, 0x1111
	call_and_print PSCI01_DENIED, TEST_PSCI01_FN, 0x20000
	call_and_print AFFINITY_INFO_SELF, FN_PSCI_AFFINITY_INFO_64, 0, 0
	call_and_print PSCI_VERSION_IMM1, FN_PSCI_VERSION, call=smccc_imm1

	b	system_off

	.section .rodata
str_hello:	.asciz	"GUEST calls conduit=" CONDUIT_NAME
str_fn:		.asciz	"fn"
str_x0:		.asciz	"x0"
str_x1:		.asciz	"x1"
str_x2:		.asciz	"x2"
str_x3:		.asciz	"x3"

	.bss
	.balign	16
	.space	16384
stack_top:
