"""The `tweetbot` command line."""

from __future__ import annotations

import argparse
import sys


def run_operator(args: argparse.Namespace) -> int:
    import socket

    import kopf

    from .settings import SettingsError

    try:
        from . import handlers  # reads the settings
    except SettingsError as error:
        print(f"tweetbot operator: {error}", file=sys.stderr)  # what to fix, not a traceback
        return 2

    _fewer_malloc_arenas()
    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL,
    )
    settings = handlers.SETTINGS
    kopf.run(
        standalone=True,  # one replica (Deployment strategy Recreate): no peering objects needed
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz",
        # kopf would name itself after the user, which a uid without a passwd entry (the chart's 65532, any
        # OpenShift uid) does not have.
        identity=socket.gethostname(),
    )
    return 0


def _fewer_malloc_arenas() -> None:
    """glibc gives each thread its own malloc arena; for a dozen threads that mostly wait on the API server,
    that is tens of MB of half-empty heap (what MALLOC_ARENA_MAX=2 does, set before any thread starts)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tweetbot", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    operator = commands.add_parser(
        "operator", help="run the operator (settings from TWEETBOT_* environment variables; see settings.py)"
    )
    operator.add_argument("--verbose", action="store_true")
    operator.add_argument("--log-format", choices=("json", "plain"), default="json",
                          help="json (one object a line, for log collectors) or plain")
    operator.set_defaults(handler=run_operator)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
