"""Model shapes: the Config dataclass, its presets, and the parameter count."""

import math
from dataclasses import dataclass, asdict

from .errors import TinyPalmError


@dataclass
class Config:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int = 1            # 1: multi-query (PaLM); n_heads: multi-head; between: grouped-query
    head_dim: int | None = None    # None -> d_model // n_heads
    d_ff: int | None = None        # None -> 4 * d_model
    max_seq_len: int = 1024
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    z_loss: float = 1e-4           # weight of the auxiliary loss z_loss * log(Z)^2

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise TinyPalmError(f"config: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise TinyPalmError(f"config: d_model {self.d_model} is not divisible by n_heads {self.n_heads}; "
                                    "change one of them or set head_dim explicitly")
            self.head_dim = self.d_model // self.n_heads
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.n_heads % self.n_kv_heads:
            raise TinyPalmError(f"config: n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}; "
                                "each key/value head must serve the same number of query heads")
        if not isinstance(self.head_dim, int) or self.head_dim < 2 or self.head_dim % 2:
            raise TinyPalmError(f"config: head_dim must be an even integer of at least 2 (rotary embeddings pair "
                                f"dimension j with j + head_dim/2), got {self.head_dim!r}; by default it is "
                                "d_model / n_heads")
        if not isinstance(self.d_ff, int) or self.d_ff < 1:
            raise TinyPalmError(f"config: d_ff must be a positive integer, got {self.d_ff!r}")
        for name, positive in (("rope_base", True), ("norm_eps", True), ("z_loss", False)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (positive and value == 0):
                raise TinyPalmError(f"config: {name} must be a finite number, {'above' if positive else 'at least'} 0, "
                                    f"got {value!r}")

    @classmethod
    def preset(cls, name, **overrides):
        if name not in PRESETS:
            raise TinyPalmError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self):
        return asdict(self)

    def n_params(self, include_norms=True):
        """Parameters counted from the shapes alone (nothing is allocated); the tied embedding counts once.

        PaLM's Table 1 (8.63B, 62.50B, 540.35B) leaves out the LayerNorm gains: include_norms=False matches it."""
        D, H, Hkv, Dh, F = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.d_ff
        norms = (self.n_layers + 1) * D if include_norms else 0
        per_layer = D * H * Dh + 2 * D * Hkv * Dh + H * Dh * D + 3 * D * F
        return self.vocab_size * D + self.n_layers * per_layer + norms


PALM_SHAPE = dict(vocab_size=256000, n_kv_heads=1, head_dim=256, max_seq_len=2048)

PRESETS = {
    "tiny": dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=64),
    "small": dict(vocab_size=256, d_model=256, n_layers=4, n_heads=8, max_seq_len=256),
    "full": dict(vocab_size=32768, d_model=768, n_layers=12, n_heads=12, n_kv_heads=1, d_ff=3072, max_seq_len=1024),
    "palm-8b": dict(PALM_SHAPE, d_model=4096, n_layers=32, n_heads=16),
    "palm-62b": dict(PALM_SHAPE, d_model=8192, n_layers=64, n_heads=32),
    "palm-540b": dict(PALM_SHAPE, d_model=18432, n_layers=118, n_heads=48),
}
