"""The operator's watch cache (what a reconcile reads instead of the API server) and its API paths."""

from tweetbot_operator.cache import WatchCache
from tweetbot_trainer.contract import BOT_LABEL


def job(name, bot, namespace="ns"):
    return {"metadata": {"name": name, "namespace": namespace, "labels": {BOT_LABEL: bot}}}


def test_jobs_are_kept_by_their_bot_and_namespace():
    cache = WatchCache()
    cache.put_job(job("a-scrape", "a"))
    cache.put_job(job("a-train", "a"))
    cache.put_job(job("a-scrape", "a", namespace="other"))
    cache.put_job(job("ab-scrape", "ab"))
    assert sorted(j["metadata"]["name"] for j in cache.jobs(("ns", "a"))) == ["a-scrape", "a-train"]
    assert [j["metadata"]["namespace"] for j in cache.jobs(("other", "a"))] == ["other"]
    cache.forget_job(job("a-train", "a"))
    assert [j["metadata"]["name"] for j in cache.jobs(("ns", "a"))] == ["a-scrape"]
    cache.replace_jobs(("ns", "a"), [])
    assert cache.jobs(("ns", "a")) == [] and len(cache.jobs(("ns", "ab"))) == 1


def test_a_newer_copy_of_a_bot_replaces_the_older_and_forgetting_drops_its_jobs():
    cache = WatchCache()
    cache.put_bot({"metadata": {"namespace": "ns", "name": "a", "resourceVersion": "1"}})
    cache.put_bot({"metadata": {"namespace": "ns", "name": "a", "resourceVersion": "2"}})
    cache.put_job(job("a-scrape", "a"))
    assert cache.bot(("ns", "a"))["metadata"]["resourceVersion"] == "2"
    cache.forget_bot(("ns", "a"))
    assert cache.bot(("ns", "a")) is None and cache.jobs(("ns", "a")) == [] and len(cache) == 0


def test_an_older_copy_never_replaces_a_newer_one():
    cache = WatchCache()
    cache.put_bot({"metadata": {"namespace": "ns", "name": "a", "resourceVersion": "12"}})
    cache.put_bot({"metadata": {"namespace": "ns", "name": "a", "resourceVersion": "9"}})  # a late watch event
    assert cache.bot(("ns", "a"))["metadata"]["resourceVersion"] == "12"
    newer = job("a-scrape", "a")
    newer["metadata"]["resourceVersion"] = "30"
    older = job("a-scrape", "a")
    older["metadata"]["resourceVersion"] = "29"
    cache.put_job(newer)
    cache.put_job(older)
    assert cache.jobs(("ns", "a"))[0]["metadata"]["resourceVersion"] == "30"


def test_only_what_reconciling_reads_is_kept():
    cache = WatchCache()
    cache.put_job({"metadata": {"name": "a-scrape", "namespace": "ns", "labels": {BOT_LABEL: "a"},
                                "managedFields": [{"manager": "x"}]},
                   "spec": {"suspend": True, "template": {"spec": {"containers": [{"name": "stage"}]}}},
                   "status": {"active": 1}})
    assert cache.jobs(("ns", "a")) == [{"metadata": {"name": "a-scrape", "namespace": "ns", "labels": {BOT_LABEL: "a"}},
                                        "spec": {"suspend": True}, "status": {"active": 1}}]
    cache.put_job({"metadata": {"name": "a-train", "namespace": "ns", "labels": {BOT_LABEL: "a"}},
                   "spec": {"template": {"spec": {"subdomain": "a-train", "containers": [{"name": "stage"}]}}}})
    assert cache.jobs(("ns", "a"))[1]["spec"] == {"suspend": None, "template": {"spec": {"subdomain": "a-train"}}}


def test_api_paths_for_core_and_group_resources():
    from tweetbot_operator.kube import path

    assert path("v1", "pods", "ns") == "/api/v1/namespaces/ns/pods"
    assert path("batch/v1", "jobs") == "/apis/batch/v1/jobs"
    assert path("huggingtweets.dev/v1alpha1", "tweetbots", "ns", "a", "status") == \
        "/apis/huggingtweets.dev/v1alpha1/namespaces/ns/tweetbots/a/status"


def test_a_list_is_read_a_page_at_a_time_until_no_continue_token():
    from tweetbot_operator.kube import PAGE_SIZE, Kube

    class PagedKube(Kube):
        def __init__(self):
            self.queries = []

        def get(self, path, **query):
            self.queries.append(dict(query))
            page = int(query.get("continue") or 0)
            last = page == 2
            return {"items": [{"n": page * 10 + i} for i in range(3)], "metadata": {"continue": "" if last else str(page + 1)}}

    kube = PagedKube()
    items = kube.items("/apis/x/v1/things", labelSelector="a=b")
    assert kube.queries == []  # nothing read before the first item is wanted
    assert [item["n"] for item in items] == [0, 1, 2, 10, 11, 12, 20, 21, 22]
    assert [query.get("continue") for query in kube.queries] == [None, "1", "2"]
    assert all(query["limit"] == PAGE_SIZE and query["labelSelector"] == "a=b" for query in kube.queries)
