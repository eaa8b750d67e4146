"""The operator at scale: N TweetBots applied at once on the real control plane, stage pods finished at once
by kwok, against a plain script that creates the same Jobs with the same client (the API server's floor).

Both sides are timed the same way: from the moment a create request (of a TweetBot, or of the Job itself)
is sent to the moment a watch sees the bot's first Job. The API requests each side makes come from the
API server's own audit log, filtered to the side's ServiceAccount.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from kubernetes import client, config, watch

from tweetbot_operator.spec import SECRET_OPT_IN_LABEL, run_id_for
from tweetbot_operator.stages import desired_job
from tweetbot_operator.settings import Settings
from tweetbot_trainer.contract import BOT_LABEL, GROUP

from .cluster import fake_node, service_account_kubeconfig
from .demo import REPO
from .devenv import DevEnvironment
from .operator_process import OperatorProcess
from .polling import wait_for

VERSION, PLURAL = "v1alpha1", "tweetbots"
OPT_IN = {SECRET_OPT_IN_LABEL: "true"}
NAMESPACE = "bench"
OPERATOR_ACCOUNT, BASELINE_ACCOUNT = "tweetbot-operator", "baseline"
CLIENT_THREADS = 8  # both sides send their creates through this many threads

# Finish every stage pod at once with a result that says it worked, as a real stage would.
INSTANT_STAGE_PODS = """\
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: tweetbot-stage-instant
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'DoesNotExist'
    - key: '.status.phase'
      operator: 'In'
      values: ['Running']
    - key: '.metadata.labels["huggingtweets.dev/stage"]'
      operator: 'Exists'
  next:
    statusTemplate: |
      {{ $now := Now }}
      {{ $result := printf `{"ok":true,"run_id":"%s","stage":"%s","version":1}` (index .metadata.labels "huggingtweets.dev/run") (index .metadata.labels "huggingtweets.dev/stage") }}
      containerStatuses:
      {{ range .spec.containers }}
      - image: {{ .image | Quote }}
        name: {{ .name | Quote }}
        ready: false
        restartCount: 0
        started: false
        state:
          terminated:
            exitCode: 0
            finishedAt: {{ $now | Quote }}
            message: {{ $result | Quote }}
            reason: Completed
            startedAt: {{ $now | Quote }}
      {{ end }}
      phase: Succeeded
"""


def _audit_policy(path: Path) -> Path:
    users = [f"system:serviceaccount:{NAMESPACE}:{account}" for account in (OPERATOR_ACCOUNT, BASELINE_ACCOUNT)]
    path.write_text(yaml.safe_dump({
        "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
        "rules": [{"level": "Metadata", "users": users}, {"level": "None"}],
    }))
    return path


# The stock client limits of controller-manager and scheduler (20 and 50 requests/s) would make every run
# wait on them rather than on the operator: a 1,000-bot run means 3,000 Jobs and pods.
CLIENT_LIMITS = [{"name": component, "extraArgs": [{"key": "kube-api-qps", "value": "500"},
                                                    {"key": "kube-api-burst", "value": "1000"}]}
                 for component in ("kube-controller-manager", "kube-scheduler")]


def _nodes() -> list[dict]:
    """Room for every stage pod of 1,000 bots at once; kwok nodes cost nothing."""
    big = {"cpu": "2000", "memory": "64Ti", "pods": 2000}
    return [fake_node(f"kwok-cpu-{i}", **big) for i in range(4)] + [
        fake_node(f"kwok-gpu-{i}", gpus=500, **big) for i in range(4)]


def _bot(index: int) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "TweetBot",
        "metadata": {"name": f"bot-{index:04d}", "namespace": NAMESPACE},
        "spec": {
            "handles": [f"user{index}"],
            "source": {"x": {"bearerTokenSecretRef": {"name": "x-api"}}},
            "output": {"s3": {"bucket": "tweetbot-bench"}, "hub": {"tokenSecretRef": {"name": "hf-token"}}},
        },
    }


class Watcher:
    """Calls `on_event(object, monotonic time)` for every object a list-and-watch delivers, until closed."""

    def __init__(self, list_function, on_event, namespace: str = NAMESPACE, **kwargs):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._stream, args=(list_function, on_event, namespace), kwargs=kwargs,
                                        daemon=True)

    def __enter__(self):
        self._thread.start()
        time.sleep(0.5)  # the watch is open before the first create
        return self

    def __exit__(self, *_):
        self._stop.set()

    def _stream(self, list_function, on_event, namespace, **kwargs):
        resource_version = None
        while not self._stop.is_set():
            try:
                # Plain JSON, no model objects: the watcher shares the CPUs with what it measures.
                for event in watch.Watch().stream(list_function, namespace, timeout_seconds=30, deserialize=False,
                                                  resource_version=resource_version, **kwargs):
                    on_event(event["object"], time.monotonic())
                    resource_version = event["object"]["metadata"]["resourceVersion"]
                    if self._stop.is_set():
                        return
            except Exception:
                resource_version = None  # expired or broken: a fresh list-and-watch sees everything again


def first_jobs(api: client.ApiClient) -> tuple[Watcher, dict[str, float]]:
    """When each bot's first Job was seen."""
    seen: dict[str, float] = {}
    return Watcher(client.BatchV1Api(api).list_namespaced_job,
                   lambda job, at: seen.setdefault(job["metadata"]["labels"][BOT_LABEL], at), label_selector=BOT_LABEL), seen


def succeeded_bots(api: client.ApiClient) -> tuple[Watcher, dict[str, float]]:
    """When each bot was first seen Succeeded."""
    seen: dict[str, float] = {}
    custom = client.CustomObjectsApi(api)

    def on_bot(bot, at):
        if (bot.get("status") or {}).get("phase") == "Succeeded":
            seen.setdefault(bot["metadata"]["name"], at)

    return Watcher(lambda namespace, **kwargs: custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, **kwargs),
                   on_bot), seen


def _send_all(requests: list[tuple[str, callable]]) -> tuple[float, dict[str, float]]:
    """Send every request through CLIENT_THREADS threads at once; returns the start and when each was sent."""
    sent: dict[str, float] = {}

    def send(item):
        key, request = item
        sent[key] = time.monotonic()
        request()

    started = time.monotonic()
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        list(pool.map(send, requests))
    return started, sent


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _audit_requests(audit_log: Path, account: str, since_line: int) -> tuple[Counter, int]:
    """The requests the account made after `since_line` of the audit log, by verb and resource, and the
    log's new length."""
    user = f"system:serviceaccount:{NAMESPACE}:{account}"
    lines = audit_log.read_text().splitlines()
    requests = Counter()
    for line in lines[since_line:]:
        entry = json.loads(line)
        if entry["user"]["username"] == user:
            ref = entry.get("objectRef") or {}
            resource = ref.get("resource", "") + ("/" + ref["subresource"] if ref.get("subresource") else "")
            requests[f"{entry['verb']} {resource}"] += 1
    return requests, len(lines)


def _latencies(sent: dict[str, float], seen: dict[str, float]) -> dict:
    values = [seen[key] - sent[key] for key in sent]
    return {"p50_ms": round(statistics.median(values) * 1000, 1), "p99_ms": round(_percentile(values, 0.99) * 1000, 1)}


def _process_usage(pid: int) -> tuple[float, float]:
    """Peak RSS (MB) and CPU seconds of a live process."""
    status = Path(f"/proc/{pid}/status").read_text()
    peak_kb = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return peak_kb / 1024, cpu


def _cores_used(pids: dict[str, int]):
    """Starts a measurement of the CPU each named process uses; calling the result ends it and returns the
    cores each used on average meanwhile (where the machine's cores went during a phase)."""
    def cpu() -> dict[str, float]:
        return {name: _process_usage(pid)[1] for name, pid in pids.items()}

    started, before = time.monotonic(), cpu()

    def stop() -> dict[str, float]:
        seconds, after = time.monotonic() - started, cpu()
        return {name: round((after[name] - before[name]) / seconds, 2) for name in pids}

    return stop


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


class Bench:
    def __init__(self, env: DevEnvironment, work: Path, operator_env: dict[str, str] | None = None):
        self.env, self.work, self.operator_env = env, work, operator_env or {}
        env.cluster.kubectl_run("apply", "-f", str(REPO / "crds"))
        env.cluster.kubectl_run("wait", "--for=condition=Established", f"crd/{PLURAL}.{GROUP}", "--timeout=60s")
        self.admin = client.ApiClient(config.new_client_from_config(str(env.kubeconfig)).configuration)
        core = client.CoreV1Api(self.admin)
        core.create_namespace({"metadata": {"name": NAMESPACE}})
        rbac = client.RbacAuthorizationV1Api(self.admin)
        self.kubeconfigs = {}
        for account in (OPERATOR_ACCOUNT, BASELINE_ACCOUNT):
            core.create_namespaced_service_account(NAMESPACE, {"metadata": {"name": account}})
            rbac.create_cluster_role_binding({
                "metadata": {"name": f"bench-{account}"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
                "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}],
            })
            self.kubeconfigs[account] = service_account_kubeconfig(
                core, env.kubeconfig, NAMESPACE, account, work / f"{account}.kubeconfig")
        for name in ("x-api", "hf-token"):
            core.create_namespaced_secret(NAMESPACE, {"metadata": {"name": name, "labels": OPT_IN}, "stringData": {"token": "bench"}})
        self.audit_log = next((env.cluster.workdir / "clusters").glob("*/logs/audit.log"))
        self.audit_line = 0

    def _client(self, account: str) -> client.ApiClient:
        api = config.new_client_from_config(str(self.kubeconfigs[account]))
        api.configuration.connection_pool_maxsize = CLIENT_THREADS
        return client.ApiClient(api.configuration)

    def _clear(self) -> None:
        """Delete every bot and Job of the last run and wait until they are gone."""
        custom, batch = client.CustomObjectsApi(self.admin), client.BatchV1Api(self.admin)
        custom.delete_collection_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)
        batch.delete_collection_namespaced_job(NAMESPACE, propagation_policy="Background")
        client.CoreV1Api(self.admin).delete_collection_namespaced_pod(NAMESPACE, grace_period_seconds=0)
        wait_for(lambda: not custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, limit=1)["items"]
                 and not batch.list_namespaced_job(NAMESPACE, limit=1).items
                 and not client.CoreV1Api(self.admin).list_namespaced_pod(NAMESPACE, limit=1).items,
                 timeout=600, interval=1, what="the last run's objects to go")
        self.audit_line = len(self.audit_log.read_text().splitlines())

    def baseline(self, count: int) -> dict:
        """A plain script creating each bot's first Job directly, with the bots as the API server defaults them."""
        self._clear()
        custom = client.CustomObjectsApi(self.admin)
        settings = Settings(trainer_image="tweetbot-trainer:bench")
        bots = [custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, _bot(i), dry_run="All")
                for i in range(count)]
        jobs = [desired_job(bot, run_id_for(bot), "scrape", settings) for bot in bots]
        batch = client.BatchV1Api(self._client(BASELINE_ACCOUNT))
        watcher, first_job = first_jobs(self.admin)
        with watcher:
            cores = _cores_used({**self.env.cluster.component_pids(), "bench": os.getpid()})
            started, sent = _send_all([
                (job["metadata"]["labels"][BOT_LABEL], lambda job=job: batch.create_namespaced_job(NAMESPACE, job))
                for job in jobs])
            wait_for(lambda: len(first_job) == count, timeout=600, interval=0.05, what="every baseline Job")
            window_cores = cores()
        requests, self.audit_line = _audit_requests(self.audit_log, BASELINE_ACCOUNT, self.audit_line)
        return {"all_jobs_seconds": round(max(first_job.values()) - started, 2),
                **_latencies(sent, first_job), "requests_per_bot": round(sum(requests.values()) / count, 2),
                "first_jobs_cores": window_cores}

    def bots_alone(self, count: int) -> dict:
        """The same TweetBot creates with no operator running: what the API server's share of the operator's
        run costs before any Job is made (a floor under the operator's time on a shared machine)."""
        self._clear()
        custom = client.CustomObjectsApi(self._client(BASELINE_ACCOUNT))
        cores = _cores_used({**self.env.cluster.component_pids(), "bench": os.getpid()})
        started, sent = _send_all(self._bot_creates(custom, count))
        return {"all_created_seconds": round(time.monotonic() - started, 2), "first_jobs_cores": cores()}

    def minimal_controller(self, count: int) -> dict:
        """The same bot creates with `minimal_controller` in place of the operator: the floor of any operator's
        create-to-Job path here, with nothing of ours in it but a watch and one Job create per bot."""
        self._clear()
        controller = subprocess.Popen(
            [sys.executable, "-m", "tweetbot_dev.minimal_controller", "--kubeconfig", str(self.kubeconfigs[OPERATOR_ACCOUNT]),
             "--namespace", NAMESPACE], stdout=subprocess.PIPE, text=True)
        try:
            assert controller.stdout.readline().strip() == "watching", "the minimal controller did not start"
            custom = client.CustomObjectsApi(self._client(BASELINE_ACCOUNT))
            watcher, first_job = first_jobs(self.admin)
            with watcher:
                cores = _cores_used({**self.env.cluster.component_pids(), "bench": os.getpid(),
                                     "controller": controller.pid})
                started, sent = _send_all(self._bot_creates(custom, count))
                wait_for(lambda: len(first_job) == count, timeout=900, interval=0.05, what="every bot's first Job")
                window_cores = cores()
        finally:
            controller.kill()
            controller.wait()
        return {"all_jobs_seconds": round(max(first_job.values()) - started, 2), **_latencies(sent, first_job),
                "first_jobs_cores": window_cores}

    @staticmethod
    def _bot_creates(custom: client.CustomObjectsApi, count: int) -> list[tuple[str, callable]]:
        return [(bot["metadata"]["name"],
                 lambda bot=bot: custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, bot))
                for bot in (_bot(i) for i in range(count))]

    def operator(self, count: int) -> dict:
        self._clear()
        operator = OperatorProcess(self.env, self.work, self.kubeconfigs[OPERATOR_ACCOUNT], env={
            "TWEETBOT_NAMESPACES": NAMESPACE, "TWEETBOT_TRAINER_IMAGE": "tweetbot-trainer:bench",
            "TWEETBOT_TIMER_SECONDS": "60", **self.operator_env})
        operator.start()
        try:
            idle_rss, idle_cpu = _process_usage(operator.process.pid)
            custom = client.CustomObjectsApi(self._client(BASELINE_ACCOUNT))  # the user applying bots
            watcher, first_job = first_jobs(self.admin)
            with watcher:
                cores = _cores_used({**self.env.cluster.component_pids(), "bench": os.getpid(),
                                     "operator": operator.process.pid})
                started, sent = _send_all(self._bot_creates(custom, count))
                wait_for(lambda: len(first_job) == count, timeout=900, interval=0.05, what="every bot's first Job")
                window_cores = cores()
            # Watched only now, so the first-Job figures do not pay for the bench's own parsing of bot updates.
            watcher, succeeded = succeeded_bots(self.admin)
            with watcher:
                wait_for(lambda: len(succeeded) == count, timeout=1800, interval=0.2, what="every bot Succeeded")
            peak_rss, cpu = _process_usage(operator.process.pid)
            reconciles = _metric(operator.metrics_url, "tweetbot_reconciles_total")
        finally:
            operator.stop()
        requests, self.audit_line = _audit_requests(self.audit_log, OPERATOR_ACCOUNT, self.audit_line)
        return {"all_jobs_seconds": round(max(first_job.values()) - started, 2),
                "all_succeeded_seconds": round(max(succeeded.values()) - started, 2),
                **_latencies(sent, first_job),
                "requests_per_bot": round(sum(requests.values()) / count, 2), "reconciles_per_bot": round(reconciles / count, 2),
                "peak_rss_mb": round(peak_rss), "idle_rss_mb": round(idle_rss), "cpu_seconds": round(cpu - idle_cpu, 1),
                "requests_per_bot_by_kind": {kind: round(n / count, 2) for kind, n in requests.most_common()},
                "first_jobs_cores": window_cores}


def bench_operator(sizes: tuple[int, ...] = (1, 100, 1000), log=print, operator_env: dict[str, str] | None = None) -> dict:
    """`operator_env` goes to the operator process (PYTHONPATH=<an older checkout> measures that version)."""
    work = Path(tempfile.mkdtemp(prefix="tweetbot-bench-operator-"))
    env = DevEnvironment.up(work / "env", log=log, owner_pid=os.getpid(), nodes=_nodes(),
                            options={"kubeAuditPolicy": str(_audit_policy(work / "audit-policy.yaml"))},
                            patches=CLIENT_LIMITS,
                            stages=INSTANT_STAGE_PODS)
    try:
        bench = Bench(env, work, operator_env)
        results = {}
        for count in sizes:
            baseline = bench.baseline(count)
            bots_alone = bench.bots_alone(count)
            minimal = bench.minimal_controller(count)
            ours = bench.operator(count)
            log(f"operator bench N={count}: baseline {baseline} bots alone {bots_alone} minimal controller {minimal} "
                f"operator {ours}")
            results[str(count)] = {
                "baseline": baseline, "bots_alone": bots_alone, "minimal_controller": minimal, "operator": ours,
                "time_ratio": round(ours["all_jobs_seconds"] / baseline["all_jobs_seconds"], 2),
                "p99_ratio": round(ours["p99_ms"] / baseline["p99_ms"], 2),
            }
        return results
    finally:
        env.down()


def operator_rows(results: dict) -> list[tuple[str, str, str, str, str]]:
    """Table rows (benchmark, ours, baseline, ratio, what the baseline is) for bench.print_table."""
    rows = []
    for count, run in results.items():
        ours, baseline, minimal = run["operator"], run["baseline"], run["minimal_controller"]
        rows += [
            (f"N={count}: all first Jobs (s)", f"{ours['all_jobs_seconds']}", f"{baseline['all_jobs_seconds']}",
             f"{run['time_ratio']}x the time", f"a script creating the {count} Jobs, {CLIENT_THREADS} threads"),
            (f"N={count}: the bots alone (s)", f"{run['bots_alone']['all_created_seconds']}",
             f"{baseline['all_jobs_seconds']}", f"{round(run['bots_alone']['all_created_seconds'] / baseline['all_jobs_seconds'], 2)}x the time",
             "creating the TweetBots with no operator running: a floor"),
            (f"N={count}: minimal controller (s)", f"{minimal['all_jobs_seconds']}", f"{baseline['all_jobs_seconds']}",
             f"{round(minimal['all_jobs_seconds'] / baseline['all_jobs_seconds'], 2)}x the time",
             f"watch + one Job create per bot, nothing else: p50 {minimal['p50_ms']:,} ms, p99 {minimal['p99_ms']:,} ms"),
            (f"N={count}: create->Job p50 (ms)", f"{ours['p50_ms']:,}", f"{baseline['p50_ms']:,}",
             f"{round(ours['p50_ms'] / baseline['p50_ms'], 2)}x", "the script's create call to its Job seen"),
            (f"N={count}: create->Job p99 (ms)", f"{ours['p99_ms']:,}", f"{baseline['p99_ms']:,}",
             f"{run['p99_ratio']}x", ""),
            (f"N={count}: all Succeeded (s)", f"{ours['all_succeeded_seconds']}", "", "",
             "3 stages, pods finished at once by kwok"),
            (f"N={count}: API requests/bot", f"{ours['requests_per_bot']}", f"{baseline['requests_per_bot']}", "",
             f"reconciles/bot {ours['reconciles_per_bot']} (audit log)"),
            (f"N={count}: operator RSS (MB)", f"{ours['peak_rss_mb']}", "", "",
             f"peak; {ours['idle_rss_mb']} MB idle; {ours['cpu_seconds']} CPU s"),
            (f"N={count}: API server cores", f"{ours['first_jobs_cores'].get('kube-apiserver', 0)}",
             f"{baseline['first_jobs_cores'].get('kube-apiserver', 0)}", "",
             f"until all first Jobs; every process: {sum(ours['first_jobs_cores'].values()):.2f} "
             f"vs {sum(baseline['first_jobs_cores'].values()):.2f} of 2"),
        ]
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="the operator-at-scale benchmark alone")
    parser.add_argument("sizes", nargs="*", type=int, default=[1, 100, 1000])
    parser.add_argument("--operator-source", help="a checkout whose operator/ and trainer/ to measure instead")
    args = parser.parse_args()
    source = args.operator_source
    operator_env = {"PYTHONPATH": f"{source}/operator:{source}/trainer"} if source else None
    print(json.dumps(bench_operator(tuple(args.sizes), operator_env=operator_env), indent=1))
