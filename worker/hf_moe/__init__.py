"""The Hugging Face modeling code of exported MoE models (`model_type: mpt_moe`).

`configuration_mpt_moe.py` and `modeling_mpt_moe.py` import only torch and transformers: export
copies them beside the weights, and `config.json`'s `auto_map` points at them, so
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works without moe-orch.
"""

from __future__ import annotations

from pathlib import Path

HF_MOE_DIR = Path(__file__).resolve().parent
MODEL_FILES = ("configuration_mpt_moe.py", "modeling_mpt_moe.py")
AUTO_MAP = {
    "AutoConfig": "configuration_mpt_moe.MptMoeConfig",
    "AutoModelForCausalLM": "modeling_mpt_moe.MptMoeForCausalLM",
}


def register() -> None:
    """Register `mpt_moe` with transformers' Auto classes in this process (no remote code needed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .configuration_mpt_moe import MptMoeConfig
    from .modeling_mpt_moe import MptMoeForCausalLM

    AutoConfig.register("mpt_moe", MptMoeConfig, exist_ok=True)
    AutoModelForCausalLM.register(MptMoeConfig, MptMoeForCausalLM, exist_ok=True)
