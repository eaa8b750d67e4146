"""`tweetbot-trainer scrape|...`: what the stage Jobs run, and usable by hand outside Kubernetes.

In a Job the operator's request arrives in TWEETBOT_REQUEST and the result leaves as the container's
termination message. By hand, flags describe the same request and the result is printed. With
--nproc-per-node N (a pod's N GPUs), the command starts the N ranks of the stage itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from .contract import (MODEL_CACHE_PATH, REQUEST_ENV, TERMINATION_MESSAGE_PATH, ContractError, S3Layout, StageRequest,
                       StageResult, section_defaults)
from .errors import ContractMismatch, StageError, redact_urls
from .hub import use_model_cache

log = logging.getLogger("tweetbot.trainer")

# --source's choices -> spec.source; what a flag leaves out, section_defaults("source", ...) fills in.
SOURCES = {
    "x": lambda a: {"x": {"apiUrl": a.api_url} if a.api_url else {}},
    "x-archive": lambda a: {"xArchive": {"uri": a.archive}},
    "mastodon": lambda a: {"mastodon": {"instanceUrl": a.instance_url}},
    "bluesky": lambda a: {"bluesky": {"appViewUrl": a.api_url} if a.api_url else {}},
    "file": lambda a: {"file": {"uri": a.archive}},
}


def request_from_flags(args: argparse.Namespace) -> StageRequest:
    out = urlsplit(args.out)
    if out.scheme != "s3" or not out.netloc:
        raise ContractMismatch(f"--out must be s3://bucket/prefix/, got {args.out!r}")
    source = section_defaults("source", {**SOURCES[args.source](args), "maxPostsPerHandle": args.max_posts})
    return StageRequest(
        stage=args.stage,
        run_id="manual",
        namespace="",
        bot="",
        handles=[h.strip().lstrip("@").lower() for h in args.handles.split(",") if h.strip()],
        s3=S3Layout(bucket=out.netloc, prefix=out.path.strip("/"), namespace="", bot="", run_id="",
                    endpoint=os.environ.get("AWS_ENDPOINT_URL", "")),
        source=source,
        data={"balanceHandles": args.balance},
        training={"seed": args.seed},
    )


def run_stage(request: StageRequest) -> StageResult:
    from .storage import Storage

    storage = Storage(request.s3.endpoint, request.s3.region)
    if request.stage == "scrape":
        from .scrape import run_scrape

        return run_scrape(request, storage)
    if request.stage == "train":
        # Before train imports transformers, and with it huggingface_hub, which reads its cache's place once. The
        # operator mounts the cache here (tests move it).
        use_model_cache(Path(os.environ.get("TWEETBOT_MODEL_CACHE_PATH", MODEL_CACHE_PATH)), os.environ)
        from .train import run_train

        return run_train(request, storage)
    if request.stage == "publish":
        from .publish import run_publish

        return run_publish(request, storage)
    raise ContractMismatch(f"unknown stage {request.stage}")


MAX_ERROR_CHARACTERS = 1000


def termination_message(result: StageResult) -> str:
    """The result as a termination message, made to fit the kubelet's limit rather than lost: display names
    (text the scraped people chose) give way first, then the error's tail. Counts and artifacts always stay."""
    try:
        return result.to_termination_message()
    except ContractError:
        pass
    result = replace(result, data=[replace(stats, displayName="") for stats in result.data],
                     error=result.error[:MAX_ERROR_CHARACTERS])
    while True:
        try:
            return result.to_termination_message()
        except ContractError:
            if not result.error:
                raise  # counts and artifacts alone too big: a bug, named with its size
            # Halving: one character can take 12 bytes of JSON (an emoji as two \u escapes).
            result = replace(result, error=result.error[: len(result.error) // 2])


# Set by `launch_ranks` for its ranks: the directory where each writes its termination message, named by its rank.
RANK_MESSAGES_ENV = "TWEETBOT_RANK_MESSAGES"


def write_termination_message(result: StageResult) -> None:
    rank = os.environ.get("RANK", "0")
    if RANK_MESSAGES_ENV in os.environ:
        path = str(Path(os.environ[RANK_MESSAGES_ENV]) / rank)
    elif rank != "0":
        return  # under a plain torchrun, rank 0's message is the stage's
    else:
        # The kubelet reads the pod's terminationMessagePath; the local node agent and tests may move it.
        path = os.environ.get("TWEETBOT_TERMINATION_MESSAGE_PATH", TERMINATION_MESSAGE_PATH)
    try:
        with open(path, "w") as file:
            file.write(termination_message(result))
    except OSError:
        pass  # not in a container: the printed result is the output


def pods() -> int:
    """The pods of the training (spec.resources.nodes)."""
    return int(os.environ.get("PET_NNODES", "1"))


def launch_ranks(argv: list[str], processes: int) -> int:
    """`processes` ranks of `tweetbot-trainer <argv>` under torch.distributed.run, as `torchrun --standalone` starts
    them, but with the pod's exit code and termination message those of one rank: torchrun itself exits 1 whatever
    a rank's typed exit code, and every rank would write the message. Each rank writes its message to a file of
    its own instead; `pod_outcome` chooses."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    messages = Path(tempfile.mkdtemp(prefix="tweetbot-rank-messages-"))
    os.environ[RANK_MESSAGES_ENV] = str(messages)
    exit_codes: dict[int, int] = {}
    # One pod: a rendezvous of its own. Several: torch.distributed.run reads the rest from the PET_ variables the
    # operator sets (nodes, rendezvous endpoint and id), as Kubeflow Trainer's pods have them.
    alone = ["--standalone"] if pods() == 1 else []
    try:
        run(parse_args([*alone, f"--nproc-per-node={processes}", "-m", "tweetbot_trainer.cli", *argv]))
    except ChildFailedError as failed:
        first = sorted(failed.failures.items(), key=lambda item: (item[1].timestamp, item[0]))
        exit_codes = {rank: failure.exitcode for rank, failure in first}
    message, code = pod_outcome(messages, exit_codes)
    shutil.rmtree(messages, ignore_errors=True)
    if message is not None:
        path = os.environ.get("TWEETBOT_TERMINATION_MESSAGE_PATH", TERMINATION_MESSAGE_PATH)
        try:
            Path(path).write_text(message)
        except OSError:
            pass  # not in a container
    return code


def pod_outcome(messages: Path, exit_codes: dict[int, int]) -> tuple[str | None, int]:
    """The termination message and exit code of the pod from its ranks': rank 0's, unless the launcher stopped it
    (a signal) when another rank failed first, then the first failed rank's that wrote a message and exited.
    `exit_codes`: the failed ranks' codes, first failure first (negative: killed by that signal)."""
    written = {int(path.name): path.read_text() for path in messages.iterdir()}
    order = [0, *exit_codes]
    rank = next((rank for rank in order if rank in written and exit_codes.get(rank, 0) >= 0),
                next((rank for rank in order if rank in written), None))
    code = exit_codes.get(rank, 0) if rank is not None else next(iter(exit_codes.values()), 0)
    return written.get(rank), code if code >= 0 else 128 - code  # a signal's number as a shell reports it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tweetbot-trainer", description=__doc__)
    parser.add_argument("stage", choices=("scrape", "train", "publish"))
    parser.add_argument("--source", choices=sorted(SOURCES), help="by hand: where the posts come from")
    parser.add_argument("--handles", default="", help="by hand: comma-separated handles")
    parser.add_argument("--archive", help="by hand: s3:// or https:// URI of tweets.js ({handle} is replaced) or of a posts file")
    parser.add_argument("--api-url", help="by hand: X API or Bluesky AppView base URL")
    parser.add_argument("--instance-url", help="by hand: Mastodon instance URL")
    parser.add_argument("--out", help="by hand: s3://bucket/prefix/ to write to")
    parser.add_argument("--max-posts", type=int, default=section_defaults("source", {})["maxPostsPerHandle"])
    parser.add_argument("--balance", action="store_true", help="oversample smaller handles to the largest one's size")
    parser.add_argument("--seed", type=int, default=section_defaults("training", None)["seed"])
    parser.add_argument("--nproc-per-node", type=int, default=1,
                        help="train: ranks to start, one per GPU (what torchrun's flag of this name does)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    in_job = REQUEST_ENV in os.environ
    try:
        if in_job:
            try:
                request = StageRequest.from_json(os.environ[REQUEST_ENV])
            except ContractError as error:
                raise ContractMismatch(str(error)) from None
            if request.stage != args.stage:
                raise ContractMismatch(f"the request is for the {request.stage} stage, not {args.stage}")
        else:
            if not (args.source and args.handles and args.out):
                parser.error("by hand, --source, --handles and --out are required")
            request = request_from_flags(args)
        if (args.nproc_per_node > 1 or pods() > 1) and "RANK" not in os.environ:  # a rank itself runs the stage
            return launch_ranks(argv, args.nproc_per_node)
        result = run_stage(request)
    except StageError as error:
        log.error("%s: %s", error.reason, error.message)
        if in_job:
            write_termination_message(StageResult(stage=args.stage, run_id="", ok=False,
                                                  error=redact_urls(f"{error.reason}: {error.message}")))
        return error.exit_code
    except Exception as error:  # a bug or an S3 failure beyond its retries: still tell the operator why
        log.exception("the %s stage failed", args.stage)
        if in_job:
            detail = redact_urls(f"{type(error).__name__}: {error}")  # a library's message may carry a signed URL
            write_termination_message(StageResult(stage=args.stage, run_id="", ok=False, error=detail[:MAX_ERROR_CHARACTERS]))
        return 1
    if in_job:
        write_termination_message(result)
    print(json.dumps({"stage": result.stage, "data": [vars(s) for s in result.data],
                      "metrics": result.metrics, "artifacts": result.artifacts}, indent=1))
    return 0


def main_and_exit() -> None:
    """The command: `main`, then the process ends at once. By then the stage's outputs are in S3 and its result in
    the termination message; what the interpreter's teardown would still do with torch loaded (collecting every
    module, joining OpenMP and process-group threads) took 1.8 s of a train pod's wall time (`tweetbot bench`)."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main_and_exit()
