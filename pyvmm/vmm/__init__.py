"""Assembling and running a machine: memory, vCPUs, devices, event loop."""
