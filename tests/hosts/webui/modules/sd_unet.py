"""Stand-in for `modules.sd_unet`: an active replacement UNet (e.g. TensorRT), if any."""

current_unet = None
