"""What is named once in code and again in the CRD (phases, states, sources, defaults, stages) stays the same."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tweetbot_operator.names import JobState, Phase
from tweetbot_operator.stages import REGISTRY
from tweetbot_trainer.contract import SOURCES, SPEC_DEFAULTS, STAGES, Defaults

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
