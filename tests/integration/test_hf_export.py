"""`moe-lm export | import | upcycle | stats` end to end, checked through transformers loading the result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from moe_lm.cli import main
from moe_lm.config import Config, config_from_dict
from moe_lm.model import MoETransformer
from moe_lm.state.manifest import write_manifest
from moe_lm.state.weights import load_pretrained, save_weights
from tests.integration.conftest import run_config_dict

STEP = 6
# Weights scaled up from the 0.02 default so logits are of order 1 and routing is peaked: parity
# between near-zero logits would prove nothing.
INIT_STD = 0.1
# bf16 export vs our fp32 model: measured mean |logit diff| ~0.008 on logits of std ~0.7 (bf16
# keeps 8 mantissa bits); the tolerance leaves headroom for other seeds.
BF16_MEAN_ATOL = 0.03


def _expert_load(model: MoETransformer, ids: torch.Tensor) -> list[list[float]]:
    with torch.no_grad():
        counts = model(ids).expert_counts_LE
    assert counts is not None
    return (counts.float() / counts.sum(-1, keepdim=True)).tolist()


def make_checkpoint(run: Path, cfg: Config, ep_size: int = 2) -> tuple[Path, MoETransformer]:
    """A run dir as the trainer leaves it: EP-sharded weights, trainer_state.json, metrics.jsonl, latest."""
    torch.manual_seed(0)
    model = MoETransformer(cfg.model).eval()
    ckpt = run / "checkpoints" / f"step-{STEP}"
    ckpt.mkdir(parents=True)
    (ckpt / "config.yaml").write_text(cfg.to_yaml())
    per = cfg.model.num_experts // ep_size
    for r in range(ep_size):  # each EP rank holds its slice of every expert tensor
        shard = {
            k: v[r * per : (r + 1) * per] if ".experts." in k else v for k, v in model.state_dict().items()
        }
        save_weights(ckpt, shard, ep_rank=r, ep_size=ep_size, expert_offset=r * per)
    records = []
    for step in (2, 4, STEP):
        ids = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(step))
        load = _expert_load(model, ids)
        records.append(
            {
                "kind": "train",
                "step": step,
                "tokens": step * 128,
                "loss": 5.0 - 0.1 * step,
                "lm_loss": 4.9 - 0.1 * step,
                "aux_loss": 1.05,
                "hf_aux_loss": 2.1,
                "z_loss": 3.0,
                "lr": 1e-3,
                "grad_norm": 1.0,
                "tokens_per_s": 1000.0,
                "mfu": 0.01,
                "expert_load": load,
                "imbalance": [max(row) * len(row) for row in load],
                "dropped_frac": 0.0,
            }
        )
    records.append({"kind": "eval", "step": STEP, "val_loss": 4.5, "val_ppl": math.exp(4.5)})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    state = {"step": STEP, "tokens": STEP * 128, "last_metrics": records[-2], "val_loss": 4.5}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    write_manifest(ckpt)  # as the trainer does: eval/export only trust verified checkpoints
    (run / "checkpoints" / "latest").write_text(ckpt.name)
    return ckpt, model


@pytest.fixture(scope="module")
def trained(
    corpus: Path, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, MoETransformer]:
    run = tmp_path_factory.mktemp("export") / "run"
    cfg = config_from_dict(run_config_dict(corpus, tokenizer_dir, run, model={"init_std": INIT_STD}))
    return make_checkpoint(run, cfg)


@pytest.fixture(scope="module")
def exported(trained: tuple[Path, MoETransformer]) -> Path:
    ckpt, _ = trained
    out = ckpt.parents[2] / "hf-fp32"
    assert main(["export", str(ckpt.parents[1]), "--out", str(out), "--dtype", "fp32"]) == 0
    return out


def _hf(path: Path, **kwargs: object) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **kwargs).eval()


def _ids(path: Path, tokenizer_dir: Path) -> torch.Tensor:
    """Real text through the exported tokenizer; its ids must be our sentencepiece ids."""
    from transformers import AutoTokenizer

    from moe_lm.data.tokenizer import Tokenizer

    text = (Path(__file__).resolve().parents[2] / "data" / "tinyshakespeare.txt").read_text()[5000:5600]
    ids = AutoTokenizer.from_pretrained(str(path), local_files_only=True)(text)["input_ids"]
    assert ids == Tokenizer.load(tokenizer_dir).encode(text)
    return torch.tensor([ids[:64], ids[64:128]])


def test_fp32_export_reloads_with_same_logits_perplexity_and_greedy_tokens(
    trained: tuple[Path, MoETransformer], exported: Path, tokenizer_dir: Path
) -> None:
    _, ours = trained
    hf = _hf(exported)
    assert type(hf).__name__ == "MixtralForCausalLM" and hf.dtype == torch.float32
    ids = _ids(exported, tokenizer_dir)
    labels = torch.cat((ids[:, 1:], torch.full((2, 1), -100)), dim=1)
    with torch.no_grad():
        out = ours(ids, labels=labels)
        ref = hf(ids, labels=ids, use_cache=False)
    assert out.logits is not None and out.lm_loss is not None
    diff = (out.logits - ref.logits).abs().max().item()
    ppl_ours, ppl_hf = math.exp(out.lm_loss.item()), math.exp(ref.loss.item())
    print(
        f"\n[export fp32] max|logit diff| {diff:.3e}; perplexity ours {ppl_ours:.4f} transformers {ppl_hf:.4f}"
    )
    assert diff < 1e-4
    assert ppl_hf == pytest.approx(ppl_ours, rel=1e-5)
    prompt = ids[:1, :8]
    mine = ours.generate(prompt, max_new_tokens=8, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(mine, theirs)


def test_export_folder_contents_and_model_card(exported: Path) -> None:
    names = {p.name for p in exported.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "README.md",
        "expert_load.png",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
    } <= names
    assert not any(n.startswith(".") for n in names)
    gen = json.loads((exported / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    readme = (exported / "README.md").read_text()
    meta = yaml.safe_load(readme.split("---")[1])
    assert meta["library_name"] == "transformers" and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation" and meta["tags"] == ["moe", "mixtral", "moe_lm"]
    # a local file is not a Hub dataset id (the Hub would link a dataset that does not exist)
    assert "datasets" not in meta
    assert "- corpus: `shakespeare.txt` (local files, not published with this model)" in readme
    assert "](expert_load.png)" in readme and (exported / "expert_load.png").stat().st_size > 1000
    for fact in (
        "## Intended use and limitations",
        "not instruction-tuned",
        "Context: 64 tokens by configuration (trained on sequences of 32)",
        "| layers | 2 |",
        "4 / top-2",
        # the coefficient in config.json is explained, with the numbers of this model
        "`num_experts_per_tok` = 2 and `router_aux_loss_coef` = 0.005 on purpose",
        "Pretraining used coefficient 0.01",
        "| steps | 6 |",
        "validation loss (step 6) | 4.5000",
        "| layer 1 |",
        'from_pretrained("PATH_TO_THIS_FOLDER")',
        'tokenizer("ROMEO:", return_tensors="pt")',
    ):
        assert fact in readme, fact
    hf_config = json.loads((exported / "config.json").read_text())
    assert (hf_config["router_aux_loss_coef"], hf_config["num_experts_per_tok"]) == (0.005, 2)
    # the tokenizer's length limit is the model's context, not transformers' 1e30 "unset"
    from transformers import AutoTokenizer

    assert json.loads((exported / "tokenizer_config.json").read_text())["model_max_length"] == 64
    assert AutoTokenizer.from_pretrained(str(exported), local_files_only=True).model_max_length == 64


def test_model_card_names_hub_datasets_in_metadata_and_files_in_the_text(tmp_path: Path) -> None:
    from moe_lm.analysis.records import RunRecords
    from moe_lm.hf.model_card import render_model_card

    (tmp_path / "saved").mkdir()
    cfg = config_from_dict(
        {
            "data": {
                "sources": {
                    "web": {"dataset": "HuggingFaceFW/fineweb", "streaming": True, "val_fraction": 0.0},
                    "books": {"files": ["/data/books/*.txt"], "weight": 2},
                    "mine": {"dataset": str(tmp_path / "saved")},  # a save_to_disk directory
                },
                "val_sources": {"v": {"files": ["v.txt"]}},
            }
        }
    )
    card = render_model_card(cfg, RunRecords(), has_heatmap=False, repo_id="alice/m")
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["datasets"] == ["HuggingFaceFW/fineweb"]
    assert (
        "- web (weight 1): [HuggingFaceFW/fineweb](https://huggingface.co/datasets/HuggingFaceFW/fineweb)"
        in card
    )
    assert "- books (weight 2): `*.txt` (local files, not published with this model)" in card
    assert f"`{tmp_path / 'saved'}` (local files" in card
    assert 'from_pretrained("alice/m")' in card and "\n# alice/m\n" in card


def test_heatmap_numbers_every_cell_and_labels_every_expert() -> None:
    import matplotlib.pyplot as plt

    from moe_lm.analysis.expert_load import latest_figure

    load = [[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25]]
    fig = latest_figure(load, "expert load at step 6", [0, 1])
    ax = fig.axes[0]
    cells = sorted(t.get_text() for t in ax.texts)
    assert cells == sorted(["50.0", "25.0", "12.5", "12.5", "25.0", "25.0", "25.0", "25.0"])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["e0", "e1", "e2", "e3"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["layer 0", "layer 1"]
    plt.close(fig)


def test_bf16_export_is_our_weights_rounded_and_runs_close(
    trained: tuple[Path, MoETransformer], tmp_path: Path
) -> None:
    from moe_lm.hf.convert import from_hf_state_dict

    ckpt, ours = trained
    out = tmp_path / "hf-bf16"
    assert main(["export", str(ckpt), "--out", str(out)]) == 0  # bf16 is the default
    hf = _hf(out)
    assert hf.dtype == torch.bfloat16
    # The files hold exactly our weights rounded to bf16 ...
    back = from_hf_state_dict(hf.state_dict(), ours.cfg)
    assert all(torch.equal(back[k], v.to(torch.bfloat16)) for k, v in ours.state_dict().items())
    # ... and the bf16 model tracks our fp32 one. Rounding flips near-tied top-k choices for a few
    # tokens, whose logits then move by up to ~1 (as in any bf16 MoE), so the tolerance is on the
    # mean difference and on next-token agreement; the maximum is printed, not asserted.
    ids = torch.randint(0, 384, (4, 64))
    with torch.no_grad():
        a, b = ours(ids).logits, hf(ids, use_cache=False).logits.float()
    diff = (a - b).abs()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    print(
        f"\n[export bf16] vs our fp32 model: mean|logit diff| {diff.mean().item():.3e}, max {diff.max().item():.3e}, "
        f"next-token argmax agreement {agree:.3f} (logit std {a.std().item():.2f})"
    )
    assert diff.mean().item() < BF16_MEAN_ATOL and agree >= 0.9


def test_sharded_export_writes_an_index_and_reloads(
    trained: tuple[Path, MoETransformer], tmp_path: Path
) -> None:
    ckpt, ours = trained
    out = tmp_path / "sharded"
    assert main(["export", str(ckpt), "--out", str(out), "--dtype", "fp32", "--max-shard-size", "200KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    ids = torch.randint(0, 384, (1, 16))
    with torch.no_grad():
        assert (ours(ids).logits - _hf(out)(ids, use_cache=False).logits).abs().max() < 1e-4


def test_import_gives_back_the_exact_weights(
    trained: tuple[Path, MoETransformer], exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from moe_lm.state.resolve import resolve_resume

    _, ours = trained
    out = tmp_path / "imported"
    assert main(["import", str(exported), "--out", str(out)]) == 0
    cfg, model = load_pretrained(out)
    assert cfg.model == ours.cfg
    mine = ours.state_dict()
    assert all(torch.equal(model.state_dict()[k], mine[k]) for k in mine)
    assert resolve_resume(str(out), tmp_path) == out  # train.init_from accepts it (manifest verifies)
    # --config supplies everything but the architecture; a conflicting architecture key is refused.
    run_cfg = yaml.safe_load((trained[0] / "config.yaml").read_text())
    run_cfg["model"] = {"z_loss_coef": 0.005}
    run_cfg["optim"]["lr"] = 1e-4
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_cfg))
    assert (
        main(["import", str(exported), "--out", str(tmp_path / "with-config"), "--config", str(config)]) == 0
    )
    cfg2, _ = load_pretrained(tmp_path / "with-config")
    assert cfg2.optim.lr == 1e-4 and cfg2.model.z_loss_coef == 0.005 and cfg2.model.hidden_size == 48
    run_cfg["model"] = {"hidden_size": 64}
    config.write_text(yaml.safe_dump(run_cfg))
    assert main(["import", str(exported), "--out", str(tmp_path / "bad"), "--config", str(config)]) == 2
    assert "model.hidden_size = 64" in capsys.readouterr().err


def test_refusals_and_overwrite_rules(
    trained: tuple[Path, MoETransformer],
    exported: Path,
    corpus: Path,
    tokenizer_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt, _ = trained
    for option, value in (
        ("num_shared_experts", 1),
        ("aux_free_bias", True),
        ("moe_layer_freq", 2),
        ("first_dense_layers", 1),
        ("capacity_factor", 1.5),
    ):
        run = tmp_path / option
        cfg = config_from_dict(run_config_dict(corpus, tokenizer_dir, run, model={option: value}))
        make_checkpoint(run, cfg, ep_size=1)
        capsys.readouterr()
        assert main(["export", str(run), "--out", str(tmp_path / f"out-{option}")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and f"model.{option}" in err and "\n" not in err
        assert not (tmp_path / f"out-{option}").exists()
    run = tmp_path / "no-tokenizer"  # exports without tokenizer files, saying so
    make_checkpoint(
        run, config_from_dict(run_config_dict(corpus, tokenizer_dir, run, data={"tokenizer": "nowhere"}))
    )
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "bare"), "--dtype", "fp32"]) == 0
    assert "warning: no tokenizer" in capsys.readouterr().err
    assert (
        not (tmp_path / "bare" / "tokenizer.json").exists() and (tmp_path / "bare" / "config.json").is_file()
    )
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["export", str(ckpt), "--out", str(foreign)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "keep me"
    assert main(["export", str(ckpt), "--out", str(foreign), "--overwrite", "--max-shard-size", "1GB"]) == 0
    assert not (foreign / "notes.txt").exists() and (foreign / "config.json").is_file()
    assert main(["export", str(ckpt), "--out", str(foreign)]) == 0  # a previous export is replaced
    assert main(["export", str(ckpt), "--out", str(tmp_path / "x"), "--max-shard-size", "huge"]) == 2
    assert main(["import", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y")]) == 2
    assert not list(tmp_path.glob(".*tmp-*"))  # no staging dir left behind


def test_stats_writes_heatmaps(
    trained: tuple[Path, MoETransformer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, _ = trained
    assert main(["stats", str(ckpt.parents[1]), "--out", str(tmp_path / "run-stats")]) == 0
    assert "| layer 0 |" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "run-stats").iterdir()} == {
        "expert_load.png",
        "expert_load_over_time.png",
    }
    assert main(["stats", str(ckpt), "--out", str(tmp_path / "ckpt-stats")]) == 0
    assert (tmp_path / "ckpt-stats" / "expert_load.png").stat().st_size > 1000
    assert main(["stats", str(tmp_path), "--out", str(tmp_path / "none")]) == 2


def test_upcycle_dense_llama_gives_the_dense_logits(
    corpus: Path, tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    run_cfg = run_config_dict(corpus, tokenizer_dir, tmp_path / "run", model={"init_std": INIT_STD})
    m = run_cfg["model"]
    dense = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=m["vocab_size"],
            hidden_size=m["hidden_size"],
            intermediate_size=m["intermediate_size"],
            num_hidden_layers=m["num_layers"],
            num_attention_heads=m["num_heads"],
            num_key_value_heads=m["num_kv_heads"],
            max_position_embeddings=m["max_seq_len"],
            rms_norm_eps=1e-5,
            initializer_range=INIT_STD,
            rope_parameters={"rope_type": "default", "rope_theta": m["rope_theta"]},
        )
    ).eval()
    dense.save_pretrained(str(tmp_path / "dense"))
    config = tmp_path / "moe.yaml"
    config.write_text(yaml.safe_dump(run_cfg))
    out = tmp_path / "upcycled"
    assert main(["upcycle", str(tmp_path / "dense"), "--config", str(config), "--out", str(out)]) == 0
    _, model = load_pretrained(out)
    ids = torch.randint(0, m["vocab_size"], (2, 24))
    with torch.no_grad():
        diff = (model.eval()(ids).logits - dense(ids, use_cache=False).logits).abs().max().item()
    with capsys.disabled():  # capsys would swallow the number even under -s
        print(f"\n[upcycle] max|moe - dense llama| logits {diff:.3e}")
    assert diff < 1e-4
    experts = model.layers[0].ffn.experts.gate_up_proj
    assert all(torch.equal(experts[0], experts[e]) for e in range(1, experts.shape[0]))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**run_cfg, "model": {**m, "intermediate_size": 32}}))
    capsys.readouterr()
    assert (
        main(["upcycle", str(tmp_path / "dense"), "--config", str(bad), "--out", str(tmp_path / "bad")]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert "model.intermediate_size = 32" in err and "\n" not in err
