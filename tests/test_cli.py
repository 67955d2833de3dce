"""`pyvmm` on the host: usage errors and host checks, each a single clear line."""

import os
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
    (["--transport", "isa"], "'isa' is not a transport: pci or mmio"),
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


def run_in_process(capfd, *args):
    """pyvmm's main() here, for tests that swap a path or a class first."""
    from pyvmm.cli import main
    status = main(["run", *args])
    err = capfd.readouterr().err
    assert "Traceback" not in err
    return status, err.strip().splitlines()


def test_a_paravirtual_kvm_is_refused_with_a_pointer_to_the_testbed(tmp_path):
    (tmp_path / "kvm_pvm").mkdir()
    kvm = Kvm.__new__(Kvm)                     # no /dev/kvm needed to ask
    with pytest.raises(KvmError, match=r"paravirtual kvm_pvm.*scripts/testbed"):
        kvm.require_linux_guest_support(sys_module=tmp_path)


def test_kvm_errors_reach_the_user_as_one_line(capfd, monkeypatch):
    def no_kvm(path="/dev/kvm"):
        raise KvmError("this host's KVM is the paravirtual kvm_pvm, which cannot boot a "
                       "stock Linux kernel; run pyvmm inside the testbed VM")
    monkeypatch.setattr("pyvmm.vmm.machine.Kvm", no_kvm)
    status, lines = run_in_process(capfd, "--", "true")
    assert status == 1
    assert lines == ["pyvmm: error: this host's KVM is the paravirtual kvm_pvm, which cannot "
                     "boot a stock Linux kernel; run pyvmm inside the testbed VM"]


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


def test_a_bad_transport_from_the_environment_names_where_it_came_from():
    r = subprocess.run([*PYVMM, "run", "--", "true"], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL, env={**os.environ, "PYVMM_TRANSPORT": "vme"})
    assert r.returncode == 2
    assert one_line_error(r).endswith("'vme' is not a transport: pci or mmio "
                                      "(--transport, or $PYVMM_TRANSPORT for its default)")


def test_net_and_vsock_options_parse():
    from pyvmm.cli import parse_net, parse_vsock
    cfg = parse_net("vhost-kernel,tap=t0,mac=02:00:00:aa:bb:cc,host-ip=10.1.0.1/24,guest-ip=10.1.0.9/24")
    assert cfg.tap == "t0" and cfg.mac == bytes.fromhex("020000aabbcc")
    assert str(cfg.host_ip) == "10.1.0.1/24" and str(cfg.guest_ip) == "10.1.0.9/24"
    assert parse_net("vhost-kernel").tap is None
    assert parse_net("vhost-kernel").queues == 1
    assert parse_net("vhost-kernel,queues=2").queues == 2
    assert parse_vsock("vhost-kernel,cid=42").cid == 42
    assert parse_vsock("vhost-kernel").cid == 3


def test_vhost_user_device_options_parse():
    from pyvmm.cli import parse_device, parse_fs, parse_rng, parse_vsock
    cfg = parse_fs("vhost-user,socket=/tmp/f.sock,tag=share,queues=2,server")
    assert (cfg.kind, cfg.tag, cfg.queues, cfg.server) == ("fs", "share", 2, True)
    cfg = parse_vsock("vhost-user,socket=/tmp/v.sock,cid=9,server")
    assert (cfg.kind, cfg.socket, cfg.cid, cfg.server) == ("vsock", "/tmp/v.sock", 9, True)
    assert parse_vsock("vhost-user,socket=/tmp/v.sock").cid is None   # the back-end says
    cfg = parse_rng("vhost-user,socket=/tmp/r.sock,timeout=2.5")
    assert (cfg.kind, cfg.socket, cfg.timeout, cfg.reconnect) == ("rng", "/tmp/r.sock", 2.5, None)
    cfg = parse_fs("vhost-user,socket=/tmp/f.sock,tag=t,reconnect=0.5,server")
    assert (cfg.reconnect, cfg.server) == (0.5, True)
    cfg = parse_device("vhost-user,socket=/tmp/d.sock,virtio-id=26,queues=2,queue-size=1024,"
                       "config-size=40")
    assert (cfg.kind, cfg.virtio_id, cfg.queues, cfg.queue_size, cfg.config_size) == (
        "device", 26, 2, 1024, 40)


@pytest.mark.parametrize("args,message", [
    (["--net", "vhost-net"], "the back-end must be vhost-kernel or vhost-user"),
    (["--net", "vhost-user,mac=02:00:00:00:00:01"], "give the back-end's socket"),
    (["--net", "vhost-user,socket=/s,mac=01:00:00:00:00:01"], "a multicast address"),
    (["--net", "vhost-kernel,speed=fast"], "unknown option 'speed=fast'"),
    (["--net", "vhost-kernel,mac=01:00:00:00:00:01"], "a multicast address"),
    (["--net", "vhost-kernel,mac=xyz"], "use six hex bytes"),
    (["--net", "vhost-kernel,host-ip=10.0.0.1/33"], "give an address with prefix"),
    (["--vsock", "vhost-kernel,cid=three"], "not a number"),
    (["--vsock", "vhost-net"], "the back-end must be vhost-kernel or vhost-user"),
    (["--vsock", "vhost-user,cid=5"], "give the back-end's socket"),
    (["--vsock", "vhost-user,socket=/s,cid=2"], "cid=2: give a CID from 3"),
    (["--rng", "vhost-kernel"], "the back-end must be vhost-user"),
    (["--rng", "vhost-user,socket=/s,timeout=0"], "give seconds, more than 0"),
    (["--blk", "vhost-user,socket=/s,reconnect=soon"], "reconnect=soon: give seconds between"),
    (["--blk", "vhost-user,socket=/s,reconnect=-1"], "reconnect=-1: give seconds between"),
    (["--device", "vhost-user,socket=/s"], "give the device type, virtio-id=N"),
    (["--fs", "vhost-user,socket=/s"], "give the tag the guest mounts, tag=NAME"),
    (["--fs", "vhost-user,socket=/s,tag=" + "x" * 37], "(1 to 36 bytes)"),
    (["--fs", "vhost-user,socket=/s,tag=t,queues=64"], "queues=64: give a number from 1 to 63"),
    (["--device", "vhost-user,socket=/s,virtio-id=x"], "virtio-id=x: give a device id"),
    (["--device", "vhost-user,socket=/s,virtio-id=2,queue-size=100"], "give a power of 2"),
    (["--device", "vhost-user,socket=/s,virtio-id=2,queues=0"], "queues=0: give a number"),
    (["--net", "vhost-kernel,tap=a-very-long-tap-name"], "at most 15 characters"),
    (["--net", "vhost-kernel,queues=9"], "queues=9: give a number from 1 to 8"),
])
def test_device_option_errors(args, message):
    r = pyvmm("run", *args, "--", "true")
    assert r.returncode == 2
    assert message in one_line_error(r)


def test_missing_vhost_driver_is_one_clear_line(capfd, monkeypatch, tmp_path):
    """The error names the module to load (no /dev/vhost-* at the paths given)."""
    from pyvmm.vhost.kernel import VhostKernelNet, VhostKernelVsock
    monkeypatch.setattr(VhostKernelNet, "device", str(tmp_path / "vhost-net"))
    monkeypatch.setattr(VhostKernelVsock, "device", str(tmp_path / "vhost-vsock"))
    status, lines = run_in_process(capfd, "--net", "vhost-kernel", "--", "true")
    assert status == 1
    assert lines == [f"pyvmm: error: {tmp_path}/vhost-net does not exist: "
                     "load the driver with 'modprobe vhost_net'"]
    status, lines = run_in_process(capfd, "--vsock", "vhost-kernel,cid=5", "--", "true")
    assert status == 1 and len(lines) == 1
    assert lines[0].endswith("load the driver with 'modprobe vhost_vsock'")
    from pyvmm.vhost.kernel import VhostKernelScsi
    monkeypatch.setattr(VhostKernelScsi, "device", str(tmp_path / "vhost-scsi"))
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    status, lines = run_in_process(capfd, "--scsi", f"vhost-kernel,image={image}", "--", "true")
    assert status == 1 and len(lines) == 1
    assert lines[0].endswith("load the driver with 'modprobe vhost_scsi'")


@pytest.mark.parametrize("option,path,kind", [
    ("--initrd", "/dev/zero", "a character device"),
    ("--kernel", "/dev/zero", "a character device"),
    ("--kernel", "FIFO", "a FIFO"),
])
def test_special_files_as_kernel_or_initrd_are_one_line(tmp_path, option, path, kind):
    if path == "FIFO":
        path = tmp_path / "fifo"
        os.mkfifo(path)                      # nobody writes it: opening it must not wait
    r = pyvmm("run", option, str(path), "--", "true")
    assert r.returncode == 1
    what = option.lstrip("-")
    assert one_line_error(r) == f"pyvmm: error: {what} {path} is {kind}, not a regular file"


def test_default_addresses():
    from pyvmm.vmm.virtio_devices import default_addresses, peer_address
    host, guest = default_addresses("pyvmm3")
    assert (str(host), str(guest)) == ("10.10.3.1/30", "10.10.3.2/30")
    assert default_addresses("mytap") == (None, None)
    import ipaddress
    assert str(peer_address(ipaddress.ip_interface("192.168.1.1/24"))) == "192.168.1.2/24"
    assert str(peer_address(ipaddress.ip_interface("fd00::1/64"))) == "fd00::2/64"


def test_a_run_imports_only_what_it_needs():
    """Each module costs tens of milliseconds at start-up in the testbed VM."""
    script = """
import sys
import pyvmm.vmm.machine as machine
from pyvmm.kvm import KvmError
def no_kvm(path="/dev/kvm"):
    raise KvmError("stop here")
machine.Kvm = no_kvm
from pyvmm.cli import main
assert main(["run", "--", "true"]) == 1
heavy = {"elftools", "pathlib", "shutil", "subprocess", "socket",
         "pyvmm.sys.tap", "pyvmm.vhost.kernel", "pyvmm.devices.virtio.net"}
print(sorted(heavy & set(sys.modules)))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.stdout == "[]\n", r.stdout + r.stderr
