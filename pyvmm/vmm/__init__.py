"""Assembling and running a machine: memory, vCPUs, devices, event loop."""

# How the guest finds its virtio devices (pyvmm run --transport; its default
# can be set with $PYVMM_TRANSPORT). README "Two transports" says why pci.
TRANSPORTS = ("pci", "mmio")
DEFAULT_TRANSPORT = "pci"
