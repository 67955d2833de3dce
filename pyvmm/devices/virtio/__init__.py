"""Virtio devices on the virtio-pci or virtio-mmio transport, their data paths in vhost."""
