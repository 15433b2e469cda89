"""Regenerate the CLIP tokenizer files of the shipped model configs (``*/tokenizer*/``).

Source: OpenCLIP's ``bpe_simple_vocab_16e6.txt.gz`` (the BPE merges OpenAI released with CLIP,
MIT-licensed), which the ``open_clip_torch`` wheel on PyPI ships. CLIP's vocabulary is derived
from it as OpenAI's ``simple_tokenizer.py`` does: the 256 byte-level characters, the same with
the end-of-word marker ``</w>``, one token per merge (the first 48,894), then
``<|startoftext|>`` and ``<|endoftext|>`` -- 49,408 tokens. Every tokenizer gets the same
vocabulary; they differ only in the padding token: OpenCLIP's (SD 2.x, SDXL's second) pads with
"!", OpenAI's with ``<|endoftext|>``.

    pip download open_clip_torch==3.3.0 --no-deps -d /tmp/wheel
    python src/lorapipe/data/model_configs/make_tokenizers.py /tmp/wheel/open_clip_torch-3.3.0-py3-none-any.whl
"""

from __future__ import annotations

import gzip
import json
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).parent
VOCAB_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
MERGES = 49152 - 256 - 2  # OpenAI's count: a 49,408-token vocabulary
START, END = "<|startoftext|>", "<|endoftext|>"
# tokenizer directory -> its padding token
TOKENIZERS = {
    "sd1/tokenizer": END,
    "sd2/tokenizer": "!",
    "sdxl/tokenizer": END,
    "sdxl/tokenizer_2": "!",
}


def byte_characters() -> list[str]:
    """CLIP's (and GPT-2's) printable stand-in for each byte, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    # the order of OpenAI's table: printable bytes first, then the rest
    return [table[b] for b in printable] + [table[b] for b in range(256) if b not in printable]


def read_merges(source: Path) -> list[str]:
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            data = gzip.decompress(wheel.read(VOCAB_MEMBER))
    else:
        data = gzip.decompress(source.read_bytes())
    lines = data.decode("utf-8").split("\n")
    return lines[1 : MERGES + 1]  # the first line is a header


def write(source: Path) -> None:
    merges = read_merges(source)
    alphabet = byte_characters()
    tokens = alphabet + [f"{char}</w>" for char in alphabet]
    tokens += ["".join(merge.split()) for merge in merges] + [START, END]
    assert len(tokens) == len(set(tokens)) == 49408, len(tokens)
    vocab = json.dumps({token: index for index, token in enumerate(tokens)}, ensure_ascii=False)
    merges_text = "#version: 0.2\n" + "\n".join(merges) + "\n"
    for name, pad in TOKENIZERS.items():
        directory = HERE / name
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "vocab.json").write_text(vocab + "\n", encoding="utf-8")
        (directory / "merges.txt").write_text(merges_text, encoding="utf-8")
        special = {"bos_token": START, "eos_token": END, "pad_token": pad, "unk_token": END}
        config = {
            **special,
            "add_prefix_space": False,
            "do_lower_case": True,
            "errors": "replace",
            "model_max_length": 77,
            "tokenizer_class": "CLIPTokenizer",
        }
        for file, content in (
            ("special_tokens_map.json", special),
            ("tokenizer_config.json", config),
        ):
            (directory / file).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        print(f"wrote {directory}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    write(Path(sys.argv[1]))
