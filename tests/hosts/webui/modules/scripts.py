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

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass


class ScriptRunner:
    """The always-on scripts of a generation; a script that fails is reported and the generation goes on."""

    def __init__(self, scripts=()):
        self.alwayson_scripts = list(scripts)

    def _each(self, method, p, *args, **kwargs):
        from modules import errors

        for script in self.alwayson_scripts:
            try:
                getattr(script, method)(p, *args, **kwargs)
            except Exception:
                errors.report(f"Error running {method}: {type(script).__name__}", exc_info=True)

    def process(self, p):
        self._each("process", p)

    def process_before_every_sampling(self, p, **kwargs):
        self._each("process_before_every_sampling", p, **kwargs)

    def postprocess(self, p, processed):
        self._each("postprocess", p, processed)
