"""Hugging Face export: DeepSpeed checkpoints -> folders that load without moe-orch or DeepSpeed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import RunConfig
from orchestrator.configfile import dump_config
from orchestrator.errors import CheckpointError, ExportError

REPO = Path(__file__).resolve().parents[1]
TEXTS = [f"Question: what is {a} plus {b}?\nAnswer: {a + b}" for a in range(40) for b in range(5)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        **extra,
    )
    return env


def _tiny_config(**moe: Any) -> RunConfig:
    return RunConfig.model_validate(
        {
            "name": "export-test",
            "cluster": {"tasks_per_node": 2 if moe.get("ep_size", 1) > 1 else 1},
            "model": {
                "name_or_path": "tiny",
                "tiny": {"d_model": 32, "n_layers": 3, "n_heads": 4, "max_seq_len": 64},
            },
            "moe": moe,
            "training": {"precision": "fp32", "seed": 3},
        }
    )


def _make_run_dir(root: Path, cfg: RunConfig) -> Path:
    from worker.tokenizer import save_tokenizer, train_bpe_tokenizer

    run_dir = root / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "run.yaml").write_text(dump_config(cfg))
    save_tokenizer(train_bpe_tokenizer(TEXTS, 300), run_dir / "tokenizer")
    return run_dir


# Every rank: build the run's model, train 2 steps, save a verified checkpoint (worker.checkpoint),
# then rank 0 writes the engine's eval logits on a fixed batch.
RANK_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    import deepspeed, deepspeed.comm.torch
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # notes, pitfall 1
    from transformers import AutoTokenizer
    from orchestrator.configfile import load_resolved
    from worker.checkpoint import save_checkpoint
    from worker.model import build_model, moe_aux_loss, optimizer_param_groups

    run_dir = Path(sys.argv[1])
    cfg = load_resolved(run_dir / "run.yaml")
    deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ["RANK"])
    vocab = len(AutoTokenizer.from_pretrained(str(run_dir / "tokenizer")))
    model = build_model(cfg, vocab)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, 0.0), lr=1e-2)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(2):
        ids = torch.randint(0, vocab, (2, 16), generator=gen)
        loss = engine(input_ids=ids, labels=ids).loss + 0.01 * moe_aux_loss(engine.module)
        engine.backward(loss)
        engine.step()
    save_checkpoint(engine, run_dir, 2, {"step": 2}, rank=rank, keep=None)
    engine.eval()
    fixed = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = engine(input_ids=fixed).logits
    if rank == 0:
        torch.save({"ids": fixed, "logits": logits}, run_dir / "eval_logits.pt")
    """
)


def _train_ranks(run_dir: Path, world_size: int) -> None:
    script = run_dir.parent / "rank_main.py"
    script.write_text(RANK_SCRIPT)
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(run_dir)],
            cwd=REPO,
            env=_env(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE=str(world_size),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world_size)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for rank, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{out[-4000:]}"


# Loads an export where moe-orch, worker and DeepSpeed cannot be imported, as a user's machine would.
LOAD_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, importlib.metadata, json, os, sys
    BLOCKED = {"deepspeed", "orchestrator", "worker"}

    class Hide(importlib.abc.MetaPathFinder):
        # NOTE: wrapping every finder makes find_spec() answer None, exactly as when the package is
        # not installed (transformers probes `find_spec("deepspeed")` and must see it absent).
        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED or not hasattr(self.inner, "find_spec"):
                return None
            return self.inner.find_spec(name, path, target)

        def find_distributions(self, context=None):
            find = getattr(self.inner, "find_distributions", None)
            if find is None:
                return
            context = context or importlib.metadata.DistributionFinder.Context()
            for dist in find(context):
                if (dist.metadata["Name"] or "").lower().replace("_", "-") not in {"deepspeed", "moe-orch"}:
                    yield dist

        def invalidate_caches(self):
            getattr(self.inner, "invalidate_caches", lambda: None)()

    sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
    repo = os.path.realpath(sys.argv[1])
    sys.path = [p for p in sys.path if os.path.realpath(p or ".") != repo]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, expected_file, trust = sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=trust).eval()
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=trust)
    expected = torch.load(expected_file)
    with torch.no_grad():
        logits = model(input_ids=expected["ids"]).logits
        prompt = expected["ids"][:1, :4]
        generated = model.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    print("RESULT " + json.dumps({
        "max_abs_diff": float((logits - expected["logits"]).abs().max()),
        "class": type(model).__name__,
        "new_tokens": int(generated.shape[1] - prompt.shape[1]),
        "decoded": tokenizer.decode(generated[0]),
        "blocked_loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED),
    }))
    """
)


def _load_in_clean_process(tmp: Path, out: Path, expected: Path, trust_remote_code: bool) -> dict[str, Any]:
    script = tmp / "load_export.py"
    script.write_text(LOAD_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(REPO), str(out), str(expected), "1" if trust_remote_code else "0"],
        cwd=tmp,
        env=_env(HF_MODULES_CACHE=str(tmp / "hf_modules")),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line[len("RESULT ") :])
    return result


@pytest.mark.slow
def test_moe_export_from_two_expert_parallel_ranks_loads_without_moe_orch_and_matches_engine_logits(
    tmp_path: Path,
) -> None:
    from worker.export import export_run

    cfg = _tiny_config(num_experts=4, top_k=1, ep_size=2, layers=[0, 2])
    run_dir = _make_run_dir(tmp_path, cfg)
    _train_ranks(run_dir, world_size=2)
    ckpt = run_dir / "checkpoints" / "step-000002"
    # each EP rank wrote its own experts: 2 MoE layers x 4 global experts
    assert len(list(ckpt.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))) == 8

    out = export_run(run_dir, tmp_path / "hf")

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mpt_moe"
    assert (
        config["moe_layers"] == [0, 2] and config["num_experts"] == 4 and config["num_experts_per_tok"] == 1
    )
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mpt_moe.MptMoeForCausalLM"
    assert (out / "model.safetensors").is_file() and (out / "modeling_mpt_moe.py").is_file()
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()

    result = _load_in_clean_process(tmp_path, out, run_dir / "eval_logits.pt", trust_remote_code=True)
    assert result["blocked_loaded"] == []
    assert result["class"] == "MptMoeForCausalLM"
    assert result["max_abs_diff"] < 1e-5
    assert result["new_tokens"] == 6


@pytest.mark.slow
def test_dense_export_is_a_plain_mpt_folder_loadable_without_remote_code(tmp_path: Path) -> None:
    from worker.export import export_run

    cfg = _tiny_config(enabled=False)
    run_dir = _make_run_dir(tmp_path, cfg)
    _train_ranks(run_dir, world_size=1)

    out = export_run(run_dir, tmp_path / "hf-dense")

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mpt" and "auto_map" not in config
    assert not list(out.glob("*.py"))
    result = _load_in_clean_process(tmp_path, out, run_dir / "eval_logits.pt", trust_remote_code=False)
    assert result["class"] == "MptForCausalLM"
    assert result["max_abs_diff"] < 1e-5
    assert result["new_tokens"] == 6

    # An invalid newer checkpoint is skipped by default and refused by name.
    bad = run_dir / "checkpoints" / "step-000009"
    bad.mkdir()
    (bad / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    with pytest.raises(CheckpointError, match=r"step-000009.*checkpoints there: step-000002, step-000009"):
        export_run(run_dir, tmp_path / "hf-bad", tag="step-000009")
    with pytest.raises(CheckpointError, match="has no checkpoint 'step-000001'"):
        export_run(run_dir, tmp_path / "hf-bad", tag="step-000001")
    # An earlier export is replaced; any other non-empty folder is left alone.
    (out / "stale.txt").write_text("from an earlier export")
    assert not (export_run(run_dir, out) / "stale.txt").exists()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="is not an earlier export"):
        export_run(run_dir, occupied)
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]
    # ... and an export into a hostile folder name is complete.
    hostile = export_run(run_dir, tmp_path / "a'; echo foo\n0")
    assert hostile.name == "a'; echo foo\n0" and (hostile / "model.safetensors").is_file()


def test_export_refuses_a_run_without_a_valid_checkpoint_and_lists_what_exists(tmp_path: Path) -> None:
    from worker.export import export_run

    run_dir = tmp_path / "run-x"
    (run_dir / "checkpoints" / "step-000004").mkdir(parents=True)
    (run_dir / "run.yaml").write_text(dump_config(_tiny_config(enabled=False)))
    with pytest.raises(CheckpointError, match=r"run run-x has no valid checkpoint.*step-000004"):
        export_run(run_dir)


def test_export_refuses_a_folder_that_is_not_a_deepspeed_checkpoint(tmp_path: Path) -> None:
    from worker.export import export_checkpoint

    with pytest.raises(ExportError, match=r"mp_rank_00_model_states\.pt is missing"):
        export_checkpoint(tmp_path, _tiny_config(), tmp_path, tmp_path / "out")


@pytest.mark.parametrize(
    ("deepspeed_name", "hf_name"),
    [
        (
            "transformer.blocks.2.ffn.moe.deepspeed_moe.gate.wg.weight",
            "transformer.blocks.2.ffn.gate.wg.weight",
        ),
        (
            "transformer.blocks.0.ffn.moe.deepspeed_moe.experts.deepspeed_experts.3.up_proj.weight",
            "transformer.blocks.0.ffn.experts.3.up_proj.weight",
        ),
        (
            "transformer.blocks.1.ffn.moe.experts.5.down_proj.weight",
            "transformer.blocks.1.ffn.experts.5.down_proj.weight",
        ),
        ("transformer.blocks.1.ffn.up_proj.weight", "transformer.blocks.1.ffn.up_proj.weight"),
        ("lm_head.weight", "lm_head.weight"),
    ],
)
def test_deepspeed_parameter_names_map_onto_the_hf_moe_model(deepspeed_name: str, hf_name: str) -> None:
    from worker.export import hf_key

    assert hf_key(deepspeed_name) == hf_name


def test_cli_export_refuses_a_run_without_a_valid_checkpoint_in_one_line_with_exit_code_2(
    tmp_path: Path,
) -> None:
    from typer.testing import CliRunner

    from orchestrator.cli import app

    run_dir = tmp_path / "run-y"
    (run_dir / "checkpoints" / "step-000004").mkdir(parents=True)
    (run_dir / "run.json").write_text("{}")
    (run_dir / "run.yaml").write_text(dump_config(_tiny_config(enabled=False)))
    result = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "hf")])
    assert result.exit_code == 2
    assert "run run-y has no valid checkpoint to export (checkpoints there: step-000004)" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "hf").exists()
