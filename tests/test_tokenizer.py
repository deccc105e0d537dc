"""minidb.tokenizer.CLIPTokenizer against transformers' CLIPTokenizer built from the same merges file.

Reference: transformers 5's `CLIPTokenizer` (`CLIPTokenizerFast` is the same class there) from a
vocab.json/merges.txt this file derives from minidb/data/bpe_simple_vocab_16e6.txt.gz with CLIP's
recipe, called as SD v1's FrozenCLIPEmbedder and diffusers call it: max_length=77,
padding="max_length", truncation=True. Every id must match, on every input below.

Where the tokenizer SD v1 was *trained* with may differ (transformers 4.19's pure-Python
CLIPTokenizer), by design of that tokenizer, not tested here because neither it nor ftfy is installed:
  * with ftfy installed (it comes with OpenAI's CLIP package, in CompVis' environment.yaml) it ran
    `ftfy.fix_text` first: curly quotes become straight, fullwidth letters and ligatures ASCII,
    mojibake repaired. Without ftfy it ran BERT's BasicTokenizer instead (control chars dropped,
    every CJK character its own word; in 4.x releases of 2022 also accents stripped and each
    punctuation mark split off). transformers 5, and so diffusers today, does neither; we follow
    it, so an SD v1 user gets what diffusers gives.
  * with ftfy it lower-cased before finding special tokens ("<|EndOfText|>" -> 49407, as OpenAI's
    CLIP does); transformers 5 tokenizes that text as "<|", "endoftext", "|>" (six BPE tokens). A
    literal "<|endoftext|>" is the special token in both.
"""
import gzip
import json
from importlib import resources

import pytest
import torch

from minidb.tokenizer import CLIPTokenizer, bytes_to_unicode

CORPUS = [
    "a photo of a cat",
    "A Photo Of A CAT, by Greg Rutkowski; trending on ArtStation!!!",
    "portrait of sks dog, 4k, 8K UHD, f/1.8, 35mm, 1024x768, 3.14159, -42, $100, 50%",
    "café naïve résumé Ångström crème brûlée São Paulo Zürich ÉCOLE",
    "cafe\u0301 nai\u0308ve",  # decomposed accents: NFC composes them
    "東京の夜景、ネオン 一只可爱的猫 한국어 문장",
    "emoji 😀🐶🚀 👩‍👩‍👧‍👦 👍🏽 🇫🇷 ❤️",
    "   leading and trailing spaces   ",
    "repeated    spaces  between\twords\tand\ttabs",
    "new\nlines\r\nand\n\n\nblank\x0bvertical\x0cfeed",
    "nbsp\u00a0ideographic\u3000zero\u200bwidth",
    "don't you're we've I'm they'll she'd it's DON'T IT'S",
    "''s'''s ''' ' rock'n'roll",
    "<|endoftext|> literal special <|startoftext|> tokens",
    "mixed case <|EndOfText|>",
    "“curly quotes” ‘single’ — dashes – ellipsis… ﬁ ligature ＦＵＬＬＷＩＤＴＨ &amp; &lt;",
    "Ελληνικά ΣΟΦΙΑ İstanbul straße Москва हिन्दी العربية ไทย",
    "control\x00chars\x1cinfo\x7fdel",
    "supercalifragilisticexpialidocious" * 4,
    "0123456789" * 3,
    "",
    " ",
    "\n\t",
    # longer than 77 tokens: must be truncated to 75 + BOS + EOS
    "a beautiful highly detailed painting of a castle on a hill at sunset, " * 8,
    "cat " * 100,
]


def clip_vocab_files(folder):
    """vocab.json + merges.txt as CLIP builds its encoder (simple_tokenizer.py): the byte
    characters (GPT-2's table, from transformers), the same with </w>, the first 49152-256-2
    merges joined, then the two special tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode as reference_table

    gz = resources.files("minidb").joinpath("data/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    merges = gzip.decompress(gz).decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    byte_chars = list(reference_table().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return len(tokens)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    assert clip_vocab_files(folder) == 49408
    return transformers.CLIPTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


def test_byte_table_is_gpt2s():
    from transformers.convert_slow_tokenizer import bytes_to_unicode as reference_table
    assert bytes_to_unicode() == reference_table()


def test_known_ids(tok):
    # openai/clip-vit-large-patch14's ids for this prompt (as in transformers' docs and model cards).
    assert tok.encode("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok._tok.get_vocab_size() == 49408


@pytest.mark.parametrize("prompt", CORPUS)
def test_encode_matches_transformers(tok, reference, prompt):
    expected = reference(prompt, truncation=False).input_ids
    assert tok.encode(prompt) == expected
    assert tok.num_tokens(prompt) == len(expected) - 2


def test_batch_matches_transformers_padded(tok, reference):
    expected = reference(CORPUS, max_length=77, padding="max_length", truncation=True,
                         return_tensors="pt").input_ids
    got = tok(CORPUS)
    assert got.dtype == torch.long and got.shape == (len(CORPUS), 77)
    assert torch.equal(got, expected)


def test_decode_matches_transformers(tok, reference):
    for prompt in CORPUS:
        ids = tok.encode(prompt)
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True), prompt


def test_padding_and_truncation(tok):
    short = tok("a photo of a cat")
    assert short.shape == (1, 77)
    assert short[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (short[0, 7:] == 49407).all()  # padded with EOS, as SD v1 was trained

    assert tok("")[0].tolist() == [49406] + [49407] * 76

    cat = 2368
    for n in (74, 75, 76, 100):
        prompt = "cat " * n
        assert tok.num_tokens(prompt) == n
        assert tok.encode(prompt) == [49406] + [cat] * n + [49407]  # encode never truncates
        row = tok(prompt)[0].tolist()
        kept = min(n, 75)
        assert row == [49406] + [cat] * kept + [49407] * (77 - 1 - kept)
        assert row[-1] == 49407


def test_batch_rows_are_independent(tok):
    prompts = ["a photo of a cat", "cat " * 100, "a dog"]
    batch = tok(prompts)
    for i, p in enumerate(prompts):
        assert torch.equal(batch[i], tok(p)[0])
    assert tok([]).shape == (0, 77)


def test_bad_input(tok):
    with pytest.raises(TypeError, match="prompts must be strings"):
        tok(["ok", 3])


def test_backend_built_once(tok):
    assert CLIPTokenizer()._tok is tok._tok
