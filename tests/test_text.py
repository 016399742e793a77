"""Text tokenizer: id layout against raw SentencePiece, round trip, padding and truncation."""
import random

import pytest
import sentencepiece as spm
import torch

from beit3.text import TextTokenizer, train_text_tokenizer

WORDS = "the a red blue green yellow circle square triangle star left right of above below one two three there is are".split()


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(1500)))
    return train_text_tokenizer([corpus], root / "tiny", vocab_size=40, hard_vocab_limit=True)


def _xlmr_shift(spm_id: int) -> int:
    return {0: 3, 1: 0, 2: 2}.get(spm_id, spm_id + 1)


@pytest.mark.parametrize("suffix", [".model", ".spm"])
def test_id_layout_matches_shifted_sentencepiece(spm_model, suffix):
    path = spm_model.with_suffix(suffix)
    if suffix != ".model":
        path.write_bytes(spm_model.read_bytes())
    tok = TextTokenizer.from_file(path)
    raw = spm.SentencePieceProcessor(model_file=str(spm_model))
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert raw.get_piece_size() == 40
    assert tok.mask_id == raw.get_piece_size() + 1
    assert tok.vocab_size == raw.get_piece_size() + 2
    for text in ["the red circle is left of a blue square", "three stars above qqq zebra", "Ünïcode x"]:
        assert tok.encode(text) == [_xlmr_shift(i) for i in raw.encode(text)]


def test_round_trip(spm_model):
    tok = TextTokenizer.from_file(spm_model)
    text = "there are two red circles left of a green star"
    ids = tok.encode(text)
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.mask_id]) == text


def test_batch_encode_wraps_truncates_and_pads(spm_model):
    tok = TextTokenizer.from_file(spm_model)
    short, long = "a red star", " ".join(["blue circle"] * 20)
    tokens, pad = tok.batch_encode([short, long], max_len=12)
    assert tokens.shape == pad.shape == (2, 12) and tokens.dtype == torch.long and pad.dtype == torch.bool
    ids_short = tok.encode(short)
    n = len(ids_short) + 2
    assert tokens[0, :n].tolist() == [0, *ids_short, 2]
    assert (tokens[0, n:] == tok.pad_id).all() and pad[0, n:].all() and not pad[0, :n].any()
    assert tokens[1].tolist() == [0, *tok.encode(long)[:10], 2] and not pad[1].any()
    same, same_pad = tok.pad_ids([ids_short, tok.encode(long)], max_len=12)
    assert torch.equal(same, tokens) and torch.equal(same_pad, pad)
    with pytest.raises(ValueError, match="max_len"):
        tok.pad_ids([[5]], max_len=2)


def test_pickles_for_dataloader_workers(spm_model):
    import pickle

    tok = pickle.loads(pickle.dumps(TextTokenizer.from_file(spm_model)))
    assert tok.encode("red star") == TextTokenizer.from_file(spm_model).encode("red star")


def test_bad_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.spm"):
        TextTokenizer.from_file(tmp_path / "nope.spm")
    bad = tmp_path / "bad.spm"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.spm"):
        TextTokenizer.from_file(bad)


def test_bpe_models_are_rejected(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(WORDS * 20))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "bpe"), vocab_size=30,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    with pytest.raises(ValueError, match="not a unigram"):
        TextTokenizer.from_file(tmp_path / "bpe.model")
