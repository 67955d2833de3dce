"""Device models: legacy PC devices today, virtio-mmio next."""
