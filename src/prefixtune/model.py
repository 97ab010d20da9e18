"""`PrefixTuningModel`: one trainable prefix over a frozen base model, in the shape PEFT users know."""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import PreTrainedModel

from . import _compat, checkpoint, inject
from .decoding import api as gen
from .config import PrefixConfig, TextFormat
from .prefix import PrefixEncoder, PrefixKV, broadcast, flatten, roles, unflatten


class PrefixTuningModel(nn.Module):
    """A frozen base model plus one prefix (the only trainable parameters).

    Training: `forward(input_ids, attention_mask, labels)` returns the base model's output with the
    prefix in every attention layer. After training, `save_pretrained(dir)` writes only the final
    prefix; `PrefixTuningModel.from_pretrained(base, dir)` restores it for generation.
    """

    def __init__(self, base: PreTrainedModel, config: PrefixConfig | None = None, tokenizer=None,
                 text_format: TextFormat | None = None, *, _init: bool = True):
        super().__init__()
        self.config = (config or PrefixConfig()).validate()
        if self.config.variant == "infix" and _compat.is_encoder_decoder(base):
            raise ValueError("the infix variant is defined for decoder-only models ([x; INFIX; y]); "
                             f"{base.config.model_type} is encoder-decoder: use variant='prefix'")
        self.text_format = (text_format or TextFormat()).validate()
        self.base = base
        self.tokenizer = tokenizer
        base.requires_grad_(False)
        self.slots, self.shapes = inject.prepare(base)
        self._build(_init)

    # --- parametrisation -------------------------------------------------------------------------
    def _role_shapes(self, role: str) -> list[tuple[int, int]]:
        return [self.shapes[s] for s in self.slots if s[0] == role]

    def _build(self, init: bool) -> None:
        cfg = self.config
        word_kv = self._word_activations() if (init and cfg.init_text) else None
        if word_kv is not None:
            cfg.prefix_length = next(iter(word_kv.values()))[0].shape[1]
        with torch.random.fork_rng():  # seeded init without disturbing the caller's RNG stream
            torch.manual_seed(cfg.seed)
            if cfg.reparam == "embedding":
                self.encoders = nn.ModuleDict()
                self.virtual_embeddings = nn.Parameter(self._initial_embeddings())
                return
            d_model = _compat.embedding_dim(self.base)
            self.encoders = nn.ModuleDict({
                role: PrefixEncoder(cfg.prefix_length, sum(2 * h * d for h, d in self._role_shapes(role)),
                                    d_model, cfg.reparam, cfg.mlp_hidden)
                for role in roles(self.slots)
            })
        if word_kv is not None:
            for role, enc in self.encoders.items():
                enc.fit(flatten(word_kv, role), cfg.init_fit_steps, cfg.init_fit_lr)

    def _init_token_ids(self) -> torch.Tensor:
        if self.tokenizer is None:
            raise ValueError("PrefixConfig.init_text needs a tokenizer: pass tokenizer= to PrefixTuningModel")
        ids = self.tokenizer(self.config.init_text, add_special_tokens=False, return_tensors="pt").input_ids
        if ids.shape[1] == 0:
            raise ValueError(f"init_text {self.config.init_text!r} tokenizes to nothing")
        return ids.to(self._device())

    @torch.no_grad()
    def _word_activations(self) -> dict:
        """Per-slot keys/values of the frozen LM reading `init_text`: (KVH, L, D) each."""
        found = inject.run_capture(self.base, self._init_token_ids())
        return {s: (k[0].float(), v[0].float()) for s, (k, v) in found.items()}

    def _initial_embeddings(self) -> torch.Tensor:
        """Embedding-only ablation: start from the words' embeddings, or random at the embeddings' scale."""
        table = self.base.get_input_embeddings().weight.detach()
        if self.config.init_text:
            return table[self._init_token_ids()[0]].float().clone()
        return torch.randn(self.config.prefix_length, table.shape[1]) * table.float().std()

    def _device(self) -> torch.device:
        return next(self.base.parameters()).device

    def prefix_kv(self) -> PrefixKV:
        """The current prefix P, differentiable w.r.t. the trainable parameters."""
        if self.config.reparam == "embedding":
            found = inject.run_capture(self.base, inputs_embeds=self.virtual_embeddings[None].to(self._device()))
            return PrefixKV({s: (k[0], v[0]) for s, (k, v) in found.items()}, infix=self.config.variant == "infix")
        kv = {}
        for role, enc in self.encoders.items():
            kv.update(unflatten(enc(), role, self._role_shapes(role)))
        return PrefixKV(kv, infix=self.config.variant == "infix")

    def finalize(self) -> PrefixKV:
        """Compute P once and replace the parametrisation by a plain table (drops P' and the MLP)."""
        with torch.no_grad():
            final = self.prefix_kv().detach()
        self.config.reparam = "table"
        if hasattr(self, "virtual_embeddings"):
            del self.virtual_embeddings
        d_model = _compat.embedding_dim(self.base)
        self.encoders = nn.ModuleDict()
        for role in roles(self.slots):
            flat = flatten(final.kv, role)
            enc = PrefixEncoder(flat.shape[0], flat.shape[1], d_model, "table", 1).to(flat.device)
            enc.table.data.copy_(flat)
            self.encoders[role] = enc
        return final

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward to save memory; recomputation re-enters the prefix context.

        transformers only checkpoints modules in training mode: call `base.train()` too (and mind the
        base model's dropout, which the paper keeps off)."""
        _compat.enable_checkpointing(self.base, inject.checkpoint_context)

    def num_prefix_parameters(self) -> int:
        """Numbers in the final prefix P (what is saved), not counting the MLP."""
        return sum(2 * self.config.prefix_length * h * d for h, d in self.shapes.values())

    # --- running --------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """The base model's forward with this prefix on every row ([PREFIX; x] for decoder-only)."""
        return self.run(self.base, input_ids, attention_mask, **kwargs)

    def run(self, module: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            infix_boundary: torch.Tensor | None = None, **kwargs):
        """Call `module` (the base model, or its backbone) with the prefix active and positions after it.

        Infix variant: `infix_boundary` (B,) is the index of each row's separator token (the last source
        token); it and everything after see the infix, the source before it does not.
        """
        gen.check_ids(input_ids)
        if _compat.checkpointing_without(self.base, inject.checkpoint_context):
            raise ValueError("gradient checkpointing was enabled on the base model directly; its recomputation "
                             "would run without the prefix. Use PrefixTuningModel.enable_gradient_checkpointing()")
        infix = self.config.variant == "infix"
        if infix and infix_boundary is None:
            raise ValueError("the infix variant needs infix_boundary= (index of each row's last source token)")
        boundary = infix_boundary if infix else None
        batch = broadcast(self.prefix_kv(), input_ids.shape[0], boundary)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not _compat.is_encoder_decoder(self.base):
            offsets = torch.full((input_ids.shape[0],), self.config.prefix_length, device=input_ids.device)
            kwargs.setdefault("position_ids", inject.position_ids(attention_mask, offsets, boundary))
        with inject.active(batch):
            return module(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """transformers' `generate` with this prefix on every row (left-padded input)."""
        prefix = self.prefix_kv().detach()
        return gen.generate_ids(self.base, [prefix] * input_ids.shape[0], input_ids, attention_mask, **kwargs)

    # --- persistence ----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, extra: dict | None = None, *,
                        card: dict | None = None) -> None:
        """Write prefix.safetensors + prefix_config.json: the final prefix only (no MLP, no base weights), and
        README.md, a model card (modelcard.py) of the base model, the prefix's size and the facts in `card`.

        `extra`: more JSON-able facts for the config file (e.g. how it was trained). `card`: modelcard.CardFacts
        fields (task, train_pairs, dev_pairs, data, steps, total_steps, train_loss, dev_loss, scores)."""
        from . import modelcard

        with torch.no_grad():
            final = self.prefix_kv().detach()
        facts = {"base_model": str(getattr(self.base.config, "_name_or_path", "") or self.base.config.model_type),
                 "model_type": self.base.config.model_type, "prefix_parameters": final.num_parameters(),
                 "base_parameters": sum(p.numel() for p in self.base.parameters()),
                 "prefix_length": final.length, **(card or {})}
        modelcard.CardFacts.from_dict({**facts, "weights_sha256": "0" * 64})  # a bad fact fails before any write
        path = checkpoint.save(directory, final, self.base, self.config, self.text_format, extra)
        # The card is renamed into place right after the pair's commit; it names the weights' checksum, so a
        # card older than its prefix (a kill between the two renames) is recognised, and never uploaded.
        facts["weights_sha256"] = checkpoint.read_meta(path)["weights_sha256"]
        modelcard.write(path, modelcard.render(facts))

    def push_to_hub(self, repo_id: str, *, token: str | None = None, private: bool = False,
                    revision: str | None = None, commit_message: str | None = None) -> str:
        """Save this prefix (with its model card) and upload it to the Hub repository `repo_id` (created if
        missing); returns the commit's URL. A trained run's directory: `hub_push.push_folder` (`prefixtune push`)
        uploads it with the training facts in its card."""
        import tempfile

        from . import hub_push

        with tempfile.TemporaryDirectory(prefix="prefixtune-push-") as tmp:
            self.save_pretrained(tmp)
            return hub_push.push_folder(tmp, repo_id, token=token, private=private, revision=revision,
                                        commit_message=commit_message)

    @classmethod
    def from_peft(cls, base: PreTrainedModel, directory: str | os.PathLike, tokenizer=None) -> "PrefixTuningModel":
        """Import a PEFT PrefixTuning checkpoint (adapter_config.json + adapter_model.safetensors)."""
        from .peft_import import load_peft_prefix

        prefix = load_peft_prefix(directory, base, inject.prepare(base)[1])
        return cls._with_prefix(base, prefix, PrefixConfig(prefix_length=prefix.length, reparam="table"),
                                tokenizer, TextFormat())

    @classmethod
    def _with_prefix(cls, base, prefix: PrefixKV, config: PrefixConfig, tokenizer, text_format) -> "PrefixTuningModel":
        model = cls(base, config, tokenizer, text_format, _init=False)
        for role, enc in model.encoders.items():
            enc.table.data.copy_(flatten(prefix.kv, role))
        return model

    @classmethod
    def from_pretrained(cls, base: PreTrainedModel, directory: str | os.PathLike, tokenizer=None) -> "PrefixTuningModel":
        """Load a saved prefix onto `base`; refuses a prefix made for another model shape."""
        loaded = checkpoint.load_for(directory, base, inject.prepare(base)[1])
        cfg = loaded.config
        cfg.reparam, cfg.init_text = "table", None
        return cls._with_prefix(base, loaded.prefix, cfg, tokenizer, loaded.text_format)
