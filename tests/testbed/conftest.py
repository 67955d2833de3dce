"""The device suites run on both virtio transports.

A module that says `pytestmark = [..., pytest.mark.usefixtures("transport")]`
runs each of its tests twice, once with the guest's devices on virtio-pci
(MSI-X) and once on virtio-mmio: `pyvmm run` takes its --transport default
from $PYVMM_TRANSPORT, which every pyvmm a test starts inherits.
"""

import pytest

TRANSPORTS = ["pci", "mmio"]


@pytest.fixture(params=TRANSPORTS)
def transport(request, monkeypatch):
    monkeypatch.setenv("PYVMM_TRANSPORT", request.param)
    return request.param
