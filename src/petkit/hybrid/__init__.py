"""Hybrid systems built from petkit's pieces (docs/hybrid.md): module transfer from a small model
to a larger one (PET-GC), porting a patch to an evolved base (PORTLLM), preference tuning (DPO
with the reference served by `pk.disabled`, MEET's control tokens then LoRA)."""
from petkit.hybrid.config import (HybridRecipe, TransferConfig, hybrid_recipe_from_dict,
                                  load_hybrid_recipe)
from petkit.hybrid.port import evolve_base, port_adapter, ported_from
from petkit.hybrid.preference import DPOModel, encode_pairs, meet, train_preference
from petkit.models.embedded.minilm_l3 import minilm_l3_dir
from petkit.hybrid.transfer import Transfer, transfer_adapter

__all__ = ["DPOModel", "HybridRecipe", "Transfer", "TransferConfig", "encode_pairs", "evolve_base",
           "hybrid_recipe_from_dict", "load_hybrid_recipe", "meet", "minilm_l3_dir",
           "port_adapter", "ported_from", "train_preference", "transfer_adapter"]
