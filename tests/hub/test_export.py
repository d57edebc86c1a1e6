"""moe-export: trained models read back by ``transformers`` itself compute our logits; export then import is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_trainer.config.schema import to_dataclass
from moe_trainer.hub.export import export
from moe_trainer.hub.generate import generate
from moe_trainer.hub.init_from import apply_init_from, check_init_from
from moe_trainer.hub.safetensors_io import INDEX_FILE, HubWeights
from moe_trainer.hub.trained_model import load_trained
from moe_trainer.model.transformer import Transformer
from moe_trainer.train.sharded_checkpoint import model_entries
from tests.conftest import compose_dict
from tests.helpers import train_checkpoint

transformers = pytest.importorskip("transformers")

# model=moe as Mixtral; with a shared expert (and a dense block before the MoE block, unnormalised top-k
# weights, a dense width of its own) as Qwen2-MoE; model=dense as Llama
VARIANTS = {
    "moe": ([], "MixtralForCausalLM"),
    "shared": (["moe.num_shared_experts=1", "moe.shared_expert_hidden=24", "moe.every=2", "moe.normalize_topk=false",
                "model.ffn_hidden=48"], "Qwen2MoeForCausalLM"),
    "dense": (["model=dense"], "LlamaForCausalLM"),
    # a dense first block (moe.first_dense): Qwen2-MoE's mlp_only_layers=[0]
    "first_dense_shared": (["moe.first_dense=1", "moe.num_shared_experts=1", "moe.shared_expert_hidden=16",
                            "model.ffn_hidden=40"], "Qwen2MoeForCausalLM"),
    # softmax over the k chosen logits: the renormalised weights Mixtral computes
    "topk_softmax": (["moe.score_order=topk_softmax"], "MixtralForCausalLM"),
    # Switch (top-1, weight = probability) with two shared experts: Qwen2-MoE top-1 without renormalising
    "switch_shared": (["moe.router=switch", "moe.num_shared_experts=2", "moe.shared_expert_hidden=8"],
                      "Qwen2MoeForCausalLM"),
}
# fp32 on both sides, the same operations in another order (expert sums, the rotary tables built in float64 here
# and float32 there): measured differences 9e-8 to 1.2e-7 on logits up to ~0.6 after 2 steps (up to 4e-7 on
# larger ones). A wrong mapping moves logits by 3e-3 (gate and up swapped) to 1.3e-2 (a shared expert not
# doubled), checked by injecting those bugs.
LOGITS_ATOL = 1e-5


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Each variant trained 2 steps and exported: ``{variant: (checkpoint, export directory)}``."""
    out = {}
    for name, (overrides, _arch) in VARIANTS.items():
        root = tmp_path_factory.mktemp(f"export-{name}")
        checkpoint = train_checkpoint(root / "checkpoints", *overrides)
        export(str(checkpoint), root / "hf")
        out[name] = (checkpoint, root / "hf")
    return out


def _batch(text: str, length: int = 48) -> torch.Tensor:
    ids = torch.tensor(list(text.encode()))
    return torch.stack([ids[:length], ids[-length:]])


SAMPLE = ("def moe_layer(x, experts, router):\n    scores = router(x).softmax(-1)\n"
          "    weights, chosen = scores.topk(2)\n    return sum(w * experts[i](x) for w, i in zip(weights, chosen))\n")


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_computes_our_next_token_logits(exported: dict[str, tuple[Path, Path]], variant: str) -> None:
    checkpoint, hf_dir = exported[variant]
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == [VARIANTS[variant][1]]
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert type(theirs).__name__ == VARIANTS[variant][1]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ours = load_trained(str(checkpoint)).build()
    idx = _batch(SAMPLE)
    with torch.no_grad():
        want = ours(idx).logits_BSV
        got = theirs(idx).logits
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    assert diff <= LOGITS_ATOL, f"{variant}: max |logit difference| {diff:.2e}"
    print(f"{variant}: max |logit difference| {diff:.2e} (logits up to {want.abs().max().item():.2f})")


def test_the_exported_tokenizer_and_greedy_generation_are_ours(exported: dict[str, tuple[Path, Path]]) -> None:
    checkpoint, hf_dir = exported["moe"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "héllo wörld\n\tdef f(x): return x  # 日本"
    assert tokenizer(text)["input_ids"] == list(text.encode())
    assert tokenizer.decode(list(text.encode())) == text
    assert tokenizer.eos_token_id == 256
    trained = load_trained(str(checkpoint))
    ours = list(generate(trained.build(), trained.tokenizer, "def ", 12, 0.0, 0, 1.0, seed=0))
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    prompt = tokenizer("def ", return_tensors="pt")["input_ids"]
    theirs = model.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1]:].tolist()
    assert theirs == ours
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    text = pipe("def ", max_new_tokens=12, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert text == trained.tokenizer.decode(ours)


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_then_import_gives_the_same_weights(exported: dict[str, tuple[Path, Path]], variant: str) -> None:
    """``train.init_from`` of the export: every entry bit for bit what the checkpoint holds."""
    checkpoint, hf_dir = exported[variant]
    cfg = to_dataclass(compose_dict(["experiment=debug", *VARIANTS[variant][0], f"train.init_from={hf_dir}",
                                     "train.seed=7"]))  # another seed: nothing may come from the init
    check_init_from(cfg)
    model = Transformer(cfg.model, cfg.moe, 257, cfg.train.seed)
    apply_init_from(model, cfg)
    saved = load_trained(str(checkpoint)).entries
    got = model_entries(model)
    assert got.keys() == saved.keys()
    for key, tensor in saved.items():
        assert torch.equal(got[key], tensor), key


def test_a_sharded_export_loads_in_transformers_and_back(exported: dict[str, tuple[Path, Path]],
                                                         tmp_path: Path) -> None:
    checkpoint, whole = exported["moe"]
    export(str(checkpoint), tmp_path / "sharded", max_shard_bytes=60_000)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 2 and (tmp_path / "sharded" / INDEX_FILE).is_file(), files
    a, b = HubWeights(whole), HubWeights(tmp_path / "sharded")
    assert a.files.keys() == b.files.keys()
    assert all(torch.equal(a.get(k), b.get(k)) for k in a.files)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    ours = load_trained(str(checkpoint)).build()
    with torch.no_grad():
        assert (model(_batch(SAMPLE)).logits - ours(_batch(SAMPLE)).logits_BSV).abs().max() <= LOGITS_ATOL


def test_a_bf16_export_loads_and_computes_our_logits_to_bf16_rounding(exported: dict[str, tuple[Path, Path]],
                                                                      tmp_path: Path) -> None:
    checkpoint, _ = exported["moe"]
    export(str(checkpoint), tmp_path / "bf16", dtype="bfloat16")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert HubWeights(tmp_path / "bf16").dtype("model.embed_tokens.weight") == "BF16"
    ours = load_trained(str(checkpoint)).build()
    with torch.no_grad():
        want = ours(_batch(SAMPLE)).logits_BSV
        got = model(_batch(SAMPLE)).logits
    # weights rounded to 8 mantissa bits (2^-9 relative), computed in fp32: logits off by ~1e-3 of their scale
    assert 0 < (got - want).abs().max() <= 1e-2 * want.abs().max()
