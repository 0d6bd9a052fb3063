"""``python -m blkif.platform.sim start|stop|run DIR``: the sim hypervisor."""
import argparse
import logging
import os
import sys

from blkif.platform.errors import PlatformUnavailable
from blkif.platform.sim import control
from blkif.platform.sim.hypervisor import Hypervisor


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m blkif.platform.sim")
    parser.add_argument("command", choices=["start", "stop", "run"],
                        help="start: detached; stop: stop and clean up; run: foreground")
    parser.add_argument("directory", help="where the hypervisor's socket lives ($BLKIF_SIM)")
    parser.add_argument("--log-level", default="WARNING",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="run: log to stderr from this level (INFO: every "
                             "connect, disconnect and freed domain)")
    parser.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--watch-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    directory = os.path.abspath(args.directory)
    if args.command == "start":
        try:
            pid = control.start(directory)
        except PlatformUnavailable as exc:
            print("error: %s" % exc, file=sys.stderr)
            return 1
        print("sim hypervisor pid %d serving %s" % (pid, directory))
        print("export BLKIF_SIM=%s" % directory)
        return 0
    if args.command == "stop":
        return 0 if control.stop(directory) else 1
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s sim-hypervisor %(levelname)s %(message)s")
    os.makedirs(directory, exist_ok=True)
    hypervisor = Hypervisor(directory, watch_fd=args.watch_fd)
    if args.ready_fd is not None:
        os.write(args.ready_fd, b"R")
        os.close(args.ready_fd)
    hypervisor.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
