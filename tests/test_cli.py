"""`pyvmm` on the host: usage errors and host checks, each a single clear line."""

import subprocess
import sys

import pytest

from pyvmm.cli import parse_size
from pyvmm.kvm import Kvm, KvmError, paravirtual_kvm

PYVMM = [sys.executable, "-m", "pyvmm"]


def pyvmm(*args):
    return subprocess.run([*PYVMM, *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def one_line_error(r):
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr
    return lines[-1]


@pytest.mark.parametrize("text,size", [("256M", 256 << 20), ("4G", 4 << 30), ("512", 512 << 20),
                                       ("64k", 64 << 10), ("1GiB", 1 << 30)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("args,message", [
    (["--mem", "lots"], "'lots' is not a size"),
    (["--mem", "0"], "'0' is not a size"),
    (["--cpus", "0"], "--cpus must be at least 1"),
    (["--cpus", "two"], "invalid int value"),
    (["--console", "tcp:1"], "use stdio or file:PATH"),
])
def test_usage_errors(args, message):
    r = pyvmm("run", *args, "--", "true")
    assert r.returncode == 2
    assert message in one_line_error(r)


@pytest.mark.parametrize("args,message", [
    (["--kernel", "/nonexistent/vmlinux"], "kernel /nonexistent/vmlinux does not exist"),
    (["--kernel", "README.md"], "neither an ELF vmlinux nor a bzImage"),
    (["--initrd", "/nonexistent.img"], "initrd /nonexistent.img does not exist"),
    (["--mem", "16M"], "does not fit in guest memory (give more --mem)"),
    (["--console", "file:/nonexistent/dir/log"], "No such file or directory"),
])
def test_bad_inputs_fail_before_kvm(args, message):
    r = pyvmm("run", *args, "--", "true")
    assert r.returncode == 1
    assert message in one_line_error(r)
    assert one_line_error(r).startswith("pyvmm: error: ")


def test_this_hosts_kvm_is_refused_with_a_pointer_to_the_testbed():
    """The development hosts have kvm_pvm, which cannot boot Linux (HOST-FACTS.md)."""
    assert paravirtual_kvm(), "these tests expect the development host's kvm_pvm"
    r = pyvmm("run", "--", "true")
    assert r.returncode == 1
    line = one_line_error(r)
    assert "paravirtual kvm_pvm" in line and "scripts/testbed" in line


def test_paravirtual_kvm_detection(tmp_path):
    assert paravirtual_kvm(tmp_path) is None
    (tmp_path / "kvm_pvm").mkdir()
    assert paravirtual_kvm(tmp_path) == "kvm_pvm"


def test_missing_kvm_device(tmp_path):
    with pytest.raises(KvmError, match="does not exist: this host has no KVM"):
        Kvm(str(tmp_path / "kvm"))


def test_help_explains_the_guest_and_exit_statuses():
    r = pyvmm("run", "--help")
    assert r.returncode == 0
    for text in ("-- CMD ARGS", "exit status", "Ctrl-A x", "scripts/testbed", "--stats"):
        assert text in r.stdout


def test_version_and_bare_command():
    assert pyvmm("--version").stdout.startswith("pyvmm ")
    r = pyvmm()
    assert r.returncode == 2 and "run" in r.stdout


def test_net_and_vsock_options_parse():
    from pyvmm.cli import parse_net, parse_vsock
    cfg = parse_net("vhost-kernel,tap=t0,mac=02:00:00:aa:bb:cc,host-ip=10.1.0.1/24,guest-ip=10.1.0.9/24")
    assert cfg.tap == "t0" and cfg.mac == bytes.fromhex("020000aabbcc")
    assert str(cfg.host_ip) == "10.1.0.1/24" and str(cfg.guest_ip) == "10.1.0.9/24"
    assert parse_net("vhost-kernel").tap is None
    assert parse_vsock("vhost-kernel,cid=42").cid == 42
    assert parse_vsock("vhost-kernel").cid == 3


@pytest.mark.parametrize("args,message", [
    (["--net", "vhost-user"], "the back-end must be vhost-kernel"),
    (["--net", "vhost-kernel,speed=fast"], "unknown option 'speed=fast'"),
    (["--net", "vhost-kernel,mac=01:00:00:00:00:01"], "a multicast address"),
    (["--net", "vhost-kernel,mac=xyz"], "use six hex bytes"),
    (["--net", "vhost-kernel,host-ip=10.0.0.1/33"], "give an address with prefix"),
    (["--vsock", "vhost-kernel,cid=three"], "not a number"),
    (["--net", "vhost-kernel,tap=a-very-long-tap-name"], "at most 15 characters"),
])
def test_device_option_errors(args, message):
    r = pyvmm("run", *args, "--", "true")
    assert r.returncode == 2
    assert message in one_line_error(r)


def test_missing_vhost_driver_is_one_clear_line():
    """This host has no vhost drivers (HOST-FACTS.md): the error names the module."""
    r = pyvmm("run", "--net", "vhost-kernel", "--", "true")
    assert r.returncode == 1
    assert one_line_error(r) == ("pyvmm: error: /dev/vhost-net does not exist: "
                                 "load the driver with 'modprobe vhost_net'")
    r = pyvmm("run", "--vsock", "vhost-kernel,cid=5", "--", "true")
    assert one_line_error(r).endswith("load the driver with 'modprobe vhost_vsock'")


def test_default_addresses():
    from pyvmm.vmm.virtio_devices import default_addresses, peer_address
    host, guest = default_addresses("pyvmm3")
    assert (str(host), str(guest)) == ("10.10.3.1/30", "10.10.3.2/30")
    assert default_addresses("mytap") == (None, None)
    import ipaddress
    assert str(peer_address(ipaddress.ip_interface("192.168.1.1/24"))) == "192.168.1.2/24"
    assert str(peer_address(ipaddress.ip_interface("fd00::1/64"))) == "fd00::2/64"
