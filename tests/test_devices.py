"""--device and --dtype: "auto" picks CUDA when present (else the CPU) and float32 on CPU, bfloat16 on CUDA
where supported; devices this machine lacks and unknown values are one-line errors naming the value; a
generate round trip runs on every device present (CPU always, CUDA where torch sees one)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import save_tiny, tiny_model
from prefixtune import PrefixConfig, PrefixTuningModel
from prefixtune.cli import main
from prefixtune.config import ModelConfig, TrainConfig, resolve_device, resolve_dtype
from prefixtune.base_model import load

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", "auto"] + (["cuda", "cuda:0"] if HAS_CUDA else [])


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny model directory, a prefix for it, and a JSONL input of two rows (one with the prefix)."""
    root = tmp_path_factory.mktemp("devices")
    model = save_tiny(root / "model", "llama")
    ptm = PrefixTuningModel(tiny_model("llama"), PrefixConfig(prefix_length=3, reparam="table"))
    with torch.no_grad():
        for enc in ptm.encoders.values():
            enc.table.mul_(3.0)  # a prefix that changes outputs
    ptm.save_pretrained(root / "prefix")
    (root / "in.jsonl").write_text(json.dumps({"task": "t", "input": "name[The Eagle]"}) + "\n"
                                   + json.dumps({"input": "hello"}) + "\n")
    return root


def _generate(assets, capsys, *flags) -> tuple[int, list[dict], str]:
    code = main(["generate", "--model", str(assets / "model"), "--prefix", f"t={assets / 'prefix'}", "--input",
                 str(assets / "in.jsonl"), "--num-beams", "2", "--max-new-tokens", "4", "--min-new-tokens", "0",
                 *flags])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


@pytest.mark.parametrize("device", DEVICES)
def test_generate_round_trip_on_each_device_present(assets, capsys, device):
    code, rows, err = _generate(assets, capsys, "--device", device)
    assert code == 0, err
    assert [r["input"] for r in rows] == ["name[The Eagle]", "hello"] and all(isinstance(r["output"], str) for r in rows)
    _, on_cpu, _ = _generate(assets, capsys, "--device", "cpu")
    if resolve_device(device) == "cpu":
        assert rows == on_cpu
    else:  # other kernels: texts may differ in the last digits' consequences, the rows must not be lost
        assert len(rows) == len(on_cpu)


@pytest.mark.parametrize("device", DEVICES)
def test_load_puts_the_model_on_the_resolved_device_and_dtype(assets, device):
    model, _ = load(ModelConfig(model=str(assets / "model"), device=device))
    param = next(model.parameters())
    expected = resolve_device(device)
    assert param.device.type == expected.split(":")[0]
    assert param.dtype == (torch.float32 if expected == "cpu" else getattr(torch, resolve_dtype("auto", expected)))


def test_bfloat16_on_cpu_loads_in_bfloat16_and_generates(assets, capsys):
    model, _ = load(ModelConfig(model=str(assets / "model"), device="cpu", dtype="bfloat16"))
    assert next(model.parameters()).dtype == torch.bfloat16
    code, rows, err = _generate(assets, capsys, "--device", "cpu", "--dtype", "bfloat16")
    assert code == 0 and len(rows) == 2, err


@pytest.mark.parametrize("flags, words", [
    (["--device", "gpu"], "device must be one of auto, cpu, cuda, cuda:N, mps (N a GPU index), got 'gpu'"),
    (["--device", "cuda:x"], "got 'cuda:x'"),
    (["--device", "cpu", "--dtype", "float16"], "dtype 'float16' on device 'cpu' is refused"),
] + ([] if HAS_CUDA else [(["--device", "cuda"], "device 'cuda': torch sees no CUDA GPU here")])
  + ([] if torch.backends.mps.is_available() else [(["--device", "mps"], "device 'mps' is not available")]))
def test_bad_device_or_dtype_is_one_line_exit_2(assets, capsys, flags, words):
    code, rows, err = _generate(assets, capsys, *flags)
    assert code == 2 and not rows
    assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err


def test_unknown_dtype_is_refused_by_the_parser(assets, capsys):
    with pytest.raises(SystemExit) as caught:
        _generate(assets, capsys, "--dtype", "float8")
    assert caught.value.code == 2 and "invalid choice: 'float8'" in capsys.readouterr().err


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
def test_serve_with_an_absent_device_exits_2_before_loading(assets, capsys):
    pytest.importorskip("fastapi", reason="serve needs the [serve] extra")
    code = main(["serve", "--model", str(assets / "no-model"), "--prefix-dir", str(assets), "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "device 'cuda'" in err, err


def test_cuda_index_and_auto_dtype_follow_what_torch_reports(monkeypatch):
    """The CUDA rules without a GPU: torch's answers are patched."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match=r"device 'cuda:2': this machine has 2 CUDA GPU\(s\), indices 0..1"):
        resolve_device("cuda:2")
    for supported, dtype in ((True, "bfloat16"), (False, "float16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert resolve_dtype("auto", "cuda:1") == dtype
    assert resolve_dtype("float16", "cuda") == "float16"  # refused on the CPU only
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_dtype("auto", "auto") == "float32"


def test_train_config_is_a_model_config_and_validates_its_device():
    cfg = TrainConfig()
    assert isinstance(cfg, ModelConfig) and cfg.model == "smollm2-135m" and cfg.allow_pickle is False
    with pytest.raises(ValueError, match="got 'tpu'"):
        TrainConfig(device="tpu").validate()


def test_load_takes_a_launchers_device_over_the_configs(assets):
    """train passes accelerate's device: it wins over cfg.device, and dtype "auto" follows it."""
    model, _ = load(ModelConfig(model=str(assets / "model"), device="auto", dtype="auto"), device=torch.device("cpu"))
    assert next(model.parameters()).device.type == "cpu" and next(model.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="got 'gpu'"):  # the config is still validated
        load(ModelConfig(model=str(assets / "model"), device="gpu"), device="cpu")


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["evaluate", "--task", "e2e", "--prefix", "p", "--output", "o"],
                                     ["train", "--task", "e2e", "--output", "o"]])
def test_evaluate_and_train_refuse_an_absent_device_before_loading(command, monkeypatch, capsys, tmp_path):
    pytest.importorskip("sacrebleu", reason="evaluate checks the [metrics] extra first")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("prefixtune.base_model.load_base_model", lambda *a, **k: pytest.fail("loaded a model"))
    assert main([*command, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "device 'cuda': torch sees no CUDA GPU" in err, err


@pytest.mark.parametrize("device, dtype", [(d, "auto") for d in DEVICES] + [("cpu", "bfloat16")])
def test_train_runs_on_each_device_present_and_saves_an_fp32_prefix(assets, tmp_path, capsys, device, dtype):
    """The base in --dtype on --device, the prefix trained and saved in fp32 (the optimiser state stays fp32)."""
    out = tmp_path / "run"
    code = main(["train", "--model", str(assets / "model"), "--device", device, "--dtype", dtype, "--task", "e2e",
                 "--train-size", "24", "--batch-size", "8", "--max-steps", "2", "--prefix-length", "2",
                 "--mlp-hidden", "8", "--lr", "0.01", "--bf16", "off", "--no-progress", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    prefix = PrefixTuningModel.from_pretrained(tiny_model("llama"), out)
    values = [t for kv in prefix.prefix_kv().kv.values() for t in kv]
    assert all(t.dtype == torch.float32 and bool(torch.isfinite(t).all()) for t in values)
    summary = json.loads((out / "train_summary.json").read_text())
    expected = resolve_device(device)
    held = resolve_dtype(dtype, expected)
    on = "cuda:0" if expected == "cuda" else expected  # torch names a GPU by its index
    assert summary["steps"] == 2 and summary["base"] == f"{held} on {on}"
