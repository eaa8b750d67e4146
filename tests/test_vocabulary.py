"""What is named once in code and again in the CRD (phases, states, sources, defaults, stages) stays the same."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tweetbot_operator.names import JobState, Phase
from tweetbot_operator.stages import REGISTRY
from tweetbot_trainer.contract import SOURCES, SPEC_DEFAULTS, STAGES, TRACKERS, Defaults

CRD = Path(__file__).resolve().parents[1] / "crds" / "huggingtweets.dev_tweetbots.yaml"
SCHEMA = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]


def test_the_crds_phases_and_stage_states_are_the_operators():
    status = SCHEMA["status"]["properties"]
    assert status["phase"]["enum"] == list(Phase)
    stage_state = status["stages"]["properties"]["scrape"]["properties"]["state"]["enum"]
    assert stage_state == [state for state in JobState if state != JobState.QUEUED]  # shown as Pending
    assert set(status["stages"]["properties"]) == set(STAGES)


def test_the_crds_sources_are_the_contracts():
    source = SCHEMA["spec"]["properties"]["source"]
    assert set(source["properties"]) - {"maxPostsPerHandle"} == set(SOURCES)
    rule = source["x-kubernetes-validations"][0]
    assert re.findall(r"has\(self\.(\w+)\)", rule["rule"]) == list(SOURCES)
    for text in (rule["message"], source["description"]):
        assert re.findall(r"\b(" + "|".join(SOURCES) + r")\b", text) == list(SOURCES)
    for key, use in SOURCES.items():
        secret_refs = [name for name in source["properties"][key]["properties"] if name.endswith("SecretRef")]
        assert secret_refs == ([use.field] if use else [])


def test_the_crds_trackers_are_the_contracts():
    training = SCHEMA["spec"]["properties"]["training"]
    assert training["properties"]["reportTo"]["items"]["enum"] == list(TRACKERS)
    # Each tracker with a server has its settings object, required by a rule when reportTo names it.
    rules = " ".join(rule["rule"] for rule in training["x-kubernetes-validations"])
    for tracker in ("wandb", "mlflow"):
        assert tracker in training["properties"] and f"has(self.{tracker})" in rules


def crd_defaults(schema: dict) -> Defaults | None:
    """The CRD's `default:` values as a `Defaults` tree (None where an object has no defaults inside)."""
    fields = {}
    for name, child in (schema.get("properties") or {}).items():
        if child.get("type") == "object" and child.get("properties"):
            nested = crd_defaults(child)
            if nested is not None:
                fields[name] = nested
        elif "default" in child:
            fields[name] = child["default"]
    always = schema.get("default") == {}
    return Defaults(fields, always=always) if fields or always else None


def test_the_crds_defaults_are_the_codes():
    assert crd_defaults(SCHEMA["spec"]) == Defaults(SPEC_DEFAULTS.fields)


def test_every_stage_of_the_contract_has_one_registry_entry_in_run_order():
    assert tuple(REGISTRY) == STAGES
    assert len({stage.condition for stage in REGISTRY.values()}) == len(STAGES)


def unknown_fields(value, schema: dict, where: str = "status") -> list[str]:
    """The paths in `value` the CRD's structural schema would prune without a word."""
    if isinstance(value, dict) and "properties" in schema:
        return [path for key, item in value.items() if item is not None
                for path in ([f"{where}.{key}"] if key not in schema["properties"]
                             else unknown_fields(item, schema["properties"][key], f"{where}.{key}"))]
    if isinstance(value, list) and "items" in schema:
        return [path for item in value for path in unknown_fields(item, schema["items"], f"{where}[]")]
    return []


def test_every_status_field_the_plan_writes_is_in_the_crd():
    """A status field missing from the CRD is dropped by the API server silently: adding one to the plan
    without the schema fails here."""
    from test_reconcile import ALL_SECRETS, job, make_bot, result, step

    from tweetbot_operator.plan import Observed
    from tweetbot_trainer.contract import HandleStats, Progress

    bot = make_bot(schedule={"cron": "0 4 * * *", "suspend": False, "minNewPosts": 1, "resumeFrom": "base"})
    stats = [HandleStats("purefulsoul", 10, 1, 2, 7, displayName="Pureful")]
    jobs, results, written = [], {}, []
    for stage in STAGES:
        jobs.append(job(bot, stage, "Running"))
        decided, bot = step(bot, Observed(jobs=jobs, results=results, secrets=ALL_SECRETS, progress=Progress(5, 10, 2.0, 100.0, 60)))
        written.append(decided.status)
        jobs[-1] = job(bot, stage, "Succeeded")
        results[jobs[-1]["metadata"]["name"]] = result(bot, stage, data=stats, metrics={"trainLoss": 2.0, "posts": 7, "newPosts": 7},
                                                       artifacts={"modelUri": "s3://bots/model/"})
    decided, bot = step(bot, Observed(jobs=jobs, results=results, secrets=ALL_SECRETS))
    assert decided.status["phase"] == "Succeeded" and decided.status["history"] and decided.status["nextScheduleTime"]
    for status in [*written, decided.status]:
        assert unknown_fields(status, SCHEMA["status"]) == []


def undescribed(schema: dict, path: str) -> list[str]:
    """The paths under `schema` (its properties, list items and map values) that have no description."""
    missing = [] if str(schema.get("description") or "").strip() else [path]
    for name, child in (schema.get("properties") or {}).items():
        missing += undescribed(child, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        missing += undescribed(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        missing += undescribed(schema["additionalProperties"], f"{path}.*")
    return missing


def test_every_field_of_the_crd_has_a_description():
    """`kubectl explain tweetbot.spec...` is the reference: no field of any version goes without a description."""
    # The API server refuses anything but a type for the root's metadata; kubectl explain shows ObjectMeta's.
    missing = [path for version in yaml.safe_load(CRD.read_text())["spec"]["versions"]
               for path in undescribed(version["schema"]["openAPIV3Schema"], version["name"])
               if path != f"{version['name']}.metadata"]
    assert not missing, f"{len(missing)} fields of the CRD have no description:\n" + "\n".join(missing)


def test_the_crds_env_names_and_labels_are_the_operators():
    """spec.podOverrides' names the operator keeps or allows: the CRD's rules refuse what `validate_spec` refuses."""
    from tweetbot_operator.spec import OPERATOR_ANNOTATION_PREFIXES, OPERATOR_LABEL_KEYS, OPERATOR_LABEL_PREFIXES
    from tweetbot_trainer.contract import (ALLOWED_ENV_NAMES, ALLOWED_ENV_PREFIXES, LOADING_ENV_WORD, RESERVED_ENV_NAMES,
                                           RESERVED_ENV_PREFIXES)

    def listed(rule: str) -> tuple[list[str], list[str]]:
        """The names in a rule's `in [...]` and the prefixes in its `[...].exists(p, ...startsWith(p))`."""
        names = re.search(r"in \[([^\]]*)\]", rule)
        prefixes = re.search(r"\[([^\]]*)\]\.exists\(p", rule)
        quoted = lambda found: re.findall(r"'([^']*)'", found.group(1)) if found else []  # noqa: E731
        return quoted(names), quoted(prefixes)

    overrides = SCHEMA["spec"]["properties"]["podOverrides"]["properties"]
    for stage in STAGES:
        fields = overrides[stage]["properties"]
        reserved_rule, allowed_rule = (rule["rule"] for rule in
                                       fields["env"]["items"]["properties"]["name"]["x-kubernetes-validations"])
        assert listed(reserved_rule) == (list(RESERVED_ENV_NAMES), list(RESERVED_ENV_PREFIXES))
        assert listed(allowed_rule) == (list(ALLOWED_ENV_NAMES), list(ALLOWED_ENV_PREFIXES))
        assert re.findall(r"!self\.matches\('([^']*)'\)", allowed_rule) == [LOADING_ENV_WORD]
        label_rule = fields["labels"]["x-kubernetes-validations"][1]["rule"]
        assert listed(label_rule) == (list(OPERATOR_LABEL_KEYS), list(OPERATOR_LABEL_PREFIXES))
        annotation_rule = fields["annotations"]["x-kubernetes-validations"][1]["rule"]
        assert listed(annotation_rule) == ([], list(OPERATOR_ANNOTATION_PREFIXES))
    assert set(overrides["train"]["properties"]) - set(overrides["scrape"]["properties"]) == {"gpuResourceName"}


def test_the_user_guide_lists_every_env_name_a_stage_may_be_given():
    from tweetbot_trainer.contract import ALLOWED_ENV_NAMES, ALLOWED_ENV_PREFIXES

    guide = (CRD.parents[1] / "docs" / "user-guide.md").read_text()
    pod_overrides = guide[guide.index("## Pod overrides"):]
    missing = [name for name in ALLOWED_ENV_NAMES if f"`{name}`" not in pod_overrides]
    missing += [prefix for prefix in ALLOWED_ENV_PREFIXES if f"`{prefix}*`" not in pod_overrides]
    assert not missing, f"docs/user-guide.md#pod-overrides does not list {missing}"
