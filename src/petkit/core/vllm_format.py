"""What vLLM's LoRA loader accepts, checked on a PEFT adapter (`petkit export --format vllm`).

vLLM reads a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`). The rules below
are taken from vLLM's own validation code (vllm-project/vllm, main branch):

- `vllm/lora/peft_helper.py`, `PEFTHelper.from_dict`: `r`, `lora_alpha` and `target_modules`
  are required fields. `__post_init__`: `r` must be a positive integer.
- `PEFTHelper._validate_features`: `modules_to_save` must be empty ("vLLM only supports
  modules_to_save being None"); `use_dora` must be false ("vLLM does not yet support DoRA";
  `vllm/lora/lora_model.py`, `LoRAModel.from_lora_tensors`, raises NotImplementedError for it too).
- `PEFTHelper.validate_legal`: `bias` must be "none" ("Adapter bias is not supported"); `r` (and
  every `rank_pattern` rank) must be <= the server's `--max-lora-rank`.
- `vllm/config/lora.py`, `MaxLoRARanks`: `--max-lora-rank` is one of 1, 8, 16, 32, 64, 128, 256,
  320, 512 (default 16), so no rank above 512 can be served.
- `vllm/lora/utils.py`, `parse_fine_tuned_lora_name`: every tensor is
  `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (or `lora_embedding_A/B`);
  anything else (PEFT's `lora_B.bias` of `lora_bias`, a module copy) is "unsupported LoRA weight".
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .adapter_schema import read_json
from .safetensors_header import read_header
from .errors import AdapterLoadError

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks
REQUIRED = ("r", "lora_alpha", "target_modules")  # vllm/lora/peft_helper.py PEFTHelper
_WEIGHT_ENDINGS = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")


def max_lora_rank(r: int) -> int:
    """The smallest `--max-lora-rank` choice that serves rank `r` (ValueError above 512)."""
    for choice in MAX_LORA_RANKS:
        if r <= choice:
            return choice
    raise ValueError(f"rank {r} is above vLLM's largest --max-lora-rank {MAX_LORA_RANKS[-1]}")


def _ranks(config: Mapping[str, Any]) -> list[Any]:
    pattern = config.get("rank_pattern") or {}
    return [config.get("r"), *(pattern.values() if isinstance(pattern, Mapping) else ())]


def _rank_problems(config: Mapping[str, Any]) -> list[str]:
    ranks = _ranks(config)
    if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
        return [f"its rank r={config.get('r')!r} is not a positive integer"]
    if max(ranks) > MAX_LORA_RANKS[-1]:
        return [f"its rank {max(ranks)} is above the largest --max-lora-rank vLLM offers "
                f"({MAX_LORA_RANKS[-1]})"]
    return []


def vllm_problems(config: Mapping[str, Any], tensor_names: Iterable[str]) -> list[str]:
    """Why vLLM would refuse the PEFT adapter `config` with tensors `tensor_names` ([] if none)."""
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        return [f"adapter_config.json lacks {', '.join(missing)}"]
    problems = _rank_problems(config)
    if config.get("modules_to_save"):
        problems.append(f"it trains whole modules ({', '.join(config['modules_to_save'])}: "
                        "modules_to_save, e.g. a classification head)")
    if config.get("target_parameters"):
        problems.append("it adapts mixture-of-experts weights (target_parameters), which this export does not "
                        "check vLLM loads; use --format peft")
    if config.get("use_dora"):
        problems.append("it is DoRA (use_dora), which vLLM does not support")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("it trains biases (bias / lora_bias), which vLLM does not support")
    odd = [n for n in tensor_names if not n.endswith(_WEIGHT_ENDINGS)]
    if odd and not problems:  # a module copy, a bias or a magnitude: already said why
        problems.append(f"tensor {odd[0]!r} is not a LoRA A/B weight")
    return problems


def folder_problems(folder: str | Path) -> list[str]:
    """`vllm_problems` of a PEFT adapter folder (its config and its tensors' names)."""
    folder = Path(folder)
    config = read_json(folder / "adapter_config.json")
    if not isinstance(config, dict):
        raise AdapterLoadError(f"{folder / 'adapter_config.json'} is not a JSON object")
    return vllm_problems(config, read_header(folder / "adapter_model.safetensors").tensors)
