/*
 * Guest (i): KVM's vendor-hypervisor services with the range owned by
 * hvcproxyd's pkvm-memshare handler and KVM's PTP clock left to KVM
 * (`except: kvm-ptp`).  FEATURES (0x86000000) comes from the handler; PTP
 * (0x86000001, x1 = 0: the virtual counter) from KVM, which answers with the
 * time, or NOT_SUPPORTED where nothing answers it (TCG).
 *
 * Transcript lines:
 *   GUEST vendor conduit=hvc el=0x1 mpidr=0x...
 *   KVM_FEATURES target=0x0 x0=0x...      (bit 1: PTP)
 *   KVM_PTP target=0x0 x0=0x...
 *   SYSTEM_OFF
 */

#include "guest.h"

#define FN_KVM_FEATURES		0x86000000
#define FN_KVM_PTP		0x86000001

	guest_entry str_hello

	ldr	x0, =FN_KVM_FEATURES
	bl	smccc
	mov	x2, x0
	ldr	x0, =str_features
	mov	x1, xzr
	bl	put_result

	ldr	x0, =FN_KVM_PTP
	mov	x1, xzr
	bl	smccc
	mov	x2, x0
	ldr	x0, =str_ptp
	mov	x1, xzr
	bl	put_result
	b	system_off

	.section .rodata
str_hello:	.asciz	"GUEST vendor conduit=" CONDUIT_NAME
str_features:	.asciz	"KVM_FEATURES"
str_ptp:	.asciz	"KVM_PTP"

	.bss
	.balign	16
	.space	16384
stack_top:
