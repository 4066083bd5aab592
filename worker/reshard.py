"""Resharding a DeepSpeed MoE + ZeRO-1/2 checkpoint for another world size or `moe.ep_size`.

DeepSpeed cannot load a native-MoE checkpoint at another topology (docs/deepspeed-cpu.md,
"Checkpoint layout"; `zero_to_fp32` and universal checkpoints fail on `deepspeed.moe.layer.MoE`).
This module rewrites the files so that DeepSpeed's own loader, at the new topology, finds what it
would have saved there. Offline, one process, torch only (no engine, no process group).

What the files hold (DeepSpeed 0.19, `stage_1_and_2.py`; docs/design.md, "Resharding"):
- `mp_rank_00_model_states.pt`: the non-expert weights (`module`), `param_shapes` (per optimizer
  group: name -> shape, in flat order; expert groups under rank 0's LOCAL expert names),
  `dp_world_size`, the LR scheduler, the ds_config and our client state. Rewritten with the new
  `dp_world_size`, `param_shapes`, accumulation and client state; `module` is carried as is.
- `layer_{L}_expert_{E}_mp_rank_00_model_states.pt`: one expert's weights under its GLOBAL id;
  independent of the topology, carried as they are (hard links where the filesystem allows).
- `[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt`, one per global rank r: for each optimizer
  group, rank r's partition of the group's flat fp32 master (`single_partition_of_fp32_groups`,
  saved without its padding) and of each Adam moment (`base_optimizer_state`, with padding).
  A group's flat is its parameters concatenated in `param_shapes` order, zero-padded at the end
  to a multiple of 2 x its data-parallel size, cut into equal partitions. Non-expert groups are
  partitioned over all ranks; an expert group (`moe: True`) over the expert-data-parallel group of
  its EP rank: EP rank e = r mod ep_size owns global experts e*n .. e*n+n-1 (n = experts per rank),
  its flat holds those experts (local ids 0..n-1) and is cut over ranks e, e+ep, e+2*ep, ...
  (DeepSpeed's default E + D group layout).

`gather_state` reads every parameter's fp32 master and optimizer state under GLOBAL names;
`reshard_checkpoint` writes them again partitioned for the new topology; the two together are
the proof (the test compares `gather_state` of both checkpoints bitwise).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator.errors import CheckpointError
from orchestrator.rundir.checkpoints import (
    CLIENT_STATE,
    MANIFEST,
    MODEL_STATES,
    PARTIAL_PREFIX,
    checkpoints_dir,
    read_client_state,
    reshard_tag,
    verify_checkpoint,
    write_checkpoint_files,
)
from orchestrator.spec.topology import Topology

logger = logging.getLogger(__name__)

ZERO_FILE_RE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
EXPERT_NAME_RE = re.compile(r"^(.*\.deepspeed_experts\.)(\d+)(\..+)$")
EP_GROUP_RE = re.compile(r"^ep_size_\d+$")
OSD = "optimizer_state_dict"
FP32 = "fp32"  # the key of the master weights among the per-parameter tensors


def _load(path: Path) -> Any:
    # NOTE: mmap: a tensor's bytes are read when sliced, so a rank's new partition reads only the
    # pages it needs, and the process does not hold every old file in memory at once.
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def _numel(shape: Any) -> int:
    return int(math.prod(int(d) for d in shape))


def _zero_files(ckpt: Path) -> tuple[str, dict[int, Path]]:
    """(file prefix "" or "bf16_", rank -> optimizer file)."""
    found: dict[int, Path] = {}
    prefixes = set()
    for path in ckpt.iterdir():
        if m := ZERO_FILE_RE.match(path.name):
            found[int(m.group(2))] = path
            prefixes.add(m.group(1) or "")
    if not found:
        raise CheckpointError(
            f"{ckpt} has no ZeRO optimizer files (zero_pp_rank_*_optim_states.pt); resharding needs "
            "training.zero_stage 1 or 2"
        )
    if len(prefixes) > 1 or sorted(found) != list(range(len(found))):
        raise CheckpointError(
            f"{ckpt}: the ZeRO optimizer files are not one per rank 0..N-1: {sorted(found)}"
        )
    return prefixes.pop(), found


# --- reading ------------------------------------------------------------------------------------


@dataclass
class Group:
    """One optimizer group of a checkpoint, its parameters under GLOBAL names in flat order per
    EP rank (a non-expert group has one "EP rank")."""

    index: int
    moe: bool
    names: list[list[str]]  # per EP rank (1 for a non-expert group): global names, flat order
    step: Any  # Adam's step (a 0-d tensor), the same on every rank


@dataclass
class CheckpointState:
    """Everything `reshard_checkpoint` needs from a checkpoint, read with `gather_state`."""

    path: Path
    topology: Topology
    model_states: dict[str, Any]
    zero_prefix: str
    template: dict[str, Any]  # rank 0's optimizer file (its constant parts are carried)
    groups: list[Group]
    shapes: dict[str, tuple[int, ...]]  # global name -> shape
    tensors: dict[str, dict[str, torch.Tensor]]  # global name -> {"fp32", "exp_avg", ...} (1-D)
    state_keys: list[str]  # Adam's per-element state keys ("exp_avg", "exp_avg_sq")


def _local_to_global(name: str, ep_rank: int, per_rank: int) -> str:
    m = EXPERT_NAME_RE.match(name)
    if m is None:
        if per_rank and ep_rank:
            raise CheckpointError(f"expert parameter {name} has no `deepspeed_experts.<id>` in its name")
        return name
    return f"{m.group(1)}{ep_rank * per_rank + int(m.group(2))}{m.group(3)}"


def _experts_per_prefix(names: list[str]) -> dict[str, int]:
    """Per expert list (name prefix): how many local experts a rank's group holds."""
    ids: dict[str, set[int]] = {}
    for name in names:
        if m := EXPERT_NAME_RE.match(name):
            ids.setdefault(m.group(1), set()).add(int(m.group(2)))
    return {prefix: len(found) for prefix, found in ids.items()}


def _slice(pieces: list[torch.Tensor], start: int, end: int) -> torch.Tensor:
    """Elements [start, end) of the concatenation of 1-D `pieces` (a view when in one piece)."""
    out: list[torch.Tensor] = []
    offset = 0
    for piece in pieces:
        n = piece.numel()
        lo, hi = max(start, offset), min(end, offset + n)
        if lo < hi:
            out.append(piece[lo - offset : hi - offset])
        offset += n
        if offset >= end:
            break
    if sum(t.numel() for t in out) != end - start:
        raise CheckpointError(f"a ZeRO partition is shorter than its parameters ({start}..{end})")
    if len(out) == 1:
        return out[0]
    return torch.cat(out) if out else torch.empty(0)


def read_topology(ckpt: Path) -> Topology:
    """The topology a checkpoint was written at, from its own files."""
    states = _load(ckpt / MODEL_STATES)
    _prefix, files = _zero_files(ckpt)
    zero0 = _load(files[0])[OSD]
    return _topology(states, zero0, len(files))


def _topology(states: dict[str, Any], zero0: dict[str, Any], world: int) -> Topology:
    ds = states.get("ds_config") or {}
    groups = zero0["base_optimizer_state"]["param_groups"]
    counts = zero0["partition_count"]
    ep = 1
    for group, count in zip(groups, counts, strict=True):
        if group.get("moe"):
            ep = world // int(count)
    experts = [int(n) for n in states.get("num_experts") or []]
    return Topology(
        world_size=world,
        ep_size=ep,
        micro_batch_size=int(ds["train_micro_batch_size_per_gpu"]),
        gradient_accumulation_steps=int(ds["gradient_accumulation_steps"]),
        num_experts=max(experts) if experts else 0,
    )


def gather_state(ckpt: Path) -> CheckpointState:
    """Every trainable parameter's fp32 master and optimizer state, under global names."""
    states = _load(ckpt / MODEL_STATES)
    prefix, files = _zero_files(ckpt)
    world = len(files)
    zero = {r: _load(path)[OSD] for r, path in files.items()}
    zero0 = zero[0]
    topo = _topology(states, zero0, world)
    if topo.num_experts and len(set(states.get("num_experts") or [])) > 1:
        raise CheckpointError(f"{ckpt}: MoE layers with different expert counts are not supported")
    for r, sd in zero.items():
        paddings = sd.get("param_alignment_paddings") or []
        if any(any(p) for p in paddings):
            raise CheckpointError(
                f"{ckpt}: rank {r} was saved with zero_optimization.parameter_alignment; resharding "
                "supports DeepSpeed's default (no per-parameter alignment)"
            )
        if not isinstance(sd["base_optimizer_state"], dict):
            raise CheckpointError(f"{ckpt}: an elastic ZeRO checkpoint; resharding supports the default")
    ep = topo.ep_size
    param_shapes: list[dict[str, Any]] = states["param_shapes"]
    base0 = zero0["base_optimizer_state"]
    state_keys = sorted(
        k for k, v in base0["state"][0].items() if isinstance(v, torch.Tensor) and v.dim() > 0
    )
    groups: list[Group] = []
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for g, pg in enumerate(base0["param_groups"]):
        moe = bool(pg.get("moe"))
        local = [(name, tuple(int(d) for d in shape)) for name, shape in param_shapes[g].items()]
        per_rank = max(_experts_per_prefix([n for n, _ in local]).values(), default=0)
        ep_ranks = ep if moe else 1
        group_names: list[list[str]] = []
        for e in range(ep_ranks):
            ranks = [d * ep + e for d in range(world // ep)] if moe else list(range(world))
            # The flat of this EP rank's group: partitions in order, each without its padding.
            fp32 = [zero[r]["single_partition_of_fp32_groups"][g].reshape(-1) for r in ranks]
            per_key = {FP32: fp32}
            for key in state_keys:
                per_key[key] = [
                    zero[r]["base_optimizer_state"]["state"][g][key].reshape(-1)[: t.numel()]
                    for r, t in zip(ranks, fp32, strict=True)
                ]
            names: list[str] = []
            offset = 0
            for name, shape in local:
                n = _numel(shape)
                full = _local_to_global(name, e, per_rank) if moe else name
                tensors[full] = {key: _slice(pieces, offset, offset + n) for key, pieces in per_key.items()}
                shapes[full] = shape
                names.append(full)
                offset += n
            total = sum(t.numel() for t in fp32)
            if offset != total:
                raise CheckpointError(
                    f"{ckpt}: optimizer group {g} holds {total} elements but its parameters {offset}; "
                    "the files do not match DeepSpeed's default ZeRO layout"
                )
            group_names.append(names)
        groups.append(Group(index=g, moe=moe, names=group_names, step=base0["state"][g].get("step")))
    return CheckpointState(
        path=ckpt, topology=topo, model_states=states, zero_prefix=prefix, template=zero0, groups=groups,
        shapes=shapes, tensors=tensors, state_keys=state_keys,
    )  # fmt: skip


# --- writing ------------------------------------------------------------------------------------


def _expert_blocks(names: list[str]) -> list[tuple[str, list[str]]]:
    """An expert group's structure from one EP rank's names: per expert list (name prefix, in
    flat order), the parameter suffixes of one expert, in order."""
    blocks: list[tuple[str, list[str]]] = []
    for name in names:
        m = EXPERT_NAME_RE.match(name)
        if m is None:
            raise CheckpointError(f"expert parameter {name} has no `deepspeed_experts.<id>` in its name")
        prefix, suffix = m.group(1), m.group(3)
        if not blocks or blocks[-1][0] != prefix:
            blocks.append((prefix, []))
        if suffix not in blocks[-1][1]:
            blocks[-1][1].append(suffix)
    return blocks


@dataclass(frozen=True)
class _Part:
    """One group's flat on one new EP rank: (global name, name on that rank) in flat order."""

    names: list[tuple[str, str]]
    numel: int


def _layout(state: CheckpointState, new: Topology) -> list[list[_Part]]:
    """Per group, per new EP rank (one part for a non-expert group): its parameters in the flat
    order DeepSpeed builds on that rank: expert lists in module order, the rank's experts by local
    id (global id = EP rank x experts per rank + local id), each expert's parameters in order."""
    per_rank = new.experts_per_rank
    out: list[list[_Part]] = []
    for group in state.groups:
        named = any(EXPERT_NAME_RE.match(n) for n in group.names[0])
        if group.moe and not named and (state.topology.ep_size, new.ep_size) != (1, 1):
            raise CheckpointError(
                f"{state.path}: its expert parameters are not DeepSpeed's MoE experts (a dropless "
                "checkpoint from before issue 14?); they can move to another world size at ep_size 1 only"
            )
        if not group.moe or not named:  # a non-expert group, or an old dropless one (ep_size 1)
            pairs = [(n, n) for n in group.names[0]]
            out.append([_Part(pairs, sum(_numel(state.shapes[n]) for n in group.names[0]))])
            continue
        parts = []
        blocks = _expert_blocks(group.names[0])
        for e in range(new.ep_size):
            pairs = [
                (f"{prefix}{e * per_rank + local}{suffix}", f"{prefix}{local}{suffix}")
                for prefix, suffixes in blocks
                for local in range(per_rank)
                for suffix in suffixes
            ]
            parts.append(_Part(pairs, sum(_numel(state.shapes[g]) for g, _ in pairs)))
        out.append(parts)
    return out


def _partition(
    state: CheckpointState, part: _Part, key: str, dp: int, pid: int
) -> tuple[torch.Tensor, int, list[tuple[str, int, int]]]:
    """Partition `pid` of `dp` of a group's flat for `key`, as DeepSpeed cuts it: (the partition
    without its padding, the padding, (name on the rank, numel, start) of each fragment in it)."""
    alignment = 2 * dp  # DeepSpeed: nccl_start_alignment_factor (2) x the group's dp size
    size = math.ceil(part.numel / alignment) * alignment // dp
    start, end = pid * size, (pid + 1) * size
    pieces: list[torch.Tensor] = []
    fragments: list[tuple[str, int, int]] = []
    offset = 0
    for global_name, local_name in part.names:
        tensor = state.tensors[global_name][key]
        n = tensor.numel()
        lo, hi = max(start, offset), min(end, offset + n)
        if lo < hi:
            pieces.append(tensor[lo - offset : hi - offset])
            fragments.append((local_name, hi - lo, lo - start))
        offset += n
    real = sum(p.numel() for p in pieces)
    flat = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.float32)
    return flat, size - real, fragments


def _fragment_class(template: dict[str, Any]) -> Any:
    for group in template.get("param_slice_mappings") or []:
        for value in group.values():
            return type(value)
    return None


def _rank_file(state: CheckpointState, layout: list[list[_Part]], new: Topology, rank: int,
               ds_config: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The optimizer file DeepSpeed would write for global `rank` at topology `new`."""
    template = state.template
    fragment = _fragment_class(template)
    osd: dict[str, Any] = dict(template)  # loss scaler, clip_grad, zero_stage, ds_version, ...
    fp32_groups: list[torch.Tensor] = []
    group_states: dict[int, dict[str, Any]] = {}
    paddings: list[int] = []
    counts: list[int] = []
    slices: list[OrderedDict[str, Any]] = []
    alignment_paddings: list[list[int]] = []
    param_groups = []
    for group, parts in zip(state.groups, layout, strict=True):
        if group.moe:
            e, dp, pid = rank % new.ep_size, new.world_size // new.ep_size, rank // new.ep_size
            part = parts[e]
        else:
            part, dp, pid = parts[0], new.world_size, rank
        master, padding, fragments = _partition(state, part, FP32, dp, pid)
        fp32_groups.append(master.clone())
        entry: dict[str, Any] = {}
        for key, value in template["base_optimizer_state"]["state"][group.index].items():
            if key in state.state_keys:
                moment, _, _ = _partition(state, part, key, dp, pid)
                entry[key] = torch.cat([moment, torch.zeros(padding, dtype=moment.dtype)])
            else:
                entry[key] = value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
        group_states[group.index] = entry
        paddings.append(padding)
        counts.append(dp)
        slices.append(
            OrderedDict(
                (name, fragment(numel=numel, start=at) if fragment is not None else (numel, at))
                for name, numel, at in fragments
            )
        )
        alignment_paddings.append([0] * len(part.names))
        pg = dict(template["base_optimizer_state"]["param_groups"][group.index])
        if group.moe and EP_GROUP_RE.match(str(pg.get("name", ""))):
            pg["name"] = f"ep_size_{new.ep_size}"
        param_groups.append(pg)
    osd["base_optimizer_state"] = {"state": group_states, "param_groups": param_groups}
    osd["single_partition_of_fp32_groups"] = fp32_groups
    osd["group_paddings"] = paddings
    osd["param_alignment_paddings"] = alignment_paddings
    osd["partition_count"] = counts
    osd["param_slice_mappings"] = slices
    return {OSD: osd, "ds_config": ds_config, "ds_version": template.get("ds_version")}


def _link_or_copy(src: Path, dst: Path) -> None:
    # NOTE: expert files are identical at every topology; checkpoint files are never modified in
    # place (saves write new folders), so a hard link is as good as a copy and costs no space.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@dataclass(frozen=True)
class ReshardResult:
    tag: str
    path: Path
    source: Path
    old: Topology
    new: Topology
    seconds: float
    bytes: int  # of the new checkpoint (hard-linked expert files included)
    written_bytes: int  # of the files written anew (the optimizer and model-states files)


def reshard_checkpoint(source: Path, new: Topology) -> ReshardResult:
    """Write `<source>-<suffix>` next to checkpoint `source`, for topology `new` (global batch and
    micro-batch size as the checkpoint's). The source is only read. Returns what was written.

    An existing valid resharded checkpoint for `new` is reused as it is.
    """
    started = time.perf_counter()
    source = Path(source)
    run_dir = source.parent.parent
    tag = reshard_tag(source.name, new.suffix)
    final = checkpoints_dir(run_dir) / tag
    if verify_checkpoint(final):
        logger.info("reusing the resharded checkpoint %s", tag)
        manifest_bytes = sum(p.stat().st_size for p in final.iterdir() if p.is_file())
        old = Topology.from_json(read_client_state(final)["resharded_from"]["topology"])
        return ReshardResult(tag, final, source, old, new, time.perf_counter() - started, manifest_bytes, 0)
    state = gather_state(source)
    old = state.topology
    if (old.micro_batch_size, old.global_batch_size) != (new.micro_batch_size, new.global_batch_size):
        raise ValueError(f"{new} does not keep the global batch of {old}")
    layout = _layout(state, new)
    partial = checkpoints_dir(run_dir) / f"{PARTIAL_PREFIX}{tag}"
    staged = partial / tag
    shutil.rmtree(partial, ignore_errors=True)
    staged.mkdir(parents=True)
    written = 0

    ds_config = dict(state.model_states.get("ds_config") or {})
    ds_config["gradient_accumulation_steps"] = new.gradient_accumulation_steps
    for rank in range(new.world_size):
        path = staged / f"{state.zero_prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        torch.save(_rank_file(state, layout, new, rank, ds_config), path)
        written += path.stat().st_size

    client = read_client_state(source)
    client = _client_state(client, old, new, source.name)
    model_states = dict(state.model_states)
    model_states["dp_world_size"] = new.world_size
    model_states["ds_config"] = ds_config
    model_states["param_shapes"] = [
        OrderedDict((local, state.shapes[full]) for full, local in parts[0].names) for parts in layout
    ]
    model_states.update({k: v for k, v in client.items() if k in model_states or k in ("ep_size",)})
    torch.save(model_states, staged / MODEL_STATES)
    written += (staged / MODEL_STATES).stat().st_size

    for path in sorted(source.iterdir()):
        if path.name in (MANIFEST, CLIENT_STATE, MODEL_STATES) or ZERO_FILE_RE.match(path.name):
            continue
        if path.is_file():
            _link_or_copy(path, staged / path.name)
    total = write_checkpoint_files(run_dir, tag, int(client["step"]), client, extra={"resharded_from": client[
        "resharded_from"]})  # fmt: skip
    seconds = time.perf_counter() - started
    logger.info(
        "resharded %s (%s) -> %s (%s) in %.2f s: %.1f MB written, %.1f MB in all",
        source.name,
        old.suffix,
        tag,
        new.suffix,
        seconds,
        written / 1e6,
        total / 1e6,
    )
    return ReshardResult(tag, final, source, old, new, seconds, total, written)


def _client_state(client: dict[str, Any], old: Topology, new: Topology, source_tag: str) -> dict[str, Any]:
    out = dict(client)
    micro = int(client.get("micro_batch", 0))
    # micro_batch: this rank's micro-batches into the epoch = steps into the epoch x accumulation.
    out["micro_batch"] = micro // old.gradient_accumulation_steps * new.gradient_accumulation_steps
    out["world_size"] = new.world_size
    out["ep_size"] = new.ep_size
    out["resharded_from"] = {"tag": source_tag, "topology": old.to_json()}
    out["topology"] = new.to_json()
    return out
