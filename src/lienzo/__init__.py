"""lienzo: a local, offline studio for creating art with diffusion models."""

__version__ = "0.1.0"

__all__ = ["GenerationRequest", "generate", "load_model", "__version__"]


def __getattr__(name: str):
    # Lazy: importing lienzo (for --help, settings, metadata) must not pay for importing torch.
    if name == "GenerationRequest":
        from lienzo.generation.request import GenerationRequest

        return GenerationRequest
    if name in ("generate", "load_model"):
        from lienzo import api

        return getattr(api, name)
    raise AttributeError(f"module 'lienzo' has no attribute {name!r}")
