# ``python -m xenstore serve --socket PATH``: run the embedded xenstored.
#
# Exit status: 0 after SIGTERM/SIGINT (socket files removed), 1 if the
# daemon cannot start (one line on stderr), 2 for bad arguments (one line).
# SIGUSR1 writes the --dump snapshot; so does a clean exit.
import argparse
import contextlib
import logging
import signal
import sys

from .server import Server
from .store import DEFAULT_QUOTAS

PROG = "python -m xenstore"

#: Signal -> what the server loop should do about it.
SIGNAL_ACTIONS = {
    signal.SIGTERM: "stop",
    signal.SIGINT: "stop",
    signal.SIGUSR1: "dump",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        sys.stderr.write("%s: error: %s (see --help)\n" % (self.prog, message))
        sys.exit(2)


def _quota(text):
    name, sep, value = text.partition("=")
    if not sep or name not in DEFAULT_QUOTAS or not value.isdigit():
        raise argparse.ArgumentTypeError(
            "expected NAME=N with NAME one of %s, got %r"
            % (", ".join(sorted(DEFAULT_QUOTAS)), text))
    return name, int(value)


def build_parser():
    parser = _Parser(prog=PROG, description="xenstore tools of the blkif project")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND",
                                     parser_class=_Parser)
    serve = commands.add_parser(
        "serve", help="run an in-memory xenstored on a Unix socket",
        description="Run an in-memory xenstored speaking xs_wire.h on a Unix "
                    "socket. The socket serves domain 0; each domain N "
                    "introduced gets its own socket PATH.d/N where clients "
                    "act as that unprivileged domain.")
    serve.add_argument("--socket", required=True, metavar="PATH",
                       help="Unix socket to listen on (dom0)")
    serve.add_argument("--dump", metavar="FILE",
                       help="write a JSON snapshot here on SIGUSR1 and at exit")
    serve.add_argument("--quota", action="append", type=_quota, default=[],
                       metavar="NAME=N",
                       help="override a per-domain quota (%s)"
                       % ", ".join("%s=%d" % kv for kv in sorted(DEFAULT_QUOTAS.items())))
    serve.add_argument("--log-level", default="INFO",
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


@contextlib.contextmanager
def signal_handlers(server):
    """Route SIGNAL_ACTIONS to ``server.request``; restore the old handlers after."""
    previous = {}
    old_fd = signal.set_wakeup_fd(server.wakeup_fd, warn_on_full_buffer=False)
    try:
        for signum, action in SIGNAL_ACTIONS.items():
            previous[signum] = signal.signal(
                signum, lambda _s, _f, action=action: server.request(action))
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(old_fd)


def serve(args):
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s xenstored[%(process)d] %(levelname)s "
                               "%(name)s: %(message)s")
    quotas = dict(DEFAULT_QUOTAS)
    quotas.update(dict(args.quota))
    try:
        server = Server(args.socket, dump=args.dump, quotas=quotas)
        server.start()
    except OSError as e:
        sys.stderr.write("%s serve: error: cannot listen on %s: %s\n"
                         % (PROG, args.socket, e.strerror or e))
        return 1
    with signal_handlers(server):
        server.serve_forever()
    if args.dump:
        server.dump()
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    build_parser().print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
