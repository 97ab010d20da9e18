"""The OpenAI-compatible routes, driven by the official `openai` client against uvicorn on 127.0.0.1.

Every text is checked against `MultiPrefixModel.generate` on a second copy of the model (and against
/v1/generate for the same request): the OpenAI routes must decode exactly as the native one does.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import openai
import pytest

from conftest import byte_tokenizer, tiny_model
from prefixtune import GenerateConfig, MultiPrefixModel
from prefixtune.config import TextFormat
from prefixtune.decoding import generate_texts
from prefixtune.serve import ServeSettings, create_app
from prefixtune.serve.openai_routes import RAW, _generate_request
from prefixtune.serve.openai_schema import ChatCompletionRequest, CompletionRequest
from test_app import TIMEOUT, LiveServer, save_prefix

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
"""A small chat template (the byte tokenizer has none)."""


def chat_tokenizer():
    tok = byte_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


TASKS = {"alpha": (3, None), "beta": (6, TextFormat(source="{input} =>{eos}")), "gamma": (1, None)}
"""name -> (prefix length, text format); seeds are the positions."""


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefixes")
    ref = MultiPrefixModel(tiny_model("llama"), chat_tokenizer())  # the reference: each request decoded alone
    for seed, (name, (length, fmt)) in enumerate(TASKS.items()):
        save_prefix(root / name, length, seed, fmt)
        ref.add(f"{name}-chat", ref.add(name, root / name).prefix, RAW)
    settings = ServeSettings(prefix_dir=root, max_batch_size=8, max_wait_ms=20, max_new_tokens=40,
                             default_new_tokens=12, max_input_tokens=60, max_inputs_per_request=6)
    app = create_app(MultiPrefixModel(tiny_model("llama"), chat_tokenizer()), settings)
    with LiveServer(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
        yield SimpleNamespace(url=url, app=app, ref=ref, client=client)


def greedy(max_new_tokens: int = 12, block_newlines: bool = True, min_new_tokens: int = 0) -> GenerateConfig:
    return GenerateConfig(num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                          block_newlines=block_newlines)


def chat_prompt(messages: list[dict]) -> str:
    return chat_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_completion_equals_generate_and_reference(live):
    resp = live.client.completions.create(model="beta", prompt="name[Eagle]", max_tokens=10, temperature=0)
    native = httpx.post(f"{live.url}/v1/generate", json={"task": "beta", "input": "name[Eagle]", "max_new_tokens": 10},
                        timeout=TIMEOUT).json()["outputs"][0]
    (choice,) = resp.choices
    assert choice.text == native["text"] == live.ref.generate(["name[Eagle]"], ["beta"], greedy(10))[0]
    assert choice.finish_reason == native["finish_reason"] and resp.model == "beta" and resp.object == "text_completion"
    assert resp.usage.prompt_tokens == native["input_tokens"] and resp.usage.completion_tokens == native["output_tokens"]
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_list_prompts_with_n_samples_choice_k_with_seed_plus_k(live):
    prompts, options = ["first", "a second prompt"], dict(temperature=1.3, top_p=0.9, seed=4)
    resp = live.client.completions.create(model="alpha", prompt=prompts, n=2, max_tokens=9, **options)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    for k, choice in enumerate(resp.choices):
        config = GenerateConfig(num_beams=1, max_new_tokens=9, min_new_tokens=0, do_sample=True, temperature=1.3,
                                top_p=0.9, seed=4 + k)
        assert choice.text == live.ref.generate([prompts[k // 2]], ["alpha"], config)[0], k
    native = httpx.post(f"{live.url}/v1/generate", timeout=TIMEOUT, json={
        "task": "alpha", "input": [p for p in prompts for _ in range(2)], "max_new_tokens": 9, "do_sample": True,
        "temperature": 1.3, "top_p": 0.9, "seed": 4}).json()["outputs"]
    assert [c.text for c in resp.choices] == [o["text"] for o in native]
    assert resp.usage.prompt_tokens == native[0]["input_tokens"] + native[2]["input_tokens"]  # once per prompt


def test_base_model_reads_the_raw_prompt(live):
    base = live.client.models.list().data[0].id
    resp = live.client.completions.create(model=base, prompt="plain text", max_tokens=8, temperature=0)
    ref = live.ref
    expected = generate_texts(ref.base, ref.tokenizer, [None], ["plain text"], [RAW], greedy(8))[0]
    assert resp.choices[0].text == expected


def test_chat_uses_the_template_then_the_prefix(live):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    resp = live.client.chat.completions.create(model="gamma", messages=messages, max_tokens=10, temperature=0)
    expected = live.ref.generate([chat_prompt(messages)], ["gamma-chat"], greedy(10, block_newlines=False))[0]
    assert resp.choices[0].message.content == expected and resp.choices[0].message.role == "assistant"
    assert resp.object == "chat.completion" and resp.usage.completion_tokens > 0


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_stream_adds_up_to_the_plain_answer(live, route):
    if route == "chat":
        kwargs = dict(messages=[{"role": "user", "content": "stream me"}])
        create = live.client.chat.completions.create
        text_of = lambda c: c.message.content  # noqa: E731
        delta_of = lambda c: c.delta.content or ""  # noqa: E731
    else:
        kwargs = dict(prompt=["stream me", "and me"])
        create = live.client.completions.create
        text_of = delta_of = lambda c: c.text  # noqa: E731
    common = dict(model="beta", max_tokens=14, temperature=1.2, seed=7, **kwargs)
    plain = create(**common)
    chunks = list(create(**common, stream=True, stream_options={"include_usage": True}))
    texts, finishes = {}, {}
    for chunk in chunks[:-1]:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + delta_of(c)
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert [texts[i] for i in range(len(plain.choices))] == [text_of(c) for c in plain.choices]
    assert [finishes[i] for i in range(len(plain.choices))] == [c.finish_reason for c in plain.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_stop_sequence_cuts_the_text_and_the_work(live, stream):
    prompts = ["stop here", "run on"]
    full, other = (live.ref.generate([p], ["alpha"], greedy(40))[0] for p in prompts)
    # two characters (two byte tokens): a stream must hold the first back until it knows the second
    stop = next(full[i:i + 2] for i in range(2, 20) if full[i:i + 2].isascii() and full[i:i + 2].isprintable()
                and full.find(full[i:i + 2]) == i and full[i:i + 2] not in other)
    metrics = live.app.state.metrics
    single_passes = lambda: metrics.total("prefixtune_batch_rows_bucket", le="1.0")  # noqa: E731
    before = single_passes()
    request = dict(model="alpha", prompt=prompts, max_tokens=40, temperature=0, stop=[stop, "never-generated"])
    if stream:
        texts, finishes = ["", ""], [None, None]
        for chunk in live.client.completions.create(**request, stream=True):
            for c in chunk.choices:
                texts[c.index] += c.text
                finishes[c.index] = c.finish_reason or finishes[c.index]
    else:
        choices = live.client.completions.create(**request).choices
        texts, finishes = [c.text for c in choices], [c.finish_reason for c in choices]
    assert texts == [full[: full.find(stop)].strip(), other] and finishes == ["stop", "length"]
    assert single_passes() - before >= 15  # the stopped row left the batch: "run on" decoded on alone


def test_translation_to_the_generate_request():
    def native(route_chat: bool, **fields):
        body = (ChatCompletionRequest(messages=[{"role": "user", "content": "m"}], model="t", **fields) if route_chat
                else CompletionRequest(model="t", prompt="p", **fields))
        return _generate_request(body, "t", ["p", "q"], route_chat)

    assert native(False, n=2).input == ["p", "p", "q", "q"]  # choice k is input k: prompt k // n
    plain, chat = native(False), native(True)
    assert (plain.do_sample, plain.temperature, plain.block_newlines) == (True, 1.0, True)  # OpenAI's default: sampling
    assert (chat.do_sample, chat.block_newlines) == (True, False)  # chat answers may span lines
    greedy_ = native(False, temperature=0, top_p=0.5)
    assert (greedy_.do_sample, greedy_.temperature, greedy_.top_p) == (False, 1.0, 1.0)
    beams = native(False, num_beams=3)
    assert (beams.num_beams, beams.do_sample) == (3, False)  # beam search without a temperature: no sampling
    extras = native(True, block_newlines=True, min_tokens=2, length_penalty=0.5, seed=3, max_tokens=7)
    assert (extras.block_newlines, extras.min_new_tokens, extras.length_penalty, extras.seed,
            extras.max_new_tokens) == (True, 2, 0.5, 3, 7)


def test_models_lists_the_base_and_the_tasks(live):
    models = live.client.models.list().data
    base, tasks = models[0], {m.id: m for m in models[1:]}
    assert set(tasks) == {"alpha", "beta", "gamma"} and base.parent is None and base.owned_by == "prefixtune"
    assert tasks["beta"].prefix_length == 6 and tasks["beta"].parent == base.id and tasks["beta"].created > 0
    assert tasks["alpha"].num_parameters == live.ref.tasks()["alpha"].prefix.num_parameters()


def test_bad_requests_get_openai_errors_never_5xx(live):
    c = live.client

    def check(error: type, code: str, param: str | None, call, *words: str) -> None:
        with pytest.raises(error) as caught:
            call()
        body = caught.value.body
        assert (body["code"], body["param"]) == (code, param), body
        assert body["type"] == "invalid_request_error" and all(w in body["message"] for w in words), body

    complete = lambda **kw: c.completions.create(**{"model": "alpha", "prompt": "x", **kw})  # noqa: E731
    chat = lambda **kw: c.chat.completions.create(**{"model": "alpha", **kw})  # noqa: E731
    bad = openai.BadRequestError
    check(openai.NotFoundError, "model_not_found", "model", lambda: complete(model="nope"), "'nope'", "alpha")
    check(bad, "invalid_task_name", "model", lambda: complete(model="../alpha"), "'../alpha'")
    check(bad, "invalid_request", "max_tokens", lambda: complete(max_tokens="lots"), "'lots'")
    check(bad, "invalid_request", "colour", lambda: complete(extra_body={"colour": "red"}), "colour")
    check(bad, "invalid_request", "temperature", lambda: complete(temperature=5), "temperature")
    check(bad, "invalid_request", "n", lambda: complete(n=2, extra_body={"num_beams": 2}), "n=2", "num_beams=2")
    check(bad, "invalid_request", "temperature", lambda: complete(temperature=0.7, extra_body={"num_beams": 2}))
    check(bad, "invalid_request", None, lambda: complete(stream=True, extra_body={"num_beams": 2}), "num_beams=1")
    check(bad, "invalid_request", None, lambda: complete(max_tokens=41), "limit of 40")
    check(bad, "invalid_request", "n", lambda: complete(prompt=["a", "b", "c"], n=3), "9 choices", "at most 6")
    check(bad, "invalid_request", "stop", lambda: complete(stop=["a", "b", "c", "d", "e"]), "up to 4")
    check(bad, "invalid_request", "prompt", lambda: complete(prompt=[]), "empty")
    check(bad, "invalid_request", "prompt.str", lambda: complete(prompt=[1, 2, 3]))
    check(bad, "input_too_long", None, lambda: complete(prompt="y" * 100), "at most 60")
    check(bad, "unsupported_parameter", "logprobs", lambda: complete(logprobs=2), "not supported")
    check(bad, "unsupported_parameter", "presence_penalty", lambda: complete(presence_penalty=0.5))
    check(bad, "invalid_request", "messages", lambda: chat(messages=[]), "at least 1")
    check(bad, "invalid_request", "messages.0.role",
          lambda: chat(messages=[{"role": "robot", "content": "hi"}]), "robot")
    malformed = httpx.post(f"{live.url}/v1/completions", content=b'{"model": ', timeout=TIMEOUT,
                           headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_json"


def test_chat_without_a_template_is_refused(tmp_path):
    save_prefix(tmp_path / "alpha", 2, 0)
    app = create_app(MultiPrefixModel(tiny_model("llama"), byte_tokenizer()), ServeSettings(prefix_dir=tmp_path))
    with LiveServer(app, lifespan="off") as url:  # refused before anything is queued: no worker needed
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["code"] == "no_chat_template" and "/v1/completions" in caught.value.body["message"]


def test_concurrent_mixed_requests_equal_alone(live):
    messages = [{"role": "user", "content": "chat along"}]
    requests = [
        ("completions", dict(model="alpha", prompt="name[Eagle]", max_tokens=8, temperature=0)),
        ("completions", dict(model="beta", prompt=["q", "longer prompt here"], max_tokens=11, temperature=0)),
        ("chat", dict(model="gamma", messages=messages, max_tokens=9, temperature=0)),
        ("completions", dict(model="gamma", prompt="sample", max_tokens=7, temperature=1.5, seed=3, n=2)),
        ("completions", dict(model="alpha", prompt="beam me", max_tokens=6, extra_body={"num_beams": 3})),
        ("chat", dict(model="beta", messages=messages, max_tokens=12, seed=9, stream=False)),
        ("completions", dict(model="beta", prompt="min len", max_tokens=10, temperature=0,
                             extra_body={"min_tokens": 10, "block_newlines": False})),
    ]
    client = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)

    async def send(route, kwargs):
        api = client.chat.completions if route == "chat" else client.completions
        return await api.create(**kwargs)

    async def send_all():
        return await asyncio.gather(*(send(r, kw) for r, kw in requests))

    together = asyncio.run(send_all())
    for (route, kwargs), resp in zip(requests, together):
        texts = [c.message.content if route == "chat" else c.text for c in resp.choices]
        assert texts == expected(live.ref, route, kwargs), kwargs


def expected(ref: MultiPrefixModel, route: str, kwargs: dict) -> list[str]:
    """What each choice of an OpenAI request means, decoded alone by the reference model."""
    extra, n = kwargs.get("extra_body", {}), kwargs.get("n", 1)
    beams = extra.get("num_beams", 1)
    temperature = kwargs.get("temperature", 0.0 if beams > 1 else 1.0)
    chat = route == "chat"
    prompts = [chat_prompt(kwargs["messages"])] if chat else [kwargs["prompt"]] if isinstance(kwargs["prompt"], str) \
        else kwargs["prompt"]
    task = f"{kwargs['model']}-chat" if chat else kwargs["model"]
    out = []
    for k in range(len(prompts) * n):
        seed = kwargs.get("seed")
        config = GenerateConfig(num_beams=beams, max_new_tokens=kwargs["max_tokens"],
                                min_new_tokens=extra.get("min_tokens", 0), do_sample=temperature > 0,
                                temperature=temperature or 1.0, block_newlines=extra.get("block_newlines", not chat),
                                seed=None if seed is None else seed + k)
        out.append(ref.generate([prompts[k // n]], [task], config)[0])
    return out
