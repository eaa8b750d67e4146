"""The chart's Grafana dashboard and Prometheus alerts: the dashboard is one by the schema of the Grafana
Foundation SDK (read strictly: no field it does not know), the rules pass `promtool check rules`, and every
expression in either names only metrics the operator exports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import tweetbot_operator.metrics  # noqa: F401  (registers the operator's metrics)
from tweetbot_dev.binaries import DASHBOARDCHECK, PROMTOOL, ensure_check_tools

from test_chart_render import CHART, helm, one, render  # noqa: F401  (helm: the fixture)

DASHBOARD = CHART / "dashboards" / "tweetbot.json"
ENABLED = {"grafana": {"dashboard": {"enabled": True}}, "prometheusRule": {"enabled": True}}


@pytest.fixture(scope="module")
def checkers() -> Path:
    return ensure_check_tools()


def dashboard_check(checkers: Path, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(checkers / DASHBOARDCHECK), str(path)], capture_output=True, text=True, timeout=60)


def test_the_dashboard_is_a_dashboard_by_the_grafana_sdk_s_schema(checkers, tmp_path):
    result = dashboard_check(checkers, DASHBOARD)
    assert result.returncode == 0, result.stderr
    # The check is strict: what Grafana would silently drop fails it.
    board = json.loads(DASHBOARD.read_text())
    board["panels"][0]["gridPos"]["width"] = 12  # the schema's is `w`
    board["panels"][1]["targets"][0]["exprs"] = board["panels"][1]["targets"][0].pop("expr")
    board["panels"][2]["type"] = "timeseriez"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(board))
    result = dashboard_check(checkers, broken)
    assert result.returncode == 1
    for found in ("width", "exprs", "timeseriez"):
        assert found in result.stderr


def test_the_rules_pass_promtool(helm, checkers, tmp_path):
    rule = one(render(helm, tmp_path, ENABLED), "PrometheusRule")
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(rule["spec"]))
    result = subprocess.run([str(checkers / PROMTOOL.binary), "check", "rules", str(rules)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule['spec']['groups'][0]['rules'])} rules found" in result.stdout


# PromQL's words that are not metric names, and the parts of an expression that hold none.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
             "inf", "nan"}
_NOT_NAMES = re.compile(r'"(?:[^"\\]|\\.)*"|\{[^}]*\}|\[[^\]]*\]|\$\{?\w+\}?'  # strings, matchers, ranges, $variables
                        r"|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")  # label lists
_WORD = re.compile(r"(?<![\w.])([a-zA-Z_:][\w:]*+)(?!\s*\()")  # not a function's name, not part of a number
# Grafana's variable query label_values(metric, label), or label_values(label): only a metric is kept.
_LABEL_VALUES = re.compile(r"label_values\(\s*(?:([^,()]+?)\s*,\s*)?\w+\s*\)")


def metric_names(expression: str) -> set[str]:
    expression = _LABEL_VALUES.sub(lambda match: match.group(1) or " ", expression)
    return {word for word in _WORD.findall(_NOT_NAMES.sub(" ", expression)) if word.lower() not in _KEYWORDS}


def exported() -> set[str]:
    """Every series name the operator's registry can expose: counters' _total, histograms' _bucket/_sum/_count."""
    return {sample.name for family in REGISTRY.collect() for sample in family.samples} | {
        f"{family.name}{suffix}" for family in REGISTRY.collect()
        for suffix in {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))}


def test_metric_names_are_read_out_of_promql():
    assert metric_names('histogram_quantile(0.5, sum by (le, stage) (rate(a_bucket{x="y{z}"}[5m])))') == {"a_bucket"}
    assert metric_names("time() - min by (namespace) (b{namespace=~\"$namespace\"}) > 30 * 60") == {"b"}
    assert metric_names("sum(rate(c_total[$__rate_interval])) / sum(d) > 1e-3 and on() e") == {"c_total", "d", "e"}
    assert metric_names("label_values(f, namespace)") == {"f"} and metric_names("label_values(namespace)") == set()


def test_every_expression_names_only_metrics_the_operator_exports(helm, tmp_path):
    board = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in board["panels"] for target in panel["targets"]]
    expressions += [variable["query"] for variable in board["templating"]["list"] if variable["type"] == "query"]
    rule = one(render(helm, tmp_path, ENABLED), "PrometheusRule")
    expressions += [item["expr"] for group in rule["spec"]["groups"] for item in group["rules"]]
    named = {name: [e for e in expressions if name in metric_names(e)] for e in expressions for name in metric_names(e)}
    assert named and not named.keys() - exported(), {name: named[name] for name in named.keys() - exported()}
    # ... and what the dashboard promises to show is on it.
    for metric in ("tweetbot_bots", "tweetbot_stage_duration_seconds_bucket", "tweetbot_workqueue_depth",
                   "tweetbot_workqueue_queue_duration_seconds_bucket", "tweetbot_reconcile_errors_total",
                   "tweetbot_gpu_seconds_total", "tweetbot_training_tokens_per_second"):
        assert metric in named
