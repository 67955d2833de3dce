"""`pyvmm check`: a conformance checker for vhost-user back-ends.

    command.py   the command line
    target.py    where the back-end is: a socket, a listener, or a command
                 started (again) as needed
    run.py       running the checks; one line per rule, a summary
    rules.py     every check, in rule order, from:
      core.py      the registry, the back-end's offer, a check's Context
      framing.py   A-C: header, negotiation, REPLY_ACK
      memory.py    D: memory tables and slots
      rings.py     E (and F's tracking): ring states through the driver
      device.py    F, G, I: inflight area, config space, owner, status
      program.py   M: the program conventions
    datapath.py  what the ring checks send, per device type
    probe.py     a raw connection: send any frame, read the next one as it
                 came (so that a wrong flag or size is seen, not refused)
"""
