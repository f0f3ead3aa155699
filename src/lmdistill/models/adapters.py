"""Architecture adapters: map a Hugging Face causal LM's modules to canonical roles and back.

Canonical tensors use the row-vector convention `y = x @ W + b` with heads as explicit axes, so the
initialization code (selection, GUIDE folds) never needs to know about fused projections, `nn.Linear`'s
`[out, in]` layout or GPT-2's `Conv1D` `[in, out]` layout. Shapes: d = width, H = query heads,
H_kv = key/value heads, l = head width, f = MLP width, V = vocabulary, L = positions.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import Tensor
from transformers import PretrainedConfig, PreTrainedModel

from lmdistill.errors import LmdistillError


@dataclass
class Norm:
    """A norm's parameters: RMSNorm has only a gain; LayerNorm also a bias.

    `weight` is the module's parameter and the gain is `offset + weight`: Gemma's RMSNorm computes x · (1 + w)
    (offset 1, so a zero weight is the identity), the others x · w (offset 0).
    """

    weight: Tensor  # [d]
    bias: Tensor | None = None  # [d]
    offset: float = 0.0

    @property
    def gain(self) -> Tensor:
        """The per-coordinate factor the norm applies, `offset + weight` [d]."""
        return self.weight + self.offset if self.offset else self.weight

    def with_gain(self, gain: Tensor, bias: Tensor | None = None) -> Norm:
        """A norm of the same parametrization whose gain is `gain`."""
        return Norm(gain - self.offset if self.offset else gain, bias, self.offset)


@dataclass
class BlockWeights:
    """One transformer block in canonical form. Read-side weights take the normed residual; write-side add to it."""

    attn_norm: Norm
    q: Tensor  # [d, H, l]
    k: Tensor  # [d, H_kv, l]
    v: Tensor  # [d, H_kv, l]
    o: Tensor  # [H, l, d]
    mlp_norm: Norm
    up: Tensor  # [d, f]
    down: Tensor  # [f, d]
    gate: Tensor | None = None  # [d, f]; gated MLPs (SwiGLU) only
    q_bias: Tensor | None = None  # [H, l]
    k_bias: Tensor | None = None  # [H_kv, l]
    v_bias: Tensor | None = None  # [H_kv, l]
    o_bias: Tensor | None = None  # [d]
    up_bias: Tensor | None = None  # [f]
    gate_bias: Tensor | None = None  # [f]
    down_bias: Tensor | None = None  # [d]
    q_norm: Tensor | None = None  # [l]; per-head query norm parameter (Qwen3, Gemma 3), copied, never folded
    k_norm: Tensor | None = None  # [l]
    attn_post_norm: Norm | None = None  # normalizes the attention output before it joins the residual (Gemma 3)
    mlp_post_norm: Norm | None = None  # normalizes the MLP output before it joins the residual (Gemma 3)


# Which canonical fields read the residual stream (through which norm) and which write to it.
READ_ROLES: dict[str, tuple[str, str]] = {  # weight -> (its bias, the norm in front of it)
    "q": ("q_bias", "attn_norm"),
    "k": ("k_bias", "attn_norm"),
    "v": ("v_bias", "attn_norm"),
    "up": ("up_bias", "mlp_norm"),
    "gate": ("gate_bias", "mlp_norm"),
}
WRITE_ROLES: dict[str, tuple[str, str]] = {  # weight -> (its bias, the post-norm on its output, where present)
    "o": ("o_bias", "attn_post_norm"),
    "down": ("down_bias", "mlp_post_norm"),
}


@dataclass
class ModelWeights:
    """A whole causal LM in canonical form."""

    embed: Tensor  # [V, d]
    blocks: list[BlockWeights]
    final_norm: Norm
    head: Tensor | None  # [d, V]; None when tied to `embed`
    positions: Tensor | None = None  # [L, d]; learned absolute positions (GPT-2) only
    embed_scale: float = 1.0  # block 1 reads embed * embed_scale (Gemma 3: sqrt(d), as the model computes it)


@dataclass(frozen=True)
class ModelShape:
    """The sizes that initialization changes, named after Hugging Face config keys."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int


def _copy(dst: Tensor, src: Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise RuntimeError(f"internal error: {name} has shape {tuple(src.shape)}, the model expects {tuple(dst.shape)}")
    dst.copy_(src)


class Adapter:
    """Base of the per-family adapters: reads/writes canonical weights and builds student configs."""

    model_types: ClassVar[tuple[str, ...]]
    norm: ClassVar[Literal["rms", "layer"]]
    rotary: ClassVar[bool]  # rotary position embeddings (head width must keep whole rotary pairs)
    grouped_kv: ClassVar[bool]  # supports fewer KV heads than query heads
    head_dim_from_width: ClassVar[bool]  # head width is hidden_size / num_heads, not a free config key

    def shape(self, config: PretrainedConfig) -> ModelShape:
        raise NotImplementedError

    def student_config(
        self, teacher: PretrainedConfig, shape: ModelShape, layers: Sequence[int] | None = None
    ) -> PretrainedConfig:
        """The student's config: the teacher's with the student's sizes, checked by the config class's own rules.

        Args:
            teacher: the teacher's config.
            shape: the student's shape.
            layers: the teacher block each student block is built from (default: the first N); per-layer attention
                kinds (sliding window or full) follow them.

        Raises:
            LmdistillError: the config class refuses the shape (e.g. llama: a width that is not a multiple of the
                head count), in one line.
        """
        try:
            config = self.resize(teacher, shape, list(range(shape.num_layers)) if layers is None else list(layers))
            if hasattr(config, "validate"):  # transformers' strict configs check again in save_pretrained
                config.validate()
        except StrictDataclassError as exc:
            reason = str(exc.__cause__ or exc).strip().splitlines()[-1].strip().rstrip(".")
            raise LmdistillError(
                f"transformers' {type(teacher).__name__} refuses this student shape: {reason}; change those sizes"
            ) from exc
        return config

    def resize(self, teacher: PretrainedConfig, shape: ModelShape, layers: list[int]) -> PretrainedConfig:
        """A copy of the teacher's config with the student's sizes, its blocks built from teacher blocks `layers`."""
        raise NotImplementedError

    def read(self, model: PreTrainedModel) -> ModelWeights:
        raise NotImplementedError

    def write(self, model: PreTrainedModel, weights: ModelWeights) -> None:
        raise NotImplementedError


class LlamaFamilyAdapter(Adapter):
    """Llama, Mistral, Qwen2 (q/k/v biases) and Qwen3 (per-head q/k norms): separate q/k/v/o, SwiGLU, RMSNorm."""

    model_types = ("llama", "mistral", "qwen2", "qwen3")
    norm = "rms"
    rotary = True
    grouped_kv = True
    head_dim_from_width = False
    norm_offset: ClassVar[float] = 0.0  # see `Norm`
    # canonical norm -> the decoder layer's module
    block_norms: ClassVar[dict[str, str]] = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}

    def shape(self, config: PretrainedConfig) -> ModelShape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return ModelShape(
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
        )

    def resize(self, teacher: PretrainedConfig, shape: ModelShape, layers: list[int]) -> PretrainedConfig:
        config = copy.deepcopy(teacher)
        config.hidden_size = shape.hidden_size
        config.num_hidden_layers = shape.num_layers
        config.num_attention_heads = shape.num_heads
        config.num_key_value_heads = shape.num_kv_heads
        config.head_dim = shape.head_dim  # explicit: hidden_size / num_heads no longer equals the teacher's width
        config.intermediate_size = shape.intermediate_size
        if getattr(config, "layer_types", None) is not None:  # per-layer attention kinds (Qwen2/3 sliding window)
            config.layer_types = [teacher.layer_types[i] for i in layers]
        if getattr(config, "max_window_layers", None) is not None:
            config.max_window_layers = min(config.max_window_layers, shape.num_layers)
        return config

    def read(self, model: PreTrainedModel) -> ModelWeights:
        shape = self.shape(model.config)
        d, h, hkv, hd = shape.hidden_size, shape.num_heads, shape.num_kv_heads, shape.head_dim
        blocks = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp

            def bias(linear, *heads: int) -> Tensor | None:
                return None if linear.bias is None else linear.bias.reshape(*heads)

            norms = {
                name: Norm(getattr(layer, module).weight, offset=self.norm_offset)
                for name, module in self.block_norms.items()
            }
            blocks.append(
                BlockWeights(
                    **norms,
                    q=attn.q_proj.weight.T.reshape(d, h, hd),
                    k=attn.k_proj.weight.T.reshape(d, hkv, hd),
                    v=attn.v_proj.weight.T.reshape(d, hkv, hd),
                    o=attn.o_proj.weight.T.reshape(h, hd, d),
                    q_bias=bias(attn.q_proj, h, hd),
                    k_bias=bias(attn.k_proj, hkv, hd),
                    v_bias=bias(attn.v_proj, hkv, hd),
                    o_bias=attn.o_proj.bias,
                    q_norm=attn.q_norm.weight if hasattr(attn, "q_norm") else None,
                    k_norm=attn.k_norm.weight if hasattr(attn, "k_norm") else None,
                    up=mlp.up_proj.weight.T,
                    gate=mlp.gate_proj.weight.T,
                    down=mlp.down_proj.weight.T,
                    up_bias=mlp.up_proj.bias,
                    gate_bias=mlp.gate_proj.bias,
                    down_bias=mlp.down_proj.bias,
                )
            )
        tied = model.config.tie_word_embeddings
        return ModelWeights(
            embed=model.model.embed_tokens.weight,
            blocks=blocks,
            final_norm=Norm(model.model.norm.weight, offset=self.norm_offset),
            head=None if tied else model.lm_head.weight.T,
            embed_scale=float(getattr(model.model.embed_tokens, "embed_scale", 1.0)),  # Gemma's scaled embedding
        )

    @torch.no_grad()
    def write(self, model: PreTrainedModel, weights: ModelWeights) -> None:
        _copy(model.model.embed_tokens.weight, weights.embed, "embed")
        for i, (layer, b) in enumerate(zip(model.model.layers, weights.blocks, strict=True)):
            attn, mlp = layer.self_attn, layer.mlp
            pairs = [
                (getattr(layer, module).weight, self._norm(b, name, i), name)
                for name, module in self.block_norms.items()
            ]
            pairs += [
                (attn.q_proj.weight, b.q.flatten(1).T, "q"),
                (attn.k_proj.weight, b.k.flatten(1).T, "k"),
                (attn.v_proj.weight, b.v.flatten(1).T, "v"),
                (attn.o_proj.weight, b.o.flatten(0, 1).T, "o"),
                (mlp.up_proj.weight, b.up.T, "up"),
                (mlp.gate_proj.weight, b.gate.T, "gate"),
                (mlp.down_proj.weight, b.down.T, "down"),
            ]
            optional = [
                (attn.q_proj.bias, b.q_bias, "q_bias"),
                (attn.k_proj.bias, b.k_bias, "k_bias"),
                (attn.v_proj.bias, b.v_bias, "v_bias"),
                (attn.o_proj.bias, b.o_bias, "o_bias"),
                (getattr(attn, "q_norm", None), b.q_norm, "q_norm"),
                (getattr(attn, "k_norm", None), b.k_norm, "k_norm"),
                (mlp.up_proj.bias, b.up_bias, "up_bias"),
                (mlp.gate_proj.bias, b.gate_bias, "gate_bias"),
                (mlp.down_proj.bias, b.down_bias, "down_bias"),
            ]
            for dst, src, name in optional:
                if (dst is None) != (src is None):
                    raise RuntimeError(f"internal error: block {i} {name} present on one side only")
                if dst is not None:
                    pairs.append((dst if isinstance(dst, Tensor) else dst.weight, src.flatten(), name))
            for dst, src, name in pairs:
                _copy(dst, src, f"block {i} {name}")
        _copy(model.model.norm.weight, self._norm(weights, "final_norm"), "final_norm")
        if weights.head is not None:
            _copy(model.lm_head.weight, weights.head.T, "head")

    def _norm(self, holder: BlockWeights | ModelWeights, name: str, block: int | None = None) -> Tensor:
        """The parameter of norm `name`, checked to have this family's parametrization."""
        norm = getattr(holder, name)
        if norm is None or norm.offset != self.norm_offset:
            where = name if block is None else f"block {block} {name}"
            raise RuntimeError(f"internal error: {where} is missing or not of the form x * ({self.norm_offset} + w)")
        return norm.weight


class Gemma3Adapter(LlamaFamilyAdapter):
    """Gemma 3 (text): the llama layout with embeddings scaled by sqrt(d), RMSNorms computing x · (1 + w), per-head
    q/k norms, a norm after attention and after the MLP as well as before each, GeGLU, sliding-window layers.

    Everything else in the config (query_pre_attn_scalar, sliding_window, soft-capping, rope bases) stays the
    teacher's; layer_types follow the teacher blocks the student's are built from.
    """

    model_types = ("gemma3_text",)
    norm_offset = 1.0
    block_norms = {
        "attn_norm": "input_layernorm",
        "attn_post_norm": "post_attention_layernorm",
        "mlp_norm": "pre_feedforward_layernorm",
        "mlp_post_norm": "post_feedforward_layernorm",
    }


class GPT2Adapter(Adapter):
    """GPT-2: fused `Conv1D` qkv (`[in, out]` layout), learned absolute positions, LayerNorm with bias, GELU MLP."""

    model_types = ("gpt2",)
    norm = "layer"
    rotary = False
    grouped_kv = False
    head_dim_from_width = True

    def shape(self, config: PretrainedConfig) -> ModelShape:
        return ModelShape(
            hidden_size=config.n_embd,
            num_layers=config.n_layer,
            num_heads=config.n_head,
            num_kv_heads=config.n_head,
            head_dim=config.n_embd // config.n_head,
            intermediate_size=config.n_inner or 4 * config.n_embd,
            vocab_size=config.vocab_size,
        )

    def resize(self, teacher: PretrainedConfig, shape: ModelShape, layers: list[int]) -> PretrainedConfig:
        config = copy.deepcopy(teacher)  # no per-layer settings: `layers` changes nothing
        config.n_embd = shape.hidden_size
        config.n_layer = shape.num_layers
        config.n_head = shape.num_heads
        config.n_inner = shape.intermediate_size
        return config

    def read(self, model: PreTrainedModel) -> ModelWeights:
        shape = self.shape(model.config)
        d, h, hd = shape.hidden_size, shape.num_heads, shape.head_dim
        blocks = []
        for layer in model.transformer.h:
            q, k, v = layer.attn.c_attn.weight.split(d, dim=1)  # [d, 3d] -> 3 x [d, d]
            qb, kb, vb = layer.attn.c_attn.bias.split(d)
            blocks.append(
                BlockWeights(
                    attn_norm=Norm(layer.ln_1.weight, layer.ln_1.bias),
                    q=q.reshape(d, h, hd),
                    k=k.reshape(d, h, hd),
                    v=v.reshape(d, h, hd),
                    o=layer.attn.c_proj.weight.reshape(h, hd, d),
                    q_bias=qb.reshape(h, hd),
                    k_bias=kb.reshape(h, hd),
                    v_bias=vb.reshape(h, hd),
                    o_bias=layer.attn.c_proj.bias,
                    mlp_norm=Norm(layer.ln_2.weight, layer.ln_2.bias),
                    up=layer.mlp.c_fc.weight,
                    up_bias=layer.mlp.c_fc.bias,
                    down=layer.mlp.c_proj.weight,
                    down_bias=layer.mlp.c_proj.bias,
                )
            )
        tied = model.config.tie_word_embeddings
        return ModelWeights(
            embed=model.transformer.wte.weight,
            positions=model.transformer.wpe.weight,
            blocks=blocks,
            final_norm=Norm(model.transformer.ln_f.weight, model.transformer.ln_f.bias),
            head=None if tied else model.lm_head.weight.T,
        )

    @torch.no_grad()
    def write(self, model: PreTrainedModel, weights: ModelWeights) -> None:
        t = model.transformer
        _copy(t.wte.weight, weights.embed, "embed")
        _copy(t.wpe.weight, weights.positions, "positions")
        for i, (layer, b) in enumerate(zip(t.h, weights.blocks, strict=True)):
            qkv_bias = torch.cat([b.q_bias.flatten(), b.k_bias.flatten(), b.v_bias.flatten()])
            for dst, src, name in [
                (layer.ln_1.weight, b.attn_norm.weight, "attn_norm"),
                (layer.ln_1.bias, b.attn_norm.bias, "attn_norm bias"),
                (layer.attn.c_attn.weight, torch.cat([b.q.flatten(1), b.k.flatten(1), b.v.flatten(1)], dim=1), "qkv"),
                (layer.attn.c_attn.bias, qkv_bias, "qkv bias"),
                (layer.attn.c_proj.weight, b.o.flatten(0, 1), "o"),
                (layer.attn.c_proj.bias, b.o_bias, "o bias"),
                (layer.ln_2.weight, b.mlp_norm.weight, "mlp_norm"),
                (layer.ln_2.bias, b.mlp_norm.bias, "mlp_norm bias"),
                (layer.mlp.c_fc.weight, b.up, "up"),
                (layer.mlp.c_fc.bias, b.up_bias, "up bias"),
                (layer.mlp.c_proj.weight, b.down, "down"),
                (layer.mlp.c_proj.bias, b.down_bias, "down bias"),
            ]:
                _copy(dst, src, f"block {i} {name}")
        _copy(t.ln_f.weight, weights.final_norm.weight, "final_norm")
        _copy(t.ln_f.bias, weights.final_norm.bias, "final_norm bias")
        if weights.head is not None:
            _copy(model.lm_head.weight, weights.head.T, "head")


ADAPTERS: tuple[Adapter, ...] = (LlamaFamilyAdapter(), Gemma3Adapter(), GPT2Adapter())


def adapter_for(config: PretrainedConfig) -> Adapter:
    """The adapter for a model's config.

    Args:
        config: a Hugging Face model config.

    Returns:
        The adapter whose `model_types` contains `config.model_type`.

    Raises:
        LmdistillError: the model type is not supported; the message lists the supported ones.
    """
    for adapter in ADAPTERS:
        if config.model_type in adapter.model_types:
            return adapter
    supported = ", ".join(sorted(t for a in ADAPTERS for t in a.model_types))
    raise LmdistillError(f"model type '{config.model_type}' is not supported; supported model types: {supported}")
