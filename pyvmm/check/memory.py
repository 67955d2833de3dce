"""Checks of memory tables (section D of the back-end rules): regions the
back-end must map from their fds at their offsets, and addresses it must
translate rather than use."""

from pyvmm.check.core import check
