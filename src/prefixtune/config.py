"""Typed configurations: what a prefix is, how text is laid out for a task, how to decode."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
from dataclasses import asdict, dataclass, field, fields
from typing import Any

MAX_PREFIX_LENGTH = 4096
REPARAMS = ("mlp", "table", "embedding")
VARIANTS = ("prefix", "infix")


def field_docs(cls) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal right after each field), whitespace folded,
    inherited fields included: each class's source holds only its own fields, so the MRO is read base first.
    The CLI's help texts and the server's request schema both come from here, so an option is described once."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body  # dedent: a class in a function
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


@dataclass
class PrefixConfig:
    """The trainable prefix (Li & Liang 2021, §4)."""

    prefix_length: int | None = 10
    """L, the number of prefix positions each attention layer gets. Ignored when `init_text` is set:
    then L is the number of tokens of that text. In a TrainConfig (`prefixtune train`) None, the default
    there, takes the task's default (E2E/WebNLG 5, DART 10, summarization 100)."""
    reparam: str = "mlp"
    """"mlp": P = MLP(P') during training (the paper's stable choice), dropped after training;
    "table": P is trained directly; "embedding": the embedding-only ablation (only L input embeddings
    are trained and pushed through the frozen LM)."""
    mlp_hidden: int = 512
    """Hidden width of the reparametrisation MLP (the paper: 512 for table-to-text, 800 for summarization)."""
    variant: str = "prefix"
    """"prefix": [PREFIX; x; y]; "infix": [x; INFIX; y] (ablation: source tokens do not see it)."""
    init_text: str | None = None
    """Initialise from the activations of these real words (the paper uses "table-to-text:"); None: random."""
    init_fit_steps: int = 500
    """With reparam="mlp" and init_text: Adam steps fitting the MLP output to the word activations."""
    init_fit_lr: float = 1e-3
    """Learning rate of that fit."""
    seed: int = 0
    """Seed of the random initialisation."""

    def validate(self) -> "PrefixConfig":
        """Raise ValueError with the offending value; return self for chaining."""
        if not isinstance(self.prefix_length, int) or not 1 <= self.prefix_length <= MAX_PREFIX_LENGTH:
            raise ValueError(
                f"prefix_length must be an integer in 1..{MAX_PREFIX_LENGTH}, got {self.prefix_length!r} "
                "(the paper uses 5-10 for table-to-text, 100-200 for summarization)"
            )
        if self.reparam not in REPARAMS:
            raise ValueError(f"reparam must be one of {REPARAMS}, got {self.reparam!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.mlp_hidden < 1:
            raise ValueError(f"mlp_hidden must be positive, got {self.mlp_hidden!r}")
        if self.init_text is not None and not self.init_text.strip():
            raise ValueError("init_text is empty: give real words (e.g. 'table-to-text:') or None for random init")
        if self.init_fit_steps < 0:
            raise ValueError(f"init_fit_steps must be >= 0, got {self.init_fit_steps!r}")
        if not _finite_positive(self.init_fit_lr):
            raise ValueError(f"init_fit_lr must be a finite number > 0, got {self.init_fit_lr!r}")
        return self


@dataclass
class TextFormat:
    """How a task's (source, target) pair becomes model text; saved with the prefix.

    `{eos}` is replaced by the tokenizer's end-of-text token (GPT-2: <|endoftext|>, SmolLM2:
    <|im_end|>). Decoder-only models read `source` + `target`; the loss covers `target` only.
    Encoder-decoder models feed `source` to the encoder and `target` to the decoder.
    """

    source: str = " {input} {eos}"
    """Template of the source (prompt) text; must contain {input}."""
    target: str = " {output}{eos}"
    """Template of the target text; must contain {output}. Generation stops at the end-of-text token."""

    def render_source(self, text: str, eos: str) -> str:
        return self.source.replace("{eos}", eos).replace("{input}", text)

    def render_target(self, text: str, eos: str) -> str:
        return self.target.replace("{eos}", eos).replace("{output}", text)

    def validate(self) -> "TextFormat":
        if "{input}" not in self.source:
            raise ValueError(f"TextFormat.source must contain '{{input}}', got {self.source!r}")
        if "{output}" not in self.target:
            raise ValueError(f"TextFormat.target must contain '{{output}}', got {self.target!r}")
        return self


def _finite_positive(value) -> bool:
    """A finite number > 0: what learning rates, norms and temperatures must be (inf and NaN compare
    inconsistently, so `value > 0` alone lets inf through and NaN fail with an unclear message)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


BF16_MODES = ("off", "on", "auto")
"""bf16 autocast settings (training, decoding, serving): off, on, or auto (on where measured faster, precision.py)."""


def bf16_mode(value: str | bool) -> str:
    """A bf16 setting as auto/on/off; True/False are the Python API's natural spelling of on/off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value not in BF16_MODES:
        raise ValueError(f"bf16 must be auto, on or off, got {value!r}")
    return value


@dataclass
class GenerateConfig:
    """Decoding options (the paper: beam 5, min length 5, up to 100 new tokens, no newlines)."""

    num_beams: int = 5
    """Beam width; 1 is greedy (or sampling with do_sample)."""
    max_new_tokens: int = 100
    """Upper bound on generated tokens per row."""
    min_new_tokens: int = 5
    """Rows cannot end before this many tokens."""
    do_sample: bool = False
    """Sample instead of searching."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    block_newlines: bool = True
    """Forbid tokens that contain a newline (the paper's decoding for table-to-text)."""
    length_penalty: float = 1.0
    """Beam search length penalty (transformers' definition)."""
    early_stopping: bool = True
    """Beam search ends for a row once num_beams hypotheses are finished (classic beam search); False
    keeps searching for longer, higher-scoring ones (transformers' default)."""
    bf16: str = "off"
    """bf16 autocast while decoding: on, off, or auto (on only where bf16 is measured faster than fp32 on
    this machine, see precision.py: CPU flags do not tell, bf16 is much faster than fp32 on some CPUs and
    slower on others; the README has the measurements). With bf16, outputs may differ slightly from
    fp32 and rows of a batch are only approximately independent of their neighbours."""
    batch_size: int = 16
    """Rows per generation batch in the high-level helpers."""
    seed: int | None = None
    """Seed for sampling."""

    def validate(self) -> "GenerateConfig":
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in 0..max_new_tokens ({self.max_new_tokens}), got {self.min_new_tokens!r}"
            )
        if not _finite_positive(self.temperature):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be finite, got {self.length_penalty!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")
        self.bf16 = bf16_mode(self.bf16)
        return self


def _task_choices() -> dict[str, str]:
    """Registered task names and their one-line help, for the CLI's --task (the task registry owns them)."""
    # Imported here, not at the top: task files may come to import configs (a task's TextFormat).
    from .tasks import task_help

    return task_help()


DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
REPORT_TO = ("none", "tensorboard", "wandb", "mlflow")


@dataclass
class ModelConfig:
    """The base model every command loads (`train`, `generate`, `evaluate`, `serve` share these flags)."""

    model: str = "smollm2-135m"
    """Base model: the default alias, a .gguf file, a local directory, or a Hugging Face id (downloaded into
    the hub cache unless offline; safetensors, config and tokenizer files only)."""
    allow_pickle: bool = False
    """Load a base model stored only as pickled PyTorch weights (pytorch_model.bin). Unpickling runs code
    from the file: only for files you trust. Off: safetensors weights only."""
    revision: str | None = None
    """Hub ids: the branch, tag or commit to load (default: main)."""
    offline: bool = False
    """Never contact the Hub: a hub id must already be in the local cache (as with HF_HUB_OFFLINE=1)."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code (models transformers does not know). Off: such models are
    refused; only for repositories you trust."""
    device: str = "auto"
    """Where the model runs: auto (the first CUDA GPU when there is one, else the CPU), cpu, cuda, cuda:N
    or mps."""
    dtype: str = field(default="auto", metadata={"choices": DTYPES})
    """Weight dtype: auto is float32 on CPU and MPS, bfloat16 on CUDA GPUs that support it (else float16).
    float16 on CPU is refused (slow, and some CPU kernels lack it): use float32 or bfloat16 there."""

    def validate(self) -> "ModelConfig":
        """Raise ValueError naming the option and its value (the device and dtype checked against this
        machine); return self."""
        resolve_device(self.device)
        resolve_dtype(self.dtype, self.device)
        return self


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' where torch sees a GPU, else 'cpu'; other values checked against this machine."""
    import torch  # here, not at the top: `prefixtune --help` and the configs need no torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError("device 'mps' is not available on this machine (no Apple GPU or this torch "
                             "lacks MPS): use --device cpu or auto")
        return device
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"device must be one of {', '.join(DEVICES)} (N a GPU index), got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch sees no CUDA GPU here (torch {torch.__version__}, "
                         "CUDA build: " f"{torch.version.cuda or 'none'}): use --device cpu or auto")
    if index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                         f"indices 0..{torch.cuda.device_count() - 1}")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' -> float32 on CPU/MPS, bfloat16 on CUDA where supported (else float16); float16 on CPU refused."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    device = resolve_device(device)
    if dtype == "auto":
        if not device.startswith("cuda"):
            return "float32"
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if dtype == "float16" and device == "cpu":
        raise ValueError("dtype 'float16' on device 'cpu' is refused: CPU float16 is slow and some kernels "
                         "lack it; use --dtype float32 (or bfloat16), or run on a GPU")
    return dtype


@dataclass
class TrainConfig(ModelConfig):
    """One training run (`prefixtune train`). None means: the task's default from the paper's recipe."""

    task: str = field(default="e2e", metadata={"choices": _task_choices})
    """The task: its data, its training defaults (lr, epochs, batch size, prefix length) and its metrics."""
    output: str = "runs/prefix"
    """Run directory: the best prefix (what --prefix takes elsewhere), logs, plot, resume state."""
    data_dir: str | None = None
    """Data root; else $PREFIXTUNE_DATA, else ../shared/data."""
    train_file: str | None = None
    """Training file for the jsonl/summarization tasks."""
    dev_file: str | None = None
    """Dev file for the jsonl/summarization tasks (else a dev split is drawn from the training pool)."""
    train_size: int | None = None
    """Low-data setting: draw this many training pairs (and a dev set of 30% of it) with `seed`."""
    seed: int = 0
    """Seed of the subsample, the prefix initialisation and the data order."""
    prefix: PrefixConfig = field(default_factory=lambda: PrefixConfig(prefix_length=None),
                                 metadata={"cli_skip": ("seed",)})
    """The prefix to train; prefix_length None takes the task's default. Its seed is replaced by `seed`
    (the CLI has one --seed; its other fields are flags of their own names)."""
    epochs: int | None = None
    """Passes over the training set (task default)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs when smaller)."""
    lr: float | None = None
    """Peak learning rate of AdamW (task default)."""
    batch_size: int | None = None
    """Pairs per optimizer step, over all processes and accumulation steps (task default)."""
    group_by_length: bool = True
    """Batch pairs of similar length (sorted within windows of 8 shuffled batches): less padding to compute."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (batch_size must divide evenly)."""
    warmup_steps: int = 0
    """Linear warm-up steps before the linear decay."""
    weight_decay: float = 0.0
    """AdamW weight decay (the paper: 0)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    bf16: str = "auto"
    """bf16 autocast: auto (on only where bf16 is measured faster than fp32 on this machine, decided once
    per machine, see precision.py), on, off."""
    eval_every: int | None = None
    """Evaluate dev loss every N optimizer steps (default: once per epoch)."""
    patience: int | None = None
    """Early stopping: stop after this many evaluations without dev improvement (None: never)."""
    resume_every: int = 50
    """Write the resume state (resume.py; not the final prefix, which checkpoint.py saves) every N optimizer
    steps."""
    resume: bool = False
    """Continue from the run directory's resume state."""
    max_source_tokens: int = 256
    """Longer sources are truncated (their final separator kept)."""
    max_target_tokens: int = 128
    """Longer targets are truncated (their final end-of-text kept)."""
    progress: bool = True
    """Show a progress bar."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in backward instead of keeping them: less memory for longer inputs or
    bigger batches, at the cost of about one more forward pass per step. The recomputation re-enters the prefix
    (PEFT refuses checkpointing with prefixes). The base model then runs in training mode, which transformers
    needs to checkpoint: its dropout, if it has any (SmolLM2 has none), applies."""
    max_nonfinite_steps: int = 3
    """Skip at most this many optimizer steps in a row whose loss or gradient is NaN or infinite (a rare bad
    batch); one more stops training with an error, keeping the best prefix and resume state saved so far."""
    report_to: str = field(default="none", metadata={"choices": REPORT_TO})
    """Also log train loss, lr, dev loss and the final summary to an experiment tracker through accelerate
    (main process only), besides metrics.csv and loss_curve.png; it writes under OUTPUT/trackers/. tensorboard
    needs `pip install 'prefixtune[track]'`, wandb `pip install wandb`, mlflow `pip install mlflow`."""

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the option and its value; return self. Options left as None (the task's
        default) are checked once filled in (`train.resolve`)."""
        super().validate()
        least = {"epochs": 1, "batch_size": 1, "grad_accum": 1, "resume_every": 1, "max_steps": 1,
                 "warmup_steps": 0, "max_nonfinite_steps": 0, "max_source_tokens": 1, "max_target_tokens": 1}
        for name, minimum in least.items():
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
        if self.lr is not None and not _finite_positive(self.lr):
            raise ValueError(f"lr must be > 0 and finite, got {self.lr!r} (the paper: 5e-5 to 8e-5; "
                             "low-data runs here: 5e-4)")
        if not _finite_positive(self.max_grad_norm):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {self.max_grad_norm!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.report_to not in REPORT_TO:
            raise ValueError(f"report_to must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}")
        if self.batch_size is not None and self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        return self


def to_dict(cfg: Any) -> dict:
    return asdict(cfg)


def from_dict(cls: type, data: dict) -> Any:
    """Build a config dataclass from a dict, refusing unknown keys with their names."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
    return cls(**data)


__all__ = ["PrefixConfig", "TextFormat", "GenerateConfig", "ModelConfig", "TrainConfig", "resolve_device",
           "resolve_dtype", "to_dict", "from_dict"]
