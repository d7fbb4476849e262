#!/usr/bin/env python3
"""SentencePiece UNIGRAM models (T5's and big_vision's `c4_en` kind, JetFormer's tokenizer) and
the `sentencepiece` library's own ids and decodes on a test corpus.

Usage (from the repo root; versions pinned in scripts/requirements-spm-fixtures.txt, only
sentencepiece is needed here):

    python3 -m venv /tmp/spm-venv
    /tmp/spm-venv/bin/pip install sentencepiece==0.2.3
    /tmp/spm-venv/bin/python scripts/gen_spm_unigram_fixtures.py [--out tests/fixtures/spm_unigram]

Writes into the folder:
  t5like/sentencepiece.model  UNIGRAM, 800 pieces, the default `nmt_nfkc` rule (a compiled
                              charsmap), dummy prefix, extra whitespace removed, no byte
                              fallback; <pad>=0 </s>=1 <unk>=2 and no <s>, as c4_en has them
  fallback/tokenizer.model    UNIGRAM, 600 pieces, `nmt_nfkc_cf` (case folding), byte
                              fallback, no dummy prefix, whitespace kept, USER_DEFINED <sep>
                              and "kiln", CONTROL <ctl>, a custom unk_surface
  cases.json                  for each model, each line of a generated corpus (seed 2, >= 1000
                              lines: ASCII, case, accents, full-width and compatibility
                              characters, ligatures, CJK, emoji, characters never seen in
                              training, whitespace runs, tabs, newlines, leading and trailing
                              spaces, user-defined symbols written in the text) and a few
                              written by hand: `encode(line)` ids and `decode(ids)`; also
                              `decode` of id lists that are not encodings (control pieces,
                              lone byte pieces, <unk> at the start)
"""

import argparse
import json
import random
import tempfile
from pathlib import Path

import sentencepiece as spm

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "fixtures" / "spm_unigram"

WORDS = (
    "the of and to in is was for on that with as by at from his her an were which are this be or had not but "
    "photo cat dog car bench snow street bird wire people image caption describe a small red house near water "
    "quick brown fox jumps over lazy blue green yellow large tiny sitting playing parked standing kiln jetformer "
    "flow latent token mixture guidance sample noise pixel resolution"
).split()
ACCENTED = "héllo wörld ñandú café naïve façade über straße Ørsted Ångström élève crème brûlée São Paulo".split()
# Characters nmt_nfkc rewrites: full-width forms, ligatures, circled digits, units, NBSP, ideographic space.
COMPAT = ["ＡＢＣ", "ｆｕｌｌ", "１２３", "ﬁle", "ﬂow", "①②", "㎏", "ｶﾀｶﾅ", "\u00a0", "\u3000", "Ⅻ", "™", "…", "\u200b", "x\u0301"]
RARE = ["ᚠᚢᚦ", "ꦲꦏ", "𓀀", "ⴰⵣ", "ᐃᓄᒃ"]  # scripts absent from training: unknown characters
CJK_EMOJI = ["東京", "漢字", "한국어", "😀", "👍🏽", "👨‍👩‍👧"]


def line(rng: random.Random, rare: bool) -> str:
    parts = []
    for _ in range(rng.randint(1, 12)):
        r = rng.random()
        if r < 0.55:
            w = rng.choice(WORDS)
            parts.append(w.capitalize() if rng.random() < 0.2 else w.upper() if rng.random() < 0.05 else w)
        elif r < 0.65:
            parts.append(rng.choice(ACCENTED))
        elif r < 0.75:
            parts.append(str(rng.randint(0, 10 ** rng.randint(1, 6))))
        elif r < 0.83:
            parts.append(rng.choice(COMPAT))
        elif r < 0.9:
            parts.append(rng.choice(CJK_EMOJI))
        elif r < 0.95:
            parts.append(rng.choice(RARE) if rare else rng.choice(WORDS))
        else:
            parts.append(rng.choice(["<sep>", "kiln", "<ctl>", "</s>", "<unk>"]) if rare else rng.choice(WORDS))
    out = ""
    for p in parts:
        out += p + rng.choice([" ", " ", " ", " ", "  ", "\t", "\n", "", ", ", ". "])
    if rng.random() < 0.2:
        out = rng.choice([" ", "   ", "\t", "\u3000"]) + out
    return out


HAND = ["", " ", "   ", "a", " a", "a ", "a  b", "\t\n", "ᚠ", "ᚠᚢ x ᚦ", "<sep>", "kiln<sep>kiln", "A\u3000B", "ﬁ", "x" * 70]


def train(prefix: Path, lines: list, **kw) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), model_type="unigram", character_coverage=0.9995,
        num_threads=1, seed_sentencepiece_size=100000, shuffle_input_sentence=False, minloglevel=2, **kw
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    rng = random.Random(1)
    training = [line(rng, rare=False) for _ in range(6000)]
    rng = random.Random(2)
    tests = HAND + [line(rng, rare=True) for _ in range(1100)]
    models = {
        "t5like": ("sentencepiece.model", dict(vocab_size=800, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)),
        "fallback": (
            "tokenizer.model",
            dict(
                vocab_size=600, normalization_rule_name="nmt_nfkc_cf", byte_fallback=True, add_dummy_prefix=False,
                remove_extra_whitespaces=False, user_defined_symbols=["<sep>", "kiln"], control_symbols=["<ctl>"],
                unk_surface="[UNK]", pad_id=-1, unk_id=0, bos_id=1, eos_id=2,
            ),
        ),
    }
    cases = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (file, kw) in models.items():
            train(Path(tmp) / name, training, **kw)
            dst = args.out / name
            dst.mkdir(parents=True, exist_ok=True)
            (dst / file).write_bytes((Path(tmp) / f"{name}.model").read_bytes())
            sp = spm.SentencePieceProcessor(model_file=str(dst / file))
            rows = [{"text": t, "ids": sp.encode(t), "decoded": sp.decode(sp.encode(t))} for t in tests]
            n = sp.get_piece_size()
            odd = [[n - 1, 0, 1, 2], [2, 2, 5], [sp.piece_to_id("<ctl>") if name == "fallback" else 1, 7, 8]]
            if name == "fallback":
                b = lambda x: sp.piece_to_id(f"<0x{x:02X}>")
                odd += [[b(0xE2), b(0x96), 20], [b(0xC3), b(0xA9), b(0xFF), 30], [0, 9, 0]]
            decodes = [{"ids": ids, "decoded": sp.decode(ids)} for ids in odd]
            cases[name] = {"file": file, "vocab_size": n, "rows": rows, "decodes": decodes}
    (args.out / "cases.json").write_text(json.dumps(cases, ensure_ascii=False, indent=0) + "\n")
    for name, c in cases.items():
        unk = sum(1 for r in c["rows"] if any(i == (2 if name == "t5like" else 0) for i in r["ids"]))
        print(f"{name}: {c['vocab_size']} pieces, {len(c['rows'])} lines, {unk} with <unk>")


if __name__ == "__main__":
    main()
