"""OpenAI answers from a request's row events: each choice's text with stop sequences applied, the part
of it that is safe to stream, and the completion / chat-completion shapes of responses and chunks.

A choice's text is what /v1/generate answers for the same row (special tokens skipped, stripped),
cut before the first stop sequence. A stream sends only text that the final answer is sure to begin
with: leading and trailing whitespace is held back (the final text is stripped), and so are the last
`len(longest stop) - 1` characters, which could still turn out to begin a stop sequence. The deltas of
a stream therefore add up to exactly the non-streamed text.
"""

from __future__ import annotations

import json
import time
import uuid

from pydantic import BaseModel

from .openai_schema import (AssistantMessage, ChatChoice, ChatCompletion, Completion, CompletionChoice, Usage,
                            error_body)


class ChoiceText:
    """One choice: fed the row's events, it knows its text, token count and finish reason."""

    def __init__(self, stops: list[str], prompt_tokens: int):
        self.stops, self.prompt_tokens = stops, prompt_tokens
        self.hold = max(map(len, stops), default=1) - 1
        self.raw = ""
        """Streamed text so far (the row's token deltas), not stripped."""
        self.text = ""
        """Text sent so far while streaming; the whole text once finished."""
        self.tokens = 0
        self.finish: str | None = None

    def see(self, kind: str, data: dict) -> str:
        """Take a "token" or "done" event; return the new text that may be streamed now."""
        if self.finish is not None:
            return ""  # finished at a stop sequence: later events of the cancelled row do not count
        if kind == "token":
            self.tokens += 1
            self.raw += data["text"]
            cut = self._cut(self.raw)
            if cut is None:
                return self._release(self.raw[: len(self.raw) - self.hold])
            self.finish = "stop"
            return self._release(self.raw[:cut])
        self.tokens = data["output_tokens"]
        cut = self._cut(data["text"])
        self.finish = data["finish_reason"] if cut is None else "stop"
        return self._release(data["text"][:cut])

    def _cut(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _release(self, text: str) -> str:
        visible = text.strip()
        if self.finish is not None:
            new, self.text = visible[len(self.text):] if visible.startswith(self.text) else "", visible
            return new
        if not visible.startswith(self.text):  # the tokenizer re-decoded earlier text differently: wait for the end
            return ""
        new, self.text = visible[len(self.text):], visible
        return new


def usage(choices: list[ChoiceText], n: int) -> Usage:
    """Prompt tokens once per prompt (choices come n per prompt), completion tokens of every choice."""
    prompt = sum(c.prompt_tokens for c in choices[::n])
    completion = sum(c.tokens for c in choices)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class Shape:
    """How one kind of answer looks: `completion` (text_completion) or `chat` (chat.completion)."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def response(self, choices: list[ChoiceText], n: int) -> BaseModel:
        common = dict(id=self.id, created=self.created, model=self.model, usage=usage(choices, n))
        if self.chat:
            return ChatCompletion(choices=[ChatChoice(index=i, message=AssistantMessage(content=c.text),
                                                      finish_reason=c.finish) for i, c in enumerate(choices)], **common)
        return Completion(choices=[CompletionChoice(index=i, text=c.text, finish_reason=c.finish)
                                   for i, c in enumerate(choices)], **common)

    def opening(self, count: int) -> list[str]:
        """Chunks before any text: a chat stream first announces each choice's role."""
        if not self.chat:
            return []
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for i in range(count)]

    def delta(self, index: int, text: str, finish: str | None) -> str:
        if self.chat:
            choice = {"index": index, "delta": {"content": text} if text else {}, "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        return self._chunk([choice])

    def usage_chunk(self, choices: list[ChoiceText], n: int) -> str:
        return self._chunk([], usage=usage(choices, n).model_dump())

    def _chunk(self, choices: list[dict], **extra) -> str:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return sse({"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                    **extra})


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def sse_error(status: int, code: str, message: str) -> str:
    """A stream's last event when it fails after its 200 (the `openai` client raises APIError on it)."""
    return sse(error_body(status, code, message))


DONE = "data: [DONE]\n\n"
