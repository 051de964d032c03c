"""QEMU integration test fixtures; they live in qemu_harness.py."""

from qemu_harness import guests, linux_guest, qemu_bin, start_daemon, start_qemu, workdir  # noqa: F401
