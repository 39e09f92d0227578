"""FineWeb-10B as GPT-2 tokens: the shards modded-nanogpt publishes on the Hugging Face Hub, downloaded into the cache.

    python -m nanogpt2.prepare fineweb10B [--shards N]     # the val shard and the first N train shards (all 103)

The Hub's dataset `kjj0/fineweb10B-gpt2` holds `fineweb_val_000000.bin` and `fineweb_train_000001.bin` ..
`fineweb_train_000103.bin`, llm.c-format shards of 100M tokens (200 MB each). Each shard downloads into
`NAME.partial` with HTTP range requests, so an interrupted download resumes where it stopped; it becomes `NAME`
only once its header (magic, version, token count) agrees with its size and with the size the source announced.
`--data fineweb10B` then trains on the train shards present and evaluates on the val shard. huggingface_hub
(optional: requirements-hub.txt) resolves the Hub's address, so HF_ENDPOINT (a mirror) and HF_HUB_OFFLINE apply.
"""

from __future__ import annotations

import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

from nanogpt2.data import HEADER_BYTES, HEADER_INTS, MAGIC, VERSION, Corpus, shard_corpus
from nanogpt2.errors import DataError, WriteError, os_error_text

NAME = "fineweb10B"
HUB_REPO = "kjj0/fineweb10B-gpt2"
TRAIN_SHARDS = 103
VAL_SHARD = "fineweb_val_000000.bin"
CHUNK = 1 << 20
PREPARE = f"python -m nanogpt2.prepare {NAME}"


def shard_names(n_train: int) -> list[str]:
    """The val shard and the first `n_train` train shards, as the Hub repo names them."""
    if not 1 <= n_train <= TRAIN_SHARDS:
        raise DataError(f"--shards {n_train}: the Hub repo {HUB_REPO} holds train shards 1 to {TRAIN_SHARDS}")
    return [VAL_SHARD] + [f"fineweb_train_{i:06d}.bin" for i in range(1, n_train + 1)]


def download(out_dir: Path, n_train: int = TRAIN_SHARDS, source: str | Path | None = None) -> list[Path]:
    """Fetch the val shard and `n_train` train shards into out_dir (shards already complete are kept as they are),
    from `source`: a directory laid out like the Hub repo, or None for the Hub itself. Returns the shards' paths."""
    names = shard_names(n_train)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {out_dir}: {e.strerror}") from None
    paths = []
    for i, name in enumerate(names):
        path = out_dir / name
        if not (path.exists() and complete_size(path) == path.stat().st_size):
            fetch(name, path, source, f"[{i + 1}/{len(names)}] {name}")
        paths.append(path)
    return paths


def complete_size(path: Path) -> int:
    """The size a shard's header promises (header + 2 bytes a token); DataError if the file is not a token shard."""
    with open(path, "rb") as f:
        return promised_size(f.read(HEADER_BYTES), str(path))


def promised_size(raw: bytes, where: str) -> int:
    """The size the shard header `raw` promises; DataError naming `where` unless it is an llm.c header."""
    header = np.frombuffer(raw[: len(raw) // 4 * 4], dtype=np.int32)
    if len(header) < HEADER_INTS or header[0] != MAGIC or header[1] != VERSION or header[2] < 0:
        found = f"magic {header[0]}, version {header[1]}" if len(header) >= 2 else f"{len(raw)} bytes"
        raise DataError(f"{where}: not an llm.c token shard ({found}; expected magic {MAGIC}, version {VERSION})")
    return HEADER_BYTES + 2 * int(header[2])


def fetch(name: str, path: Path, source: str | Path | None, label: str) -> None:
    """Download shard `name` into `path`, resuming `path.partial` (or a truncated `path`), and check it."""
    partial = path.with_name(path.name + ".partial")
    if path.exists() and not partial.exists():
        path.rename(partial)  # a shard cut short by another tool: resumed like our own partial download
    done = partial.stat().st_size if partial.exists() else 0
    if done >= HEADER_BYTES:
        expected = complete_size(partial)  # a corrupt partial is refused and kept, never silently discarded
        if done > expected:
            raise DataError(f"{partial}: {done} bytes, more than the {expected} its header promises: delete it")
    with open_source(source, name, done) as (stream, total):
        if total < done:
            raise DataError(f"{partial}: {done} bytes, more than the source's {total}: delete it and run again")
        if done < HEADER_BYTES:  # the header checked before a byte is kept: a source that is no shard stops here
            head = partial.read_bytes() if done else b""
            while len(head) < HEADER_BYTES and (piece := read_or_stop(stream, HEADER_BYTES - len(head), name, partial)):
                head += piece
            promised_size(head, f"{name} from {source or HUB_REPO}")
            append(partial, [head[done:]])
            done = HEADER_BYTES
        append(partial, progress(chunks(stream, name, partial), done, total, label))
    size = partial.stat().st_size
    expected = complete_size(partial)
    if size != total or expected != total:
        raise DataError(
            f"{name}: {size} bytes downloaded, the source announced {total} and the header promises {expected}; "
            f"{partial} is kept: run `{PREPARE}` again to resume, or delete it to start over"
        )
    os.replace(partial, path)


def read_or_stop(stream: BinaryIO, n: int, name: str, partial: Path) -> bytes:
    """Up to n bytes of the stream; a broken connection is a DataError that says the download resumes."""
    try:
        return stream.read(n)
    except (OSError, http.client.HTTPException) as e:
        raise broke_off(name, partial, e) from None


def chunks(stream: BinaryIO, name: str, partial: Path) -> Iterator[bytes]:
    """The stream's bytes in chunks, to its end; when the server closes early, what came before it still does."""
    while True:
        try:
            chunk = stream.read(CHUNK)
        except http.client.IncompleteRead as e:
            yield e.partial
            raise broke_off(name, partial, e) from None
        except (OSError, http.client.HTTPException) as e:
            raise broke_off(name, partial, e) from None
        if not chunk:
            return
        yield chunk


def broke_off(name: str, partial: Path, err: BaseException) -> DataError:
    return DataError(
        f"{name}: the download broke off ({os_error_text(err)}); {partial} keeps what arrived: run `{PREPARE}` "
        "again to resume"
    )


def append(path: Path, pieces: Iterable[bytes]) -> None:
    """Append each piece to `path` as it comes (what arrived stays on disk if the stream breaks off)."""
    try:
        with open(path, "ab") as f:
            for piece in pieces:
                f.write(piece)
    except OSError as e:
        raise WriteError(path, e) from None


def progress(pieces: Iterator[bytes], done: int, total: int, label: str) -> Iterator[bytes]:
    """The pieces, passed through, with a progress line on stderr: rewritten in place on a terminal, every 10 s
    otherwise."""
    tty, start, first, last = sys.stderr.isatty(), time.time(), done, 0.0
    for piece in pieces:
        yield piece
        done += len(piece)
        now = time.time()
        if now - last >= (0.5 if tty else 10.0) or done == total:
            last = now
            rate = (done - first) / max(now - start, 1e-9)  # of this session, a resumed part excluded
            line = f"{label}: {done / 1e6:,.0f}/{total / 1e6:,.0f} MB ({100 * done / max(total, 1):.0f}%)"
            end = "\n" if done == total or not tty else ""
            print(("\r" if tty else "") + f"{line}, {rate / 1e6:.1f} MB/s", end=end, file=sys.stderr, flush=True)


@contextmanager
def open_source(source: str | Path | None, name: str, offset: int) -> Iterator[tuple[BinaryIO, int]]:
    """(a stream of shard `name` from byte `offset` on, the shard's full size) from a directory or the Hub."""
    if source is not None:
        path = Path(source) / name
        if not path.is_file():
            raise DataError(f"{name}: not found in {source}")
        with open(path, "rb") as f:
            f.seek(offset)
            yield f, path.stat().st_size
        return
    url = hub_url(name)
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-", "User-Agent": "nanogpt2"})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise DataError(f"{name}: not found at {url} (HTTP 404)") from None
        raise DataError(f"{name}: the Hub answered HTTP {e.code} ({e.reason}) for {url}; try again later") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(
            f"cannot reach the Hugging Face Hub ({reason}): check the connection (or set HF_ENDPOINT to a mirror) "
            f"and run `{PREPARE}` again; what was downloaded is kept and resumes"
        ) from None
    with response:
        if response.status == 206:  # the range from `offset`: "Content-Range: bytes START-END/TOTAL"
            match = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", response.headers.get("Content-Range", ""))
            if match is None or int(match[1]) != offset:
                raise DataError(f"{name}: the Hub answered an unexpected range ({response.headers['Content-Range']})")
            yield response, int(match[2])
        elif offset == 0:
            yield response, int(response.headers["Content-Length"])
        else:
            raise DataError(f"{name}: the server at {url} cannot resume a download (no range support)")


def hub_url(name: str) -> str:
    """The Hub's address of shard `name`; DataError without huggingface_hub or with HF_HUB_OFFLINE set."""
    try:
        from huggingface_hub import constants, hf_hub_url
    except ImportError:
        raise DataError(
            "downloading FineWeb needs huggingface_hub: pip install -r requirements-hub.txt (or pip install "
            "huggingface_hub)"
        ) from None
    if constants.HF_HUB_OFFLINE:
        raise DataError(f"HF_HUB_OFFLINE is set: unset it to download {name} from the Hub")
    return hf_hub_url(HUB_REPO, name, repo_type="dataset")


def fineweb_corpus(out_dir: Path) -> Corpus:
    """The downloaded shards as a corpus: the train shards present, val on the val shard; DataError while a download
    is unfinished (the run would otherwise train on fewer shards than asked for)."""
    unfinished = sorted(out_dir.glob("fineweb_*.bin.partial"))
    if unfinished:
        raise DataError(
            f"--data {NAME}: {unfinished[0]} is a download that did not finish: run `{PREPARE}` with the same --shards "
            "to resume it"
        )
    shards = sorted(out_dir.glob("fineweb_*.bin"))
    train = [p for p in shards if p.name != VAL_SHARD]
    if not train or len(train) == len(shards):
        missing = "train shards" if not train else VAL_SHARD
        raise DataError(f"--data {NAME}: no {missing} in {out_dir}; download them with `{PREPARE} [--shards N]`")
    return shard_corpus(NAME, shards)
