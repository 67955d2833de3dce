"""`pyvmm check`: a conformance checker for vhost-user back-ends.

    probe.py   a raw connection: send any frame, read the next one as it
               came (so that a wrong flag or size is seen, not refused)
    rules.py   the checks, one per rule of ../shared/VHOST-USER-CONFORMANCE.md
               section 1 (BE-n), each on a fresh connection
    run.py     running them against a socket; one line per rule, a summary
"""
