"""sd-webui-training: aesthetic gradients in txt2img and img2img (an always-visible section).

The controls and meaning of the aesthetic-gradients extension, on SD1, SD2 and SDXL, in A1111 and
Forge; everything lives in `lib_training.hosts.aesthetic`.
"""

from modules import scripts

from lib_training.hosts import aesthetic


class AestheticGradientsScript(scripts.Script):
    def title(self):
        return "Aesthetic gradients"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        section = aesthetic.build_section(is_img2img)
        self.infotext_fields = section.infotext_fields()
        return section.inputs

    def process(self, p, *values):
        aesthetic.process(p, *values)

    def postprocess(self, p, processed, *values):
        aesthetic.after_generation(p)
