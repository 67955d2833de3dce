"""Virtio itself, independent of any VMM: feature bits, the split ring."""
