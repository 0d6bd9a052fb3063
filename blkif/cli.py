"""The ``blkif`` command: one subcommand per module.

Each command module provides ``add_arguments(parser)`` and ``run(args)``;
``run`` returns the exit status; modules keep heavy imports inside ``run``.
Every failure becomes one line on stderr:
exit 2 for a usage error, 1 for anything else.
"""
import argparse
import importlib
import logging
import os
import sys

from blkif import __version__, systemd
from blkif.errors import BlkifError, UsageError
from xenstore import XenstoreError

# name: (module, one-line help)
COMMANDS = {
    "calc": ("blkif.calc", "ring sizes, and capacity plans: grants, memory, maps, throughput"),
    "vbd": ("blkif.toolstack", "create, destroy and list VBDs in xenstore as libxl does"),
    "serve": ("blkif.backend.service", "the backend service: one worker process per VBD"),
    "stats": ("blkif.backend.status", "counters of a running `blkif serve`, per VBD"),
    "demo": ("blkif.demo", "the whole stack in processes on the sim platform, verified I/O"),
    "bench": ("blkif.bench", "blkif against the backing file itself: IOPS, MB/s, latency"),
    "conformance": ("blkif.conformance.cli",
                    "conformance suite: test any blkif backend or frontend against blkif.h"),
    "lab": ("blkif.lab.cli", "boot a real Xen host in QEMU and prove blkif against Linux's drivers"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError("%s: %s" % (self.prog, message))


def build_parser():
    parser = _Parser(
        prog="blkif",
        description="The Xen PV block protocol: backend service, frontend, tools.",
    )
    parser.add_argument("--version", action="version", version="blkif " + __version__)
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(cmd)
    return parser


def setup_logging(verbose):
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    systemd.setup_logging(level, "%(levelname)s %(name)s: %(message)s")


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        setup_logging(args.verbose)
        return importlib.import_module(args._module).run(args) or 0
    except BrokenPipeError:
        # The reader went away (``blkif calc | head``): not an error worth a line.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except UsageError as exc:
        print("blkif: error: %s" % exc, file=sys.stderr)
        return 2
    except (BlkifError, XenstoreError, OSError) as exc:
        print("blkif: error: %s" % exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("blkif: interrupted", file=sys.stderr)
        return 130
