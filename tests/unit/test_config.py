"""The strict config loader: defaults, YAML + overrides, coercion, one-line errors, round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moe_lm.config import Config, ModelConfig, config_from_dict, load_config, parse_overrides
from moe_lm.errors import ConfigError, UserError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
TINY_YAML = """\
name: unit
model:
  vocab_size: 256
  hidden_size: 64
  intermediate_size: 96
  num_layers: 2
  num_heads: 4
  num_kv_heads: 2
  max_seq_len: 128
  num_experts: 4
  top_k: 2
data:
  seq_len: 64
"""


@pytest.fixture
def tiny_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "unit.yaml"
    path.write_text(TINY_YAML)
    return path


def _error(data: dict | None = None, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data or {}, overrides)
    message = str(info.value)
    assert "\n" not in message  # one line, always
    return message


def test_defaults_load() -> None:
    cfg = config_from_dict({})
    assert cfg == Config()
    assert cfg.model.num_experts == 8 and cfg.model.top_k == 2 and cfg.model.capacity_factor is None
    assert cfg.model.resolved_head_dim == 4096 // 32
    assert cfg.output_dir == Path("runs/run")
    assert issubclass(ConfigError, UserError)  # the CLI turns it into exit code 2


def test_yaml_and_overrides(tiny_yaml: Path) -> None:
    cfg = load_config(tiny_yaml, ["train.max_steps=5", "optim.lr=1e-3", "model.capacity_factor=1.5"])
    assert cfg.name == "unit" and cfg.model.hidden_size == 64 and cfg.data.seq_len == 64
    assert cfg.train.max_steps == 5
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.model.capacity_factor == 1.5
    assert cfg.train.micro_batch_size == Config().train.micro_batch_size  # untouched keys keep defaults


def test_name_defaults_to_file_stem(tmp_path: Path) -> None:
    path = tmp_path / "my-run.yaml"
    path.write_text("train:\n  max_steps: 3\n")
    assert load_config(path).name == "my-run"


def test_override_lists_and_null(tiny_yaml: Path) -> None:
    cfg = load_config(
        tiny_yaml,
        [
            "data.train_files=[a.txt, b.txt]",
            "data.val_files=c.txt",
            "train.output_dir=null",
            "model.capacity_factor=null",
            "train.resume=",
        ],
    )
    assert cfg.data.train_files == ["a.txt", "b.txt"]
    assert cfg.data.val_files == ["c.txt"]  # a scalar where a list is expected becomes a list of one
    assert cfg.train.output_dir is None and cfg.model.capacity_factor is None and cfg.train.resume is None
    cfg = load_config(tiny_yaml, ["train.output_dir=runs/x", "model.capacity_factor=2"])
    assert cfg.train.output_dir == "runs/x" and cfg.model.capacity_factor == 2.0


def test_override_value_with_equals_sign(tiny_yaml: Path) -> None:
    assert load_config(tiny_yaml, ["train.sample_prompt=a=b"]).train.sample_prompt == "a=b"
    assert parse_overrides(["x.y=1", "x.z=true", "x.w=[1, 2]"]) == [
        ("x.y", 1),
        ("x.z", True),
        ("x.w", [1, 2]),
    ]


def test_int_to_float_coercion() -> None:
    cfg = config_from_dict({"model": {"rope_theta": 10000, "capacity_factor": 1}, "optim": {"lr": 1}})
    assert type(cfg.model.rope_theta) is float and cfg.model.rope_theta == 10000.0
    assert type(cfg.model.capacity_factor) is float and type(cfg.optim.lr) is float
    # PyYAML (YAML 1.1) reads "3e-4" (no dot) as a string; the loader still gets a number.
    cfg = config_from_dict(yaml.safe_load("optim:\n  lr: 3e-4\n"))
    assert cfg.optim.lr == pytest.approx(3e-4)
    # integral floats are accepted for ints (1e3 steps), fractional ones are not
    assert config_from_dict({"train": {"max_steps": 1000.0}}).train.max_steps == 1000


@pytest.mark.parametrize(
    ("data", "overrides", "expected"),
    [
        ({"model": {"num_expert": 4}}, None, "did you mean 'model.num_experts'"),
        ({"modle": {}}, None, "did you mean 'model'"),
        ({}, ["optim.learning_rat=1"], "unknown config key 'optim.learning_rat'"),
        ({}, ["trian.max_steps=1"], "did you mean 'train'"),
        ({"name": "x"}, ["name.sub=1"], "'name' is not a section"),
    ],
)
def test_unknown_key_suggests(data: dict, overrides: list[str] | None, expected: str) -> None:
    assert expected in _error(data, overrides)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.max_steps=abc"], "train.max_steps"),
        (["train.max_steps=2.5"], "train.max_steps"),
        (["model.tie_embeddings=1"], "model.tie_embeddings"),  # bools are strict: 1 is not true
        (["model.num_experts=true"], "model.num_experts"),  # and true is not 1
        (["optim.lr=fast"], "optim.lr"),
        (["optim.schedule=cosin"], "optim.schedule"),  # not one of the literals
        (["data.train_files={a: 1}"], "data.train_files"),
        (["model=5"], "model: expected a mapping"),
    ],
)
def test_wrong_type_names_key(overrides: list[str], key: str) -> None:
    assert key in _error({}, overrides)


def test_bad_override_syntax() -> None:
    assert "key.sub=value" in _error({}, ["train.max_steps"])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.top_k=9"], "model.top_k"),  # 8 experts by default
        (["model.hidden_size=100", "model.num_heads=6"], "model.num_heads"),
        (["model.num_heads=4", "model.num_kv_heads=3"], "model.num_kv_heads"),
        (["parallel.ep_size=3"], "parallel.ep_size"),
        (["parallel.ep_size=0"], "parallel.ep_size"),
        (["model.hidden_size=0"], "model.hidden_size"),
        (["model.num_layers=-1"], "model.num_layers"),
        (["model.num_experts=0", "model.top_k=0"], "model.num_experts"),
        (["data.seq_len=0"], "data.seq_len"),
        (["train.micro_batch_size=-4"], "train.micro_batch_size"),
        (["optim.lr=0"], "optim.lr"),
        (["model.capacity_factor=0"], "model.capacity_factor"),
        (["model.num_shared_experts=-1"], "model.num_shared_experts"),
        (["parallel.backend=deepspeed", "parallel.zero_stage=3", "parallel.ep_size=2"], "zero_stage = 3"),
        (["parallel.backend=deepspeed", "parallel.zero_stage=3", "parallel.ep_size=1"], "defeats expert"),
        (["parallel.zero_stage=1"], "parallel.backend"),  # ZeRO needs DeepSpeed
        (["data.seq_len=8192"], "model.max_seq_len"),  # default max_seq_len 4096
        (["train.resume=latest", "train.init_from=runs/x/ckpt"], "train.init_from"),
        (["model.router_jitter=1.5"], "model.router_jitter"),
        (["optim.beta2=1.0"], "optim.beta2"),
        (["data.train_files=[]"], "data.train_files"),
        (["hub.push_at_end=true"], "hub.repo_id"),
    ],
)
def test_impossible_combinations(overrides: list[str], expected: str) -> None:
    assert expected in _error({}, overrides)


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "1e30", "1e10", "abc"])
def test_parallel_timeout_outside_what_torch_can_wait_is_one_line(value: str) -> None:
    """1e30 overflowed timedelta in every process (a traceback, exit 1) and 1e10 wrapped torch's
    nanosecond deadlines: joining the process group "timed out" at once (exit 3)."""
    assert _error({}, [f"parallel.timeout={value}"]).startswith("parallel.timeout")


def test_parallel_timeout_up_to_its_limit_is_accepted() -> None:
    assert config_from_dict({}, ["parallel.timeout=1e8"]).parallel.timeout == 1e8


def test_possible_neighbours_of_impossible_combinations() -> None:
    # The boundaries are exact: these are allowed.
    cfg = config_from_dict(
        {},
        [
            "model.top_k=8",
            "parallel.ep_size=8",
            "data.seq_len=4096",
            "parallel.backend=deepspeed",
            "parallel.zero_stage=2",
            "parallel.ep_size=1",
        ],
    )
    assert cfg.model.top_k == 8 and cfg.parallel.zero_stage == 2
    cfg = config_from_dict(
        {}, ["model.hidden_size=100", "model.num_heads=6", "model.num_kv_heads=3", "model.head_dim=16"]
    )
    assert cfg.model.resolved_head_dim == 16  # an explicit head_dim lifts the divisibility rule
    assert (
        config_from_dict(
            {}, ["parallel.backend=deepspeed", "parallel.zero_stage=2", "parallel.ep_size=4"]
        ).parallel.ep_size
        == 4
    )


def test_overrides_do_not_mutate_callers_dict() -> None:
    # Regression: overrides were written into the caller's nested section dicts.
    data = {"model": {"top_k": 2}, "train": {"max_steps": 10}}
    cfg = config_from_dict(data, ["model.top_k=1", "train.max_steps=3"])
    assert cfg.model.top_k == 1 and cfg.train.max_steps == 3
    assert data == {"model": {"top_k": 2}, "train": {"max_steps": 10}}


def test_integer_in_exponent_notation_is_accepted() -> None:
    # Regression: YAML reads 1e3 as a string, which was refused for an int key.
    assert config_from_dict({}, ["train.max_steps=1e3"]).train.max_steps == 1000
    with pytest.raises(ConfigError, match="train.max_steps: expected an integer"):
        config_from_dict({}, ["train.max_steps=1.5e0"])


def _roundtrip(cfg: Config) -> Config:
    return config_from_dict(yaml.safe_load(cfg.to_yaml()))


def test_resolved_config_round_trips(tiny_yaml: Path) -> None:
    cfg = load_config(
        tiny_yaml,
        [
            "data.train_files=[a.txt, b.txt]",
            "model.capacity_factor=1.25",
            "model.rms_norm_eps=1e-6",
            "train.output_dir=runs/rt",
            "optim.schedule=linear",
            "model.head_dim=32",
            "train.resume=latest",
        ],
    )
    again = _roundtrip(cfg)
    assert again == cfg and again.to_yaml() == cfg.to_yaml()
    assert _roundtrip(Config()) == Config()
    paths = sorted(CONFIG_DIR.glob("*.yaml"))  # anchored: from another working directory the loop was empty
    assert "tiny-shakespeare.yaml" in [p.name for p in paths]
    for path in paths:
        shipped = load_config(path)
        assert _roundtrip(shipped) == shipped, path


def test_model_config_helpers() -> None:
    m = ModelConfig(num_layers=6, moe_layer_freq=2, first_dense_layers=2, moe_intermediate_size=512)
    # layer i is MoE when i >= first_dense_layers and (i + 1) % freq == 0
    assert m.moe_layer_indices == [3, 5]
    assert m.expert_intermediate_size == 512 and ModelConfig().expert_intermediate_size == 14336


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("model:\n  hidden_size: 64\n bad: 2\n", 3),
        ("train:\n  max_steps: 3\n\tseed: 1\n", 3),
        ("name: x\nmodel:\n  hidden_size: 64\n  top_k: [1, 2\n", 4),  # was 5, past the end of the file
    ],
)
def test_malformed_yaml_reports_line(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"not valid YAML: .*\bline {line}\b") as info:
        load_config(path)
    assert "\n" not in str(info.value) and "bad.yaml" in str(info.value)


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty).model == ModelConfig()  # an empty file is all defaults


MIXTURE = {
    "data": {
        "sources": {
            "web": {"files": ["web/*.jsonl"], "weight": 3},
            "code": {
                "dataset": "someone/code",
                "text_field": "content",
                "streaming": True,
                "val_files": ["c.txt"],
            },
        },
        "val_sources": {"wiki": {"files": ["wiki.txt"]}},
    }
}


def test_sources_are_named_entries_reachable_by_overrides() -> None:
    cfg = config_from_dict(MIXTURE, ["data.sources.web.weight=2", "data.sources.books.files=[b.txt]"])
    assert list(cfg.data.sources) == ["web", "code", "books"]  # YAML order, then overrides
    assert cfg.data.sources["web"].weight == 2.0 and cfg.data.sources["books"].files == ["b.txt"]
    assert cfg.data.sources["code"].streaming and cfg.data.val_sources["wiki"].files == ["wiki.txt"]
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg  # round-trips through the resolved YAML


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["data.sources.web.wieght=2"],
            "unknown config key 'data.sources.web.wieght'; did you mean 'data.sources.web.weight'?",
        ),
        (["data.sources.web.weight=0"], "data.sources.web.weight = 0.0 must be > 0"),
        (["data.sources.web.weight=-1"], "data.sources.web.weight = -1.0 must be > 0"),
        (["data.sources.web=3"], "data.sources.web: expected a mapping of keys"),
        (["data.sources=[a.txt]"], "data.sources: expected a mapping of names to entries"),
        (["data.sources.web.dataset=x"], "data.sources.web: set either files or dataset"),
        (["data.sources.web.files=[]"], "data.sources.web: set either files or dataset"),
        (["data.sources.web.streaming=true"], "data.sources.web.streaming reads a dataset"),
        (
            ["data.sources.code.val_fraction=0.1"],
            "data.sources.code.val_fraction: a streaming source has no tail",
        ),
        (["data.sources.web.val_fraction=1"], "data.sources.web.val_fraction = 1.0 must be in [0, 1)"),
        (["data.sources.we/b.files=[a]"], "source name 'we/b' must be letters"),
        (["data.train_files=[a.txt]"], "data.train_files / data.val_files and data.sources are exclusive"),
        (["data.val_sources.web.files=[v.txt]"], "data.val_sources.web: the name is taken"),
        (
            ["data.val_sources.wiki.weight=2"],
            "data.val_sources.wiki.weight has no meaning for a validation set",
        ),
    ],
)
def test_bad_sources_name_the_key(overrides: list[str], expected: str) -> None:
    assert expected in _error(MIXTURE, overrides)


YAML_ERRORS = [
    # the bug: "at line 2" of a 1-line file, and nothing about the bracket
    ("model: [1,\n", "the '[' at line 1, column 8 is never closed (the file ends)"),
    (
        "name: x\ntrain: {max_steps: 3\nmodel: {}\n",
        "the '{' at line 2, column 8 is never closed (expected ',' or '}' but got ':' at line 3)",
    ),
    (
        "model:\n  hidden_size: 64\n  num_layers: [2, 3\ntrain: {}\n",
        "the '[' at line 3, column 15 is never closed (expected ',' or ']' but got ':' at line 4)",
    ),
    ('name: "abc\nmodel: {}\n', "the quote at line 1, column 7 is never closed (the file ends)"),
    ("name: don't\nmodel: {a: 1\n", "the '{' at line 2, column 8 is never closed (the file ends)"),
    ("model:\n  a: 1\n   b: 2\n", "mapping values are not allowed here at line 3, column 5"),
    ("model:\n\tb: 2\n", r"found character '\t' that cannot start any token at line 2, column 1"),
]


@pytest.mark.parametrize(("text", "expected"), YAML_ERRORS)
def test_yaml_syntax_errors_name_the_line_and_what_is_unclosed(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message == f"config file '{path}' is not valid YAML: {expected}; fix the syntax"


def test_warmup_as_long_as_the_run_warns() -> None:
    from moe_lm.validation import config_warnings

    cfg = config_from_dict({"optim": {"lr": 1e-3, "warmup_steps": 100}, "train": {"max_steps": 10}})
    (line,) = config_warnings(cfg)
    assert line.startswith("warning: optim.warmup_steps = 100 ≥ train.max_steps = 10")
    assert "at lr 0.0001 instead of optim.lr = 0.001" in line and "lower optim.warmup_steps" in line
    assert config_warnings(config_from_dict({"optim": {"warmup_steps": 9}, "train": {"max_steps": 10}})) == []
