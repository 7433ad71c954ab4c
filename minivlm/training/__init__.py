"""Training: LLaVA's two stages on minivlm's models.

- labels.py: a conversation -> inputs and labels (only the assistant's turns are learned);
- loss.py: transformers' causal-LM loss (`minivlm.loss`);
- data.py: LLaVA's JSON training data, checked up front, and batching;
- lora.py: LoRA on the decoder's projections, merged or saved in PEFT's adapter layout;
- trainer.py: the loop (AdamW, warmup + cosine, accumulation, clipping, bf16, checkpointing,
  evaluation, resuming, torchrun data parallel);
- save.py: a trained model -> a checkpoint folder in the hub's layout.
"""

from .data import DataError, Example, read_llava_json, split
from .labels import IGNORE, LabelError, conversation_inputs, llava_messages
from .lora import LoraConfig, LoraError, apply_lora, load_adapter, merge_lora, save_adapter
from .loss import loss, loss_sum
from .save import SaveError, save_checkpoint
from .trainer import TrainConfig, TrainError, train

__all__ = [
    "IGNORE", "DataError", "Example", "LabelError", "LoraConfig", "LoraError", "SaveError", "TrainConfig",
    "TrainError", "apply_lora", "conversation_inputs", "llava_messages", "load_adapter", "loss", "loss_sum",
    "merge_lora", "read_llava_json", "save_adapter", "save_checkpoint", "split", "train",
]  # fmt: skip
