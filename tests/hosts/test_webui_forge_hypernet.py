"""`<hypernet:NAME:STRENGTH>` in Forge: applied by `scripts/hypernetworks_forge.py` through Forge's
attention patches on a clone of the UNet patcher, with the numbers of our own attachment, and nothing
of Forge's (its patchers' model_options, the model's weights and hooks) changed afterwards."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from lib_training.methods.hypernetwork import HypernetworkConfig, HypernetworkMethod, create_hypernetwork
from lib_training.methods.hypernetwork_attach import find_kv_sites

TIMESTEPS = torch.tensor([500])
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "hypernetworks_forge.py"


def load_script(webui) -> Any:
    """As the WebUIs load a script file; then the UI's `before_ui` callbacks, as the WebUI fires them."""
    extra_networks = webui.module("modules.extra_networks")
    if "hypernet" not in extra_networks.extra_network_registry:
        extra_networks.register_default_extra_networks()
    spec = importlib.util.spec_from_file_location(SCRIPT.name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    webui.module("modules.script_callbacks").before_ui_callback()
    return module


def make_file(webui, model, name: str = "hx", widths: str | None = None, seed: int = 3) -> Path:
    """A hypernetwork with modules for every width the model's attention reads (or `widths`), listed by the host."""
    if widths is None:
        widths = ", ".join(str(w) for w in sorted({site.width for site in find_kv_sites(model)}))
    settings = HypernetworkConfig(
        name=name, widths=widths, activation="relu", weight_init="KaimingNormal", layer_norm=True, init_seed=seed,
        overwrite=True,
    )  # fmt: skip
    path = create_hypernetwork(settings, webui.shared.cmd_opts.hypernetwork_dir)
    webui.shared.reload_hypernetworks()
    return path


class Probe:
    """A script after ours: what the sampler's UNet patcher holds when sampling starts."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, dict]] = []

    def process_before_every_sampling(self, p, *args, **kwargs) -> None:
        unet = p.sd_model.forge_objects.unet
        self.seen.append((unet, unet.model_options["transformer_options"].get("patches", {})))

    def process(self, p, *args) -> None:
        pass

    def postprocess(self, p, processed, *args) -> None:
        pass


def inputs(dm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fixed latents [1, C, 8, 8], context [1, 77, width] and (SDXL) vector [1, adm] for the UNet `dm`."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, dm.config.in_channels, 8, 8, generator=generator)
    c = torch.randn(1, 77, dm.config.context_dim, generator=generator)
    adm = dm.config.adm_in_channels
    return x, c, None if adm is None else torch.randn(1, adm, generator=generator)


def generate(webui, prompt: str, scripts: list[Any], n_iter: int = 1, **options: Any) -> list[torch.Tensor]:
    """The UNet outputs of a Forge txt2img generation of `prompt` (fixed latents and conditioning)."""
    processing = webui.module("modules.processing")
    sd_model = webui.shared.sd_model
    x, c, y = inputs(sd_model.forge_objects_original.unet.model.diffusion_model)
    runner = webui.module("modules.scripts").ScriptRunner(scripts)
    p = processing.StableDiffusionProcessing(
        sd_model, prompt, x, TIMESTEPS, c, y=y, n_iter=n_iter, scripts=runner, **options
    )
    with torch.inference_mode():  # Forge samples under inference mode
        return processing.process_images(p).outputs


def options_state(value: Any) -> Any:
    """model_options as comparable data: containers by content, anything else by identity."""
    if isinstance(value, dict):
        return {key: options_state(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [options_state(item) for item in value]
    return value if isinstance(value, str | int | float | bool | type(None)) else id(value)


def forge_state(webui) -> dict[str, Any]:
    engine = webui.shared.sd_model
    patchers = {
        "original": engine.forge_objects_original.unet,
        "after_lora": engine.forge_objects_after_applying_lora.unet,
        "current": engine.forge_objects.unet,
    }
    return {
        "model": webui.snapshot(),
        "patchers": {key: id(patcher) for key, patcher in patchers.items() if key != "current"},
        "options": {key: options_state(patcher.model_options) for key, patcher in patchers.items()},
        "registry": sorted(webui.module("modules.extra_networks").extra_network_registry),
    }


@pytest.mark.parametrize(("arch", "strength"), [("sd1", 1.0), ("sd1", 0.6), ("sdxl", 0.8)])
def test_a_hypernet_tag_changes_the_unet_output_exactly_as_our_attachment_does(
    forge, standalone, arch, strength
) -> None:
    engine = forge.load(standalone[arch])
    script = load_script(forge).ForgeHypernetworksScript()
    model = forge.module("lib_training.hosts.forge").build_model(engine)
    path = make_file(forge, model)

    plain = generate(forge, "a red ball", [script])[0]
    (applied,) = generate(forge, f"a red ball <hypernet:hx:{strength:g}>", [script])

    dm = engine.forge_objects_original.unet.model.diffusion_model
    x, c, y = inputs(dm)
    method = HypernetworkMethod.load(path, model)
    with torch.inference_mode(), method.apply_for_generation(model, strength):
        ours = dm(x, TIMESTEPS, context=c, y=y, transformer_options={})
    own = standalone[arch]  # our own model, the weights Forge's were loaded from
    with torch.inference_mode(), HypernetworkMethod.load(path, own).apply_for_generation(own, strength):
        standalone_out = own.unet_module(x, TIMESTEPS, context=c, y=y)
    assert not torch.equal(applied, plain)
    assert torch.equal(applied, ours)
    # our own UNet fuses projections that the host's computes one by one: equal up to rounding,
    # far below what the hypernetwork changes
    torch.testing.assert_close(applied, standalone_out, rtol=1e-4, atol=1e-5)
    assert (applied - plain).abs().max() > 1e-3
    assert forge.module("modules.errors").reported == []  # the tag was consumed: no warning
    assert forge.shared.loaded_hypernetworks == []  # Forge's own loader never read the file


def test_the_patches_are_on_a_clone_of_the_sampling_patcher_for_self_and_cross_attention(forge, standalone) -> None:
    engine = forge.load(standalone["sd1"])
    script = load_script(forge).ForgeHypernetworksScript()
    make_file(forge, forge.module("lib_training.hosts.forge").build_model(engine))
    make_file(forge, forge.module("lib_training.hosts.forge").build_model(engine), name="hy")
    probe = Probe()
    generate(forge, "a red ball <hypernet:hx:0.5> <hypernet:hy:1>", [script, probe])
    (unet, patches), *_ = probe.seen
    assert unet is not engine.forge_objects_after_applying_lora.unet
    assert unet.model is engine.forge_objects_after_applying_lora.unet.model
    for kind in ("attn1_patch", "attn2_patch"):
        assert [(patch.name, patch.strength) for patch in patches[kind]] == [("hx", 0.5), ("hy", 1.0)]


def test_hires_fixs_second_pass_applies_the_hypernetworks_of_its_own_prompt(forge, standalone) -> None:
    engine = forge.load(standalone["sd1"])
    script = load_script(forge).ForgeHypernetworksScript()
    make_file(forge, forge.module("lib_training.hosts.forge").build_model(engine))
    (plain,) = generate(forge, "a red ball", [script])
    (tagged,) = generate(forge, "a red ball <hypernet:hx:1>", [script])
    first, second = generate(forge, "a red ball <hypernet:hx:1>", [script], enable_hr=True, hr_prompt="a red ball")
    assert torch.equal(first, tagged) and torch.equal(second, plain)
    first, second = generate(forge, "a red ball", [script], enable_hr=True, hr_prompt="a red ball <hypernet:hx:1>")
    assert torch.equal(first, plain) and torch.equal(second, tagged)


def test_a_file_written_again_is_read_again(forge, standalone) -> None:
    engine = forge.load(standalone["sd1"])
    script = load_script(forge).ForgeHypernetworksScript()
    model = forge.module("lib_training.hosts.forge").build_model(engine)
    make_file(forge, model)
    (first,) = generate(forge, "a red ball <hypernet:hx:1>", [script])
    make_file(forge, model, seed=4)  # e.g. a training run saving it again
    (second,) = generate(forge, "a red ball <hypernet:hx:1>", [script])
    make_file(forge, model, seed=3)
    (third,) = generate(forge, "a red ball <hypernet:hx:1>", [script])
    assert not torch.equal(second, first) and torch.equal(third, first)


def test_strength_zero_and_no_tag_leave_the_output_as_forge_makes_it(forge, standalone) -> None:
    engine = forge.load(standalone["sd1"])
    script = load_script(forge).ForgeHypernetworksScript()
    make_file(forge, forge.module("lib_training.hosts.forge").build_model(engine))
    (without_script,) = generate(forge, "a red ball", [])
    (no_tag,) = generate(forge, "a red ball", [script])
    (zero,) = generate(forge, "a red ball <hypernet:hx:0>", [script])
    assert torch.equal(no_tag, without_script)
    assert torch.equal(zero, without_script)


def test_after_generations_forges_patchers_options_and_the_model_are_as_before(forge, standalone) -> None:
    engine = forge.load(standalone["sd1"])
    script = load_script(forge).ForgeHypernetworksScript()
    make_file(forge, forge.module("lib_training.hosts.forge").build_model(engine))
    before = forge_state(forge)
    probe = Probe()
    generate(forge, "a red ball <hypernet:hx:0.8>", [script, probe], n_iter=2)
    assert len(probe.seen) == 2 and all(patches for _, patches in probe.seen)  # applied at each sampling
    assert forge_state(forge) == before
    assert engine.forge_objects.unet is engine.forge_objects_after_applying_lora.unet


def test_forges_add_hypernetwork_to_prompt_setting_applies_it_at_the_default_multiplier(forge, standalone) -> None:
    engine = forge.load(standalone["sd1"])
    script = load_script(forge).ForgeHypernetworksScript()
    make_file(forge, forge.module("lib_training.hosts.forge").build_model(engine))
    (tagged,) = generate(forge, "a red ball <hypernet:hx:0.7>", [script])
    forge.shared.opts.sd_hypernetwork = "hx"
    forge.shared.opts.extra_networks_default_multiplier = 0.7
    (from_setting,) = generate(forge, "a red ball", [script])
    assert torch.equal(from_setting, tagged)


def test_an_unknown_name_is_reported_and_the_generation_goes_on_without_it(forge, standalone) -> None:
    forge.load(standalone["sd1"])
    script = load_script(forge).ForgeHypernetworksScript()
    (plain,) = generate(forge, "a red ball", [script])
    (out,) = generate(forge, "a red ball <hypernet:nothere:1>", [script])
    assert torch.equal(out, plain)
    (message,) = forge.module("modules.errors").reported
    assert "there is no hypernetwork named 'nothere'" in message


def test_a_file_for_another_family_is_reported_with_the_models_widths_and_the_others_apply(forge, standalone) -> None:
    engine = forge.load(standalone["sd1"])
    script = load_script(forge).ForgeHypernetworksScript()
    model = forge.module("lib_training.hosts.forge").build_model(engine)
    make_file(forge, model)
    make_file(forge, model, name="xl", widths="2048")
    (alone,) = generate(forge, "a red ball <hypernet:hx:1>", [script])
    (out,) = generate(forge, "a red ball <hypernet:xl:1> <hypernet:hx:1>", [script])
    assert torch.equal(out, alone)
    (message,) = forge.module("modules.errors").reported
    assert "2048" in message and "made for another model family" in message


def test_a_later_clone_of_the_patched_unet_shares_the_hypernetwork_and_casts_do_not_touch_it(forge, standalone) -> None:
    engine = forge.load(standalone["sd1"])
    script = load_script(forge).ForgeHypernetworksScript()
    make_file(forge, forge.module("lib_training.hosts.forge").build_model(engine))
    probe = Probe()
    generate(forge, "a red ball <hypernet:hx:1>", [script, probe])
    (unet, patches), *_ = probe.seen
    patch = patches["attn2_patch"][0]
    clone = unet.clone()
    assert clone.model_options["transformer_options"]["patches"]["attn2_patch"][0] is patch
    assert patch.to(torch.float16) is patch
    assert all(p.dtype == torch.float32 for pair in patch.modules.values() for m in pair for p in m.parameters())


def test_unloading_the_script_gives_forge_its_own_hypernet_extra_network_back(forge) -> None:
    extra_networks = forge.module("modules.extra_networks")
    extra_networks.register_default_extra_networks()  # at startup, before the UI
    forges = extra_networks.extra_network_registry["hypernet"]
    load_script(forge)
    assert extra_networks.extra_network_registry["hypernet"] is not forges
    forge.module("modules.script_callbacks").script_unloaded_callback()
    assert extra_networks.extra_network_registry["hypernet"] is forges


def test_in_a1111_the_script_is_hidden_and_leaves_its_hypernet_extra_network_alone(a1111) -> None:
    extra_networks = a1111.module("modules.extra_networks")
    extra_networks.register_default_extra_networks()
    theirs = extra_networks.extra_network_registry["hypernet"]
    module = load_script(a1111)
    assert module.ForgeHypernetworksScript().show(False) is False
    assert extra_networks.extra_network_registry["hypernet"] is theirs
