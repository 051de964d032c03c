/*
 * Guest (h): CPU_ON at an entry point in flash (-smp 2, EL1, HVC, with
 * -drive if=pflash,unit=1 holding flash-entry.bin): memory a vCPU can
 * execute that is not RAM, where KVM and QEMU start a CPU.  The code in
 * flash stores 1 at the address the context ID gives it.  An entry in MMIO
 * (the GIC distributor) is refused.
 *
 * Transcript lines:
 *   GUEST romentry conduit=hvc el=0x1 mpidr=0x...
 *   CPU_ON_MMIO target=0x1 x0=0xfffffffffffffff7   (INVALID_ADDRESS)
 *   CPU_ON_FLASH target=0x1 x0=0x0
 *   FLASH_CODE_RAN target=0x1 x0=0x1
 *   ROMENTRY DONE
 *   SYSTEM_OFF
 */

#include "guest.h"

#define FLASH1_BASE	0x04000000
#define GIC_DIST_BASE	0x08000000
#define POLL_LIMIT	0x1000000

	guest_entry str_hello

	ldr	x0, =FN_PSCI_CPU_ON_64
	mov	x1, #1
	ldr	x2, =GIC_DIST_BASE
	ldr	x3, =ran_flag
	bl	smccc
	mov	x2, x0
	ldr	x0, =str_cpu_on_mmio
	mov	x1, #1
	bl	put_result

	ldr	x0, =FN_PSCI_CPU_ON_64
	mov	x1, #1
	ldr	x2, =FLASH1_BASE
	ldr	x3, =ran_flag
	bl	smccc
	mov	x2, x0
	ldr	x0, =str_cpu_on_flash
	mov	x1, #1
	bl	put_result

	ldr	x21, =ran_flag
	ldr	x22, =POLL_LIMIT
1:	ldar	x2, [x21]
	cbnz	x2, 2f
	subs	x22, x22, #1
	b.ne	1b
2:	ldr	x0, =str_ran
	mov	x1, #1
	bl	put_result
	ldr	x0, =str_done
	bl	puts
	b	system_off

	.section .rodata
str_hello:	.asciz	"GUEST romentry conduit=" CONDUIT_NAME
str_cpu_on_mmio: .asciz	"CPU_ON_MMIO"
str_cpu_on_flash: .asciz "CPU_ON_FLASH"
str_ran:	.asciz	"FLASH_CODE_RAN"
str_done:	.asciz	"ROMENTRY DONE\n"

	.data
	.balign	8
ran_flag:	.quad	0

	.bss
	.balign	16
	.space	16384
stack_top:
