"""The memory plan before launch: bytes per role and rank from the config (:func:`build_plan`),
the budget they must fit (:mod:`moe_trainer.plan.budget`), and how it prints (:mod:`moe_trainer.plan.report`)."""

from moe_trainer.plan.memory_plan import MemoryPlan, RankPlan, build_plan

__all__ = ["MemoryPlan", "RankPlan", "build_plan"]
