"""Character Card files as they come from outside: ``.json`` (V1, V2 or V3), ``.png`` (the
``ccv3`` text chunk, else ``chara``: base64 JSON) or ``.charx`` (a zip holding
``card.json``), read into the card's JSON object. Every size is bounded after
decompression; every failure is a ``CardError`` naming the file and the field."""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import re
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

from npc_engine.errors import NpcEngineError

MAX_CARD_BYTES = 16 << 20  # a card with a big lorebook is a few MB; more is not a card


class CardError(NpcEngineError):
    """A card that cannot be read: says which file and which field."""

    def __init__(self, path: Path, field_name: str, message: str) -> None:
        super().__init__(f"{path}: {field_name}: {message}")
        self.path, self.field, self.reason = path, field_name, message


# -- reading -----------------------------------------------------------------------------
# A card comes from outside: every size is bounded after decompression, every failure is a
# CardError naming the file and the field, never a traceback.

MAX_CARD_FILE_BYTES = MAX_CARD_BYTES * 2  # a PNG carries the card twice (ccv3 and chara)
MAX_TEXT_BYTES = MAX_CARD_BYTES * 4 // 3 + 4  # a base64 chunk of the largest card
MAX_JSON_DEPTH = 64  # a card is a few levels deep; its extensions a few more
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CARD_CHUNKS = ("ccv3", "chara")  # in the order readers prefer them
_SURROGATE = re.compile("[\ud800-\udfff]")


def _megabytes(count: int) -> str:
    return f"{count / (1 << 20):g} MB"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _dotted(parts: list[str | int]) -> str:
    return ".".join(str(part) for part in parts)


def _check_tree(path: Path, where: str, value: Any) -> None:
    """Nested at most MAX_JSON_DEPTH deep (YAML writing and reading recurse), and no lone
    surrogate (``"\\ud800"`` is valid JSON and cannot be written as UTF-8)."""
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        node, at = stack.pop()
        if len(at) > MAX_JSON_DEPTH:
            field_name = _dotted(at[:4]) or where
            raise CardError(path, field_name, f"nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(node, str):
            if _SURROGATE.search(node):
                raise CardError(path, _dotted(at) or where, "text with an invalid character")
        elif isinstance(node, dict):
            for key, item in node.items():
                if _SURROGATE.search(key):
                    raise CardError(path, _dotted(at) or where, "a name with an invalid character")
                stack.append((item, [*at, key]))
        elif isinstance(node, list):
            stack.extend((item, [*at, index]) for index, item in enumerate(node))
        elif isinstance(node, float) and not math.isfinite(node):
            raise CardError(path, _dotted(at) or where, "a number too large")


def _json_of(path: Path, raw: bytes, where: str) -> dict[str, Any]:
    if len(raw) > MAX_CARD_BYTES:
        raise CardError(path, where, f"larger than {_megabytes(MAX_CARD_BYTES)}")
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise CardError(path, where, "not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a 5,000-digit number
        reason = str(exc)
        if "digits" in reason:
            reason = "a number with too many digits"
        raise CardError(path, where, f"not valid JSON ({reason})") from None
    if not isinstance(value, dict):
        raise CardError(path, where, "a card is a JSON object")
    _check_tree(path, where, value)
    return value


def _inflate(path: Path, where: str, data: bytes, limit: int) -> bytes:
    """zlib data, refused past ``limit`` bytes uncompressed (a bomb stops there)."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise CardError(path, where, f"damaged compressed text ({exc})") from None
    if len(out) > limit:
        raise CardError(path, where, f"more than {_megabytes(limit)} uncompressed")
    if not inflater.eof:
        raise CardError(path, where, "damaged compressed text (it ends early)")
    return out


def _png_text(path: Path, kind: bytes, body: bytes) -> tuple[str, str] | None:
    """(keyword, text) of a tEXt, zTXt or iTXt chunk; None when it is not a card chunk
    (other chunks are never decompressed)."""
    keyword, sep, rest = body.partition(b"\0")
    if not sep or keyword.decode("latin-1") not in CARD_CHUNKS:
        return None
    name = keyword.decode("latin-1")
    where = f"{name} chunk"
    if kind == b"tEXt":
        return name, rest.decode("latin-1")
    if kind == b"zTXt":
        if rest[:1] != b"\0":
            raise CardError(path, where, "unknown compression method")
        return name, _inflate(path, where, rest[1:], MAX_TEXT_BYTES).decode("latin-1")
    # iTXt: compression flag, method, language tag \0, translated keyword \0, UTF-8 text
    if len(rest) < 2:
        raise CardError(path, where, "a damaged iTXt chunk")
    compressed, method = rest[0], rest[1]
    _language, sep1, rest = rest[2:].partition(b"\0")
    _translated, sep2, text = rest.partition(b"\0")
    if not (sep1 and sep2):
        raise CardError(path, where, "a damaged iTXt chunk")
    if compressed:
        if method != 0:
            raise CardError(path, where, "unknown compression method")
        text = _inflate(path, where, text, MAX_TEXT_BYTES)
    return name, text.decode("utf-8", "replace")


def _png_card_chunks(path: Path, raw: bytes) -> dict[str, str]:
    """The card text chunks of a PNG, read by walking its chunk stream (length, type, data,
    CRC) without decoding a pixel. Hand-written because Pillow, the PNG library here, gives
    text chunks only from ``Image.open(...).text``, which decodes the whole image first (a
    343 KB PNG of 9400×9400 pixels cost 1.6 s and 375 MB, APNG frames more), and its limit
    on text chunks is a setting for the whole process (``PngImagePlugin.MAX_TEXT_CHUNK``)."""
    found: dict[str, str] = {}
    position = len(PNG_SIGNATURE)
    while position < len(raw):
        if position + 12 > len(raw):
            raise CardError(path, "(file)", "not a readable PNG (a chunk is cut short)")
        length, kind = struct.unpack(">I4s", raw[position : position + 8])
        start, end = position + 8, position + 8 + length
        if end + 4 > len(raw):
            raise CardError(path, "(file)", "not a readable PNG (a chunk is cut short)")
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            body = raw[start:end]
            (crc,) = struct.unpack(">I", raw[end : end + 4])
            if zlib.crc32(raw[position + 4 : end]) != crc:
                raise CardError(path, "(file)", f"not a readable PNG (a damaged {kind.decode()})")
            text = _png_text(path, kind, body)
            if text is not None and text[0] not in found:
                found[text[0]] = text[1]
        if kind == b"IEND":
            break
        position = end + 4
    return found


def _from_png(path: Path, raw: bytes) -> dict[str, Any]:
    chunks = _png_card_chunks(path, raw)
    for chunk in CARD_CHUNKS:
        if chunk in chunks:
            where = f"{chunk} chunk"
            try:
                decoded = base64.b64decode(chunks[chunk], validate=False)
            except (binascii.Error, ValueError) as exc:
                raise CardError(path, where, f"not base64 ({exc})") from None
            return _json_of(path, decoded, where)
    raise CardError(path, "(file)", "a PNG without a character card (no ccv3 or chara chunk)")


def _from_charx(path: Path, raw: bytes) -> dict[str, Any]:
    where = "card.json"
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise CardError(path, "(file)", f"not a CHARX (zip) archive ({exc})") from None
    with archive:
        try:
            info = archive.getinfo(where)
        except KeyError:
            raise CardError(path, where, "the CHARX archive has no card.json") from None
        if info.file_size > MAX_CARD_BYTES:
            raise CardError(path, where, f"larger than {_megabytes(MAX_CARD_BYTES)}")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise CardError(path, where, "compressed with a method CHARX does not use")
        try:
            with archive.open(info) as member:
                data = member.read(MAX_CARD_BYTES + 1)  # bounded whatever the header says
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, ValueError) as exc:
            raise CardError(path, where, f"damaged in the archive ({exc})") from None
        except NotImplementedError as exc:
            raise CardError(path, where, f"not readable ({exc})") from None
    return _json_of(path, data, where)


def read_card(path: Path) -> dict[str, Any]:
    """The card's JSON object, from any of the three containers (chosen by content)."""
    if not path.is_file():
        raise CardError(path, "(file)", "no such file")
    try:
        with path.open("rb") as stream:
            size = os.fstat(stream.fileno()).st_size  # read() of a limit allocates it all
            raw = stream.read(min(size, MAX_CARD_FILE_BYTES) + 1)
    except OSError as exc:
        raise CardError(path, "(file)", f"cannot be read ({exc.strerror or exc})") from None
    if len(raw) > MAX_CARD_FILE_BYTES:
        raise CardError(path, "(file)", f"larger than {_megabytes(MAX_CARD_FILE_BYTES)}")
    if raw.startswith(PNG_SIGNATURE):
        return _from_png(path, raw)
    if raw.startswith(b"PK"):
        return _from_charx(path, raw)
    return _json_of(path, raw, "(file)")
