"""kubectl tweetbot: look at TweetBots, wait for them, read their stages' logs and samples, download their
models and write with them. Installed as `kubectl-tweetbot` on PATH, which makes it a kubectl plugin.

Every verb reads the bot through the Kubernetes API with your kubeconfig (`--kubeconfig`, `--context`,
`-n/--namespace` as kubectl takes them), and S3 with the AWS credential chain (AWS_ACCESS_KEY_ID, a profile,
an instance role; `--s3-endpoint` or AWS_ENDPOINT_URL for a store other than AWS). Your credentials go only
where you point them: a bot's own S3 endpoint is used once you name it with --s3-endpoint, and a model on
another Hub than yours (HF_ENDPOINT, else huggingface.co) is read without your HF_TOKEN. It prints no secret.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from tweetbot_trainer.contract import BOT_LABEL, GROUP, STAGES

from .botview import (
    CARD_FILE,
    DEFAULT_MAX_BYTES,
    EXIT_CODES_HELP,
    HUB,
    MANIFEST_BYTES,
    MANIFEST_FILE,
    MODEL_TIMEOUT,
    SAMPLES_BYTES,
    SAMPLES_FILE,
    SAMPLES_TIMEOUT,
    SOURCES,
    Exit,
    ModelLocation,
    ModelSource,
    Refusal,
    download_plan,
    for_output,
    hub_download_bytes,
    logs_target,
    model_location,
    model_source,
    no_pods_message,
    one_line,
    parse_duration,
    pods_to_show,
    prefixed,
    rerun_patch,
    rerun_value,
    s3_endpoint,
    sample_lines,
    still_waiting,
    table,
    wait_verdict,
)
from .names import PLURAL, RERUN_ANNOTATION, VERSION

IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
WATCH_SECONDS = 300  # one watch request at most: the API server ends watches after 30-60 minutes anyway
PAGE_SIZE = 100
REQUEST_TIMEOUT = 30
MERGE_PATCH = "application/merge-patch+json"


def _kubernetes():
    try:
        import kubernetes  # noqa: F401
    except ImportError:
        raise Refusal("kubectl tweetbot needs the Kubernetes client: pip install 'tweetbot[kubectl]'") from None
    from kubernetes import client, config, watch

    return client, config, watch


class Cluster:
    """The API clients of one kubeconfig context (or of the pod it runs in) and the namespace to use."""

    def __init__(self, args: argparse.Namespace):
        client, config, _ = _kubernetes()
        try:
            contexts, active = config.list_kube_config_contexts(config_file=args.kubeconfig)
            context = next((c for c in contexts if c["name"] == args.context), None) if args.context else active
            if context is None:
                raise Refusal(f"no context {args.context!r} in the kubeconfig")
            self.api = config.new_client_from_config(config_file=args.kubeconfig, context=args.context)
            default_namespace = (context.get("context") or {}).get("namespace") or "default"
        except config.ConfigException as error:
            if args.kubeconfig or args.context or not IN_CLUSTER_NAMESPACE.exists():
                raise Refusal(f"no usable kubeconfig: {error}") from None
            config.load_incluster_config()
            self.api = client.ApiClient()
            default_namespace = IN_CLUSTER_NAMESPACE.read_text().strip()
        self.namespace = args.namespace or default_namespace
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)

    def bot(self, name: str) -> dict:
        from kubernetes.client.rest import ApiException

        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name,
                                                            _request_timeout=REQUEST_TIMEOUT)
        except ApiException as error:
            if error.status == 404:
                raise Refusal(f"tweetbot {name!r} not found in namespace {self.namespace!r}") from None
            raise

    def bots(self, all_namespaces: bool) -> list[dict]:
        """Every bot of the namespace (or of all), read a page at a time."""
        items, token = [], None
        while True:
            if all_namespaces:
                page = self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, limit=PAGE_SIZE, _continue=token,
                                                              _request_timeout=REQUEST_TIMEOUT)
            else:
                page = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, limit=PAGE_SIZE,
                                                                 _continue=token, _request_timeout=REQUEST_TIMEOUT)
            items += page["items"]
            token = page["metadata"].get("continue")
            if not token:
                return items

    def plain(self, model) -> dict:
        return self.api.sanitize_for_serialization(model)


# --- verbs -------------------------------------------------------------------------------------------------


def run_get(args: argparse.Namespace) -> int:
    cluster = Cluster(args)
    if args.bot and args.all_namespaces:
        raise Refusal("a bot cannot be named across all namespaces: leave out -A or the name")
    bots = [cluster.bot(args.bot)] if args.bot else cluster.bots(args.all_namespaces)
    if args.output == "json":
        print(json.dumps(for_output(bots, single=bool(args.bot)), indent=2))
    elif args.output == "yaml":
        import yaml

        print(yaml.safe_dump(for_output(bots, single=bool(args.bot)), sort_keys=False), end="")
    elif not bots:
        where = "any namespace" if args.all_namespaces else f"namespace {cluster.namespace}"
        print(f"No TweetBots found in {where}.", file=sys.stderr)
    else:
        print(table(bots, datetime.now(timezone.utc), args.all_namespaces), end="")
    return Exit.OK


def run_wait(args: argparse.Namespace) -> int:
    """Read the bot, then watch it from that resourceVersion until a verdict; a watch that expired (410) or
    ended is followed by a fresh read, so no change is missed between two watches."""
    from kubernetes.client.rest import ApiException

    _, _, watch = _kubernetes()
    cluster = Cluster(args)
    try:
        timeout = parse_duration(args.timeout)
    except ValueError as error:
        raise Refusal(str(error), Exit.USAGE) from None
    deadline = time.monotonic() + timeout
    bot = cluster.bot(args.bot)
    while True:
        verdict = wait_verdict(bot)
        if verdict is not None:
            print(verdict.message, file=sys.stdout if verdict.code == Exit.OK else sys.stderr)
            return verdict.code
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            print(f"timed out after {args.timeout} waiting for tweetbot {args.bot}: {still_waiting(bot)}", file=sys.stderr)
            return Exit.TIMEOUT
        seconds = max(1, int(min(remaining, WATCH_SECONDS)))
        watcher = watch.Watch()
        try:
            for event in watcher.stream(cluster.custom.list_namespaced_custom_object, GROUP, VERSION, cluster.namespace,
                                        PLURAL, field_selector=f"metadata.name={args.bot}",
                                        resource_version=bot["metadata"]["resourceVersion"], timeout_seconds=seconds,
                                        _request_timeout=seconds + REQUEST_TIMEOUT):
                if event["type"] == "DELETED":
                    raise Refusal(f"tweetbot {args.bot!r} was deleted while waiting")
                if event["type"] in ("ADDED", "MODIFIED"):
                    bot = event["raw_object"]
                    if wait_verdict(bot) is not None or time.monotonic() >= deadline:
                        break
        except ApiException as error:
            if error.status != 410:  # 410: the resourceVersion is too old to watch from; read the bot again
                raise
            bot = cluster.bot(args.bot)
        finally:
            watcher.stop()
        if wait_verdict(bot) is None and time.monotonic() < deadline:
            bot = cluster.bot(args.bot)


def run_rerun(args: argparse.Namespace) -> int:
    cluster = Cluster(args)
    current = ((cluster.bot(args.bot)["metadata"].get("annotations") or {}).get(RERUN_ANNOTATION) or "")
    value = rerun_value(datetime.now(timezone.utc), current)
    cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, args.bot, rerun_patch(value),
                                                  _content_type=MERGE_PATCH, _request_timeout=REQUEST_TIMEOUT)
    print(value)
    return Exit.OK


def run_logs(args: argparse.Namespace) -> int:
    from kubernetes.client.rest import ApiException

    cluster = Cluster(args)
    bot = cluster.bot(args.bot)
    target = logs_target(bot, args.stage)
    try:
        job = cluster.plain(cluster.batch.read_namespaced_job(target.job, cluster.namespace, _request_timeout=REQUEST_TIMEOUT))
    except ApiException as error:
        if error.status != 404:
            raise
        job = None
    pods = []
    if job is not None:
        # By the Job's uid: a gang restarted under the same name leaves no pod of its predecessor in the way.
        selector = f"batch.kubernetes.io/controller-uid={job['metadata']['uid']},{BOT_LABEL}={target.bot}"
        pods = [cluster.plain(pod) for pod in
                cluster.core.list_namespaced_pod(cluster.namespace, label_selector=selector, _request_timeout=REQUEST_TIMEOUT).items]
    chosen = pods_to_show(pods, args.all_pods)
    if not chosen:
        raise Refusal(no_pods_message(bot, target, job), Exit.UNAVAILABLE)
    prefix = args.all_pods
    if args.follow and len(chosen) > 1:
        return _follow_all(cluster, target.stage, chosen)
    for index, pod in chosen:
        _print_log(cluster, pod, target.stage, index if prefix else None, args.follow)
    return Exit.OK


_print_lock = threading.Lock()


def _print_log(cluster: Cluster, pod: dict, container: str, index: int | None, follow: bool) -> None:
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import HTTPError

    name = pod["metadata"]["name"]
    try:
        response = cluster.core.read_namespaced_pod_log(name, cluster.namespace, container=container, follow=follow,
                                                        _preload_content=False,
                                                        _request_timeout=None if follow else REQUEST_TIMEOUT)
    except ApiException as error:
        raise Refusal(f"the log of pod {name} cannot be read: {_api_message(error)}", Exit.UNAVAILABLE) from None
    except HTTPError as error:
        raise Refusal(f"the log of pod {name} cannot be read: {_http_reason(error)}") from None
    pending = b""
    try:
        for chunk in response.stream(64 * 1024):
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            _write_lines(lines, index)
        if pending:
            _write_lines([pending], index)
    except HTTPError as error:  # the connection reset, or the API server went away, mid-log
        raise Refusal(f"the log of pod {name} broke off: {_http_reason(error)}") from None
    finally:
        response.release_conn()


def _http_reason(error) -> str:
    """urllib3's own words: a ProtocolError's str is the tuple of its message and the exception under it."""
    return error.args[0] if error.args and isinstance(error.args[0], str) else str(error) or type(error).__name__


def _write_lines(lines: list[bytes], index: int | None) -> None:
    with _print_lock:
        for line in lines:
            text = line.decode(errors="replace")
            sys.stdout.write((prefixed(index, text) if index is not None else text) + "\n")
        sys.stdout.flush()


def _follow_all(cluster: Cluster, container: str, chosen: list[tuple[int, dict]]) -> int:
    """Every pod's log at once, each line prefixed with its pod's index, until all have ended; each pod that
    failed told in one line, and the exit code of the first (by index)."""
    failures: dict[int, Refusal] = {}

    def follow(index: int, pod: dict) -> None:
        try:
            _print_log(cluster, pod, container, index, follow=True)
        except Refusal as refusal:
            failures[index] = refusal
        except Exception as error:  # a thread's exception reaches only threading.excepthook: the command would end 0
            failures[index] = Refusal(one_line(f"following the log of pod {pod['metadata']['name']} failed: "
                                               f"{type(error).__name__}: {error}"))

    threads = [threading.Thread(target=follow, args=item, daemon=True) for item in chosen]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in sorted(failures):
        print(f"error: {failures[index]}", file=sys.stderr)
    return failures[min(failures)].code if failures else Exit.OK


# --- S3 ------------------------------------------------------------------------------------------------------

CHUNK_BYTES = 1024 * 1024  # what a transfer holds in memory at a time, and how far past a bound it reads


def _storage(location: ModelLocation, endpoint_flag: str | None):
    """The trainer's S3 reader (each read in a thread of its own, given up at its deadline), with the user's
    AWS chain and an endpoint the user chose."""
    endpoint = s3_endpoint(endpoint_flag, os.environ, location)
    try:
        from tweetbot_trainer.storage import Storage
    except ImportError:
        raise Refusal("reading S3 needs boto3: pip install 'tweetbot[kubectl]'") from None
    return Storage(endpoint or "", location.region)


class _Deadline:
    """--timeout: when every transfer of the command has to have ended."""

    def __init__(self, seconds: float):
        self.seconds, self.at = seconds, time.monotonic() + seconds

    def left(self, uri: str) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise self.passed(uri)
        return left

    def passed(self, uri: str) -> Refusal:
        return Refusal(f"reading {uri} did not end within --timeout ({self.seconds:g}s)", Exit.TIMEOUT)


def _copy(storage, uri: str, out, limit: int, deadline: _Deadline, missing: str, too_large: str) -> int:
    """The object's bytes into `out` as they arrive, given up once more than `limit` have (a manifest's size
    or a Content-Length is only a claim) or at the deadline; the bytes written."""
    from botocore.exceptions import BotoCoreError, ClientError

    from tweetbot_trainer.errors import NetworkFailure
    from tweetbot_trainer.storage import s3_error_code

    received = 0
    try:
        chunks = storage.stream(uri, CHUNK_BYTES, seconds=deadline.left(uri))
        try:
            for chunk in chunks:
                received += len(chunk)
                if received > limit:
                    raise Refusal(too_large)
                out.write(chunk)
        finally:
            chunks.close()  # the reading thread hangs up at its next chunk
    except FileNotFoundError:
        raise Refusal(missing, Exit.UNAVAILABLE) from None
    except PermissionError:
        raise Refusal(f"reading {uri} failed: AccessDenied") from None
    except NetworkFailure as failure:
        if time.monotonic() >= deadline.at:
            raise deadline.passed(uri) from None
        raise Refusal(str(failure)) from None
    except (ClientError, BotoCoreError) as error:
        raise Refusal(f"reading {uri} failed: {s3_error_code(error)}") from None
    return received


def _read_object(storage, uri: str, limit: int, deadline: _Deadline, missing: str) -> bytes:
    out = io.BytesIO()
    _copy(storage, uri, out, limit, deadline, missing, f"{uri} is more than {limit:,} bytes")
    return out.getvalue()


def run_samples(args: argparse.Namespace) -> int:
    cluster = Cluster(args)
    location = model_location(cluster.bot(args.bot))
    storage = _storage(location, args.s3_endpoint)
    payload = _read_object(storage, location.uri + SAMPLES_FILE, SAMPLES_BYTES, _Deadline(args.timeout),
                           f"no samples at {location.uri}{SAMPLES_FILE}: the train stage writes them with the final model")
    for line in sample_lines(payload):
        print(line)
    return Exit.OK


def download_model(location: ModelLocation, directory: Path, endpoint_flag: str | None, max_bytes: int,
                   force: bool = False, timeout: float = parse_duration(MODEL_TIMEOUT)) -> dict[str, int]:
    """The model's files (its manifest's, and the model card if there is one) into `directory`: first into a new
    directory of our own beside it, then renamed, so `directory` holds a complete model or nothing new, and
    nothing else beside it is touched. Each file ends at its manifest's size, the whole at `timeout` seconds."""
    occupied = directory.is_symlink() or (directory.exists() and (not directory.is_dir() or any(directory.iterdir())))
    if occupied and not force:
        raise Refusal(f"{directory} is not an empty directory (--force replaces it)")
    deadline = _Deadline(timeout)
    storage = _storage(location, endpoint_flag)
    manifest = _read_object(storage, location.uri + MANIFEST_FILE, MANIFEST_BYTES, deadline,
                            f"no complete model at {location.uri} (no {MANIFEST_FILE}: the train stage writes it last)")
    plan = download_plan(manifest, max_bytes)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Beside `directory`, so the rename stays on one filesystem; mkdtemp's 0700 becomes what mkdir would make.
    partial = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        partial.chmod(0o777 & ~_umask())
        for name, size in plan.items():
            target = partial / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as out:
                received = _copy(storage, location.uri + name, out, size, deadline,
                                 f"{location.uri}{name} is missing, though {MANIFEST_FILE} names it",
                                 f"{location.uri}{name} sent more than the {size:,} bytes its manifest says")
            if received != size:
                raise Refusal(f"{location.uri}{name} is {received:,} bytes, its manifest says {size:,}")
        try:  # the card, beside the model once published
            card = _read_object(storage, location.uri + CARD_FILE, MANIFEST_BYTES, deadline, "")
            (partial / CARD_FILE).write_bytes(card)
        except Refusal as refusal:
            if refusal.code != Exit.UNAVAILABLE:
                raise
        (partial / MANIFEST_FILE).write_bytes(manifest)
        _put_in_place(partial, directory)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return plan


def _put_in_place(partial: Path, directory: Path) -> None:
    """`partial` renamed to `directory`; what --force replaces is first moved into a directory of our own, put
    back if the rename fails, and deleted once the new one is in place."""
    replaced = None
    if directory.exists() or directory.is_symlink():
        replaced = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.replaced."))
        directory.rename(replaced / directory.name)
    try:
        partial.rename(directory)
    except BaseException:
        if replaced is not None:
            (replaced / directory.name).rename(directory)
            replaced.rmdir()
        raise
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def run_download(args: argparse.Namespace) -> int:
    cluster = Cluster(args)
    location = model_location(cluster.bot(args.bot))
    directory = Path(args.directory)
    plan = download_model(location, directory, args.s3_endpoint, args.max_bytes, args.force, args.timeout)
    print(f"{len(plan)} files, {sum(plan.values()):,} bytes of {location.uri} in {directory}")
    return Exit.OK


def run_generate(args: argparse.Namespace) -> int:
    cluster = Cluster(args)
    bot = cluster.bot(args.bot)
    source = model_source(bot, args.source, os.environ)
    # stdout carries the posts alone: what the libraries print while they load (DeepSpeed's accelerator warning,
    # whose handler keeps the stream it was created with) goes to stderr.
    with tempfile.TemporaryDirectory(prefix="kubectl-tweetbot-") as scratch, contextlib.redirect_stdout(sys.stderr):
        try:
            from transformers import pipeline, set_seed
        except ImportError:
            raise Refusal("generate needs transformers and torch: pip install 'tweetbot[trainer]'") from None
        if source.kind == "s3":
            model = Path(scratch) / "model"
            download_model(model_location(bot), model, args.s3_endpoint, args.max_bytes, timeout=args.timeout)
            model = str(model)
        else:
            model = _hub_snapshot(source, Path(scratch), args.max_bytes, args.timeout)
        if args.seed is not None:
            set_seed(args.seed)
        generator = pipeline("text-generation", model=model)
        outputs = generator(args.prompt, max_new_tokens=args.max_new_tokens, num_return_sequences=args.num, do_sample=True)
    for output in outputs:
        print(one_line(output["generated_text"]))
    return Exit.OK


def _hub_snapshot(source: ModelSource, scratch: Path, max_bytes: int, timeout: float) -> str:
    """The repo's files from the Hub its hubUrl names, once the sizes the Hub gives for them are within
    `max_bytes`, all within `timeout` seconds. Your token (HF_TOKEN or a saved login) goes only to your Hub; from
    another the files are read anonymously into `scratch`, not into your cache, whose entries are by repo id
    alone (a same-named repo on your Hub would be served from them).

    The download runs in a process of its own, killed at the deadline: huggingface_hub downloads in a thread
    pool that Python joins at exit, so a download given up in a thread would keep the command running until it
    ended, and writing into `scratch` while that is deleted."""
    if source.anonymous:
        print(f"note: {source.endpoint} is not your Hub (HF_ENDPOINT, else {HUB}): reading {source.where} from it "
              "anonymously, without your HF_TOKEN", file=sys.stderr)
    uri = f"{source.endpoint}/{source.where}"
    deadline = _Deadline(timeout)
    cache = scratch / "hub" if source.anonymous else None
    context = multiprocessing.get_context("spawn")  # a fork would copy the locks other threads (torch's) hold
    answers, answer = context.Pipe(duplex=False)
    child = context.Process(target=_fetch_hub_repo, args=(source, cache, max_bytes, answer), daemon=True)
    child.start()
    answer.close()  # the child's end: once the child is gone, recv() ends in EOFError rather than waiting
    path = None
    try:
        if not answers.poll(max(0.0, deadline.at - time.monotonic())):
            raise deadline.passed(uri)
        path, message, code = answers.recv()
    except EOFError:
        raise Refusal(f"reading {uri} failed: its download ended without an answer (exit code {child.exitcode})") from None
    finally:
        child.kill()  # once it answered, it is ending anyway; at the deadline, mid-download
        child.join()
        answers.close()
        if path is None and cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
    if path is None:
        raise Refusal(message, code)
    return path


def _fetch_hub_repo(source: ModelSource, cache: Path | None, max_bytes: int, answer) -> None:
    """The download's process: (the snapshot's path, "", OK) or (None, a refusal's message, its code) to `answer`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to answer: it kills this process
    sys.stdout = sys.stderr  # stdout carries the posts alone
    try:
        answer.send((_download_hub_repo(source, cache, max_bytes), "", Exit.OK))
    except Refusal as refusal:
        answer.send((None, str(refusal), refusal.code))
    except Exception as error:  # the parent prints one line, not this process's traceback
        answer.send((None, one_line(f"reading {source.where} from {source.endpoint} failed: "
                                    f"{type(error).__name__}: {error}"), Exit.ERROR))
    finally:
        answer.close()


def _download_hub_repo(source: ModelSource, cache: Path | None, max_bytes: int) -> str:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    token = False if source.anonymous else None  # None: HF_TOKEN, else the saved login
    try:
        info = HfApi(endpoint=source.endpoint).model_info(source.where, files_metadata=True, token=token)
        sizes = None if info.siblings is None else {
            sibling.rfilename: sibling.lfs.size if sibling.lfs is not None else sibling.size for sibling in info.siblings}
        hub_download_bytes(f"{source.endpoint}/{source.where}", sizes, max_bytes)
        # The commit whose sizes were read: one published in between would not be what was bounded.
        return snapshot_download(source.where, revision=info.sha, endpoint=source.endpoint, token=token,
                                 cache_dir=cache)
    except RepositoryNotFoundError:
        raise Refusal(f"{source.endpoint} has no repository {source.where}"
                      + (" that it shows without a token" if source.anonymous else ""), Exit.UNAVAILABLE) from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else type(error).__name__
        raise Refusal(f"reading {source.where} from {source.endpoint} failed: {status}") from None


# --- the command line ----------------------------------------------------------------------------------------


def _api_message(error) -> str:
    """The API server's message from a refusal's Status body, else its reason, as `one_line` shows them (a
    message can quote what a tenant wrote)."""
    try:
        message = json.loads(error.body).get("message") or error.reason
    except (TypeError, ValueError, AttributeError):
        message = f"{error.status} {error.reason}"
    return one_line(str(message))


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _byte_count(text: str) -> int:
    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
    number = text.rstrip("KkMmGgi")
    unit = text[len(number):].lower()
    if unit not in units or not number.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 500Mi, 20Gi)")
    return int(number) * units[unit]


def build_parser() -> argparse.ArgumentParser:
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument("-n", "--namespace", help="the bot's namespace (default: the kubeconfig context's)")
    connection.add_argument("--kubeconfig", help="the kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    connection.add_argument("--context", help="the kubeconfig context to use (default: the current one)")
    s3 = argparse.ArgumentParser(add_help=False)
    s3.add_argument("--s3-endpoint", help="the S3 endpoint to read the model from (default: $AWS_ENDPOINT_URL, else AWS); "
                                          "credentials: the AWS chain. A bot whose spec.output.s3.endpoint names another "
                                          "store is refused until you name that endpoint here")
    s3.add_argument("--max-bytes", type=_byte_count, default=DEFAULT_MAX_BYTES,
                    help="refuse a model larger than this, by its manifest's sizes (from the Hub: the sizes the Hub "
                         f"gives for the repo's files), before downloading it (default {DEFAULT_MAX_BYTES // 2**30}Gi)")

    parser = argparse.ArgumentParser(prog="kubectl tweetbot", description=__doc__, epilog=EXIT_CODES_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, handler, summary: str, parents=(connection,)):
        sub = verbs.add_parser(name, parents=list(parents), help=summary, description=f"kubectl tweetbot {name}: {summary}",
                               epilog=EXIT_CODES_HELP)
        sub.set_defaults(handler=handler)
        return sub

    def transfer_timeout(sub, default: str, transfer: str = "the S3 transfer"):
        sub.add_argument("--timeout", type=_duration, default=default,
                         help=f"give up (exit 5) when {transfer} has not ended by then (90s, 30m, 1h; default {default})")

    get = verb("get", run_get, "list bots (or one) with phase, progress, ETA, loss, Hub URL and age")
    get.add_argument("bot", nargs="?", help="one bot's name (default: every bot of the namespace)")
    get.add_argument("-A", "--all-namespaces", action="store_true", help="bots of every namespace")
    get.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")

    wait = verb("wait", run_wait, "wait until the bot succeeded; exit 3 if it failed, 4 if it stalled, 5 on timeout")
    wait.add_argument("bot")
    wait.add_argument("--timeout", default="30m", help="how long to wait (30m, 1h30m, 90s; default 30m)")

    logs = verb("logs", run_logs, "print the log of a stage's pod of the current run")
    logs.add_argument("bot")
    logs.add_argument("--stage", choices=STAGES, help="default: the stage that runs, else the last that ran")
    logs.add_argument("-f", "--follow", action="store_true", help="follow the log until the pod ends")
    logs.add_argument("--all-pods", action="store_true",
                      help="every pod of a multi-node train stage, each line prefixed with [pod index] (default: pod 0)")

    samples = verb("samples", run_samples, "print the samples the train stage generated, one a line", (connection, s3))
    samples.add_argument("bot")
    transfer_timeout(samples, SAMPLES_TIMEOUT)

    generate = verb("generate", run_generate, "write posts with the bot's model, here, with transformers",
                    (connection, s3))
    generate.add_argument("bot")
    generate.add_argument("prompt", nargs="?", default="My dream is")
    generate.add_argument("--max-new-tokens", type=int, default=60)
    generate.add_argument("--num", type=int, default=3, help="how many posts (default 3)")
    generate.add_argument("--from", dest="source", choices=SOURCES,
                          help="the model in S3 (status.artifacts.modelUri, the default) or on the Hub "
                               "(status.artifacts.hubUrl, from the host it names; HF_TOKEN is sent only if that is "
                               f"your Hub, HF_ENDPOINT or else {HUB}: from another the model is read anonymously)")
    generate.add_argument("--seed", type=int, help="a seed, for the same posts each time")
    transfer_timeout(generate, MODEL_TIMEOUT, "the model's download, from S3 or the Hub,")

    rerun = verb("rerun", run_rerun, f"train again on the same spec: set {RERUN_ANNOTATION} to the UTC time")
    rerun.add_argument("bot")

    download = verb("download", run_download, "download the bot's final model from S3 into a directory", (connection, s3))
    download.add_argument("bot")
    download.add_argument("directory")
    download.add_argument("--force", action="store_true", help="replace a directory that is not empty")
    transfer_timeout(download, MODEL_TIMEOUT)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from kubernetes.client.rest import ApiException
    except ImportError:
        ApiException = ()  # noqa: N806 (Cluster says what to install)
    try:
        return int(args.handler(args))
    except Refusal as refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return int(refusal.code)
    except ApiException as error:
        print(f"error: the API server refused ({error.status}): {_api_message(error)}", file=sys.stderr)
        return int(Exit.ERROR)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
