"""Building a model for inference from files on disk, shared by the programs that read checkpoints."""

from . import checkpoint
from .errors import TinyPalmError
from .lora import load_adapter
from .model import PaLM
from .tokenizer import tokenizer_from_dict


def load_model(ckpt_path, adapter_path=None, backend="numpy", dtype=None, trains=True):
    """(model, tokenizer, checkpoint): a checkpoint's weights (a file or a training --out directory) on a backend.

    dtype defaults to the one the checkpoint was trained in. adapter_path names adapter weights trained on top of
    this checkpoint, to be applied to the model built here. trains=False: the weights will not change (sampling,
    evaluating), so a bfloat16 model keeps no float32 master (model.py)."""
    ckpt = checkpoint.load(ckpt_path)
    tokenizer = tokenizer_from_dict(ckpt.tokenizer_dict)
    if tokenizer.vocab_size > ckpt.config.vocab_size:
        raise TinyPalmError(f"{ckpt.path}: its tokenizer has {tokenizer.vocab_size} tokens but the model only "
                            f"{ckpt.config.vocab_size}; the file is damaged, use another checkpoint")
    model = PaLM(ckpt.config, backend=backend, dtype=dtype or ckpt.meta.get("dtype", "float32"), params=ckpt.params,
                 trains=trains)
    if adapter_path is not None:          # LoRA adapters, refused unless trained on this very checkpoint
        model.adapter = load_adapter(adapter_path, ckpt.params, ckpt.config, model.xp, model.dtype)
    return model, tokenizer, ckpt


def trained_length(model, ckpt):
    """The positions the model learned, as far as its files record: the --seq-len of the run that made the
    checkpoint, or its adapter's where that is longer; max_seq_len where none is recorded."""
    runs = [ckpt.train_args] + ([model.adapter.meta.get("train_args", {})] if model.adapter is not None else [])
    lengths = [int(run["seq_len"]) for run in runs if "seq_len" in run]
    return min(max(lengths, default=model.config.max_seq_len), model.config.max_seq_len)
