"""hvcproxyd: answers a VM's forwarded SMCCC calls (HVC/SMC) in userspace."""

__version__ = "0.1.0"
