"""Bytes a forward keeps for its backward, and the backward's own workspace, from the config alone.

Each term is a tensor the code creates and autograd (or our own autograd functions) keeps,
written per token of one forward (``train.batch_size / (data-parallel ranks x
train.grad_accum_steps)`` sequences x ``data.seq_len``), plus the weight casts that a bf16
forward keeps per micro-batch (autocast's cast cache is off, :mod:`moe_trainer.train.precision`).
The terms were read off the code and checked against
:func:`moe_trainer.model.memory.kept_activations`, which measures what a real forward keeps
(``tests/plan/test_activations.py`` holds them to a few percent for every mode and precision).

Shape legend: D width, H heads, E experts, k experts per token, F expert hidden width,
V vocabulary; ``b`` bytes of the compute dtype (4 fp32, 2 bf16); ``c`` bytes of the
attention core (fp32 on CPU even under bf16, see ``model.layers.attention_core_dtype``).
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_trainer.config.schema import Config, experts_per_token
from moe_trainer.model.transformer import active_ffn_hidden, is_moe_block

FP32 = 4
INDEX = 8  # int64
PAD_WASTE = 1 / 16  # bucketed runs round up by at most 1/8 (or 32 rows): half of that on average


@dataclass(frozen=True)
class Widths:
    """The sizes the formulas read, derived once from the config."""

    d: int
    heads: int
    vocab: int
    k: int
    experts: int
    expert_hidden: int
    shared_hidden: int  # all shared experts as one SwiGLU (0: none)
    b: int  # bytes of the compute dtype
    c: int  # bytes of the attention core's dtype
    cpu_bf16: bool  # bf16 on the CPU: expert runs padded to bucketed lengths (moe.experts.pads_runs)

    @classmethod
    def of(cls, cfg: Config, vocab: int, on_gpu: bool) -> Widths:
        bf16 = cfg.train.precision == "bf16"
        moe = cfg.moe
        k = experts_per_token(moe)
        b = 2 if bf16 else FP32
        return cls(cfg.model.d_model, cfg.model.n_heads, vocab, k, moe.num_experts, moe.expert_hidden,
                   moe.num_shared_experts * moe.shared_expert_hidden, b, b if on_gpu else FP32,
                   bf16 and not on_gpu)

    @property
    def bf16(self) -> bool:
        return self.b == 2


def _attention(w: Widths) -> float:
    """The attention sub-block without its output residual: norm, q/k/v, rotary, core, output projection."""
    d = w.d
    norm = FP32 * d + 4 + (0 if w.bf16 else FP32 * d)  # x*rsqrt and rsqrt; fp32: the output the q/k/v matmul keeps
    qkv = 2 * d if w.bf16 else 3 * FP32 * d  # bf16: the input's cast (outputs are re-cast below); fp32: q, k, v
    core = 2 * w.c * d + w.c * d + w.c * d + FP32 * w.heads  # rotated q, k; output; its copy (or v's); row stats
    out = 2 * d if w.bf16 else 0  # bf16: the cast input of the output projection (fp32: the copy above)
    return norm + qkv + core + out


def _attention_weights(w: Widths) -> float:
    """bf16 weight casts the attention keeps per micro-batch (q/k/v and output projections)."""
    return 2 * 4 * w.d * w.d if w.bf16 else 0


def _swiglu(w: Widths, hidden: int) -> float:
    """A dense SwiGLU over every token (dense FFN or shared experts): gate/up output, silu, product."""
    return w.b * 4 * hidden + (2 * w.d if w.bf16 else 0)  # bf16: plus the input's cast


def _swiglu_weights(w: Widths, hidden: int) -> float:
    return 2 * 3 * w.d * hidden if w.bf16 else 0


def _ffn_norm(w: Widths, moe: bool) -> float:
    # the router reads the fp32 output, so an MoE block keeps it in bf16 too
    return FP32 * w.d + 4 + (FP32 * w.d if moe or not w.bf16 else 0)


def _router(w: Widths) -> float:
    """fp32 probabilities, top-k values and indices, logsumexp; plus the dispatch plan's indices and weights."""
    return FP32 * w.experts + (FP32 + INDEX) * w.k + 4 + (2 * INDEX + FP32) * w.k


def _expert_rows(w: Widths, rows: float, recompute: bool) -> float:
    """What the routed experts keep per token of the forward, for ``rows`` rows per token (k when balanced).

    The input rows (dispatched, or received by an all-to-all) and the outputs the combine
    weighs; without recompute also ``h`` ([N, 2F]), ``silu`` and their product. bf16 on the
    CPU pads each expert's run (:func:`moe_trainer.moe.experts.bucketed`): a padded copy of the
    input rows, and padded hidden activations (:data:`PAD_WASTE` more rows on average).
    """
    hidden = 0 if recompute else w.b * 4 * w.expert_hidden
    kept = 2 * w.b * w.d + hidden
    if w.cpu_bf16:
        kept += (w.b * w.d + hidden) * (1 + PAD_WASTE) - hidden
    return rows * kept


def expert_weight_casts(w: Widths, local_experts: int, recompute: bool) -> float:
    """bf16 copies of the local experts' weights each expert call keeps for its backward (none under recompute)."""
    return 0 if not w.bf16 or recompute else 2 * 3 * w.d * w.expert_hidden * local_experts


@dataclass(frozen=True)
class Kept:
    """What one forward keeps: ``per_token`` bytes times its tokens, plus ``fixed`` bytes (bf16 weight casts)."""

    per_token: float
    fixed: float

    def bytes(self, tokens: int) -> int:
        return int(self.per_token * tokens + self.fixed)


def trainer_kept(cfg: Config, w: Widths, local_experts: int, micro_batches: int, rows_per_token: float,
                 experts_here: bool = True) -> Kept:
    """A rank that runs the blocks (single, data/expert parallel, a coordinator), per ``train.recompute``.

    ``rows_per_token``: expert rows this rank's experts get per token of its own (k when
    balanced and dropless); ``experts_here``: False for a disaggregated coordinator, which keeps
    only the returned expert outputs.
    """
    mode = cfg.train.recompute
    per_token, fixed = 0.0, 0.0
    for i in range(cfg.model.n_layers):
        moe = is_moe_block(i, cfg.moe) and cfg.model.arch == "moe"
        hidden = cfg.model.ffn_hidden if not is_moe_block(i, cfg.moe) else active_ffn_hidden(cfg.moe)
        per_token += FP32 * w.d  # the block's output (the next norm keeps it)
        if mode == "block":
            if moe:  # the region's top-k decisions, the dispatch plan, rows and outputs
                per_token += _router(w) - FP32 * w.experts - 4
                per_token += _expert_rows(w, rows_per_token, True) if experts_here else w.b * w.k * w.d
                if w.shared_hidden:
                    per_token += w.b * w.d if w.bf16 else FP32 * w.d  # the shared experts' input
            continue
        if mode == "none":
            per_token += _attention(w)
            fixed += _attention_weights(w) * micro_batches
        per_token += FP32 * w.d  # the residual after attention (the FFN norm keeps it)
        per_token += _ffn_norm(w, moe)
        if not moe:
            per_token += _swiglu(w, hidden)
            fixed += _swiglu_weights(w, hidden) * micro_batches
            continue
        per_token += _router(w)
        # a coordinator keeps only the outputs its expert actors sent back
        per_token += _expert_rows(w, rows_per_token, False) if experts_here else w.b * w.k * w.d
        if experts_here:
            fixed += expert_weight_casts(w, local_experts, False) * micro_batches
        if w.shared_hidden:
            per_token += _swiglu(w, w.shared_hidden)
            fixed += _swiglu_weights(w, w.shared_hidden) * micro_batches
    # the embedding's output, the final norm, the LM head's input, the loss's log-softmax
    per_token += FP32 * w.d + FP32 * w.d + 4 + (2 * w.d if w.bf16 else FP32 * w.d) + FP32 * w.vocab
    fixed += 2 * w.vocab * w.d * micro_batches if w.bf16 else 0
    return Kept(per_token, fixed)


def expert_actor_kept(cfg: Config, w: Widths, local_experts: int, messages: int) -> Kept:
    """A disaggregated expert actor: per row it received, its experts' kept tensors (see :func:`_expert_rows`),
    held with the rows and outputs of every served dispatch until that dispatch's backward.

    Here a "token" is a received row; ``messages``: forward messages per step (coordinators x
    micro-batches), each of which casts the weights once under bf16.
    """
    recompute = cfg.train.recompute == "block"
    layers = sum(is_moe_block(i, cfg.moe) for i in range(cfg.model.n_layers))
    per_row = _expert_rows(w, 1.0, recompute) * layers  # outputs too: each served dispatch keeps them for backward
    return Kept(per_row, expert_weight_casts(w, local_experts, recompute) * messages * layers)


def backward_workspace(cfg: Config, w: Widths, tokens: int, rows_per_token: float, experts_here: bool = True) -> int:
    """Transient bytes on top of the kept ones at the backward's worst point.

    The loss's gradient (two ``[T, V]`` fp32 tensors at once) at the start, or one block's
    backward: the experts' ``dy``, ``da``, ``da * up``, ``dh`` ([N, 2F]) and ``dx``; under
    ``recompute=block`` that block's recomputed forward (its ``none`` activations) on top.
    """
    loss = 2 * FP32 * w.vocab * tokens
    expert = w.b * rows_per_token * (4 * w.expert_hidden + 2 * w.d) * tokens if experts_here else 0
    attention = 3 * FP32 * w.d * tokens + _attention(w) * tokens  # dq, dk, dv next to the core's saved tensors
    block = max(expert, attention)
    if cfg.train.recompute != "none":
        block += _attention(w) * tokens
        if cfg.train.recompute == "block" and experts_here:
            block += _expert_rows(w, rows_per_token, False) * tokens
    return int(max(loss, block))
