"""HuggingFace safetensors checkpoints <-> meshlm run directories (Orbax).

``hf_to_orbax`` / ``orbax_to_hf`` (``convert.hf``) are the machinery; what each family's tensors
are called and how their layouts differ lives with the family (``hf_tensors()`` on its config
class, built from ``convert.mapping``). This package imports nothing at load time, so model
modules can import ``convert.mapping`` without a cycle.
"""
