"""Front ends: ways into the IR other than writing a spec by hand.

- `einpart.frontend.trace.trace(fn, *example_args)`: a JAX function -> Graph,
  through its jaxpr. (The module and the function share a name, so import the
  function from the module: `from einpart.frontend.trace import trace`.)
- `einpart.frontend.hf.import_hf(dir, out)`: a Hugging Face-style checkpoint
  on disk (config.json + *.safetensors) -> a spec, einpart-named weights and
  a mapping of where each weight came from.

Nothing is imported here, so that the CLI's `import-hf` does not pay for
importing JAX.
"""
