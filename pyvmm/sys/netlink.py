"""Interface addresses through rtnetlink (<linux/netlink.h>, <linux/rtnetlink.h>,
<linux/if_addr.h>): what `ip addr add` and `ip addr del` do, IPv4 and IPv6
alike, without starting a program.

Unlike the old SIOCSIFADDR ioctl, which replaces an interface's primary
IPv4 address, RTM_NEWADDR adds one next to whatever is there; and with
NLM_F_EXCL it says EEXIST when the address was there already, so pyvmm knows
whether it is its own to remove.
"""

import ipaddress
import os
import socket
import struct

NETLINK_ROUTE = 0
RTM_NEWADDR, RTM_DELADDR = 20, 21
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400
IFA_ADDRESS, IFA_LOCAL = 1, 2

NLMSGHDR = struct.Struct("=IHHII")     # len, type, flags, seq, pid
IFADDRMSG = struct.Struct("=BBBBi")    # family, prefixlen, flags, scope, index
RTATTR = struct.Struct("=HH")          # len, type


def _rtattr(kind, data):
    length = RTATTR.size + len(data)
    return RTATTR.pack(length, kind) + data + bytes(-length % 4)


def _request(msg_type, flags, payload, timeout=5):
    """Send one request and wait for its acknowledgement; OSError on refusal."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       NETLINK_ROUTE) as s:
        s.settimeout(timeout)
        s.sendto(NLMSGHDR.pack(NLMSGHDR.size + len(payload), msg_type,
                               NLM_F_REQUEST | NLM_F_ACK | flags, 1, 0) + payload, (0, 0))
        reply = s.recv(65536)
    _, kind, _, _, _ = NLMSGHDR.unpack_from(reply)
    if kind == NLMSG_ERROR:
        (error,) = struct.unpack_from("=i", reply, NLMSGHDR.size)
        if error:
            raise OSError(-error, os.strerror(-error))


def _address_message(ifname, address):
    address = ipaddress.ip_interface(address)
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    ip = address.ip.packed
    return (IFADDRMSG.pack(family, address.network.prefixlen, 0, 0, socket.if_nametoindex(ifname))
            + _rtattr(IFA_LOCAL, ip) + _rtattr(IFA_ADDRESS, ip))


def add_address(ifname, address):
    """Give interface ifname address (e.g. '10.0.0.1/24'); FileExistsError if it has it."""
    _request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, _address_message(ifname, address))


def del_address(ifname, address):
    """Take address off interface ifname."""
    _request(RTM_DELADDR, 0, _address_message(ifname, address))
