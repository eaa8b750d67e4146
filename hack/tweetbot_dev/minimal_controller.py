"""The least any TweetBot operator must do, as its own process: watch TweetBots and create each new bot's
first Job, nothing else (no status, no events, no later stages, no retries).

The operator benchmark runs it on the same cluster and the same bot creates as the real operator, so its
time is the floor of the operator's path on this machine: the bot create and the Job create both through
the API server, and a watch between them.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor

import kopf
from kubernetes import client, config, watch

from tweetbot_operator.spec import run_id_for
from tweetbot_operator.stages import desired_job
from tweetbot_operator.settings import Settings
from tweetbot_trainer.contract import GROUP

from .bench_operator import PLURAL, VERSION


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--workers", type=int, default=16)  # as many as the operator's work queue
    args = parser.parse_args()

    api = config.new_client_from_config(args.kubeconfig)
    api.configuration.connection_pool_maxsize = args.workers
    api = client.ApiClient(api.configuration)
    custom, batch = client.CustomObjectsApi(api), client.BatchV1Api(api)
    settings = Settings(trainer_image="tweetbot-trainer:bench")

    def create_first_job(bot: dict) -> None:
        job = desired_job(bot, run_id_for(bot), "scrape", settings)
        kopf.adopt(job, owner=bot)  # as the operator does
        batch.create_namespaced_job(args.namespace, job, _preload_content=False)

    listed = custom.list_namespaced_custom_object(GROUP, VERSION, args.namespace, PLURAL, _preload_content=False)
    resource_version = json.loads(listed.data)["metadata"]["resourceVersion"]
    print("watching", flush=True)  # the bench starts creating bots after this line
    with ThreadPoolExecutor(args.workers) as pool:
        for event in watch.Watch().stream(custom.list_namespaced_custom_object, GROUP, VERSION, args.namespace, PLURAL,
                                          resource_version=resource_version, deserialize=False):
            if event["type"] == "ADDED":
                pool.submit(create_first_job, event["object"])


if __name__ == "__main__":
    main()
