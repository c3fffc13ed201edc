"""Stand-in for A1111's `modules.sd_hijack`: the text-model wrapping and the attention optimisations.

The stand-in "optimisation" computes the same values without a gradient, standing for the
optimisations that make training fail or learn nothing: a session that did not undo it cannot train.
"""

import ldm.modules.attention
import ldm.modules.diffusionmodules.model
import ldm.modules.diffusionmodules.openaimodel
import sgm.modules.attention
import sgm.modules.diffusionmodules.model
import sgm.modules.diffusionmodules.openaimodel
import torch
import torch.nn.functional as F

from modules import sd_hijack_clip, sd_hijack_open_clip
from modules.hypernetworks import hypernetwork

original_cross_attention_forward = ldm.modules.attention.CrossAttention.forward
original_nonlinearity = ldm.modules.diffusionmodules.model.nonlinearity
original_attn_block_forward = ldm.modules.diffusionmodules.model.AttnBlock.forward


def optimized_cross_attention_forward(self, x, context=None, mask=None, **kwargs):
    with torch.no_grad():
        return original_cross_attention_forward(self, x, context, mask)


def optimized_attn_block_forward(self, x):
    return original_attn_block_forward(self, x)


class _OptimizedTh:
    cat = staticmethod(torch.cat)


optimized_th = _OptimizedTh()


def undo_optimizations():
    for module in (ldm, sgm):
        module.modules.diffusionmodules.model.nonlinearity = original_nonlinearity
        module.modules.attention.CrossAttention.forward = hypernetwork.attention_CrossAttention_forward
        module.modules.diffusionmodules.model.AttnBlock.forward = original_attn_block_forward


def apply_optimizations(option=None):
    undo_optimizations()
    for module in (ldm, sgm):
        module.modules.diffusionmodules.model.nonlinearity = F.silu
        module.modules.diffusionmodules.openaimodel.th = optimized_th
        module.modules.attention.CrossAttention.forward = optimized_cross_attention_forward
        module.modules.diffusionmodules.model.AttnBlock.forward = optimized_attn_block_forward
    return "stand-in optimisation"


class EmbeddingsWithFixes(torch.nn.Module):
    def __init__(self, wrapped, embeddings, textual_inversion_key="clip_l"):
        super().__init__()
        self.wrapped = wrapped
        self.embeddings = embeddings
        self.textual_inversion_key = textual_inversion_key

    def forward(self, input_ids):
        fixes = self.embeddings.fixes
        self.embeddings.fixes = None
        if fixes:
            raise NotImplementedError("the stand-in does not splice embeddings")
        return self.wrapped(input_ids)


class StableDiffusionModelHijack:
    fixes = None
    optimization_method = None

    def __init__(self):
        from modules import shared
        from modules.textual_inversion.textual_inversion import EmbeddingDatabase

        self.comments = []
        self.extra_generation_params = {}
        self.embedding_db = EmbeddingDatabase()
        self.embedding_db.add_embedding_dir(shared.cmd_opts.embeddings_dir)

    def apply_optimizations(self, option=None):
        self.optimization_method = apply_optimizations(option)

    def hijack(self, m):
        """Wrap the text models as A1111 does, then apply the attention optimisation."""
        conditioner = getattr(m, "conditioner", None)
        if conditioner is not None:
            for i, embedder in enumerate(conditioner.embedders):
                kind = type(embedder).__name__
                if kind == "FrozenCLIPEmbedder":
                    embeddings = embedder.transformer.text_model.embeddings
                    embeddings.token_embedding = EmbeddingsWithFixes(embeddings.token_embedding, self)
                    conditioner.embedders[i] = sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords(embedder, self)
                elif kind == "FrozenOpenCLIPEmbedder2":
                    embedder.model.token_embedding = EmbeddingsWithFixes(embedder.model.token_embedding, self, "clip_g")
                    conditioner.embedders[i] = sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords(
                        embedder, self
                    )
            m.cond_stage_model = conditioner
        elif type(m.cond_stage_model).__name__ == "FrozenCLIPEmbedder":
            embeddings = m.cond_stage_model.transformer.text_model.embeddings
            embeddings.token_embedding = EmbeddingsWithFixes(embeddings.token_embedding, self)
            m.cond_stage_model = sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords(m.cond_stage_model, self)
        elif type(m.cond_stage_model).__name__ == "FrozenOpenCLIPEmbedder":
            m.cond_stage_model.model.token_embedding = EmbeddingsWithFixes(
                m.cond_stage_model.model.token_embedding, self
            )
            m.cond_stage_model = sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords(m.cond_stage_model, self)
        self.apply_optimizations()


model_hijack = StableDiffusionModelHijack()
