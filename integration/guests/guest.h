/* Constants and conduit macros shared by the test guests. */
#ifndef GUEST_H
#define GUEST_H

#define UART_BASE		0x09000000
#define UART_DR			0x00
#define UART_FR			0x18
#define UART_FR_TXFF		5

/* SMCCC / PSCI function IDs (see shared REFERENCE.md §1 and §3). */
#define FN_SMCCC_VERSION		0x80000000
#define FN_SMCCC_ARCH_FEATURES	0x80000001
#define FN_PSCI_VERSION		0x84000000
#define FN_PSCI_CPU_OFF		0x84000002
#define FN_PSCI_CPU_ON_64		0xC4000003
#define FN_PSCI_AFFINITY_INFO_64	0xC4000004
#define FN_PSCI_SYSTEM_OFF		0x84000008
#define FN_PSCI_SYSTEM_RESET	0x84000009
#define FN_PSCI_FEATURES		0x8400000A

/*
 * Test services (integration/configs/*.yaml route them):
 * a SiP call answered by a static handler with fixed x0..x3,
 * a SiP call in the forwarded range that no rule handles,
 * and an OEM call the config denies.
 */
#define TEST_STATIC_FN		0xC2000001
/* The same with the SMCCC 1.3 SVE hint (bit 16): routed as TEST_STATIC_FN. */
#define TEST_STATIC_FN_HINT	0xC2010001
#define TEST_UNKNOWN_FN		0xC20000FF
#define TEST_DENIED_FN		0xC3000001
/*
 * KVM's legacy PSCI 0.1 CPU_SUSPEND (QEMU's too).  Not an SMCCC-layout ID
 * (bits 23:17 set), so bit 16 is part of it.  With x1 = 0x20000 QEMU's own
 * PSCI answers INVALID_PARAMETERS at once; the test config denies it.
 */
#define TEST_PSCI01_FN		0x95C1BA5E

/* The conduit: HVC unless the guest is built with -DCONDUIT_SMC. */
#ifdef CONDUIT_SMC
#define CONDUIT			smc
#define CONDUIT_NAME		"smc"
#else
#define CONDUIT			hvc
#define CONDUIT_NAME		"hvc"
#endif

/* Every guest's entry: a stack, the exception vectors, then its banner
 * ("title el=... mpidr=..."); \title names its banner string. */
	.macro	guest_entry title
	.section .text.boot
	.global _start
_start:
	ldr	x0, =stack_top
	mov	sp, x0
	bl	set_vbar
	ldr	x0, =\title
	bl	boot_banner
	.endm

#endif
