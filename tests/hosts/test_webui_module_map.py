"""The adapters build the module map of the WebUIs' loaded models exactly as the standalone model
does: same kohya names, checkpoint keys, kinds and sizes, each entry on the host's live layer.

Every A1111 and Forge shape of the stand-ins (ldm SD1/SD2, sgm SDXL, Forge SD1/SD2/SDXL): in a
session on the tiny models, whose random weights show a layer mapped to the wrong key, and at full
size on the meta device through the adapters' `build_model` (meta tensors cannot be hashed, so no
session there). That the full-size names are kohya's is checked in tests/test_module_map.py.
"""

from __future__ import annotations

import pytest
import torch
from fullsize import full_size_model
from torch import nn
from webui_support import A1111_SHAPES, FORGE_SHAPES

from lib_training.formats.family import Arch
from lib_training.formats.fingerprint import hooks_snapshot, weights_fingerprint
from lib_training.model.layers import is_linear

SHAPES = [("a1111", arch) for arch in A1111_SHAPES] + [("forge", arch) for arch in FORGE_SHAPES]


@pytest.mark.parametrize(("kind", "arch"), SHAPES)
def test_host_map_equals_the_standalone_map_on_the_hosts_live_layers(kind, arch, request, standalone) -> None:
    webui = request.getfixturevalue(kind)
    ours = standalone[arch]
    webui.load(ours)
    stored = ours.checkpoint_state_dict()
    host = webui.module("lib_training.hosts.extension").make_host()
    with host.session() as model:
        before = weights_fingerprint(webui.host_modules()), hooks_snapshot(webui.host_modules())
        module_map = model.module_map()
        assert (weights_fingerprint(webui.host_modules()), hooks_snapshot(webui.host_modules())) == before
        assert [e.spec() for e in module_map] == [e.spec() for e in ours.module_map()]
        roots = {root.component: root.module for root in model.module_roots}
        host_params = {id(p) for m in webui.host_modules().values() for p in m.parameters()}
        for entry in module_map:
            assert roots[entry.component].get_submodule(entry.path) is entry.module, entry.kohya
            weight = entry.module.weight if entry.rows is None else entry.module.in_proj_weight
            assert id(weight) in host_params, entry.kohya  # the host's own layer, not a copy
            want = stored[entry.key]
            if entry.key_rows is not None:
                want = want[entry.key_rows[0] : entry.key_rows[1]]
            torch.testing.assert_close(entry.weight(), want, rtol=0, atol=0, msg=entry.kohya)


@pytest.mark.parametrize(("kind", "arch"), SHAPES)
def test_full_size_host_map_equals_the_standalone_map(kind, arch, request) -> None:
    webui = request.getfixturevalue(kind)
    ours = full_size_model(Arch(arch))
    with torch.device("meta"):
        webui.load(ours)
    adapter = webui.module(f"lib_training.hosts.{'forge' if kind == 'forge' else 'a1111'}")
    model = adapter.build_model(webui.shared.sd_model)
    module_map = model.module_map()
    assert [e.spec() for e in module_map] == [e.spec() for e in ours.module_map()]
    roots = {root.component: root.module for root in model.module_roots}
    for entry in module_map:
        assert roots[entry.component].get_submodule(entry.path) is entry.module, entry.kohya
        kernel = () if entry.kernel is None else entry.kernel
        assert tuple(entry.weight().shape) == (entry.out_features, entry.in_features, *kernel), entry.kohya


def _fused_text_entries(module_map) -> list:
    return [e for e in module_map if e.rows is not None]


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_a1111_open_clip_q_k_v_are_rows_of_its_multihead_attention(arch, a1111, standalone) -> None:
    a1111.load(standalone[arch])
    host = a1111.module("lib_training.hosts.extension").make_host()
    with host.session() as model:
        module_map = model.module_map()
        fused = _fused_text_entries(module_map)
        key = "clip_h" if arch == "sd2" else "clip_g"
        layers = standalone[arch].text_encoder(key).config.layers
        assert len(fused) == 3 * layers
        assert all(isinstance(e.module, nn.MultiheadAttention) and e.rows == e.key_rows for e in fused)
        clip_l = module_map.select(component="clip_l")
        assert all(e.rows is None and isinstance(e.module, nn.Linear) for e in clip_l)


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_forge_towers_have_separate_q_k_v_linears_under_the_same_names(arch, forge, standalone) -> None:
    forge.load(standalone[arch])
    host = forge.module("lib_training.hosts.extension").make_host()
    with host.session() as model:
        module_map = model.module_map()
        assert _fused_text_entries(module_map) == []
        name = f"lora_{'te' if arch == 'sd2' else 'te2'}_text_model_encoder_layers_1_self_attn_k_proj"
        entry = module_map.by_kohya(name)
        assert is_linear(entry.module)  # Forge's own Linear class
        assert entry.path == "text_model.encoder.layers.1.self_attn.k_proj"
        assert entry.key.endswith("transformer.resblocks.1.attn.in_proj_weight")
        width = entry.in_features
        assert entry.key_rows == (width, 2 * width)
