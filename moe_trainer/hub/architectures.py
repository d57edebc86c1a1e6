"""Our model as a ``transformers`` architecture, and a ``transformers`` config as our settings.

Our decoder is Mixtral's (RMSNorm, rotary attention without biases, SwiGLU experts, softmax
router), so most models map one to one:

- ``model=moe``, routed experts in every block, top-k weights renormalised (``softmax_topk``
  with ``normalize_topk``, or ``topk_softmax``, the same numbers): ``MixtralForCausalLM``;
- ``model=moe`` with shared experts (and then also dense blocks between MoE blocks, and
  unnormalised top-k or Switch weights): ``Qwen2MoeForCausalLM``. Its shared expert has a
  sigmoid gate ours lacks: exported as a zero gate (``sigmoid(0) = 1/2`` exactly) with the
  shared expert's down projection doubled (exact in binary floating point), so the sum is ours;
- ``model=dense``: ``LlamaForCausalLM`` (``MistralForCausalLM`` is read too).

What has no faithful counterpart is refused with the reason (:class:`Unsupported`), never
exported approximately: expert-choice routing, the aux-loss-free selection bias, a capacity
that drops tokens (unless the caller accepts a dropless model), Switch or unnormalised top-k
weights without shared experts, dense blocks between MoE blocks without shared experts, and
gate weights scaled by ``moe.routed_scale``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moe_trainer.config.schema import Config, ModelConfig, MoEConfig, experts_per_token
from moe_trainer.model.transformer import active_ffn_hidden, is_moe_block

MIXTRAL, QWEN2_MOE = "MixtralForCausalLM", "Qwen2MoeForCausalLM"
LLAMA, MISTRAL = "LlamaForCausalLM", "MistralForCausalLM"
MODEL_TYPES = {MIXTRAL: "mixtral", QWEN2_MOE: "qwen2_moe", LLAMA: "llama", MISTRAL: "mistral"}
DENSE_ARCHITECTURES = (LLAMA, MISTRAL)


class Unsupported(ValueError):
    """This model (or checkpoint) has no faithful counterpart on the other side; the message says why."""


def normalized_topk(moe: MoEConfig) -> bool:
    """Whether the k gate weights of a token sum to 1 (``topk_softmax`` is softmax over the k logits: the same)."""
    return moe.router == "topk" and (moe.score_order == "topk_softmax" or moe.normalize_topk)


def ffn_widths(model: ModelConfig, moe: MoEConfig) -> list[int]:
    """Hidden width of every block's dense FFN (``model=dense``: MoE positions get the equal-active width)."""
    return [active_ffn_hidden(moe) if is_moe_block(i, moe) else model.ffn_hidden for i in range(model.n_layers)]


def _dense_blocks_setting(moe: MoEConfig) -> str:
    """The setting that gives a model dense blocks, as the user wrote it: ``moe.every``, else ``moe.first_dense``."""
    return f"moe.every={moe.every}" if moe.every != 1 else f"moe.first_dense={moe.first_dense}"


def target_architecture(model: ModelConfig, moe: MoEConfig, dropless: bool = False) -> str:
    """The ``transformers`` class a model of ours exports to; :class:`Unsupported` with the reason when none.

    ``dropless``: accept a model trained with a capacity (``moe.capacity_factor``) as the dropless
    model ``transformers`` runs (every token reaches its experts), which differs from the trained
    one wherever training dropped assignments.
    """
    if model.arch == "dense":
        widths = sorted(set(ffn_widths(model, moe)))
        if len(widths) > 1:
            raise Unsupported(f"model=dense with {_dense_blocks_setting(moe)} has FFNs of two widths ({widths[0]} and "
                              f"{widths[1]}); {LLAMA} has one intermediate_size for every block")
        return LLAMA
    if moe.router == "expert_choice":
        raise Unsupported("moe.router=expert_choice: each expert picks its tokens among the whole batch, which no "
                          "transformers architecture does (nor can a causal model generating one token at a time)")
    if moe.bias_balancing:
        raise Unsupported("moe.bias_balancing=true: the learnt selection bias (DeepSeek-V3's aux-loss-free "
                          f"balancing, on by default) has no place in {MIXTRAL} or {QWEN2_MOE}; without it tokens "
                          "would go to other experts. A model that exports trains without it: variant=mixtral8 "
                          "(Mixtral's routing) or moe.bias_balancing=false")
    if moe.routed_scale != 1:
        raise Unsupported(f"moe.routed_scale={moe.routed_scale}: {MIXTRAL} and {QWEN2_MOE} weigh each expert's "
                          "output by its gate weight alone")
    if moe.capacity_factor is not None and not dropless:
        raise Unsupported(f"moe.capacity_factor={moe.capacity_factor}: the model was trained dropping assignments "
                          "past each expert's capacity, and transformers models route every token (dropless); "
                          "pass --dropless to export it as that dropless model (its outputs differ from the "
                          "trained model's wherever training dropped)")
    if moe.num_shared_experts > 0:
        return QWEN2_MOE
    if moe.every != 1 or moe.first_dense:
        raise Unsupported(f"{_dense_blocks_setting(moe)} without shared experts: {MIXTRAL} has an MoE FFN in every "
                          f"block, and {QWEN2_MOE} (which has dense blocks) always adds a shared expert")
    if not normalized_topk(moe):
        how = "moe.router=switch weights by the probability" if moe.router == "switch" else \
            "moe.normalize_topk=false keeps the top-k probabilities as they are"
        raise Unsupported(f"{how}, while {MIXTRAL} renormalises the top-k weights to sum to 1 (and {QWEN2_MOE}, "
                          "which can keep them, always adds a shared expert)")
    return MIXTRAL


def hf_config(arch: str, model: ModelConfig, moe: MoEConfig, vocab_size: int, eos_id: int,
              dtype: str = "float32") -> dict[str, Any]:
    """The ``config.json`` of ``arch`` for our model (rope given both ways: ``rope_theta`` and ``rope_parameters``)."""
    common: dict[str, Any] = {
        "architectures": [arch], "model_type": MODEL_TYPES[arch], "vocab_size": vocab_size,
        "hidden_size": model.d_model, "num_hidden_layers": model.n_layers, "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.n_heads, "head_dim": model.d_model // model.n_heads, "hidden_act": "silu",
        "max_position_embeddings": model.max_seq_len, "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta},
        "initializer_range": model.init_std, "tie_word_embeddings": False, "attention_dropout": 0.0,
        "use_cache": True, "bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": None, "dtype": dtype,
    }
    top_k = experts_per_token(moe)
    if arch == LLAMA:
        return {**common, "intermediate_size": ffn_widths(model, moe)[0], "attention_bias": False, "mlp_bias": False,
                "pretraining_tp": 1}
    if arch == MIXTRAL:
        return {**common, "intermediate_size": moe.expert_hidden, "num_local_experts": moe.num_experts,
                "num_experts_per_tok": top_k, "router_aux_loss_coef": moe.aux_loss_coef, "router_jitter_noise": 0.0,
                "output_router_logits": False, "sliding_window": None}
    return {**common, "intermediate_size": model.ffn_hidden, "moe_intermediate_size": moe.expert_hidden,
            "shared_expert_intermediate_size": moe.num_shared_experts * moe.shared_expert_hidden,
            "num_experts": moe.num_experts, "num_experts_per_tok": top_k, "norm_topk_prob": normalized_topk(moe),
            "decoder_sparse_step": moe.every, "mlp_only_layers": list(range(moe.first_dense)), "qkv_bias": True,
            "router_aux_loss_coef": moe.aux_loss_coef, "output_router_logits": False, "use_sliding_window": False,
            "sliding_window": None, "max_window_layers": model.n_layers}


# ---- the other way: what a transformers config asks of our settings ----


# What transformers 5 assumes for a key a config.json leaves out (the config classes' defaults): an
# import reads the checkpoint as transformers would, never with our own defaults
_COMMON_DEFAULTS: dict[str, Any] = {"hidden_act": "silu", "head_dim": None, "tie_word_embeddings": False,
                                    "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
                                    "sliding_window": None, "use_sliding_window": True}
_DEFAULTS: dict[str, dict[str, Any]] = {
    MIXTRAL: {"rms_norm_eps": 1e-5, "rope_theta": 1e6, "num_key_value_heads": 8},
    QWEN2_MOE: {"rms_norm_eps": 1e-6, "num_key_value_heads": 16, "use_sliding_window": False, "sliding_window": 4096,
                "decoder_sparse_step": 1, "norm_topk_prob": False, "qkv_bias": True, "mlp_only_layers": []},
    LLAMA: {"rms_norm_eps": 1e-6, "num_key_value_heads": None},
    MISTRAL: {"rms_norm_eps": 1e-6, "num_key_value_heads": 8, "sliding_window": 4096},
}


def with_defaults(hf: dict[str, Any]) -> dict[str, Any]:
    """``hf`` completed with transformers' defaults for its architecture (``rope_theta`` read from
    ``rope_parameters`` where that holds it; ``num_key_value_heads`` null meaning one per head)."""
    arch = architecture_of(hf)
    out = {**_COMMON_DEFAULTS, **_DEFAULTS[arch], **hf}  # an explicit null stays null, as in transformers
    rope = hf.get("rope_parameters") or {}
    if "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    if out.get("num_key_value_heads") is None:
        out["num_key_value_heads"] = out["num_attention_heads"]
    return out


@dataclass(frozen=True)
class Requirement:
    """One setting a checkpoint needs: ``setting=value`` (the override to write), because of ``source``.

    ``accepts`` decides whether a config already satisfies it (default: the setting equals ``value``);
    some needs have several spellings (renormalised top-k weights: two score orders), and some take
    several settings together (``also``).
    """

    setting: str
    value: Any
    source: str  # what the checkpoint says, e.g. "hidden_size=128"
    accepts: Callable[[Config], bool] | None = None
    also: tuple[str, ...] = ()  # further overrides that, with this one, meet it

    def met_by(self, cfg: Config) -> bool:
        if self.accepts is not None:
            return self.accepts(cfg)
        return _get(cfg, self.setting) == self.value

    def overrides(self) -> list[str]:
        """The command-line overrides that meet this requirement."""
        return [f"{self.setting}={_show(self.value)}", *self.also]

    def current(self, cfg: Config) -> str:
        """What ``cfg`` has for every setting this requirement names, as overrides."""
        names = [self.setting, *(o.split("=", 1)[0] for o in self.also)]
        return " ".join(f"{name}={_show(_get(cfg, name))}" for name in names)


def _get(cfg: Config, setting: str) -> Any:
    section, key = setting.split(".")
    return getattr(getattr(cfg, section), key)


def _show(value: Any) -> str:
    return "true" if value is True else "false" if value is False else "null" if value is None else str(value)


def architecture_of(hf: dict[str, Any]) -> str:
    """The one supported class a config.json names; :class:`Unsupported` otherwise."""
    names = hf.get("architectures") or []
    found = [n for n in names if n in MODEL_TYPES]
    if not found:
        supported = ", ".join(MODEL_TYPES)
        raise Unsupported(f"its config.json names {names or hf.get('model_type')!r}; supported: {supported}")
    return found[0]


def _refuse_unsupported_features(arch: str, hf: dict[str, Any]) -> None:
    """What of a transformers checkpoint our decoder cannot compute at all, whatever the settings
    (``hf`` completed by :func:`with_defaults`). Qwen2-MoE's q/k/v biases are checked by value later:
    zero ones (what moe-export writes) are ours exactly."""
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    if hf.get("quantization_config"):
        raise Unsupported("it is quantized (quantization_config); give the unquantized weights")
    if hf["num_key_value_heads"] != heads:
        raise Unsupported(f"num_key_value_heads={hf['num_key_value_heads']} with num_attention_heads={heads} is "
                          "grouped-query attention; our attention has as many key/value heads as query heads")
    if hf["head_dim"] not in (None, width // heads):
        raise Unsupported(f"head_dim={hf['head_dim']} is not hidden_size / num_attention_heads = {width // heads}")
    if hf["hidden_act"] != "silu":
        raise Unsupported(f"hidden_act={hf['hidden_act']!r}; our FFNs are SwiGLU (silu)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise Unsupported(f"rope type {rope.get('rope_type', rope.get('type'))!r}; our rotary embedding is the "
                          "default (unscaled) one")
    for flag in ("attention_bias", "mlp_bias"):
        if hf[flag]:
            raise Unsupported(f"{flag}=true; our attention and FFN projections have no biases")
    if arch == QWEN2_MOE and hf["mlp_only_layers"] != list(range(len(hf["mlp_only_layers"]))):
        raise Unsupported(f"mlp_only_layers={hf['mlp_only_layers']}; our dense blocks are the first "
                          "moe.first_dense blocks and every block but each moe.every-th (decoder_sparse_step), "
                          "with no other exceptions")
    if arch == QWEN2_MOE and not hf.get("shared_expert_intermediate_size"):
        raise Unsupported("shared_expert_intermediate_size=0")


def _window(hf: dict[str, Any]) -> int | None:
    """The sliding attention window transformers applies, if any (Qwen2-MoE only with use_sliding_window)."""
    return hf["sliding_window"] if hf["use_sliding_window"] else None


def requirements(hf: dict[str, Any], upcycle: bool = False) -> list[Requirement]:
    """The settings a run needs to start from a checkpoint with config ``hf`` (``train.init_from``).

    ``upcycle``: a dense checkpoint (Llama, Mistral) becomes ``model=moe``: every expert a copy
    of the block's FFN (Komatsuzaki et al., https://arxiv.org/abs/2212.05055); the number of
    experts and k stay the run's own choice, but the gate weights must sum to 1 and no assignment
    may be dropped, so that the upcycled block computes exactly the dense FFN at the start.
    """
    arch = architecture_of(hf)
    hf = with_defaults(hf)
    _refuse_unsupported_features(arch, hf)
    width, theta, eps = hf["hidden_size"], float(hf["rope_theta"]), hf["rms_norm_eps"]
    src = f"{arch} with"
    reqs = [
        Requirement("model.d_model", width, f"{src} hidden_size={width}"),
        Requirement("model.n_layers", hf["num_hidden_layers"], f"{src} num_hidden_layers={hf['num_hidden_layers']}"),
        Requirement("model.n_heads", hf["num_attention_heads"], f"{src} num_attention_heads="
                    f"{hf['num_attention_heads']}"),
        Requirement("model.norm_eps", eps, f"{src} rms_norm_eps={eps}"),
        Requirement("model.rope_theta", theta, f"{src} rope_theta={theta}"),
    ]
    window = _window(hf)
    if window is not None:
        reqs.append(Requirement("model.max_seq_len", window, f"{src} sliding_window={window} (attention is full "
                                "up to that length)", accepts=lambda cfg: cfg.model.max_seq_len <= window))
    inter = hf["intermediate_size"]
    if arch in DENSE_ARCHITECTURES and not upcycle:
        reqs.append(Requirement("model.arch", "dense", f"{arch} (a dense model)"))
        # a dense block's width at an MoE position is k * moe.expert_hidden + round(E / 3) + shared: one spelling of I
        reqs.append(Requirement("model.ffn_hidden", inter, f"{src} intermediate_size={inter} in every block",
                                accepts=lambda cfg: set(ffn_widths(cfg.model, cfg.moe)) == {inter},
                                also=(f"moe.expert_hidden={inter}", "moe.top_k=1", "moe.num_experts=1",
                                      "moe.num_shared_experts=0")))
        return reqs
    reqs.append(Requirement("model.arch", "moe", f"{arch}" + (" upcycled into experts" if upcycle else "")))
    reqs.append(Requirement("moe.routed_scale", 1.0, "upcycling (k copies of one FFN sum to it only at scale 1)"
                            if upcycle else f"{arch} (each expert's output weighted by its gate alone)"))
    renormalised = ("moe.router=topk", "moe.score_order=softmax_topk")
    if upcycle:
        reqs += [
            Requirement("moe.expert_hidden", inter, f"{src} intermediate_size={inter} (each expert a copy of the FFN)"),
            Requirement("model.ffn_hidden", inter, f"{src} intermediate_size={inter} (the dense blocks)",
                        accepts=lambda cfg: (cfg.moe.every == 1 and not cfg.moe.first_dense)
                        or cfg.model.ffn_hidden == inter),
            Requirement("moe.num_shared_experts", 0, "upcycling (the FFN becomes the routed experts)"),
            Requirement("moe.normalize_topk", True, "upcycling (k copies of one FFN sum to it only when the gate "
                        "weights sum to 1)", accepts=lambda cfg: normalized_topk(cfg.moe), also=renormalised),
            Requirement("moe.capacity_factor", None, "upcycling (a dropped assignment would not compute the FFN)"),
        ]
        return reqs
    if arch == MIXTRAL:
        experts, top_k = hf["num_local_experts"], hf["num_experts_per_tok"]
        return [*reqs,
                Requirement("moe.num_experts", experts, f"{src} num_local_experts={experts}"),
                Requirement("moe.top_k", top_k, f"{src} num_experts_per_tok={top_k}"),
                Requirement("moe.expert_hidden", inter, f"{src} intermediate_size={inter}"),
                Requirement("moe.every", 1, f"{arch} (an MoE FFN in every block)"),
                Requirement("moe.first_dense", 0, f"{arch} (an MoE FFN in every block, the first too)"),
                Requirement("moe.num_shared_experts", 0, f"{arch} (no shared experts)"),
                Requirement("moe.normalize_topk", True, f"{arch} (top-k routing, weights renormalised)",
                            accepts=lambda cfg: normalized_topk(cfg.moe), also=renormalised)]
    experts, top_k, norm = hf["num_experts"], hf["num_experts_per_tok"], bool(hf["norm_topk_prob"])
    shared, step = hf["shared_expert_intermediate_size"], hf["decoder_sparse_step"]
    reqs += [
        Requirement("moe.num_experts", experts, f"{src} num_experts={experts}"),
        Requirement("moe.top_k", top_k, f"{src} num_experts_per_tok={top_k}",
                    accepts=lambda cfg: experts_per_token(cfg.moe) == top_k,
                    also=("moe.router=topk",) if top_k > 1 else ()),  # Switch is top-1 whatever moe.top_k says
        Requirement("moe.expert_hidden", hf["moe_intermediate_size"], f"{src} moe_intermediate_size="
                    f"{hf['moe_intermediate_size']}"),
        Requirement("moe.every", step, f"{src} decoder_sparse_step={step}"),
        Requirement("moe.first_dense", len(hf["mlp_only_layers"]), f"{src} mlp_only_layers={hf['mlp_only_layers']}"),
        Requirement("moe.num_shared_experts", 1, f"{src} shared_expert_intermediate_size={shared}",
                    accepts=lambda cfg: cfg.moe.num_shared_experts * cfg.moe.shared_expert_hidden == shared,
                    also=(f"moe.shared_expert_hidden={shared}",)),
    ]
    if norm:
        reqs.append(Requirement("moe.normalize_topk", True, f"{src} norm_topk_prob=true (top-k routing, weights "
                                "renormalised)", accepts=lambda cfg: normalized_topk(cfg.moe), also=renormalised))
    else:  # softmax over every expert, top-k of it as it is: Switch (top-1) or top-k without renormalising
        reqs.append(Requirement("moe.normalize_topk", False, f"{src} norm_topk_prob=false (softmax over every "
                                "expert, top-k weights as they are)", accepts=lambda cfg: cfg.moe.router == "switch"
                                or (cfg.moe.router == "topk" and cfg.moe.score_order == "softmax_topk"
                                    and not cfg.moe.normalize_topk), also=renormalised))
    if step != 1 or hf["mlp_only_layers"]:
        reqs.append(Requirement("model.ffn_hidden", inter, f"{src} intermediate_size={inter} (its dense blocks)"))
    return reqs
