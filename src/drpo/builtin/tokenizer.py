"""The built-in word-level tokenizer for the arithmetic task.

Vocabulary (2,555 entries; ``len(vocabulary())``):

- special tokens ``<|pad|>``, ``<|endoftext|>`` (EOS) and ``<|unk|>``;
- every word and punctuation mark the task produces (names, objects, templates, ``\\boxed{``, ``}``);
- every integer 0..999 as one token, plus continuation pieces ``##0``..``##999`` (also
  zero-padded: ``##05``, ``##005``) for longer numbers.

Numbers: all task operands and answers lie in 0..999, so each is a single token and the
answer is a single sampling decision (its probability is the model's confidence). Longer
numbers split left to right into groups of three digits (``12345`` -> ``123 ##45``), the
scheme of the cl100k / Llama-3 tokenizers; the WordPiece model does this greedy
longest-match and its decoder glues ``##`` pieces back, so numbers round-trip exactly.

Pre-tokenisation splits on whitespace, then isolates ``\\boxed{``, digit runs, words and
single punctuation marks; decoding joins tokens with single spaces. Canonical task text
(single-space separated) therefore round-trips exactly, and ``\\boxed{357}`` decodes as
``\\boxed{ 357 }``, which math-verify parses.
"""
from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from drpo.tasks.arithmetic import vocabulary_words

PAD, EOS, UNK = "<|pad|>", "<|endoftext|>", "<|unk|>"
MAX_WHOLE_NUMBER = 999


def vocabulary() -> list[str]:
    """The ordered vocabulary: specials, numbers, continuation pieces, then task words."""
    numbers = [str(i) for i in range(MAX_WHOLE_NUMBER + 1)]
    pieces = [f"##{i:0{width}d}" for width in (1, 2, 3) for i in range(10**width)]
    return [PAD, EOS, UNK] + numbers + pieces + vocabulary_words()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The built-in tokenizer, ready for ``save_pretrained`` / ``AutoTokenizer.from_pretrained``."""
    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    tok = Tokenizer(models.WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=100))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"\\boxed\{|[0-9]+|[A-Za-z']+|[^\sA-Za-z0-9]"), "isolated"),
    ])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )


def char_tokenizer(chars: str = "0123456789+=? abcdefghijklmnopqrstuvwxyz") -> PreTrainedTokenizerFast:
    """A one-token-per-character tokenizer built locally (pad, eos, unk + ``chars``), for examples
    and tests that need a tokenizer without any download."""
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>"] + list(chars))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")
