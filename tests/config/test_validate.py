"""The bad-input battery: every case is refused by one validation pass, naming the setting."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

from moe_trainer.config.errors import ConfigError
from moe_trainer.config.schema import Config, to_dataclass
from moe_trainer.config.validate import validate
from tests.conftest import compose_dict

BATTERY = [
    ("moe.top_k=5", "moe.top_k"),  # more than the 4 experts of the debug model
    ("moe.top_k=0", "moe.top_k"),
    ("moe.num_experts=-1", "moe.num_experts"),
    ("moe.capacity_factor=0", "moe.capacity_factor"),
    ("moe.capacity_factor=-1.5", "moe.capacity_factor"),
    ("moe.router=hash", "moe.router"),
    ("moe.score_order=sigmoid", "moe.score_order"),
    ("moe.every=3", "moe.every"),  # the debug model has 2 blocks
    ("moe.first_dense=2", "moe.first_dense"),  # ... so no MoE block is left
    ("moe.first_dense=-1", "moe.first_dense"),
    ("moe.aux_loss_coef=-0.1", "moe.aux_loss_coef"),
    ("moe.routed_scale=0", "moe.routed_scale"),
    ("moe.routed_scale=nan", "moe.routed_scale"),
    ("moe.z_loss_coef=inf", "moe.z_loss_coef"),
    ("moe.group_sequences=3", "moe.group_sequences"),  # 4 sequences do not split into groups of 3
    ("moe.group_sequences=0", "moe.group_sequences"),
    ("moe.aux_loss_scope=rank", "moe.aux_loss_scope"),
    ("moe.bias_update=ema", "moe.bias_update"),
    ("moe.bias_update_schedule=cosine", "moe.bias_update_schedule"),
    ("moe.selection_noise=-0.01", "moe.selection_noise"),
    ("train.lr=-0.001", "train.lr"),
    ("train.max_steps=-5", "train.max_steps"),
    ("train.warmup_steps=-1", "train.warmup_steps"),
    ("train.router_lr_scale=0", "train.router_lr_scale"),
    ("train.beta1=1.0", "train.beta1"),
    ("train.on_nan=ignore", "train.on_nan"),
    ("train.keep_last=-1", "train.keep_last"),
    ("train.max_skipped_steps=0", "train.max_skipped_steps"),
    ("data.seq_len=4096", "data.seq_len"),  # over model.max_seq_len
    ("data.val_fraction=1.5", "data.val_fraction"),
    ("data.paths=[/no/such/file.txt]", "data.paths"),
    ("data.tokenizer=sentencepiece", "data.tokenizer"),  # neither byte, bpe nor a tokenizer.json that exists
    ("data.tokenizer=/no/such/tokenizer.json", "data.tokenizer"),
    ("data.vocab_size=1000", "data.vocab_size"),  # sizes only a BPE: the byte tokenizer has 257 ids
    ("data.tokenize_procs=-1", "data.tokenize_procs"),
    ("model.n_heads=3", "model.n_heads"),
    ("model.d_model=0", "model.d_model"),
    ("logger.mode=loud", "logger.mode"),
    ("logger.timeline_every=-1", "logger.timeline_every"),
    ("parallel.timeout_s=0", "parallel.timeout_s"),
    ("parallel.placement=scatter", "parallel.placement"),
    ("fault_tolerance.max_restarts=-1", "fault_tolerance.max_restarts"),
    ("cluster.connect_timeout_s=0", "cluster.connect_timeout_s"),
    ("train.recompute=full", "train.recompute"),
    ("train.grad_accum_steps=0", "train.grad_accum_steps"),
    ("train.grad_accum_steps=3", "train.grad_accum_steps"),  # 4 sequences do not split into 3 passes
]
PARALLEL = [
    (["parallel=expert_parallel", "parallel.num_actors=2", "moe.num_experts=5"], "moe.num_experts"),
    (["parallel=expert_parallel", "parallel.num_actors=4", "parallel.ep_size=3"], "parallel.ep_size"),
    (["parallel=data_parallel", "parallel.num_actors=3"], "train.batch_size"),  # 4 rows over 3 ranks
    (["parallel=data_parallel", "parallel.gpus_per_actor=-1"], "parallel.gpus_per_actor"),
    (["parallel=disaggregated", "parallel.num_expert_actors=0"], "parallel.num_expert_actors"),
    (["parallel=disaggregated", "parallel.micro_batches=3"], "parallel.micro_batches"),
    (["parallel=expert_parallel", "parallel.num_actors=2", "parallel.a2a_chunks=3"], "parallel.a2a_chunks"),  # 2 local
    (["parallel=expert_parallel", "parallel.num_actors=2", "parallel.a2a_chunks=0"], "parallel.a2a_chunks"),
    (["parallel=expert_parallel", "parallel.num_actors=2", "parallel.ep_size=1", "parallel.a2a_chunks=2"],
     "parallel.a2a_chunks"),
    (["parallel=data_parallel", "parallel.num_actors=2", "parallel.a2a_chunks=2"], "parallel.a2a_chunks"),
    (["parallel=expert_parallel", "parallel.micro_batches=2", "parallel.a2a_chunks=2"], "parallel.a2a_chunks"),
    (["parallel=expert_parallel", "parallel.micro_batches=0"], "parallel.micro_batches"),
    (["parallel=expert_parallel", "parallel.micro_batches=3"], "parallel.micro_batches"),  # 2 rows per rank
    (["parallel=data_parallel", "parallel.micro_batches=2"], "parallel.micro_batches"),  # nothing to pipeline
    (["parallel.micro_batches=2"], "parallel.micro_batches"),  # single
    # 2 sequences per rank, 1 per accumulation step: nothing left to cut into micro-batches
    (["parallel=expert_parallel", "parallel.micro_batches=2", "train.grad_accum_steps=2"], "parallel.micro_batches"),
    (["parallel=data_parallel", "parallel.num_actors=2", "train.grad_accum_steps=4"], "train.grad_accum_steps"),
    (["moe.router=expert_choice", "moe.bias_balancing=true"], "moe.bias_balancing"),  # bias cannot change picks
    (["moe.router=expert_choice", "moe.selection_noise=0.01"], "moe.selection_noise"),  # nor can noise
    (["parallel=expert_parallel", "parallel.num_actors=8"], "parallel.num_actors"),  # 4 experts, ep_size unset
    (["parallel=expert_parallel", "parallel.num_actors=8", "parallel.ep_size=8"], "parallel.ep_size"),
    # per-role sizes belong to the disaggregated strategy's roles; elsewhere they would be silently ignored
    (["parallel=expert_parallel", "parallel.cpus_per_coordinator=1"], "parallel.cpus_per_coordinator"),
    (["parallel=data_parallel", "parallel.gpus_per_expert_actor=0"], "parallel.gpus_per_expert_actor"),
    (["parallel.cpus_per_expert_actor=2"], "parallel.cpus_per_expert_actor"),  # single
    (["parallel=disaggregated", "parallel.cpus_per_coordinator=-1"], "parallel.cpus_per_coordinator"),
    (["parallel=disaggregated", "parallel.cpus_per_expert_actor=-0.5"], "parallel.cpus_per_expert_actor"),
    (["parallel=disaggregated", "parallel.gpus_per_coordinator=-1"], "parallel.gpus_per_coordinator"),
    # a BPE has at least the 256 bytes and the end-of-document token, at most the embedding cap (2**18)
    (["data.tokenizer=bpe", "data.vocab_size=256"], "data.vocab_size"),
    (["data.tokenizer=bpe", "data.vocab_size=262145"], "data.vocab_size"),
    # sharded optimizer state needs two ranks holding the same parameters
    (["parallel.shard_optimizer=true"], "parallel.shard_optimizer"),  # single
    (["parallel=data_parallel", "parallel.num_actors=1", "parallel.shard_optimizer=true"], "parallel.shard_optimizer"),
    (["parallel=disaggregated", "parallel.shard_optimizer=true"], "parallel.shard_optimizer"),  # one coordinator
]
# where ranks compute: one whole GPU per Ray rank (NCCL), train.device agreeing with it; single needs a GPU for cuda
DEVICE = [
    (["parallel=data_parallel", "parallel.gpus_per_actor=0.5"], "parallel.gpus_per_actor", "NCCL refuses"),
    (["parallel=disaggregated", "parallel.gpus_per_actor=0.25"], "parallel.gpus_per_actor", "NCCL refuses"),
    (["parallel=expert_parallel", "parallel.gpus_per_actor=2"], "parallel.gpus_per_actor", "idle"),
    (["parallel=expert_parallel", "parallel.gpus_per_actor=1.5"], "parallel.gpus_per_actor", "must be 0"),
    (["parallel=expert_parallel", "train.device=cuda"], "train.device", "parallel.gpus_per_actor=1"),
    (["parallel=data_parallel", "parallel.gpus_per_actor=1", "train.device=cpu"], "train.device",
     "parallel.gpus_per_actor=0"),
    (["train.device=cuda"], "train.device", "no CUDA GPU is visible"),  # single, and this machine has none
    # disaggregated roles: each 0 or 1 GPU by the setting that sizes it, both roles on the same backend
    (["parallel=disaggregated", "parallel.gpus_per_expert_actor=0.5", "parallel.gpus_per_coordinator=1"],
     "parallel.gpus_per_expert_actor", "NCCL refuses"),
    (["parallel=disaggregated", "parallel.gpus_per_coordinator=2"], "parallel.gpus_per_coordinator", "idle"),
    (["parallel=disaggregated", "parallel.gpus_per_coordinator=1"], "parallel.gpus_per_coordinator",
     "parallel.gpus_per_actor=1 (every rank on a GPU) or parallel.gpus_per_coordinator=0"),
    (["parallel=disaggregated", "parallel.gpus_per_actor=1", "parallel.gpus_per_expert_actor=0"],
     "parallel.gpus_per_expert_actor", "one backend (NCCL on GPUs or gloo on CPUs, never a mix)"),
    (["parallel=disaggregated", "parallel.gpus_per_coordinator=1", "parallel.gpus_per_expert_actor=1",
      "train.device=cpu"], "train.device",
     "parallel.gpus_per_coordinator=0 and parallel.gpus_per_expert_actor=0"),
    (["parallel=disaggregated", "parallel.gpus_per_actor=1", "parallel.gpus_per_coordinator=1",
      "train.device=cpu"], "train.device", "parallel.gpus_per_coordinator and parallel.gpus_per_actor (here 1)"),
    # an actor reserving nothing cannot be placed in a placement group
    (["parallel=disaggregated", "parallel.cpus_per_expert_actor=0"], "parallel.cpus_per_expert_actor",
     "reserve nothing"),
    (["parallel=data_parallel", "parallel.cpus_per_actor=0"], "parallel.cpus_per_actor", "reserve nothing"),
]


@pytest.mark.parametrize("override,setting", BATTERY, ids=[b[0] for b in BATTERY])
def test_single_setting_battery(make_config: Callable[..., Config], override: str, setting: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(make_config(override))
    assert err.value.setting == setting
    assert setting in str(err.value)


@pytest.mark.parametrize("overrides,setting", PARALLEL, ids=[" ".join(p[0][1:]) for p in PARALLEL])
def test_parallel_battery(make_config: Callable[..., Config], overrides: list[str], setting: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(make_config(*overrides))
    assert err.value.setting == setting


@pytest.mark.parametrize("overrides,setting,reason", DEVICE, ids=[" ".join(p[0]) for p in DEVICE])
def test_device_battery(make_config: Callable[..., Config], overrides: list[str], setting: str, reason: str,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        validate(make_config(*overrides))
    assert err.value.setting == setting and reason in str(err.value)


@pytest.mark.parametrize("overrides", [
    ["train.device=cuda"],  # single, with a GPU visible
    ["parallel=data_parallel", "parallel.gpus_per_actor=1"],
    ["parallel=expert_parallel", "parallel.gpus_per_actor=1", "train.device=cuda"],
    ["parallel=expert_parallel", "train.device=cpu"],
    ["parallel=single", "parallel.gpus_per_actor=0.5"],  # single never reads it
    ["parallel=disaggregated", "parallel.gpus_per_coordinator=1", "parallel.gpus_per_expert_actor=1",
     "train.device=cuda"],
    ["parallel=disaggregated", "parallel.gpus_per_actor=1", "parallel.cpus_per_expert_actor=0"],  # a GPU is enough
    ["parallel=disaggregated", "parallel.cpus_per_coordinator=2", "parallel.cpus_per_expert_actor=0.25",
     "parallel.gpus_per_coordinator=0"],
])
def test_device_settings_that_agree_pass(make_config: Callable[..., Config], overrides: list[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    validate(make_config(*overrides))


def test_messages_name_value_constraint_and_allowed_values(make_config: Callable[..., Config]) -> None:
    with pytest.raises(ConfigError) as err:
        validate(make_config("moe.router=hash"))
    assert str(err.value) == "moe.router='hash': must be one of topk, switch, expert_choice"


@pytest.mark.parametrize("overrides,named,not_named", [
    # ep_size left unset: the expert-parallel size is num_actors, and that is what messages name
    (["parallel.num_actors=3"], "parallel.num_actors=3", "parallel.ep_size="),
    (["parallel.num_actors=8"], "parallel.num_actors=8", "parallel.ep_size="),
    (["parallel.num_actors=4", "parallel.a2a_chunks=2"], "parallel.num_actors=4", "parallel.ep_size="),
    (["parallel.num_actors=4", "parallel.ep_size=4", "parallel.a2a_chunks=2"], "parallel.ep_size=4",
     "parallel.num_actors=4 ("),
])
def test_expert_parallel_errors_name_the_setting_the_user_wrote(make_config: Callable[..., Config],
                                                                overrides: list[str], named: str,
                                                                not_named: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(make_config("parallel=expert_parallel", *overrides))
    assert named in str(err.value) and not_named not in str(err.value)


def test_expert_choice_on_the_defaults_names_both_selection_aids_at_once() -> None:
    """The default routing has the bias and the noise on: one message gives every change expert choice needs."""
    cfg = to_dataclass(compose_dict(["moe.router=expert_choice"]))
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.setting == "moe.bias_balancing"
    assert "use moe.bias_balancing=false moe.selection_noise=0, or" in str(err.value)
    validate(to_dataclass(compose_dict(["moe.router=expert_choice", "moe.bias_balancing=false",
                                        "moe.selection_noise=0"])))


def test_the_first_error_of_a_newcomers_64_actors_names_num_actors(make_config: Callable[..., Config]) -> None:
    with pytest.raises(ConfigError) as err:
        validate(make_config("parallel=expert_parallel", "parallel.num_actors=64"))
    assert err.value.setting == "parallel.num_actors" and err.value.value == 64
    assert "[1, 2, 4]" in str(err.value)  # the valid sizes for the debug model's 4 experts


def test_batch_split_errors_name_the_accumulation_steps(make_config: Callable[..., Config]) -> None:
    with pytest.raises(ConfigError) as err:  # 4 sequences / 2 passes = 2 per forward: no groups of 4
        validate(make_config("train.grad_accum_steps=2", "moe.group_sequences=4"))
    assert err.value.setting == "moe.group_sequences" and "train.grad_accum_steps=2" in str(err.value)
    with pytest.raises(ConfigError) as err:
        validate(make_config("parallel=disaggregated", "parallel.micro_batches=4", "train.grad_accum_steps=2"))
    assert err.value.setting == "parallel.micro_batches"
    assert "the 2 sequences each rank runs per forward" in str(err.value) and "train.grad_accum_steps=2" in str(
        err.value)


def _suggested_fixes(message: str) -> list[dict[str, str]]:
    """The fixes a message offers after "; try ", as the user reads them: "A=1, or B=2 with C=3"."""
    if "; try " not in message:
        return []
    offered = message.split("; try ", 1)[1]
    return [dict(change.split("=", 1) for change in fix.split(" with ")) for fix in offered.split(", or ")]


def _apply_text(cfg: Config, fix: dict[str, str]) -> Config:
    changed = copy.deepcopy(cfg)
    for key, text in fix.items():
        section, name = key.split(".")
        setattr(getattr(changed, section), name, type(getattr(getattr(cfg, section), name))(text))
    return changed


SUGGESTING = [
    ["parallel=expert_parallel", "parallel.num_actors=3"],  # the issue's case: 9 experts alone fail on the batch
    ["parallel=expert_parallel", "parallel.num_actors=3", "train.batch_size=15"],
    ["parallel=expert_parallel", "parallel.num_actors=2", "moe.num_experts=5", "moe.top_k=2"],
    ["parallel=expert_parallel", "parallel.num_actors=4", "parallel.micro_batches=2", "moe.num_experts=6",
     "moe.top_k=2"],
    ["parallel=disaggregated", "parallel.num_expert_actors=3"],
    ["parallel=data_parallel", "parallel.num_actors=3"],
    ["parallel=data_parallel", "parallel.num_actors=3", "train.grad_accum_steps=2"],
    ["moe.group_sequences=3"],
]


@pytest.mark.parametrize("overrides", SUGGESTING, ids=[" ".join(o) for o in SUGGESTING])
@pytest.mark.parametrize("base", [["experiment=debug"], []], ids=["debug", "defaults"])
def test_every_suggested_fix_validates_the_whole_config(base: list[str], overrides: list[str]) -> None:
    cfg = to_dataclass(compose_dict([*base, *overrides]))
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    fixes = _suggested_fixes(str(err.value))
    assert fixes, f"no fix offered: {err.value}"
    assert fixes == [{k: str(v) for k, v in fix.items()} for fix in err.value.fixes]
    for fix in fixes:
        validate(_apply_text(cfg, fix))


def test_the_issues_case_offers_what_works() -> None:
    cfg = to_dataclass(compose_dict(["parallel=expert_parallel", "parallel.num_actors=3", "moe.num_experts=8",
                                     "moe.top_k=2", "train.batch_size=16"]))  # the issue's 8 experts, batch 16
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value).endswith("; try parallel.num_actors=2, or parallel.num_actors=4, "
                                   "or moe.num_experts=9 with train.batch_size=15")
