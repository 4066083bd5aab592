"""The run configuration: declared once, read by validate, render, submit, the worker and `schema`.

Every field carries a docstring (pydantic turns it into the JSON Schema description, so editors
show it). Cross-field rules live here as validators, next to the fields they relate.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from orchestrator.spec.secrets import looks_secret, not_exported, secret_word

NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _env_name(value: str) -> str:
    if not ENV_NAME_RE.match(value):
        raise ValueError(f"environment variable name {value!r} is not valid: use letters, digits and _")
    return value


EnvName = Annotated[
    str, AfterValidator(_env_name), WithJsonSchema({"type": "string", "pattern": ENV_NAME_RE.pattern})
]
"""The name of an environment variable (letters, digits and `_`, not starting with a digit)."""


def _fail(loc_hint: str, message: str) -> PydanticCustomError:
    """An error for a cross-field rule; `loc_hint` is the field path shown to the user."""
    return PydanticCustomError("moe_orch_rule", "{field}: {msg}", {"field": loc_hint, "msg": message})


def _not_blank(hint: str) -> AfterValidator:
    def check(value: str) -> str:
        if not value.strip():
            raise PydanticCustomError("blank_string", "must not be empty or blank" + hint)
        return value

    return AfterValidator(check)


# NOTE: `pattern: \S` tells editors what the validator enforces (at least one visible character).
_NOT_BLANK_SCHEMA = WithJsonSchema({"type": "string", "pattern": r"\S"})

NonBlankStr = Annotated[str, _not_blank(""), _NOT_BLANK_SCHEMA]
"""A string that must hold a value: "" or only whitespace is an error naming the field and line."""

UnsetOrNonBlankStr = (
    Annotated[str, _not_blank("; leave the key out (or write null) to leave it unset"), _NOT_BLANK_SCHEMA]
    | None
)
"""An optional string: unset is null (or the key left out), never "" or whitespace, so that an
empty value (a template variable that expanded to nothing) is an error, not a silent default."""


class _Section(BaseModel):
    # NOTE: extra="forbid" is what turns a typo into an error (with a did-you-mean added by
    # orchestrator.spec.loading) instead of a silently ignored key. The docstring under each field
    # is its description, attached by `attach_field_docs` where it is shown (`moe-orch schema`, the
    # reference): pydantic's `use_attribute_docstrings` parsed this module's source once per class
    # at every import, a third of `moe-orch validate`'s time (issue 14).
    model_config = ConfigDict(extra="forbid", frozen=False)


class ClusterConfig(_Section):
    executor: Literal["local", "slurm"] = "local"
    """Where the ranks run: `local` (submitit's local executor, one node) or `slurm`."""

    nodes: Annotated[int, Field(ge=1)] = 1
    """Number of nodes (`sbatch --nodes`)."""

    min_nodes: Annotated[int, Field(ge=1)] | None = None
    """Fewest nodes the run may continue on: when the cluster cannot give `nodes` back after a
    failure, `watch` may resubmit on as few as this many (at most `nodes`), and the worker
    reshards the checkpoint for the smaller world (same global batch: more accumulation steps).
    Unset means the run always waits for `nodes`."""

    tasks_per_node: Annotated[int, Field(ge=1)] = 1
    """Ranks per node. On GPU clusters this is the number of GPUs per node (one rank per GPU)."""

    gpus_per_node: Annotated[int, Field(ge=0)] = 0
    """GPUs requested per node (`--gpus-per-node` or `--gres`, see `gpu_request`); 0 means a
    CPU-only run. Each rank binds the GPU of its local rank (one rank per GPU, over NCCL)."""

    gpu_request: Literal["gpus_per_node", "gres"] = "gpus_per_node"
    """How the job asks SLURM for its GPUs: `gpus_per_node` (`#SBATCH --gpus-per-node=N`, SLURM's
    cons_tres selection) or `gres` (`#SBATCH --gres=gpu:N`, for clusters that only know GPUs as
    generic resources). Ignored when `gpus_per_node` is 0."""

    gpu_mem_gb: Annotated[float, Field(gt=0)] | None = None
    """Memory of one GPU in GB (80 for an A100/H100 80GB). When set, `validate` refuses a run
    whose estimated model-state memory per GPU exceeds it."""

    cpus_per_task: Annotated[int, Field(ge=1)] = 1
    """CPU cores per rank (`--cpus-per-task`)."""

    mem_gb: Annotated[float, Field(gt=0)] | None = None
    """Host memory per node in GB (`--mem`); unset leaves the partition's default."""

    time_min: Annotated[int, Field(ge=1)] = 60
    """Wall-clock limit of one attempt in minutes (`--time`). Longer runs continue by requeue."""

    partition: UnsetOrNonBlankStr = None
    """SLURM partition (`--partition`); unset (not "") leaves the cluster's default."""

    account: UnsetOrNonBlankStr = None
    """SLURM account to charge (`--account`); unset (not "") leaves the user's default."""

    qos: UnsetOrNonBlankStr = None
    """SLURM quality of service (`--qos`); unset (not "") leaves the default."""

    constraint: UnsetOrNonBlankStr = None
    """SLURM node feature constraint (`--constraint`), e.g. `a100`; unset (not "") means none."""

    exclude: list[str] = Field(default_factory=list)
    """Nodes never to run on (`--exclude`). `watch` adds nodes that failed an attempt."""

    signal_delay_s: Annotated[int, Field(ge=0)] = 120
    """Seconds before the time limit at which SLURM sends USR2 so every rank saves a checkpoint
    (`--signal=USR2@N`). Should be at least twice the measured save time."""

    max_failures: Annotated[int, Field(ge=0)] = 3
    """How many failed attempts (crash, node failure, out of memory) are requeued before the run
    stops as failed."""

    max_preemptions: Annotated[int, Field(ge=0)] | None = None
    """How many preemptions and time limits are requeued; unset means without limit."""

    max_attempts_without_progress: Annotated[int, Field(ge=1)] = 3
    """Consecutive attempts that end without a new optimizer step before the run stops as a
    crash loop."""

    stall_timeout_s: Annotated[float, Field(gt=0)] | None = None
    """Seconds without training progress after which a rank's watchdog declares the attempt hung:
    it writes every thread's stack to `attempts/<n>/stacks/`, records a `hang` event naming the
    stale ranks, and ends the attempt (stop reason `hung`) so that it is requeued and resumes from
    the latest valid checkpoint. Unset derives it while training: the larger of 300 s and 10x the
    slowest step or checkpoint save measured so far. It applies from each attempt's first step;
    before it, `startup_timeout_s` does. `watch` applies the same limit to heartbeats from outside
    the job."""

    startup_timeout_s: Annotated[float, Field(gt=0)] = 1800.0
    """Seconds from a rank's start to the attempt's first optimizer step (without progress: the
    eval at step 0 restarts the count) after which the attempt is hung, as for `stall_timeout_s`:
    it bounds a rank stuck in the rendezvous, model loading, the checkpoint load or the first
    collective. The suspects are the ranks that wrote no heartbeat or are behind the others. Raise
    it for a model whose loading and first step take longer."""

    max_hangs: Annotated[int, Field(ge=0)] = 2
    """How many hung attempts are requeued before the run stops as failed (their own budget,
    apart from `max_failures`)."""

    heartbeat_s: Annotated[float, Field(gt=0)] = 10.0
    """How often each rank rewrites its heartbeat file (`heartbeats/rank-<r>.json`: step, phase,
    time of last progress, host, pid)."""

    straggler_factor: Annotated[float, Field(gt=1)] = 1.5
    """A rank whose compute time per step exceeds this factor times the median rank's (over the
    last 50 steps) is flagged as a straggler in `status` and in a `straggler` event."""

    exclude_stragglers: bool = False
    """Put the node of a rank flagged as a straggler in the next attempt's `--exclude`, when the
    cluster has enough other nodes for the job."""

    setup: list[str] = Field(default_factory=list)
    """Shell lines run on every node before the worker starts (module loads, venv activation).
    They are written verbatim into sbatch.sh: they are the one place where shell is intended."""

    env: dict[str, str] = Field(default_factory=dict)
    """Extra environment variables for every rank. Values are quoted; they never run as shell.
    This is the place for site settings such as `NCCL_SOCKET_IFNAME: ib0` or `NCCL_IB_HCA: mlx5`;
    a key here replaces the default moe-orch exports (on GPUs: `NCCL_DEBUG`,
    `TORCH_NCCL_ASYNC_ERROR_HANDLING`, `MOE_ORCH_COLLECTIVE_TIMEOUT_S`, `OMP_NUM_THREADS`).
    They are written into run.yaml and sbatch.sh, so a key that looks secret (TOKEN, KEY, SECRET,
    PASSWORD, CREDENTIAL, AUTH, PRIVATE, ... in its name) is refused: pass it by name with
    `env_passthrough`, or list it in `env_not_secret` if its value is not secret."""

    env_passthrough: list[EnvName] = Field(default_factory=list)
    """Names of environment variables every rank takes from the shell that runs `submit`, for
    secrets (e.g. `[HF_TOKEN, WANDB_API_KEY]`): only the names are written down, never the values.
    SLURM exports the submitting environment with the job (sbatch's default `--export=ALL`; an
    `--export` list in `sbatch_extra` or `SBATCH_EXPORT` must include them) and the local executor's
    processes inherit it. `submit` (and a resubmission) refuses to run while one is not set in its
    environment; `validate` warns."""

    env_not_secret: list[EnvName] = Field(default_factory=list)
    """Keys of `env` whose names look secret but whose values are not (e.g. `[NCCL_IB_PKEY]`, an
    InfiniBand partition key): they may keep a literal value in the config."""

    python: UnsetOrNonBlankStr = None
    """Python interpreter on the compute nodes; unset (not "") means the interpreter running
    moe-orch."""

    requeue: bool = True
    """Let SLURM requeue the job (`--requeue`) after preemption, node failure or a save on signal."""

    continue_with: Literal["requeue", "chain"] = "requeue"
    """How the run goes on after a job's time limit. `requeue`: the job requeues itself (`scontrol
    requeue`; needs `requeue: true` and a cluster that allows it) and SLURM restarts the same job
    id. `chain`: the job stops itself `signal_delay_s` before its time limit, saves, and submits its
    successor (`sbatch --dependency=afterany:<this job>`, the same job script): a new job id of the
    same run, with no process on the login node; also on a preemption signal when the requeue is
    refused or `requeue` is false. For clusters with `JobRequeue=0` or a partition `MaxTime`
    shorter than the run. The budgets and `total_time_min` decide whether a successor is sent."""

    total_time_min: Annotated[int, Field(ge=1)] | None = None
    """Cap on the run's wall-clock time in minutes, from its first attempt's start to the end of
    its latest: past it no successor is submitted (`continue_with: chain`) and the run ends
    `failed` (`watch` resubmits nothing and cancels a requeued job). Unset means no cap."""

    master_port: Annotated[int, Field(ge=1024, le=65535)] | None = None
    """Rendezvous port; unset derives it from the job id so that two jobs on a node never collide."""

    sbatch_extra: dict[str, str] = Field(default_factory=dict)
    """Further `#SBATCH --key=value` options that have no field of their own (e.g. `mail-user`)."""

    @field_validator("exclude", mode="before")
    @classmethod
    def _split_exclude(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part for part in value.split(",") if part]
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            _env_name(key)
        return value

    @model_validator(mode="after")
    def _no_literal_secrets(self) -> ClusterConfig:
        """A secret-looking key of `env` is refused (its value would be written in plaintext under
        the run home and into the submitted job), unless `env_not_secret` lists it."""
        both = [name for name in self.env_passthrough if name in self.env]
        if both:
            raise _fail(
                f"cluster.env.{both[0]}",
                f"{both[0]} is also in cluster.env_passthrough; a variable comes either from the "
                "config or from the submitting shell: remove one of the two",
            )
        stale = [name for name in self.env_not_secret if name not in self.env]
        if stale:
            raise _fail(
                "cluster.env_not_secret",
                f"names {', '.join(stale)}, which cluster.env does not set; remove "
                f"{'it' if len(stale) == 1 else 'them'} from the list",
            )
        secret = [k for k in self.env if looks_secret(k) and k not in self.env_not_secret]
        if secret:
            names = ", ".join(secret)
            what = (
                f"looks like a secret (its name holds {secret_word(secret[0])})"
                if len(secret) == 1
                else f"{names} look like secrets"
            )
            # NOTE: the message names keys only; a value must never reach an error line or a log.
            raise _fail(
                f"cluster.env.{secret[0]}",
                f"{what}: a value here is written in plaintext into run.yaml, sbatch.sh and the "
                f"submitted job; move it to cluster.env_passthrough: [{names}] and "
                f"`export {secret[0]}=...` in the shell that runs submit, or, if the value is not "
                f"secret, list it in cluster.env_not_secret: [{names}]",
            )
        export = self.sbatch_extra.get("export")
        if export is None:
            return self
        assigned = [item.split("=", 1)[0].strip() for item in export.split(",") if "=" in item]
        secret = [name for name in assigned if looks_secret(name)]
        if secret:
            raise _fail(
                "cluster.sbatch_extra.export",
                f"sets {', '.join(secret)} (a secret-looking name) to a literal value; name it in "
                "cluster.env_passthrough instead and export it in the shell that runs submit (a value "
                "that is not secret goes in cluster.env and cluster.env_not_secret)",
            )
        blocked = not_exported(export, self.env_passthrough)
        if blocked:
            # NOTE: not the option's value, which may hold NAME=value pairs.
            raise _fail(
                "cluster.sbatch_extra.export",
                f"does not pass {', '.join(blocked)} (cluster.env_passthrough) to the job; use ALL "
                f"(SLURM's default: leave export out) or add {', '.join(blocked)} to the list",
            )
        return self

    @field_validator("sbatch_extra")
    @classmethod
    def _sbatch_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not re.match(r"^[a-z][a-z0-9-]*$", key):
                raise ValueError(f"sbatch option {key!r} must look like `mail-user` (no dashes in front)")
        return value

    @model_validator(mode="after")
    def _min_nodes_fit(self) -> ClusterConfig:
        if self.min_nodes is not None and self.min_nodes > self.nodes:
            raise _fail(
                "cluster.min_nodes",
                f"min_nodes {self.min_nodes} is more than nodes {self.nodes}; set min_nodes at most "
                f"{self.nodes} (or leave it unset)",
            )
        return self

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


class TinyModelConfig(_Section):
    d_model: Annotated[int, Field(ge=8)] = 64
    """Hidden size of the random tiny MPT."""

    n_layers: Annotated[int, Field(ge=1)] = 2
    """Number of transformer blocks."""

    n_heads: Annotated[int, Field(ge=1)] = 4
    """Attention heads; must divide `d_model`."""

    expansion_ratio: Annotated[int, Field(ge=1)] = 4
    """FFN width as a multiple of `d_model`."""

    vocab_size: Annotated[int, Field(ge=260)] = 512
    """Vocabulary size; the offline byte-level BPE tokenizer is trained to this size."""

    max_seq_len: Annotated[int, Field(ge=8)] = 2048
    """Longest sequence the model accepts (ALiBi, so only a bound)."""

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.d_model % self.n_heads:
            raise _fail("model.tiny.n_heads", f"{self.n_heads} heads do not divide d_model {self.d_model}")
        return self


class ModelConfig(_Section):
    name_or_path: NonBlankStr = "mosaicml/mpt-7b"
    """A Hugging Face hub id (`mosaicml/mpt-7b`), a local folder holding an MPT, or `tiny` for a
    random tiny MPT built from `model.tiny` (CPU tests and demos). Must not be empty."""

    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    """Architecture of the random tiny MPT used when `name_or_path` is `tiny`."""

    revision: UnsetOrNonBlankStr = None
    """Hub revision (branch, tag or commit) to load; unset (not "") means the default branch."""

    trust_remote_code: bool = False
    """Pass `trust_remote_code` when loading from the hub (needed by some MPT checkpoints)."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""

    @property
    def is_tiny(self) -> bool:
        return self.name_or_path == "tiny"


class LabelRoutingConfig(_Section):
    weight: Annotated[float, Field(ge=0)] = 0.0
    """Weight of the label-routing loss (0: off). Each real token of an example with an
    `expert_label` adds -log(router probability of its label's experts), per MoE layer, beside the
    load-balancing loss; the router stays an ordinary router (the export needs nothing else)."""

    experts: Literal["auto"] | dict[str, list[Annotated[int, Field(ge=0)]]] = "auto"
    """Which experts each label is pulled toward: `auto` deals the sorted labels round-robin over
    the experts (L <= E labels: label i gets experts i, i+L, ...; more labels than experts: label i
    gets expert i mod E), or a map `{label: [expert ids]}` (labels left out are not guided)."""

    def assignment(self, labels: list[str], num_experts: int) -> dict[str, list[int]]:
        """The experts of each label (of `labels`, the data's sorted label vocabulary)."""
        if self.experts != "auto":
            return {label: sorted(set(self.experts[label])) for label in labels if self.experts.get(label)}
        n = len(labels)
        if n <= num_experts:
            return {label: list(range(i, num_experts, n)) for i, label in enumerate(labels)}
        return {label: [i % num_experts] for i, label in enumerate(labels)}


class MoeConfig(_Section):
    enabled: bool = True
    """Upcycle the FFNs into MoE layers. `false` trains the dense parent (the baseline)."""

    num_experts: Annotated[int, Field(ge=1)] = 4
    """Experts per MoE layer (all start as copies of the dense FFN: sparse upcycling)."""

    top_k: Literal[1, 2] = 1
    """Experts each token is routed to. 2 preserves the dense model's function at step 0."""

    ep_size: Annotated[int, Field(ge=1)] = 1
    """Expert-parallel size: experts of a layer are split over this many ranks."""

    layers: Literal["all", "every_other"] | list[Annotated[int, Field(ge=0)]] = "all"
    """Which blocks' FFNs become MoE: `all`, `every_other` (1, 3, 5, ...) or a list of indices."""

    capacity_factor: Annotated[float, Field(gt=0)] = 1.0
    """Expert capacity in training, as a multiple of tokens / experts."""

    eval_capacity_factor: Annotated[float, Field(gt=0)] | None = None
    """Expert capacity in evaluation; unset means `num_experts` (no token is dropped in eval)."""

    min_capacity: Annotated[int, Field(ge=0)] = 4
    """Smallest expert capacity, whatever the batch."""

    drop_tokens: bool = True
    """Drop tokens over capacity (`false`: capacity grows to fit every token)."""

    aux_loss_weight: Annotated[float, Field(ge=0)] = 0.01
    """Weight of the load-balancing loss added to the language-model loss."""

    noisy_gate_policy: Literal["none", "Jitter", "RSample"] = "none"
    """Noise added to the router in training (DeepSpeed's `noisy_gate_policy`)."""

    implementation: Literal["deepspeed", "dropless"] = "deepspeed"
    """`deepspeed`: the stock `deepspeed.moe.layer.MoE`. `dropless`: the worker's sort-based
    dispatch (no capacity, no token dropped; with `ep_size` > 1 the all_to_alls carry only the
    routed rows)."""

    label_routing: LabelRoutingConfig = Field(default_factory=LabelRoutingConfig)
    """Label-guided routing: an auxiliary router loss pulling each `expert_label`'s tokens toward
    assigned experts (docs/design.md, "Routing analytics and label routing")."""

    @model_validator(mode="after")
    def _label_experts_exist(self) -> MoeConfig:
        lr = self.label_routing
        if lr.experts != "auto":
            bad = sorted({e for ids in lr.experts.values() for e in ids if e >= self.num_experts})
            if bad:
                raise _fail(
                    "moe.label_routing.experts",
                    f"expert ids {bad} do not exist: num_experts is {self.num_experts} "
                    f"(ids 0..{self.num_experts - 1})",
                )
        return self

    @property
    def eval_capacity(self) -> float:
        return self.eval_capacity_factor if self.eval_capacity_factor is not None else float(self.num_experts)

    def moe_layer_indices(self, n_layers: int) -> list[int]:
        """Indices of the blocks whose FFN becomes an MoE layer."""
        if not self.enabled:
            return []
        if self.layers == "all":
            return list(range(n_layers))
        if self.layers == "every_other":
            return list(range(1, n_layers, 2))
        return sorted(set(self.layers))


class DataConfig(_Section):
    train_file: NonBlankStr = "nq_annotated_moe.jsonl"
    """Training JSONL: one `{"question", "answer", "expert_label"}` object per line. `answer` is a
    string, a list of strings (joined with ", ") or `{"text": ...}`. Relative paths are resolved
    against the config file's folder. Must not be empty."""

    eval_file: UnsetOrNonBlankStr = None
    """Evaluation JSONL in the same format; unset (not "") holds out `eval_fraction` of the
    training file."""

    eval_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.05
    """Share of the training file held out for evaluation when there is no `eval_file`."""

    max_samples: Annotated[int, Field(ge=1)] | None = None
    """Use only the first N lines of the training file (quick tests)."""

    max_seq_length: Annotated[int, Field(ge=8)] = 512
    """Longest prompt + answer in tokens."""

    max_target_length: Annotated[int, Field(ge=1)] = 128
    """Longest answer in tokens; the prompt is cut first, so an answer is never dropped whole."""

    tokenizer: UnsetOrNonBlankStr = None
    """Tokenizer: unset (not "") uses the model's own (for `tiny`: a byte-level BPE trained on the training
    data); `bpe` forces that offline BPE; anything else is a hub id or folder."""

    prompt_template: NonBlankStr = "Question: {question}\nAnswer:"
    """How a question becomes the prompt; the loss is on the answer tokens only."""

    @field_validator("train_file", "eval_file")
    @classmethod
    def _resolve(cls, value: str | None, info: ValidationInfo) -> str | None:
        # NOTE: paths are resolved against the config file's folder (passed as validation context)
        # so a config works from any working directory and run.yaml holds absolute paths.
        if value is None:
            return None
        base = (info.context or {}).get("base_dir")
        path = Path(value).expanduser()
        if base is not None and not path.is_absolute():
            path = Path(base) / path
        return str(path) if base is not None else value

    @field_validator("prompt_template")
    @classmethod
    def _has_question(cls, value: str) -> str:
        if "{question}" not in value:
            raise ValueError("prompt_template must contain {question}")
        return value


class TrainingConfig(_Section):
    epochs: Annotated[int, Field(ge=1)] = 1
    """Passes over the training data (ignored when `max_steps` is set)."""

    max_steps: Annotated[int, Field(ge=1)] | None = None
    """Stop after this many optimizer steps (overrides `epochs`)."""

    learning_rate: Annotated[float, Field(gt=0)] = 2e-5
    """Peak learning rate, reached after warmup."""

    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    """AdamW weight decay."""

    warmup_steps: Annotated[int, Field(ge=0)] = 100
    """Linear warmup from 0 to `learning_rate`, in optimizer steps."""

    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warmup: linear or cosine to 0 at the last step, or constant."""

    micro_batch_size: Annotated[int, Field(ge=1)] = 1
    """Sequences per rank per forward pass (the seed's `per_device_batch_size`)."""

    gradient_accumulation_steps: Annotated[int, Field(ge=1)] = 8
    """Micro-batches accumulated per optimizer step."""

    max_grad_norm: Annotated[float, Field(ge=0)] = 1.0
    """Gradient clipping by global norm; 0 disables clipping."""

    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Training precision. CPU-only runs must use fp32 (unless `bf16_on_cpu`)."""

    bf16_on_cpu: bool = False
    """For tests only: let `precision: bf16` train without GPUs (DeepSpeed's CPU accelerator),
    to exercise the bf16 path (engine config, checkpoints, resume, export) on a machine without
    GPUs. Slow: bf16 on a CPU is 2-4x slower than fp32. No effect when `cluster.gpus_per_node` > 0."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage. MoE needs 1 or 2 (DeepSpeed refuses native MoE with stage 3)."""

    seed: int = 42
    """Seed for weights, data order and routing noise; a resumed run follows the same trajectory."""

    logging_steps: Annotated[int, Field(ge=1)] = 10
    """Log metrics every N optimizer steps."""

    save_steps: Annotated[int, Field(ge=1)] = 500
    """Save a checkpoint every N optimizer steps (and always at the end)."""

    eval_steps: Annotated[int, Field(ge=1)] | None = None
    """Evaluate every N optimizer steps; unset evaluates at the start and the end only."""

    keep_checkpoints: Annotated[int, Field(ge=1)] | None = 3
    """Keep the newest N checkpoints (the newest valid one is never deleted); unset keeps all."""

    async_save: bool = False
    """Write periodic checkpoints in the background: training stops only while the state is copied
    to CPU memory (one more copy of the rank's checkpoint in RAM), then a thread writes, hashes and
    publishes it. A save never starts before the previous one is published; the save on a stop
    signal and the final save stay synchronous."""

    num_threads: Annotated[int, Field(ge=1)] | None = None
    """torch threads per rank on CPU; unset means `cluster.cpus_per_task`."""

    export_on_finish: bool = False
    """Write a Hugging Face folder (`<run>/export`) when training completes."""


NotifyEvent = Literal["attempt_start", "preempted", "hung", "failed", "completed", "cancelled"]
"""What a notification is about (orchestrator/notify.py): an attempt started; it stopped on a
preemption or its time limit; it hung; it failed; the run completed; it was cancelled."""
DEFAULT_NOTIFY_EVENTS: tuple[NotifyEvent, ...] = ("attempt_start", "preempted", "hung", "failed", "completed")


class NotifyConfig(_Section):
    webhook: UnsetOrNonBlankStr = None
    """URL that receives each notification as a JSON POST: a Slack-compatible `text` line plus the
    structured event (`kind`, `run_id`, `attempt_key`, `job_id`, `step`, ...). It is written into
    run.yaml; a URL that holds a secret (a Slack hook path, a token) belongs in `webhook_env`."""

    webhook_env: EnvName | None = None
    """Name of an environment variable that holds the webhook URL, read where a notification is
    sent (the job and `watch`); list it in `cluster.env_passthrough` too, so the job receives it."""

    command: UnsetOrNonBlankStr = None
    """A shell command run with each notification as JSON on its stdin (e.g. a script that mails
    or pages), from the job and from `watch`; at most `timeout_s` seconds."""

    events: list[NotifyEvent] = Field(default_factory=lambda: list(DEFAULT_NOTIFY_EVENTS))
    """Which notifications to send (add `cancelled` for cancellations)."""

    timeout_s: Annotated[float, Field(gt=0, le=60)] = 10.0
    """Seconds a webhook or command may take. A notification that fails or times out is logged
    (`<run>/notifications.jsonl`) and never fails the run."""

    @model_validator(mode="after")
    def _one_webhook(self) -> NotifyConfig:
        if self.webhook is not None and self.webhook_env is not None:
            raise _fail(
                "notify.webhook_env",
                "set either notify.webhook (the URL) or notify.webhook_env (the name of a variable "
                "holding it), not both",
            )
        return self


class SweepConfig(_Section):
    grid: dict[NonBlankStr, list[Any]] = Field(default_factory=dict)
    """Config fields to sweep, each with its values, e.g. `{training.learning_rate: [1.0e-3,
    3.0e-4], moe.top_k: [1, 2]}`: `moe-orch sweep` runs every combination (the cartesian product)
    as one element, a run of its own, all in one SLURM job array (`--grid KEY=V1,V2` adds more)."""

    max_parallel: Annotated[int, Field(ge=1)] | None = None
    """Elements running at once (`--array=0-(n-1)%P`); unset runs all at once."""


class RunConfig(_Section):
    """A moe-orch run: resources, model, MoE layout, data and training."""

    name: NonBlankStr
    """Run name: letters, digits, `.`, `_` and `-`. The run id adds a unique suffix."""

    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    """Resources and scheduler settings."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    """The dense parent model."""

    moe: MoeConfig = Field(default_factory=MoeConfig)
    """How the dense FFNs become Mixture-of-Experts layers."""

    data: DataConfig = Field(default_factory=DataConfig)
    """Training and evaluation data."""

    training: TrainingConfig = Field(default_factory=TrainingConfig)
    """Optimisation, precision, logging and checkpoints."""

    notify: NotifyConfig = Field(default_factory=NotifyConfig)
    """Notifications on attempt start, preemption, hang, failure and completion (webhook, command)."""

    sweep: SweepConfig | None = None
    """A grid of values for `moe-orch sweep` (ignored by `submit`); unset in each element's run.yaml."""

    @field_validator("name")
    @classmethod
    def _name_chars(cls, value: str) -> str:
        if not NAME_RE.match(value) or len(value) > 64:
            raise ValueError(
                f"run name {value!r} may use only letters, digits, '.', '_' and '-' (at most 64), "
                "e.g. mpt7b-moe-4x8"
            )
        return value

    # --- derived numbers (one place; validate's summary and the worker both read them) ---
    @property
    def world_size(self) -> int:
        return self.cluster.world_size

    @property
    def data_parallel_size(self) -> int:
        # NOTE: in DeepSpeed MoE every rank is a data-parallel rank for the dense part; experts are
        # replicated over world_size / ep_size ranks (the expert-data-parallel group).
        return self.cluster.world_size

    @property
    def ep_size(self) -> int:
        return self.moe.ep_size if self.moe.enabled else 1

    @property
    def expert_data_parallel_size(self) -> int:
        return self.world_size // self.ep_size

    @property
    def global_batch_size(self) -> int:
        t = self.training
        return t.micro_batch_size * t.gradient_accumulation_steps * self.data_parallel_size

    @property
    def tokens_per_step(self) -> int:
        """Upper bound: every sequence padded to `max_seq_length`."""
        return self.global_batch_size * self.data.max_seq_length

    @property
    def cpu_only(self) -> bool:
        return self.cluster.gpus_per_node == 0

    @model_validator(mode="after")
    def _cross_field_rules(self) -> RunConfig:
        c, m, t, d = self.cluster, self.moe, self.training, self.data
        if c.executor == "local" and c.nodes > 1:
            raise _fail(
                "cluster.nodes",
                f"the local executor runs one node, got nodes: {c.nodes}; "
                "use executor: slurm or nodes: 1",
            )
        if c.gpus_per_node and c.tasks_per_node > c.gpus_per_node:
            raise _fail(
                "cluster.tasks_per_node",
                f"{c.tasks_per_node} ranks per node but only {c.gpus_per_node} GPUs per node; "
                f"set tasks_per_node: {c.gpus_per_node} (one rank per GPU)",
            )
        if m.enabled:
            if m.num_experts % m.ep_size:
                divisors = [k for k in range(1, m.num_experts + 1) if m.num_experts % k == 0]
                raise _fail(
                    "moe.ep_size",
                    f"num_experts {m.num_experts} is not divisible by ep_size {m.ep_size}; "
                    f"use an ep_size in {divisors} or change num_experts",
                )
            if c.world_size % m.ep_size:
                raise _fail(
                    "moe.ep_size",
                    f"world size {c.world_size} (nodes {c.nodes} x tasks_per_node "
                    f"{c.tasks_per_node}) is not divisible by ep_size {m.ep_size}",
                )
            if t.zero_stage == 3:
                raise _fail(
                    "training.zero_stage",
                    "DeepSpeed refuses native MoE with ZeRO stage 3; use zero_stage: 2",
                )
        if d.max_target_length >= d.max_seq_length:
            raise _fail(
                "data.max_target_length",
                f"max_target_length {d.max_target_length} must be less than max_seq_length "
                f"{d.max_seq_length} (the prompt needs room)",
            )
        if t.precision != "fp32" and self.cpu_only and not (t.precision == "bf16" and t.bf16_on_cpu):
            switch = " (training.bf16_on_cpu: true allows it on CPU, for tests)" * (t.precision == "bf16")
            raise _fail(
                "training.precision",
                f"{t.precision} needs GPUs (DeepSpeed on CPU rejects fp16; bf16 is 2-4x slower); "
                f"use precision: fp32 or set cluster.gpus_per_node{switch}",
            )
        if self.model.is_tiny and isinstance(m.layers, list):
            bad = [i for i in m.layers if i >= self.model.tiny.n_layers]
            if bad:
                raise _fail(
                    "moe.layers",
                    f"layer indices {bad} do not exist: the tiny model has "
                    f"{self.model.tiny.n_layers} layers (0..{self.model.tiny.n_layers - 1})",
                )
        webhook_env = self.notify.webhook_env
        if webhook_env is not None and webhook_env not in c.env_passthrough:
            raise _fail(
                "notify.webhook_env",
                f"{webhook_env} is not in cluster.env_passthrough, so the job would not receive the "
                f"webhook URL; add it: cluster.env_passthrough: [{webhook_env}]",
            )
        if c.continue_with == "chain" and c.executor != "slurm":
            raise _fail(
                "cluster.continue_with",
                "chain submits the next job with sbatch, so it needs executor: slurm; use "
                "continue_with: requeue (the default) with the local executor",
            )
        if c.gpu_mem_gb is not None:
            # Imported here: the estimate needs the architecture table, not needed for parsing.
            from orchestrator.spec.estimate import estimate_memory

            est = estimate_memory(self)
            if est is not None and est.total_gb > c.gpu_mem_gb:
                raise _fail(
                    "cluster.gpu_mem_gb",
                    f"estimated model states need {est.total_gb:.1f} GB per GPU but gpu_mem_gb is "
                    f"{c.gpu_mem_gb:g}; raise moe.ep_size or the number of ranks, or use fewer experts",
                )
        return self


_DOCS_ATTACHED = False


def attach_field_docs() -> None:
    """Give every field of this module's models the docstring under it as its description (as
    pydantic's `use_attribute_docstrings` would), once, and rebuild the models so that the JSON
    Schema carries them. Only the schema's readers for people call it (`json_schema`, the
    Markdown reference)."""
    import ast
    import inspect
    import sys

    global _DOCS_ATTACHED
    if _DOCS_ATTACHED:
        return
    module = sys.modules[__name__]
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    docs: dict[str, dict[str, str]] = {}
    order: list[type[BaseModel]] = []
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        cls = getattr(module, node.name, None)
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            continue
        order.append(cls)
        found = docs.setdefault(node.name, {})
        for field, after in zip(node.body, node.body[1:], strict=False):
            if (
                isinstance(field, ast.AnnAssign)
                and isinstance(field.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                found[field.target.id] = inspect.cleandoc(after.value.value)
    for cls in order:
        mine: dict[str, str] = {}
        for base in reversed(cls.__mro__):  # a section's own docstring wins over its base's
            mine.update(docs.get(base.__name__, {}) if base.__module__ == __name__ else {})
        for name, info in cls.model_fields.items():
            if info.description is None and name in mine:
                info.description = mine[name]
        cls.model_rebuild(force=True)
    _DOCS_ATTACHED = True


def json_schema() -> dict[str, Any]:
    """JSON Schema of the run config, for editors' YAML support (`moe-orch schema`)."""
    attach_field_docs()
    schema = RunConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "moe-orch run config"
    return schema
