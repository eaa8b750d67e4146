"""The model card (README.md) in the shape of huggingtweets' cards, rendered with real escaping.

Everything a person or network supplied (display names, handles, samples) is escaped for where it lands:
YAML front matter through a YAML dumper, HTML through html.escape, Markdown table cells with `|` escaped.
Display names, chosen by the scraped people themselves, and samples, generated from their posts, get the
strictest form (`inline`): neither can add a link, image, HTML or heading to a public page.
"""

from __future__ import annotations

import html
import string
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

import yaml

from .contract import HandleStats, section_defaults

KNOWN_LICENSES = {name: "mit" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2",
                                            "openai-community/gpt2")}
TABLE_ROWS = (("Tweets downloaded", "downloaded"), ("Retweets", "retweets"), ("Short tweets", "short"),
              ("Tweets kept", "kept"))
# training.json's metrics published as model-index results: (key, the Hub's metric type, its name).
EVAL_RESULTS = (("evalLoss", "loss", "Eval loss"), ("perplexity", "perplexity", "Perplexity"))
# training.json's `tracking` keys: the trackers whose run pages the card links, by the names it shows.
TRACKER_NAMES = {"wandb": "Weights & Biases", "mlflow": "MLflow"}


@dataclass
class CardFacts:
    repo_id: str
    handles: list[HandleStats]
    network: str
    collected_at: str
    base_model: str = section_defaults("model", None)["name"]
    hyperparameters: dict = field(default_factory=dict)
    deepspeed: str = ""
    metrics: dict = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)
    license: str = ""  # the base model's, where known
    architecture: str = ""  # the model's class, config.json's `architectures[0]`: LlamaForCausalLM, ...
    model_type: str = ""  # config.json's `model_type`: gpt2, llama, qwen2, ...
    tracking: dict = field(default_factory=dict)  # tracker -> its page of the training run (training.json's)
    adapter: bool = False  # the repository holds a LoRA adapter (peft) that loads on top of `base_model`


def cell(text: str) -> str:
    """A Markdown table cell: HTML-escaped, pipes escaped, no line breaks."""
    return html.escape(" ".join(str(text).split()), quote=False).replace("|", "\\|")


def inline(text: str) -> str:
    """Text for Markdown and HTML alike: one line, every ASCII punctuation mark a numeric character reference.
    CommonMark never reads a character reference as structure (link, image, HTML, heading, emphasis, table
    pipe), and a GFM autolinker finds no literal '://', 'www.' or e-mail address to link."""
    return "".join(f"&#{ord(char)};" if char in string.punctuation else char for char in " ".join(str(text).split()))


def link_target(url: str) -> str | None:
    """A Markdown link destination for a URL a tenant's spec or server chose, or None if it is no http(s) URL with a
    host: no other scheme (javascript:, data:) becomes a link. Every character that could end the destination or
    start markup (space, parentheses, brackets, angle brackets, quotes, '&', '\\', '`') is percent-encoded."""
    text = str(url)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        return None
    if any(not char.isprintable() or char.isspace() for char in text):
        return None
    return quote(text, safe=":/?#=;,+!$*%-._~")


def display(stats: HandleStats) -> str:
    """A handle's name, escaped by `inline`."""
    return inline(stats.displayName or stats.handle)


def render_card(facts: CardFacts) -> str:
    """The card: front matter, then huggingtweets' sections. The counts need no check here: a HandleStats
    cannot exist with counts that do not add up."""
    names = " &amp; ".join(display(s) for s in facts.handles)
    sections = (_front_matter(facts), _header(facts, names), _training_data(facts, names), _training_procedure(facts, names),
                _samples(facts), _usage(facts))
    return "\n".join(line for section in sections for line in section)


def _on_hub(base_model: str) -> bool:
    return not base_model.startswith(("s3://", "/", "."))  # an S3 or local base has no Hub page


def _base(facts: CardFacts) -> str:
    """The base model by its name: a link to its Hub page, or code for an S3 or local one."""
    if _on_hub(facts.base_model):
        return f"[{cell(facts.base_model)}](https://huggingface.co/{facts.base_model})"
    return f"`{cell(facts.base_model)}`"


def _is_gpt2(facts: CardFacts) -> bool:
    """Whether the card says GPT-2 as huggingtweets' cards do; any other or unknown architecture is named by its base."""
    return facts.model_type == "gpt2"


def _model_index(facts: CardFacts) -> dict:
    """Eval loss and perplexity on the held-out posts, as the Hub reads results: `model-index` metadata."""
    from huggingface_hub import EvalResult
    from huggingface_hub.repocard_data import eval_results_to_model_index

    handles = ", ".join("@" + stats.handle for stats in facts.handles)
    results = [EvalResult(task_type="text-generation", dataset_type="posts", dataset_name=f"held-out posts of {handles}",
                          dataset_split="validation", metric_type=type_, metric_name=name, metric_value=facts.metrics[key])
               for key, type_, name in EVAL_RESULTS if key in facts.metrics]
    return {"model-index": eval_results_to_model_index(facts.repo_id, results)} if results else {}


def _front_matter(facts: CardFacts) -> list[str]:
    license_ = facts.license or KNOWN_LICENSES.get(facts.base_model, "")
    front_matter = {
        "language": "en",
        "thumbnail": "https://github.com/borisdayma/huggingtweets/blob/master/img/logo.png?raw=true",
        "tags": ["huggingtweets", "text-generation", *([facts.model_type] if facts.model_type else []),
                 *(["peft", "lora"] if facts.adapter else [])],
        "widget": [{"text": "My dream is"}],
        "pipeline_tag": "text-generation",
        "library_name": "peft" if facts.adapter else "transformers",
        **({"base_model": facts.base_model} if _on_hub(facts.base_model) else {}),
        **({"license": license_} if license_ else {}),
        **_model_index(facts),
    }
    return ["---", yaml.safe_dump(front_matter, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]


def _header(facts: CardFacts, names: str) -> list[str]:
    kind = "CYBORG" if len(facts.handles) > 1 else "BOT"
    return [
        '<div class="inline-flex flex-col" style="line-height: 1.5;">',
        f'    <div style="text-align: center; margin-top: 3px; font-size: 16px; font-weight: 800">🤖 AI {kind} 🤖</div>',
        f'    <div style="text-align: center; font-size: 16px; font-weight: 800">{names}</div>',
        f'    <div style="text-align: center; font-size: 14px;">{html.escape(" ".join("@" + s.handle for s in facts.handles))}</div>',
        "</div>",
        "",
        "I was made with [huggingtweets](https://github.com/borisdayma/huggingtweets) as a platform service: "
        "a TweetBot resource on Kubernetes.",
        "",
        "## How does it work?",
        "",
        f"Posts are collected and cleaned, {'GPT-2' if _is_gpt2(facts) else _base(facts)} is fine-tuned on them, "
        "and the model is published here.",
        "",
    ]


def _training_data(facts: CardFacts, names: str) -> list[str]:
    handles = facts.handles
    return [
        "## Training data",
        "",
        f"The model was trained on posts from {names} ({cell(facts.network)}, collected {cell(facts.collected_at)}).",
        "",
        "| Data | " + " | ".join(display(s) for s in handles) + " |",
        "| --- |" + " --- |" * len(handles),
        *(f"| {label} | " + " | ".join(str(getattr(s, attribute)) for s in handles) + " |" for label, attribute in TABLE_ROWS),
    ]


def _training_procedure(facts: CardFacts, names: str) -> list[str]:
    architecture = f" ({inline(facts.architecture)})" if facts.architecture else ""
    lines = ["", "## Training procedure", "",
             f"The model is based on a pre-trained {_base(facts)}{architecture} which is fine-tuned on {names}'s posts.", ""]
    lines += [f"- {cell(key)}: {cell(value)}" for key, value in facts.hyperparameters.items()]
    if facts.deepspeed:
        lines.append(f"- DeepSpeed: {cell(facts.deepspeed)}")
    lines += [f"- {key}: {facts.metrics[key]}" for key in ("evalLoss", "perplexity", "trainLoss", "steps", "tokens") if key in facts.metrics]
    for tracker, url in facts.tracking.items():
        target = link_target(url) if tracker in TRACKER_NAMES else None
        if target:
            lines.append(f"- Training run: [{html.escape(TRACKER_NAMES[tracker])}]({target})")
    return lines


def _samples(facts: CardFacts) -> list[str]:
    if not facts.samples:
        return []
    return ["", "## Samples", "", *(f"> {inline(sample)}" + "\n" for sample in facts.samples)]


def _usage(facts: CardFacts) -> list[str]:
    return [
        "",
        "## How to use",
        "",
        "You can use this model directly with a pipeline for text generation:",
        "",
        *([f"It is a LoRA adapter: with `pip install peft`, transformers loads it onto its base model, {_base(facts)}.", ""]
          if facts.adapter else []),
        "```python",
        "from transformers import pipeline",
        "generator = pipeline('text-generation',",
        f"                     model='{facts.repo_id}')",
        'generator("My dream is", num_return_sequences=5)',
        "```",
        "",
        "## Limitations and bias",
        "",
        "The model suffers from [the same limitations and bias as GPT-2](https://huggingface.co/gpt2#limitations-and-bias)."
        if _is_gpt2(facts) else f"The model suffers from the same limitations and bias as its base model, {_base(facts)}.",
        "",
        "In addition, the data present in the user's posts further affects the text generated by the model.",
        "",
    ]


def parse_table(card: str) -> dict[str, dict[str, int]]:
    """The Data table read back: {column name: {row label: number}} (names with `\\|` unescaped)."""
    rows = [line for line in card.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    split = [[part.strip().replace("\\|", "|") for part in _split_row(row)] for row in rows]
    header, body = split[0], split[1:]
    return {html.unescape(name): {row[0]: int(row[index + 1]) for row in body} for index, name in enumerate(header[1:])}


def _split_row(row: str) -> list[str]:
    parts, current, escaped = [], "", False
    for char in row.strip()[1:-1]:
        if char == "|" and not escaped:
            parts.append(current)
            current = ""
        else:
            current += char
        escaped = char == "\\"
    parts.append(current)
    return parts
