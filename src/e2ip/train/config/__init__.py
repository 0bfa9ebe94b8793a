"""The training configuration: schema (:mod:`.schema`), checks (:mod:`.checks`), YAML reading,
overrides and diffs (:mod:`.yaml_io`), and the generated reference (:mod:`.doc`).
"""
