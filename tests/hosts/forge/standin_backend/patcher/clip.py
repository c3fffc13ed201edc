"""Stand-in for Forge's `CLIP` patcher object: text encoders, tokenizers, one ModelPatcher."""

import torch
from backend.patcher.base import ModelPatcher

CPU = torch.device("cpu")


class JointTextEncoder(torch.nn.ModuleDict):
    pass


class ObjectDict:
    def __init__(self, items):
        self.__dict__.update(items)


class CLIP:
    def __init__(self, model_dict, tokenizer_dict, device=CPU):
        self.cond_stage_model = JointTextEncoder(model_dict)
        self.tokenizer = ObjectDict(tokenizer_dict)
        self.patcher = ModelPatcher(self.cond_stage_model, load_device=device, offload_device=CPU)
