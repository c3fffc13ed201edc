"""Aesthetic gradients in the WebUIs: a private copy of each host tower, and the hook on the hosts'
`process_tokens` that mixes in the personalised conditioning."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from webui_support import A1111_SHAPES, FORGE_SHAPES

from lib_training.aesthetic.embedding_file import save_embedding
from lib_training.aesthetic.personalise import AestheticSettings, PrivateTower
from lib_training.model.prompt import tokenize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for aesthetic_support
from aesthetic_support import tiny_clip

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "aesthetic_gradients.py"
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


def _chunk(engine, text: str) -> list[list[int]]:
    """One prompt as the hosts make a chunk: BOS, tokens, EOS, padded with EOS to 77."""
    row = [engine.id_start, *engine.tokenize([text])[0][:75], engine.id_end]
    return [row + [engine.id_end] * (77 - len(row))]


@pytest.mark.parametrize(("kind", "arch"), SHAPES)
def test_a_generation_personalises_the_hosts_conditioning_and_leaves_nothing_behind(
    kind, arch, request, standalone, tmp_path
) -> None:
    webui = request.getfixturevalue(kind)
    ours = standalone[arch]
    webui.load(ours)
    from lib_training.hosts import aesthetic

    sd_model = webui.shared.sd_model
    engines = aesthetic.text_engines(sd_model)
    target_key = {"sd1": "clip_l", "sd2": "clip_h", "sdxl": "clip_g"}[arch]
    width = 32 if arch == "sd1" else 128  # SD1: the tiny CLIP's features; SD2 and bigG: their own projection
    save_embedding(webui.data / "models" / "aesthetic_embeddings" / "style.pt", torch.randn(1, width))
    clip = tiny_clip(tmp_path / "clip", text_width=ours.text_encoders[0].width)
    chunks = {key: _chunk(engine, "a red ball") for engine, key in engines}
    ones = [[1.0] * 77]
    with torch.no_grad():
        plain = {key: engine.process_tokens(chunks[key], ones) for engine, key in engines}
    before = webui.snapshot()
    p = SimpleNamespace(sd_model=sd_model, extra_generation_params={})
    values = ("style", 0.9, 3, "0.001", False, "", 0.1, False, str(clip.weights) if arch == "sd1" else "")
    aesthetic.process(p, *values)
    try:
        with torch.inference_mode() if kind == "forge" else torch.no_grad():  # Forge generates in inference mode
            tuned = {key: engine.process_tokens(chunks[key], ones) for engine, key in engines}
            count = aesthetic.hooks._session.personaliser.optimisations
            again = {key: engine.process_tokens(chunks[key], ones) for engine, key in engines}
        assert aesthetic.hooks._session.personaliser.optimisations == count == 1  # the second is cached
    finally:
        aesthetic.after_generation(p)
    for engine, key in engines:
        assert "process_tokens" not in vars(engine)
        assert torch.equal(again[key], tuned[key])
        if key == target_key:
            assert not torch.allclose(tuned[key], plain[key])
            if getattr(plain[key], "pooled", None) is not None:
                assert not torch.allclose(tuned[key].pooled, plain[key].pooled)
        else:
            assert torch.equal(tuned[key], plain[key])
        with torch.no_grad():
            assert torch.equal(engine.process_tokens(chunks[key], ones), plain[key])
    assert webui.snapshot() == before
    assert p.extra_generation_params["Aesthetic embedding"] == "style" and p.cached_c == [None, None]


def test_the_script_is_an_always_visible_section_with_the_extensions_infotext(a1111) -> None:
    import gradio as gr

    spec = importlib.util.spec_from_file_location("aesthetic_gradients.py", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    script = module.AestheticGradientsScript()
    assert script.show(False) is a1111.module("modules.scripts").AlwaysVisible
    with gr.Blocks():
        inputs = script.ui(False)
    assert len(inputs) == 9
    names = [name for _, name in script.infotext_fields]
    assert sorted(names) == sorted(AestheticSettings().infotext("x"))


def test_an_override_installed_before_ours_is_called_and_put_back(a1111, standalone) -> None:
    """The aesthetic-gradients extension itself replaces `process_tokens` for good; ours wraps it."""
    from lib_training.hosts import aesthetic

    a1111.load(standalone["sd2"])
    sd_model = a1111.shared.sd_model
    engine = sd_model.cond_stage_model
    calls = []

    def theirs(tokens, multipliers):
        calls.append(1)
        return type(engine).process_tokens(engine, tokens, multipliers)

    engine.process_tokens = theirs
    save_embedding(a1111.data / "models" / "aesthetic_embeddings" / "style.pt", torch.randn(1, 128))
    p = SimpleNamespace(sd_model=sd_model, extra_generation_params={})
    aesthetic.process(p, "style", 0.9, 1, "0.001", False, "", 0.1, False, "")
    with torch.no_grad():
        engine.process_tokens(_chunk(engine, "a red ball"), [[1.0] * 77])
    aesthetic.after_generation(p)
    assert calls == [1] and vars(engine)["process_tokens"] is theirs


def test_weight_zero_writes_the_infotext_and_hooks_nothing(a1111, standalone) -> None:
    from lib_training.hosts import aesthetic

    a1111.load(standalone["sd2"])
    sd_model = a1111.shared.sd_model
    save_embedding(a1111.data / "models" / "aesthetic_embeddings" / "style.pt", torch.randn(1, 128))
    p = SimpleNamespace(sd_model=sd_model, extra_generation_params={})
    aesthetic.process(p, "style", 0.0, 5, "0.0001", False, "", 0.1, False, "")
    assert "process_tokens" not in vars(sd_model.cond_stage_model)
    assert p.extra_generation_params["Aesthetic weight"] == 0.0
    aesthetic.after_generation(p)


def test_what_only_training_refuses_does_not_stop_a_generation(a1111, standalone) -> None:
    """--lowvram moves the model block by block, which training cannot work with; the text towers'
    private copies need none of that."""
    from lib_training.hosts import aesthetic

    a1111.load(standalone["sd2"])
    a1111.shared.cmd_opts.lowvram = True
    sd_model = a1111.shared.sd_model
    save_embedding(a1111.data / "models" / "aesthetic_embeddings" / "style.pt", torch.randn(1, 128))
    p = SimpleNamespace(sd_model=sd_model, extra_generation_params={})
    aesthetic.process(p, "style", 0.9, 1, "0.001", False, "", 0.1, False, "")
    try:
        assert "process_tokens" in vars(sd_model.cond_stage_model)
    finally:
        aesthetic.after_generation(p)
