"""README.md written next to a saved prefix: Hub front matter and the run's facts from a real (tiny) training
run; loading a prefix directory works with or without it."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

from conftest import tiny_model
from prefixtune import PrefixConfig, PrefixTuningModel, modelcard
from prefixtune.base_model import load_base_model
from prefixtune.cli import main


def _front_matter(text: str) -> tuple[dict, str]:
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", text, re.S)
    assert match, text[:200]
    return yaml.safe_load(match.group(1)), match.group(2)


@pytest.fixture
def trained(tiny_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--task", "e2e", "--model", tiny_dir, "--output", str(out), "--train-size", "24",
                 "--batch-size", "8", "--prefix-length", "4", "--mlp-hidden", "32", "--lr", "0.01", "--bf16", "off",
                 "--no-progress", "--epochs", "2", "--eval-every", "3"]) == 0
    return out


def test_card_of_a_training_run_has_hub_metadata_and_the_runs_facts(trained, tiny_dir):
    meta = json.loads((trained / "prefix_config.json").read_text())
    summary = json.loads((trained / "train_summary.json").read_text())
    front, body = _front_matter((trained / "README.md").read_text())
    assert front["library_name"] == "prefixtune" and "prefix-tuning" in front["tags"]
    assert front["datasets"] == ["tuetschek/e2e_nlg"]
    assert "base_model" not in front  # a local directory is no Hub id: the Hub would reject it
    base, _ = load_base_model(tiny_dir)
    n_base = sum(p.numel() for p in base.parameters())
    n_prefix = meta["num_parameters"]
    assert f"base model: `{tiny_dir}` ({n_base:,} parameters, frozen)" in body
    assert "- task: e2e" in body
    assert re.search(r"- data: (\d+) training pairs, (\d+) dev pairs", body).groups() == tuple(
        re.search(r"(\d+) training and (\d+) dev pairs", summary["data"]).groups())
    assert f"- training steps: {meta['training']['step']} of {summary['steps']}" in body
    assert f"{n_prefix:,} parameters ({100 * n_prefix / n_base:.2f}% of the base model)" in body
    assert f"| dev loss | {summary['best_dev_loss']:.4f} |" in body
    train_loss = float(re.search(r"\| train loss \(last step before this save\) \| ([\d.]+) \|", body).group(1))
    csv_rows = (trained / "metrics.csv").read_text().splitlines()[1:]
    at_save = next(r.split(",") for r in csv_rows if int(r.split(",")[0]) == meta["training"]["step"])
    assert train_loss == pytest.approx(float(at_save[2]), abs=1e-4)
    assert modelcard.described_weights(body) == meta["weights_sha256"]
    assert "PrefixTuningModel.from_pretrained(base" in body and f'load_base_model("{tiny_dir}")' in body


def test_card_names_hub_ids_scores_and_metrics():
    facts = dict(base_model="smollm2-135m", model_type="llama", prefix_parameters=115_200,
                 base_parameters=134_515_008, prefix_length=10, weights_sha256="a" * 64, task="webnlg",
                 scores={"bleu": 0.5312, "meteor": 0.39})
    front, body = _front_matter(modelcard.render(facts))
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert front["datasets"] == ["webnlg-challenge/web_nlg"] and front["metrics"] == ["bleu", "meteor"]
    assert "| bleu | 0.5312 |" in body and "(0.09% of the base model)" in body
    front, _ = _front_matter(modelcard.render({**facts, "base_model": "org/my-model", "task": "jsonl", "scores": {}}))
    assert front["base_model"] == "org/my-model" and "datasets" not in front and "metrics" not in front
    with pytest.raises(ValueError, match=r"unknown model card facts \['bleu'\]"):
        modelcard.render({**facts, "bleu": 1.0})


def test_a_bad_card_fact_writes_nothing(tmp_path):
    model = PrefixTuningModel(tiny_model("llama"), PrefixConfig(prefix_length=2, reparam="table"))
    with pytest.raises(ValueError, match="unknown model card facts"):
        model.save_pretrained(tmp_path / "p", card={"no_such_fact": 1})
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())


@pytest.mark.parametrize("with_card", [True, False])
def test_prefix_directory_loads_with_or_without_its_card(trained, tiny_dir, with_card):
    from prefixtune.multi import MultiPrefixModel

    if not with_card:
        (trained / "README.md").unlink()
    base, tok = load_base_model(tiny_dir)
    model = PrefixTuningModel.from_pretrained(base, trained, tokenizer=tok)
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    multi = MultiPrefixModel(base, tok)
    multi.add("e2e", trained)
    again = PrefixTuningModel.from_pretrained(load_base_model(tiny_dir)[0], trained)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, logits, rtol=0, atol=0)


def test_save_pretrained_rewrites_the_card_for_the_new_weights(tmp_path):
    model = PrefixTuningModel(tiny_model("llama"), PrefixConfig(prefix_length=2, reparam="table"))
    model.save_pretrained(tmp_path)
    first = modelcard.described_weights((tmp_path / "README.md").read_text())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    model.save_pretrained(tmp_path, card={"task": "e2e", "steps": 3})
    text = (tmp_path / "README.md").read_text()
    meta = json.loads((tmp_path / "prefix_config.json").read_text())
    assert modelcard.described_weights(text) == meta["weights_sha256"] != first
    assert "- training steps: 3" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "prefix.safetensors", "prefix_config.json"]
