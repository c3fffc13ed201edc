"""A tiny world that draws: a generator of captioned pictures, a classifier, and a pretrained tiny SD1 model."""
