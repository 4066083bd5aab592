"""Hugging Face export: DeepSpeed checkpoints -> folders that load without moe-orch or DeepSpeed."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, free_port, moe_orch

from orchestrator.errors import CheckpointError, ExportError, RunNotFoundError
from orchestrator.spec.loading import dump_config
from orchestrator.spec.schema import RunConfig

TINY = REPO / "configs" / "tiny-cpu.yaml"
TEXTS = [f"Question: what is {a} plus {b}?\nAnswer: {a + b}" for a in range(40) for b in range(5)]
# What transformers prints (on stdout, then waits up to 15 s) before it runs a folder's own code.
REMOTE_CODE_PROMPT = "Do you wish to run the custom code?"
TRANSFORMERS_MAJOR = int(importlib.metadata.version("transformers").split(".")[0])


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
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # docs/deepspeed-cpu.md, "The shm build"
    from transformers import AutoTokenizer
    from orchestrator.spec.loading import load_resolved
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
    port = str(free_port())
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
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert REMOTE_CODE_PROMPT not in proc.stdout + proc.stderr
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


# --- a run directory trained without moe-orch; a tokenizer that needs no remote code --------------


@pytest.fixture(scope="module")
def hand_started_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder `python -m worker --config tiny-cpu.yaml --run-dir DIR` leaves (torchrun and a
    hand-run sbatch.sh leave the same): run.yaml, tokenizer/ and checkpoints/, but no run.json,
    since moe-orch never saw the run. The tiny MoE, one rank, 2 steps, one checkpoint."""
    run_dir = tmp_path_factory.mktemp("by-hand") / "run"
    sets = ["cluster.tasks_per_node=1", "moe.ep_size=1", "training.max_steps=2", "training.save_steps=2"]
    cmd = [sys.executable, "-m", "worker", "--config", str(TINY), "--run-dir", str(run_dir)]
    for item in sets:
        cmd += ["--set", item]
    env = _env()
    env.pop("MOE_ORCH_FAULT", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert not (run_dir / "run.json").exists()
    assert (run_dir / "checkpoints" / "step-000002" / "manifest.json").is_file()
    return run_dir


@pytest.fixture(scope="module")
def hand_started_export(hand_started_run: Path) -> Path:
    from worker.export import export_run

    return export_run(hand_started_run, hand_started_run.parent / "hf")


@pytest.mark.slow
def test_cli_exports_the_run_directory_of_a_worker_started_by_hand(
    hand_started_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "hf"
    result = moe_orch("export", str(hand_started_run), "--out", str(out), home=tmp_path / "no-runs-here")

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"wrote {out}" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mpt_moe" and config["num_experts"] == 4
    assert (out / "model.safetensors").is_file()


def test_cli_export_takes_a_run_directory_without_run_json_to_its_checkpoints(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from orchestrator.cli import app

    run_dir = tmp_path / "run-z"
    (run_dir / "checkpoints" / "step-000004").mkdir(parents=True)
    (run_dir / "run.yaml").write_text(dump_config(_tiny_config(enabled=False)))
    result = CliRunner().invoke(
        app, ["export", str(run_dir), "--out", str(tmp_path / "hf"), "--home", str(tmp_path / "runs")]
    )
    # It gets past the lookup: the export itself finds that step-000004 has no manifest.
    assert result.exit_code == 2
    assert "run run-z has no valid checkpoint to export (checkpoints there: step-000004)" in result.output


def test_cli_export_refuses_a_folder_without_checkpoints_in_one_line_naming_it_with_exit_code_2(
    tmp_path: Path,
) -> None:
    from typer.testing import CliRunner

    from orchestrator.cli import app

    run_dir = tmp_path / "not-trained-yet"
    run_dir.mkdir()
    (run_dir / "run.yaml").write_text(dump_config(_tiny_config(enabled=False)))
    home, out = tmp_path / "runs", tmp_path / "hf"
    result = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(out), "--home", str(home)])
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        f"error: {run_dir} has no checkpoints/ folder, so there is nothing to export; give a run "
        f"directory whose training has saved a checkpoint, or a run id under {home}"
    ]
    assert not out.exists()


def test_export_finds_a_run_by_id_prefix_or_folder_and_a_hand_started_run_by_its_folder(
    tmp_path: Path,
) -> None:
    from orchestrator.rundir.runs import find_run_with_checkpoints

    home = tmp_path / "runs"
    recorded = home / "tiny-20261128-100000-0001"
    recorded.mkdir(parents=True)
    (recorded / "run.json").write_text("{}")
    by_hand = tmp_path / "by-hand"
    (by_hand / "checkpoints").mkdir(parents=True)

    assert find_run_with_checkpoints(home, "tiny-20261128-100000-0001") == recorded
    assert find_run_with_checkpoints(home, "tiny-") == recorded
    assert find_run_with_checkpoints(home, str(recorded)) == recorded
    assert find_run_with_checkpoints(home, str(by_hand)) == by_hand
    with pytest.raises(RunNotFoundError, match="no run 'nothing-here' under"):
        find_run_with_checkpoints(home, "nothing-here")


def test_the_tiny_runs_tokenizer_is_saved_as_a_plain_fast_tokenizer(tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    from worker.tokenizer import load_or_train_tokenizer

    cfg = _tiny_config(enabled=False)
    save_dir = tmp_path / "tokenizer"
    load_or_train_tokenizer(cfg, TEXTS, save_dir)

    # NOTE: transformers 5 would write its own `TokenizersBackend`, a class transformers 4 lacks.
    saved = json.loads((save_dir / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (save_dir / "tokenizer.json").is_file()
    reloaded = load_or_train_tokenizer(cfg, [], save_dir, train_if_missing=False)
    assert isinstance(reloaded, PreTrainedTokenizerFast) and reloaded.eos_token == "<|endoftext|>"


# Loads an exported tokenizer as a user would, with stdin closed: a "run custom code? [y/N]" prompt
# shows in the output (on a terminal it would wait for an answer).
TOKENIZER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import transformers

    folder, loader = sys.argv[1], sys.argv[2]
    tokenizer = getattr(transformers, loader).from_pretrained(folder)
    ids = tokenizer("Question: what is 2 plus 3?")["input_ids"]
    print("RESULT " + json.dumps({"decoded": tokenizer.decode(ids), "eos": tokenizer.eos_token}))
    """
)


def _load_tokenizer_with_stdin_closed(tmp: Path, folder: Path, loader: str) -> tuple[dict[str, Any], str]:
    """`transformers.<loader>.from_pretrained(folder)` (no trust_remote_code) in a fresh process:
    (its result, everything it printed)."""
    script = tmp / "load_tokenizer.py"
    script.write_text(TOKENIZER_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(folder), loader],
        cwd=tmp,
        env=_env(HF_MODULES_CACHE=str(tmp / "hf_modules")),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line[len("RESULT ") :])
    return result, output


@pytest.mark.slow
def test_the_moe_exports_tokenizer_is_a_plain_fast_tokenizer_that_runs_no_remote_code(
    hand_started_export: Path, tmp_path: Path
) -> None:
    saved = json.loads((hand_started_export / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "auto_map" not in saved and not list(hand_started_export.glob("tokenization_*.py"))

    loader = "PreTrainedTokenizerFast"  # what the folder's tokenizer_config.json names
    result, output = _load_tokenizer_with_stdin_closed(tmp_path, hand_started_export, loader)

    assert REMOTE_CODE_PROMPT not in output
    assert result == {"decoded": "Question: what is 2 plus 3?", "eos": "<|endoftext|>"}


@pytest.mark.slow
@pytest.mark.xfail(
    TRANSFORMERS_MAJOR >= 5,
    strict=True,
    reason="transformers 5's AutoTokenizer loads config.json through AutoConfig before it reads "
    "tokenizer_class, and an MoE folder's config names its own code (auto_map): it asks, then falls "
    "back. Use trust_remote_code=True or PreTrainedTokenizerFast there. transformers 4 does not ask.",
)
def test_auto_tokenizer_loads_the_moe_exports_tokenizer_without_asking_to_run_custom_code(
    hand_started_export: Path, tmp_path: Path
) -> None:
    result, output = _load_tokenizer_with_stdin_closed(tmp_path, hand_started_export, "AutoTokenizer")

    assert REMOTE_CODE_PROMPT not in output
    assert result == {"decoded": "Question: what is 2 plus 3?", "eos": "<|endoftext|>"}
