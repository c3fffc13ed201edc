"""The streaming safetensors writer: same bytes as save_file, atomic, hashed while writing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lib_training.formats.safetensors_writer import (
    NotEnoughSpaceError,
    StreamWriter,
    TensorEntry,
    placeholder,
    plan_layout,
)


def _mixed_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "w.fp32": torch.randn(3, 5, generator=generator),
        "a.fp16": torch.randn(7, generator=generator).half(),
        "m.bf16": torch.randn(2, 2, generator=generator).to(torch.bfloat16),
        "ids": torch.arange(6, dtype=torch.int64).reshape(1, 6),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(0.5),
        "empty": torch.zeros(0, 4),
        "b.fp16": torch.randn(4, 3, 1, 1, generator=generator).half(),
        "f64": torch.randn(2, generator=generator).double(),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
    }


def _stream(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, piece: int = 0) -> None:
    entries = [TensorEntry(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    with StreamWriter(path, entries, metadata) as writer:
        for entry in writer.layout.entries:
            flat = tensors[entry.name].reshape(-1)
            step = piece or max(1, flat.numel())
            for start in range(0, flat.numel(), step):
                writer.write(flat[start : start + step])
        writer.finish()


def test_streamed_file_is_byte_identical_to_save_file(tmp_path: Path) -> None:
    tensors = _mixed_tensors()
    metadata = {"note": 'multi-line\nvalue with "quotes", \\ and ünïcode \x01'}
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata=metadata)
    _stream(tmp_path / "streamed.safetensors", tensors, metadata)
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_streamed_file_without_metadata_is_byte_identical_to_save_file(tmp_path: Path) -> None:
    tensors = _mixed_tensors()
    save_file(tensors, str(tmp_path / "reference.safetensors"))
    _stream(tmp_path / "streamed.safetensors", tensors, None)
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def _split(data: bytes) -> tuple[int, dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8 : 8 + length]), data[8 + length :]


def test_several_metadata_entries_differ_from_save_file_only_in_their_order(tmp_path: Path) -> None:
    # save_file writes metadata in a random (hash map) order; we write it sorted
    tensors = _mixed_tensors()
    metadata = {f"key{i}": f"value {i}" for i in range(6)}
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata=metadata)
    _stream(tmp_path / "streamed.safetensors", tensors, metadata)
    ours, theirs = (
        _split((tmp_path / name).read_bytes()) for name in ("streamed.safetensors", "reference.safetensors")
    )
    assert ours[0] == theirs[0]
    assert list(ours[1]) == list(theirs[1])  # same tensor order, __metadata__ first
    assert ours[1] == theirs[1]
    assert ours[2] == theirs[2]
    assert list(ours[1]["__metadata__"]) == sorted(metadata)


def test_streamed_file_loads_in_safetensors(tmp_path: Path) -> None:
    tensors = _mixed_tensors()
    path = tmp_path / "streamed.safetensors"
    _stream(path, tensors, {"format": "pt"})
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype
        assert torch.equal(loaded[key], value)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_pieces_of_any_size_give_the_same_file(tmp_path: Path) -> None:
    tensors = _mixed_tensors()
    _stream(tmp_path / "whole.safetensors", tensors, {"a": "b"})
    _stream(tmp_path / "pieces.safetensors", tensors, {"a": "b"}, piece=2)
    assert (tmp_path / "whole.safetensors").read_bytes() == (tmp_path / "pieces.safetensors").read_bytes()


def test_data_sha256_is_the_hash_of_the_bytes_after_the_header(tmp_path: Path) -> None:
    tensors = {"x": torch.randn(100), "y": torch.randn(3, 3).half()}
    path = tmp_path / "out.safetensors"
    with StreamWriter(path, [TensorEntry(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]) as writer:
        for entry in writer.layout.entries:
            writer.write(tensors[entry.name])
        result = writer.finish()
    _, _, data = _split(path.read_bytes())
    assert result.data_sha256 == hashlib.sha256(data).hexdigest()
    assert result.size == path.stat().st_size


def test_placeholders_are_patched_in_place_without_changing_the_layout(tmp_path: Path) -> None:
    tensors = {"x": torch.randn(10)}
    token = placeholder(64)
    path = tmp_path / "out.safetensors"
    entries = [TensorEntry("x", torch.float32, (10,))]
    with StreamWriter(path, entries, {"hash": "0x" + token, "other": "v"}, placeholders=[token]) as writer:
        writer.write(tensors["x"])
        result = writer.finish(lambda digest: {token: digest})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["hash"] == "0x" + result.data_sha256
    reference = tmp_path / "reference.safetensors"
    save_file(tensors, str(reference), metadata={"hash": "0x" + result.data_sha256, "other": "v"})
    assert _split(path.read_bytes()) == _split(reference.read_bytes())


def test_a_placeholder_value_of_another_length_is_refused(tmp_path: Path) -> None:
    token = placeholder(64)
    writer = StreamWriter(tmp_path / "o.safetensors", [], {"h": token}, placeholders=[token])
    with pytest.raises(ValueError, match="plain characters"), writer:
        writer.finish({token: "abc"})
    assert os.listdir(tmp_path) == []


def test_an_error_while_writing_leaves_no_file_behind(tmp_path: Path) -> None:
    entries = [TensorEntry("x", torch.float32, (4,)), TensorEntry("y", torch.float32, (4,))]
    with pytest.raises(RuntimeError, match="boom"), StreamWriter(tmp_path / "out.safetensors", entries) as writer:
        writer.write(torch.zeros(4))
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_an_existing_output_is_kept_until_the_new_one_is_complete(tmp_path: Path) -> None:
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), StreamWriter(path, [TensorEntry("x", torch.float32, (4,))]):
        assert path.read_bytes() == b"old"
        raise RuntimeError("stop")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_a_piece_of_the_wrong_dtype_or_size_is_refused(tmp_path: Path) -> None:
    entries = [TensorEntry("x", torch.float16, (4,))]
    with StreamWriter(tmp_path / "a.safetensors", entries) as writer:
        with pytest.raises(ValueError, match="float32 piece"):
            writer.write(torch.zeros(4))
        with pytest.raises(ValueError, match="more data"):
            writer.write(torch.zeros(5, dtype=torch.float16))
        writer.write(torch.zeros(4, dtype=torch.float16))
        writer.finish()


def test_not_enough_disk_space_is_reported_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 5000, 5000))  # type: ignore[attr-defined]
    entries = [TensorEntry("x", torch.float32, (1000, 1000))]
    message = r"needs 4\.00 MB \(and 16\.78 MB to spare\) and only 5\.00 kB are free"
    with pytest.raises(NotEnoughSpaceError, match=message):
        StreamWriter(tmp_path / "big.safetensors", entries).__enter__()
    assert os.listdir(tmp_path) == []


def test_layout_orders_tensors_like_save_file() -> None:
    entries = [
        TensorEntry("b", torch.float16, (1,)),
        TensorEntry("a", torch.float16, (1,)),
        TensorEntry("z", torch.float32, (1,)),
        TensorEntry("ids", torch.int64, (1,)),
        TensorEntry("flag", torch.bool, (1,)),
        TensorEntry("h", torch.bfloat16, (1,)),
    ]
    assert [e.name for e in plan_layout(entries).entries] == ["ids", "z", "h", "a", "b", "flag"]
