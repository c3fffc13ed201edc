"""Aesthetic gradients: an aesthetic embedding made from images steers the text encoder per prompt.

As in A1111's aesthetic-gradients extension: an *aesthetic embedding* is the mean CLIP image
feature of a folder of images (`create.py`, stored as the `.pt` that extension reads:
`embedding_file.py`). At generation time a private copy of the text tower whose feature width
fits the embedding is tuned for a few Adam steps so that the prompt's text features point at the
embedding, and the prompt's conditioning becomes a mix of the original and the tuned tower's
(`personalise.py`). The host's own tower is never touched; the copy is made once per model and
reset before each prompt, and results are cached per prompt, settings and embedding.

Unlike the original extension this is not a training method of the registry: nothing is trained
and saved, the text encoder is personalised per prompt at generation.
"""
