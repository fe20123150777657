"""angelmed: run, train, serve and evaluate AntAngelMed / Ling-2.0 (BailingMoeV2) medical MoE models."""

__version__ = "0.1.0"

MEDICAL_ADVISORY = (
    "Medical advisory: angelmed models are research software. Their answers may be wrong or incomplete "
    "and are not a diagnosis or a substitute for a qualified clinician. In an emergency call your local "
    "emergency number."
)


def _register_with_transformers() -> None:
    """Make `bailing_moe` load through transformers' Auto classes as soon as transformers is imported.

    Importing transformers costs seconds, so `import angelmed` does not do it: if transformers is already
    loaded we register now, otherwise a one-shot import hook registers right after transformers loads.
    """
    import importlib.abc
    import importlib.util
    import sys

    def register() -> None:
        try:
            import angelmed.hf  # noqa: F401  (registers on import)
        except ImportError:  # an incompatible transformers: the native path still works
            pass

    if "transformers" in sys.modules:
        register()
        return

    class _AfterTransformers(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "transformers":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                register()

            spec.loader.exec_module = exec_then_register
            return spec

    sys.meta_path.insert(0, _AfterTransformers())


_register_with_transformers()
