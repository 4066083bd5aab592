"""orchestrator.rundir.checkpoints: manifests, verification, `latest`, pruning (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.rundir import checkpoints as ckpt


def fake_save(run_dir: Path, step: int, keep: int | None = None, payload: bytes = b"weights") -> Path:
    """What rank 0 does after DeepSpeed wrote its files into `.partial-<tag>/<tag>`."""
    tag = ckpt.tag_for_step(step)
    staged = ckpt.checkpoints_dir(run_dir) / f"{ckpt.PARTIAL_PREFIX}{tag}" / tag
    staged.mkdir(parents=True)
    (staged / "mp_rank_00_model_states.pt").write_bytes(payload * 100)
    (staged / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(payload * 50)
    ckpt.finalize_checkpoint(run_dir, tag, step, {"step": step, "epoch": 0}, keep)
    return ckpt.checkpoints_dir(run_dir) / tag


def test_the_checkpoint_module_does_not_import_torch() -> None:
    # The orchestrator calls these functions on the login node.
    source = Path(ckpt.__file__).read_text()
    top_level = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not [line for line in top_level if "torch" in line or "deepspeed" in line]


def test_a_finalized_checkpoint_verifies_and_becomes_latest(tmp_path: Path) -> None:
    path = fake_save(tmp_path, 4)
    assert path.name == "step-000004"
    assert ckpt.verify_checkpoint(path)
    assert ckpt.read_latest_tag(tmp_path) == "step-000004"
    assert ckpt.read_client_state(path) == {"step": 4, "epoch": 0}
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert manifest["complete"] is True and manifest["tag"] == "step-000004" and manifest["step"] == 4
    assert set(manifest["files"]) == {
        "client_state.json", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    }
    assert not list(ckpt.checkpoints_dir(tmp_path).glob(".partial-*"))


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete_file", "delete_manifest"])
def test_damage_makes_a_checkpoint_invalid_and_resume_falls_back(tmp_path: Path, damage: str) -> None:
    older = fake_save(tmp_path, 4)
    newest = fake_save(tmp_path, 8)
    target = newest / "mp_rank_00_model_states.pt"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:10])
    elif damage == "flip_byte":
        data = bytearray(target.read_bytes())
        data[3] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete_file":
        target.unlink()
    else:
        (newest / ckpt.MANIFEST).unlink()
    assert not ckpt.verify_checkpoint(newest)
    assert ckpt.latest_valid_checkpoint(tmp_path) == older


def test_size_only_verification_misses_a_flipped_byte_but_full_catches_it(tmp_path: Path) -> None:
    path = fake_save(tmp_path, 1)
    target = path / "mp_rank_00_model_states.pt"
    data = bytearray(target.read_bytes())
    data[0] ^= 0x01
    target.write_bytes(bytes(data))
    assert ckpt.verify_checkpoint(path, full=False)
    assert not ckpt.verify_checkpoint(path, full=True)


def test_an_interrupted_save_is_never_listed_nor_chosen(tmp_path: Path) -> None:
    fake_save(tmp_path, 4)
    # A save killed before its manifest: DeepSpeed's files sit in the temporary folder only.
    staged = ckpt.checkpoints_dir(tmp_path) / ".partial-step-000008" / "step-000008"
    staged.mkdir(parents=True)
    (staged / "mp_rank_00_model_states.pt").write_bytes(b"half")
    assert [info.step for info in ckpt.list_checkpoints(tmp_path)] == [4]
    assert ckpt.latest_valid_checkpoint(tmp_path) == ckpt.checkpoints_dir(tmp_path) / "step-000004"
    # The next successful save cleans it up.
    fake_save(tmp_path, 12)
    assert not (ckpt.checkpoints_dir(tmp_path) / ".partial-step-000008").exists()


def test_pruning_keeps_the_newest_n(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8):
        fake_save(tmp_path, step, keep=2)
    assert [info.step for info in ckpt.list_checkpoints(tmp_path)] == [6, 8]


def test_pruning_never_deletes_the_newest_valid_checkpoint(tmp_path: Path) -> None:
    fake_save(tmp_path, 2)
    valid = fake_save(tmp_path, 4)
    broken = fake_save(tmp_path, 6)
    (broken / ckpt.MANIFEST).unlink()
    removed = ckpt.prune_checkpoints(tmp_path, keep=1)
    assert valid not in removed and valid.exists()
    assert ckpt.latest_valid_checkpoint(tmp_path) == valid


def test_no_checkpoint_means_no_resume(tmp_path: Path) -> None:
    assert ckpt.list_checkpoints(tmp_path) == []
    assert ckpt.latest_valid_checkpoint(tmp_path) is None
    assert ckpt.read_latest_tag(tmp_path) is None


@pytest.mark.parametrize(
    ("step", "tag"), [(0, "step-000000"), (120, "step-000120"), (1234567, "step-1234567")]
)
def test_tags_sort_in_step_order_and_parse_back(step: int, tag: str) -> None:
    assert ckpt.tag_for_step(step) == tag
    assert ckpt.step_of_tag(tag) == step


def test_ranks_split_the_hashing_and_together_catch_a_flipped_byte(tmp_path: Path) -> None:
    path = fake_save(tmp_path, 3)
    assert all(ckpt.verify_checkpoint(path, rank=r, world_size=2) for r in range(2))
    target = path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(target.read_bytes())
    data[5] ^= 0x10
    target.write_bytes(bytes(data))
    verdicts = [ckpt.verify_checkpoint(path, rank=r, world_size=2) for r in range(2)]
    assert verdicts.count(False) == 1  # exactly the rank that hashes that file notices
    assert not all(verdicts)  # which is what the ranks' MIN all-reduce acts on


def test_the_hashing_writer_hashes_what_it_writes_including_a_forward_seek(tmp_path: Path) -> None:
    import xxhash

    path = tmp_path / "f.bin"
    writer = ckpt.HashingWriter(path)
    writer.write(b"abc")
    writer.write(memoryview(bytearray(b"\x01\x02")))
    assert writer.seek(3, 1) == 8  # torch's zip writer skips metadata-only records: zeros
    writer.flush()
    entry = writer.close()
    data = path.read_bytes()
    assert data == b"abc\x01\x02\x00\x00\x00"
    assert entry == {"xxh3_128": xxhash.xxh3_128(data).hexdigest(), "size": 8}


def test_the_hashing_writer_refuses_to_seek_backwards(tmp_path: Path) -> None:
    writer = ckpt.HashingWriter(tmp_path / "f.bin")
    writer.write(b"abcd")
    with pytest.raises(OSError, match="front to back"):
        writer.seek(0)
    writer.close(fsync=False)


def test_ranks_hash_shares_of_about_equal_bytes_every_file_once() -> None:
    sizes = {"optim_0.pt": 100, "optim_1.pt": 100, "module.pt": 90, "e0.pt": 5, "e1.pt": 5, "j.json": 1}
    shares = ckpt.hash_shares(sizes, 2)
    assert sorted(f for share in shares for f in share) == sorted(sizes)
    assert [sum(sizes[f] for f in share) for share in shares] == [190, 111]  # a file is never split
    assert ckpt.hash_shares(sizes, 1) == [sorted(sizes, key=lambda f: (-sizes[f], f))]


def test_a_new_manifest_names_its_hash_and_every_entry_holds_that_digest(tmp_path: Path) -> None:
    import xxhash

    path = fake_save(tmp_path, 4)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert manifest["hash"] == ckpt.HASH == "xxh3_128"
    weights = path / "mp_rank_00_model_states.pt"
    assert manifest["files"][weights.name] == {
        "xxh3_128": xxhash.xxh3_128(weights.read_bytes()).hexdigest(), "size": weights.stat().st_size
    }


def legacy_save(run_dir: Path, step: int) -> Path:
    """A checkpoint as saves wrote it before xxh3_128: sha256 entries, no `"hash"` in the manifest."""
    tag = ckpt.tag_for_step(step)
    staged = ckpt.checkpoints_dir(run_dir) / f"{ckpt.PARTIAL_PREFIX}{tag}" / tag
    staged.mkdir(parents=True)
    (staged / "mp_rank_00_model_states.pt").write_bytes(b"weights" * 100)
    ckpt.finalize_checkpoint(run_dir, tag, step, {"step": step}, None, algorithm=ckpt.LEGACY_HASH)
    return ckpt.checkpoints_dir(run_dir) / tag


def test_a_manifest_written_with_sha256_still_verifies_and_a_flipped_byte_is_still_caught(
    tmp_path: Path,
) -> None:
    import hashlib

    path = legacy_save(tmp_path, 4)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert "hash" not in manifest
    target = path / "mp_rank_00_model_states.pt"
    assert manifest["files"][target.name]["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()
    assert ckpt.verify_checkpoint(path)
    assert all(ckpt.verify_checkpoint(path, rank=r, world_size=2) for r in range(2))
    data = bytearray(target.read_bytes())
    data[7] ^= 0x04
    target.write_bytes(bytes(data))
    assert not ckpt.verify_checkpoint(path)


def test_a_manifest_naming_an_unknown_hash_does_not_verify(tmp_path: Path) -> None:
    path = fake_save(tmp_path, 4)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    manifest["hash"] = "md4"
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert not ckpt.verify_checkpoint(path)
    assert ckpt.verify_checkpoint(path, full=False)  # sizes need no hash
