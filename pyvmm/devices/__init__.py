"""Device models: the legacy PC devices a guest expects, PCI, and virtio."""
