/*
 * Guest (j): memory hotplug (-m 256M,maxmem=1G, with hvcproxyd's
 * pkvm-memshare handler owning the vendor range).  The guest asks to share
 * the first page of -M virt's device-memory window (0x80000000: the first
 * GiB boundary above 256 MiB of RAM at 0x40000000) until the daemon accepts
 * it: INVALID_PARAMETER while nothing is there, SUCCESS once memory is
 * plugged there and the forwarder has sent the new RAM map.
 * integration/tests/test_guests.py plugs a virtio-mem device (the guest
 * loaded with -kernel) and a pc-dimm (slots=1; the guest loaded with
 * -device loader and started by bios-entry.bin as -bios, since -M virt
 * takes pc-dimms only with firmware).  Nothing here depends on how it
 * was loaded.
 *
 * Transcript lines:
 *   GUEST hotplug conduit=hvc el=0x1 mpidr=0x...
 *   WAITING for a DIMM
 *   HOTPLUG_SHARE target=0x<tries> x0=0x0
 *   SYSTEM_OFF
 */

#include "guest.h"

#define FN_MEM_SHARE	0xC6000003
#define DIMM_BASE	0x80000000
#define TRIES		0x4000
#define DELAY		0x100000

	guest_entry str_hello
	ldr	x0, =str_waiting
	bl	puts

	mov	x19, xzr
1:	add	x19, x19, #1
	ldr	x0, =FN_MEM_SHARE
	ldr	x1, =DIMM_BASE
	mov	x2, xzr
	mov	x3, xzr
	bl	smccc
	mov	x20, x0
	cbz	x20, 3f
	cmp	x19, #TRIES
	b.hs	3f
	ldr	x21, =DELAY
2:	subs	x21, x21, #1
	b.ne	2b
	b	1b
3:	ldr	x0, =str_share
	mov	x1, x19
	mov	x2, x20
	bl	put_result
	/* Linger, so the test's QMP command that plugged the memory gets its answer. */
	ldr	x21, =DELAY * 64
4:	subs	x21, x21, #1
	b.ne	4b
	b	system_off

	.section .rodata
str_hello:	.asciz	"GUEST hotplug conduit=" CONDUIT_NAME
str_waiting:	.asciz	"WAITING for a DIMM\n"
str_share:	.asciz	"HOTPLUG_SHARE"

	.bss
	.balign	16
	.space	16384
stack_top:
