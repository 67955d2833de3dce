"""Virtio devices on the virtio-mmio transport, their data paths in vhost."""
