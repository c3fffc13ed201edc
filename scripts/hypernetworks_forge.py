"""sd-webui-training: `<hypernet:NAME:STRENGTH>` applied in Forge, which parses the tag but no longer
applies it (A1111 applies it itself; there this script stays hidden and does nothing).

Everything lives in `lib_training.hosts.forge_hypernetworks`.
"""

from modules import script_callbacks, scripts

from lib_training.hosts.detect import host_kind

FORGE = host_kind() == "forge"

if FORGE:
    from lib_training.hosts.forge_hypernetworks import hypernetworks

    script_callbacks.on_before_ui(hypernetworks.register)
    script_callbacks.on_script_unloaded(hypernetworks.unregister)


class ForgeHypernetworksScript(scripts.Script):
    def title(self):
        return "Hypernetworks (sd-webui-training)"

    def show(self, is_img2img):
        return scripts.AlwaysVisible if FORGE else False

    def process_before_every_sampling(self, p, *args, **kwargs):
        if FORGE:
            hypernetworks.before_sampling(p)

    def postprocess(self, p, processed, *args):
        if FORGE:
            hypernetworks.after_generation(p)
