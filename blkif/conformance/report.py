"""Running cases and reporting them: a line per case, a summary per group,
JSON, JUnit XML.

:func:`run_cases` calls each case with the peer the side's session gives it
(``session.peer_for(case)``, released after the case), so one case's damage
to its VBD cannot leak into the next.  A case outcome is PASS, FAIL (the peer
broke the rule: ``observed`` says how), SKIP (the target cannot run it) or
ERROR (the suite itself failed: counted as a failure of the case's level).
"""
import json
import time
import traceback
from dataclasses import asdict, dataclass
from xml.etree import ElementTree

from blkif.conformance.catalogue import MUST, Failed, Skipped
from blkif.errors import RemoteProtocolError

PASS, FAIL, SKIP, ERROR = "PASS", "FAIL", "SKIP", "ERROR"


@dataclass
class Result:
    id: str
    group: str
    clause: str
    level: str
    title: str
    status: str
    observed: str
    seconds: float


def run_cases(cases, session, stream=None):
    """Run ``cases`` against ``session``; a Result per case, in order.
    ``stream`` (a text file) gets a progress line per case."""
    results = []
    for case in cases:
        started = time.monotonic()
        try:
            with session.peer_for(case) as peer:
                observed = case.run(peer) or ""
            status = PASS
        except Failed as exc:
            status, observed = FAIL, str(exc)
        except RemoteProtocolError as exc:  # our ring caught the peer breaking ring.h
            status, observed = FAIL, "the peer broke the protocol: %s" % exc
        except Skipped as exc:
            status, observed = SKIP, str(exc)
        except Exception as exc:  # the suite broke, or the peer in a way we did not foresee
            status = ERROR
            observed = "%s: %s" % (type(exc).__name__, exc)
            if session.debug:
                traceback.print_exc()
        result = Result(case.id, case.group, case.clause, case.level, case.title, status,
                        " ".join(observed.split()), round(time.monotonic() - started, 3))
        results.append(result)
        if stream is not None:
            print(progress_line(result), file=stream, flush=True)
    return results


def progress_line(result):
    line = "%-5s %-10s %-6s %s (%.2fs)" % (result.status, result.id, result.level,
                                           result.title, result.seconds)
    if result.observed and (result.status != PASS or result.level != MUST):
        line += "\n      %s" % result.observed
    return line


def must_failures(results):
    """The MUST cases that failed (FAIL or ERROR): any makes the exit status 1."""
    return [r for r in results if r.level == MUST and r.status in (FAIL, ERROR)]


def summary(results):
    """{group: {PASS: n, FAIL: n, SKIP: n, ERROR: n}} in first-seen order."""
    out = {}
    for r in results:
        counts = out.setdefault(r.group, dict.fromkeys((PASS, FAIL, SKIP, ERROR), 0))
        counts[r.status] += 1
    return out


def summary_table(results, side, target):
    lines = ["", "%s conformance of %s" % (side, target),
             "%-12s %5s %5s %5s %5s" % ("group", PASS, FAIL, SKIP, ERROR)]
    totals = dict.fromkeys((PASS, FAIL, SKIP, ERROR), 0)
    for name, counts in summary(results).items():
        lines.append("%-12s %5d %5d %5d %5d" % (name, *counts.values()))
        for key, n in counts.items():
            totals[key] += n
    lines.append("%-12s %5d %5d %5d %5d" % ("total", *totals.values()))
    failed = must_failures(results)
    if failed:
        lines.append("MUST cases failed: " + ", ".join(r.id for r in failed))
    return "\n".join(lines)


def as_json(results, side, target):
    return json.dumps({
        "side": side, "target": target,
        "summary": summary(results),
        "must_failures": [r.id for r in must_failures(results)],
        "results": [asdict(r) for r in results],
    }, indent=2)


def junit_xml(results, side, target):
    """JUnit XML: a testsuite per group, a testcase per case; FAIL and ERROR
    are <failure>/<error> with the observed value; SKIP is <skipped>."""
    root = ElementTree.Element("testsuites", name="blkif conformance %s: %s" % (side, target))
    for name, counts in summary(results).items():
        mine = [r for r in results if r.group == name]
        suite = ElementTree.SubElement(
            root, "testsuite", name="%s.%s" % (side, name), tests=str(len(mine)),
            failures=str(counts[FAIL]), errors=str(counts[ERROR]), skipped=str(counts[SKIP]),
            time="%.3f" % sum(r.seconds for r in mine))
        for r in mine:
            case = ElementTree.SubElement(suite, "testcase", classname="%s.%s" % (side, name),
                                          name="%s %s: %s" % (r.id, r.level, r.title),
                                          time="%.3f" % r.seconds)
            tag = {FAIL: "failure", ERROR: "error", SKIP: "skipped"}.get(r.status)
            if tag:
                ElementTree.SubElement(case, tag, message=r.observed or r.status)
    return ElementTree.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def exit_status(results):
    """1 if a MUST case failed, else 0 (SHOULD and INFO never fail a run)."""
    return 1 if must_failures(results) else 0
