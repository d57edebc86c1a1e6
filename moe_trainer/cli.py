"""``moe-train``: the Hydra application.

Order matters: check the command line (:mod:`moe_trainer.config.command_line`: every
override parsed and composed once, unknown keys refused, one line and exit 2) -> compose
(Hydra) -> the launch gate (:mod:`moe_trainer.launch_gate`: the whole config validated and
``train.resume`` checked, before Hydra writes into the run dir) -> refuse keys outside the
schema -> validate every setting -> resolve the checkpoint and the tokenizer (a BPE is
trained here, once) -> only then write outputs and start W&B or actors. Any user error before
that point leaves nothing behind on disk.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from moe_trainer.config.command_line import check_command_line
from moe_trainer.config.errors import CollectiveError, ConfigError
from moe_trainer.config.schema import Config, register_configs, to_dataclass
from moe_trainer.config.validate import validate
from moe_trainer.data.shards import refuse_corrupted_cache
from moe_trainer.driver import TrainingDiverged
from moe_trainer.engine import Engine, EngineLost, EngineStartError, LocalEngine
from moe_trainer.launch_gate import exit_invalid, report_nothing_to_do
from moe_trainer.logging.wandb_logger import wandb_run_id
from moe_trainer.outputs import RunOutputs
from moe_trainer.preemption import EXIT_CODE as PREEMPTED_EXIT
from moe_trainer.preemption import Preempted, Preemption
from moe_trainer.restarts import train_with_restarts
from moe_trainer.train.resume import NothingToDo, ResumePoint, plan_resume
from moe_trainer.train.run_tokenizer import install_tokenizer, resolve_tokenizer

register_configs()

_HYDRA_OWN = {".hydra"}
# conf/ sits beside the package in the source tree (installed editable, as the README does)
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def compose_config(overrides: list[str]) -> DictConfig:
    """The config ``moe-train`` would run with these overrides, composed outside a Hydra app.

    For tools that must see exactly what training sees (``moe-prepare-data``'s cache key, the
    benchmarks), without Hydra's run directory or logging.
    """
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _discard_untouched_run_dir(run_dir: Path) -> None:
    """Removes the run dir Hydra created if it holds nothing but Hydra's own bookkeeping."""
    if not run_dir.is_dir():
        return
    if all(p.name in _HYDRA_OWN or p.suffix == ".log" for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)
        parent = run_dir.parent
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()


def make_engine(cfg: Config) -> Engine:
    """Builds the engine of ``parallel.strategy`` (validation has checked it is available)."""
    if cfg.parallel.strategy == "single":
        return LocalEngine(cfg)
    from actors import ask_embedded_ray_for_token_auth, keep_embedded_ray_on_loopback

    keep_embedded_ray_on_loopback(cfg.cluster.address)
    ask_embedded_ray_for_token_auth(cfg.cluster.address)
    from actors.engine import RayEngine  # Ray is imported only by strategies that use it

    return RayEngine(cfg)


def continued_wandb_run(resume: ResumePoint | None, run_dir: Path) -> str | None:
    """The W&B run id to continue: only a resume of this same run directory continues its run.

    A start from another run's checkpoint (a fork, or every job of a sweep over one checkpoint)
    is a new run with ``resumed_from`` in its record; sharing the id would interleave histories.
    """
    if resume is None or resume.run_dir.resolve() != run_dir.resolve():
        return None
    return wandb_run_id(run_dir)


def train(cfg: Config, resolved: dict[str, Any], run_dir: Path, keep_cluster: bool = False) -> dict[str, Any]:
    """Runs one training job into ``run_dir``; raises :class:`ConfigError` before writing anything.

    Raises :class:`NothingToDo`, also before writing anything, when the checkpoint to resume is
    already at ``train.max_steps``. ``keep_cluster``: leave this process's Ray connection (an
    embedded Ray keeps running) for the next job, as the jobs of a Hydra multirun do; Ray stops
    it when the process exits.
    """
    validate(cfg)
    resume = plan_resume(cfg.train.resume, cfg.train.max_steps, run_dir)
    tokenizer = resolve_tokenizer(cfg, resume.checkpoint if resume is not None else None)
    refuse_corrupted_cache(cfg.data, tokenizer)  # the shards every actor will map (verified once per process)
    installed = install_tokenizer(cfg, tokenizer, run_dir)  # RUN_DIR/tokenizer.json: what every process loads
    cfg = installed.cfg
    if cfg.train.init_from and resume is not None:  # the checkpoint wins: no process reads the start point
        cfg = replace(cfg, train=replace(cfg.train, init_from=None))
    elif cfg.train.init_from:
        from moe_trainer.hub.init_from import describe

        print(f"moe-train: {describe(cfg.train.init_from, cfg)}", flush=True)
    try:
        engine = make_engine(cfg)
    except BaseException:
        installed.discard()  # a start refused here leaves the run directory as it was
        raise
    # SIGTERM from here on stops at a step boundary with a checkpoint; taken after the engine started, since
    # ray.init installs its own SIGTERM handler in the driver (which aborts the process)
    preemption = Preemption(cfg.fault_tolerance.preempt_timeout_s).install()
    try:
        if resume is not None:
            try:
                engine.load(resume.checkpoint)
            except BaseException:
                installed.discard()
                raise
        outputs = RunOutputs(run_dir, resolved, cfg.logger, cfg.parallel.strategy,
                             wandb_run_id=continued_wandb_run(resume, run_dir))
        try:
            if resume is not None:
                print(resume.line(), flush=True)
                outputs.log(resume.event())
            summary, engine = train_with_restarts(cfg, engine, outputs, make_engine, resume, preemption)
            if resume is not None:
                summary.update(resumed_from=str(resume.checkpoint), resumed_from_step=resume.step)
            outputs.summary(summary)
        finally:
            outputs.close()
        if outputs.wandb.sync_command:
            summary["wandb_sync"] = outputs.wandb.sync_command
    finally:
        try:
            engine.close(keep_cluster=keep_cluster)
        finally:
            preemption.uninstall()  # after the close, so a preempted run's exit stays within its bound
    return summary


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _main(dcfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        cfg = to_dataclass(dcfg)
        multirun = HydraConfig.get().mode == RunMode.MULTIRUN  # a sweep's jobs share one embedded Ray
        summary = train(cfg, OmegaConf.to_container(dcfg, resolve=True), run_dir,  # type: ignore[arg-type]
                        keep_cluster=multirun)
    except ConfigError as err:
        _discard_untouched_run_dir(run_dir)
        exit_invalid(err)
    except NothingToDo as err:  # a sweep's job, which the sweep goes on past (a single run ends in the launch gate)
        report_nothing_to_do(err)
        return None
    except TrainingDiverged as err:
        print(f"moe-train: {err}", file=sys.stderr)
        sys.exit(3)
    except (EngineLost, EngineStartError, CollectiveError) as err:
        print(f"moe-train: {err}", file=sys.stderr)
        sys.exit(4)
    except Preempted as err:
        print(f"moe-train: {err}. Continue with the same command and train.resume=auto hydra.run.dir={run_dir}",
              file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT)
    resumed = f" (resumed from step {summary['resumed_from_step']})" if "resumed_from_step" in summary else ""
    print(
        f"done: {summary['steps']} steps{resumed}, val_loss {summary.get('initial_val_loss', float('nan')):.4f} -> "
        f"{summary.get('final_val_loss', float('nan')):.4f}, {summary.get('tokens_per_s_mean', 0):.0f} tokens/s, "
        f"{summary['train_time_s']:.1f} s"
    )
    if "wandb_sync" in summary:
        print(f"W&B offline run; upload it with: {summary['wandb_sync']}")
    print(run_dir, flush=True)
    return summary.get("final_val_loss")


def main() -> None:
    """Console-script entry point: the command line is checked (one line, exit 2) before Hydra runs it.

    ``--plan`` prints the memory plan of the composed config instead of training (:mod:`moe_trainer.plan.cli`).
    """
    from moe_trainer.plan.cli import PLAN_FLAG, plan_command

    if PLAN_FLAG in sys.argv[1:]:
        sys.exit(plan_command([a for a in sys.argv[1:] if a != PLAN_FLAG]))
    try:
        check_command_line(sys.argv[1:], CONF_DIR)
    except ConfigError as err:
        exit_invalid(err)
    _main()
