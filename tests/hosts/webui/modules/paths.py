"""Stand-in for `modules.paths`: the WebUI's folders (set by the test fixture)."""

script_path = "."
data_path = "."
models_path = "./models"
