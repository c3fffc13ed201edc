"""The Gradio tabs (Training, Generate, Merge) and the standalone app, host-agnostic.

Tab builders take a `TrainingService` and return a `gr.Blocks`; a WebUI renders them in its own
tabs, the standalone app (`python -m lib_training serve`) in one page with the HTTP API beside it.
Gradio is imported only by the modules that build UI, never by this package's `__init__`, so the
CLI starts without it.
"""
