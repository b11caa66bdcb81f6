"""Token shards, ``curriculum tokenize`` and the Megatron export, on a real run folder.

Round trip with two vocabularies (the reference LM's byte-level BPE, the packaged MiniLM's
WordPiece), exact curriculum order, checksums, atomic swap, and the ``.bin``/``.idx`` pair read
back by a reader written here from Megatron's format description.
"""

from __future__ import annotations

import json
import mmap
import shutil
import struct
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from pipeline.cli import main
from pipeline.core.errors import ConfigError, CurriculumError
from pipeline.engine.tokenize import load_tokenizer, tokenize_run
from pipeline.io.megatron import export_megatron
from pipeline.io.token_shards import TokenShards

RUN_CONFIG = {
    "run": {"name": "token-tests", "seed": 0},
    "input": {"format": "synthetic", "synthetic": {"docs": 150, "kind": "graded"}},
    "stages": [{"name": "order", "method": "sort", "key": "true_quality", "direction": "descending"}],
    "output": {"rows_per_shard": 40},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, ray_address: str) -> Path:
    """A run folder from the real pipeline, with a reference BPE published as ``artifacts.reference_lm``."""
    from pipeline.engine.config import validate_config
    from pipeline.engine.runner import run_pipeline
    from pipeline.models.lm import train_bpe_tokenizer

    folder = tmp_path_factory.mktemp("tok") / "run"
    run_pipeline(validate_config(RUN_CONFIG), folder, address=ray_address, log=lambda m: None)
    texts = [t for t, _ in _texts(folder)]
    reference = folder / "stages" / "ref" / "artifacts" / "reference_lm"
    train_bpe_tokenizer(texts, vocab_size=500).save_pretrained(reference)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artifacts"] = {"reference_lm": "stages/ref/artifacts/reference_lm"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _texts(run_dir: Path) -> list[tuple[str, int]]:
    table = pads.dataset(str(run_dir / "shards")).to_table(columns=["text", "position"]).sort_by("position")
    return list(zip(table["text"].to_pylist(), table["position"].to_pylist()))


@pytest.fixture(scope="module")
def bpe_run(run_dir: Path, ray_address: str) -> dict:
    return tokenize_run(run_dir, address=ray_address)  # the default: the run's reference LM


def test_bpe_round_trip_in_curriculum_order(run_dir: Path, bpe_run: dict) -> None:
    shards = TokenShards(run_dir, verify=True)
    tok = load_tokenizer(str(shards.tokenizer_dir))
    expected = _texts(run_dir)
    assert bpe_run["tokenizer"]["source"] == "reference LM"
    assert shards.dtype == np.uint16 and shards.sep == tok.eos_token_id
    assert len(shards) == 4 and shards.rows == len(expected) == 150
    docs = list(shards.documents())
    assert [p for p, _ in docs] == [p for _, p in expected] == list(range(150))
    for (_, ids), (text, _) in zip(docs, expected):
        assert ids[-1] == shards.sep and shards.sep not in ids[:-1]
        assert tok.decode(ids[:-1].tolist()) == text  # byte-level BPE: the exact text back
    assert shards.total_tokens == bpe_run["tokens"] == sum(len(ids) for _, ids in docs)
    shard = shards.shard(1)
    base = shard.tokens
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(getattr(base, "obj", base), mmap.mmap) and int(shard.positions[0]) == 40  # mapped, not read
    assert not shard.tokens.flags.writeable


def test_wordpiece_round_trip(run_dir: Path, tmp_path: Path, ray_address: str) -> None:
    other = tmp_path / "run"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("tokens", "stages"))
    record = tokenize_run(other, tokenizer="all-MiniLM-L6-v2", address=ray_address)
    shards = TokenShards(other, verify=True)
    tok = load_tokenizer(str(shards.tokenizer_dir))
    assert record["separator"] == {"kind": "sep", "token": "[SEP]", "id": tok.sep_token_id}
    assert record["tokenizer"]["class"].startswith("Bert")
    for (_, ids), (text, _) in zip(shards.documents(), _texts(other)):
        assert ids[-1] == tok.sep_token_id
        assert tok.cls_token_id not in ids  # no per-document special tokens
        # WordPiece lowercases and splits punctuation: compare with the tokenizer's own normal form.
        assert tok.decode(ids[:-1].tolist()) == tok.decode(tok(text, add_special_tokens=False)["input_ids"])
        assert " ".join(tok.decode(ids[:-1].tolist()).split()).replace(" ", "") == \
            "".join(text.lower().split()).replace(" ", "")


def test_deterministic_bytes_and_checksums(run_dir: Path, bpe_run: dict, ray_address: str) -> None:
    again = tokenize_run(run_dir, address=ray_address)
    assert [e["tokens_sha256"] for e in again["shards"]] == [e["tokens_sha256"] for e in bpe_run["shards"]]
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".tokens")]  # the staging folder was swapped in
    path = run_dir / again["shards"][2]["tokens_path"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CurriculumError, match="sha256"):
        TokenShards(run_dir, verify=True)
    tokenize_run(run_dir, address=ray_address)  # repaired
    TokenShards(run_dir, verify=True)


def test_missing_tokenizer_and_folder_are_config_errors(run_dir: Path, tmp_path: Path, ray_address: str) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(run_dir, bare, ignore=shutil.ignore_patterns("tokens", "stages"))
    manifest = json.loads((bare / "manifest.json").read_text())
    manifest.pop("artifacts")
    (bare / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="--tokenizer"):
        tokenize_run(bare, address=ray_address)
    with pytest.raises(ConfigError, match="curriculum tokenize"):
        TokenShards(bare)


def _read_megatron(prefix: Path) -> list[np.ndarray]:
    """An independent reader of Megatron's MMap indexed dataset, from the format description."""
    raw = (prefix.parent / (prefix.name + ".idx")).read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", raw, 9)
    (code,) = struct.unpack_from("<B", raw, 17)
    n_seq, n_doc = struct.unpack_from("<QQ", raw, 18)
    assert version == 1
    dtype = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
             8: np.uint16}[code]
    offset = 34
    sizes = np.frombuffer(raw, "<i4", n_seq, offset)
    offset += 4 * n_seq
    pointers = np.frombuffer(raw, "<i8", n_seq, offset)
    offset += 8 * n_seq
    doc_idx = np.frombuffer(raw, "<i8", n_doc, offset)
    assert offset + 8 * n_doc == len(raw)
    assert doc_idx[0] == 0 and doc_idx[-1] == n_seq and np.all(np.diff(doc_idx) >= 1)
    data = np.memmap(prefix.parent / (prefix.name + ".bin"), dtype=dtype, mode="r")
    item = np.dtype(dtype).itemsize
    assert pointers[0] == 0 and np.all(np.diff(pointers) == sizes[:-1] * item)
    assert len(data) * item == pointers[-1] + sizes[-1] * item
    docs = []
    for d in range(n_doc - 1):
        seqs = [np.asarray(data[pointers[s] // item: pointers[s] // item + sizes[s]]) for s in range(doc_idx[d], doc_idx[d + 1])]
        docs.append(np.concatenate(seqs))
    return docs


def test_megatron_pair_read_back_independently(run_dir: Path, bpe_run: dict, tmp_path: Path) -> None:
    prefix = tmp_path / "mega" / "curriculum"
    assert main(["export", str(run_dir), "--format", "megatron", "--out", str(prefix)]) == 0
    record = json.loads((tmp_path / "mega" / "curriculum.json").read_text())
    assert record["dtype"] == "uint16" and record["documents"] == 150
    docs = _read_megatron(prefix)
    ours = [ids for _, ids in TokenShards(run_dir).documents()]
    assert len(docs) == len(ours) == 150
    for a, b in zip(docs, ours):
        assert a.dtype == np.uint16 and np.array_equal(a, b)
    again = export_megatron(run_dir, tmp_path / "mega2" / "curriculum")
    assert again["bin_sha256"] == record["bin_sha256"] and again["idx_sha256"] == record["idx_sha256"]


def test_cli_tokenize_and_export_errors(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["tokenize", str(tmp_path / "nowhere")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    bare = tmp_path / "bare"
    shutil.copytree(run_dir, bare, ignore=shutil.ignore_patterns("tokens", "stages"))
    assert main(["export", str(bare), "--format", "megatron"]) == 2
    assert "curriculum tokenize" in capsys.readouterr().err
    assert not (bare / "export" / "megatron" / "curriculum_text_document.bin").exists()


def _batches(loader, n: int | None = None) -> list[dict]:
    out = []
    for b in loader:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def test_loader_reads_token_shards_like_text(run_dir: Path, bpe_run: dict, monkeypatch) -> None:
    from pipeline.train import loader as loader_module
    from pipeline.train import token_source
    from pipeline.train.loader import CurriculumLoader

    tok = load_tokenizer(str(run_dir / "tokens" / "tokenizer"))
    # One rank reads packed batches in blocks (all at once, or 3 batches a block, so that blocks
    # cross shard and epoch ends; with one shard open at a time, so that shards are dropped and
    # reopened); two ranks read theirs one by one; pad takes chunks.
    for packing, world, rank, block_tokens, open_bytes in (("pack", 1, 0, 65536, 1 << 28), ("pack", 1, 0, 3 * 96, 1),
                                                           ("pack", 2, 0, 65536, 1 << 28), ("pad", 2, 1, 65536, 1)):
        monkeypatch.setattr(loader_module, "BLOCK_TOKENS", block_tokens)
        monkeypatch.setattr(token_source, "OPEN_SHARD_BYTES", open_bytes)
        kwargs = {"packing": packing, "world_size": world, "rank": rank, "max_epochs": 2, "chunk_rows": 7}
        text = CurriculumLoader(run_dir, tok, 32, 3, token_shards=False, **kwargs)
        tokens = CurriculumLoader(run_dir, tok, 32, 3, token_shards=True, **kwargs)
        assert text.tokens is None and tokens.tokens is not None
        a, b = _batches(text), _batches(tokens)
        assert len(a) == len(b) > 10
        for x, y in zip(a, b):
            assert x["state"] == y["state"] and x["index"] == y["index"]
            for key in ("input_ids", "labels", "positions", "attention_mask"):
                assert torch.equal(x[key], y[key]), key
        # Without positions (how the trainer reads), the same batches less that one tensor.
        bare = _batches(CurriculumLoader(run_dir, tok, 32, 3, token_shards=True, positions=False, **kwargs))
        assert len(bare) == len(b) and "positions" not in bare[0]
        for x, y in zip(b, bare):
            assert x["state"] == y["state"] and torch.equal(x["input_ids"], y["input_ids"])
            assert torch.equal(x["labels"], y["labels"]) and torch.equal(x["attention_mask"], y["attention_mask"])
        # Resume from a mid-stream cursor (inside a document) gives the same next batches.
        resumed = CurriculumLoader(run_dir, tok, 32, 3, token_shards=True, **kwargs)
        resumed.load_state_dict(a[5]["state"])
        for x, y in zip(a[6:9], _batches(resumed, 3)):
            assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["positions"], y["positions"])


def test_loader_refuses_token_shards_of_another_tokenizer(run_dir: Path, bpe_run: dict) -> None:
    from pipeline.models.lm import train_bpe_tokenizer
    from pipeline.train.loader import CurriculumLoader

    other = train_bpe_tokenizer([t for t, _ in _texts(run_dir)][:50], vocab_size=300)
    auto = CurriculumLoader(run_dir, other, 32, 2)
    assert auto.tokens is None and "another vocabulary" in auto.tokens_reason  # falls back to tokenizing text
    with pytest.raises(ConfigError, match="another vocabulary"):
        CurriculumLoader(run_dir, other, 32, 2, token_shards=True)


def test_vocabulary_hash_is_memoized_per_tokenizer_until_it_grows(run_dir: Path) -> None:
    from pipeline.io.token_shards import vocab_sha256
    from pipeline.models.lm import train_bpe_tokenizer
    from pipeline.train.token_source import tokenizer_vocab_sha256

    tokenizer = train_bpe_tokenizer([t for t, _ in _texts(run_dir)][:50], vocab_size=300)
    first = tokenizer_vocab_sha256(tokenizer)
    assert first == vocab_sha256(tokenizer.get_vocab()) == tokenizer_vocab_sha256(tokenizer)
    tokenizer.add_tokens(["<a-new-token>"])
    grown = tokenizer_vocab_sha256(tokenizer)
    assert grown != first and grown == vocab_sha256(tokenizer.get_vocab())


def test_map_npy_maps_what_np_load_reads_and_refuses_a_cut_file(tmp_path: Path) -> None:
    from pipeline.io.token_shards import map_npy

    arrays = {"flat": np.arange(7, dtype=np.uint16), "index": np.arange(10, dtype=np.int64).reshape(5, 2),
              "empty": np.empty((0, 2), np.int64), "fortran": np.asfortranarray(np.arange(6).reshape(2, 3)),
              "big_endian": np.arange(4, dtype=">u4")}
    for name, array in arrays.items():
        np.save(tmp_path / f"{name}.npy", array)
        mapped = map_npy(tmp_path / f"{name}.npy")
        assert mapped.dtype == array.dtype and mapped.shape == array.shape and np.array_equal(mapped, array), name
        assert not mapped.flags.writeable, name
    path = tmp_path / "flat.npy"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CurriculumError, match="cut short"):
        map_npy(path)
