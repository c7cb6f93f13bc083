"""Building a model for inference from files on disk, shared by the programs that read checkpoints."""

from . import checkpoint
from .errors import TinyPalmError
from .model import PaLM
from .tokenizer import tokenizer_from_dict


def load_model(ckpt_path, adapter_path=None, backend="numpy", dtype=None):
    """(model, tokenizer, checkpoint): a checkpoint's weights (a file or a training --out directory) on a backend.

    dtype defaults to the one the checkpoint was trained in. adapter_path names adapter weights trained on top of
    this checkpoint, to be applied to the model built here."""
    ckpt = checkpoint.load(ckpt_path)
    tokenizer = tokenizer_from_dict(ckpt.tokenizer_dict)
    if tokenizer.vocab_size > ckpt.config.vocab_size:
        raise TinyPalmError(f"{ckpt.path}: its tokenizer has {tokenizer.vocab_size} tokens but the model only "
                            f"{ckpt.config.vocab_size}; the file is damaged, use another checkpoint")
    model = PaLM(ckpt.config, backend=backend, dtype=dtype or ckpt.meta.get("dtype", "float32"))
    model.load_params(ckpt.params)
    if adapter_path is not None:
        raise TinyPalmError(f"--adapter {adapter_path}: this tinypalm cannot apply adapters yet; "
                            "evaluate the checkpoint alone")
    return model, tokenizer, ckpt
