"""The `pyvmm` command line."""

import argparse
import sys

from pyvmm import __version__


def build_parser():
    parser = argparse.ArgumentParser(
        prog="pyvmm",
        description="A minimal KVM virtual machine monitor whose purpose is vhost.",
    )
    parser.add_argument("--version", action="version", version=f"pyvmm {__version__}")
    return parser


def main(argv=None):
    parser = build_parser()
    parser.parse_args(sys.argv[1:] if argv is None else argv)
    parser.print_help()
    return 0
