"""Student-shape derivation and the one-line errors for shapes initialization cannot map."""

from __future__ import annotations

import pytest
from conftest import tiny_config

from lmdistill.errors import LmdistillError
from lmdistill.models.adapters import adapter_for
from lmdistill.models.shape import derive_student_shape


def derive(kind: str, **sizes):
    config = tiny_config(kind)
    adapter = adapter_for(config)
    return derive_student_shape(adapter.shape(config), adapter, **sizes)


def test_unspecified_sizes_come_from_the_teacher():
    shape = derive("llama", hidden_size=16)
    assert (shape.hidden_size, shape.num_layers, shape.num_heads, shape.num_kv_heads) == (16, 3, 4, 2)
    assert (shape.head_dim, shape.intermediate_size, shape.vocab_size) == (8, 64, 96)
    assert derive("llama", num_heads=2).num_kv_heads == 1  # keeps the teacher's 2 query heads per KV head
    assert derive("gpt2", hidden_size=16).num_heads == 2  # GPT-2 head width is tied to the width: 16 / 8


@pytest.mark.parametrize(
    "kind, sizes, message",
    [
        (
            "llama",
            dict(hidden_size=64),
            r"--hidden-size 64 is larger than the teacher's 32; choose --hidden-size <= 32",
        ),
        ("llama", dict(num_layers=4), r"--num-layers 4 is larger than the teacher's 3"),
        ("llama", dict(num_heads=8), r"--num-heads 8 is larger than the teacher's 4"),
        ("llama", dict(intermediate_size=65), r"--intermediate-size 65 is larger than the teacher's 64"),
        ("llama", dict(head_dim=16), r"--head-dim 16 is larger than the teacher's 8"),
        ("llama", dict(num_heads=3, num_kv_heads=2), r"--num-heads 3 is not a multiple of --num-kv-heads 2"),
        ("llama", dict(num_heads=4, num_kv_heads=1), r"serve 4 query heads but a teacher KV head serves only 2.*>= 2"),
        ("llama", dict(num_heads=3), r"cannot derive --num-kv-heads.*pass --num-kv-heads"),
        ("llama", dict(num_kv_heads=3), r"--num-kv-heads 3 is larger than the teacher's 2"),
        ("llama", dict(head_dim=3), r"--head-dim 3 must be even: rotary"),
        ("gpt2", dict(hidden_size=16, num_heads=4), r"--hidden-size = --num-heads x head width \(4 x 8 = 32\), got 16"),
        ("gpt2", dict(num_heads=4, num_kv_heads=2), r"no grouped KV heads: --num-kv-heads must equal --num-heads"),
    ],
)
def test_bad_shapes_get_one_line_errors_that_say_what_to_change(kind, sizes, message):
    with pytest.raises(LmdistillError, match=message) as error:
        derive(kind, **sizes)
    assert "\n" not in str(error.value)


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import OPTConfig

    with pytest.raises(
        LmdistillError,
        match=r"model type 'opt' is not supported; supported model types: gemma3_text, gpt2, llama, mistral, qwen2, "
        r"qwen3$",
    ):
        adapter_for(OPTConfig())


def test_shapes_the_config_class_refuses_get_one_line_errors():
    config = tiny_config("llama", num_key_value_heads=1)
    adapter = adapter_for(config)
    shape = derive_student_shape(adapter.shape(config), adapter, num_heads=3, num_kv_heads=1)  # passes our own checks
    message = r"LlamaConfig refuses this student shape: The hidden size \(32\) is not a multiple of .* heads \(3\)"
    with pytest.raises(LmdistillError, match=message) as error:
        adapter.student_config(config, shape)
    assert "\n" not in str(error.value)
