/*
 * A -bios for the RAM guests (bios-entry.bin, in -M virt's first flash bank
 * at 0): branch to the guest that QEMU's generic loader
 * (-device loader,file=<guest>.elf) put in RAM at guest.ld's address.
 * Loading firmware is what makes -M virt create its acpi-ged device (with
 * ACPI on, the default), and so accept pc-dimms; -kernel would then only go
 * to fw_cfg, hence the loader.  Position-independent, no memory of its own.
 */
	.text
	.global _start
_start:
	ldr	x0, =0x40200000		/* guest.ld's load address, the guests' _start */
	br	x0
	.ltorg
