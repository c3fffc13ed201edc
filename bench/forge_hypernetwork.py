"""The time `<hypernet:NAME:1>` adds to a UNet evaluation in Forge (through our attention patches), and
that time against our own attachment's on the same UNet.

Forge here is the test stand-in (`tests/hosts/`: Forge's UNet blocks with its attn1/attn2 patch calls,
its patchers, extra networks, scripts and the order of a generation), loaded from our model's
weights; the UNet is SD1-shaped at the chosen width (the text context is 768 wide as in SD1; the
text encoders are tiny, as the context is given). Cases, each the shortest of `--repeats` UNet evaluations
(interleaved, after one warm-up each): no tag; a hypernetwork on the text context only (768); one on
the context and the feature widths (A1111's default: 768 and every self-attention width). Each
hypernetwork case runs through Forge's patches (the transformer options of the patcher a generation
of the stand-in gave its sampler) and through our attachment (`apply_for_generation`, hooks on the
same UNet): the ratio of the added times says what Forge's mechanism costs against ours. The added
time per image is the added time per evaluation (a sampler evaluates the UNet alike at every step);
the patcher's clone, made once per sampling, is left out.

    python bench/forge_hypernetwork.py                 # width 64, 256 px
    python bench/forge_hypernetwork.py --tiny --repeats 1   # a quick check of the script
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "hosts")]

SEED = 0


def build_standalone(args: argparse.Namespace) -> Any:
    from lib_training.formats.family import ModelFamily
    from lib_training.model.networks.text_encoder import TextEncoderConfig
    from lib_training.model.networks.unet import UNetConfig
    from lib_training.model.networks.vae import VAEConfig
    from lib_training.model.standalone import build_random

    family = ModelFamily.parse("sd1")
    unet = UNetConfig.tiny(family.arch) if args.tiny else replace(UNetConfig.sd15(), model_channels=args.width)
    text = TextEncoderConfig.for_arch(family.arch, tiny=True)
    return build_random(family, unet, VAEConfig.tiny(), text, SEED)


def best_seconds(cases: dict[str, Any], repeats: int) -> dict[str, float]:
    """The shortest time of each case over `repeats` rounds, the cases interleaved in every round (so
    that a slower stretch of a shared machine hits them alike), after one warm-up each."""
    for run in cases.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=64, help="UNet model_channels (SD1.5: 320)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent: / 8)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="the tiny test UNet: checks that the script runs")
    args = parser.parse_args()
    torch.manual_seed(SEED)

    from webui_support import installed

    from lib_training.methods.hypernetwork import HypernetworkConfig, HypernetworkMethod, create_hypernetwork
    from lib_training.methods.hypernetwork_attach import find_kv_sites

    own = build_standalone(args)
    with tempfile.TemporaryDirectory() as folder, installed("forge", Path(folder)) as forge:
        engine = forge.load(own)
        processing = forge.module("modules.processing")
        scripts = forge.module("modules.scripts")
        extra_networks = forge.module("modules.extra_networks")
        extra_networks.register_default_extra_networks()
        from lib_training.hosts import forge as forge_host
        from lib_training.hosts.forge_hypernetworks import hypernetworks

        hypernetworks.register()
        model = forge_host.build_model(engine)
        sites = find_kv_sites(model)
        context_width = next(site.width for site in sites if site.cross)
        every = ", ".join(str(w) for w in sorted({site.width for site in sites}))
        out = forge.shared.cmd_opts.hypernetwork_dir
        for name, widths in (("context", str(context_width)), ("every", every)):
            create_hypernetwork(HypernetworkConfig(name=name, widths=widths, activation="relu"), out)
        forge.shared.reload_hypernetworks()

        dm = engine.forge_objects_original.unet.model.diffusion_model
        latent = args.size // 8
        generator = torch.Generator().manual_seed(SEED)
        x = torch.randn(1, dm.config.in_channels, latent, latent, generator=generator)
        c = torch.randn(1, 77, dm.config.context_dim, generator=generator)
        t = torch.tensor([500])

        class Script:
            """Ours, as `scripts/hypernetworks_forge.py`; and it keeps the patcher the sampler got."""

            patcher: Any = None

            def process(self, p: Any, *a: Any) -> None:
                pass

            def process_before_every_sampling(self, p: Any, *a: Any, **k: Any) -> None:
                hypernetworks.before_sampling(p)
                self.patcher = p.sd_model.forge_objects.unet

            def postprocess(self, p: Any, processed: Any, *a: Any) -> None:
                hypernetworks.after_generation(p)

        script = Script()
        runner = scripts.ScriptRunner([script])

        def forge_run(prompt: str) -> Any:
            """A UNet evaluation as Forge's sampler makes it with the patcher of a generation of `prompt`."""
            p = processing.StableDiffusionProcessing(engine, prompt, x, t, c, scripts=runner)
            with torch.inference_mode():
                processing.process_images(p)
            options = script.patcher.model_options["transformer_options"]

            def run() -> None:
                with torch.inference_mode():
                    dm(x, t, context=c, transformer_options=dict(options))

            return run

        def ours_run(name: str) -> Any:
            method = HypernetworkMethod.load(Path(out) / f"{name}.pt", model)

            def run() -> None:
                with torch.inference_mode(), method.apply_for_generation(model, 1.0):
                    dm(x, t, context=c, transformer_options={})

            return run

        def ours_plain() -> None:
            with torch.inference_mode():
                dm(x, t, context=c, transformer_options={})

        cases = {"forge": forge_run("a ball"), "ours": ours_plain}
        for name in ("context", "every"):
            cases[f"forge {name}"] = forge_run(f"a ball <hypernet:{name}:1>")
            cases[f"ours {name}"] = ours_run(name)
        best = best_seconds(cases, args.repeats)
        threads = torch.get_num_threads()
        print(f"SD1 shapes, UNet width {dm.config.model_channels}, {args.size} px, CPU threads {threads}")
        print(
            f"no hypernetwork: {best['forge'] * 1000:.1f} ms per UNet evaluation (Forge's options), "
            f"{best['ours'] * 1000:.1f} ms (the UNet alone)"
        )
        for name, label in (("context", f"text context ({context_width})"), ("every", f"widths {every}")):
            forge_added = best[f"forge {name}"] - best["forge"]
            ours_added = best[f"ours {name}"] - best["ours"]
            ratio = forge_added / ours_added if ours_added > 0 else float("nan")
            print(
                f"hypernetwork on {label}: Forge's patches add {forge_added * 1000:.1f} ms "
                f"({100 * forge_added / best['forge']:+.1f}% per image), our attachment {ours_added * 1000:.1f} ms "
                f"({100 * ours_added / best['ours']:+.1f}%); added time Forge / ours {ratio:.2f}x"
            )


if __name__ == "__main__":
    main()
