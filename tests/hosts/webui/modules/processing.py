"""Stand-in for Forge's `modules.processing`: the order of a txt2img generation's steps around the
sampler (scripts, extra networks, the per-sampling copy of `forge_objects`, hires fix's second pass
with its own prompt's extra networks), with one UNet evaluation for each sampling. The conditioning
is given (`c`), not encoded, and the hires pass samples the same latents."""

from dataclasses import dataclass, field

from modules import extra_networks


@dataclass
class StableDiffusionProcessing:
    sd_model: object
    prompt: str
    x: object  # the latents the sampler starts from [B, C, h, w]
    timesteps: object  # [B]
    c: object  # the conditioning [B, M, width]
    y: object = None  # SDXL's vector conditioning [B, adm]
    batch_size: int = 1
    n_iter: int = 1
    scripts: object = None
    disable_extra_networks: bool = False
    extra_generation_params: dict = field(default_factory=dict)
    extra_network_data: dict = field(default=None, init=False)
    enable_hr: bool = False
    hr_prompt: str = ""  # the hires pass's prompt; empty: the first pass's
    is_hr_pass: bool = False
    hr_extra_network_data: dict = field(default=None, init=False)

    def parse_extra_network_prompts(self):
        self.prompts, self.extra_network_data = extra_networks.parse_prompts(self.prompts)
        if self.enable_hr:
            hr_prompts = [self.hr_prompt or self.prompt] * len(self.prompts)
            self.hr_prompts, self.hr_extra_network_data = extra_networks.parse_prompts(hr_prompts)


def _hr_pass(p):
    """`sample_hr_pass`: the hires prompt's extra networks, the scripts once, the copy again, the scripts
    again (as Forge calls them), then the sampler."""
    from backend.sampling import sampling_function

    p.is_hr_pass = True
    if not p.disable_extra_networks:
        extra_networks.activate(p, p.hr_extra_network_data)
    if p.scripts is not None:
        p.scripts.process_before_every_sampling(p, x=p.x, noise=p.x, c=p.c, uc=None)
    p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()
    if p.scripts is not None:
        p.scripts.process_before_every_sampling(p, x=p.x, noise=p.x, c=p.c, uc=None)
    out = sampling_function.calc_cond(p.sd_model.forge_objects.unet, p.x, p.timesteps, p.c, p.y)
    p.is_hr_pass = False
    return out


@dataclass
class Processed:
    outputs: list  # the sampler's UNet output per batch
    all_prompts: list


def process_images(p):
    from backend.sampling import sampling_function

    p.all_prompts = [p.prompt] * (p.batch_size * p.n_iter)
    if p.scripts is not None:
        p.scripts.process(p)
    outputs = []
    for n in range(p.n_iter):
        p.iteration = n
        p.sd_model.forge_objects = p.sd_model.forge_objects_original.shallow_copy()
        p.prompts = p.all_prompts[n * p.batch_size : (n + 1) * p.batch_size]
        p.parse_extra_network_prompts()
        if not p.disable_extra_networks:
            extra_networks.activate(p, p.extra_network_data)
        p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()
        # sample(): the copy again, then the scripts' patches on it, then the sampler
        p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()
        if p.scripts is not None:
            p.scripts.process_before_every_sampling(p, x=p.x, noise=p.x, c=p.c, uc=None)
        unet = p.sd_model.forge_objects.unet
        outputs.append(sampling_function.calc_cond(unet, p.x, p.timesteps, p.c, p.y))
        if p.enable_hr:
            outputs.append(_hr_pass(p))
    if not p.disable_extra_networks and p.extra_network_data:
        extra_networks.deactivate(p, p.extra_network_data)
    processed = Processed(outputs, list(p.all_prompts))
    if p.scripts is not None:
        p.scripts.postprocess(p, processed)
    return processed
