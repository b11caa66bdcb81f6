"""The stage registry: config names -> Stage classes. Listed explicitly, no import magic."""

from __future__ import annotations

from stages.base import Stage
from stages.cluster import ClusterStage
from stages.combine import CombineStage
from stages.embed import EmbedStage
from stages.kmq import KMQStage
from stages.order import OrderStage
from stages.permute import PermuteStage
from stages.perplexity import PerplexityStage
from stages.quality import QualityStage
from stages.quality_classifier import QualityClassifierStage
from stages.select_perplexity import SelectPerplexityStage
from stages.semdedup import SemDedupStage

_STAGES: dict[str, type[Stage]] = {
    cls.name: cls
    for cls in (QualityStage, PerplexityStage, SelectPerplexityStage, QualityClassifierStage, CombineStage,
                EmbedStage, ClusterStage, SemDedupStage, KMQStage, PermuteStage, OrderStage)
}


def get_stage_class(name: str) -> type[Stage] | None:
    return _STAGES.get(name)


def stage_names() -> list[str]:
    return sorted(_STAGES)


def build_stage(params) -> Stage:  # noqa: ANN001 - any StageParams subclass
    return _STAGES[params.name](params)
