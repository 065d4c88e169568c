"""Built-in models that need no download (DESIGN §6)."""

from fragjobs.builtin.configs import BUILTINS, BuiltinSpec
from fragjobs.builtin.tokenizer import build_byte_tokenizer

__all__ = ["BUILTINS", "BuiltinSpec", "build_byte_tokenizer"]
