/*
 * romentry.S's code in flash (flash-entry.bin, at -M virt's second flash
 * bank, 0x04000000): store 1 at the address in x0 (CPU_ON's context ID)
 * and wait.  Position-independent, no memory of its own.
 */
	.text
	.global _start
_start:
	mov	x1, #1
	stlr	x1, [x0]
1:	wfe
	b	1b
