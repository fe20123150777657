"""Data layer: sources (shared-data loaders, generic files, HF ids, embedded corpora), weighted mixing and packing.

    records.py       Document, Conversation, PromptRecord, SkipCounter
    formats.py       JSONL/JSON/CSV/text readers and row schemas (messages, ShareGPT, Alpaca, prompt/completion)
    medical_sets.py  loaders for the datasets under the shared data root
    embedded.py      HPO and ICD-10-CM corpora from installed packages, with a hashed train/held-out split
    sources.py       the registry (roles, licences, eval-only refusal) and open_source()
    mix.py           WeightedMix: seeded mixing by token fraction, resumable
    packing.py       CPTPacker and SFTPacker: [B, T] batches, resumable
    pipeline.py      cpt_batches / sft_batches: specs + tokenizer -> packer
"""

from angelmed.data.mix import MixSource, WeightedMix, mix_from_specs
from angelmed.data.packing import IGNORE_INDEX, CPTPacker, SFTPacker
from angelmed.data.pipeline import cpt_batches, sft_batches
from angelmed.data.records import Conversation, Document, PromptRecord, SkipCounter
from angelmed.data.sources import REGISTRY, EvalOnlyDatasetError, describe, open_source

__all__ = [
    "Document", "Conversation", "PromptRecord", "SkipCounter", "open_source", "REGISTRY", "describe",
    "EvalOnlyDatasetError", "MixSource", "WeightedMix", "mix_from_specs", "CPTPacker", "SFTPacker", "IGNORE_INDEX",
    "cpt_batches", "sft_batches",
]
