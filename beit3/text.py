"""Text tokenizer: a SentencePiece model read with the XLM-R id layout, as the official BEiT-3 pipeline does.

The official code loads ``beit3.spm`` through ``transformers.XLMRobertaTokenizer``. In transformers 5 that class is
backed by the ``tokenizers`` library and is built from the spm file with ``convert_to_native_format`` (no network);
the resulting ids are those of the old slow class:

``<s>`` = 0, ``<pad>`` = 1, ``</s>`` = 2, ``<unk>`` = 3, spm piece ``p >= 3`` -> ``p + 1``, ``<mask>`` = len(spm) + 1.

Index files store ``text_segment`` = ``encode(text)`` (no specials); at load time a segment is truncated to
``max_len - 2``, wrapped as ``[0] + ids + [2]`` and padded with 1 (``padding_mask`` True at pads).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
import torch
from transformers import XLMRobertaTokenizer


class TextTokenizer:
    """SentencePiece tokenizer with the XLM-R id layout (``<s>``=0 ``<pad>``=1 ``</s>``=2 ``<unk>``=3)."""

    bos_id = 0
    pad_id = 1
    eos_id = 2
    unk_id = 3

    def __init__(self, hf_tokenizer: XLMRobertaTokenizer, spm_path: Path):
        self._tok = hf_tokenizer
        self.spm_path = spm_path
        ids = (hf_tokenizer.bos_token_id, hf_tokenizer.pad_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.unk_token_id)
        if ids != (self.bos_id, self.pad_id, self.eos_id, self.unk_id):
            raise ValueError(f"text tokenizer '{spm_path}': special ids {ids} differ from the XLM-R layout (0, 1, 2, 3)")
        self.mask_id: int = hf_tokenizer.mask_token_id
        self.vocab_size: int = hf_tokenizer.vocab_size

    @classmethod
    def from_file(cls, spm_path: str | Path) -> "TextTokenizer":
        """Load a SentencePiece ``.spm``/``.model`` file whose pieces start ``<unk>``, ``<s>``, ``</s>``.

        A missing file raises FileNotFoundError; any unusable content a ValueError naming the file."""
        try:
            return cls._from_file(Path(spm_path))
        except (FileNotFoundError, ValueError) as err:
            if str(spm_path) in str(err):
                raise
            raise ValueError(f"text tokenizer model '{spm_path}' is not a usable SentencePiece model: "
                             f"{type(err).__name__}: {err}") from err
        except Exception as err:  # protobuf, sentencepiece and transformers raise assorted types on corrupt files
            raise ValueError(f"text tokenizer model '{spm_path}' is not a usable SentencePiece model: "
                             f"{type(err).__name__}: {err}") from err

    @classmethod
    def _from_file(cls, spm_path: Path) -> "TextTokenizer":
        if not spm_path.is_file():
            raise FileNotFoundError(f"text tokenizer model '{spm_path}' does not exist")
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(str(spm_path))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"text tokenizer model '{spm_path}' is not a SentencePiece model: {err}") from err
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(processor.serialized_model_proto())
        if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
            raise ValueError(
                f"text tokenizer model '{spm_path}' is not a unigram SentencePiece model; transformers 5 "
                "XLMRobertaTokenizer reads only unigram models, so ids would differ from the official pipeline"
            )
        head = [processor.id_to_piece(i) for i in range(min(3, processor.get_piece_size()))]
        if head != ["<unk>", "<s>", "</s>"]:
            raise ValueError(
                f"text tokenizer model '{spm_path}': first pieces are {head}, expected ['<unk>', '<s>', '</s>'] "
                "(train it with train_text_tokenizer)"
            )
        with tempfile.TemporaryDirectory() as tmp:
            # transformers converts only files named *.model; the official tokenizer is called beit3.spm
            link = Path(tmp) / "sentencepiece.bpe.model"
            link.symlink_to(spm_path.resolve())
            kwargs = XLMRobertaTokenizer.convert_to_native_format(vocab_file=str(link))
            return cls(XLMRobertaTokenizer(**kwargs), spm_path)

    def __len__(self) -> int:
        return self.vocab_size

    def __getstate__(self) -> dict:
        return {"spm_path": self.spm_path}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(TextTokenizer.from_file(state["spm_path"]).__dict__)

    def encode(self, text: str) -> list[int]:
        """Token ids without specials (``tokenize`` + ``convert_tokens_to_ids``, like the official index builder)."""
        return self._tok.convert_tokens_to_ids(self._tok.tokenize(text))

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ``ids``; special ids (bos, pad, eos, mask) are skipped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=True).strip()

    def pad_ids(self, id_lists: Iterable[Sequence[int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Wrap each list as ``[bos] + ids[:max_len-2] + [eos]`` and pad to ``max_len``.

        Returns ``(tokens LongTensor[B, max_len], padding_mask BoolTensor[B, max_len])`` with True at pads.
        """
        if max_len < 3:
            raise ValueError(f"max_len must be at least 3 (bos, one token, eos), got {max_len}")
        rows = [[self.bos_id, *list(ids)[: max_len - 2], self.eos_id] for ids in id_lists]
        tokens = torch.full((len(rows), max_len), self.pad_id, dtype=torch.long)
        padding_mask = torch.ones((len(rows), max_len), dtype=torch.bool)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            padding_mask[i, : len(row)] = False
        return tokens, padding_mask

    def encode_padded(self, texts: Sequence[str], max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and wrap ``texts`` (each cut to ``max_len`` tokens with the specials) and pad them to the longest;
        see :meth:`pad_ids`."""
        ids = [self.encode(t) for t in texts]
        if max_len is not None:
            ids = [i[: max_len - 2] for i in ids]
        return self.pad_ids(ids, max(map(len, ids)) + 2)

    def batch_encode(self, texts: Iterable[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode, truncate, wrap and pad ``texts``; see :meth:`pad_ids`."""
        return self.pad_ids([self.encode(t) for t in texts], max_len)


def train_text_tokenizer(
    text_files: Sequence[str | Path],
    model_prefix: str | Path,
    vocab_size: int,
    character_coverage: float = 1.0,
    hard_vocab_limit: bool = False,
    seed_sentencepiece_size: int = 100_000,
) -> Path:
    """Train a unigram SentencePiece model with the beit3.spm layout (``<unk>``=0 ``<s>``=1 ``</s>``=2, no pad piece).

    Writes ``{model_prefix}.model`` and ``.vocab`` and returns the model path. With ``hard_vocab_limit=False`` a corpus
    too small for ``vocab_size`` yields a smaller vocabulary instead of an error.
    """
    files = [Path(f) for f in text_files]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"text corpus file '{f}' does not exist")
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=",".join(str(f) for f in files),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=character_coverage,
        hard_vocab_limit=hard_vocab_limit,
        seed_sentencepiece_size=seed_sentencepiece_size,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        num_threads=1,
    )
    model_path = Path(f"{prefix}.model")
    # the trainer records input paths and prefix in the model; keep only file names so a model is reproducible
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    proto.trainer_spec.input[:] = [f.name for f in files]
    proto.trainer_spec.model_prefix = prefix.name
    model_path.write_bytes(proto.SerializeToString())
    return model_path
