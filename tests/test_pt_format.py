""".pt files the WebUI's restricted unpickler opens: checked entry by entry and opcode by opcode.

The allow-lists below are written out from A1111's modules/safe.py independently of
lib_training.formats.pt_format, so that a mistake there cannot hide itself here.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lib_training.formats.embedding_files import EmbeddingFile, write_embedding
from lib_training.formats.pt_format import pickle_globals, save_pt_for_webui, to_webui_pt_bytes, webui_pt_problems

# The newest A1111 accepts these zip entries; releases before it only data.pkl, version and data/N.
A1111_ENTRY = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$")
OLD_A1111_ENTRY = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")
A1111_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    *(
        ("torch", name)
        for name in (
            "FloatStorage",
            "HalfStorage",
            "IntStorage",
            "LongStorage",
            "DoubleStorage",
            "ByteStorage",
            "float32",
            "BFloat16Storage",
        )
    ),
    ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("_codecs", "encode"),
    ("__builtin__", "set"),
}


def globals_in(pickled: bytes) -> list[tuple[str, str]]:
    """Every global the pickle names; a STACK_GLOBAL takes the two strings pushed before it."""
    found: list[tuple[str, str]] = []
    memo: dict[int, object] = {}
    last_two: list[object] = [None, None]
    for opcode, arg, _ in pickletools.genops(pickled):
        if opcode.name in ("GLOBAL", "INST"):
            module, name = arg.split(" ", 1)
            found.append((module, name))
        elif opcode.name == "STACK_GLOBAL":
            found.append(tuple(last_two))  # type: ignore[arg-type]
        elif opcode.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = last_two[-1]
            continue
        elif opcode.name == "MEMOIZE":
            memo[len(memo)] = last_two[-1]
            continue
        if opcode.name in ("BINGET", "LONG_BINGET", "GET"):
            pushed = memo.get(arg)
        elif "UNICODE" in opcode.name or "STRING" in opcode.name:
            pushed = arg
        else:
            pushed = None
        last_two = [last_two[-1], pushed]
    return found


def assert_webui_opens(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        for name in names:
            assert A1111_ENTRY.match(name), name
            assert OLD_A1111_ENTRY.match(name), name
        (pickle_name,) = [n for n in names if n.endswith("/data.pkl")]
        pickled = archive.read(pickle_name)
    for module_name in globals_in(pickled):
        assert module_name in A1111_GLOBALS, module_name


def load_both_ways(path: Path) -> tuple[object, object]:
    return torch.load(path, weights_only=True), torch.load(path, weights_only=True, mmap=True)


# --- embeddings -----------------------------------------------------------------------------------


def test_sd1_embedding_pt_opens_in_the_webui_and_in_torch(tmp_path: Path) -> None:
    vectors = torch.randn(3, 768)
    path = write_embedding(tmp_path / "cat.pt", EmbeddingFile("cat", {"clip_l": vectors}, step=12))
    assert_webui_opens(path)
    for loaded in load_both_ways(path):
        assert isinstance(loaded, dict)
        assert torch.equal(loaded["string_to_param"]["*"], vectors)
        assert loaded["step"] == 12


def test_sdxl_embedding_pt_opens_in_the_webui_and_in_torch(tmp_path: Path) -> None:
    vectors = {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}
    path = write_embedding(tmp_path / "cat.pt", EmbeddingFile("cat", vectors))
    assert_webui_opens(path)
    for loaded in load_both_ways(path):
        assert type(loaded) is dict  # the WebUI tests `type(data) == dict` for SDXL
        assert torch.equal(loaded["clip_g"], vectors["clip_g"])


# --- the generic writer -----------------------------------------------------------------------------


def test_hypernetwork_like_objects_open_in_the_webui(tmp_path: Path) -> None:
    layer = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    obj = {
        768: (layer.state_dict(), layer.state_dict()),  # OrderedDicts carrying _metadata
        "step": 5,
        "layer_structure": [1.0, 2.0, 1.0],
        "activation_func": "relu",
        "is_layer_norm": False,
        "dropout_structure": [0, 0, 0],
        "optional_info": None,
        "half": torch.randn(2).half(),
    }
    path = save_pt_for_webui(tmp_path / "hyper.pt", obj)
    assert_webui_opens(path)
    for loaded in load_both_ways(path):
        assert torch.equal(loaded[768][1]["2.weight"], layer.state_dict()["2.weight"])
        assert loaded["layer_structure"] == [1.0, 2.0, 1.0]


def test_tensor_data_is_aligned_to_64_bytes(tmp_path: Path) -> None:
    path = save_pt_for_webui(tmp_path / "x.pt", {"a": torch.randn(5), "b": torch.randn(7)})
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename


def test_writer_refuses_what_the_webui_cannot_open_and_writes_nothing(tmp_path: Path) -> None:
    for bad in ({"t": torch.randn(2).bfloat16()}, {"n": np.float32(1.0)}):
        with pytest.raises(ValueError, match="WebUI"):
            save_pt_for_webui(tmp_path / "bad.pt", bad)
    assert os.listdir(tmp_path) == []


# --- the checker ------------------------------------------------------------------------------------


def _zip_with(entries: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return out.getvalue()


def test_checker_flags_entries_newer_torch_adds() -> None:
    pickled = pickle.dumps({"a": 1}, protocol=2)
    data = _zip_with({"archive/data.pkl": pickled, "archive/.format_version": b"1", "archive/version": b"3\n"})
    assert webui_pt_problems(data) == ["zip entry 'archive/.format_version' is not allowed"]


def test_checker_flags_a_raw_torch_save_of_this_torch_version_only_for_extra_entries() -> None:
    buffer = io.BytesIO()
    torch.save({"a": torch.zeros(1)}, buffer)
    problems = webui_pt_problems(buffer.getvalue())
    assert all("zip entry" in p for p in problems)
    assert webui_pt_problems(to_webui_pt_bytes({"a": torch.zeros(1)})) == []


def test_checker_flags_a_forbidden_global() -> None:
    pickled = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R."  # os.system("true")
    data = _zip_with({"archive/data.pkl": pickled, "archive/version": b"3\n"})
    assert webui_pt_problems(data) == ["the pickle refers to os.system, which the WebUI does not allow"]


def test_stack_global_operands_are_tracked_through_the_memo() -> None:
    pickled = pickle.dumps([collections.Counter(), collections.Counter()], protocol=4)
    assert globals_in(pickled) == pickle_globals(pickled)
    assert ("collections", "Counter") in pickle_globals(pickled)
    assert pickle_globals(pickle.dumps([collections.OrderedDict()] * 2 + [set()], protocol=4)) == [
        ("collections", "OrderedDict")
    ]


def test_checker_refuses_a_file_that_is_not_a_zip() -> None:
    assert webui_pt_problems(b"not a zip") == ["not a zip archive (torch's legacy format)"]
