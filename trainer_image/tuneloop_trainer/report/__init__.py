"""What a run leaves for people to read: the model card, training curves and the summary
table printed at the end of ``tuneloop run``.

The model card is written twice from one :class:`ModelCard`: ``model-card.md`` for people
and ``model-card.json`` for tools, so the two can never disagree. JSON keys are camelCase,
like the API, and non-finite numbers are written as ``null`` (JSON has no NaN).

Modules: :mod:`.card` (the card's content), :mod:`.card_writer` and :mod:`.data_section`
(the Markdown and JSON files), :mod:`.history` and :mod:`.curves` (the training history and
its plots), :mod:`.summary` (the console table), :mod:`.markdown` and :mod:`.jsonsafe`
(how values are written).
"""

from __future__ import annotations

from tuneloop_trainer.report.card import ModelCard, comparison
from tuneloop_trainer.report.card_writer import write_model_card
from tuneloop_trainer.report.curves import plot_curves
from tuneloop_trainer.report.history import TrainingHistory
from tuneloop_trainer.report.summary import format_summary_table

__all__ = [
    "ModelCard",
    "TrainingHistory",
    "comparison",
    "format_summary_table",
    "plot_curves",
    "write_model_card",
]
