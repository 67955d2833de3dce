"""Checks of the back-end program conventions (section M of the back-end
rules), run when pyvmm check is given the back-end as a command."""

from pyvmm.check.core import check
