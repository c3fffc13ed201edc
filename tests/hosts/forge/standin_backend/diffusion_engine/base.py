"""Stand-in for Forge's `ForgeObjects` and `ForgeDiffusionEngine`."""


class ForgeObjects:
    def __init__(self, unet, clip, vae, clipvision):
        self.unet = unet
        self.clip = clip
        self.vae = vae
        self.clipvision = clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class ForgeDiffusionEngine:
    def __init__(self, objects):
        self.forge_objects = objects
        self.forge_objects_original = objects.shallow_copy()
        self.forge_objects_after_applying_lora = objects.shallow_copy()
        self.current_lora_hash = str([])
        self.first_stage_model = None
        self.cond_stage_model = None
        self.is_sd1 = self.is_sd2 = self.is_sdxl = self.is_sd3 = False


class StableDiffusion(ForgeDiffusionEngine):
    def __init__(self, objects, engine):
        super().__init__(objects)
        self.text_processing_engine = engine
        self.is_sd1 = True


class StableDiffusionXL(ForgeDiffusionEngine):
    def __init__(self, objects, engine_l, engine_g):
        super().__init__(objects)
        self.text_processing_engine_l = engine_l
        self.text_processing_engine_g = engine_g
        self.is_sdxl = True
