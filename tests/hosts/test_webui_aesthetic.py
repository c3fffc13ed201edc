"""Aesthetic gradients in the WebUIs: a private copy of each host tower, and the hook on the hosts'
`process_tokens` that mixes in the personalised conditioning."""

from __future__ import annotations

import pytest
import torch
from webui_support import A1111_SHAPES, FORGE_SHAPES

from lib_training.aesthetic.personalise import PrivateTower
from lib_training.model.prompt import tokenize

SHAPES = [("a1111", arch) for arch in A1111_SHAPES] + [("forge", arch) for arch in FORGE_SHAPES]


@pytest.mark.parametrize(("kind", "arch"), SHAPES)
def test_the_private_copy_of_each_host_tower_conditions_like_the_host(kind, arch, request, standalone) -> None:
    webui = request.getfixturevalue(kind)
    webui.load(standalone[arch])
    host = webui.module("lib_training.hosts.extension").make_host()
    with host.session() as model, torch.no_grad():
        for encoder in model.text_encoders:
            weights = encoder.tower_weights()
            projection = None if weights.config.projection_dim else torch.randn(encoder.width, 16)
            tower = PrivateTower(encoder, projection, model.device)
            ids = tokenize(["a red ball, on grass"], encoder.tokenizer, {}).ids[:, 0]
            embeds = encoder.token_embedding(ids)
            ours, theirs = tower.module.encode_embeddings(embeds, ids), encoder.encode_embeddings(embeds, ids)
            torch.testing.assert_close(ours.hidden, theirs.hidden.float(), atol=1e-5, rtol=1e-4)
            if theirs.pooled is not None:
                torch.testing.assert_close(ours.pooled, theirs.pooled.float(), atol=1e-5, rtol=1e-4)
            host_ptrs = {t.data_ptr() for t in weights.state.values()}
            assert not host_ptrs & {p.data_ptr() for p in tower.module.parameters()}
