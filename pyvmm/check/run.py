"""Running the checks against a back-end: one line per rule, then a summary.

    BE-9     PASS  MUST      GET_FEATURES is answered with a u64
    BE-16    FAIL  SHOULD    MQ is offered, ... : protocol features 0x... lack MQ
"""

from pyvmm.check.rules import CHECKS, MUST_LEVELS, Context, Failed, Skipped, discover
from pyvmm.check.target import SocketTarget, Target
from pyvmm.errors import PyvmmError


def run_checks(target, device=None, write=print, timeout=5.0, only=None, results=None):
    """Every check against the back-end (a check.target.Target, or the path
    it listens on); (passed, failed, skipped, whether a MUST failed).
    results, a list, gets a dict per check."""
    if not isinstance(target, Target):
        target = SocketTarget(target, timeout)
    offer = discover(target)
    write(f"{target}: features {offer.features:#x}, protocol features "
          f"{offer.protocol:#x}, {offer.queues} queue(s); device {device or 'unknown'}")
    ctx = Context(target, offer, device, timeout)
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
        except Exception as e:           # a bug of the checker's: say so, go on
            result, detail = "FAIL", f"the check itself failed (a pyvmm bug): " \
                                     f"{type(e).__name__}: {e}"
        finally:
            target.release()
        counts[result] += 1
        if result == "FAIL" and c.level in MUST_LEVELS:
            must_failed = True
        if results is not None:
            results.append({"rule": c.rule, "result": result, "level": c.level,
                            "what": c.what, "detail": detail})
        write(f"{c.rule:<7} {result}  {c.level:<9} {c.what}" + (f": {detail}" if detail else ""))
    write(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    return counts["PASS"], counts["FAIL"], counts["SKIP"], must_failed
