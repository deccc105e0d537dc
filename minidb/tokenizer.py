"""CLIP's byte-level BPE tokenizer (the one SD v1's text encoder was trained with), built on the
`tokenizers` library from the merges file OpenAI ships with CLIP (minidb/data/).

    tok = CLIPTokenizer()
    tok(["a photo of a cat"])   # LongTensor [1, 77]: 49406, 320, 1125, 539, 320, 2368, 49407, 49407...

The pipeline is CLIP's `SimpleTokenizer` and transformers' `CLIPTokenizer` for
`openai/clip-vit-large-patch14`: NFC, runs of whitespace -> one space, lower case, CLIP's
pre-tokenisation regex, bytes -> printable unicode (GPT-2's table), BPE with `</w>` ending each
word. Unlike OpenAI's original it does not run ftfy (transformers does not either when ftfy is
missing, and diffusers tokenizes through transformers), so mojibake, curly quotes and fullwidth
forms are tokenized as written instead of being "fixed" first.
"""
import functools
import gzip
from importlib import resources

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = 49406, 49407
CONTEXT_LENGTH = 77
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the file
# CLIP's regex: special tokens, English contractions, letter runs, single digits, symbol runs.
PRETOKENIZE = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> character table: printable Latin-1 bytes stand for themselves,
    the other 68 bytes (controls, space, ...) get the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def load_merges() -> list[tuple[str, str]]:
    """The merges CLIP uses, in priority order, from the bundled gzip file (first line is a header)."""
    data = resources.files("minidb").joinpath("data/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")[1:NUM_MERGES + 1]
    return [tuple(line.split()) for line in lines]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's 49,408 ids: the 256 byte characters, the same ending a word (`</w>`), one token per
    merge in merge order, then the two special tokens."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}


@functools.lru_cache(maxsize=None)
def _backend() -> Tokenizer:
    """The `tokenizers` pipeline; building the BPE model from 49k merges takes a while, so once per process."""
    merges = load_merges()
    vocab = build_vocab(merges)
    assert len(vocab) == 49408 and vocab[BOS] == BOS_ID and vocab[EOS] == EOS_ID
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", unk_token=EOS, fuse_unk=False))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="removed", invert=True),  # keep matches, drop the rest
        # ByteLevel's own GPT-2 split changes nothing on CLIP's pieces except a case variant of a
        # special token ("<|EndOfText|>" -> "<|", "endoftext", "|>"): kept, as transformers does.
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    # A literal "<|endoftext|>" in a prompt is the special token, as in CLIP and transformers.
    tok.add_special_tokens([AddedToken(BOS, normalized=False), AddedToken(EOS, normalized=False)])
    return tok


class CLIPTokenizer:
    """`tok(prompts) -> LongTensor [B, 77]`: BOS, BPE ids, EOS, padded with EOS; prompts longer
    than 75 tokens are cut to 75 and still end in EOS (what SD v1 saw in training)."""

    bos_id, eos_id, pad_id = BOS_ID, EOS_ID, EOS_ID
    context_length = CONTEXT_LENGTH

    def __init__(self):
        self._tok = _backend()

    def _bpe(self, prompts: list[str]) -> list[list[int]]:
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"prompts must be strings, got {type(p).__name__}: {p!r}")
        return [e.ids for e in self._tok.encode_batch(prompts, add_special_tokens=False)]

    def encode(self, prompt: str) -> list[int]:
        """[BOS, ids..., EOS], neither padded nor truncated."""
        return [BOS_ID, *self._bpe([prompt])[0], EOS_ID]

    def num_tokens(self, prompt: str) -> int:
        """BPE tokens in the prompt, without BOS/EOS; more than 75 means `tok()` truncates it."""
        return len(self._bpe([prompt])[0])

    def decode(self, ids) -> str:
        """Text of the ids with BOS/EOS dropped: lower case, one space between words."""
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        tokens = [self._tok.id_to_token(int(i)) for i in ids if int(i) not in (BOS_ID, EOS_ID)]
        text = "".join(tokens).replace("</w>", " ")
        return bytes(32 if c == " " else byte_of[c] for c in text).decode("utf-8", errors="replace").strip()

    def __call__(self, prompts: list[str] | str) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        body = CONTEXT_LENGTH - 2
        rows = [[BOS_ID, *ids[:body], EOS_ID] for ids in self._bpe(list(prompts))]
        out = torch.full((len(rows), CONTEXT_LENGTH), EOS_ID, dtype=torch.long)  # EOS doubles as padding
        for i, row in enumerate(rows):
            out[i, :len(row)] = torch.tensor(row)
        return out
