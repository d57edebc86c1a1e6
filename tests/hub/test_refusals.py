"""Bad input to moe-export, train.init_from and moe-generate: one clear message each, nothing half-written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_trainer.config.errors import ConfigError
from moe_trainer.config.schema import Config, to_dataclass
from moe_trainer.config.validate import validate
from moe_trainer.hub.architectures import Unsupported, requirements, with_defaults
from moe_trainer.hub.export import export
from moe_trainer.hub.export import main as export_main
from moe_trainer.hub.generate import main as generate_main
from moe_trainer.hub.weights import links_for
from tests.conftest import compose_dict
from tests.helpers import train_checkpoint, tree_state


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``checkpoints(*overrides)``: an untrained (step 0) checkpoint of the debug model with ``overrides``, cached."""
    root = tmp_path_factory.mktemp("refusals")
    made: dict[tuple[str, ...], Path] = {}

    def get(*overrides: str) -> Path:
        if overrides not in made:
            made[overrides] = train_checkpoint(root / str(len(made)), *overrides, steps=0)
        return made[overrides]

    return get


@pytest.fixture(scope="module")
def qwen_export(checkpoints: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qwen") / "hf"
    export(str(checkpoints("moe.num_shared_experts=1", "moe.shared_expert_hidden=16")), out)
    return out


@pytest.mark.parametrize("overrides,reason", [
    (["moe.router=expert_choice"], "moe.router=expert_choice"),
    (["moe.bias_balancing=true"], "moe.bias_balancing=true"),
    (["moe.capacity_factor=1.25"], "--dropless"),
    (["moe.router=switch"], "moe.router=switch"),
    (["moe.every=2"], "moe.every=2 without shared experts"),
    (["moe.first_dense=1"], "moe.first_dense=1 without shared experts"),
    (["moe.normalize_topk=false"], "moe.normalize_topk=false keeps the top-k probabilities"),
    (["moe.routed_scale=2"], "moe.routed_scale=2.0: MixtralForCausalLM and Qwen2MoeForCausalLM weigh"),
], ids=["expert_choice", "bias_balancing", "capacity", "switch", "every2", "first_dense", "unnormalised",
        "routed_scale"])
def test_a_model_without_a_faithful_counterpart_is_refused_with_the_reason(
        checkpoints: Callable[..., Path], tmp_path: Path, overrides: list[str], reason: str) -> None:
    with pytest.raises(Unsupported) as err:
        export(str(checkpoints(*overrides)), tmp_path / "out")
    assert reason in str(err.value)
    assert not (tmp_path / "out").exists()


def test_an_export_that_fails_while_writing_leaves_nothing(checkpoints: Callable[..., Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(*_args: object) -> list[str]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("moe_trainer.hub.export.write_tokenizer", full_disk)  # after the weights are written
    with pytest.raises(OSError, match="No space left"):
        export(str(checkpoints()), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither OUT_DIR nor the temporary directory beside it


def test_dropless_exports_a_capacity_model_when_asked(checkpoints: Callable[..., Path], tmp_path: Path) -> None:
    arch, _, _ = export(str(checkpoints("moe.capacity_factor=1.25")), tmp_path / "out", dropless=True)
    assert arch == "MixtralForCausalLM"


def test_an_output_directory_with_files_is_refused_and_left_as_it_was(checkpoints: Callable[..., Path],
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    before = tree_state(tmp_path)
    with pytest.raises(ConfigError, match="exists and is not empty"):
        export(str(checkpoints()), out)
    assert tree_state(tmp_path) == before
    out.joinpath("notes.txt").unlink()  # an empty directory is fine
    export(str(checkpoints()), out)
    assert (out / "config.json").is_file()


def test_a_damaged_checkpoint_is_refused_by_the_command_in_one_line(checkpoints: Callable[..., Path], tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    damaged = tmp_path / "step_00000000"
    shutil.copytree(checkpoints(), damaged)
    shard = next(damaged.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exit_code:
        export_main([str(damaged), str(tmp_path / "out")])
    stderr = capsys.readouterr().err
    assert exit_code.value.code == 2
    assert stderr.startswith("moe-export: ") and stderr.count("\n") == 1, stderr
    assert "does not match its checksum" in stderr
    assert not (tmp_path / "out").exists()


def _config(*overrides: str) -> Config:
    return to_dataclass(compose_dict(["experiment=debug", *overrides]))


def _refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        validate(_config(*overrides))
    assert err.value.setting == "train.init_from", str(err.value)
    return str(err.value)


def _copy_with_config(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **changes}))
    return dst


def test_init_from_refuses_what_it_cannot_read_naming_the_setting(qwen_export: Path, tmp_path: Path) -> None:
    shared = ("moe.num_shared_experts=1", "moe.shared_expert_hidden=16")
    validate(_config(*shared, f"train.init_from={qwen_export}"))  # the export itself starts
    assert "no config.json there" in _refused(f"train.init_from={tmp_path}")
    gpt2 = _copy_with_config(qwen_export, tmp_path / "gpt2", architectures=["GPT2LMHeadModel"], model_type="gpt2")
    assert "GPT2LMHeadModel" in _refused(*shared, f"train.init_from={gpt2}")
    gqa = _copy_with_config(qwen_export, tmp_path / "gqa", num_key_value_heads=1)
    assert "grouped-query attention" in _refused(*shared, f"train.init_from={gqa}")
    # a width that does not match: the setting to change and the value the checkpoint needs
    message = _refused(*shared, "model.d_model=64", f"train.init_from={qwen_export}")
    assert "hidden_size=32 needs model.d_model=32; this run has model.d_model=64" in message
    message = _refused(f"train.init_from={qwen_export}")
    assert "needs moe.num_shared_experts=1 moe.shared_expert_hidden=16; this run has moe.num_shared_experts=0 " \
        "moe.shared_expert_hidden=256" in message
    message = _refused(*shared, "moe.router=switch", f"train.init_from={qwen_export}")  # top-1 against top-2
    assert "needs moe.top_k=2 moe.router=topk; this run has moe.top_k=2 moe.router=switch" in message
    message = _refused(*shared, "moe.normalize_topk=false", f"train.init_from={qwen_export}")
    assert "needs moe.normalize_topk=true moe.router=topk moe.score_order=softmax_topk; this run has " \
        "moe.normalize_topk=false moe.router=topk moe.score_order=softmax_topk" in message
    assert "data.tokenizer=bpe" in _refused(*shared, "data.tokenizer=bpe", f"train.init_from={qwen_export}")


def test_init_from_refuses_a_partial_checkpoint_and_a_gate_it_cannot_express(qwen_export: Path,
                                                                             tmp_path: Path) -> None:
    shared = ("moe.num_shared_experts=1", "moe.shared_expert_hidden=16")
    tensors = load_file(str(qwen_export / "model.safetensors"))
    for name, change in (("partial", "drop"), ("gated", "gate")):
        directory = tmp_path / name
        shutil.copytree(qwen_export, directory)
        edited = dict(tensors)
        if change == "drop":
            del edited["model.layers.1.mlp.experts.3.down_proj.weight"]
        else:
            edited["model.layers.0.mlp.shared_expert_gate.weight"] = torch.full((1, 32), 0.1)
        save_file(edited, str(directory / "model.safetensors"), metadata={"format": "pt"})
        message = _refused(*shared, f"train.init_from={directory}")
        expected = "experts.3.down_proj.weight is missing" if change == "drop" else "shared-expert gate must be 0"
        assert expected in message, message


def test_init_from_refuses_damaged_weights_and_tensors_it_would_drop(qwen_export: Path, tmp_path: Path) -> None:
    shared = ("moe.num_shared_experts=1", "moe.shared_expert_hidden=16")
    damaged = tmp_path / "damaged"
    shutil.copytree(qwen_export, damaged)
    (damaged / "model.safetensors").write_bytes((qwen_export / "model.safetensors").read_bytes()[:100])
    assert "its weights cannot be read" in _refused(*shared, f"train.init_from={damaged}")
    extra = tmp_path / "extra"
    shutil.copytree(qwen_export, extra)
    tensors = load_file(str(qwen_export / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)  # a QK-norm we do not compute
    save_file(tensors, str(extra / "model.safetensors"), metadata={"format": "pt"})
    assert "q_norm.weight have no counterpart" in _refused(*shared, f"train.init_from={extra}")
    quantized = _copy_with_config(qwen_export, tmp_path / "quantized", quantization_config={"quant_method": "fp8"})
    assert "quantized" in _refused(*shared, f"train.init_from={quantized}")


# a small Mixtral config.json, as transformers writes it (what it leaves out read as transformers' defaults)
MIXTRAL = {"architectures": ["MixtralForCausalLM"], "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 2, "intermediate_size": 32, "num_local_experts": 4, "num_experts_per_tok": 2,
           "vocab_size": 257}


def test_what_a_config_leaves_out_is_read_as_transformers_reads_it() -> None:
    """transformers' defaults, not ours: Mixtral's rope_theta is 1e6 and its eps 1e-5, Mistral attends within 4096
    positions, Qwen2-MoE has q/k/v biases, and a missing num_key_value_heads means grouped-query attention."""
    needs = {r.setting: r for r in requirements(MIXTRAL)}
    assert needs["model.rope_theta"].value == 1e6 and needs["model.norm_eps"].value == 1e-5
    mistral = {**MIXTRAL, "architectures": ["MistralForCausalLM"]}
    window = {r.setting: r for r in requirements(mistral)}["model.max_seq_len"]
    assert window.value == 4096 and window.met_by(_config()) and "sliding_window=4096" in window.source
    assert "max_seq_len" not in {r.setting for r in requirements({**mistral, "sliding_window": None})}
    with pytest.raises(Unsupported, match="grouped-query"):
        requirements({k: v for k, v in MIXTRAL.items() if k != "num_key_value_heads"})  # Mixtral's default: 8
    qwen = {**MIXTRAL, "architectures": ["Qwen2MoeForCausalLM"], "num_experts": 4, "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 16}
    cfg = _config("moe.num_shared_experts=1", "moe.shared_expert_hidden=16")
    _, fixed = links_for("Qwen2MoeForCausalLM", cfg.model, cfg.moe, with_defaults(qwen)["qkv_bias"])
    assert "model.layers.0.self_attn.q_proj.bias" in {f.hf for f in fixed}


def test_a_start_from_transformers_weights_needs_unscaled_gate_weights() -> None:
    """Mixtral, Qwen2-MoE and upcycling weigh each expert by its gate alone: ``moe.routed_scale`` must be 1."""
    llama = {**MIXTRAL, "architectures": ["LlamaForCausalLM"]}
    for hf, upcycle, source in ((MIXTRAL, False, "MixtralForCausalLM"), (llama, True, "upcycling")):
        (scale,) = [r for r in requirements(hf, upcycle=upcycle) if r.setting == "moe.routed_scale"]
        assert scale.met_by(_config()) and not scale.met_by(_config("moe.routed_scale=2"))
        assert scale.source.startswith(source) and scale.overrides() == ["moe.routed_scale=1.0"]


def test_a_resume_wins_over_init_from() -> None:
    """With ``train.resume=PATH`` the start point is never read: a moved init_from directory does not stop it."""
    validate(_config("train.init_from=/moved/away", "train.resume=/some/run"))


def test_moe_generate_prints_a_continuation_and_refuses_bad_flags(checkpoints: Callable[..., Path],
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(checkpoints()), "--prompt", "def ", "--max-new-tokens", "24", "--seed", "3"]
    proc = subprocess.run([sys.executable, "-m", "moe_trainer.hub.generate", *args], capture_output=True, text=True,
                          timeout=120)  # the command as a user runs it
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("def ") and len(proc.stdout) > len("def \n"), proc.stdout
    generate_main(args)
    assert capsys.readouterr().out == proc.stdout  # the same seed, the same text
    with pytest.raises(SystemExit) as exit_code:
        generate_main([*args, "--top-p", "0"])
    assert exit_code.value.code == 2 and capsys.readouterr().err == "moe-generate: --top-p=0.0: must be in (0, 1]\n"


def test_qwen2_moe_dense_layers_map_to_the_first_dense_blocks_only() -> None:
    """``mlp_only_layers=[0, ..., k-1]`` is ``moe.first_dense=k``; dense layers elsewhere have no setting of ours."""
    qwen = {**MIXTRAL, "architectures": ["Qwen2MoeForCausalLM"], "num_experts": 4, "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 16}
    needs = {r.setting: r for r in requirements({**qwen, "mlp_only_layers": [0]})}
    assert needs["moe.first_dense"].value == 1 and needs["model.ffn_hidden"].value == 32
    assert {r.setting: r for r in requirements(qwen)}["moe.first_dense"].value == 0
    with pytest.raises(Unsupported, match=r"mlp_only_layers=\[1\]"):
        requirements({**qwen, "mlp_only_layers": [1]})
