"""Decoding: one engine (engine.py) runs every request step by step over a prefix-holding cache.

- request.py: what the engine decodes (`Request`) and which options it accepts;
- step.py / beam.py: the selection policies (greedy and sampling; beam search cohorts);
- cache.py: the cache layer that holds each lane's prefix in front of its keys/values;
- api.py: `generate_ids` / `generate_texts`, the entry points of the model classes and of evaluation.
The server (serve/) hands the engine requests with callbacks; the engine knows nothing of HTTP.
"""

from .api import check_ids, decoding_kwargs, encode_sources, generate_ids, generate_texts, newline_token_ids
from .engine import Engine
from .request import Request, left_pad, supported

__all__ = ["Engine", "Request", "left_pad", "supported", "check_ids", "decoding_kwargs", "encode_sources", "generate_ids",
           "generate_texts", "newline_token_ids"]
