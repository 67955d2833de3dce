"""Running the checks against a back-end: one line per rule, then a summary.

    BE-9     PASS  MUST      GET_FEATURES is answered with a u64
    BE-16    FAIL  SHOULD    MQ is offered, ... : protocol features 0x... lack MQ

A back-end that dies for good (at a socket nobody starts it again at) is
said so once, at the rule it died at; the rules after it are SKIPped as
not run instead of each failing for want of a socket.
"""

from pyvmm.check.rules import CHECKS, MUST_LEVELS, Context, Failed, Skipped, discover
from pyvmm.check.target import SocketTarget, Target
from pyvmm.errors import PyvmmError


def run_checks(target, device=None, write=print, timeout=5.0, only=None, results=None):
    """Every check against the back-end (a check.target.Target, or the path
    it listens on); (passed, failed, skipped, whether a MUST failed, or could
    not be checked because the back-end died). results, a list, gets a dict
    per check."""
    if not isinstance(target, Target):
        target = SocketTarget(target, timeout)
    offer = discover(target)
    write(f"{target}: features {offer.features:#x}, protocol features "
          f"{offer.protocol:#x}, {offer.queues} queue(s); device {device or 'unknown'}")
    ctx = Context(target, offer, device, timeout)
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    must_failed = False
    died_at = None
    chosen = [c for c in CHECKS if not only or c.rule in only]
    for n, c in enumerate(chosen):
        if died_at:
            result, detail = "SKIP", f"not run: the back-end died at {died_at}"
            shown = "not run"             # the line above said why, once
            must_failed |= c.level in MUST_LEVELS
        else:
            result, detail = run_one(c, ctx)
            shown = detail
        counts[result] += 1
        must_failed |= result == "FAIL" and c.level in MUST_LEVELS
        if results is not None:
            results.append({"rule": c.rule, "result": result, "level": c.level,
                            "what": c.what, "detail": detail})
        write(f"{c.rule:<7} {result}  {c.level:<9} {c.what}" + (f": {shown}" if shown else ""))
        if result == "FAIL" and not died_at and (why := target.dead()):
            died_at = c.rule
            write(f"!! the back-end died at {c.rule}" + ("" if why in detail else f" (it {why})")
                  + f"; the {len(chosen) - n - 1} checks after it are not run")
    write(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    return counts["PASS"], counts["FAIL"], counts["SKIP"], must_failed


def run_one(c, ctx):
    """Check c: (PASS, FAIL or SKIP, what went wrong)."""
    try:
        c.run(ctx)
        return "PASS", ""
    except Skipped as e:
        return "SKIP", str(e)
    except Failed as e:
        return "FAIL", str(e)
    except (PyvmmError, OSError) as e:
        return "FAIL", f"{type(e).__name__}: {e}"
    except Exception as e:           # a bug of the checker's: say so, go on
        return "FAIL", f"the check itself failed (a pyvmm bug): {type(e).__name__}: {e}"
    finally:
        ctx.target.release()
