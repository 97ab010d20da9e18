"""`prefixtune train|generate|evaluate|score|serve|export`: each subcommand maps onto a plain function.

Options of `train` and the decoding options come straight from the typed configs (TrainConfig,
GenerateConfig): one flag per field, its help text the field's docstring.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing

from . import allocator
from .config import GenerateConfig, ModelConfig, TrainConfig, field_docs
from .extras import MissingExtra, require


def _field_docs(cls) -> dict[str, str]:
    """config.field_docs with '%' escaped: argparse %-formats help texts."""
    return {name: text.replace("%", "%%") for name, text in field_docs(cls).items()}


def _choices_help(choices) -> str:
    """' One of: a: its help; b: its help.' for a mapping of value -> one-line help, else the values."""
    items = [f"{value}: {text}" for value, text in choices.items()] if isinstance(choices, dict) else choices
    return (" One of: " + "; ".join(map(str, items)) + ".").replace("%", "%%")  # argparse formats help


def _add_dataclass_options(parser: argparse.ArgumentParser, cls, skip=(), defaults=None) -> None:
    """One flag per field of the config dataclass `cls`: its help the field's docstring, its default the
    value in `defaults` (else in a default `cls()`).

    A field whose type is a dataclass is flattened: its fields become flags of their own names, except
    those in its metadata["cli_skip"] (the outer config sets them), so nesting a config changes no flag.
    metadata["choices"] (values, a value -> help mapping, or a callable returning either) restricts a
    flag to those values and lists them in its help.
    """
    docs, hints = _field_docs(cls), typing.get_type_hints(cls)
    defaults = cls() if defaults is None else defaults
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default, kind = getattr(defaults, f.name), hints[f.name]
        if dataclasses.is_dataclass(kind):
            _add_dataclass_options(parser, kind, f.metadata.get("cli_skip", ()), default)
            continue
        flag = "--" + f.name.replace("_", "-")
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        text = docs.get(f.name, "") + (f" (default: {default})" if default is not None else "")
        choices = f.metadata.get("choices")
        choices = choices() if callable(choices) else choices
        restrict = {} if choices is None else {"choices": list(choices)}
        text += "" if choices is None else _choices_help(choices)
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            parser.add_argument(flag, type=base, default=default, dest=f.name, help=text, **restrict)


def _config_from(args: argparse.Namespace, cls, skip=(), defaults=None):
    """The config `cls` from flags added by `_add_dataclass_options`: flattened fields are gathered back
    into their nested config; skipped fields keep the value in `defaults` (else in a default `cls()`)."""
    hints = typing.get_type_hints(cls)
    defaults = cls() if defaults is None else defaults
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            values[f.name] = getattr(defaults, f.name)
        elif dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = _config_from(args, hints[f.name], f.metadata.get("cli_skip", ()), getattr(defaults, f.name))
        else:
            values[f.name] = getattr(args, f.name)
    return cls(**values)


def _parse_prefixes(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--prefix expects NAME=DIR, got {item!r}")
        out[name] = path
    return out


def cmd_train(args) -> int:
    from .train import train

    summary = train(_config_from(args, TrainConfig))
    print(json.dumps(summary, indent=2))
    return 0


def _load_multi(args, prefixes: dict[str, str]):
    from . import base_model
    from .multi import MultiPrefixModel

    from .config import TextFormat
    from .peft_import import is_peft_checkpoint

    peft_format = TextFormat(source=args.peft_source_format).validate()  # before minutes of loading
    base, tokenizer = base_model.load(model_config(args))
    multi = MultiPrefixModel(base, tokenizer)
    for name, path in prefixes.items():
        multi.add(name, path, peft_format if is_peft_checkpoint(path) else None)
    return multi


def cmd_generate(args) -> int:
    model_config(args).validate()  # a bad --device or --dtype before stdin is read
    prefixes = _parse_prefixes(args.prefix)
    src = open(args.input) if args.input else sys.stdin
    records = []
    for n, line in enumerate(src, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{args.input or 'stdin'} line {n} is not JSON: {err}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("input"), str):
            raise ValueError(f"line {n} needs an object with a string 'input' (and a 'task'), got {line.strip()[:80]!r}")
        if rec.get("task") is not None and rec["task"] not in prefixes:
            raise ValueError(f"line {n} asks for task {rec['task']!r}; --prefix gave {sorted(prefixes) or 'none'}")
        records.append(rec)
    multi = _load_multi(args, prefixes)
    outputs = multi.generate([r["input"] for r in records], [r.get("task") for r in records],
                             _config_from(args, GenerateConfig))
    dst = open(args.output, "w") if args.output else sys.stdout
    for rec, text in zip(records, outputs):
        dst.write(json.dumps({**rec, "output": text}, ensure_ascii=False) + "\n")
    dst.flush()
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate, format_table, prefix_summary

    require("metrics")  # before minutes of decoding, not at the scoring step after them
    model_config(args).validate()
    multi = _load_multi(args, {args.task: args.prefix})
    print(prefix_summary(args.prefix), file=sys.stderr)
    report = evaluate(multi, args.task, args.task, args.split, args.output, _config_from(args, GenerateConfig),
                      args.data_dir, args.file, args.limit)
    print(f"{args.task}/{args.split}: {report['sources']} sources, generation {report['generation_seconds']} s "
          f"({'bf16 autocast' if report['decoding']['bf16_used'] else 'fp32'}), predictions and scores.json in {args.output}")
    print(format_table(args.task, report["scores"]))
    return 0


def cmd_score(args) -> int:
    from . import metrics
    from .evaluate import format_table, score
    from .tasks import SourceGroup, load_groups

    predictions = metrics.read_predictions(args.predictions)
    if args.references:
        groups = [SourceGroup(source=str(i), references=tuple(r), meta={})
                  for i, r in enumerate(metrics.read_references(args.references))]
    else:
        groups = load_groups(args.task, args.split, args.data_dir, path=args.file)
    if len(predictions) != len(groups):
        raise ValueError(f"{args.predictions} has {len(predictions)} predictions but {args.task}/{args.split} "
                         f"has {len(groups)} sources (one line per source, in dataset order)")
    scores = score(args.task, predictions, groups)
    print(json.dumps(scores) if args.json else format_table(args.task, scores))
    return 0


def cmd_push(args) -> int:
    import os

    from .hub_push import push_folder

    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            raise ValueError(f"--token-env {args.token_env}: the environment variable {args.token_env} is not set "
                             "or empty; export the token there, or leave --token-env out to use HF_TOKEN")
    url = push_folder(args.directory, args.repo_id, token=token, private=args.private, revision=args.revision)
    print(url)
    return 0


def cmd_serve(args) -> int:
    from .serve import cli_main

    return cli_main(args)


def cmd_export(args) -> int:
    from .peft_export import export

    out = export(args.prefix, args.out, args.to)
    print(f"wrote a PEFT PrefixTuning checkpoint to {out}: peft.PeftModel.from_pretrained(base, {str(out)!r}) "
          "loads it", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefixtune", description="Prefix-tuning for frozen language models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a prefix on a task", description=TrainConfig.__doc__)
    _add_dataclass_options(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="generate for JSONL inputs, any mix of tasks per batch")
    add_model_options(p)
    p.add_argument("--prefix", action="append", metavar="NAME=DIR",
                   help="a task name and its prefix directory (or PEFT PrefixTuning checkpoint); repeatable")
    add_peft_format_option(p)
    p.add_argument("--input", help='JSONL file of {"task": NAME, "input": TEXT} (default: stdin)')
    p.add_argument("--output", help="JSONL output, each input line plus 'output' (default: stdout)")
    _add_dataclass_options(p, GenerateConfig)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("evaluate", help="generate for a split and print its official scores")
    add_model_options(p)
    p.add_argument("--prefix", required=True, help="prefix directory (a training run's --output, or a PEFT "
                   "PrefixTuning checkpoint)")
    add_peft_format_option(p)
    _add_data_options(p)
    p.add_argument("--limit", type=int, help="evaluate only the first N sources (a documented subset)")
    p.add_argument("--output", required=True, help="directory for predictions.txt and scores.json")
    _add_dataclass_options(p, GenerateConfig)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("score", help="score a predictions file with the task's official metrics")
    _add_data_options(p)
    p.add_argument("--predictions", required=True, help="one line per source, in dataset order")
    p.add_argument("--references", help="e2e-metrics style references (blank line between sources) instead of a task split")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("export", help="write a saved prefix as a PEFT PrefixTuning checkpoint")
    # any --to value is taken, so that a wrong one fails in one line naming it (argparse's choices add a usage line)
    p.add_argument("--to", required=True, metavar="FORMAT", help="format to write; only 'peft' (a PEFT PrefixTuning "
                   "checkpoint: adapter_config.json + adapter_model.safetensors, for decoder-only models)")
    p.add_argument("--prefix", required=True, metavar="DIR", help="saved prefix directory (a training run's --output)")
    p.add_argument("out", metavar="OUT", help="directory to create (or an empty one)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("push", help="upload a saved prefix (and its model card) to the Hugging Face Hub")
    p.add_argument("directory", metavar="DIR", help="a saved prefix (a training run's --output)")
    p.add_argument("repo_id", metavar="REPO_ID", help="the model repository, e.g. you/e2e-prefix (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private (an existing one keeps "
                   "its visibility)")
    p.add_argument("--revision", help="branch to commit to (created from main if missing; default: main)")
    p.add_argument("--token-env", metavar="VAR", help="read the Hub token from environment variable VAR "
                   "(default: HF_TOKEN, or the token `hf auth login` stored)")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("serve", help="HTTP server: one base model, many task prefixes, mixed batches")
    from .serve import add_cli_arguments  # fastapi is imported only when the CLI is built

    add_cli_arguments(p)
    p.set_defaults(func=cmd_serve)
    return parser


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model, --revision, --device, --dtype and the rest: ModelConfig's fields, declared once (`train` gets
    them as TrainConfig's inherited fields, `serve` through its add_cli_arguments)."""
    _add_dataclass_options(p, ModelConfig)


def add_peft_format_option(p: argparse.ArgumentParser) -> None:
    """--peft-source-format, declared once for `generate`, `evaluate` and `serve` (ServeSettings.peft_source_format)."""
    from .config import TextFormat

    default = TextFormat().source
    p.add_argument("--peft-source-format", default=default, metavar="TEMPLATE",
                   help="source template of prefixes that are PEFT PrefixTuning checkpoints (--prefix directories; "
                        "for serve also the tasks of --prefix-dir), since PEFT saves no text format; must contain "
                        "{input}; {eos} is the tokenizer's end-of-text token "
                        f"(default: {default!r}). Saved prefixtune prefixes keep their own.")


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The ModelConfig of flags added by `add_model_options`."""
    return _config_from(args, ModelConfig)


def _add_data_options(p: argparse.ArgumentParser) -> None:
    from .tasks import task_help  # the registry owns each task's name and help line

    tasks = task_help()
    p.add_argument("--task", required=True, choices=list(tasks), help="the task." + _choices_help(tasks))
    p.add_argument("--split", default="test", help="dataset split (default: test)")
    p.add_argument("--data-dir", help="data root (else $PREFIXTUNE_DATA, else ../shared/data)")
    p.add_argument("--file", help="data file for the jsonl/summarization tasks")


def _join_negative_numbers(argv: list[str]) -> list[str]:
    """`--lr -1e-3` -> `--lr=-1e-3`: argparse takes only plain negatives like -1 or -.5 for a value and reads
    "-1e-3" or "-inf" as an unknown option; joined, they reach the config's own check of the value."""
    out: list[str] = []
    for item in argv:
        previous = out[-1] if out else ""
        if previous.startswith("--") and "=" not in previous and item.startswith("-") and _is_number(item):
            out[-1] = f"{previous}={item}"
        else:
            out.append(item)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _installed_version() -> str:
    """The installed distribution's version (what pip reports), not the source tree's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prefixtune")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from . import __version__

        return f"{__version__} (not installed)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_join_negative_numbers(sys.argv[1:] if argv is None else list(argv)))
    # keep freed large blocks in the heap, so beam search reuses its full-vocabulary temporaries instead
    # of mapping fresh pages every step (allocator.py; the time it saves is in the README's main-job table)
    allocator.retain_freed_memory()
    try:
        return args.func(args)
    except (ValueError, OSError, KeyError, MissingExtra) as err:  # a bad value, file or missing extra: one line
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print("error: " + " ".join(str(message).split()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

