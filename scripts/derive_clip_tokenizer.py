"""Derive the CLIP tokenizer files (vocab.json, merges.txt) that transformers' CLIPTokenizer reads.

Source: ``open_clip/bpe_simple_vocab_16e6.txt.gz`` from the ``open_clip_torch`` wheel on PyPI
(MIT licence, the same BPE file OpenAI's CLIP ships). The vocabulary is built the way CLIP's own
tokenizer builds it: the 256 byte characters, the same with ``</w>``, one entry per merge for the
first 48,894 merges, then the two special tokens.

Usage: python scripts/derive_clip_tokenizer.py OPEN_CLIP_WHEEL OUT_DIR
"""

import gzip
import json
import sys
import zipfile
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # CLIP's vocabulary size minus bytes and special tokens


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def main() -> None:
    wheel, out = Path(sys.argv[1]), Path(sys.argv[2])
    with zipfile.ZipFile(wheel) as zf:
        text = gzip.decompress(zf.read("open_clip/bpe_simple_vocab_16e6.txt.gz")).decode("utf-8")
    merges = text.split("\n")[1 : N_MERGES + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


if __name__ == "__main__":
    main()
