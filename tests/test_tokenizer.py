"""The offline GPT-2 encoding against an independent BPE (transformers' GPT2Tokenizer on the same files)."""

import shutil

import pytest

from nanogpt2.tokenizer import EOT, VOCAB_SIZE, bpe_files, decode, encode, get_encoding

TEXTS = [
    "Hello world",
    "To be, or not to be: that is the question.\n\nWhether 'tis nobler in the mind to suffer",
    "  leading spaces,   runs of   spaces\t\ttabs\r\nCRLF\n\n\n   \n trailing   ",
    "Ünïcödé: naïve café, 日本語のテキスト, Ελληνικά, русский, עברית, العربية",
    "emoji 🤖🚀👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵, combining e\u0301 and zero-width\u200bjoiner",
    "numbers 1234567890 3.14159 1e-10 0x7fff, code: def f(x): return x**2  # ok",
    "contractions: I'm you're he's we'll they'd it's DON'T",
    "",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """GPT2Tokenizer loaded from the same two files (the vocab.json/merges.txt layout works on transformers 4 and 5)."""
    transformers = pytest.importorskip("transformers")
    encoder_json, vocab_bpe = bpe_files()
    folder = tmp_path_factory.mktemp("gpt2-bpe")
    shutil.copy(encoder_json, folder / "vocab.json")
    shutil.copy(vocab_bpe, folder / "merges.txt")
    return transformers.GPT2Tokenizer.from_pretrained(folder)


def test_known_ids():
    enc = get_encoding()
    assert enc.n_vocab == VOCAB_SIZE
    assert encode("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [EOT]
    assert enc.eot_token == EOT


@pytest.mark.parametrize("text", TEXTS)
def test_parity_with_reference(reference, text):
    ours = encode(text)
    assert ours == reference.encode(text)
    assert decode(ours) == text


def test_special_token_parity(reference):
    text = "first document<|endoftext|>second one\n<|endoftext|>"
    ours = get_encoding().encode(text, allowed_special={"<|endoftext|>"})
    assert ours == reference.encode(text)
    assert ours.count(EOT) == 2
    # Without allowed_special the marker is ordinary text, never the separator id.
    assert EOT not in encode(text)
