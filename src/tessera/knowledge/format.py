"""Training examples for knowledge learning: documents and answer-masked QA pairs.

PIT (Jiang et al., 2024, section 2, "Experimental settings"): documents are trained on every
token, start with the BOS token and get *no* EOS (the model should not learn that a document
ends); QA pairs are ``Question: ...\\nAnswer: ...`` and the loss covers the answer tokens (and
the EOS that ends the answer) only - every prompt token gets label -100.  ``qa_format="chat"``
uses the tokenizer's chat template instead, for instruction-tuned models that expect it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tessera.errors import ContextTooLongError, InputError

IGNORE = -100
QA_TEMPLATE = "Question: {question}\nAnswer:"
QA_FORMATS = ("plain", "chat")


def qa_prompt_text(question: str, context: str | None = None) -> str:
    """The plain QA prompt; ``context`` (a document) goes first for open-book answering."""
    prompt = QA_TEMPLATE.format(question=question)
    return f"{context}\n\n{prompt}" if context else prompt


def _bos(tokenizer) -> list[int]:
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None else []


def _check_format(qa_format: str) -> None:
    if qa_format not in QA_FORMATS:
        raise InputError(f"qa_format must be one of {', '.join(QA_FORMATS)}, got {qa_format!r}")


def prompt_ids(tokenizer, question: str, context: str | None = None, qa_format: str = "plain") -> list[int]:
    """Token ids of the prompt the model answers after (training and evaluation use the same)."""
    _check_format(qa_format)
    if qa_format == "chat":
        content = f"{context}\n\n{question}" if context else question
        ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return _bos(tokenizer) + tokenizer(qa_prompt_text(question, context), add_special_tokens=False).input_ids


def answer_ids(tokenizer, answer: str, qa_format: str = "plain") -> list[int]:
    """The answer's ids, ended by EOS (so greedy decoding learns to stop)."""
    _check_format(qa_format)
    text = f" {answer}" if qa_format == "plain" else answer
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def encode_document(tokenizer, text: str, max_length: int = 512, doc_id: str = "") -> dict:
    """BOS + the document's tokens, no EOS; every token is a target."""
    ids = _bos(tokenizer) + tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) > max_length:
        raise ContextTooLongError(f"document {doc_id or text[:30]!r} has {len(ids)} tokens > max_length {max_length}; "
                                  "split it into shorter documents or raise max_length")
    return {"input_ids": ids, "labels": list(ids)}


def encode_qa(tokenizer, question: str, answer: str, max_length: int = 512, qa_format: str = "plain",
              qa_id: str = "") -> dict:
    """Prompt + answer + EOS; labels are -100 everywhere but the answer and its EOS."""
    p = prompt_ids(tokenizer, question, qa_format=qa_format)
    a = answer_ids(tokenizer, answer, qa_format=qa_format)
    if len(p) + len(a) > max_length:
        raise ContextTooLongError(f"QA pair {qa_id or question[:30]!r} has {len(p) + len(a)} tokens > max_length {max_length}; "
                                  "shorten it or raise max_length")
    return {"input_ids": p + a, "labels": [IGNORE] * len(p) + a}


@dataclass
class KnowledgeCollator:
    """Right-pads ``input_ids`` (pad id) and ``labels`` (-100); builds the attention mask."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict:
        import torch

        n = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.tensor(f["input_ids"], dtype=torch.long)
            labels[i, :k] = torch.tensor(f["labels"], dtype=torch.long)
            mask[i, :k] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
