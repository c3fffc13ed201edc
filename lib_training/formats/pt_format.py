"""Writing `.pt` files that the WebUI's restricted unpickler opens, whatever torch version writes them.

A1111 (and Forge) open `.pt` embeddings and hypernetworks only if every entry of the zip is
`<dir>/data.pkl`, `<dir>/version` or `<dir>/data/<n>` (newer releases also allow `byteorder` and
`.data/serialization_id`) and every global the pickle names is on a short allow-list. Newer torch
writes more entries (`.format_version`, `.storage_alignment`, ...), so `save_pt_for_webui` lets
torch write to memory, copies only the three kinds of entry every release accepts into a new zip
(stored, tensor data aligned to 64 bytes as torch aligns it, so loading with `mmap=True` works),
checks the result with `webui_pt_problems`, and writes it atomically.
"""

from __future__ import annotations

import io
import os
import pickletools
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from lib_training.formats.atomic import atomic_path

# Entries that every release of the WebUI accepts (its newest regex also allows byteorder and
# .data/serialization_id, which we never write).
WEBUI_ZIP_ENTRY = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")

# (module, name) globals that the WebUI's unpickler has allowed since its first release; newer
# releases allow a few more (BFloat16Storage, numpy arrays, ParameterDict), which we never write.
WEBUI_GLOBALS = frozenset(
    {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch", "FloatStorage"),
        ("torch", "HalfStorage"),
        ("torch", "IntStorage"),
        ("torch", "LongStorage"),
        ("torch", "DoubleStorage"),
        ("torch", "ByteStorage"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("__builtin__", "set"),
    }
)

ALIGNMENT = 64  # bytes; torch aligns each tensor's data in the zip to this
_PADDING_EXTRA_ID = 0xD935  # zip "extra field" id used for alignment padding (as zipalign does)
_LOCAL_HEADER_SIZE = 30  # bytes of a zip local file header before the file name

_STRING_OPS = frozenset(
    {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
)
_MEMO_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


def pickle_globals(data: bytes) -> list[tuple[str, str]]:
    """Every (module, name) global a pickle refers to, in order.

    GLOBAL and INST carry the names in the opcode; STACK_GLOBAL takes the two strings pushed before
    it (directly or from the memo). A STACK_GLOBAL whose operands cannot be told statically, and
    the extension-registry opcodes, give ("?", "?"), which no allow-list contains.
    """
    found: list[tuple[str, str]] = []
    memo: dict[int, object] = {}
    pushed: list[object] = []  # the last two values pushed: a string, or None for anything else
    for opcode, arg, _ in pickletools.genops(data):
        op = opcode.name
        value: object = None
        if op in _STRING_OPS:
            value = arg.decode("latin-1") if isinstance(arg, bytes) else arg
        elif op in _MEMO_GETS:
            value = memo.get(arg)
        elif op in _MEMO_PUTS:
            memo[arg] = pushed[-1] if pushed else None
            continue
        elif op == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
            continue
        elif op in ("GLOBAL", "INST"):
            module, _, name = str(arg).partition(" ")
            found.append((module, name))
        elif op == "STACK_GLOBAL":
            module, name = pushed if len(pushed) == 2 else (None, None)
            found.append((module, name) if isinstance(module, str) and isinstance(name, str) else ("?", "?"))
        elif op in ("EXT1", "EXT2", "EXT4"):
            found.append(("?", "?"))
        pushed = [*pushed[-1:], value]
    return found


def webui_pt_problems(data: bytes) -> list[str]:
    """What would make the WebUI refuse these `.pt` bytes; empty when it opens them."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        return ["not a zip archive (torch's legacy format)"]
    with archive:
        names = archive.namelist()
        problems = [f"zip entry {name!r} is not allowed" for name in names if not WEBUI_ZIP_ENTRY.match(name)]
        pickles = [name for name in names if name.endswith("/data.pkl") and WEBUI_ZIP_ENTRY.match(name)]
        if len(pickles) != 1:
            return [*problems, f"expected one data.pkl, found {len(pickles)}"]
        pickled = archive.read(pickles[0])
    for module, name in pickle_globals(pickled):
        if (module, name) not in WEBUI_GLOBALS:
            problems.append(f"the pickle refers to {module}.{name}, which the WebUI does not allow")
    return problems


def to_webui_pt_bytes(obj: Any) -> bytes:
    """`obj` serialised by torch.save, re-zipped with only the entries every WebUI accepts."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source,
        zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target,
    ):
        for name in source.namelist():
            if WEBUI_ZIP_ENTRY.match(name):
                _write_aligned(target, out, name, source.read(name))
    return out.getvalue()


def _write_aligned(archive: zipfile.ZipFile, stream: io.BytesIO, name: str, payload: bytes) -> None:
    """Add a stored entry whose data starts at a multiple of ALIGNMENT, padding its local header."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    header_end = stream.tell() + _LOCAL_HEADER_SIZE + len(name.encode("utf-8"))
    pad = -header_end % ALIGNMENT
    if pad:
        if pad < 4:  # an extra field needs 4 bytes for its id and length
            pad += ALIGNMENT
        info.extra = struct.pack("<HH", _PADDING_EXTRA_ID, pad - 4) + bytes(pad - 4)
    archive.writestr(info, payload)


def save_pt_for_webui(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write `obj` (dicts, lists, strings, numbers, None and CPU tensors) as a `.pt` the WebUI opens.

    Save tensors that own their storage (`.clone()` a slice first): torch writes a tensor's whole
    storage. Raises ValueError, writing nothing, when `obj` holds something the WebUI's unpickler
    refuses (for example a bfloat16 tensor or a numpy value). The file is written atomically.
    """
    data = to_webui_pt_bytes(obj)
    problems = webui_pt_problems(data)
    if problems:
        raise ValueError(f"cannot write {Path(path).name} in a form the WebUI opens: {'; '.join(problems)}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
