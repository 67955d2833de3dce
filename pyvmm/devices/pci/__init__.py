"""PCI: a root bus the guest finds through ports 0xCF8/0xCFC, and MSI-X.

config.py: one function's 256 bytes of configuration space (header, BAR,
capability list), with which bits the guest may write. root.py: the
configuration mechanism #1 ports and the host bridge. msix.py: an MSI-X
table whose vectors are irqfds routed to the guest's MSI messages.
The virtio-pci transport (devices/virtio/pci.py) is built from these.
"""
