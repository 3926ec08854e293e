"""The one place that decodes the text files a user gives (datasets, prompt specs, configs, text corpora), so every
reader accepts the same encodings and refuses the same way.

Accepted without asking: UTF-8, with or without a byte-order mark (Excel's "CSV UTF-8" writes one), and UTF-16 with
its byte-order mark (Excel's "Unicode Text"). Any other encoding must be named (``encoding="cp949"``); a file that is
not UTF-8 is refused with one line that names the file, the line of the first bad byte and the fix, and says so when
the file decodes as CP949/EUC-KR (what Windows and Excel in Korea save).
"""

from __future__ import annotations

import codecs
import os
import re
from pathlib import Path
from typing import Iterator

from tunelab.errors import DataError, TunelabError

BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
HANGUL = re.compile("[\uac00-\ud7a3]")


def check_encoding(name: str) -> str:
    """``name`` if Python knows the encoding; else ValueError with the fix (for config validators)."""
    try:
        codecs.lookup(name)
    except LookupError:
        raise ValueError(f"unknown encoding {name!r}; expected a codec name such as utf-8 or cp949") from None
    return name


def _codec(path: Path, encoding: str | None, error: type[TunelabError]) -> str:
    """The codec to open ``path`` with: the named one (UTF-8 always with its BOM stripped), else by BOM, else UTF-8."""
    if encoding:
        try:
            name = codecs.lookup(encoding).name
        except LookupError:
            raise error(f"unknown encoding {encoding!r}; expected a codec name such as utf-8 or cp949",
                        where=str(path)) from None
        return "utf-8-sig" if name in ("utf-8", "utf-8-sig") else name
    with path.open("rb") as f:
        head = f.read(4)
    return next((codec for bom, codec in BOMS if head.startswith(bom)), "utf-8-sig")


def looks_like_cp949(data: bytes) -> bool:
    """Whether ``data`` decodes as CP949 (EUC-KR's superset) into text with Hangul in it."""
    try:
        return bool(HANGUL.search(data.decode("cp949")))
    except UnicodeDecodeError:
        return False


def decode_error(path: Path, codec: str, *, error: type[TunelabError] = DataError,
                 option: str | None = None) -> TunelabError:
    """The one-line error for a file that does not decode with ``codec``: ``FILE:LINE`` of the first bad byte, what
    was expected, and the fix (``option``: how this command names an encoding, e.g. ``--encoding``)."""
    data = path.read_bytes()
    body, skip = (data[3:], 3) if codec == "utf-8-sig" and data.startswith(codecs.BOM_UTF8) else (data, 0)
    try:
        body.decode("utf-8" if codec == "utf-8-sig" else codec)
        pos = 0  # decodes as a whole: the stream's reader failed on a split sequence at the very end
    except UnicodeDecodeError as e:
        pos = e.start
    pos += skip
    line = data.count(b"\n", 0, pos) + 1
    byte = f"byte 0x{data[pos]:02x}" if pos < len(data) else "the last bytes"
    if codec != "utf-8-sig":
        return error(f"does not decode as {codec} ({byte}); name the file's real encoding, or re-save it as UTF-8",
                     where=f"{path}:{line}")
    also = f", or read it as it is with {option} cp949" if option else ""
    how = " (Excel: Save As 'CSV UTF-8')" if path.suffix.lower() == ".csv" else ""
    if looks_like_cp949(data):
        return error(f"not UTF-8 ({byte}): this looks like CP949/EUC-KR, as Windows and Excel in Korea save it; "
                     f"re-save it as UTF-8{how}{also}", where=f"{path}:{line}")
    also = f", or name its encoding with {option}" if option else ""
    return error(f"not UTF-8 ({byte}); re-save it as UTF-8{how}{also}", where=f"{path}:{line}")


def read_text(path: str | os.PathLike, *, encoding: str | None = None, error: type[TunelabError] = DataError,
              option: str | None = None) -> str:
    """The whole text of a file (see the module doc for the encodings); a file that does not decode is one
    ``error`` line (``decode_error``)."""
    p = Path(path)
    codec = _codec(p, encoding, error)
    try:
        return p.read_text(encoding=codec)
    except UnicodeDecodeError:
        raise decode_error(p, codec, error=error, option=option) from None


def text_lines(path: str | os.PathLike, *, encoding: str | None = None, newline: str | None = None,
               error: type[TunelabError] = DataError, option: str | None = None) -> Iterator[str]:
    """The lines of a file, read as they are needed (a reader that stops early reads no more); decoding as
    ``read_text``."""
    p = Path(path)
    codec = _codec(p, encoding, error)
    with p.open(encoding=codec, newline=newline) as f:
        try:
            yield from f
            return
        except UnicodeDecodeError:
            pass
    raise decode_error(p, codec, error=error, option=option)
