"""pyvmm: a minimal KVM virtual machine monitor in Python whose purpose is vhost.

Guest memory lives in memfd files that other processes can map; devices are
virtio-pci with MSI-X, or virtio-mmio; each device's data path is served by an in-kernel vhost driver
or by an external vhost-user back-end. See README.md.
"""

__version__ = "0.1.0"
