"""Running the checks against a back-end: one line per rule, then a summary.

    BE-9     PASS  MUST      GET_FEATURES is answered with a u64
    BE-16    FAIL  SHOULD    MQ is offered, ... : protocol features 0x... lack MQ
"""

from pyvmm.check.rules import CHECKS, MUST_LEVELS, Context, Failed, Skipped, discover
from pyvmm.errors import PyvmmError


def run_checks(path, device=None, write=print, timeout=5.0, only=None, results=None):
    """Every check against the back-end at path; (passed, failed, skipped,
    whether a MUST failed). results, a list, gets a dict per check."""
    offer = discover(path, timeout)
    write(f"back-end at {path}: features {offer.features:#x}, protocol features "
          f"{offer.protocol:#x}, {offer.queues} queue(s); device {device or 'unknown'}")
    ctx = Context(path, offer, device, timeout)
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    must_failed = False
    for c in CHECKS:
        if only and c.rule not in only:
            continue
        detail = ""
        try:
            c.run(ctx)
            result = "PASS"
        except Skipped as e:
            result, detail = "SKIP", str(e)
        except Failed as e:
            result, detail = "FAIL", str(e)
        except (PyvmmError, OSError) as e:
            result, detail = "FAIL", f"{type(e).__name__}: {e}"
        counts[result] += 1
        if result == "FAIL" and c.level in MUST_LEVELS:
            must_failed = True
        if results is not None:
            results.append({"rule": c.rule, "result": result, "level": c.level,
                            "what": c.what, "detail": detail})
        write(f"{c.rule:<7} {result}  {c.level:<9} {c.what}" + (f": {detail}" if detail else ""))
    write(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    return counts["PASS"], counts["FAIL"], counts["SKIP"], must_failed
