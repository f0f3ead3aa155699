"""The config package: every shipped config loads and validates, shared fields with per-command defaults, the range
check helper, and the engine settings that rationale training builds from the shared bases."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from lmdistill.cli import COMMANDS, main, parse_config
from lmdistill.config import (
    Engine,
    EngineRun,
    Optimizer,
    RationaleStudyConfig,
    RationaleTrainConfig,
    StudentRun,
    StudyConfig,
    TrainConfig,
    check_ranges,
    fields_of,
    load_yaml,
    override,
    to_yaml,
)
from lmdistill.errors import LmdistillError
from lmdistill.rationales.tasks import SHARED_DATA_ENV

ROOT = Path(__file__).resolve().parents[1]
# configs/<file> -> the config class it is written for; a new shipped config needs its entry here
SHIPPED_CONFIGS = {
    "demo.yaml": StudyConfig,
    "study-smollm2.yaml": StudyConfig,
    "study-smollm2-gpu.yaml": StudyConfig,
    "study-budgets.yaml": StudyConfig,
    "rationales-svamp-cqa.yaml": RationaleStudyConfig,
    "rationales-svamp-ws12.yaml": RationaleStudyConfig,
    "rationales-esnli.yaml": RationaleStudyConfig,
}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates_without_the_shared_data(path, tmp_path, monkeypatch):
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path / "absent"))  # validation must not read task data
    config_class = SHIPPED_CONFIGS[path.name]
    config = config_class(**load_yaml(path, config_class))  # __post_init__ validates, its stages' configs included
    assert config_class(**yaml.safe_load(to_yaml(config))) == config
    assert set(yaml.safe_load(path.read_text())) <= set(vars(config))


def test_a_shared_field_has_each_commands_default_and_help_in_its_place(capsys, monkeypatch):
    train = {f.name: f for f in dataclasses.fields(TrainConfig)}
    study = {f.name: f for f in dataclasses.fields(StudyConfig)}
    rationale = {f.name: f for f in dataclasses.fields(RationaleTrainConfig)}
    assert (train["lr"].default, study["lr"].default, rationale["lr"].default) == (1e-3, 2e-3, 3e-4)
    assert (train["warmup_steps"].default, study["warmup_steps"].default) == (0, 4)
    assert train["lr"].metadata == study["lr"].metadata == rationale["lr"].metadata
    assert train["batch_size"].metadata["help"] == "sequences per micro-batch per process"
    assert rationale["batch_size"].metadata["help"] == "examples per micro-batch per process (1-2 sequences each)"
    assert study["kd_weight"].default == 1.0 and study["kd_loss"].metadata["help"] == "divergence of the kd arms"
    # the flags and --help follow: each command parses its own default
    assert parse_config(StudyConfig, ["--out", "o"], prog="study").lr == 2e-3
    assert parse_config(TrainConfig, ["--student", "s", "--out", "o"], prog="train").lr == 1e-3
    monkeypatch.setenv("COLUMNS", "200")
    for command, default in (("train", "0.001"), ("study", "0.002"), ("rationales train", "0.0003")):
        with pytest.raises(SystemExit, match="0"):
            main([*command.split(), "--help"])
        assert f"--lr LR               peak learning rate (AdamW) (default: {default})\n" in capsys.readouterr().out
    for config_class, _, _ in COMMANDS.values():  # a shared field keeps its base's type in every command
        names = [f.name for f in dataclasses.fields(config_class)]
        optimizer = [f.name for f in dataclasses.fields(Optimizer)]
        if set(optimizer) <= set(names):
            assert names[names.index("lr") : names.index("lr") + len(optimizer)] == optimizer


def test_override_copies_a_list_default_per_instance_and_keeps_the_type():
    @dataclass
    class Base:
        items: list[int] = field(default_factory=list, metadata={"help": "items"})
        size: int = field(default=1, metadata={"help": "size"})

    @dataclass
    @override(items=[1, 2], help={"size": "the size"})
    class Child(Base):
        extra: bool = False

    a, b = Child(), Child()
    a.items.append(3)
    assert (b.items, b.size, Base().items) == ([1, 2], 1, [])
    size = {f.name: f for f in dataclasses.fields(Child)}["size"]
    assert (size.type, size.metadata["help"]) == (int, "the size")
    assert [f.name for f in dataclasses.fields(Child)] == ["items", "size", "extra"]


@dataclass
class _Ranges:
    count: int | None = 1
    share: float = 0.5


@pytest.mark.parametrize(
    "bounds, values, message",
    [
        ((1,), {"count": 0}, "--count must be at least 1, got 0"),
        ((0,), {"count": -1}, "--count must be non-negative, got -1"),
        ((0, 1), {"share": 1.5}, r"--share must be in \[0, 1\], got 1.5"),
        ((0, 1), {"count": 2}, r"--count must be in \[0, 1\], got 2"),
    ],
)
def test_check_ranges_names_the_flag_and_its_range(bounds, values, message):
    with pytest.raises(LmdistillError, match=f"^{message}$"):
        check_ranges(_Ranges(**values), ["count", "share"], *bounds)
    with pytest.raises(LmdistillError, match=r"^--share must be in \(0, 1\), got 1$"):
        check_ranges(_Ranges(share=1), ["share"], 0, 1, exclusive=True)
    check_ranges(_Ranges(count=None), ["count"], 1)  # None is unset: valid


def test_rationale_training_hands_the_engine_its_shared_bases():
    config = RationaleTrainConfig(student="s", out="o", rationales="r", lr=0.01, max_len=64, max_steps=7, seed=3,
                                  fsdp=True, precision="fp32", val_fraction=0.2)  # fmt: skip
    engine = config.engine_config()
    assert fields_of(engine, StudentRun, Engine, EngineRun) == fields_of(config, StudentRun, Engine, EngineRun)
    assert (engine.seq_len, engine.val_fraction, engine.lr, engine.seed) == (64, 0.2, 0.01, 3)
    assert (engine.loss, engine.teacher, engine.data) == ("ce", None, None)  # the other fields: TrainConfig's own
