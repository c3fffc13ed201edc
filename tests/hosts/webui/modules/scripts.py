"""Stand-in for `modules.scripts`: the base class of txt2img / img2img scripts."""

AlwaysVisible = object()


class Script:
    infotext_fields = None
    is_txt2img = False
    is_img2img = False

    def title(self):
        raise NotImplementedError

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        return []

    def process(self, p, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass
