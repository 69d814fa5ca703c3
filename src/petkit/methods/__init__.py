"""One file per method; importing this package registers them all."""
from .adapter import AdapterConfig
from .bitfit import BitFitConfig
from .lora import LoraConfig
from .prompt import PromptConfig

__all__ = ["AdapterConfig", "BitFitConfig", "LoraConfig", "PromptConfig"]
