"""Model cards in the seeds' shape, parsed back and checked number by number."""

from __future__ import annotations

import html
from html.parser import HTMLParser

import pytest
import yaml
from markdown_it import MarkdownIt

from tweetbot_trainer.card import CardFacts, parse_table, render_card
from tweetbot_trainer.contract import ContractError, HandleStats


def facts(handles, **changes) -> CardFacts:
    values = dict(repo_id="org/" + "-".join(sorted(h.handle for h in handles)), handles=handles, network="X",
                  collected_at="2026-11-22", hyperparameters={"epochs": 4, "learning rate": 1.372e-4},
                  deepspeed="ZeRO-2", metrics={"evalLoss": 3.1, "perplexity": 22.2}, samples=["My dream is a | b"],
                  architecture="GPT2LMHeadModel", model_type="gpt2")
    values.update(changes)
    return CardFacts(**values)


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def test_a_one_handle_card():
    card = render_card(facts([HandleStats("lizasoberano", 3094, 1102, 308, 1684, "Liza Soberano")]))
    meta = front_matter(card)
    assert "huggingtweets" in meta["tags"] and meta["widget"] == [{"text": "My dream is"}]
    assert meta["pipeline_tag"] == "text-generation" and meta["library_name"] == "transformers" and meta["base_model"] == "gpt2"
    assert meta["license"] == "mit"  # GPT-2's
    assert meta["tags"] == ["huggingtweets", "text-generation", "gpt2"]
    assert "GPT-2 is fine-tuned" in card and "[gpt2](https://huggingface.co/gpt2) (GPT2LMHeadModel) which is fine-tuned" in card
    assert "[the same limitations and bias as GPT-2](https://huggingface.co/gpt2#limitations-and-bias)" in card
    assert "AI BOT" in card and "AI CYBORG" not in card
    assert parse_table(card) == {"Liza Soberano": {"Tweets downloaded": 3094, "Retweets": 1102, "Short tweets": 308, "Tweets kept": 1684}}
    assert "model='org/lizasoberano'" in card and 'generator("My dream is", num_return_sequences=5)' in card


def test_the_three_handle_cyborg_of_seed_001():
    handles = [HandleStats("purefulsoul", 256, 4, 42, 210, "🍂"), HandleStats("turtlebreezee", 3229, 20, 304, 2905, "🐢"),
               HandleStats("wnrstweets", 3229, 16, 756, 2457, "We’re Not Really Strangers")]
    card = render_card(facts(handles))
    assert "AI CYBORG" in card and "🍂 &amp; 🐢 &amp; We’re Not Really Strangers" in card
    table = parse_table(card)
    assert list(table) == ["🍂", "🐢", "We’re Not Really Strangers"]
    for stats in handles:
        column = table[stats.displayName]
        assert (column["Tweets downloaded"], column["Retweets"], column["Short tweets"], column["Tweets kept"]) == (
            stats.downloaded, stats.retweets, stats.short, stats.kept)
        assert column["Tweets downloaded"] == column["Retweets"] + column["Short tweets"] + column["Tweets kept"]


def test_hostile_display_names_do_not_break_the_table_or_the_html():
    name = 'Pipe | <script>alert("x")</script> "quoted" 🤖'
    card = render_card(facts([HandleStats("odd", 10, 1, 2, 7, name), HandleStats("plain", 20, 0, 5, 15)]))
    assert "<script>" not in card
    assert parse_table(card) == {name: {"Tweets downloaded": 10, "Retweets": 1, "Short tweets": 2, "Tweets kept": 7},
                                 "plain": {"Tweets downloaded": 20, "Retweets": 0, "Short tweets": 5, "Tweets kept": 15}}
    assert all(line.count(" | ") == 2 for line in card.splitlines() if line.startswith("| Tweets"))


def test_a_base_model_from_s3_is_named_but_not_linked():
    card = render_card(facts([HandleStats("a", 10, 1, 2, 7)], base_model="s3://models/tiny/"))
    assert "base_model" not in front_matter(card) and "license" not in front_matter(card)
    assert "`s3://models/tiny/`" in card


def test_another_base_model_is_named_with_its_architecture_and_never_called_gpt2():
    card = render_card(facts([HandleStats("a", 10, 1, 2, 7)], base_model="meta-llama/Llama-3.2-1B",
                             architecture="LlamaForCausalLM", model_type="llama"))
    meta = front_matter(card)
    assert meta["base_model"] == "meta-llama/Llama-3.2-1B" and "license" not in meta
    assert meta["tags"] == ["huggingtweets", "text-generation", "llama"]
    assert "GPT-2" not in card and "gpt2" not in card
    link = "[meta-llama/Llama-3.2-1B](https://huggingface.co/meta-llama/Llama-3.2-1B)"
    assert f"Posts are collected and cleaned, {link} is fine-tuned on them" in card
    assert f"based on a pre-trained {link} (LlamaForCausalLM) which is fine-tuned" in card
    assert f"the same limitations and bias as its base model, {link}." in card
    assert parse_table(card) == {"a": {"Tweets downloaded": 10, "Retweets": 1, "Short tweets": 2, "Tweets kept": 7}}


def test_eval_loss_and_perplexity_are_model_index_results_the_hub_reads():
    from huggingface_hub import ModelCard

    handles = [HandleStats("a", 10, 1, 2, 7), HandleStats("b", 20, 0, 5, 15)]
    card = render_card(facts(handles, metrics={"evalLoss": 3.1, "perplexity": 22.2, "trainLoss": 2.9}))
    data = ModelCard(card).data
    assert data.model_name == "org/a-b"
    assert [(r.task_type, r.dataset_name, r.dataset_split, r.metric_type, r.metric_name, r.metric_value) for r in data.eval_results] == [
        ("text-generation", "held-out posts of @a, @b", "validation", "loss", "Eval loss", 3.1),
        ("text-generation", "held-out posts of @a, @b", "validation", "perplexity", "Perplexity", 22.2)]
    assert "- evalLoss: 3.1" in card  # and still in the training procedure's list
    # A run without held-out posts has no evaluation to report.
    assert "model-index" not in front_matter(render_card(facts(handles, metrics={"trainLoss": 2.9})))


def test_counts_that_do_not_add_up_never_reach_a_card():
    with pytest.raises(ContractError, match="do not add up"):
        render_card(facts([HandleStats("a", 10, 1, 2, 3)]))


class _Tags(HTMLParser):
    """The tags and link targets of rendered HTML."""

    def __init__(self, rendered: str):
        super().__init__()
        self.tags, self.hrefs, self.headings = [], [], []
        self._in_heading = False
        self.feed(rendered)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.hrefs += [value for name, value in attrs if name in ("href", "src")]
        self._in_heading = tag in ("h1", "h2", "h3", "h4", "h5", "h6")

    def handle_data(self, data):
        if self._in_heading:
            self.headings.append(data)
            self._in_heading = False


OUR_LINKS = {"https://github.com/borisdayma/huggingtweets", "https://huggingface.co/gpt2",
             "https://huggingface.co/gpt2#limitations-and-bias"}


def test_display_names_cannot_add_links_images_html_or_headings():
    hostile = "[click](https://evil.example) <img src=x onerror=alert(1)>\n# Heading"
    other = "![pic](https://evil.example/x.png) <script>x</script> www.evil.example me@evil.example"
    card = render_card(facts([HandleStats("odd", 10, 1, 2, 7, hostile), HandleStats("other", 20, 0, 5, 15, other)]))
    tags = _Tags(MarkdownIt("commonmark").enable("table").render(card))
    assert set(tags.hrefs) <= OUR_LINKS
    assert not {"img", "script"} & set(tags.tags)
    assert "Heading" not in tags.headings and not any(line.startswith("# ") for line in card.splitlines())
    # A GFM autolinker needs a literal '://', 'www.' or an e-mail address in the source.
    assert "://evil" not in card and "www.evil" not in card and "@evil" not in card
    # The names still read as they were written, on one line.
    assert list(parse_table(card)) == [" ".join(hostile.split()), other]


def test_samples_cannot_add_links_images_html_or_headings():
    samples = ["[click](https://evil.example) and <https://evil.example/auto>",
               "![pic](https://evil.example/x.png) <img src=x onerror=alert(1)> <script>x</script>",
               "# Heading\n## Another\nwww.evil.example me@evil.example",
               "<a href='https://evil.example'>a</a> [ref]\n\n[ref]: https://evil.example"]
    card = render_card(facts([HandleStats("a", 10, 1, 2, 7)], samples=samples))
    tags = _Tags(MarkdownIt("commonmark").enable("table").render(card))
    assert set(tags.hrefs) <= OUR_LINKS
    assert not {"img", "script"} & set(tags.tags)
    assert not ({"Heading", "Another"} & set(tags.headings))
    assert "://evil" not in card and "www.evil" not in card and "@evil" not in card
    # Each sample stays one quoted line under its heading, reading as it was generated.
    quoted = [line[2:] for line in card.split("## Samples\n", 1)[1].split("\n## ", 1)[0].splitlines() if line.startswith("> ")]
    assert [html.unescape(line) for line in quoted] == [" ".join(sample.split()) for sample in samples]


def test_the_trackers_run_pages_are_linked():
    wandb, mlflow = "https://wandb.ai/team/tweetbot/runs/tweetbot-0123abcd", "https://mlflow.example/#/experiments/3/runs/9f1e"
    card = render_card(facts([HandleStats("a", 10, 1, 2, 7)], tracking={"wandb": wandb, "mlflow": mlflow}))
    assert f"- Training run: [Weights &amp; Biases]({wandb})" in card and f"- Training run: [MLflow]({mlflow})" in card
    tags = _Tags(MarkdownIt("commonmark").enable("table").render(card))
    assert {wandb, mlflow} <= set(tags.hrefs)
    assert "Training run" not in render_card(facts([HandleStats("a", 10, 1, 2, 7)]))


def test_a_hostile_run_page_url_is_never_a_link_elsewhere():
    """The URL comes from a tenant's W&B or MLflow server (or their spec's trackingUri): only an http(s) link
    to it, and nothing in it can end the link and start other markup."""
    hostile = {"wandb": "javascript:alert(document.cookie)",
               "mlflow": "https://mlflow.example/#/x)![pic](https://evil.example/x.png)<script>x</script>[a](https://evil.example"}
    card = render_card(facts([HandleStats("a", 10, 1, 2, 7)], tracking=hostile))
    tags = _Tags(MarkdownIt("commonmark").enable("table").render(card))
    assert "javascript:" not in card and "Weights" not in card
    assert not {"img", "script"} & set(tags.tags)
    links = [href for href in tags.hrefs if href not in OUR_LINKS]
    assert len(links) == 1 and links[0].startswith("https://mlflow.example/#/x%29!%5Bpic%5D%28")
    for url in ("data:text/html,<b>x</b>", "https://user@evil.example/", "https://mlflow.example/a b", "ftp://files.example/",
                "https:///no-host", "https://mlflow.example/\n# Heading"):
        card = render_card(facts([HandleStats("a", 10, 1, 2, 7)], tracking={"mlflow": url}))
        assert "Training run" not in card, url
    # Only the trackers the card knows are linked.
    assert "Training run" not in render_card(facts([HandleStats("a", 10, 1, 2, 7)], tracking={"evil": "https://evil.example/"}))
