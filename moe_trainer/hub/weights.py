"""The one table between our parameters and a ``transformers`` checkpoint's tensors, read both ways.

Our side is named as checkpoints name it (:func:`moe_trainer.train.sharded_checkpoint.model_entries`):
``blocks.0.attn.qkv.weight``, experts one global expert at a time
(``blocks.0.ffn.experts.w_down_EFD/expert5``). Each :class:`Link` pairs one of ours with the
tensors it is on the Hub side and says how to go there (``to_hf``) and back (``from_hf``); only
transposes, concatenations, splits and a multiplication by 2 occur, all exact, so export
followed by import gives the same bits. :class:`Fixed` tensors exist on the Hub side only
(Qwen2-MoE's shared-expert gate): export writes them, import requires them.

Layouts (``transformers`` naming as on the Hub, which ``vllm``, ``sglang`` and ``transformers``
read; ``transformers`` 5 fuses the experts itself when it loads them):

- ours ``attn.qkv.weight [3D, D]`` = ``q_proj; k_proj; v_proj`` stacked (heads in order);
- ours dense ``ffn.gate_up.weight [2F, D]`` = ``gate_proj; up_proj``;
- ours experts ``w_gate_up_EDF2[e] [D, 2F]`` (``x @ W``) = ``(w1; w3)^T`` (Mixtral) or
  ``(gate_proj; up_proj)^T`` (Qwen2-MoE), ``w_down_EFD[e] [F, D]`` = ``w2^T`` / ``down_proj^T``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from moe_trainer.config.schema import ModelConfig, MoEConfig
from moe_trainer.hub.architectures import LLAMA, MISTRAL, MIXTRAL, QWEN2_MOE
from moe_trainer.model.transformer import is_moe_block

Split = Callable[[Tensor], tuple[Tensor, ...]]
Join = Callable[[tuple[Tensor, ...]], Tensor]


@dataclass(frozen=True)
class Link:
    """Our tensor ``ours`` is the Hub tensors ``hf`` through ``to_hf``; they are ours through ``from_hf``."""

    ours: str
    hf: tuple[str, ...]
    to_hf: Split
    from_hf: Join


@dataclass(frozen=True)
class Fixed:
    """A Hub tensor with no counterpart of ours: it must hold ``value`` for the model to be ours."""

    hf: str
    value: Callable[[], Tensor]
    why: str


def _same() -> tuple[Split, Join]:
    return (lambda t: (t,)), (lambda ts: ts[0])


def _stacked(parts: int) -> tuple[Split, Join]:
    """Ours is ``parts`` Hub matrices stacked on dim 0 (q, k, v; gate, up)."""
    return (lambda t: tuple(t.chunk(parts, dim=0))), (lambda ts: torch.cat(ts, dim=0))


def _transposed_pair() -> tuple[Split, Join]:
    """Ours ``[D, 2F]`` is ``(gate; up)^T``, each of theirs ``[F, D]``."""
    return (lambda t: tuple(t.t().chunk(2, dim=0))), (lambda ts: torch.cat(ts, dim=0).t())


def _transposed() -> tuple[Split, Join]:
    return (lambda t: (t.t(),)), (lambda ts: ts[0].t())


def _doubled() -> tuple[Split, Join]:
    """Theirs is ours times 2 (a shared expert behind Qwen2-MoE's gate of sigmoid(0) = 1/2); exact in floats."""
    return (lambda t: (t * 2,)), (lambda ts: ts[0] / 2)


def _link(ours: str, hf: tuple[str, ...], how: tuple[Split, Join]) -> Link:
    return Link(ours, hf, *how)


def _zero_biases(i: int, width: int) -> list[Fixed]:
    """Qwen2-MoE's q/k/v biases (transformers 4 and vLLM always build them): zero, since ours have none."""
    return [Fixed(f"model.layers.{i}.self_attn.{p}_proj.bias", lambda: torch.zeros(width),
                  "its q/k/v biases must be 0: our attention has none") for p in "qkv"]


def _attention_links(i: int) -> list[Link]:
    hf, ours = f"model.layers.{i}", f"blocks.{i}"
    return [
        _link(f"{ours}.attn_norm.weight", (f"{hf}.input_layernorm.weight",), _same()),
        _link(f"{ours}.attn.qkv.weight", tuple(f"{hf}.self_attn.{p}_proj.weight" for p in "qkv"), _stacked(3)),
        _link(f"{ours}.attn.out.weight", (f"{hf}.self_attn.o_proj.weight",), _same()),
        _link(f"{ours}.ffn_norm.weight", (f"{hf}.post_attention_layernorm.weight",), _same()),
    ]


def _dense_ffn_links(ours: str, hf: str, down: tuple[Split, Join] | None = None) -> list[Link]:
    """A SwiGLU ``ours`` (``gate_up``, ``down``) as an MLP ``hf`` (``gate_proj``, ``up_proj``, ``down_proj``)."""
    return [_link(f"{ours}.gate_up.weight", (f"{hf}.gate_proj.weight", f"{hf}.up_proj.weight"), _stacked(2)),
            _link(f"{ours}.down.weight", (f"{hf}.down_proj.weight",), down or _same())]


def _expert_links(ours: str, e: int, gate: str, up: str, down: str) -> list[Link]:
    """Global expert ``e`` of ours (stacked experts ``ours``) from the Hub matrices named ``gate``/``up``/``down``."""
    return [_link(f"{ours}.w_gate_up_EDF2/expert{e}", (gate, up), _transposed_pair()),
            _link(f"{ours}.w_down_EFD/expert{e}", (down,), _transposed())]


def _moe_links(arch: str, i: int, moe: MoEConfig, width: int) -> tuple[list[Link], list[Fixed]]:
    hf, ours = f"model.layers.{i}", f"blocks.{i}.ffn"
    if arch == MIXTRAL:
        links = [_link(f"{ours}.router.weight", (f"{hf}.block_sparse_moe.gate.weight",), _same())]
        for e in range(moe.num_experts):
            x = f"{hf}.block_sparse_moe.experts.{e}"
            links += _expert_links(f"{ours}.experts", e, f"{x}.w1.weight", f"{x}.w3.weight", f"{x}.w2.weight")
        return links, []
    links = [_link(f"{ours}.router.weight", (f"{hf}.mlp.gate.weight",), _same())]
    for e in range(moe.num_experts):
        x = f"{hf}.mlp.experts.{e}"
        links += _expert_links(f"{ours}.experts", e, f"{x}.gate_proj.weight", f"{x}.up_proj.weight",
                               f"{x}.down_proj.weight")
    links += _dense_ffn_links(f"{ours}.shared", f"{hf}.mlp.shared_expert", down=_doubled())
    gate = Fixed(f"{hf}.mlp.shared_expert_gate.weight", lambda: torch.zeros(1, width),
                 "its shared-expert gate must be 0: ours add the shared experts' output in full, which "
                 "Qwen2-MoE's gate sigmoid(w.x) does only as 1/2 at w = 0")
    return links, [gate]


def links_for(arch: str, model: ModelConfig, moe: MoEConfig, qkv_bias: bool = True) -> tuple[list[Link], list[Fixed]]:
    """Every tensor of our model ``(model, moe)`` paired with ``arch``'s, in model order.

    ``qkv_bias`` (Qwen2-MoE only): the checkpoint has q/k/v biases, which must be zero (export writes them).
    """
    links = [_link("embed.weight", ("model.embed_tokens.weight",), _same())]
    fixed: list[Fixed] = []
    for i in range(model.n_layers):
        links += _attention_links(i)
        if arch == QWEN2_MOE and qkv_bias:
            fixed += _zero_biases(i, model.d_model)
        if arch in (LLAMA, MISTRAL) or not is_moe_block(i, moe):
            links += _dense_ffn_links(f"blocks.{i}.ffn", f"model.layers.{i}.mlp")
        else:
            layer_links, layer_fixed = _moe_links(arch, i, moe, model.d_model)
            links += layer_links
            fixed += layer_fixed
    links += [_link("norm.weight", ("model.norm.weight",), _same()),
              _link("lm_head.weight", ("lm_head.weight",), _same())]
    return links, fixed


def upcycled_links(arch: str, model: ModelConfig, moe: MoEConfig) -> list[Link]:
    """A dense checkpoint (``arch``: Llama/Mistral) read into ``model=moe``: every expert of an MoE block is
    the block's FFN; routers have no link (they keep the run's own initialisation)."""
    links, _ = links_for(arch, model, moe)  # dense names for every block's FFN
    out = []
    for link in links:
        i = _block_of(link.ours)
        if i is None or not is_moe_block(i, moe) or ".ffn." not in link.ours:
            out.append(link)
            continue
        if link.ours.endswith("gate_up.weight"):
            for e in range(moe.num_experts):
                out.append(_link(f"blocks.{i}.ffn.experts.w_gate_up_EDF2/expert{e}", link.hf, _transposed_pair()))
        else:
            for e in range(moe.num_experts):
                out.append(_link(f"blocks.{i}.ffn.experts.w_down_EFD/expert{e}", link.hf, _transposed()))
    return out


def _block_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" else None


def fill_model(model: torch.nn.Module, value: Callable[[str], Tensor | None]) -> None:
    """Copies ``value(key)`` into each of ``model``'s checkpoint entries (:func:`model_entries` keys); a
    None leaves the entry as it is. The one loop that puts weights from outside into a model."""
    from moe_trainer.train.sharded_checkpoint import model_entries

    with torch.no_grad():
        for key, target in model_entries(model).items():
            new = value(key)
            if new is not None:
                target.copy_(new)
