"""``moe-report``: compares finished ``moe-train`` runs offline, as PNG figures and a Markdown/HTML table.

It reads only the files a run dir holds (``config.yaml``, ``summary.json``, ``metrics.jsonl``), so
runs from any machine or strategy can be compared without a W&B server.
"""

from moe_trainer.report.cli import build_report, main

__all__ = ["build_report", "main"]
