"""``blkif conformance``: run the suite against a backend or a frontend, or
list the catalogue.

Exit status: 0 when every MUST case passed (SHOULD and INFO never fail a
run), 1 when one failed, 2 for a usage error.
"""
import argparse
import sys

from blkif.conformance.catalogue import LEVELS
from blkif.errors import UsageError


EXAMPLES = """\
examples:
  blkif conformance backend                     our blkif serve in the sandbox
  blkif conformance backend --case req --level MUST --junit-xml out.xml
  blkif conformance backend --platform xen --domid 0 --vdev xvda --other-vdev xvdb
  blkif conformance frontend --json             our frontend in a sandbox guest
  blkif conformance frontend --platform xen     our frontend in this dom0
  blkif conformance frontend --platform xen --guest 5
                                                the blkfront of guest 5, which runs
                                                `blkif conformance agent` on its console
  blkif conformance list --markdown > docs/conformance.md

Exit status: 0 if every MUST case passed (SHOULD and INFO never fail a run),
1 if one failed, 2 for a usage error."""


def add_arguments(parser):
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="side", metavar="SIDE", required=True)
    back = sub.add_parser(
        "backend", help="play a frontend against a backend's VBD",
        description="Play a frontend against a backend's VBD, crafting raw requests, ring "
                    "headers and xenstore nodes.  Without --domid/--vdev: start the embedded "
                    "sandbox (our xenstored, the sim hypervisor, blkif serve) and test that.")
    back.add_argument("--platform", choices=("xen", "sim"), default="sim",
                      help="grant tables and event channels: real dom0 devices or the sim "
                           "(default sim)")
    back.add_argument("--xenstore", metavar="PATH",
                      help="xenstored socket of the target (default: the system's)")
    back.add_argument("--sim-path", metavar="DIR", help="the sim hypervisor's directory "
                                                         "(--platform sim with a target)")
    back.add_argument("--domid", type=int, metavar="N",
                      help="the guest whose VBD to test (on xen: the domain the suite runs "
                           "in, usually 0)")
    back.add_argument("--vdev", metavar="VDEV", help="the VBD to test (xvda, a devid)")
    back.add_argument("--other-vdev", metavar="VDEV",
                      help="a second VBD of that guest, for the isolation cases")
    back.add_argument("--readonly-vdev", metavar="VDEV",
                      help="a read-only VBD of that guest, for the read-only cases")
    back.add_argument("--workdir", metavar="DIR",
                      help="the sandbox's logs and images go here (default: a temporary "
                           "directory, removed)")
    back.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                      help="how long a correct backend may take to answer or change state "
                           "(default 5; more for emulated hosts)")
    _common(back)
    front = sub.add_parser(
        "frontend", help="play a backend for a frontend",
        description="Play a backend (offers chosen per case, misbehaviour on purpose) for a "
                    "frontend and judge what it does.  Tests our own frontend "
                    "(blkif.frontend.BlockDevice): as a guest of the embedded sandbox, or "
                    "with --platform xen in a process of dom0 on real Xen; with --guest, "
                    "the frontend of a running guest (Linux blkfront, or yours) whose "
                    "console runs the agent that `blkif conformance agent` prints.")
    front.add_argument("--platform", choices=("xen", "sim"), default="sim",
                       help="sim: the embedded sandbox (default); xen: this dom0, the "
                            "suite and the frontend both in it")
    front.add_argument("--workdir", metavar="DIR",
                       help="the sandbox's (or the frontends') logs go here (default: "
                            "temporary, removed)")
    front.add_argument("--guest", type=int, metavar="DOMID",
                       help="test this guest's frontend (--platform xen; the guest runs the "
                            "agent on its console: docs/conformance.md)")
    front.add_argument("--console", metavar="TTY",
                       help="with --guest: the guest console's tty (default: its console/tty "
                            "node in xenstore)")
    front.add_argument("--timeout", type=float, metavar="SECONDS",
                       help="with --guest: seconds an operation in the guest may take before "
                            "it counts as hung (default 20)")
    _common(front)
    sub.add_parser("agent", help="print the guest agent script for frontend --guest",
                   description="Print the shell script a guest runs on its console so that "
                               "`blkif conformance frontend --guest DOMID` can test its "
                               "frontend: sh agent </dev/hvc0 >/dev/hvc0 2>&1 (POSIX sh with "
                               "dd, awk, sha256sum, sync, blkdiscard, stty and dmesg, as "
                               "busybox has them).")
    listing = sub.add_parser("list", help="print the catalogue of cases",
                             description="Print every case: id, level, clause, title.")
    listing.add_argument("--markdown", action="store_true",
                         help="the whole catalogue as Markdown (docs/conformance.md)")
    listing.add_argument("--results", metavar="FILE",
                         help="with --markdown: end with a comparison table of these results "
                              "({implementation: {case: status}}, as the lab writes them)")
    listing.add_argument("--json", action="store_true", help="one JSON array")


def _common(parser):
    parser.add_argument("--case", action="append", default=[], metavar="ID",
                        help="run only this case or group prefix (req, xenbus-5); repeatable")
    parser.add_argument("--level", action="append", default=[], choices=LEVELS,
                        help="run only cases of this level; repeatable")
    parser.add_argument("--json", action="store_true",
                        help="print the results as one JSON object (progress goes to stderr)")
    parser.add_argument("--junit-xml", metavar="FILE", help="also write JUnit XML here")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--debug", action="store_true",
                        help="print a traceback when the suite itself fails (ERROR)")


def run(args):
    from blkif.conformance import catalogue, markdown, report
    if args.side == "agent":
        from blkif.conformance.frontend.console_agent import AGENT
        sys.stdout.write(AGENT)
        return 0
    if args.side == "list":
        cases = catalogue.load()
        if args.markdown:
            results = None
            if args.results:
                import json
                with open(args.results) as f:
                    results = json.load(f)
            sys.stdout.write(markdown.catalogue_markdown(cases, results))
        elif args.json:
            import json
            print(json.dumps([markdown.case_dict(c) for c in cases], indent=2))
        else:
            for c in cases:
                print("%-12s %-9s %-6s %s" % (c.id, c.side, c.level, c.title))
        return 0
    try:
        cases = catalogue.select(catalogue.load(args.side), args.case, args.level)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    session = _session(args)
    session.debug = args.debug
    if args.side == "backend":
        if not args.timeout > 0:
            raise UsageError("--timeout must be positive")
        session.timeout = args.timeout
    progress = None if args.quiet else (sys.stderr if args.json else sys.stdout)
    with session:
        results = report.run_cases(cases, session, progress)
    if args.json:
        print(report.as_json(results, args.side, session.target))
    elif not args.quiet or report.must_failures(results):
        print(report.summary_table(results, args.side, session.target))
    if args.junit_xml:
        with open(args.junit_xml, "w") as f:
            f.write(report.junit_xml(results, args.side, session.target))
    return report.exit_status(results)


def _session(args):
    if args.side == "frontend":
        from blkif.conformance.frontend.session import (
            GuestFrontends,
            SandboxFrontends,
            XenFrontends,
        )
        if args.guest is not None:
            if args.platform != "xen":
                raise UsageError("--guest needs --platform xen")
            timeout = 20.0 if args.timeout is None else args.timeout
            if not timeout > 0:
                raise UsageError("--timeout must be positive")
            return GuestFrontends(args.guest, args.console, args.workdir, timeout)
        for option in ("console", "timeout"):
            if getattr(args, option) is not None:
                raise UsageError("--%s goes with --guest" % option)
        if args.platform == "xen":
            return XenFrontends(workdir=args.workdir)
        return SandboxFrontends(workdir=args.workdir)
    from blkif.conformance.backend.session import SandboxBackends, TargetBackends
    if args.domid is None and args.vdev is None:
        if args.platform != "sim":
            raise UsageError("--platform xen needs a target: --domid N --vdev VDEV")
        return SandboxBackends(workdir=args.workdir)
    if args.domid is None or args.vdev is None:
        raise UsageError("a target is --domid N and --vdev VDEV together")
    if args.platform == "sim" and not args.sim_path:
        raise UsageError("--platform sim with a target needs --sim-path")
    if args.platform == "sim" and not args.xenstore:
        raise UsageError("--platform sim with a target needs --xenstore")
    return TargetBackends(args.platform, args.xenstore, args.domid, args.vdev,
                          args.other_vdev, args.readonly_vdev, args.sim_path)
