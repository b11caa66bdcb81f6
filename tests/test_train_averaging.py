"""Checkpoint averaging (SMA/EMA/WMA) and model soups, on real safetensors files and real tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.cli import main
from pipeline.train.averaging import average_checkpoints, average_state, averaging_weights, greedy_soup

# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("k", [1, 2, 6, 11])
def test_weights_sum_to_one_and_follow_the_formulas(k: int):
    sma = averaging_weights("sma", k)
    ema = averaging_weights("ema", k, alpha=0.2)
    wma = averaging_weights("wma", k)
    for w in (sma, ema, wma):
        assert sum(w) == pytest.approx(1.0, abs=1e-12)
        assert len(w) == k
    assert sma == pytest.approx([1 / k] * k)
    # oldest first: the oldest keeps (1 - a)^(k-1), the j-th newest (j = 0 … k-2) gets a (1 - a)^j
    assert ema == pytest.approx([0.8 ** (k - 1)] + [0.2 * 0.8 ** (k - 1 - j) for j in range(1, k)])
    assert wma == pytest.approx([(j + 1) / (k * (k + 1) / 2) for j in range(k)])
    if k > 1:
        assert ema[-1] == pytest.approx(0.2)  # the newest gets alpha
        assert wma[-1] / wma[0] == pytest.approx(k)
    if k > 2:
        assert ema[-2] / ema[-1] == pytest.approx(0.8)  # and each one before it 1 - alpha of the next


def test_ema_of_six_is_the_recursion_from_the_oldest_to_the_newest(tmp_path: Path):
    # Luo et al.'s CMA/CDMA setting: EMA with alpha 0.2 over the last 6 checkpoints. The newest gets
    # 0.2 and the oldest 0.33: a real average, not 0.8 on the newest.
    weights = averaging_weights("ema", 6, 0.2)
    assert weights == pytest.approx([0.32768, 0.08192, 0.1024, 0.128, 0.16, 0.2])
    assert [round(w, 2) for w in weights] == [0.33, 0.08, 0.10, 0.13, 0.16, 0.20]
    # The same numbers as running avg <- 0.2 * theta_i + 0.8 * avg over real tensors, oldest first.
    gen = torch.Generator().manual_seed(0)
    thetas = [torch.randn(7, 3, generator=gen) for _ in range(6)]
    files = [_write(tmp_path / f"e{i}.safetensors", {"w": t}) for i, t in enumerate(thetas)]
    avg = thetas[0].double()
    for theta in thetas[1:]:
        avg = 0.2 * theta.double() + 0.8 * avg
    assert torch.allclose(average_state(files, weights)["w"].double(), avg, atol=1e-6)
    assert averaging_weights("ema", 4, 1.0) == pytest.approx([0, 0, 0, 1])  # alpha 1: the newest alone


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown averaging method"):
        averaging_weights("median", 3)


# --------------------------------------------------------------------------- tensors


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


def test_float_tensors_average_by_the_weights_and_integer_buffers_are_copied(tmp_path: Path):
    rng = np.random.default_rng(0)
    files, floats = [], []
    for i in range(4):
        w = rng.normal(size=(5, 3)).astype(np.float32)
        floats.append(w)
        files.append(_write(tmp_path / f"c{i}.safetensors", {
            "w": torch.from_numpy(w),
            "steps": torch.tensor([10 * (i + 1)], dtype=torch.int64),  # a counter: averaging it is meaningless
            "mask": torch.tensor([True, i % 2 == 0, False]),
        }))
    for method in ("sma", "ema", "wma"):
        weights = averaging_weights(method, 4, 0.2)
        out = average_state(files, weights)
        expected = sum(np.float64(wt) * f.astype(np.float64) for wt, f in zip(weights, floats))
        np.testing.assert_allclose(out["w"].numpy(), expected, rtol=1e-6, atol=1e-7)
        assert out["w"].dtype == torch.float32
        assert out["steps"].dtype == torch.int64 and out["steps"].tolist() == [40]  # the newest, untouched
        assert out["mask"].dtype == torch.bool and out["mask"].tolist() == [True, False, False]


def test_bf16_checkpoints_average_as_fp32_math_says(tmp_path: Path):
    # 64 bf16 checkpoints of a slowly drifting weight, like the tail of a bf16 training run.
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(256, generator=gen)
    files, exact = [], []
    for i in range(64):
        theta = theta + 0.003 * torch.randn(256, generator=gen)
        stored = theta.to(torch.bfloat16)
        exact.append(stored.double())
        files.append(_write(tmp_path / f"b{i:02d}.safetensors", {"w": stored}))
    weights = averaging_weights("sma", 64)
    reference = sum(w * e for w, e in zip(weights, exact))
    averaged = average_state(files, weights)["w"]
    assert averaged.dtype == torch.float32
    assert torch.allclose(averaged.double(), reference, rtol=0, atol=2e-6)
    # What the pitfall looks like: accumulating in bf16 lands far from the fp32 answer,
    # so this test would catch an implementation that averaged in the checkpoint dtype.
    naive = torch.zeros(256, dtype=torch.bfloat16)
    for w, e in zip(weights, exact):
        naive += (w * e).to(torch.bfloat16)
    assert (naive.double() - reference).abs().max() > 50 * 2e-6
    # dtype="same" rounds the fp32 average once at the end: within half a bf16 ulp.
    same = average_state(files, weights, dtype="same")["w"]
    assert same.dtype == torch.bfloat16
    assert torch.equal(same, averaged.to(torch.bfloat16))


def test_mismatched_checkpoints_are_refused(tmp_path: Path):
    from pipeline.core.errors import CurriculumError

    a = _write(tmp_path / "a.safetensors", {"w": torch.zeros(3)})
    b = _write(tmp_path / "b.safetensors", {"v": torch.zeros(3)})
    c = _write(tmp_path / "c.safetensors", {"w": torch.zeros(4)})
    with pytest.raises(CurriculumError, match="different tensors"):
        average_state([a, b], [0.5, 0.5])
    with pytest.raises(CurriculumError, match="shape"):
        average_state([a, c], [0.5, 0.5])


# --------------------------------------------------------------------------- real models


def _tiny_model(model_type: str, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    params = {"gpt2": dict(n_layer=1, n_embd=32, n_head=2, n_positions=64),
              "llama": dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                            num_key_value_heads=2, max_position_embeddings=64)}[model_type]
    config = AutoConfig.for_model(model_type, vocab_size=300, **params)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_averaged_checkpoints_load_with_from_pretrained(tmp_path: Path, model_type: str):
    from transformers import AutoModelForCausalLM

    model = _tiny_model(model_type, seed=0)
    folders, states = [], []
    for i in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * (i + 1))
        folder = tmp_path / f"step-{i:07d}"
        model.save_pretrained(folder)
        folders.append(folder)
        states.append(load_file(str(folder / "model.safetensors")))
    record = average_checkpoints(folders, tmp_path / "avg", method="ema", alpha=0.2)
    assert sum(record["weights"]) == pytest.approx(1.0)
    info = json.loads((tmp_path / "avg" / "averaging.json").read_text())
    assert info["method"] == "ema" and info["alpha"] == 0.2 and len(info["checkpoints"]) == 3

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "avg"))
    sd = loaded.state_dict()
    w = record["weights"]
    for key in states[0]:
        expected = sum(wi * s[key].double() for wi, s in zip(w, states))
        assert torch.allclose(sd[key].double(), expected, atol=1e-6), key
    assert next(loaded.parameters()).dtype == torch.float32
    logits = loaded(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 300) and torch.isfinite(logits).all()


def test_greedy_soup_keeps_models_that_help_and_drops_the_rest(tmp_path: Path):
    target = torch.tensor([1.0, -2.0, 0.5])
    offsets = {"a": [0.3, 0.0, 0.0], "b": [-0.3, 0.0, 0.0], "c": [0.0, 0.2, 0.0], "bad": [5.0, 5.0, 5.0]}
    files = {n: _write(tmp_path / f"{n}.safetensors", {"w": target + torch.tensor(o)}) for n, o in offsets.items()}

    def loss(state) -> float:  # a real function of the weights: distance to the target
        return float(((state["w"] - target) ** 2).sum())

    order = [files["bad"], files["a"], files["c"], files["b"]]
    record = greedy_soup(order, loss, tmp_path / "soup")
    kept = {Path(p).stem for p in record["checkpoints"]}
    assert "bad" not in kept and "c" in kept
    assert record["soup_loss"] <= min(record["scores"])
    soup = load_file(str(tmp_path / "soup" / "model.safetensors"))["w"]
    assert loss({"w": soup}) == pytest.approx(record["soup_loss"])
    # The uniform soup takes every model, the bad one included, and is worse here.
    average_checkpoints(order, tmp_path / "uniform", method="uniform")
    uniform = load_file(str(tmp_path / "uniform" / "model.safetensors"))["w"]
    assert loss({"w": uniform}) > record["soup_loss"]


# --------------------------------------------------------------------------- the command line


def test_cli_average_and_its_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    model = _tiny_model("gpt2", seed=1)
    folders = []
    for i in range(3):
        with torch.no_grad():
            model.transformer.wte.weight.add_(0.1)
        folders.append(tmp_path / f"step-{(i + 1) * 10:07d}")
        model.save_pretrained(folders[-1])
    assert main(["average", *map(str, folders), "--method", "wma", "--out", str(tmp_path / "wma")]) == 0
    info = json.loads((tmp_path / "wma" / "averaging.json").read_text())
    assert info["weights"] == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert "weights: 0.1667, 0.3333, 0.5000" in capsys.readouterr().out
    assert main(["average", *map(str, folders), "--method", "ema", "--out", str(tmp_path / "ema")]) == 0
    info = json.loads((tmp_path / "ema" / "averaging.json").read_text())
    assert info["weights"] == pytest.approx([0.64, 0.16, 0.2]) and info["alpha"] == 0.2
    assert "weights: 0.6400, 0.1600, 0.2000" in capsys.readouterr().out

    assert main(["average", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["average", *map(str, folders), "--method", "greedy", "--out", str(tmp_path / "g")]) == 2
    assert "--eval" in capsys.readouterr().err
    other = _tiny_model("llama", seed=0)
    other.save_pretrained(tmp_path / "llama")
    assert main(["average", str(folders[0]), str(tmp_path / "llama"), "--out", str(tmp_path / "mix")]) == 1
    assert "same architecture" in capsys.readouterr().err
    assert not (tmp_path / "mix").exists() and not (tmp_path / "x").exists()


def test_cli_greedy_soup_with_real_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from pipeline.io.synth import graded_document
    from pipeline.models.lm import build_causal_lm, train_bpe_tokenizer

    texts = [graded_document(i, 5)["text"] for i in range(60)]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300)
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:20]))
    folders = []
    for seed in range(3):
        model = build_causal_lm({"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2}, tokenizer, seed=seed)
        folders.append(tmp_path / f"run{seed}")
        model.save_pretrained(folders[-1])
        tokenizer.save_pretrained(folders[-1])
    code = main(["average", *map(str, folders), "--method", "greedy", "--eval", f"clean={heldout}",
                 "--seq-len", "32", "--eval-tokens", "512", "--out", str(tmp_path / "soup")])
    assert code == 0, capsys.readouterr().err
    info = json.loads((tmp_path / "soup" / "averaging.json").read_text())
    assert len(info["scores"]) == 3 and all(np.isfinite(info["scores"]))
    assert info["soup_loss"] <= min(info["scores"]) + 1e-9
    assert info["checkpoints"][0] == str(folders[int(np.argmin(info["scores"]))])  # starts from the best
    assert (tmp_path / "soup" / "tokenizer.json").is_file()
