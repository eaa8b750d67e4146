"""The Argo CD health check, run by a real Lua interpreter on the statuses the operator writes."""

from __future__ import annotations

from pathlib import Path

import pytest
from lupa import LuaRuntime

SCRIPT = (Path(__file__).resolve().parents[1] / "gitops" / "argocd-tweetbot-health.lua").read_text()


def health(obj: dict) -> dict:
    lua = LuaRuntime(unpack_returned_tuples=True)

    def to_lua(value):
        if isinstance(value, dict):
            return lua.table_from({key: to_lua(item) for key, item in value.items()})
        if isinstance(value, list):
            return lua.table_from([to_lua(item) for item in value])
        return value

    lua.globals().obj = to_lua(obj)
    result = lua.execute(SCRIPT)
    return {"status": result["status"], "message": result["message"]}


def bot(generation=1, **status):
    return {"metadata": {"generation": generation}, **({"status": status} if status else {})}


def condition(type_, value, message=""):
    return {"type": type_, "status": value, "message": message}


@pytest.mark.parametrize("obj, expected", [
    (bot(), "Progressing"),
    (bot(2, observedGeneration=1, phase="Succeeded", conditions=[condition("Ready", "True")]), "Progressing"),
    (bot(phase="Training", observedGeneration=1, conditions=[condition("Ready", "False")]), "Progressing"),
    (bot(phase="Succeeded", observedGeneration=1, conditions=[condition("Ready", "True", "scraped, trained and published")]), "Healthy"),
    (bot(phase="Failed", observedGeneration=1, lastError="stage scrape failed", conditions=[condition("Stalled", "True", "stage scrape failed")]), "Degraded"),
    (bot(phase="Pending", observedGeneration=1, conditions=[condition("Stalled", "True", "Secret 'x' does not exist")]), "Degraded"),
    (bot(phase="Suspended", observedGeneration=1), "Suspended"),
])
def test_health_follows_the_status(obj, expected):
    assert health(obj)["status"] == expected
