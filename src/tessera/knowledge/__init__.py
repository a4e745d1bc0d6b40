"""Knowledge learning (PIT, pre-instruction-tuning): data, schedules, training and QA evaluation."""

from tessera.data.knowledge import KnowledgeDoc, KnowledgeQA, KnowledgeSet, read_knowledge, split_entities
from tessera.knowledge.evaluate import (answer_recall, evaluate_qa, exact_match, majority_baseline, normalize_answer,
                                        storage_gate)
from tessera.knowledge.format import KnowledgeCollator, encode_document, encode_qa
from tessera.knowledge.schedules import SCHEDULES, Plan, Stage, build_plan

__all__ = [
    "SCHEDULES",
    "KnowledgeCollator",
    "KnowledgeDoc",
    "KnowledgeQA",
    "KnowledgeSet",
    "Plan",
    "Stage",
    "answer_recall",
    "build_plan",
    "encode_document",
    "encode_qa",
    "evaluate_qa",
    "exact_match",
    "majority_baseline",
    "normalize_answer",
    "read_knowledge",
    "split_entities",
    "storage_gate",
]
