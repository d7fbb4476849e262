#!/usr/bin/env python3
"""A small Gemma-like SentencePiece BPE model and transformers' GemmaTokenizer on a test corpus.

Usage (from the repo root; versions pinned in scripts/requirements-spm-fixtures.txt, no torch):

    python3 -m venv /tmp/spm-venv
    /tmp/spm-venv/bin/pip install -r scripts/requirements-spm-fixtures.txt
    /tmp/spm-venv/bin/python scripts/gen_spm_fixtures.py [--out tests/fixtures/spm]

Writes into the folder:
  model/tokenizer.model  trained here with the `sentencepiece` package on a generated corpus
                         (seed 1): BPE, byte_fallback, no dummy prefix, identity normalization,
                         whitespace runs kept, split_digits; <pad>=0 <eos>=1 <bos>=2 <unk>=3 as
                         Gemma has them, CONTROL <mask> and [multimodal], USER_DEFINED
                         <start_of_turn> <end_of_turn> <image> <loc0000>..<loc0003> and, as
                         Gemma's vocabulary has such pieces, <unused0> <unused1> <table> <h1>
                         "\n\n" "\n\n\n" "▁▁▁▁"
  json/tokenizer.json    the same model as transformers' GemmaTokenizer saves it
  nomask/tokenizer.model the same options without <mask>: transformers appends it after the
                         pieces
  tiny/tokenizer.model   a 300-piece BPE model (lowercase letters and spaces): the big_vision PaliGemma fixtures'
                         tokenizer for `kiln generate --prompt` tests
  unigram/tokenizer.model a UNIGRAM model (identity rule, 300 pieces)
  unused/tokenizer.model model/ with five frequent NORMAL pieces retyped UNUSED (SentencePiece
                         never emits those; transformers keeps them as ordinary pieces)
  cases.json             for each line of another generated corpus (seed 2, >= 1000 lines:
                         ASCII, accents, combining marks, CJK, emoji with ZWJ and skin tones,
                         whitespace runs, tabs, newlines, digits, special tokens written in the
                         text): ids of GemmaTokenizer.from_pretrained(model/)(line,
                         add_special_tokens=False), and decode(ids) and decode(ids,
                         skip_special_tokens=True) where they differ from the line itself
                         ("decoded" / "decoded_skip" keys, absent when equal to "text").
                         Also the ids of `nomask/` (first 50 lines) and `unused/` (first 200), the vocabulary size and
                         a count of lines where sentencepiece's own encode differs (information).
"""

import argparse
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import sentencepiece as spm
from transformers import GemmaTokenizer
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "fixtures" / "spm"

WORDS = (
    "the of and to in is was for on that with as by at from his her an were which are this be or had not but "
    "photo cat dog car bench snow street bird wire people image caption describe detect segment answer question "
    "quick brown fox jumps over lazy red blue green yellow small large tiny sitting playing parked standing "
    "kiln compiler runtime tensor kernel model vision language token attention layer weight bias softmax"
).split()
ACCENTED = "héllo wörld ñandú café naïve façade über straße Ørsted Ångström élève crème brûlée São Paulo Việt Nam đường Łódź".split()
GREEK_CYRILLIC = "Ωμέγα αλφα βήτα Привет мир спасибо Україна".split()
CJK = ["日本語", "東京タワー", "ひらがな", "カタカナ", "中文字符", "你好世界", "한국어", "안녕하세요", "漢字", "猫が好き", "大模型"]
EMOJI = ["🦀", "🔥", "👍🏽", "👨‍👩‍👧", "🇫🇷", "😀", "🎉", "❤️", "🐱", "🚗"]
RARE = ["𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "⅞", "∮", "‽", "ꙮ", "𓂀", "🦩", "🫠", "\u00a0", "\u200b", "e\u0301", "ﬁ", "▁", "\r"]
SPECIAL = ["<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "[multimodal]", "<start_of_turn>", "<end_of_turn>", "<image>",
           "<loc0000>", "<loc0003>", "<loc0004>", "<start_of_turn", "<bos", "<unused1>", "<table>", "<h1>", "▁▁▁▁", "\n\n\n"]
USER_DEFINED = ["<start_of_turn>", "<end_of_turn>", "<image>"] + [f"<loc{i:04d}>" for i in range(4)] + [
    "<unused0>", "<unused1>", "<table>", "<h1>", "\n\n", "\n\n\n", "▁▁▁▁"]


def number(rng: random.Random) -> str:
    return rng.choice([str(rng.randint(0, 9)), str(rng.randint(10, 99999)), f"{rng.uniform(0, 1000):.3f}",
                       f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}", f"{rng.randint(1, 9)},{rng.randint(100, 999)}"])


def space(rng: random.Random) -> str:
    return rng.choices([" ", "  ", "   ", "\t", " \t ", "\n", "\n\n", "      "], weights=[40, 3, 2, 2, 1, 2, 1, 1])[0]


def line(rng: random.Random, rare: bool) -> str:
    """One line: words of several scripts, numbers and emoji joined by mixed whitespace."""
    parts = []
    for _ in range(rng.randint(1, 14)):
        kind = rng.choices(["word", "acc", "gc", "cjk", "emoji", "num", "rare", "special"],
                           weights=[50, 10, 4, 8, 5, 8, 3 if rare else 0, 3 if rare else 0])[0]
        parts.append({"word": lambda: rng.choice(WORDS).capitalize() if rng.random() < 0.1 else rng.choice(WORDS),
                      "acc": lambda: rng.choice(ACCENTED), "gc": lambda: rng.choice(GREEK_CYRILLIC),
                      "cjk": lambda: rng.choice(CJK), "emoji": lambda: rng.choice(EMOJI), "num": lambda: number(rng),
                      "rare": lambda: rng.choice(RARE), "special": lambda: rng.choice(SPECIAL)}[kind]())
    out = parts[0]
    for p in parts[1:]:
        out += ("" if rng.random() < 0.1 else space(rng)) + p
    if rng.random() < 0.08:
        out = space(rng) + out
    if rng.random() < 0.08:
        out += space(rng)
    if rng.random() < 0.05:
        out += rng.choice(".,!?;:")
    return out


def train(prefix: Path, lines: list, with_mask: bool) -> None:
    control = (["<mask>"] if with_mask else []) + ["[multimodal]"]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), model_type="bpe", vocab_size=1500, byte_fallback=True,
        add_dummy_prefix=False, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=0.9995, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", control_symbols=control,
        user_defined_symbols=USER_DEFINED, hard_vocab_limit=False, num_threads=1, minloglevel=2)


def train_tiny(prefix: Path, lines: list) -> None:
    """300 pieces (the specials, 256 bytes, a few merges): small enough for the big_vision
    PaliGemma fixtures' vocabularies (300 and 320), so `kiln generate --prompt` runs on them."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), model_type="bpe", vocab_size=300, byte_fallback=True,
        add_dummy_prefix=False, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=0.9995, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", hard_vocab_limit=False, num_threads=1, minloglevel=2)


def retype_unused(src: Path, dst: Path) -> list:
    """Copies a model with the five most frequent NORMAL pieces of two characters or more marked UNUSED."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(src.read_bytes())
    normal = [i for i, p in enumerate(m.pieces) if p.type == pb.ModelProto.SentencePiece.NORMAL and len(p.piece) >= 2]
    picked = normal[:5]
    for i in picked:
        m.pieces[i].type = pb.ModelProto.SentencePiece.UNUSED
    dst.write_bytes(m.SerializeToString())
    return picked


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--lines", type=int, default=1200)
    args = ap.parse_args()
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    for d in ("model", "json", "nomask", "unused", "unigram", "tiny"):
        (out / d).mkdir(parents=True)

    rng = random.Random(1)
    training = [line(rng, rare=False) for _ in range(6000)]
    tests = [line(random.Random(2 * 10**6 + i), rare=True) for i in range(args.lines)]
    tests += ["", " ", "  ", "\t", "\n", "\n\n", "▁", "▁▁", " ▁ ", "<bos>", "<bos><eos>", "<start_of_turn>user\nhi<end_of_turn>\n",
              "<image><image>caption en", "<loc0000><loc0003> cat", "🦩🫠", "a" * 40, " " * 17, "1234567890"]

    out = out.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        # A relative model_prefix: the trainer_spec records it, and the files stay byte-identical.
        os.chdir(tmp)
        train(Path("m"), training, with_mask=True)
        shutil.copy("m.model", out / "model" / "tokenizer.model")
        train(Path("n"), training, with_mask=False)
        shutil.copy("n.model", out / "nomask" / "tokenizer.model")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(training), model_prefix="u", model_type="unigram", vocab_size=300,
            normalization_rule_name="identity", pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
            bos_piece="<bos>", unk_piece="<unk>", hard_vocab_limit=False, num_threads=1, minloglevel=2)
        shutil.copy("u.model", out / "unigram" / "tokenizer.model")
        train_tiny(Path("t"), ["".join(c for c in l.lower() if c in "abcdefghijklmnopqrstuvwxyz ") for l in training])
        shutil.copy("t.model", out / "tiny" / "tokenizer.model")
        os.chdir(REPO)

    retype_unused(out / "model" / "tokenizer.model", out / "unused" / "tokenizer.model")

    tok = GemmaTokenizer.from_pretrained(str(out / "model"))
    tok.backend_tokenizer.save(str(out / "json" / "tokenizer.json"))
    nomask = GemmaTokenizer.from_pretrained(str(out / "nomask"))
    unused = GemmaTokenizer.from_pretrained(str(out / "unused"))
    sp = spm.SentencePieceProcessor(model_file=str(out / "model" / "tokenizer.model"))

    cases, spm_differs = [], 0
    for text in tests:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        case = {"text": text, "ids": ids}
        for key, skip in (("decoded", False), ("decoded_skip", True)):
            d = tok.decode(ids, skip_special_tokens=skip)
            if d != text:
                case[key] = d
        cases.append(case)
        spm_differs += sp.encode(text) != ids
    meta = {
        "vocab": len(tok), "pieces": sp.get_piece_size(), "nomask_vocab": len(nomask),
        "nomask_mask_id": nomask.convert_tokens_to_ids("<mask>"),
        "nomask_ids": [nomask(c["text"], add_special_tokens=False)["input_ids"] for c in cases[:50]],
        "unused_ids": [unused(c["text"], add_special_tokens=False)["input_ids"] for c in cases[:200]],
        "sentencepiece_encode_differs_on_lines": spm_differs, "cases": cases,
    }
    (out / "cases.json").write_text(json.dumps(meta, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"{len(cases)} lines, vocab {len(tok)}, pieces {sp.get_piece_size()}, nomask vocab {len(nomask)}, "
          f"sentencepiece's own ids differ on {spm_differs} lines")


if __name__ == "__main__":
    main()
