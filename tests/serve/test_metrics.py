"""/metrics parsed with prometheus_client's own parser, and the JSON request log, after known traffic."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import byte_tokenizer, tiny_model
from prefixtune import MultiPrefixModel
from prefixtune.serve import ServeSettings, create_app
from test_app import TIMEOUT, LiveServer, _asgi_calls, save_prefix, sse_events

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GEN, COMP = "/v1/generate", "/v1/completions"


def scrape(text: str) -> tuple[dict[str, str], dict[tuple, float]]:
    """(family name -> type, (sample name, sorted labels) -> value) of an exposition."""
    types, values = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return types, values


def sample(values: dict, name: str, **labels: str) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_and_json_log_after_known_traffic(tmp_path, caplog):
    save_prefix(tmp_path / "alpha", 3, 0)
    save_prefix(tmp_path / "beta", 2, 1)
    app = create_app(MultiPrefixModel(tiny_model("llama"), byte_tokenizer()),
                     ServeSettings(prefix_dir=tmp_path, default_new_tokens=5, log_format="json"))
    caplog.set_level(logging.INFO, logger="prefixtune.serve.requests")
    with LiveServer(app) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        generated = c.post(GEN, json={"task": "alpha", "input": ["one", "two two"]}).json()
        with c.stream("POST", COMP, json={"model": "alpha", "prompt": "three", "max_tokens": 6, "temperature": 0,
                                          "stream": True, "stream_options": {"include_usage": True}}) as resp:
            chunks = [d for _, d in sse_events(line for line in resp.iter_lines() if line != "data: [DONE]")]
        assert c.post(COMP, json={"model": "nope", "prompt": "x"}).status_code == 404
        assert c.post(GEN, json={"task": "beta", "input": "x", "colour": "red"}).status_code == 422
        text = c.get("/metrics").text
    types, values = scrape(text)
    usage = chunks[-1]["usage"]

    assert sample(values, "prefixtune_requests_total", route=GEN, task="alpha", status="200") == 1
    assert sample(values, "prefixtune_requests_total", route=COMP, task="alpha", status="200") == 1
    assert sample(values, "prefixtune_requests_total", route=COMP, task="", status="404") == 1  # made-up names: no label
    assert sample(values, "prefixtune_requests_total", route=GEN, task="", status="422") == 1
    assert sample(values, "prefixtune_errors_total", route=COMP, task="", type="model_not_found") == 1
    assert sample(values, "prefixtune_errors_total", route=GEN, task="", type="invalid_request") == 1
    assert sample(values, "prefixtune_input_tokens_total", route=GEN, task="alpha") == \
        sum(o["input_tokens"] for o in generated["outputs"])
    assert sample(values, "prefixtune_output_tokens_total", route=GEN, task="alpha") == \
        sum(o["output_tokens"] for o in generated["outputs"])
    assert sample(values, "prefixtune_input_tokens_total", route=COMP, task="alpha") == usage["prompt_tokens"]
    assert sample(values, "prefixtune_output_tokens_total", route=COMP, task="alpha") == usage["completion_tokens"] == 6

    for name, route, count in [("prefixtune_request_latency_seconds", GEN, 1), ("prefixtune_request_latency_seconds",
                               COMP, 1), ("prefixtune_queue_seconds", GEN, 2), ("prefixtune_queue_seconds", COMP, 1),
                               ("prefixtune_time_to_first_token_seconds", COMP, 1),
                               ("prefixtune_time_to_first_token_seconds", GEN, 0),  # not streamed: no first token
                               ("prefixtune_time_per_output_token_seconds", COMP, 1)]:
        assert types[name] == "histogram" and sample(values, f"{name}_count", route=route) == count, (name, route)
    assert sample(values, "prefixtune_batch_rows_count") >= 1 and types["prefixtune_batch_rows"] == "histogram"

    prefix_bytes = sum(k.numel() * 4 + v.numel() * 4 for t in app.state.tasks.multi.tasks().values()
                       for k, v in t.prefix.kv.values())
    gauges = {"prefixtune_queue_depth": 0, "prefixtune_active_rows": 0, "prefixtune_tasks": 2,
              "prefixtune_task_bytes": prefix_bytes}
    for name, value in gauges.items():
        assert types[name] == "gauge" and sample(values, name) == value, name
    assert sample(values, "prefixtune_task_cache_hits_total") == 2 and types["prefixtune_task_cache_hits"] == "counter"

    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "prefixtune.serve.requests"]
    assert [(x["route"], x.get("task"), x["status"]) for x in lines] == [
        (GEN, "alpha", 200), (COMP, "alpha", 200), (COMP, None, 404), (GEN, None, 422)]
    assert lines[0]["output_tokens"] == sum(o["output_tokens"] for o in generated["outputs"])
    assert lines[1]["input_tokens"] == usage["prompt_tokens"] and lines[1]["output_tokens"] == 6
    assert lines[2]["error"] == "model_not_found" and all(x["latency_ms"] > 0 for x in lines)


def test_gate_refusals_are_counted(tmp_path):
    save_prefix(tmp_path / "alpha", 2, 0)
    app = create_app(MultiPrefixModel(tiny_model("llama"), byte_tokenizer()),
                     ServeSettings(prefix_dir=tmp_path, api_key="s3cret", max_body_bytes=100))

    async def calls(c):
        return [await c.post(COMP, json={"model": "alpha", "prompt": "x"}),
                await c.post(GEN, content=b"x" * 200, headers={"Authorization": "Bearer s3cret"})]

    unauthorized, too_large = _asgi_calls(app, calls)
    assert (unauthorized.status_code, too_large.status_code) == (401, 413)
    _, values = scrape(app.state.metrics.render().decode())
    assert sample(values, "prefixtune_requests_total", route=COMP, task="", status="401") == 1
    assert sample(values, "prefixtune_errors_total", route=GEN, task="", type="body_too_large") == 1
