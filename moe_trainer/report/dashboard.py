"""The W&B workspace view a strategy comparison is read in, saved as code (``wandb-workspaces``).

Why a saved view: W&B's automatic workspace draws one panel per logged key, hundreds of them
(per rank, per layer, per phase), in alphabetical sections; the comparison a user came for
(strategies side by side: throughput, exposed communication, balance, memory, losses) has to
be built by hand. This module builds it: the runs of one experiment group, grouped by
``job_type`` (the strategy), in sections of the panels below.

The panels name *record keys* (what ``metrics.jsonl`` holds; the per-phase and per-rank ones
from the same names the trainer builds them from) and turn them into W&B keys with
``moe_trainer.logging.metric_keys``, the functions the logger itself uses: prefixes, per-layer
names and the per-rank suffix are written once. A record key renamed in the trainer and not
here would leave a panel without data: ``tests/test_compare.py`` builds this view for a real
multirun of the three Ray strategies and checks every panel key against what those runs logged.

The view is first written to a file (``wandb_workspace.json``: the view as the W&B API takes
it), then saved when a W&B key is available; without one, or when saving fails, the file stays
and ``moe-report --save-wandb FILE`` saves it later.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_trainer.logging.metric_keys import LAYER_HISTOGRAM, layer_key, rank_max_key, wandb_key
from moe_trainer.logging.wandb_reader import STEP_METRIC
from moe_trainer.parallel.telemetry import PHASES, phase_key

WORKSPACE_FILE = "wandb_workspace.json"


@dataclass(frozen=True)
class Chart:
    """One panel: line charts of record keys against steps (or tokens), or a bar per strategy.

    ``rank_max`` adds each key's slowest-rank value beside its mean over ranks (stragglers);
    ``layer_stat`` draws one line per MoE layer of that statistic, or, for the tokens-per-expert
    histogram, one panel per layer; ``summary`` is a run summary value drawn as bars.
    """

    title: str
    keys: tuple[str, ...] = ()
    rank_max: bool = False
    layer_stat: str | None = None
    x: str = "step"  # step | tokens
    summary: str | None = None

    def metrics(self, layers: int) -> list[str]:
        """The W&B history keys this panel draws (for a run with ``layers`` MoE layers)."""
        keys = [k for key in self.keys for k in ((wandb_key(key), rank_max_key(key)) if self.rank_max
                                                 else (wandb_key(key),))]
        if self.layer_stat is not None:
            keys += [layer_key(i, self.layer_stat) for i in range(layers)]
        return keys

    @property
    def x_key(self) -> str:
        return STEP_METRIC if self.x == "step" else wandb_key(self.x)


SECTIONS: tuple[tuple[str, tuple[Chart, ...]], ...] = (
    ("Throughput", (
        Chart("tokens/s", ("tokens_per_s",)),
        Chart("step time (s): mean over ranks and slowest rank", ("step_time_s",), rank_max=True),
        Chart("time to first step (s, from the start of moe-train)", summary="time_to_first_step_s"),
        Chart("mean tokens/s over the run", summary="tokens_per_s_mean"),
    )),
    ("Communication", (
        Chart("exposed all-to-all time per phase (s): mean over ranks and slowest rank",
              tuple(phase_key(phase, "time_s") for phase in PHASES), rank_max=True),
        Chart("all-to-all time (s): mean and slowest rank", ("a2a_time_s",), rank_max=True),
        Chart("all-to-all bytes sent per rank: mean and most", ("a2a_bytes_sent",), rank_max=True),
        Chart("communication share of the step", ("comm_share",)),
        Chart("gradient sync time (s): mean and slowest rank", ("grad_sync_time_s",), rank_max=True),
        Chart("parameter sync time (s): mean and slowest rank", ("param_sync_time_s",), rank_max=True),
    )),
    ("Load balance", (
        Chart("max/mean expert load, all MoE layers", ("load_imbalance",)),
        Chart("max/mean expert load per layer", layer_stat="max_mean"),
        Chart("coefficient of variation of expert load per layer", layer_stat="cv"),
        Chart("least-used expert's share of its fair load per layer", layer_stat="min_share"),
        Chart("dropped fraction of routed tokens per layer", ("dropped_frac",), layer_stat="dropped_frac"),
        Chart("router entropy per layer", layer_stat="router_entropy"),
        Chart("max/mean load of each rank's own experts: mean and worst rank", ("load_imbalance_local",),
              rank_max=True),
        Chart("tokens per expert", layer_stat=LAYER_HISTOGRAM),
    )),
    ("Memory", (
        Chart("RSS per process (MB): mean and largest", ("mem_rss_mb",), rank_max=True),
        Chart("peak RSS per process (MB): mean and largest", ("mem_peak_rss_mb",), rank_max=True),
        Chart("optimizer state per process (MB): mean and largest", ("mem_optim_state_mb",), rank_max=True),
        Chart("expert actors' RSS and peak RSS (MB, disaggregated): mean and largest",
              ("expert_mem_rss_mb", "expert_mem_peak_rss_mb"), rank_max=True),
        Chart("expert actors' optimizer state (MB, disaggregated): mean and largest", ("expert_mem_optim_state_mb",),
              rank_max=True),
    )),
    ("Losses", (
        Chart("training loss vs steps", ("loss",)),
        Chart("training loss vs tokens", ("loss",), x="tokens"),
        Chart("validation loss vs steps", ("val_loss",)),
        Chart("aux and z losses", ("aux_loss", "z_loss")),
        Chart("gradient norm", ("grad_norm",)),
        Chart("learning rate", ("lr",)),
    )),
    ("Disaggregated roles", (
        Chart("coordinators: busy and waiting for experts (s per step)", ("coord_busy_s", "coord_wait_s")),
        Chart("expert actors: busy and waiting for tokens (s per step): mean and largest",
              ("expert_busy_s", "expert_wait_s"), rank_max=True),
        Chart("idle share of each role", ("coord_idle_share", "expert_idle_share")),
        Chart("expert actors' step time (s): mean and slowest", ("expert_step_time_s",), rank_max=True),
    )),
)


def charts(layers: int) -> list[tuple[str, list[Chart]]]:
    """The sections and their charts for runs of ``layers`` MoE layers (a dense run has no per-layer panels)."""
    return [(name, [c for c in section if c.summary is not None or c.metrics(layers)]) for name, section in SECTIONS]


def panel_keys(layers: int) -> tuple[set[str], set[str]]:
    """Every W&B key the view's panels read: (history keys, x axes included; summary keys)."""
    history: set[str] = set()
    summary: set[str] = set()
    for _, section in charts(layers):
        for chart in section:
            if chart.summary is not None:
                summary.add(chart.summary)
            else:
                history.update(chart.metrics(layers), {chart.x_key})
    return history, summary


def view_name(group: str) -> str:
    """The view's title. W&B refuses symbol characters (``=``, ``+``, ``|``, emoji) in titles, not in groups:
    they become ``-`` here while the filter keeps the group as it is."""
    title = "".join("-" if unicodedata.category(c).startswith(("S", "Cs")) else c for c in group)
    return f"moe-trainer strategies: {title}"


def build_workspace(entity: str, project: str, group: str, layers: int) -> Any:
    """The ``wandb_workspaces`` Workspace: ``group``'s runs grouped by ``job_type``, one section per concern."""
    import wandb_workspaces.reports.v2 as wr  # lazily: 1.5 s, and moe-report without --wandb never needs it
    import wandb_workspaces.workspaces as ws

    def panels(chart: Chart) -> list[Any]:
        if chart.summary is not None:  # a bar chart reads each run's summary value of its plain key
            return [wr.BarPlot(title=chart.title, metrics=[chart.summary])]
        if chart.layer_stat == LAYER_HISTOGRAM:  # a histogram over steps is drawn one run and one layer at a time
            return [wr.LinePlot(title=f"{chart.title}, MoE layer {i}", x=chart.x_key, y=[layer_key(i, LAYER_HISTOGRAM)])
                    for i in range(layers)]
        return [wr.LinePlot(title=chart.title, x=chart.x_key, y=chart.metrics(layers))]

    sections = [ws.Section(name=name, panels=[p for chart in section for p in panels(chart)], is_open=True)
                for name, section in charts(layers)]
    return ws.Workspace(
        entity=entity, project=project, name=view_name(group), sections=sections,
        settings=ws.WorkspaceSettings(x_axis=STEP_METRIC),
        runset_settings=ws.RunsetSettings(filters=ws.And(ws.Metric("Group") == group), groupby=[ws.Metric("JobType")]),
    )


def filter_groups(workspace: Any) -> list[Any]:
    """The group values the view's run filter holds, as W&B will read them (from the serialised view)."""
    view = json.loads(workspace_json(workspace))
    return [f.get("value") for run_set in view["spec"]["section"]["runSets"]
            for f in run_set["filters"].get("filters", []) if f.get("key", {}).get("name") == "group"]


def workspace_json(workspace: Any) -> str:
    """The view as the W&B API takes it (``wandb_workspaces``' View model, JSON)."""
    return workspace._model.model_dump_json(by_alias=True, exclude_none=True, indent=1) + "\n"


def keep_identity(workspace: Any, path: Path) -> None:
    """Gives ``workspace`` the W&B name and id of the view saved from ``path`` earlier, if it is the same view.

    So running ``moe-report --wandb`` again updates the view it saved before instead of adding a
    second one of the same title (W&B makes a new view for a Workspace without a name).
    """
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(earlier, dict) or not earlier.get("name"):
        return
    if (earlier.get("entity"), earlier.get("project"), earlier.get("displayName")) == (
            workspace.entity, workspace.project, workspace.name):
        object.__setattr__(workspace, "_internal_name", earlier["name"])
        object.__setattr__(workspace, "_internal_id", earlier.get("id", ""))


def load_workspace(path: Path) -> Any:
    """Reads a view written with :func:`workspace_json` back into a Workspace that can be saved.

    ``Workspace._from_model`` is what the package's own ``Workspace.from_url`` uses to turn a
    stored view into a Workspace; there is no public reader of a view from a file.
    """
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces.workspaces import internal

    return ws.Workspace._from_model(internal.View.model_validate_json(path.read_text()))
