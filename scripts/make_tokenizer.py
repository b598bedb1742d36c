#!/usr/bin/env python3
"""Build the byte-level BPE tokenizer shipped with the dummy-weight model configs.

Dummy weights produce arbitrary token ids, so the tokenizer must (a) decode every id below the
model's vocab_size, (b) encode any text without unknown tokens, (c) carry Llama 3's special
tokens at Llama 3's ids, and (d) have a chat template, so that `sglang.benchmark.serving` and
the OpenAI chat API run without any hub download. Its merges are generated, not trained: no
corpus is needed and the output is the same on every machine (a test rebuilds it and compares
bytes). Text compresses to roughly 2-3 characters per token, a little worse than Llama 3's ~4.

Layout (matching Llama 3 / 3.1): ids [0, 128000) regular tokens, [128000, 128256) special.
  regular = 256 byte tokens + all 2-symbol merges over a 68-symbol alphabet (4,624)
            + 3-symbol merges (2-symbol token + symbol) until 128,000 regular tokens.

Usage: python scripts/make_tokenizer.py --out configs/models/llama-3.1-8b-dummy
"""

from __future__ import annotations

import argparse
import json
import string
from pathlib import Path

NUM_REGULAR = 128000
NUM_SPECIAL = 256
# Llama 3.1 special tokens and their ids (offset from NUM_REGULAR); the rest are reserved.
NAMED_SPECIALS = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    4: "<|finetune_right_pad_id|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",
    9: "<|eot_id|>",
    10: "<|python_tag|>",
}
# Llama 3's pre-tokenization regex.
SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] | trim }}"
    "{%- else %}{%- for part in message['content'] %}{%- if part['type'] == 'text' %}"
    "{{- part['text'] | trim }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def build_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    b2u = bytes_to_unicode()
    vocab: dict[str, int] = {b2u[b]: b for b in range(256)}
    # Word starts (space-prefixed) first, then letters, digits, newline, common punctuation.
    alphabet = [b2u[ord(" ")]] + list(string.ascii_lowercase + string.ascii_uppercase
                                      + string.digits) + [b2u[ord("\n")]] + list(".,'-")
    merges: list[tuple[str, str]] = []

    def add(left: str, right: str) -> bool:
        if len(vocab) >= NUM_REGULAR:
            return False
        tok = left + right
        if tok not in vocab:
            vocab[tok] = len(vocab)
            merges.append((left, right))
        return True

    pairs = [a + b for a in alphabet for b in alphabet]
    for tok in pairs:
        add(tok[0], tok[1])
    for tok in pairs:
        for c in alphabet:
            if not add(tok, c):
                return vocab, merges
    raise AssertionError("alphabet too small to fill the vocabulary")


def build_tokenizer():
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    vocab, merges = build_vocab_and_merges()
    assert len(vocab) == NUM_REGULAR
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = [NAMED_SPECIALS.get(i, f"<|reserved_special_token_{i}|>")
                for i in range(NUM_SPECIAL)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = NAMED_SPECIALS[0]
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, NUM_REGULAR)]),
    ])
    return tok


def tokenizer_config(max_len: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": NAMED_SPECIALS[0],
        "eos_token": NAMED_SPECIALS[9],
        "pad_token": NAMED_SPECIALS[4],
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": max_len,
        "chat_template": CHAT_TEMPLATE,
    }


def write(out: Path, max_len: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(out / "tokenizer.json"), pretty=False)
    cfg = json.dumps(tokenizer_config(max_len), indent=1) + "\n"
    (out / "tokenizer_config.json").write_text(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="model directory to write into")
    ap.add_argument("--max-len", type=int, default=131072, help="model_max_length")
    args = ap.parse_args()
    write(args.out, args.max_len)
    print(f"wrote {args.out}/tokenizer.json and tokenizer_config.json")


if __name__ == "__main__":
    main()
