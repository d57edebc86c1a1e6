"""Experiment tracking through the real W&B API, in a way that can never stop a training run.

Design choices, and why:

* W&B is an observer. Every wandb call is guarded: if ``wandb.init`` fails the logger warns once on
  stderr and becomes a no-op; a failing ``log`` is warned about once and then ignored. Losing
  charts is acceptable, losing a multi-hour run to a network hiccup is not.
* ``online`` without network must not hang: wandb retries for ``init_timeout`` (90 s by default);
  we default to 30 s (``WANDB_INIT_TIMEOUT`` or the constructor override it).
* ``auto`` means "whatever works": online when a key is available, else offline; and if online
  init fails in auto mode the run falls back to offline, so the metrics still land on disk and can
  be uploaded later with ``wandb sync``. An explicit ``online`` that fails is not silently
  downgraded: it becomes a no-op with a warning, since the user asked for the server.
* Files go to ``<run_dir>/wandb/`` so a Hydra run dir holds checkpoints, logs and the W&B run.
* Every metric is plotted against ``train/step`` (``define_metric``), not wandb's internal
  ``_step`` (a per-``log``-call counter), so train and eval logged in separate calls at the same
  optimizer step line up, and a resumed run may start at any step.
* ``run_id`` continues an earlier run (``resume="allow"``: the same run when it exists, a new one
  with that id otherwise), so a resumed training run is one W&B run, not one per start. Offline,
  each start writes its own ``offline-run-*-<id>`` directory under the same id, and
  ``sync_command`` names them all; whether ``wandb sync`` then appends them into one history is
  W&B's part and was not checked here (no server; see docs/user-guide.md, "Resuming").
* ``disabled`` does not even import wandb, so nothing is written and startup costs nothing.
* wandb's console output is silenced and stdout is not wrapped (``console="off"``), which keeps the
  progress bar intact; what the user needs (``sync_command``, ``url``) is exposed as properties.
"""

from __future__ import annotations

import dataclasses
import netrc
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from moe_trainer.logging.wandb_reader import STEP_METRIC, transaction_log_finished

if TYPE_CHECKING:
    from moe_trainer.config.schema import LoggerConfig

MODES = ("auto", "online", "offline", "disabled")
DEFAULT_INIT_TIMEOUT = 30.0  # seconds; wandb's own default (90 s) is a long stall at startup
# WANDB_MODE spellings wandb accepts, mapped onto ours ("dryrun"/"run" are legacy names).
ENV_MODES = {
    "online": "online",
    "run": "online",
    "shared": "online",
    "offline": "offline",
    "dryrun": "offline",
    "disabled": "disabled",
}
WANDB_ID_FILE = "wandb/run_id"  # in a run dir: the W&B run its training logged to (a resume continues it)
# W&B API hosts whose ~/.netrc entry (written by `wandb login`) counts as "a key is available".
_DEFAULT_HOSTS = ("api.wandb.ai", "api.forge.coreweave.com")


def resolve_mode(mode: str) -> str:
    """Turns the configured mode into one wandb understands: online, offline or disabled.

    ``auto``: an explicit ``WANDB_MODE`` wins (the usual way to flip a job without touching its
    config); otherwise online if an API key is available (``WANDB_API_KEY`` or a ``wandb login``
    entry in ``~/.netrc``), else offline, so a laptop or air-gapped node still records the run.
    """
    if mode not in MODES:
        raise ValueError(f"logger.mode must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode in ENV_MODES:
        return ENV_MODES[env_mode]
    return "online" if api_key_available() else "offline"


def api_key_available() -> bool:
    """A W&B API key is set: ``WANDB_API_KEY``, or a ``wandb login`` entry in ``~/.netrc`` for the API host."""
    if os.environ.get("WANDB_API_KEY", "").strip():
        return True
    try:
        entries = netrc.netrc(os.environ.get("NETRC") or None).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    base_url = os.environ.get("WANDB_BASE_URL", "")
    hosts = {urlsplit(base_url).hostname} if base_url else set(_DEFAULT_HOSTS)
    return any(entries.get(host) and entries[host][2] for host in hosts if host)


def wandb_run_id(run_dir: Path) -> str | None:
    """The id of the W&B run that ``run_dir``'s training logged to (None: W&B was off, or an older run)."""
    try:
        return (run_dir / WANDB_ID_FILE).read_text().strip() or None
    except OSError:
        return None


def _plain_config(config: Any) -> dict[str, Any]:
    """Accepts a dict, a dataclass (the typed schema) or an OmegaConf container."""
    if config is None:
        return {}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if type(config).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"config must be a mapping or dataclass, got {type(config).__name__}")


def _one_line(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split()) or "no message"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


class RunLogger:
    """One W&B run (or a no-op stand-in) for one job: ``log`` per step, ``log_summary``, ``finish``.

    Use it on one process only (rank 0); every method is safe to call whatever state wandb is in,
    including after ``finish``. Also a context manager that finishes with the exit code of the block.
    """

    def __init__(
        self,
        cfg: LoggerConfig,
        run_dir: Path,
        job_type: str,
        config: Mapping[str, Any] | Any,
        name: str | None = None,
        *,
        init_timeout: float | None = None,
        step_metric: str = STEP_METRIC,
        run_id: str | None = None,
    ) -> None:
        self.requested_mode = cfg.mode
        self.mode = resolve_mode(cfg.mode)  # what was actually used; "disabled" after a failed init
        self.step_metric = step_metric
        self._base_dir = Path(run_dir).resolve()
        self._run: Any = None
        self._warned: set[str] = set()
        self._finished = False
        if self.mode == "disabled":
            return
        if init_timeout is None:
            try:
                init_timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", DEFAULT_INIT_TIMEOUT))
            except ValueError:
                init_timeout = DEFAULT_INIT_TIMEOUT
        kwargs = dict(
            project=cfg.project,
            group=cfg.group or None,
            job_type=job_type,
            tags=list(cfg.tags) or None,
            config=_plain_config(config),
            name=name,
        )
        if run_id:
            kwargs.update(id=run_id, resume="allow")
        try:
            self._run = self._init(self.mode, init_timeout, kwargs)
            return
        except Exception as exc:  # any wandb failure must leave training running
            reason = _one_line(exc)
        if self.requested_mode == "auto" and self.mode == "online":
            try:
                self._run = self._init("offline", init_timeout, kwargs)
                self.mode = "offline"
                self._warn("init", f"W&B online init failed ({reason}); logging offline instead")
                return
            except Exception as exc:
                reason = f"online: {reason}; offline: {_one_line(exc)}"
        self._warn("init", f"W&B init failed ({reason}); continuing without W&B logging")
        self.mode = "disabled"

    def _init(self, mode: str, init_timeout: float, kwargs: dict[str, Any]) -> Any:
        import wandb  # lazily: ~0.4 s, and not at all when disabled

        self._base_dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(silent=True, console="off", init_timeout=init_timeout)
        run = wandb.init(
            dir=str(self._base_dir),
            mode=mode,
            reinit="create_new",  # independent of wandb.run; several loggers may coexist
            settings=settings,
            **kwargs,
        )
        try:
            run.define_metric(self.step_metric)
            run.define_metric("*", step_metric=self.step_metric)
        except Exception:
            run.finish(exit_code=1)
            raise
        return run

    def _warn(self, what: str, message: str) -> None:
        """One line on stderr per kind of failure, so a broken W&B cannot flood the training log."""
        if what in self._warned:
            return
        self._warned.add(what)
        print(f"[moe_trainer] WARNING: {message}", file=sys.stderr, flush=True)

    @property
    def active(self) -> bool:
        """True while a real wandb run is open (not disabled, not failed, not finished)."""
        return self._run is not None and not self._finished

    @property
    def run_id(self) -> str | None:
        return self._run.id if self._run is not None else None

    @property
    def run_path(self) -> Path | None:
        """Local directory of the run (``<run_dir>/wandb/offline-run-...``), None when disabled.

        This is what ``read_offline_run`` and ``wandb sync`` take. Stays valid after ``finish``.
        """
        if self._run is None:
            return None
        try:
            return Path(self._run.settings.sync_dir)
        except Exception:
            return None

    @property
    def sync_command(self) -> str | None:
        """``wandb sync <dirs>`` to upload an offline run later; None unless the run is offline.

        Every start of a resumed run wrote its own ``offline-run-*-<id>`` directory beside this
        one: all of them are named, oldest first, so following the command uploads the whole run.
        """
        path = self.run_path
        if self.mode != "offline" or path is None:
            return None
        run_id = getattr(self._run, "id", None)
        # offline-run-<time>-<id>, and -<id>-<n> when two starts fell in the same second
        same_run = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(str(run_id))}(-\d+)?")
        starts = sorted(p for p in path.parent.iterdir() if same_run.fullmatch(p.name)) if run_id else []
        starts = starts or [path]
        return "wandb sync " + " ".join(shlex.quote(str(start)) for start in starts)

    @property
    def url(self) -> str | None:
        """The run's page on W&B for an online run, else None."""
        if self._run is None or self.mode != "online":
            return None
        try:
            return self._run.url
        except Exception:
            return None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Records ``metrics`` at optimizer step ``step`` (stored as ``train/step`` in the row).

        Each call is one history row; calls at the same step are merged by the chart's x-axis.
        """
        if not self.active:
            return
        try:
            self._run.log({**metrics, self.step_metric: int(step)})
        except Exception as exc:
            self._warn("log", f"W&B log failed ({_one_line(exc)}); further W&B errors are ignored")

    def alert(self, title: str, text: str) -> None:
        """A W&B alert (Slack or email once the run is online; offline runs record it for ``wandb sync``)."""
        if not self.active:
            return
        try:
            import wandb

            self._run.alert(title=title, text=text, level=wandb.AlertLevel.WARN)
        except Exception as exc:
            self._warn("alert", f"W&B alert failed ({_one_line(exc)}); the warning stays in metrics.jsonl")

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """Logs a ``wandb.Table`` (e.g. per-expert loads over time, for a heatmap panel)."""
        if not self.active:
            return
        try:
            import wandb

            self._run.log({key: wandb.Table(columns=columns, data=rows), self.step_metric: int(step)})
        except Exception as exc:
            self._warn("log", f"W&B table log failed ({_one_line(exc)})")

    def save_file(self, path: Path, name: str) -> Path | None:
        """Adds ``path`` to the run's files as ``name`` (uploaded now when online, by ``wandb sync`` when offline).

        Returns the copy in the run's ``files/`` dir (None when W&B is off or the save failed).
        The file is hard-linked there (copied where links fail) before ``run.save``, which then
        only registers it: given a file from elsewhere, wandb would symlink it (broken once the
        run dir is moved or copied) and print a line on the console each time.
        """
        if not self.active:
            return None
        try:
            files_dir = Path(self._run.settings.files_dir)
            target = files_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copyfile(path, target)
            self._run.save(str(target), base_path=str(files_dir), policy="now", glob=False)
            return target
        except Exception as exc:
            self._warn("save", f"W&B file save failed ({_one_line(exc)}); the file stays in the run dir")
            return None

    def log_summary(self, values: Mapping[str, Any]) -> None:
        """Sets final/best values (e.g. ``best_val_loss``) shown in the W&B runs table."""
        if not self.active:
            return
        try:
            self._run.summary.update(dict(values))
        except Exception as exc:
            self._warn("log", f"W&B summary update failed ({_one_line(exc)})")

    def finish(self, exit_code: int | None = None, flush_timeout: float = 10.0) -> None:
        """Flushes and closes the run; idempotent. A non-zero ``exit_code`` marks it failed.

        Returns once the run is complete on disk (see ``_wait_for_flush``), or after
        ``flush_timeout`` seconds at most.
        """
        if not self.active:
            self._finished = True
            return
        self._finished = True
        try:
            self._run.finish(exit_code=exit_code)
        except Exception as exc:
            self._warn("finish", f"W&B finish failed ({_one_line(exc)})")
            return
        self._wait_for_flush(flush_timeout)

    def _wait_for_flush(self, timeout: float) -> bool:
        """Waits until the run's transaction log holds its exit record (normally a few ms).

        ``run.finish()`` returns before wandb-core has written the last (partial) 32 KiB block of
        ``run-*.wandb``, so without this a report or test reading the run right after finish sees
        a truncated log, and a process exiting right away could race the flush.
        """
        path = self.run_path
        if path is None or timeout <= 0:
            return False
        deadline = time.monotonic() + timeout
        while True:
            logs = list(path.glob("run-*.wandb"))
            if logs and transaction_log_finished(logs[0]):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(exit_code=1 if exc_type is not None else None)

    def __repr__(self) -> str:
        return f"RunLogger(mode={self.mode!r}, run_path={self.run_path!s})"
