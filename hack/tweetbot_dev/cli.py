"""The `tweetbot-dev` command line: the local cluster and S3, the demo and the benchmarks (never in an image)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import release as release_command  # its arguments; PyYAML and the standard library only


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_build(args: argparse.Namespace) -> int:
    from .binaries import ensure_binaries, ensure_check_tools
    from .images import ensure_image
    from .node import install_packages

    install_packages(_log)
    print(ensure_binaries(_log))
    print(ensure_check_tools(_log))
    for name in ("operator", "trainer"):
        print(ensure_image(name, _log).ref)
    return 0


def run_up(args: argparse.Namespace) -> int:
    from .cluster import fake_nodes
    from .devenv import DevEnvironment
    from .node import NODE_NAME

    # The real node runs every CPU pod; kwok's GPU nodes (tainted) take the GPU pods for scheduling tests.
    env = DevEnvironment.up(args.home, log=_log, nodes=fake_nodes(cpu_nodes=0), real_node=True)
    for image in env.load_images(_log).values():
        _log(f"image on the node: {image.ref}")
    _log(f"cluster up: kubeconfig {env.kubeconfig}; real node {NODE_NAME} and kwok GPU nodes")
    _log(f"S3 up: {env.s3_endpoint}")
    _log(f"use it from a shell with:  eval \"$(tweetbot-dev env --home {args.home})\"")
    print(env.kubeconfig)
    return 0


def _existing_env(args: argparse.Namespace):
    from .devenv import DevEnvironment

    env = DevEnvironment.load(args.home)
    if env is None:
        _log(f"no dev environment in {args.home}: run `tweetbot-dev up` first")
    return env


def run_env(args: argparse.Namespace) -> int:
    env = _existing_env(args)
    if env is None:
        return 1
    sys.stdout.write(env.shell_exports())
    return 0


def run_down(args: argparse.Namespace) -> int:
    env = _existing_env(args)
    if env is None:
        return 0
    env.down()
    _log("cluster and S3 stopped, their data deleted")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.main(keep=args.keep)


def run_bench(args: argparse.Namespace) -> int:
    from . import bench

    bench.main(args.json, tuple(args.only), args.markdown)
    return 0


def _with_home(handler):
    def run(args: argparse.Namespace) -> int:
        from .devenv import default_home

        args.home = args.home or default_home()
        return handler(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tweetbot-dev", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, handler, help_text in (
        ("build", run_build, "install the Debian packages the real node and the tests need, build (or find cached) "
                             "the pinned Kubernetes, etcd, kwok, helm, MinIO, CoreDNS, Kueue and actionlint binaries "
                             "and both images"),
        ("up", run_up, "start the cluster (a real node and kwok GPU nodes) and S3; prints the kubeconfig path"),
        ("env", run_env, "print shell exports: KUBECONFIG, the AWS_* variables for S3, PATH with kubectl and helm"),
        ("down", run_down, "stop the cluster and S3 and delete their data"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--home", type=Path, help="state directory (default: ~/.cache/tweetbot/dev, or $TWEETBOT_DEV_HOME)")
        sub.set_defaults(handler=_with_home(handler))

    demo = commands.add_parser(
        "demo", help="the whole product offline: cluster, S3, Hub, chart, operator, one bot to Succeeded")
    demo.add_argument("--keep", action="store_true", help="leave the cluster and S3 up afterwards")
    demo.set_defaults(handler=run_demo)

    bench = commands.add_parser("bench", help="benchmarks, each against a baseline measured in the same run")
    bench.add_argument("--json", help="also write the results to this file")
    bench.add_argument("--markdown", help="also write the table to this file, as docs/benchmarks.md carries it")
    bench.add_argument("--only", action="append", default=[], choices=["scrape", "train", "s3", "operator"],
                       help="run only this benchmark (repeatable)")
    bench.set_defaults(handler=run_bench)

    release = commands.add_parser(
        "release", help="a release locally: check the versions, lint and package the chart, write the notes "
                        "(--dry-run, what the release workflow does before pushing), or set a new version (--bump)")
    release_command.add_arguments(release)
    release.set_defaults(handler=release_command.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
